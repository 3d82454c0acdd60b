//! Scheduling at scale (#22): section `19_scheduling`.
//!
//! 1,000 Machines registered and alive (their `alive` keys on one lease, kept alive through the
//! run, capacity reported), then N = 100,000 unbound Volumes; then a real `cobalt-controller`
//! starts, is elected, lists them and binds every one. Measured: binds per second from the
//! first binding to the last (its `cobalt_scheduler_decisions_total{outcome="bound"}`, read
//! every 100 ms), and the time from the controller's start to its first binding (election and
//! the initial list).
//!
//! Floor, same run, same etcd, once the volumes are bound: the raw etcd transaction a binding
//! is — a compare, then puts of the object, its status and their copies in the machine's view,
//! with the bytes of a real binding — N times, at the scheduler's write concurrency (16), on
//! keys of their own. Target: binds/s ≥ 0.7 × the floor.
//!
//! `COBALT_BENCH_QUICK=1`: 10,000 volumes.

use std::time::{Duration, Instant};

use cobalt_api::{Volume, VolumeSpec};
use cobalt_e2e::{binary, record_bench_section, register_bench_machines};
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::process::Daemon;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::StreamExt;
use serde_json::json;

const MACHINES: usize = 1000;
/// The scheduler's own write concurrency (controller/src/scheduler/binding.rs).
const WRITE_CONCURRENCY: usize = 16;
/// Creates in flight while filling.
const PARALLEL: usize = 32;

fn volume(i: usize) -> Volume {
    let mut v = Volume::new(
        format!("vol-{i:06}"),
        VolumeSpec {
            size: "10Gi".parse().unwrap(),
            ..Default::default()
        },
    );
    v.metadata.labels = [("app".to_string(), "media".to_string())].into();
    v
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

async fn decisions_bound(http: &reqwest::Client, url: &str) -> f64 {
    let text = match http.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .find_map(|l| l.strip_prefix("cobalt_scheduler_decisions_total{outcome=\"bound\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = if std::env::var("COBALT_BENCH_QUICK").is_ok() {
        10_000
    } else {
        100_000
    };
    let etcd = Etcd::start();
    let store = etcd.store().await;

    // 1,000 machines, 100 TiB each (room for every volume), alive on one lease.
    let lease = register_bench_machines(&store, MACHINES, 100 << 40, |i| {
        [("zone".to_string(), format!("z{}", i % 4))].into()
    })
    .await;
    futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                store.create(&volume(i)).await.unwrap();
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;

    // The scheduler.
    let port = cobalt_testkit::free_port();
    let started = Instant::now();
    let mut d = Daemon::spawn(
        std::process::Command::new(binary("cobalt-controller"))
            .args(["--etcd-endpoints", &etcd.endpoints()[0], "--name", "sched"])
            .args(["--placement", "spread"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}")),
        "controller",
    );
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut first: Option<Instant> = None;
    let (controller_pid, etcd_pid) = (d.pid().unwrap(), etcd.pid().unwrap());
    let mut cpu_at_first = (0.0, 0.0);
    let last = loop {
        assert!(
            Instant::now() < deadline,
            "not every volume was bound: {}",
            d.log()
        );
        let bound = decisions_bound(&http, &url).await;
        if bound > 0.0 && first.is_none() {
            first = Some(Instant::now());
            cpu_at_first = (cpu_seconds(controller_pid), cpu_seconds(etcd_pid));
        }
        if bound >= n as f64 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cpu = (
        cpu_seconds(controller_pid) - cpu_at_first.0,
        cpu_seconds(etcd_pid) - cpu_at_first.1,
    );
    d.terminate(Duration::from_secs(10));
    // The floor: a binding's transaction with the bytes of a real one (vol-000000's object and
    // status as the scheduler wrote them), N times, 16 in flight, on keys of its own.
    let client = store.raw();
    let bytes_of = |key: String| {
        let mut kv = client.kv_client();
        async move { kv.get(key, None).await.unwrap().kvs()[0].value().to_vec() }
    };
    let sample = (
        bytes_of(store.keys().object("volumes", "vol-000000")).await,
        bytes_of(store.keys().status("volumes", "vol-000000")).await,
    );
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let mut kv = client.kv_client();
            let (object, status) = sample.clone();
            async move {
                let key = format!("/floor/volumes/vol-{i:06}/object");
                let txn = Txn::new()
                    .when(vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![
                        TxnOp::put(key, object.clone(), None),
                        TxnOp::put(
                            format!("/floor/volumes/vol-{i:06}/status"),
                            status.clone(),
                            None,
                        ),
                        TxnOp::put(
                            format!("/floor/views/m{:04}/volumes/vol-{i:06}/object", i % 1000),
                            object,
                            None,
                        ),
                        TxnOp::put(
                            format!("/floor/views/m{:04}/volumes/vol-{i:06}/status", i % 1000),
                            status,
                            None,
                        ),
                    ]);
                assert!(kv.txn(txn).await.unwrap().succeeded());
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let floor_secs = t.elapsed().as_secs_f64();
    client
        .kv_client()
        .delete(
            "/floor/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();

    drop(lease);
    let first = first.unwrap();
    let bind_secs = last.duration_since(first).as_secs_f64().max(0.001);
    let binds_per_second = n as f64 / bind_secs;
    let floor_per_second = n as f64 / floor_secs;
    let section = json!({
        "volumes": n,
        "machines": MACHINES,
        "placement": "spread",
        "start_to_first_bind_seconds": (first.duration_since(started).as_secs_f64() * 100.0).round() / 100.0,
        "bind_seconds": (bind_secs * 100.0).round() / 100.0,
        "binds_per_second": binds_per_second.round(),
        "floor_txns_per_second": floor_per_second.round(),
        // CPU each process used while binding (2 cores here: at most 2 s per second).
        "controller_cpu_seconds": (cpu.0 * 100.0).round() / 100.0,
        "etcd_cpu_seconds": (cpu.1 * 100.0).round() / 100.0,
        "floor_concurrency": WRITE_CONCURRENCY,
        "ratio": (binds_per_second / floor_per_second * 100.0).round() / 100.0,
        "target_ratio": 0.7,
    });
    println!("{}", serde_json::to_string_pretty(&section).unwrap());
    record_bench_section("19_scheduling", section);
}
