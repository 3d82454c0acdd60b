//! The BTRFS backend passes the backend conformance suite on a real loop-mounted filesystem.

use cobalt_agent::backend::btrfs::BtrfsBackend;
use cobalt_agent::backend::conformance::Harness;
use cobalt_testkit::btrfs::BtrfsPool;

/// A pool, and a second one (another machine's) made when a send/receive case asks for it.
struct Pool(BtrfsPool, std::sync::OnceLock<BtrfsPool>);

impl Pool {
    fn new() -> Pool {
        Pool(BtrfsPool::new(512), std::sync::OnceLock::new())
    }
}

impl Harness for Pool {
    type B = BtrfsBackend;
    fn open(&self) -> BtrfsBackend {
        BtrfsBackend::open(self.0.path()).unwrap()
    }
    fn open_peer(&self) -> Option<BtrfsBackend> {
        let peer = self.1.get_or_init(|| BtrfsPool::new(512));
        Some(BtrfsBackend::open(peer.path()).unwrap())
    }
}

cobalt_agent::backend_conformance!(Pool::new());

#[test]
fn a_directory_that_is_not_btrfs_is_refused_before_any_ioctl() {
    let dir = tempfile::tempdir().unwrap();
    let err = BtrfsBackend::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not a BTRFS filesystem"), "{err}");
}

#[test]
fn deleting_a_volume_leaves_no_qgroup_behind() {
    use cobalt_agent::backend::Backend;
    let pool = Pool::new();
    let b = pool.open();
    b.create(&cobalt_agent::backend::conformance::record("u1", 16 << 20))
        .unwrap();
    b.destroy("u1").unwrap();
    let out = std::process::Command::new("btrfs")
        .args(["qgroup", "show", "--raw"])
        .arg(pool.0.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let qgroups: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("0/") && !l.starts_with("0/5 "))
        .collect();
    assert!(qgroups.is_empty(), "stale qgroups: {qgroups:?}");
}

#[test]
fn a_snapshot_is_read_only_on_disk() {
    use cobalt_agent::backend::Backend;
    let pool = Pool::new();
    let b = pool.open();
    b.create(&cobalt_agent::backend::conformance::record("u1", 16 << 20))
        .unwrap();
    std::fs::write(b.path("u1").join("file"), b"kept").unwrap();
    b.snapshot("u1", "s1").unwrap();
    let on_disk = pool.0.path().join("snapshots/u1/s1");
    assert_eq!(std::fs::read(on_disk.join("file")).unwrap(), b"kept");
    let err = std::fs::write(on_disk.join("file"), b"overwritten").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(std::fs::write(on_disk.join("new"), b"x").is_err());
    assert_eq!(std::fs::read(on_disk.join("file")).unwrap(), b"kept");
}

/// `/sys/fs/btrfs/<fsid>/qgroups` of the pool.
fn qgroups_sysfs(pool: &std::path::Path) -> std::path::PathBuf {
    let o = std::process::Command::new("btrfs")
        .args(["filesystem", "show"])
        .arg(pool)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let uuid = text
        .split("uuid: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a uuid");
    std::path::Path::new("/sys/fs/btrfs")
        .join(uuid)
        .join("qgroups")
}

#[test]
fn the_pool_always_accounts_dropped_snapshots_and_rescans_if_the_kernel_did_not() {
    use cobalt_agent::backend::conformance::{fill, record};
    use cobalt_agent::backend::Backend;
    let pool = Pool::new();
    let b = pool.open();
    let sysfs = qgroups_sysfs(pool.0.path());
    let threshold = sysfs.join("drop_subtree_threshold");
    assert_eq!(
        std::fs::read_to_string(&threshold).unwrap().trim(),
        "8",
        "opening the pool makes the kernel account every dropped tree"
    );
    // Make the kernel skip the accounting of any dropped shared tree (it marks the qgroups
    // inconsistent instead): the backend must rescan so the hard limits hold again. A snapshot
    // of many files of which one changed shares almost its whole tree with the volume.
    std::fs::write(&threshold, "0").unwrap();
    b.create(&record("u1", 64 << 20)).unwrap();
    for i in 0..3000 {
        std::fs::write(b.path("u1").join(format!("f{i}")), i.to_string()).unwrap();
    }
    b.snapshot("u1", "s1").unwrap();
    std::fs::write(b.path("u1").join("f0"), "changed").unwrap();
    b.delete_snapshot("u1", "s1").unwrap();
    assert_eq!(
        std::fs::read_to_string(sysfs.join("inconsistent"))
            .unwrap()
            .trim(),
        "0",
        "qgroups are consistent after the delete"
    );
    assert!(
        fill(&b, "u1", "more", 64 << 20).is_err(),
        "the hard limit holds after the delete"
    );
}
