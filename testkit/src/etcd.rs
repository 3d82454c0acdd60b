//! A real single-member etcd on free ports in a temporary directory.
//!
//! ```no_run
//! let etcd = cobalt_testkit::etcd::Etcd::start();
//! let endpoints = etcd.endpoints(); // ["http://127.0.0.1:PORT"]
//! // … test …
//! // dropped: killed by PID, data directory removed
//! ```
//! [`Etcd::stop`] and [`Etcd::start_again`] simulate outages; the data and ports survive.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::certs::TestCerts;
use crate::{free_port, require};

/// How long etcd may take to become healthy.
const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Etcd {
    dir: tempfile::TempDir,
    host: String,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsPaths>,
    child: Option<Child>,
}

struct TlsPaths {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Etcd {
    /// Starts etcd over plain HTTP and waits until it is healthy.
    pub fn start() -> Etcd {
        Self::launch(None, "127.0.0.1")
    }

    /// Starts plain-HTTP etcd listening on `host` (e.g. a test LAN's address).
    pub fn start_on(host: &str) -> Etcd {
        Self::launch(None, host)
    }

    /// Starts etcd over HTTPS requiring client certificates signed by `certs`' CA.
    pub fn start_tls(certs: &TestCerts) -> Etcd {
        Self::launch_tls(Some(TlsPaths {
            ca: certs.path("ca.pem"),
            cert: certs.path("server.pem"),
            key: certs.path("server-key.pem"),
            client_cert: certs.path("client.pem"),
            client_key: certs.path("client-key.pem"),
        }))
    }

    fn launch_tls(tls: Option<TlsPaths>) -> Etcd {
        Self::launch(tls, "127.0.0.1")
    }

    fn launch(tls: Option<TlsPaths>, host: &str) -> Etcd {
        require("etcd");
        require("etcdctl");
        let mut last_log = String::new();
        // A port picked free can be taken before etcd binds it; try a few fresh pairs.
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("cobalt-etcd-")
                .tempdir()
                .expect("create temp dir");
            let mut etcd = Etcd {
                dir,
                host: host.to_string(),
                client_port: free_port(),
                peer_port: free_port(),
                tls: None,
                child: None,
            };
            etcd.tls = tls.as_ref().map(|t| TlsPaths {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_cert: t.client_cert.clone(),
                client_key: t.client_key.clone(),
            });
            etcd.spawn();
            if etcd.wait_healthy() {
                return etcd;
            }
            last_log = std::fs::read_to_string(etcd.log_path()).unwrap_or_default();
        }
        panic!("etcd did not become healthy; last log:\n{last_log}");
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Client URLs, e.g. `["http://127.0.0.1:40123"]`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![format!(
            "{}://{}:{}",
            self.scheme(),
            self.host,
            self.client_port
        )]
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        let url = self.endpoints().remove(0);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd log");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&url)
            .arg("--advertise-client-urls")
            .arg(&url)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
        }
        kill_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("spawn etcd"));
    }

    fn wait_healthy(&mut self) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < START_DEADLINE {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if self.healthy() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// True when `etcdctl endpoint health` succeeds.
    pub fn healthy(&self) -> bool {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoints().join(","))
            .arg("--dial-timeout=1s")
            .arg("--command-timeout=1s");
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        cmd.arg("endpoint").arg("health");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    /// Stops etcd (SIGKILL, like a crash or power loss) and waits for the process to go.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data, and waits until healthy.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: etcd is still running");
        self.spawn();
        if !self.wait_healthy() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            panic!(
                "etcd did not come back on port {}; log:\n{log}",
                self.client_port
            );
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asks the kernel to kill the child if the test process dies without running destructors.
pub(crate) fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

impl Etcd {
    /// A store connected to this etcd (default prefix), for tests that read and write
    /// resources directly.
    pub async fn store(&self) -> cobalt_store::Store {
        cobalt_store::Store::connect(&cobalt_store::EtcdConfig::new(self.endpoints()))
            .await
            .expect("connecting to the test etcd")
    }
}
