//! HTTP-level tests of the API against a real etcd: every route and error code, the watch
//! stream, dry-run, unchanged replace, auth, limits, and etcd outages.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cobalt_controller::http::local::LocalApi;
use cobalt_controller::http::Tokens;
use cobalt_store::Store;
use cobalt_testkit::etcd::Etcd;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Api {
    url: String,
    store: Store,
    _server: LocalApi,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    async fn start(etcd: &Etcd, tokens: Option<&Path>) -> Api {
        let store = etcd.store().await;
        let tokens = tokens.map(|p| Arc::new(Tokens::load(p).unwrap()));
        let server = LocalApi::start(store.clone(), tokens, Duration::from_millis(300))
            .await
            .unwrap();
        Api {
            url: server.url.clone(),
            store,
            _server: server,
            client: reqwest::Client::new(),
            token: None,
        }
    }

    fn path(&self, p: &str) -> String {
        if p.starts_with('/') {
            format!("{}{p}", self.url)
        } else {
            format!("{}/apis/cobalt.io/v1alpha1/{p}", self.url)
        }
    }

    fn req(&self, method: reqwest::Method, p: &str) -> reqwest::RequestBuilder {
        let r = self
            .client
            .request(method, self.path(p))
            .timeout(Duration::from_secs(10));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = r.send().await.unwrap();
        let code = resp.status();
        let text = resp.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, p: &str) -> (StatusCode, Value) {
        self.send(self.req(reqwest::Method::GET, p)).await
    }
    async fn post(&self, p: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.req(reqwest::Method::POST, p).json(body))
            .await
    }
    async fn put(&self, p: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.req(reqwest::Method::PUT, p).json(body))
            .await
    }
    async fn delete(&self, p: &str) -> (StatusCode, Value) {
        self.send(self.req(reqwest::Method::DELETE, p)).await
    }
}

fn volume(name: &str, size: &str) -> Value {
    json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Volume", "metadata": {"name": name}, "spec": {"size": size}})
}

fn causes(body: &Value) -> Vec<String> {
    body["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn create_get_list_and_their_errors() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let (code, created) = api.post("volumes", &volume("a", "1Gi")).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert!(created["metadata"]["uid"].is_string());
    let (code, body) = api.post("volumes", &volume("a", "1Gi")).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "AlreadyExists");

    let (code, got) = api.get("volumes/a").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(got["metadata"]["uid"], created["metadata"]["uid"]);
    let (code, body) = api.get("volumes/nope").await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );
    let (code, body) = api.get("pods").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("volumes, machines, snapshots and claims"));

    let mut labelled = volume("b", "2Gi");
    labelled["metadata"]["labels"] = json!({"tier": "hot"});
    api.post("volumes", &labelled).await;
    let (code, list) = api.get("volumes?labelSelector=tier%3Dhot").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["kind"], "VolumeList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b"]);
    assert!(
        list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );
    let (code, _) = api.get("volumes?labelSelector=%3Dbad").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);

    let machine = json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Machine", "metadata": {"name": "node-1", "labels": {"disk": "ssd"}}, "spec": {"address": "10.0.0.12"}});
    let (code, m) = api.post("machines", &machine).await;
    assert_eq!(code, StatusCode::CREATED, "{m}");
    assert_eq!(m["spec"]["maxFill"], 90);
}

#[tokio::test]
async fn bad_input_is_400_with_position_or_422_with_every_field() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let resp = api
        .req(reqwest::Method::POST, "volumes")
        .header("content-type", "application/json")
        .body("{\"kind\": \"Volume\",\n  \"spec\": }")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("line 2"),
        "{body}"
    );

    let resp = api
        .req(reqwest::Method::POST, "volumes")
        .header("content-type", "application/yaml")
        .body("kind: Volume\nspec: {size: [1Gi\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("line 2 column"),
        "{body}"
    );

    let mut bad = volume("A_B", "1k");
    bad["spec"]["dilation"] = json!(5000);
    bad["spec"]["export"] = json!({"clients": [{"host": "not a host"}]});
    let (code, body) = api.post("volumes", &bad).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["reason"], "Invalid");
    assert_eq!(
        causes(&body),
        [
            "metadata.name",
            "spec.size",
            "spec.dilation",
            "spec.export.clients[0].host"
        ]
    );

    let mut unknown = volume("ok", "1Gi");
    unknown["spec"]["sise"] = json!("2Gi");
    let (code, body) = api.post("volumes", &unknown).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(causes(&body), ["spec.sise"]);

    // A YAML manifest is accepted as it is.
    let resp = api.req(reqwest::Method::POST, "volumes").header("content-type", "application/yaml")
        .body("apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {name: from-yaml}\nspec: {size: 2Gi}\n").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);

    // Nothing invalid was written.
    let (_, list) = api.get("volumes").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    let huge = "x".repeat(2 * 1024 * 1024);
    let resp = api
        .req(reqwest::Method::POST, "volumes")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn replace_needs_the_current_resource_version_and_unchanged_writes_nothing() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let (_, v1) = api.post("volumes", &volume("a", "1Gi")).await;
    let mut edit = v1.clone();
    edit["spec"]["size"] = json!("2Gi");
    let (code, v2) = api.put("volumes/a", &edit).await;
    assert_eq!(code, StatusCode::OK, "{v2}");
    assert_eq!(v2["metadata"]["generation"], 2);

    let (code, body) = api.put("volumes/a", &edit).await; // v1's resourceVersion again
    assert_eq!(
        (code, body["reason"].as_str()),
        (StatusCode::CONFLICT, Some("Conflict"))
    );

    let mut missing = v2.clone();
    missing["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (code, body) = api.put("volumes/a", &missing).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(causes(&body), ["metadata.resourceVersion"]);
    let (code, body) = api.put("volumes/b", &v2).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(causes(&body), ["metadata.name"]);

    let before = api.store.revision().await.unwrap();
    let (code, same) = api.put("volumes/a", &v2).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        same["metadata"]["resourceVersion"],
        v2["metadata"]["resourceVersion"]
    );
    assert_eq!(
        api.store.revision().await.unwrap(),
        before,
        "an unchanged replace must not write to etcd"
    );

    // What a volume is a clone of is fixed at creation: a change is 422, nothing written.
    let mut cloned = v2.clone();
    cloned["spec"]["source"] = json!({"volume": "base"});
    let (code, body) = api.put("volumes/a", &cloned).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(causes(&body), ["spec.source"]);
    assert!(
        body["message"].as_str().unwrap().contains("immutable"),
        "{body}"
    );
    assert_eq!(api.store.revision().await.unwrap(), before);
}

#[tokio::test]
async fn dry_run_validates_and_checks_conflicts_but_writes_nothing() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let (_, v) = api.post("volumes", &volume("a", "1Gi")).await;
    let before = api.store.revision().await.unwrap();

    let (code, _) = api.post("volumes?dryRun=All", &volume("b", "1Gi")).await;
    assert_eq!(
        code,
        StatusCode::CREATED,
        "as documented (and as Kubernetes answers)"
    );
    let (code, _) = api.post("volumes?dryRun=All", &volume("a", "1Gi")).await;
    assert_eq!(code, StatusCode::CONFLICT);
    let (code, _) = api.post("volumes?dryRun=All", &volume("b", "1")).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let mut edit = v.clone();
    edit["spec"]["size"] = json!("9Gi");
    let (code, _) = api.put("volumes/a?dryRun=All", &edit).await;
    assert_eq!(code, StatusCode::OK);
    edit["metadata"]["resourceVersion"] = json!("1");
    let (code, _) = api.put("volumes/a?dryRun=All", &edit).await;
    assert_eq!(code, StatusCode::CONFLICT);
    let (code, _) = api.delete("volumes/a?dryRun=All").await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = api.post("volumes?dryRun=Yes", &volume("c", "1Gi")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);

    assert_eq!(
        api.store.revision().await.unwrap(),
        before,
        "dry runs must not write"
    );
    let (_, live) = api.get("volumes/a").await;
    assert_eq!(live["spec"]["size"], "1Gi");
    assert_eq!(api.get("volumes/b").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_is_200_when_gone_and_202_while_finalizers_remain() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    api.post("volumes", &volume("a", "1Gi")).await;
    let (code, _) = api.delete("volumes/a").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(api.delete("volumes/a").await.0, StatusCode::NOT_FOUND);

    let mut held = volume("b", "1Gi");
    held["metadata"]["finalizers"] = json!(["cobalt.io/agent"]);
    api.post("volumes", &held).await;
    let (code, body) = api.delete("volumes/b").await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert!(body["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(api.get("volumes/b").await.0, StatusCode::OK);
}

#[tokio::test]
async fn snapshots_need_their_volume_keep_it_from_deletion_and_cannot_change_volume() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let snap = |name: &str, volume: &str| json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": name}, "spec": {"volume": volume}});
    let (code, body) = api.post("snapshots", &snap("s1", "db")).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(causes(&body), ["spec.volume"]);
    assert!(
        body["message"].as_str().unwrap().contains("does not exist"),
        "{body}"
    );

    api.post("volumes", &volume("db", "1Gi")).await;
    let (code, created) = api.post("snapshots", &snap("s1", "db")).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["metadata"]["labels"]["cobalt.io/volume"], "db");
    let (code, list) = api
        .get("snapshots?labelSelector=cobalt.io/volume%3Ddb")
        .await;
    assert_eq!(
        (code, list["kind"].as_str()),
        (StatusCode::OK, Some("SnapshotList"))
    );
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // The volume cannot be deleted while it has a snapshot; the message names it.
    let (code, body) = api.delete("volumes/db").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains("s1"), "{body}");
    assert_eq!(api.get("volumes/db").await.0, StatusCode::OK);

    // The snapshot's volume is fixed; without the label it is still found.
    let mut moved = created.clone();
    moved["spec"]["volume"] = json!("other");
    let (code, body) = api.put("snapshots/s1", &moved).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(causes(&body), ["spec.volume"]);
    let mut unlabelled = created.clone();
    unlabelled["metadata"]["labels"] = json!({});
    assert_eq!(api.put("snapshots/s1", &unlabelled).await.0, StatusCode::OK);
    assert_eq!(api.delete("volumes/db").await.0, StatusCode::CONFLICT);

    assert_eq!(api.delete("snapshots/s1").await.0, StatusCode::OK);
    assert_eq!(api.delete("volumes/db").await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_status_subresource_is_written_apart_from_the_spec() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let (_, v) = api.post("volumes", &volume("a", "1Gi")).await;
    let mut with_status = v.clone();
    with_status["status"] = json!({"phase": "Ready", "observedGeneration": 1});
    let (code, body) = api.put("volumes/a/status", &with_status).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // The user's replace with the resourceVersion read before the status write succeeds.
    let mut edit = v.clone();
    edit["spec"]["size"] = json!("3Gi");
    let (code, replaced) = api.put("volumes/a", &edit).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(replaced["status"]["phase"], "Ready");
    // Status sent in a create or spec replace is ignored.
    let mut sneaky = replaced.clone();
    sneaky["status"]["phase"] = json!("Failed");
    sneaky["spec"]["size"] = json!("4Gi");
    let (_, after) = api.put("volumes/a", &sneaky).await;
    assert_eq!(after["status"]["phase"], "Ready");
    let (code, s) = api.get("volumes/a/status").await;
    assert_eq!(
        (code, s["status"]["phase"].as_str()),
        (StatusCode::OK, Some("Ready"))
    );
    let (code, body) = api.put("volumes/a/status", &v).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(causes(&body), ["status"]);
}

/// Reads watch lines until `n` non-bookmark events, returning (type, name, line revision).
async fn read_events(
    resp: &mut reqwest::Response,
    n: usize,
    bookmarks: &mut usize,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("watch events in time")
            .unwrap()
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(i) = buf.find('\n') {
            let line: Value = serde_json::from_str(&buf[..i]).unwrap();
            buf.drain(..=i);
            let kind = line["type"].as_str().unwrap().to_string();
            if kind == "BOOKMARK" {
                *bookmarks += 1;
                continue;
            }
            let name = line["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            out.push((
                kind,
                name,
                line["resourceVersion"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn watch_streams_events_in_order_resumes_and_answers_410_after_compaction() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    api.post("volumes", &volume("old", "1Gi")).await;
    let mut resp = api
        .req(reqwest::Method::GET, "volumes?watch=true")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut bookmarks = 0;
    let first = read_events(&mut resp, 1, &mut bookmarks).await;
    assert_eq!((first[0].0.as_str(), first[0].1.as_str()), ("ADDED", "old"));

    let (_, a) = api.post("volumes", &volume("a", "1Gi")).await;
    let mut edit = a.clone();
    edit["spec"]["size"] = json!("2Gi");
    api.put("volumes/a", &edit).await;
    api.delete("volumes/a").await;
    let events = read_events(&mut resp, 3, &mut bookmarks).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    let revs: Vec<i64> = events.iter().map(|e| e.2.parse().unwrap()).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    // Idle: bookmarks keep coming.
    let mut idle_bookmarks = 0;
    let quiet = tokio::time::timeout(
        Duration::from_secs(2),
        read_events(&mut resp, 1, &mut idle_bookmarks),
    )
    .await;
    assert!(quiet.is_err(), "no event expected");
    assert!(
        idle_bookmarks >= 1 || bookmarks >= 1,
        "bookmarks expected on an idle watch"
    );
    drop(resp);

    // Resume after the first ADDED of "a": the client sees the rest, nothing twice.
    let mut resumed = api
        .req(
            reqwest::Method::GET,
            &format!("volumes?watch=true&resourceVersion={}", events[0].2),
        )
        .send()
        .await
        .unwrap();
    let again = read_events(&mut resumed, 2, &mut bookmarks).await;
    assert_eq!(
        again.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["MODIFIED", "DELETED"]
    );

    let now = api.store.revision().await.unwrap();
    api.store.compact(now).await.unwrap();
    let (code, body) = api
        .get(&format!(
            "volumes?watch=true&resourceVersion={}",
            events[0].2
        ))
        .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (StatusCode::GONE, Some("Expired"))
    );
}

#[tokio::test]
async fn tokens_gate_access_by_role() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    std::fs::write(&file, "tokens:\n  - {name: ci, token: admin-token-0123456789, role: admin}\n  - {name: dash, token: reader-token-0123456789, role: reader}\n").unwrap();
    let mut api = Api::start(&etcd, Some(&file)).await;
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    // The dashboard's page is static and open; what it shows it reads with a token.
    let (code, page) = api.get("/ui").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        page.as_str().unwrap().contains("#token="),
        "the page says how to pass a token"
    );
    assert_eq!(
        api.get("/apis").await.0,
        StatusCode::UNAUTHORIZED,
        "discovery needs a token"
    );
    assert_eq!(api.get("/api/v1/events").await.0, StatusCode::UNAUTHORIZED);
    let (code, body) = api.get("volumes").await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("Unauthorized"))
    );
    api.token = Some("wrong-token-0000000000".into());
    assert_eq!(api.get("volumes").await.0, StatusCode::UNAUTHORIZED);
    api.token = Some("reader-token-0123456789".into());
    assert_eq!(api.get("volumes").await.0, StatusCode::OK);
    let (code, body) = api.post("volumes", &volume("a", "1Gi")).await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (StatusCode::FORBIDDEN, Some("Forbidden"))
    );
    api.token = Some("admin-token-0123456789".into());
    assert_eq!(
        api.post("volumes", &volume("a", "1Gi")).await.0,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn with_etcd_down_the_api_answers_503_within_2s_and_recovers_without_restart() {
    let mut etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    api.post("volumes", &volume("a", "1Gi")).await;
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK);
    etcd.stop();
    for p in ["volumes", "volumes/a", "/readyz"] {
        let start = Instant::now();
        let (code, body) = api.get(p).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{p}: {body}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{p} took {:?}",
            start.elapsed()
        );
    }
    let start = Instant::now();
    let (code, _) = api.post("volumes", &volume("b", "1Gi")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        api.get("/healthz").await.0,
        StatusCode::OK,
        "liveness does not depend on etcd"
    );
    etcd.start_again();
    cobalt_testkit::wait::until("the API to recover", Duration::from_secs(15), || async {
        (api.get("volumes/a").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_code() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    api.get("volumes/missing").await;
    let text = api
        .req(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("cobalt_http_requests_total")
                && l.contains("code=\"404\"")
                && l.contains("/{plural}/{name}")
        })
        .unwrap_or_else(|| panic!("no request counter in:\n{text}"));
    assert!(line.ends_with(" 1"), "{line}");
}

#[test]
fn the_checked_in_openapi_document_is_current_and_valid_openapi_3() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("schemas/openapi.json");
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert!(
        on_disk == cobalt_controller::openapi::document_text(),
        "schemas/openapi.json is stale: run `make schemas`"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sys\nfrom openapi_spec_validator import validate\nfrom openapi_spec_validator.readers import read_from_filename\nd,_=read_from_filename(sys.argv[1]); validate(d); print('valid')")
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "openapi-spec-validator (installed by `make deps`) rejected the document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What kubectl reads first: discovery, and the OpenAPI v3 document it validates and explains
/// with. The kinds are cluster-scoped with their short names; the PATCH operations say they take
/// `fieldValidation` (so kubectl leaves validation to the server); no JSON Schema 2020-12 forms
/// kubectl cannot read are left.
#[tokio::test]
async fn discovery_and_openapi_v3_are_what_kubectl_reads() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let (code, core) = api.get("/api").await;
    assert_eq!(code, 200);
    assert_eq!(core["kind"], "APIVersions");
    let (_, core_v1) = api.get("/api/v1").await;
    assert_eq!(core_v1["resources"][0]["name"], "events");
    let (_, groups) = api.get("/apis").await;
    assert_eq!(groups["groups"][0]["name"], "cobalt.io");
    assert_eq!(
        groups["groups"][0]["preferredVersion"]["groupVersion"],
        "cobalt.io/v1alpha1"
    );
    let (code, group) = api.get("/apis/cobalt.io").await;
    assert_eq!(
        (code, group["kind"].as_str()),
        (StatusCode::OK, Some("APIGroup"))
    );
    let (_, resources) = api.get("/apis/cobalt.io/v1alpha1").await;
    assert_eq!(resources["groupVersion"], "cobalt.io/v1alpha1");
    let list = resources["resources"].as_array().unwrap();
    for (plural, kind, short) in [
        ("volumes", "Volume", "vol"),
        ("machines", "Machine", "mach"),
        ("snapshots", "Snapshot", "snap"),
    ] {
        let r = list.iter().find(|r| r["name"] == plural).unwrap();
        assert_eq!(r["kind"], kind);
        assert_eq!(r["namespaced"], false);
        assert_eq!(r["shortNames"][0], short);
        assert!(r["verbs"].as_array().unwrap().iter().any(|v| v == "patch"));
        assert!(list.iter().any(|r| r["name"] == format!("{plural}/status")));
    }
    let (_, index) = api.get("/openapi/v3").await;
    let url = index["paths"]["apis/cobalt.io/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .unwrap();
    let (code, doc) = api.get(url).await;
    assert_eq!(code, 200);
    assert_eq!(
        doc["components"]["schemas"]["Volume"]["x-kubernetes-group-version-kind"][0]["kind"],
        "Volume"
    );
    let patch = &doc["paths"]["/apis/cobalt.io/v1alpha1/volumes/{name}"]["patch"];
    assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Volume");
    assert!(patch["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "fieldValidation" && p["in"] == "query"));
    fn no_type_arrays(v: &Value, at: &str) {
        match v {
            Value::Object(o) => {
                assert!(
                    !o.get("type").is_some_and(Value::is_array),
                    "type array at {at}"
                );
                assert!(!o.contains_key("const"), "const at {at}");
                for (k, x) in o {
                    no_type_arrays(x, &format!("{at}/{k}"));
                }
            }
            Value::Array(a) => a.iter().for_each(|x| no_type_arrays(x, at)),
            _ => {}
        }
    }
    no_type_arrays(&doc, "");
}

#[tokio::test]
async fn merge_patch_changes_spec_and_labels_but_not_status_and_honours_preconditions() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let mut v = volume("web", "1Gi");
    v["metadata"]["labels"] = json!({"app": "web", "tier": "gold"});
    assert_eq!(api.post("volumes", &v).await.0, 201);
    let patch = |body: Value, content_type: &'static str| {
        api.req(reqwest::Method::PATCH, "volumes/web")
            .header("content-type", content_type)
            .body(body.to_string())
    };
    const MERGE: &str = "application/merge-patch+json";
    let (code, patched) = api
        .send(patch(
            json!({"metadata": {"labels": {"tier": null}}, "spec": {"size": "2Gi"}, "status": {"phase": "Ready"}}),
            MERGE,
        ))
        .await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["spec"]["size"], "2Gi");
    assert_eq!(patched["metadata"]["labels"], json!({"app": "web"}));
    assert_eq!(patched["metadata"]["generation"], 2);
    let (_, read) = api.get("volumes/web").await;
    assert_ne!(read["status"]["phase"], "Ready", "status is not patched");
    // A stale resourceVersion in the patch is a precondition that fails.
    let (code, _) = api
        .send(patch(
            json!({"metadata": {"resourceVersion": "1"}, "spec": {"size": "3Gi"}}),
            MERGE,
        ))
        .await;
    assert_eq!(code, 409);
    // The patched object is validated like a replace: every problem named.
    let (code, body) = api
        .send(patch(
            json!({"spec": {"size": "-1Gi", "compression": "lz9"}}),
            MERGE,
        ))
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("spec"), "{body}");
    let (code, body) = api
        .send(patch(
            json!({"spec": {"size": "3Gi"}}),
            "application/strategic-merge-patch+json",
        ))
        .await;
    assert_eq!(code, 415);
    assert!(
        body["message"].as_str().unwrap().contains("--type=merge"),
        "{body}"
    );
    let (code, _) = api
        .send(patch(json!([{"op": "remove", "path": "/spec"}]), MERGE))
        .await;
    assert_eq!(code, 400, "a merge patch is an object");
    let (code, _) = api
        .send(
            api.req(reqwest::Method::PATCH, "volumes/nope")
                .header("content-type", MERGE)
                .body("{}"),
        )
        .await;
    assert_eq!(code, 404);
    let (_, read) = api.get("volumes/web").await;
    assert_eq!(read["spec"]["size"], "2Gi", "nothing half-applied");
}

#[tokio::test]
async fn field_selectors_tables_and_watch_lists_serve_kubectl() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    for n in ["a", "b"] {
        assert_eq!(api.post("volumes", &volume(n, "1Gi")).await.0, 201);
    }
    let (code, list) = api.get("volumes?fieldSelector=metadata.name%3Db").await;
    assert_eq!(code, 200);
    let items = list["items"].as_array().unwrap();
    assert_eq!(
        (items.len(), items[0]["metadata"]["name"].as_str()),
        (1, Some("b"))
    );
    let (code, body) = api.get("volumes?fieldSelector=spec.size%3D1Gi").await;
    assert_eq!(code, 400);
    assert!(
        body["message"].as_str().unwrap().contains("metadata.name"),
        "{body}"
    );

    const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let (code, table) = api
        .send(
            api.req(reqwest::Method::GET, "volumes")
                .header("accept", TABLE),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(table["kind"], "Table");
    let columns = table["columnDefinitions"].as_array().unwrap();
    assert_eq!(columns[0]["name"], "Name");
    assert_eq!(columns[0]["priority"], 0);
    assert_eq!(
        columns.last().unwrap()["priority"],
        1,
        "wide columns are priority 1"
    );
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["cells"][0], "a");
    assert_eq!(rows[0]["cells"][3], "Pending");
    assert_eq!(rows[0]["object"]["metadata"]["name"], "a");
    let (_, one) = api
        .send(
            api.req(reqwest::Method::GET, "volumes/b")
                .header("accept", TABLE),
        )
        .await;
    assert_eq!(one["rows"][0]["cells"][0], "b");

    // client-go's watch list: the initial events, then a bookmark marking their end, as JSON.
    let mut resp = api
        .req(
            reqwest::Method::GET,
            "volumes?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&fieldSelector=metadata.name%3Da",
        )
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let chunk = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            resp.chunk(),
        )
        .await
        .expect("initial events in time")
        .unwrap()
        .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        let lines: Vec<Value> = buf
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
    };
    assert_eq!(lines[0]["type"], "ADDED");
    assert_eq!(lines[0]["object"]["metadata"]["name"], "a");
    assert_eq!(lines[1]["type"], "BOOKMARK");
    assert_eq!(
        lines[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[tokio::test]
async fn recorded_events_are_served_as_core_v1_events_by_field_selector() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let (_, created) = api.post("volumes", &volume("web", "1Gi")).await;
    let web: cobalt_api::Volume = serde_json::from_value(created).unwrap();
    let recorder = cobalt_store::Recorder::start(
        api.store.clone(),
        "cobalt-test",
        "here",
        Duration::from_secs(600),
    );
    recorder.warning(&web, "Unschedulable", "no machine has room");
    let path = format!(
        "/api/v1/namespaces/default/events?fieldSelector=involvedObject.kind%3DVolume,involvedObject.name%3Dweb,involvedObject.namespace%3D,involvedObject.uid%3D{}",
        web.metadata.uid
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let (code, list) = api.get(&path).await;
        assert_eq!(code, 200, "{list}");
        if !list["items"].as_array().unwrap().is_empty() {
            break list;
        }
        assert!(Instant::now() < deadline, "the event was not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(list["kind"], "EventList");
    let e = &list["items"][0];
    assert_eq!(
        (e["type"].as_str(), e["reason"].as_str()),
        (Some("Warning"), Some("Unschedulable"))
    );
    assert_eq!(e["involvedObject"]["name"], "web");
    assert_eq!(e["count"], 1);
    let (_, other) = api
        .get("/api/v1/events?fieldSelector=involvedObject.name%3Ddb")
        .await;
    assert!(other["items"].as_array().unwrap().is_empty());
    let (code, _) = api.get("/api/v1/events?fieldSelector=spec.size%3D1").await;
    assert_eq!(code, 400);
    let (code, _) = api.get("/api/v1/events?watch=true").await;
    assert_eq!(code, 405);
}

#[tokio::test]
async fn malformed_or_repeated_query_parameters_are_status_objects_naming_them() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    for (method, path) in [
        (reqwest::Method::GET, "volumes?watch=x"),
        (reqwest::Method::GET, "volumes?watch=true&watch=false"),
        (reqwest::Method::POST, "volumes?dryRun=All&dryRun=All"),
        (reqwest::Method::GET, "claims?limit=-1&watch=maybe"),
        (
            reqwest::Method::PATCH,
            "volumes/q?fieldValidation=Strict&fieldValidation=Strict",
        ),
        (reqwest::Method::PATCH, "volumes/q?fieldValidation=Loose"),
        (reqwest::Method::DELETE, "volumes/q?dryRun=All&dryRun=All"),
    ] {
        let mut r = api.req(method.clone(), path);
        if method == reqwest::Method::POST {
            r = r.json(&volume("q", "1Gi"));
        }
        if method == reqwest::Method::PATCH {
            r = r
                .header("content-type", "application/merge-patch+json")
                .body("{}");
        }
        let (code, body) = api.send(r).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["kind"], "Status", "{path}: a JSON Status, got {body}");
        assert_eq!(body["reason"], "BadRequest", "{path}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("query parameters:"),
            "{path}: {message}"
        );
        assert!(
            ["watch", "dryRun", "fieldValidation"]
                .iter()
                .any(|p| message.contains(p)),
            "{path}: names the parameter: {message}"
        );
    }
    assert!(
        api.store
            .get::<cobalt_api::Volume>("q")
            .await
            .unwrap()
            .is_none(),
        "nothing written"
    );
}

#[tokio::test]
async fn a_body_with_several_problems_gets_every_one_as_a_cause() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    let bad = json!({
        "apiVersion": "cobalt.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": "Bad_Name"},
        "spec": {"size": "-1Gi", "compression": "gzip"}
    });
    let (code, body) = api.post("volumes", &bad).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["reason"], "Invalid");
    let causes = body["details"]["causes"].as_array().unwrap();
    let fields: Vec<&str> = causes.iter().filter_map(|c| c["field"].as_str()).collect();
    for f in ["metadata.name", "spec.size", "spec.compression"] {
        assert!(fields.contains(&f), "{f} missing: {body}");
    }
    let compression = causes
        .iter()
        .find(|c| c["field"] == "spec.compression")
        .unwrap();
    assert!(
        compression["message"].as_str().unwrap().contains("zstd"),
        "the allowed values: {compression}"
    );
    assert!(api
        .store
        .get::<cobalt_api::Volume>("Bad_Name")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn the_served_openapi_document_asks_for_a_token_only_when_the_server_checks_one() {
    let etcd = Etcd::start();
    let open = Api::start(&etcd, None).await;
    for path in ["/openapi.json", "/openapi/v3/apis/cobalt.io/v1alpha1"] {
        let (code, doc) = open.get(path).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            doc["security"],
            json!([]),
            "{path}: no Authorization needed"
        );
        assert!(
            !doc.to_string().contains("\"401\""),
            "{path}: no operation answers 401"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    std::fs::write(
        &file,
        "tokens:\n  - {name: ci, token: admin-token-0123456789, role: admin}\n",
    )
    .unwrap();
    let mut guarded = Api::start(&etcd, Some(&file)).await;
    guarded.token = Some("admin-token-0123456789".into());
    let (code, doc) = guarded.get("/openapi.json").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    assert!(
        doc["paths"]["/apis/cobalt.io/v1alpha1/volumes"]["post"]["responses"]["401"].is_object()
    );
    let (code, _) = guarded
        .send(
            guarded
                .client
                .get(guarded.path("/apis/cobalt.io/v1alpha1/volumes")),
        )
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "and it does check");
}

/// Least privilege: a machine token reads, registers its own Machine, and writes only the status
/// (and the agent's finalizer) of what concerns its machine. Every refusal is a 403 naming the
/// machine, and nothing refused is written.
#[tokio::test]
async fn a_machine_token_writes_only_what_concerns_its_machine() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    std::fs::write(
        &file,
        "tokens:\n  - {name: ops, token: admin-token-0123456789, role: admin}\n  - {name: m1, token: m1-token-0123456789ab, role: machine, machine: m1}\n  - {name: m2, token: m2-token-0123456789ab, role: machine, machine: m2}\n",
    )
    .unwrap();
    let mut api = Api::start(&etcd, Some(&file)).await;
    let machine = |name: &str| json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": {"address": "10.0.0.1"}});
    let pinned = |name: &str, to: &str| {
        let mut v = volume(name, "1Gi");
        v["spec"]["machine"] = json!(to);
        v
    };
    let admin = "admin-token-0123456789";
    let (m1, m2) = ("m1-token-0123456789ab", "m2-token-0123456789ab");
    let refused = |(code, body): (StatusCode, Value), what: &str| {
        assert_eq!(code, StatusCode::FORBIDDEN, "{what}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("machine m1"),
            "{what}: {body}"
        );
    };

    // Registration: its own Machine only.
    api.token = Some(m1.into());
    assert_eq!(
        api.post("machines", &machine("m1")).await.0,
        StatusCode::CREATED
    );
    refused(
        api.post("machines", &machine("m2")).await,
        "another machine",
    );
    api.token = Some(admin.into());
    assert_eq!(
        api.post("machines", &machine("m2")).await.0,
        StatusCode::CREATED
    );
    for v in [pinned("db", "m1"), pinned("other", "m2")] {
        assert_eq!(api.post("volumes", &v).await.0, StatusCode::CREATED);
    }
    let snap = json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": "db-s"}, "spec": {"volume": "db"}});
    assert_eq!(api.post("snapshots", &snap).await.0, StatusCode::CREATED);

    api.token = Some(m1.into());
    let (_, mut db) = api.get("volumes/db").await;
    // The status of a volume bound to it: yes. Of another machine's: no.
    db["status"] = json!({"phase": "Ready", "machine": "m1"});
    let (code, body) = api.put("volumes/db/status", &db).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, mut other) = api.get("volumes/other").await;
    other["status"] = json!({"phase": "Ready", "machine": "m2"});
    refused(
        api.put("volumes/other/status", &other).await,
        "another machine's volume",
    );
    // Saying its volume is somewhere it does not concern: no.
    db["status"] = json!({"phase": "Ready", "machine": "m2"});
    refused(
        api.put("volumes/db/status", &db).await,
        "status.machine elsewhere",
    );

    // The spec users declared: no change, no delete, no create.
    let (_, mut db) = api.get("volumes/db").await;
    db["spec"]["size"] = json!("1Ti");
    refused(api.put("volumes/db", &db).await, "a spec change");
    db["spec"]["size"] = json!("1Gi");
    db["spec"]["machine"] = json!("m2");
    refused(api.put("volumes/db", &db).await, "a binding change");
    refused(api.delete("volumes/db").await, "a delete");
    refused(
        api.post("volumes", &volume("mine", "1Gi")).await,
        "a create",
    );
    refused(
        api.send(
            api.req(reqwest::Method::PATCH, "volumes/db")
                .header("content-type", "application/merge-patch+json")
                .body(r#"{"spec":{"size":"2Gi"}}"#),
        )
        .await,
        "a patch",
    );
    // The agent's finalizer: yes.
    let (_, mut db) = api.get("volumes/db").await;
    db["metadata"]["finalizers"] = json!(["cobalt.io/agent"]);
    let (code, body) = api.put("volumes/db", &db).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, mut other) = api.get("volumes/other").await;
    other["metadata"]["finalizers"] = json!(["cobalt.io/agent"]);
    refused(
        api.put("volumes/other", &other).await,
        "another machine's finalizer",
    );

    // Its own Machine: status and the cobalt.io/ labels; not the operator's labels or spec.
    let (_, mut me) = api.get("machines/m1").await;
    me["metadata"]["labels"] = json!({"cobalt.io/backend": "btrfs"});
    let (code, body) = api.put("machines/m1", &me).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, mut me) = api.get("machines/m1").await;
    me["metadata"]["labels"]["disk"] = json!("ssd");
    refused(api.put("machines/m1", &me).await, "an operator's label");
    me["status"] = json!({"phase": "Ready"});
    let (code, body) = api.put("machines/m1/status", &me).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, mut them) = api.get("machines/m2").await;
    them["status"] = json!({"phase": "NotReady"});
    refused(
        api.put("machines/m2/status", &them).await,
        "another machine's status",
    );
    refused(api.delete("machines/m2").await, "deleting a machine");

    // A snapshot of its volume: status yes; m2's token: no.
    let (_, mut s) = api.get("snapshots/db-s").await;
    s["status"] = json!({"phase": "Pending"});
    let (code, body) = api.put("snapshots/db-s/status", &s).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    api.token = Some(m2.into());
    let (code, body) = api.put("snapshots/db-s/status", &s).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("machine m2"),
        "{body}"
    );

    // Nothing refused was written.
    let db: cobalt_api::Volume = api.store.get("db").await.unwrap().unwrap();
    assert_eq!(db.spec.size.bytes(), 1 << 30);
    assert_eq!(db.spec.machine.as_deref(), Some("m1"));
    assert_eq!(db.status.unwrap().machine.as_deref(), Some("m1"));
    let other: cobalt_api::Volume = api.store.get("other").await.unwrap().unwrap();
    assert!(other.status.is_none() && other.metadata.finalizers.is_empty());
    let me: cobalt_api::Machine = api.store.get("m1").await.unwrap().unwrap();
    assert!(!me.metadata.labels.contains_key("disk"));
    let them: cobalt_api::Machine = api.store.get("m2").await.unwrap().unwrap();
    assert!(them.status.is_none());
    assert!(api
        .store
        .get::<cobalt_api::Volume>("mine")
        .await
        .unwrap()
        .is_none());
}

#[test]
fn a_machine_token_must_name_its_machine_and_only_machine_tokens_may() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    for (entry, says) in [
        (
            "{name: n1, token: n1-token-0123456789ab, role: machine}",
            "needs `machine: NAME`",
        ),
        (
            "{name: n1, token: n1-token-0123456789ab, role: machine, machine: Bad_Name}",
            "machine:",
        ),
        (
            "{name: ci, token: ci-token-0123456789ab, role: admin, machine: n1}",
            "only for role machine",
        ),
    ] {
        std::fs::write(&file, format!("tokens:\n  - {entry}\n")).unwrap();
        let err = Tokens::load(&file).unwrap_err().to_string();
        assert!(err.contains(says), "{entry}: {err}");
    }
}

/// A status write sent with the revisions its sender read (`Cobalt-Status-Precondition`, what an
/// agent writing through the API sends) lands only while they hold; the answer says which
/// revision it wrote.
#[tokio::test]
async fn a_status_precondition_refuses_a_stale_write_and_names_the_revision_written() {
    let etcd = Etcd::start();
    let api = Api::start(&etcd, None).await;
    api.post("volumes", &volume("a", "1Gi")).await;
    let stored = api
        .store
        .get_stored::<cobalt_api::Volume>("a")
        .await
        .unwrap()
        .unwrap();
    let expect = cobalt_store::StatusPrecondition {
        object_create_revision: stored.object_create_revision,
        status_mod_revision: stored.status_mod_revision,
    };
    let (_, mut body) = api.get("volumes/a").await;
    body["status"] = json!({"phase": "Ready"});
    let put = |header: String, body: &Value| {
        api.req(reqwest::Method::PUT, "volumes/a/status")
            .header(cobalt_store::StatusPrecondition::HEADER, header)
            .json(body)
    };
    let resp = put(expect.to_header(), &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let written: i64 = resp
        .headers()
        .get(cobalt_store::StatusPrecondition::WRITTEN_HEADER)
        .expect("the revision written")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = api
        .store
        .get_stored::<cobalt_api::Volume>("a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.status_mod_revision, written);

    // The same precondition again is stale now: 409, and the status stays.
    body["status"] = json!({"phase": "Failed"});
    let (code, answer) = api.send(put(expect.to_header(), &body)).await;
    assert_eq!(code, StatusCode::CONFLICT, "{answer}");
    let v: cobalt_api::Volume = api.store.get("a").await.unwrap().unwrap();
    assert_eq!(v.status.unwrap().phase, cobalt_api::VolumePhase::Ready);
    // Malformed: 400 naming the header.
    let (code, answer) = api.send(put("latest".into(), &body)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["message"]
        .as_str()
        .unwrap()
        .contains(cobalt_store::StatusPrecondition::HEADER));
}
