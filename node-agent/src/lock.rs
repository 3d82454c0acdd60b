//! One agent per machine: an exclusive `flock` on `<stateDir>/agent.lock`, held for the life of
//! the process (the kernel releases it when the process dies, however it dies).

use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot use state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another cobalt-agent is already running for state directory {state_dir} (pid {pid}); one agent per machine")]
    Held { state_dir: PathBuf, pid: String },
}

pub struct StateLock {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { path, source }
        };
        std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let path = state_dir.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, _)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(LockError::Held {
                    state_dir: state_dir.into(),
                    pid: holder.trim().to_string(),
                });
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
