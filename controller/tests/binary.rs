//! The real `cobalt-controller` binary: HTTPS, refusing an open unauthenticated listener, and
//! stopping on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use cobalt_testkit::certs::TestCerts;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::process::Daemon;

#[tokio::test]
async fn serves_https_with_the_given_certificate() {
    let etcd = Etcd::start();
    let certs = TestCerts::generate();
    let port = free_port();
    let daemon = Daemon::spawn(
        Command::new(env!("CARGO_BIN_EXE_cobalt-controller"))
            .arg("--etcd-endpoints")
            .arg(etcd.endpoints().join(","))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tls-cert")
            .arg(certs.path("server.pem"))
            .arg("--tls-key")
            .arg(certs.path("server-key.pem")),
        "controller",
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.path("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/apis/cobalt.io/v1alpha1/volumes");
    let body = cobalt_testkit::wait::until("the HTTPS API", Duration::from_secs(15), || async {
        client
            .get(&url)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await
    .text()
    .await
    .unwrap();
    assert!(body.contains("VolumeList"), "{body}");
    // Plain HTTP on the same port is not served.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(
        !plain.is_ok_and(|r| r.status().is_success()),
        "plain HTTP must not be served"
    );
    drop(daemon);
}

#[test]
fn refuses_an_open_listener_without_tokens_and_says_how_to_fix_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_cobalt-controller"))
        .args([
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--listen",
            "0.0.0.0:0",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tokens-file") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn stops_cleanly_on_sigterm() {
    let etcd = Etcd::start();
    let port = free_port();
    let mut daemon = Daemon::spawn(
        Command::new(env!("CARGO_BIN_EXE_cobalt-controller"))
            .arg("--etcd-endpoints")
            .arg(etcd.endpoints().join(","))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}")),
        "controller",
    );
    cobalt_testkit::wait::until_blocking("the API to listen", Duration::from_secs(15), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let status = daemon.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}
