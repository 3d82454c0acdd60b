//! The in-memory cache of one kind: what reconcilers read instead of etcd.
//!
//! The [`crate::reflector`] fills it (list at revision R, then watch from R+1, relist on
//! compaction). Readers get `Arc`s of whole objects (spec + status). Every change is announced
//! on a bounded broadcast channel; a subscriber that falls behind is told it lagged and must treat
//! every key as changed — changes are never silently dropped.
//!
//! The cache also tracks the revision it has caught up to, so a reconciler that wrote revision W
//! can wait until the cache reflects its own write ([`Cache::wait_for_revision`]).

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cobalt_api::{ByName, Resource};
use tokio::sync::{broadcast, watch};

/// How many announced changes a slow subscriber may fall behind before it is told it lagged.
pub const CHANGE_BUFFER: usize = 4096;

/// One change to one object.
#[derive(Debug)]
pub struct Change<R> {
    pub name: String,
    /// The new state, or the last state of a deleted object.
    pub object: Arc<R>,
    pub deleted: bool,
}

impl<R> Clone for Change<R> {
    fn clone(&self) -> Self {
        Change {
            name: self.name.clone(),
            object: self.object.clone(),
            deleted: self.deleted,
        }
    }
}

pub struct Cache<R: Resource> {
    inner: Arc<Inner<R>>,
}

impl<R: Resource> Clone for Cache<R> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R> {
    /// Keyed by the name inside each object (no copy of it beside).
    objects: RwLock<BTreeSet<ByName<R>>>,
    revision: watch::Sender<i64>,
    ready: watch::Sender<bool>,
    changes: broadcast::Sender<Change<R>>,
}

impl<R: Resource> Default for Cache<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Resource> Cache<R> {
    pub fn new() -> Self {
        Cache {
            inner: Arc::new(Inner {
                objects: RwLock::new(BTreeSet::new()),
                revision: watch::channel(0).0,
                ready: watch::channel(false).0,
                changes: broadcast::channel(CHANGE_BUFFER).0,
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<ByName<R>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts),
        // so a poisoned lock is still consistent.
        self.inner.objects.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<ByName<R>>> {
        self.inner
            .objects
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<R>> {
        self.read().get(name).map(|o| o.0.clone())
    }

    /// Every object, ordered by name.
    pub fn list(&self) -> Vec<Arc<R>> {
        self.read().iter().map(|o| o.0.clone()).collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.read().iter().map(|o| o.0.name().to_string()).collect()
    }

    /// The names of the objects `pred` accepts, ordered by name: one pass under the read lock,
    /// copying nothing else (what a secondary watch's mapping wants from a large cache).
    pub fn names_where(&self, mut pred: impl FnMut(&R) -> bool) -> Vec<String> {
        self.read()
            .iter()
            .filter(|o| pred(&o.0))
            .map(|o| o.0.name().to_string())
            .collect()
    }

    /// The first name (in name order) of an object `pred` accepts.
    pub fn first_name_where(&self, mut pred: impl FnMut(&R) -> bool) -> Option<String> {
        self.read()
            .iter()
            .find(|o| pred(&o.0))
            .map(|o| o.0.name().to_string())
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// The etcd revision the cache has caught up to.
    pub fn revision(&self) -> i64 {
        *self.inner.revision.borrow()
    }

    pub fn revision_watch(&self) -> watch::Receiver<i64> {
        self.inner.revision.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Waits until the initial list has been loaded.
    pub async fn ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Waits until the cache has seen `revision`, at most `deadline`; true if it has.
    pub async fn wait_for_revision(&self, revision: i64, deadline: Duration) -> bool {
        let mut rx = self.inner.revision.subscribe();
        tokio::time::timeout(deadline, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change<R>> {
        self.inner.changes.subscribe()
    }

    /// Inserts or replaces an object seen at `revision` (the reflector's job; tests may call it).
    pub fn upsert(&self, object: impl Into<Arc<R>>, revision: i64) {
        let object: Arc<R> = object.into();
        let name = object.name().to_string();
        self.write().replace(ByName(object.clone()));
        let _ = self.inner.changes.send(Change {
            name,
            object,
            deleted: false,
        });
        self.advance(revision);
    }

    /// Removes an object deleted at `revision`.
    pub fn remove(&self, name: &str, revision: i64) {
        let removed = self.write().take(name);
        if let Some(ByName(object)) = removed {
            let _ = self.inner.changes.send(Change {
                name: name.to_string(),
                object,
                deleted: true,
            });
        }
        self.advance(revision);
    }

    /// Replaces the whole content after a (re)list at `revision`, announcing only real changes:
    /// objects that vanished while the watch was broken are announced as deleted.
    pub fn replace_all(&self, objects: Vec<impl Into<Arc<R>>>, revision: i64) {
        let fresh: BTreeSet<ByName<R>> = objects.into_iter().map(|o| ByName(o.into())).collect();
        let mut announce = Vec::new();
        {
            let mut set = self.write();
            for ByName(old) in set.iter() {
                if !fresh.contains(old.name()) {
                    announce.push(Change {
                        name: old.name().to_string(),
                        object: old.clone(),
                        deleted: true,
                    });
                }
            }
            for ByName(new) in &fresh {
                if set.get(new.name()).is_none_or(|old| old.0 != *new) {
                    announce.push(Change {
                        name: new.name().to_string(),
                        object: new.clone(),
                        deleted: false,
                    });
                }
            }
            *set = fresh;
        }
        for change in announce {
            let _ = self.inner.changes.send(change);
        }
        self.advance(revision);
        self.inner.ready.send_replace(true);
    }

    /// Records that everything up to `revision` has been seen.
    pub fn advance(&self, revision: i64) {
        self.inner.revision.send_if_modified(|r| {
            if revision > *r {
                *r = revision;
                true
            } else {
                false
            }
        });
    }
}
