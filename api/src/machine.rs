//! The Machine kind: one storage machine running one `cobalt-agent`.
//!
//! Users may declare a Machine (labels, cordon via `unschedulable`, `maxFill`, `drain`); an agent
//! registers its own if absent and never overwrites fields a user set. Liveness is not part of
//! the object: it is the agent's lease-bound `alive` key.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::meta::{resource, ObjectMeta, API_VERSION};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machine", description = "A Cobalt storage machine.")]
pub struct Machine {
    /// Always `cobalt.io/v1alpha1`.
    #[schemars(extend("const" = "cobalt.io/v1alpha1"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub api_version: crate::compact::Word,
    /// Always `Machine`.
    #[schemars(extend("const" = "Machine"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub kind: crate::compact::Word,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MachineSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MachineStatus>,
}

resource!(Machine, MachineStatus, "Machine", "machines");

impl Machine {
    pub fn new(name: impl Into<crate::Text>, spec: MachineSpec) -> Self {
        Machine {
            api_version: API_VERSION.into(),
            kind: "Machine".into(),
            metadata: ObjectMeta::named(name),
            spec,
            status: None,
        }
    }
}

/// The label an agent puts on its Machine naming its backend kind (`btrfs`, `loop`), so
/// manifests can select it with `placement.selector`.
pub const BACKEND_LABEL: &str = "cobalt.io/backend";

impl Machine {
    /// Ready means schedulable: the agent holds its liveness lease (`alive`) and has reported
    /// its capacity. The machine lifecycle writes the phase from this; placement uses the same
    /// test, so a machine is never offered with capacity 0.
    pub fn is_ready_with(&self, alive: bool) -> bool {
        alive
            && self
                .status
                .as_ref()
                .is_some_and(|s| s.capacity.total_bytes > 0)
    }
}

/// Default `maxFill`: the share of a machine's bytes the scheduler may reserve.
pub const DEFAULT_MAX_FILL_PERCENT: u8 = 90;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineSpec {
    /// The address NFS clients reach this machine at.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Cordon: no new volumes are placed here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// Percent of total capacity the scheduler may reserve (1–100, default 90).
    #[serde(default = "default_max_fill")]
    #[schemars(range(min = 1, max = 100))]
    pub max_fill: u8,
    /// Drain: move every volume off this machine (and place no new ones here). Progress is the
    /// `Drained` condition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    /// With `drain`: also move volumes a user pinned here, re-pinning them where they go.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain_pinned: bool,
}

fn default_max_fill() -> u8 {
    DEFAULT_MAX_FILL_PERCENT
}

impl Default for MachineSpec {
    fn default() -> Self {
        MachineSpec {
            address: String::new(),
            unschedulable: false,
            max_fill: DEFAULT_MAX_FILL_PERCENT,
            drain: false,
            drain_pinned: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineStatus {
    #[serde(default)]
    pub phase: MachinePhase,
    #[serde(default)]
    pub capacity: Capacity,
    /// Volumes bound to this machine.
    #[serde(default)]
    pub volumes: u32,
    /// What the machine's backend can do beyond the core (the backend kind is the label
    /// `cobalt.io/backend`). Written by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<crate::volume::Capability>,
    /// The agent's HTTP address (`http://HOST:PORT`), where peer agents pull a moving volume's
    /// data. Written by the agent from its `listen` address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MachinePhase {
    #[default]
    NotReady,
    Ready,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capacity {
    pub total_bytes: u64,
    pub reserved_bytes: u64,
    pub used_bytes: u64,
}
