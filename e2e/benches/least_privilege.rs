//! What least privilege costs: apply→Ready of volumes on a machine whose agent writes through
//! the API with its machine token (`api:`), beside the floor measured in the same run — the same
//! cluster's other machine, whose agent writes straight to etcd as the controllers' user. Both
//! under etcd authentication and client TLS (`cobalt_e2e::secured`), created one after another,
//! alternating between the two machines, each timed from the API's create to the first Ready
//! seen by an etcd watch.
//!
//! Writes `20_least_privilege` into bench/results.json. `COBALT_BENCH_QUICK=1` does 10 volumes
//! per machine instead of 40.

use std::time::{Duration, Instant};

use cobalt_api::{Volume, VolumePhase};
use cobalt_e2e::secured::{Secured, ADMIN};
use cobalt_store::{ResourceWatch, WatchEvent};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Creates `name` pinned to `machine` and returns how long until `watch` saw it Ready. One
/// watch for the whole run: a watch opened for each volume delivered its first events ~100 ms
/// late (measured here), which would be most of what is measured.
async fn apply_to_ready(
    c: &Secured,
    watch: &mut ResourceWatch<Volume>,
    http: &reqwest::Client,
    name: &str,
    machine: &str,
) -> Duration {
    let body = json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": name}, "spec": {"size": "16Mi", "machine": machine}});
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/apis/cobalt.io/v1alpha1/volumes", c.server))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create {name}: {}", r.status());
    loop {
        let event = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .unwrap_or_else(|_| panic!("{name} not Ready within {DEADLINE:?}\n{}", c.logs()))
            .unwrap();
        if let WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } = event {
            if object.metadata.name == name
                && object
                    .status
                    .as_ref()
                    .is_some_and(|s| s.phase == VolumePhase::Ready)
            {
                return t0.elapsed();
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let n = if std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1") {
        10
    } else {
        40
    };
    // m1 writes through the API; m2, the floor, straight to etcd.
    let c = Secured::start_with("", &["m2"]).await;
    let http = reqwest::Client::new();
    let revision = c.admin.revision().await.unwrap();
    let mut watch = c.admin.watch::<Volume>(revision).await.unwrap();
    // One of each first, unmeasured: connections and caches warm.
    for (name, m) in [("warm-1", "m1"), ("warm-2", "m2")] {
        apply_to_ready(&c, &mut watch, &http, name, m).await;
    }
    let (mut api, mut direct) = (Vec::new(), Vec::new());
    for i in 0..n {
        api.push(apply_to_ready(&c, &mut watch, &http, &format!("api-{i}"), "m1").await);
        direct.push(apply_to_ready(&c, &mut watch, &http, &format!("direct-{i}"), "m2").await);
    }
    api.sort();
    direct.sort();
    let (a50, d50) = (percentile(&api, 0.5), percentile(&direct, 0.5));
    let (a95, d95) = (percentile(&api, 0.95), percentile(&direct, 0.95));
    let ratio = (a50.as_secs_f64() / d50.as_secs_f64() * 100.0).round() / 100.0;
    println!(
        "apply→Ready p50: through the API {} ms, straight to etcd (floor) {} ms ({ratio}×); p95 {} ms vs {} ms; {n} volumes each",
        ms(a50),
        ms(d50),
        ms(a95),
        ms(d95)
    );
    cobalt_e2e::record_bench_section(
        "20_least_privilege",
        json!({
            "volumes_each": n,
            "api_p50_ms": ms(a50),
            "api_p95_ms": ms(a95),
            "floor_direct_p50_ms": ms(d50),
            "floor_direct_p95_ms": ms(d95),
            "p50_ratio": ratio,
        }),
    );
}
