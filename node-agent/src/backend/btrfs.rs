//! The BTRFS backend: each volume is a subvolume `POOL/volumes/<uid>` with a qgroup limit on
//! its referenced bytes (a hard quota: writes past it fail with EDQUOT), the compression
//! property, and its [`VolumeRecord`] in the `user.cobalt.volume` xattr of the subvolume root.
//!
//! Subvolume create/snapshot/delete, qgroup limits and quota control go through ioctls
//! (≈0.1 ms where the CLI costs ≈5 ms); the filesystem magic is checked before any ioctl.
//! Reading qgroup usage and defragmenting use `btrfs` (progs' JSON output for qgroups is broken
//! in 6.2, so the raw table is parsed).
//!
//! Snapshots are read-only subvolumes `POOL/snapshots/<uid>/<name>`. A stream (`btrfs send`) is
//! received into `POOL/staging/<uid>/`; the received snapshot counts only once the stream was
//! checked complete and a marker file `.<name>.complete` written beside it — the stream must end
//! with the send stream's END command, since `btrfs receive` itself accepts a stream cut at a
//! command boundary as whole. Unmarked subvolumes there are dropped before the next receive. The live volume
//! of a received snapshot is a writable snapshot of it (a received subvolume is never made
//! writable: later incrementals would no longer apply on it).
//!
//! Crash safety: `create` makes the subvolume, sets limit and compression, and writes the record
//! *last*; run again after a crash at any point, it finishes the job. `destroy` deletes the
//! subvolume, commits, then removes its qgroup (a deleted subvolume otherwise leaves one behind).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cobalt_api::{Capability, Compression};

use super::stream::SendStream;
use super::{io, run};
use super::{
    Backend, BackendError, PoolCapacity, Result, SnapshotUsage, VolumeRecord, VolumeUsage,
};

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const RECORD_XATTR: &str = "user.cobalt.volume";
const COMPRESSION_XATTR: &str = "btrfs.compression";
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;
const QUOTA_CTL_ENABLE: u64 = 1;
/// How long `destroy` waits for the kernel to release a deleted subvolume's qgroup.
const QGROUP_RELEASE_DEADLINE: Duration = Duration::from_secs(20);

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

#[repr(C)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

#[repr(C)]
struct QgroupCreateArgs {
    create: u64,
    qgroupid: u64,
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

nix::ioctl_none!(ioc_sync, 0x94, 8);
nix::ioctl_write_ptr!(ioc_subvol_create, 0x94, 14, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, 0x94, 15, VolArgs);
nix::ioctl_readwrite!(ioc_ino_lookup, 0x94, 18, InoLookupArgs);
nix::ioctl_readwrite!(ioc_quota_ctl, 0x94, 40, QuotaCtlArgs);
nix::ioctl_write_ptr!(ioc_snap_create_v2, 0x94, 23, VolArgsV2);
nix::ioctl_read!(ioc_subvol_getflags, 0x94, 25, u64);
nix::ioctl_write_ptr!(ioc_qgroup_create, 0x94, 42, QgroupCreateArgs);
nix::ioctl_read!(ioc_qgroup_limit, 0x94, 43, QgroupLimitArgs);
nix::ioctl_none!(ioc_quota_rescan_wait, 0x94, 46);
nix::ioctl_write_ptr!(ioc_quota_rescan, 0x94, 44, QuotaRescanArgs);
nix::ioctl_read!(ioc_fs_info, 0x94, 31, FsInfoArgs);

/// `struct btrfs_ioctl_quota_rescan_args`.
#[repr(C)]
struct QuotaRescanArgs {
    flags: u64,
    progress: u64,
    reserved: [u64; 6],
}

/// `struct btrfs_ioctl_fs_info_args` (1024 bytes); only the fsid is read.
#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

/// The highest tree level there is: with `qgroups/drop_subtree_threshold` at this, the kernel
/// always accounts a dropped subvolume's extents instead of marking every qgroup inconsistent
/// (which stops the hard limits from holding until a rescan; see ARCHITECTURE.md "Snapshots").
const BTRFS_MAX_LEVEL: u8 = 8;

/// A BTRFS pool: a mounted BTRFS directory.
#[derive(Debug, Clone)]
pub struct BtrfsBackend {
    pool: PathBuf,
}

fn errno<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::errno::Errno) -> BackendError + 'a {
    move |e| BackendError::Io {
        op,
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

fn vol_args(fd: i64, name: &str) -> VolArgs {
    let mut args = VolArgs {
        fd,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    };
    let bytes = name.as_bytes();
    let n = bytes.len().min(BTRFS_PATH_NAME_MAX);
    args.name[..n].copy_from_slice(&bytes[..n]);
    args
}

impl BtrfsBackend {
    /// Opens the pool: checks it is BTRFS, enables quotas (waiting for the initial rescan on
    /// existing data) and makes the `volumes` directory.
    pub fn open(pool: impl Into<PathBuf>) -> Result<BtrfsBackend> {
        let pool = pool.into();
        check_btrfs(&pool)?;
        let dir = File::open(&pool).map_err(io("open pool", &pool))?;
        let mut ctl = QuotaCtlArgs {
            cmd: QUOTA_CTL_ENABLE,
            status: 0,
        };
        // SAFETY: `ctl` is a valid, properly laid out btrfs_ioctl_quota_ctl_args for this call.
        unsafe { ioc_quota_ctl(dir.as_raw_fd(), &mut ctl) }
            .map_err(errno("enable quotas", &pool))?;
        // SAFETY: takes no argument.
        unsafe { ioc_quota_rescan_wait(dir.as_raw_fd()) }
            .map_err(errno("wait for quota rescan", &pool))?;
        let volumes = pool.join("volumes");
        std::fs::create_dir_all(&volumes).map_err(io("create volumes directory", &volumes))?;
        let backend = BtrfsBackend { pool };
        // Best effort: kernels without the knob account dropped subvolumes anyway.
        if let Some(dir) = backend.qgroups_sysfs() {
            let _ = std::fs::write(
                dir.join("drop_subtree_threshold"),
                BTRFS_MAX_LEVEL.to_string(),
            );
        }
        Ok(backend)
    }

    /// `/sys/fs/btrfs/<fsid>/qgroups`, where the kernel says whether qgroups are consistent.
    fn qgroups_sysfs(&self) -> Option<PathBuf> {
        let dir = File::open(&self.pool).ok()?;
        let mut args = FsInfoArgs {
            max_id: 0,
            num_devices: 0,
            fsid: [0; 16],
            rest: [0; 1024 - 32],
        };
        // SAFETY: valid btrfs_ioctl_fs_info_args; the kernel fills it.
        unsafe { ioc_fs_info(dir.as_raw_fd(), &mut args) }.ok()?;
        let hex: String = args.fsid.iter().map(|b| format!("{b:02x}")).collect();
        let fsid = format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        );
        Some(PathBuf::from("/sys/fs/btrfs").join(fsid).join("qgroups"))
    }

    /// After a subvolume is dropped: if the kernel marked the qgroups inconsistent (it does so
    /// instead of accounting a large dropped tree, and then no hard limit holds), rescans and
    /// waits, so limits are enforced again when this returns.
    fn keep_qgroups_consistent(&self) -> Result<()> {
        let Some(dir) = self.qgroups_sysfs() else {
            return Ok(());
        };
        let inconsistent =
            std::fs::read_to_string(dir.join("inconsistent")).is_ok_and(|v| v.trim() == "1");
        if !inconsistent {
            return Ok(());
        }
        let pool = File::open(&self.pool).map_err(io("open pool", &self.pool))?;
        let args = QuotaRescanArgs {
            flags: 0,
            progress: 0,
            reserved: [0; 6],
        };
        // SAFETY: valid btrfs_ioctl_quota_rescan_args; EINPROGRESS means one already runs.
        match unsafe { ioc_quota_rescan(pool.as_raw_fd(), &args) } {
            Ok(_) | Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(e) => return Err(errno("start quota rescan", &self.pool)(e)),
        }
        // SAFETY: takes no argument.
        unsafe { ioc_quota_rescan_wait(pool.as_raw_fd()) }
            .map_err(errno("wait for quota rescan", &self.pool))?;
        Ok(())
    }

    fn volumes_dir(&self) -> PathBuf {
        self.pool.join("volumes")
    }

    fn subvolume(&self, uid: &str) -> PathBuf {
        self.volumes_dir().join(uid)
    }

    fn existing(&self, uid: &str) -> Result<PathBuf> {
        let path = self.subvolume(uid);
        if path.is_dir() {
            Ok(path)
        } else {
            Err(BackendError::UnknownVolume(uid.to_string()))
        }
    }

    fn set_limit(&self, path: &Path, bytes: u64) -> Result<()> {
        raw::limit_referenced(path, bytes).map_err(io("set qgroup limit", path))
    }

    fn subvolume_id(&self, path: &Path) -> Result<u64> {
        let dir = File::open(path).map_err(io("open subvolume", path))?;
        let mut args = InoLookupArgs {
            treeid: 0,
            objectid: BTRFS_FIRST_FREE_OBJECTID,
            name: [0; 4080],
        };
        // SAFETY: valid btrfs_ioctl_ino_lookup_args; the kernel fills treeid.
        unsafe { ioc_ino_lookup(dir.as_raw_fd(), &mut args) }
            .map_err(errno("look up subvolume id", path))?;
        Ok(args.treeid)
    }

    /// Deletes the subvolume at `path`, commits, and removes its qgroup (the qgroup of a deleted
    /// subvolume otherwise stays; the kernel refuses (EBUSY) until the cleaner has dropped the
    /// subvolume, so this retries within a deadline).
    fn delete_subvolume(&self, path: &Path) -> Result<()> {
        let id = self.subvolume_id(path)?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(BackendError::InvalidPool {
                path: path.into(),
                reason: "not a subvolume under a directory".into(),
            });
        };
        let dir = File::open(parent).map_err(io("open parent directory", parent))?;
        let args = vol_args(0, &name.to_string_lossy());
        // SAFETY: valid btrfs_ioctl_vol_args naming the subvolume to delete under `dir`.
        unsafe { ioc_snap_destroy(dir.as_raw_fd(), &args) }
            .map_err(errno("delete subvolume", path))?;
        self.sync()?;
        let pool = File::open(&self.pool).map_err(io("open pool", &self.pool))?;
        let start = Instant::now();
        loop {
            let args = QgroupCreateArgs {
                create: 0,
                qgroupid: id,
            };
            // SAFETY: valid btrfs_ioctl_qgroup_create_args; create = 0 destroys.
            match unsafe { ioc_qgroup_create(pool.as_raw_fd(), &args) } {
                Ok(_) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) if start.elapsed() < QGROUP_RELEASE_DEADLINE => {
                    self.sync()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(errno("remove qgroup", path)(e)),
            }
        }
    }

    /// A snapshot of the subvolume `source` at `parent/name`, read-only if asked.
    fn snapshot_subvolume(
        &self,
        source: &Path,
        parent: &Path,
        name: &str,
        read_only: bool,
    ) -> Result<()> {
        let dir = File::open(parent).map_err(io("open directory", parent))?;
        let src = File::open(source).map_err(io("open subvolume", source))?;
        let mut args = VolArgsV2 {
            fd: src.as_raw_fd() as i64,
            transid: 0,
            flags: if read_only { BTRFS_SUBVOL_RDONLY } else { 0 },
            unused: [0; 4],
            name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
        };
        let bytes = name.as_bytes();
        let n = bytes.len().min(BTRFS_SUBVOL_NAME_MAX);
        args.name[..n].copy_from_slice(&bytes[..n]);
        // SAFETY: valid btrfs_ioctl_vol_args_v2: fd is the source subvolume, name the snapshot.
        unsafe { ioc_snap_create_v2(dir.as_raw_fd(), &args) }
            .map_err(errno("snapshot subvolume", &parent.join(name)))?;
        Ok(())
    }

    /// Makes volume `record` a writable snapshot of the subvolume `source` (a clone or a
    /// restore), then finishes it with `record`'s limit, compression and record.
    fn writable_copy(&self, source: &Path, record: &VolumeRecord) -> Result<()> {
        let path = self.subvolume(&record.uid);
        if !path.exists() {
            self.snapshot_subvolume(source, &self.volumes_dir(), &record.uid, false)?;
            // The snapshot carries the source's record: replace it (the limit is replaced too).
            let _ = remove_xattr(&path, RECORD_XATTR);
        }
        self.finish(&path, record)
    }

    fn is_read_only(&self, path: &Path) -> bool {
        let Ok(dir) = File::open(path) else {
            return false;
        };
        let mut flags = 0u64;
        // SAFETY: the kernel writes one u64 of subvolume flags.
        unsafe { ioc_subvol_getflags(dir.as_raw_fd(), &mut flags) }.is_ok()
            && flags & BTRFS_SUBVOL_RDONLY != 0
    }

    fn snapshots_dir(&self, uid: &str) -> PathBuf {
        self.pool.join("snapshots").join(uid)
    }

    fn staging_dir(&self, uid: &str) -> PathBuf {
        self.pool.join("staging").join(uid)
    }

    /// Read-only subvolumes directly under `dir`, by name, oldest name first.
    fn read_only_under(&self, dir: &Path) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io("list snapshots", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io("list snapshots", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && self.is_read_only(&entry.path()) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes subvolumes under `dir` that have no completion marker (what an interrupted or
    /// refused receive leaves).
    fn drop_incomplete(&self, dir: &Path) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("list directory", dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io("list directory", dir))?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if is_subvolume_root(&path) && !dir.join(complete_marker(&name)).exists() {
                self.delete_subvolume(&path)?;
            }
        }
        Ok(())
    }

    /// Deletes every subvolume under `dir` (one level), then everything else in it and `dir`.
    fn delete_all_under(&self, dir: &Path) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("list directory", dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io("list directory", dir))?.path();
            if is_subvolume_root(&path) {
                self.delete_subvolume(&path)?;
            } else if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io("remove directory", &path))?;
            } else {
                std::fs::remove_file(&path).map_err(io("remove file", &path))?;
            }
        }
        std::fs::remove_dir(dir).map_err(io("remove directory", dir))
    }

    fn sync(&self) -> Result<()> {
        let dir = File::open(&self.pool).map_err(io("open pool", &self.pool))?;
        // SAFETY: takes no argument.
        unsafe { ioc_sync(dir.as_raw_fd()) }.map_err(errno("commit", &self.pool))?;
        Ok(())
    }

    fn read_record(&self, path: &Path) -> Option<VolumeRecord> {
        let bytes = get_xattr(path, RECORD_XATTR).ok().flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_record(&self, path: &Path, record: &VolumeRecord) -> Result<()> {
        let json = serde_json::to_vec(record).unwrap_or_default();
        set_xattr(path, RECORD_XATTR, &json).map_err(io("write volume record", path))
    }

    /// Finishes a volume whose subvolume exists: limit, compression, then the record.
    fn finish(&self, path: &Path, record: &VolumeRecord) -> Result<()> {
        if let Some(existing) = self.read_record(path) {
            if existing.uid != record.uid {
                return Err(BackendError::Mismatch {
                    uid: record.uid.clone(),
                    found: format!("{existing:?}"),
                });
            }
            return Ok(());
        }
        self.set_limit(path, record.size_bytes)?;
        self.apply_compression(path, record.compression)?;
        self.write_record(path, record)
    }

    fn apply_compression(&self, path: &Path, compression: Compression) -> Result<()> {
        let value = match compression {
            Compression::None => {
                return match remove_xattr(path, COMPRESSION_XATTR) {
                    Ok(()) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
                    Err(e) => Err(BackendError::Io {
                        op: "clear compression",
                        path: path.into(),
                        source: e,
                    }),
                };
            }
            Compression::Zstd => "zstd",
            Compression::Lzo => "lzo",
            Compression::Zlib => "zlib",
        };
        set_xattr(path, COMPRESSION_XATTR, value.as_bytes()).map_err(io("set compression", path))
    }

    /// Referenced bytes of the subvolume's qgroup (committed first, so the figure is current).
    fn referenced_bytes(&self, path: &Path) -> Result<u64> {
        self.sync()?;
        let id = self.subvolume_id(path)?;
        let out = run(Command::new("btrfs")
            .args(["qgroup", "show", "-r", "--raw", "--sync"])
            .arg(path))?;
        let wanted = format!("0/{id}");
        out.lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next()? == wanted).then(|| cols.next()?.parse::<u64>().ok())?
            })
            .next()
            .ok_or_else(|| BackendError::Command {
                command: "btrfs qgroup show".into(),
                stderr: format!("no qgroup {wanted} in:\n{out}"),
            })
    }
}

impl Backend for BtrfsBackend {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            Capability::Compression,
            Capability::Clone,
            Capability::Defragment,
            Capability::Snapshot,
            Capability::SendReceive,
            Capability::Shrink,
            Capability::Grow,
        ]
    }

    fn create(&self, record: &VolumeRecord) -> Result<()> {
        let path = self.subvolume(&record.uid);
        if !path.exists() {
            raw::create_subvolume(&self.volumes_dir(), &record.uid)
                .map_err(io("create subvolume", &path))?;
        }
        self.finish(&path, record)
    }

    fn clone_from(&self, source_uid: &str, record: &VolumeRecord) -> Result<()> {
        let source = self.existing(source_uid)?;
        self.writable_copy(&source, record)
    }

    /// Destroys the volume with its snapshots and anything received for it.
    fn destroy(&self, uid: &str) -> Result<()> {
        let path = self.existing(uid)?;
        self.delete_all_under(&self.snapshots_dir(uid))?;
        self.delete_all_under(&self.staging_dir(uid))?;
        self.delete_subvolume(&path)?;
        self.keep_qgroups_consistent()
    }

    fn resize(&self, uid: &str, size_bytes: u64) -> Result<()> {
        let path = self.existing(uid)?;
        let mut record = self
            .read_record(&path)
            .ok_or_else(|| BackendError::UnknownVolume(uid.to_string()))?;
        if size_bytes < record.size_bytes {
            let used = self.referenced_bytes(&path)?;
            if used > size_bytes {
                return Err(BackendError::ResizeBlocked {
                    used_bytes: used,
                    new_bytes: size_bytes,
                });
            }
        }
        self.set_limit(&path, size_bytes)?;
        record.size_bytes = size_bytes;
        self.write_record(&path, &record)
    }

    fn set_compression(&self, uid: &str, compression: Compression) -> Result<()> {
        let path = self.existing(uid)?;
        self.apply_compression(&path, compression)?;
        if let Some(mut record) = self.read_record(&path) {
            record.compression = compression;
            self.write_record(&path, &record)?;
        }
        Ok(())
    }

    fn compression(&self, uid: &str) -> Result<Compression> {
        let path = self.existing(uid)?;
        let value = get_xattr(&path, COMPRESSION_XATTR).map_err(io("read compression", &path))?;
        Ok(match value.as_deref() {
            Some(b"zstd") => Compression::Zstd,
            Some(b"lzo") => Compression::Lzo,
            Some(b"zlib") => Compression::Zlib,
            _ => Compression::None,
        })
    }

    fn defragment(&self, uid: &str) -> Result<()> {
        let path = self.existing(uid)?;
        let mut cmd = Command::new("btrfs");
        cmd.args(["filesystem", "defragment", "-r"]);
        match self.compression(uid)? {
            Compression::None => {}
            Compression::Zstd => {
                cmd.arg("-czstd");
            }
            Compression::Lzo => {
                cmd.arg("-clzo");
            }
            Compression::Zlib => {
                cmd.arg("-czlib");
            }
        }
        run(cmd.arg(&path)).map(|_| ())
    }

    fn snapshot(&self, uid: &str, name: &str) -> Result<()> {
        check_snapshot_name(name)?;
        let source = self.existing(uid)?;
        let dir = self.snapshots_dir(uid);
        if dir.join(name).exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(io("create snapshots directory", &dir))?;
        self.snapshot_subvolume(&source, &dir, name, true)
    }

    fn snapshots(&self, uid: &str) -> Result<Vec<String>> {
        self.read_only_under(&self.snapshots_dir(uid))
    }

    fn delete_snapshot(&self, uid: &str, name: &str) -> Result<()> {
        check_snapshot_name(name)?;
        let path = self.snapshots_dir(uid).join(name);
        if !path.exists() {
            return Ok(());
        }
        self.delete_subvolume(&path)?;
        let _ = std::fs::remove_dir(self.snapshots_dir(uid));
        self.keep_qgroups_consistent()
    }

    fn snapshot_usage(
        &self,
        uids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<SnapshotUsage>>> {
        let mut out = std::collections::HashMap::new();
        let mut names = Vec::new();
        for uid in uids {
            let n = self.snapshots(uid)?;
            if !n.is_empty() {
                names.push((uid, n));
            }
        }
        if names.is_empty() {
            return Ok(out);
        }
        self.sync()?;
        let table = run(Command::new("btrfs")
            .args(["qgroup", "show", "--raw"])
            .arg(&self.pool))?;
        let figures = parse_qgroups(&table);
        for (uid, names) in names {
            let dir = self.snapshots_dir(uid);
            let mut usage = Vec::new();
            for name in names {
                let id = self.subvolume_id(&dir.join(&name))?;
                let (referenced_bytes, exclusive_bytes) =
                    figures.get(&id).copied().unwrap_or((0, 0));
                usage.push(SnapshotUsage {
                    name,
                    referenced_bytes,
                    exclusive_bytes,
                });
            }
            out.insert(uid.clone(), usage);
        }
        Ok(out)
    }

    fn restore(&self, uid: &str, name: &str, record: &VolumeRecord) -> Result<()> {
        check_snapshot_name(name)?;
        if self.read_record(&self.subvolume(&record.uid)).is_none() {
            let snapshot = self.snapshots_dir(uid).join(name);
            if !self.is_read_only(&snapshot) {
                return Err(BackendError::UnknownSnapshot {
                    uid: uid.into(),
                    name: name.into(),
                });
            }
            return self.writable_copy(&snapshot, record);
        }
        self.finish(&self.subvolume(&record.uid), record)
    }

    fn send(&self, uid: &str, name: &str, parent: Option<&str>) -> Result<SendStream> {
        self.existing(uid)?;
        let dir = self.snapshots_dir(uid);
        let snapshot = dir.join(name);
        let unknown = |n: &str| BackendError::UnknownSnapshot {
            uid: uid.into(),
            name: n.into(),
        };
        if !self.is_read_only(&snapshot) {
            return Err(unknown(name));
        }
        let mut cmd = Command::new("btrfs");
        cmd.args(["send", "-q", "--compressed-data"]);
        if let Some(p) = parent {
            if !self.is_read_only(&dir.join(p)) {
                return Err(unknown(p));
            }
            cmd.arg("-p").arg(dir.join(p));
        }
        cmd.arg(&snapshot);
        // A full stream carries about the volume's used bytes; reading them exactly would cost
        // a commit, so the last reported usage stands in (the caller knows it).
        let estimate = None;
        let command = format!("btrfs send {}", snapshot.display());
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| BackendError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            })?;
        if let Some(out) = &child.stdout {
            widen_pipe(out);
        }
        Ok(SendStream::from_child(child, command, estimate))
    }

    fn receive(&self, uid: &str, stream: &mut dyn std::io::Read, max_bytes: u64) -> Result<String> {
        let staging = self.staging_dir(uid);
        // Whatever an interrupted receive left (a subvolume without its completion marker) is
        // dropped first.
        self.drop_incomplete(&staging)?;
        std::fs::create_dir_all(&staging).map_err(io("create staging directory", &staging))?;
        let before = self.read_only_under(&staging)?;
        let bad = |reason: String| BackendError::BadStream {
            uid: uid.into(),
            reason,
        };
        let fed = receive_into(&staging, stream, max_bytes).map_err(|e| match e {
            ReceiveError::Stream(reason) => bad(reason),
            ReceiveError::Backend(e) => e,
        });
        let name = fed.and_then(|()| {
            let new: Vec<String> = self
                .read_only_under(&staging)?
                .into_iter()
                .filter(|n| !before.contains(n))
                .collect();
            match new.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(bad(format!(
                    "expected one new received snapshot, found {new:?}"
                ))),
            }
        });
        match name {
            Ok(name) => {
                let marker = staging.join(complete_marker(&name));
                let f = File::create(&marker)
                    .map_err(io("mark received snapshot complete", &marker))?;
                f.sync_all()
                    .map_err(io("mark received snapshot complete", &marker))?;
                Ok(name)
            }
            Err(e) => {
                self.drop_incomplete(&staging)?;
                Err(e)
            }
        }
    }

    fn received(&self, uid: &str) -> Result<Vec<String>> {
        let staging = self.staging_dir(uid);
        Ok(self
            .read_only_under(&staging)?
            .into_iter()
            .filter(|n| staging.join(complete_marker(n)).exists())
            .collect())
    }

    fn staged(&self) -> Result<Vec<String>> {
        let dir = self.pool.join("staging");
        let mut out = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(io("list staging", &dir))?;
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("list staging", &dir)(e)),
        }
        out.sort();
        Ok(out)
    }

    fn discard_received(&self, uid: &str) -> Result<()> {
        self.delete_all_under(&self.staging_dir(uid))
    }

    fn promote(&self, name: &str, record: &VolumeRecord) -> Result<()> {
        check_snapshot_name(name)?;
        let path = self.subvolume(&record.uid);
        if let Some(existing) = self.read_record(&path) {
            if existing.uid != record.uid {
                return Err(BackendError::Mismatch {
                    uid: record.uid.clone(),
                    found: format!("{existing:?}"),
                });
            }
        }
        if !path.exists() {
            let received = self.staging_dir(&record.uid).join(name);
            if !self.is_read_only(&received) {
                return Err(BackendError::UnknownSnapshot {
                    uid: record.uid.clone(),
                    name: name.into(),
                });
            }
            self.snapshot_subvolume(&received, &self.volumes_dir(), &record.uid, false)?;
        }
        // Every step below is idempotent, so a promote interrupted anywhere is finished by the
        // next: the limit and compression of this machine's record, then the record.
        self.set_limit(&path, record.size_bytes)?;
        self.apply_compression(&path, record.compression)?;
        self.write_record(&path, record)
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        let dir = self.volumes_dir();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("list volumes", &dir))? {
            let entry = entry.map_err(io("list volumes", &dir))?;
            // A subvolume without a record is an interrupted create; `create` finishes it.
            if let Some(record) = self.read_record(&entry.path()) {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(out)
    }

    fn get(&self, uid: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.read_record(&self.subvolume(uid)))
    }

    fn usage(&self, uid: &str) -> Result<VolumeUsage> {
        let path = self.existing(uid)?;
        let record = self
            .read_record(&path)
            .ok_or_else(|| BackendError::UnknownVolume(uid.to_string()))?;
        Ok(VolumeUsage {
            used_bytes: self.referenced_bytes(&path)?,
            limit_bytes: record.size_bytes,
        })
    }

    fn usage_all(&self) -> Result<std::collections::HashMap<String, VolumeUsage>> {
        // One qgroup listing for the whole pool, without forcing a commit: figures are as of
        // the last transaction commit (BTRFS commits at least every 30 s).
        let out = run(Command::new("btrfs")
            .args(["qgroup", "show", "-r", "--raw"])
            .arg(&self.pool))?;
        let figures = parse_qgroups(&out);
        let dir = self.volumes_dir();
        let mut usage = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io("list volumes", &dir))? {
            let path = entry.map_err(io("list volumes", &dir))?.path();
            let Some(record) = self.read_record(&path) else {
                continue;
            };
            let Ok(id) = self.subvolume_id(&path) else {
                continue;
            };
            usage.insert(
                record.uid.clone(),
                VolumeUsage {
                    used_bytes: figures.get(&id).map_or(0, |f| f.0),
                    limit_bytes: record.size_bytes,
                },
            );
        }
        Ok(usage)
    }

    fn capacity(&self) -> Result<PoolCapacity> {
        let s = nix::sys::statvfs::statvfs(&self.pool).map_err(errno("statvfs", &self.pool))?;
        let total = s.blocks() as u64 * s.fragment_size() as u64;
        let free = s.blocks_free() as u64 * s.fragment_size() as u64;
        Ok(PoolCapacity {
            total_bytes: total,
            used_bytes: total.saturating_sub(free),
        })
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.subvolume(uid)
    }
}

/// The bare syscalls behind [`BtrfsBackend::create`] — no record, no checks, no idempotence —
/// so `make bench` can measure the floor Cobalt's own provisioning is compared with.
pub mod raw {
    use super::*;

    /// `BTRFS_IOC_SUBVOL_CREATE`: a new subvolume `name` under `parent`.
    pub fn create_subvolume(parent: &Path, name: &str) -> std::io::Result<()> {
        let dir = File::open(parent)?;
        let args = vol_args(0, name);
        // SAFETY: valid btrfs_ioctl_vol_args naming a new subvolume under `dir`.
        unsafe { ioc_subvol_create(dir.as_raw_fd(), &args) }?;
        Ok(())
    }

    /// `BTRFS_IOC_QGROUP_LIMIT`: caps the referenced bytes of the subvolume at `path`.
    pub fn limit_referenced(path: &Path, bytes: u64) -> std::io::Result<()> {
        let dir = File::open(path)?;
        let mut args = QgroupLimitArgs {
            qgroupid: 0,
            lim: QgroupLimit {
                flags: QGROUP_LIMIT_MAX_RFER,
                max_rfer: bytes,
                max_excl: 0,
                rsv_rfer: 0,
                rsv_excl: 0,
            },
        };
        // SAFETY: valid btrfs_ioctl_qgroup_limit_args; qgroupid 0 means "this subvolume".
        unsafe { ioc_qgroup_limit(dir.as_raw_fd(), &mut args) }?;
        Ok(())
    }
}

/// Referenced and exclusive bytes by subvolume id, from `btrfs qgroup show --raw` (rows
/// `0/<id> <rfer> <excl> ...`).
fn parse_qgroups(out: &str) -> std::collections::HashMap<u64, (u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let id = cols.next()?.strip_prefix("0/")?.parse().ok()?;
            let rfer = cols.next()?.parse().ok()?;
            let excl = cols.next()?.parse().ok()?;
            Some((id, (rfer, excl)))
        })
        .collect()
}

/// Snapshot names are one path component of `[A-Za-z0-9._-]`, not starting with a dot.
fn check_snapshot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BackendError::UnknownSnapshot {
            uid: String::new(),
            name: format!("{name:?} (snapshot names are letters, digits, '.', '_' and '-')"),
        })
    }
}

/// Grows a pipe to 1 MiB (from 64 KiB), so streams move in fewer, larger reads and writes.
/// Best effort: a smaller pipe only costs speed.
fn widen_pipe(fd: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// The file next to a received snapshot saying its stream was complete.
fn complete_marker(name: &str) -> String {
    format!(".{name}.complete")
}

/// True when `path` is the root directory of a subvolume (inode 256).
fn is_subvolume_root(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_FIRST_FREE_OBJECTID)
}

enum ReceiveError {
    Stream(String),
    Backend(BackendError),
}

/// Feeds `stream` to `btrfs receive` into `dir`, checking it is one complete send stream no
/// larger than `max_bytes`.
fn receive_into(
    dir: &Path,
    stream: &mut dyn std::io::Read,
    max_bytes: u64,
) -> Result<(), ReceiveError> {
    use std::io::Write;
    let command = format!("btrfs receive {}", dir.display());
    let mut child = Command::new("btrfs")
        .args(["receive", "-e"])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            ReceiveError::Backend(BackendError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            })
        })?;
    let mut stdin = child.stdin.take().expect("stdin piped");
    widen_pipe(&stdin);
    let mut check = StreamCheck::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let fed = loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                break Err(format!(
                    "reading the stream failed after {total} bytes: {e}"
                ))
            }
        };
        total += n as u64;
        if total > max_bytes {
            break Err(format!(
                "it is larger than the {max_bytes} bytes allowed for this volume"
            ));
        }
        if let Err(why) = check.feed(&buf[..n]) {
            break Err(why);
        }
        if let Err(e) = stdin.write_all(&buf[..n]) {
            break Err(format!(
                "btrfs receive stopped reading after {total} bytes: {e}"
            ));
        }
    };
    let fed = fed.and_then(|()| {
        if check.complete() {
            Ok(())
        } else {
            Err(format!(
                "it ended after {total} bytes without the stream's end marker (truncated)"
            ))
        }
    });
    if let Err(why) = fed {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ReceiveError::Stream(why));
    }
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| {
        ReceiveError::Backend(BackendError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })
    })?;
    if !out.status.success() {
        return Err(ReceiveError::Stream(format!(
            "btrfs receive refused it: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Follows a btrfs send stream's framing (a 17-byte header, then commands of a 10-byte header —
/// length, command, crc — and a payload) to tell a complete stream from a cut one.
#[derive(Default)]
struct StreamCheck {
    header_seen: bool,
    pending: Vec<u8>,
    skip: u64,
    ended: bool,
}

const SEND_STREAM_MAGIC: &[u8] = b"btrfs-stream\0";
const SEND_C_END: u16 = 21;

impl StreamCheck {
    fn feed(&mut self, mut buf: &[u8]) -> std::result::Result<(), String> {
        while !buf.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(buf.len() as u64)) as usize;
                self.skip -= n as u64;
                buf = &buf[n..];
                continue;
            }
            if self.ended {
                return Err("it has data after its end marker".into());
            }
            let need = if self.header_seen { 10 } else { 17 };
            let n = (need - self.pending.len()).min(buf.len());
            self.pending.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.pending.len() < need {
                continue;
            }
            if !self.header_seen {
                if &self.pending[..13] != SEND_STREAM_MAGIC {
                    return Err("it is not a btrfs send stream (bad magic)".into());
                }
                self.header_seen = true;
            } else {
                let len = u32::from_le_bytes(self.pending[0..4].try_into().unwrap_or([0; 4]));
                let cmd = u16::from_le_bytes(self.pending[4..6].try_into().unwrap_or([0; 2]));
                self.skip = len as u64;
                self.ended = cmd == SEND_C_END;
            }
            self.pending.clear();
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.ended && self.skip == 0 && self.pending.is_empty()
    }
}

fn check_btrfs(path: &Path) -> Result<()> {
    let s = nix::sys::statfs::statfs(path).map_err(errno("statfs", path))?;
    let found = s.filesystem_type().0 as i64;
    if found != BTRFS_SUPER_MAGIC {
        return Err(BackendError::InvalidPool {
            path: path.into(),
            reason: format!(
                "not a BTRFS filesystem (statfs type {found:#x}); point backend.pool at a mounted BTRFS directory"
            ),
        });
    }
    Ok(())
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

fn c_name(name: &str) -> CString {
    CString::new(name).unwrap_or_default()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (p, n) = (c_path(path)?, c_name(name));
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_xattr(path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    let (p, n) = (c_path(path)?, c_name(name));
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a writable buffer of the given length.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENODATA) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    buf.truncate(rc as usize);
    Ok(Some(buf))
}

fn remove_xattr(path: &Path, name: &str) -> std::io::Result<()> {
    let (p, n) = (c_path(path)?, c_name(name));
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
