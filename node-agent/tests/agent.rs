//! The real `cobalt-agent` against a real etcd and a real BTRFS pool, with volumes bound by
//! writing `spec.machine` (no controller needed).

use std::process::Command;
use std::time::Duration;

use cobalt_agent::backend::btrfs::BtrfsBackend;
use cobalt_agent::backend::conformance::fill;
use cobalt_agent::backend::Backend;
use cobalt_api::{
    find_condition, Capability, Compression, Machine, MachineSpec, Volume, VolumePhase,
    VolumeSource, VolumeSpec, BACKEND_LABEL,
};
use cobalt_store::Store;
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

const MIB: u64 = 1 << 20;

struct Node {
    pool: BtrfsPool,
    state: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        cobalt_testkit::btrfs::unmount_under(self.state.path());
    }
}

impl Node {
    fn new() -> Node {
        Node {
            pool: BtrfsPool::new(512),
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn agent(&self, etcd: &Etcd, extra: &[&str]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cobalt-agent"));
        cmd.arg("--etcd-endpoints")
            .arg(etcd.endpoints().join(","))
            .arg("--machine")
            .arg("node-1")
            .arg("--address")
            .arg("127.0.0.1")
            .arg("--pool")
            .arg(self.pool.path())
            .arg("--state-dir")
            .arg(self.state.path());
        if !extra.contains(&"--listen") {
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{}", free_port()));
        }
        cmd.arg("--lease-ttl")
            .arg("2s")
            .args(extra)
            .env("RUST_LOG", "info");
        Daemon::spawn(&mut cmd, "agent")
    }

    fn backend(&self) -> BtrfsBackend {
        BtrfsBackend::open(self.pool.path()).unwrap()
    }
}

fn bound(name: &str, size: &str) -> Volume {
    Volume::new(
        name,
        VolumeSpec {
            size: size.parse().unwrap(),
            machine: Some("node-1".into()),
            ..Default::default()
        },
    )
}

async fn ready(store: &Store, name: &str) -> Volume {
    until(
        &format!("{name} Ready"),
        Duration::from_secs(30),
        || async {
            let v: Volume = store.get(name).await.ok()??;
            let s = v.status.as_ref()?;
            (s.phase == VolumePhase::Ready && s.observed_generation == v.metadata.generation)
                .then_some(v)
        },
    )
    .await
}

async fn edit(store: &Store, name: &str, f: impl Fn(&mut Volume)) {
    until(
        &format!("editing {name}"),
        Duration::from_secs(10),
        || async {
            let mut v: Volume = store.get(name).await.ok()??;
            f(&mut v);
            store.replace(&v).await.ok()
        },
    )
    .await;
}

#[tokio::test]
async fn a_bound_volume_becomes_a_limited_compressed_subvolume_that_resizes_clones_and_deletes() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let node = Node::new();
    let _agent = node.agent(&etcd, &["--usage-refresh", "1s"]);

    let mut v = bound("media", "8Mi");
    v.spec.compression = Compression::Zstd;
    store.create(&v).await.unwrap();
    let live = ready(&store, "media").await;
    let uid = live.metadata.uid.clone();
    let status = live.status.clone().unwrap();
    assert_eq!(status.machine.as_deref(), Some("node-1"));
    assert_eq!(status.usage.as_ref().unwrap().limit_bytes, 8 * MIB);
    assert!(find_condition(&status.conditions, "Ready")
        .unwrap()
        .is_true());
    assert!(live
        .metadata
        .finalizers
        .iter()
        .any(|f| f == "cobalt.io/agent"));

    let b = node.backend();
    assert!(
        node.pool.path().join("volumes").join(&uid).is_dir(),
        "subvolume named by uid"
    );
    assert_eq!(b.usage(&uid).unwrap().limit_bytes, 8 * MIB);
    assert_eq!(b.compression(&uid).unwrap(), Compression::Zstd);
    fill(&b, &uid, "data", 4 * MIB).unwrap();
    let err = fill(&b, &uid, "too-much", 16 * MIB).expect_err("writing past the size must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT));
    std::fs::remove_file(b.path(&uid).join("too-much")).unwrap();
    // Usage reaches the status by the periodic pool-wide refresh, once the filesystem has
    // committed (forced here by reading the usage directly).
    let used = b.usage(&uid).unwrap().used_bytes;
    assert!(used >= 4 * MIB, "{used}");
    until(
        "the usage in the status",
        Duration::from_secs(15),
        || async {
            let v: Volume = store.get("media").await.ok()??;
            (v.status?.usage?.used_bytes == used).then_some(())
        },
    )
    .await;

    // The machine registered itself and reports capacity.
    let m: Machine = until(
        "the machine's capacity",
        Duration::from_secs(15),
        || async {
            let m: Machine = store.get("node-1").await.ok()??;
            (m.status.as_ref()?.capacity.total_bytes > 0 && m.status.as_ref()?.volumes == 1)
                .then_some(m)
        },
    )
    .await;
    assert_eq!(m.spec.address, "127.0.0.1");
    assert!(store.alive_machines().await.unwrap().contains("node-1"));

    // Resize: grow, then a shrink below usage is refused with the numbers.
    edit(&store, "media", |v| v.spec.size = "32Mi".parse().unwrap()).await;
    ready(&store, "media").await;
    assert_eq!(b.usage(&uid).unwrap().limit_bytes, 32 * MIB);
    edit(&store, "media", |v| v.spec.size = "2Mi".parse().unwrap()).await;
    let blocked = ready(&store, "media").await;
    let c = find_condition(
        &blocked.status.as_ref().unwrap().conditions,
        "ResizeBlocked",
    )
    .expect("ResizeBlocked condition")
    .clone();
    assert!(c.message.contains("in use"), "{}", c.message);
    assert_eq!(
        b.usage(&uid).unwrap().limit_bytes,
        32 * MIB,
        "the limit stays"
    );

    // A clone has the source's files and its own size.
    let mut clone = bound("media-copy", "16Mi");
    clone.spec.source = Some(Box::new(VolumeSource::volume("media")));
    store.create(&clone).await.unwrap();
    let copy = ready(&store, "media-copy").await;
    let copy_uid = copy.metadata.uid.clone();
    assert_eq!(
        std::fs::read(b.path(&copy_uid).join("data")).unwrap(),
        std::fs::read(b.path(&uid).join("data")).unwrap()
    );
    assert_eq!(b.usage(&copy_uid).unwrap().limit_bytes, 16 * MIB);

    // Delete: no subvolume, no qgroup, no object.
    for name in ["media-copy", "media"] {
        store.delete::<Volume>(name, None).await.unwrap();
    }
    until("both volumes gone", Duration::from_secs(30), || async {
        let (all, _) = store.list::<Volume>(&Default::default()).await.ok()?;
        all.is_empty().then_some(())
    })
    .await;
    assert!(b.list().unwrap().is_empty());
    let out = Command::new("btrfs")
        .args(["qgroup", "show", "--raw"])
        .arg(node.pool.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let stale: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("0/") && !l.starts_with("0/5 "))
        .collect();
    assert!(stale.is_empty(), "stale qgroups: {stale:?}");
}

#[tokio::test]
async fn a_crash_mid_create_neither_duplicates_nor_loses_volumes() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let node = Node::new();
    // A crash right after the subvolume was made, before limit and record: simulate it exactly.
    let half = store
        .create(&Volume::new(
            "half",
            VolumeSpec {
                size: "4Mi".parse().unwrap(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    std::fs::create_dir_all(node.pool.path().join("volumes")).unwrap();
    let out = Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(node.pool.path().join("volumes").join(&half.metadata.uid))
        .output()
        .unwrap();
    assert!(out.status.success());
    edit(&store, "half", |v| v.spec.machine = Some("node-1".into())).await;

    let mut agent = node.agent(&etcd, &[]);
    for i in 0..12 {
        store
            .create(&bound(&format!("v{i:02}"), "4Mi"))
            .await
            .unwrap();
    }
    ready(&store, "v00").await;
    agent.kill(); // mid-flight for the others
    let _agent = node.agent(&etcd, &[]);
    for i in 0..12 {
        ready(&store, &format!("v{i:02}")).await;
    }
    ready(&store, "half").await;
    let (all, _) = store.list::<Volume>(&Default::default()).await.unwrap();
    let mut want: Vec<String> = all.iter().map(|v| v.metadata.uid.clone()).collect();
    want.sort();
    let got: Vec<String> = node
        .backend()
        .list()
        .unwrap()
        .into_iter()
        .map(|r| r.uid)
        .collect();
    assert_eq!(got, want, "exactly one subvolume per volume");
    assert_eq!(
        node.backend()
            .usage(&half.metadata.uid)
            .unwrap()
            .limit_bytes,
        4 * MIB,
        "the interrupted create was finished"
    );
}

#[tokio::test]
async fn a_second_agent_on_the_same_machine_refuses_to_start() {
    let etcd = Etcd::start();
    let node = Node::new();
    let _first = node.agent(&etcd, &[]);
    let store = etcd.store().await;
    until("the first agent alive", Duration::from_secs(15), || async {
        store
            .alive_machines()
            .await
            .ok()?
            .contains("node-1")
            .then_some(())
    })
    .await;
    let mut second = node.agent(&etcd, &[]);
    until("the second agent to exit", Duration::from_secs(10), || {
        let exited = !second.running();
        async move { exited.then_some(()) }
    })
    .await;
    assert!(
        second
            .log()
            .contains("another cobalt-agent is already running"),
        "{}",
        second.log()
    );
}

#[tokio::test]
async fn registration_never_overwrites_what_a_user_declared() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let mut declared = Machine::new(
        "node-1",
        MachineSpec {
            address: "10.9.9.9".into(),
            unschedulable: true,
            max_fill: 80,
            ..Default::default()
        },
    );
    declared.metadata.labels.insert("disk".into(), "ssd".into());
    store.create(&declared).await.unwrap();
    let node = Node::new();
    let _agent = node.agent(&etcd, &["--labels", "disk=hdd"]);
    let m: Machine = until(
        "the agent's status report",
        Duration::from_secs(15),
        || async {
            let m: Machine = store.get("node-1").await.ok()??;
            (m.status.as_ref()?.capacity.total_bytes > 0).then_some(m)
        },
    )
    .await;
    assert_eq!(m.spec, declared.spec);
    // The user's labels stay (disk=ssd, not the flag's hdd); the agent adds only its backend.
    let mut expected = declared.metadata.labels.clone();
    expected.insert(BACKEND_LABEL.into(), "btrfs".into());
    assert_eq!(m.metadata.labels, expected);
    let caps = &m.status.as_ref().unwrap().capabilities;
    for c in [
        Capability::Compression,
        Capability::Clone,
        Capability::Defragment,
    ] {
        assert!(caps.contains(&c), "{c} published: {caps:?}");
    }
    // Readiness is the leader's to write, never the agent's.
    assert!(
        cobalt_api::find_condition(&m.status.as_ref().unwrap().conditions, "Ready").is_none(),
        "{:?}",
        m.status
    );
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

#[tokio::test]
async fn the_agent_is_healthy_at_once_ready_once_registered_and_serves_metrics() {
    let mut etcd = Etcd::start();
    etcd.stop();
    let node = Node::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = node.agent(&etcd, &["--listen", &listen]);
    let (code, body) = until("/healthz", Duration::from_secs(15), || async {
        http_get(&listen, "/healthz").await
    })
    .await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = http_get(&listen, "/readyz").await.unwrap();
    assert_eq!(code, 503, "not ready while etcd is down: {body}");
    assert!(body.contains("not registered"), "{body}");
    etcd.start_again();
    until("/readyz 200", Duration::from_secs(30), || async {
        let (code, _) = http_get(&listen, "/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    let (code, metrics) = http_get(&listen, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for family in [
        "cobalt_reconcile_queue_depth",
        "cobalt_relists_total",
        "cobalt_agent_orphan_volumes",
    ] {
        assert!(metrics.contains(family), "{family} in /metrics:\n{metrics}");
    }
}

#[tokio::test]
async fn provisioned_data_missing_from_the_pool_is_reported_failed_and_not_recreated_empty() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let node = Node::new();
    let agent = node.agent(&etcd, &[]);
    store.create(&bound("precious", "16Mi")).await.unwrap();
    let v = ready(&store, "precious").await;
    // The data disappears behind Cobalt's back (a mistaken `btrfs subvolume delete`).
    drop(agent);
    node.backend().destroy(&v.metadata.uid).unwrap();
    let _agent = node.agent(&etcd, &[]);
    let failed = until("phase Failed", Duration::from_secs(30), || async {
        let v: Volume = store.get("precious").await.ok()??;
        (v.status.as_ref()?.phase == VolumePhase::Failed).then_some(v)
    })
    .await;
    let s = failed.status.unwrap();
    let c = find_condition(&s.conditions, "Ready").unwrap();
    assert_eq!(c.reason, "DataMissing", "{c:?}");
    assert_eq!(s.endpoint, None);
    assert_eq!(
        node.backend().get(&v.metadata.uid).unwrap(),
        None,
        "no empty copy was made in its place"
    );
}

#[test]
fn pool_create_makes_a_mounted_btrfs_pool_and_pool_destroy_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("pool.img");
    let mount = dir.path().join("pool");
    let bin = env!("CARGO_BIN_EXE_cobalt-agent");
    let out = Command::new(bin)
        .args(["pool", "create", "--size", "256Mi", "--image"])
        .arg(&image)
        .arg("--mount")
        .arg(&mount)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let guard = scopeguard(&mount);
    BtrfsBackend::open(&mount).expect("a usable BTRFS pool");
    let out = Command::new(bin)
        .args(["pool", "destroy", "--image"])
        .arg(&image)
        .arg("--mount")
        .arg(&mount)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(guard);
    assert!(!image.exists());
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(&*mount.to_string_lossy()));
}

/// Unmounts `mount` on drop if a test failed between create and destroy.
fn scopeguard(mount: &std::path::Path) -> impl Drop + '_ {
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            if std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .contains(&*self.0.to_string_lossy())
            {
                let _ = Command::new("umount").arg("-R").arg(self.0).status();
            }
        }
    }
    Unmount(mount)
}
