//! Usage reporting: one pool-wide pass every `usageRefresh` writes `status.usage` of the
//! volumes whose used bytes moved — nothing when idle, so an idle machine costs etcd no writes.

use std::sync::Arc;
use std::time::Duration;

use cobalt_api::{Usage, Volume};
use cobalt_store::Store;

use crate::backend::Backend;

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
