//! A real BTRFS filesystem on a loop device, mounted in a temporary directory; unmounted (with
//! everything mounted under it) and its image removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require;

pub struct BtrfsPool {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl BtrfsPool {
    /// Makes a `size_mib` BTRFS image, loop-mounts it, and returns the guard.
    pub fn new(size_mib: u64) -> BtrfsPool {
        require("mkfs.btrfs");
        require("btrfs");
        let dir = tempfile::Builder::new()
            .prefix("cobalt-pool-")
            .tempdir()
            .expect("temp dir");
        let image = dir.path().join("pool.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("image file");
        run(Command::new("mkfs.btrfs").arg("-q").arg("-f").arg(&image));
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&image)
            .arg(&mount));
        BtrfsPool { dir, mount }
    }

    /// The mounted filesystem's root.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("pool.img")
    }
}

impl Drop for BtrfsPool {
    fn drop(&mut self) {
        // Bind mounts of subvolumes (exports) may sit under the pool's temp dir: unmount all.
        let _ = Command::new("umount").arg("-R").arg(&self.mount).status();
        if std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .contains(&*self.mount.to_string_lossy())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

/// Lazily unmounts every mount at or below `dir` (deepest first), e.g. bind mounts a killed
/// daemon left behind.
pub fn unmount_under(dir: &Path) {
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}
