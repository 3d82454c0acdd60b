//! The real `cobaltctl` binary against a real API server and etcd.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cobalt_api::{set_condition, ConditionStatus, Volume, VolumePhase};
use cobalt_controller::http::local::LocalApi;
use cobalt_store::Store;
use cobalt_testkit::etcd::Etcd;

struct Env {
    _etcd: Etcd,
    store: Store,
    server: String,
    dir: tempfile::TempDir,
    _api: LocalApi,
}

impl Env {
    async fn start() -> Env {
        let etcd = Etcd::start();
        let store = etcd.store().await;
        let api = LocalApi::start(store.clone(), None, Duration::from_secs(1))
            .await
            .unwrap();
        Env {
            _etcd: etcd,
            store,
            server: api.url.clone(),
            dir: tempfile::tempdir().unwrap(),
            _api: api,
        }
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cobaltctl"));
        c.env("COBALT_SERVER", &self.server)
            .env("COBALT_CONFIG", self.dir.path().join("no-config.yaml"))
            .stdin(Stdio::null());
        c
    }

    /// Runs cobaltctl off the async runtime's threads.
    async fn run(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const VOLUME: &str = "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata:\n  name: media\n  labels: {team: media}\nspec:\n  size: 1Gi\n  compression: zstd\n";

#[tokio::test]
async fn apply_creates_then_configures_then_leaves_unchanged_without_writing() {
    let env = Env::start().await;
    let f = env.file("v.yaml", VOLUME);
    let o = env.run(&["apply", "-f", &f]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "volume/media created\n");

    // The scheduler binds it meanwhile; re-applying must keep the binding.
    let mut v: Volume = env.store.get("media").await.unwrap().unwrap();
    v.spec.machine = Some("node-7".into());
    env.store.replace(&v).await.unwrap();

    let before = env.store.revision().await.unwrap();
    let o = env.run(&["apply", "-f", &f]).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "volume/media unchanged\n",
        "{}",
        text(&o)
    );
    assert_eq!(
        env.store.revision().await.unwrap(),
        before,
        "an unchanged apply must not write to etcd"
    );

    // Dropping compression from the manifest removes it; the binding stays.
    let f2 = env.file(
        "v2.yaml",
        &VOLUME
            .replace("  compression: zstd\n", "")
            .replace("1Gi", "2Gi"),
    );
    let o = env.run(&["apply", "-f", &f2]).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "volume/media configured\n",
        "{}",
        text(&o)
    );
    let v: Volume = env.store.get("media").await.unwrap().unwrap();
    assert_eq!(v.spec.size, "2Gi".parse().unwrap());
    assert_eq!(v.spec.compression, cobalt_api::Compression::None);
    assert_eq!(v.spec.machine.as_deref(), Some("node-7"));

    let f3 = env.file("v3.yaml", &VOLUME.replace("1Gi", "5Gi"));
    let o = env.run(&["apply", "--dry-run=server", "-f", &f3]).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "volume/media configured (server dry run)\n"
    );
    let v: Volume = env.store.get("media").await.unwrap().unwrap();
    assert_eq!(
        v.spec.size,
        "2Gi".parse().unwrap(),
        "dry run changed nothing"
    );
}

#[tokio::test]
async fn prune_deletes_only_labelled_leftovers_that_apply_made() {
    let env = Env::start().await;
    let two = format!(
        "{VOLUME}---\n{}",
        VOLUME.replace("name: media", "name: old")
    );
    env.run(&["apply", "-f", &env.file("two.yaml", &two)]).await;
    let other = VOLUME
        .replace("name: media", "name: unlabelled")
        .replace("labels: {team: media}", "labels: {team: other}");
    env.run(&["apply", "-f", &env.file("other.yaml", &other)])
        .await;
    let by_hand = Volume::new(
        "by-hand",
        cobalt_api::VolumeSpec {
            size: "1Gi".parse().unwrap(),
            ..Default::default()
        },
    );
    let mut by_hand = by_hand;
    by_hand
        .metadata
        .labels
        .insert("team".into(), "media".into());
    env.store.create(&by_hand).await.unwrap();

    let o = env
        .run(&[
            "apply",
            "-f",
            &env.file("one.yaml", VOLUME),
            "--prune",
            "-l",
            "team=media",
        ])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "volume/media unchanged\nvolume/old pruned\n",
        "{}",
        text(&o)
    );
    let (left, _) = env.store.list::<Volume>(&Default::default()).await.unwrap();
    let names: Vec<&str> = left.iter().map(|v| v.metadata.name.as_str()).collect();
    assert_eq!(names, ["by-hand", "media", "unlabelled"]);
}

#[tokio::test]
async fn get_prints_every_format() {
    let env = Env::start().await;
    env.run(&["apply", "-f", &env.file("v.yaml", VOLUME)]).await;
    let o = env.run(&["get", "volumes"]).await;
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.starts_with("NAME    SIZE   MACHINE   PHASE     ENDPOINT   AGE"),
        "{out}"
    );
    assert!(
        out.contains("media   1Gi    <none>    Pending   <none>"),
        "{out}"
    );
    let wide = text(&env.run(&["get", "vol", "-o", "wide"]).await);
    assert!(
        wide.contains("COMPRESSION") && wide.contains("zstd"),
        "{wide}"
    );
    let yaml = text(&env.run(&["get", "volume", "media", "-o", "yaml"]).await);
    assert!(
        yaml.contains("name: media") && yaml.contains("size: 1Gi"),
        "{yaml}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&env.run(&["get", "volume/media", "-o", "json"]).await.stdout)
            .unwrap();
    assert_eq!(json["spec"]["size"], "1Gi");
    assert_eq!(
        text(&env.run(&["get", "volumes", "-o", "name"]).await),
        "volume/media\n"
    );
    assert_eq!(
        text(&env.run(&["get", "volumes", "-l", "team=nobody"]).await),
        "No volumes found.\n"
    );
    let machines = text(&env.run(&["get", "machines"]).await);
    assert_eq!(machines, "No machines found.\n");
    let missing = env.run(&["get", "volume", "nope"]).await;
    assert!(!missing.status.success());
    let described = text(&env.run(&["describe", "volume", "media"]).await);
    assert!(
        described.contains("Name:") && described.contains("nothing reported yet"),
        "{described}"
    );
}

// Multi-threaded: the test blocks on the child's output while the in-process server must run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_watch_shows_a_status_change() {
    let env = Env::start().await;
    env.run(&["apply", "-f", &env.file("v.yaml", VOLUME)]).await;
    let mut child = env
        .cmd()
        .args(["get", "volumes", "-w"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let first: Vec<String> = (0..2)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    assert!(first[1].contains("Pending"), "{first:?}");
    env.store
        .update_status::<Volume, _>("media", |_| {
            Some(cobalt_api::VolumeStatus {
                phase: VolumePhase::Ready,
                machine: Some("node-1".into()),
                ..Default::default()
            })
        })
        .await
        .unwrap();
    let change = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        change.contains("Ready") && change.contains("node-1"),
        "{change}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn wait_succeeds_when_the_condition_arrives_and_times_out_showing_conditions() {
    let env = Env::start().await;
    env.run(&["apply", "-f", &env.file("v.yaml", VOLUME)]).await;
    let mut waiter = env.cmd();
    waiter.args([
        "wait",
        "volume/media",
        "--for=condition=Ready",
        "--timeout=20s",
    ]);
    let waiting = tokio::task::spawn_blocking(move || waiter.output().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await; // let it start watching; not a synchronisation the test relies on
    env.store
        .update_status::<Volume, _>("media", |v| {
            let mut s = v.status.clone().unwrap_or_default();
            set_condition(
                &mut s.conditions,
                "Ready",
                ConditionStatus::True,
                "Provisioned",
                "ok",
                1,
                chrono::Utc::now(),
            );
            Some(s)
        })
        .await
        .unwrap();
    let o = waiting.await.unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "volume/media condition met\n"
    );

    let o = env
        .run(&[
            "wait",
            "volume/media",
            "--for=condition=Ready=false",
            "--timeout=1s",
        ])
        .await;
    assert!(!o.status.success());
    let err = text(&o);
    assert!(
        err.contains("timed out") && err.contains("Ready=True (Provisioned)"),
        "{err}"
    );

    let mut deleter = env.cmd();
    deleter.args(["wait", "volume/media", "--for=delete", "--timeout=20s"]);
    let waiting = tokio::task::spawn_blocking(move || deleter.output().unwrap());
    env.store.delete::<Volume>("media", None).await.unwrap();
    assert!(waiting.await.unwrap().status.success());
}

#[tokio::test]
async fn diff_exits_0_when_same_and_1_when_different() {
    let env = Env::start().await;
    let f = env.file("v.yaml", VOLUME);
    let o = env.run(&["diff", "-f", &f]).await;
    assert_eq!(o.status.code(), Some(1), "a missing object differs");
    env.run(&["apply", "-f", &f]).await;
    assert_eq!(env.run(&["diff", "-f", &f]).await.status.code(), Some(0));
    let changed = env.file("v2.yaml", &VOLUME.replace("1Gi", "3Gi"));
    let o = env.run(&["diff", "-f", &changed]).await;
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("-  size: 1Gi") && out.contains("+  size: 3Gi"),
        "{out}"
    );
}

#[tokio::test]
async fn bad_manifests_fail_with_the_field_path_or_line_and_column() {
    let env = Env::start().await;
    let cases = [
        (
            "syntax.yaml",
            "kind: Volume\nspec: {size: [1Gi\n".to_string(),
            "line 2 column 14",
        ),
        (
            "unknown.yaml",
            VOLUME.replace("  size: 1Gi", "  size: 1Gi\n  sise: 2Gi"),
            "spec.sise",
        ),
        ("size.yaml", VOLUME.replace("1Gi", "10GB"), "spec.size"),
        (
            "name.yaml",
            VOLUME.replace("name: media", "name: Media_1"),
            "metadata.name",
        ),
    ];
    for (file, body, expect) in cases {
        let o = env.run(&["apply", "-f", &env.file(file, &body)]).await;
        assert!(!o.status.success(), "{file}");
        let err = text(&o);
        assert!(err.contains(file) && err.contains(expect), "{file}: {err}");
    }
    // Several problems in one document: every one is named, in one round.
    let several = VOLUME
        .replace("  size: 1Gi", "  size: -1Gi\n  sise: 2Gi")
        .replace("compression: zstd", "compression: gzip");
    let o = env
        .run(&["apply", "-f", &env.file("several.yaml", &several)])
        .await;
    assert!(!o.status.success());
    let err = text(&o);
    for expect in ["spec.sise", "spec.size", "spec.compression", "zstd"] {
        assert!(err.contains(expect), "{expect} missing: {err}");
    }
    assert!(
        env.store
            .list::<Volume>(&Default::default())
            .await
            .unwrap()
            .0
            .is_empty(),
        "nothing was applied"
    );
}

#[tokio::test]
async fn connection_refused_names_the_server_and_how_to_set_it() {
    let env = Env::start().await;
    let o = env
        .run(&["--server", "http://127.0.0.1:1", "get", "volumes"])
        .await;
    assert!(!o.status.success());
    let err = text(&o);
    assert!(
        err.contains("http://127.0.0.1:1")
            && err.contains("--server")
            && err.contains("COBALT_SERVER"),
        "{err}"
    );
    // A repository large enough to be listed while it is read, with one bad file at the end:
    // the manifest's error is what the user gets, whether or not the server answers.
    let repo = env.dir.path().join("bad-repo");
    std::fs::create_dir(&repo).unwrap();
    for i in 0..20 {
        std::fs::write(
            repo.join(format!("vol-{i:02}.yaml")),
            VOLUME.replace("name: media", &format!("name: vol-{i:02}")),
        )
        .unwrap();
    }
    std::fs::write(
        repo.join("zz-bad.yaml"),
        VOLUME
            .replace("name: media", "name: zz")
            .replace("1Gi", "-1Gi"),
    )
    .unwrap();
    let repo = repo.display().to_string();
    for server in ["http://127.0.0.1:1", env.server.as_str()] {
        let o = env.run(&["--server", server, "apply", "-f", &repo]).await;
        assert!(!o.status.success());
        let err = text(&o);
        assert!(
            err.contains("zz-bad.yaml")
                && err.contains("spec.size")
                && !err.contains("127.0.0.1:1"),
            "{err}"
        );
    }
    let (left, _) = env.store.list::<Volume>(&Default::default()).await.unwrap();
    assert!(left.is_empty(), "nothing applied");
}

#[test]
fn every_verb_explains_itself_with_an_example() {
    for verb in [
        "apply",
        "get",
        "describe",
        "delete",
        "wait",
        "diff",
        "explain",
        "completion",
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_cobaltctl"))
            .args([verb, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && help.contains("Example"),
            "{verb}: {help}"
        );
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cobaltctl"))
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("cobaltctl"));
    let o = Command::new(env!("CARGO_BIN_EXE_cobaltctl"))
        .args(["explain", "volume.spec.export"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("clients"));
}

#[tokio::test]
async fn version_prints_the_client_and_the_servers_and_snapshot_commands_work() {
    let env = Env::start().await;
    let o = env.run(&["version"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let want = format!("v{}", env!("CARGO_PKG_VERSION"));
    let t = text(&o);
    assert!(t.contains(&format!("Client Version: {want}")), "{t}");
    assert!(t.contains(&format!("Server Version: {want}")), "{t}");
    let o = env.run(&["version", "--client"]).await;
    assert!(text(&o).contains("Client Version") && !text(&o).contains("Server"));

    // snapshot: needs volume/NAME; the volume must exist; the snapshot is listed.
    let o = env.run(&["snapshot", "machine/m1"]).await;
    assert!(
        !o.status.success() && text(&o).contains("volume/NAME"),
        "{}",
        text(&o)
    );
    let o = env.run(&["snapshot", "volume/db", "--name", "db-1"]).await;
    assert!(
        !o.status.success() && text(&o).contains("does not exist"),
        "{}",
        text(&o)
    );
    let v = env.file(
        "db.yaml",
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {name: db}\nspec: {size: 1Gi}\n",
    );
    assert!(env.run(&["apply", "-f", &v]).await.status.success());
    let o = env.run(&["snapshot", "volume/db", "--name", "db-1"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("snapshot/db-1 created"));
    let o = env.run(&["get", "snap", "-o", "wide"]).await;
    let t = text(&o);
    assert!(
        t.contains("VOLUME") && t.contains("EXCLUSIVE") && t.contains("db-1"),
        "{t}"
    );
    let o = env.run(&["delete", "volume/db"]).await;
    assert!(
        !o.status.success() && text(&o).contains("db-1"),
        "{}",
        text(&o)
    );
    // No agent runs here: the untaken snapshot has no finalizer and goes at once.
    let o = env.run(&["delete", "volume/db", "--with-snapshots"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(env.store.get::<Volume>("db").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_takes_flags_or_a_file_names_bad_options_and_says_why_it_waits() {
    let env = Env::start().await;
    let o = env.run(&["claim", "web-1"]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("host: is required"), "{}", text(&o));
    let typo = env.file("typo.yaml", "name: web-1\nhots: 10.0.0.1\n");
    let o = env.run(&["claim", "-f", &typo]).await;
    assert!(
        !o.status.success() && text(&o).contains("hots") && text(&o).contains("allowed keys"),
        "{}",
        text(&o)
    );
    let o = env
        .run(&[
            "claim",
            "web-1",
            "--host",
            "10.0.0.7",
            "--strategy",
            "first",
        ])
        .await;
    assert!(
        text(&o).contains("--strategy") && text(&o).contains("any or ordinal"),
        "{}",
        text(&o)
    );
    let o = env
        .run(&[
            "claim",
            "web-1",
            "--host",
            "10.0.0.7",
            "--strategy",
            "ordinal",
        ])
        .await;
    assert!(text(&o).contains("spec.group"), "{}", text(&o));
    assert!(
        env.store
            .get::<cobalt_api::Claim>("web-1")
            .await
            .unwrap()
            .is_none(),
        "nothing written"
    );

    // A file, a flag over it; no scheduler here, so the wait ends saying why.
    let f = env.file(
        "claim.yaml",
        "name: web-1\nhost: 10.0.0.1\nselector: {app: web}\n",
    );
    let o = env
        .run(&[
            "claim",
            "-f",
            &f,
            "--host",
            "10.0.0.7",
            "--wait",
            "--timeout",
            "1s",
        ])
        .await;
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("claim/web-1 created") && t.contains("not ready after 1s"),
        "{t}"
    );
    assert!(
        t.contains("no status yet (is a controller running?)"),
        "{t}"
    );
    let stored: cobalt_api::Claim = env.store.get("web-1").await.unwrap().unwrap();
    assert_eq!(stored.spec.host, "10.0.0.7", "the flag wins over the file");
    assert_eq!(
        stored.spec.selector.get("app").map(String::as_str),
        Some("web")
    );
    let o = env.run(&["get", "claims"]).await;
    let t = text(&o);
    assert!(
        t.starts_with("NAME") && t.contains("HOST") && t.contains("ORDINAL"),
        "{t}"
    );
    assert!(
        t.contains("web-1") && t.contains("10.0.0.7") && t.contains("Pending"),
        "{t}"
    );

    // --hold renews through the API before it waits: the claim's lease is there.
    let o = env
        .run(&[
            "claim",
            "web-2",
            "--host",
            "10.0.0.8",
            "--hold",
            "--hold-seconds",
            "5",
            "--timeout",
            "1s",
        ])
        .await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(env.store.held_claims().await.unwrap().contains("web-2"));
}

/// Requests the API has answered so far (from its own metrics), `/metrics` itself excluded.
async fn requests_served(server: &str) -> u64 {
    let text = reqwest::get(format!("{server}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("cobalt_http_requests_total{") && !l.contains("/metrics"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_repository_of_manifests_is_applied_in_parallel_and_reapplied_with_one_list() {
    let env = Env::start().await;
    let repo = env.dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    // The Snapshot's file sorts first, but it names a Volume of the same repository: kinds are
    // applied in dependency order, so it is created after the volumes.
    std::fs::write(
        repo.join("a-snapshot.yaml"),
        "apiVersion: cobalt.io/v1alpha1\nkind: Snapshot\nmetadata: {name: vol-07-before}\nspec: {volume: vol-07}\n",
    )
    .unwrap();
    let n = 30;
    for i in 0..n {
        std::fs::write(
            repo.join(format!("vol-{i:02}.yaml")),
            VOLUME
                .replace("name: media", &format!("name: vol-{i:02}"))
                .replace("team: media", "set: repo"),
        )
        .unwrap();
    }
    let repo_arg = repo.display().to_string();
    let o = env.run(&["apply", "-f", &repo_arg]).await;
    assert!(o.status.success(), "{}", text(&o));
    let mut want: Vec<String> = (0..n)
        .map(|i| format!("volume/vol-{i:02} created"))
        .collect();
    want.push("snapshot/vol-07-before created".into());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .collect::<Vec<_>>(),
        want,
        "in manifest order within a kind, volumes before the snapshot naming one"
    );

    // Unchanged: no write, and one list of volumes instead of thirty GETs (the snapshot, alone
    // of its kind, is read on its own).
    let revision = env.store.revision().await.unwrap();
    let served = requests_served(&env.server).await;
    let o = env.run(&["apply", "-f", &repo_arg]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches(" unchanged")
            .count(),
        n + 1,
        "{}",
        text(&o)
    );
    assert_eq!(env.store.revision().await.unwrap(), revision, "no write");
    assert_eq!(
        requests_served(&env.server).await - served,
        2,
        "one list of volumes and one GET of the snapshot"
    );
    let served = requests_served(&env.server).await;
    let o = env.run(&["diff", "-f", &repo_arg]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(requests_served(&env.server).await - served, 2);

    // A change to some files, others removed: configured, pruned, the rest unchanged.
    for i in 0..3 {
        std::fs::write(
            repo.join(format!("vol-{i:02}.yaml")),
            VOLUME
                .replace("name: media", &format!("name: vol-{i:02}"))
                .replace("team: media", "set: repo")
                .replace("1Gi", "2Gi"),
        )
        .unwrap();
    }
    for i in 25..n {
        std::fs::remove_file(repo.join(format!("vol-{i:02}.yaml"))).unwrap();
    }
    let o = env
        .run(&["apply", "-f", &repo_arg, "--prune", "-l", "set=repo"])
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(out.matches(" configured").count(), 3, "{out}");
    assert_eq!(out.matches(" pruned").count(), 5, "{out}");
    assert!(out.contains("volume/vol-29 pruned"), "{out}");
    let (left, _) = env.store.list::<Volume>(&Default::default()).await.unwrap();
    assert_eq!(left.len(), 25);

    // The server refuses one object (a snapshot's volume is fixed): the others are still
    // applied, the failure names the object, the exit code says so, and nothing is pruned.
    std::fs::write(
        repo.join("a-snapshot.yaml"),
        "apiVersion: cobalt.io/v1alpha1\nkind: Snapshot\nmetadata: {name: vol-07-before}\nspec: {volume: vol-08}\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("vol-03.yaml"),
        VOLUME
            .replace("name: media", "name: vol-03")
            .replace("team: media", "set: repo")
            .replace("1Gi", "3Gi"),
    )
    .unwrap();
    std::fs::remove_file(repo.join("vol-24.yaml")).unwrap();
    let o = env
        .run(&["apply", "-f", &repo_arg, "--prune", "-l", "set=repo"])
        .await;
    assert!(!o.status.success());
    let err = text(&o);
    assert!(
        err.contains("snapshot/vol-07-before")
            && err.contains("spec.volume")
            && err.contains("1 of 25 objects were not applied; nothing was pruned"),
        "{err}"
    );
    assert!(err.contains("volume/vol-03 configured"), "{err}");
    let v: Volume = env.store.get("vol-24").await.unwrap().unwrap();
    assert_eq!(v.metadata.name, "vol-24", "not pruned after a failure");

    let o = env
        .run(&["apply", "-f", &repo_arg, "--parallel", "0"])
        .await;
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--parallel") && text(&o).contains("1 to 64"),
        "{}",
        text(&o)
    );
}
