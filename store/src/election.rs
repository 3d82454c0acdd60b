//! Leader election with fencing.
//!
//! A candidate campaigns with its lease; the winner gets a [`Leadership`] whose [`Fence`] names
//! the leader key and its create revision. [`Store::fenced`] returns a store whose every write
//! also compares that key in the same transaction, so once the leader key is gone (the lease
//! expired, the process was partitioned, it resigned) its writes fail with [`Error::Fenced`] —
//! a deposed leader cannot write, even if it has not noticed yet.

use etcd_client::{Compare, CompareOp, LeaderKey, ResignOptions};

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::lease::Lease;

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
    leader_key: LeaderKey,
    store: Store,
}

impl Leadership {
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Gives up leadership at once so another candidate can win without waiting for a TTL.
    pub async fn resign(self) -> Result<()> {
        let mut client = self.store.client.election_client();
        self.store
            .call(client.resign(Some(ResignOptions::new().with_leader(self.leader_key))))
            .await?;
        Ok(())
    }
}

impl Store {
    /// Campaigns in `election` with `value` (e.g. the process's name) until elected, or until the
    /// lease is lost ([`Error::Fenced`]). etcd answers a campaign only on election, so each
    /// attempt is bounded by the request deadline and repeated.
    pub async fn campaign(&self, election: &str, value: &str, lease: &Lease) -> Result<Leadership> {
        let name = self.keys.election(election);
        loop {
            if lease.is_lost() {
                return Err(Error::Fenced {
                    election: election.to_string(),
                });
            }
            let mut client = self.client.election_client();
            let attempt = self
                .call(client.campaign(name.clone(), value, lease.id()))
                .await;
            match attempt {
                Ok(resp) => {
                    let leader_key = resp.leader().cloned().ok_or_else(|| {
                        Error::Invalid("etcd answered a campaign without a leader key".into())
                    })?;
                    let fence = Fence {
                        election: election.to_string(),
                        key: leader_key.key().to_vec(),
                        create_revision: leader_key.rev(),
                    };
                    return Ok(Leadership {
                        fence,
                        leader_key,
                        store: self.clone(),
                    });
                }
                Err(Error::Unavailable { .. }) => {
                    tokio::select! {
                        _ = lease.lost() => {}
                        _ = tokio::time::sleep(self.timeout / 10) => {}
                    }
                }
                Err(e) => return Err(e),
            }
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
