//! A cluster run with least privilege (docs/operations.md "Least privilege for agents"): etcd
//! with client certificates and authentication on, users and roles made by
//! `scripts/etcd-auth.sh`, one controller with a machine token per agent, and agents m1 (zone a)
//! and m2 (zone b) on their own etcd certificates writing through the API. For the
//! least-privilege system tests and their benchmark.
//!
//! A machine named in `direct` runs instead as agents did before: the controllers' etcd
//! certificate and no `api:` (what the benchmark compares against).

use std::process::Command;
use std::time::Duration;

use cobalt_agent::backend::Backend;
use cobalt_api::{Volume, VolumePhase};
use cobalt_store::{EtcdConfig, Store, TlsFiles};
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::certs::TestCerts;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

use crate::{binary, out};

pub const ADMIN: &str = "admin-token-0123456789abcdef";
pub const PREFIX: &str = "/cobalt";

pub fn token_of(machine: &str) -> String {
    format!("{machine}-machine-token-0123456789abcdef")
}

/// The etcd block of a daemon's config, identified by the client certificate `cert`/`key`.
pub fn etcd_block(
    etcd: &Etcd,
    certs: &TestCerts,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    format!(
        "etcd:\n  endpoints: [{}]\n  prefix: {PREFIX}\n  tls: {{ca: {}, cert: {}, key: {}}}\n",
        etcd.endpoints()[0],
        certs.path("ca.pem").display(),
        cert.display(),
        key.display()
    )
}

/// A store connecting as the user named by the certificate `cn`.
pub async fn store_as(etcd: &Etcd, certs: &TestCerts, cn: &str) -> Store {
    let (cert, key) = certs.client(cn);
    let mut config = EtcdConfig::new(etcd.endpoints());
    config.prefix = PREFIX.into();
    config.tls = Some(TlsFiles {
        ca: certs.path("ca.pem"),
        cert: Some(cert),
        key: Some(key),
    });
    Store::connect(&config).await.unwrap()
}

/// Runs a step of scripts/etcd-auth.sh as etcd's root user.
pub fn etcd_auth(etcd: &Etcd, certs: &TestCerts, args: &[&str]) {
    let (cert, key) = certs.client("root");
    let o = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/etcd-auth.sh"
        ))
        .args(args)
        .env("ETCDCTL_ENDPOINTS", &etcd.endpoints()[0])
        .env("ETCDCTL_CACERT", certs.path("ca.pem"))
        .env("ETCDCTL_CERT", cert)
        .env("ETCDCTL_KEY", key)
        .output()
        .unwrap();
    assert!(o.status.success(), "etcd-auth.sh {args:?}: {}", out(&o));
}

pub struct Agent {
    pub pool: BtrfsPool,
    _state: tempfile::TempDir,
    pub daemon: Daemon,
}

/// etcd with authentication on, one controller, agents m1 (zone a) and m2 (zone b) on their
/// own credentials, writing through the API.
pub struct Secured {
    pub agents: Vec<Agent>,
    pub controller: Option<Daemon>,
    controller_yaml: std::path::PathBuf,
    pub server: String,
    /// etcd as its root user.
    pub admin: Store,
    dir: tempfile::TempDir,
    pub certs: TestCerts,
    pub etcd: Etcd,
}

impl Secured {
    /// `agent_extra`: more YAML for each agent's config.
    pub async fn start(agent_extra: &str) -> Secured {
        Self::start_with(agent_extra, &[]).await
    }

    /// Like [`Secured::start`], with the machines in `direct` writing straight to etcd as the
    /// controllers' user.
    pub async fn start_with(agent_extra: &str, direct: &[&str]) -> Secured {
        cobalt_testkit::require("btrfs");
        let certs = TestCerts::generate();
        let etcd = Etcd::start_tls(&certs);
        // The controllers' certificate (CN cobalt) is the controllers' user; each agent's is
        // cobalt-machine-<name>.
        etcd_auth(&etcd, &certs, &["setup", PREFIX, "cobalt"]);
        for m in ["m1", "m2"] {
            etcd_auth(&etcd, &certs, &["machine", PREFIX, m]);
        }
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let tokens = write(
            "tokens.yaml",
            format!(
                "tokens:\n  - {{name: ops, token: {ADMIN}, role: admin}}\n  - {{name: m1, token: {}, role: machine, machine: m1}}\n  - {{name: m2, token: {}, role: machine, machine: m2}}\n",
                token_of("m1"),
                token_of("m2")
            ),
        );
        let api_port = free_port();
        let server = format!("http://127.0.0.1:{api_port}");
        let controller_yaml = write(
            "controller.yaml",
            format!(
                "{}listen: 127.0.0.1:{api_port}\ntokensFile: {}\nleaseTTL: 3s\n",
                etcd_block(
                    &etcd,
                    &certs,
                    &certs.path("client.pem"),
                    &certs.path("client-key.pem")
                ),
                tokens.display(),
            ),
        );
        let mut agents = Vec::new();
        for (m, zone) in [("m1", "a"), ("m2", "b")] {
            let direct = direct.contains(&m);
            let (cert, key) = if direct {
                (certs.path("client.pem"), certs.path("client-key.pem"))
            } else {
                certs.client(&format!("cobalt-machine-{m}"))
            };
            let token_file = write(&format!("{m}.token"), format!("{}\n", token_of(m)));
            let api = if direct {
                String::new()
            } else {
                format!(
                    "api: {{server: {server}, tokenFile: {}}}\n",
                    token_file.display()
                )
            };
            let pool = BtrfsPool::new(256);
            let state = tempfile::tempdir().unwrap();
            let yaml = write(
                &format!("agent-{m}.yaml"),
                format!(
                    "{}machine: {m}\naddress: 127.0.0.1\nlabels: {{zone: {zone}}}\nstateDir: {}\nbackend: {{kind: btrfs, pool: {}}}\nexporter: {{kind: none}}\nlisten: 127.0.0.1:{}\nleaseTTL: 3s\n{api}{agent_extra}",
                    etcd_block(&etcd, &certs, &cert, &key),
                    state.path().display(),
                    pool.path().display(),
                    free_port(),
                ),
            );
            let daemon = Daemon::spawn(
                Command::new(binary("cobalt-agent"))
                    .arg("--config")
                    .arg(&yaml),
                &format!("agent-{m}"),
            );
            agents.push(Agent {
                pool,
                _state: state,
                daemon,
            });
        }
        let admin = store_as(&etcd, &certs, "root").await;
        let mut s = Secured {
            agents,
            controller: None,
            controller_yaml,
            server,
            admin,
            dir,
            certs,
            etcd,
        };
        s.start_controller();
        // Registration and liveness under the machines' own credentials.
        until("both machines Ready", Duration::from_secs(60), || async {
            let o = s.ctl(&["get", "machines"]).await;
            let text = out(&o);
            (o.status.success() && text.matches("Ready").count() >= 2).then_some(())
        })
        .await;
        s
    }

    pub fn start_controller(&mut self) {
        self.controller = Some(Daemon::spawn(
            Command::new(binary("cobalt-controller"))
                .arg("--config")
                .arg(&self.controller_yaml),
            "controller",
        ));
    }

    pub fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn ctl(&self, args: &[&str]) -> impl std::future::Future<Output = std::process::Output> {
        let mut cmd = Command::new(binary("cobaltctl"));
        cmd.env("COBALT_SERVER", &self.server)
            .env("COBALT_TOKEN", ADMIN)
            .env_remove("COBALT_CONFIG")
            .args(args);
        async move {
            tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap()
        }
    }

    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| a.daemon.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    pub async fn apply(&self, name: &str, spec: &str) {
        let manifest = self.write(
            &format!("{name}.yaml"),
            &format!("apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n{spec}"),
        );
        let o = self
            .ctl(&["apply", "-f", &manifest.display().to_string()])
            .await;
        assert!(o.status.success(), "{}", out(&o));
    }

    pub async fn wait_ready(&self, name: &str) -> Volume {
        let o = self
            .ctl(&[
                "wait",
                &format!("volume/{name}"),
                "--for=condition=Ready",
                "--timeout=60s",
            ])
            .await;
        assert!(o.status.success(), "{}\n{}", out(&o), self.logs());
        self.admin.get(name).await.unwrap().unwrap()
    }

    /// Where volume `uid`'s data is on agent `i`'s pool.
    pub fn on_disk(&self, i: usize, uid: &str) -> std::path::PathBuf {
        cobalt_agent::backend::btrfs::BtrfsBackend::open(self.agents[i].pool.path())
            .unwrap()
            .path(uid)
    }

    /// Waits until volume `name` is Ready on `machine` with no move in flight.
    pub async fn served_on(&self, name: &str, machine: &str, deadline: Duration) -> Volume {
        until(&format!("{name} Ready on {machine}"), deadline, || async {
            let v: Volume = self.admin.get(name).await.ok()??;
            let s = v.status.as_ref()?;
            (s.machine.as_deref() == Some(machine)
                && s.phase == VolumePhase::Ready
                && s.move_.is_none())
            .then_some(v)
        })
        .await
    }
}

pub fn index_of(machine: &str) -> usize {
    if machine == "m1" {
        0
    } else {
        1
    }
}

pub fn other(machine: &str) -> &'static str {
    if machine == "m1" {
        "m2"
    } else {
        "m1"
    }
}
