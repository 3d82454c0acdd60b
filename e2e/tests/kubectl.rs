//! The real `kubectl` against Cobalt's API, unchanged, with a kubeconfig pointing at a
//! controller of the three-machine cluster: apply (create, then configure), wait for Ready, get
//! as a table, wide, JSON, YAML and watching, describe with events, explain, label, patch,
//! events, delete. And events themselves: what the scheduler and agents say as a volume is
//! bound, provisioned, resized and deleted, and as a machine is lost and comes back.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cobalt_e2e::{out, Cluster};
use cobalt_testkit::wait::until;

/// kubectl with its own HOME (no discovery cache shared between tests) and a kubeconfig for
/// the cluster's API.
struct Kubectl {
    home: tempfile::TempDir,
    binary: std::path::PathBuf,
}

impl Kubectl {
    fn new(api: &str) -> Kubectl {
        let binary = cobalt_testkit::require("kubectl");
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".kube")).unwrap();
        std::fs::write(
            home.path().join(".kube/config"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: cobalt\n  cluster: {{server: \"{api}\"}}\nusers:\n- name: operator\n  user: {{}}\ncontexts:\n- name: cobalt\n  context: {{cluster: cobalt, user: operator}}\ncurrent-context: cobalt\n"
            ),
        )
        .unwrap();
        Kubectl { home, binary }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.env("HOME", self.home.path())
            .env_remove("KUBECONFIG")
            .args(args);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// Runs and asserts success; the standard output.
    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(o.status.success(), "kubectl {args:?}: {}", out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn manifest(&self, name: &str, text: &str) -> String {
        let path = self.home.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

/// A child process stopped by its own PID when dropped (a `kubectl get -w`).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn volume(size: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata:\n  name: web\n  labels: {{app: web}}\nspec:\n  size: {size}\n  export:\n    clients: [{{host: {client}, access: rw}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_cobalt_unchanged() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    let k = Kubectl::new(&c.api());
    let client = c.client.addr.to_string();

    let file = k.manifest("web.yaml", &volume("64Mi", &client));
    let created = k.ok(&["apply", "-f", &file]).await;
    assert!(
        created.contains("volume.cobalt.io/web created"),
        "{created}"
    );
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "volume/web",
        "--timeout=60s",
    ])
    .await;

    let table = k.ok(&["get", "volumes"]).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SIZE", "MACHINE", "PHASE", "ENDPOINT", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[3]),
        ("web", "64Mi", "Ready"),
        "{table}"
    );
    let wide = k.ok(&["get", "vol", "-o", "wide"]).await;
    assert!(
        wide.lines().next().unwrap().contains("COMPRESSION"),
        "{wide}"
    );
    let machines = k.ok(&["get", "machines"]).await;
    assert_eq!(machines.matches("Ready").count(), 3, "{machines}");

    let json: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "volume", "web", "-o", "json"]).await).unwrap();
    assert_eq!(json["status"]["phase"], "Ready");
    let machine = json["status"]["machine"].as_str().unwrap().to_string();
    let yaml = k.ok(&["get", "volume/web", "-o", "yaml"]).await;
    assert!(
        yaml.contains("kind: Volume") && yaml.contains("size: 64Mi"),
        "{yaml}"
    );

    // Watch, then change the manifest: kubectl apply sends a merge patch, the watch shows it.
    let watch_out = k.home.path().join("watch.out");
    let _watch = Child(
        k.command(&["get", "volumes", "--watch"])
            .stdout(std::fs::File::create(&watch_out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    until("the watch to list web", Duration::from_secs(20), || async {
        std::fs::read_to_string(&watch_out)
            .ok()
            .filter(|t| t.contains("64Mi"))
    })
    .await;
    let file = k.manifest("web.yaml", &volume("128Mi", &client));
    let configured = k.ok(&["apply", "-f", &file]).await;
    assert!(
        configured.contains("volume.cobalt.io/web configured"),
        "{configured}"
    );
    until(
        "the watch to show the resize",
        Duration::from_secs(20),
        || async {
            std::fs::read_to_string(&watch_out)
                .ok()
                .filter(|t| t.contains("128Mi"))
        },
    )
    .await;
    // The agent carried it out: the limit in force, waited for by kubectl.
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.usage.limitBytes}=134217728",
        "volume/web",
        "--timeout=60s",
    ])
    .await;
    // Re-applying writes nothing. (kubectl may still say "configured": it compares lists
    // whole, and the server fills in the export rule's defaults.)
    let version = |v: Option<cobalt_api::Volume>| v.unwrap().metadata.resource_version;
    let before = version(c.store.get("web").await.unwrap());
    k.ok(&["apply", "-f", &file]).await;
    let after = version(c.store.get("web").await.unwrap());
    assert_eq!(after, before, "an unchanged apply wrote the object");

    k.ok(&["label", "volume", "web", "tier=gold"]).await;
    k.ok(&[
        "patch",
        "volume",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"compression":"zstd"}}"#,
    ])
    .await;
    let v: cobalt_api::Volume = c.store.get("web").await.unwrap().unwrap();
    assert_eq!(
        v.metadata.labels.get("tier").map(cobalt_api::Text::as_str),
        Some("gold")
    );
    assert_eq!(v.spec.compression, cobalt_api::Compression::Zstd);
    // The default (strategic) patch type is refused with the way out.
    let o = k
        .run(&["patch", "volume", "web", "-p", r#"{"spec":{"dilation":5}}"#])
        .await;
    assert!(!o.status.success());
    assert!(out(&o).contains("--type=merge"), "{}", out(&o));

    let described = k.ok(&["describe", "volume", "web"]).await;
    for want in ["Events:", "Bound", "Provisioned", "Resized", "cobalt-agent"] {
        assert!(
            described.contains(want),
            "describe lacks {want}:\n{described}"
        );
    }
    let events = k.ok(&["get", "events"]).await;
    assert!(
        events.contains("volume/web") && events.contains("Bound"),
        "{events}"
    );
    let explained = k.ok(&["explain", "volume.spec.size"]).await;
    assert!(
        explained.contains("<Quantity>") && explained.contains("10Gi"),
        "{explained}"
    );
    let resources = k.ok(&["api-resources", "--api-group=cobalt.io"]).await;
    for want in ["volumes", "vol", "machines", "snapshots", "false"] {
        assert!(resources.contains(want), "{resources}");
    }

    // Delete: kubectl waits until the agent has destroyed the data and let the object go.
    let deleted = k.ok(&["delete", "volume", "web", "--timeout=60s"]).await;
    assert!(deleted.contains("deleted"), "{deleted}");
    assert!(c
        .store
        .get::<cobalt_api::Volume>("web")
        .await
        .unwrap()
        .is_none());
    assert!(c.machine(&machine).volumes_on_disk().is_empty());
}

/// cobaltctl against `api` (a shared borrow, for waits).
async fn ctl(api: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(cobalt_e2e::binary("cobaltctl"));
    cmd.env("COBALT_SERVER", api)
        .env("COBALT_CONFIG", "/nonexistent")
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// `cobaltctl events` as things happen: bound, provisioned, a machine lost and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_what_happened_to_volumes_and_machines() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    c.apply_text(&volume("64Mi", &client)).await;
    let v = c.wait_ready("web", "60s").await;
    let holder = v.status.unwrap().machine.unwrap();
    let api = c.api();
    let events = until(
        "Bound and Provisioned events",
        Duration::from_secs(20),
        || async {
            let o = ctl(&api, &["events", "volume/web"]).await;
            let text = out(&o);
            (text.contains("Bound") && text.contains("Provisioned")).then_some(text)
        },
    )
    .await;
    assert!(
        events.contains(&format!("bound to machine {holder}")),
        "{events}"
    );
    // A volume that cannot be placed says why, as a warning.
    c.apply_text(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {name: huge}\nspec: {size: 1000Ti}\n",
    )
    .await;
    until(
        "an Unschedulable warning",
        Duration::from_secs(20),
        || async {
            let o = ctl(&api, &["events", "--warnings"]).await;
            out(&o).contains("Unschedulable").then_some(())
        },
    )
    .await;

    // The holder's agent dies: the machine and its volume say so; back, the machine says so.
    c.machine(&holder).kill_agent();
    let lost = until("MachineLost events", Duration::from_secs(60), || async {
        let m = out(&ctl(&api, &["events", &format!("machine/{holder}")]).await);
        let v = out(&ctl(&api, &["events", "volume/web"]).await);
        (m.contains("MachineLost") && v.contains("MachineLost")).then_some(m)
    })
    .await;
    assert!(lost.contains("Warning"), "{lost}");
    let etcd = c.etcd.endpoints()[0].clone();
    c.machine(&holder).start_agent(&etcd);
    let back = until(
        "a MachineReady event after the loss",
        Duration::from_secs(60),
        || async {
            let o = ctl(
                &api,
                &["events", &format!("machine/{holder}"), "-o", "json"],
            )
            .await;
            let list: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            let items = list["items"].as_array()?.clone();
            let lost_at = items.iter().find(|e| e["reason"] == "MachineLost")?["lastTimestamp"]
                .as_str()?
                .to_string();
            let ready = items.iter().find(|e| e["reason"] == "MachineReady")?;
            (ready["lastTimestamp"].as_str()? > lost_at.as_str()).then_some(ready.clone())
        },
    )
    .await;
    assert_eq!(back["type"], "Normal");
    c.wait_ready("web", "60s").await;
    let described = out(&ctl(&api, &["describe", "volume", "web"]).await);
    assert!(
        described.contains("Events:") && described.contains("MachineLost"),
        "{described}"
    );
}
