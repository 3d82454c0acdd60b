//! Snapshots on this machine: the reconciler that takes and deletes the Snapshots of the
//! volumes held here, and the periodic report of the space they hold. (The schedules,
//! `spec.snapshots`, are run by the controller's leader, which creates and prunes the Snapshot
//! objects; the agent takes and frees them like any other.)
//!
//! **Taking** (in this order, each step idempotent, so a crash anywhere resumes):
//! 1. the volume is held here, Ready, not moving, not being deleted (else the snapshot waits,
//!    its Ready condition saying why);
//! 2. the agent's finalizer goes on the Snapshot (so its data is freed before the object goes);
//! 3. the snapshot's name goes into the volume's `status.snapshots` — a compare-guarded write that
//!    refuses if a move was granted meanwhile (the scheduler grants a move only while that list is
//!    empty, so a move and a snapshot never cross);
//! 4. the backend takes it (atomic, read-only), named by the Snapshot's uid;
//! 5. the Snapshot's status: Ready, machine, size.
//!
//! **Deleting** a Snapshot frees its data after a fresh read confirms the deletion, one at a time
//! per machine (BTRFS frees a deleted snapshot's extents and qgroup accounting in the background;
//! see ARCHITECTURE.md "Snapshots" for what was measured), then drops it from the volume's list and
//! removes the finalizer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cobalt_api::{
    set_condition, Capability, ConditionStatus, Snapshot, SnapshotPhase, SnapshotStatus, Volume,
    VolumePhase, AGENT_FINALIZER,
};
use cobalt_reconcile::{Action, Cache, CancellationToken, Context, Reconciler};
use cobalt_store::Store;

use crate::backend::{Backend, BackendError};
use crate::usage::USAGE_STEP;

/// How soon a snapshot waiting for its volume (moving, not ready yet) is tried again.
const WAIT_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] cobalt_store::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("backend task failed: {0}")]
    Join(String),
}

pub struct SnapshotAgent {
    pub machine: String,
    pub store: Store,
    pub backend: Arc<dyn Backend>,
    pub volumes: Cache<Volume>,
    /// One snapshot deletion at a time on this machine.
    pub deletions: tokio::sync::Semaphore,
}

impl SnapshotAgent {
    pub fn new(
        machine: String,
        store: Store,
        backend: Arc<dyn Backend>,
        volumes: Cache<Volume>,
    ) -> Self {
        SnapshotAgent {
            machine,
            store,
            backend,
            volumes,
            deletions: tokio::sync::Semaphore::new(1),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, SnapshotError> {
        let b = self.backend.clone();
        tokio::task::spawn_blocking(move || f(b.as_ref()))
            .await
            .map_err(|e| SnapshotError::Join(e.to_string()))?
            .map_err(Into::into)
    }

    /// Writes the snapshot's status as `f` makes it (None: leave it).
    async fn write_status(
        &self,
        ctx: &Context<Snapshot>,
        snap: &Snapshot,
        f: impl Fn(&Snapshot) -> Option<SnapshotStatus>,
    ) -> Result<(), SnapshotError> {
        let update = self
            .store
            .update_status_from(snap, |s: &Snapshot| f(s))
            .await?;
        ctx.wrote(update.written);
        Ok(())
    }

    /// A not-yet-taken snapshot's status: `phase` with the Ready condition saying why.
    async fn waiting(
        &self,
        ctx: &Context<Snapshot>,
        snap: &Snapshot,
        phase: SnapshotPhase,
        reason: &str,
        message: &str,
    ) -> Result<(), SnapshotError> {
        self.write_status(ctx, snap, |s| {
            let mut st = s.status.clone().unwrap_or_default();
            if st.ready_to_use {
                return None;
            }
            st.phase = phase;
            set_condition(
                &mut st.conditions,
                "Ready",
                ConditionStatus::False,
                reason,
                message,
                s.metadata.generation,
                Utc::now(),
            );
            Some(st)
        })
        .await
    }

    async fn take(
        &self,
        snap: &Snapshot,
        volume: &Volume,
        ctx: &Context<Snapshot>,
    ) -> Result<Action, SnapshotError> {
        let vname = volume.metadata.name.clone();
        if !self.backend.can(Capability::Snapshot) {
            let message = format!(
                "machine {}'s backend ({}) cannot take snapshots",
                self.machine,
                self.backend.kind()
            );
            self.waiting(
                ctx,
                snap,
                SnapshotPhase::Failed,
                "SnapshotUnsupported",
                &message,
            )
            .await?;
            return Ok(Action::Done);
        }
        if volume.metadata.is_deleting() {
            let message = format!("volume {vname} is being deleted");
            self.waiting(ctx, snap, SnapshotPhase::Failed, "VolumeDeleting", &message)
                .await?;
            return Ok(Action::Done);
        }
        let phase = volume.status.as_ref().map(|s| s.phase);
        if volume.moving().is_some() || phase != Some(VolumePhase::Ready) {
            let message = match volume.moving() {
                Some(m) => format!(
                    "volume {vname} is moving to machine {}; the snapshot is taken there once the move is done",
                    m.to
                ),
                None => format!("volume {vname} is not Ready yet"),
            };
            self.waiting(
                ctx,
                snap,
                SnapshotPhase::Pending,
                "VolumeNotReady",
                &message,
            )
            .await?;
            return Ok(Action::RequeueAfter(WAIT_RETRY));
        }
        let mut snap = snap.clone();
        if !snap
            .metadata
            .finalizers
            .iter()
            .any(|f| f == AGENT_FINALIZER)
        {
            snap.metadata.finalizers.push(AGENT_FINALIZER.into());
            snap = self.store.replace(&snap).await?;
            ctx.wrote(snap.metadata.revision());
        }
        // Reserve the name on the volume: refused if a move was granted since the cache read.
        let (me, uid, name) = (
            self.machine.clone(),
            volume.metadata.uid.clone(),
            snap.metadata.name.clone(),
        );
        let reserved = self
            .store
            .update_status::<Volume, _>(&vname, |v| {
                let mut s = v.status.clone()?;
                let ok = v.metadata.uid == uid
                    && !v.metadata.is_deleting()
                    && s.move_.is_none()
                    && s.machine.as_deref() == Some(me.as_str());
                if !ok || s.snapshots.iter().any(|s| *s == *name) {
                    return None;
                }
                s.snapshots.push(name.to_string());
                Some(s)
            })
            .await?;
        if !reserved
            .object
            .status
            .as_ref()
            .is_some_and(|s| s.snapshots.iter().any(|s| *s == *name))
        {
            return Ok(Action::RequeueAfter(WAIT_RETRY));
        }
        let (u, n) = (uid.clone(), snap.backend_name().to_string());
        self.blocking(move |b| b.snapshot(&u, &n)).await?;
        let u = uid.clone();
        let size = self.blocking(move |b| b.usage(&u)).await?.used_bytes;
        let now = Utc::now();
        self.write_status(ctx, &snap, |s| {
            let mut st = s.status.clone().unwrap_or_default();
            st.phase = SnapshotPhase::Ready;
            st.ready_to_use = true;
            st.machine = Some(self.machine.clone());
            st.volume_uid = Some(uid.clone());
            st.size_bytes = Some(size);
            st.exclusive_bytes.get_or_insert(0);
            st.creation_timestamp.get_or_insert(now);
            set_condition(
                &mut st.conditions,
                "Ready",
                ConditionStatus::True,
                "Taken",
                &format!("read-only on machine {}", self.machine),
                s.metadata.generation,
                now,
            );
            Some(st)
        })
        .await?;
        tracing::info!(snapshot = %snap.metadata.name, volume = %vname, "snapshot taken");
        Ok(Action::Done)
    }

    async fn delete(
        &self,
        snap: &Snapshot,
        volume: Option<Arc<Volume>>,
        ctx: &Context<Snapshot>,
    ) -> Result<Action, SnapshotError> {
        if !snap
            .metadata
            .finalizers
            .iter()
            .any(|f| f == AGENT_FINALIZER)
        {
            return Ok(Action::Done);
        }
        let _one_at_a_time = self.deletions.acquire().await;
        // Fresh read: still this snapshot, still being deleted, still ours to free.
        let Some(fresh) = self.store.get::<Snapshot>(&snap.metadata.name).await? else {
            return Ok(Action::Done);
        };
        if fresh.metadata.uid != snap.metadata.uid
            || !fresh.metadata.is_deleting()
            || !fresh
                .metadata
                .finalizers
                .iter()
                .any(|f| f == AGENT_FINALIZER)
        {
            return Ok(Action::Done);
        }
        let name = fresh.metadata.name.clone();
        // The data is under the volume's uid: the one recorded when taken, or (a take
        // interrupted before its status was written) the volume's, if it lists the snapshot.
        let volume_uid = fresh
            .status
            .as_ref()
            .and_then(|s| s.volume_uid.clone())
            .or_else(|| {
                volume
                    .as_ref()
                    .filter(|v| v.snapshot_names().iter().any(|s| *s == *name))
                    .map(|v| v.metadata.uid.clone())
            });
        if let Some(vuid) = volume_uid.clone() {
            self.write_status(ctx, &fresh, |s| {
                let mut st = s.status.clone().unwrap_or_default();
                st.phase = SnapshotPhase::Deleting;
                st.ready_to_use = false;
                Some(st)
            })
            .await?;
            let started = Instant::now();
            let n = fresh.backend_name().to_string();
            self.blocking(move |b| b.delete_snapshot(&vuid, &n)).await?;
            tracing::info!(snapshot = %name, took = ?started.elapsed(), "snapshot deleted");
        }
        if let Some(v) = &volume {
            let exclusive = fresh
                .status
                .as_ref()
                .and_then(|s| s.exclusive_bytes)
                .unwrap_or(0);
            let uid = v.metadata.uid.clone();
            let update = self
                .store
                .update_status::<Volume, _>(&v.metadata.name, |v| {
                    let mut s = v.status.clone()?;
                    if v.metadata.uid != uid || !s.snapshots.iter().any(|s| *s == *name) {
                        return None;
                    }
                    s.snapshots.retain(|x| *x != name);
                    s.snapshot_bytes = if s.snapshots.is_empty() {
                        0
                    } else {
                        s.snapshot_bytes.saturating_sub(exclusive)
                    };
                    Some(s)
                })
                .await;
            match update {
                Ok(_) | Err(cobalt_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut released = fresh;
        released
            .metadata
            .finalizers
            .retain(|f| f != AGENT_FINALIZER);
        match self.store.replace(&released).await {
            Ok(_) | Err(cobalt_store::Error::NotFound { .. }) => Ok(Action::Done),
            Err(e) => Err(e.into()),
        }
    }
}

impl Reconciler<Snapshot> for SnapshotAgent {
    type Error = SnapshotError;

    async fn reconcile(
        &self,
        snap: Arc<Snapshot>,
        ctx: Context<Snapshot>,
    ) -> Result<Action, SnapshotError> {
        let volume = self
            .volumes
            .get(&snap.spec.volume)
            .filter(|v| snap.belongs_to(&v.metadata.name, &v.metadata.uid));
        let holder = volume
            .as_ref()
            .and_then(|v| v.status.as_ref())
            .and_then(|s| s.machine.clone());
        let mine = match snap.machine() {
            Some(m) => m == self.machine,
            None => holder.as_deref() == Some(self.machine.as_str()),
        };
        if !mine {
            return Ok(Action::Done);
        }
        if snap.metadata.is_deleting() {
            return self.delete(&snap, volume, &ctx).await;
        }
        match volume {
            Some(v) if !snap.ready() => self.take(&snap, &v, &ctx).await,
            _ => Ok(Action::Done),
        }
    }
}

/// Every `period`, reads the space the snapshots of each volume held here take and writes it:
/// each Snapshot's `exclusiveBytes` and the volume's `snapshotBytes` (which the capacity ledger
/// counts), when a figure moved by [`USAGE_STEP`] or more.
pub async fn report_space(
    store: Store,
    machine: String,
    backend: Arc<dyn Backend>,
    volumes: Cache<Volume>,
    snapshots: Cache<Snapshot>,
    period: Duration,
    shutdown: CancellationToken,
) {
    if !backend.can(Capability::Snapshot) {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let held: Vec<Arc<Volume>> = volumes
            .list()
            .into_iter()
            .filter(|v| {
                v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(&machine)
                    && !v.snapshot_names().is_empty()
            })
            .collect();
        if held.is_empty() {
            continue;
        }
        let (b, uids) = (
            backend.clone(),
            held.iter()
                .map(|v| v.metadata.uid.clone())
                .collect::<Vec<_>>(),
        );
        let all = match tokio::task::spawn_blocking(move || b.snapshot_usage(&uids)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "snapshot space not read; retrying next period");
                continue;
            }
            Err(_) => continue,
        };
        for v in held {
            let Some(usage) = all.get(&v.metadata.uid) else {
                continue;
            };
            let total: u64 = usage.iter().map(|u| u.exclusive_bytes).sum();
            for snap in snapshots
                .list()
                .iter()
                .filter(|s| s.spec.volume == v.metadata.name)
            {
                let Some(u) = usage.iter().find(|u| u.name == snap.backend_name()) else {
                    continue;
                };
                let shown = snap.status.as_ref().and_then(|s| s.exclusive_bytes);
                if shown.is_some_and(|b| b.abs_diff(u.exclusive_bytes) < USAGE_STEP) {
                    continue;
                }
                let bytes = u.exclusive_bytes;
                let _ = store
                    .update_status_from(&**snap, |s: &Snapshot| {
                        let mut st = s.status.clone()?;
                        st.ready_to_use.then_some(())?;
                        st.exclusive_bytes = Some(bytes);
                        Some(st)
                    })
                    .await;
            }
            if v.snapshot_bytes().abs_diff(total) >= USAGE_STEP {
                let uid = v.metadata.uid.clone();
                let _ = store
                    .update_status_from(&*v, |live: &Volume| {
                        let mut s = live.status.clone()?;
                        (live.metadata.uid == uid && !s.snapshots.is_empty()).then_some(())?;
                        s.snapshot_bytes = total;
                        Some(s)
                    })
                    .await;
            }
        }
    }
}
