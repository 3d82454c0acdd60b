//! `cobalt-agent pool create|destroy`: a loopback BTRFS pool for demos and tests.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot run {command}: {source} (install btrfs-progs: `make deps`)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |source| PoolError::Io {
        path: path.into(),
        source,
    }
}

fn run(cmd: &mut Command) -> Result<(), PoolError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| PoolError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(PoolError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
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

pub fn create(image: &Path, size_bytes: u64, mount: &Path) -> Result<(), PoolError> {
    if mounted(mount) {
        println!("pool already mounted at {}", mount.display());
        return Ok(());
    }
    if let Some(dir) = image.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::create_dir_all(mount).map_err(io(mount))?;
    if !image.exists() {
        std::fs::File::create(image)
            .and_then(|f| f.set_len(size_bytes))
            .map_err(io(image))?;
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

pub fn destroy(image: &Path, mount: &Path) -> Result<(), PoolError> {
    if mounted(mount) {
        run(Command::new("umount").arg("-R").arg(mount))?;
    }
    if image.exists() {
        std::fs::remove_file(image).map_err(io(image))?;
    }
    let _ = std::fs::remove_dir(mount);
    println!("pool {} removed", image.display());
    Ok(())
}
