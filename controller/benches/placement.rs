//! Placement time per decision at 100,000 volumes × 1,000 machines (pure code, no I/O).
//! Prints a table and writes `target/bench/placement.json`.

use std::collections::BTreeMap;
use std::time::Instant;

use cobalt_controller::config::PlacementStrategy;
use cobalt_controller::scheduler::placement::{place_batch, Decision, MachineView, Request};

const VOLUMES: usize = 100_000;
const MACHINES: usize = 1_000;

fn main() {
    let machines: Vec<MachineView> = (0..MACHINES)
        .map(|i| MachineView {
            name: format!("node-{i:04}"),
            labels: [(
                "disk".to_string(),
                if i % 2 == 0 { "ssd" } else { "hdd" }.to_string(),
            )]
            .into(),
            ready: i % 50 != 0,
            unschedulable: i % 97 == 0,
            total_bytes: (4u64 << 40) + (i as u64) * (1 << 30),
            max_fill_percent: 90,
            reserved_bytes: 0,
            capabilities: vec![cobalt_api::Capability::Compression],
        })
        .collect();
    let requests: Vec<Request> = (0..VOLUMES)
        .map(|i| Request {
            name: format!("v{i:06}"),
            reserved_bytes: ((i % 64) as u64 + 1) << 30,
            selector: if i % 3 == 0 {
                [("disk".to_string(), "ssd".to_string())].into()
            } else {
                BTreeMap::new()
            },
            required_machine: None,
            needs: vec![],
        })
        .collect();
    let mut results = serde_json::Map::new();
    println!("placement benchmark ({VOLUMES} volumes × {MACHINES} machines)");
    for strategy in [PlacementStrategy::Binpack, PlacementStrategy::Spread] {
        let mut views = machines.clone();
        let start = Instant::now();
        let decisions = place_batch(strategy, requests.clone(), &mut views);
        let took = start.elapsed();
        let bound = decisions
            .iter()
            .filter(|(_, d)| matches!(d, Decision::Bind(_)))
            .count();
        let per = took / VOLUMES as u32;
        println!(
            "  {strategy:?}: {took:>10.2?} total, {per:>8.2?} per decision, {:.0} decisions/s, {bound} bound",
            VOLUMES as f64 / took.as_secs_f64()
        );
        results.insert(
            format!("{strategy:?}").to_lowercase(),
            serde_json::json!({
                "volumes": VOLUMES, "machines": MACHINES, "seconds": took.as_secs_f64(),
                "micros_per_decision": took.as_secs_f64() * 1e6 / VOLUMES as f64,
                "decisions_per_second": VOLUMES as f64 / took.as_secs_f64(), "bound": bound,
            }),
        );
    }
    // The floor: the least any best-fit placement must do — one pass over every machine's free
    // bytes per decision, no labels, no readiness, no names.
    let mut free: Vec<u64> = machines.iter().map(|m| m.total_bytes / 100 * 90).collect();
    let start = Instant::now();
    let mut bound = 0;
    for r in &requests {
        let need = std::hint::black_box(r.reserved_bytes);
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, &f)| f >= need)
            .min_by_key(|(_, &f)| f - need)
            .map(|(i, _)| i);
        if let Some(i) = best {
            free[i] -= need;
            bound += 1;
        }
    }
    let took = start.elapsed();
    println!(
        "  floor (best fit over {MACHINES} free-byte counters): {:>8.2?} per decision, {bound} bound",
        took / VOLUMES as u32
    );
    results.insert(
        "floor".into(),
        serde_json::json!({
            "seconds": took.as_secs_f64(),
            "micros_per_decision": took.as_secs_f64() * 1e6 / VOLUMES as f64,
            "decisions_per_second": VOLUMES as f64 / took.as_secs_f64(),
        }),
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("placement.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
}
