//! Least privilege for storage machines, set up as docs/operations.md "Least privilege for
//! agents" says: etcd with client certificates and authentication on (users and roles made by
//! `scripts/etcd-auth.sh`), the controllers' API with a machine token per agent, and each agent
//! configured with `api:` so its object and status writes go through the API.
//!
//! Two agents under those credentials register, provision a volume, take a snapshot, move the
//! volume from one to the other (the target's transfer credential written through the API, the
//! source serving it), seed a clone across machines, and free both when deleted. With one
//! agent's own credentials — its etcd certificate and its API token — every write that would
//! change what users declared or touch another machine fails, and nothing of it is written.
//! With no controller answering in the middle of a move, nothing is lost and the move finishes
//! once one is back.

use std::time::Duration;

use cobalt_api::{Snapshot, Volume};
use cobalt_e2e::out;
use cobalt_e2e::secured::{index_of, other, store_as, token_of, Secured, PREFIX};
use cobalt_testkit::wait::until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_machine_credentials_run_their_volumes_and_cannot_change_what_users_declared() {
    let c = Secured::start("").await;
    // A volume provisioned: the agent's finalizer and status went through the API.
    c.apply("db", "  size: 32Mi\n").await;
    let db = c.wait_ready("db").await;
    assert!(db
        .metadata
        .finalizers
        .iter()
        .any(|f| f == "cobalt.io/agent"));
    let from = db.status.as_ref().unwrap().machine.clone().unwrap();
    let to = other(&from);
    let uid = db.metadata.uid.to_string();
    std::fs::write(
        c.on_disk(index_of(&from), &uid).join("data.txt"),
        b"written before the move",
    )
    .unwrap();

    // With the holder's own etcd user: nothing users declared, nothing of another machine.
    let holder = store_as(&c.etcd, &c.certs, &format!("cobalt-machine-{from}")).await;
    let mut kv = holder.raw();
    let denied = |r: Result<(), etcd_client::Error>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: etcd allowed it"));
        assert!(e.to_string().contains("permission denied"), "{what}: {e}");
    };
    for (key, what) in [
        (format!("{PREFIX}/volumes/db/object"), "a Volume's spec"),
        (
            format!("{PREFIX}/volumes/db/status"),
            "a status straight into etcd",
        ),
        (
            format!("{PREFIX}/machines/{to}/alive"),
            "another machine's liveness",
        ),
        (format!("{PREFIX}/machines/{to}/object"), "another Machine"),
        (
            format!("{PREFIX}/views/{to}/volumes/db/status"),
            "another machine's view",
        ),
    ] {
        denied(kv.put(key, "{}", None).await.map(|_| ()), what);
    }
    denied(
        kv.delete(format!("{PREFIX}/volumes/db/object"), None)
            .await
            .map(|_| ()),
        "deleting a Volume",
    );
    // The typed store says so in words.
    let mut bigger = db.clone();
    bigger.spec.size = "1Gi".parse().unwrap();
    let err = holder.replace(&bigger).await.unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");

    // With the holder's API token: the same.
    let http = reqwest::Client::new();
    let api = |path: &str| format!("{}/apis/cobalt.io/v1alpha1/{path}", c.server);
    let mut body = serde_json::to_value(&bigger).unwrap();
    body["metadata"]["resourceVersion"] = db.metadata.resource_version.to_string().into();
    for (request, what) in [
        (http.put(api("volumes/db")).json(&body), "a spec change"),
        (http.delete(api("volumes/db")), "a delete"),
    ] {
        let r = request.bearer_auth(token_of(&from)).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN, "{what}");
    }
    let still: Volume = c.admin.get("db").await.unwrap().unwrap();
    assert_eq!(
        still.spec.size.bytes(),
        32 << 20,
        "nothing refused was written"
    );
    assert!(!still.metadata.is_deleting());

    // A snapshot: its finalizer and status through the API.
    let o = c
        .ctl(&["snapshot", "volume/db", "--name", "db-s", "--wait"])
        .await;
    assert!(o.status.success(), "{}\n{}", out(&o), c.logs());
    let o = c.ctl(&["delete", "snapshot", "db-s"]).await;
    assert!(o.status.success(), "{}", out(&o));
    until("the snapshot freed", Duration::from_secs(60), || async {
        c.admin
            .get::<Snapshot>("db-s")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // A move: the target writes its transfer credential through the API (only the target may),
    // the source checks it and streams; the data arrives.
    let o = c.ctl(&["move", "volume/db", "--to", to]).await;
    assert!(o.status.success(), "{}", out(&o));
    let moved = c.served_on("db", to, Duration::from_secs(120)).await;
    assert!(moved.status.unwrap().last_move.is_some());
    assert_eq!(
        std::fs::read(c.on_disk(index_of(to), &uid).join("data.txt")).unwrap(),
        b"written before the move"
    );

    // A clone kept away from its source's machine is seeded from it: the clone's machine writes
    // the seed's credential through the API, the source's machine serves it.
    let zone = if from == "m1" { "a" } else { "b" };
    c.apply(
        "db-copy",
        &format!(
            "  size: 32Mi\n  source: {{volume: db}}\n  placement: {{selector: {{zone: {zone}}}}}\n"
        ),
    )
    .await;
    let copy = c.wait_ready("db-copy").await;
    assert_eq!(
        copy.status.as_ref().unwrap().machine.as_deref(),
        Some(from.as_str())
    );
    assert_eq!(
        std::fs::read(
            c.on_disk(index_of(&from), &copy.metadata.uid)
                .join("data.txt")
        )
        .unwrap(),
        b"written before the move"
    );

    // Deleted: each holder frees the data and removes its finalizer through the API.
    for name in ["db-copy", "db"] {
        let o = c.ctl(&["delete", "volume", name]).await;
        assert!(o.status.success(), "{}", out(&o));
    }
    until("the volumes gone", Duration::from_secs(60), || async {
        let (all, _) = c.admin.list::<Volume>(&Default::default()).await.ok()?;
        all.is_empty().then_some(())
    })
    .await;
    assert!(!c.on_disk(index_of(to), &uid).exists(), "its data freed");
    assert!(!c.on_disk(index_of(&from), &copy.metadata.uid).exists());
}

/// Through the API, an agent's status writes need a controller to answer. With the only one
/// killed in the middle of a move, the agents keep the data where it is and wait: nothing is
/// lost, and the move finishes once a controller is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_controller_answering_a_move_waits_and_loses_nothing() {
    // 1 MiB/s: the move takes seconds, so the controller dies during it.
    let mut c = Secured::start("moves: {rateLimit: 1048576}\n").await;
    c.apply("db", "  size: 64Mi\n").await;
    let db = c.wait_ready("db").await;
    let from = db.status.as_ref().unwrap().machine.clone().unwrap();
    let to = other(&from);
    let uid = db.metadata.uid.to_string();
    let data = cobalt_testkit::nfs::pattern(7, 6 << 20);
    std::fs::write(c.on_disk(index_of(&from), &uid).join("data.bin"), &data).unwrap();

    let o = c.ctl(&["move", "volume/db", "--to", to]).await;
    assert!(o.status.success(), "{}", out(&o));
    until("the stream under way", Duration::from_secs(60), || async {
        let v: Volume = c.admin.get("db").await.ok()??;
        let m = v.status.as_ref()?.move_.as_ref()?;
        (m.bytes_done > 0).then_some(())
    })
    .await;
    c.controller.take().unwrap().kill();
    let target = index_of(to);
    until(
        "the target waiting for the API",
        Duration::from_secs(60),
        || async {
            c.agents[target]
                .daemon
                .log()
                .contains("did not answer")
                .then_some(())
        },
    )
    .await;
    // Meanwhile the data stays served where it was.
    let v: Volume = c.admin.get("db").await.unwrap().unwrap();
    assert_eq!(
        v.status.as_ref().unwrap().machine.as_deref(),
        Some(from.as_str())
    );
    assert_eq!(
        std::fs::read(c.on_disk(index_of(&from), &uid).join("data.bin")).unwrap(),
        data
    );

    c.start_controller();
    c.served_on("db", to, Duration::from_secs(120)).await;
    assert_eq!(
        std::fs::read(c.on_disk(target, &uid).join("data.bin")).unwrap(),
        data,
        "the data arrived whole"
    );
}
