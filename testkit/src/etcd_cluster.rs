//! A real three-member (or N-member) etcd cluster on free ports, for tests of what happens when
//! members fail. Members are stopped with SIGKILL (a crash) and started again with their data.
//!
//! ```no_run
//! let mut c = cobalt_testkit::etcd_cluster::EtcdCluster::start(3);
//! let all = c.endpoints();          // every member's client URL
//! let leader = c.leader().unwrap(); // index of the raft leader
//! c.stop(leader);                   // the other two keep quorum
//! c.start_again(leader);
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::kill_with_parent;
use crate::{free_port, require};

const START_DEADLINE: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members forming one cluster and waits until every one is healthy.
    pub fn start(n: usize) -> EtcdCluster {
        require("etcd");
        require("etcdctl");
        let dir = tempfile::Builder::new()
            .prefix("cobalt-etcd-cluster-")
            .tempdir()
            .expect("create temp dir");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut c = EtcdCluster { dir, members };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("open etcd log");
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", "cobalt-test"])
            // Fail over quickly: a test waits for elections.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        kill_with_parent(&mut cmd);
        self.members[i].child = Some(cmd.spawn().expect("spawn etcd"));
    }

    fn wait_healthy(&mut self, i: usize) {
        let start = Instant::now();
        while start.elapsed() < START_DEADLINE {
            if self.healthy(i) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "etcd member {i} did not become healthy; log tail:\n{}",
            tail.join("\n")
        );
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn etcdctl(&self, i: usize) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoints()[i])
            .args(["--dial-timeout=1s", "--command-timeout=1s"]);
        cmd
    }

    /// True when member `i` answers `endpoint health`.
    pub fn healthy(&self, i: usize) -> bool {
        let mut cmd = self.etcdctl(i);
        cmd.args(["endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    /// The index of the raft leader, asked of the running members.
    pub fn leader(&self) -> Option<usize> {
        for i in (0..self.len()).filter(|&i| self.members[i].child.is_some()) {
            let Ok(o) = self
                .etcdctl(i)
                .args(["endpoint", "status", "-w", "json"])
                .output()
            else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
                continue;
            };
            let Some(s) = v.get(0).and_then(|e| e.get("Status")) else {
                continue;
            };
            let (Some(leader), Some(me)) =
                (s["leader"].as_u64(), s["header"]["member_id"].as_u64())
            else {
                continue;
            };
            if leader == me {
                return Some(i);
            }
        }
        None
    }

    /// Member `i` crashes (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Member `i` comes back with its data and rejoins.
    pub fn start_again(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_healthy(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}
