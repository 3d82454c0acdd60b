//! Leader election with fencing.
//!
//! A candidate campaigns with its lease; the winner gets a [`Leadership`] whose [`Fence`] names
//! the leader key and its create revision. [`Store::fenced`] returns a store whose every write
//! also compares that key in the same transaction, so once the leader key is gone (the lease
//! expired, the process was partitioned, it resigned) its writes fail with [`Error::Fenced`] —
//! a deposed leader cannot write, even if it has not noticed yet.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::objects::header_revision;

/// Proof of leadership to include in writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub(crate) election: String,
    pub(crate) key: Vec<u8>,
    pub(crate) create_revision: i64,
}

impl Fence {
    pub(crate) fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }

    pub fn election(&self) -> &str {
        &self.election
    }
}

/// Won leadership of one election.
#[derive(Debug)]
pub struct Leadership {
    fence: Fence,
    store: Store,
}

impl Leadership {
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Gives up leadership at once so another candidate can win without waiting for a TTL.
    pub async fn resign(self) -> Result<()> {
        let txn = Txn::new()
            .when(vec![self.fence.compare()])
            .and_then(vec![TxnOp::delete(self.fence.key.clone(), None)]);
        self.store
            .call(self.store.client.kv_client().txn(txn))
            .await?;
        Ok(())
    }
}

/// How long a waiting candidate trusts its watch before looking again (a read, not a write).
const RECHECK: Duration = Duration::from_secs(10);

impl Store {
    /// Campaigns in `election` with `value` (e.g. the process's name) until elected, or until the
    /// lease is lost ([`Error::Fenced`]).
    ///
    /// The candidate enters once — its key `<election>/<lease id>` attached to its lease, the
    /// layout etcd's own election service uses, so [`Store::leader`] and `etcdctl elect` agree —
    /// and then only reads and watches until every key created before it is gone. Waiting thus
    /// costs etcd no writes, however long a standby waits. (etcd's Campaign RPC would delete
    /// and rewrite the key each time a bounded call ends.) Every request is bounded by the
    /// request deadline; the wait as a whole by the candidate's lease.
    pub async fn campaign(&self, election: &str, value: &str, lease: &Lease) -> Result<Leadership> {
        let fenced = || Error::Fenced {
            election: election.to_string(),
        };
        let prefix = format!("{}/", self.keys.election(election));
        let key = format!("{prefix}{:x}", lease.id());
        let create_revision = loop {
            if lease.is_lost() {
                return Err(fenced());
            }
            let txn = Txn::new()
                .when(vec![Compare::create_revision(
                    key.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease.id())),
                )])
                .or_else(vec![TxnOp::get(key.clone(), None)]);
            match self.call(self.client.kv_client().txn(txn)).await {
                Ok(resp) if resp.succeeded() => break header_revision(resp.header()),
                Ok(resp) => {
                    let existing = resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()),
                        _ => None,
                    });
                    if let Some(revision) = existing {
                        break revision;
                    }
                }
                Err(Error::Unavailable { .. }) => self.pause(lease).await,
                Err(e) => return Err(e),
            }
        };
        loop {
            if lease.is_lost() {
                return Err(fenced());
            }
            // The newest candidate that entered before us: we lead once none is left.
            let options = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(create_revision - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let ahead = match self
                .call(self.client.kv_client().get(prefix.clone(), Some(options)))
                .await
            {
                Ok(resp) => resp
                    .kvs()
                    .first()
                    .map(|kv| (kv.key().to_vec(), header_revision(resp.header()))),
                Err(Error::Unavailable { .. }) => {
                    self.pause(lease).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some((ahead_key, seen_at)) = ahead else {
                return Ok(Leadership {
                    fence: Fence {
                        election: election.to_string(),
                        key: key.into_bytes(),
                        create_revision,
                    },
                    store: self.clone(),
                });
            };
            let mut client = self.client.watch_client();
            let options = WatchOptions::new().with_start_revision(seen_at + 1);
            let Ok(mut stream) = self.call(client.watch(ahead_key, Some(options))).await else {
                self.pause(lease).await;
                continue;
            };
            let deleted = async {
                while let Ok(Some(resp)) = stream.message().await {
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = deleted => {}
                _ = lease.lost() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// A short pause before retrying after etcd was unreachable (cut short if the lease goes).
    async fn pause(&self, lease: &Lease) {
        tokio::select! {
            _ = lease.lost() => {}
            _ = tokio::time::sleep(self.timeout / 10) => {}
        }
    }

    /// The current leader's value, if any.
    pub async fn leader(&self, election: &str) -> Result<Option<String>> {
        let mut client = self.client.election_client();
        match self.call(client.leader(self.keys.election(election))).await {
            Ok(resp) => Ok(resp
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            Err(Error::Unavailable { cause, .. }) if cause.contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A store whose writes succeed only while `fence`'s leadership holds.
    pub fn fenced(&self, fence: &Fence) -> Store {
        let mut store = self.clone();
        store.fence = Some(fence.clone());
        store
    }
}
