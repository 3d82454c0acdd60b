//! Event-to-reconcile latency and throughput with 10,000 objects, against a real etcd.
//!
//! 1. 10,000 volumes exist; the controller starts: time until every one has been reconciled
//!    (list + queue + dispatch throughput).
//! 2. With those 10,000 in the cache, 200 updates one after another: latency from the etcd write
//!    returning to the reconciler seeing the new generation (p50/p99).
//! 3. 2,000 updates written as fast as etcd takes them: reconciles per second.
//! 4. The same 10,000 objects under a 1 s resync for 100 resyncs: resident memory after the
//!    10th and after the 100th (it must stay flat: the runner keeps nothing per reconcile).
//!    `COBALT_BENCH_QUICK=1` resyncs every 200 ms instead.
//!
//! Prints a table and writes `target/bench/reconcile.json` (`make bench` collects it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cobalt_api::{Volume, VolumeSpec};
use cobalt_reconcile::reflector::reflect;
use cobalt_reconcile::{Action, Cache, CancellationToken, Config, Context, Controller, Reconciler};
use cobalt_store::{EtcdConfig, Store};
use futures::StreamExt;

const OBJECTS: usize = 10_000;
const LATENCY_SAMPLES: usize = 200;
const BURST: usize = 2_000;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, (i64, Instant)>>>);

impl Reconciler<Volume> for Seen {
    type Error = String;
    async fn reconcile(&self, v: Arc<Volume>, _ctx: Context<Volume>) -> Result<Action, String> {
        self.0.lock().unwrap().insert(
            v.metadata.name.to_string(),
            (v.metadata.generation, Instant::now()),
        );
        Ok(Action::Done)
    }
}

impl Seen {
    fn count_at(&self, generation: i64) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|(g, _)| *g >= generation)
            .count()
    }
    fn when(&self, key: &str, generation: i64) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .get(key)
            .filter(|(g, _)| *g >= generation)
            .map(|(_, t)| *t)
    }
}

fn volume(i: usize) -> Volume {
    Volume::new(
        format!("v{i:05}"),
        VolumeSpec {
            size: "1Gi".parse().unwrap(),
            ..Default::default()
        },
    )
}

async fn wait(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Replaces every object with `size`, 64 writes in flight.
async fn resize_all(store: &Store, objects: Vec<Volume>, size: &str) {
    let size: cobalt_api::Quantity = size.parse().unwrap();
    futures::stream::iter(objects)
        .map(|mut v| {
            let store = store.clone();
            async move {
                v.spec.size = size;
                store.replace(&v).await.unwrap()
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
}

/// Counts reconciles.
#[derive(Clone, Default)]
struct Count(Arc<std::sync::atomic::AtomicU64>);

impl Reconciler<Volume> for Count {
    type Error = String;
    async fn reconcile(&self, _v: Arc<Volume>, _ctx: Context<Volume>) -> Result<Action, String> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Action::Done)
    }
}

/// This process's resident set, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let etcd = cobalt_testkit::etcd::Etcd::start();
    let store = Store::connect(&EtcdConfig::new(etcd.endpoints()))
        .await
        .unwrap();
    futures::stream::iter(0..OBJECTS)
        .map(|i| {
            let store = store.clone();
            async move { store.create(&volume(i)).await.unwrap() }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;

    let seen = Seen::default();
    let stop = CancellationToken::new();
    let cache = Cache::new();
    let start = Instant::now();
    tokio::spawn(reflect(store.clone(), cache.clone(), None, stop.clone()));
    let config = Config {
        name: "bench".into(),
        concurrency: 8,
        resync: Duration::ZERO,
        ..Config::default()
    };
    tokio::spawn(Controller::new(cache.clone(), seen.clone(), config).run(stop.clone()));
    wait("initial reconciles", Duration::from_secs(300), || {
        seen.count_at(1) == OBJECTS
    })
    .await;
    let initial = start.elapsed();

    // Measured from the start of the etcd write, so it includes the write itself; the write's own
    // latency (the floor) is reported beside it.
    let mut latencies = Vec::new();
    let mut writes = Vec::new();
    for i in 0..LATENCY_SAMPLES {
        let name = format!("v{:05}", i * (OBJECTS / LATENCY_SAMPLES));
        let mut v: Volume = store.get(&name).await.unwrap().unwrap();
        v.spec.size = "2Gi".parse().unwrap();
        let t0 = Instant::now();
        let written = store.replace(&v).await.unwrap();
        writes.push(t0.elapsed());
        let generation = written.metadata.generation;
        wait("an update", Duration::from_secs(10), || {
            seen.when(&name, generation).is_some()
        })
        .await;
        latencies.push(
            seen.when(&name, generation)
                .unwrap()
                .saturating_duration_since(t0),
        );
    }
    latencies.sort();
    writes.sort();

    let objects: Vec<Volume> = cache
        .list()
        .iter()
        .take(BURST)
        .map(|v| (**v).clone())
        .collect();
    let t0 = Instant::now();
    resize_all(&store, objects, "3Gi").await;
    wait("burst reconciles", Duration::from_secs(120), || {
        cache
            .list()
            .iter()
            .take(BURST)
            .all(|v| seen.when(&v.metadata.name, v.metadata.generation).is_some())
    })
    .await;
    let burst = t0.elapsed();
    stop.cancel();

    // Floors: the same burst of writes alone (nobody waiting for reconciles), and one list.
    let objects: Vec<Volume> = store
        .list::<Volume>(&Default::default())
        .await
        .unwrap()
        .0
        .into_iter()
        .take(BURST)
        .collect();
    let t0 = Instant::now();
    resize_all(&store, objects, "4Gi").await;
    let burst_writes = t0.elapsed();
    let t0 = Instant::now();
    let (listed, _) = store.list::<Volume>(&Default::default()).await.unwrap();
    assert_eq!(listed.len(), OBJECTS);
    let list_alone = t0.elapsed();

    // 4. Memory under repeated resyncs, over the cache that is still loaded.
    let quick = std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let resync = if quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let count = Count::default();
    let stop = CancellationToken::new();
    let config = Config {
        name: "bench-resync".into(),
        concurrency: 8,
        resync,
        ..Config::default()
    };
    tokio::spawn(Controller::new(cache.clone(), count.clone(), config).run(stop.clone()));
    let passes = |n: u64| {
        let count = count.clone();
        move || count.0.load(std::sync::atomic::Ordering::Relaxed) >= n * OBJECTS as u64
    };
    // The first pass is the start; each later one a resync.
    wait(
        "10 resyncs",
        resync * 40 + Duration::from_secs(60),
        passes(11),
    )
    .await;
    let rss_10 = rss_bytes();
    wait(
        "100 resyncs",
        resync * 400 + Duration::from_secs(120),
        passes(101),
    )
    .await;
    let rss_100 = rss_bytes();
    stop.cancel();

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    println!("reconcile benchmark ({OBJECTS} objects, real etcd)");
    println!(
        "  initial list → all reconciled   {:>10.2?}  ({:.0} objects/s; the list alone: {:.2?})",
        initial,
        rate(OBJECTS, initial),
        list_alone
    );
    println!(
        "  write → reconcile p50           {:>10.2?}  (etcd write alone: {:.2?})",
        percentile(&latencies, 0.5),
        percentile(&writes, 0.5)
    );
    println!(
        "  write → reconcile p99           {:>10.2?}  (etcd write alone: {:.2?})",
        percentile(&latencies, 0.99),
        percentile(&writes, 0.99)
    );
    println!(
        "  burst of {BURST} updates          {:>10.2?}  ({:.0} reconciles/s, etcd writes included; the writes alone: {:.0}/s)",
        burst,
        rate(BURST, burst),
        rate(BURST, burst_writes)
    );
    println!(
        "  resync every {resync:?}: RSS after 10 resyncs {:.1} MiB, after 100 {:.1} MiB ({:+.1} KiB per resync)",
        rss_10 as f64 / 1048576.0,
        rss_100 as f64 / 1048576.0,
        (rss_100 as f64 - rss_10 as f64) / 90.0 / 1024.0
    );
    let json = serde_json::json!({
        "resync_period_seconds": resync.as_secs_f64(),
        "rss_after_10_resyncs_bytes": rss_10,
        "rss_after_100_resyncs_bytes": rss_100,
        "objects": OBJECTS,
        "initial_seconds": initial.as_secs_f64(),
        "initial_per_second": rate(OBJECTS, initial),
        "latency_p50_ms": percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        "latency_p99_ms": percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        "write_p50_ms": percentile(&writes, 0.5).as_secs_f64() * 1e3,
        "write_p99_ms": percentile(&writes, 0.99).as_secs_f64() * 1e3,
        "burst_updates": BURST,
        "burst_per_second": rate(BURST, burst),
        "floor_list_seconds": list_alone.as_secs_f64(),
        "floor_burst_writes_per_second": rate(BURST, burst_writes),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("reconcile.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
