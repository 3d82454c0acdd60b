//! The Volume kind: a BTRFS subvolume with a hard quota, placed on one Machine and exported over
//! NFS to exactly the hosts its manifest names.
//!
//! `spec` is what the user declares; `spec.machine` is the *binding* — written by the scheduler,
//! or by a user to pin or move a volume. `status` is what agents and the scheduler observed;
//! `status.machine` is where the data actually is.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::condition::Condition;
use crate::meta::{resource, ObjectMeta, API_VERSION};
use crate::quantity::Quantity;

/// The finalizer that keeps a bound Volume until its machine's agent has destroyed the data.
/// The scheduler adds it in the same write that binds the volume; the agent removes it.
pub const AGENT_FINALIZER: &str = "cobalt.io/agent";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(
    title = "Volume",
    description = "A Cobalt volume: a quota-limited BTRFS subvolume exported over NFS."
)]
pub struct Volume {
    /// Always `cobalt.io/v1alpha1`.
    #[schemars(extend("const" = "cobalt.io/v1alpha1"))]
    pub api_version: String,
    /// Always `Volume`.
    #[schemars(extend("const" = "Volume"))]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: VolumeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeStatus>,
}

resource!(Volume, VolumeStatus, "Volume", "volumes");

impl Volume {
    pub fn new(name: impl Into<String>, spec: VolumeSpec) -> Self {
        Volume {
            api_version: API_VERSION.to_string(),
            kind: "Volume".to_string(),
            metadata: ObjectMeta::named(name),
            spec,
            status: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// Hard quota (10Gi, 500Mi, 1G or bytes); at least 1Mi, rounded up to a whole MiB.
    pub size: Quantity,
    /// Percent headroom reserved on the machine beyond `size` (0–1000).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = 1000))]
    pub dilation: u32,
    /// Transparent compression of new writes.
    #[serde(default, skip_serializing_if = "Compression::is_none")]
    pub compression: Compression,
    /// Makes this volume a clone of another volume's current content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// Which machines may hold the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// The binding: set by the scheduler; set it yourself to pin; changing it moves the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// NFS export; without it, or with no clients, the volume is exported to nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<Export>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl VolumeSpec {
    /// Bytes this volume reserves on its machine: size × (1 + dilation%), rounded up to a MiB.
    pub fn reserved_bytes(&self) -> u64 {
        let size = self.size.round_up_mib().bytes() as u128;
        let reserved = size * (100 + self.dilation as u128) / 100;
        Quantity::from_bytes(u64::try_from(reserved).unwrap_or(u64::MAX))
            .round_up_mib()
            .bytes()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
    Lzo,
    Zlib,
}

impl Compression {
    pub fn is_none(&self) -> bool {
        *self == Compression::None
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSource {
    /// Name of the volume to clone.
    pub volume: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Labels a machine must carry, all of them, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Export {
    /// Hosts allowed to mount; none listed = exported to nobody.
    #[serde(default)]
    pub clients: Vec<ExportClient>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportClient {
    /// An IP address, a CIDR (10.0.0.0/24) or a hostname.
    pub host: String,
    /// `rw` (read-write, the default) or `ro` (read-only).
    #[serde(default)]
    pub access: Access,
    /// Map the client's root to an anonymous user (default true).
    #[serde(default = "yes")]
    pub root_squash: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Rw,
    Ro,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    /// Where the data actually is (spec.machine is where it should be).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The last `cobalt.io/defragment` token whose defragmentation finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defragmented: Option<String>,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumePhase {
    #[default]
    Pending,
    Scheduled,
    Provisioning,
    Ready,
    Moving,
    Resizing,
    Deleting,
    Failed,
    Lost,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub server: String,
    pub port: u16,
    pub path: String,
    /// A command a user can paste to mount the volume.
    pub mount: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Usage {
    pub used_bytes: u64,
    pub limit_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_includes_dilation_and_rounds_to_mib() {
        let spec = VolumeSpec {
            size: "10Gi".parse().unwrap(),
            dilation: 20,
            ..Default::default()
        };
        assert_eq!(spec.reserved_bytes(), 12 * (1 << 30));
        let tiny = VolumeSpec {
            size: Quantity::from_bytes(1),
            dilation: 10,
            ..Default::default()
        };
        assert_eq!(tiny.reserved_bytes(), 2 << 20);
    }
}
