//! The loop backend passes the backend conformance suite: ext4 images in a pool directory on a
//! BTRFS filesystem (clones are reflinks there), and xfs images under /tmp (clones copy), both on
//! real loop devices. A "reboot" unmounts everything and detaches every loop device.

use cobalt_agent::backend::conformance::Harness;
use cobalt_agent::backend::loopdev::{Filesystem, LoopBackend};
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::loopdir::LoopDir;

/// ext4 volumes in a directory on a BTRFS pool.
struct Ext4OnBtrfs {
    dir: LoopDir,
    _host: BtrfsPool,
}

impl Ext4OnBtrfs {
    fn new() -> Self {
        let host = BtrfsPool::new(1024);
        Ext4OnBtrfs {
            dir: LoopDir::under(host.path()),
            _host: host,
        }
    }
}

impl Harness for Ext4OnBtrfs {
    type B = LoopBackend;
    fn open(&self) -> LoopBackend {
        LoopBackend::open(self.dir.pool(), self.dir.mounts(), Filesystem::Ext4).unwrap()
    }
    fn reboot(&self) {
        self.dir.reboot();
    }
}

cobalt_agent::backend_conformance!(Ext4OnBtrfs::new());

// xfs cannot be smaller than 300 MiB, below the suite's sizes: its own cases, with images under
// /tmp (no reflinks: clones copy with the source frozen).

use cobalt_agent::backend::conformance::{fill, record};
use cobalt_agent::backend::{Backend, BackendError};

const MIB: u64 = 1 << 20;

#[test]
fn xfs_volumes_are_hard_sized_grow_online_clone_by_copy_and_come_back_after_a_reboot() {
    let dir = LoopDir::new();
    let open = || LoopBackend::open(dir.pool(), dir.mounts(), Filesystem::Xfs).unwrap();
    let b = open();
    assert!(b.can(cobalt_api::Capability::Grow));
    b.create(&record("x1", 320 * MIB)).unwrap();
    b.create(&record("x1", 320 * MIB)).unwrap();
    let fstype = std::process::Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE"])
        .arg(b.path("x1"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fstype.stdout).trim(), "xfs");
    fill(&b, "x1", "data", 64 * MIB).unwrap();
    let err = fill(&b, "x1", "more", 320 * MIB).expect_err("the image is the limit");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    std::fs::remove_file(b.path("x1").join("more")).unwrap();

    // Grown online, mounted all along; the data stays; a shrink is refused.
    b.resize("x1", 480 * MIB).unwrap();
    fill(&b, "x1", "more", 320 * MIB).expect("room after the grow");
    assert!(matches!(
        b.resize("x1", 320 * MIB),
        Err(BackendError::ResizeUnsupported { .. })
    ));
    assert_eq!(b.get("x1").unwrap().unwrap().size_bytes, 480 * MIB);

    // A clone copies a frozen source: same content, independent, mountable beside it.
    std::fs::write(b.path("x1").join("file"), b"original").unwrap();
    b.clone_from("x1", &record("x2", 480 * MIB)).unwrap();
    assert_eq!(
        std::fs::read(b.path("x2").join("file")).unwrap(),
        b"original"
    );
    std::fs::write(b.path("x2").join("file"), b"changed").unwrap();
    assert_eq!(
        std::fs::read(b.path("x1").join("file")).unwrap(),
        b"original"
    );
    std::fs::write(b.path("x1").join("after-thaw"), b"writable").unwrap();

    // A reboot: mounts and loop devices gone; opening brings every volume back.
    drop(b);
    dir.reboot();
    let b = open();
    assert_eq!(
        std::fs::read(b.path("x2").join("file")).unwrap(),
        b"changed"
    );
    assert_eq!(
        std::fs::read(b.path("x1").join("after-thaw")).unwrap(),
        b"writable"
    );
    b.destroy("x1").unwrap();
    b.destroy("x2").unwrap();
    assert!(b.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.pool()).unwrap().count(),
        0,
        "no image left"
    );
}

#[test]
fn fifty_creates_at_once_all_attach_and_stale_attachments_are_cleaned() {
    let dir = LoopDir::new();
    let b =
        std::sync::Arc::new(LoopBackend::open(dir.pool(), dir.mounts(), Filesystem::Ext4).unwrap());
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let b = b.clone();
            std::thread::spawn(move || b.create(&record(&format!("v{i:02}"), 4 * MIB)))
        })
        .collect();
    for t in threads {
        t.join().unwrap().expect("every parallel create attaches");
    }
    assert_eq!(b.list().unwrap().len(), 50);
    // A stale attachment: a second loop device on one image (a crash between attach and record).
    let image = dir.pool().join("v07.img");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success());
    let devices = |img: &std::path::Path| {
        let o = std::process::Command::new("losetup")
            .arg("-j")
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    assert_eq!(devices(&image), 2);
    drop(b);
    let b = LoopBackend::open(dir.pool(), dir.mounts(), Filesystem::Ext4).unwrap();
    assert_eq!(
        devices(&image),
        1,
        "the stale attachment is detached at open"
    );
    std::fs::write(b.path("v07").join("ok"), b"served").unwrap();
    for r in b.list().unwrap() {
        b.destroy(&r.uid).unwrap();
    }
}

#[test]
fn an_agent_killed_during_a_clone_leaves_the_source_intact_thawed_and_no_partial_copy() {
    let dir = LoopDir::new();
    let b = LoopBackend::open(dir.pool(), dir.mounts(), Filesystem::Ext4).unwrap();
    b.create(&record("src", 16 * MIB)).unwrap();
    std::fs::write(b.path("src").join("data"), b"the source's data").unwrap();
    // What a kill mid-clone leaves: the source frozen, a partial copy beside the images.
    let frozen = std::process::Command::new("fsfreeze")
        .arg("-f")
        .arg(b.path("src"))
        .status()
        .unwrap();
    assert!(frozen.success());
    std::fs::write(dir.pool().join(".copy.img.tmp"), b"partial").unwrap();
    drop(b);
    let b = LoopBackend::open(dir.pool(), dir.mounts(), Filesystem::Ext4).unwrap();
    assert!(
        !dir.pool().join(".copy.img.tmp").exists(),
        "the partial copy is gone"
    );
    assert_eq!(
        std::fs::read(b.path("src").join("data")).unwrap(),
        b"the source's data"
    );
    std::fs::write(b.path("src").join("after"), b"writable again").unwrap();
    assert!(b.get("copy").unwrap().is_none());
    // The clone asked again is made whole.
    b.clone_from("src", &record("copy", 16 * MIB)).unwrap();
    assert_eq!(
        std::fs::read(b.path("copy").join("data")).unwrap(),
        b"the source's data"
    );
    for uid in ["copy", "src"] {
        b.destroy(uid).unwrap();
    }
}
