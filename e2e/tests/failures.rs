//! The seeds' failure scenarios on the three-machine cluster: agent killed, agent partitioned,
//! etcd down at runtime and at start.

use std::time::{Duration, Instant};

use cobalt_api::{find_condition, Machine, MachinePhase, Volume, VolumePhase};
use cobalt_e2e::{out, Cluster};
use cobalt_testkit::wait::until;

fn yaml(name: &str, selector: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: 64Mi\n  placement: {{selector: {{{selector}}}}}\n  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
    )
}

async fn apply(c: &mut Cluster, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, text).unwrap();
    let o = c.ctl(&["apply", "-f", &path.display().to_string()]).await;
    assert!(o.status.success(), "{}", out(&o));
}

async fn volume(c: &Cluster, name: &str) -> Option<Volume> {
    c.store.get::<Volume>(name).await.ok().flatten()
}

async fn ready_on(c: &Cluster, name: &str, deadline: Duration) -> Volume {
    until(&format!("{name} Ready"), deadline, || async {
        let v = volume(c, name).await?;
        let s = v.status.as_ref()?;
        (s.phase == VolumePhase::Ready
            && find_condition(&s.conditions, "Ready").is_some_and(|r| r.is_true()))
        .then_some(v)
    })
    .await
}

async fn machine_phase(c: &Cluster, name: &str) -> Option<MachinePhase> {
    c.store
        .get::<Machine>(name)
        .await
        .ok()
        .flatten()?
        .status
        .map(|s| s.phase)
}

async fn all_machines_ready(c: &Cluster) {
    until("three Ready machines", Duration::from_secs(40), || async {
        for m in ["m1", "m2", "m3"] {
            if machine_phase(c, m).await != Some(MachinePhase::Ready) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

fn endpoint(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.endpoint.as_ref())
        .map(|e| e.server.clone())
        .unwrap()
        .to_string()
}

/// Shared by the killed and the partitioned agent: m1 goes away with a provisioned volume
/// ("kept") and a volume bound to it that it never provisioned ("pending").
async fn machine_loss(
    c: &mut Cluster,
    lose: impl Fn(&mut Cluster),
    restore: impl Fn(&mut Cluster),
) {
    all_machines_ready(c).await;
    let client = c.client.addr.to_string();
    apply(c, &yaml("kept", "disk: ssd, zone: a", &client)).await;
    let kept = ready_on(c, "kept", Duration::from_secs(60)).await;
    assert_eq!(kept.status.as_ref().unwrap().machine.as_deref(), Some("m1"));
    let kept_uid = kept.metadata.uid.clone();
    let server = endpoint(&kept);
    c.nfs_put(&server, "kept/data.txt", "precious\n")
        .expect("write");

    lose(c);
    // Bound while m1's lease has not yet expired: binpack picks the fuller zone-a machine, m1.
    apply(c, &yaml("pending", "zone: a", &client)).await;
    let bound = until("pending to be bound", Duration::from_secs(10), || async {
        volume(c, "pending").await?.spec.machine
    })
    .await;

    until("m1 NotReady", Duration::from_secs(30), || async {
        (machine_phase(c, "m1").await == Some(MachinePhase::NotReady)).then_some(())
    })
    .await;
    let m1: Machine = c.store.get("m1").await.unwrap().unwrap();
    assert_eq!(
        find_condition(&m1.status.unwrap().conditions, "Ready")
            .unwrap()
            .reason,
        "LeaseExpired"
    );
    let pending = ready_on(c, "pending", Duration::from_secs(60)).await;
    let pending_machine = pending.status.as_ref().unwrap().machine.clone().unwrap();
    assert_eq!(
        pending_machine, "m3",
        "an unprovisioned volume moves off the lost machine (first bound to {bound})"
    );
    let lost = until("kept Lost", Duration::from_secs(30), || async {
        volume(c, "kept").await.filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == VolumePhase::Lost)
        })
    })
    .await;
    assert_eq!(
        find_condition(&lost.status.as_ref().unwrap().conditions, "Ready")
            .unwrap()
            .reason,
        "MachineLost"
    );
    assert_eq!(
        lost.spec.machine.as_deref(),
        Some("m1"),
        "never moved away from its data"
    );
    assert!(
        c.machine("m1").volumes_on_disk().contains(&kept_uid),
        "never deleted"
    );

    restore(c);
    let back = ready_on(c, "kept", Duration::from_secs(60)).await;
    assert_eq!(back.status.as_ref().unwrap().machine.as_deref(), Some("m1"));
    let data = until("the data over NFS", Duration::from_secs(20), || async {
        c.nfs_cat(&server, "kept/data.txt").ok()
    })
    .await;
    assert_eq!(data, "precious\n");
    // No volume on two machines.
    let pending_uid = pending.metadata.uid.clone();
    let holders: Vec<String> = c
        .machines
        .iter()
        .filter(|m| m.volumes_on_disk().contains(&pending_uid))
        .map(|m| m.name.clone())
        .collect();
    assert_eq!(holders, ["m3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_loses_its_machine_and_gets_it_back_with_data_intact() {
    let mut c = Cluster::start("binpack").await;
    let etcd = c.etcd.endpoints()[0].clone();
    machine_loss(
        &mut c,
        |c| c.machine("m1").kill_agent(),
        move |c| c.machine("m1").start_agent(&etcd),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agent_loses_its_machine_and_heals_without_duplicates() {
    let mut c = Cluster::start("binpack").await;
    machine_loss(
        &mut c,
        |c| c.machine("m1").host.link(false),
        |c| c.machine("m1").host.link(true),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_at_runtime_the_api_says_503_nfs_keeps_serving_and_all_recovers() {
    let mut c = Cluster::start("spread").await;
    all_machines_ready(&c).await;
    let client = c.client.addr.to_string();
    apply(&mut c, &yaml("steady", "zone: a", &client)).await;
    let v = ready_on(&c, "steady", Duration::from_secs(60)).await;
    let server = endpoint(&v);
    c.nfs_put(&server, "steady/f.txt", "kept serving\n")
        .unwrap();
    let on_disk: Vec<Vec<String>> = c.machines.iter().map(|m| m.volumes_on_disk()).collect();

    c.etcd.stop();
    let start = Instant::now();
    let o = c.ctl(&["get", "volumes"]).await;
    assert!(
        !o.status.success() && out(&o).contains("503"),
        "{}",
        out(&o)
    );
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "answered in {:?}",
        start.elapsed()
    );
    assert_eq!(
        c.nfs_cat(&server, "steady/f.txt").unwrap(),
        "kept serving\n",
        "NFS serves while etcd is down"
    );
    // Past every lease TTL, nothing is deleted or unexported.
    let outage = Instant::now();
    until(
        "an outage longer than the TTL",
        Duration::from_secs(10),
        || async { (outage.elapsed() > Duration::from_secs(5)).then_some(()) },
    )
    .await;
    assert_eq!(
        c.nfs_cat(&server, "steady/f.txt").unwrap(),
        "kept serving\n"
    );
    assert_eq!(
        c.machines
            .iter()
            .map(|m| m.volumes_on_disk())
            .collect::<Vec<_>>(),
        on_disk
    );

    c.etcd.start_again();
    all_machines_ready(&c).await;
    apply(&mut c, &yaml("after", "zone: b", &client)).await;
    ready_on(&c, "after", Duration::from_secs(60)).await;
    ready_on(&c, "steady", Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_at_start_the_daemons_wait_and_become_ready_by_themselves() {
    let mut c = Cluster::start_with_etcd_down("spread").await;
    // The API listens without etcd (and says it is not ready).
    c.controller_serving(0).await;
    let api = format!("http://127.0.0.1:{}", c.controllers[0].1);
    let readyz = format!("{api}/readyz");
    let o = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &readyz])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "503",
        "not ready without etcd"
    );
    for m in c.machines.iter_mut() {
        assert!(
            m.agent_running(),
            "{}'s agent must keep running without etcd",
            m.name
        );
    }
    c.etcd.start_again();
    all_machines_ready(&c).await;
    let client = c.client.addr.to_string();
    apply(&mut c, &yaml("late", "disk: hdd", &client)).await;
    ready_on(&c, "late", Duration::from_secs(60)).await;
}
