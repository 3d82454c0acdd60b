//! Writing and reading events ([`cobalt_api::event`]).
//!
//! ```text
//! <prefix>/events/<kind>.<name>.<reason>   one aggregated Event (JSON), attached to a lease
//! ```
//!
//! Decision — events are off the critical path. A daemon hands an event to its [`Recorder`],
//! which returns at once; one background task per process writes them. So the writes a volume
//! create makes on its way to Ready (the three the benchmarks count) are unchanged, and a slow or
//! unreachable etcd never holds up a reconcile for an event. The queue is bounded
//! ([`QUEUE`]): when it is full an event is dropped and counted, never waited for.
//!
//! Decision — expiry without keepalives. An event key is attached to a lease granted with the
//! event TTL and never kept alive; the recorder grants a new one every TTL/6, so one lease grant
//! serves every event of that stretch, and an event lives between 5/6 and all of the TTL after
//! its last occurrence. Aggregation (one key per object and reason, `count` incremented) keeps
//! the number of keys bounded by objects × reasons seen within a TTL.
//!
//! Through a fenced store (the scheduler's) event writes are fenced like every other write: a
//! deposed leader's events are refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cobalt_api::event::{
    Event, EventMeta, EventSource, EventType, FieldSelector, ObjectReference, EVENT_API_VERSION,
    EVENT_NAMESPACE,
};
use cobalt_api::{Resource, API_VERSION};
use etcd_client::{GetOptions, PutOptions, TxnOp};
use tokio::sync::mpsc;

use crate::connection::Store;
use crate::error::{Error, Result};

/// How long an event lives after its last occurrence, unless configured otherwise.
pub const DEFAULT_EVENT_TTL: Duration = Duration::from_secs(3600);
/// Events waiting to be written per process; beyond it they are dropped.
pub const QUEUE: usize = 256;

struct Pending {
    kind: &'static str,
    name: String,
    uid: String,
    type_: EventType,
    reason: &'static str,
    message: String,
}

struct Inner {
    tx: mpsc::Sender<Pending>,
    dropped: AtomicU64,
}

/// Records events for one process. Cheap to clone; [`Recorder::disabled`] records nothing.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Recorder {
    /// Records nothing (events switched off, and tests that do not look at them).
    pub fn disabled() -> Recorder {
        Recorder { inner: None }
    }

    /// Starts the writer task. `component` is the daemon (`cobalt-controller`, `cobalt-agent`),
    /// `host` the machine or identity it runs as. A `ttl` of zero disables events.
    pub fn start(store: Store, component: &str, host: &str, ttl: Duration) -> Recorder {
        if ttl.is_zero() {
            return Recorder::disabled();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let source = EventSource {
            component: component.into(),
            host: host.into(),
        };
        tokio::spawn(write_events(store, source, ttl, rx));
        Recorder {
            inner: Some(Arc::new(Inner {
                tx,
                dropped: AtomicU64::new(0),
            })),
        }
    }

    pub fn normal<R: Resource>(
        &self,
        object: &R,
        reason: &'static str,
        message: impl Into<String>,
    ) {
        self.record(object, EventType::Normal, reason, message.into());
    }

    pub fn warning<R: Resource>(
        &self,
        object: &R,
        reason: &'static str,
        message: impl Into<String>,
    ) {
        self.record(object, EventType::Warning, reason, message.into());
    }

    fn record<R: Resource>(
        &self,
        object: &R,
        type_: EventType,
        reason: &'static str,
        message: String,
    ) {
        let Some(inner) = &self.inner else { return };
        let pending = Pending {
            kind: R::KIND,
            name: object.name().to_string(),
            uid: object.meta().uid.clone(),
            type_,
            reason,
            message,
        };
        if inner.tx.try_send(pending).is_err() && inner.dropped.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!(
                queue = QUEUE,
                "the event queue is full; events are dropped until it drains"
            );
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }
}

async fn write_events(
    store: Store,
    source: EventSource,
    ttl: Duration,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut lease: Option<(i64, Instant)> = None;
    while let Some(p) = rx.recv().await {
        // One retry: the first failure may be a lease that expired under us.
        for _ in 0..2 {
            match write_one(&store, &source, ttl, &mut lease, &p).await {
                Ok(()) => break,
                Err(Error::Fenced { .. }) => break,
                Err(e) => {
                    tracing::debug!(error = %e, reason = p.reason, object = %p.name, "event not written");
                    lease = None;
                }
            }
        }
    }
}

async fn write_one(
    store: &Store,
    source: &EventSource,
    ttl: Duration,
    lease: &mut Option<(i64, Instant)>,
    p: &Pending,
) -> Result<()> {
    let lease_id = match *lease {
        Some((id, granted)) if granted.elapsed() < ttl / 6 => id,
        _ => {
            let resp = store
                .call(
                    store
                        .client
                        .lease_client()
                        .grant(ttl.as_secs().max(2) as i64, None),
                )
                .await?;
            *lease = Some((resp.id(), Instant::now()));
            resp.id()
        }
    };
    let name = Event::name_for(p.kind, &p.name, p.reason);
    let key = store.keys.event(&name);
    let now = Utc::now();
    let previous = store
        .call(store.client.kv_client().get(key.clone(), None))
        .await?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<Event>(kv.value()).ok())
        .filter(|e| e.involved_object.uid == p.uid);
    let event = match previous {
        Some(mut e) => {
            e.count = e.count.saturating_add(1);
            e.last_timestamp = now;
            e.message.clone_from(&p.message);
            e.type_ = p.type_;
            // The latest occurrence names its reporter: after a failover another controller
            // (or, for a moved volume, another agent) reports the same reason.
            e.source = source.clone();
            e.reporting_component.clone_from(&source.component);
            e.reporting_instance.clone_from(&source.host);
            e.metadata.resource_version.clear();
            e
        }
        None => Event {
            api_version: EVENT_API_VERSION.into(),
            kind: "Event".into(),
            metadata: EventMeta {
                name,
                namespace: EVENT_NAMESPACE.into(),
                resource_version: String::new(),
                creation_timestamp: Some(now),
            },
            involved_object: ObjectReference {
                api_version: API_VERSION.into(),
                kind: p.kind.into(),
                name: p.name.clone(),
                uid: p.uid.clone(),
            },
            reason: p.reason.into(),
            message: p.message.clone(),
            type_: p.type_,
            count: 1,
            first_timestamp: now,
            last_timestamp: now,
            source: source.clone(),
            reporting_component: source.component.clone(),
            reporting_instance: source.host.clone(),
        },
    };
    let value = serde_json::to_string(&event).map_err(|e| Error::Invalid(e.to_string()))?;
    store
        .commit(
            vec![],
            vec![TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease_id)),
            )],
        )
        .await?;
    Ok(())
}

impl Store {
    /// The events matching `selector`, oldest last occurrence first, and the revision read at.
    pub async fn list_events(&self, selector: &FieldSelector) -> Result<(Vec<Event>, i64)> {
        let prefix = self.keys.events();
        let resp = self
            .call(
                self.client
                    .kv_client()
                    .get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = crate::objects::header_revision(resp.header());
        let mut events: Vec<Event> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let mut e: Event = serde_json::from_slice(kv.value()).ok()?;
                e.metadata.resource_version = kv.mod_revision().to_string();
                Some(e)
            })
            .filter(|e| selector.matches_event(e))
            .collect();
        events.sort_by_key(|e| e.last_timestamp);
        Ok((events, revision))
    }
}
