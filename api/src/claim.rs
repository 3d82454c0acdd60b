//! The Claim kind: a host (an NFS client) asking, typically at boot, for one persistent volume —
//! any free one matching a selector, or the one numbered like the host within its group (an
//! ordinal, for Kafka/ZooKeeper-style ids) — created from a template when none is free.
//!
//! Each field has one writer: `spec` the user (or `cobaltctl claim`), `status` the scheduler
//! leader's claim binder. The bound volume is exported to `spec.host` by the agent holding it, in
//! addition to the Volume's own clients; the Volume's spec is not edited (only its size grows
//! when the claim asks for more).
//!
//! Decisions (ARCHITECTURE.md "Claims"):
//! - **Bindings are fenced etcd transactions** by the leader's binder: one transaction creates
//!   the volume's binding key (`<prefix>/claimbindings/volumes/<volume>`, compared absent), takes
//!   the ordinal key, writes the claim's status — and, when a volume is made from the template,
//!   creates that Volume — guarded by the claim's status revision and the leader key. Two claims
//!   can never hold one volume, nor two live claims one ordinal, whatever the timing or leader.
//! - **Releasing keeps the data**: deleting a claim, or a held claim's holder going away, frees
//!   the volume for the next claim; it is never deleted with the claim.
//! - **A held claim** (`spec.holdSeconds`) is live only while its holder (`cobaltctl claim
//!   --hold`) renews an etcd lease through the API; after the lease expires the claim is
//!   Released. When its holder comes back, it gets its old volume and ordinal if still free.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::meta::{resource, ObjectMeta, API_VERSION};
use crate::volume::{Access, Endpoint, VolumeSpec};

/// The label naming the claim group a volume belongs to (set on volumes made from a template).
pub const GROUP_LABEL: &str = "cobalt.io/claim-group";
/// The label carrying a volume's ordinal within its group.
pub const ORDINAL_LABEL: &str = "cobalt.io/ordinal";
/// Ordinals start at 1.
pub const FIRST_ORDINAL: u32 = 1;
/// Bounds of `spec.holdSeconds`.
pub const HOLD_SECONDS: std::ops::RangeInclusive<u32> = 2..=3600;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(
    title = "Claim",
    description = "A host's claim on one persistent Cobalt volume, bound by strategy."
)]
pub struct Claim {
    /// Always `cobalt.io/v1alpha1`.
    #[schemars(extend("const" = "cobalt.io/v1alpha1"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub api_version: crate::compact::Word,
    /// Always `Claim`.
    #[schemars(extend("const" = "Claim"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub kind: crate::compact::Word,
    pub metadata: ObjectMeta,
    pub spec: ClaimSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClaimStatus>,
}

resource!(Claim, ClaimStatus, "Claim", "claims");

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimSpec {
    /// The address (IP, CIDR or hostname) that mounts the volume; it is exported to it.
    pub host: String,
    /// `rw` (the default) or `ro`.
    #[serde(default)]
    pub access: Access,
    /// Map the host's root to an anonymous user (default true).
    #[serde(default = "yes")]
    pub root_squash: bool,
    /// Labels a volume must carry to satisfy the claim.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// `any` (a free matching volume) or `ordinal` (the group's lowest free number).
    #[serde(default)]
    pub strategy: ClaimStrategy,
    /// The claim group: ordinals are numbered per group, and its volumes carry it as the label
    /// `cobalt.io/claim-group`. Required with `strategy: ordinal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A Volume spec to create when no free volume matches; its size is also the size the
    /// claim asks for: raising it grows the bound volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<VolumeSpec>,
    /// When set, the claim is live only while a holder renews it (`cobaltctl claim --hold`):
    /// this many seconds after the last renewal it is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_seconds: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClaimStrategy {
    /// Any free volume matching the selector (and group); created from the template if none.
    #[default]
    Any,
    /// The volume numbered like the claim: the lowest ordinal no live claim of the group holds.
    Ordinal,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimStatus {
    #[serde(default)]
    pub phase: ClaimPhase,
    /// The bound volume (kept after a release: the volume a returning holder gets back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_uid: Option<String>,
    /// The claim's number within its group (`strategy: ordinal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<u32>,
    /// The machine serving the bound volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Where to mount it, as on the Volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    #[serde(default)]
    pub observed_generation: i64,
    /// `Bound` (False says why the claim waits) and `Ready` (the volume is served to the host).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ClaimPhase {
    /// Not bound yet; the Bound condition says why.
    #[default]
    Pending,
    /// Bound to `status.volume`.
    Bound,
    /// Its holder went away: the volume is free again (data kept).
    Released,
}

impl Claim {
    pub fn new(name: impl Into<crate::Text>, host: impl Into<String>) -> Self {
        Claim {
            api_version: API_VERSION.into(),
            kind: "Claim".into(),
            metadata: ObjectMeta::named(name),
            spec: ClaimSpec {
                host: host.into(),
                access: Access::Rw,
                root_squash: true,
                selector: BTreeMap::new(),
                strategy: ClaimStrategy::Any,
                group: None,
                create: None,
                hold_seconds: None,
            },
            status: None,
        }
    }

    pub fn phase(&self) -> ClaimPhase {
        self.status.as_ref().map(|s| s.phase).unwrap_or_default()
    }

    /// The volume this claim is bound to now, as (name, uid).
    pub fn bound_volume(&self) -> Option<(&str, &str)> {
        let s = self.status.as_ref()?;
        if s.phase != ClaimPhase::Bound {
            return None;
        }
        Some((s.volume.as_deref()?, s.volume_uid.as_deref()?))
    }

    /// Whether volume `labels` satisfy this claim's selector and group (ordinals aside).
    pub fn matches(&self, labels: &crate::compact::StringMap) -> bool {
        self.spec.selector.iter().all(|(k, v)| labels.has(k, v))
            && self
                .spec
                .group
                .as_ref()
                .is_none_or(|g| labels.has(GROUP_LABEL, g))
    }

    /// The labels a volume made from this claim's template carries: the selector's, the group
    /// and the ordinal.
    pub fn template_labels(&self, ordinal: Option<u32>) -> crate::compact::StringMap {
        let mut labels: crate::compact::StringMap =
            self.spec.selector.clone().into_iter().collect();
        if let Some(g) = &self.spec.group {
            labels.insert(GROUP_LABEL.into(), g.clone());
        }
        if let Some(n) = ordinal {
            labels.insert(ORDINAL_LABEL.into(), n.to_string());
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_matches_volumes_with_its_selector_and_group() {
        let mut c = Claim::new("web-1", "10.0.0.7");
        c.spec.selector.insert("app".into(), "web".into());
        let mut labels = crate::compact::StringMap::from([("app", "web")]);
        assert!(c.matches(&labels));
        c.spec.group = Some("web".into());
        assert!(!c.matches(&labels), "the group label is required too");
        labels.insert(GROUP_LABEL.into(), "web".into());
        assert!(c.matches(&labels));
        labels.insert("app".into(), "db".into());
        assert!(!c.matches(&labels));
        let t = c.template_labels(Some(3));
        assert_eq!(t.get(ORDINAL_LABEL).map(crate::Text::as_str), Some("3"));
        assert!(
            c.matches(&t),
            "a volume made from the template satisfies its claim"
        );
    }
}
