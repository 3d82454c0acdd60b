//! The API against its own contract, fuzzed: schemathesis reads /openapi.json and sends
//! generated requests — valid ones, and ones the schema forbids — to every route for a bounded
//! time, with every check it has: no 5xx, no status code or content type the document does not
//! list, every response matching its schema, nothing the schema forbids accepted.
//!
//! Left out, on purpose: the `watch` and `timeoutSeconds` parameters (a watch answers until its
//! timeout by design; the watch tests in api.rs cover it), and the check that every
//! schema-valid request is accepted (the schema types each field; names, sizes, selectors and
//! conflicts are the server's to judge, answered with the documented 400/409/422).
//! `COBALT_FUZZ_SECS` sets the budget (default 60).

use std::time::Duration;

use cobalt_controller::http::local::LocalApi;
use cobalt_testkit::etcd::Etcd;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_keep_to_the_openapi_document() {
    let schemathesis = cobalt_testkit::require("schemathesis");
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let server = LocalApi::start(store, None, Duration::from_secs(5))
        .await
        .unwrap();
    let mut spec: Value = reqwest::get(format!("{}/openapi.json", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut dropped = 0;
    for item in spec["paths"].as_object_mut().unwrap().values_mut() {
        let Some(params) = item
            .get_mut("get")
            .and_then(|g| g.get_mut("parameters"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        let before = params.len();
        params.retain(|p| {
            let r = p["$ref"].as_str().unwrap_or_default();
            !r.ends_with("/watch") && !r.ends_with("/timeoutSeconds")
        });
        dropped += before - params.len();
    }
    assert!(dropped >= 4, "the list routes' watch parameters were found");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();

    let secs: u64 = std::env::var("COBALT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut cmd = std::process::Command::new(schemathesis);
    cmd.current_dir(dir.path())
        .arg("run")
        .arg(&path)
        .args(["--url", &server.url])
        .args(["--checks", "all"])
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "10"])
        .args(["--max-time", &secs.to_string()])
        .args(["--request-timeout", "5"])
        .env("NO_COLOR", "1");
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && l.contains('='))
        .unwrap_or("no summary");
    eprintln!("schemathesis: {summary}");
    assert!(
        output.status.success(),
        "schemathesis found the API off its contract (replay one with `st replay ID` \
         against a server started the same way):\n{text}"
    );
}
