//! Snapshot schedules (`spec.snapshots: {every, keep}`), run by the leader.
//!
//! Every second, a volume that is Ready, not moving and not being deleted, whose newest scheduled
//! snapshot is `every` old (or that has none), gets a new Snapshot `<volume>-<yyyymmdd-hhmmss>`
//! (labels `cobalt.io/volume` and `cobalt.io/scheduled`); the oldest *taken* scheduled ones
//! beyond `keep` are deleted. The holding agent takes and frees them like any other Snapshot.
//!
//! The record is the Snapshot objects in etcd, so a new leader neither repeats nor forgets a
//! schedule: it lists them when its term starts, after the last term's writes (which were fenced
//! by that term) are all in.
//!
//! Decision — the leader runs schedules, not the agents: creating and deleting Snapshot objects
//! is changing what users see and may have declared, which a storage machine's credentials
//! should not be able to do (ARCHITECTURE.md "Least privilege"). The agents only take and free
//! the data, and write the Snapshots' status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cobalt_api::snapshot::{scheduled_name, SCHEDULED_LABEL, VOLUME_LABEL};
use cobalt_api::{Snapshot, Volume, VolumePhase};
use cobalt_reconcile::{Cache, CancellationToken};
use cobalt_store::Store;

/// How often the schedules are looked at.
pub const TICK: Duration = Duration::from_secs(1);

/// What one volume's schedule wants done now.
#[derive(Debug, Default, PartialEq)]
pub struct Due {
    /// A new scheduled snapshot to create.
    pub create: Option<Snapshot>,
    /// Scheduled snapshots to delete (the oldest taken ones beyond `keep`).
    pub delete: Vec<String>,
}

/// The scheduled snapshots of one volume, oldest first (not the ones being deleted, and not
/// another volume's of the same name).
fn scheduled_of<'a>(v: &Volume, all: &'a [Arc<Snapshot>]) -> Vec<&'a Arc<Snapshot>> {
    let mut mine: Vec<&Arc<Snapshot>> = all
        .iter()
        .filter(|s| {
            s.metadata.labels.contains_key(SCHEDULED_LABEL)
                && s.spec.volume == v.metadata.name
                && s.belongs_to(&v.metadata.name, &v.metadata.uid)
                && !s.metadata.is_deleting()
        })
        .collect();
    mine.sort_by_key(|s| (s.metadata.creation_timestamp, s.metadata.name.clone()));
    mine
}

/// Pure: what `v`'s schedule wants at `now`, given every Snapshot and whether this leader
/// created one for it less than a period ago (a cache that has not seen that create yet must
/// not make a second one).
pub fn due(v: &Volume, all: &[Arc<Snapshot>], now: DateTime<Utc>, created_recently: bool) -> Due {
    let (Some(schedule), Some(status)) = (&v.spec.snapshots, &v.status) else {
        return Due::default();
    };
    let Some(period) = schedule.period() else {
        return Due::default();
    };
    if status.machine.is_none()
        || status.phase != VolumePhase::Ready
        || v.metadata.is_deleting()
        || v.moving().is_some()
    {
        return Due::default();
    }
    let mine = scheduled_of(v, all);
    let newest = mine
        .iter()
        .filter_map(|s| s.metadata.creation_timestamp)
        .max();
    let create = (newest.is_none_or(|t| (now - t).to_std().unwrap_or_default() >= period)
        && !created_recently)
        .then(|| {
            let mut snap = Snapshot::new(
                scheduled_name(&v.metadata.name, now),
                v.metadata.name.as_str(),
            );
            snap.metadata
                .labels
                .insert(VOLUME_LABEL.into(), v.metadata.name.to_string());
            snap.metadata
                .labels
                .insert(SCHEDULED_LABEL.into(), "true".into());
            snap
        });
    let taken: Vec<_> = mine.iter().filter(|s| s.ready()).collect();
    let extra = taken.len().saturating_sub(schedule.keep as usize);
    let delete = taken
        .into_iter()
        .take(extra)
        .map(|s| s.metadata.name.to_string())
        .collect();
    Due { create, delete }
}

/// Runs the schedules until `term` ends, writing through `fenced` (the term's store).
pub async fn run(
    fenced: Store,
    volumes: Cache<Volume>,
    snapshots: Cache<Snapshot>,
    term: CancellationToken,
) {
    // What this term created last per volume uid.
    let mut created: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        if !snapshots.is_ready() || !volumes.is_ready() {
            continue;
        }
        let scheduled = volumes.names_where(|v| v.spec.snapshots.is_some());
        if scheduled.is_empty() {
            created.clear();
            continue;
        }
        let all = snapshots.list();
        let now = Utc::now();
        for name in &scheduled {
            let Some(v) = volumes.get(name) else {
                continue;
            };
            let period = v
                .spec
                .snapshots
                .as_ref()
                .and_then(|s| s.period())
                .unwrap_or_default();
            let recent = created
                .get(&v.metadata.uid)
                .is_some_and(|t| t.elapsed() < period);
            let due = due(&v, &all, now, recent);
            if let Some(snap) = due.create {
                match fenced.create(&snap).await {
                    Ok(_) | Err(cobalt_store::Error::AlreadyExists { .. }) => {
                        tracing::info!(volume = %v.metadata.name, snapshot = %snap.metadata.name, "scheduled snapshot created");
                        created.insert(v.metadata.uid.clone(), Instant::now());
                    }
                    Err(cobalt_store::Error::Fenced { .. }) => return,
                    Err(e) => {
                        tracing::warn!(volume = %v.metadata.name, error = %e, "scheduled snapshot not created; retrying")
                    }
                }
            }
            for old in due.delete {
                match fenced.delete::<Snapshot>(&old, None).await {
                    Ok(_) | Err(cobalt_store::Error::NotFound { .. }) => {
                        tracing::info!(snapshot = %old, "pruned by the schedule")
                    }
                    Err(cobalt_store::Error::Fenced { .. }) => return,
                    Err(e) => {
                        tracing::warn!(snapshot = %old, error = %e, "pruning failed; retrying")
                    }
                }
            }
        }
        let live: std::collections::HashSet<String> = scheduled
            .iter()
            .filter_map(|n| volumes.get(n).map(|v| v.metadata.uid.clone()))
            .collect();
        created.retain(|uid, _| live.contains(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::{SnapshotPhase, SnapshotSchedule, SnapshotStatus, VolumeStatus};

    fn volume(every: &str, keep: u32) -> Volume {
        let mut v: Volume = serde_json::from_value(serde_json::json!({
            "apiVersion": "cobalt.io/v1alpha1", "kind": "Volume",
            "metadata": {"name": "db", "uid": "u1"},
            "spec": {"size": "1Gi"}
        }))
        .unwrap();
        v.spec.snapshots = Some(Box::new(SnapshotSchedule {
            every: every.into(),
            keep,
        }));
        v.status = Some(VolumeStatus {
            phase: VolumePhase::Ready,
            machine: Some("m1".into()),
            ..Default::default()
        });
        v
    }

    fn taken(name: &str, at: DateTime<Utc>, ready: bool) -> Arc<Snapshot> {
        let mut s = Snapshot::new(name.to_string(), "db");
        s.metadata
            .labels
            .insert(SCHEDULED_LABEL.into(), "true".into());
        s.metadata.creation_timestamp = Some(at);
        s.status = Some(SnapshotStatus {
            phase: if ready {
                SnapshotPhase::Ready
            } else {
                SnapshotPhase::Pending
            },
            ready_to_use: ready,
            volume_uid: Some("u1".into()),
            ..Default::default()
        });
        Arc::new(s)
    }

    #[test]
    fn a_volume_without_scheduled_snapshots_gets_one_and_a_recent_create_is_not_repeated() {
        let v = volume("1h", 2);
        let now = Utc::now();
        let d = due(&v, &[], now, false);
        let snap = d.create.expect("due");
        assert_eq!(snap.spec.volume, "db");
        assert_eq!(snap.metadata.labels.get(SCHEDULED_LABEL).unwrap(), "true");
        assert_eq!(snap.metadata.labels.get(VOLUME_LABEL).unwrap(), "db");
        assert!(due(&v, &[], now, true).create.is_none());
    }

    #[test]
    fn the_next_one_waits_a_period_and_only_taken_ones_beyond_keep_are_pruned_oldest_first() {
        let v = volume("1h", 2);
        let now = Utc::now();
        let h = chrono::Duration::hours(1);
        let all = vec![
            taken("db-1", now - h * 4, true),
            taken("db-2", now - h * 3, true),
            taken("db-3", now - h * 2, true),
            taken("db-4", now - chrono::Duration::minutes(10), false),
        ];
        let d = due(&v, &all, now, false);
        assert!(d.create.is_none(), "the newest is 10 minutes old");
        assert_eq!(d.delete, vec!["db-1".to_string()], "three taken, keep 2");
        let later = due(&v, &all, now + h, false);
        assert!(later.create.is_some());
    }

    #[test]
    fn nothing_is_created_for_a_volume_not_ready_moving_or_being_deleted_or_another_volumes_snapshots(
    ) {
        let now = Utc::now();
        let mut v = volume("1h", 1);
        v.status.as_mut().unwrap().phase = VolumePhase::Scheduled;
        assert_eq!(due(&v, &[], now, false), Due::default());
        let mut v = volume("1h", 1);
        v.metadata.deletion_timestamp = Some(now);
        assert_eq!(due(&v, &[], now, false), Due::default());
        // A snapshot of an earlier volume of the same name (another uid) is not this one's.
        let v = volume("1h", 0);
        let mut old = (*taken("db-old", now, true)).clone();
        old.status.as_mut().unwrap().volume_uid = Some("other".into());
        let d = due(&v, &[Arc::new(old)], now, false);
        assert!(d.create.is_some() && d.delete.is_empty(), "{d:?}");
    }
}
