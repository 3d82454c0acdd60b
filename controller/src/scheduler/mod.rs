//! The leader-elected scheduler (the seeds' "single master" engine). Every controller campaigns;
//! the leader runs [`binding::VolumeScheduler`], [`lifecycle::MachineLifecycle`] and
//! [`claims::ClaimBinder`] on the reconcile library, and the snapshot [`schedules`], writing only through a store fenced by its leadership — a deposed or partitioned
//! leader's writes fail. When the leader's lease is lost it stops at once and campaigns again;
//! when its process dies, another controller wins after the lease TTL.
//!
//! Placement itself is the pure [`placement`] module.

pub mod balancer;
pub mod binding;
pub mod claims;
pub mod lifecycle;
pub mod metrics;
pub mod moves;
pub mod passes;
pub mod placement;
pub mod rebalance;
pub mod schedules;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use cobalt_api::{Claim, Machine, Snapshot, Volume};
use cobalt_reconcile::reflector::{reflect, reflect_trimmed};
use cobalt_reconcile::{Cache, CancellationToken, Config, Controller, Metrics};
use cobalt_store::Store;

use crate::config::PlacementStrategy;
use binding::{Alive, VolumeScheduler};
use lifecycle::MachineLifecycle;
pub use metrics::SchedulerMetrics;

/// The election every controller campaigns in.
pub const ELECTION: &str = "scheduler";
/// How often the leader re-reads which agents are alive.
pub const LIVENESS_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct SchedulerConfig {
    pub identity: String,
    pub strategy: PlacementStrategy,
    pub lease_ttl: Duration,
    /// Full resync period of the scheduler's controllers.
    pub resync: Duration,
    /// Drain and rebalance policy.
    pub rebalance: rebalance::Policy,
    /// How long events live; zero records none.
    pub event_ttl: Duration,
}

/// Campaigns, leads while elected, campaigns again after losing; returns on shutdown.
pub async fn run(
    store: Store,
    config: SchedulerConfig,
    metrics: SchedulerMetrics,
    reconcile_metrics: Metrics,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let lease = match store.grant_lease(config.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot get a lease for the scheduler election; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let leadership = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = store.campaign(ELECTION, &config.identity, &lease) => r,
        };
        let leadership = match leadership {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                continue;
            }
        };
        tracing::info!(identity = %config.identity, "elected scheduler leader");
        metrics.transitions.inc();
        metrics.leader.set(1);
        let term = shutdown.child_token();
        let fenced = store.fenced(leadership.fence());
        let leading = tokio::spawn(lead(
            store.clone(),
            fenced,
            config.clone(),
            metrics.clone(),
            reconcile_metrics.clone(),
            term.clone(),
        ));
        tokio::select! {
            _ = lease.lost() => tracing::warn!("scheduler lease lost; stepping down"),
            _ = shutdown.cancelled() => {}
        }
        term.cancel();
        metrics.leader.set(0);
        let _ = tokio::time::timeout(Duration::from_secs(10), leading).await;
        if shutdown.is_cancelled() {
            // Hand over at once instead of making the others wait a TTL.
            let _ = leadership.resign().await;
            let _ = lease.revoke().await;
            return;
        }
    }
}

/// Brings every machine's view of the volumes in line with the volumes, once per term (agents
/// watch their views; an etcd whose data predates them, or restored from a backup, may lack
/// some). Retried until it succeeds or the term ends.
/// The leader's copy of a bound volume leaves out the last-applied annotation (~300 bytes of a
/// volume's ~2 KB at 100,000 volumes): nothing here reads it, and the one write made from a
/// cached copy without reading first, a binding, is of unbound volumes. Other writes of a
/// bound volume (a move, a grow, an unbinding) read the stored object, which gives back the
/// annotation; the store refuses to write a trimmed copy as it is.
fn trim_bound(v: &mut Volume) {
    if v.spec.machine.is_some() {
        v.metadata.trim_for_cache();
    }
}

async fn repair_views(fenced: Store, term: CancellationToken) {
    let mut delay = Duration::from_millis(200);
    loop {
        // A term that ends stops the repair between two objects' transactions (each is guarded
        // on its own): at 100,000 volumes it takes seconds, which a stopping leader must not
        // wait for.
        let repaired = tokio::select! {
            _ = term.cancelled() => return,
            r = fenced.repair_views::<Volume>() => r,
        };
        match repaired {
            Ok(r) if r == cobalt_store::Repaired::default() => return,
            Ok(r) => {
                tracing::info!(
                    objects = r.objects,
                    stray_keys = r.stray_keys,
                    "machine views repaired"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, "repairing the machine views failed; retrying"),
        }
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// One term as leader: caches, liveness poller and the two controllers, until `term` ends.
async fn lead(
    store: Store,
    fenced: Store,
    config: SchedulerConfig,
    metrics: SchedulerMetrics,
    reconcile_metrics: Metrics,
    term: CancellationToken,
) {
    let volumes = Cache::<Volume>::new();
    let machines = Cache::<Machine>::new();
    let claims = Cache::<Claim>::new();
    let snapshots = Cache::<Snapshot>::new();
    // Liveness must be known before any decision: an empty set would make every machine look
    // gone and every unprovisioned volume look orphaned.
    let initial = loop {
        match store.alive_machines().await {
            Ok(a) => break a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read machine liveness yet");
                tokio::select! {
                    _ = term.cancelled() => return,
                    _ = tokio::time::sleep(LIVENESS_POLL) => {}
                }
            }
        }
    };
    let alive: Alive = Arc::new(RwLock::new(initial));
    let mut tasks = vec![
        tokio::spawn(repair_views(fenced.clone(), term.clone())),
        tokio::spawn(reflect_trimmed(
            store.clone(),
            volumes.clone(),
            Some(reconcile_metrics.clone()),
            term.clone(),
            trim_bound,
        )),
        tokio::spawn(reflect(
            store.clone(),
            machines.clone(),
            Some(reconcile_metrics.clone()),
            term.clone(),
        )),
        tokio::spawn(reflect(
            store.clone(),
            claims.clone(),
            Some(reconcile_metrics.clone()),
            term.clone(),
        )),
        tokio::spawn(reflect(
            store.clone(),
            snapshots.clone(),
            Some(reconcile_metrics.clone()),
            term.clone(),
        )),
    ];
    let volume_config = Config {
        name: "volume-scheduler".into(),
        concurrency: 4,
        resync: config.resync,
        ..Config::default()
    };
    let machine_config = Config {
        name: "machine-lifecycle".into(),
        concurrency: 2,
        resync: config.resync,
        ..Config::default()
    };
    let claim_config = Config {
        name: "claim-binder".into(),
        concurrency: 8,
        resync: config.resync,
        ..Config::default()
    };
    let fenced_balancer = fenced.clone();
    let fenced_claims = fenced.clone();
    let fenced_schedules = fenced.clone();
    // The term's events go through the fenced store: a deposed leader's are refused too.
    let events = cobalt_store::Recorder::start(
        fenced.clone(),
        "cobalt-controller",
        &config.identity,
        config.event_ttl,
    );
    let scheduler = VolumeScheduler {
        store: fenced.clone(),
        machines: machines.clone(),
        alive: alive.clone(),
        strategy: config.strategy,
        metrics,
        last_write: tokio::sync::Mutex::new(0),
        passes: Default::default(),
        events: events.clone(),
    };
    let volume_controller =
        Controller::new(volumes.clone(), scheduler, volume_config)
            .with_metrics(reconcile_metrics.clone())
            // A machine change (capacity, labels, cordon) may make pending volumes placeable, and
            // concerns the volumes bound to it.
            // A machine's change concerns the volumes bound to it, and placement: one unbound
            // volume is enough, since reconciling any places every pending volume in one pass (a
            // key per pending volume made each of 1,000 machines' first reports queue every one).
            .watches(machines.clone(), {
                let volumes = volumes.clone();
                move |m: &Machine| {
                    let name = m.metadata.name.as_str();
                    let mut keys = volumes.names_where(|v| v.spec.machine.as_deref() == Some(name));
                    keys.extend(volumes.first_name_where(|v| {
                        v.spec.machine.is_none() && !v.metadata.is_deleting()
                    }));
                    keys
                }
            });
    let held: claims::Held = Default::default();
    let claim_controller = Controller::new(
        claims.clone(),
        claims::ClaimBinder {
            store: fenced_claims.clone(),
            volumes: volumes.clone(),
            alive: alive.clone(),
            held: held.clone(),
            events: events.clone(),
        },
        claim_config,
    )
    .with_metrics(reconcile_metrics.clone())
    .watches(volumes.clone(), {
        let claims = claims.clone();
        move |v: &Volume| claims::claims_for_volume(&claims, v)
    });
    let machine_controller = Controller::new(
        machines.clone(),
        MachineLifecycle {
            store: fenced,
            alive: alive.clone(),
            events,
        },
        machine_config,
    )
    .with_metrics(reconcile_metrics);
    let balancer = balancer::Balancer {
        store: fenced_balancer,
        volumes: volumes.clone(),
        machines: machines.clone(),
        alive: alive.clone(),
        // Binpack fills machines on purpose: evening them out would undo it. Drains run
        // under either strategy.
        policy: rebalance::Policy {
            enabled: config.rebalance.enabled && config.strategy == PlacementStrategy::Spread,
            ..config.rebalance.clone()
        },
    };
    tasks.push(tokio::spawn(balancer.run(term.clone())));
    tasks.push(tokio::spawn(schedules::run(
        fenced_schedules,
        volumes.clone(),
        snapshots,
        term.clone(),
    )));
    let requeue_volumes = volume_controller.requeue_handle();
    let requeue_machines = machine_controller.requeue_handle();
    tasks.push(tokio::spawn(volume_controller.run(term.clone())));
    tasks.push(tokio::spawn(machine_controller.run(term.clone())));
    tasks.push(tokio::spawn(claims::poll_holds(
        store.clone(),
        fenced_claims,
        claims,
        held,
        claim_controller.requeue_handle(),
        term.clone(),
    )));
    tasks.push(tokio::spawn(claim_controller.run(term.clone())));
    tasks.push(tokio::spawn(poll_liveness(
        store,
        alive,
        requeue_volumes,
        requeue_machines,
        term.clone(),
    )));
    term.cancelled().await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
}

/// Re-reads the alive keys; on any change requeues everything that depends on liveness.
async fn poll_liveness(
    store: Store,
    alive: Alive,
    volumes: cobalt_reconcile::RequeueHandle,
    machines: cobalt_reconcile::RequeueHandle,
    term: CancellationToken,
) {
    loop {
        match store.alive_machines().await {
            Ok(now) => {
                let changed = alive.read().map(|a| *a != now).unwrap_or(true);
                if changed {
                    tracing::info!(alive = ?now, "machine liveness changed");
                    if let Ok(mut a) = alive.write() {
                        *a = now;
                    }
                    machines.requeue_all().await;
                    volumes.requeue_all().await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "liveness poll failed"),
        }
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(LIVENESS_POLL) => {}
        }
    }
}
