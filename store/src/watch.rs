//! Typed watches: a stream of ADDED/MODIFIED/DELETED events for whole objects (object + status
//! merged), continuing from a revision.
//!
//! Guarantees:
//! - events arrive in revision order, each change exactly once;
//! - when the stream breaks (etcd restarted, connection lost) the watch re-subscribes from the
//!   last revision it delivered + 1, so nothing is lost or repeated — the caller only sees
//!   [`Error::Unavailable`] from [`ResourceWatch::next`] while etcd is unreachable and may call
//!   again;
//! - when the revision it needs has been compacted away, `next` returns [`Error::Compacted`]:
//!   the caller must list again and start a new watch.
//!
//! Progress notifications from etcd surface as [`WatchEvent::Progress`] so callers (HTTP watch
//! BOOKMARKs, the reconcile cache's read-your-writes) know how far the stream has come even
//! when nothing changes.

use std::collections::{HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use cobalt_api::selector::LabelSelector;
use cobalt_api::{ByName, Resource};
use etcd_client::{EventType, WatchOptions, WatchStream};

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::keys::{Keys, Part};
use crate::objects::{decode_object, decode_status, header_revision};
use crate::views::Scope;

/// One change to a whole object. The object is shared with the watch's own state (and, through
/// the reflector, with the cache): one decoded copy per object per process.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<R> {
    Added {
        object: Arc<R>,
        revision: i64,
    },
    Modified {
        object: Arc<R>,
        revision: i64,
    },
    /// The object's last state.
    Deleted {
        object: Arc<R>,
        revision: i64,
    },
    /// Every change up to `revision` has been delivered.
    Progress {
        revision: i64,
    },
}

impl<R> WatchEvent<R> {
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Added { revision, .. }
            | WatchEvent::Modified { revision, .. }
            | WatchEvent::Deleted { revision, .. }
            | WatchEvent::Progress { revision } => *revision,
        }
    }
}

/// Longest wait between re-subscription attempts while etcd is unreachable.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// A watch over every object of kind `R`. Create it with [`Store::watch`] or
/// [`Store::watch_after_list`].
pub struct ResourceWatch<R: Resource> {
    store: Store,
    /// The key prefix watched: the kind, or one machine's view of it.
    root: String,
    /// Last revision whose events have all been delivered.
    revision: i64,
    /// Latest known state (object and status merged) of each name, shared with the events.
    objects: HashSet<ByName<R>>,
    /// The etcd watch; its request half must live as long as the stream (dropping it ends the watch).
    stream: Option<WatchStream>,
    pending: VecDeque<WatchEvent<R>>,
    failures: u32,
    restarts: u64,
    /// Bytes of keys and values received in events.
    bytes: u64,
    /// Applied to each object decoded from an event (see [`ResourceWatch::trimming`]).
    trim: Option<fn(&mut R)>,
    _kind: PhantomData<R>,
}

impl Store {
    /// Watches kind `R` for changes after `revision`. The state at `revision` is read first so
    /// status-only changes can be reported as whole objects; [`Error::Compacted`] if it is gone.
    pub async fn watch<R: Resource>(&self, revision: i64) -> Result<ResourceWatch<R>> {
        let (items, _) = self
            .list_at::<R>(&Scope::All, &LabelSelector::default(), Some(revision))
            .await
            .map_err(|e| with_requested(e, revision))?;
        let objects = items.into_iter().map(|o| ByName(Arc::new(o))).collect();
        Ok(self.watch_from_state(&Scope::All, objects, revision))
    }

    /// Watches kind `R` after a [`Store::list`] (with the empty selector) that returned `items`
    /// at `revision`, without reading the state again. Pass `Arc<R>`s to share them with the
    /// watch (the reflector does, with its cache); plain objects are copied.
    pub fn watch_after_list<R: Resource, A: Clone + Into<Arc<R>>>(
        &self,
        items: &[A],
        revision: i64,
    ) -> ResourceWatch<R> {
        self.watch_after_list_in(&Scope::All, items, revision)
    }

    /// [`Store::watch_after_list`] for a [`Store::list_in`] of `scope` (one machine's view).
    pub fn watch_after_list_in<R: Resource, A: Clone + Into<Arc<R>>>(
        &self,
        scope: &Scope,
        items: &[A],
        revision: i64,
    ) -> ResourceWatch<R> {
        let objects = items.iter().map(|o| ByName(o.clone().into())).collect();
        self.watch_from_state(scope, objects, revision)
    }

    fn watch_from_state<R: Resource>(
        &self,
        scope: &Scope,
        objects: HashSet<ByName<R>>,
        revision: i64,
    ) -> ResourceWatch<R> {
        ResourceWatch {
            store: self.clone(),
            root: scope.root(&self.keys, R::PLURAL),
            revision,
            objects,
            stream: None,
            pending: VecDeque::new(),
            failures: 0,
            restarts: 0,
            bytes: 0,
            trim: None,
            _kind: PhantomData,
        }
    }

    /// Lists with `selector` and returns the list with a watch continuing right after it.
    pub async fn list_and_watch<R: Resource>(&self) -> Result<(Vec<R>, ResourceWatch<R>)> {
        let (items, revision) = self.list::<R>(&LabelSelector::default()).await?;
        let watch = self.watch_after_list(&items, revision);
        Ok((items, watch))
    }
}

fn with_requested(e: Error, requested: i64) -> Error {
    match e {
        Error::Compacted {
            compact_revision, ..
        } => Error::Compacted {
            requested,
            compact_revision,
        },
        other => other,
    }
}

impl<R: Resource> ResourceWatch<R> {
    /// Applies `trim` to every object this watch decodes from now on (a cache leaving out what
    /// it never reads, e.g. [`cobalt_api::ObjectMeta::trim_for_cache`]); the objects it was
    /// given by a list are the caller's to trim the same way.
    pub fn trimming(mut self, trim: fn(&mut R)) -> Self {
        self.trim = Some(trim);
        self
    }

    /// The revision up to which every change has been delivered.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The objects (with their status) as of [`ResourceWatch::revision`].
    pub fn objects(&self) -> impl Iterator<Item = &R> {
        self.objects.iter().map(|object| &*object.0)
    }

    /// Bytes of keys and values this watch has received from etcd (what its fan-out costs).
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    /// How many times the stream was re-subscribed after breaking.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Waits for the next event. See the module docs for the error cases.
    pub async fn next(&mut self) -> Result<WatchEvent<R>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if self.stream.is_none() {
                if self.failures > 0 {
                    let delay =
                        Duration::from_millis(50u64 << self.failures.min(6)).min(MAX_RETRY_DELAY);
                    tokio::time::sleep(delay).await;
                }
                match self.subscribe().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e @ Error::Compacted { .. }) => return Err(e),
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        return Err(e);
                    }
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    self.failures = 0;
                    if resp.canceled() {
                        self.stream = None;
                        if resp.compact_revision() > 0 {
                            return Err(Error::Compacted {
                                requested: self.revision + 1,
                                compact_revision: resp.compact_revision(),
                            });
                        }
                        self.restarts += 1;
                        continue;
                    }
                    if resp.created() {
                        continue;
                    }
                    let header_rev = header_revision(resp.header());
                    if resp.events().is_empty() {
                        if header_rev > self.revision {
                            self.revision = header_rev;
                            return Ok(WatchEvent::Progress {
                                revision: header_rev,
                            });
                        }
                        continue;
                    }
                    for event in resp.events() {
                        self.apply(event)?;
                    }
                }
                Ok(None) | Err(_) => {
                    // etcd restarted or the connection broke: resume after the last revision.
                    self.stream = None;
                    self.restarts += 1;
                    self.failures = self.failures.saturating_add(1);
                }
            }
        }
    }

    async fn subscribe(&self) -> Result<WatchStream> {
        let prefix = self.root.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1)
            .with_progress_notify();
        let mut client = self.store.client.watch_client();
        let mut stream = self.store.call(client.watch(prefix, Some(options))).await?;
        // The first message confirms the watch or says the revision is compacted.
        let first = self
            .store
            .call(stream.message())
            .await?
            .ok_or_else(|| Error::Unavailable {
                endpoints: self.store.endpoints.clone(),
                deadline: self.store.timeout,
                cause: "watch stream closed at once".into(),
            })?;
        if first.canceled() && first.compact_revision() > 0 {
            return Err(Error::Compacted {
                requested: self.revision + 1,
                compact_revision: first.compact_revision(),
            });
        }
        Ok(stream)
    }

    fn apply(&mut self, event: &etcd_client::Event) -> Result<()> {
        let Some(kv) = event.kv() else { return Ok(()) };
        self.bytes += (kv.key().len() + kv.value().len()) as u64;
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let revision = kv.mod_revision();
        self.revision = self.revision.max(revision);
        let Some((name, part)) = Keys::parse_under(&self.root, &key) else {
            return Ok(());
        };
        match (part, event.event_type()) {
            (Part::Object, EventType::Put) => {
                let mut object = decode_object::<R>(kv)?;
                if let Some(trim) = self.trim {
                    trim(&mut object);
                }
                let event = match self.objects.take(name) {
                    Some(old) => {
                        *object.status_mut() = old.0.status().cloned();
                        let object = Arc::new(object);
                        self.objects.insert(ByName(object.clone()));
                        WatchEvent::Modified { object, revision }
                    }
                    None => {
                        let object = Arc::new(object);
                        self.objects.insert(ByName(object.clone()));
                        WatchEvent::Added { object, revision }
                    }
                };
                self.pending.push_back(event);
            }
            (Part::Object, EventType::Delete) => {
                if let Some(old) = self.objects.take(name) {
                    let mut object = Arc::unwrap_or_clone(old.0);
                    object.meta_mut().resource_version = revision.to_string().into();
                    self.pending.push_back(WatchEvent::Deleted {
                        object: Arc::new(object),
                        revision,
                    });
                }
            }
            (Part::Status, kind) => {
                if let Some(current) = self.objects.get(name) {
                    let status = match kind {
                        EventType::Put => Some(decode_status::<R>(kv)?),
                        EventType::Delete => None,
                    };
                    // The object's fields are copied once; the old state goes when its last
                    // reader (the cache, an event in flight) lets go of it.
                    let mut object = R::clone(&current.0);
                    *object.status_mut() = status;
                    let object = Arc::new(object);
                    self.objects.replace(ByName(object.clone()));
                    self.pending
                        .push_back(WatchEvent::Modified { object, revision });
                }
            }
            (Part::Alive, _) => {}
        }
        Ok(())
    }
}
