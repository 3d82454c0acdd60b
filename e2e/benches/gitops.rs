//! GitOps at scale (bench section `13_gitops`): a repository of one-volume manifest files applied
//! with the real `cobaltctl` against a real controller and etcd, each step beside a floor
//! measured in the same run against the same API:
//!
//! - creating N volumes with `cobaltctl apply -f DIR` vs N POSTs sent straight to the API with
//!   the same number in flight (16, cobaltctl's default `--parallel`);
//! - changing every one of them (`apply` → configured) vs N PUTs at the same parallelism;
//! - re-applying the repository unchanged, `diff` of it, and an unchanged `apply --prune -l`
//!   (each the median of five) vs one list of every volume (the least any client can read to
//!   know the state; the median of five), with the etcd revision checked unchanged (zero
//!   writes).
//!
//! Targets (#22): creates and changes ≤ 1.5× the raw API at the same parallelism; unchanged
//! re-apply, diff and prune ≤ 1.5× one list. The scheduler runs (no machines: it marks each
//! volume Unschedulable); each step waits until it has written every status, so steps do not
//! overlap its work (and the etcd writes counted are cobaltctl's alone). N = 10,000; `COBALT_BENCH_QUICK=1`: 1,000. Release binaries expected.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cobalt_e2e::{binary, record_bench_section};
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use futures::StreamExt;
use serde_json::{json, Value};

/// Requests in flight for the floors: cobaltctl's default `--parallel`.
const PARALLEL: usize = 16;
/// Runs of the list and of each unchanged step; each is reported as the median.
const RUNS: usize = 5;

fn manifest(name: &str, size: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata:\n  name: {name}\n  labels: {{set: gitops}}\nspec:\n  size: {size}\n  export:\n    clients:\n    - {{host: 10.0.0.0/24, access: rw}}\n"
    )
}

fn write_repo(dir: &Path, n: usize, size: &str) {
    for i in 0..n {
        let name = format!("git-{i:05}");
        std::fs::write(dir.join(format!("{name}.yaml")), manifest(&name, size)).unwrap();
    }
}

/// Runs cobaltctl to completion; returns (seconds, stdout). Panics with its output on failure
/// (except `diff`'s exit 1, which the caller checks).
fn ctl(server: &str, args: &[&str]) -> (f64, String, i32) {
    let t = Instant::now();
    let o = Command::new(binary("cobaltctl"))
        .env("COBALT_SERVER", server)
        .env("COBALT_CONFIG", "/nonexistent")
        .args(args)
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code == 0 || (args[0] == "diff" && code == 1),
        "cobaltctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (secs, String::from_utf8_lossy(&o.stdout).to_string(), code)
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Waits until the scheduler has answered the latest generation of `n` volumes (its Scheduled
/// condition observed it), so the next step does not share the machine with its work and the
/// etcd writes counted in a step are the step's own.
async fn scheduled(store: &cobalt_store::Store, n: usize) {
    cobalt_testkit::wait::until(
        &format!("the scheduler's answer to {n} volumes"),
        Duration::from_secs(600),
        || async {
            let (volumes, _) = store
                .list::<cobalt_api::Volume>(&Default::default())
                .await
                .ok()?;
            let answered = volumes
                .iter()
                .filter(|v| {
                    v.status.as_ref().is_some_and(|s| {
                        s.conditions.iter().any(|c| {
                            c.type_ == "Scheduled" && c.observed_generation == v.metadata.generation
                        })
                    })
                })
                .count();
            (answered >= n).then_some(())
        },
    )
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = if std::env::var("COBALT_BENCH_QUICK").is_ok() {
        1_000
    } else {
        10_000
    };
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let port = free_port();
    let mut controller = Daemon::spawn(
        Command::new(binary("cobalt-controller"))
            .args(["--etcd-endpoints", &etcd.endpoints()[0], "--name", "bench"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}")),
        "controller",
    );
    let server = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    cobalt_testkit::wait::until("the API up", Duration::from_secs(30), || {
        let (http, server) = (http.clone(), server.clone());
        async move {
            http.get(format!("{server}/healthz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await;
    let volumes = format!("{server}/apis/cobalt.io/v1alpha1/volumes");

    // Floor 1: N POSTs straight to the API, PARALLEL in flight.
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (http, volumes) = (http.clone(), volumes.clone());
            async move {
                let name = format!("raw-{i:05}");
                let r = http
                    .post(&volumes)
                    .header("content-type", "application/yaml")
                    .body(manifest(&name, "1Gi"))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "POST {name}: {}", r.status());
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
    let raw_create = t.elapsed().as_secs_f64();
    scheduled(&store, n).await;

    // cobaltctl apply -f DIR of N new files.
    let repo = tempfile::tempdir().unwrap();
    write_repo(repo.path(), n, "1Gi");
    let dir = repo.path().display().to_string();
    let (apply_create, out, _) = ctl(&server, &["apply", "-f", &dir]);
    assert_eq!(out.matches(" created").count(), n);
    scheduled(&store, 2 * n).await;

    // Floor 2: N PUTs (a changed size) straight to the API, from one list, PARALLEL in flight.
    let list: Value = http
        .get(&volumes)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let raw_items: Vec<Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["metadata"]["name"].as_str().unwrap().starts_with("raw-"))
        .cloned()
        .collect();
    let t = Instant::now();
    futures::stream::iter(raw_items)
        .map(|mut v| {
            let (http, volumes) = (http.clone(), volumes.clone());
            async move {
                v["spec"]["size"] = json!("2Gi");
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                let r = http
                    .put(format!("{volumes}/{name}"))
                    .json(&v)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "PUT {name}: {}", r.status());
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
    let raw_change = t.elapsed().as_secs_f64();

    write_repo(repo.path(), n, "2Gi");
    let (apply_change, out, _) = ctl(&server, &["apply", "-f", &dir]);
    assert_eq!(out.matches(" configured").count(), n);
    scheduled(&store, 2 * n).await;

    // Floor 3: one list of every volume (2N of them), the median of five (like each unchanged
    // step: one run alone moved by ±40% on this machine).
    let mut lists = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let body = http
            .get(&volumes)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        lists.push(t.elapsed().as_secs_f64());
        assert!(body.len() > n * 100);
    }
    lists.sort_by(f64::total_cmp);
    let one_list = lists[RUNS / 2];

    // Each unchanged step RUNS times in turn, the median of each.
    let revision = store.revision().await.unwrap();
    let (mut reapplies, mut diffs, mut prunes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (reapply, out, _) = ctl(&server, &["apply", "-f", &dir]);
        assert_eq!(out.matches(" unchanged").count(), n);
        reapplies.push(reapply);
        let (diff, _, code) = ctl(&server, &["diff", "-f", &dir]);
        assert_eq!(code, 0, "diff of an applied repository is empty");
        diffs.push(diff);
        let (prune, out, _) = ctl(
            &server,
            &["apply", "-f", &dir, "--prune", "-l", "set=gitops"],
        );
        assert_eq!(out.matches(" pruned").count(), 0);
        prunes.push(prune);
    }
    let writes = store.revision().await.unwrap() - revision;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (reapply, diff, prune) = (median(reapplies), median(diffs), median(prunes));

    let ratio = |a: f64, b: f64| (a / b * 100.0).round() / 100.0;
    let section = json!({
        "manifests": n,
        "parallel": PARALLEL,
        "create": {"apply_s": round(apply_create), "raw_api_s": round(raw_create),
                   "ratio": ratio(apply_create, raw_create), "target_ratio": 1.5},
        "change": {"apply_s": round(apply_change), "raw_api_s": round(raw_change),
                   "ratio": ratio(apply_change, raw_change), "target_ratio": 1.5},
        "unchanged": {"one_list_s": round(one_list), "listed_volumes": 2 * n,
                      "reapply_s": round(reapply), "reapply_ratio": ratio(reapply, one_list),
                      "diff_s": round(diff), "diff_ratio": ratio(diff, one_list),
                      "prune_s": round(prune), "prune_ratio": ratio(prune, one_list),
                      "etcd_writes": writes, "target_ratio": 1.5},
    });
    println!("{}", serde_json::to_string_pretty(&section).unwrap());
    record_bench_section("13_gitops", section);
    controller.terminate(Duration::from_secs(10));
}
