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
//!   observedGeneration — only when something changed, and refreshes usage periodically.
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

pub const FINALIZER: &str = "cobalt.io/agent";
pub const DEFRAGMENT_ANNOTATION: &str = "cobalt.io/defragment";
/// How often usage figures are refreshed for a converged volume.
pub const USAGE_REFRESH: Duration = Duration::from_secs(30);

pub struct VolumeAgent {
    pub machine: String,
    /// Where NFS clients reach this machine (for `status.endpoint`).
    pub address: String,
    pub store: Store,
    pub backend: Arc<dyn Backend>,
    pub exports: Arc<Exports>,
}

/// The machine's desired export set and the exporter that makes it real.
pub struct Exports {
    pub exporter: Arc<dyn Exporter>,
    pub desired: std::sync::Mutex<ExportSet>,
}

impl Exports {
    pub fn new(exporter: Arc<dyn Exporter>) -> Self {
        Exports {
            exporter,
            desired: std::sync::Mutex::new(ExportSet::new()),
        }
    }

    /// Sets (or with `None` removes) one volume's export and applies the whole set.
    pub async fn set(
        self: &Arc<Self>,
        name: &str,
        spec: Option<ExportSpec>,
    ) -> Result<(), AgentError> {
        let this = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let mut desired = this.desired.lock().unwrap_or_else(|p| p.into_inner());
            match spec {
                Some(s) => desired.insert(name, s),
                None => desired.remove(&name),
            };
            this.exporter.apply(&desired)
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?
        .map_err(AgentError::Export)
    }

    /// Replaces the whole set at once (start-up), so exports of volumes not yet reconciled stay.
    pub async fn replace_all(self: &Arc<Self>, set: ExportSet) -> Result<(), AgentError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut desired = this.desired.lock().unwrap_or_else(|p| p.into_inner());
            *desired = set;
            this.exporter.apply(&desired)
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?
        .map_err(AgentError::Export)
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

    async fn status(
        &self,
        ctx: &Context<Volume>,
        name: &str,
        f: impl Fn(&Volume, &mut VolumeStatus),
    ) -> Result<(), AgentError> {
        let update = self
            .store
            .update_status::<Volume, _>(name, |v| {
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
        let existing = {
            let uid = uid.clone();
            self.blocking(move |b| b.get(&uid)).await?
        };
        let mut resize_blocked = None;
        match existing {
            None => {
                self.status(&ctx, &name, |_, s| s.phase = VolumePhase::Provisioning)
                    .await?;
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
                tracing::info!(volume = %name, %uid, size, "provisioned");
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
        let usage = {
            let u = uid.clone();
            self.blocking(move |b| b.usage(&u)).await?
        };
        let spec = export_spec(&volume, self.backend.as_ref());
        let exported = self.exports.exporter.port() != 0 && !spec.clients.is_empty();
        let rules = describe_rules(&spec.clients);
        self.exports.set(&name, Some(spec)).await?;
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
        self.status(&ctx, &name, |v, s| {
            let generation = v.metadata.generation;
            let now = Utc::now();
            s.machine = Some(machine.clone());
            s.usage = Some(Usage {
                used_bytes: usage.used_bytes,
                limit_bytes: usage.limit_bytes,
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
        Ok(Action::RequeueAfter(USAGE_REFRESH))
    }
}
