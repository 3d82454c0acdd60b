//! The machine's presence in etcd: the Machine object (created if absent, never overwriting what
//! a user set), its liveness key (bound to the agent's lease, re-established if the lease is
//! lost), and its status (capacity, reservations, volume count, orphans), written only when it
//! changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cobalt_api::{
    set_condition, Capacity, ConditionStatus, Machine, MachinePhase, MachineSpec, Volume,
};
use cobalt_reconcile::{Cache, CancellationToken};
use cobalt_store::Store;

use crate::backend::Backend;

/// How often the machine status is recomputed.
pub const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// Creates the Machine if it does not exist; an existing one (declared by a user, or by an
/// earlier run) is left as it is.
pub async fn register(
    store: &Store,
    name: &str,
    address: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), cobalt_store::Error> {
    if store.get::<Machine>(name).await?.is_some() {
        return Ok(());
    }
    let mut m = Machine::new(
        name,
        MachineSpec {
            address: address.to_string(),
            ..Default::default()
        },
    );
    m.metadata.labels = labels.clone();
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
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
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

/// Keeps the Machine's status current until shutdown.
pub async fn report_status(
    store: Store,
    name: String,
    backend: Arc<dyn Backend>,
    volumes: Cache<Volume>,
    shutdown: CancellationToken,
) {
    // Until the cache is loaded every subvolume would look orphaned.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = volumes.ready() => {}
    }
    loop {
        if let Err(e) = write_status(&store, &name, &backend, &volumes).await {
            tracing::debug!(error = %e, "machine status not written; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(STATUS_PERIOD) => {}
        }
    }
}

async fn write_status(
    store: &Store,
    name: &str,
    backend: &Arc<dyn Backend>,
    volumes: &Cache<Volume>,
) -> anyhow::Result<()> {
    let b = backend.clone();
    let (capacity, on_disk) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::backend::BackendError>((b.capacity()?, b.list()?))
    })
    .await??;
    let all = volumes.list();
    let bound: Vec<&Arc<Volume>> = all
        .iter()
        .filter(|v| v.spec.machine.as_deref() == Some(name))
        .collect();
    let reserved: u64 = bound.iter().map(|v| v.spec.reserved_bytes()).sum();
    let uids: std::collections::HashSet<&str> =
        all.iter().map(|v| v.metadata.uid.as_str()).collect();
    let orphans: Vec<String> = on_disk
        .iter()
        .filter(|r| !uids.contains(r.uid.as_str()))
        .map(|r| format!("{} ({})", r.name, r.uid))
        .collect();
    crate::metrics::orphans(orphans.len());
    store
        .update_status::<Machine, _>(name, |m| {
            let mut s = m.status.clone().unwrap_or_default();
            s.capacity = Capacity {
                total_bytes: capacity.total_bytes,
                reserved_bytes: reserved,
                used_bytes: capacity.used_bytes,
            };
            s.volumes = bound.len() as u32;
            s.phase = MachinePhase::Ready;
            let now = Utc::now();
            set_condition(
                &mut s.conditions,
                "Ready",
                ConditionStatus::True,
                "AgentAlive",
                "the agent holds its lease",
                m.metadata.generation,
                now,
            );
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
                    now,
                );
            }
            Some(s)
        })
        .await?;
    Ok(())
}
