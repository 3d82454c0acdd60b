//! The volume reconciler: makes the backend hold exactly the volumes bound to this machine, as
//! their specs say, and reports what it did in their status.
//!
//! For a volume with `spec.machine` = this machine:
//! - adds the `cobalt.io/agent` finalizer first, so deleting the Volume waits for its data to go;
//! - creates it (or clones `spec.source`, which must be provisioned here) under its uid, so
//!   renames and name reuse are safe and a crash mid-create is finished on the next run;
//! - resizes (grow; shrink only above what is used, else condition ResizeBlocked with the
//!   numbers), sets compression, defragments when the `cobalt.io/defragment` token changes;
//! - writes status: phase, `status.machine`, usage, conditions Provisioned/Ready,
//!   observedGeneration — only when something changed. Usage is refreshed for all volumes at once
//!   by [`report_usage`], not per volume.
//!
//! On delete it confirms with a fresh read that the Volume is still being deleted and still the
//! same uid, destroys the data, then removes the finalizer. Data with no Volume object is never
//! deleted (see `registration` for how it is reported).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cobalt_api::{set_condition, ConditionStatus, Usage, Volume, VolumePhase, VolumeStatus};
use cobalt_reconcile::{Action, Context, Reconciler};
use cobalt_store::Store;

use crate::backend::{Backend, BackendError, VolumeRecord};
use crate::exporter::{describe_rules, ExportError, ExportSet, ExportSpec, Exporter};

pub const FINALIZER: &str = cobalt_api::AGENT_FINALIZER;
pub const DEFRAGMENT_ANNOTATION: &str = "cobalt.io/defragment";

pub struct VolumeAgent {
    pub machine: String,
    /// Where NFS clients reach this machine (for `status.endpoint`).
    pub address: String,
    pub store: Store,
    pub backend: Arc<dyn Backend>,
    pub exports: Arc<Exports>,
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
    ) -> Result<(), AgentError> {
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
    pub async fn replace_all(self: &Arc<Self>, set: ExportSet) -> Result<(), AgentError> {
        let wanted = self.record(|current| {
            *current = set;
            true
        });
        self.apply_up_to(wanted).await
    }

    /// Returns once generation `wanted` (or a later one) has been applied.
    async fn apply_up_to(self: &Arc<Self>, wanted: u64) -> Result<(), AgentError> {
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
            .map_err(|e| AgentError::Join(e.to_string()))?
            .map_err(AgentError::Export)?;
        *applied = generation;
        crate::metrics::export_applied();
        Ok(())
    }
}

/// The export a provisioned volume should have.
pub fn export_spec(volume: &Volume, backend: &dyn Backend) -> ExportSpec {
    ExportSpec {
        name: volume.metadata.name.clone(),
        uid: volume.metadata.uid.clone(),
        source: backend.path(&volume.metadata.uid),
        clients: volume
            .spec
            .export
            .as_ref()
            .map(|e| e.clients.clone())
            .unwrap_or_default(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] cobalt_store::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("clone source {0:?} is not provisioned on this machine yet")]
    SourceNotReady(String),
    #[error("backend task failed: {0}")]
    Join(String),
    #[error(transparent)]
    Export(#[from] ExportError),
}

impl VolumeAgent {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let b = self.backend.clone();
        tokio::task::spawn_blocking(move || f(b.as_ref()))
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?
            .map_err(Into::into)
    }

    /// Writes the status `f` makes of `seen`'s (or, if `seen` is stale, of the stored one).
    async fn status(
        &self,
        ctx: &Context<Volume>,
        seen: &Volume,
        f: impl Fn(&Volume, &mut VolumeStatus),
    ) -> Result<(), AgentError> {
        let update = self
            .store
            .update_status_from(seen, |v: &Volume| {
                let mut s = v.status.clone().unwrap_or_default();
                f(v, &mut s);
                Some(s)
            })
            .await?;
        ctx.wrote(update.written);
        Ok(())
    }

    async fn delete(&self, volume: &Volume) -> Result<Action, AgentError> {
        let name = &volume.metadata.name;
        // Destroying data needs a fresh, linearizable confirmation that it is still wanted gone.
        let Some(fresh) = self.store.get::<Volume>(name).await? else {
            return Ok(Action::Done);
        };
        if fresh.metadata.uid != volume.metadata.uid
            || !fresh.metadata.is_deleting()
            || !fresh.metadata.finalizers.iter().any(|f| f == FINALIZER)
        {
            return Ok(Action::Done);
        }
        // Unexport first: no client may be writing while the data goes.
        self.exports.set(name, None).await?;
        let uid = fresh.metadata.uid.clone();
        match self.blocking(move |b| b.destroy(&uid)).await {
            Ok(()) | Err(AgentError::Backend(BackendError::UnknownVolume(_))) => {}
            Err(e) => return Err(e),
        }
        let mut done = fresh.clone();
        done.metadata.finalizers.retain(|f| f != FINALIZER);
        self.store.replace(&done).await?;
        tracing::info!(volume = %name, "deleted");
        Ok(Action::Done)
    }
}

impl Reconciler<Volume> for VolumeAgent {
    type Error = AgentError;

    async fn reconcile(
        &self,
        volume: Arc<Volume>,
        ctx: Context<Volume>,
    ) -> Result<Action, AgentError> {
        if volume.spec.machine.as_deref() != Some(self.machine.as_str()) {
            return Ok(Action::Done);
        }
        if volume.metadata.is_deleting() {
            return self.delete(&volume).await;
        }
        let name = volume.metadata.name.clone();
        let mut volume = (*volume).clone();
        if !volume.metadata.finalizers.iter().any(|f| f == FINALIZER) {
            volume.metadata.finalizers.push(FINALIZER.into());
            volume = self.store.replace(&volume).await?;
            ctx.wrote(volume.metadata.revision());
        }
        let uid = volume.metadata.uid.clone();
        let size = volume.spec.size.round_up_mib().bytes();
        let record = VolumeRecord {
            uid: uid.clone(),
            name: name.clone(),
            size_bytes: size,
            compression: volume.spec.compression,
        };
        let started = std::time::Instant::now();
        let existing = {
            let uid = uid.clone();
            self.blocking(move |b| b.get(&uid)).await?
        };
        let mut resize_blocked = None;
        match existing {
            // No intermediate "Provisioning" status write: creating a subvolume takes
            // milliseconds, so it would double the etcd writes for a state nobody sees.
            None => {
                // Creating data needs, like destroying it, a fresh confirmation: a cache that is
                // behind (an agent back from a partition replays old bindings) must not make a
                // copy on a machine the volume has since left.
                let fresh = self.store.get::<Volume>(&name).await?;
                if !fresh.is_some_and(|f| {
                    f.metadata.uid == uid
                        && !f.metadata.is_deleting()
                        && f.spec.machine.as_deref() == Some(self.machine.as_str())
                }) {
                    return Ok(Action::Done);
                }
                match &volume.spec.source {
                    Some(source) => {
                        let src = ctx
                            .cache()
                            .get(&source.volume)
                            .filter(|s| {
                                s.status.as_ref().and_then(|st| st.machine.as_deref())
                                    == Some(self.machine.as_str())
                            })
                            .ok_or_else(|| AgentError::SourceNotReady(source.volume.clone()))?;
                        let src_uid = src.metadata.uid.clone();
                        let r = record.clone();
                        self.blocking(move |b| b.clone_from(&src_uid, &r)).await?;
                    }
                    None => {
                        let r = record.clone();
                        self.blocking(move |b| b.create(&r)).await?;
                    }
                }
                tracing::info!(volume = %name, %uid, size, took = ?started.elapsed(), "provisioned");
            }
            Some(current) => {
                if current.size_bytes != size {
                    let u = uid.clone();
                    match self.blocking(move |b| b.resize(&u, size)).await {
                        Ok(()) => {
                            tracing::info!(volume = %name, from = current.size_bytes, to = size, "resized")
                        }
                        Err(AgentError::Backend(BackendError::ResizeBlocked {
                            used_bytes,
                            new_bytes,
                        })) => {
                            resize_blocked = Some(format!(
                                "cannot shrink to {new_bytes} bytes: {used_bytes} bytes are in use; the limit stays {}",
                                current.size_bytes
                            ));
                        }
                        Err(e) => return Err(e),
                    }
                }
                if current.compression != volume.spec.compression {
                    let (u, c) = (uid.clone(), volume.spec.compression);
                    self.blocking(move |b| b.set_compression(&u, c)).await?;
                }
            }
        }
        let token = volume
            .metadata
            .annotations
            .get(DEFRAGMENT_ANNOTATION)
            .cloned();
        let defragmented = volume.status.as_ref().and_then(|s| s.defragmented.clone());
        if token.is_some() && token != defragmented {
            let u = uid.clone();
            self.blocking(move |b| b.defragment(&u)).await?;
        }
        let spec = export_spec(&volume, self.backend.as_ref());
        let exported = self.exports.exporter.port() != 0 && !spec.clients.is_empty();
        let rules = describe_rules(&spec.clients);
        let exporting = std::time::Instant::now();
        self.exports.set(&name, Some(spec)).await?;
        let exported_in = exporting.elapsed();
        let port = self.exports.exporter.port();
        let endpoint = exported.then(|| cobalt_api::Endpoint {
            server: self.address.clone(),
            port,
            path: format!("/{name}"),
            mount: format!(
                "mount -t nfs4 -o port={port} {}:/{name} /mnt/{name}",
                self.address
            ),
        });
        let machine = self.machine.clone();
        self.status(&ctx, &volume, |v, s| {
            let generation = v.metadata.generation;
            let now = Utc::now();
            s.machine = Some(machine.clone());
            // Used bytes come from the periodic pool-wide refresh ([`report_usage`]); a new
            // volume starts at what was last reported, or 0.
            let used_bytes = s.usage.as_ref().map(|u| u.used_bytes).unwrap_or(0);
            s.usage = Some(Usage {
                used_bytes,
                limit_bytes: size,
                updated: None,
            });
            if token.is_some() {
                s.defragmented = token.clone();
            }
            set_condition(
                &mut s.conditions,
                "Provisioned",
                ConditionStatus::True,
                "Created",
                &format!("subvolume on machine {machine}"),
                generation,
                now,
            );
            s.endpoint = endpoint.clone();
            match (&endpoint, port) {
                (Some(_), _) => set_condition(
                    &mut s.conditions,
                    "Exported",
                    ConditionStatus::True,
                    "Applied",
                    &rules,
                    generation,
                    now,
                ),
                (None, 0) => set_condition(
                    &mut s.conditions,
                    "Exported",
                    ConditionStatus::False,
                    "NoExporter",
                    "this machine's agent runs without an NFS exporter",
                    generation,
                    now,
                ),
                (None, _) => set_condition(
                    &mut s.conditions,
                    "Exported",
                    ConditionStatus::False,
                    "NoClients",
                    "no clients are listed in spec.export, so it is exported to nobody",
                    generation,
                    now,
                ),
            }
            match &resize_blocked {
                Some(message) => set_condition(
                    &mut s.conditions,
                    "ResizeBlocked",
                    ConditionStatus::True,
                    "InUse",
                    message,
                    generation,
                    now,
                ),
                None => s.conditions.retain(|c| c.type_ != "ResizeBlocked"),
            }
            set_condition(
                &mut s.conditions,
                "Ready",
                ConditionStatus::True,
                "Provisioned",
                "the volume is ready",
                generation,
                now,
            );
            s.phase = VolumePhase::Ready;
            s.observed_generation = generation;
        })
        .await?;
        tracing::debug!(volume = %name, export = ?exported_in, total = ?started.elapsed(), "reconciled");
        Ok(Action::Done)
    }
}

/// Usage is reported when it moved by at least this much, so metadata noise (an empty
/// subvolume already references 16 KiB) and idle volumes cost no etcd writes.
pub const USAGE_STEP: u64 = 1 << 20;

/// Every `period`, reads the usage of every volume on this machine in one backend pass and
/// writes `status.usage` of those whose used bytes moved by [`USAGE_STEP`] or more — nothing
/// otherwise, so an idle machine causes no etcd writes.
pub async fn report_usage(
    store: Store,
    machine: String,
    backend: Arc<dyn Backend>,
    volumes: cobalt_reconcile::Cache<Volume>,
    period: Duration,
    shutdown: cobalt_reconcile::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let b = backend.clone();
        let usage = match tokio::task::spawn_blocking(move || b.usage_all()).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading volume usage failed; retrying next period");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "usage task failed");
                continue;
            }
        };
        for v in volumes.list() {
            let here = v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(&machine);
            let Some(now) = usage.get(&v.metadata.uid) else {
                continue;
            };
            let reported = v.status.as_ref().and_then(|s| s.usage.as_ref());
            if !here
                || v.metadata.is_deleting()
                || reported.is_some_and(|u| u.used_bytes.abs_diff(now.used_bytes) < USAGE_STEP)
            {
                continue;
            }
            let used_bytes = now.used_bytes;
            let result = store
                .update_status_from(&*v, |live: &Volume| {
                    let mut s = live.status.clone()?;
                    if live.metadata.uid != v.metadata.uid || s.machine.as_deref() != Some(&machine)
                    {
                        return None;
                    }
                    let usage = s.usage.get_or_insert(Usage {
                        used_bytes: 0,
                        limit_bytes: live.spec.size.round_up_mib().bytes(),
                        updated: None,
                    });
                    usage.used_bytes = used_bytes;
                    Some(s)
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(volume = %v.metadata.name, error = %e, "usage not written");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex};

    use super::*;
    use crate::exporter::ExportError;

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
