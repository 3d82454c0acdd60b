//! The machine's presence in etcd: the Machine object (created if absent, never overwriting what
//! a user set, but always carrying the agent's backend label), its liveness key (bound to the
//! agent's lease, re-established if the lease is lost), and its status fields the agent owns —
//! capacity, reservations, volume count, backend capabilities, orphans — written only when they
//! change.
//!
//! **Readiness has one writer**: the leader's machine lifecycle sets phase and the Ready
//! condition from the liveness key and the capacity reported here (Ready = alive and capacity
//! known, `Machine::is_ready_with`). The agent never writes them, so the two cannot disagree.
//! The first status write follows registration at once (retried within a second when etcd is
//! not there yet), so a started agent is schedulable within about a second.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cobalt_api::{set_condition, Capacity, ConditionStatus, Machine, MachineSpec, Volume};
use cobalt_reconcile::{Cache, CancellationToken};
use cobalt_store::Store;

use crate::backend::{Backend, BackendError};
use crate::http::Readiness;

/// How often the machine status is recomputed.
pub const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// How soon a failed registration or status write is tried again.
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Store(#[from] cobalt_store::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("backend task failed: {0}")]
    Join(String),
}

/// Who this machine is, as registration needs it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    pub address: String,
    /// Labels for a newly registered Machine.
    pub labels: BTreeMap<String, String>,
    /// Where peer agents reach this one (published as `status.agentUrl`).
    pub agent_url: Option<String>,
}

/// Creates the Machine if it does not exist; an existing one (declared by a user, or by an
/// earlier run) keeps everything a user set, and gains the backend's labels
/// (`cobalt.io/backend`, and the loop backend's `cobalt.io/filesystem`) where they differ.
pub async fn register(
    store: &Store,
    me: &Identity,
    backend_labels: &BTreeMap<String, String>,
) -> Result<(), cobalt_store::Error> {
    if let Some(mut m) = store.get::<Machine>(&me.name).await? {
        if backend_labels
            .iter()
            .any(|(k, v)| !m.metadata.labels.has(k, v))
        {
            m.metadata.labels.extend(backend_labels.clone());
            store.replace(&m).await?;
        }
        return Ok(());
    }
    let mut m = Machine::new(
        &me.name,
        MachineSpec {
            address: me.address.clone(),
            ..Default::default()
        },
    );
    m.metadata.labels = me.labels.clone().into_iter().collect();
    m.metadata.labels.extend(backend_labels.clone());
    match store.create(&m).await {
        Ok(_) | Err(cobalt_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Holds the liveness key until shutdown, re-granting the lease if it is ever lost.
pub async fn keep_alive(store: Store, name: String, ttl: Duration, shutdown: CancellationToken) {
    let key = store.keys().alive(&name);
    while !shutdown.is_cancelled() {
        let lease = match store.grant_lease(ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot get a liveness lease; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        if let Err(e) = lease.put_attached(&key, &name).await {
            tracing::warn!(error = %e, "cannot write the liveness key; retrying");
            continue;
        }
        tracing::info!(machine = %name, "alive");
        tokio::select! {
            _ = lease.lost() => tracing::warn!("liveness lease lost; re-registering"),
            _ = shutdown.cancelled() => {
                // Say goodbye at once rather than after a TTL.
                let _ = lease.revoke().await;
                return;
            }
        }
    }
}

/// Registers the Machine, then keeps its status current until shutdown.
pub async fn run(
    store: Store,
    me: Identity,
    backend: Arc<dyn Backend>,
    volumes: Cache<Volume>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    while let Err(e) = register(&store, &me, &backend.labels()).await {
        tracing::warn!(error = %e, "cannot register the machine yet; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
    tracing::info!(machine = %me.name, "registered");
    readiness.registered.store(true, Ordering::SeqCst);
    // Until the cache is loaded every subvolume would look orphaned.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = volumes.ready() => {}
    }
    loop {
        let wait = match write_status(&store, &me.name, &me.agent_url, &backend, &volumes).await {
            Ok(()) => STATUS_PERIOD,
            Err(e) => {
                tracing::debug!(error = %e, "machine status not written; retrying");
                RETRY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn write_status(
    store: &Store,
    name: &str,
    agent_url: &Option<String>,
    backend: &Arc<dyn Backend>,
    volumes: &Cache<Volume>,
) -> Result<(), RegistrationError> {
    let b = backend.clone();
    let (capacity, on_disk) =
        tokio::task::spawn_blocking(move || Ok::<_, BackendError>((b.capacity()?, b.list()?)))
            .await
            .map_err(|e| RegistrationError::Join(e.to_string()))??;
    let capabilities = backend.capabilities();
    let all = volumes.list();
    let mut count = 0u32;
    let mut reserved = 0u64;
    for v in &all {
        if v.ledger_machines().any(|m| m == name) {
            count += 1;
            reserved += v.reserved_on(name);
        }
    }
    let uids: std::collections::HashSet<&str> =
        all.iter().map(|v| v.metadata.uid.as_str()).collect();
    // The cache holds the volumes that concern this machine. A copy of any other is looked up in
    // etcd by the name it was made for (a stale copy whose volume lives elsewhere is not an
    // orphan; the stale-copy sweep deals with it): normally there is none, so no read.
    let mut orphans: Vec<String> = Vec::new();
    for r in on_disk.iter().filter(|r| !uids.contains(r.uid.as_str())) {
        let owned = store
            .get::<Volume>(&r.name)
            .await?
            .is_some_and(|v| v.metadata.uid == r.uid);
        if !owned {
            orphans.push(format!("{} ({})", r.name, r.uid));
        }
    }
    crate::metrics::orphans(orphans.len());
    store
        .update_status::<Machine, _>(name, |m| {
            let mut s = m.status.clone().unwrap_or_default();
            s.capacity = Capacity {
                total_bytes: capacity.total_bytes,
                reserved_bytes: reserved,
                used_bytes: capacity.used_bytes,
            };
            s.volumes = count;
            s.capabilities = capabilities.clone();
            s.agent_url = agent_url.clone();
            if orphans.is_empty() {
                s.conditions.retain(|c| c.type_ != "OrphanVolumes");
            } else {
                let message = format!(
                    "subvolumes with no Volume object (kept, not deleted): {}",
                    orphans.join(", ")
                );
                set_condition(
                    &mut s.conditions,
                    "OrphanVolumes",
                    ConditionStatus::True,
                    "Found",
                    &message,
                    m.metadata.generation,
                    Utc::now(),
                );
            }
            Some(s)
        })
        .await?;
    Ok(())
}
