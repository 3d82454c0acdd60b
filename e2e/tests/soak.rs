//! The short soak (`make soak` runs the long one and reports slopes): a minute of churn with
//! every daemon resyncing each second, then every volume deleted. What a leak would leave
//! behind must be gone: etcd holds the keys it held before (events aside: they expire by TTL
//! and are bounded in count), and every daemon's open descriptors and live tasks are back near
//! where they were with the same (empty) set of volumes.

use std::time::Duration;

use cobalt_e2e::soak::{self, Sample};
use cobalt_e2e::Cluster;
use cobalt_testkit::wait::until;

/// Descriptors or tasks a daemon may hold beyond its idle count at the end (connections and
/// timers that come and go).
const SLACK: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_with_fast_resyncs_leaves_no_keys_descriptors_or_tasks_behind() {
    let mut c = Cluster::start_with_args("spread", &["--resync", "1s"], &["--resync", "1s"]).await;
    c.machines_ready(3).await;
    for i in 0..c.controllers.len() {
        c.controller_serving(i).await;
    }
    let daemons = soak::daemons(&c);
    assert_eq!(daemons.len(), 5, "two controllers and three agents");
    // Idle, before any volume: the baseline.
    // The scheduler runs on the leader only, and some tasks start with the first volume:
    // the baseline is taken once there is a leader, after a few seconds of churn, idle again.
    c.leader_index().await;
    soak::run(
        &mut c,
        Duration::from_secs(3),
        Duration::from_secs(1),
        4,
        false,
    )
    .await;
    delete_all(&mut c).await;
    let before = settled_sample(&c, &daemons).await;

    let secs = std::env::var("COBALT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let run = soak::run(
        &mut c,
        Duration::from_secs(secs),
        Duration::from_secs(5),
        4,
        false,
    )
    .await;
    eprintln!(
        "soak: {} cycles ({} failed) in {secs} s",
        run.cycles, run.failed_cycles
    );
    assert!(run.cycles >= 10, "too little churn: {run:?}");
    assert_eq!(run.failed_cycles, 0, "churn failed: {run:?}");
    let during = run.samples.last().cloned().unwrap().1;

    delete_all(&mut c).await;

    // Keys: exactly the idle set. Descriptors and tasks: back near it (polled: a deleted
    // volume's last tasks end a moment after its object is gone).
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = soak::sample(&c.store, &daemons).await;
        if leftovers(&before, &now).is_empty() || std::time::Instant::now() > end {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("soak: idle {before:?}\nsoak: under churn {during:?}\nsoak: after {after:?}");
    let left = leftovers(&before, &after);
    assert!(left.is_empty(), "left behind after 30 s idle: {left:?}");
}

/// A sample once the daemons' task counts are readable (their HTTP servers are up).
async fn settled_sample(c: &Cluster, daemons: &[soak::Watched]) -> Sample {
    until(
        "every daemon's /metrics",
        Duration::from_secs(30),
        || async {
            let s = soak::sample(&c.store, daemons).await;
            daemons
                .iter()
                .all(|d| s.contains_key(&format!("{}.tasks", d.name)))
                .then_some(s)
        },
    )
    .await
}

/// What `after` holds beyond `before`: etcd keys (exact), descriptors and tasks (within SLACK).
/// The controllers as one group (leadership, and the scheduler's tasks with it, may move from
/// one to the other during the churn); agents and etcd as they are.
fn grouped(s: &Sample) -> Sample {
    let mut out = Sample::new();
    for (k, v) in s {
        let key = match k.split_once('.') {
            Some((d, m)) if d.starts_with("controller-") => format!("controllers.{m}"),
            _ => k.clone(),
        };
        *out.entry(key).or_default() += v;
    }
    out
}

fn leftovers(before: &Sample, after: &Sample) -> Vec<String> {
    let (before, after) = (&grouped(before), &grouped(after));
    let mut out = Vec::new();
    for (k, v) in before {
        let Some(now) = after.get(k) else {
            out.push(format!("{k}: no longer measured"));
            continue;
        };
        let allowed = if k == "etcd.keys" {
            *v
        } else if k.ends_with(".fds") || k.ends_with(".tasks") {
            v + SLACK
        } else {
            continue;
        };
        if *now > allowed {
            out.push(format!("{k}: {v} idle before, {now} idle after"));
        }
    }
    out
}

/// Deletes every volume and waits until none is left.
async fn delete_all(c: &mut Cluster) {
    let (volumes, _) = c
        .store
        .list::<cobalt_api::Volume>(&Default::default())
        .await
        .unwrap();
    // The churn's last deletes may still be under way: those are left to finish.
    for v in volumes
        .iter()
        .filter(|v| v.metadata.deletion_timestamp.is_none())
    {
        let o = c
            .ctl(&["delete", &format!("volume/{}", v.metadata.name)])
            .await;
        let text = cobalt_e2e::out(&o);
        assert!(o.status.success() || text.contains("not found"), "{text}");
    }
    c.volumes_ready(0, Duration::from_secs(60)).await;
}
