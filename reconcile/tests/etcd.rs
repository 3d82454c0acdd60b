//! The runtime against a real etcd: changes reach the reconciler, also after an etcd restart;
//! a watcher that misses a compaction relists without losing an object; read-your-writes holds;
//! a status write that changes nothing writes nothing.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cobalt_api::{Volume, VolumePhase, VolumeSpec, VolumeStatus};
use cobalt_reconcile::reflector::reflect;
use cobalt_reconcile::{
    Action, Cache, CancellationToken, Config, Context, Controller, Metrics, Reconciler,
};
use cobalt_store::{EtcdConfig, Store};
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::proxy::TcpProxy;
use cobalt_testkit::wait::until;

fn volume(name: &str) -> Volume {
    Volume::new(
        name,
        VolumeSpec {
            size: "1Gi".parse().unwrap(),
            ..Default::default()
        },
    )
}

async fn connect(endpoints: Vec<String>) -> Store {
    Store::connect(&EtcdConfig::new(endpoints)).await.unwrap()
}

/// Records the size each key was last reconciled with.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<std::collections::BTreeMap<String, String>>>);

impl Reconciler<Volume> for Seen {
    type Error = String;
    async fn reconcile(&self, v: Arc<Volume>, _ctx: Context<Volume>) -> Result<Action, String> {
        self.0
            .lock()
            .unwrap()
            .insert(v.metadata.name.to_string(), v.spec.size.to_string());
        Ok(Action::Done)
    }
}

impl Seen {
    fn get(&self, key: &str) -> Option<String> {
        self.0.lock().unwrap().get(key).cloned()
    }
}

struct Running {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn run<Rec: Reconciler<Volume>>(
    store: &Store,
    rec: Rec,
    metrics: Option<Metrics>,
) -> (Cache<Volume>, Running) {
    let stop = CancellationToken::new();
    let cache = Cache::new();
    let reflector = tokio::spawn(reflect(store.clone(), cache.clone(), metrics, stop.clone()));
    let config = Config {
        name: "test".into(),
        resync: Duration::ZERO,
        ..Config::default()
    };
    let controller = tokio::spawn(Controller::new(cache.clone(), rec, config).run(stop.clone()));
    (
        cache,
        Running {
            stop,
            tasks: vec![reflector, controller],
        },
    )
}

#[tokio::test]
async fn changes_reach_the_reconciler_also_after_an_etcd_restart() {
    let mut etcd = Etcd::start();
    let store = connect(etcd.endpoints()).await;
    store.create(&volume("early")).await.unwrap();
    let seen = Seen::default();
    let (_cache, _running) = run(&store, seen.clone(), None);
    until("the existing volume", Duration::from_secs(10), || async {
        seen.get("early")
    })
    .await;

    let v = store.create(&volume("a")).await.unwrap();
    until("the new volume", Duration::from_secs(10), || async {
        seen.get("a")
    })
    .await;

    etcd.stop();
    etcd.start_again();
    let mut bigger = v.clone();
    bigger.spec.size = "7Gi".parse().unwrap();
    until(
        "etcd to accept the change",
        Duration::from_secs(15),
        || async { store.replace(&bigger).await.ok() },
    )
    .await;
    until(
        "the change made after the restart",
        Duration::from_secs(15),
        || async { (seen.get("a").as_deref() == Some("7Gi")).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_watcher_that_misses_a_compaction_relists_and_misses_no_object() {
    let etcd = Etcd::start();
    let direct = connect(etcd.endpoints()).await;
    let target = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .to_string();
    let proxy = TcpProxy::start(target).await;
    let behind_proxy = connect(vec![proxy.url()]).await;

    direct.create(&volume("kept")).await.unwrap();
    direct.create(&volume("doomed")).await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (cache, _running) = run(&behind_proxy, Seen::default(), Some(metrics));
    until("the initial list", Duration::from_secs(10), || async {
        (cache.len() == 2).then_some(())
    })
    .await;

    // Partition the watcher, change things behind its back, and compact the history away.
    proxy.cut();
    direct.create(&volume("born-while-away")).await.unwrap();
    direct.delete::<Volume>("doomed", None).await.unwrap();
    let now = direct.revision().await.unwrap();
    direct.compact(now).await.unwrap();
    proxy.heal();

    until("the cache to relist", Duration::from_secs(20), || async {
        let names: Vec<String> = cache.keys();
        (names == ["born-while-away", "kept"]).then_some(())
    })
    .await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let relists = text
        .lines()
        .find(|l| l.starts_with("cobalt_relists_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        relists >= 2.0,
        "expected the initial list and a relist:\n{text}"
    );
}

/// Writes status.observedGeneration = runs + 1 each time and requeues at once; fails the test
/// if it ever reads a status older than its own last write.
#[derive(Clone)]
struct Counter {
    store: Store,
    runs: Arc<AtomicUsize>,
    last_written: Arc<AtomicI64>,
    stale_reads: Arc<AtomicUsize>,
    use_ryw: bool,
}

impl Reconciler<Volume> for Counter {
    type Error = String;
    async fn reconcile(&self, v: Arc<Volume>, ctx: Context<Volume>) -> Result<Action, String> {
        let seen = v
            .status
            .as_ref()
            .map(|s| s.observed_generation)
            .unwrap_or(0);
        if seen < self.last_written.load(Ordering::SeqCst) {
            self.stale_reads.fetch_add(1, Ordering::SeqCst);
        }
        let runs = self.runs.fetch_add(1, Ordering::SeqCst);
        if runs >= 30 {
            return Ok(Action::Done);
        }
        let next = seen + 1;
        let update = self
            .store
            .update_status::<Volume, _>(&v.metadata.name, |_| {
                Some(VolumeStatus {
                    observed_generation: next,
                    ..Default::default()
                })
            })
            .await
            .map_err(|e| e.to_string())?;
        self.last_written.store(next, Ordering::SeqCst);
        if self.use_ryw {
            ctx.wrote(update.written);
        }
        Ok(Action::RequeueAfter(Duration::ZERO))
    }
}

#[tokio::test]
async fn a_reconcile_never_reads_a_cache_older_than_its_own_write() {
    let etcd = Etcd::start();
    let store = connect(etcd.endpoints()).await;
    store.create(&volume("a")).await.unwrap();
    let counter = Counter {
        store: store.clone(),
        runs: Arc::default(),
        last_written: Arc::default(),
        stale_reads: Arc::default(),
        use_ryw: true,
    };
    let (_cache, _running) = run(&store, counter.clone(), None);
    until("30 reconciles", Duration::from_secs(30), || async {
        (counter.runs.load(Ordering::SeqCst) > 30).then_some(())
    })
    .await;
    assert_eq!(counter.stale_reads.load(Ordering::SeqCst), 0);
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        live.status.unwrap().observed_generation,
        30,
        "every write built on the previous one"
    );
}

/// Sets the same status every run.
struct Steady {
    store: Store,
    runs: Arc<AtomicUsize>,
}

impl Reconciler<Volume> for Steady {
    type Error = String;
    async fn reconcile(&self, v: Arc<Volume>, ctx: Context<Volume>) -> Result<Action, String> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let update = self
            .store
            .update_status::<Volume, _>(&v.metadata.name, |_| {
                Some(VolumeStatus {
                    phase: VolumePhase::Ready,
                    ..Default::default()
                })
            })
            .await
            .map_err(|e| e.to_string())?;
        ctx.wrote(update.written);
        Ok(if n < 20 {
            Action::RequeueAfter(Duration::from_millis(5))
        } else {
            Action::Done
        })
    }
}

#[tokio::test]
async fn a_status_write_that_changes_nothing_writes_nothing() {
    let etcd = Etcd::start();
    let store = connect(etcd.endpoints()).await;
    store.create(&volume("a")).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (_cache, _running) = run(
        &store,
        Steady {
            store: store.clone(),
            runs: runs.clone(),
        },
        None,
    );
    until(
        "the first status write",
        Duration::from_secs(10),
        || async {
            store
                .get::<Volume>("a")
                .await
                .ok()
                .flatten()
                .and_then(|v| v.status)
        },
    )
    .await;
    let after_first = store.revision().await.unwrap();
    until("20 more reconciles", Duration::from_secs(10), || async {
        (runs.load(Ordering::SeqCst) > 20).then_some(())
    })
    .await;
    assert_eq!(
        store.revision().await.unwrap(),
        after_first,
        "reconciles that change nothing must not write"
    );
}
