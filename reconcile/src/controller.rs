//! The runner: turns cache changes, secondary-kind changes, resyncs and requeues into calls of a
//! [`Reconciler`], with the [`Queue`]'s guarantees plus:
//! - **bounded concurrency**: at most `Config::concurrency` reconciles run at once;
//! - **read-your-writes**: a reconcile that records a write at revision W (via
//!   [`Context::wrote`]) is not run again for that key until the cache has seen W (bounded by
//!   `Config::read_your_writes_timeout`, after which it runs anyway and says so in the log);
//! - **resync** of every key every `Config::resync` (±10% jitter), at low priority;
//! - **graceful shutdown**: on cancel, no new reconcile starts; running ones get
//!   `Config::shutdown_grace` to finish, then are aborted;
//! - a `tracing` span per reconcile naming kind and object, and [`Metrics`].
//!
//! Objects are read from the cache at the moment a reconcile starts, so a reconcile always sees
//! the newest state the cache has. A key whose object is gone is dropped (cleanup belongs in a
//! finalizer, which keeps the object visible until the reconciler removes it).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cobalt_api::Resource;
use futures::FutureExt;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::queue::{Outcome, Priority, Queue};

/// What a successful reconcile asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Converged: run again on the next change or resync.
    Done,
    /// Run again after this long (e.g. to refresh usage figures).
    RequeueAfter(Duration),
}

/// Makes one object's reality match its declaration. Must be idempotent: it may run any number
/// of times for the same state.
pub trait Reconciler<R: Resource>: Send + Sync + 'static {
    type Error: std::fmt::Display + Send + 'static;
    fn reconcile(
        &self,
        object: Arc<R>,
        ctx: Context<R>,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;
}

/// Handed to each reconcile.
pub struct Context<R: Resource> {
    cache: Cache<R>,
    written: Arc<AtomicI64>,
}

impl<R: Resource> Clone for Context<R> {
    fn clone(&self) -> Self {
        Context {
            cache: self.cache.clone(),
            written: self.written.clone(),
        }
    }
}

impl<R: Resource> Context<R> {
    /// The cache of the reconciled kind.
    pub fn cache(&self) -> &Cache<R> {
        &self.cache
    }

    /// Records that this reconcile wrote an object of this kind at `revision` (see
    /// read-your-writes in the module docs). `None` (nothing written) is ignored.
    pub fn wrote(&self, revision: impl Into<Option<i64>>) {
        if let Some(r) = revision.into() {
            self.written.fetch_max(r, Ordering::SeqCst);
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Label for logs and metrics, e.g. `volume-scheduler`.
    pub name: String,
    pub concurrency: usize,
    /// Period of the full resync; `Duration::ZERO` turns it off.
    pub resync: Duration,
    pub backoff: Backoff,
    /// Longest one reconcile may run before it counts as failed.
    pub reconcile_timeout: Duration,
    pub read_your_writes_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "controller".into(),
            concurrency: 4,
            resync: Duration::from_secs(300),
            backoff: Backoff::default(),
            reconcile_timeout: Duration::from_secs(600),
            read_your_writes_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Bound on pending trigger messages from watches of other kinds; senders wait when full.
const TRIGGER_BUFFER: usize = 4096;

/// A wave of at least this many reconciles (a first list or a resync of a large cache) is
/// followed, once the queue has drained, by [`crate::memory::release_after_wave`].
const LARGE_WAVE: usize = 10_000;

/// Starts a task that turns another kind's changes into triggers, when the runner starts.
type StartForwarder = Box<dyn FnOnce(mpsc::Sender<Trigger>, CancellationToken) + Send>;

enum Trigger {
    Key(String),
    All,
}

pub struct Controller<R: Resource, Rec: Reconciler<R>> {
    cache: Cache<R>,
    reconciler: Arc<Rec>,
    config: Config,
    metrics: Option<Metrics>,
    trigger_tx: mpsc::Sender<Trigger>,
    trigger_rx: mpsc::Receiver<Trigger>,
    forwarders: Vec<StartForwarder>,
}

impl<R: Resource, Rec: Reconciler<R>> Controller<R, Rec> {
    pub fn new(cache: Cache<R>, reconciler: Rec, config: Config) -> Self {
        let (trigger_tx, trigger_rx) = mpsc::channel(TRIGGER_BUFFER);
        Controller {
            cache,
            reconciler: Arc::new(reconciler),
            config,
            metrics: None,
            trigger_tx,
            trigger_rx,
            forwarders: Vec::new(),
        }
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Requeues the keys `map` returns whenever an object of another kind changes
    /// (e.g. a Machine change requeues the Volumes bound to it).
    pub fn watches<S: Resource>(
        mut self,
        other: Cache<S>,
        map: impl Fn(&S) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.forwarders.push(Box::new(move |tx, shutdown| {
            let rx = other.subscribe();
            tokio::spawn(forward(
                rx,
                tx,
                shutdown,
                move |c: &crate::cache::Change<S>| map(&c.object),
            ));
        }));
        self
    }

    /// A handle that requeues a key from outside (e.g. a liveness key changed).
    pub fn requeue_handle(&self) -> RequeueHandle {
        RequeueHandle {
            tx: self.trigger_tx.clone(),
        }
    }

    /// Runs until `shutdown` is cancelled, then drains (see the module docs).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let name = self.config.name.clone();
        let kind = R::KIND;
        let primary = self.cache.subscribe();
        let forward_stop = shutdown.child_token();
        tokio::spawn(forward(
            primary,
            self.trigger_tx.clone(),
            forward_stop.clone(),
            |c: &crate::cache::Change<R>| vec![c.name.clone()],
        ));
        for start in self.forwarders.drain(..) {
            start(self.trigger_tx.clone(), forward_stop.clone());
        }
        self.cache.ready().await;

        let mut queue = Queue::new(self.config.backoff);
        let now = Instant::now();
        for key in self.cache.keys() {
            queue.add(&key, now, Priority::Fresh);
        }
        let mut running: JoinSet<(String, Outcome, i64)> = JoinSet::new();
        // Keys waiting for the cache to reach their own write: key → (revision, since).
        let mut waiting_ryw: HashMap<String, (i64, Instant)> = HashMap::new();
        let mut parked: HashMap<String, Instant> = HashMap::new();
        let mut revision_rx = self.cache.revision_watch();
        let mut next_resync = self.next_resync();
        // Reconciles finished since the queue last drained (see `release_after_wave`).
        let mut wave = 0usize;

        loop {
            let now = Instant::now();
            // Dispatch what is due, within the concurrency bound.
            while running.len() < self.config.concurrency.max(1) {
                let Some(key) = queue.pop_due(now) else { break };
                if let Some((rev, since)) = waiting_ryw.get(&key).copied() {
                    if self.cache.revision() < rev
                        && now.duration_since(since) < self.config.read_your_writes_timeout
                    {
                        queue.release(&key);
                        parked.insert(key, since);
                        continue;
                    }
                    if self.cache.revision() < rev {
                        tracing::warn!(controller = %name, object = %key, revision = rev, "cache did not reach our own write in time; reconciling anyway");
                    }
                    waiting_ryw.remove(&key);
                }
                let Some(object) = self.cache.get(&key) else {
                    queue.finish(&key, Outcome::Done, now);
                    queue.forget(&key);
                    continue;
                };
                running.spawn(self.run_one(key, object));
            }
            if let Some(m) = &self.metrics {
                m.queue_depth(&name, queue.len());
            }
            if queue.is_empty() && running.is_empty() {
                if wave >= LARGE_WAVE {
                    queue.shrink_to_fit();
                    crate::memory::release_after_wave();
                }
                wave = 0;
            }
            // With every slot busy a due key must wait for a completion, not a timer.
            let has_capacity = running.len() < self.config.concurrency.max(1);
            let wake = if has_capacity { queue.next_due() } else { None };
            let park_wake = parked
                .values()
                .min()
                .map(|s| *s + self.config.read_your_writes_timeout);

            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let now = Instant::now();
                    let Ok((key, outcome, written)) = done else {
                        // Tasks catch their own panics; only a cancelled task lands here, and
                        // tasks are cancelled only when the runner itself stops.
                        continue;
                    };
                    if written > self.cache.revision() {
                        waiting_ryw.insert(key.clone(), (written, now));
                    }
                    queue.finish(&key, outcome, now);
                    wave += 1;
                }
                trigger = self.trigger_rx.recv() => {
                    let now = Instant::now();
                    match trigger {
                        Some(Trigger::Key(k)) => {
                            parked.remove(&k);
                            queue.add(&k, now, Priority::Fresh);
                        }
                        Some(Trigger::All) | None => {
                            for k in self.cache.keys() {
                                queue.add(&k, now, Priority::Fresh);
                            }
                        }
                    }
                }
                Ok(()) = revision_rx.changed() => {
                    let rev = *revision_rx.borrow_and_update();
                    let now = Instant::now();
                    let ready: Vec<String> = parked
                        .keys()
                        .filter(|k| waiting_ryw.get(*k).is_none_or(|(w, _)| *w <= rev))
                        .cloned()
                        .collect();
                    for k in ready {
                        parked.remove(&k);
                        queue.add(&k, now, Priority::Fresh);
                    }
                }
                _ = sleep_until_opt(next_resync), if next_resync.is_some() => {
                    let now = Instant::now();
                    tracing::debug!(controller = %name, kind, keys = self.cache.len(), "resync");
                    for k in self.cache.keys() {
                        queue.add(&k, now, Priority::Resync);
                    }
                    next_resync = self.next_resync();
                }
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = sleep_until_opt(park_wake), if park_wake.is_some() => {
                    let now = Instant::now();
                    let expired: Vec<String> = parked
                        .iter()
                        .filter(|(_, since)| now.duration_since(**since) >= self.config.read_your_writes_timeout)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in expired {
                        parked.remove(&k);
                        queue.add(&k, now, Priority::Fresh);
                    }
                }
            }
        }
        forward_stop.cancel();
        // Graceful: let running reconciles finish, within the grace period.
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(controller = %name, "reconciles still running after the shutdown grace period; aborting them");
            running.abort_all();
        }
    }

    fn next_resync(&self) -> Option<Instant> {
        if self.config.resync.is_zero() {
            return None;
        }
        let jitter = self.config.resync.mul_f64(0.9 + fastrand::f64() * 0.2);
        Some(Instant::now() + jitter)
    }

    fn run_one(
        &self,
        key: String,
        object: Arc<R>,
    ) -> impl Future<Output = (String, Outcome, i64)> + Send + 'static {
        let reconciler = self.reconciler.clone();
        let written = Arc::new(AtomicI64::new(0));
        let ctx = Context {
            cache: self.cache.clone(),
            written: written.clone(),
        };
        let metrics = self.metrics.clone();
        let name = self.config.name.clone();
        let timeout = self.config.reconcile_timeout;
        let span =
            tracing::info_span!("reconcile", controller = %name, kind = R::KIND, object = %key);
        async move {
            let start = Instant::now();
            // A panic is caught here, inside the task, so the task always returns its key and
            // the runner keeps no per-task bookkeeping that could outgrow the queue.
            let run = std::panic::AssertUnwindSafe(reconciler.reconcile(object, ctx));
            let result = tokio::time::timeout(timeout, run.catch_unwind()).await;
            let (outcome, label) = match result {
                Ok(Ok(Ok(Action::Done))) => (Outcome::Done, "ok"),
                Ok(Ok(Ok(Action::RequeueAfter(d)))) => (Outcome::RequeueAfter(d), "requeue"),
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "reconcile failed; retrying with backoff");
                    (Outcome::Failed, "error")
                }
                Ok(Err(_)) => {
                    tracing::error!("reconcile panicked; retrying with backoff");
                    (Outcome::Failed, "panic")
                }
                Err(_) => {
                    tracing::warn!(?timeout, "reconcile timed out; retrying with backoff");
                    (Outcome::Failed, "error")
                }
            };
            if let Some(m) = &metrics {
                m.reconciled(&name, label, start.elapsed().as_secs_f64());
            }
            (key, outcome, written.load(Ordering::SeqCst))
        }
        .instrument(span)
    }
}

/// Requeues keys of a running [`Controller`] from outside.
#[derive(Clone)]
pub struct RequeueHandle {
    tx: mpsc::Sender<Trigger>,
}

impl RequeueHandle {
    pub async fn requeue(&self, key: &str) {
        let _ = self.tx.send(Trigger::Key(key.to_string())).await;
    }

    pub async fn requeue_all(&self) {
        let _ = self.tx.send(Trigger::All).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn forward<S: Resource>(
    mut rx: broadcast::Receiver<crate::cache::Change<S>>,
    tx: mpsc::Sender<Trigger>,
    shutdown: CancellationToken,
    map: impl Fn(&crate::cache::Change<S>) -> Vec<String> + Send + 'static,
) {
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx.recv() => r,
        };
        let sent = match received {
            Ok(change) => {
                let mut ok = true;
                for key in map(&change) {
                    ok &= tx.send(Trigger::Key(key)).await.is_ok();
                }
                ok
            }
            // Fell behind: every key may have changed.
            Err(broadcast::error::RecvError::Lagged(_)) => tx.send(Trigger::All).await.is_ok(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !sent {
            return;
        }
    }
}
