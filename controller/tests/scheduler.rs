//! The scheduler against a real etcd: one leader among several controller processes, failover
//! within TTL + 1 s, no overcommit under 1,000 concurrent creates, and machine loss handling.

use std::process::Command;
use std::time::{Duration, Instant};

use cobalt_api::{
    find_condition, Capacity, Machine, MachinePhase, MachineSpec, MachineStatus, Volume,
    VolumePhase, VolumeSpec, VolumeStatus, AGENT_FINALIZER,
};
use cobalt_controller::config::PlacementStrategy;
use cobalt_controller::scheduler::{self, SchedulerConfig, SchedulerMetrics};
use cobalt_reconcile::CancellationToken;
use cobalt_store::{Lease, Store};
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

const MIB: u64 = 1 << 20;

/// Stands in for an agent: registers a machine with a capacity and holds its alive key.
async fn machine(store: &Store, name: &str, total_bytes: u64, labels: &[(&str, &str)]) -> Lease {
    let mut m = Machine::new(
        name,
        MachineSpec {
            max_fill: 100,
            ..Default::default()
        },
    );
    m.metadata.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    store.create(&m).await.unwrap();
    store
        .update_status::<Machine, _>(name, |_| {
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
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    lease
        .put_attached(&store.keys().alive(name), name)
        .await
        .unwrap();
    lease
}

fn volume(name: &str, bytes: u64) -> Volume {
    Volume::new(
        name,
        VolumeSpec {
            size: cobalt_api::Quantity::from_bytes(bytes),
            ..Default::default()
        },
    )
}

async fn bound_to(store: &Store, name: &str) -> Option<String> {
    store
        .get::<Volume>(name)
        .await
        .ok()
        .flatten()
        .and_then(|v| v.spec.machine.map(String::from))
}

struct InProcess(CancellationToken);
impl Drop for InProcess {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn run_scheduler(store: &Store, strategy: PlacementStrategy) -> InProcess {
    run_scheduler_with(store, strategy, Duration::from_secs(30)).0
}

/// The scheduler with a resync period of `resync`, and the registry of its metrics.
fn run_scheduler_with(
    store: &Store,
    strategy: PlacementStrategy,
    resync: Duration,
) -> (InProcess, prometheus_client::registry::Registry) {
    let stop = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let config = SchedulerConfig {
        identity: "test".into(),
        strategy,
        lease_ttl: Duration::from_secs(2),
        resync,
        // These tests stand in for agents without streams: nothing could move anyway.
        rebalance: Default::default(),
        event_ttl: Duration::from_secs(600),
    };
    tokio::spawn(scheduler::run(
        store.clone(),
        config,
        SchedulerMetrics::new(&mut registry),
        cobalt_reconcile::Metrics::new(&mut registry),
        stop.clone(),
    ));
    (InProcess(stop), registry)
}

/// The sum of the series of `metric` whose labels contain `label` in the registry's exposition.
fn metric_sum(registry: &prometheus_client::registry::Registry, metric: &str, label: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Range reads etcd has served (`etcd_mvcc_range_total` on its /metrics).
async fn etcd_ranges(etcd: &Etcd) -> f64 {
    let text = reqwest::get(format!("{}/metrics", etcd.endpoints()[0]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("etcd_mvcc_range_total ")?
                .trim()
                .parse()
                .ok()
        })
        .expect("etcd's /metrics has etcd_mvcc_range_total")
}

fn controller(etcd: &Etcd, name: &str, port: u16) -> Daemon {
    Daemon::spawn(
        Command::new(env!("CARGO_BIN_EXE_cobalt-controller"))
            .arg("--etcd-endpoints")
            .arg(etcd.endpoints().join(","))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--lease-ttl")
            .arg("2s")
            .arg("--name")
            .arg(name)
            .env("RUST_LOG", "info"),
        name,
    )
}

async fn is_leader(port: u16) -> Option<bool> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cobalt_scheduler_is_leader"))?;
    Some(line.ends_with(" 1"))
}

#[tokio::test]
async fn one_controller_leads_and_another_takes_over_within_ttl_plus_one_second() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let _m = machine(&store, "node-1", 100 << 30, &[]).await;
    let ports = [free_port(), free_port()];
    let mut daemons = [
        controller(&etcd, "controller-a", ports[0]),
        controller(&etcd, "controller-b", ports[1]),
    ];

    store.create(&volume("first", 100 * MIB)).await.unwrap();
    until(
        "the first volume to be bound",
        Duration::from_secs(20),
        || bound_to(&store, "first"),
    )
    .await;
    let leader = until("a leader", Duration::from_secs(10), || async {
        store.leader(scheduler::ELECTION).await.ok().flatten()
    })
    .await;
    let leader_index = if leader == "controller-a" { 0 } else { 1 };
    let follower_index = 1 - leader_index;
    assert_eq!(is_leader(ports[leader_index]).await, Some(true));
    assert_eq!(
        is_leader(ports[follower_index]).await,
        Some(false),
        "only one controller schedules"
    );
    // Settled, the leader and its standby write nothing: waiting for leadership is one
    // long-lived campaign, not a campaign repeated (and its key rewritten) every deadline.
    // Settled includes the events of what happened so far, which are written in the background.
    until(
        "the events of the machine and the binding",
        Duration::from_secs(10),
        || async {
            let (events, _) = store.list_events(&Default::default()).await.ok()?;
            let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
            (reasons.contains(&"MachineReady") && reasons.contains(&"Bound")).then_some(())
        },
    )
    .await;
    let quiet_from = store.revision().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // a window in which nothing may happen
    let written = store
        .raw()
        .get(
            "/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_min_mod_revision(quiet_from + 1)
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<String> = written
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert_eq!(
        store.revision().await.unwrap(),
        quiet_from,
        "an idle leader and standby wrote to etcd: {keys:?}"
    );

    daemons[leader_index].kill();
    let killed = Instant::now();
    store.create(&volume("second", 100 * MIB)).await.unwrap();
    until(
        "the second volume to be bound by the survivor",
        Duration::from_secs(20),
        || bound_to(&store, "second"),
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(3),
        "takeover took {took:?}, more than TTL (2s) + 1s"
    );
    assert_eq!(
        store.leader(scheduler::ELECTION).await.unwrap().as_deref(),
        Some(["controller-a", "controller-b"][follower_index])
    );
}

#[tokio::test]
async fn a_thousand_volumes_created_at_once_never_overcommit_a_machine() {
    use futures::StreamExt;
    let etcd = Etcd::start();
    let store = etcd.store().await;
    // 3 machines of 1 GiB; 1,000 volumes of 2–8 MiB (~4.9 GiB wanted): most fit, some cannot.
    let _leases = [
        machine(&store, "m1", 1 << 30, &[]).await,
        machine(&store, "m2", 1 << 30, &[]).await,
        machine(&store, "m3", 1 << 30, &[]).await,
    ];
    let _scheduler = run_scheduler(&store, PlacementStrategy::Binpack);
    futures::stream::iter(0..1000u64)
        .map(|i| {
            let store = store.clone();
            async move {
                store
                    .create(&volume(&format!("v{i:04}"), (1 + i % 4) * 2 * MIB))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let volumes = until(
        "every volume to have a Scheduled condition",
        Duration::from_secs(120),
        || async {
            let (all, _) = store.list::<Volume>(&Default::default()).await.ok()?;
            let decided = all.iter().all(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, "Scheduled"))
                    .is_some()
            });
            decided.then_some(all)
        },
    )
    .await;
    let mut reserved = std::collections::BTreeMap::<String, u64>::new();
    for v in &volumes {
        if let Some(m) = &v.spec.machine {
            *reserved.entry(m.to_string()).or_default() += v.spec.reserved_bytes();
        }
    }
    for (m, bytes) in &reserved {
        assert!(
            *bytes <= 1 << 30,
            "{m} overcommitted: {bytes} bytes reserved of {}",
            1u64 << 30
        );
    }
    let bound = volumes.iter().filter(|v| v.spec.machine.is_some()).count();
    // 3,072 MiB of room: at least 384 of the largest (8 MiB) always fit.
    assert!(bound >= 384, "only {bound} placed");
    let refused = volumes
        .iter()
        .find(|v| v.spec.machine.is_none())
        .expect("some cannot fit");
    let c = find_condition(&refused.status.as_ref().unwrap().conditions, "Scheduled").unwrap();
    assert_eq!(c.reason, "Unschedulable");
    assert_eq!(c.message, "3 machines: 3 insufficient capacity");
}

#[tokio::test]
async fn selectors_and_cordons_are_respected_and_unschedulable_volumes_say_why_then_retry() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let _hdd = machine(&store, "hdd-1", 10 << 30, &[("disk", "hdd")]).await;
    let _scheduler = run_scheduler(&store, PlacementStrategy::Spread);
    let mut v = volume("fast", 100 * MIB);
    v.spec.placement = Some(cobalt_api::Placement {
        selector: [("disk".to_string(), "ssd".to_string())].into(),
    });
    store.create(&v).await.unwrap();
    let msg = until(
        "an Unschedulable condition",
        Duration::from_secs(10),
        || async {
            let v: Volume = store.get("fast").await.ok()??;
            let c = find_condition(&v.status?.conditions, "Scheduled")?.clone();
            (c.reason == "Unschedulable").then_some(c.message)
        },
    )
    .await;
    assert_eq!(msg, "1 machine: 1 selector mismatch");
    // A matching machine appears: the volume is placed without anyone touching it.
    let _ssd = machine(&store, "ssd-1", 10 << 30, &[("disk", "ssd")]).await;
    let m = until(
        "placement on the new machine",
        Duration::from_secs(10),
        || bound_to(&store, "fast"),
    )
    .await;
    assert_eq!(m, "ssd-1");
    // One write binds, holds the agent's finalizer and says Scheduled: whoever sees the binding
    // sees the rest with it.
    let v: Volume = store.get("fast").await.unwrap().unwrap();
    assert!(v.metadata.finalizers.iter().any(|f| f == AGENT_FINALIZER));
    let s = v.status.unwrap();
    assert_eq!(s.phase, VolumePhase::Scheduled);
    let c = find_condition(&s.conditions, "Scheduled").unwrap();
    assert_eq!((&*c.reason, c.is_true()), ("Bound", true));
}

/// Volumes that cannot be placed are told why once; after that, resyncs of every one of them
/// cost etcd (almost) nothing and run no placement pass. Before, each pending volume's reconcile ran a placement pass over
/// all of them with a fresh read of each: N² reads per resync — 20,000 such volumes kept etcd
/// busy on an idle cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_that_cannot_be_placed_cost_etcd_no_reads_once_they_say_why() {
    const N: usize = 200;
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let (_scheduler, registry) = run_scheduler_with(
        &store,
        PlacementStrategy::Binpack,
        Duration::from_millis(300),
    );
    for i in 0..N {
        store
            .create(&volume(&format!("p-{i:03}"), 100 * MIB))
            .await
            .unwrap();
    }
    until(
        "every volume saying why it waits",
        Duration::from_secs(30),
        || async {
            let (vs, _) = store.list::<Volume>(&Default::default()).await.ok()?;
            let told = vs
                .iter()
                .filter(|v| {
                    v.status
                        .as_ref()
                        .and_then(|s| find_condition(&s.conditions, "Scheduled"))
                        .is_some_and(|c| c.reason == "Unschedulable")
                })
                .count();
            (told == N).then_some(())
        },
    )
    .await;
    // The Unschedulable event of each is written in the background; let those writes finish.
    until(
        "every volume's event written",
        Duration::from_secs(30),
        || async {
            let (events, _) = store.list_events(&Default::default()).await.ok()?;
            (events.len() >= N).then_some(())
        },
    )
    .await;
    // Three full resyncs of the N volumes, counted by the scheduler's own reconciles.
    let reconciles = || metric_sum(&registry, "cobalt_reconcile_total", "volume-scheduler");
    let passes = || metric_sum(&registry, "cobalt_scheduler_placement_seconds_count", "");
    let (ranges_before, reconciles_before) = (etcd_ranges(&etcd).await, reconciles());
    let passes_before = passes();
    until(
        "three resyncs of every volume",
        Duration::from_secs(30),
        || async { (reconciles() >= reconciles_before + 3.0 * N as f64).then_some(()) },
    )
    .await;
    let ranges = etcd_ranges(&etcd).await - ranges_before;
    let passes = passes() - passes_before;
    eprintln!("{ranges} range reads and {passes} placement passes during three resyncs of {N} unplaceable volumes");
    // Nothing changed, so nothing is placed again (each reconcile ran a pass over all N).
    assert!(
        passes <= 1.0,
        "{passes} placement passes while nothing changed"
    );
    // What remains is the liveness and leadership polling (a few reads a second); one read per
    // volume and resync alone would be 600, a pass per volume 120,000.
    assert!(
        ranges < N as f64,
        "{ranges} range reads during three resyncs of {N} unplaceable volumes"
    );
}

#[tokio::test]
async fn a_lost_machine_goes_not_ready_its_unprovisioned_volume_moves_and_its_provisioned_one_is_lost(
) {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let doomed = machine(&store, "m1", 10 << 30, &[]).await;
    let _scheduler = run_scheduler(&store, PlacementStrategy::Binpack);
    store
        .create(&volume("provisioned", 100 * MIB))
        .await
        .unwrap();
    store
        .create(&volume("unprovisioned", 100 * MIB))
        .await
        .unwrap();
    until("both bound to m1", Duration::from_secs(10), || async {
        (bound_to(&store, "provisioned").await.as_deref() == Some("m1")
            && bound_to(&store, "unprovisioned").await.as_deref() == Some("m1"))
        .then_some(())
    })
    .await;
    // A volume the user pinned to m1, which m1's agent never got to.
    let mut pinned = volume("pinned", 100 * MIB);
    pinned.spec.machine = Some("m1".into());
    store.create(&pinned).await.unwrap();
    until(
        "the pinned volume held for its agent",
        Duration::from_secs(10),
        || async {
            let v: Volume = store.get("pinned").await.ok()??;
            v.metadata
                .finalizers
                .iter()
                .any(|f| f == AGENT_FINALIZER)
                .then_some(())
        },
    )
    .await;
    // The agent provisioned one of them.
    store
        .update_status::<Volume, _>("provisioned", |v| {
            let mut s = v.status.clone().unwrap_or_default();
            s.phase = VolumePhase::Ready;
            s.machine = Some("m1".into());
            Some(s)
        })
        .await
        .unwrap();
    until("m1 Ready", Duration::from_secs(10), || async {
        let m: Machine = store.get("m1").await.ok()??;
        (m.status?.phase == MachinePhase::Ready).then_some(())
    })
    .await;
    let _m2 = machine(&store, "m2", 10 << 30, &[]).await;
    drop(doomed); // the agent dies: its lease expires after its TTL

    let c = until("m1 NotReady", Duration::from_secs(15), || async {
        let m: Machine = store.get("m1").await.ok()??;
        let s = m.status?;
        (s.phase == MachinePhase::NotReady)
            .then(|| find_condition(&s.conditions, "Ready").cloned())?
    })
    .await;
    assert_eq!(c.reason, "LeaseExpired");
    let moved = until(
        "the unprovisioned volume rebound",
        Duration::from_secs(15),
        || async {
            bound_to(&store, "unprovisioned")
                .await
                .filter(|m| m == "m2")
        },
    )
    .await;
    assert_eq!(moved, "m2");
    let lost: VolumeStatus = until(
        "the provisioned volume Lost",
        Duration::from_secs(15),
        || async {
            let v: Volume = store.get("provisioned").await.ok()??;
            v.status.filter(|s| s.phase == VolumePhase::Lost)
        },
    )
    .await;
    assert_eq!(
        find_condition(&lost.conditions, "Ready").unwrap().reason,
        "MachineLost"
    );
    let mut still: Volume = store.get("provisioned").await.unwrap().unwrap();
    assert_eq!(
        still.spec.machine.as_deref(),
        Some("m1"),
        "a provisioned volume is never moved away from its data"
    );
    // Asking to move it while its machine is lost: it stays Lost, no move is granted, and a
    // condition says why.
    still.spec.machine = Some("m2".into());
    store.replace(&still).await.unwrap();
    let why = until("the move held back", Duration::from_secs(10), || async {
        let v: Volume = store.get("provisioned").await.ok()??;
        let s = v.status?;
        let c = find_condition(&s.conditions, "Moving")?.clone();
        (c.reason == "SourceNotReady").then_some((s.phase, s.move_, c.message))
    })
    .await;
    assert_eq!(why.0, VolumePhase::Lost);
    assert!(why.1.is_none(), "no move granted from a lost machine");
    assert!(why.2.contains("m1"), "{}", why.2);
    // Deleting the never-provisioned pinned volume does not wait for the dead agent.
    store.delete::<Volume>("pinned", None).await.unwrap();
    until(
        "the pinned volume gone",
        Duration::from_secs(10),
        || async {
            store
                .get::<Volume>("pinned")
                .await
                .ok()
                .and_then(|v| v.is_none().then_some(()))
        },
    )
    .await;

    // The agent comes back: the machine is Ready again.
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    lease
        .put_attached(&store.keys().alive("m1"), "m1")
        .await
        .unwrap();
    until("m1 Ready again", Duration::from_secs(10), || async {
        let m: Machine = store.get("m1").await.ok()??;
        (m.status?.phase == MachinePhase::Ready).then_some(())
    })
    .await;
}

/// Stands in for an agent whose backend declares `capabilities`.
async fn machine_with(
    store: &Store,
    name: &str,
    total_bytes: u64,
    capabilities: Vec<cobalt_api::Capability>,
) -> Lease {
    let lease = machine(store, name, total_bytes, &[]).await;
    store
        .update_status::<Machine, _>(name, |m| {
            let mut s = m.status.clone()?;
            s.capabilities = capabilities.clone();
            Some(s)
        })
        .await
        .unwrap();
    lease
}

async fn scheduled_condition(store: &Store, name: &str, reason: &str) -> String {
    until(
        &format!("Scheduled reason {reason}"),
        Duration::from_secs(10),
        || async {
            let v: Volume = store.get(name).await.ok()??;
            let c = find_condition(&v.status?.conditions, "Scheduled")?.clone();
            (c.reason == reason).then_some(c.message)
        },
    )
    .await
    .to_string()
}

#[tokio::test]
async fn a_compressed_volume_is_never_placed_on_a_backend_that_cannot_compress() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    // A backend that declares no compression (a block-device backend, say).
    let _plain = machine_with(&store, "plain-1", 10 << 30, vec![]).await;
    let _scheduler = run_scheduler(&store, PlacementStrategy::Spread);
    let mut v = volume("squeezed", 100 * MIB);
    v.spec.compression = cobalt_api::Compression::Zstd;
    store.create(&v).await.unwrap();
    store.create(&volume("plain", 100 * MIB)).await.unwrap();
    let msg = scheduled_condition(&store, "squeezed", "Unschedulable").await;
    assert_eq!(
        msg,
        "1 machine: 1 whose backend lacks the compression capability"
    );
    assert_eq!(
        until("the plain volume bound", Duration::from_secs(10), || {
            bound_to(&store, "plain")
        })
        .await,
        "plain-1",
        "an uncompressed volume is fine there"
    );
    let _btrfs = machine_with(
        &store,
        "btrfs-1",
        10 << 30,
        vec![cobalt_api::Capability::Compression],
    )
    .await;
    assert_eq!(
        until(
            "placement on the compressing machine",
            Duration::from_secs(10),
            || { bound_to(&store, "squeezed") }
        )
        .await,
        "btrfs-1"
    );
}

#[tokio::test]
async fn a_grow_that_does_not_fit_keeps_the_old_size_and_says_how_much_is_missing() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let _m = machine(&store, "small", 1024 * MIB, &[]).await;
    let _scheduler = run_scheduler(&store, PlacementStrategy::Binpack);
    store.create(&volume("a", 400 * MIB)).await.unwrap();
    store.create(&volume("b", 400 * MIB)).await.unwrap();
    for name in ["a", "b"] {
        scheduled_condition(&store, name, "Bound").await;
    }
    let v: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        v.status.as_ref().unwrap().allocated_bytes,
        Some(400 * MIB),
        "the binding allocates the size"
    );
    // Growing a to 800Mi needs 400Mi more; the machine has 224Mi reservable.
    let mut grown = v.clone();
    grown.spec.size = cobalt_api::Quantity::from_bytes(800 * MIB);
    store.replace(&grown).await.unwrap();
    let refused = until(
        "CapacityReserved=False",
        Duration::from_secs(10),
        || async {
            let v: Volume = store.get("a").await.ok()??;
            let c = find_condition(&v.status.as_ref()?.conditions, "CapacityReserved")?.clone();
            (c.reason == "InsufficientCapacity").then_some((v, c.message))
        },
    )
    .await;
    let (v, message) = refused;
    assert_eq!(v.status.as_ref().unwrap().allocated_bytes, Some(400 * MIB));
    assert_eq!(v.granted_size_bytes(), 400 * MIB, "the agent keeps 400Mi");
    assert!(
        message.contains(&format!("{} more bytes", 400 * MIB))
            && message.contains(&format!("{} reservable", 224 * MIB)),
        "{message}"
    );
    // Room appears (b is deleted, and the machine's agent reports its lower reservation): the
    // grow is granted without anyone touching a.
    store.delete::<Volume>("b", None).await.unwrap();
    let mut b: Volume = store.get("b").await.unwrap().unwrap();
    b.metadata.finalizers.clear();
    store.replace(&b).await.unwrap();
    store
        .update_status::<Machine, _>("small", |m| {
            let mut s = m.status.clone()?;
            s.capacity.reserved_bytes = 400 * MIB;
            Some(s)
        })
        .await
        .unwrap();
    until("the grow granted", Duration::from_secs(15), || async {
        let v: Volume = store.get("a").await.ok()??;
        let s = v.status?;
        (s.allocated_bytes == Some(800 * MIB)
            && find_condition(&s.conditions, "CapacityReserved").is_none())
        .then_some(())
    })
    .await;
}
