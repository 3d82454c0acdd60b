//! The secure configuration, set up as docs/operations.md "Enabling TLS and tokens, step by
//! step" says: etcd with client-certificate TLS, the controllers and the agent configured by
//! YAML files with etcd's CA and a client certificate, the API over HTTPS with a tokens file, and
//! cobaltctl through a context with the CA and a token. A volume applied that way is bound and
//! provisioned; a reader token reads but cannot write; no token, no access; plain HTTP is refused.

use std::process::Command;
use std::time::Duration;

use cobalt_api::{Volume, VolumePhase};
use cobalt_e2e::{binary, out};
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::certs::TestCerts;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

const ADMIN: &str = "admin-token-0123456789abcdef";
const READER: &str = "reader-token-0123456789abcdef";

/// The etcd block of the daemons' configs, with the client certificate step 1 made.
fn etcd_block(etcd: &Etcd, certs: &TestCerts) -> String {
    cobalt_e2e::secured::etcd_block(
        etcd,
        certs,
        &certs.path("client.pem"),
        &certs.path("client-key.pem"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_secure_setup_works_end_to_end_and_refuses_what_it_should() {
    cobalt_testkit::require("btrfs");
    let certs = TestCerts::generate();
    let etcd = Etcd::start_tls(&certs);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // Step 3: tokens.
    let tokens = write(
        "tokens.yaml",
        format!("tokens:\n  - {{name: ops, token: {ADMIN}, role: admin}}\n  - {{name: grafana, token: {READER}, role: reader}}\n"),
    );
    // Steps 2 and 4: the controller's config.
    let api_port = free_port();
    let controller_yaml = write(
        "controller.yaml",
        format!(
            "{}listen: 127.0.0.1:{api_port}\ntokensFile: {}\ntls: {{cert: {}, key: {}}}\nleaseTTL: 3s\n",
            etcd_block(&etcd, &certs),
            tokens.display(),
            certs.path("server.pem").display(),
            certs.path("server-key.pem").display()
        ),
    );
    let _controller = Daemon::spawn(
        Command::new(binary("cobalt-controller"))
            .arg("--config")
            .arg(&controller_yaml),
        "controller",
    );
    // Step 2: the agent's config.
    let pool = BtrfsPool::new(256);
    let state = tempfile::tempdir().unwrap();
    let agent_yaml = write(
        "agent.yaml",
        format!(
            "{}machine: m1\naddress: 127.0.0.1\nstateDir: {}\nbackend: {{kind: btrfs, pool: {}}}\nexporter: {{kind: none}}\nlisten: 127.0.0.1:{}\nleaseTTL: 3s\n",
            etcd_block(&etcd, &certs),
            state.path().display(),
            pool.path().display(),
            free_port()
        ),
    );
    let _agent = Daemon::spawn(
        Command::new(binary("cobalt-agent"))
            .arg("--config")
            .arg(&agent_yaml),
        "agent",
    );
    // Step 5: cobaltctl's context.
    let server = format!("https://127.0.0.1:{api_port}");
    let ctl_config = write(
        "cobaltctl.yaml",
        format!(
            "currentContext: prod\ncontexts:\n  - {{name: prod, server: {server}, token: {ADMIN}, ca: {}}}\n  - {{name: grafana, server: {server}, token: {READER}, ca: {}}}\n  - {{name: anonymous, server: {server}, ca: {}}}\n",
            certs.path("ca.pem").display(),
            certs.path("ca.pem").display(),
            certs.path("ca.pem").display()
        ),
    );
    let ctl = |args: Vec<String>| {
        let mut cmd = Command::new(binary("cobaltctl"));
        cmd.env("COBALT_CONFIG", &ctl_config)
            .env_remove("COBALT_SERVER")
            .env_remove("COBALT_TOKEN")
            .args(args);
        async move {
            tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // "Check it with cobaltctl version and cobaltctl get machines."
    until(
        "cobaltctl reaches the API over HTTPS",
        Duration::from_secs(30),
        || async { ctl(args(&["version"])).await.status.success().then_some(()) },
    )
    .await;
    until("machine m1 registered", Duration::from_secs(30), || async {
        let o = ctl(args(&["get", "machines"])).await;
        (o.status.success() && out(&o).contains("m1") && out(&o).contains("Ready")).then_some(())
    })
    .await;
    let manifest = write(
        "volume.yaml",
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {name: secure}\nspec: {size: 16Mi}\n"
            .to_string(),
    );
    let o = ctl(args(&["apply", "-f", &manifest.display().to_string()])).await;
    assert!(o.status.success(), "{}", out(&o));
    let o = ctl(args(&[
        "wait",
        "volume/secure",
        "--for=condition=Ready",
        "--timeout=60s",
    ]))
    .await;
    assert!(o.status.success(), "{}", out(&o));

    // The reader reads, and cannot write.
    let o = ctl(args(&[
        "--context",
        "grafana",
        "get",
        "volume",
        "secure",
        "-o",
        "json",
    ]))
    .await;
    assert!(o.status.success(), "{}", out(&o));
    let v: Volume = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.status.unwrap().phase, VolumePhase::Ready);
    let o = ctl(args(&[
        "--context",
        "grafana",
        "delete",
        "volume",
        "secure",
    ]))
    .await;
    assert!(
        !o.status.success(),
        "a reader token cannot delete: {}",
        out(&o)
    );
    assert!(
        out(&o).contains("403") || out(&o).to_lowercase().contains("forbidden"),
        "{}",
        out(&o)
    );
    // No token, no access.
    let o = ctl(args(&["--context", "anonymous", "get", "volumes"])).await;
    assert!(!o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("401") || out(&o).to_lowercase().contains("unauthorized"),
        "{}",
        out(&o)
    );
    // Plain HTTP to the HTTPS port is refused.
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{api_port}/apis/cobalt.io/v1alpha1/volumes"
        ))
        .bearer_auth(ADMIN)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP must not be served"
    );
    // etcd itself refuses a client without a certificate: the only way in is the API.
    let bare = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(&etcd.endpoints()[0])
        .arg("--cacert")
        .arg(certs.path("ca.pem"))
        .args([
            "--dial-timeout=2s",
            "--command-timeout=2s",
            "get",
            "--prefix",
            "/cobalt",
        ])
        .output()
        .unwrap();
    assert!(!bare.status.success(), "etcd without a client certificate");
}
