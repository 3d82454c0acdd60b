//! The machine's export set, group-committed: a burst of export changes from many concurrent
//! reconciles is applied in a few exporter calls (NFS server reloads), not one per volume.

use std::sync::Arc;

use super::{ExportError, ExportSet, ExportSpec, Exporter};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("export task failed: {0}")]
    Join(String),
}

/// The machine's desired export set and the exporter that makes it real.
///
/// Changes are group-committed: each caller records its change, then waits its turn to apply;
/// whoever applies takes every change recorded so far, and callers whose change was already
/// applied by someone else return at once. A burst of N volumes therefore reloads the NFS
/// server a handful of times, not N times, and an unchanged export applies nothing.
pub struct Exports {
    pub exporter: Arc<dyn Exporter>,
    desired: std::sync::Mutex<Desired>,
    /// The generation of `desired` last applied successfully.
    applied: tokio::sync::Mutex<u64>,
}

#[derive(Default)]
struct Desired {
    set: ExportSet,
    /// Bumped on every change to `set`.
    generation: u64,
}

impl Exports {
    pub fn new(exporter: Arc<dyn Exporter>) -> Self {
        Exports {
            exporter,
            desired: std::sync::Mutex::new(Desired::default()),
            applied: tokio::sync::Mutex::new(0),
        }
    }

    fn record(&self, change: impl FnOnce(&mut ExportSet) -> bool) -> u64 {
        let mut d = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        if change(&mut d.set) {
            d.generation += 1;
        }
        d.generation
    }

    /// Sets (or with `None` removes) one volume's export; returns once it is applied.
    pub async fn set(
        self: &Arc<Self>,
        name: &str,
        spec: Option<ExportSpec>,
    ) -> Result<(), BatchError> {
        let wanted = self.record(|set| match spec {
            Some(s) if set.get(name) != Some(&s) => {
                set.insert(name.to_string(), s);
                true
            }
            None => set.remove(name).is_some(),
            Some(_) => false,
        });
        self.apply_up_to(wanted).await
    }

    /// Replaces the whole set at once (start-up), so exports of volumes not yet reconciled stay.
    pub async fn replace_all(self: &Arc<Self>, set: ExportSet) -> Result<(), BatchError> {
        let wanted = self.record(|current| {
            *current = set;
            true
        });
        self.apply_up_to(wanted).await
    }

    /// Returns once generation `wanted` (or a later one) has been applied.
    async fn apply_up_to(self: &Arc<Self>, wanted: u64) -> Result<(), BatchError> {
        let mut applied = self.applied.lock().await;
        if *applied >= wanted {
            return Ok(());
        }
        let (set, generation) = {
            let d = self.desired.lock().unwrap_or_else(|p| p.into_inner());
            (d.set.clone(), d.generation)
        };
        let exporter = self.exporter.clone();
        tokio::task::spawn_blocking(move || exporter.apply(&set))
            .await
            .map_err(|e| BatchError::Join(e.to_string()))??;
        *applied = generation;
        crate::metrics::export_applied();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex};

    use std::time::Duration;

    use super::*;

    /// Records each applied set; the first apply blocks until the test opens the gate, and
    /// applies fail while `failing` is set.
    #[derive(Default)]
    struct Recording {
        applied: Mutex<Vec<ExportSet>>,
        started: AtomicBool,
        gate: (Mutex<bool>, Condvar),
        failing: AtomicBool,
    }

    impl Exporter for Recording {
        fn apply(&self, set: &ExportSet) -> Result<(), ExportError> {
            self.started.store(true, Ordering::SeqCst);
            let (open, cv) = &self.gate;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(ExportError::Command {
                    command: "reload".into(),
                    message: "refused".into(),
                });
            }
            self.applied.lock().unwrap().push(set.clone());
            Ok(())
        }
        fn port(&self) -> u16 {
            2049
        }
    }

    impl Recording {
        fn open(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
        fn applies(&self) -> usize {
            self.applied.lock().unwrap().len()
        }
    }

    fn spec(name: &str) -> ExportSpec {
        ExportSpec {
            name: name.into(),
            uid: format!("uid-{name}"),
            source: format!("/pool/{name}").into(),
            clients: vec![],
        }
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_export_changes_is_applied_in_two_reloads_and_unchanged_ones_in_none() {
        let rec = Arc::new(Recording::default());
        let exports = Arc::new(Exports::new(rec.clone()));
        // The first change starts applying and is held there...
        let first = tokio::spawn({
            let e = exports.clone();
            async move { e.set("v0", Some(spec("v0"))).await }
        });
        eventually("the first apply to start", || {
            rec.started.load(Ordering::SeqCst)
        })
        .await;
        // ...while 49 more arrive.
        let rest: Vec<_> = (1..50)
            .map(|i| {
                let e = exports.clone();
                tokio::spawn(
                    async move { e.set(&format!("v{i}"), Some(spec(&format!("v{i}")))).await },
                )
            })
            .collect();
        eventually("all changes recorded", || {
            exports.desired.lock().unwrap().generation == 50
        })
        .await;
        rec.open();
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        assert_eq!(
            rec.applies(),
            2,
            "one apply for the first, one for the other 49"
        );
        assert_eq!(rec.applied.lock().unwrap()[1].len(), 50);

        // Setting what is already applied reloads nothing; a removal does.
        exports.set("v7", Some(spec("v7"))).await.unwrap();
        assert_eq!(rec.applies(), 2);
        exports.set("v7", None).await.unwrap();
        exports.set("v7", None).await.unwrap();
        assert_eq!(rec.applies(), 3);
        assert!(!rec.applied.lock().unwrap()[2].contains_key("v7"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_apply_is_an_error_and_the_next_call_applies_the_change() {
        let rec = Arc::new(Recording::default());
        rec.open();
        rec.failing.store(true, Ordering::SeqCst);
        let exports = Arc::new(Exports::new(rec.clone()));
        assert!(exports.set("a", Some(spec("a"))).await.is_err());
        rec.failing.store(false, Ordering::SeqCst);
        // The same (already recorded) change is not mistaken for applied.
        exports.set("a", Some(spec("a"))).await.unwrap();
        assert_eq!(rec.applies(), 1);
        assert!(rec.applied.lock().unwrap()[0].contains_key("a"));
    }
}
