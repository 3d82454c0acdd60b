//! Deterministic tests of the runner (paused tokio time, cache fed directly): dedup, one in
//! flight per key, re-run after a mid-run change, bounded concurrency, backoff growth and reset,
//! resync not starving fresh events, panics contained, graceful shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cobalt_api::{Volume, VolumeSpec};
use cobalt_reconcile::{
    Action, Backoff, Cache, CancellationToken, Config, Context, Controller, Reconciler,
};
use tokio::sync::Notify;
use tokio::time::Instant;

fn volume(name: &str, generation: i64) -> Volume {
    let mut v = Volume::new(
        name,
        VolumeSpec {
            size: "1Gi".parse().unwrap(),
            ..Default::default()
        },
    );
    v.metadata.generation = generation;
    v
}

/// Records every run: (key, generation seen, start, end), and the peak concurrency.
#[derive(Default)]
struct Log {
    runs: Mutex<Vec<(String, i64, Instant)>>,
    running: Mutex<HashMap<String, usize>>,
    peak_per_key: Mutex<usize>,
    total_running: Mutex<usize>,
    peak_total: Mutex<usize>,
}

impl Log {
    fn runs_of(&self, key: &str) -> Vec<(i64, Instant)> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == key)
            .map(|r| (r.1, r.2))
            .collect()
    }
    fn order(&self) -> Vec<String> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect()
    }
}

struct Probe {
    log: Arc<Log>,
    work: Duration,
    /// Key → how many times it fails before succeeding.
    failures: Mutex<HashMap<String, u32>>,
    gate: Option<(String, Arc<Notify>)>,
}

impl Probe {
    fn new(log: Arc<Log>, work: Duration) -> Self {
        Probe {
            log,
            work,
            failures: Mutex::new(HashMap::new()),
            gate: None,
        }
    }
}

impl Reconciler<Volume> for Probe {
    type Error = String;
    async fn reconcile(&self, v: Arc<Volume>, _ctx: Context<Volume>) -> Result<Action, String> {
        let key = v.metadata.name.clone();
        self.log.runs.lock().unwrap().push((
            key.to_string(),
            v.metadata.generation,
            Instant::now(),
        ));
        {
            let mut running = self.log.running.lock().unwrap();
            let n = running.entry(key.to_string()).or_default();
            *n += 1;
            let mut peak = self.log.peak_per_key.lock().unwrap();
            *peak = (*peak).max(*n);
            let mut total = self.log.total_running.lock().unwrap();
            *total += 1;
            let mut peak_total = self.log.peak_total.lock().unwrap();
            *peak_total = (*peak_total).max(*total);
        }
        if let Some((gated, notify)) = &self.gate {
            if *gated == key {
                notify.notified().await;
            }
        }
        tokio::time::sleep(self.work).await;
        *self
            .log
            .running
            .lock()
            .unwrap()
            .get_mut(key.as_str())
            .unwrap() -= 1;
        *self.log.total_running.lock().unwrap() -= 1;
        let mut failures = self.failures.lock().unwrap();
        match failures.get_mut(key.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(format!("{key} failed on purpose"))
            }
            _ => Ok(Action::Done),
        }
    }
}

fn config(concurrency: usize) -> Config {
    Config {
        name: "test".into(),
        concurrency,
        resync: Duration::ZERO,
        backoff: Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(8),
        },
        ..Config::default()
    }
}

async fn settle() {
    // Lets spawned tasks run; with paused time this advances only as far as timers require.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

fn start(
    cache: &Cache<Volume>,
    probe: Probe,
    config: Config,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(Controller::new(cache.clone(), probe, config).run(shutdown.clone()));
    (shutdown, handle)
}

#[tokio::test(start_paused = true)]
async fn one_in_flight_per_key_and_a_mid_run_change_runs_once_more_with_the_newest_state() {
    let log = Arc::new(Log::default());
    let gate = Arc::new(Notify::new());
    let mut probe = Probe::new(log.clone(), Duration::from_millis(10));
    probe.gate = Some(("a".into(), gate.clone()));
    let cache = Cache::new();
    cache.replace_all(vec![volume("a", 1)], 1);
    let (stop, task) = start(&cache, probe, config(4));
    settle().await;
    assert_eq!(
        log.runs_of("a").len(),
        1,
        "first run is blocked in the reconciler"
    );
    // Many changes while it runs: deduplicated into one more run, with the newest generation.
    for g in 2..=20 {
        cache.upsert(volume("a", g), g);
    }
    settle().await;
    assert_eq!(
        log.runs_of("a").len(),
        1,
        "never two runs of one key at once"
    );
    gate.notify_one();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = log.runs_of("a");
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 20]);
    assert_eq!(*log.peak_per_key.lock().unwrap(), 1);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_bounded() {
    let log = Arc::new(Log::default());
    let cache = Cache::new();
    cache.replace_all((0..20).map(|i| volume(&format!("v{i:02}"), 1)).collect(), 1);
    let (stop, task) = start(
        &cache,
        Probe::new(log.clone(), Duration::from_secs(1)),
        config(3),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(log.order().len(), 20, "every key reconciled");
    assert_eq!(*log.peak_total.lock().unwrap(), 3);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_success_resets_the_delay() {
    let log = Arc::new(Log::default());
    let probe = Probe::new(log.clone(), Duration::ZERO);
    probe.failures.lock().unwrap().insert("a".into(), 4);
    let cache = Cache::new();
    cache.replace_all(vec![volume("a", 1)], 1);
    let (stop, task) = start(&cache, probe, config(1));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let times: Vec<Instant> = log.runs_of("a").into_iter().map(|r| r.1).collect();
    assert_eq!(times.len(), 5, "four failures then a success, then quiet");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, ceiling) in gaps.iter().zip([1, 2, 4, 8].map(Duration::from_secs)) {
        assert!(*gap <= ceiling && *gap >= ceiling / 2, "gaps {gaps:?}");
    }
    // After the success, a change runs at once — no leftover backoff.
    let before = Instant::now();
    cache.upsert(volume("a", 2), 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = log.runs_of("a").last().copied().unwrap();
    assert_eq!(last.0, 2);
    assert!(last.1 - before < Duration::from_millis(50));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_resync_of_many_keys_does_not_starve_a_fresh_change() {
    let log = Arc::new(Log::default());
    let cache = Cache::new();
    cache.replace_all(
        (0..500).map(|i| volume(&format!("v{i:03}"), 1)).collect(),
        1,
    );
    let mut cfg = config(1);
    cfg.resync = Duration::from_secs(60);
    let (stop, task) = start(
        &cache,
        Probe::new(log.clone(), Duration::from_millis(100)),
        cfg,
    );
    // Initial pass: 500 × 100 ms = 50 s; then the resync (at ~54–66 s) queues all 500 again.
    tokio::time::sleep(Duration::from_secs(70)).await;
    let before = log.order().len();
    assert!(before > 500, "resync has started");
    cache.upsert(volume("v499", 2), 2);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let order = log.order();
    let position = order[before..]
        .iter()
        .position(|k| k == "v499")
        .expect("fresh change ran");
    assert!(
        position <= 2,
        "the fresh change waited behind {position} resync runs"
    );
    assert_eq!(log.runs_of("v499").last().unwrap().0, 2);
    stop.cancel();
    task.await.unwrap();
}

struct Panicky;
impl Reconciler<Volume> for Panicky {
    type Error = String;
    async fn reconcile(&self, v: Arc<Volume>, _ctx: Context<Volume>) -> Result<Action, String> {
        if v.metadata.generation == 1 {
            panic!("bug in reconciler");
        }
        Ok(Action::Done)
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconcile_is_retried_and_does_not_stop_the_runner() {
    let cache = Cache::new();
    cache.replace_all(vec![volume("a", 1)], 1);
    let shutdown = CancellationToken::new();
    let task =
        tokio::spawn(Controller::new(cache.clone(), Panicky, config(1)).run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!task.is_finished());
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_running_reconciles_finish_within_the_grace_period() {
    let log = Arc::new(Log::default());
    let cache = Cache::new();
    cache.replace_all(vec![volume("a", 1), volume("b", 1)], 1);
    let mut cfg = config(1);
    cfg.shutdown_grace = Duration::from_secs(30);
    let (stop, task) = start(&cache, Probe::new(log.clone(), Duration::from_secs(5)), cfg);
    settle().await;
    assert_eq!(log.order(), ["a"]);
    let t0 = Instant::now();
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        *log.total_running.lock().unwrap(),
        0,
        "the running reconcile completed"
    );
    assert!(Instant::now() - t0 <= Duration::from_secs(5));
    assert_eq!(
        log.order(),
        ["a"],
        "no new reconcile started after shutdown"
    );
}
