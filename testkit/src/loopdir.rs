//! A pool directory for the loop backend and a directory its volumes mount under, in a temporary
//! directory; on drop every mount below it is unmounted, every loop device on its images
//! detached, and the files removed. [`LoopDir::reboot`] does what a host reboot does to them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::btrfs::unmount_under;
use crate::require;

pub struct LoopDir {
    dir: tempfile::TempDir,
}

impl LoopDir {
    /// Under the system's temporary directory (`/tmp`: no reflinks here, so clones copy).
    pub fn new() -> LoopDir {
        Self::under(&std::env::temp_dir())
    }

    /// Under `parent` (e.g. a BTRFS pool's mount, where clones are reflinks).
    pub fn under(parent: &Path) -> LoopDir {
        for tool in ["losetup", "mkfs.ext4", "mkfs.xfs", "fsfreeze", "blkid"] {
            require(tool);
        }
        let dir = tempfile::Builder::new()
            .prefix("cobalt-loop-")
            .tempdir_in(parent)
            .expect("temp dir");
        std::fs::create_dir(dir.path().join("pool")).unwrap();
        std::fs::create_dir(dir.path().join("mounts")).unwrap();
        LoopDir { dir }
    }

    /// Where the images and records are.
    pub fn pool(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// Where the volumes are mounted.
    pub fn mounts(&self) -> PathBuf {
        self.dir.path().join("mounts")
    }

    /// A host reboot: every mount gone, every loop device on the pool's images detached.
    pub fn reboot(&self) {
        unmount_under(&self.mounts());
        detach_under(&self.pool());
    }
}

impl Default for LoopDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Detaches every loop device whose backing file is directly in `dir`.
pub fn detach_under(dir: &Path) {
    let out = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in out.lines() {
        let mut cols = line.split_whitespace();
        if let (Some(dev), Some(file)) = (cols.next(), cols.next()) {
            if Path::new(file).parent() == Some(dir) {
                let _ = Command::new("losetup").arg("-d").arg(dev).status();
            }
        }
    }
}

impl Drop for LoopDir {
    fn drop(&mut self) {
        self.reboot();
    }
}
