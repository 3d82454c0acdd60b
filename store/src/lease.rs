//! Leases: a TTL in etcd kept alive by a background task. Keys attached to a lease vanish when
//! it expires — that is how an agent's `alive` key says it is alive, and how an election
//! candidate's key goes when its process dies.
//!
//! The keepalive task sends a keepalive every TTL/3. If etcd reports the lease gone, or no
//! keepalive has succeeded for a whole TTL, the lease is *lost*: [`Lease::lost`] resolves and the
//! holder must stop acting on it (a scheduler stops scheduling; an agent re-registers).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::connection::Store;
use crate::error::Result;

/// A granted lease with its keepalive task. Dropping it stops the keepalive (the lease then
/// expires after its TTL); [`Lease::revoke`] ends it at once.
#[derive(Debug)]
pub struct Lease {
    id: i64,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
    store: Store,
}

impl Store {
    /// Grants a lease of `ttl` (whole seconds, at least 1) and starts keeping it alive.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .call(self.client.lease_client().grant(secs, None))
            .await?;
        let id = resp.id();
        let ttl = Duration::from_secs(resp.ttl().max(1) as u64);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(keep_alive(self.clone(), id, ttl, tx));
        Ok(Lease {
            id,
            ttl,
            lost: rx,
            task,
            store: self.clone(),
        })
    }
}

impl Lease {
    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost (expired, revoked, or unrenewable for a whole TTL).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Puts `key` = `value` attached to this lease.
    pub async fn put_attached(&self, key: &str, value: &str) -> Result<i64> {
        let options = etcd_client::PutOptions::new().with_lease(self.id);
        let resp = self
            .store
            .call(self.store.client.kv_client().put(key, value, Some(options)))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Ends the lease now, deleting every key attached to it.
    pub async fn revoke(self) -> Result<()> {
        self.task.abort();
        self.store
            .call(self.store.client.lease_client().revoke(self.id))
            .await?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_alive(store: Store, id: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let interval = (ttl / 3).max(Duration::from_millis(300));
    let mut last_ok = Instant::now();
    let mut keeper = None;
    loop {
        if keeper.is_none() {
            match store.call(store.client.lease_client().keep_alive(id)).await {
                Ok(pair) => keeper = Some(pair),
                Err(e) => tracing::debug!(lease = id, error = %e, "lease keepalive: reconnecting"),
            }
        }
        if let Some((k, stream)) = keeper.as_mut() {
            let renewed = async {
                k.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(store.timeout, renewed).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = Instant::now(),
                Ok(Ok(Some(_))) => {
                    tracing::warn!(lease = id, "lease expired in etcd");
                    let _ = lost.send(true);
                    return;
                }
                _ => keeper = None,
            }
        }
        if last_ok.elapsed() >= ttl {
            tracing::warn!(
                lease = id,
                "lease not renewed for a whole TTL: treating it as lost"
            );
            let _ = lost.send(true);
            return;
        }
        tokio::time::sleep(interval).await;
    }
}
