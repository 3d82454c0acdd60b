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

use crate::compact::Text;
use crate::condition::Condition;
use crate::meta::{resource, ObjectMeta, API_VERSION};
use crate::quantity::Quantity;
use crate::snapshot::SnapshotSchedule;

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
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub api_version: crate::compact::Word,
    /// Always `Volume`.
    #[schemars(extend("const" = "Volume"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub kind: crate::compact::Word,
    pub metadata: ObjectMeta,
    pub spec: VolumeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeStatus>,
}

resource!(
    Volume,
    VolumeStatus,
    "Volume",
    "volumes",
    Volume::concerned_machines
);

impl Volume {
    pub fn new(name: impl Into<crate::Text>, spec: VolumeSpec) -> Self {
        Volume {
            api_version: API_VERSION.into(),
            kind: "Volume".into(),
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
    pub source: Option<Box<VolumeSource>>,
    /// Which machines may hold the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// The binding: set by the scheduler; set it yourself to pin; changing it moves the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Text>,
    /// NFS export; without it, or with no clients, the volume is exported to nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<Export>,
    /// Snapshots taken on a schedule (`{every: 1h, keep: 24}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Box<SnapshotSchedule>>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
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
        match self.source.as_deref() {
            Some(VolumeSource {
                snapshot: Some(_), ..
            }) => needs.push(Capability::Snapshot),
            Some(_) => needs.push(Capability::Clone),
            None => {}
        }
        if self.snapshots.is_some() && !needs.contains(&Capability::Snapshot) {
            needs.push(Capability::Snapshot);
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

    /// The machines whose agents this volume concerns, each of which sees it in its view
    /// ([`crate::Resource::machine_views`]): the one it is bound to (`spec.machine`), the one
    /// serving it (`status.machine`), and both ends of a move for as long as the move is
    /// recorded (`status.move`, until the source has cleaned up).
    pub fn concerned_machines(&self) -> std::collections::BTreeSet<&str> {
        let status = self.status.as_ref();
        let moving = status.and_then(|s| s.move_.as_ref());
        self.spec
            .machine
            .as_deref()
            .into_iter()
            .chain(status.and_then(|s| s.machine.as_deref()))
            .chain(moving.map(|m| m.from.as_str()))
            .chain(moving.map(|m| m.to.as_str()))
            .collect()
    }

    /// The machines whose ledger counts this volume: where its data is (or, never provisioned,
    /// where it is bound), and the target of a granted move — both ends for the whole move. A
    /// `spec.machine` edit alone reserves nothing on the new machine until the scheduler grants
    /// the move.
    pub fn ledger_machines(&self) -> impl Iterator<Item = &str> {
        let status = self.status.as_ref();
        let holder = status
            .and_then(|s| s.machine.as_deref())
            .or(self.spec.machine.as_deref());
        let target = status
            .and_then(|s| s.move_.as_ref())
            .map(|m| m.to.as_str())
            .filter(|t| Some(*t) != holder);
        holder.into_iter().chain(target)
    }

    /// Bytes the ledger counts for this volume on `machine` (one of [`Volume::ledger_machines`]):
    /// [`Volume::ledger_bytes`], plus its snapshots' bytes where its data is (volumes with
    /// snapshots do not move, so the snapshots are there). Shared by the scheduler and the
    /// agent's machine report.
    pub fn reserved_on(&self, machine: &str) -> u64 {
        let holder = self.status.as_ref().and_then(|s| s.machine.as_deref());
        let snapshots = if holder == Some(machine) {
            self.snapshot_bytes()
        } else {
            0
        };
        self.ledger_bytes() + snapshots
    }

    /// Bytes the volume's snapshots hold exclusively on its machine.
    pub fn snapshot_bytes(&self) -> u64 {
        self.status.as_ref().map_or(0, |s| s.snapshot_bytes)
    }

    /// The snapshots the volume holds on its machine (or is taking).
    pub fn snapshot_names(&self) -> &[String] {
        self.status.as_ref().map_or(&[], |s| s.snapshots.as_slice())
    }

    /// The move in progress, if any.
    pub fn moving(&self) -> Option<&MoveStatus> {
        self.status.as_ref().and_then(|s| s.move_.as_deref())
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
    /// Shrinking a volume online (a smaller `spec.size`).
    Shrink,
    /// Growing a volume online (a larger `spec.size`).
    Grow,
}

impl Capability {
    pub fn as_str(&self) -> &'static str {
        match self {
            Capability::Compression => "compression",
            Capability::Clone => "clone",
            Capability::Snapshot => "snapshot",
            Capability::SendReceive => "sendReceive",
            Capability::Defragment => "defragment",
            Capability::Shrink => "shrink",
            Capability::Grow => "grow",
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
    /// Name of the volume to clone (its current content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Name of the Snapshot to restore (its content when it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

impl VolumeSource {
    /// A clone of volume `name`.
    pub fn volume(name: impl Into<String>) -> Self {
        VolumeSource {
            volume: Some(name.into()),
            snapshot: None,
        }
    }

    /// A restore of snapshot `name`.
    pub fn snapshot(name: impl Into<String>) -> Self {
        VolumeSource {
            volume: None,
            snapshot: Some(name.into()),
        }
    }

    /// The volume cloned, if this is a clone.
    pub fn clone_of(&self) -> Option<&str> {
        self.volume.as_deref()
    }

    /// What the source is, for messages: `volume db`, `snapshot db-1`.
    pub fn describe(&self) -> String {
        match (&self.volume, &self.snapshot) {
            (Some(v), _) => format!("volume {v}"),
            (None, Some(s)) => format!("snapshot {s}"),
            (None, None) => "nothing".into(),
        }
    }
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
    #[serde(default, deserialize_with = "crate::compact::exact_vec")]
    pub clients: Vec<ExportClient>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportClient {
    /// An IP address, a CIDR (10.0.0.0/24) or a hostname.
    pub host: Text,
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

/// What agents and the scheduler observed of a volume.
///
/// The parts a volume carries only for a while (a move, the last move, a clone's seeding) are
/// boxed: a controller holds every volume's status, and most have none of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    /// Where the data actually is (spec.machine is where it should be).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Text>,
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
    /// The move in progress: present from the scheduler's grant (room reserved on the target)
    /// until the source has destroyed its copy.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "move")]
    pub move_: Option<Box<MoveStatus>>,
    /// The last move that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_move: Option<Box<LastMove>>,
    /// A clone being seeded from a snapshot of its source on another machine (written by the
    /// clone's agent until the clone is provisioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_seed: Option<Box<CloneSeed>>,
    /// The Snapshots of this volume held on its machine, or being taken (names). Written by the
    /// agent before it takes one; while it is not empty the volume does not move.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub snapshots: Vec<String>,
    /// Bytes held only by this volume's snapshots (counted in the machine's ledger).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub snapshot_bytes: u64,
    /// Claims whose host the volume's export includes now (written by its agent).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub claims: Vec<String>,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub conditions: Vec<Condition>,
}

/// Where a volume is in its life. Each phase is written by exactly one actor (see
/// ARCHITECTURE.md): Pending and Scheduled by the scheduler, Lost by the scheduler when the
/// machine holding the data is gone; Ready, Moving, Deleting and Failed by the agent holding
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
    /// Being moved to another machine (see `status.move`); served from the source until the
    /// cut-over.
    Moving,
}

/// A move of the volume's data from one machine to another. Each field has one writer (see
/// ARCHITECTURE.md, "Moves"): the scheduler creates it (the grant), the target agent advances
/// `stage` up to CleaningUp and reports progress, the source agent removes it after destroying
/// its copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveStatus {
    /// The machine holding the data when the move was granted.
    pub from: String,
    /// The machine the data goes to (room is reserved there).
    pub to: String,
    pub stage: MoveStage,
    pub started: DateTime<Utc>,
    /// Rounds of transfer finished (the first is the full seed, the rest incremental).
    #[serde(default)]
    pub rounds: u32,
    /// Bytes of the current round received by the target.
    #[serde(default)]
    pub bytes_done: u64,
    /// The source's estimate of the current round's bytes (the volume's used bytes for the seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Bytes received over all rounds.
    #[serde(default)]
    pub bytes_sent: u64,
    /// SHA-256 (hex) of the credential the target presents to the source; only the target
    /// holds the credential itself, and a new one replaces it each time the target restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_sha256: Option<String>,
    /// When the cut-over began (the target wrote stage CuttingOver; the source serves no write
    /// after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<DateTime<Utc>>,
    /// How long clients could not write: from the source stopping to the target serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_over_millis: Option<u64>,
    /// Why the move is not progressing right now (it is retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
}

impl MoveStatus {
    /// A move from `from` to `to` just granted at `started`: stage Seeding, nothing sent yet.
    pub fn granted(from: &str, to: &str, started: DateTime<Utc>) -> Self {
        MoveStatus {
            from: from.to_string(),
            to: to.to_string(),
            stage: MoveStage::Seeding,
            started,
            rounds: 0,
            bytes_done: 0,
            bytes_total: None,
            bytes_sent: 0,
            credential_sha256: None,
            frozen: None,
            cut_over_millis: None,
            stalled: None,
        }
    }
}

/// Where a move is. A move can be cancelled (`spec.machine` set back) until CuttingOver.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum MoveStage {
    /// Room reserved on the target; the full copy of a read-only snapshot is being sent.
    Seeding,
    /// Incremental rounds until what changed since the last round is small.
    Converging,
    /// The source has stopped serving; the final increment goes over and the target takes over.
    CuttingOver,
    /// The target serves the volume; the source destroys its copy.
    CleaningUp,
}

impl MoveStage {
    pub fn as_str(&self) -> &'static str {
        match self {
            MoveStage::Seeding => "Seeding",
            MoveStage::Converging => "Converging",
            MoveStage::CuttingOver => "CuttingOver",
            MoveStage::CleaningUp => "CleaningUp",
        }
    }

    /// True once the source may have stopped serving: the move can no longer be cancelled.
    pub fn is_committed(&self) -> bool {
        *self >= MoveStage::CuttingOver
    }
}

/// A clone's seed in flight: the machine holding the source, and the SHA-256 of the credential
/// the clone's agent presents to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneSeed {
    pub from: String,
    pub credential_sha256: String,
}

/// The record of a finished move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LastMove {
    pub from: String,
    pub to: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub bytes_sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_over_millis: Option<u64>,
}

impl MoveStatus {
    /// The `Moving` condition's reason and message for this move (every writer derives the
    /// condition from the same fields, so they agree).
    pub fn describe(&self) -> (&'static str, String) {
        let progress = match self.bytes_total {
            Some(total) if total > 0 => format!(
                "{} of ~{} bytes ({}%)",
                self.bytes_done,
                total,
                (self.bytes_done.min(total) * 100 / total)
            ),
            _ => format!("{} bytes", self.bytes_done),
        };
        let message = match self.stage {
            MoveStage::Seeding => format!(
                "moving from machine {} to {}: full copy, {progress}",
                self.from, self.to
            ),
            MoveStage::Converging => format!(
                "moving from machine {} to {}: incremental round {}, {progress}",
                self.from,
                self.to,
                self.rounds + 1
            ),
            MoveStage::CuttingOver => format!(
                "moving from machine {} to {}: the source has stopped serving; the final increment is going over",
                self.from, self.to
            ),
            MoveStage::CleaningUp => format!(
                "moved from machine {} to {}; machine {} is destroying its copy",
                self.from, self.to, self.from
            ),
        };
        match &self.stalled {
            Some(why) => (
                self.stage.as_str(),
                format!("{message} — stalled: {why}; retrying"),
            ),
            None => (self.stage.as_str(), message),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub server: Text,
    pub port: u16,
    pub path: Text,
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
    fn snapshot_bytes_are_reserved_where_the_data_is_and_nowhere_else() {
        let mut v = sized("64Mi");
        v.spec.machine = Some("m2".into());
        v.status = Some(VolumeStatus {
            machine: Some("m1".into()),
            snapshots: vec!["s1".into()],
            snapshot_bytes: 8 << 20,
            ..Default::default()
        });
        assert_eq!(v.reserved_on("m1"), v.ledger_bytes() + (8 << 20));
        assert_eq!(v.reserved_on("m2"), v.ledger_bytes());
        assert_eq!(v.snapshot_names(), ["s1"]);
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
    fn the_ledger_counts_the_holder_and_a_granted_target_only() {
        let mut v = sized("64Mi");
        assert_eq!(v.ledger_machines().count(), 0, "unbound");
        v.spec.machine = Some("m1".into());
        assert_eq!(v.ledger_machines().collect::<Vec<_>>(), ["m1"]);
        v.status = Some(VolumeStatus {
            machine: Some("m1".into()),
            ..Default::default()
        });
        v.spec.machine = Some("m2".into());
        assert_eq!(
            v.ledger_machines().collect::<Vec<_>>(),
            ["m1"],
            "a move not granted reserves nothing on its target"
        );
        v.status.as_mut().unwrap().move_ =
            Some(Box::new(MoveStatus::granted("m1", "m2", Utc::now())));
        assert_eq!(v.ledger_machines().collect::<Vec<_>>(), ["m1", "m2"]);
        let (reason, message) = v.moving().unwrap().describe();
        assert_eq!(reason, "Seeding");
        assert!(
            message.contains("m1") && message.contains("m2"),
            "{message}"
        );
    }

    #[test]
    fn compression_and_clones_need_their_capabilities() {
        let mut spec = sized("1Gi").spec;
        assert!(spec.required_capabilities().is_empty());
        spec.compression = Compression::Zstd;
        spec.source = Some(Box::new(VolumeSource::volume("base")));
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
