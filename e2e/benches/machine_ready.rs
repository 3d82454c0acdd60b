//! How soon a newly started agent's machine can take volumes: from spawning `cobalt-agent` for a
//! new machine to its Machine showing phase Ready with capacity (written by the leader's
//! lifecycle), over several starts — beside a floor measured in the same run: the same agent
//! binary spawned until it answers `/healthz` (process start, config, pool open, HTTP bind).
//!
//! One etcd, one controller, agents without an exporter on 127.0.0.1, each start on a fresh
//! BTRFS pool and state directory under a new machine name. Writes `7_machine_ready` into
//! bench/results.json. `COBALT_BENCH_QUICK=1` does 3 starts instead of 10.

use std::process::Command;
use std::time::{Duration, Instant};

use cobalt_api::{Machine, MachinePhase};
use cobalt_e2e::binary;
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn agent(
    etcd: &Etcd,
    name: &str,
    pool: &BtrfsPool,
    state: &std::path::Path,
    listen: &str,
) -> Daemon {
    let mut cmd = Command::new(binary("cobalt-agent"));
    cmd.args(["--etcd-endpoints", &etcd.endpoints()[0], "--machine", name])
        .args([
            "--address",
            "127.0.0.1",
            "--exporter",
            "none",
            "--listen",
            listen,
        ])
        .arg("--pool")
        .arg(pool.path())
        .arg("--state-dir")
        .arg(state);
    Daemon::spawn(&mut cmd, name)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let starts = if std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1") {
        3
    } else {
        10
    };
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let api = free_port();
    let _controller = Daemon::spawn(
        Command::new(binary("cobalt-controller"))
            .args(["--etcd-endpoints", &etcd.endpoints()[0]])
            .arg("--listen")
            .arg(format!("127.0.0.1:{api}")),
        "controller",
    );
    let http = reqwest::Client::new();
    let mut ready = Vec::new();
    let mut floor = Vec::new();
    for i in 0..starts {
        // The floor: the binary up and answering, with etcd not involved in the answer.
        let (pool, state) = (BtrfsPool::new(256), tempfile::tempdir().unwrap());
        let listen = format!("127.0.0.1:{}", free_port());
        let t0 = Instant::now();
        let mut a = agent(&etcd, &format!("floor-{i}"), &pool, state.path(), &listen);
        loop {
            if let Ok(r) = http.get(format!("http://{listen}/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(t0.elapsed() < DEADLINE, "agent never answered /healthz");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        floor.push(t0.elapsed());
        a.kill();
        drop((pool, state));

        let (pool, state) = (BtrfsPool::new(256), tempfile::tempdir().unwrap());
        let listen = format!("127.0.0.1:{}", free_port());
        let name = format!("new-{i}");
        let t0 = Instant::now();
        let mut a = agent(&etcd, &name, &pool, state.path(), &listen);
        loop {
            let m: Option<Machine> = store.get(&name).await.ok().flatten();
            let schedulable = m
                .as_ref()
                .and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.phase == MachinePhase::Ready && s.capacity.total_bytes > 0);
            if schedulable {
                break;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "machine {name} never became Ready:\n{}",
                a.log()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ready.push(t0.elapsed());
        a.kill();
    }
    let each: Vec<f64> = ready.iter().map(|d| ms(*d)).collect();
    ready.sort();
    floor.sort();
    println!("machine readiness ({starts} agent starts, real etcd and controller)");
    println!(
        "  spawn → Machine Ready with capacity  p50 {:>8.1?}  max {:>8.1?}  (each, ms: {:?})",
        percentile(&ready, 0.5),
        ready[ready.len() - 1],
        each.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
    println!(
        "  floor: spawn → /healthz answers      p50 {:>8.1?}  max {:>8.1?}",
        percentile(&floor, 0.5),
        floor[floor.len() - 1]
    );
    let section = json!({
        "starts": starts,
        "ready_p50_ms": ms(percentile(&ready, 0.5)),
        "ready_max_ms": ms(ready[ready.len() - 1]),
        "ready_each_ms": each,
        "floor_healthz_p50_ms": ms(percentile(&floor, 0.5)),
        "floor_healthz_max_ms": ms(floor[floor.len() - 1]),
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results.json");
    let mut results: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    results["7_machine_ready"] = section;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .unwrap();
}
