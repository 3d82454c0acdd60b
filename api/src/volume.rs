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
    /// The hard limit the spec asks for, in bytes (a whole number of MiB).
    pub fn size_bytes(&self) -> u64 {
        self.size.round_up_mib().bytes()
    }

    /// Bytes this volume reserves on its machine: size × (1 + dilation%), rounded up to a MiB.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes_for(self.size_bytes())
    }

    /// What a volume of `size_bytes` with this spec's dilation reserves.
    pub fn reserved_bytes_for(&self, size_bytes: u64) -> u64 {
        let size = Quantity::from_bytes(size_bytes).round_up_mib().bytes() as u128;
        let reserved = size * (100 + self.dilation as u128) / 100;
        Quantity::from_bytes(u64::try_from(reserved).unwrap_or(u64::MAX))
            .round_up_mib()
            .bytes()
    }

    /// The capabilities a machine's backend needs to serve this spec.
    pub fn required_capabilities(&self) -> Vec<Capability> {
        let mut needs = Vec::new();
        if !self.compression.is_none() {
            needs.push(Capability::Compression);
        }
        if self.source.is_some() {
            needs.push(Capability::Clone);
        }
        needs
    }
}

impl Volume {
    /// The size the agent may give the volume now: what the spec asks, but never more than the
    /// scheduler has reserved room for (`status.allocatedBytes`; volumes from before
    /// allocations existed count as granted).
    pub fn granted_size_bytes(&self) -> u64 {
        let asked = self.spec.size_bytes();
        self.status
            .as_ref()
            .and_then(|s| s.allocated_bytes)
            .map_or(asked, |a| a.min(asked))
    }

    /// Bytes the capacity ledger counts for this volume on its machine: the reservation of the
    /// granted size, or of the limit actually in force if that is larger (a shrink the agent
    /// could not apply still holds its bytes). Shared by the scheduler and the agent's machine
    /// report, so both count the same.
    pub fn ledger_bytes(&self) -> u64 {
        let in_force = self
            .status
            .as_ref()
            .and_then(|s| s.usage.as_ref())
            .map_or(0, |u| u.limit_bytes);
        self.spec
            .reserved_bytes_for(self.granted_size_bytes().max(in_force))
    }

    /// The machines whose ledger counts this volume: where it is bound and where its data is
    /// (both, while they differ: a move holds room on both ends).
    pub fn ledger_machines(&self) -> impl Iterator<Item = &str> {
        let bound = self.spec.machine.as_deref();
        let holder = self
            .status
            .as_ref()
            .and_then(|s| s.machine.as_deref())
            .filter(|h| Some(*h) != bound);
        bound.into_iter().chain(holder)
    }
}

/// What a backend can do beyond the core every backend has (create, destroy, resize, list,
/// usage, capacity). Agents publish theirs in Machine status; the scheduler places a volume
/// only where its spec can be served.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Capability {
    /// Transparent compression (`spec.compression` other than none).
    Compression,
    /// A volume as a copy of another's content (`spec.source`).
    Clone,
    /// Read-only point-in-time copies.
    Snapshot,
    /// Streams of a volume's content for moves between machines.
    SendReceive,
    /// Online defragmentation (`cobalt.io/defragment`).
    Defragment,
}

impl Capability {
    pub fn as_str(&self) -> &'static str {
        match self {
            Capability::Compression => "compression",
            Capability::Clone => "clone",
            Capability::Snapshot => "snapshot",
            Capability::SendReceive => "sendReceive",
            Capability::Defragment => "defragment",
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// The size in bytes the scheduler has reserved room for on the volume's machine. The agent
    /// never grows the volume past it; a grow that does not fit leaves it at the old size (see
    /// the `CapacityReserved` condition). Absent on volumes never bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    /// The last `cobalt.io/defragment` token whose defragmentation finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defragmented: Option<String>,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Where a volume is in its life. Each phase is written by exactly one actor (see
/// ARCHITECTURE.md): Pending and Scheduled by the scheduler, Lost by the scheduler when the
/// machine holding the data is gone; Ready, Resizing, Deleting and Failed by the agent holding
/// (or about to create) the data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumePhase {
    /// Not bound to a machine yet (or no machine can take it: see the Scheduled condition).
    #[default]
    Pending,
    /// Bound; the agent has not reported it yet.
    Scheduled,
    /// Provisioned, exported as the spec says, serving.
    Ready,
    /// Being deleted: unexported, its data is going (a destroy that fails stays here, with the
    /// error in the Ready condition).
    Deleting,
    /// Cannot be served as declared; the Ready condition's reason and message say why (data
    /// missing on its machine, a capability the machine's backend lacks).
    Failed,
    /// The machine holding the data is not ready; the data stays there until it returns.
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

    fn sized(size: &str) -> Volume {
        Volume::new(
            "v",
            VolumeSpec {
                size: size.parse().unwrap(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_grow_is_granted_only_up_to_the_allocation_and_the_ledger_counts_the_limit_in_force() {
        let mut v = sized("128Mi");
        assert_eq!(v.granted_size_bytes(), 128 << 20, "never bound: the spec");
        v.status = Some(VolumeStatus {
            allocated_bytes: Some(64 << 20),
            usage: Some(Usage {
                used_bytes: 0,
                limit_bytes: 64 << 20,
                updated: None,
            }),
            ..Default::default()
        });
        assert_eq!(v.granted_size_bytes(), 64 << 20, "grow not granted yet");
        assert_eq!(v.ledger_bytes(), 64 << 20);
        // A shrink to 32Mi the agent could not apply still holds 64Mi in the ledger.
        v.spec.size = "32Mi".parse().unwrap();
        assert_eq!(v.granted_size_bytes(), 32 << 20);
        assert_eq!(v.ledger_bytes(), 64 << 20);
        v.spec.dilation = 50;
        assert_eq!(v.ledger_bytes(), 96 << 20);
    }

    #[test]
    fn compression_and_clones_need_their_capabilities() {
        let mut spec = sized("1Gi").spec;
        assert!(spec.required_capabilities().is_empty());
        spec.compression = Compression::Zstd;
        spec.source = Some(VolumeSource {
            volume: "base".into(),
        });
        assert_eq!(
            spec.required_capabilities(),
            [Capability::Compression, Capability::Clone]
        );
    }

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
