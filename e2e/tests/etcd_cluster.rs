//! "When one etcd node fails, does the client switch automatically?" (an open question of the
//! origin documents). Three etcd members; two controllers and an agent, each given all three
//! endpoints. Each member is crashed in turn — the raft leader first — while the API is used:
//! creates and lists keep answering, the scheduler keeps binding, the agent keeps its lease (its
//! machine never leaves Ready) and provisions, and nothing is lost.

use std::process::Command;
use std::time::{Duration, Instant};

use cobalt_api::{Machine, MachinePhase, Volume, VolumePhase};
use cobalt_e2e::binary;
use cobalt_store::{EtcdConfig, Store};
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::etcd_cluster::EtcdCluster;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

fn controller(endpoints: &str, i: usize, port: u16) -> Daemon {
    let mut cmd = Command::new(binary("cobalt-controller"));
    cmd.args(["--etcd-endpoints", endpoints])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl", "3s", "--name", &format!("controller-{i}")]);
    Daemon::spawn(&mut cmd, &format!("controller-{i}"))
}

fn agent(endpoints: &str, pool: &BtrfsPool, state: &std::path::Path) -> Daemon {
    let mut cmd = Command::new(binary("cobalt-agent"));
    cmd.args(["--etcd-endpoints", endpoints, "--machine", "m1"])
        .args(["--address", "127.0.0.1", "--exporter", "none"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--lease-ttl", "3s"])
        .arg("--pool")
        .arg(pool.path())
        .arg("--state-dir")
        .arg(state);
    Daemon::spawn(&mut cmd, "agent-m1")
}

fn volume(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "cobalt.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": name}, "spec": {"size": "8Mi"}
    })
}

async fn ready_volume(store: &Store, name: &str) {
    until(
        &format!("volume {name} Ready"),
        Duration::from_secs(30),
        || async {
            let v: Volume = store.get(name).await.ok()??;
            (v.status?.phase == VolumePhase::Ready).then_some(())
        },
    )
    .await;
}

/// When the machine's Ready condition last changed (it must not, through the whole test).
async fn ready_since(store: &Store) -> Option<String> {
    let m: Machine = store.get("m1").await.ok()??;
    let s = m.status?;
    if s.phase != MachinePhase::Ready {
        return None;
    }
    let c = cobalt_api::find_condition(&s.conditions, "Ready")?;
    Some(c.last_transition_time.to_rfc3339())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_ride_out_the_crash_of_any_etcd_member_the_raft_leader_included() {
    cobalt_testkit::require("btrfs");
    let mut etcd = EtcdCluster::start(3);
    let all = etcd.endpoints().join(",");
    let store = Store::connect(&EtcdConfig::new(etcd.endpoints()))
        .await
        .unwrap();
    let pool = BtrfsPool::new(512);
    let state = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let _controllers = [controller(&all, 0, ports[0]), controller(&all, 1, ports[1])];
    let _agent = agent(&all, &pool, state.path());
    let since = until("machine m1 Ready", Duration::from_secs(30), || {
        ready_since(&store)
    })
    .await;
    let http = reqwest::Client::new();
    let api = |i: usize| format!("http://127.0.0.1:{}/apis/cobalt.io/v1alpha1", ports[i]);
    until("the API up", Duration::from_secs(30), || async {
        let r = http
            .post(format!("{}/volumes", api(0)))
            .json(&volume("v0"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    ready_volume(&store, "v0").await;

    let leader = etcd.leader().expect("a raft leader");
    let order = [leader, (leader + 1) % 3, (leader + 2) % 3];
    let mut first_success = Vec::new();
    for (round, member) in order.into_iter().enumerate() {
        etcd.stop(member);
        let name = format!("v{}", round + 1);
        // A create through the API succeeds: at once, or after the client has noticed.
        let t = Instant::now();
        until(
            &format!("a create with member {member} down"),
            Duration::from_secs(15),
            || async {
                let r = http
                    .post(format!("{}/volumes", api(round % 2)))
                    .json(&volume(&name))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .ok()?;
                (r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT)
                    .then_some(())
            },
        )
        .await;
        first_success.push(t.elapsed());
        // Once the stores have taken the member out (one probe interval), every request answers,
        // within the API's deadline, from either controller.
        // Failed over: every request answering for longer than a few of the stores' endpoint
        // probes (a streak that short could be luck before the probe; one this long is not).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut streak: Option<Instant> = None;
        for i in 0.. {
            let ok = http
                .get(format!("{}/volumes", api(i % 2)))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let now = Instant::now();
            match (ok, streak) {
                (true, Some(since)) if now - since > cobalt_store::ENDPOINT_PROBE * 3 => break,
                (true, None) => streak = Some(now),
                (true, Some(_)) => {}
                (false, _) => streak = None,
            }
            assert!(
                now < deadline,
                "the stores never failed over from member {member}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in 0..20 {
            let t = Instant::now();
            let r = http
                .get(format!("{}/volumes", api(i % 2)))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap();
            let code = r.status();
            let body = r.text().await.unwrap_or_default();
            assert!(
                code.is_success(),
                "list {i} with member {member} down: {code}: {body}"
            );
            assert!(
                t.elapsed() < Duration::from_millis(2500),
                "answered in {:?}",
                t.elapsed()
            );
        }
        // The scheduler binds it, the agent provisions it.
        ready_volume(&store, &name).await;
        until("a scheduler leads", Duration::from_secs(10), || async {
            store.leader("scheduler").await.ok()?.map(|_| ())
        })
        .await;
        assert_eq!(
            ready_since(&store).await.as_deref(),
            Some(since.as_str()),
            "the agent kept its lease: machine m1 never left Ready"
        );
        etcd.start_again(member);
    }
    eprintln!("first successful create after each member crash: {first_success:?}");
    let (volumes, _) = store.list::<Volume>(&Default::default()).await.unwrap();
    let ready: Vec<&str> = volumes
        .iter()
        .filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == VolumePhase::Ready)
        })
        .map(|v| v.metadata.name.as_str())
        .collect();
    assert_eq!(ready, ["v0", "v1", "v2", "v3"], "nothing lost");
}
