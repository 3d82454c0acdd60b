//! The live dashboard in a real headless browser (Debian's chromium, driven by chromedriver over
//! the W3C WebDriver protocol): the page loads and shows the three machines with their capacity;
//! a volume created during the test appears without a reload and goes Ready; a screenshot is
//! kept in `target/test-artifacts/dashboard.png`.

use std::process::{Command, Stdio};
use std::time::Duration;

use cobalt_e2e::Cluster;
use cobalt_testkit::wait::until;
use serde_json::{json, Value};

/// chromedriver, stopped by its own PID when dropped.
struct Driver {
    child: std::process::Child,
    url: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
    session: Option<String>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // End the session first, so chromedriver stops its browser; then chromedriver itself.
        if let Some(s) = &self.session {
            let _ = Command::new("curl")
                .args(["-s", "-m", "10", "-X", "DELETE"])
                .arg(format!("{}/session/{s}", self.url))
                .stdout(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let chromedriver = cobalt_testkit::require("chromedriver");
        cobalt_testkit::require("chromium");
        let port = cobalt_testkit::free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _profile: tempfile::tempdir().unwrap(),
            session: None,
        };
        let status = format!("{}/status", d.url);
        let http = d.http.clone();
        until("chromedriver to answer", Duration::from_secs(20), || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                let v: Value = http.get(&status).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        let profile = d._profile.path().display().to_string();
        let session = d
            .call(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        // Without the background-networking flags chromium keeps dialling out
                        // of this closed network.
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                 "--no-first-run", "--disable-background-networking",
                                 "--disable-component-update", "--disable-sync",
                                 "--window-size=1280,900", format!("--user-data-dir={profile}")]
                    }
                }}}),
            )
            .await;
        d.session = Some(
            session["sessionId"]
                .as_str()
                .expect("a WebDriver session")
                .to_string(),
        );
        d
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = match &self.session {
            Some(s) => format!("{}/session/{s}{path}", self.url),
            None => format!("{}{path}", self.url),
        };
        let mut r = self
            .http
            .request(method.clone(), url)
            .timeout(Duration::from_secs(60));
        if method == reqwest::Method::POST {
            r = r.json(&body);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {path}: {}",
            v["value"]
        );
        v["value"].clone()
    }

    async fn script(&self, code: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": code, "args": []}),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_machines_and_a_new_volume_live_without_a_reload() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    let api = c.api();
    let d = Driver::start().await;
    d.call(
        reqwest::Method::POST,
        "/url",
        json!({"url": format!("{api}/ui")}),
    )
    .await;
    until(
        "the three machines on the page",
        Duration::from_secs(20),
        || async {
            let n = d
                .script("return document.querySelectorAll('[data-machine]').length")
                .await;
            (n == 3).then_some(())
        },
    )
    .await;
    let capacity = d
        .script("return document.querySelector('[data-machine=\"m1\"]').innerText")
        .await;
    assert!(
        capacity.as_str().unwrap().contains("total"),
        "capacity shown: {capacity}"
    );
    // A mark on this page: if it is still there later, the page was not reloaded.
    d.script("window.cobaltTestMark = 'still here'; return null")
        .await;

    let client = c.client.addr.to_string();
    c.apply_text(&format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: shown}}\nspec:\n  size: 64Mi\n  export:\n    clients: [{{host: {client}, access: rw}}]\n"
    ))
    .await;
    // The bound: on the page within 2 s of the create.
    until(
        "the new volume on the page",
        Duration::from_secs(2),
        || async {
            let v = d
                .script("return !!document.querySelector('[data-volume=\"shown\"]')")
                .await;
            (v == true).then_some(())
        },
    )
    .await;
    until(
        "the volume shown Ready with its endpoint",
        Duration::from_secs(60),
        || async {
            let row = d
                .script("return document.querySelector('[data-volume=\"shown\"]').innerText")
                .await;
            let text = row.as_str()?.to_string();
            (text.contains("Ready") && text.contains(":/shown")).then_some(())
        },
    )
    .await;
    let mark = d.script("return window.cobaltTestMark || null").await;
    assert_eq!(mark, "still here", "the page was reloaded");
    let status = d
        .script("return document.getElementById('conn').innerText")
        .await;
    assert!(status.as_str().unwrap().starts_with("live"), "{status}");

    let png = d
        .call(reqwest::Method::GET, "/screenshot", Value::Null)
        .await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let b64 = dir.join("dashboard.png.b64");
    std::fs::write(&b64, png.as_str().unwrap()).unwrap();
    let decoded = Command::new("base64").arg("-d").arg(&b64).output().unwrap();
    assert!(decoded.status.success());
    assert!(decoded.stdout.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(dir.join("dashboard.png"), &decoded.stdout).unwrap();
    let _ = std::fs::remove_file(&b64);
    d.call(reqwest::Method::DELETE, "", Value::Null).await;
    let mut d = d;
    d.session = None;
}
