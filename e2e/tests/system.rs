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
    assert!(refused.contains("ROFS"), "{refused}");
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
