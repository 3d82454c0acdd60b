//! The system benchmark behind `make bench` (see bench/README.md): a real cluster — etcd, two
//! controllers, three machines with BTRFS pools and nfs-ganesha in their own network
//! namespaces — measured against a **floor done directly, without Cobalt, in the same run**:
//!
//! 1. latency: apply→Ready of 200 volumes one after another, beside the same number of etcd
//!    writes + the raw BTRFS ioctls (subvolume create, qgroup limit) + one ganesha reload,
//!    with and without waiting for ganesha to confirm it (Cobalt waits before Ready);
//! 2. throughput: 1,000 volumes applied at once across the 3 agents, beside the same work done
//!    directly in parallel;
//! 4. etcd cost: write requests (raft proposals) and keys written per create, from etcd's own
//!    /metrics, and both per minute while the 1,000 volumes sit idle;
//! 5. memory: controller and agent peak RSS (VmHWM) with 10,000 volumes, beside the bytes those
//!    volumes take in etcd.
//!
//! Sections 3 (placement) and 6 (reconcile) come from the controller's and reconcile library's
//! benches, which `make bench` runs first; this one merges all six into `bench/results.json`
//! and prints the table. The binaries must be release builds (`make bench` builds them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cobalt_agent::backend::btrfs::raw;
use cobalt_api::{Volume, VolumePhase};
use cobalt_e2e::Cluster;
use cobalt_store::WatchEvent;
use cobalt_testkit::process::Daemon;
use futures::StreamExt;
use serde_json::{json, Value};

/// Requests in flight at once when many volumes are applied together.
const CLIENTS: usize = 32;

/// The run's sizes; `COBALT_BENCH_QUICK=1` divides them by ten (a smoke run of the harness,
/// not figures to compare).
struct Sizes {
    latency: usize,
    burst: usize,
    memory: usize,
    idle: Duration,
}

fn sizes() -> Sizes {
    let quick = std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let d = if quick { 10 } else { 1 };
    Sizes {
        latency: 200 / d,
        burst: 1_000 / d,
        memory: 10_000 / d,
        idle: Duration::from_secs(60 / d as u64),
    }
}
/// Sparse pool images: room for 10,000 reservations.
const POOL_MIB: u64 = 64 * 1024;

#[tokio::main]
async fn main() {
    let Sizes {
        latency: latency_n,
        burst: burst_n,
        memory: memory_n,
        idle: idle_window,
    } = sizes();
    let mut cluster = Cluster::start_with_pools("spread", POOL_MIB).await;
    let api = cluster.api();
    let etcd_url = cluster.etcd.endpoints()[0].clone();
    let client_addr = cluster.client.addr.to_string();
    wait_for_machines(&cluster).await;
    let ready = ReadyWatch::start(&cluster).await;
    let http = reqwest::Client::new();
    let apply = |name: String, exported: bool| {
        let (http, api, client_addr) = (http.clone(), api.clone(), client_addr.clone());
        async move { create(&http, &api, &name, exported.then_some(&client_addr[..])).await }
    };

    // Warm the path (connections, first reload) before measuring.
    for i in 0..5 {
        apply(format!("warm-{i}"), true).await;
        ready
            .wait(&format!("warm-{i}"), Duration::from_secs(60))
            .await;
    }

    // 1. Latency, with the etcd cost of each create counted around it.
    let before = EtcdCounters::read(&etcd_url).await;
    let mut latencies = Vec::new();
    // Where the time goes: the API's create, the scheduler's binding, the agent's work (each
    // including one watch hop to it).
    let (mut created, mut scheduled, mut provisioned) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..latency_n {
        let name = format!("lat-{i:03}");
        let t0 = Instant::now();
        apply(name.clone(), true).await;
        let t1 = Instant::now();
        let done = ready.wait(&name, Duration::from_secs(60)).await;
        let bound = ready.bound_at(&name).unwrap_or(done);
        latencies.push(done - t0);
        created.push(t1 - t0);
        scheduled.push(bound.saturating_duration_since(t1));
        provisioned.push(done.saturating_duration_since(bound));
    }
    for v in [&mut created, &mut scheduled, &mut provisioned] {
        v.sort();
    }
    let after = EtcdCounters::read(&etcd_url).await;
    let per_create = after.minus(&before).per(latency_n);
    let writes_per_create = per_create.proposals.round().max(1.0) as usize;
    eprintln!(
        "latency run done: {per_create:?} per create; p50 stages: api {:.2?}, scheduler {:.2?}, agent {:.2?}",
        percentile(&created, 0.5),
        percentile(&scheduled, 0.5),
        percentile(&provisioned, 0.5)
    );

    let floor = Arc::new(Floor::new(&cluster, &etcd_url).await);
    // Two floors: up to the reload signal (what the floor counted until now), and up to
    // ganesha confirming the reload (what Cobalt waits for before Ready: a client mounting
    // right after Ready must find the export).
    let (mut floor_latencies, mut floor_served) = (Vec::new(), Vec::new());
    let mut floor_parts: [Vec<Duration>; 4] = Default::default();
    for i in 0..latency_n {
        let parts = floor
            .provision(0, &format!("lat-{i:03}"), writes_per_create)
            .await;
        floor_latencies.push(parts[0] + parts[1] + parts[2]);
        floor_served.push(parts.iter().sum());
        for (all, part) in floor_parts.iter_mut().zip(parts) {
            all.push(part);
        }
    }
    for v in floor_parts.iter_mut() {
        v.sort();
    }
    latencies.sort();
    floor_latencies.sort();
    floor_served.sort();
    let latency = json!({
        "volumes": latency_n,
        "p50_ms": ms(percentile(&latencies, 0.5)),
        "p99_ms": ms(percentile(&latencies, 0.99)),
        "floor_p50_ms": ms(percentile(&floor_latencies, 0.5)),
        "floor_p99_ms": ms(percentile(&floor_latencies, 0.99)),
        "ratio_p50": ratio(percentile(&latencies, 0.5), percentile(&floor_latencies, 0.5)),
        "ratio_p99": ratio(percentile(&latencies, 0.99), percentile(&floor_latencies, 0.99)),
        "floor_served_p50_ms": ms(percentile(&floor_served, 0.5)),
        "floor_served_p99_ms": ms(percentile(&floor_served, 0.99)),
        "ratio_served_p50": ratio(percentile(&latencies, 0.5), percentile(&floor_served, 0.5)),
        "ratio_served_p99": ratio(percentile(&latencies, 0.99), percentile(&floor_served, 0.99)),
        "floor_etcd_writes": writes_per_create,
        "floor_parts_p50_ms": {
            "etcd_writes": ms(percentile(&floor_parts[0], 0.5)),
            "ioctls": ms(percentile(&floor_parts[1], 0.5)),
            "export": ms(percentile(&floor_parts[2], 0.5)),
            "ganesha_reload": ms(percentile(&floor_parts[3], 0.5)),
        },
        "stages_p50_ms": {
            "api_create": ms(percentile(&created, 0.5)),
            "scheduler_bind": ms(percentile(&scheduled, 0.5)),
            "agent_ready": ms(percentile(&provisioned, 0.5)),
        },
    });
    // COBALT_BENCH_ONLY=latency: section 1 alone, printed and recorded in results.json beside
    // the other sections (for working on the latency without the whole run).
    if std::env::var("COBALT_BENCH_ONLY").is_ok_and(|v| v == "latency") {
        println!("{}", serde_json::to_string_pretty(&latency).unwrap());
        cobalt_e2e::record_bench_section("1_latency", latency);
        keep_logs(&cluster);
        return;
    }

    // 2. Throughput: 1,000 at once, with the CPU each process spent on it.
    let processes = processes(&cluster);
    let cpu_before = cpu_seconds(&processes);
    let t0 = Instant::now();
    futures::stream::iter((0..burst_n).map(|i| apply(format!("burst-{i:04}"), true)))
        .buffer_unordered(CLIENTS)
        .collect::<Vec<_>>()
        .await;
    for i in 0..burst_n {
        ready
            .wait(&format!("burst-{i:04}"), Duration::from_secs(900))
            .await;
    }
    let burst = t0.elapsed();
    let burst_cpu: std::collections::BTreeMap<String, f64> = cpu_seconds(&processes)
        .into_iter()
        .map(|(name, after)| {
            let before = cpu_before.get(&name).copied().unwrap_or(0.0);
            (name, ((after - before) * 100.0).round() / 100.0)
        })
        .collect();
    eprintln!("burst run done in {burst:.2?}; CPU seconds: {burst_cpu:?}");
    let floor_burst = floor.burst(burst_n, writes_per_create, CLIENTS).await;

    // 4. Idle: let the creation burst settle (one filesystem commit, one status period), then
    // count every etcd write for a minute.
    for m in &cluster.machines {
        let _ = Command::new("btrfs")
            .args(["filesystem", "sync"])
            .arg(m.pool.path())
            .status();
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_before = EtcdCounters::read(&etcd_url).await;
    let idle_keys = floor.keys_written_during(idle_window).await;
    let idle = EtcdCounters::read(&etcd_url)
        .await
        .minus(&idle_before)
        .per_minute(idle_window);
    eprintln!("idle writes by key: {idle_keys:?}");
    let idle_volumes = ready.count();

    // 5. Memory: fill up to 10,000 volumes (not exported: this measures Cobalt, not ganesha).
    let existing = ready.count();
    let t0 = Instant::now();
    futures::stream::iter((existing..memory_n).map(|i| apply(format!("mem-{i:05}"), false)))
        .buffer_unordered(CLIENTS)
        .collect::<Vec<_>>()
        .await;
    for i in existing..memory_n {
        ready
            .wait(&format!("mem-{i:05}"), Duration::from_secs(1800))
            .await;
    }
    let fill = t0.elapsed();
    let controllers: Vec<u64> = cluster
        .controllers
        .iter()
        .filter_map(|(d, _)| d.pid())
        .map(peak_rss_kib)
        .collect();
    let agents: Vec<u64> = cluster
        .machines
        .iter()
        .filter_map(|m| m.agent_pid())
        .map(peak_rss_kib)
        .collect();
    let stored_bytes = stored_volume_bytes(&cluster).await;

    let system = json!({
        "latency": latency,
        "throughput": {
            "volumes": burst_n,
            "agents": cluster.machines.len(),
            "seconds": burst.as_secs_f64(),
            "volumes_per_second": burst_n as f64 / burst.as_secs_f64(),
            "floor_seconds": floor_burst.as_secs_f64(),
            "floor_volumes_per_second": burst_n as f64 / floor_burst.as_secs_f64(),
            "ratio": burst.as_secs_f64() / floor_burst.as_secs_f64(),
            "cpu_seconds": burst_cpu,
        },
        "etcd": {
            "write_requests_per_create": per_create.proposals,
            "keys_written_per_create": per_create.keys,
            "floor_write_requests_per_create": 1,
            "idle_volumes": idle_volumes,
            "idle_write_requests_per_minute": idle.proposals,
            "idle_keys_written_per_minute": idle.keys,
            "floor_idle_writes_per_minute": 0,
            "idle_keys": idle_keys,
        },
        "memory": {
            "volumes": memory_n,
            "controller_peak_rss_mib": controllers.iter().map(|k| *k as f64 / 1024.0).collect::<Vec<_>>(),
            "agent_peak_rss_mib": agents.iter().map(|k| *k as f64 / 1024.0).collect::<Vec<_>>(),
            "floor_stored_mib": stored_bytes as f64 / (1 << 20) as f64,
            "fill_seconds": fill.as_secs_f64(),
            "fill_volumes": memory_n - existing,
        },
    });
    drop(floor);
    keep_logs(&cluster);
    drop(ready);
    drop(cluster);
    report(system);
}

/// COBALT_BENCH_LOGS=dir keeps the daemons' logs (e.g. with RUST_LOG=cobalt_agent=debug).
fn keep_logs(cluster: &Cluster) {
    if let Ok(dir) = std::env::var("COBALT_BENCH_LOGS") {
        std::fs::create_dir_all(&dir).unwrap();
        for m in &cluster.machines {
            std::fs::write(
                Path::new(&dir).join(format!("agent-{}.log", m.name)),
                m.agent_log(),
            )
            .unwrap();
        }
        for (i, (d, _)) in cluster.controllers.iter().enumerate() {
            std::fs::write(Path::new(&dir).join(format!("controller-{i}.log")), d.log()).unwrap();
        }
    }
}

async fn wait_for_machines(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (machines, _) = cluster
            .store
            .list::<cobalt_api::Machine>(&Default::default())
            .await
            .unwrap_or_default();
        let ready = machines
            .iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.capacity.total_bytes > 0)
            })
            .count();
        let alive = cluster.store.alive_machines().await.unwrap_or_default();
        if ready == 3 && alive.len() == 3 {
            return;
        }
        assert!(Instant::now() < deadline, "machines did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs one Volume of 1Mi through the API, exported read-write to `client` if given.
async fn create(http: &reqwest::Client, api: &str, name: &str, client: Option<&str>) {
    let mut spec = json!({"size": "1Mi"});
    if let Some(host) = client {
        spec["export"] = json!({"clients": [{"host": host, "access": "rw"}]});
    }
    let body = json!({
        "apiVersion": "cobalt.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": name}, "spec": spec,
    });
    for attempt in 0..5 {
        match http
            .post(format!("{api}/apis/cobalt.io/v1alpha1/volumes"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => panic!(
                "creating {name}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) if attempt < 4 => eprintln!("creating {name}: {e}; retrying"),
            Err(e) => panic!("creating {name}: {e}"),
        }
    }
}

/// When each volume was first seen bound and Ready, from one etcd watch (what `cobaltctl
/// wait` sees).
struct ReadyWatch {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    bound: Arc<Mutex<HashMap<String, Instant>>>,
    changed: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    async fn start(cluster: &Cluster) -> ReadyWatch {
        let store = cluster.store.clone();
        let revision = store.revision().await.unwrap();
        let mut watch = store.watch::<Volume>(revision).await.unwrap();
        let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let bound: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let changed = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn({
            let (seen, bound, changed) = (seen.clone(), bound.clone(), changed.clone());
            async move {
                loop {
                    let Ok(event) = watch.next().await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let now = Instant::now();
                    if let WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } =
                        event
                    {
                        if object.spec.machine.is_some() {
                            bound
                                .lock()
                                .unwrap()
                                .entry(object.metadata.name.to_string())
                                .or_insert(now);
                        }
                        if object
                            .status
                            .as_ref()
                            .is_some_and(|s| s.phase == VolumePhase::Ready)
                        {
                            seen.lock()
                                .unwrap()
                                .entry(object.metadata.name.to_string())
                                .or_insert(now);
                            changed.notify_waiters();
                        }
                    }
                }
            }
        });
        ReadyWatch {
            seen,
            bound,
            changed,
            task,
        }
    }

    /// The instant `name` became Ready, waiting for it up to `deadline`.
    async fn wait(&self, name: &str, deadline: Duration) -> Instant {
        let until = Instant::now() + deadline;
        loop {
            let notified = self.changed.notified();
            if let Some(t) = self.seen.lock().unwrap().get(name) {
                return *t;
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{name} did not become Ready within {deadline:?}"
            );
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), notified).await;
        }
    }

    fn bound_at(&self, name: &str) -> Option<Instant> {
        self.bound.lock().unwrap().get(name).copied()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// etcd's own counters: write requests (raft proposals applied: each is a log entry, fsynced)
/// and keys written (puts + deletes, several per transaction).
#[derive(Clone, Copy, Debug, Default)]
struct EtcdCounters {
    proposals: f64,
    keys: f64,
}

impl EtcdCounters {
    async fn read(etcd: &str) -> EtcdCounters {
        let text = reqwest::get(format!("{etcd}/metrics"))
            .await
            .and_then(|r| r.error_for_status())
            .expect("etcd /metrics")
            .text()
            .await
            .unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or_else(|| panic!("etcd /metrics has no {name}"))
        };
        EtcdCounters {
            proposals: value("etcd_server_proposals_applied_total"),
            keys: value("etcd_mvcc_put_total") + value("etcd_mvcc_delete_total"),
        }
    }

    fn minus(&self, earlier: &EtcdCounters) -> EtcdCounters {
        EtcdCounters {
            proposals: self.proposals - earlier.proposals,
            keys: self.keys - earlier.keys,
        }
    }

    fn per(&self, n: usize) -> EtcdCounters {
        EtcdCounters {
            proposals: self.proposals / n as f64,
            keys: self.keys / n as f64,
        }
    }

    fn per_minute(&self, window: Duration) -> EtcdCounters {
        let f = 60.0 / window.as_secs_f64();
        EtcdCounters {
            proposals: self.proposals * f,
            keys: self.keys * f,
        }
    }
}

/// The same work done directly: etcd puts, the raw ioctls on the machines' pools (in a
/// `floor/` directory beside Cobalt's volumes) and reloads of a ganesha of its own.
struct Floor {
    etcd: etcd_client::Client,
    pools: Vec<PathBuf>,
    value: Vec<u8>,
    ganesha: Mutex<Option<Daemon>>,
    dir: tempfile::TempDir,
    port: u16,
    exports: Mutex<Vec<PathBuf>>,
    mounts: Mutex<Vec<PathBuf>>,
}

impl Floor {
    async fn new(cluster: &Cluster, etcd_url: &str) -> Floor {
        let etcd = etcd_client::Client::connect([etcd_url], None)
            .await
            .unwrap();
        let pools: Vec<PathBuf> = cluster
            .machines
            .iter()
            .map(|m| {
                let dir = m.pool.path().join("floor");
                std::fs::create_dir_all(&dir).unwrap();
                dir
            })
            .collect();
        // A value the size of a stored Volume.
        let sample: Vec<Volume> = cluster
            .store
            .list::<Volume>(&Default::default())
            .await
            .unwrap()
            .0;
        let value = serde_json::to_vec(&sample[0]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let port = cobalt_testkit::free_port();
        std::fs::create_dir_all(dir.path().join("exports")).unwrap();
        std::fs::create_dir_all(dir.path().join("recovery")).unwrap();
        let floor = Floor {
            etcd,
            pools,
            value,
            ganesha: Mutex::new(None),
            dir,
            port,
            exports: Mutex::new(Vec::new()),
            mounts: Mutex::new(Vec::new()),
        };
        floor.write_main();
        let d = Daemon::spawn(
            Command::new("ganesha.nfsd")
                .arg("-F")
                .arg("-f")
                .arg(floor.dir.path().join("ganesha.conf"))
                .arg("-p")
                .arg(floor.dir.path().join("ganesha.pid"))
                .arg("-L")
                .arg(floor.dir.path().join("ganesha.log"))
                .args(["-N", "NIV_EVENT"]),
            "floor-ganesha",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the floor's ganesha did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *floor.ganesha.lock().unwrap() = Some(d);
        floor
    }

    fn write_main(&self) {
        let mut conf = format!(
            "NFS_CORE_PARAM {{ NFS_Port = {}; Protocols = 4; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }}\nNFSV4 {{ Graceless = true; RecoveryRoot = \"{}\"; }}\nNFS_KRB5 {{ Active_krb5 = false; }}\n",
            self.port,
            self.dir.path().join("recovery").display()
        );
        for e in self.exports.lock().unwrap().iter() {
            conf.push_str(&format!("%include \"{}\"\n", e.display()));
        }
        std::fs::write(self.dir.path().join("ganesha.conf"), conf).unwrap();
    }

    /// Writes one export file (no reload).
    /// Bind-mounts the subvolume (ganesha cannot export a subvolume under its parent; see the
    /// ganesha exporter) and writes its export file (no reload).
    fn add_export(&self, pool: usize, name: &str) {
        let mp = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&mp).unwrap();
        nix::mount::mount(
            Some(&self.pools[pool].join(name)),
            &mp,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        self.mounts.lock().unwrap().push(mp.clone());
        let id = 10_000 + self.exports.lock().unwrap().len();
        let file = self.dir.path().join("exports").join(format!("{name}.conf"));
        std::fs::write(
            &file,
            format!(
                "EXPORT {{ Export_Id = {id}; Path = \"{}\"; Pseudo = \"/{name}\"; Protocols = 4; Access_Type = None; FSAL {{ Name = VFS; }} CLIENT {{ Clients = 10.0.0.1; Access_Type = RW; }} }}\n",
                mp.display()
            ),
        )
        .unwrap();
        self.exports.lock().unwrap().push(file);
    }

    fn reload(&self) {
        self.write_main();
        if let Some(pid) = self.ganesha.lock().unwrap().as_ref().and_then(Daemon::pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(self.dir.path().join("ganesha.log")).map_or(0, |m| m.len())
    }

    /// Waits until ganesha logs the end of a reload after byte `from` of its log: when a client
    /// mounting now finds the export (what Cobalt's Ready promises). Polls every 200 µs, so
    /// the wait adds next to nothing to what ganesha takes.
    fn wait_served(&self, from: u64) {
        use std::io::{Read, Seek, SeekFrom};
        let log = self.dir.path().join("ganesha.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            if let Ok(mut f) = std::fs::File::open(&log) {
                if f.seek(SeekFrom::Start(from + seen.len() as u64)).is_ok() {
                    let _ = f.read_to_end(&mut seen);
                }
            }
            if String::from_utf8_lossy(&seen).contains("Reread exports complete") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the floor's ganesha did not confirm a reload"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Watches every key for `window` and counts the writes per key (to say where idle writes
    /// come from).
    async fn keys_written_during(
        &self,
        window: Duration,
    ) -> std::collections::BTreeMap<String, u64> {
        let mut client = self.etcd.watch_client();
        let mut stream = client
            .watch("/", Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let mut counts = std::collections::BTreeMap::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Ok(Some(resp))) = tokio::time::timeout_at(deadline, stream.message()).await {
            for e in resp.events() {
                if let Some(kv) = e.kv() {
                    *counts
                        .entry(String::from_utf8_lossy(kv.key()).into_owned())
                        .or_insert(0) += 1;
                }
            }
        }
        counts
    }

    async fn put(&self, key: String) {
        let mut kv = self.etcd.kv_client();
        kv.put(key, self.value.clone(), None).await.unwrap();
    }

    fn ioctls(&self, pool: usize, name: &str) {
        raw::create_subvolume(&self.pools[pool], name).unwrap();
        raw::limit_referenced(&self.pools[pool].join(name), 1 << 20).unwrap();
    }

    /// One volume's worth of work, one step after another. Returns how long the etcd writes,
    /// the ioctls and the export (up to the signal) took, and then ganesha's reload until it
    /// says it is done.
    async fn provision(&self, pool: usize, name: &str, writes: usize) -> [Duration; 4] {
        let t0 = Instant::now();
        for w in 0..writes {
            self.put(format!("/cobalt-bench-floor/{name}/{w}")).await;
        }
        let t1 = Instant::now();
        self.ioctls(pool, name);
        let t2 = Instant::now();
        self.add_export(pool, name);
        let from = self.log_len();
        self.reload();
        let t3 = Instant::now();
        self.wait_served(from);
        [t1 - t0, t2 - t1, t3 - t2, t3.elapsed()]
    }

    /// `n` volumes' worth of work at once: the etcd writes with `clients` in flight, meanwhile
    /// the ioctls on one thread per pool, then one reload per pool.
    async fn burst(self: &Arc<Self>, n: usize, writes: usize, clients: usize) -> Duration {
        let t0 = Instant::now();
        let puts = futures::stream::iter(
            (0..n * writes).map(|i| self.put(format!("/cobalt-bench-floor/burst/{i}"))),
        )
        .buffer_unordered(clients)
        .collect::<Vec<_>>();
        let this = self.clone();
        let ioctls = tokio::task::spawn_blocking(move || {
            let pools = this.pools.len();
            std::thread::scope(|s| {
                for pool in 0..pools {
                    let this = &this;
                    s.spawn(move || {
                        for i in (pool..n).step_by(pools) {
                            this.ioctls(pool, &format!("burst-{i:04}"));
                        }
                    });
                }
            });
            for pool in 0..pools {
                for i in (pool..n).step_by(pools) {
                    this.add_export(pool, &format!("burst-{i:04}"));
                }
                this.reload();
            }
        });
        let (_, done) = tokio::join!(puts, ioctls);
        done.unwrap();
        t0.elapsed()
    }

    fn stop(&self) {
        if let Some(mut d) = self.ganesha.lock().unwrap().take() {
            d.terminate(Duration::from_secs(5));
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop();
        // Before the pools go: a bind mount would keep a pool busy.
        for mp in self.mounts.lock().unwrap().drain(..) {
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The cluster's processes by role (and this benchmark itself).
fn processes(cluster: &Cluster) -> Vec<(String, u32)> {
    let mut out = vec![("bench".to_string(), std::process::id())];
    out.extend(cluster.etcd.pid().map(|p| ("etcd".to_string(), p)));
    for (i, (d, _)) in cluster.controllers.iter().enumerate() {
        out.extend(d.pid().map(|p| (format!("controller-{i}"), p)));
    }
    for m in &cluster.machines {
        out.extend(m.agent_pid().map(|p| (format!("agent-{}", m.name), p)));
        out.extend(m.ganesha_pid().map(|p| (format!("ganesha-{}", m.name), p)));
    }
    out
}

/// User + system CPU seconds each process has used (from /proc/<pid>/stat).
fn cpu_seconds(processes: &[(String, u32)]) -> HashMap<String, f64> {
    // /proc reports CPU time in USER_HZ, which Linux fixes at 100 for user space.
    let tick = 100.0;
    processes
        .iter()
        .filter_map(|(name, pid)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((name.clone(), ticks / tick))
        })
        .collect()
}

/// VmHWM of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes the volumes take in etcd (objects and statuses): the data any process holding them
/// all must at least represent.
async fn stored_volume_bytes(cluster: &Cluster) -> u64 {
    let (volumes, _) = cluster
        .store
        .list::<Volume>(&Default::default())
        .await
        .unwrap();
    volumes
        .iter()
        .map(|v| serde_json::to_vec(v).map(|b| b.len() as u64).unwrap_or(0))
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Merges the six sections into bench/results.json and prints them with their floors.
fn report(system: Value) {
    let root = bench_dir();
    let placement = read_json(&root.join("target/bench/placement.json"));
    let reconcile = read_json(&root.join("target/bench/reconcile.json"));
    let results = json!({
        "1_latency": system["latency"],
        "2_throughput": system["throughput"],
        "3_placement": placement,
        "4_etcd": system["etcd"],
        "5_memory": system["memory"],
        "6_reconcile": reconcile,
    });
    std::fs::create_dir_all(root.join("bench")).unwrap();
    std::fs::write(
        root.join("bench/results.json"),
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .unwrap();
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "—".into())
    };
    let (l, t, p, e, m, r) = (
        &results["1_latency"],
        &results["2_throughput"],
        &results["3_placement"],
        &results["4_etcd"],
        &results["5_memory"],
        &results["6_reconcile"],
    );
    let max = |v: &Value| {
        v.as_array()
            .and_then(|a| a.iter().filter_map(Value::as_f64).reduce(f64::max))
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "—".into())
    };
    let none = String::new;
    let rows: Vec<(&str, String, String, String, &str)> = vec![
        (
            "1. apply→Ready p50 (ms), 200 one by one",
            f(&l["p50_ms"]),
            f(&l["floor_served_p50_ms"]),
            f(&l["ratio_served_p50"]),
            "≤ 1.5×",
        ),
        (
            "   apply→Ready p99 (ms)",
            f(&l["p99_ms"]),
            f(&l["floor_served_p99_ms"]),
            f(&l["ratio_served_p99"]),
            "",
        ),
        (
            "   p50 vs the floor without the reload",
            f(&l["p50_ms"]),
            f(&l["floor_p50_ms"]),
            f(&l["ratio_p50"]),
            "",
        ),
        (
            "2. 1,000 at once on 3 agents: seconds",
            f(&t["seconds"]),
            f(&t["floor_seconds"]),
            f(&t["ratio"]),
            "",
        ),
        (
            "   volumes/s",
            f(&t["volumes_per_second"]),
            f(&t["floor_volumes_per_second"]),
            none(),
            "",
        ),
        (
            "3. placement µs/decision, binpack",
            f(&p["binpack"]["micros_per_decision"]),
            f(&p["floor"]["micros_per_decision"]),
            none(),
            "≤ 10 µs",
        ),
        (
            "   placement µs/decision, spread",
            f(&p["spread"]["micros_per_decision"]),
            f(&p["floor"]["micros_per_decision"]),
            none(),
            "≤ 10 µs",
        ),
        (
            "4. etcd write requests per create",
            f(&e["write_requests_per_create"]),
            f(&e["floor_write_requests_per_create"]),
            none(),
            "≤ 3",
        ),
        (
            "   etcd keys written per create",
            f(&e["keys_written_per_create"]),
            none(),
            none(),
            "",
        ),
        (
            "   etcd write requests/min, 1,000 idle",
            f(&e["idle_write_requests_per_minute"]),
            f(&e["floor_idle_writes_per_minute"]),
            none(),
            "0",
        ),
        (
            "5. controller peak RSS MiB, 10,000 volumes",
            max(&m["controller_peak_rss_mib"]),
            f(&m["floor_stored_mib"]),
            none(),
            "",
        ),
        (
            "   agent peak RSS MiB, 10,000 volumes",
            max(&m["agent_peak_rss_mib"]),
            f(&m["floor_stored_mib"]),
            none(),
            "",
        ),
        (
            "6. write→reconcile p50 (ms)",
            f(&r["latency_p50_ms"]),
            f(&r["write_p50_ms"]),
            none(),
            "",
        ),
        (
            "   write→reconcile p99 (ms)",
            f(&r["latency_p99_ms"]),
            f(&r["write_p99_ms"]),
            none(),
            "",
        ),
        (
            "   burst reconciles/s",
            f(&r["burst_per_second"]),
            f(&r["floor_burst_writes_per_second"]),
            none(),
            "",
        ),
    ];
    println!(
        "\n{:<46} {:>10} {:>10} {:>7}  target",
        "Cobalt benchmark", "Cobalt", "floor", "ratio"
    );
    for (name, cobalt, floor, ratio, target) in rows {
        println!("{name:<46} {cobalt:>10} {floor:>10} {ratio:>7}  {target}");
    }
    let (st, fp) = (&l["stages_p50_ms"], &l["floor_parts_p50_ms"]);
    println!(
        "\nlatency p50 by stage (ms): API create {}, scheduler binding {}, agent to Ready {}; floor: etcd writes {}, ioctls {}, export {}",
        f(&st["api_create"]),
        f(&st["scheduler_bind"]),
        f(&st["agent_ready"]),
        f(&fp["etcd_writes"]),
        f(&fp["ioctls"]),
        f(&fp["export"]),
    );
    println!("\nwritten to bench/results.json (see bench/README.md for how to read it)");
}
