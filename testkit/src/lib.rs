//! Real components for Cobalt's tests.
//!
//! Tests run against the real thing: an `etcd` process ([`etcd::Etcd`]), certificates made for
//! the test ([`certs::TestCerts`]). Everything a test starts is stopped by its own PID and its
//! files removed when the guard drops — also when the test fails.
//!
//! A missing prerequisite (say, no `etcd` binary) fails the test with a message naming the
//! `make deps` fix: tests never skip silently.

pub mod btrfs;
pub mod certs;
pub mod etcd;
pub mod etcd_cluster;
pub mod lan;
pub mod loopdir;
pub mod netns;
pub mod nfs;
pub mod process;
pub mod proxy;
pub mod wait;

use std::path::PathBuf;

/// Finds `binary` on PATH, or panics saying how to install it.
pub fn require(binary: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(binary);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{binary}` is not installed; run `make deps` (tests need the real component, they do not skip)");
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 must work on any test machine")
}

/// Runs `ip ARGS…` (iproute2).
pub(crate) fn ip(args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"))
}

/// Runs `ip ARGS…` and panics with its stderr if it fails.
pub(crate) fn ip_must(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
