//! Moves under failure, on the real three-machine cluster: kill -9 of either agent at each
//! stage, the scheduler leader dying, etcd going away, a target without room, and a move
//! cancelled half-way. After each, exactly one machine holds the volume, serves it, and the
//! data is byte-identical.
//!
//! Agents run with `--move-rate-limit 8Mi` so the 16 MiB seed takes about two seconds: long
//! enough to kill a process while a stream is in flight.

use std::time::{Duration, Instant};

use cobalt_api::{MoveStage, MoveStatus, Volume, VolumePhase};
use cobalt_e2e::{out, server_of, Cluster};
use cobalt_testkit::wait::until;

const DATA_BYTES: usize = 16 << 20;

fn yaml(name: &str, size: &str, machine: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: {size}\n  machine: {machine}\n  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
    )
}

/// A Ready volume "data" with 16 MiB of random bytes, on `machine`.
async fn volume_with_data(c: &mut Cluster, machine: &str) -> Vec<u8> {
    let client = c.client.addr.to_string();
    c.apply_text(&yaml("data", "128Mi", machine, &client)).await;
    let o = c
        .ctl(&[
            "wait",
            "volume/data",
            "--for=condition=Ready",
            "--timeout=60s",
        ])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    let v: Volume = c.store.get("data").await.unwrap().unwrap();
    let data = cobalt_testkit::nfs::pattern(11, DATA_BYTES);
    c.nfs_write(&server_of(&v), "data/data.bin", &data)
        .expect("16 MiB over NFS");
    data
}

async fn request_move(c: &mut Cluster, to: &str) {
    let o = c.ctl(&["move", "volume/data", "--to", to]).await;
    assert!(o.status.success(), "{}", out(&o));
}

/// Polls etcd every few ms (the stages can be short) until the move satisfies `pred`.
async fn move_reaches(
    c: &Cluster,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&MoveStatus) -> bool,
) -> MoveStatus {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(v)) = c.store.get::<Volume>("data").await {
            if let Some(m) = v.moving().filter(|m| pred(m)) {
                return m.clone();
            }
        }
        assert!(Instant::now() < end, "the move never reached: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the move to `to` is finished, then checks there is exactly one copy, on `to`,
/// served byte for byte.
async fn settled_on(c: &mut Cluster, to: &str, other: &str, data: &[u8]) -> Volume {
    let v = until(
        &format!("the volume settled on {to}"),
        Duration::from_secs(90),
        || async {
            let v: Volume = c.store.get("data").await.ok()??;
            let s = v.status.as_ref()?;
            (s.machine.as_deref() == Some(to)
                && s.move_.is_none()
                && s.phase == VolumePhase::Ready
                && s.endpoint.is_some()
                && s.observed_generation == v.metadata.generation)
                .then_some(v)
        },
    )
    .await;
    assert!(
        c.nfs_read(&server_of(&v), "data/data.bin").unwrap() == data,
        "the data on {to} is byte-identical"
    );
    assert_eq!(
        c.machine(to).volumes_on_disk(),
        std::slice::from_ref(&v.metadata.uid)
    );
    assert!(
        c.machine(other).volumes_on_disk().is_empty(),
        "{other} keeps no copy"
    );
    // Staging and move snapshots go right after the flip (asynchronously).
    for m in [to, other] {
        let pool = c.machine(m).pool.path().to_path_buf();
        let left = || {
            ["snapshots", "staging"]
                .iter()
                .flat_map(|d| std::fs::read_dir(pool.join(d)).into_iter().flatten())
                .filter_map(|e| e.ok().map(|e| e.path().display().to_string()))
                .collect::<Vec<_>>()
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !left().is_empty() {
            assert!(Instant::now() < end, "{m} has left over: {:?}", left());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    v
}

fn restart(c: &mut Cluster, machine: &str) {
    let etcd = c.etcd.endpoints()[0].clone();
    c.machine(machine).start_agent(&etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_survives_kill_9_of_either_agent_at_each_stage() {
    let mut c = Cluster::start_with_agent_args("binpack", &["--move-rate-limit", "8Mi"]).await;
    c.machines_ready(3).await;
    let data = volume_with_data(&mut c, "m1").await;
    // (kill the source or the target, at which point of the move)
    let plan: [(&str, &str); 5] = [
        ("source", "Seeding"),
        ("target", "Seeding"),
        ("target", "CuttingOver"),
        ("source", "CuttingOver"),
        ("source", "CleaningUp"),
    ];
    let (mut from, mut to) = ("m1", "m2");
    for (who, stage) in plan {
        request_move(&mut c, to).await;
        let wanted = match stage {
            "Seeding" => MoveStage::Seeding,
            "CuttingOver" => MoveStage::CuttingOver,
            _ => MoveStage::CleaningUp,
        };
        move_reaches(&c, stage, Duration::from_secs(60), |m| {
            m.stage == wanted && (wanted != MoveStage::Seeding || m.bytes_done > 0)
        })
        .await;
        let victim = if who == "source" { from } else { to };
        c.machine(victim).kill_agent();
        let at = c
            .store
            .get::<Volume>("data")
            .await
            .unwrap()
            .and_then(|v| v.moving().map(|m| m.stage));
        eprintln!("{from} → {to}: killed the {who} ({victim}) at {stage}; the move was at {at:?}");
        if who == "source" && stage == "Seeding" {
            // The target cannot reach it: the move says so and waits.
            let m = move_reaches(&c, "a stall reported", Duration::from_secs(60), |m| {
                m.stalled.is_some()
            })
            .await;
            assert!(
                m.stalled.unwrap().contains(victim),
                "the stall names the source"
            );
            assert_eq!(
                c.machine(from).volumes_on_disk().len(),
                1,
                "the source's copy is kept while it is away"
            );
        }
        restart(&mut c, victim);
        settled_on(&mut c, to, from, &data).await;
        (from, to) = (to, from);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_waits_for_room_can_be_cancelled_and_outlives_the_leader_and_etcd() {
    let mut c = Cluster::start_with_agent_args("binpack", &["--move-rate-limit", "8Mi"]).await;
    c.machines_ready(3).await;
    let data = volume_with_data(&mut c, "m1").await;
    let client = c.client.addr.to_string();

    // No room on m3: the move waits, the volume stays Ready on m1, nothing is made on m3.
    c.apply_text(&yaml("filler", "900Mi", "m3", &client)).await;
    until("the filler bound", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("filler").await.ok()??;
        (v.status?.phase == VolumePhase::Ready).then_some(())
    })
    .await;
    request_move(&mut c, "m3").await;
    let waiting = until("the move held back", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("data").await.ok()??;
        let s = v.status.as_ref()?;
        let m = cobalt_api::find_condition(&s.conditions, "Moving")?;
        (m.reason == "InsufficientCapacity").then(|| (s.clone(), m.message.clone()))
    })
    .await;
    assert_eq!(waiting.0.machine.as_deref(), Some("m1"));
    assert_eq!(
        waiting.0.phase,
        VolumePhase::Ready,
        "still served where it is"
    );
    assert!(waiting.0.move_.is_none());
    assert!(
        waiting.1.contains("m3") && waiting.1.contains("missing"),
        "{}",
        waiting.1
    );
    assert_eq!(
        c.machine("m3").volumes_on_disk().len(),
        1,
        "only the filler on m3"
    );
    // Room appears: the move starts by itself.
    let o = c
        .ctl(&["delete", "volume", "filler", "--wait", "--timeout=60s"])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    settled_on(&mut c, "m3", "m1", &data).await;

    // Cancelled half-way: spec.machine back to m3 while seeding to m1.
    request_move(&mut c, "m1").await;
    move_reaches(&c, "seeding to m1", Duration::from_secs(60), |m| {
        m.to == "m1" && m.bytes_done > 0 && m.stage == MoveStage::Seeding
    })
    .await;
    // While it streams, nobody without this move's credential gets a byte from the source.
    let v: Volume = c.store.get("data").await.unwrap().unwrap();
    let url = format!(
        "http://{}:7421/v1/moves/data/stream?uid={}",
        c.machine("m3").host.addr,
        v.metadata.uid
    );
    let http = reqwest::Client::new();
    for (auth, code) in [(None, 401), (Some("Bearer not-the-credential"), 403)] {
        let mut r = http.get(&url);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), code, "{auth:?}");
        let body = resp.bytes().await.unwrap();
        assert!(
            !body.starts_with(b"btrfs-stream"),
            "no volume data without the credential"
        );
    }
    request_move(&mut c, "m3").await;
    let v = settled_on(&mut c, "m3", "m1", &data).await;
    assert!(v.status.as_ref().unwrap().last_move.as_ref().unwrap().to == "m3");

    // The scheduler leader dies mid-move: the agents carry on.
    request_move(&mut c, "m2").await;
    move_reaches(&c, "seeding to m2", Duration::from_secs(60), |m| {
        m.bytes_done > 0
    })
    .await;
    let index = c.leader_index().await;
    c.controllers[index].0.kill();
    settled_on(&mut c, "m2", "m3", &data).await;

    // etcd goes away mid-move: the move pauses, nothing is deleted; it finishes when etcd is back.
    request_move(&mut c, "m1").await;
    move_reaches(&c, "seeding to m1", Duration::from_secs(60), |m| {
        m.to == "m1" && m.bytes_done > 0
    })
    .await;
    c.etcd.stop();
    let target_log = || c.machines[0].agent_log();
    until(
        "the target notices etcd is gone",
        Duration::from_secs(60),
        || async { target_log().contains("move stalled").then_some(()) },
    )
    .await;
    assert_eq!(
        c.machine("m2").volumes_on_disk().len(),
        1,
        "the source keeps its copy"
    );
    c.etcd.start_again();
    settled_on(&mut c, "m1", "m2", &data).await;
}

/// Seeding a clone on another machine is a data-moving step too: kill -9 of the target while
/// it receives, then of the source while it sends — each time the clone is made whole after the
/// agent returns, the source is untouched, and no staging or seed snapshot is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_seed_survives_kill_9_of_either_agent() {
    let mut c = Cluster::start_with_agent_args("binpack", &["--move-rate-limit", "8Mi"]).await;
    c.machines_ready(3).await;
    let data = volume_with_data(&mut c, "m1").await;
    let client = c.client.addr.to_string();
    let src: Volume = c.store.get("data").await.unwrap().unwrap();
    for (i, victim) in ["m2", "m1"].iter().enumerate() {
        let name = format!("copy{i}");
        c.apply_text(
            &format!(
                "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: 128Mi\n  source: {{volume: data}}\n  machine: m2\n  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
            ),
        )
        .await;
        let staging = c.machine("m2").pool.path().join("staging");
        until("the seed under way", Duration::from_secs(60), || async {
            let v: Volume = c.store.get(&name).await.ok()??;
            let seeding = v.status.as_ref()?.clone_seed.is_some();
            let receiving = std::fs::read_dir(staging.join(&v.metadata.uid))
                .is_ok_and(|mut d| d.next().is_some());
            (seeding && receiving).then_some(())
        })
        .await;
        c.machine(victim).kill_agent();
        restart(&mut c, victim);
        let v = until("the clone Ready", Duration::from_secs(90), || async {
            let v: Volume = c.store.get(&name).await.ok()??;
            let s = v.status.as_ref()?;
            (s.phase == VolumePhase::Ready && s.endpoint.is_some()).then_some(v)
        })
        .await;
        assert_eq!(v.status.as_ref().unwrap().machine.as_deref(), Some("m2"));
        assert!(
            c.nfs_read(&server_of(&v), &format!("{name}/data.bin"))
                .unwrap()
                == data,
            "{name} is a whole copy after {victim} was killed mid-seed"
        );
        let s: Volume = c.store.get("data").await.unwrap().unwrap();
        assert!(
            c.nfs_read(&server_of(&s), "data/data.bin").unwrap() == data,
            "the source is intact"
        );
        let m2_staging = c.machine("m2").pool.path().join("staging");
        let m1_snapshots = c
            .machine("m1")
            .pool
            .path()
            .join("snapshots")
            .join(&src.metadata.uid);
        let count = |d: &std::path::Path| std::fs::read_dir(d).map(|d| d.count()).unwrap_or(0);
        let end = Instant::now() + Duration::from_secs(20);
        while count(&m2_staging) > 0 || count(&m1_snapshots) > 0 {
            assert!(Instant::now() < end, "staging or a seed snapshot left over");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a create on `machine` that crashed before publishing leaves: the volume's data made on
/// the pool (with a file nobody was given), no `status.machine` pointing at it. Planted with
/// the agent down, through the backend the agent uses.
fn plant_stale_copy(c: &mut Cluster, machine: &str, uid: &str) {
    use cobalt_agent::backend::{btrfs::BtrfsBackend, Backend, VolumeRecord};
    let b = BtrfsBackend::open(c.machine(machine).pool.path()).unwrap();
    b.create(&VolumeRecord {
        uid: uid.into(),
        name: "data".into(),
        size_bytes: 128 << 20,
        compression: Default::default(),
    })
    .unwrap();
    std::fs::write(b.path(uid).join("stale.bin"), b"never published").unwrap();
}

async fn stale_copy_gone(c: &mut Cluster, machine: &str) {
    let pool = c.machine(machine).pool.path().to_path_buf();
    until(
        &format!("the stale copy on {machine} destroyed"),
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                use cobalt_agent::backend::{btrfs::BtrfsBackend, Backend};
                let b = BtrfsBackend::open(&pool).ok()?;
                b.list().ok()?.is_empty().then_some(())
            }
        },
    )
    .await;
}

/// A crash between making a volume's data and publishing it (`status.machine`) leaves a copy
/// no client was given — say a create on m2 whose agent died, the volume then rebound to m1
/// while m2 was gone. When m2 comes back, a fresh read shows the data served by m1 and the copy
/// is destroyed: at start-up (also when the agent is killed -9 around that step, then started
/// again), and before the cut-over of a move to m2, which otherwise would take the stale copy
/// for its own promoted one and serve it — losing the volume's real data. Throughout, the data
/// served by m1 stays byte-identical. A copy the machine once published is never destroyed
/// this way, even when etcd (restored from an old backup, say) names another machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_left_by_a_crash_is_destroyed_and_never_served() {
    let mut c = Cluster::start_with_agent_args("binpack", &["--move-rate-limit", "8Mi"]).await;
    c.machines_ready(3).await;
    let data = volume_with_data(&mut c, "m1").await;
    let v: Volume = c.store.get("data").await.unwrap().unwrap();
    let uid = v.metadata.uid.clone();
    let server = server_of(&v);

    // Swept at start-up; the first start is killed -9 as soon as it runs.
    c.machine("m2").kill_agent();
    plant_stale_copy(&mut c, "m2", &uid);
    restart(&mut c, "m2");
    until("m2's agent running", Duration::from_secs(30), || {
        let log = c.machine("m2").agent_log();
        async move { log.contains("agent running").then_some(()) }
    })
    .await;
    c.machine("m2").kill_agent();
    assert_eq!(c.nfs_read(&server, "data/data.bin").unwrap(), data);
    restart(&mut c, "m2");
    stale_copy_gone(&mut c, "m2").await;
    assert_eq!(
        c.machine("m1").volumes_on_disk(),
        std::slice::from_ref(&uid)
    );
    assert_eq!(
        c.nfs_read(&server, "data/data.bin").unwrap(),
        data,
        "the served data is untouched"
    );

    // Planted again and a move to m2 asked for at once: whichever removes it first (the
    // sweep or the move's own check), the move carries the real data.
    c.machine("m2").kill_agent();
    plant_stale_copy(&mut c, "m2", &uid);
    restart(&mut c, "m2");
    request_move(&mut c, "m2").await;
    let v = settled_on(&mut c, "m2", "m1", &data).await;
    assert!(
        c.nfs_read(&server_of(&v), "data/stale.bin").is_err(),
        "the stale copy's file is not what m2 serves"
    );

    // etcd restored from a backup taken before the move says m1 serves the volume: m2's copy
    // looks stale by etcd alone, but m2 published it, so it is kept and named.
    let written = |c: &Cluster, machine: &'static str| {
        let store = c.store.clone();
        async move {
            store
                .update_status::<Volume, _>("data", |v| {
                    let mut s = v.status.clone()?;
                    s.machine = Some(machine.into());
                    s.move_ = None;
                    Some(s)
                })
                .await
                .unwrap();
        }
    };
    written(&c, "m1").await;
    c.machine("m2").kill_agent();
    restart(&mut c, "m2");
    until(
        "m2 says it keeps the copy it served",
        Duration::from_secs(60),
        || {
            let log = c.machine("m2").agent_log();
            async move { log.contains("that it once served").then_some(()) }
        },
    )
    .await;
    assert_eq!(
        c.machine("m2").volumes_on_disk(),
        std::slice::from_ref(&uid)
    );
    let on_pool = {
        use cobalt_agent::backend::{btrfs::BtrfsBackend, Backend};
        BtrfsBackend::open(c.machine("m2").pool.path())
            .unwrap()
            .path(&uid)
    };
    assert_eq!(
        std::fs::read(on_pool.join("data.bin")).unwrap(),
        data,
        "the copy m2 served is intact"
    );
    // Put right, it is served again.
    written(&c, "m2").await;
    c.machine("m2").kill_agent();
    restart(&mut c, "m2");
    settled_on(&mut c, "m2", "m1", &data).await;
}
