//! The system-test cluster: one etcd, two controllers, three storage machines each in its own
//! network namespace with its own address, BTRFS pool and nfs-ganesha, and a client host — all
//! on one test LAN, driven through `cobaltctl` and checked with the real NFS client. Everything
//! is torn down on drop, also when a test fails.
//!
//! The binaries are the workspace's own (`target/debug/…`); `make e2e` builds them first.

pub mod chaos;
pub mod secured;
pub mod soak;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use cobalt_store::{EtcdConfig, Store};
use cobalt_testkit::btrfs::{unmount_under, BtrfsPool};
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::lan::{Lan, LanHost};
use cobalt_testkit::process::{kill_and_reap, reap_orphans, Daemon};

/// NFS port every machine's ganesha listens on (each in its own namespace).
pub const NFS_PORT: u16 = 2049;
/// Liveness and election lease of the cluster's daemons.
pub const TTL: Duration = Duration::from_secs(3);

pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, or `make e2e`)",
        path.display()
    );
    path
}

pub struct Machine {
    pub name: String,
    pub host: LanHost,
    pub pool: BtrfsPool,
    pub state: tempfile::TempDir,
    labels: String,
    agent: Option<Daemon>,
    /// Extra flags for the agent, kept across restarts (e.g. `--move-rate-limit 8Mi`).
    pub agent_args: Vec<String>,
    /// With the loop backend: its images' directory and filesystem (else the BTRFS `pool`).
    pub loop_backend: Option<(cobalt_testkit::loopdir::LoopDir, String)>,
}

impl Machine {
    pub fn start_agent(&mut self, etcd: &str) {
        let mut cmd = Command::new("nsenter");
        // Only the network namespace: mounts stay in the test's mount namespace, shared by the
        // agent, its ganesha and the test's cleanup.
        cmd.arg(format!("--net=/run/netns/{}", self.host.ns))
            .arg(binary("cobalt-agent"))
            .args([
                "--etcd-endpoints",
                etcd,
                "--machine",
                &self.name,
                "--labels",
                &self.labels,
            ])
            .args([
                "--address",
                &self.host.addr.to_string(),
                "--exporter",
                "ganesha",
            ])
            .arg("--export-port")
            .arg(NFS_PORT.to_string())
            .arg("--lease-ttl")
            .arg(format!("{}s", TTL.as_secs()))
            .args(match &self.loop_backend {
                Some((dir, fs)) => vec![
                    "--backend".into(),
                    "loop".into(),
                    "--filesystem".into(),
                    fs.into(),
                    "--pool".into(),
                    dir.pool().into_os_string(),
                ],
                None => vec!["--pool".into(), self.pool.path().as_os_str().to_owned()],
            })
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--listen")
            .arg(format!("{}:7421", self.host.addr))
            .args(&self.agent_args);
        self.agent = Some(Daemon::spawn(&mut cmd, &format!("agent-{}", self.name)));
    }

    /// What the agent printed so far.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Daemon::log).unwrap_or_default()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().and_then(Daemon::pid)
    }

    /// SIGKILL, like a crash (its ganesha keeps serving, by design).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|a| a.running())
    }

    pub fn ganesha_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state.path().join("ganesha/ganesha.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// uids of the volumes on this machine's pool.
    pub fn volumes_on_disk(&self) -> Vec<String> {
        use cobalt_agent::backend::Backend;
        cobalt_agent::backend::btrfs::BtrfsBackend::open(self.pool.path())
            .unwrap()
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.uid)
            .collect()
    }
}

impl Machine {
    /// Names of the snapshots of volume `uid` on this machine's pool.
    pub fn snapshots_on_disk(&self, uid: &str) -> Vec<String> {
        use cobalt_agent::backend::Backend;
        cobalt_agent::backend::btrfs::BtrfsBackend::open(self.pool.path())
            .unwrap()
            .snapshots(uid)
            .unwrap()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.state.path().join("ganesha/ganesha.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- {} nfs-ganesha log (last 30 lines) ---\n{}",
                self.name,
                tail.join("\n")
            );
        }
        self.kill_agent();
        if let Some(pid) = self.ganesha_pid() {
            kill_and_reap(pid);
        }
        // Any other process started with its files here: a ganesha whose pid file was lost.
        cobalt_testkit::process::kill_all_under(self.state.path());
        unmount_under(self.state.path());
    }
}

pub struct Cluster {
    pub machines: Vec<Machine>,
    pub client: LanHost,
    pub controllers: Vec<(Daemon, u16)>,
    pub store: Store,
    pub etcd: Etcd,
    pub lan: Lan,
    /// Extra flags for every controller, kept across restarts (e.g. `--resync 1s`).
    pub controller_args: Vec<String>,
}

impl Cluster {
    /// etcd, two controllers (`placement`), three machines m1 (disk=ssd), m2 (disk=ssd),
    /// m3 (disk=hdd), and a client host.
    pub async fn start(placement: &str) -> Cluster {
        Self::launch(placement, false, 1024, &[], None).await
    }

    /// Like [`Cluster::start`], but m3 runs the loop backend with `filesystem` (ext4, xfs), its
    /// images under /tmp.
    pub async fn start_with_loop_machine(placement: &str, filesystem: &str) -> Cluster {
        Self::launch(placement, false, 1024, &[], Some(filesystem)).await
    }

    /// Like [`Cluster::start`] with extra flags for every agent.
    pub async fn start_with_agent_args(placement: &str, args: &[&str]) -> Cluster {
        Self::launch(placement, false, 1024, args, None).await
    }

    /// Like [`Cluster::start`] with extra flags for every agent and every controller.
    pub async fn start_with_args(
        placement: &str,
        agent_args: &[&str],
        controller_args: &[&str],
    ) -> Cluster {
        Self::launch_with(placement, false, 1024, agent_args, controller_args, None).await
    }

    /// Like [`Cluster::start`] with `pool_mib` MiB pools (sparse images), for benchmarks.
    pub async fn start_with_pools(placement: &str, pool_mib: u64) -> Cluster {
        Self::launch(placement, false, pool_mib, &[], None).await
    }

    /// Like [`Cluster::start`] but etcd is down while the daemons start
    /// (`etcd.start_again()` brings it up).
    pub async fn start_with_etcd_down(placement: &str) -> Cluster {
        Self::launch(placement, true, 1024, &[], None).await
    }

    async fn launch(
        placement: &str,
        etcd_down: bool,
        pool_mib: u64,
        agent_args: &[&str],
        loop_m3: Option<&str>,
    ) -> Cluster {
        Self::launch_with(placement, etcd_down, pool_mib, agent_args, &[], loop_m3).await
    }

    async fn launch_with(
        placement: &str,
        etcd_down: bool,
        pool_mib: u64,
        agent_args: &[&str],
        controller_args: &[&str],
        loop_m3: Option<&str>,
    ) -> Cluster {
        cobalt_testkit::require("nsenter");
        cobalt_testkit::require("ganesha.nfsd");
        reap_orphans();
        let lan = Lan::new();
        let mut etcd = Etcd::start_on(&lan.gateway().to_string());
        if etcd_down {
            etcd.stop();
        }
        let endpoint = etcd.endpoints()[0].clone();
        let store = Store::connect(&EtcdConfig::new(etcd.endpoints()))
            .await
            .unwrap();
        // Every host joins the LAN before any daemon starts.
        let client = lan.host(100);
        let mut machines = Vec::new();
        for (i, labels) in ["disk=ssd,zone=a", "disk=ssd,zone=b", "disk=hdd,zone=a"]
            .iter()
            .enumerate()
        {
            let m = Machine {
                name: format!("m{}", i + 1),
                host: lan.host(11 + i as u8),
                pool: BtrfsPool::new(pool_mib),
                state: tempfile::tempdir().unwrap(),
                labels: labels.to_string(),
                agent: None,
                agent_args: Vec::new(),
                loop_backend: match (i, loop_m3) {
                    (2, Some(fs)) => {
                        Some((cobalt_testkit::loopdir::LoopDir::new(), fs.to_string()))
                    }
                    _ => None,
                },
            };
            machines.push(m);
        }
        for m in machines.iter_mut() {
            m.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
            m.start_agent(&endpoint);
        }
        let mut cluster = Cluster {
            machines,
            client,
            controllers: Vec::new(),
            store,
            etcd,
            lan,
            controller_args: controller_args.iter().map(|a| a.to_string()).collect(),
        };
        for i in 0..2 {
            cluster.start_controller(i, placement);
        }
        cluster
    }

    pub fn start_controller(&mut self, i: usize, placement: &str) {
        let port = free_port();
        let mut cmd = Command::new(binary("cobalt-controller"));
        cmd.args([
            "--etcd-endpoints",
            &self.etcd.endpoints()[0],
            "--placement",
            placement,
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--lease-ttl")
        .arg(format!("{}s", TTL.as_secs()))
        .arg("--name")
        .arg(format!("controller-{i}"))
        .args(&self.controller_args);
        let d = Daemon::spawn(&mut cmd, &format!("controller-{i}"));
        if i < self.controllers.len() {
            self.controllers[i] = (d, port);
        } else {
            self.controllers.push((d, port));
        }
    }

    /// Waits until controller `i` accepts API connections (after [`Cluster::start_controller`]).
    pub async fn controller_serving(&self, i: usize) {
        let port = self.controllers[i].1;
        cobalt_testkit::wait::until(
            "the controller's API up",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// The API of a running controller.
    pub fn api(&mut self) -> String {
        let port = self
            .controllers
            .iter_mut()
            .find_map(|(d, p)| d.running().then_some(*p))
            .expect("a running controller");
        format!("http://127.0.0.1:{port}")
    }

    /// Runs cobaltctl against a running controller.
    pub async fn ctl(&mut self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("cobaltctl"));
        cmd.env("COBALT_SERVER", self.api())
            .env("COBALT_CONFIG", "/nonexistent")
            .args(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    pub fn machine(&mut self, name: &str) -> &mut Machine {
        self.machines
            .iter_mut()
            .find(|m| m.name == name)
            .expect("machine")
    }

    /// `nfs-cat` from the client host; Ok(content) or Err(stderr).
    pub fn nfs_cat(&self, server: &str, path: &str) -> Result<String, String> {
        let url = format!("nfs://{server}/{path}?version=4&nfsport={NFS_PORT}");
        let o = self.client.run("nfs-cat", &[&url]);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    /// Writes `content` from the client host to `server:/VOLUME/FILE` (`path` is
    /// `VOLUME/FILE`) with the nfs-rs client, committed before it returns.
    pub fn nfs_put(&self, server: &str, path: &str, content: &str) -> Result<(), String> {
        self.nfs_write(server, path, content.as_bytes())
    }

    /// Like [`Cluster::nfs_put`] for any bytes (MiBs are fine: nfs-rs writes them whole).
    pub fn nfs_write(&self, server: &str, path: &str, data: &[u8]) -> Result<(), String> {
        let (volume, file) = path.split_once('/').expect("VOLUME/FILE");
        self.client
            .nfs()
            .write(server, NFS_PORT, &format!("/{volume}"), file, data)
    }

    /// Reads `server:/VOLUME/FILE` whole from the client host with the nfs-rs client.
    pub fn nfs_read(&self, server: &str, path: &str) -> Result<Vec<u8>, String> {
        let (volume, file) = path.split_once('/').expect("VOLUME/FILE");
        self.client
            .nfs()
            .read(server, NFS_PORT, &format!("/{volume}"), file)
    }
}

/// An appending writer on the client host, following the volume's endpoint: every append the
/// server acknowledged is recorded (seq → line), failures are retried at the endpoint the test
/// last saw.
pub struct AppendWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: std::sync::Arc<std::sync::Mutex<String>>,
    pub thread: Option<std::thread::JoinHandle<WriterLog>>,
}

#[derive(Debug, Default)]
pub struct WriterLog {
    pub acked: Vec<u64>,
    /// The server each acknowledged append went to.
    pub servers: Vec<String>,
    pub failures: usize,
    /// The longest time between two acknowledged appends.
    pub longest_gap: Duration,
}

pub fn record_line(seq: u64) -> String {
    format!("append {seq:08}\n")
}

impl AppendWriter {
    /// Appends a line to `volume`'s `log.txt` on `server` every `every`, until finished.
    pub fn start(
        nfs: cobalt_testkit::nfs::NfsClient,
        server: &str,
        volume: &str,
        every: Duration,
    ) -> AppendWriter {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = std::sync::Arc::new(std::sync::Mutex::new(server.to_string()));
        let (s, srv, export) = (stop.clone(), server.clone(), format!("/{volume}"));
        let thread = std::thread::spawn(move || {
            let mut log = WriterLog::default();
            let mut seq = 0;
            let mut last_ack = std::time::Instant::now();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let at = srv.lock().unwrap().clone();
                match nfs.append(
                    &at,
                    NFS_PORT,
                    &export,
                    "log.txt",
                    record_line(seq).as_bytes(),
                ) {
                    Ok(_) => {
                        log.acked.push(seq);
                        log.servers.push(at);
                        log.longest_gap = log.longest_gap.max(last_ack.elapsed());
                        last_ack = std::time::Instant::now();
                    }
                    Err(_) => log.failures += 1,
                }
                seq += 1;
                std::thread::sleep(every);
            }
            log
        });
        AppendWriter {
            stop,
            server,
            thread: Some(thread),
        }
    }

    pub fn follow(&self, server: &str) {
        *self.server.lock().unwrap() = server.to_string();
    }

    pub fn finish(mut self) -> WriterLog {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for AppendWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cluster {
    /// Waits until at least `n` machines are Ready with their capacity reported.
    pub async fn machines_ready(&self, n: usize) {
        cobalt_testkit::wait::until("machines Ready", Duration::from_secs(30), || async {
            let (ms, _) = self
                .store
                .list::<cobalt_api::Machine>(&Default::default())
                .await
                .ok()?;
            let ready = ms
                .iter()
                .filter(|m| {
                    m.status.as_ref().is_some_and(|s| {
                        s.phase == cobalt_api::MachinePhase::Ready && s.capacity.total_bytes > 0
                    })
                })
                .count();
            (ready >= n).then_some(())
        })
        .await;
    }

    /// Waits until exactly `n` volumes exist, every one Ready.
    pub async fn volumes_ready(&self, n: usize, deadline: Duration) {
        cobalt_testkit::wait::until(&format!("{n} volumes Ready"), deadline, || async {
            let (vs, _) = self
                .store
                .list::<cobalt_api::Volume>(&Default::default())
                .await
                .ok()?;
            let ready = vs
                .iter()
                .filter(|v| {
                    v.status
                        .as_ref()
                        .is_some_and(|s| s.phase == cobalt_api::VolumePhase::Ready)
                })
                .count();
            (vs.len() == n && ready == n).then_some(())
        })
        .await;
    }

    /// The index in `controllers` of the scheduler leader.
    pub async fn leader_index(&self) -> usize {
        let leader = self
            .store
            .leader("scheduler")
            .await
            .unwrap()
            .expect("a scheduler leader");
        leader
            .trim_start_matches("controller-")
            .parse()
            .expect("a controller-N identity")
    }

    /// `cobaltctl apply -f` of manifest text; panics with cobaltctl's output if it fails.
    pub async fn apply_text(&mut self, text: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.yaml");
        std::fs::write(&path, text).unwrap();
        let o = self
            .ctl(&["apply", "-f", &path.display().to_string()])
            .await;
        assert!(o.status.success(), "{}", out(&o));
    }

    /// `cobaltctl wait volume/NAME --for=condition=Ready`, then the volume as stored.
    pub async fn wait_ready(&mut self, name: &str, timeout: &str) -> cobalt_api::Volume {
        let o = self
            .ctl(&[
                "wait",
                &format!("volume/{name}"),
                "--for=condition=Ready",
                &format!("--timeout={timeout}"),
            ])
            .await;
        assert!(o.status.success(), "{}", out(&o));
        self.store.get(name).await.unwrap().unwrap()
    }
}

/// The NFS server of a volume's endpoint (panics without one).
pub fn server_of(v: &cobalt_api::Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.endpoint.as_ref())
        .map(|e| e.server.clone())
        .expect("an endpoint")
        .to_string()
}

/// Registers `count` Machines `m0000`, `m0001`, … for a benchmark, 32 at a time: each with
/// `maxFill: 100`, the labels `labels(i)` and `total_bytes` of capacity reported, its `alive` key
/// on the returned lease (kept alive while it lives).
pub async fn register_bench_machines(
    store: &cobalt_store::Store,
    count: usize,
    total_bytes: u64,
    labels: impl Fn(usize) -> cobalt_api::StringMap,
) -> cobalt_store::Lease {
    use cobalt_api::{Capacity, Machine, MachineSpec, MachineStatus};
    use futures::StreamExt;
    let lease = store
        .grant_lease(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    futures::stream::iter(0..count)
        .map(|i| {
            let (store, lease) = (store.clone(), &lease);
            let labels = labels(i);
            async move {
                let name = format!("m{i:04}");
                let spec = MachineSpec {
                    max_fill: 100,
                    ..Default::default()
                };
                let mut m = Machine::new(&name, spec);
                m.metadata.labels = labels;
                store.create(&m).await.unwrap();
                store
                    .update_status::<Machine, _>(&name, |_| {
                        Some(MachineStatus {
                            capacity: Capacity {
                                total_bytes,
                                ..Default::default()
                            },
                            ..Default::default()
                        })
                    })
                    .await
                    .unwrap();
                lease
                    .put_attached(&store.keys().alive(&name), &name)
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    lease
}

/// Merges one section into `bench/results.json` (the benches each write their own).
pub fn record_bench_section(key: &str, section: serde_json::Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results.json");
    let mut results: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    results[key] = section;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .unwrap();
}

pub fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
