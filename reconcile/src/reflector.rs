//! The reflector keeps a [`Cache`] equal to etcd: list at revision R, watch from R+1, and on
//! compaction list again (announcing what vanished meanwhile). An etcd restart or connection
//! loss is handled inside the store's watch, which resumes from the last revision + 1; while etcd
//! is unreachable the reflector retries with capped backoff and the cache keeps serving what it
//! last saw.

use std::time::Duration;

use cobalt_api::Resource;
use cobalt_store::{Error, Scope, Store, WatchEvent};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::cache::Cache;
use crate::metrics::Metrics;

const LIST_RETRY: Backoff = Backoff {
    base: Duration::from_millis(100),
    cap: Duration::from_secs(2),
};

/// Keeps `cache` equal to every object of kind `R`. Runs until `shutdown` is cancelled.
pub async fn reflect<R: Resource>(
    store: Store,
    cache: Cache<R>,
    metrics: Option<Metrics>,
    shutdown: CancellationToken,
) {
    reflect_in(store, Scope::All, cache, metrics, shutdown).await
}

/// Keeps `cache` equal to every object of kind `R`, each passed through `trim` first: what the
/// cache's readers never look at can be left out of memory (the controller leaves out bound
/// volumes' last-applied annotation, see [`cobalt_api::ObjectMeta::trim_for_cache`]; the store
/// refuses to write such a copy as it is).
pub async fn reflect_trimmed<R: Resource>(
    store: Store,
    cache: Cache<R>,
    metrics: Option<Metrics>,
    shutdown: CancellationToken,
    trim: fn(&mut R),
) {
    run(store, Scope::All, cache, metrics, shutdown, Some(trim)).await
}

/// Keeps `cache` equal to the objects of kind `R` in `scope`: with [`Scope::View`], the ones
/// that concern one machine (an object that stops concerning it leaves the cache as if deleted).
pub async fn reflect_in<R: Resource>(
    store: Store,
    scope: Scope,
    cache: Cache<R>,
    metrics: Option<Metrics>,
    shutdown: CancellationToken,
) {
    run(store, scope, cache, metrics, shutdown, None).await
}

async fn run<R: Resource>(
    store: Store,
    scope: Scope,
    cache: Cache<R>,
    metrics: Option<Metrics>,
    shutdown: CancellationToken,
    trim: Option<fn(&mut R)>,
) {
    let kind = R::KIND;
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let listed = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = async {
                match trim {
                    Some(trim) => store.list_in_trimmed::<R>(&scope, trim).await,
                    None => store.list_in::<R>(&scope).await,
                }
            } => r,
        };
        let (items, revision) = match listed {
            Ok(v) => v,
            Err(e) => {
                failures += 1;
                tracing::warn!(kind, error = %e, "listing failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(LIST_RETRY.delay(failures)) => continue,
                }
            }
        };
        failures = 0;
        if let Some(m) = &metrics {
            m.relisted(kind);
        }
        // One decoded copy of each object, shared by the watch's state and the cache.
        let items: Vec<std::sync::Arc<R>> = items.into_iter().map(std::sync::Arc::new).collect();
        let mut watch = store.watch_after_list_in(&scope, &items, revision);
        if let Some(trim) = trim {
            watch = watch.trimming(trim);
        }
        cache.replace_all(items, revision);
        if let Some(m) = &metrics {
            m.reflected(kind, cache.len(), None);
        }
        let mut restarts = watch.restarts();
        let mut received = watch.bytes_received();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = watch.next() => e,
            };
            if watch.restarts() != restarts {
                restarts = watch.restarts();
                if let Some(m) = &metrics {
                    m.watch_restarted(kind);
                }
            }
            let change = matches!(&next, Ok(e) if !matches!(e, WatchEvent::Progress { .. }));
            match next {
                Ok(
                    WatchEvent::Added { object, revision }
                    | WatchEvent::Modified { object, revision },
                ) => cache.upsert(object, revision),
                Ok(WatchEvent::Deleted { object, revision }) => {
                    cache.remove(object.name(), revision)
                }
                Ok(WatchEvent::Progress { revision }) => cache.advance(revision),
                Err(Error::Compacted { .. }) => {
                    tracing::info!(kind, "watch fell behind compaction; listing again");
                    break;
                }
                Err(e) => {
                    tracing::debug!(kind, error = %e, "watch interrupted; it resumes by itself")
                }
            }
            if let (true, Some(m)) = (change, &metrics) {
                let now = watch.bytes_received();
                m.reflected(kind, cache.len(), Some(now - received));
                received = now;
            }
        }
    }
}
