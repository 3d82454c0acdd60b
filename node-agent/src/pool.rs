//! `cobalt-agent pool create|destroy`: a loopback BTRFS pool for demos and tests.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().map_err(|e| {
        anyhow::anyhow!("cannot run {cmd:?}: {e} (install btrfs-progs: `make deps`)")
    })?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn mounted(mount: &Path) -> bool {
    let m = mount.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*m))
}

pub fn create(image: &Path, size_bytes: u64, mount: &Path) -> anyhow::Result<()> {
    if mounted(mount) {
        println!("pool already mounted at {}", mount.display());
        return Ok(());
    }
    if let Some(dir) = image.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::create_dir_all(mount)?;
    if !image.exists() {
        std::fs::File::create(image)?.set_len(size_bytes)?;
        run(Command::new("mkfs.btrfs").arg("-q").arg(image))?;
    }
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(image)
        .arg(mount))?;
    println!("pool {} mounted at {}", image.display(), mount.display());
    Ok(())
}

pub fn destroy(image: &Path, mount: &Path) -> anyhow::Result<()> {
    if mounted(mount) {
        run(Command::new("umount").arg("-R").arg(mount))?;
    }
    if image.exists() {
        std::fs::remove_file(image)?;
    }
    let _ = std::fs::remove_dir(mount);
    println!("pool {} removed", image.display());
    Ok(())
}
