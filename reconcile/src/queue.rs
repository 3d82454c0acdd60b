//! The keyed work queue: *what* to reconcile and *when*, as plain data (no tasks, no clock of its
//! own — callers pass `now`), so every promise is tested deterministically.
//!
//! Promises:
//! - **one entry per key**: adding a key already queued keeps the earlier run-at and the higher
//!   priority;
//! - **one in flight per key**: a key handed out by [`Queue::pop_due`] is not handed out again
//!   until [`Queue::finish`]; adding it meanwhile marks it to run again right after;
//! - **fresh before resync**: due [`Priority::Fresh`] entries (events, requeues, retries) are
//!   always handed out before due [`Priority::Resync`] ones, so a periodic resync of thousands of
//!   keys cannot delay a user's change;
//! - **per-key backoff**: a failed key is retried after [`Backoff::delay`] of its consecutive
//!   failures; success resets them.
//!
//! Bounded: at most one entry per key, so the queue never holds more entries than there are
//! objects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A change, a requeue or a retry.
    Fresh,
    /// The periodic resync.
    Resync,
}

/// What a finished reconcile asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Converged; run again only on a change (or resync).
    Done,
    /// Run again after this long.
    RequeueAfter(Duration),
    /// Failed; retry with backoff.
    Failed,
}

#[derive(Clone, Debug)]
struct Entry {
    run_at: Instant,
    priority: Priority,
    seq: u64,
}

#[derive(Debug)]
pub struct Queue {
    entries: HashMap<String, Entry>,
    fresh: BTreeSet<(Instant, u64, String)>,
    resync: BTreeSet<(Instant, u64, String)>,
    in_flight: HashSet<String>,
    /// Keys added while in flight: when they finish they are queued with this.
    rerun: HashMap<String, (Instant, Priority)>,
    failures: HashMap<String, u32>,
    backoff: Backoff,
    seq: u64,
}

impl Queue {
    pub fn new(backoff: Backoff) -> Self {
        Queue {
            entries: HashMap::new(),
            fresh: BTreeSet::new(),
            resync: BTreeSet::new(),
            in_flight: HashSet::new(),
            rerun: HashMap::new(),
            failures: HashMap::new(),
            backoff,
            seq: 0,
        }
    }

    /// Queues `key` to run at `run_at` (see the module docs for merging rules).
    pub fn add(&mut self, key: &str, run_at: Instant, priority: Priority) {
        if self.in_flight.contains(key) {
            let slot = self
                .rerun
                .entry(key.to_string())
                .or_insert((run_at, priority));
            slot.0 = slot.0.min(run_at);
            slot.1 = slot.1.min(priority);
            return;
        }
        if let Some(old) = self.entries.get(key) {
            if old.run_at <= run_at && old.priority <= priority {
                return;
            }
            let (run_at, priority) = (old.run_at.min(run_at), old.priority.min(priority));
            self.remove(key);
            self.insert(key, run_at, priority);
        } else {
            self.insert(key, run_at, priority);
        }
    }

    fn insert(&mut self, key: &str, run_at: Instant, priority: Priority) {
        self.seq += 1;
        let seq = self.seq;
        self.entries.insert(
            key.to_string(),
            Entry {
                run_at,
                priority,
                seq,
            },
        );
        self.set(priority).insert((run_at, seq, key.to_string()));
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.set(e.priority)
            .remove(&(e.run_at, e.seq, key.to_string()));
        Some(e)
    }

    fn set(&mut self, p: Priority) -> &mut BTreeSet<(Instant, u64, String)> {
        match p {
            Priority::Fresh => &mut self.fresh,
            Priority::Resync => &mut self.resync,
        }
    }

    /// Hands out the next due key, fresh ones first, and marks it in flight.
    pub fn pop_due(&mut self, now: Instant) -> Option<String> {
        let pick = |set: &BTreeSet<(Instant, u64, String)>| {
            set.first()
                .filter(|(at, _, _)| *at <= now)
                .map(|(_, _, k)| k.clone())
        };
        let key = pick(&self.fresh).or_else(|| pick(&self.resync))?;
        self.remove(&key);
        self.in_flight.insert(key.clone());
        Some(key)
    }

    /// Records how the run of `key` ended and queues what comes next.
    pub fn finish(&mut self, key: &str, outcome: Outcome, now: Instant) {
        self.in_flight.remove(key);
        match outcome {
            Outcome::Done => {
                self.failures.remove(key);
            }
            Outcome::RequeueAfter(d) => {
                self.failures.remove(key);
                self.add(key, now + d, Priority::Fresh);
            }
            Outcome::Failed => {
                let n = self.failures.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                let delay = self.backoff.delay(*n);
                self.add(key, now + delay, Priority::Fresh);
            }
        }
        if let Some((at, p)) = self.rerun.remove(key) {
            self.add(key, at, p);
        }
    }

    /// Takes a handed-out key back without running it (it waits outside the queue, e.g. for the
    /// cache to catch up); its failure count is kept and a pending re-run is dropped, since the
    /// caller will add it again.
    pub fn release(&mut self, key: &str) {
        self.in_flight.remove(key);
        self.rerun.remove(key);
    }

    /// Drops a key that no longer exists (its object was deleted), unless it is in flight.
    pub fn forget(&mut self, key: &str) {
        self.remove(key);
        self.failures.remove(key);
    }

    /// When the earliest queued key becomes due, if any is queued.
    pub fn next_due(&self) -> Option<Instant> {
        let a = self.fresh.first().map(|e| e.0);
        let b = self.resync.first().map(|e| e.0);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Keys queued, not counting those in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Gives back the room a wave of keys left behind (a list or resync of every object grows
    /// the queue to all of them; drained, it keeps that room until the next wave).
    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
        self.in_flight.shrink_to_fit();
        self.rerun.shrink_to_fit();
        self.failures.shrink_to_fit();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn failures(&self, key: &str) -> u32 {
        self.failures.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (Queue, Instant) {
        (
            Queue::new(Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(8),
            }),
            Instant::now(),
        )
    }

    fn drain(q: &mut Queue, now: Instant) -> Vec<String> {
        std::iter::from_fn(|| q.pop_due(now)).collect()
    }

    #[test]
    fn a_key_added_many_times_is_queued_once_and_the_earliest_run_at_wins() {
        let (mut q, t0) = queue();
        q.add("a", t0 + Duration::from_secs(5), Priority::Fresh);
        q.add("a", t0 + Duration::from_secs(1), Priority::Fresh);
        q.add("a", t0 + Duration::from_secs(9), Priority::Fresh);
        assert_eq!(q.len(), 1);
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(q.pop_due(t0), None, "not due yet");
        assert_eq!(drain(&mut q, t0 + Duration::from_secs(1)), ["a"]);
    }

    #[test]
    fn a_key_in_flight_is_not_handed_out_again_but_runs_again_after_a_mid_run_change() {
        let (mut q, t0) = queue();
        q.add("a", t0, Priority::Fresh);
        assert_eq!(q.pop_due(t0).as_deref(), Some("a"));
        q.add("a", t0, Priority::Fresh); // changed while running
        assert_eq!(q.pop_due(t0), None, "never two runs of one key at once");
        assert_eq!(q.in_flight(), 1);
        q.finish("a", Outcome::Done, t0);
        assert_eq!(
            q.pop_due(t0).as_deref(),
            Some("a"),
            "runs again after the change"
        );
        q.finish("a", Outcome::Done, t0);
        assert_eq!(q.pop_due(t0), None, "and only once");
    }

    #[test]
    fn fresh_keys_go_before_due_resync_keys() {
        let (mut q, t0) = queue();
        for i in 0..1000 {
            q.add(&format!("r{i}"), t0, Priority::Resync);
        }
        q.add("event", t0 + Duration::from_millis(1), Priority::Fresh);
        let now = t0 + Duration::from_millis(1);
        assert_eq!(q.pop_due(now).as_deref(), Some("event"));
        // A resync entry for a key with a pending event keeps the fresh priority.
        q.add("x", now, Priority::Fresh);
        q.add("x", now, Priority::Resync);
        assert_eq!(q.pop_due(now).as_deref(), Some("x"));
        // And a fresh add upgrades a queued resync entry.
        q.add("r999", now, Priority::Fresh);
        assert_eq!(q.pop_due(now).as_deref(), Some("r999"));
    }

    #[test]
    fn failures_back_off_exponentially_and_success_resets() {
        let (mut q, t0) = queue();
        let mut now = t0;
        let mut delays = Vec::new();
        q.add("a", now, Priority::Fresh);
        for _ in 0..5 {
            assert_eq!(q.pop_due(now).as_deref(), Some("a"));
            q.finish("a", Outcome::Failed, now);
            let due = q.next_due().unwrap();
            delays.push(due - now);
            now = due;
        }
        let ceilings = [1, 2, 4, 8, 8].map(Duration::from_secs);
        for (d, c) in delays.iter().zip(ceilings) {
            assert!(*d <= c && *d >= c / 2, "{delays:?}");
        }
        assert_eq!(q.failures("a"), 5);
        assert_eq!(q.pop_due(now).as_deref(), Some("a"));
        q.finish("a", Outcome::Done, now);
        assert_eq!(q.failures("a"), 0);
        q.add("a", now, Priority::Fresh);
        q.pop_due(now);
        q.finish("a", Outcome::Failed, now);
        assert!(
            q.next_due().unwrap() - now <= Duration::from_secs(1),
            "back to the base delay"
        );
    }

    #[test]
    fn requeue_after_runs_the_key_later() {
        let (mut q, t0) = queue();
        q.add("a", t0, Priority::Fresh);
        q.pop_due(t0);
        q.finish("a", Outcome::RequeueAfter(Duration::from_secs(30)), t0);
        assert_eq!(q.pop_due(t0 + Duration::from_secs(29)), None);
        assert_eq!(
            q.pop_due(t0 + Duration::from_secs(30)).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn forgotten_keys_leave_the_queue() {
        let (mut q, t0) = queue();
        q.add("a", t0, Priority::Fresh);
        q.forget("a");
        assert!(q.is_empty());
        assert_eq!(q.pop_due(t0), None);
    }
}
