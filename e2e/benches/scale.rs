//! Scale (#22), four sections:
//!
//! - `15_etcd_limits`: what one volume costs etcd's database, what each status write adds to
//!   its history until compaction, how many writes per second this etcd takes, and how
//!   delivering every volume event to every watcher grows with the number of watchers (today
//!   every agent watches every volume). bench/README.md turns these into the cluster sizes at
//!   which etcd becomes the limit.
//! - `16_controller_memory`: a real `cobalt-controller`'s resident memory with 100,000 volumes
//!   in etcd (the N of the other sections, filled up to 100,000 with the same volumes) bound to
//!   1,000 registered, alive machines, once its scheduler has gone over all of them, minus the
//!   same controller's on an empty etcd measured in the same run — bytes per volume, beside the
//!   JSON bytes per volume. Target: ≤ 2 KB per volume. `COBALT_BENCH_ONLY=controller-memory`
//!   runs this section alone; `COBALT_BENCH_MEMORY_VOLUMES` sets its number of volumes.
//! - `17_fanout`: what a volume event costs the agents. W agents (W = 1, 10, 100), each on its
//!   own etcd connection running the store's real watch code (`ResourceWatch`, what an agent's
//!   reflector runs) — a simulation of the agents' watches, not whole agents — watching either
//!   their machine's view (as agents do) or every volume (as they did before views), while
//!   status writes land on volumes of their machines: bytes delivered to all agents per event.
//!   Target: independent of W with views.
//! - `18_agent_memory`: a real `cobalt-agent` (loop backend, no exporter) whose machine no
//!   volume concerns, with N volumes in etcd, minus the same agent on the empty etcd: an agent's
//!   memory follows its own volumes, not the cluster's.
//!
//! Against a real etcd (the testkit's: default quota, no auto-compaction), with Volumes shaped
//! as a running cluster keeps them: a manifest applied by `cobaltctl` (labels, the last-applied
//! annotation, finalizer), bound by the scheduler, and the status an agent writes (machine,
//! endpoint, usage, four conditions). N = 10,000 volumes; `COBALT_BENCH_QUICK=1`: 2,000 (and
//! 2,000 for section 16).

use std::time::{Duration, Instant};

use chrono::Utc;
use cobalt_api::{
    set_condition, ConditionStatus, Endpoint, Usage, Volume, VolumePhase, VolumeStatus,
};
use cobalt_e2e::{binary, record_bench_section};
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::process::Daemon;
use futures::StreamExt;
use serde_json::json;

/// Writes in flight while filling and updating.
const PARALLEL: usize = 32;

/// The machines the volumes are bound to.
const MACHINES: usize = 1000;

fn volume(i: usize) -> Volume {
    let name = format!("vol-{i:06}");
    let manifest = format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata:\n  name: {name}\n  labels: {{app: media, tier: gold}}\nspec:\n  size: 10Gi\n  compression: zstd\n  export:\n    clients:\n    - {{host: 10.0.0.0/24, access: rw}}\n"
    );
    let mut v = match cobalt_api::manifest::parse_manifests(&manifest)
        .unwrap()
        .remove(0)
    {
        cobalt_api::manifest::Manifest::Volume(v) => v,
        _ => unreachable!(),
    };
    let applied = serde_json::to_string(&v).unwrap();
    v.metadata
        .annotations
        .insert("cobalt.io/last-applied".into(), applied);
    // Bound by the scheduler, as most volumes are.
    v.metadata
        .annotations
        .insert("cobalt.io/scheduled-by".into(), "scheduler".into());
    v.metadata.finalizers = vec![cobalt_api::AGENT_FINALIZER.into()];
    v.spec.machine = Some(format!("m{:04}", i % MACHINES).into());
    v
}

fn status(v: &Volume, used: u64) -> VolumeStatus {
    let machine = v.spec.machine.clone().unwrap();
    let name = &v.metadata.name;
    let now = Utc::now();
    let mut s = VolumeStatus {
        phase: VolumePhase::Ready,
        machine: Some(machine.clone()),
        endpoint: Some(Endpoint {
            server: "10.0.3.17".into(),
            port: 2049,
            path: format!("/{name}").into(),
            mount: format!("mount -t nfs4 10.0.3.17:/{name} /mnt/{name}"),
        }),
        usage: Some(Usage {
            used_bytes: used,
            limit_bytes: 10 << 30,
            updated: Some(now),
        }),
        allocated_bytes: Some(10 << 30),
        observed_generation: 1,
        ..Default::default()
    };
    let g = 1;
    let c = &mut s.conditions;
    set_condition(
        c,
        "Scheduled",
        ConditionStatus::True,
        "Bound",
        &format!("bound to machine {machine}"),
        g,
        now,
    );
    set_condition(
        c,
        "Provisioned",
        ConditionStatus::True,
        "Created",
        &format!("10737418240 bytes on machine {machine}"),
        g,
        now,
    );
    set_condition(
        c,
        "Exported",
        ConditionStatus::True,
        "Applied",
        "10.0.0.0/24 rw",
        g,
        now,
    );
    set_condition(
        c,
        "Ready",
        ConditionStatus::True,
        "Serving",
        &format!("served by machine {machine}"),
        g,
        now,
    );
    s
}

/// One usage report (a status write) for each of the first `n` volumes, `used(i)` bytes used,
/// [`PARALLEL`] in flight.
async fn report_usage(store: &cobalt_store::Store, n: usize, used: impl Fn(usize) -> u64 + Copy) {
    futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let name = format!("vol-{i:06}");
                store
                    .update_status::<Volume, _>(&name, |v| Some(status(v, used(i))))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
}

async fn db(client: &mut etcd_client::Client) -> (i64, i64) {
    let s = client.maintenance_client().status().await.unwrap();
    (s.db_size(), s.raft_used_db_size())
}

/// Compacts all history and defragments: the database as small as its live keys allow.
async fn compacted(client: &mut etcd_client::Client, store: &cobalt_store::Store) -> i64 {
    store
        .compact(store.revision().await.unwrap())
        .await
        .unwrap();
    client.maintenance_client().defragment().await.unwrap();
    db(client).await.0
}

/// Resident KiB of `pid`.
fn rss_kib(pid: u32) -> u64 {
    cobalt_e2e::soak::proc_stats(pid).map_or(0, |(rss, _, _)| rss as u64)
}

/// One Prometheus sample's value from `text` (the first line starting with `series`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Starts a controller on `etcd` holding `volumes` volumes, waits until it has settled; returns
/// its resident KiB, then stops it.
async fn controller_rss_kib(etcd: &Etcd, volumes: usize) -> u64 {
    let port = cobalt_testkit::free_port();
    let mut d = Daemon::spawn(
        std::process::Command::new(binary("cobalt-controller"))
            .args(["--etcd-endpoints", &etcd.endpoints()[0], "--name", "scale"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}")),
        "controller",
    );
    let pid = d.pid().unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Settled: the leader has listed the volumes, reconciled each at least once, nothing is
    // queued, and the resident size moved under 1 % over the last second.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut before: Option<(Instant, u64)> = None;
    let kib = loop {
        assert!(Instant::now() < deadline, "the controller never settled");
        let now = rss_kib(pid);
        let text = match http.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let reconciled: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("cobalt_reconcile_total{") && l.contains("kind=\"volume-scheduler\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let ready = sample(&text, "cobalt_scheduler_is_leader") == Some(1.0)
            && sample(&text, "cobalt_relists_total{kind=\"Volume\"}").is_some_and(|v| v >= 1.0)
            && reconciled >= volumes as f64
            && text
                .lines()
                .filter(|l| l.starts_with("cobalt_reconcile_queue_depth"))
                .all(|l| l.ends_with(" 0"));
        match before {
            Some((at, kib)) if at.elapsed() >= Duration::from_secs(1) => {
                if ready && now.abs_diff(kib) * 100 <= kib {
                    break now;
                }
                before = Some((Instant::now(), now));
            }
            Some(_) => {}
            None => before = Some((Instant::now(), now)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    d.terminate(Duration::from_secs(10));
    kib
}

/// Starts an agent named `machine` (loop backend in a temporary directory, no exporter) on
/// `etcd`, waits until it is ready and its resident size has settled; returns its resident KiB,
/// then stops it.
async fn agent_rss_kib(etcd: &Etcd, machine: &str) -> u64 {
    let dir = cobalt_testkit::loopdir::LoopDir::new();
    std::fs::create_dir_all(dir.pool()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let port = cobalt_testkit::free_port();
    let mut d = Daemon::spawn(
        std::process::Command::new(binary("cobalt-agent"))
            .args([
                "--etcd-endpoints",
                &etcd.endpoints()[0],
                "--machine",
                machine,
            ])
            .args(["--address", "127.0.0.1", "--exporter", "none"])
            .args(["--backend", "loop"])
            .arg("--pool")
            .arg(dir.pool())
            .arg("--state-dir")
            .arg(state.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}")),
        "agent",
    );
    let pid = d.pid().unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut before: Option<(Instant, u64)> = None;
    let kib = loop {
        assert!(
            Instant::now() < deadline,
            "the agent never settled: {}",
            d.log()
        );
        let now = rss_kib(pid);
        let ready = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
        match before {
            Some((at, kib)) if at.elapsed() >= Duration::from_secs(1) => {
                if ready && now.abs_diff(kib) * 100 <= kib {
                    break now;
                }
                before = Some((Instant::now(), now));
            }
            Some(_) => {}
            None => before = Some((Instant::now(), now)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    d.terminate(Duration::from_secs(10));
    kib
}

/// `agents` watchers, each on its own connection, watching machine `m<k>`'s view of the volumes
/// (`views`) or every volume, while `events` status writes land on volumes of their machines
/// (`n` volumes over 1,000 machines, as [`volume`] binds them). Returns the bytes delivered to
/// all of them per event, the events they received, and the seconds until the last had all of
/// its events.
async fn agents_fanout(
    etcd: &Etcd,
    store: &cobalt_store::Store,
    n: usize,
    agents: usize,
    views: bool,
    events: usize,
) -> serde_json::Value {
    use cobalt_store::{Scope, WatchEvent};
    let per_machine = n / MACHINES;
    let volume_of = |j: usize| (j % agents) + MACHINES * ((j / agents) % per_machine);
    let mut watches = Vec::new();
    for k in 0..agents {
        let agent = cobalt_store::Store::connect(&cobalt_store::EtcdConfig::new(etcd.endpoints()))
            .await
            .unwrap();
        let scope = if views {
            Scope::View(format!("m{k:04}"))
        } else {
            Scope::All
        };
        let (items, revision) = agent.list_in::<Volume>(&scope).await.unwrap();
        let expected = if views {
            (0..events).filter(|j| j % agents == k).count()
        } else {
            events
        };
        let watch = agent.watch_after_list_in::<Volume, Volume>(&scope, &items, revision);
        watches.push((agent, watch, expected));
    }
    let t = Instant::now();
    let receivers: Vec<_> = watches
        .into_iter()
        .map(|(agent, mut watch, expected)| {
            tokio::spawn(async move {
                let mut got = 0usize;
                while got < expected {
                    let e = tokio::time::timeout(Duration::from_secs(60), watch.next())
                        .await
                        .expect("events arrive within a minute")
                        .unwrap();
                    if !matches!(e, WatchEvent::Progress { .. }) {
                        got += 1;
                    }
                }
                drop(agent);
                (got, watch.bytes_received(), t.elapsed().as_secs_f64())
            })
        })
        .collect();
    futures::stream::iter(0..events)
        .map(|j| {
            let store = store.clone();
            async move {
                let name = format!("vol-{:06}", volume_of(j));
                // etcd busy delivering to 100 watchers of everything can pass a request's
                // deadline: retried, a bounded number of times.
                for attempt in 1.. {
                    match store
                        .update_status::<Volume, _>(&name, |v| {
                            Some(status(v, (2 << 20) + j as u64))
                        })
                        .await
                    {
                        Ok(_) => break,
                        Err(cobalt_store::Error::Unavailable { .. }) if attempt < 10 => {}
                        Err(e) => panic!("status write of {name}: {e}"),
                    }
                }
            }
        })
        // No more in flight than there are volumes written (each write is a status CAS).
        .buffer_unordered(PARALLEL.min(agents * per_machine))
        .collect::<Vec<()>>()
        .await;
    let (mut delivered, mut bytes, mut secs) = (0usize, 0u64, 0f64);
    for r in receivers {
        let (got, b, done) = r.await.unwrap();
        delivered += got;
        bytes += b;
        secs = secs.max(done);
    }
    json!({
        "agents": agents,
        "watching": if views { "own machine's view" } else { "every volume" },
        "events": events,
        "events_delivered": delivered,
        "bytes_delivered_per_event": bytes / events as u64,
        "seconds": (secs * 1000.0).round() / 1000.0,
    })
}

/// Keys and values of every volume in etcd, read a page at a time (one response of them all
/// would pass gRPC's message size limit).
async fn stored_bytes(client: &mut etcd_client::Client) -> usize {
    let mut kv = client.kv_client();
    let mut start = b"/cobalt/volumes/".to_vec();
    let end = b"/cobalt/volumes0".to_vec();
    let mut total = 0;
    loop {
        let r = kv
            .get(
                start.clone(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(500),
                ),
            )
            .await
            .unwrap();
        total += r
            .kvs()
            .iter()
            .map(|kv| kv.key().len() + kv.value().len())
            .sum::<usize>();
        match r.kvs().last() {
            Some(last) if r.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return total,
        }
    }
}

fn mib(b: i64) -> f64 {
    (b as f64 / (1 << 20) as f64 * 100.0).round() / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::var("COBALT_BENCH_QUICK").is_ok();
    let n: usize = if quick { 2_000 } else { 10_000 };
    // The memory target is set at 100,000 volumes.
    let memory_n: usize = std::env::var("COBALT_BENCH_MEMORY_VOLUMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { n } else { 100_000 })
        .max(n);
    let only_controller_memory =
        std::env::var("COBALT_BENCH_ONLY").is_ok_and(|v| v == "controller-memory");
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let (_, quota) = {
        let s = client.maintenance_client().status().await.unwrap();
        (s.db_size(), s.db_size_quota())
    };
    let empty = compacted(&mut client, &store).await;
    let controller_empty_kib = controller_rss_kib(&etcd, 0).await;

    if only_controller_memory {
        fill(&store, 0..memory_n).await;
        controller_memory(&etcd, memory_n, controller_empty_kib, None).await;
        return;
    }

    let agent_empty_kib = agent_rss_kib(&etcd, "idle").await;

    // 1. The database per volume (object + status), beside the JSON it holds.
    fill(&store, 0..n).await;
    let json_bytes = stored_bytes(&mut client).await;
    let live = compacted(&mut client, &store).await;
    let per_volume = (live - empty) as f64 / n as f64;

    // 2. History: one status write per volume (a usage report), then the database before and
    //    after compaction; and the rate this etcd takes such writes.
    let before = db(&mut client).await.1;
    let t = Instant::now();
    report_usage(&store, n, |i| 4096 * (i as u64 + 1)).await;
    let update_secs = t.elapsed().as_secs_f64();
    let after = db(&mut client).await.1;
    let per_write = (after - before) as f64 / n as f64;
    let after_compaction = compacted(&mut client, &store).await;

    // 3. Fan-out: W watchers of every volume (as every agent is today), each receiving each
    //    of E status writes; the time until the last watcher has the last event.
    let events = 500usize;
    let mut fanout = Vec::new();
    for watchers in [1usize, 10, 100] {
        let mut streams = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..watchers {
            // One connection per watcher, as separate agents have.
            let mut c = etcd_client::Client::connect(etcd.endpoints(), None)
                .await
                .unwrap();
            let s = c
                .watch(
                    "/cobalt/volumes/",
                    Some(etcd_client::WatchOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            clients.push(c);
            streams.push(s);
        }
        let t = Instant::now();
        let receivers: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let (mut got, mut bytes) = (0usize, 0usize);
                    while got < events {
                        let r = tokio::time::timeout(Duration::from_secs(60), s.message())
                            .await
                            .expect("events arrive within a minute")
                            .unwrap()
                            .unwrap();
                        for e in r.events() {
                            got += 1;
                            bytes += e.kv().map_or(0, |kv| kv.key().len() + kv.value().len());
                        }
                    }
                    bytes
                })
            })
            .collect();
        report_usage(&store, events, |i| 1 << 20 | i as u64).await;
        let mut delivered = 0usize;
        for r in receivers {
            delivered += r.await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        fanout.push(json!({
            "watchers": watchers,
            "events": events,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "bytes_delivered_per_event": delivered / events,
            "events_delivered_per_second": ((events * watchers) as f64 / secs).round(),
        }));
        drop(clients);
    }

    let section = json!({
        "volumes": n,
        // etcd reports 0 for its default quota, 2 GiB.
        "quota_mib": if quota == 0 { 2048.0 } else { mib(quota) },
        "db_empty_mib": mib(empty),
        "db_live_mib": mib(live),
        "db_bytes_per_volume": per_volume.round(),
        "json_bytes_per_volume": (json_bytes as f64 / n as f64).round(),
        "history_bytes_per_status_write": per_write.round(),
        "db_after_compaction_mib": mib(after_compaction),
        "status_writes_per_second": (n as f64 / update_secs).round(),
        "status_writes_parallel": PARALLEL,
        "fanout": fanout,
    });
    println!("{}", serde_json::to_string_pretty(&section).unwrap());
    record_bench_section("15_etcd_limits", section);

    // 17. What a volume event costs the agents: their views against every volume.
    let mut rows = Vec::new();
    for agents in [1usize, 10, 100] {
        for views in [true, false] {
            rows.push(agents_fanout(&etcd, &store, n, agents, views, 500).await);
        }
    }
    let per_event = |agents: usize, views: bool| {
        rows.iter()
            .find(|r| r["agents"] == agents && (r["watching"] == "own machine's view") == views)
            .map_or(0, |r| r["bytes_delivered_per_event"].as_u64().unwrap_or(0))
    };
    let fanout_section = json!({
        "volumes": n,
        "machines": MACHINES,
        "simulation": "agents are watches (the store's ResourceWatch, one etcd connection each), not whole agents",
        "runs": rows,
        "views_100_vs_1_agents": (per_event(100, true) as f64 / per_event(1, true).max(1) as f64 * 100.0).round() / 100.0,
        "every_volume_100_vs_1_agents": (per_event(100, false) as f64 / per_event(1, false).max(1) as f64 * 100.0).round() / 100.0,
    });
    println!("{}", serde_json::to_string_pretty(&fanout_section).unwrap());
    record_bench_section("17_fanout", fanout_section);

    // 18. An agent no volume concerns, with every volume in etcd.
    let agent_kib = agent_rss_kib(&etcd, "idle").await;
    let agent = json!({
        "volumes": n,
        "volumes_concerning_the_agent": 0,
        "agent_rss_mib": (agent_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "floor_empty_etcd_agent_rss_mib": (agent_empty_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "bytes_per_cluster_volume": ((agent_kib.saturating_sub(agent_empty_kib) * 1024) as f64 / n as f64).round(),
    });
    println!("{}", serde_json::to_string_pretty(&agent).unwrap());
    record_bench_section("18_agent_memory", agent);

    // 16. The controller, at the scale of the target: the same volumes, up to `memory_n`.
    fill(&store, n..memory_n).await;
    controller_memory(
        &etcd,
        memory_n,
        controller_empty_kib,
        Some(json_bytes as f64 / n as f64),
    )
    .await;
}

/// Creates volumes `range` ([`volume`]) with an agent's status ([`status`]), [`PARALLEL`] in
/// flight.
async fn fill(store: &cobalt_store::Store, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .map(|i| {
            let store = store.clone();
            async move {
                let v = store.create(&volume(i)).await.unwrap();
                let s = status(&v, 0);
                store
                    .update_status::<Volume, _>(&v.metadata.name, |_| Some(s.clone()))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
}

/// Section 16: a controller's resident memory with the `n` volumes in etcd, beside the same
/// controller's on the empty etcd; records it.
async fn controller_memory(etcd: &Etcd, n: usize, empty_kib: u64, json_per_volume: Option<f64>) {
    let json_per_volume = match json_per_volume {
        Some(b) => b,
        None => {
            let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
                .await
                .unwrap();
            stored_bytes(&mut client).await as f64 / n as f64
        }
    };
    // The controller of a healthy cluster: every volume's machine registered and alive, so it
    // holds the volumes as they are and writes none of them (their status is what it would
    // write: bound, granted). `etcd_revisions_while_measured` shows it.
    let store = etcd.store().await;
    let _alive =
        cobalt_e2e::register_bench_machines(&store, MACHINES, 100 << 40, |_| Default::default())
            .await;
    // A first controller brings the machines' status in line (their phase, events); the one
    // measured then finds nothing to write, as one restarted in a healthy cluster.
    controller_rss_kib(etcd, n).await;
    let before = store.revision().await.unwrap();
    let controller_kib = controller_rss_kib(etcd, n).await;
    let written = store.revision().await.unwrap() - before;
    let per_volume = (controller_kib.saturating_sub(empty_kib) * 1024) as f64 / n as f64;
    let memory = json!({
        "volumes": n,
        "controller_rss_mib": (controller_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "floor_empty_controller_rss_mib": (empty_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "bytes_per_volume": per_volume.round(),
        "json_bytes_per_volume": json_per_volume.round(),
        "target_bytes_per_volume": 2048,
        "machines": MACHINES,
        "etcd_revisions_while_measured": written,
    });
    println!("{}", serde_json::to_string_pretty(&memory).unwrap());
    record_bench_section("16_controller_memory", memory);
}
