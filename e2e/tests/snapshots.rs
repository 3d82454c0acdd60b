//! Snapshots on the real three-machine cluster: take one with `cobaltctl snapshot`, change the
//! volume, restore the snapshot into a new volume and read the old content over NFS; what a
//! volume with snapshots may not do (be deleted, move); a schedule that prunes to `keep` and goes
//! on, unrepeated, when the leader running it is killed; space
//! counted in the ledger; and the agent killed while a snapshot is taken and while one is freed.

use std::time::Duration;

use cobalt_api::{Snapshot, SnapshotPhase, Volume};
use cobalt_e2e::{out, server_of, Cluster};
use cobalt_testkit::nfs::pattern;
use cobalt_testkit::wait::until;

const DATA: usize = 4 << 20;

fn yaml(name: &str, extra: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: 64Mi\n{extra}  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
    )
}

fn holder(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.machine.clone())
        .expect("provisioned")
        .to_string()
}

async fn snapshot(c: &Cluster, name: &str) -> Option<Snapshot> {
    c.store.get::<Snapshot>(name).await.unwrap()
}

/// The scheduled snapshots of `volume` as stored (not being deleted), oldest first.
async fn scheduled(c: &Cluster, volume: &str) -> Vec<Snapshot> {
    let (all, _) = c.store.list::<Snapshot>(&Default::default()).await.unwrap();
    let mut mine: Vec<Snapshot> = all
        .into_iter()
        .filter(|s| {
            s.spec.volume == volume
                && s.metadata
                    .labels
                    .contains_key(cobalt_api::snapshot::SCHEDULED_LABEL)
                && !s.metadata.is_deleting()
        })
        .collect();
    mine.sort_by_key(|s| s.metadata.creation_timestamp);
    mine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_old_content_over_nfs_blocks_delete_and_moves_and_schedules_prune() {
    let mut c = Cluster::start_with_agent_args("spread", &["--usage-refresh", "1s"]).await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    c.apply_text(&yaml("db", "", &client)).await;
    let db = c.wait_ready("db", "60s").await;
    let (server, on) = (server_of(&db), holder(&db));
    let before = pattern(1, DATA);
    c.nfs_write(&server, "db/data.bin", &before).unwrap();

    // Take it and wait: Ready, on the volume's machine, read-only on disk.
    let o = c
        .ctl(&["snapshot", "volume/db", "--name", "db-before", "--wait"])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains(&format!("ready on machine {on}")),
        "{}",
        out(&o)
    );
    let snap = snapshot(&c, "db-before").await.unwrap();
    let st = snap.status.clone().unwrap();
    assert_eq!(st.phase, SnapshotPhase::Ready);
    assert_eq!(st.volume_uid.as_deref(), Some(db.metadata.uid.as_str()));
    assert!(st.size_bytes.unwrap() >= DATA as u64, "{st:?}");
    assert_eq!(
        c.machine(&on).snapshots_on_disk(&db.metadata.uid),
        std::slice::from_ref(&snap.metadata.uid)
    );
    let on_disk = c
        .machine(&on)
        .pool
        .path()
        .join("snapshots")
        .join(&db.metadata.uid)
        .join(&snap.metadata.uid)
        .join("data.bin");
    assert_eq!(std::fs::read(&on_disk).unwrap(), before);
    assert!(
        std::fs::write(&on_disk, b"x").is_err(),
        "the snapshot is read-only on disk"
    );
    let got = c
        .ctl(&["get", "snapshots", "-l", "cobalt.io/volume=db"])
        .await;
    assert!(out(&got).contains("db-before"), "{}", out(&got));

    let after = pattern(2, DATA);
    c.nfs_write(&server, "db/data.bin", &after).unwrap();
    // The overwritten data is the snapshot's alone (until a restore shares it): counted on the
    // volume and in the machine's ledger.
    until(
        "snapshot bytes counted",
        Duration::from_secs(30),
        || async {
            let v: Volume = c.store.get("db").await.ok()??;
            (v.snapshot_bytes() >= (DATA as u64) / 2).then_some(())
        },
    )
    .await;
    until(
        "the machine's ledger counts them",
        Duration::from_secs(30),
        || async {
            let m: cobalt_api::Machine = c.store.get(&on).await.ok()??;
            let reserved = m.status?.capacity.reserved_bytes;
            let (all, _) = c.store.list::<Volume>(&Default::default()).await.ok()?;
            let sizes: u64 = all
                .iter()
                .filter(|v| v.ledger_machines().any(|x| x == on))
                .map(|v| v.ledger_bytes())
                .sum();
            (reserved >= sizes + (DATA as u64) / 2).then_some(())
        },
    )
    .await;

    // Restore the snapshot into a new volume: the old content, served over NFS from the
    // snapshot's machine, and the volume keeps its new content.
    c.apply_text(&yaml(
        "db-restored",
        "  source: {snapshot: db-before}\n",
        &client,
    ))
    .await;
    let restored = c.wait_ready("db-restored", "60s").await;
    assert_eq!(
        holder(&restored),
        on,
        "a restore is made where its snapshot is"
    );
    assert_eq!(
        c.nfs_read(&server_of(&restored), "db-restored/data.bin")
            .unwrap(),
        before
    );
    assert_eq!(c.nfs_read(&server, "db/data.bin").unwrap(), after);

    // A volume with snapshots is not deleted, and does not move.
    let o = c.ctl(&["delete", "volume/db"]).await;
    assert!(!o.status.success());
    assert!(out(&o).contains("db-before"), "{}", out(&o));
    let other = ["m1", "m2", "m3"].into_iter().find(|m| *m != on).unwrap();
    let o = c.ctl(&["move", "volume/db", "--to", other]).await;
    assert!(o.status.success(), "{}", out(&o));
    until(
        "the move waits for the snapshots",
        Duration::from_secs(20),
        || async {
            let v: Volume = c.store.get("db").await.ok()??;
            let moving = cobalt_api::find_condition(&v.status.as_ref()?.conditions, "Moving")?;
            (moving.reason == "HasSnapshots" && v.moving().is_none()).then_some(())
        },
    )
    .await;
    let o = c.ctl(&["move", "volume/db", "--to", &on]).await;
    assert!(o.status.success(), "{}", out(&o));

    // A schedule takes snapshots and prunes the oldest beyond keep.
    c.apply_text(&yaml(
        "sched",
        "  snapshots: {every: 2s, keep: 2}\n",
        &client,
    ))
    .await;
    let sched = c.wait_ready("sched", "60s").await;
    // Every scheduled snapshot seen, with when it was created.
    let mut seen = std::collections::BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = scheduled(&c, "sched").await;
        seen.extend(
            now.iter()
                .map(|s| (s.metadata.name.clone(), s.metadata.creation_timestamp)),
        );
        if seen.len() >= 4 && now.len() <= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the schedule took {seen:?}; {} are kept",
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The schedule is the leader's: killed, the other controller takes over and neither repeats
    // nor forgets it — it goes on, never two scheduled snapshots less than `every` apart.
    let leader = c.leader_index().await;
    c.controllers[leader].0.kill();
    let taken_before = seen.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < taken_before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the schedule stopped with its leader: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = scheduled(&c, "sched").await;
        seen.extend(
            now.iter()
                .map(|s| (s.metadata.name.clone(), s.metadata.creation_timestamp)),
        );
    }
    let mut created: Vec<_> = seen.values().map(|t| t.expect("created")).collect();
    created.sort();
    for pair in created.windows(2) {
        let gap = (pair[1] - pair[0]).to_std().unwrap();
        assert!(
            gap >= Duration::from_millis(1900),
            "two scheduled snapshots {gap:?} apart: {seen:?}"
        );
    }

    // Slow the schedule down: no new ones for an hour, and exactly `keep` remain, in etcd and on
    // disk.
    c.apply_text(&yaml(
        "sched",
        "  snapshots: {every: 1h, keep: 2}\n",
        &client,
    ))
    .await;
    let sched_on = holder(&sched);
    let left = until("pruned to keep", Duration::from_secs(30), || async {
        let now = scheduled(&c, "sched").await;
        let on_disk = c
            .machines
            .iter()
            .find(|m| m.name == sched_on)?
            .snapshots_on_disk(&sched.metadata.uid);
        (now.len() == 2 && now.iter().all(Snapshot::ready) && on_disk.len() == 2).then_some(now)
    })
    .await;
    let names: Vec<&str> = left.iter().map(|s| s.metadata.name.as_str()).collect();
    assert!(
        names.iter().all(|n| n.starts_with("sched-")),
        "scheduled names: {names:?}"
    );

    // Deleting with --with-snapshots frees both; the restore is independent and stays.
    let o = c
        .ctl(&["delete", "volume/db", "--with-snapshots", "--wait"])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(snapshot(&c, "db-before").await.is_none());
    assert!(!c.machine(&on).volumes_on_disk().contains(&db.metadata.uid));
    assert!(c
        .machine(&on)
        .snapshots_on_disk(&db.metadata.uid)
        .is_empty());
    assert_eq!(
        c.nfs_read(&server_of(&restored), "db-restored/data.bin")
            .unwrap(),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_while_snapshotting_or_freeing_one_loses_no_data() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    let etcd = c.etcd.endpoints()[0].clone();
    let client = c.client.addr.to_string();
    c.apply_text(&yaml("app", "", &client)).await;
    let app = c.wait_ready("app", "60s").await;
    let (server, on) = (server_of(&app), holder(&app));
    let data = pattern(3, DATA);
    c.nfs_write(&server, "app/data.bin", &data).unwrap();

    // Killed right after the snapshot is asked for: the restarted agent takes it exactly once.
    c.store
        .create(&Snapshot::new("app-1", "app"))
        .await
        .unwrap();
    c.machine(&on).kill_agent();
    c.machine(&on).start_agent(&etcd);
    until(
        "app-1 taken after the restart",
        Duration::from_secs(60),
        || async { snapshot(&c, "app-1").await.filter(Snapshot::ready) },
    )
    .await;
    let v: Volume = c.store.get("app").await.unwrap().unwrap();
    assert_eq!(v.snapshot_names(), ["app-1"]);
    assert_eq!(c.machine(&on).snapshots_on_disk(&app.metadata.uid).len(), 1);

    // The second line of defence: a delete that bypasses the API's check (a race with a
    // snapshot create) does not destroy the data while the snapshot exists.
    let _ = c.store.delete::<Volume>("app", None).await.unwrap();
    until(
        "the volume is unexported and kept",
        Duration::from_secs(30),
        || async {
            let v: Volume = c.store.get("app").await.ok()??;
            (v.status?.phase == cobalt_api::VolumePhase::Deleting).then_some(())
        },
    )
    .await;
    until(
        "the agent refuses to destroy it",
        Duration::from_secs(30),
        || async {
            let m = c.machines.iter().find(|m| m.name == on)?;
            m.agent_log().contains("still has snapshots").then_some(())
        },
    )
    .await;
    assert!(c.machine(&on).volumes_on_disk().contains(&app.metadata.uid));

    // Killed while the snapshot is being freed: the restarted agent finishes; the volume's data
    // is untouched until then, and then goes with its delete.
    let _ = c.store.delete::<Snapshot>("app-1", None).await.unwrap();
    c.machine(&on).kill_agent();
    assert!(
        c.machine(&on).volumes_on_disk().contains(&app.metadata.uid),
        "the volume's data is intact while its snapshot's deletion is interrupted"
    );
    c.machine(&on).start_agent(&etcd);
    until(
        "snapshot and volume gone",
        Duration::from_secs(60),
        || async {
            let s = snapshot(&c, "app-1").await;
            let v: Option<Volume> = c.store.get("app").await.ok()?;
            (s.is_none() && v.is_none()).then_some(())
        },
    )
    .await;
    assert!(c
        .machine(&on)
        .snapshots_on_disk(&app.metadata.uid)
        .is_empty());
    assert!(!c.machine(&on).volumes_on_disk().contains(&app.metadata.uid));
}
