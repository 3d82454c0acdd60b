//! The seeds' system tests on a real three-machine cluster (see `cobalt_e2e`).

use std::time::{Duration, Instant};

use cobalt_api::{MachinePhase, Volume};
use cobalt_e2e::{out, AppendWriter, Cluster, TTL};
use cobalt_testkit::wait::until;

const MIB: u64 = 1 << 20;

fn volume_yaml(name: &str, size: &str, selector: &str, client: &str, access: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: {size}\n  placement: {{selector: {{{selector}}}}}\n  export:\n    clients: [{{host: {client}, access: {access}, rootSquash: false}}]\n"
    )
}

async fn apply(c: &mut Cluster, dir: &tempfile::TempDir, file: &str, text: &str) {
    let path = dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    let o = c.ctl(&["apply", "-f", &path.display().to_string()]).await;
    assert!(o.status.success(), "{}", out(&o));
}

async fn ready(c: &mut Cluster, name: &str) -> Volume {
    let o = c
        .ctl(&[
            "wait",
            &format!("volume/{name}"),
            "--for=condition=Ready",
            "--timeout=60s",
        ])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    c.store.get::<Volume>(name).await.unwrap().unwrap()
}

async fn machines_ready(c: &Cluster, n: usize) {
    until("machines Ready", Duration::from_secs(30), || async {
        let (ms, _) = c
            .store
            .list::<cobalt_api::Machine>(&Default::default())
            .await
            .ok()?;
        let ready = ms
            .iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MachinePhase::Ready && s.capacity.total_bytes > 0)
            })
            .count();
        (ready == n).then_some(())
    })
    .await;
}

fn server(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.endpoint.as_ref())
        .map(|e| e.server.clone())
        .expect("an endpoint")
        .to_string()
}

fn machine_of(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.machine.clone())
        .expect("placed")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_places_serves_clones_resizes_and_deletes_leaving_nothing() {
    let mut c = Cluster::start("spread").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    let manifest = [
        volume_yaml("fast-a", "64Mi", "disk: ssd", &client, "rw"),
        volume_yaml("fast-b", "64Mi", "disk: ssd", &client, "rw"),
        volume_yaml("slow", "64Mi", "disk: hdd", &client, "rw"),
    ]
    .join("---\n");
    apply(&mut c, &dir, "volumes.yaml", &manifest).await;
    let (a, b, slow) = (
        ready(&mut c, "fast-a").await,
        ready(&mut c, "fast-b").await,
        ready(&mut c, "slow").await,
    );
    let (ma, mb) = (machine_of(&a), machine_of(&b));
    assert!(
        ["m1", "m2"].contains(&ma.as_str()) && ["m1", "m2"].contains(&mb.as_str()) && ma != mb,
        "spread over the ssd machines: {ma} {mb}"
    );
    assert_eq!(machine_of(&slow), "m3");

    // NFS from the client host, at the endpoint in status.
    c.nfs_put(&server(&a), "fast-a/notes.txt", "written over nfs\n")
        .expect("write over NFS");
    assert_eq!(
        c.nfs_cat(&server(&a), "fast-a/notes.txt").unwrap(),
        "written over nfs\n"
    );

    // Clone: on the source's machine, with the source's files.
    let clone = volume_yaml("fast-a-copy", "64Mi", "disk: ssd", &client, "ro")
        .replace("  placement:", "  source: {volume: fast-a}\n  placement:");
    apply(&mut c, &dir, "clone.yaml", &clone).await;
    let copy = ready(&mut c, "fast-a-copy").await;
    assert_eq!(machine_of(&copy), ma);
    let copied = until("the clone's export", Duration::from_secs(20), || async {
        c.nfs_cat(&server(&copy), "fast-a-copy/notes.txt").ok()
    })
    .await;
    assert_eq!(copied, "written over nfs\n");

    // Resize through the manifest.
    apply(
        &mut c,
        &dir,
        "volumes.yaml",
        &manifest.replacen("size: 64Mi", "size: 128Mi", 1),
    )
    .await;
    until("the new limit", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("fast-a").await.ok()??;
        (v.status?.usage?.limit_bytes == 128 * MIB).then_some(())
    })
    .await;

    // Delete everything: nothing is left on any pool.
    for name in ["fast-a-copy", "fast-a", "fast-b", "slow"] {
        let o = c
            .ctl(&["delete", "volume", name, "--wait", "--timeout=60s"])
            .await;
        assert!(o.status.success(), "{}", out(&o));
    }
    for m in &c.machines {
        assert!(
            m.volumes_on_disk().is_empty(),
            "{} still holds {:?}",
            m.name,
            m.volumes_on_disk()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_permission_change_flips_client_access() {
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    apply(
        &mut c,
        &dir,
        "v.yaml",
        &volume_yaml("shared", "32Mi", "zone: a", &client, "ro"),
    )
    .await;
    let v = ready(&mut c, "shared").await;
    let srv = server(&v);
    // Exported read-only: the write is refused as read-only (not as a missing export).
    let refused = c
        .nfs_put(&srv, "shared/x.txt", "nope")
        .expect_err("read-only: writes refused");
    assert!(refused.contains("read-only"), "{refused}");
    apply(
        &mut c,
        &dir,
        "v.yaml",
        &volume_yaml("shared", "32Mi", "zone: a", &client, "rw"),
    )
    .await;
    until("write access", Duration::from_secs(20), || async {
        c.nfs_put(&srv, "shared/x.txt", "now yes\n").ok()
    })
    .await;
    assert_eq!(c.nfs_cat(&srv, "shared/x.txt").unwrap(), "now yes\n");
    // Watchers see the new rules (the status is written right after the export is applied).
    until(
        "the status shows the new rules",
        Duration::from_secs(10),
        || async {
            let v: Volume = c.store.get("shared").await.ok()??;
            let exported = v
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Exported")?;
            exported
                .message
                .contains(&format!("{client} rw"))
                .then_some(())
        },
    )
    .await;
    let o = c.ctl(&["delete", "volume", "shared", "--wait"]).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        c.nfs_cat(&srv, "shared/x.txt").is_err(),
        "the export goes with the volume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_scheduler_leader_dies_the_other_controller_schedules_within_ttl_plus_one_second()
{
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let leader = until("a leader", Duration::from_secs(15), || async {
        c.store.leader("scheduler").await.ok().flatten()
    })
    .await;
    let index: usize = leader.trim_start_matches("controller-").parse().unwrap();
    c.controllers[index].0.kill();
    let killed = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    apply(
        &mut c,
        &dir,
        "v.yaml",
        &volume_yaml("after-failover", "16Mi", "zone: a", &client, "rw"),
    )
    .await;
    until(
        "the volume to be bound",
        Duration::from_secs(20),
        || async {
            c.store
                .get::<Volume>("after-failover")
                .await
                .ok()??
                .spec
                .machine
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= TTL + Duration::from_secs(1),
        "failover took {took:?}"
    );
    ready(&mut c, "after-failover").await;
}

/// Moves the volume with `cobaltctl move --wait` while `writer` appends, pointing the writer at
/// the new endpoint as soon as etcd shows it. Returns the volume after the move.
async fn move_while_writing(
    c: &mut Cluster,
    name: &str,
    to: &str,
    writer: &AppendWriter,
) -> Volume {
    let api = c.api();
    let mut mover = tokio::process::Command::new(cobalt_e2e::binary("cobaltctl"))
        .args([
            "--server",
            &api,
            "move",
            &format!("volume/{name}"),
            "--to",
            to,
            "--wait",
            "--timeout",
            "120s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        if let Ok(Some(v)) = c.store.get::<Volume>(name).await {
            if let Some(e) = v.status.as_ref().and_then(|s| s.endpoint.as_ref()) {
                writer.follow(&e.server);
            }
        }
        if let Ok(Some(status)) = mover.try_wait() {
            let o = mover.wait_with_output().await.unwrap();
            assert!(status.success(), "cobaltctl move: {}", out(&o));
            assert!(out(&o).contains("moved from machine"), "{}", out(&o));
            break;
        }
        assert!(Instant::now() < deadline, "the move did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = c.store.get::<Volume>(name).await.unwrap().unwrap();
    writer.follow(&server(&v));
    v
}

/// The seeds' "volume moved to another machine": a client appends every 50 ms while the volume
/// moves m1 → m2 (or m2 → m1) and back; every acknowledged append is at the new endpoint, the
/// old machine keeps no copy, and a watcher sees the endpoint change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_moved_to_another_machine_keeps_every_acknowledged_write() {
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    let manifest = volume_yaml("moved", "64Mi", "disk: ssd", &client, "rw");
    apply(&mut c, &dir, "v.yaml", &manifest).await;
    let v = ready(&mut c, "moved").await;
    let (from, srv) = (machine_of(&v), server(&v));
    let to = if from == "m1" { "m2" } else { "m1" };
    let data = cobalt_testkit::nfs::pattern(7, 6 << 20);
    c.nfs_write(&srv, "moved/data.bin", &data)
        .expect("6 MiB over NFS");

    // A watcher, as a user would run one.
    let api = c.api();
    let watcher = cobalt_testkit::process::Daemon::spawn(
        std::process::Command::new(cobalt_e2e::binary("cobaltctl"))
            .args(["--server", &api, "get", "volumes", "-w"]),
        "watch",
    );

    let writer = AppendWriter::start(c.client.nfs(), &srv, "moved", Duration::from_millis(50));
    until("a few appends", Duration::from_secs(20), || async {
        let log = c.nfs_read(&srv, "moved/log.txt").ok()?;
        (log.len() >= 3 * cobalt_e2e::record_line(0).len()).then_some(())
    })
    .await;
    let v = move_while_writing(&mut c, "moved", to, &writer).await;
    let new_srv = server(&v);
    assert_ne!(new_srv, srv, "the endpoint changed");
    assert_eq!(machine_of(&v), to);
    let s = v.status.as_ref().unwrap();
    assert_eq!(s.phase, cobalt_api::VolumePhase::Ready);
    assert!(s.move_.is_none(), "the move finished: {:?}", s.move_);
    let last = s.last_move.as_ref().expect("lastMove");
    assert_eq!((last.from.as_str(), last.to.as_str()), (from.as_str(), to));
    // A few more appends at the new endpoint, then every acknowledged one must be there.
    let at_cut_over = String::from_utf8_lossy(&c.nfs_read(&new_srv, "moved/log.txt").unwrap())
        .lines()
        .count();
    until(
        "appends at the new endpoint",
        Duration::from_secs(20),
        || async {
            let log = c.nfs_read(&new_srv, "moved/log.txt").ok()?;
            let n = String::from_utf8_lossy(&log).lines().count();
            (n >= at_cut_over + 5).then_some(())
        },
    )
    .await;
    let log = writer.finish();
    let content = String::from_utf8(c.nfs_read(&new_srv, "moved/log.txt").unwrap()).unwrap();
    let present: std::collections::HashSet<&str> = content.lines().collect();
    let missing: Vec<u64> = log
        .acked
        .iter()
        .copied()
        .filter(|seq| !present.contains(cobalt_e2e::record_line(*seq).trim_end()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged appends missing after the move: {missing:?} ({} acknowledged, {} failed)",
        log.acked.len(),
        log.failures
    );
    let old = log.servers.iter().filter(|s| **s == srv).count();
    assert!(
        old >= 3 && log.servers.len() - old >= 5,
        "appends on both sides of the cut-over: {log:?}"
    );
    eprintln!(
        "move {from} → {to}: {} appends acknowledged, {} failed, longest gap {:?}, cut-over {:?} ms",
        log.acked.len(),
        log.failures,
        log.longest_gap,
        last.cut_over_millis
    );
    assert!(
        c.nfs_read(&new_srv, "moved/data.bin").unwrap() == data,
        "the 6 MiB file is byte-identical on {to}"
    );
    assert!(
        c.machine(&from).volumes_on_disk().is_empty(),
        "{from} keeps no copy"
    );
    let pool = c.machine(&from).pool.path().to_path_buf();
    for leftover in ["snapshots", "staging"] {
        let entries = std::fs::read_dir(pool.join(leftover))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(entries, 0, "{from} has {leftover} left over");
    }
    until(
        "the watcher saw the new machine",
        Duration::from_secs(10),
        || async {
            watcher
                .log()
                .lines()
                .any(|l| {
                    l.starts_with("moved ")
                        && l.contains(&format!(" {to} "))
                        && l.contains(&new_srv)
                })
                .then_some(())
        },
    )
    .await;
    drop(watcher);

    // And back, the same way.
    let writer = AppendWriter::start(c.client.nfs(), &new_srv, "moved", Duration::from_millis(50));
    let back = move_while_writing(&mut c, "moved", &from, &writer).await;
    assert_eq!(machine_of(&back), from);
    let log = writer.finish();
    let content = String::from_utf8(c.nfs_read(&server(&back), "moved/log.txt").unwrap()).unwrap();
    let present: std::collections::HashSet<&str> = content.lines().collect();
    assert!(
        log.acked
            .iter()
            .all(|seq| present.contains(cobalt_e2e::record_line(*seq).trim_end())),
        "every append acknowledged on the way back is there"
    );
    assert!(c.nfs_read(&server(&back), "moved/data.bin").unwrap() == data);
    assert!(
        c.machine(to).volumes_on_disk().is_empty(),
        "{to} keeps no copy"
    );

    let o = c
        .ctl(&["delete", "volume", "moved", "--wait", "--timeout=60s"])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(c.machine(&from).volumes_on_disk().is_empty());
}

/// A clone whose selector excludes its source's machine is seeded on another machine from a
/// snapshot of the source, streamed between the agents; the source keeps serving throughout and
/// the two are independent afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_excluded_from_its_sources_machine_is_seeded_on_another() {
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    apply(
        &mut c,
        &dir,
        "base.yaml",
        &volume_yaml("base", "64Mi", "disk: ssd, zone: a", &client, "rw"),
    )
    .await;
    let base = ready(&mut c, "base").await;
    assert_eq!(machine_of(&base), "m1");
    let data = cobalt_testkit::nfs::pattern(21, 5 << 20);
    c.nfs_write(&server(&base), "base/data.bin", &data).unwrap();
    let clone = volume_yaml("copy", "64Mi", "zone: b", &client, "rw")
        .replace("spec:\n", "spec:\n  source: {volume: base}\n");
    apply(&mut c, &dir, "copy.yaml", &clone).await;
    let copy = ready(&mut c, "copy").await;
    assert_eq!(
        machine_of(&copy),
        "m2",
        "placed by its own selector, away from the source"
    );
    assert!(
        c.nfs_read(&server(&copy), "copy/data.bin").unwrap() == data,
        "the clone has the source's content"
    );
    // Independent afterwards, and the source still serves.
    c.nfs_put(&server(&copy), "copy/only-in-copy", "x").unwrap();
    c.nfs_put(&server(&base), "base/only-in-base", "y").unwrap();
    assert!(c.nfs_cat(&server(&base), "base/only-in-copy").is_err());
    assert!(c.nfs_cat(&server(&copy), "copy/only-in-base").is_err());
    assert_eq!(
        c.machine("m2").volumes_on_disk(),
        std::slice::from_ref(&copy.metadata.uid)
    );
    let snapshots = c
        .machine("m1")
        .pool
        .path()
        .join("snapshots")
        .join(&base.metadata.uid);
    until(
        "the seed snapshot deleted",
        Duration::from_secs(10),
        || async {
            std::fs::read_dir(&snapshots)
                .map(|d| d.count() == 0)
                .unwrap_or(true)
                .then_some(())
        },
    )
    .await;
    assert!(copy.status.as_ref().unwrap().clone_seed.is_none());
}

/// One series of agent `m`'s /metrics (0 while absent: a counter appears at its first event).
async fn agent_metric(c: &Cluster, m: &str, series: &str) -> f64 {
    let machine = c.machines.iter().find(|x| x.name == m).expect("a machine");
    cobalt_e2e::soak::metric(&format!("{}:7421", machine.host.addr), series)
        .await
        .unwrap_or(0.0)
}

const CACHED: &str = "cobalt_cached_objects{kind=\"Volume\"}";
const EVENTS: &str = "cobalt_watch_events_total{kind=\"Volume\"}";

/// Waits until each agent holds `want[i]` volumes (m1, m2, m3).
async fn agents_hold(c: &Cluster, want: [f64; 3]) {
    until(
        "each agent holding its own volumes",
        Duration::from_secs(30),
        || async {
            let mut held = [0.0; 3];
            for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
                held[i] = agent_metric(c, m, CACHED).await;
            }
            (held == want).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_receives_only_the_volumes_of_its_machine_and_a_move_hands_one_over() {
    let mut c = Cluster::start("binpack").await;
    machines_ready(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let client = c.client.addr.to_string();
    // m3 is the one hdd machine; the ssd volume goes to m1 or m2.
    let manifest = [
        volume_yaml("hdd-a", "64Mi", "disk: hdd", &client, "rw"),
        volume_yaml("hdd-b", "64Mi", "disk: hdd", &client, "rw"),
        volume_yaml("ssd", "64Mi", "disk: ssd", &client, "rw"),
    ]
    .join("---\n");
    apply(&mut c, &dir, "v.yaml", &manifest).await;
    for name in ["hdd-a", "hdd-b"] {
        assert_eq!(machine_of(&ready(&mut c, name).await), "m3");
    }
    let ssd = ready(&mut c, "ssd").await;
    let (from, to) = match machine_of(&ssd).as_str() {
        "m1" => ("m1", "m2"),
        _ => ("m2", "m1"),
    };
    let idx = |m: &str| m[1..].parse::<usize>().unwrap() - 1;
    let mut want = [0.0, 0.0, 2.0];
    want[idx(from)] = 1.0;
    agents_hold(&c, want).await;

    // Changes to m3's volumes (an export change, then the status it brings) reach m3 only.
    let before: Vec<f64> =
        futures::future::join_all(["m1", "m2", "m3"].map(|m| agent_metric(&c, m, EVENTS))).await;
    let mut generation = std::collections::BTreeMap::new();
    for name in ["hdd-a", "hdd-b"] {
        let v: Volume = c.store.get(name).await.unwrap().unwrap();
        generation.insert(name, v.metadata.generation);
    }
    let changed = [
        volume_yaml("hdd-a", "64Mi", "disk: hdd", &client, "ro"),
        volume_yaml("hdd-b", "64Mi", "disk: hdd", &client, "ro"),
        volume_yaml("ssd", "64Mi", "disk: ssd", &client, "rw"),
    ]
    .join("---\n");
    apply(&mut c, &dir, "v.yaml", &changed).await;
    for name in ["hdd-a", "hdd-b"] {
        let was = generation[name];
        until(
            "the export change applied",
            Duration::from_secs(30),
            || async {
                let v: Volume = c.store.get(name).await.ok()??;
                let (s, g) = (v.status.as_ref()?, v.metadata.generation);
                (g > was && s.observed_generation == g && s.phase == cobalt_api::VolumePhase::Ready)
                    .then_some(())
            },
        )
        .await;
    }
    until(
        "m3 received its volumes' changes",
        Duration::from_secs(30),
        || async { (agent_metric(&c, "m3", EVENTS).await >= before[2] + 4.0).then_some(()) },
    )
    .await;
    for m in ["m1", "m2"] {
        assert_eq!(
            agent_metric(&c, m, EVENTS).await,
            before[idx(m)],
            "machine {m} received events of volumes on m3"
        );
    }

    // A move hands the ssd volume over: the target holds it, then the source lets it go, and
    // the data written before it is read back at the new machine.
    let data = cobalt_testkit::nfs::pattern(3, 1 << 20);
    c.nfs_write(&server(&ssd), "ssd/data.bin", &data)
        .expect("1 MiB over NFS");
    let o = c.ctl(&["move", "volume/ssd", "--to", to]).await;
    assert!(o.status.success(), "{}", out(&o));
    let moved = until("the move finished", Duration::from_secs(60), || async {
        let v: Volume = c.store.get("ssd").await.ok()??;
        let s = v.status.as_ref()?;
        (s.machine.as_deref() == Some(to)
            && s.move_.is_none()
            && s.phase == cobalt_api::VolumePhase::Ready)
            .then_some(v)
    })
    .await;
    let mut want = [0.0, 0.0, 2.0];
    want[idx(to)] = 1.0;
    agents_hold(&c, want).await;
    assert_eq!(
        c.nfs_read(&server(&moved), "ssd/data.bin")
            .expect("read at the target"),
        data
    );
}
