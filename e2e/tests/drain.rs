//! Cordon, drain, decommission and rebalance on the real three-machine cluster: volumes with
//! data served over NFS leave a drained machine with their data, a machine that still holds
//! volumes cannot be deleted and an empty one can, a drain that cannot finish says why, the
//! leader dying mid-drain changes nothing, and a lopsided cluster evens out by itself.

use std::time::Duration;

use cobalt_api::{find_condition, Machine, Volume, VolumePhase};
use cobalt_e2e::{out, server_of, Cluster};
use cobalt_testkit::wait::until;

fn yaml(name: &str, size: &str, extra: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: {size}\n{extra}  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
    )
}

fn holder(v: &Volume) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.machine.clone())
        .unwrap_or_default()
        .to_string()
}

async fn settled(c: &Cluster, name: &str) -> Volume {
    until(
        &format!("{name} settled"),
        Duration::from_secs(90),
        || async {
            let v: Volume = c.store.get(name).await.ok()??;
            let s = v.status.as_ref()?;
            (s.move_.is_none()
                && s.phase == VolumePhase::Ready
                && s.machine == v.spec.machine
                && s.endpoint.is_some())
            .then_some(v)
        },
    )
    .await
}

fn last_applied(v: &Volume) -> Option<String> {
    v.metadata
        .annotations
        .get(cobalt_api::LAST_APPLIED)
        .map(|a| a.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_machine_gives_up_its_volumes_with_their_data_and_can_then_be_deleted() {
    let mut c = Cluster::start("binpack").await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    // Binpack puts them all on one ssd machine; one is pinned there by the user.
    let mut data = Vec::new();
    let mut applied = Vec::new();
    for (i, name) in ["d1", "d2", "d3"].iter().enumerate() {
        c.apply_text(&yaml(
            name,
            "64Mi",
            "  placement: {selector: {disk: ssd}}\n",
            &client,
        ))
        .await;
        let v = c.wait_ready(name, "60s").await;
        let bytes = cobalt_testkit::nfs::pattern(30 + i as u64, 2 << 20);
        c.nfs_write(&server_of(&v), &format!("{name}/data.bin"), &bytes)
            .unwrap();
        data.push((name.to_string(), bytes));
        applied.push(last_applied(&v).expect("apply records what it applied"));
    }
    let full = holder(&c.store.get::<Volume>("d1").await.unwrap().unwrap());
    let other_ssd = if full == "m1" { "m2" } else { "m1" };
    c.apply_text(&yaml(
        "pinned",
        "32Mi",
        &format!("  machine: {full}\n"),
        &client,
    ))
    .await;
    c.wait_ready("pinned", "60s").await;

    // It holds volumes: it cannot be deleted.
    let o = c.ctl(&["delete", "machine", &full]).await;
    assert!(!o.status.success());
    assert!(
        out(&o).contains("drain it first") && out(&o).contains("d1"),
        "{}",
        out(&o)
    );

    // The plan first: where each would go, what would block, and nothing changed.
    let o = c.ctl(&["drain", &full, "--dry-run"]).await;
    assert!(o.status.success(), "{}", out(&o));
    let text = out(&o);
    for name in ["d1", "d2", "d3"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains(other_ssd)),
            "{name}: {text}"
        );
    }
    assert!(text.contains("blocked: pinned"), "{text}");
    let m: Machine = c.store.get(&full).await.unwrap().unwrap();
    assert!(!m.spec.drain, "a dry run changes nothing");

    // Drain without --pinned: the pinned volume blocks it, with the reason; the others go.
    let o = c.ctl(&["drain", &full]).await;
    assert!(o.status.success(), "{}", out(&o));
    // The leader dies mid-drain: the other controller carries on from etcd.
    until("a move under way", Duration::from_secs(30), || async {
        let (vs, _) = c.store.list::<Volume>(&Default::default()).await.ok()?;
        vs.iter().any(|v| v.moving().is_some()).then_some(())
    })
    .await;
    let index = c.leader_index().await;
    c.controllers[index].0.kill();
    let blocked = until(
        "the drain blocked on the pinned volume",
        Duration::from_secs(120),
        || async {
            let m: Machine = c.store.get(&full).await.ok()??;
            let cond = find_condition(&m.status?.conditions, "Drained")?.clone();
            (cond.reason == "Blocked" && cond.message.starts_with("1 volume left"))
                .then_some(cond.message)
        },
    )
    .await;
    assert!(blocked.contains("pinned"), "{blocked}");
    for ((name, bytes), applied) in data.iter().zip(&applied) {
        let v = settled(&c, name).await;
        assert_ne!(holder(&v), full, "{name} left the drained machine");
        // The drain's writes start from the leader's cache, which leaves the last-applied
        // annotation out of bound volumes: the stored volume keeps it as apply wrote it.
        assert_eq!(
            last_applied(&v).as_ref(),
            Some(applied),
            "{name} keeps what apply recorded"
        );
        assert!(
            c.nfs_read(&server_of(&v), &format!("{name}/data.bin"))
                .unwrap()
                == *bytes,
            "{name}'s data"
        );
        assert!(
            v.metadata
                .annotations
                .get("cobalt.io/moved-by")
                .map(cobalt_api::Text::as_str)
                == Some("drain")
        );
    }
    // No new volume lands on a draining machine.
    c.apply_text(&yaml(
        "newcomer",
        "16Mi",
        "  placement: {selector: {disk: ssd}}\n",
        &client,
    ))
    .await;
    assert_eq!(holder(&c.wait_ready("newcomer", "60s").await), other_ssd);

    // --pinned moves the pinned one too and re-pins it where it goes.
    let o = c
        .ctl(&["drain", &full, "--pinned", "--wait", "--timeout", "120s"])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("drained"), "{}", out(&o));
    let pinned = settled(&c, "pinned").await;
    assert_ne!(holder(&pinned), full);
    assert!(
        !pinned
            .metadata
            .annotations
            .contains_key("cobalt.io/scheduled-by"),
        "still pinned"
    );
    assert!(
        c.machine(&full).volumes_on_disk().is_empty(),
        "the machine is empty"
    );

    // Empty: it can be deleted.
    let o = c.ctl(&["delete", "machine", &full]).await;
    assert!(o.status.success(), "{}", out(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lopsided_cluster_evens_out_by_itself() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    for m in ["m2", "m3"] {
        let o = c.ctl(&["cordon", m]).await;
        assert!(o.status.success(), "{}", out(&o));
    }
    for i in 0..4 {
        c.apply_text(&yaml(&format!("r{i}"), "96Mi", "", &client))
            .await;
    }
    for i in 0..4 {
        assert_eq!(holder(&c.wait_ready(&format!("r{i}"), "60s").await), "m1");
    }
    let v = c.store.get::<Volume>("r0").await.unwrap().unwrap();
    let bytes = cobalt_testkit::nfs::pattern(77, 1 << 20);
    c.nfs_write(&server_of(&v), "r0/data.bin", &bytes).unwrap();
    // Machines come in: the leader moves volumes to them until the spread is under 20 points.
    for m in ["m2", "m3"] {
        let o = c.ctl(&["uncordon", m]).await;
        assert!(o.status.success(), "{}", out(&o));
    }
    let spread = until(
        "the cluster evened out",
        Duration::from_secs(120),
        || async {
            let (vs, _) = c.store.list::<Volume>(&Default::default()).await.ok()?;
            if vs.iter().any(|v| {
                v.moving().is_some()
                    || v.status.as_ref().and_then(|s| s.machine.clone()) != v.spec.machine
            }) {
                return None;
            }
            let on = |m: &str| vs.iter().filter(|v| holder(v) == m).count();
            (on("m2") >= 1 && on("m3") >= 1).then(|| (on("m1"), on("m2"), on("m3")))
        },
    )
    .await;
    assert_eq!(spread, (2, 1, 1), "two moves, then balanced enough");
    let r0 = settled(&c, "r0").await;
    assert!(c.nfs_read(&server_of(&r0), "r0/data.bin").unwrap() == bytes);
    // Exactly the two moves it needed (that re-planning proposes nothing more is the
    // planner's property test).
    let (vs, _) = c.store.list::<Volume>(&Default::default()).await.unwrap();
    let moved = vs
        .iter()
        .filter(|v| {
            v.metadata
                .annotations
                .get("cobalt.io/moved-by")
                .map(cobalt_api::Text::as_str)
                == Some("rebalance")
        })
        .count();
    assert_eq!(moved, 2);
}

/// The seed's "grow beyond the machine": a resize its machine cannot grant moves the (unpinned)
/// volume to a machine where the grown size fits, and it grows there, data intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grow_that_does_not_fit_moves_the_volume_where_it_fits_then_grows_it() {
    let mut c = Cluster::start("binpack").await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    let ssd = "  placement: {selector: {disk: ssd}}\n";
    c.apply_text(&yaml("grower", "64Mi", ssd, &client)).await;
    let v = c.wait_ready("grower", "60s").await;
    let home = holder(&v);
    c.apply_text(&yaml(
        "filler",
        "600Mi",
        &format!("  machine: {home}\n"),
        &client,
    ))
    .await;
    c.wait_ready("filler", "60s").await;
    let bytes = cobalt_testkit::nfs::pattern(5, 3 << 20);
    c.nfs_write(&server_of(&v), "grower/data.bin", &bytes)
        .unwrap();
    // 600Mi + 400Mi does not fit the 1 GiB pool's 90 %.
    c.apply_text(&yaml("grower", "400Mi", ssd, &client)).await;
    let grown = until("grown elsewhere", Duration::from_secs(120), || async {
        let v: Volume = c.store.get("grower").await.ok()??;
        let s = v.status.as_ref()?;
        (s.machine.as_deref() != Some(home.as_str())
            && s.move_.is_none()
            && s.usage.as_ref()?.limit_bytes == 400 << 20
            && s.observed_generation == v.metadata.generation)
            .then_some(v)
    })
    .await;
    assert_eq!(
        grown
            .metadata
            .annotations
            .get("cobalt.io/moved-by")
            .map(cobalt_api::Text::as_str),
        Some("grow")
    );
    assert!(c.nfs_read(&server_of(&grown), "grower/data.bin").unwrap() == bytes);
    assert!(find_condition(
        &grown.status.as_ref().unwrap().conditions,
        "CapacityReserved"
    )
    .is_none());
}

/// A drain that cannot finish says why and moves nothing it cannot place: the volume stays
/// Ready where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_without_room_elsewhere_says_why_and_moves_nothing() {
    let mut c = Cluster::start("binpack").await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    c.apply_text(&yaml("big", "700Mi", "  machine: m1\n", &client))
        .await;
    c.wait_ready("big", "60s").await;
    for m in ["m2", "m3"] {
        c.apply_text(&yaml(
            &format!("fill-{m}"),
            "400Mi",
            &format!("  machine: {m}\n"),
            &client,
        ))
        .await;
        c.wait_ready(&format!("fill-{m}"), "60s").await;
    }
    let o = c.ctl(&["drain", "m1", "--pinned"]).await;
    assert!(o.status.success(), "{}", out(&o));
    let why = until("the drain blocked", Duration::from_secs(30), || async {
        let m: Machine = c.store.get("m1").await.ok()??;
        let cond = find_condition(&m.status?.conditions, "Drained")?.clone();
        (cond.reason == "Blocked").then_some(cond.message)
    })
    .await;
    assert!(
        why.contains("big") && why.contains("insufficient capacity"),
        "{why}"
    );
    let v: Volume = c.store.get("big").await.unwrap().unwrap();
    assert_eq!(
        v.spec.machine.as_deref(),
        Some("m1"),
        "nothing asked to move"
    );
    assert!(v.moving().is_none());
    assert_eq!(v.status.unwrap().phase, VolumePhase::Ready);
}
