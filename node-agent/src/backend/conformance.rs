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
//! capability (compression, clone, defragment) run in full where the backend declares it;
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
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
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

pub fn resize_grows_and_shrinks_only_above_what_is_used(h: &impl Harness) {
    let b = h.open();
    b.create(&record("u1", 8 * MIB)).unwrap();
    fill(&b, "u1", "a", 6 * MIB).unwrap();
    b.resize("u1", 32 * MIB).unwrap();
    fill(&b, "u1", "b", 12 * MIB).expect("room after growing");
    assert_eq!(b.usage("u1").unwrap().limit_bytes, 32 * MIB);
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
    b.clone_from("src", &record("copy", 16 * MIB)).unwrap();
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
    assert_eq!(copy.size_bytes, 16 * MIB, "the clone has its own size");
    assert_eq!(b.usage("copy").unwrap().limit_bytes, 16 * MIB);
    b.clone_from("src", &record("copy", 16 * MIB)).unwrap();
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
        }
    };
}
