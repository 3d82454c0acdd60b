//! Least privilege for storage machines, set up as docs/operations.md "Least privilege for
//! agents" says: etcd with client certificates and authentication on (users and roles made by
//! `scripts/etcd-auth.sh`), the controllers' API with a machine token per agent, and each agent
//! configured with `api:` so its object and status writes go through the API.
//!
//! Two agents under those credentials register, provision a volume, take a snapshot, move the
//! volume from one to the other (the target's transfer credential written through the API, the
//! source serving it), seed a clone across machines, and free both when deleted. With one
//! agent's own credentials — its etcd certificate and its API token — every write that would
//! change what users declared or touch another machine fails, and nothing of it is written.
//! With no controller answering in the middle of a move, nothing is lost and the move finishes
//! once one is back.

use std::process::Command;
use std::time::Duration;

use cobalt_agent::backend::Backend;
use cobalt_api::{Snapshot, Volume, VolumePhase};
use cobalt_e2e::{binary, out};
use cobalt_store::{EtcdConfig, Store, TlsFiles};
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::certs::TestCerts;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

const ADMIN: &str = "admin-token-0123456789abcdef";
const PREFIX: &str = "/cobalt";

fn token_of(machine: &str) -> String {
    format!("{machine}-machine-token-0123456789abcdef")
}

/// The etcd block of a daemon's config, identified by the client certificate `cert`/`key`.
fn etcd_block(
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
async fn store_as(etcd: &Etcd, certs: &TestCerts, cn: &str) -> Store {
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
fn etcd_auth(etcd: &Etcd, certs: &TestCerts, args: &[&str]) {
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

struct Agent {
    pool: BtrfsPool,
    _state: tempfile::TempDir,
    daemon: Daemon,
}

/// etcd with authentication on, one controller, agents m1 (zone a) and m2 (zone b) on their
/// own credentials, writing through the API.
struct Secured {
    agents: Vec<Agent>,
    controller: Option<Daemon>,
    controller_yaml: std::path::PathBuf,
    server: String,
    admin: Store,
    dir: tempfile::TempDir,
    certs: TestCerts,
    etcd: Etcd,
}

impl Secured {
    /// `agent_extra`: more YAML for each agent's config.
    async fn start(agent_extra: &str) -> Secured {
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
            let (cert, key) = certs.client(&format!("cobalt-machine-{m}"));
            let token_file = write(&format!("{m}.token"), format!("{}\n", token_of(m)));
            let pool = BtrfsPool::new(256);
            let state = tempfile::tempdir().unwrap();
            let yaml = write(
                &format!("agent-{m}.yaml"),
                format!(
                    "{}machine: {m}\naddress: 127.0.0.1\nlabels: {{zone: {zone}}}\nstateDir: {}\nbackend: {{kind: btrfs, pool: {}}}\nexporter: {{kind: none}}\nlisten: 127.0.0.1:{}\nleaseTTL: 3s\napi: {{server: {server}, tokenFile: {}}}\n{agent_extra}",
                    etcd_block(&etcd, &certs, &cert, &key),
                    state.path().display(),
                    pool.path().display(),
                    free_port(),
                    token_file.display()
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

    fn start_controller(&mut self) {
        self.controller = Some(Daemon::spawn(
            Command::new(binary("cobalt-controller"))
                .arg("--config")
                .arg(&self.controller_yaml),
            "controller",
        ));
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn ctl(&self, args: &[&str]) -> impl std::future::Future<Output = std::process::Output> {
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

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| a.daemon.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    async fn apply(&self, name: &str, spec: &str) {
        let manifest = self.write(
            &format!("{name}.yaml"),
            &format!("apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n{spec}"),
        );
        let o = self
            .ctl(&["apply", "-f", &manifest.display().to_string()])
            .await;
        assert!(o.status.success(), "{}", out(&o));
    }

    async fn wait_ready(&self, name: &str) -> Volume {
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
    fn on_disk(&self, i: usize, uid: &str) -> std::path::PathBuf {
        cobalt_agent::backend::btrfs::BtrfsBackend::open(self.agents[i].pool.path())
            .unwrap()
            .path(uid)
    }

    /// Waits until volume `name` is Ready on `machine` with no move in flight.
    async fn served_on(&self, name: &str, machine: &str, deadline: Duration) -> Volume {
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

fn index_of(machine: &str) -> usize {
    if machine == "m1" {
        0
    } else {
        1
    }
}

fn other(machine: &str) -> &'static str {
    if machine == "m1" {
        "m2"
    } else {
        "m1"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_machine_credentials_run_their_volumes_and_cannot_change_what_users_declared() {
    let c = Secured::start("").await;
    // A volume provisioned: the agent's finalizer and status went through the API.
    c.apply("db", "  size: 32Mi\n").await;
    let db = c.wait_ready("db").await;
    assert!(db
        .metadata
        .finalizers
        .iter()
        .any(|f| f == "cobalt.io/agent"));
    let from = db.status.as_ref().unwrap().machine.clone().unwrap();
    let to = other(&from);
    let uid = db.metadata.uid.to_string();
    std::fs::write(
        c.on_disk(index_of(&from), &uid).join("data.txt"),
        b"written before the move",
    )
    .unwrap();

    // With the holder's own etcd user: nothing users declared, nothing of another machine.
    let holder = store_as(&c.etcd, &c.certs, &format!("cobalt-machine-{from}")).await;
    let mut kv = holder.raw();
    let denied = |r: Result<_, etcd_client::Error>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: etcd allowed it"));
        assert!(e.to_string().contains("permission denied"), "{what}: {e}");
    };
    denied(
        kv.put(format!("{PREFIX}/volumes/db/object"), "{}", None)
            .await
            .map(|_| ()),
        "a Volume's spec",
    );
    denied(
        kv.delete(format!("{PREFIX}/volumes/db/object"), None)
            .await
            .map(|_| ()),
        "deleting a Volume",
    );
    denied(
        kv.put(format!("{PREFIX}/volumes/db/status"), "{}", None)
            .await
            .map(|_| ()),
        "a status straight into etcd",
    );
    denied(
        kv.put(format!("{PREFIX}/machines/{to}/alive"), from.as_str(), None)
            .await
            .map(|_| ()),
        "another machine's liveness",
    );
    denied(
        kv.put(format!("{PREFIX}/machines/{to}/object"), "{}", None)
            .await
            .map(|_| ()),
        "another Machine",
    );
    denied(
        kv.put(format!("{PREFIX}/views/{to}/volumes/db/status"), "{}", None)
            .await
            .map(|_| ()),
        "another machine's view",
    );
    // The typed store says so in words.
    let mut bigger = db.clone();
    bigger.spec.size = "1Gi".parse().unwrap();
    let err = holder.replace(&bigger).await.unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");

    // With the holder's API token: the same.
    let http = reqwest::Client::new();
    let api = |path: &str| format!("{}/apis/cobalt.io/v1alpha1/{path}", c.server);
    let mut body = serde_json::to_value(&bigger).unwrap();
    body["metadata"]["resourceVersion"] = db.metadata.resource_version.to_string().into();
    for (request, what) in [
        (http.put(api("volumes/db")).json(&body), "a spec change"),
        (http.delete(api("volumes/db")), "a delete"),
    ] {
        let r = request.bearer_auth(token_of(&from)).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN, "{what}");
    }
    let still: Volume = c.admin.get("db").await.unwrap().unwrap();
    assert_eq!(
        still.spec.size.bytes(),
        32 << 20,
        "nothing refused was written"
    );
    assert!(!still.metadata.is_deleting());

    // A snapshot: its finalizer and status through the API.
    let o = c
        .ctl(&["snapshot", "volume/db", "--name", "db-s", "--wait"])
        .await;
    assert!(o.status.success(), "{}\n{}", out(&o), c.logs());
    let o = c.ctl(&["delete", "snapshot", "db-s"]).await;
    assert!(o.status.success(), "{}", out(&o));
    until("the snapshot freed", Duration::from_secs(60), || async {
        c.admin
            .get::<Snapshot>("db-s")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // A move: the target writes its transfer credential through the API (only the target may),
    // the source checks it and streams; the data arrives.
    let o = c.ctl(&["move", "volume/db", "--to", to]).await;
    assert!(o.status.success(), "{}", out(&o));
    let moved = c.served_on("db", to, Duration::from_secs(120)).await;
    assert!(moved.status.unwrap().last_move.is_some());
    assert_eq!(
        std::fs::read(c.on_disk(index_of(to), &uid).join("data.txt")).unwrap(),
        b"written before the move"
    );

    // A clone kept away from its source's machine is seeded from it: the clone's machine writes
    // the seed's credential through the API, the source's machine serves it.
    let zone = if from == "m1" { "a" } else { "b" };
    c.apply(
        "db-copy",
        &format!(
            "  size: 32Mi\n  source: {{volume: db}}\n  placement: {{selector: {{zone: {zone}}}}}\n"
        ),
    )
    .await;
    let copy = c.wait_ready("db-copy").await;
    assert_eq!(
        copy.status.as_ref().unwrap().machine.as_deref(),
        Some(from.as_str())
    );
    assert_eq!(
        std::fs::read(
            c.on_disk(index_of(&from), &copy.metadata.uid)
                .join("data.txt")
        )
        .unwrap(),
        b"written before the move"
    );

    // Deleted: each holder frees the data and removes its finalizer through the API.
    for name in ["db-copy", "db"] {
        let o = c.ctl(&["delete", "volume", name]).await;
        assert!(o.status.success(), "{}", out(&o));
    }
    until("the volumes gone", Duration::from_secs(60), || async {
        let (all, _) = c.admin.list::<Volume>(&Default::default()).await.ok()?;
        all.is_empty().then_some(())
    })
    .await;
    assert!(!c.on_disk(index_of(to), &uid).exists(), "its data freed");
    assert!(!c.on_disk(index_of(&from), &copy.metadata.uid).exists());
}

/// Through the API, an agent's status writes need a controller to answer. With the only one
/// killed in the middle of a move, the agents keep the data where it is and wait: nothing is
/// lost, and the move finishes once a controller is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_controller_answering_a_move_waits_and_loses_nothing() {
    // 1 MiB/s: the move takes seconds, so the controller dies during it.
    let mut c = Secured::start("moves: {rateLimit: 1048576}\n").await;
    c.apply("db", "  size: 64Mi\n").await;
    let db = c.wait_ready("db").await;
    let from = db.status.as_ref().unwrap().machine.clone().unwrap();
    let to = other(&from);
    let uid = db.metadata.uid.to_string();
    let data = cobalt_testkit::nfs::pattern(7, 6 << 20);
    std::fs::write(c.on_disk(index_of(&from), &uid).join("data.bin"), &data).unwrap();

    let o = c.ctl(&["move", "volume/db", "--to", to]).await;
    assert!(o.status.success(), "{}", out(&o));
    until("the stream under way", Duration::from_secs(60), || async {
        let v: Volume = c.admin.get("db").await.ok()??;
        let m = v.status.as_ref()?.move_.as_ref()?;
        (m.bytes_done > 0).then_some(())
    })
    .await;
    c.controller.take().unwrap().kill();
    let target = index_of(to);
    until(
        "the target waiting for the API",
        Duration::from_secs(60),
        || async {
            c.agents[target]
                .daemon
                .log()
                .contains("did not answer")
                .then_some(())
        },
    )
    .await;
    // Meanwhile the data stays served where it was.
    let v: Volume = c.admin.get("db").await.unwrap().unwrap();
    assert_eq!(
        v.status.as_ref().unwrap().machine.as_deref(),
        Some(from.as_str())
    );
    assert_eq!(
        std::fs::read(c.on_disk(index_of(&from), &uid).join("data.bin")).unwrap(),
        data
    );

    c.start_controller();
    c.served_on("db", to, Duration::from_secs(120)).await;
    assert_eq!(
        std::fs::read(c.on_disk(target, &uid).join("data.bin")).unwrap(),
        data,
        "the data arrived whole"
    );
}
