//! Volume streams: what [`Backend::send`](super::Backend::send) returns and
//! [`Backend::receive`](super::Backend::receive) consumes. A stream is produced by a child
//! process (`btrfs send` for BTRFS); reading it to the end also waits for the process, so a
//! sender that fails half-way is an error at the reader, never a short stream taken for whole.

use std::io::Read;
use std::process::{Child, ChildStderr, ChildStdout};

/// A stream of one snapshot of a volume.
pub struct SendStream {
    child: Child,
    stdout: ChildStdout,
    stderr: Option<ChildStderr>,
    command: String,
    done: bool,
    /// What the sender expects to send, if it knows (for progress only).
    pub estimate: Option<u64>,
}

impl SendStream {
    /// Wraps a spawned child with piped stdout and stderr.
    pub fn from_child(mut child: Child, command: String, estimate: Option<u64>) -> Self {
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take();
        SendStream {
            child,
            stdout,
            stderr,
            command,
            done: false,
            estimate,
        }
    }
}

impl Read for SendStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        // End of output: the stream is whole only if the sender says so.
        self.done = true;
        let mut stderr = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = self.child.wait()?;
        if status.success() {
            Ok(0)
        } else {
            Err(std::io::Error::other(format!(
                "{} failed ({status}): {}",
                self.command,
                stderr.trim()
            )))
        }
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned half-way (the receiver went away): stop the sender.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
