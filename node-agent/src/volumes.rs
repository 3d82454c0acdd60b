//! The volume reconciler: executes the [`plan`](crate::plan) for each Volume on this machine and
//! writes the status [`plan::status`] makes of what happened. Every decision is in `plan.rs`;
//! this file only gathers what the machine holds, runs the steps against the backend, the
//! export set and etcd, and fills in the [`Report`].
//!
//! Fresh reads guard data: before a step creates data (Create, Clone) a linearizable read
//! confirms the volume is still bound here, not being deleted, the same uid, and not provisioned
//! anywhere (a cache behind a partition must not make a copy on a machine the volume has left,
//! and a provisioned volume is never created empty). Before Destroy a fresh read confirms it is
//! still being deleted, the same uid, still held by the agent's finalizer, and its data still on
//! this machine.

use std::sync::Arc;

use chrono::Utc;
use cobalt_api::{Capability, Endpoint, LastMove, Volume, VolumeStatus};
use cobalt_reconcile::{Action, Context, Reconciler};
use cobalt_store::Store;

use crate::backend::{Backend, BackendError};
use crate::exporter::batch::{BatchError, Exports};
use crate::exporter::{describe_rules, ExportSpec};
use crate::moves::{Moves, SNAPSHOT_PREFIX};
use crate::plan::{self, ExportState, Observed, Report, Step};

pub const FINALIZER: &str = cobalt_api::AGENT_FINALIZER;

pub struct VolumeAgent {
    pub machine: String,
    /// Where NFS clients reach this machine (for `status.endpoint`).
    pub address: String,
    pub store: Store,
    pub backend: Arc<dyn Backend>,
    pub exports: Arc<Exports>,
    /// Moves to and from this machine.
    pub moves: Arc<Moves>,
    /// Every Snapshot (restores read their source here).
    pub snapshots: cobalt_reconcile::Cache<cobalt_api::Snapshot>,
    /// Every Claim: a volume is exported to the hosts of the claims bound to it.
    pub claims: cobalt_reconcile::Cache<cobalt_api::Claim>,
    pub events: cobalt_store::Recorder,
}

/// Where clients mount volume `name` exported from `address` on NFS port `port`.
pub fn endpoint(address: &str, port: u16, name: &str) -> Endpoint {
    Endpoint {
        server: address.to_string().into(),
        port,
        path: format!("/{name}").into(),
        mount: format!("mount -t nfs4 -o port={port} {address}:/{name} /mnt/{name}"),
    }
}

/// The export a provisioned volume should have.
pub fn export_spec(volume: &Volume, backend: &dyn Backend) -> ExportSpec {
    ExportSpec {
        name: volume.metadata.name.to_string(),
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

/// Adds the hosts of the claims bound to `volume` to its export (a host the Volume lists itself
/// keeps the Volume's rules); returns the names of those claims, sorted.
pub fn add_claim_clients(
    spec: &mut ExportSpec,
    volume: &Volume,
    claims: &[Arc<cobalt_api::Claim>],
) -> Vec<String> {
    let mut names = Vec::new();
    for c in claims {
        if c.bound_volume() != Some((&volume.metadata.name, &volume.metadata.uid)) {
            continue;
        }
        if !spec.clients.iter().any(|x| x.host == c.spec.host) {
            spec.clients.push(cobalt_api::volume::ExportClient {
                host: c.spec.host.clone().into(),
                access: c.spec.access,
                root_squash: c.spec.root_squash,
            });
        }
        names.push(c.metadata.name.to_string());
    }
    names.sort();
    names
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] cobalt_store::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the source ({0}) is not on this machine yet")]
    SourceNotReady(String),
    #[error("volume {volume} still has snapshots ({snapshots}); its data is kept until they are deleted")]
    HasSnapshots { volume: String, snapshots: String },
    #[error("backend task failed: {0}")]
    Join(String),
    #[error(transparent)]
    Export(#[from] BatchError),
    #[error("seeding the clone: {0}")]
    Seed(String),
    #[error("cannot record the volume as published in the state directory: {0}")]
    Published(std::io::Error),
}

/// What a fresh read must show before the agent touches data.
enum Confirm {
    /// Still bound here, not deleting, same uid, provisioned nowhere.
    Create,
    /// Still being deleted, same uid, still held by the finalizer, its data still on this machine.
    Destroy,
    /// Moved away: same uid, `status.machine` names another machine, and the move from here is
    /// in its CleaningUp stage (the target serves the data).
    CleanUp,
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

    /// A linearizable read of the volume; `Some` when it still wants what `what` is about to do.
    async fn confirm(&self, seen: &Volume, what: Confirm) -> Result<Option<Volume>, AgentError> {
        let Some(fresh) = self.store.get::<Volume>(&seen.metadata.name).await? else {
            return Ok(None);
        };
        let ok = fresh.metadata.uid == seen.metadata.uid
            && match what {
                Confirm::Create => {
                    !fresh.metadata.is_deleting()
                        && fresh.spec.machine.as_deref() == Some(self.machine.as_str())
                        && fresh
                            .status
                            .as_ref()
                            .and_then(|s| s.machine.as_ref())
                            .is_none()
                }
                Confirm::Destroy => {
                    let holder = fresh
                        .status
                        .as_ref()
                        .and_then(|s| s.machine.as_deref())
                        .or(fresh.spec.machine.as_deref());
                    fresh.metadata.is_deleting()
                        && fresh.metadata.finalizers.iter().any(|f| f == FINALIZER)
                        && holder == Some(self.machine.as_str())
                }
                Confirm::CleanUp => matches!(
                    plan::role(&fresh, &self.machine),
                    plan::Role::MovedAway { .. }
                ),
            };
        Ok(ok.then_some(fresh))
    }

    /// Writes the status `f` makes of `seen`'s (or, if `seen` is stale, of the stored one;
    /// `f` returns None to write nothing).
    async fn write_status(
        &self,
        ctx: &Context<Volume>,
        seen: &Volume,
        f: impl Fn(&Volume) -> Option<VolumeStatus>,
    ) -> Result<(), AgentError> {
        let update = self
            .store
            .update_status_from(seen, |v: &Volume| f(v))
            .await?;
        ctx.wrote(update.written);
        Ok(())
    }

    /// The API refuses to delete a volume with snapshots; this is the second line: a fresh list
    /// of the Snapshots of this volume (a snapshot created in a race with the delete) keeps the
    /// data until they are gone.
    async fn refuse_while_snapshots_exist(&self, v: &Volume) -> Result<(), AgentError> {
        // Every Snapshot, not only those labelled with the volume: a label can be edited.
        let (snapshots, _) = self
            .store
            .list::<cobalt_api::Snapshot>(&Default::default())
            .await?;
        let held: Vec<String> = snapshots
            .iter()
            .filter(|s| s.belongs_to(&v.metadata.name, &v.metadata.uid))
            .map(|s| s.metadata.name.to_string())
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        Err(AgentError::HasSnapshots {
            volume: v.metadata.name.to_string(),
            snapshots: held.join(", "),
        })
    }

    /// After the data here is destroyed. A failure only leaves the uid listed (harmless: uids
    /// are never reused).
    fn forget_published(&self, uid: &str) {
        if let Err(e) = self.moves.published.forget(uid) {
            tracing::warn!(%uid, error = %e, "cannot update the list of published volumes");
        }
    }

    fn endpoint(&self, name: &str) -> Endpoint {
        endpoint(&self.address, self.exports.exporter.port(), name)
    }

    /// What this machine holds for `v`.
    async fn observe(&self, v: &Volume, ctx: &Context<Volume>) -> Result<Observed, AgentError> {
        let uid = v.metadata.uid.clone();
        let on_disk = self.blocking(move |b| b.get(&uid)).await?;
        // A clone's source concerns this machine only if it is served here: otherwise it is not
        // in this agent's view, and is read from etcd — only while the clone is still to make.
        let clone_source = match v.spec.source.as_ref().and_then(|s| s.clone_of()) {
            Some(src) if on_disk.is_none() => match ctx.cache().get(src) {
                Some(found) => Some(found),
                None => self.store.get::<Volume>(src).await?.map(Arc::new),
            },
            _ => None,
        };
        let served_by = |src: &Volume| src.status.as_ref().and_then(|st| st.machine.clone());
        let clone_source_uid = clone_source
            .as_ref()
            .filter(|src| served_by(src).as_deref() == Some(self.machine.as_str()))
            .map(|src| src.metadata.uid.clone());
        let move_snapshots = if self.backend.can(Capability::Snapshot) {
            let uid = v.metadata.uid.clone();
            self.blocking(move |b| b.snapshots(&uid))
                .await?
                .into_iter()
                .filter(|n| n.starts_with(SNAPSHOT_PREFIX))
                .collect()
        } else {
            Vec::new()
        };
        let clone_source_remote = clone_source.as_ref().and_then(|src| {
            let holder = served_by(src)?;
            (holder != self.machine).then(|| (holder.to_string(), src.metadata.uid.clone()))
        });
        let restore_source = v
            .spec
            .source
            .as_ref()
            .and_then(|s| self.snapshots.get(s.snapshot.as_deref()?))
            .filter(|snap| snap.ready() && snap.machine() == Some(self.machine.as_str()))
            .and_then(|snap| {
                let uid = snap.status.as_ref()?.volume_uid.clone()?;
                Some((uid, snap.backend_name().to_string()))
            });
        Ok(Observed {
            on_disk,
            capabilities: self.backend.capabilities(),
            clone_source_uid,
            move_snapshots,
            clone_source_remote,
            restore_source,
        })
    }
}

impl Reconciler<Volume> for VolumeAgent {
    type Error = AgentError;

    async fn reconcile(
        &self,
        volume: Arc<Volume>,
        ctx: Context<Volume>,
    ) -> Result<Action, AgentError> {
        let result = self.reconcile_here(volume.clone(), ctx).await;
        if let Err(e) = &result {
            match e {
                // Waiting for the other side of a move is not a failure.
                AgentError::SourceNotReady(_) => {}
                AgentError::HasSnapshots { .. } => {
                    self.events
                        .warning(&*volume, "DeleteBlocked", e.to_string())
                }
                _ => self.events.warning(
                    &*volume,
                    "Failed",
                    format!("on machine {}: {e}; retrying with backoff", self.machine),
                ),
            }
        }
        result
    }
}

impl VolumeAgent {
    /// One reconcile of `volume` on this machine: plan, then carry out the plan's steps.
    async fn reconcile_here(
        &self,
        volume: Arc<Volume>,
        ctx: Context<Volume>,
    ) -> Result<Action, AgentError> {
        self.moves.sync(&volume);
        let role = plan::role(&volume, &self.machine);
        if role == plan::Role::NotHere && !volume.metadata.is_deleting() {
            return Ok(Action::Done);
        }
        let planned_stage = volume.moving().map(|m| m.stage);
        let started = std::time::Instant::now();
        // Deleting needs nothing from the backend to decide (only the holder acts), so the
        // agents not holding the data do no I/O for it.
        let seen = if volume.metadata.is_deleting() {
            Observed::default()
        } else {
            self.observe(&volume, &ctx).await?
        };
        let plan = plan::plan(&volume, &self.machine, &seen);
        if let Some(source) = &plan.waiting_for_source {
            return Err(AgentError::SourceNotReady(source.clone()));
        }
        let name = volume.metadata.name.clone();
        let uid = volume.metadata.uid.clone();
        let mut volume = (*volume).clone();
        let mut report = Report {
            machine: self.machine.clone(),
            limit_bytes: seen.on_disk.as_ref().map_or(0, |r| r.size_bytes),
            plan: plan.clone(),
            resize_blocked: None,
            defragmented: None,
            export: ExportState::Unexported,
            claims: Vec::new(),
        };
        // Whether this machine holds the volume's data (found, or made by a step below).
        let mut data_here = seen.on_disk.is_some();
        for step in &plan.steps {
            match step {
                Step::AddFinalizer => {
                    volume.metadata.finalizers.push(FINALIZER.into());
                    volume = self.store.replace(&volume).await?;
                    ctx.wrote(volume.metadata.revision());
                }
                Step::Create(record)
                | Step::Clone { record, .. }
                | Step::Restore { record, .. } => {
                    if self.confirm(&volume, Confirm::Create).await?.is_none() {
                        tracing::info!(volume = %name, "not created: a fresh read shows it is no longer wanted here");
                        return Ok(Action::Done);
                    }
                    let r = record.clone();
                    match step {
                        Step::Clone { source_uid, .. } => {
                            let s = source_uid.clone();
                            self.blocking(move |b| b.clone_from(&s, &r)).await?
                        }
                        Step::Restore {
                            volume_uid,
                            snapshot,
                            ..
                        } => {
                            let (u, n) = (volume_uid.clone(), snapshot.clone());
                            self.blocking(move |b| b.restore(&u, &n, &r)).await?
                        }
                        _ => self.blocking(move |b| b.create(&r)).await?,
                    }
                    report.limit_bytes = record.size_bytes;
                    data_here = true;
                    tracing::info!(volume = %name, %uid, size = record.size_bytes, took = ?started.elapsed(), "provisioned");
                    let how = match step {
                        Step::Clone { .. } => "cloned",
                        Step::Restore { .. } => "restored from a snapshot",
                        _ => "created",
                    };
                    self.events.normal(
                        &volume,
                        "Provisioned",
                        format!(
                            "{how} on machine {}: {} bytes",
                            self.machine, record.size_bytes
                        ),
                    );
                }
                Step::SeedClone { from, record } => {
                    if self.confirm(&volume, Confirm::Create).await?.is_none() {
                        return Ok(Action::Done);
                    }
                    self.moves
                        .seed_clone(&volume, from, record)
                        .await
                        .map_err(AgentError::Seed)?;
                    report.limit_bytes = record.size_bytes;
                    data_here = true;
                }
                Step::Resize {
                    from_bytes,
                    to_bytes,
                } => {
                    let (u, to) = (uid.clone(), *to_bytes);
                    match self.blocking(move |b| b.resize(&u, to)).await {
                        Ok(()) => {
                            report.limit_bytes = *to_bytes;
                            tracing::info!(volume = %name, from = from_bytes, to = to_bytes, "resized");
                            self.events.normal(
                                &volume,
                                "Resized",
                                format!(
                                    "limit {from_bytes} → {to_bytes} bytes on machine {}",
                                    self.machine
                                ),
                            );
                        }
                        Err(AgentError::Backend(BackendError::ResizeBlocked {
                            used_bytes,
                            new_bytes,
                        })) => {
                            report.resize_blocked = Some((
                                "InUse",
                                format!("cannot shrink to {new_bytes} bytes: {used_bytes} bytes are in use; the limit stays {from_bytes}"),
                            ));
                        }
                        Err(AgentError::Backend(BackendError::ResizeUnsupported { reason })) => {
                            report.resize_blocked = Some(("ResizeUnsupported", reason));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Step::SetCompression(c) => {
                    let (u, c) = (uid.clone(), *c);
                    self.blocking(move |b| b.set_compression(&u, c)).await?;
                }
                Step::Defragment { token } => {
                    let u = uid.clone();
                    self.blocking(move |b| b.defragment(&u)).await?;
                    report.defragmented = Some(token.clone());
                }
                Step::Export if self.moves.is_frozen(&uid) => {
                    // The cut-over began here: never serve a write the final snapshot misses.
                    self.exports.set(&name, None).await?;
                }
                Step::Export => {
                    let mut spec = export_spec(&volume, self.backend.as_ref());
                    report.claims = add_claim_clients(&mut spec, &volume, &self.claims.list());
                    report.export = match (self.exports.exporter.port(), spec.clients.is_empty()) {
                        (0, _) => ExportState::NoExporter,
                        (_, true) => ExportState::NoClients,
                        _ => ExportState::Exported {
                            endpoint: self.endpoint(&name),
                            rules: describe_rules(&spec.clients),
                        },
                    };
                    self.exports.set(&name, Some(spec)).await?;
                }
                Step::Unexport => self.exports.set(&name, None).await?,
                Step::DropMoveSnapshots(names) => {
                    let (u, names) = (uid.clone(), names.clone());
                    self.blocking(move |b| names.iter().try_for_each(|n| b.delete_snapshot(&u, n)))
                        .await?;
                    tracing::info!(volume = %name, "dropped the snapshots of a move that did not happen");
                }
                Step::CleanUpMovedAway => {
                    let Some(fresh) = self.confirm(&volume, Confirm::CleanUp).await? else {
                        return Ok(Action::Done);
                    };
                    let u = uid.clone();
                    match self.blocking(move |b| b.destroy(&u)).await {
                        Ok(()) | Err(AgentError::Backend(BackendError::UnknownVolume(_))) => {}
                        Err(e) => return Err(e),
                    }
                    self.forget_published(&uid);
                    self.moves.thaw(&uid);
                    let me = self.machine.clone();
                    let update = self
                        .store
                        .update_status_from(&fresh, |v: &Volume| {
                            let mut s = v.status.clone()?;
                            let m = s.move_.take().filter(|m| m.from == me)?;
                            s.last_move = Some(Box::new(LastMove {
                                from: m.from,
                                to: m.to,
                                started: m.started,
                                finished: Utc::now(),
                                bytes_sent: m.bytes_sent,
                                cut_over_millis: m.cut_over_millis,
                            }));
                            s.conditions.retain(|c| c.type_ != "Moving");
                            Some(s)
                        })
                        .await?;
                    ctx.wrote(update.written);
                    tracing::info!(volume = %name, "moved away: the copy here is destroyed");
                    if let Some(last) = update
                        .object
                        .status
                        .as_ref()
                        .and_then(|s| s.last_move.as_ref())
                    {
                        self.events.normal(
                            &update.object,
                            "MoveFinished",
                            format!(
                                "moved from machine {} to {}: {} bytes sent, writes paused {} ms at the cut-over; the old copy is destroyed",
                                last.from, last.to, last.bytes_sent, last.cut_over_millis.unwrap_or(0)
                            ),
                        );
                    }
                }
                Step::MarkDeleting => {
                    self.write_status(&ctx, &volume, |v| {
                        Some(plan::deleting_status(v, Utc::now()))
                    })
                    .await?;
                }
                Step::Destroy => {
                    let Some(fresh) = self.confirm(&volume, Confirm::Destroy).await? else {
                        return Ok(Action::Done);
                    };
                    self.refuse_while_snapshots_exist(&fresh).await?;
                    volume = fresh;
                    let u = uid.clone();
                    match self.blocking(move |b| b.destroy(&u)).await {
                        Ok(()) | Err(AgentError::Backend(BackendError::UnknownVolume(_))) => {}
                        Err(e) => return Err(e),
                    }
                    self.forget_published(&uid);
                    self.events.normal(
                        &volume,
                        "Destroyed",
                        format!(
                            "the volume was deleted: its data on machine {} is destroyed",
                            self.machine
                        ),
                    );
                }
                Step::RemoveFinalizer => {
                    volume.metadata.finalizers.retain(|f| f != FINALIZER);
                    self.store.replace(&volume).await?;
                    tracing::info!(volume = %name, "deleted");
                }
                Step::WriteStatus => {
                    // Recorded before the write that may publish the data as served here.
                    if data_here
                        && matches!(role, plan::Role::Serving | plan::Role::MoveRequested { .. })
                    {
                        self.moves
                            .published
                            .record(&uid)
                            .map_err(AgentError::Published)?;
                    }
                    // Only onto the state the plan was made for: a move's stage or a flip of
                    // status.machine in between makes this report stale (the change's event
                    // brings a fresh reconcile).
                    self.write_status(&ctx, &volume, |v| {
                        (plan::role(v, &self.machine) == role
                            && v.moving().map(|m| m.stage) == planned_stage)
                            .then(|| plan::status(v, &report, Utc::now()))
                    })
                    .await?;
                }
            }
        }
        tracing::debug!(volume = %name, total = ?started.elapsed(), "reconciled");
        Ok(Action::Done)
    }
}
