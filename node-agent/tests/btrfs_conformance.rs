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
