//! The Snapshot kind: a read-only, point-in-time copy of one Volume, kept on the machine that
//! holds the volume's data.
//!
//! A user (or the volume's `spec.snapshots` schedule) creates the object; the agent holding the
//! volume takes it on disk and writes its status. A Volume with `spec.source.snapshot` restores
//! it. Each field has one writer: `spec` the user (fixed at creation), `status` the agent.
//!
//! Decisions (ARCHITECTURE.md "Snapshots"):
//! - **A volume with snapshots cannot be deleted** (the API answers 409 naming them) and the agent
//!   never destroys a volume while a Snapshot of it exists; delete the snapshots first
//!   (`cobaltctl delete volume/NAME --with-snapshots` does both).
//! - **A volume with snapshots does not move**: moves wait with reason `HasSnapshots`, and a drain
//!   reports it as blocked. The volume's `status.snapshots` lists the snapshots it holds; the
//!   agent adds a name there (compare-guarded) before it takes the snapshot, and the scheduler
//!   grants a move only while the list is empty, so the two can never cross.
//! - **Space is counted**: a snapshot's exclusive bytes (what deleting it would free) are in its
//!   status and summed in the volume's `status.snapshotBytes`, which the capacity ledger adds to
//!   the volume's reservation.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::meta::{resource, ObjectMeta, API_VERSION};

/// The label every Snapshot carries naming its volume (set by the API on create), so
/// `cobaltctl get snapshots -l cobalt.io/volume=db` lists one volume's snapshots.
pub const VOLUME_LABEL: &str = "cobalt.io/volume";
/// The label on snapshots a volume's `spec.snapshots` schedule took (and prunes).
pub const SCHEDULED_LABEL: &str = "cobalt.io/scheduled";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(
    title = "Snapshot",
    description = "A read-only, point-in-time copy of a Cobalt volume."
)]
pub struct Snapshot {
    /// Always `cobalt.io/v1alpha1`.
    #[schemars(extend("const" = "cobalt.io/v1alpha1"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub api_version: crate::compact::Word,
    /// Always `Snapshot`.
    #[schemars(extend("const" = "Snapshot"))]
    #[serde(deserialize_with = "crate::compact::deserialize_word")]
    pub kind: crate::compact::Word,
    pub metadata: ObjectMeta,
    pub spec: SnapshotSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SnapshotStatus>,
}

resource!(Snapshot, SnapshotStatus, "Snapshot", "snapshots");

impl Snapshot {
    pub fn new(name: impl Into<crate::Text>, volume: impl Into<String>) -> Self {
        Snapshot {
            api_version: API_VERSION.into(),
            kind: "Snapshot".into(),
            metadata: ObjectMeta::named(name),
            spec: SnapshotSpec {
                volume: volume.into(),
            },
            status: None,
        }
    }

    /// Taken on disk and usable as a restore source.
    pub fn ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.ready_to_use)
    }

    /// The machine holding the snapshot's data, once taken.
    pub fn machine(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.machine.as_deref())
    }

    /// The name the snapshot has on its machine's backend: its uid, so a snapshot deleted and
    /// created again under the same name never meets the old data.
    pub fn backend_name(&self) -> &str {
        &self.metadata.uid
    }

    /// True when this snapshot is one of volume `uid`'s (taken of it, or not taken yet and
    /// naming volume `name`).
    pub fn belongs_to(&self, name: &str, uid: &str) -> bool {
        match self.status.as_ref().and_then(|s| s.volume_uid.as_deref()) {
            Some(taken_of) => taken_of == uid,
            None => self.spec.volume == name,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The volume to snapshot (fixed at creation).
    pub volume: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotStatus {
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// True once the snapshot is taken: it can be restored.
    #[serde(default)]
    pub ready_to_use: bool,
    /// The machine holding the snapshot (the volume's machine when it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The uid of the volume it was taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_uid: Option<String>,
    /// Bytes of data the snapshot holds (the volume's used bytes when it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes only this snapshot holds: what deleting it frees. Grows as the volume changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive_bytes: Option<u64>,
    /// When the snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub conditions: Vec<Condition>,
}

/// Where a snapshot is in its life; written by the agent holding its volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotPhase {
    /// Not taken yet (the Ready condition says what it waits for).
    #[default]
    Pending,
    /// Taken: read-only on its machine, restorable.
    Ready,
    /// Cannot be taken as asked (the volume's backend cannot snapshot; the volume is gone).
    Failed,
    /// Being deleted: its data is being freed.
    Deleting,
}

/// A volume's snapshot schedule (`spec.snapshots`): the agent holding the volume takes one
/// every `every` and deletes the oldest scheduled ones beyond `keep`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSchedule {
    /// How often: `1h`, `30m`, `10s` (at least 1s).
    pub every: String,
    /// How many scheduled snapshots to keep (1–1000); older ones are deleted. Snapshots taken by
    /// hand are never pruned.
    pub keep: u32,
}

/// Largest `keep` of a schedule.
pub const MAX_KEEP: u32 = 1000;

impl SnapshotSchedule {
    /// The period, if `every` parses.
    pub fn period(&self) -> Option<std::time::Duration> {
        crate::duration::parse_duration(&self.every).ok()
    }
}

/// The name a scheduled snapshot of `volume` taken at `at` gets: `<volume>-<yyyymmdd-hhmmss>`,
/// the volume's name shortened so the whole stays a valid name.
pub fn scheduled_name(volume: &str, at: DateTime<Utc>) -> String {
    let stamp = at.format("%Y%m%d-%H%M%S").to_string();
    let room = crate::validate::MAX_NAME_LEN - stamp.len() - 1;
    let base: String = volume.chars().take(room).collect();
    format!("{}-{stamp}", base.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_names_are_valid_names_even_for_the_longest_volume_names() {
        let at = DateTime::parse_from_rfc3339("2026-12-02T05:07:09Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(scheduled_name("db", at), "db-20261202-050709");
        let long = format!("{}-x", "a".repeat(60));
        let name = scheduled_name(&long, at);
        assert!(name.len() <= 63, "{name}");
        assert_eq!(crate::validate::dns1123_label_problem(&name), None);
    }

    #[test]
    fn a_taken_snapshot_belongs_to_the_volume_uid_it_was_taken_of() {
        let mut s = Snapshot::new("s", "db");
        assert!(s.belongs_to("db", "u1"));
        s.status = Some(SnapshotStatus {
            volume_uid: Some("u1".into()),
            ..Default::default()
        });
        assert!(s.belongs_to("db", "u1"));
        // A volume created again under the same name is a different volume.
        assert!(!s.belongs_to("db", "u2"));
    }
}
