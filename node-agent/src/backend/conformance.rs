//! The backend conformance suite: the behaviours every [`Backend`] must have, checked against a
//! real instance. A backend's test file instantiates all of them with one macro:
//!
//! ```ignore
//! struct Pool { /* a real filesystem */ }
//! impl cobalt_agent::backend::conformance::Harness for Pool {
//!     type B = MyBackend;
//!     fn open(&self) -> MyBackend { /* a fresh instance on the same storage */ }
//! }
//! cobalt_agent::backend_conformance!(Pool::new());
//! ```
//! Each case gets its own harness (fresh storage) and cleans up through it. Cases of a
//! capability (compression, clone, defragment, snapshot, send/receive) run in full where the backend declares it;
//! where it does not, the same case checks instead that the capability's methods refuse with
//! [`BackendError::Unsupported`] — so no case passes by doing nothing.

use std::io::Write;

use cobalt_api::{Capability, Compression};

use super::{Backend, BackendError, VolumeRecord};

const MIB: u64 = 1 << 20;

/// Gives the suite backend instances over one piece of real storage.
pub trait Harness {
    type B: Backend;
    /// A new backend instance on the harness's storage; calling it again simulates a restart.
    fn open(&self) -> Self::B;
    /// A backend of the same kind on *other* storage (another machine's pool), which send and
    /// receive cases stream to. Must be provided where `sendReceive` is declared.
    fn open_peer(&self) -> Option<Self::B> {
        None
    }
    /// Simulates a host reboot: what does not survive one (mounts, attachments) is taken away.
    /// Backends with nothing outside their storage leave this empty.
    fn reboot(&self) {}
}

pub fn record(uid: &str, size_bytes: u64) -> VolumeRecord {
    VolumeRecord {
        uid: uid.into(),
        name: format!("vol-{uid}"),
        size_bytes,
        compression: Compression::None,
    }
}

/// Writes `bytes` of incompressible data into `name`; Err on the first failing write.
pub fn fill(backend: &impl Backend, uid: &str, name: &str, bytes: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(backend.path(uid).join(name))?;
    let mut chunk = vec![0u8; MIB as usize];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut written = 0;
    while written < bytes {
        for b in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        let n = (bytes - written).min(MIB) as usize;
        f.write_all(&chunk[..n])?;
        written += n as u64;
    }
    f.sync_all()
}

pub fn an_empty_backend_lists_nothing(h: &impl Harness) {
    assert_eq!(h.open().list().unwrap(), vec![]);
}

pub fn a_created_volume_is_listed_with_its_metadata(h: &impl Harness) {
    let b = h.open();
    let r = VolumeRecord {
        compression: Compression::Zstd,
        ..record("u1", 64 * MIB)
    };
    b.create(&r).unwrap();
    assert_eq!(b.list().unwrap(), vec![r]);
}

pub fn create_is_idempotent(h: &impl Harness) {
    let b = h.open();
    let r = record("u1", 64 * MIB);
    b.create(&r).unwrap();
    std::fs::write(b.path("u1").join("keep"), b"data").unwrap();
    b.create(&r).unwrap();
    assert_eq!(b.list().unwrap().len(), 1);
    assert_eq!(
        std::fs::read(b.path("u1").join("keep")).unwrap(),
        b"data",
        "a repeated create must not touch data"
    );
}

pub fn destroy_removes_the_volume(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 64 * MIB)).unwrap();
    b.create(&record("u2", 64 * MIB)).unwrap();
    b.destroy("u1").unwrap();
    let uids: Vec<String> = b.list().unwrap().into_iter().map(|r| r.uid).collect();
    assert_eq!(uids, ["u2"]);
    assert!(!b.path("u1").exists());
}

pub fn destroying_an_unknown_volume_is_unknown_volume(h: &impl Harness) {
    assert!(matches!(
        h.open().destroy("nope"),
        Err(BackendError::UnknownVolume(_))
    ));
}

pub fn destroying_twice_is_unknown_volume(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 64 * MIB)).unwrap();
    b.destroy("u1").unwrap();
    assert!(matches!(
        b.destroy("u1"),
        Err(BackendError::UnknownVolume(_))
    ));
}

pub fn the_quota_is_enforced(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 8 * MIB)).unwrap();
    fill(&b, "u1", "small", 4 * MIB).unwrap();
    let err = fill(&b, "u1", "big", 16 * MIB).expect_err("writing past the size must fail");
    // A quota says EDQUOT; a block device that is full by construction says ENOSPC.
    assert!(
        [Some(libc::EDQUOT), Some(libc::ENOSPC)].contains(&err.raw_os_error()),
        "{err}"
    );
}

pub fn usage_of_all_volumes_agrees_with_each_volumes_usage(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 32 * MIB)).unwrap();
    b.create(&record("u2", 16 * MIB)).unwrap();
    fill(&b, "u1", "a", 8 * MIB).unwrap();
    // `usage` is current to the instant; `usage_all` may lag until the next commit, which the
    // single-volume read has just forced.
    let one = b.usage("u1").unwrap();
    assert!(one.used_bytes >= 8 * MIB, "{one:?}");
    let all = b.usage_all().unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all["u1"], one);
    assert_eq!(all["u2"].limit_bytes, 16 * MIB);
    assert!(all["u2"].used_bytes < MIB, "{:?}", all["u2"]);
}

/// True when `b` grows volumes; otherwise checks that a grow is refused and the size stays.
fn grows<B: Backend>(b: &B, uid: &str) -> bool {
    if b.can(Capability::Grow) {
        return true;
    }
    let before = b.get(uid).unwrap().unwrap().size_bytes;
    match b.resize(uid, before * 2) {
        Err(BackendError::ResizeUnsupported { reason }) => {
            eprintln!(
                "grow is not declared by this backend here: checked that it is refused ({reason})"
            );
        }
        other => panic!("grow is not declared, so it must be refused: {other:?}"),
    }
    assert_eq!(
        b.get(uid).unwrap().unwrap().size_bytes,
        before,
        "the size stays"
    );
    false
}

pub fn resize_grows_and_shrinks_only_above_what_is_used(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 8 * MIB)).unwrap();
    fill(&b, "u1", "a", 6 * MIB).unwrap();
    if !grows(&b, "u1") {
        return;
    }
    b.resize("u1", 32 * MIB).unwrap();
    fill(&b, "u1", "b", 12 * MIB).expect("room after growing");
    assert_eq!(b.usage("u1").unwrap().limit_bytes, 32 * MIB);
    if !b.can(Capability::Shrink) {
        match b.resize("u1", 24 * MIB) {
            Err(BackendError::ResizeUnsupported { reason }) => {
                assert!(!reason.is_empty());
                eprintln!("shrink is not declared by this backend: checked that it is refused");
            }
            other => panic!("shrink is not declared, so it must be refused: {other:?}"),
        }
        assert_eq!(b.list().unwrap()[0].size_bytes, 32 * MIB, "the size stays");
        return;
    }
    match b.resize("u1", 8 * MIB) {
        Err(BackendError::ResizeBlocked {
            used_bytes,
            new_bytes,
        }) => {
            assert!(used_bytes >= 18 * MIB, "{used_bytes}");
            assert_eq!(new_bytes, 8 * MIB);
        }
        other => panic!("shrinking below usage must be refused: {other:?}"),
    }
    b.resize("u1", 24 * MIB)
        .expect("shrinking above usage works");
    assert_eq!(b.list().unwrap()[0].size_bytes, 24 * MIB);
}

pub fn data_survives_a_resize(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 16 * MIB)).unwrap();
    std::fs::write(b.path("u1").join("kept"), b"before the grow").unwrap();
    if !grows(&b, "u1") {
        return;
    }
    b.resize("u1", 48 * MIB).unwrap();
    assert_eq!(
        std::fs::read(b.path("u1").join("kept")).unwrap(),
        b"before the grow"
    );
    assert_eq!(b.get("u1").unwrap().unwrap().size_bytes, 48 * MIB);
}

pub fn destroying_one_volume_leaves_the_others_intact(h: &impl Harness) {
    let b = h.open();
    for uid in ["u1", "u2", "u3"] {
        b.create(&record(uid, 16 * MIB)).unwrap();
        std::fs::write(b.path(uid).join("id"), uid).unwrap();
    }
    b.destroy("u2").unwrap();
    let uids: Vec<String> = b.list().unwrap().into_iter().map(|r| r.uid).collect();
    assert_eq!(uids, ["u1", "u3"]);
    for uid in ["u1", "u3"] {
        assert_eq!(
            std::fs::read(b.path(uid).join("id")).unwrap(),
            uid.as_bytes()
        );
    }
    assert!(matches!(b.usage("u2"), Err(BackendError::UnknownVolume(_))));
}

pub fn after_a_reboot_every_volume_is_back_with_its_data(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 16 * MIB)).unwrap();
    b.create(&record("u2", 24 * MIB)).unwrap();
    std::fs::write(b.path("u1").join("data"), b"survives").unwrap();
    let listed = b.list().unwrap();
    drop(b);
    h.reboot();
    let b = h.open();
    assert_eq!(b.list().unwrap(), listed);
    assert_eq!(
        std::fs::read(b.path("u1").join("data")).unwrap(),
        b"survives"
    );
    std::fs::write(b.path("u2").join("new"), b"writable").unwrap();
    assert_eq!(b.usage("u2").unwrap().limit_bytes, 24 * MIB);
    // Opening again (an agent restart without a reboot) changes nothing.
    drop(b);
    let b = h.open();
    assert_eq!(
        std::fs::read(b.path("u2").join("new")).unwrap(),
        b"writable"
    );
    b.destroy("u1").unwrap();
    b.destroy("u2").unwrap();
    assert!(b.list().unwrap().is_empty());
}

/// True when `b` declares `capability`; otherwise checks that `attempt` is refused as
/// unsupported and returns false.
fn declares<B: Backend>(
    b: &B,
    capability: Capability,
    attempt: impl FnOnce(&B) -> super::Result<()>,
) -> bool {
    if b.can(capability) {
        return true;
    }
    match attempt(b) {
        Err(BackendError::Unsupported { capability: c }) if c == capability => {
            eprintln!("{capability} is not declared by this backend: checked that it is refused");
            false
        }
        other => {
            panic!("{capability} is not declared, so it must be refused as Unsupported: {other:?}")
        }
    }
}

pub fn a_clone_has_the_sources_content_and_is_independent_after(h: &impl Harness) {
    let b = h.open();
    if !declares(&b, Capability::Clone, |b| {
        b.create(&record("src", 32 * MIB))?;
        b.clone_from("src", &record("copy", 16 * MIB))
    }) {
        return;
    }
    b.create(&record("src", 32 * MIB)).unwrap();
    std::fs::write(b.path("src").join("file"), b"original").unwrap();
    // Its own size: smaller where volumes shrink, larger where they grow, else the source's.
    let size = if b.can(Capability::Shrink) {
        16 * MIB
    } else {
        assert!(
            matches!(
                b.clone_from("src", &record("small", 16 * MIB)),
                Err(BackendError::ResizeUnsupported { .. })
            ),
            "a clone smaller than its source is refused where volumes do not shrink"
        );
        assert!(b.get("small").unwrap().is_none());
        if b.can(Capability::Grow) {
            48 * MIB
        } else {
            32 * MIB
        }
    };
    b.clone_from("src", &record("copy", size)).unwrap();
    assert_eq!(
        std::fs::read(b.path("copy").join("file")).unwrap(),
        b"original"
    );
    std::fs::write(b.path("copy").join("file"), b"changed").unwrap();
    std::fs::write(b.path("src").join("other"), b"x").unwrap();
    assert_eq!(
        std::fs::read(b.path("src").join("file")).unwrap(),
        b"original"
    );
    assert!(!b.path("copy").join("other").exists());
    let copy = b
        .list()
        .unwrap()
        .into_iter()
        .find(|r| r.uid == "copy")
        .unwrap();
    assert_eq!(copy.size_bytes, size, "the clone has its own size");
    assert_eq!(b.usage("copy").unwrap().limit_bytes, size);
    b.clone_from("src", &record("copy", size)).unwrap();
    assert!(matches!(
        b.clone_from("missing", &record("c2", MIB)),
        Err(BackendError::UnknownVolume(_))
    ));
}

pub fn compression_is_set_and_read_back(h: &impl Harness) {
    let b = h.open();
    if !declares(&b, Capability::Compression, |b| {
        b.create(&record("u1", 16 * MIB))?;
        b.set_compression("u1", Compression::Zstd)
    }) {
        return;
    }
    b.create(&VolumeRecord {
        compression: Compression::Zstd,
        ..record("u1", 16 * MIB)
    })
    .unwrap();
    assert_eq!(b.compression("u1").unwrap(), Compression::Zstd);
    b.set_compression("u1", Compression::Lzo).unwrap();
    assert_eq!(b.compression("u1").unwrap(), Compression::Lzo);
    b.set_compression("u1", Compression::None).unwrap();
    assert_eq!(b.compression("u1").unwrap(), Compression::None);
}

pub fn defragment_keeps_the_content_and_can_be_repeated(h: &impl Harness) {
    let b = h.open();
    if !declares(&b, Capability::Defragment, |b| {
        b.create(&record("u1", 16 * MIB))?;
        b.defragment("u1")
    }) {
        return;
    }
    b.create(&VolumeRecord {
        compression: if b.can(Capability::Compression) {
            Compression::Zstd
        } else {
            Compression::None
        },
        ..record("u1", 32 * MIB)
    })
    .unwrap();
    fill(&b, "u1", "data", 8 * MIB).unwrap();
    let before = std::fs::read(b.path("u1").join("data")).unwrap();
    b.defragment("u1").unwrap();
    b.defragment("u1").unwrap();
    assert_eq!(
        std::fs::read(b.path("u1").join("data")).unwrap(),
        before,
        "defragmenting must not change a byte"
    );
    assert!(matches!(
        b.defragment("nope"),
        Err(BackendError::UnknownVolume(_))
    ));
}

pub fn operations_on_an_unknown_volume_are_unknown_volume(h: &impl Harness) {
    let b = h.open();
    assert!(matches!(
        b.resize("nope", 16 * MIB),
        Err(BackendError::UnknownVolume(_))
    ));
    assert!(matches!(
        b.usage("nope"),
        Err(BackendError::UnknownVolume(_))
    ));
    assert_eq!(b.get("nope").unwrap(), None);
}

pub fn the_backend_names_its_kind(h: &impl Harness) {
    let b = h.open();
    let kind = b.kind();
    assert!(
        !kind.is_empty()
            && kind
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "a kind is a label value: {kind:?}"
    );
}

pub fn a_fresh_instance_lists_the_same_volumes(h: &impl Harness) {
    let first = h.open();
    first.create(&record("u1", 16 * MIB)).unwrap();
    first
        .create(&VolumeRecord {
            compression: Compression::Zlib,
            ..record("u2", 32 * MIB)
        })
        .unwrap();
    let listed = first.list().unwrap();
    drop(first);
    assert_eq!(h.open().list().unwrap(), listed);
}

pub fn capacity_is_reported_and_changes_with_use(h: &impl Harness) {
    let b = h.open();
    let before = b.capacity().unwrap();
    assert!(before.total_bytes > 0 && before.used_bytes <= before.total_bytes);
    b.create(&record("u1", 64 * MIB)).unwrap();
    fill(&b, "u1", "data", 32 * MIB).unwrap();
    let after = b.capacity().unwrap();
    assert!(
        after.used_bytes >= before.used_bytes + 16 * MIB,
        "{before:?} → {after:?}"
    );
    assert!(b.usage("u1").unwrap().used_bytes >= 32 * MIB);
}

/// Snapshot and send/receive cases: declared, or refused as unsupported.
fn sends<H: Harness>(h: &H) -> Option<(H::B, H::B)> {
    let b = h.open();
    let snap = declares(&b, Capability::Snapshot, |b| {
        b.create(&record("s", 16 * MIB))?;
        b.snapshot("s", "one")
    });
    let send = declares(&b, Capability::SendReceive, |b| {
        b.receive("s", &mut std::io::empty(), MIB).map(|_| ())
    });
    if !(snap && send) {
        return None;
    }
    let peer = h
        .open_peer()
        .expect("a backend declaring sendReceive needs Harness::open_peer");
    Some((b, peer))
}

fn stream_of(b: &impl Backend, uid: &str, name: &str, parent: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut b.send(uid, name, parent).unwrap(), &mut out).unwrap();
    out
}

pub fn a_snapshot_keeps_the_content_of_its_moment(h: &impl Harness) {
    let b = h.open();
    if !declares(&b, Capability::Snapshot, |b| {
        b.create(&record("u1", 16 * MIB))?;
        b.snapshot("u1", "one")
    }) {
        return;
    }
    b.create(&record("u1", 16 * MIB)).unwrap();
    std::fs::write(b.path("u1").join("file"), b"before").unwrap();
    b.snapshot("u1", "one").unwrap();
    b.snapshot("u1", "one").unwrap();
    std::fs::write(b.path("u1").join("file"), b"after").unwrap();
    assert_eq!(b.snapshots("u1").unwrap(), ["one"]);
    assert!(matches!(
        b.snapshot("missing", "x"),
        Err(BackendError::UnknownVolume(_))
    ));
    assert!(
        b.snapshot("u1", "../escape").is_err(),
        "names are one path component"
    );
    if b.can(Capability::SendReceive) {
        // What the snapshot holds is what it held at its moment.
        let peer = h.open_peer().expect("open_peer");
        let name = peer
            .receive(
                "u1",
                &mut stream_of(&b, "u1", "one", None).as_slice(),
                64 * MIB,
            )
            .unwrap();
        peer.promote(&name, &record("u1", 16 * MIB)).unwrap();
        assert_eq!(
            std::fs::read(peer.path("u1").join("file")).unwrap(),
            b"before"
        );
    }
    b.delete_snapshot("u1", "one").unwrap();
    b.delete_snapshot("u1", "one").unwrap();
    assert!(b.snapshots("u1").unwrap().is_empty());
    assert_eq!(std::fs::read(b.path("u1").join("file")).unwrap(), b"after");
}

pub fn a_snapshot_is_unchanged_by_writes_to_the_volume_and_to_its_restores(h: &impl Harness) {
    let b = h.open();
    if !b.can(Capability::Snapshot) {
        eprintln!("snapshot is not declared: its refusal is checked by a_snapshot_keeps_the_content_of_its_moment");
        return;
    }
    b.create(&record("u1", 16 * MIB)).unwrap();
    std::fs::write(b.path("u1").join("file"), b"kept").unwrap();
    b.snapshot("u1", "ro").unwrap();
    std::fs::write(b.path("u1").join("file"), b"changed in the volume").unwrap();
    b.restore("u1", "ro", &record("r1", 16 * MIB)).unwrap();
    std::fs::write(b.path("r1").join("file"), b"changed in the restore").unwrap();
    std::fs::write(b.path("r1").join("new"), b"x").unwrap();
    b.restore("u1", "ro", &record("r2", 16 * MIB)).unwrap();
    assert_eq!(std::fs::read(b.path("r2").join("file")).unwrap(), b"kept");
    assert!(!b.path("r2").join("new").exists());
}

pub fn a_restore_has_the_snapshots_content_its_own_size_and_is_independent(h: &impl Harness) {
    let b = h.open();
    if !declares(&b, Capability::Snapshot, |b| {
        b.create(&record("u1", 16 * MIB))?;
        b.restore("u1", "x", &record("r1", 16 * MIB))
    }) {
        return;
    }
    b.create(&record("u1", 32 * MIB)).unwrap();
    std::fs::write(b.path("u1").join("file"), b"at the snapshot").unwrap();
    b.snapshot("u1", "s1").unwrap();
    std::fs::write(b.path("u1").join("file"), b"later").unwrap();
    b.restore("u1", "s1", &record("r1", 24 * MIB)).unwrap();
    b.restore("u1", "s1", &record("r1", 24 * MIB)).unwrap();
    assert_eq!(
        std::fs::read(b.path("r1").join("file")).unwrap(),
        b"at the snapshot"
    );
    assert_eq!(b.usage("r1").unwrap().limit_bytes, 24 * MIB);
    let listed = b.get("r1").unwrap().expect("the restore is a volume");
    assert_eq!((listed.uid.as_str(), listed.size_bytes), ("r1", 24 * MIB));
    // Independent: the snapshot can go and the restore keeps its data.
    b.delete_snapshot("u1", "s1").unwrap();
    assert_eq!(
        std::fs::read(b.path("r1").join("file")).unwrap(),
        b"at the snapshot"
    );
    assert!(matches!(
        b.restore("u1", "s1", &record("r2", 16 * MIB)),
        Err(BackendError::UnknownSnapshot { .. })
    ));
    assert!(
        b.get("r2").unwrap().is_none(),
        "a failed restore leaves no volume"
    );
}

pub fn snapshot_space_is_counted_once_the_volume_changes(h: &impl Harness) {
    let b = h.open();
    if !b.can(Capability::Snapshot) {
        eprintln!("snapshot is not declared: its refusal is checked by a_snapshot_keeps_the_content_of_its_moment");
        return;
    }
    b.create(&record("u1", 64 * MIB)).unwrap();
    fill(&b, "u1", "data", 8 * MIB).unwrap();
    b.snapshot("u1", "s1").unwrap();
    // Overwrite the data: the snapshot now holds the old 8 MiB alone.
    fill(&b, "u1", "data", 8 * MIB).unwrap();
    let all = b.snapshot_usage(&["u1".into(), "unknown".into()]).unwrap();
    assert!(!all.contains_key("unknown"));
    let usage = &all["u1"];
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].name, "s1");
    assert!(
        usage[0].exclusive_bytes >= 7 * MIB,
        "the snapshot's exclusive bytes count the overwritten data: {usage:?}"
    );
    assert!(usage[0].referenced_bytes >= 8 * MIB, "{usage:?}");
    b.delete_snapshot("u1", "s1").unwrap();
    assert!(b.snapshot_usage(&["u1".into()]).unwrap().is_empty());
}

pub fn a_full_send_and_receive_is_byte_identical(h: &impl Harness) {
    let Some((b, peer)) = sends(h) else { return };
    let r = VolumeRecord {
        compression: Compression::Zstd,
        ..record("u1", 32 * MIB)
    };
    b.create(&r).unwrap();
    fill(&b, "u1", "random", 5 * MIB).unwrap();
    std::fs::create_dir(b.path("u1").join("dir")).unwrap();
    std::fs::write(b.path("u1").join("dir/text"), "cobalt ".repeat(100_000)).unwrap();
    b.snapshot("u1", "s1").unwrap();
    let stream = stream_of(&b, "u1", "s1", None);
    let name = peer
        .receive("u1", &mut stream.as_slice(), 64 * MIB)
        .unwrap();
    assert_eq!(name, "s1");
    assert_eq!(peer.received("u1").unwrap(), ["s1"]);
    assert_eq!(peer.staged().unwrap(), ["u1"]);
    assert!(peer.list().unwrap().is_empty(), "received is not live yet");
    peer.promote("s1", &r).unwrap();
    peer.promote("s1", &r).unwrap();
    assert_eq!(
        peer.list().unwrap(),
        vec![r.clone()],
        "the record comes along"
    );
    for f in ["random", "dir/text"] {
        assert!(
            std::fs::read(b.path("u1").join(f)).unwrap()
                == std::fs::read(peer.path("u1").join(f)).unwrap(),
            "{f} differs"
        );
    }
    if peer.can(Capability::Compression) {
        assert_eq!(peer.compression("u1").unwrap(), Compression::Zstd);
    }
    // The live copy is writable, has the record's limit, and the quota holds.
    assert_eq!(peer.usage("u1").unwrap().limit_bytes, 32 * MIB);
    assert!(
        fill(&peer, "u1", "more", 40 * MIB).is_err(),
        "quota on the received copy"
    );
    peer.discard_received("u1").unwrap();
    assert!(peer.received("u1").unwrap().is_empty());
    assert!(peer.staged().unwrap().is_empty());
    assert!(
        peer.path("u1").join("random").exists(),
        "discarding staging keeps the live volume"
    );
}

pub fn an_incremental_send_applies_on_the_common_parent(h: &impl Harness) {
    let Some((b, peer)) = sends(h) else { return };
    b.create(&record("u1", 32 * MIB)).unwrap();
    fill(&b, "u1", "big", 4 * MIB).unwrap();
    std::fs::write(b.path("u1").join("gone"), b"x").unwrap();
    b.snapshot("u1", "s1").unwrap();
    let full = stream_of(&b, "u1", "s1", None);
    peer.receive("u1", &mut full.as_slice(), 64 * MIB).unwrap();
    std::fs::write(b.path("u1").join("new"), b"appended after s1").unwrap();
    std::fs::remove_file(b.path("u1").join("gone")).unwrap();
    b.snapshot("u1", "s2").unwrap();
    let delta = stream_of(&b, "u1", "s2", Some("s1"));
    assert!(
        (delta.len() as u64) < MIB,
        "the increment carries the change, not the volume ({} bytes)",
        delta.len()
    );
    assert_eq!(
        peer.receive("u1", &mut delta.as_slice(), 64 * MIB).unwrap(),
        "s2"
    );
    assert_eq!(peer.received("u1").unwrap(), ["s1", "s2"]);
    peer.promote("s2", &record("u1", 32 * MIB)).unwrap();
    assert_eq!(
        std::fs::read(peer.path("u1").join("new")).unwrap(),
        b"appended after s1"
    );
    assert!(!peer.path("u1").join("gone").exists());
    assert!(
        std::fs::read(b.path("u1").join("big")).unwrap()
            == std::fs::read(peer.path("u1").join("big")).unwrap()
    );
    assert!(matches!(
        b.send("u1", "s2", Some("nope")),
        Err(BackendError::UnknownSnapshot { .. })
    ));
}

pub fn a_truncated_corrupt_or_oversized_stream_leaves_nothing_behind(h: &impl Harness) {
    let Some((b, peer)) = sends(h) else { return };
    b.create(&record("u1", 32 * MIB)).unwrap();
    fill(&b, "u1", "data", 2 * MIB).unwrap();
    b.snapshot("u1", "s1").unwrap();
    let stream = stream_of(&b, "u1", "s1", None);
    let nothing = |peer: &dyn Fn() -> Vec<String>| assert!(peer().is_empty());
    for cut in [stream.len() / 2, stream.len() - 10, 100] {
        let err = peer
            .receive("u1", &mut &stream[..cut], 64 * MIB)
            .unwrap_err();
        assert!(
            matches!(err, BackendError::BadStream { .. }),
            "cut at {cut}: {err}"
        );
        nothing(&|| peer.received("u1").unwrap());
    }
    let mut corrupt = stream.clone();
    let mid = corrupt.len() / 2;
    for byte in &mut corrupt[mid..mid + 64] {
        *byte ^= 0x5a;
    }
    assert!(peer
        .receive("u1", &mut corrupt.as_slice(), 64 * MIB)
        .is_err());
    nothing(&|| peer.received("u1").unwrap());
    let err = peer.receive("u1", &mut stream.as_slice(), MIB).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    nothing(&|| peer.received("u1").unwrap());
    assert!(peer.list().unwrap().is_empty());
    // And the whole stream still goes in afterwards.
    peer.receive("u1", &mut stream.as_slice(), 64 * MIB)
        .unwrap();
    assert_eq!(peer.received("u1").unwrap(), ["s1"]);
}

/// A reader that fails after `left` bytes, like a connection dropped or a process killed.
struct Interrupted<'a> {
    data: &'a [u8],
    left: usize,
}

impl std::io::Read for Interrupted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "peer died",
            ));
        }
        let n = buf.len().min(self.left).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.left -= n;
        Ok(n)
    }
}

pub fn a_receive_interrupted_half_way_can_be_retried(h: &impl Harness) {
    let Some((b, peer)) = sends(h) else { return };
    b.create(&record("u1", 32 * MIB)).unwrap();
    fill(&b, "u1", "data", 3 * MIB).unwrap();
    b.snapshot("u1", "s1").unwrap();
    let stream = stream_of(&b, "u1", "s1", None);
    let mut cut = Interrupted {
        data: &stream,
        left: stream.len() / 3,
    };
    assert!(peer.receive("u1", &mut cut, 64 * MIB).is_err());
    // A new instance (the agent restarted) receives the same stream again.
    let again = h.open_peer().unwrap();
    assert!(again.received("u1").unwrap().is_empty());
    assert_eq!(
        again
            .receive("u1", &mut stream.as_slice(), 64 * MIB)
            .unwrap(),
        "s1"
    );
    again.promote("s1", &record("u1", 32 * MIB)).unwrap();
    assert!(
        std::fs::read(b.path("u1").join("data")).unwrap()
            == std::fs::read(again.path("u1").join("data")).unwrap()
    );
}

pub fn sending_an_unknown_volume_or_snapshot_is_an_error(h: &impl Harness) {
    let Some((b, _peer)) = sends(h) else { return };
    assert!(matches!(
        b.send("missing", "s1", None),
        Err(BackendError::UnknownVolume(_))
    ));
    b.create(&record("u1", 16 * MIB)).unwrap();
    assert!(matches!(
        b.send("u1", "never-taken", None),
        Err(BackendError::UnknownSnapshot { .. })
    ));
}

/// Instantiates every conformance case as a `#[test]` for the harness `$make` builds.
#[macro_export]
macro_rules! backend_conformance {
    ($make:expr) => {
        mod backend_conformance {
            use super::*;
            use $crate::backend::conformance as c;
            #[test]
            fn an_empty_backend_lists_nothing() {
                c::an_empty_backend_lists_nothing(&$make)
            }
            #[test]
            fn a_created_volume_is_listed_with_its_metadata() {
                c::a_created_volume_is_listed_with_its_metadata(&$make)
            }
            #[test]
            fn create_is_idempotent() {
                c::create_is_idempotent(&$make)
            }
            #[test]
            fn destroy_removes_the_volume() {
                c::destroy_removes_the_volume(&$make)
            }
            #[test]
            fn destroying_an_unknown_volume_is_unknown_volume() {
                c::destroying_an_unknown_volume_is_unknown_volume(&$make)
            }
            #[test]
            fn destroying_twice_is_unknown_volume() {
                c::destroying_twice_is_unknown_volume(&$make)
            }
            #[test]
            fn the_quota_is_enforced() {
                c::the_quota_is_enforced(&$make)
            }
            #[test]
            fn usage_of_all_volumes_agrees_with_each_volumes_usage() {
                c::usage_of_all_volumes_agrees_with_each_volumes_usage(&$make)
            }
            #[test]
            fn resize_grows_and_shrinks_only_above_what_is_used() {
                c::resize_grows_and_shrinks_only_above_what_is_used(&$make)
            }
            #[test]
            fn a_clone_has_the_sources_content_and_is_independent_after() {
                c::a_clone_has_the_sources_content_and_is_independent_after(&$make)
            }
            #[test]
            fn compression_is_set_and_read_back() {
                c::compression_is_set_and_read_back(&$make)
            }
            #[test]
            fn defragment_keeps_the_content_and_can_be_repeated() {
                c::defragment_keeps_the_content_and_can_be_repeated(&$make)
            }
            #[test]
            fn operations_on_an_unknown_volume_are_unknown_volume() {
                c::operations_on_an_unknown_volume_are_unknown_volume(&$make)
            }
            #[test]
            fn the_backend_names_its_kind() {
                c::the_backend_names_its_kind(&$make)
            }
            #[test]
            fn a_fresh_instance_lists_the_same_volumes() {
                c::a_fresh_instance_lists_the_same_volumes(&$make)
            }
            #[test]
            fn capacity_is_reported_and_changes_with_use() {
                c::capacity_is_reported_and_changes_with_use(&$make)
            }
            #[test]
            fn data_survives_a_resize() {
                c::data_survives_a_resize(&$make)
            }
            #[test]
            fn destroying_one_volume_leaves_the_others_intact() {
                c::destroying_one_volume_leaves_the_others_intact(&$make)
            }
            #[test]
            fn after_a_reboot_every_volume_is_back_with_its_data() {
                c::after_a_reboot_every_volume_is_back_with_its_data(&$make)
            }
            #[test]
            fn a_snapshot_keeps_the_content_of_its_moment() {
                c::a_snapshot_keeps_the_content_of_its_moment(&$make)
            }
            #[test]
            fn a_snapshot_is_unchanged_by_writes_to_the_volume_and_to_its_restores() {
                c::a_snapshot_is_unchanged_by_writes_to_the_volume_and_to_its_restores(&$make)
            }
            #[test]
            fn a_restore_has_the_snapshots_content_its_own_size_and_is_independent() {
                c::a_restore_has_the_snapshots_content_its_own_size_and_is_independent(&$make)
            }
            #[test]
            fn snapshot_space_is_counted_once_the_volume_changes() {
                c::snapshot_space_is_counted_once_the_volume_changes(&$make)
            }
            #[test]
            fn a_full_send_and_receive_is_byte_identical() {
                c::a_full_send_and_receive_is_byte_identical(&$make)
            }
            #[test]
            fn an_incremental_send_applies_on_the_common_parent() {
                c::an_incremental_send_applies_on_the_common_parent(&$make)
            }
            #[test]
            fn a_truncated_corrupt_or_oversized_stream_leaves_nothing_behind() {
                c::a_truncated_corrupt_or_oversized_stream_leaves_nothing_behind(&$make)
            }
            #[test]
            fn a_receive_interrupted_half_way_can_be_retried() {
                c::a_receive_interrupted_half_way_can_be_retried(&$make)
            }
            #[test]
            fn sending_an_unknown_volume_or_snapshot_is_an_error() {
                c::sending_an_unknown_volume_or_snapshot_is_an_error(&$make)
            }
        }
    };
}
