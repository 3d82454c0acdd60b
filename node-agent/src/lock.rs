//! One agent per machine: an exclusive `flock` on `<stateDir>/agent.lock`, held for the life of
//! the process (the kernel releases it when the process dies, however it dies).

use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub struct StateLock {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            anyhow::anyhow!("cannot create state directory {}: {e}", state_dir.display())
        })?;
        let path = state_dir.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, _)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another cobalt-agent is already running for state directory {} (pid {}); one agent per machine",
                    state_dir.display(),
                    holder.trim()
                );
            }
        };
        lock.set_len(0).ok();
        write!(lock, "{}", std::process::id()).ok();
        Ok(StateLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
