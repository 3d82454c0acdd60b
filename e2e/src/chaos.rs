//! The chaos run's pure parts: a seeded fault schedule and the invariant checks over etcd's
//! history. No I/O here, so both are unit-tested; `tests/chaos.rs` drives the real cluster.
//!
//! The schedule is a function of the seed alone: the same seed replays the same faults at the
//! same offsets (the workload's timing still varies with the machine, so a replay reproduces
//! the faults, not every interleaving).
//!
//! The history checks read every change etcd made under the cluster's prefix, revision by
//! revision, and rebuild the keyspace as it was at each one:
//! - **fencing** — every event the controller wrote (they go through the scheduler's fenced
//!   store) was written while its writer held the scheduler election: at that revision the
//!   election's oldest key carried the writer's identity;
//! - **capacity** — at no revision does the ledger of any machine (the bytes of every volume
//!   counted on it: `Volume::ledger_machines` and `Volume::reserved_on`, both ends of a move)
//!   exceed the capacity the machine reports.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// splitmix64: small, fast and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of machine `m`'s agent; restarted after the hold.
    KillAgent(usize),
    /// SIGKILL of controller `i`; restarted after the hold.
    KillController(usize),
    /// SIGSTOP of controller `i` for longer than its lease, then SIGCONT: a leader that wakes
    /// up deposed without having noticed — the case fencing exists for.
    PauseController(usize),
    /// etcd SIGKILLed, started again on the same data after the hold.
    StopEtcd,
    /// Machine `m`'s cable pulled, plugged back after the hold.
    CutLink(usize),
    /// SIGKILL of machine `m`'s nfs-ganesha (its agent supervises and restarts it).
    KillGanesha(usize),
}

/// What a fault takes down: faults on one target never overlap (on different targets they do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Machine(usize),
    /// The controllers as a group: one at a time is down, so the API stays reachable.
    Controllers,
    Etcd,
}

impl FaultKind {
    pub fn target(self) -> Target {
        match self {
            FaultKind::KillAgent(m) | FaultKind::CutLink(m) | FaultKind::KillGanesha(m) => {
                Target::Machine(m)
            }
            FaultKind::KillController(_) | FaultKind::PauseController(_) => Target::Controllers,
            FaultKind::StopEtcd => Target::Etcd,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Offset from the start of the run.
    pub at: Duration,
    pub kind: FaultKind,
    /// How long until it is healed (zero: nothing to heal, e.g. a killed ganesha).
    pub hold: Duration,
}

impl Fault {
    pub fn heals_at(&self) -> Duration {
        self.at + self.hold
    }
}

/// The faults of a run of `span` with `machines` machines and `controllers` controllers whose
/// lease is `ttl`: one every 1.5–5 s, none on a busy target, all healed by the end of `span`.
pub fn schedule(
    seed: u64,
    span: Duration,
    machines: usize,
    controllers: usize,
    ttl: Duration,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut busy: BTreeMap<Target, Duration> = BTreeMap::new();
    let mut faults = Vec::new();
    let mut at = rng.millis(1_000, 3_000);
    let ttl_ms = ttl.as_millis() as u64;
    while at < span {
        let kind = match rng.below(6) {
            0 => FaultKind::KillAgent(rng.below(machines as u64) as usize),
            1 => FaultKind::KillController(rng.below(controllers as u64) as usize),
            2 => FaultKind::PauseController(rng.below(controllers as u64) as usize),
            3 => FaultKind::StopEtcd,
            4 => FaultKind::CutLink(rng.below(machines as u64) as usize),
            _ => FaultKind::KillGanesha(rng.below(machines as u64) as usize),
        };
        let hold = match kind {
            FaultKind::KillAgent(_) | FaultKind::KillController(_) => rng.millis(300, 4_000),
            FaultKind::PauseController(_) => rng.millis(ttl_ms + 1_000, ttl_ms + 3_000),
            FaultKind::StopEtcd => rng.millis(500, 3_000),
            FaultKind::CutLink(_) => rng.millis(1_000, ttl_ms + 3_000),
            FaultKind::KillGanesha(_) => Duration::ZERO,
        };
        let target = kind.target();
        let free = busy.get(&target).is_none_or(|until| *until <= at);
        if free && at + hold <= span {
            // A target is given a second after its heal before it is hit again.
            busy.insert(target, at + hold + Duration::from_secs(1));
            faults.push(Fault { at, kind, hold });
        }
        at += rng.millis(1_500, 5_000);
    }
    faults
}

/// One change etcd made: a put (`value` Some) or a delete, at `revision`.
#[derive(Clone, Debug)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub create_revision: i64,
}

/// What [`check_history`] found, and how much it looked at (a check that saw nothing proves
/// nothing).
#[derive(Debug, Default)]
pub struct HistoryReport {
    /// One line of evidence per violation.
    pub violations: Vec<String>,
    /// Events written by the controller, each checked against the election.
    pub controller_events: usize,
    /// Revisions at which the ledger was recomputed.
    pub ledger_revisions: usize,
}

/// Checks fencing and the capacity ledger at every revision of `history` (changes in revision
/// order; the first may be a snapshot of the keyspace, all at one revision).
pub fn check_history(prefix: &str, history: &[Change]) -> HistoryReport {
    let mut report = HistoryReport::default();
    let mut state: BTreeMap<String, (Vec<u8>, i64)> = BTreeMap::new();
    let mut violations = Vec::new();
    let mut overcommitted: BTreeSet<String> = BTreeSet::new();
    let election = format!("{prefix}/election/scheduler/");
    let events = format!("{prefix}/events/");
    let volumes = format!("{prefix}/volumes/");
    let machines = format!("{prefix}/machines/");
    let mut i = 0;
    while i < history.len() {
        let revision = history[i].revision;
        let mut end = i;
        while end < history.len() && history[end].revision == revision {
            end += 1;
        }
        let group = &history[i..end];
        for c in group {
            match &c.value {
                Some(v) => state.insert(c.key.clone(), (v.clone(), c.create_revision)),
                None => state.remove(&c.key),
            };
        }
        for c in group {
            let (Some(value), true) = (&c.value, c.key.starts_with(&events)) else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<cobalt_api::event::Event>(value) else {
                violations.push(format!("revision {revision}: {} is not an Event", c.key));
                continue;
            };
            if event.source.component != "cobalt-controller" {
                continue;
            }
            report.controller_events += 1;
            let leader = leader_at(&state, &election);
            if leader.as_deref() != Some(event.source.host.as_str()) {
                violations.push(format!(
                    "fencing: revision {revision}: {} wrote {} ({}) while the scheduler leader was {}",
                    event.source.host,
                    c.key,
                    event.reason,
                    leader.unwrap_or_else(|| "nobody".into())
                ));
            }
        }
        let ledger_touched = group
            .iter()
            .any(|c| c.key.starts_with(&volumes) || c.key.starts_with(&machines));
        if ledger_touched {
            report.ledger_revisions += 1;
            for (machine, line) in ledger_violations(&state, &volumes, &machines) {
                // Reported once per machine and episode: the first revision is the evidence.
                if overcommitted.insert(machine) {
                    violations.push(format!("capacity: revision {revision}: {line}"));
                }
            }
            overcommitted.retain(|m| {
                ledger_violations(&state, &volumes, &machines)
                    .iter()
                    .any(|(n, _)| n == m)
            });
        }
        i = end;
    }
    report.violations = violations;
    report
}

/// The identity of the election's leader: the value of its oldest key.
fn leader_at(state: &BTreeMap<String, (Vec<u8>, i64)>, election: &str) -> Option<String> {
    state
        .range(election.to_string()..)
        .take_while(|(k, _)| k.starts_with(election))
        .min_by_key(|(_, (_, created))| *created)
        .map(|(_, (v, _))| String::from_utf8_lossy(v).into_owned())
}

/// Machines whose ledger exceeds their reported capacity, with the volumes counted on them.
fn ledger_violations(
    state: &BTreeMap<String, (Vec<u8>, i64)>,
    volumes: &str,
    machines: &str,
) -> Vec<(String, String)> {
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for (key, (value, _)) in state.range(machines.to_string()..) {
        let Some(name) = key
            .strip_prefix(machines)
            .and_then(|k| k.strip_suffix("/status"))
        else {
            if !key.starts_with(machines) {
                break;
            }
            continue;
        };
        if let Ok(s) = serde_json::from_slice::<cobalt_api::MachineStatus>(value) {
            totals.insert(name.to_string(), s.capacity.total_bytes);
        }
    }
    let mut counted: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for (key, (value, _)) in state.range(volumes.to_string()..) {
        if !key.starts_with(volumes) {
            break;
        }
        let Some(name) = key
            .strip_prefix(volumes)
            .and_then(|k| k.strip_suffix("/object"))
        else {
            continue;
        };
        let Ok(mut v) = serde_json::from_slice::<cobalt_api::Volume>(value) else {
            continue;
        };
        v.status = state
            .get(&format!("{volumes}{name}/status"))
            .and_then(|(s, _)| serde_json::from_slice(s).ok());
        for m in v.ledger_machines() {
            counted
                .entry(m.to_string())
                .or_default()
                .push((name.to_string(), v.reserved_on(m)));
        }
    }
    let mut out = Vec::new();
    for (machine, vs) in counted {
        let Some(&total) = totals.get(&machine).filter(|t| **t > 0) else {
            continue;
        };
        let sum: u64 = vs.iter().map(|(_, b)| b).sum();
        if sum > total {
            let list: Vec<String> = vs.iter().map(|(n, b)| format!("{n}={b}")).collect();
            out.push((
                machine.clone(),
                format!(
                    "{machine} holds {sum} bytes of reservations against {total}: {}",
                    list.join(", ")
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let span = Duration::from_secs(120);
        let a = schedule(42, span, 3, 2, TTL);
        assert_eq!(a, schedule(42, span, 3, 2, TTL));
        assert_ne!(a, schedule(43, span, 3, 2, TTL));
        assert!(a.len() >= 15, "a two-minute run has faults: {}", a.len());
    }

    #[test]
    fn faults_on_one_target_never_overlap_and_all_heal_within_the_span() {
        for seed in 0..200 {
            let span = Duration::from_secs(90);
            let faults = schedule(seed, span, 3, 2, TTL);
            for (i, a) in faults.iter().enumerate() {
                assert!(a.heals_at() <= span, "seed {seed}: {a:?}");
                for b in &faults[i + 1..] {
                    if a.kind.target() == b.kind.target() {
                        assert!(b.at > a.heals_at(), "seed {seed}: {a:?} overlaps {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn over_many_seeds_every_kind_of_fault_occurs_and_different_targets_overlap() {
        let mut kinds = std::collections::HashSet::new();
        let mut overlapping = 0;
        for seed in 0..50 {
            let faults = schedule(seed, Duration::from_secs(60), 3, 2, TTL);
            for (i, a) in faults.iter().enumerate() {
                kinds.insert(std::mem::discriminant(&a.kind));
                overlapping += faults[i + 1..]
                    .iter()
                    .filter(|b| b.at < a.heals_at())
                    .count();
            }
        }
        assert_eq!(kinds.len(), 6);
        assert!(overlapping > 50, "faults overlap: {overlapping}");
    }

    #[test]
    fn a_pause_outlasts_the_lease() {
        for seed in 0..100 {
            for f in schedule(seed, Duration::from_secs(60), 3, 2, TTL) {
                if let FaultKind::PauseController(_) = f.kind {
                    assert!(f.hold > TTL);
                }
            }
        }
    }

    fn put(revision: i64, key: &str, value: serde_json::Value) -> Change {
        Change {
            revision,
            key: key.into(),
            value: Some(serde_json::to_vec(&value).unwrap()),
            create_revision: revision,
        }
    }

    fn put_text(revision: i64, key: &str, value: &str) -> Change {
        Change {
            revision,
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            create_revision: revision,
        }
    }

    fn delete(revision: i64, key: &str) -> Change {
        Change {
            revision,
            key: key.into(),
            value: None,
            create_revision: 0,
        }
    }

    fn event(host: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "volume.a.bound", "namespace": "default"},
            "involvedObject": {"apiVersion": "cobalt.io/v1alpha1", "kind": "Volume", "name": "a"},
            "reason": "Bound", "message": "bound", "type": "Normal", "count": 1,
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
            "source": {"component": "cobalt-controller", "host": host}
        })
    }

    #[test]
    fn an_event_from_the_leader_passes_and_one_from_a_deposed_leader_is_evidence() {
        let history = vec![
            put_text(10, "/cobalt/election/scheduler/a1", "controller-0"),
            put_text(11, "/cobalt/election/scheduler/b2", "controller-1"),
            put(12, "/cobalt/events/volume.a.bound", event("controller-0")),
            delete(13, "/cobalt/election/scheduler/a1"),
            put(14, "/cobalt/events/volume.a.bound", event("controller-1")),
            // controller-0 wakes up from a pause and writes without its key.
            put(15, "/cobalt/events/volume.b.bound", event("controller-0")),
        ];
        let v = check_history("/cobalt", &history).violations;
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("revision 15") && v[0].contains("leader was controller-1"),
            "{v:?}"
        );
    }

    fn volume(name: &str, mib: u64, machine: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "cobalt.io/v1alpha1", "kind": "Volume",
            "metadata": {"name": name, "uid": format!("uid-{name}")},
            "spec": {"size": format!("{mib}Mi"), "machine": machine}
        })
    }

    fn machine_status(total_mib: u64) -> serde_json::Value {
        serde_json::json!({
            "phase": "Ready",
            "capacity": {"totalBytes": total_mib << 20, "reservedBytes": 0, "usedBytes": 0}
        })
    }

    #[test]
    fn the_ledger_is_checked_at_every_revision_including_both_ends_of_a_move() {
        let mut history = vec![
            put(1, "/cobalt/machines/m1/status", machine_status(100)),
            put(1, "/cobalt/machines/m2/status", machine_status(100)),
            put(2, "/cobalt/volumes/a/object", volume("a", 60, "m1")),
            put(3, "/cobalt/volumes/b/object", volume("b", 30, "m2")),
        ];
        assert!(check_history("/cobalt", &history).violations.is_empty());
        // a moving m1 → m2 is counted on both: 90 MiB on m2 fits…
        history.push(put(
            4,
            "/cobalt/volumes/a/status",
            serde_json::json!({"phase": "Ready", "machine": "m1",
                "move": {"from": "m1", "to": "m2", "stage": "Seeding",
                         "started": "2026-01-01T00:00:00Z"}}),
        ));
        assert!(check_history("/cobalt", &history).violations.is_empty());
        // …but a third volume bound to m2 meanwhile overcommits it, at that revision.
        history.push(put(5, "/cobalt/volumes/c/object", volume("c", 20, "m2")));
        let v = check_history("/cobalt", &history).violations;
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("revision 5") && v[0].contains("m2"), "{v:?}");
        // Deleting it ends the episode; a later overcommit is reported again.
        history.push(delete(6, "/cobalt/volumes/c/object"));
        history.push(put(7, "/cobalt/volumes/d/object", volume("d", 50, "m2")));
        assert_eq!(check_history("/cobalt", &history).violations.len(), 2);
    }
}
