//! A daemon under test (controller, agent, ganesha): started with its output captured to a log
//! file, stopped by its own PID on drop, and never outliving the test process.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr going to a temporary log file.
    pub fn spawn(cmd: &mut Command, name: &str) -> Daemon {
        let log = tempfile::Builder::new()
            .prefix(&format!("cobalt-{name}-"))
            .suffix(".log")
            .tempfile()
            .expect("log file");
        let out = log.reopen().expect("reopen log");
        let err = log.reopen().expect("reopen log");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        crate::etcd::kill_with_parent(cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the daemon printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and waits up to `deadline` for it to exit (then SIGKILL).
    pub fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {deadline:?} of SIGTERM; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// Makes this (test) process the reaper of orphaned descendants, so a daemon's own children
/// (ganesha, started in its own session by the agent) are reaped here after the daemon dies.
pub fn reap_orphans() {
    // SAFETY: prctl with an integer flag touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Kills `pid` and waits (bounded) until it is gone; reaps it if it is our child.
pub fn kill_and_reap(pid: u32) {
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGKILL);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Kills (and reaps) every process whose command line names a path under `dir`: what a test
/// started with its files there (a machine's nfs-ganesha runs with `-f DIR/ganesha/…`), even
/// one whose pid file was never written or was overwritten — e.g. an agent killed while it
/// started its ganesha.
pub fn kill_all_under(dir: &std::path::Path) {
    let dir = dir.display().to_string();
    let inside = format!("{dir}/");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmdline
            .split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .any(|arg| arg == dir || arg.starts_with(&inside));
        if names_dir {
            kill_and_reap(pid);
        }
    }
}
