//! The long soak (bench section `14_soak`, `make soak`): the three-machine cluster under steady
//! churn — a window of 6 volumes, each new one created, written to over NFS, every third grown,
//! the oldest deleted — with every daemon resyncing every 2 s, for `COBALT_SOAK_SECS` (default
//! 1200; `COBALT_BENCH_QUICK=1`: 120). Every 10 s: each daemon's resident memory, threads, open
//! descriptors and live async tasks, and etcd's key count (events apart) and database size;
//! etcd's history is compacted before each sample, as `--auto-compaction-retention` does in
//! production. Reported: each series' slope per hour after a quarter of warm-up, beside the
//! idle values measured before the churn started (the floor a leak-free daemon returns to).
//!
//! Events live 60 s here (the default is an hour): their count is bounded by objects × reasons
//! within a TTL, so with a short TTL the soak reaches the steady state it is meant to measure.

use std::time::Duration;

use cobalt_e2e::soak;
use cobalt_e2e::{record_bench_section, Cluster};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = if std::env::var("COBALT_BENCH_QUICK").is_ok() {
        120
    } else {
        std::env::var("COBALT_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1200)
    };
    let args = ["--resync", "2s", "--event-ttl", "60s"];
    let mut c = Cluster::start_with_args("spread", &args, &args).await;
    c.machines_ready(3).await;
    for i in 0..c.controllers.len() {
        c.controller_serving(i).await;
    }
    let daemons = soak::daemons(&c);
    let idle = soak::sample(&c.store, &daemons).await;
    eprintln!("soak: {secs} s of churn; idle {idle:?}");
    let run = soak::run(
        &mut c,
        Duration::from_secs(secs),
        Duration::from_secs(10),
        6,
        true,
    )
    .await;
    let slopes = soak::Soak::slopes(&run, 0.25);
    for (k, v) in &slopes {
        eprintln!("soak: {k:<22} {v}");
    }
    eprintln!(
        "soak: {} cycles ({} failed), {} samples",
        run.cycles,
        run.failed_cycles,
        run.samples.len()
    );
    record_bench_section(
        "14_soak",
        json!({
            "what": "steady churn (window of 6 volumes: create, NFS write, grow every third, delete) with 2 s resyncs on every daemon; per series the least-squares slope per hour after 25% warm-up",
            "duration_s": secs,
            "cycles": run.cycles,
            "failed_cycles": run.failed_cycles,
            "samples": run.samples.len(),
            "idle_floor": idle,
            "series": slopes,
        }),
    );
}
