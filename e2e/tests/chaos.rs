//! The chaos run: the three-machine cluster under a workload of creates, deletes, resizes,
//! export changes, clones and moves, a client host writing files over NFS, while a seeded
//! schedule SIGKILLs agents and controllers, pauses a controller past its lease, stops etcd,
//! cuts a machine's link and kills nfs-ganesha — faults on different targets overlapping.
//!
//! Checked, each failure with its evidence:
//! - every acknowledged write reads back byte for byte at its volume's endpoint (clones hold what
//!   their source had acknowledged before the clone was asked for);
//! - every volume converges (status.machine = spec.machine, observedGeneration = generation,
//!   Ready, no move) within lease TTL + 30 s of the last fault's heal;
//! - no volume's data on two machines, no subvolume, export or bind mount without a volume
//!   bound there that owns it (reported, never deleted);
//! - from etcd's history, revision by revision: no machine's ledger overcommitted, and every
//!   event the scheduler wrote written while it held the election (fencing).
//!
//! `COBALT_CHAOS_SEED` replays a schedule (`make test` replays seed 2; `make chaos` draws a new
//! one each run), `COBALT_CHAOS_SECS` sets the span of faults (45 s in `make test`; `make chaos`
//! runs 300 s).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cobalt_api::{MachinePhase, Volume, VolumePhase};
use cobalt_e2e::chaos::{check_history, schedule, Change, Fault, FaultKind, Rng};
use cobalt_e2e::{binary, Cluster, NFS_PORT, TTL};
use cobalt_store::Store;
use cobalt_testkit::nfs::{pattern, NfsClient};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

const PREFIX: &str = "/cobalt";
/// The schedule `make test` replays: 13 faults in 45 s, all six kinds among them.
const REGRESSION_SEED: u64 = 2;
const PLACEMENT: &str = "spread";
/// A host the export changes add and remove (read-only); the writer is the cluster's client.
const EXTRA_HOST: &str = "10.0.0.200";

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_faults_under_load_lose_nothing_and_everything_converges() {
    // The suite replays one schedule (a regression run; its interleavings still vary with the
    // machine); `make chaos` gives each run a new seed.
    let seed = env_u64("COBALT_CHAOS_SEED").unwrap_or(REGRESSION_SEED);
    let span = Duration::from_secs(env_u64("COBALT_CHAOS_SECS").unwrap_or(45));
    let faults = schedule(seed, span, 3, 2, TTL);
    eprintln!(
        "chaos: seed {seed}, {} faults over {span:?} (replay: COBALT_CHAOS_SEED={seed} \
         cargo nextest run -p cobalt-e2e --test chaos)",
        faults.len()
    );

    let mut c = Cluster::start(PLACEMENT).await;
    c.machines_ready(3).await;
    for i in 0..c.controllers.len() {
        c.controller_serving(i).await;
    }
    let etcd_endpoints = c.etcd.endpoints();
    let (finish_tx, finish_rx) = watch::channel(None);
    let history = tokio::spawn(record_history(etcd_endpoints.clone(), finish_rx));

    let ports: Ports = Arc::new(Mutex::new(
        c.controllers.iter().map(|(_, p)| Some(*p)).collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let targets: Targets = Arc::new(Mutex::new(Vec::new()));
    let refresher = tokio::spawn(refresh_targets(
        c.store.clone(),
        targets.clone(),
        stop.clone(),
    ));
    let writer = {
        let (nfs, targets, stop) = (c.client.nfs(), targets.clone(), stop.clone());
        std::thread::spawn(move || write_files(nfs, targets, stop, seed))
    };
    let workload = tokio::spawn(run_workload(
        c.store.clone(),
        ports.clone(),
        c.client.addr.to_string(),
        stop.clone(),
        seed,
    ));

    // The faults, on schedule.
    let start = tokio::time::Instant::now();
    let mut steps: Vec<(Duration, bool, &Fault)> = faults
        .iter()
        .flat_map(|f| [(f.at, false, f), (f.heals_at(), true, f)])
        .collect();
    steps.sort_by_key(|(at, heal, _)| (*at, *heal));
    for (at, heal, fault) in steps {
        tokio::time::sleep_until(start + at).await;
        eprintln!(
            "chaos: {:>6.1}s {} {:?} (hold {:?})",
            at.as_secs_f64(),
            if heal { "heal " } else { "fault" },
            fault.kind,
            fault.hold
        );
        if heal {
            heal_fault(&mut c, &ports, fault.kind).await;
        } else {
            inject(&mut c, &ports, fault.kind);
        }
    }
    tokio::time::sleep_until(start + span).await;
    stop.store(true, Ordering::SeqCst);
    let healed = Instant::now();
    let ops = workload.await.unwrap();
    refresher.await.unwrap();
    let writes = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    eprintln!(
        "chaos: workload {} ops ok, {} failed ({:?}); {} writes acknowledged, {} failed",
        ops.ok,
        ops.failed,
        ops.by_kind,
        writes.acked.len(),
        writes.failed
    );
    let mut failures: Vec<String> = Vec::new();

    // Convergence.
    let deadline = TTL + Duration::from_secs(30);
    let converged = converge(&c.store, healed + deadline).await;
    let volumes = match converged {
        Ok(vs) => {
            eprintln!(
                "chaos: {} volumes converged {:.1}s after the last heal",
                vs.len(),
                healed.elapsed().as_secs_f64()
            );
            vs
        }
        Err((vs, why)) => {
            failures.push(format!(
                "not converged within {deadline:?} of the last fault:\n  {}",
                why.join("\n  ")
            ));
            vs
        }
    };

    // Acknowledged writes.
    let nfs = c.client.nfs();
    let expected = expected_files(&volumes, &writes.acked, &ops.clones);
    let checked: usize = expected.values().map(Vec::len).sum();
    let lost = tokio::task::spawn_blocking({
        let volumes = volumes.clone();
        move || read_back(&nfs, &volumes, &expected)
    })
    .await
    .unwrap();
    eprintln!(
        "chaos: {checked} acknowledged files read back, {} wrong",
        lost.len()
    );
    failures.extend(lost);

    // Orphans and double copies.
    failures.extend(orphans(&c, &volumes).await);

    // History.
    let mut kv = Client::connect(&etcd_endpoints, None).await.unwrap();
    let last = kv
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    finish_tx.send(Some(last)).unwrap();
    match tokio::time::timeout(Duration::from_secs(60), history).await {
        Ok(Ok(Ok(changes))) => {
            let report = check_history(PREFIX, &changes);
            eprintln!(
                "chaos: history of {} changes up to revision {last}: {} scheduler events \
                 checked against the election, the ledger at {} revisions; {} violations",
                changes.len(),
                report.controller_events,
                report.ledger_revisions,
                report.violations.len()
            );
            if report.controller_events == 0 {
                failures
                    .push("the history holds no scheduler event: fencing was not checked".into());
            }
            failures.extend(report.violations);
            // Any failure's evidence: what etcd said, revision by revision (which volume a
            // uid was, when it was deleted, where its moves went).
            if !failures.is_empty() {
                keep_history(seed, &changes);
            }
        }
        Ok(Ok(Err(e))) => failures.push(format!("etcd history incomplete: {e}")),
        Ok(Err(e)) => failures.push(format!("history recorder: {e}")),
        Err(_) => failures.push(format!("etcd history never reached revision {last}")),
    }

    // A run whose workload never got through proves nothing.
    assert!(
        ops.ok * 3 >= ops.ok + ops.failed && ops.ok >= 10,
        "seed {seed}: the workload mostly failed: {ops:?}"
    );
    assert!(
        writes.acked.len() >= 20,
        "seed {seed}: only {} writes were acknowledged",
        writes.acked.len()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} invariant violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Writes the history as evidence: `target/test-artifacts/chaos-<seed>-history.jsonl`, one
/// change per line (values as text).
fn keep_history(seed: u64, changes: &[Change]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("chaos-{seed}-history.jsonl"));
    let lines: Vec<String> = changes
        .iter()
        .map(|c| {
            serde_json::json!({
                "revision": c.revision,
                "key": c.key,
                "createRevision": c.create_revision,
                "value": c.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
            })
            .to_string()
        })
        .collect();
    if std::fs::write(&path, lines.join("\n") + "\n").is_ok() {
        eprintln!("chaos: etcd history kept in {}", path.display());
    }
}

/// Controller ports the workload may use: None while that controller is down or paused.
type Ports = Arc<Mutex<Vec<Option<u16>>>>;
/// Ready volumes the writer may write to: (name, uid, server, export path).
type Targets = Arc<Mutex<Vec<(String, String, String, String)>>>;

fn inject(c: &mut Cluster, ports: &Ports, kind: FaultKind) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    match kind {
        FaultKind::KillAgent(m) => c.machines[m].kill_agent(),
        FaultKind::KillController(i) => {
            ports.lock().unwrap()[i] = None;
            c.controllers[i].0.kill();
        }
        FaultKind::PauseController(i) => {
            ports.lock().unwrap()[i] = None;
            if let Some(pid) = c.controllers[i].0.pid() {
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
            }
        }
        FaultKind::StopEtcd => c.etcd.stop(),
        FaultKind::CutLink(m) => c.machines[m].host.link(false),
        FaultKind::KillGanesha(m) => {
            // The agent supervises it and reaps it; a dead agent's successor restarts it.
            if let Some(pid) = c.machines[m].ganesha_pid() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

async fn heal_fault(c: &mut Cluster, ports: &Ports, kind: FaultKind) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    match kind {
        FaultKind::KillAgent(m) => {
            let endpoint = c.etcd.endpoints()[0].clone();
            c.machines[m].start_agent(&endpoint);
        }
        FaultKind::KillController(i) => {
            c.start_controller(i, PLACEMENT);
            // Handed to the workload once it accepts connections.
            let (port, ports) = (c.controllers[i].1, ports.clone());
            tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    if tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                    {
                        ports.lock().unwrap()[i] = Some(port);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        FaultKind::PauseController(i) => {
            if let Some(pid) = c.controllers[i].0.pid() {
                kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
            }
            ports.lock().unwrap()[i] = Some(c.controllers[i].1);
        }
        FaultKind::StopEtcd => tokio::task::block_in_place(|| c.etcd.start_again()),
        FaultKind::CutLink(m) => c.machines[m].host.link(true),
        FaultKind::KillGanesha(_) => {}
    }
}

/// Every change etcd makes under the prefix, from a snapshot at the start, following etcd
/// through its restarts (a watch resumes at the next revision), until `finish` names a
/// revision it has reached.
async fn record_history(
    endpoints: Vec<String>,
    mut finish: watch::Receiver<Option<i64>>,
) -> Result<Vec<Change>, String> {
    let mut changes: Vec<Change> = Vec::new();
    let mut next = 0i64;
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(5));
    let done = |next: i64, finish: &watch::Receiver<Option<i64>>| {
        finish.borrow().is_some_and(|target| next > target)
    };
    loop {
        if done(next, &finish) {
            return Ok(changes);
        }
        let Ok(mut client) = Client::connect(&endpoints, Some(options.clone())).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if next == 0 {
            let Ok(resp) = client
                .get(PREFIX, Some(GetOptions::new().with_prefix()))
                .await
            else {
                continue;
            };
            let revision = resp.header().map_or(0, |h| h.revision());
            for kv in resp.kvs() {
                changes.push(Change {
                    revision,
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: Some(kv.value().to_vec()),
                    create_revision: kv.create_revision(),
                });
            }
            next = revision + 1;
        }
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_progress_notify();
        let Ok(mut stream) = client.watch(PREFIX, Some(opts)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = finish.changed() => {
                    let _ = stream.request_progress().await;
                    continue;
                }
            };
            let Ok(Some(resp)) = message else { break };
            if resp.compact_revision() > 0 {
                return Err(format!(
                    "etcd compacted its history to revision {} while {next} was wanted",
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                break;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                changes.push(Change {
                    revision: kv.mod_revision(),
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: (ev.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                    create_revision: kv.create_revision(),
                });
                next = next.max(kv.mod_revision() + 1);
            }
            if resp.events().is_empty() {
                // A progress notification: everything up to its revision has been delivered.
                if let Some(h) = resp.header() {
                    next = next.max(h.revision() + 1);
                }
            }
            if done(next, &finish) {
                return Ok(changes);
            }
        }
    }
}

async fn refresh_targets(store: Store, targets: Targets, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok((vs, _)) = store.list::<Volume>(&Default::default()).await {
            let ready = vs
                .iter()
                .filter(|v| v.metadata.deletion_timestamp.is_none())
                .filter_map(|v| {
                    let s = v.status.as_ref()?;
                    let e = s.endpoint.as_ref()?;
                    (s.phase == VolumePhase::Ready).then(|| {
                        (
                            v.metadata.name.to_string(),
                            v.metadata.uid.clone(),
                            e.server.to_string(),
                            e.path.to_string(),
                        )
                    })
                })
                .collect();
            *targets.lock().unwrap() = ready;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A file the server acknowledged: committed, so it must read back.
#[derive(Clone, Debug)]
struct Written {
    volume: String,
    uid: String,
    file: String,
    seed: u64,
    len: usize,
    server: String,
    acked: Instant,
}

struct Writes {
    acked: Vec<Written>,
    failed: usize,
}

/// Writes new files (4–64 KiB, never overwritten) to a random Ready volume at the endpoint it
/// last had, recording each the server acknowledged.
fn write_files(nfs: NfsClient, targets: Targets, stop: Arc<AtomicBool>, seed: u64) -> Writes {
    let mut rng = Rng::new(seed ^ 0x5752_4954_4552);
    let mut out = Writes {
        acked: Vec::new(),
        failed: 0,
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let pick = {
            let t = targets.lock().unwrap();
            (!t.is_empty()).then(|| t[rng.below(t.len() as u64) as usize].clone())
        };
        let Some((volume, uid, server, path)) = pick else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        seq += 1;
        let len = (4 << 10) + rng.below(60 << 10) as usize;
        let file_seed = seed.wrapping_add(seq);
        let file = format!("w{seq}.bin");
        match nfs.write(&server, NFS_PORT, &path, &file, &pattern(file_seed, len)) {
            Ok(()) => out.acked.push(Written {
                volume,
                uid,
                file,
                seed: file_seed,
                len,
                server,
                acked: Instant::now(),
            }),
            Err(_) => out.failed += 1,
        }
        // Paced so the read-back at the end stays short.
        std::thread::sleep(Duration::from_millis(80));
    }
    out
}

#[derive(Debug, Default)]
struct Ops {
    ok: usize,
    failed: usize,
    by_kind: BTreeMap<&'static str, (usize, usize)>,
    /// (clone, source, when the clone was asked for).
    clones: Vec<(String, String, Instant)>,
}

/// What the workload declared of a volume.
#[derive(Clone, Debug)]
struct Declared {
    mib: u64,
    extra_host: bool,
    source: Option<String>,
}

fn manifest(name: &str, d: &Declared, client: &str) -> String {
    let mut clients = format!("{{host: {client}, access: rw, rootSquash: false}}");
    if d.extra_host {
        clients.push_str(&format!(", {{host: {EXTRA_HOST}, access: ro}}"));
    }
    let source = d
        .source
        .as_ref()
        .map(|s| format!("  source: {{volume: {s}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  \
         size: {}Mi\n{source}  export:\n    clients: [{clients}]\n",
        d.mib
    )
}

/// Runs cobaltctl against a controller that is up, bounded; Ok or the reason.
async fn ctl(
    ports: &Ports,
    rng: &mut Rng,
    args: &[&str],
    stdin: Option<String>,
) -> Result<(), String> {
    let up: Vec<u16> = ports.lock().unwrap().iter().flatten().copied().collect();
    if up.is_empty() {
        return Err("no controller up".into());
    }
    let port = up[rng.below(up.len() as u64) as usize];
    let mut cmd = Command::new("timeout");
    cmd.arg("25")
        .arg(binary("cobaltctl"))
        .args(args)
        .env("COBALT_SERVER", format!("http://127.0.0.1:{port}"))
        .env("COBALT_CONFIG", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        if let Some(text) = stdin {
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
        }
        drop(child.stdin.take());
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    })
    .await
    .unwrap()
}

/// Bytes still free on each machine as the workload sees it: 80% of what the machine may fill
/// (90%), less every volume counted there and every volume not yet placed (it may land anywhere).
async fn room(store: &Store, volumes: &[Volume]) -> Option<BTreeMap<String, i64>> {
    let (machines, _) = store
        .list::<cobalt_api::Machine>(&Default::default())
        .await
        .ok()?;
    let unplaced: u64 = volumes
        .iter()
        .filter(|v| v.ledger_machines().next().is_none())
        .map(|v| v.spec.reserved_bytes())
        .sum();
    Some(
        machines
            .iter()
            .map(|m| {
                let total = m.status.as_ref().map_or(0, |s| s.capacity.total_bytes);
                let counted: u64 = volumes
                    .iter()
                    .filter(|v| v.ledger_machines().any(|x| x == m.metadata.name))
                    .map(|v| v.reserved_on(&m.metadata.name))
                    .sum();
                let limit = (total as f64 * 0.9 * 0.8) as i64;
                (
                    m.metadata.name.to_string(),
                    limit - counted as i64 - unplaced as i64,
                )
            })
            .collect(),
    )
}

fn is_ready(v: &Volume) -> bool {
    v.metadata.deletion_timestamp.is_none()
        && v.status.as_ref().is_some_and(|s| {
            s.phase == VolumePhase::Ready && s.move_.is_none() && s.machine.is_some()
        })
}

async fn run_workload(
    store: Store,
    ports: Ports,
    client: String,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Ops {
    const MIB: i64 = 1 << 20;
    let mut rng = Rng::new(seed ^ 0x574f_524b);
    let mut ops = Ops::default();
    let mut declared: BTreeMap<String, Declared> = BTreeMap::new();
    let counter = AtomicUsize::new(0);
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(rng.millis(300, 1_000)).await;
        let Ok((volumes, _)) = store.list::<Volume>(&Default::default()).await else {
            continue;
        };
        let Some(room) = room(&store, &volumes).await else {
            continue;
        };
        let alive: Vec<&Volume> = volumes
            .iter()
            .filter(|v| {
                v.metadata.deletion_timestamp.is_none()
                    && declared.contains_key(v.metadata.name.as_str())
            })
            .collect();
        let ready: Vec<&Volume> = alive.iter().copied().filter(|v| is_ready(v)).collect();
        let pick = |rng: &mut Rng, of: &[&Volume]| -> Option<Volume> {
            (!of.is_empty()).then(|| of[rng.below(of.len() as u64) as usize].clone())
        };
        let best_room = room.values().copied().max().unwrap_or(0);
        let choice = if alive.len() < 4 { 0 } else { rng.below(8) };
        let (kind, result) = match choice {
            0 | 1 => {
                let mib = 48 + 16 * rng.below(4);
                if best_room < (mib as i64 + 16) * MIB || alive.len() >= 14 {
                    continue;
                }
                let name = format!("v{}", counter.fetch_add(1, Ordering::SeqCst) + 1);
                let d = Declared {
                    mib,
                    extra_host: false,
                    source: None,
                };
                let text = manifest(&name, &d, &client);
                declared.insert(name, d);
                (
                    "create",
                    ctl(&ports, &mut rng, &["apply", "-f", "-"], Some(text)).await,
                )
            }
            2 => {
                // Never the source of a clone still being made.
                let busy: BTreeSet<&str> = volumes
                    .iter()
                    .filter(|v| !is_ready(v))
                    .filter_map(|v| v.spec.source.as_ref().and_then(|s| s.clone_of()))
                    .collect();
                let candidates: Vec<&Volume> = alive
                    .iter()
                    .copied()
                    .filter(|v| !busy.contains(v.metadata.name.as_str()))
                    .collect();
                let Some(v) = pick(&mut rng, &candidates) else {
                    continue;
                };
                let target = format!("volume/{}", v.metadata.name);
                (
                    "delete",
                    ctl(&ports, &mut rng, &["delete", &target], None).await,
                )
            }
            3 => {
                let Some(v) = pick(&mut rng, &ready) else {
                    continue;
                };
                let machine = v.status.as_ref().and_then(|s| s.machine.clone()).unwrap();
                if room.get(machine.as_str()).copied().unwrap_or(0) < 32 * MIB {
                    continue;
                }
                let d = declared.get_mut(v.metadata.name.as_str()).unwrap();
                d.mib += 16;
                let text = manifest(&v.metadata.name, d, &client);
                (
                    "grow",
                    ctl(&ports, &mut rng, &["apply", "-f", "-"], Some(text)).await,
                )
            }
            4 => {
                let Some(v) = pick(&mut rng, &alive) else {
                    continue;
                };
                let d = declared.get_mut(v.metadata.name.as_str()).unwrap();
                d.extra_host = !d.extra_host;
                let text = manifest(&v.metadata.name, d, &client);
                (
                    "export",
                    ctl(&ports, &mut rng, &["apply", "-f", "-"], Some(text)).await,
                )
            }
            5 => {
                let Some(v) = pick(&mut rng, &ready) else {
                    continue;
                };
                let machine = v.status.as_ref().and_then(|s| s.machine.clone()).unwrap();
                let mib = declared[v.metadata.name.as_str()].mib;
                if room.get(machine.as_str()).copied().unwrap_or(0) < (mib as i64 + 16) * MIB
                    || alive.len() >= 14
                {
                    continue;
                }
                let name = format!("v{}", counter.fetch_add(1, Ordering::SeqCst) + 1);
                let d = Declared {
                    mib,
                    extra_host: false,
                    source: Some(v.metadata.name.to_string()),
                };
                let text = manifest(&name, &d, &client);
                declared.insert(name.clone(), d);
                ops.clones
                    .push((name, v.metadata.name.to_string(), Instant::now()));
                (
                    "clone",
                    ctl(&ports, &mut rng, &["apply", "-f", "-"], Some(text)).await,
                )
            }
            _ => {
                let Some(v) = pick(&mut rng, &ready) else {
                    continue;
                };
                let from = v.status.as_ref().and_then(|s| s.machine.clone()).unwrap();
                let need = v.spec.reserved_bytes() as i64 + 16 * MIB;
                let to: Vec<&String> = room
                    .iter()
                    .filter(|(m, r)| **m != from && **r >= need)
                    .map(|(m, _)| m)
                    .collect();
                if to.is_empty() {
                    continue;
                }
                let to = to[rng.below(to.len() as u64) as usize].clone();
                let target = format!("volume/{}", v.metadata.name);
                (
                    "move",
                    ctl(&ports, &mut rng, &["move", &target, "--to", &to], None).await,
                )
            }
        };
        let entry = ops.by_kind.entry(kind).or_default();
        match result {
            Ok(()) => {
                ops.ok += 1;
                entry.0 += 1;
            }
            Err(e) => {
                ops.failed += 1;
                entry.1 += 1;
                eprintln!("chaos: {kind} failed: {}", e.trim());
            }
        }
    }
    ops
}

/// Waits until every volume has settled where its spec says and every machine is Ready; the
/// volumes, or the ones that did not with their status as evidence.
async fn converge(
    store: &Store,
    deadline: Instant,
) -> Result<Vec<Volume>, (Vec<Volume>, Vec<String>)> {
    let mut last: (Vec<Volume>, Vec<String>) = (Vec::new(), vec!["etcd never answered".into()]);
    loop {
        if let Ok((vs, _)) = store.list::<Volume>(&Default::default()).await {
            let mut why: Vec<String> = vs
                .iter()
                .filter(|v| {
                    let settled = v.status.as_ref().is_some_and(|s| {
                        s.machine.is_some()
                            && s.machine == v.spec.machine
                            && s.observed_generation == v.metadata.generation
                            && s.phase == VolumePhase::Ready
                            && s.move_.is_none()
                            && s.endpoint.is_some()
                    });
                    !settled || v.metadata.deletion_timestamp.is_some()
                })
                .map(|v| {
                    format!(
                        "volume {} (generation {}, spec.machine {:?}, deleting {}): status {}",
                        v.metadata.name,
                        v.metadata.generation,
                        v.spec.machine,
                        v.metadata.deletion_timestamp.is_some(),
                        serde_json::to_string(&v.status).unwrap_or_default()
                    )
                })
                .collect();
            if let Ok((ms, _)) = store.list::<cobalt_api::Machine>(&Default::default()).await {
                for m in &ms {
                    if m.status.as_ref().map(|s| s.phase) != Some(MachinePhase::Ready) {
                        why.push(format!("machine {} is not Ready", m.metadata.name));
                    }
                }
            }
            if why.is_empty() {
                return Ok(vs);
            }
            last = (vs, why);
        }
        if Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The files each volume alive at the end must hold: its own acknowledged writes, and for a
/// clone what its source held when the clone was asked for.
fn expected_files(
    volumes: &[Volume],
    acked: &[Written],
    clones: &[(String, String, Instant)],
) -> BTreeMap<String, Vec<Written>> {
    fn held(
        name: &str,
        before: Option<Instant>,
        acked: &[Written],
        clones: &[(String, String, Instant)],
        depth: usize,
    ) -> Vec<Written> {
        let mut files: Vec<Written> = acked
            .iter()
            .filter(|w| w.volume == name && before.is_none_or(|t| w.acked < t))
            .cloned()
            .collect();
        if depth < 16 {
            if let Some((_, source, asked)) = clones.iter().find(|(c, _, _)| c == name) {
                let cut = before.map_or(*asked, |b| b.min(*asked));
                files.extend(held(source, Some(cut), acked, clones, depth + 1));
            }
        }
        files
    }
    volumes
        .iter()
        .map(|v| {
            let own_uid = &v.metadata.uid;
            let files = held(&v.metadata.name, None, acked, clones, 0)
                .into_iter()
                // A write to an earlier volume of the same name is not this one's (names are
                // never reused here, but a clone's inherited files carry the source's uid).
                .filter(|w| w.volume != v.metadata.name || &w.uid == own_uid)
                .collect();
            (v.metadata.name.to_string(), files)
        })
        .collect()
}

fn read_back(
    nfs: &NfsClient,
    volumes: &[Volume],
    expected: &BTreeMap<String, Vec<Written>>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for v in volumes {
        let Some(e) = v.status.as_ref().and_then(|s| s.endpoint.as_ref()) else {
            continue;
        };
        for w in expected.get(v.metadata.name.as_str()).into_iter().flatten() {
            let mut result = Err(String::new());
            for _ in 0..3 {
                result = nfs.read(&e.server, NFS_PORT, &e.path, &w.file);
                if result.is_ok() {
                    break;
                }
            }
            let origin = if w.volume == v.metadata.name {
                String::new()
            } else {
                format!(" (inherited from {})", w.volume)
            };
            match result {
                Ok(data) if data == pattern(w.seed, w.len) => {}
                Ok(data) => wrong.push(format!(
                    "acknowledged write {}/{}{origin} ({} bytes, acknowledged by {}) reads back \
                     {} bytes that differ at {}",
                    v.metadata.name,
                    w.file,
                    w.len,
                    w.server,
                    data.len(),
                    e.server
                )),
                Err(err) => wrong.push(format!(
                    "acknowledged write {}/{}{origin} ({} bytes, acknowledged by {}) is missing \
                     at {}: {err}",
                    v.metadata.name, w.file, w.len, w.server, e.server
                )),
            }
        }
    }
    wrong
}

/// Subvolumes, exports and bind mounts on each machine that no volume bound there owns, and
/// volumes whose data is on two machines. Polled a while: a deleted volume's export is taken
/// down just after its object is gone.
async fn orphans(c: &Cluster, volumes: &[Volume]) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let found = orphans_now(c, volumes);
        if found.is_empty() || Instant::now() > end {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn orphans_now(c: &Cluster, volumes: &[Volume]) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &c.machines {
        let here: Vec<&Volume> = volumes
            .iter()
            .filter(|v| v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(&m.name))
            .collect();
        let uids: BTreeSet<&str> = here.iter().map(|v| v.metadata.uid.as_str()).collect();
        let names: BTreeSet<&str> = here.iter().map(|v| v.metadata.name.as_str()).collect();
        for uid in m.volumes_on_disk() {
            if !uids.contains(uid.as_str()) {
                found.push(format!(
                    "orphan: subvolume of uid {uid} on {} belongs to no volume bound there",
                    m.name
                ));
            }
            holders.entry(uid).or_default().push(m.name.clone());
        }
        let ganesha = m.state.path().join("ganesha");
        if let Ok(dir) = std::fs::read_dir(ganesha.join("exports.d")) {
            for entry in dir.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let Some(name) = file.strip_suffix(".conf") else {
                    continue;
                };
                if !names.contains(name) {
                    found.push(format!(
                        "orphan: export {file} on {} has no volume there",
                        m.name
                    ));
                }
            }
        }
        let exports = format!("{}/", ganesha.join("exports").display());
        let mut per_name: BTreeMap<String, usize> = BTreeMap::new();
        for line in mounts.lines() {
            let Some(point) = line.split(' ').nth(4) else {
                continue;
            };
            let Some(rest) = point.strip_prefix(&exports) else {
                continue;
            };
            let name = rest.split('.').next().unwrap_or(rest).to_string();
            if !names.contains(name.as_str()) {
                found.push(format!(
                    "orphan: bind mount {point} on {} has no volume there",
                    m.name
                ));
            }
            *per_name.entry(name).or_default() += 1;
        }
        for (name, n) in per_name.into_iter().filter(|(_, n)| *n > 1) {
            found.push(format!("{n} bind mounts of {name} on {}", m.name));
        }
    }
    for (uid, machines) in holders.into_iter().filter(|(_, ms)| ms.len() > 1) {
        found.push(format!("the data of uid {uid} is on {machines:?}"));
    }
    found
}
