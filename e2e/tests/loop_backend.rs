//! The loop backend on the real cluster: m3 keeps its volumes as ext4 images on loop devices.
//! A volume selected onto it is served over NFS like a btrfs one; a compressed volume is kept
//! off it with a reason; a clone is a consistent copy; a move to a btrfs machine is refused with
//! a reason; after a "reboot" of m3 (agent and exporter killed, mounts and loop devices gone) the
//! restarted agent serves the data again; delete leaves no image and no loop device.

use std::time::Duration;

use cobalt_api::{find_condition, Machine, Volume};
use cobalt_e2e::{out, server_of, Cluster};
use cobalt_testkit::nfs::pattern;
use cobalt_testkit::wait::until;

fn yaml(name: &str, extra: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: 64Mi\n  placement: {{selector: {{cobalt.io/backend: loop}}}}\n{extra}  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
    )
}

fn images(c: &mut Cluster) -> Vec<String> {
    let (dir, _) = c
        .machine("m3")
        .loop_backend
        .as_ref()
        .expect("a loop machine");
    let mut names: Vec<String> = std::fs::read_dir(dir.pool())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".img"))
        .collect();
    names.sort();
    names
}

fn loop_devices_on(c: &mut Cluster) -> usize {
    let (dir, _) = c.machine("m3").loop_backend.as_ref().unwrap();
    let pool = dir.pool();
    let o = std::process::Command::new("losetup")
        .args(["-l", "-n", "-O", "BACK-FILE"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| std::path::Path::new(l.trim()).parent() == Some(pool.as_path()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_volumes_are_served_over_nfs_cloned_kept_across_a_reboot_and_deleted_cleanly() {
    let mut c = Cluster::start_with_loop_machine("spread", "ext4").await;
    c.machines_ready(3).await;
    let etcd = c.etcd.endpoints()[0].clone();
    let client = c.client.addr.to_string();
    let m3: Machine = c.store.get("m3").await.unwrap().unwrap();
    assert_eq!(m3.metadata.labels["cobalt.io/backend"], "loop");
    assert_eq!(m3.metadata.labels["cobalt.io/filesystem"], "ext4");

    c.apply_text(&yaml("lv", "", &client)).await;
    let lv = c.wait_ready("lv", "60s").await;
    assert_eq!(lv.status.as_ref().unwrap().machine.as_deref(), Some("m3"));
    let server = server_of(&lv);
    let data = pattern(5, 8 << 20);
    c.nfs_write(&server, "lv/data.bin", &data).unwrap();
    assert_eq!(c.nfs_read(&server, "lv/data.bin").unwrap(), data);
    assert_eq!(images(&mut c), [format!("{}.img", lv.metadata.uid)]);

    // What the loop backend cannot do is refused with a reason.
    c.apply_text(&yaml("packed", "  compression: zstd\n", &client))
        .await;
    until(
        "compression kept off the loop machine",
        Duration::from_secs(20),
        || async {
            let v: Volume = c.store.get("packed").await.ok()??;
            let s = find_condition(&v.status.as_ref()?.conditions, "Scheduled")?;
            (!s.is_true() && s.message.contains("compression")).then_some(())
        },
    )
    .await;
    let o = c.ctl(&["move", "volume/lv", "--to", "m1"]).await;
    assert!(o.status.success(), "{}", out(&o));
    until("the move is refused", Duration::from_secs(20), || async {
        let v: Volume = c.store.get("lv").await.ok()??;
        let m = find_condition(&v.status.as_ref()?.conditions, "Moving")?;
        (m.reason == "MoveUnsupported" && v.moving().is_none()).then_some(())
    })
    .await;
    let o = c.ctl(&["move", "volume/lv", "--to", "m3"]).await;
    assert!(o.status.success(), "{}", out(&o));
    let o = c.ctl(&["snapshot", "volume/lv", "--name", "lv-snap"]).await;
    assert!(o.status.success(), "{}", out(&o));
    until(
        "the snapshot is refused",
        Duration::from_secs(20),
        || async {
            let s: cobalt_api::Snapshot = c.store.get("lv-snap").await.ok()??;
            let st = s.status?;
            let ready = find_condition(&st.conditions, "Ready")?;
            (st.phase == cobalt_api::SnapshotPhase::Failed && ready.reason == "SnapshotUnsupported")
                .then_some(())
        },
    )
    .await;
    let o = c.ctl(&["delete", "snapshot/lv-snap"]).await;
    assert!(o.status.success(), "{}", out(&o));

    // A grow: online where the kernel lets the agent (CAP_SYS_RESOURCE), else refused, Ready.
    c.apply_text(&yaml("lv", "", &client).replace("64Mi", "96Mi"))
        .await;
    let can_grow = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0);
    until(
        "the grow is applied or refused",
        Duration::from_secs(30),
        || async {
            let v: Volume = c.store.get("lv").await.ok()??;
            let s = v.status.as_ref()?;
            let limit = s.usage.as_ref()?.limit_bytes;
            let blocked = find_condition(&s.conditions, "ResizeBlocked")
                .filter(|b| b.is_true() && b.reason == "ResizeUnsupported");
            match can_grow {
                true => (limit == 96 << 20).then_some(()),
                false => (blocked.is_some() && limit == 64 << 20).then_some(()),
            }
        },
    )
    .await;

    // A clone: a consistent copy of the frozen source, served on its own.
    c.apply_text(&yaml("lv-copy", "  source: {volume: lv}\n", &client).replace("64Mi", "96Mi"))
        .await;
    let copy = c.wait_ready("lv-copy", "60s").await;
    assert_eq!(
        c.nfs_read(&server_of(&copy), "lv-copy/data.bin").unwrap(),
        data
    );
    c.nfs_write(&server, "lv/after.txt", b"source still writable")
        .unwrap();

    // A reboot of m3: agent and its nfs-ganesha killed, mounts and loop devices gone.
    c.machine("m3").kill_agent();
    if let Some(pid) = c.machine("m3").ganesha_pid() {
        cobalt_testkit::process::kill_and_reap(pid);
    }
    let state = c.machine("m3").state.path().to_path_buf();
    cobalt_testkit::btrfs::unmount_under(&state);
    c.machine("m3").loop_backend.as_ref().unwrap().0.reboot();
    assert_eq!(loop_devices_on(&mut c), 0);
    c.machine("m3").start_agent(&etcd);
    until(
        "served again after the reboot",
        Duration::from_secs(60),
        || async {
            c.nfs_read(&server, "lv/data.bin")
                .ok()
                .filter(|d| *d == data)
        },
    )
    .await;
    assert_eq!(
        c.nfs_read(&server, "lv/after.txt").unwrap(),
        b"source still writable"
    );
    assert_eq!(loop_devices_on(&mut c), 2, "each image attached once");

    // Delete: unexported, unmounted, detached, image gone.
    for name in ["lv-copy", "lv", "packed"] {
        let o = c
            .ctl(&["delete", &format!("volume/{name}"), "--wait"])
            .await;
        assert!(o.status.success(), "{}", out(&o));
    }
    assert!(images(&mut c).is_empty(), "{:?}", images(&mut c));
    assert_eq!(loop_devices_on(&mut c), 0);
}
