//! When the volume scheduler runs a placement pass, and when it need not.
//!
//! A pass places every pending volume at once, and every pending volume's reconcile asks for
//! one — a resync reconciles each of them. Run as asked, N pending volumes cost N passes over
//! all N each resync (with 20,000 volumes that could not be placed, an idle controller kept
//! etcd busy re-reading them). So a pass is:
//! - **answered by another**: a reconcile that was waiting while a pass began returns when it
//!   ends — that pass saw its volume as it is ([`Passes::begin`]);
//! - **skipped before listing anything** while the volume and machine caches' revisions and
//!   the set of live machines stand still ([`Seen`]) — unless a pending restore waits for a
//!   snapshot, which the caches do not hold;
//! - **skipped after building its inputs** when they equal the last complete pass's
//!   ([`Pass`]: a digest of the requests, the machines as placement sees them, and each
//!   pending volume's resourceVersion and Scheduled condition — placement is a pure function
//!   of these, so it would decide and write the same again);
//! - **paced** while volumes keep changing: after a pass whose deciding took D (its writes,
//!   which wait on etcd, not counted) the next starts no sooner than D later, at most
//!   [`MAX_PASS_PAUSE`] — at most half a core, leaving the other half to the API serving the
//!   burst.
//!
//! A pass with a failed write is not remembered, so the next one runs in full.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cobalt_api::{find_condition, ConditionStatus, Machine, Volume};
use cobalt_reconcile::Cache;

use super::binding::Alive;
use super::placement::{MachineView, Request};

/// The longest pause between two placement passes.
pub const MAX_PASS_PAUSE: Duration = Duration::from_millis(250);

/// What a pass starts from that the caches can vouch for: their revisions and the live machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    volumes_revision: i64,
    machines_revision: i64,
    alive: u64,
}

impl Seen {
    /// Read before the caches are listed, so a change landing in between makes the next pass
    /// run.
    pub fn now(volumes: &Cache<Volume>, machines: &Cache<Machine>, alive: &Alive) -> Seen {
        let mut h = DefaultHasher::new();
        if let Ok(a) = alive.read() {
            a.hash(&mut h);
        }
        Seen {
            volumes_revision: volumes.revision(),
            machines_revision: machines.revision(),
            alive: h.finish(),
        }
    }
}

/// One pass: what it saw, and a digest of what it decides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    seen: Seen,
    /// A pending restore waits for a snapshot the caches do not hold: never skip on `seen`.
    waits_for_snapshots: bool,
    inputs: u64,
}

impl Pass {
    pub fn new(
        seen: Seen,
        pending: &[Arc<Volume>],
        requests: &[Request],
        machines: &[MachineView],
    ) -> Pass {
        let mut h = DefaultHasher::new();
        requests.hash(&mut h);
        machines.hash(&mut h);
        for v in pending {
            v.metadata.resource_version.hash(&mut h);
            let scheduled = v
                .status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, "Scheduled"));
            if let Some(c) = scheduled {
                match c.status {
                    ConditionStatus::True => 0u8,
                    ConditionStatus::False => 1,
                    ConditionStatus::Unknown => 2,
                }
                .hash(&mut h);
                (&c.reason, &c.message, c.observed_generation).hash(&mut h);
            }
        }
        Pass {
            seen,
            waits_for_snapshots: pending
                .iter()
                .any(|v| v.spec.source.as_ref().is_some_and(|s| s.snapshot.is_some())),
            inputs: h.finish(),
        }
    }
}

/// The scheduler's record of its passes. Every method but [`Passes::ask`] is called under the
/// placement lock.
#[derive(Default)]
pub struct Passes {
    started: AtomicU64,
    next_at: Mutex<Option<tokio::time::Instant>>,
    /// The last pass whose every decision was written.
    last: Mutex<Option<Pass>>,
}

/// A reconcile's place in line, from [`Passes::ask`].
pub struct Asked(u64);

impl Passes {
    /// Called before taking the placement lock.
    pub fn ask(&self) -> Asked {
        Asked(self.started.load(Ordering::SeqCst))
    }

    /// Under the lock: `false` when a pass began since `asked` (and, the lock being ours, has
    /// ended); otherwise waits out the pacing pause and counts a new pass begun.
    pub async fn begin(&self, asked: Asked) -> bool {
        if self.started.load(Ordering::SeqCst) > asked.0 {
            return false;
        }
        let next_at = *self.next_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = next_at {
            tokio::time::sleep_until(at).await;
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn last(&self) -> Option<Pass> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing the caches hold has changed since the last complete pass.
    pub fn nothing_changed_since_last(&self, seen: &Seen) -> bool {
        self.last()
            .is_some_and(|l| l.seen == *seen && !l.waits_for_snapshots)
    }

    /// `pass` would decide what the last complete pass decided; it is remembered in its place.
    pub fn decides_as_last(&self, pass: Pass) -> bool {
        let same = self.last().is_some_and(|l| l.inputs == pass.inputs);
        if same {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(pass);
        }
        same
    }

    /// A pass ran; `deciding` is how long it took to decide (the pacing pause that follows).
    pub fn ended(&self, pass: Pass, complete: bool, deciding: Duration) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = complete.then_some(pass);
        *self.next_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now() + deciding.min(MAX_PASS_PAUSE));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::RwLock;

    use cobalt_api::{Quantity, VolumeSource, VolumeSpec};

    use super::*;

    fn volume(name: &str, restore: bool) -> Arc<Volume> {
        let mut v = Volume::new(
            name,
            VolumeSpec {
                size: Quantity::from_bytes(1 << 30),
                ..Default::default()
            },
        );
        v.metadata.resource_version = "7".into();
        if restore {
            v.spec.source = Some(Box::new(VolumeSource {
                volume: None,
                snapshot: Some("nightly".into()),
            }));
        }
        Arc::new(v)
    }

    fn request(name: &str) -> Request {
        Request {
            name: name.into(),
            reserved_bytes: 1 << 30,
            selector: BTreeMap::new(),
            required_machine: None,
            needs: vec![],
        }
    }

    fn seen() -> Seen {
        let alive: Alive = Arc::new(RwLock::new(BTreeSet::from(["m1".to_string()])));
        Seen::now(&Cache::new(), &Cache::new(), &alive)
    }

    fn pass(restore: bool) -> Pass {
        Pass::new(seen(), &[volume("a", restore)], &[request("a")], &[])
    }

    #[tokio::test]
    async fn a_reconcile_waiting_while_a_pass_began_is_answered_by_it() {
        let passes = Passes::default();
        let waiting = passes.ask();
        assert!(
            passes.begin(passes.ask()).await,
            "the first asker runs a pass"
        );
        assert!(
            !passes.begin(waiting).await,
            "one that asked before that pass began is answered by it"
        );
        assert!(
            passes.begin(passes.ask()).await,
            "one asking afterwards runs its own"
        );
    }

    #[test]
    fn only_a_complete_pass_lets_the_next_be_skipped() {
        let passes = Passes::default();
        assert!(!passes.nothing_changed_since_last(&seen()));
        assert!(!passes.decides_as_last(pass(false)));
        passes.ended(pass(false), false, Duration::ZERO);
        assert!(
            !passes.nothing_changed_since_last(&seen()),
            "a pass with a failed write is run again"
        );
        passes.ended(pass(false), true, Duration::ZERO);
        assert!(passes.nothing_changed_since_last(&seen()));
        assert!(passes.decides_as_last(pass(false)));
        let other = Pass::new(seen(), &[volume("b", false)], &[request("b")], &[]);
        assert!(!passes.decides_as_last(other), "other inputs decide anew");
    }

    #[test]
    fn a_restore_waiting_for_its_snapshot_is_placed_again_though_the_caches_stand_still() {
        let passes = Passes::default();
        passes.ended(pass(true), true, Duration::ZERO);
        assert!(!passes.nothing_changed_since_last(&seen()));
    }

    #[tokio::test]
    async fn a_pass_waits_as_long_after_the_last_as_that_one_took_to_decide() {
        let passes = Passes::default();
        passes.ended(pass(false), true, Duration::from_millis(40));
        let t = std::time::Instant::now();
        assert!(passes.begin(passes.ask()).await);
        assert!(
            t.elapsed() >= Duration::from_millis(35),
            "{:?}",
            t.elapsed()
        );
        // Never longer than the bound, however long the last pass took.
        passes.ended(pass(false), true, Duration::from_secs(3600));
        let t = std::time::Instant::now();
        assert!(passes.begin(passes.ask()).await);
        assert!(t.elapsed() < MAX_PASS_PAUSE + Duration::from_secs(5));
    }
}
