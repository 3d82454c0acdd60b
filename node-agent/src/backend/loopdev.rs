//! The loop backend: each volume is a sparse image file in the pool directory, attached to a
//! loop device, formatted ext4 or xfs, and mounted under the agent's state directory. For users
//! who need a classic filesystem per volume (databases that want xfs, tools that dislike btrfs).
//!
//! Layout: `POOL/<uid>.img` (the image), `POOL/<uid>.json` (the [`VolumeRecord`], written last
//! and atomically, so a record means the volume is complete), mounted at `MOUNTS/<uid>`.
//! A restarted agent, or one after a host reboot (loop devices and mounts gone), re-attaches and
//! re-mounts every volume from the records alone, and detaches stale attachments.
//!
//! Decisions (ARCHITECTURE.md "The loop backend"):
//! - **Formatting only when `blkid` finds no signature**: never mkfs over data, also when a
//!   create is repeated after a crash.
//! - **The size is hard by construction** (the filesystem is the image). Grows are online: the
//!   image grows, the loop device's capacity is refreshed, the filesystem grows (`resize2fs`,
//!   `xfs_growfs`). **Shrinks are refused** for both filesystems (xfs cannot shrink; ext4 only
//!   unmounted, which would take the volume offline): the backend does not declare `shrink`.
//! - **Clones are consistent copies**: the source filesystem is frozen (`fsfreeze`) while its
//!   image is copied — by reflink (`FICLONE`, instant) where the pool directory's filesystem
//!   supports it, else a sparse copy — then thawed. xfs clones mount with `nouuid`.
//! - No compression, defragmentation, snapshots or streams: volumes asking for them are not
//!   placed on loop machines, and moves to or from a loop machine are refused with a reason.
//! - Attaching is serialised in the process and retried when another process raced for the same
//!   free loop device.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use cobalt_api::Capability;

use super::{io, run, Backend, BackendError, PoolCapacity, Result, VolumeRecord, VolumeUsage};

/// The Machine label naming the loop backend's filesystem (`ext4`, `xfs`).
pub const FILESYSTEM_LABEL: &str = "cobalt.io/filesystem";

/// The filesystem inside each image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filesystem {
    Ext4,
    Xfs,
}

impl Filesystem {
    pub fn parse(s: &str) -> std::result::Result<Filesystem, String> {
        match s {
            "ext4" => Ok(Filesystem::Ext4),
            "xfs" => Ok(Filesystem::Xfs),
            other => Err(format!(
                "filesystem {other:?} is not supported; use ext4 or xfs"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }

    /// The smallest image this filesystem formats (xfs needs 300 MiB).
    pub fn min_bytes(self) -> u64 {
        match self {
            Filesystem::Ext4 => 1 << 20,
            Filesystem::Xfs => 300 << 20,
        }
    }
}

pub struct LoopBackend {
    pool: PathBuf,
    mounts: PathBuf,
    fs: Filesystem,
    /// Whether mounted filesystems can grow here: xfs always; ext4 only with CAP_SYS_RESOURCE,
    /// which the kernel requires for its online resize (some containers drop it).
    grow_online: bool,
    /// One attach at a time in this process (losetup's find-then-set is not atomic).
    attach: Mutex<()>,
}

/// Attempts at attaching an image when another process took the free device first.
const ATTACH_ATTEMPTS: usize = 10;

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// The device mounted at `dir`, if `dir` is a mount point (per this process's mount table).
fn mounted_device(dir: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = dir.to_string_lossy();
    table.lines().find_map(|l| {
        let point = l.split(' ').nth(4)?.replace("\\040", " ");
        let (_, after) = l.split_once(" - ")?;
        (point == want).then(|| after.split(' ').nth(1).unwrap_or_default().to_string())
    })
}

fn is_mounted(dir: &Path) -> bool {
    mounted_device(dir).is_some()
}

impl LoopBackend {
    /// Opens the pool directory (created if missing), with volumes mounted under `mounts`, and
    /// brings every volume back: attached, mounted, not frozen; stale attachments detached.
    pub fn open(
        pool: impl Into<PathBuf>,
        mounts: impl Into<PathBuf>,
        fs: Filesystem,
    ) -> Result<LoopBackend> {
        let (pool, mounts) = (pool.into(), mounts.into());
        let for_fs: &[&str] = match fs {
            Filesystem::Ext4 => &["mkfs.ext4", "resize2fs", "e2fsck", "tune2fs"],
            Filesystem::Xfs => &["mkfs.xfs", "xfs_growfs", "xfs_admin"],
        };
        for tool in ["losetup", "blkid", "mount", "umount", "fsfreeze", "cp"]
            .iter()
            .chain(for_fs)
        {
            if run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_err() {
                return Err(BackendError::InvalidPool {
                    path: pool,
                    reason: format!(
                        "the loop backend needs {tool} (Debian: util-linux, e2fsprogs, xfsprogs)"
                    ),
                });
            }
        }
        std::fs::create_dir_all(&pool).map_err(io("create pool directory", &pool))?;
        std::fs::create_dir_all(&mounts).map_err(io("create mounts directory", &mounts))?;
        let b = LoopBackend {
            pool,
            mounts,
            fs,
            grow_online: fs == Filesystem::Xfs || has_cap_sys_resource(),
            attach: Mutex::new(()),
        };
        b.recover()?;
        Ok(b)
    }

    fn image(&self, uid: &str) -> PathBuf {
        self.pool.join(format!("{uid}.img"))
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.pool.join(format!("{uid}.json"))
    }

    fn read_record(&self, uid: &str) -> Option<VolumeRecord> {
        let bytes = std::fs::read(self.record_path(uid)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_record(&self, record: &VolumeRecord) -> Result<()> {
        let path = self.record_path(&record.uid);
        let tmp = self.pool.join(format!(".{}.json.tmp", record.uid));
        let json = serde_json::to_vec(record).unwrap_or_default();
        std::fs::write(&tmp, json).map_err(io("write volume record", &tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("sync volume record", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("write volume record", &path))
    }

    fn existing(&self, uid: &str) -> Result<VolumeRecord> {
        self.read_record(uid)
            .ok_or_else(|| BackendError::UnknownVolume(uid.to_string()))
    }

    /// Loop devices attached to `image`.
    fn devices_of(&self, image: &Path) -> Result<Vec<String>> {
        let out = run(Command::new("losetup").arg("-j").arg(image))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(':').next())
            .map(str::to_string)
            .collect())
    }

    /// The loop device of `image`, attaching it if it has none.
    fn attach(&self, image: &Path) -> Result<String> {
        let _one = self.attach.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dev) = self.devices_of(image)?.into_iter().next() {
            return Ok(dev);
        }
        let mut last = None;
        for attempt in 0..ATTACH_ATTEMPTS {
            match run(Command::new("losetup")
                .args(["--find", "--show", "--nooverlap"])
                .arg(image))
            {
                Ok(out) => return Ok(out.trim().to_string()),
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(20 * (attempt as u64 + 1)));
                }
            }
        }
        Err(last.unwrap_or(BackendError::Command {
            command: "losetup --find".into(),
            stderr: "no attempt made".into(),
        }))
    }

    /// Attaches, formats if blank, and mounts the image of `uid`.
    fn bring_up(&self, uid: &str) -> Result<()> {
        let image = self.image(uid);
        let dev = self.attach(&image)?;
        let signature = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(&dev)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if signature.is_empty() {
            match self.fs {
                Filesystem::Ext4 => run(Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-m", "0", "-E", "nodiscard"])
                    .arg(&dev))?,
                Filesystem::Xfs => run(Command::new("mkfs.xfs").args(["-q", "-K"]).arg(&dev))?,
            };
        }
        let dir = self.mounts.join(uid);
        std::fs::create_dir_all(&dir).map_err(io("create mount point", &dir))?;
        if !is_mounted(&dir) {
            let mut cmd = Command::new("mount");
            if self.fs == Filesystem::Xfs {
                cmd.args(["-o", "nouuid"]);
            }
            run(cmd.arg(&dev).arg(&dir))?;
        }
        Ok(())
    }

    /// Unmounts and detaches the volume (its image stays).
    fn take_down(&self, uid: &str) -> Result<()> {
        let dir = self.mounts.join(uid);
        if is_mounted(&dir) {
            run(Command::new("umount").arg(&dir))?;
        }
        for dev in self.devices_of(&self.image(uid))? {
            let _ = run(Command::new("losetup").arg("-d").arg(&dev));
        }
        Ok(())
    }

    /// After a restart or a reboot: every volume attached and mounted, none left frozen and no
    /// partial copy left (a clone interrupted mid-copy), and stale loop devices detached.
    fn recover(&self) -> Result<()> {
        // Partial copies of an interrupted clone (never a volume's image: those have no dot).
        for entry in std::fs::read_dir(&self.pool).map_err(io("list pool", &self.pool))? {
            let path = entry.map_err(io("list pool", &self.pool))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with('.') && name.ends_with(".img.tmp") {
                let _ = std::fs::remove_file(&path);
            }
        }
        for r in self.list()? {
            self.bring_up(&r.uid)?;
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(self.mounts.join(&r.uid))
                .output();
        }
        let out = run(Command::new("losetup").args(["-l", "-n", "-O", "NAME,BACK-FILE"]))?;
        for line in out.lines() {
            let mut cols = line.split_whitespace();
            let (Some(dev), Some(file)) = (cols.next(), cols.next()) else {
                continue;
            };
            let file = Path::new(file);
            let ours = file.parent() == Some(self.pool.as_path());
            let uid = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".img"));
            if let (true, Some(uid)) = (ours, uid) {
                // Keep the device the volume is mounted from; any other on its image is stale,
                // and so is any on an image without a record that nothing mounts.
                let mounted = mounted_device(&self.mounts.join(uid));
                let stale = match &mounted {
                    Some(m) => m != dev,
                    None => self.read_record(uid).is_none(),
                };
                if stale {
                    let _ = run(Command::new("losetup").arg("-d").arg(dev));
                }
            }
        }
        Ok(())
    }

    fn check_can_grow(&self) -> Result<()> {
        if self.grow_online {
            return Ok(());
        }
        Err(BackendError::ResizeUnsupported {
            reason: "growing an ext4 loop volume online needs CAP_SYS_RESOURCE, which this agent does not have; the size stays".into(),
        })
    }

    /// Grows the image, the loop device and the mounted filesystem to `bytes`.
    fn grow(&self, uid: &str, bytes: u64) -> Result<()> {
        let image = self.image(uid);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(bytes))
            .map_err(io("grow image", &image))?;
        let dev = self.attach(&image)?;
        run(Command::new("losetup").arg("-c").arg(&dev))?;
        match self.fs {
            Filesystem::Ext4 => run(Command::new("resize2fs").arg(&dev))?,
            Filesystem::Xfs => run(Command::new("xfs_growfs").arg(self.mounts.join(uid)))?,
        };
        Ok(())
    }
}

/// Unfreezes a mounted filesystem when dropped.
struct Frozen<'a>(&'a Path);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(self.0).output();
    }
}

impl Backend for LoopBackend {
    fn kind(&self) -> &'static str {
        "loop"
    }

    fn labels(&self) -> std::collections::BTreeMap<String, String> {
        [
            (cobalt_api::BACKEND_LABEL.to_string(), "loop".to_string()),
            (FILESYSTEM_LABEL.to_string(), self.fs.as_str().to_string()),
        ]
        .into()
    }

    fn capabilities(&self) -> Vec<Capability> {
        let mut caps = vec![Capability::Clone];
        if self.grow_online {
            caps.push(Capability::Grow);
        }
        caps
    }

    fn create(&self, record: &VolumeRecord) -> Result<()> {
        if let Some(existing) = self.read_record(&record.uid) {
            if existing.uid != record.uid {
                return Err(BackendError::Mismatch {
                    uid: record.uid.clone(),
                    found: format!("{existing:?}"),
                });
            }
            return self.bring_up(&record.uid);
        }
        // xfs has a minimum size: the volume gets it, and its record (its limit in force, which
        // the ledger counts) says so; the agent reports the smaller spec as a refused shrink.
        let bytes = record.size_bytes.max(self.fs.min_bytes());
        let image = self.image(&record.uid);
        if !image.exists() {
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(bytes))
                .map_err(io("create image", &image))?;
        }
        self.bring_up(&record.uid)?;
        self.write_record(&VolumeRecord {
            size_bytes: bytes,
            ..record.clone()
        })
    }

    fn destroy(&self, uid: &str) -> Result<()> {
        self.existing(uid)?;
        self.take_down(uid)?;
        let record = self.record_path(uid);
        std::fs::remove_file(&record).map_err(io("remove volume record", &record))?;
        let image = self.image(uid);
        match std::fs::remove_file(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove image", &image)(e)),
        }
        let _ = std::fs::remove_dir(self.mounts.join(uid));
        Ok(())
    }

    fn resize(&self, uid: &str, size_bytes: u64) -> Result<()> {
        let mut record = self.existing(uid)?;
        let current = std::fs::metadata(self.image(uid))
            .map_err(io("read image size", &self.image(uid)))?
            .len();
        let wanted = size_bytes.max(self.fs.min_bytes());
        if wanted < current {
            return Err(BackendError::ResizeUnsupported {
                reason: format!(
                    "a loop volume with {} cannot shrink online; the size stays {current} bytes",
                    self.fs.as_str()
                ),
            });
        }
        if wanted > current {
            self.check_can_grow()?;
            self.grow(uid, wanted)?;
        }
        record.size_bytes = size_bytes;
        self.write_record(&record)
    }

    fn clone_from(&self, source_uid: &str, record: &VolumeRecord) -> Result<()> {
        if self.read_record(&record.uid).is_some() {
            return self.create(record);
        }
        let source = self.existing(source_uid)?;
        let src_image = self.image(source_uid);
        let src_bytes = std::fs::metadata(&src_image)
            .map_err(io("read image size", &src_image))?
            .len();
        if record.size_bytes < source.size_bytes {
            return Err(BackendError::ResizeUnsupported {
                reason: format!(
                    "a clone on a loop machine needs at least its source's size ({} bytes)",
                    source.size_bytes
                ),
            });
        }
        let image = self.image(&record.uid);
        let tmp = self.pool.join(format!(".{}.img.tmp", record.uid));
        {
            // A consistent copy: no write reaches the source filesystem while it is copied.
            let mount = self.mounts.join(source_uid);
            run(Command::new("fsfreeze").arg("-f").arg(&mount))?;
            let _thaw = Frozen(&mount);
            run(Command::new("cp")
                .args(["--reflink=auto", "--sparse=always"])
                .arg(&src_image)
                .arg(&tmp))?;
        }
        let wanted = record.size_bytes.max(self.fs.min_bytes());
        // The copy is its own filesystem: a new UUID (NFS servers tell filesystems apart by it,
        // and xfs refuses to mount a duplicate), and grown before it is ever mounted.
        match self.fs {
            Filesystem::Ext4 => {
                if wanted > src_bytes {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&tmp)
                        .and_then(|f| f.set_len(wanted))
                        .map_err(io("grow cloned image", &tmp))?;
                }
                // The copy is of a mounted filesystem: replay its journal first. Exit 0: clean,
                // 1: errors corrected; anything else is a failure.
                let fsck = Command::new("e2fsck")
                    .args(["-f", "-y"])
                    .arg(&tmp)
                    .output()
                    .map_err(io("run e2fsck", &tmp))?;
                if !matches!(fsck.status.code(), Some(0 | 1)) {
                    return Err(BackendError::Command {
                        command: "e2fsck -f -y".into(),
                        stderr: String::from_utf8_lossy(&fsck.stdout).into_owned(),
                    });
                }
                run(Command::new("tune2fs").args(["-U", "random"]).arg(&tmp))?;
                if wanted > src_bytes {
                    // Offline: needs no privilege beyond the file's.
                    run(Command::new("resize2fs").arg(&tmp))?;
                }
            }
            Filesystem::Xfs => {
                run(Command::new("xfs_admin").args(["-U", "generate"]).arg(&tmp))?;
            }
        }
        std::fs::rename(&tmp, &image).map_err(io("place cloned image", &image))?;
        self.bring_up(&record.uid)?;
        if wanted > src_bytes && self.fs == Filesystem::Xfs {
            self.grow(&record.uid, wanted)?;
        }
        self.write_record(&VolumeRecord {
            size_bytes: wanted,
            ..record.clone()
        })
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.pool).map_err(io("list volumes", &self.pool))? {
            let path = entry.map_err(io("list volumes", &self.pool))?.path();
            let Some(uid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            if let Some(r) = self.read_record(uid) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(out)
    }

    fn get(&self, uid: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.read_record(uid))
    }

    fn usage(&self, uid: &str) -> Result<VolumeUsage> {
        let record = self.existing(uid)?;
        let dir = self.mounts.join(uid);
        let s = nix::sys::statvfs::statvfs(&dir).map_err(|e| BackendError::Io {
            op: "statvfs",
            path: dir.clone(),
            source: e.into(),
        })?;
        let used = (s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64;
        Ok(VolumeUsage {
            used_bytes: used,
            limit_bytes: record.size_bytes,
        })
    }

    fn capacity(&self) -> Result<PoolCapacity> {
        let s = nix::sys::statvfs::statvfs(&self.pool).map_err(|e| BackendError::Io {
            op: "statvfs",
            path: self.pool.clone(),
            source: e.into(),
        })?;
        let total = s.blocks() as u64 * s.fragment_size() as u64;
        let free = s.blocks_available() as u64 * s.fragment_size() as u64;
        Ok(PoolCapacity {
            total_bytes: total,
            used_bytes: total.saturating_sub(free),
        })
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.mounts.join(uid)
    }
}
