//! The seeds' system tests on a real three-machine cluster (see `cobalt_e2e`).

use std::time::{Duration, Instant};

use cobalt_api::{MachinePhase, Volume};
use cobalt_e2e::{out, Cluster, TTL};
use cobalt_testkit::wait::until;

const MIB: u64 = 1 << 20;

fn volume_yaml(name: &str, size: &str, selector: &str, client: &str, access: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: {size}\n  placement: {{selector: {{{selector}}}}}\n  export:\n    clients: [{{host: {client}, access: {access}, rootSquash: false}}]\n"
    )
}

async fn apply(c: &mut Cluster, dir: &tempfile::TempDir, file: &str, text: &str) {
    let path = dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    let o = c.ctl(&["apply", "-f", &path.display().to_string()]).await;
    assert!(o.status.success(), "{}", out(&o));
}

async fn ready(c: &mut Cluster, name: &str) -> Volume {
    let o = c
        .ctl(&[
            "wait",
            &format!("volume/{name}"),
            "--for=condition=Ready",
            "--timeout=60s",
        ])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    c.store.get::<Volume>(name).await.unwrap().unwrap()
}

async fn machines_ready(c: &Cluster, n: usize) {
    until("machines Ready", Duration::from_secs(30), || async {
        let (ms, _) = c
            .store
            .list::<cobalt_api::Machine>(&Default::default())
            .await
            .ok()?;
        let ready = ms
            .iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MachinePhase::Ready && s.capacity.total_bytes > 0)
            })
            .count();
        (ready == n).then_some(())
    })
    .await;
}

fn server(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.endpoint.as_ref())
        .map(|e| e.server.clone())
        .expect("an endpoint")
}

fn machine_of(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.machine.clone())
        .expect("placed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_places_serves_clones_resizes_and_deletes_leaving_nothing() {
    let mut c = Cluster::start("spread").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    let manifest = [
        volume_yaml("fast-a", "64Mi", "disk: ssd", &client, "rw"),
        volume_yaml("fast-b", "64Mi", "disk: ssd", &client, "rw"),
        volume_yaml("slow", "64Mi", "disk: hdd", &client, "rw"),
    ]
    .join("---\n");
    apply(&mut c, &dir, "volumes.yaml", &manifest).await;
    let (a, b, slow) = (
        ready(&mut c, "fast-a").await,
        ready(&mut c, "fast-b").await,
        ready(&mut c, "slow").await,
    );
    let (ma, mb) = (machine_of(&a), machine_of(&b));
    assert!(
        ["m1", "m2"].contains(&ma.as_str()) && ["m1", "m2"].contains(&mb.as_str()) && ma != mb,
        "spread over the ssd machines: {ma} {mb}"
    );
    assert_eq!(machine_of(&slow), "m3");

    // NFS from the client host, at the endpoint in status.
    c.nfs_put(&server(&a), "fast-a/notes.txt", "written over nfs\n")
        .expect("write over NFS");
    assert_eq!(
        c.nfs_cat(&server(&a), "fast-a/notes.txt").unwrap(),
        "written over nfs\n"
    );

    // Clone: on the source's machine, with the source's files.
    let clone = volume_yaml("fast-a-copy", "64Mi", "disk: ssd", &client, "ro")
        .replace("  placement:", "  source: {volume: fast-a}\n  placement:");
    apply(&mut c, &dir, "clone.yaml", &clone).await;
    let copy = ready(&mut c, "fast-a-copy").await;
    assert_eq!(machine_of(&copy), ma);
    let copied = until("the clone's export", Duration::from_secs(20), || async {
        c.nfs_cat(&server(&copy), "fast-a-copy/notes.txt").ok()
    })
    .await;
    assert_eq!(copied, "written over nfs\n");

    // Resize through the manifest.
    apply(
        &mut c,
        &dir,
        "volumes.yaml",
        &manifest.replacen("size: 64Mi", "size: 128Mi", 1),
    )
    .await;
    until("the new limit", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("fast-a").await.ok()??;
        (v.status?.usage?.limit_bytes == 128 * MIB).then_some(())
    })
    .await;

    // Delete everything: nothing is left on any pool.
    for name in ["fast-a-copy", "fast-a", "fast-b", "slow"] {
        let o = c
            .ctl(&["delete", "volume", name, "--wait", "--timeout=60s"])
            .await;
        assert!(o.status.success(), "{}", out(&o));
    }
    for m in &c.machines {
        assert!(
            m.volumes_on_disk().is_empty(),
            "{} still holds {:?}",
            m.name,
            m.volumes_on_disk()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_permission_change_flips_client_access() {
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    apply(
        &mut c,
        &dir,
        "v.yaml",
        &volume_yaml("shared", "32Mi", "zone: a", &client, "ro"),
    )
    .await;
    let v = ready(&mut c, "shared").await;
    let srv = server(&v);
    // Exported read-only: the write is refused as read-only (not as a missing export).
    let refused = c
        .nfs_put(&srv, "shared/x.txt", "nope")
        .expect_err("read-only: writes refused");
    assert!(refused.contains("read-only"), "{refused}");
    apply(
        &mut c,
        &dir,
        "v.yaml",
        &volume_yaml("shared", "32Mi", "zone: a", &client, "rw"),
    )
    .await;
    until("write access", Duration::from_secs(20), || async {
        c.nfs_put(&srv, "shared/x.txt", "now yes\n").ok()
    })
    .await;
    assert_eq!(c.nfs_cat(&srv, "shared/x.txt").unwrap(), "now yes\n");
    let v: Volume = c.store.get("shared").await.unwrap().unwrap();
    let exported = v
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Exported")
        .unwrap();
    assert!(
        exported.message.contains(&format!("{client} rw")),
        "watchers see the new rules: {}",
        exported.message
    );
    let o = c.ctl(&["delete", "volume", "shared", "--wait"]).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        c.nfs_cat(&srv, "shared/x.txt").is_err(),
        "the export goes with the volume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_scheduler_leader_dies_the_other_controller_schedules_within_ttl_plus_one_second()
{
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let leader = until("a leader", Duration::from_secs(15), || async {
        c.store.leader("scheduler").await.ok().flatten()
    })
    .await;
    let index: usize = leader.trim_start_matches("controller-").parse().unwrap();
    c.controllers[index].0.kill();
    let killed = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    apply(
        &mut c,
        &dir,
        "v.yaml",
        &volume_yaml("after-failover", "16Mi", "zone: a", &client, "rw"),
    )
    .await;
    until(
        "the volume to be bound",
        Duration::from_secs(20),
        || async {
            c.store
                .get::<Volume>("after-failover")
                .await
                .ok()??
                .spec
                .machine
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= TTL + Duration::from_secs(1),
        "failover took {took:?}"
    );
    ready(&mut c, "after-failover").await;
}

/// Moving a provisioned volume's data is not built yet; asking for it must never produce an
/// empty copy elsewhere. The data stays served where it is and a condition says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_volume_bound_to_another_machine_stays_with_its_data_and_says_why() {
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    let manifest = volume_yaml("kept", "32Mi", "disk: ssd", &client, "rw");
    apply(&mut c, &dir, "v.yaml", &manifest).await;
    let v = ready(&mut c, "kept").await;
    let (from, srv) = (machine_of(&v), server(&v));
    let data = cobalt_testkit::nfs::pattern(5, 3 << 20);
    c.nfs_write(&srv, "kept/data.bin", &data)
        .expect("3 MiB over NFS");
    let to = if from == "m1" { "m2" } else { "m1" };

    // The user edits spec.machine, as a GitOps pipeline would.
    let pinned = manifest.replace("  placement:", &format!("  machine: {to}\n  placement:"));
    apply(&mut c, &dir, "v.yaml", &pinned).await;
    let v = until("the Moving condition", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("kept").await.ok()??;
        let s = v.status.as_ref()?;
        let moving = cobalt_api::find_condition(&s.conditions, "Moving")?;
        (moving.reason == "MoveNotSupported" && s.observed_generation == v.metadata.generation)
            .then_some(v)
    })
    .await;
    let s = v.status.as_ref().unwrap();
    assert_eq!(s.phase, cobalt_api::VolumePhase::Ready, "still served");
    assert_eq!(s.machine.as_deref(), Some(from.as_str()), "the data stays");
    assert_eq!(server(&v), srv, "the endpoint stays");
    let message = &cobalt_api::find_condition(&s.conditions, "Moving")
        .unwrap()
        .message;
    assert!(message.contains(to) && message.contains(&from), "{message}");
    assert!(
        c.nfs_read(&srv, "kept/data.bin").unwrap() == data,
        "the data is still served, byte for byte, from {from}"
    );
    assert!(
        c.machine(to).volumes_on_disk().is_empty(),
        "no empty copy on {to}"
    );
    // The source's agent restarting changes nothing: still no copy, still served.
    c.machine(&from).kill_agent();
    let etcd = c.etcd.endpoints()[0].clone();
    c.machine(&from).start_agent(&etcd);
    c.machine(to).kill_agent();
    c.machine(to).start_agent(&etcd);
    machines_ready(&c, 3).await;
    // A spec change both restarted agents see; once the source has reported it, the target
    // has had the same event.
    let edited = pinned.replace("size: 32Mi", "size: 48Mi");
    apply(&mut c, &dir, "v.yaml", &edited).await;
    let again = until("the resize reported", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("kept").await.ok()??;
        let s = v.status.as_ref()?;
        (s.observed_generation == v.metadata.generation
            && s.usage.as_ref()?.limit_bytes == 48 * MIB)
            .then_some(v)
    })
    .await;
    assert_eq!(machine_of(&again), from);
    assert!(c.machine(to).volumes_on_disk().is_empty());
    assert!(c.nfs_read(&srv, "kept/data.bin").unwrap() == data);

    // Deleting it deletes the data where it is.
    let o = c
        .ctl(&["delete", "volume", "kept", "--wait", "--timeout=60s"])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(c.machine(&from).volumes_on_disk().is_empty());
}
