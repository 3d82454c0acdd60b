//! The store against a real etcd: CAS semantics, spec/status separation, finalizers, watches
//! across restarts and compaction, TLS, outages, leases and fenced leadership.

use std::time::{Duration, Instant};

use cobalt_api::selector::LabelSelector;
use cobalt_api::{Volume, VolumePhase, VolumeSpec, VolumeStatus};
use cobalt_store::{Deleted, Error, EtcdConfig, Scope, Store, TlsFiles, WatchEvent};
use cobalt_testkit::certs::TestCerts;
use cobalt_testkit::etcd::Etcd;

fn volume(name: &str, size: &str) -> Volume {
    Volume::new(
        name,
        VolumeSpec {
            size: size.parse().unwrap(),
            ..Default::default()
        },
    )
}

fn phase(p: VolumePhase) -> VolumeStatus {
    VolumeStatus {
        phase: p,
        ..Default::default()
    }
}

#[tokio::test]
async fn create_sets_server_fields_and_a_second_create_is_already_exists() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let created = store.create(&volume("a", "1Gi")).await.unwrap();
    assert!(!created.metadata.uid.is_empty());
    assert_eq!(created.metadata.generation, 1);
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(created.metadata.revision() > 0);
    let again = store.create(&volume("a", "2Gi")).await.unwrap_err();
    assert!(matches!(again, Error::AlreadyExists { .. }), "{again}");
    let read: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(read, created);
}

#[tokio::test]
async fn stale_resource_version_is_rejected_with_conflict() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let v1 = store.create(&volume("a", "1Gi")).await.unwrap();
    let mut first = v1.clone();
    first.spec.size = "2Gi".parse().unwrap();
    let v2 = store.replace(&first).await.unwrap();
    assert_eq!(v2.metadata.generation, 2);

    let mut stale = v1.clone();
    stale.spec.size = "3Gi".parse().unwrap();
    let err = store.replace(&stale).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("read it again"), "{err}");
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        live.spec.size,
        "2Gi".parse().unwrap(),
        "the stale write must not land"
    );
}

#[tokio::test]
async fn generation_bumps_only_on_spec_change_and_an_unchanged_replace_writes_nothing() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let v1 = store.create(&volume("a", "1Gi")).await.unwrap();
    let mut labelled = v1.clone();
    labelled
        .metadata
        .labels
        .insert("team".into(), "media".into());
    let v2 = store.replace(&labelled).await.unwrap();
    assert_eq!(
        v2.metadata.generation, 1,
        "a label change is not a spec change"
    );

    let before = store.revision().await.unwrap();
    let same = store.replace(&v2).await.unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "unchanged replace must not write"
    );
    assert_eq!(same.metadata.resource_version, v2.metadata.resource_version);
}

#[tokio::test]
async fn spec_writer_and_status_writer_never_conflict() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let v = store.create(&volume("a", "1Gi")).await.unwrap();
    // The agent writes status after the user read the object...
    let update = store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    assert!(update.written.is_some());
    // ...and the user's replace with the resourceVersion they read still succeeds.
    let mut edited = v.clone();
    edited.spec.size = "5Gi".parse().unwrap();
    let replaced = store.replace(&edited).await.unwrap();
    assert_eq!(replaced.status.unwrap().phase, VolumePhase::Ready);
    // And a status write after the spec change needs no fresh resourceVersion either.
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Deleting)))
        .await
        .unwrap();
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(live.spec.size, "5Gi".parse().unwrap());
    assert_eq!(live.status.unwrap().phase, VolumePhase::Deleting);
}

#[tokio::test]
async fn replace_with_status_writes_spec_and_status_in_one_revision_or_not_at_all() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let v = store.create(&volume("a", "1Gi")).await.unwrap();
    let mut bound = v.clone();
    bound.spec.machine = Some("m1".into());
    let before = store.revision().await.unwrap();
    let written = store
        .replace_with_status(&bound, |_| phase(VolumePhase::Scheduled))
        .await
        .unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        before + 1,
        "spec and status must land in one transaction"
    );
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(live.spec.machine.as_deref(), Some("m1"));
    assert_eq!(live.status.unwrap().phase, VolumePhase::Scheduled);
    assert_eq!(
        written.metadata.resource_version,
        live.metadata.resource_version
    );

    // The status is computed from what is stored at write time (here: another writer's Ready).
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    let mut labelled = written.clone();
    labelled.metadata.labels.insert("team".into(), "a".into());
    let seen = store
        .replace_with_status(&labelled, |v: &Volume| {
            v.status.clone().expect("the stored status is passed in")
        })
        .await
        .unwrap();
    assert_eq!(seen.status.unwrap().phase, VolumePhase::Ready);

    // A stale resourceVersion is a conflict, and neither half lands.
    let mut stale = written.clone();
    stale.spec.machine = Some("m2".into());
    let err = store
        .replace_with_status(&stale, |_| phase(VolumePhase::Lost))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(live.spec.machine.as_deref(), Some("m1"));
    assert_eq!(live.status.unwrap().phase, VolumePhase::Ready);
}

#[tokio::test]
async fn a_status_write_from_a_cached_object_lands_and_falls_back_when_the_cache_is_stale() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let seen = store.create(&volume("a", "1Gi")).await.unwrap();
    // Current: written in one transaction.
    let before = store.revision().await.unwrap();
    let first = store
        .update_status_from(&seen, |_| Some(phase(VolumePhase::Scheduled)))
        .await
        .unwrap();
    assert_eq!(first.written, Some(before + 1));
    // Stale status (another writer since `seen`): the change is computed again from what is
    // stored, so the other writer's status is not lost.
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    let mut calls = Vec::new();
    store
        .update_status_from(&first.object, |v: &Volume| {
            calls.push(v.status.as_ref().map(|s| s.phase));
            let mut s = v.status.clone().unwrap_or_default();
            s.observed_generation = 7;
            Some(s)
        })
        .await
        .unwrap();
    assert_eq!(
        calls,
        vec![Some(VolumePhase::Scheduled), Some(VolumePhase::Ready)],
        "tried on the cached object, then on the stored one"
    );
    let live: Volume = store.get("a").await.unwrap().unwrap();
    let status = live.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.observed_generation),
        (VolumePhase::Ready, 7)
    );
    // Stale spec: falls back as well.
    let mut edited = live.clone();
    edited.spec.size = "2Gi".parse().unwrap();
    store.replace(&edited).await.unwrap();
    let update = store
        .update_status_from(&live, |_| Some(phase(VolumePhase::Deleting)))
        .await
        .unwrap();
    assert_eq!(update.object.spec.size, "2Gi".parse().unwrap());
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(live.status.unwrap().phase, VolumePhase::Deleting);
}

#[tokio::test]
async fn replace_with_status_from_a_cached_object_lands_and_still_refuses_a_stale_edit() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let seen = store.create(&volume("a", "1Gi")).await.unwrap();
    let mut bound = seen.clone();
    bound.spec.machine = Some("m1".into());
    let before = store.revision().await.unwrap();
    let written = store
        .replace_with_status_from(&seen, &bound, |_| phase(VolumePhase::Scheduled))
        .await
        .unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        before + 1,
        "one transaction"
    );
    assert_eq!(
        written.metadata.generation, 2,
        "a spec change bumps the generation"
    );
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        live.metadata.resource_version,
        written.metadata.resource_version
    );
    assert_eq!(live.metadata.uid, seen.metadata.uid);
    assert_eq!(live.status.clone().unwrap().phase, VolumePhase::Scheduled);

    // A status written since `seen`: the cached attempt fails, the fallback computes from the
    // stored status and lands.
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    let mut labelled = live.clone();
    labelled.metadata.labels.insert("team".into(), "a".into());
    let out = store
        .replace_with_status_from(&live, &labelled, |v: &Volume| {
            v.status.clone().unwrap_or_default()
        })
        .await
        .unwrap();
    assert_eq!(out.status.unwrap().phase, VolumePhase::Ready);

    // A stale edit is still a conflict and writes nothing.
    let mut stale = live.clone();
    stale.spec.machine = Some("m2".into());
    let err = store
        .replace_with_status_from(&live, &stale, |_| phase(VolumePhase::Lost))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let after: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(after.spec.machine.as_deref(), Some("m1"));
    assert_eq!(after.status.unwrap().phase, VolumePhase::Ready);
}

#[tokio::test]
async fn a_status_write_that_changes_nothing_writes_nothing() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(&volume("a", "1Gi")).await.unwrap();
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    let before = store.revision().await.unwrap();
    let again = store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    assert_eq!(again.written, None);
    assert_eq!(store.revision().await.unwrap(), before);
}

#[tokio::test]
async fn concurrent_status_writers_both_land_through_retries() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(&volume("a", "1Gi")).await.unwrap();
    let bump = |s: Store| async move {
        for _ in 0..10 {
            s.update_status::<Volume, _>("a", |v| {
                let mut st = v.status.clone().unwrap_or_default();
                st.observed_generation += 1;
                Some(st)
            })
            .await
            .unwrap();
        }
    };
    tokio::join!(bump(store.clone()), bump(store.clone()));
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        live.status.unwrap().observed_generation,
        20,
        "no increment may be lost"
    );
}

#[tokio::test]
async fn list_filters_by_label_and_pages_through_many_objects() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let creates = (0..620).map(|i| {
        let store = store.clone();
        async move {
            let mut v = volume(&format!("v{i:04}"), "1Gi");
            if i % 2 == 0 {
                v.metadata.labels.insert("tier".into(), "hot".into());
            }
            store.create(&v).await.unwrap();
        }
    });
    futures_join_all(creates).await;
    let (all, revision) = store
        .list::<Volume>(&LabelSelector::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 620);
    assert!(all
        .windows(2)
        .all(|w| w[0].metadata.name < w[1].metadata.name));
    assert!(revision >= all.iter().map(|v| v.metadata.revision()).max().unwrap());
    let hot: LabelSelector = "tier=hot".parse().unwrap();
    assert_eq!(store.list::<Volume>(&hot).await.unwrap().0.len(), 310);
}

/// A watch resumed at a past revision reads the state at that revision first; with more
/// objects than fit one gRPC message (4 MiB) it still starts — read page by page, each status
/// on its object even where a page ends between them.
#[tokio::test]
async fn a_watch_resumed_over_more_than_a_grpc_message_of_objects_starts_and_keeps_statuses() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let n = 620;
    let filler = "x".repeat(8 << 10);
    let creates = (0..n).map(|i| {
        let (store, filler) = (store.clone(), filler.clone());
        async move {
            let mut v = volume(&format!("v{i:04}"), "1Gi");
            v.metadata.annotations.insert("note".into(), filler);
            let v = store.create(&v).await.unwrap();
            store
                .update_status_from(&v, |_| Some(phase(VolumePhase::Ready)))
                .await
                .unwrap();
        }
    });
    futures_join_all(creates).await;
    let (all, revision) = store
        .list::<Volume>(&LabelSelector::default())
        .await
        .unwrap();
    assert!(
        all.len() * filler.len() > 4 << 20,
        "more than one gRPC message"
    );
    assert!(
        all.iter()
            .all(|v| v.status.as_ref().map(|s| s.phase) == Some(VolumePhase::Ready)),
        "every listed volume has its status"
    );
    store
        .update_status::<Volume, _>("v0007", |_| Some(phase(VolumePhase::Failed)))
        .await
        .unwrap();
    let mut watch = store.watch::<Volume>(revision).await.unwrap();
    assert_eq!(watch.objects().count(), n);
    assert!(watch.objects().all(|v| v.status.is_some()));
    match tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
    {
        WatchEvent::Modified { object, .. } => {
            assert_eq!(object.metadata.name, "v0007");
            assert_eq!(object.status.as_ref().unwrap().phase, VolumePhase::Failed);
            assert_eq!(object.metadata.annotations["note"].len(), filler.len());
        }
        other => panic!("expected the status change, got {other:?}"),
    }
}

/// Runs the futures with bounded fan-out, gentle on a 2-core machine.
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    use futures::StreamExt;
    futures::stream::iter(futs)
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test]
async fn delete_waits_for_finalizers() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let mut v = volume("a", "1Gi");
    v.metadata.finalizers = vec!["cobalt.io/agent".into()];
    store.create(&v).await.unwrap();
    let pending = store.delete::<Volume>("a", None).await.unwrap();
    let Deleted::Pending(marked) = pending else {
        panic!("expected Pending, got {pending:?}")
    };
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(
        store.get::<Volume>("a").await.unwrap().is_some(),
        "still there while finalized"
    );
    // Deleting again changes nothing.
    assert!(matches!(
        store.delete::<Volume>("a", None).await.unwrap(),
        Deleted::Pending(_)
    ));
    // The finalizer's owner removes it: the object goes.
    let mut done = marked.clone();
    done.metadata.finalizers.clear();
    store.replace(&done).await.unwrap();
    assert!(store.get::<Volume>("a").await.unwrap().is_none());
    let missing = store.delete::<Volume>("a", None).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }));
}

#[tokio::test]
async fn delete_without_finalizers_removes_object_and_status() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(&volume("a", "1Gi")).await.unwrap();
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    assert!(matches!(
        store.delete::<Volume>("a", None).await.unwrap(),
        Deleted::Gone(_)
    ));
    let mut kv = store.raw().kv_client();
    let left = kv
        .get(
            store.keys().object_dir("volumes", "a"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "no key of the object may remain");
}

/// Collects the (event kind, name, size or phase) of `n` non-progress events.
async fn take_events(watch: &mut cobalt_store::ResourceWatch<Volume>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "only got {out:?}");
        let event = match tokio::time::timeout(Duration::from_secs(20), watch.next()).await {
            Ok(Ok(e)) => e,
            Ok(Err(Error::Unavailable { .. })) => continue,
            other => panic!("watch failed: {other:?}"),
        };
        let describe = |o: &Volume| {
            let phase = o
                .status
                .as_ref()
                .map(|s| format!("{:?}", s.phase))
                .unwrap_or_default();
            format!("{}:{}:{}", o.metadata.name, o.spec.size, phase)
        };
        match event {
            WatchEvent::Added { object, .. } => out.push(format!("ADDED {}", describe(&object))),
            WatchEvent::Modified { object, .. } => {
                out.push(format!("MODIFIED {}", describe(&object)))
            }
            WatchEvent::Deleted { object, .. } => {
                out.push(format!("DELETED {}", describe(&object)))
            }
            WatchEvent::Progress { .. } => {}
        }
    }
    out
}

#[tokio::test]
async fn watcher_sees_every_change_exactly_once_in_order_across_an_etcd_restart() {
    let mut etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(&volume("before", "1Gi")).await.unwrap();
    let (items, mut watch) = store.list_and_watch::<Volume>().await.unwrap();
    assert_eq!(items.len(), 1);

    let v = store.create(&volume("a", "1Gi")).await.unwrap();
    store
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
        .await
        .unwrap();
    assert_eq!(
        take_events(&mut watch, 2).await,
        ["ADDED a:1Gi:", "MODIFIED a:1Gi:Ready"]
    );

    etcd.stop();
    // While etcd is down the watch reports it is unavailable, within its deadline.
    let down = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
    assert!(
        matches!(down, Ok(Err(Error::Unavailable { .. }))),
        "{down:?}"
    );
    etcd.start_again();

    // Changes made after the restart (and one made with a second client) still arrive, once.
    let store2 = etcd.store().await;
    let mut bigger = v.clone();
    bigger.spec.size = "2Gi".parse().unwrap();
    let bigger = loop {
        match store2.replace(&bigger).await {
            Ok(b) => break b,
            Err(e) if e.is_transient() => continue,
            Err(e) => panic!("{e}"),
        }
    };
    store2.create(&volume("b", "3Gi")).await.unwrap();
    store2
        .delete::<Volume>("a", Some(&bigger.metadata.resource_version))
        .await
        .unwrap();
    assert_eq!(
        take_events(&mut watch, 3).await,
        [
            "MODIFIED a:2Gi:Ready",
            "ADDED b:3Gi:",
            "DELETED a:2Gi:Ready"
        ]
    );
    assert!(watch.restarts() >= 1);
}

#[tokio::test]
async fn compaction_makes_the_watcher_relist_and_nothing_is_missed() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let (_, revision) = store
        .list::<Volume>(&LabelSelector::default())
        .await
        .unwrap();
    store.create(&volume("a", "1Gi")).await.unwrap();
    store.create(&volume("b", "1Gi")).await.unwrap();
    let now = store.revision().await.unwrap();
    store.compact(now).await.unwrap();

    // A watch starting before the compaction point cannot be served: the caller must relist.
    let err = match store.watch::<Volume>(revision).await {
        Err(e) => e,
        Ok(mut w) => w.next().await.unwrap_err(),
    };
    assert!(matches!(err, Error::Compacted { .. }), "{err}");
    let (relisted, rev) = store
        .list::<Volume>(&LabelSelector::default())
        .await
        .unwrap();
    let names: Vec<_> = relisted.iter().map(|v| v.metadata.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let mut watch = store.watch_after_list(&relisted, rev);
    store.create(&volume("c", "1Gi")).await.unwrap();
    assert_eq!(take_events(&mut watch, 1).await, ["ADDED c:1Gi:"]);
}

#[tokio::test]
async fn with_etcd_stopped_every_call_fails_within_its_deadline_with_a_clear_message() {
    let mut etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(&volume("a", "1Gi")).await.unwrap();
    etcd.stop();
    let deadline = store.request_timeout() + Duration::from_millis(500);
    let start = Instant::now();
    let err = store.get::<Volume>("a").await.unwrap_err();
    assert!(start.elapsed() < deadline, "took {:?}", start.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains(&etcd.endpoints()[0]),
        "message must name the endpoint: {msg}"
    );
    assert!(msg.contains("etcd"), "{msg}");
    for call in 0..3 {
        let start = Instant::now();
        let err = match call {
            0 => store
                .create(&volume("b", "1Gi"))
                .await
                .map(|_| ())
                .unwrap_err(),
            1 => store
                .list::<Volume>(&LabelSelector::default())
                .await
                .map(|_| ())
                .unwrap_err(),
            _ => store
                .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Ready)))
                .await
                .map(|_| ())
                .unwrap_err(),
        };
        assert!(err.is_transient(), "{err}");
        assert!(
            start.elapsed() < deadline,
            "call {call} took {:?}",
            start.elapsed()
        );
    }
    // A store connected while etcd is down works once it is back.
    let late = etcd.store().await;
    etcd.start_again();
    cobalt_testkit::wait::until(
        "the store to reach etcd again",
        Duration::from_secs(15),
        || async { late.get::<Volume>("a").await.ok().flatten() },
    )
    .await;
}

#[tokio::test]
async fn a_client_with_a_certificate_connects_to_tls_etcd_and_one_without_is_refused() {
    let certs = TestCerts::generate();
    let etcd = Etcd::start_tls(&certs);
    let mut config = EtcdConfig::new(etcd.endpoints());
    config.tls = Some(TlsFiles {
        ca: certs.path("ca.pem"),
        cert: Some(certs.path("client.pem")),
        key: Some(certs.path("client-key.pem")),
    });
    let store = Store::connect(&config).await.unwrap();
    store.create(&volume("secure", "1Gi")).await.unwrap();
    assert!(store.get::<Volume>("secure").await.unwrap().is_some());

    config.tls.as_mut().unwrap().cert = None;
    config.tls.as_mut().unwrap().key = None;
    let anonymous = Store::connect(&config).await.unwrap();
    let err = anonymous.get::<Volume>("secure").await.unwrap_err();
    assert!(err.is_transient(), "{err}");

    config.tls = None;
    let plain = Store::connect(&config).await;
    let refused = match plain {
        Err(e) => e,
        Ok(s) => s.get::<Volume>("secure").await.unwrap_err(),
    };
    assert!(!refused.to_string().is_empty());
}

#[tokio::test]
async fn a_deposed_leaders_fenced_write_fails() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(&volume("a", "1Gi")).await.unwrap();

    let lease1 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
    let leader1 = store
        .campaign("scheduler", "controller-1", &lease1)
        .await
        .unwrap();
    let fenced1 = store.fenced(leader1.fence());
    fenced1
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Scheduled)))
        .await
        .unwrap();
    assert_eq!(
        store.leader("scheduler").await.unwrap().as_deref(),
        Some("controller-1")
    );

    // A second candidate waits; when the first's lease is revoked (its process died) it wins.
    let lease2 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
    let contender = {
        let store = store.clone();
        tokio::spawn(async move {
            let leadership = store
                .campaign("scheduler", "controller-2", &lease2)
                .await
                .unwrap();
            (leadership, lease2)
        })
    };
    lease1.revoke().await.unwrap();
    let (leader2, _lease2) = tokio::time::timeout(Duration::from_secs(10), contender)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.leader("scheduler").await.unwrap().as_deref(),
        Some("controller-2")
    );

    // The old leader has not noticed; its writes are refused all the same.
    let err = fenced1
        .update_status::<Volume, _>("a", |_| Some(phase(VolumePhase::Failed)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    let mut spec_change: Volume = store.get("a").await.unwrap().unwrap();
    spec_change.spec.machine = Some("node-1".into());
    assert!(matches!(
        fenced1.replace(&spec_change).await.unwrap_err(),
        Error::Fenced { .. }
    ));
    assert!(matches!(
        fenced1.create(&volume("x", "1Gi")).await.unwrap_err(),
        Error::Fenced { .. }
    ));

    // The new leader writes fine; a plain conflict under a valid fence is still a Conflict.
    let fenced2 = store.fenced(leader2.fence());
    let bound = fenced2.replace(&spec_change).await.unwrap();
    assert_eq!(bound.spec.machine.as_deref(), Some("node-1"));
    assert!(matches!(
        fenced2.replace(&spec_change).await.unwrap_err(),
        Error::Conflict { .. }
    ));
    let live: Volume = store.get("a").await.unwrap().unwrap();
    assert_eq!(live.status.unwrap().phase, VolumePhase::Scheduled);
    leader2.resign().await.unwrap();
    assert_eq!(store.leader("scheduler").await.unwrap(), None);
}

#[tokio::test]
async fn keys_attached_to_a_lease_vanish_when_it_is_revoked_or_expires() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let alive = store.keys().alive("node-1");
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    lease.put_attached(&alive, "node-1").await.unwrap();
    let mut kv = store.raw().kv_client();
    assert_eq!(kv.get(alive.clone(), None).await.unwrap().kvs().len(), 1);
    // Kept alive past several TTLs while its holder lives.
    let held_until = Instant::now() + Duration::from_secs(3);
    cobalt_testkit::wait::until(
        "three seconds of keepalives",
        Duration::from_secs(5),
        || async { (Instant::now() > held_until).then_some(()) },
    )
    .await;
    assert!(!lease.is_lost());
    assert_eq!(kv.get(alive.clone(), None).await.unwrap().kvs().len(), 1);
    // The holder dies (no more keepalives): the key goes after the TTL.
    drop(lease);
    cobalt_testkit::wait::until("the alive key to expire", Duration::from_secs(10), || {
        let mut kv = kv.clone();
        let alive = alive.clone();
        async move {
            kv.get(alive, None)
                .await
                .unwrap()
                .kvs()
                .is_empty()
                .then_some(())
        }
    })
    .await;
}

/// Waits until `f` holds, failing with `what` after `deadline`.
async fn eventually<F, Fut>(deadline: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_aggregate_per_object_and_reason_and_expire_after_their_ttl() {
    use cobalt_api::event::{EventType, FieldSelector, EVENT_FIELDS};
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let web = store.create(&volume("web", "1Gi")).await.unwrap();
    let db = store.create(&volume("db", "1Gi")).await.unwrap();
    let recorder =
        cobalt_store::Recorder::start(store.clone(), "cobalt-test", "here", Duration::from_secs(3));
    recorder.normal(&web, "Bound", "bound to machine m1");
    recorder.normal(&web, "Bound", "bound to machine m2");
    recorder.warning(&db, "Unschedulable", "no machine has room");
    let about_web = FieldSelector::parse(
        "involvedObject.kind=Volume,involvedObject.name=web",
        EVENT_FIELDS,
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "web's Bound event twice",
        || async {
            let (events, _) = store.list_events(&about_web).await.unwrap();
            events.len() == 1 && events[0].count == 2
        },
    )
    .await;
    let (events, _) = store.list_events(&about_web).await.unwrap();
    let e = &events[0];
    assert_eq!(
        e.message, "bound to machine m2",
        "the latest message is kept"
    );
    assert_eq!(e.involved_object.uid, web.metadata.uid);
    assert_eq!(e.source.component, "cobalt-test");
    assert!(e.first_timestamp <= e.last_timestamp);
    let (all, _) = store.list_events(&FieldSelector::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all
        .iter()
        .any(|e| e.type_ == EventType::Warning && e.involved_object.name == "db"));
    // A volume created again under the same name starts its own count.
    store.delete::<Volume>("web", None).await.unwrap();
    let web2 = store.create(&volume("web", "1Gi")).await.unwrap();
    recorder.normal(&web2, "Bound", "bound to machine m3");
    eventually(
        Duration::from_secs(10),
        "the new web's own event",
        || async {
            let (events, _) = store.list_events(&about_web).await.unwrap();
            events.len() == 1
                && events[0].involved_object.uid == web2.metadata.uid
                && events[0].count == 1
        },
    )
    .await;
    // Nothing keeps the leases alive: the events go by themselves.
    eventually(Duration::from_secs(15), "events to expire", || async {
        store
            .list_events(&FieldSelector::default())
            .await
            .unwrap()
            .0
            .is_empty()
    })
    .await;
    assert_eq!(recorder.dropped(), 0);

    // Another reporter of the same reason (the next scheduler leader after a failover) is the
    // one the aggregated event names.
    let web3 = store.create(&volume("web3", "1Gi")).await.unwrap();
    recorder.normal(&web3, "Bound", "bound to machine m1");
    let other = cobalt_store::Recorder::start(
        store.clone(),
        "cobalt-test",
        "there",
        Duration::from_secs(3),
    );
    let about_web3 = FieldSelector::parse("involvedObject.name=web3", EVENT_FIELDS).unwrap();
    eventually(Duration::from_secs(10), "web3's first event", || async {
        store.list_events(&about_web3).await.unwrap().0.len() == 1
    })
    .await;
    other.normal(&web3, "Bound", "bound to machine m2");
    eventually(
        Duration::from_secs(10),
        "web3's event reported by the other",
        || async {
            let (events, _) = store.list_events(&about_web3).await.unwrap();
            events.len() == 1
                && events[0].count == 2
                && events[0].source.host == "there"
                && events[0].reporting_instance == "there"
        },
    )
    .await;
}

/// Every key under the machine views, as (key, value).
async fn view_keys(store: &Store) -> Vec<(String, String)> {
    let resp = store
        .raw()
        .kv_client()
        .get(
            store.keys().views(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The volume as machine `m`'s view has it, checked equal to the object itself.
async fn in_view(store: &Store, m: &str, name: &str) -> Option<Volume> {
    let (items, _) = store
        .list_in::<Volume>(&Scope::View(m.into()))
        .await
        .unwrap();
    let found = items.into_iter().find(|v| v.metadata.name == name)?;
    let real: Volume = store.get(name).await.unwrap().unwrap();
    assert_eq!(found, real, "machine {m}'s copy of {name} differs from it");
    Some(found)
}

#[tokio::test]
async fn machine_views_follow_binding_serving_and_moves_in_the_same_transaction() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let m1 = Scope::View("m1".into());
    let (_, revision) = store.list_in::<Volume>(&m1).await.unwrap();
    let mut watch_m1 = store.watch_after_list_in::<Volume, Volume>(&m1, &[], revision);

    // Unbound: no machine sees it.
    let v = store.create(&volume("a", "1Gi")).await.unwrap();
    assert!(view_keys(&store).await.is_empty());
    // Bound to m1 (a spec write): m1's view has it, with the same resourceVersion.
    let mut bound = v.clone();
    bound.spec.machine = Some("m1".into());
    let bound = store.replace(&bound).await.unwrap();
    assert_eq!(in_view(&store, "m1", "a").await.unwrap(), bound);
    // Served there (a status write).
    let serving = store
        .update_status::<Volume, _>("a", |_| {
            Some(VolumeStatus {
                machine: Some("m1".into()),
                ..phase(VolumePhase::Ready)
            })
        })
        .await
        .unwrap()
        .object;
    assert_eq!(in_view(&store, "m1", "a").await.unwrap(), serving);
    assert_eq!(
        take_events(&mut watch_m1, 2).await,
        ["ADDED a:1Gi:", "MODIFIED a:1Gi:Ready"]
    );

    // A move granted to m3 by a status write: m3 joins through a write that does not write the
    // object, so its copy of the object says which revision it is — and a status write from
    // that copy lands on the first try (its guard is the object's real revision).
    let started = chrono::Utc::now();
    let moving = store
        .update_status::<Volume, _>("a", |v| {
            let mut s = v.status.clone().unwrap();
            s.move_ = Some(Box::new(cobalt_api::MoveStatus::granted(
                "m1", "m3", started,
            )));
            Some(s)
        })
        .await
        .unwrap()
        .object;
    let seen_by_m3 = in_view(&store, "m3", "a").await.unwrap();
    assert_eq!(seen_by_m3, moving);
    assert_eq!(
        seen_by_m3.metadata.resource_version,
        bound.metadata.resource_version
    );
    let update = store
        .update_status_from(&seen_by_m3, |v| {
            let mut s = v.status.clone().unwrap();
            s.move_.as_mut().unwrap().rounds = 1;
            Some(s)
        })
        .await
        .unwrap();
    assert!(update.written.is_some());
    assert_eq!(in_view(&store, "m1", "a").await.unwrap(), update.object);
    assert_eq!(in_view(&store, "m3", "a").await.unwrap(), update.object);
    // The spec follows (m2 is named by nobody else: m1 stays for the move, m3 as its target).
    let mut rebound: Volume = store.get("a").await.unwrap().unwrap();
    rebound.spec.machine = Some("m3".into());
    store.replace(&rebound).await.unwrap();
    // Cut over and cleaned up: the move record goes, m1 leaves and its watch sees it leave.
    store
        .update_status::<Volume, _>("a", |v| {
            let mut s = v.status.clone().unwrap();
            s.machine = Some("m3".into());
            s.move_ = None;
            Some(s)
        })
        .await
        .unwrap();
    assert_eq!(in_view(&store, "m1", "a").await, None);
    assert!(in_view(&store, "m3", "a").await.is_some());
    // The move granted, its progress, the spec following, then the departure.
    let events = take_events(&mut watch_m1, 4).await;
    assert_eq!(events.last().unwrap(), "DELETED a:1Gi:Ready", "{events:?}");

    // Marked for deletion (a finalizer holds it), then gone: so are all its copies.
    let mut held: Volume = store.get("a").await.unwrap().unwrap();
    held.metadata.finalizers = vec!["cobalt.io/test".into()];
    store.replace(&held).await.unwrap();
    store.delete::<Volume>("a", None).await.unwrap();
    let marked = in_view(&store, "m3", "a").await.unwrap();
    assert!(marked.metadata.is_deleting());
    let mut last: Volume = store.get("a").await.unwrap().unwrap();
    last.metadata.finalizers.clear();
    store.replace(&last).await.unwrap();
    assert!(store.get::<Volume>("a").await.unwrap().is_none());
    assert_eq!(view_keys(&store).await, Vec::<(String, String)>::new());
}

#[tokio::test]
async fn repairing_the_views_restores_missing_copies_and_removes_stray_ones() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let mut v = volume("b", "1Gi");
    v.spec.machine = Some("m1".into());
    store.create(&v).await.unwrap();
    let served = store
        .update_status::<Volume, _>("b", |_| {
            Some(VolumeStatus {
                machine: Some("m1".into()),
                ..phase(VolumePhase::Ready)
            })
        })
        .await
        .unwrap()
        .object;
    let healthy = view_keys(&store).await;
    assert_eq!(healthy.len(), 2, "{healthy:?}");
    // What a cluster whose data predates the views (or a restored backup) has: no copies, and
    // a copy of a volume on a machine it does not concern.
    let mut kv = store.raw().kv_client();
    kv.delete(
        store.keys().views(),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    kv.put(store.keys().view_object("m9", "volumes", "b"), "{}", None)
        .await
        .unwrap();
    kv.put(
        store.keys().view_object("m9", "volumes", "gone"),
        "{}",
        None,
    )
    .await
    .unwrap();
    let repaired = store.repair_views::<Volume>().await.unwrap();
    assert_eq!(
        repaired,
        cobalt_store::Repaired {
            objects: 1,
            stray_keys: 2
        }
    );
    assert_eq!(in_view(&store, "m1", "b").await.unwrap(), served);
    assert_eq!(in_view(&store, "m9", "b").await, None);
    assert_eq!(
        store.repair_views::<Volume>().await.unwrap(),
        cobalt_store::Repaired::default(),
        "a second repair finds nothing to do"
    );
}

/// A cache's copy of a bound volume leaves out the last-applied annotation (the controller's,
/// `ObjectMeta::trim_for_cache`). Every write made from such a copy keeps the stored
/// annotation byte for byte: a replace, a replace with status from the cached copy, a status
/// write that gives a joining machine a copy of the object; and a watch told to trim hands out
/// trimmed copies.
#[tokio::test]
async fn writes_from_a_trimmed_cache_copy_keep_the_last_applied_annotation() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let applied = r#"{"apiVersion":"cobalt.io/v1alpha1","kind":"Volume","metadata":{"name":"a"},"spec":{"size":"1Gi"}}"#;
    let mut v = volume("a", "1Gi");
    v.metadata
        .annotations
        .insert(cobalt_api::LAST_APPLIED.into(), applied.into());
    v.spec.machine = Some("m1".into());
    let v = store.create(&v).await.unwrap();
    let annotation = |v: &Volume| {
        v.metadata
            .annotations
            .get(cobalt_api::LAST_APPLIED)
            .map(|a| a.to_string())
    };
    let stored = || async { store.get::<Volume>("a").await.unwrap().unwrap() };
    let trimmed = |v: &Volume| {
        let mut t = v.clone();
        t.metadata.trim_for_cache();
        assert!(t.metadata.trimmed && annotation(&t).is_none());
        t
    };

    // A list and a watch told to trim hand out trimmed copies.
    let (listed, revision) = store
        .list_in_trimmed::<Volume>(&Scope::All, |v| v.metadata.trim_for_cache())
        .await
        .unwrap();
    assert!(listed[0].metadata.trimmed && annotation(&listed[0]).is_none());
    let mut watch = store
        .watch_after_list::<Volume, Volume>(&[], revision)
        .trimming(|v| v.metadata.trim_for_cache());

    // A spec edit of the cached copy (a grow).
    let mut grown = trimmed(&v);
    grown.spec.size = "2Gi".parse().unwrap();
    let grown = store.replace(&grown).await.unwrap();
    assert_eq!(annotation(&grown).as_deref(), Some(applied));
    assert_eq!(annotation(&stored().await).as_deref(), Some(applied));
    match watch.next().await.unwrap() {
        WatchEvent::Modified { object, .. } | WatchEvent::Added { object, .. } => {
            assert!(object.metadata.trimmed, "the watch trims what it decodes");
            assert_eq!(annotation(&object), None);
        }
        other => panic!("unexpected {other:?}"),
    }

    // A replace with status tried from the cached copy: read first, so nothing is lost.
    let seen = trimmed(&stored().await);
    let mut moved = seen.clone();
    moved.spec.machine = Some("m2".into());
    let moved = store
        .replace_with_status_from(&seen, &moved, |_| phase(VolumePhase::Scheduled))
        .await
        .unwrap();
    assert_eq!(annotation(&moved).as_deref(), Some(applied));
    assert_eq!(annotation(&stored().await).as_deref(), Some(applied));

    // A status write from the cached copy that makes a machine join (a move's target): the
    // joining machine's copy of the object carries the annotation.
    let seen = trimmed(&stored().await);
    let started = chrono::Utc::now();
    let update = store
        .update_status_from(&seen, |v| {
            let mut s = v.status.clone().unwrap_or_default();
            s.machine = Some("m1".into());
            s.move_ = Some(Box::new(cobalt_api::MoveStatus::granted(
                "m1", "m3", started,
            )));
            Some(s)
        })
        .await
        .unwrap();
    assert!(update.written.is_some());
    let in_m3 = in_view(&store, "m3", "a").await.expect("m3 joined");
    assert_eq!(annotation(&in_m3).as_deref(), Some(applied));
    // A status write that makes no machine join is written from the cached copy as it is.
    let seen = trimmed(&stored().await);
    let update = store
        .update_status_from(&seen, |v| {
            let mut s = v.status.clone().unwrap();
            s.move_.as_mut().unwrap().rounds = 1;
            Some(s)
        })
        .await
        .unwrap();
    assert!(update.written.is_some());
    assert!(update.object.metadata.trimmed);
    assert_eq!(annotation(&stored().await).as_deref(), Some(applied));
    assert_eq!(
        annotation(&in_view(&store, "m3", "a").await.unwrap()).as_deref(),
        Some(applied)
    );

    // A create of a trimmed copy is refused, naming why.
    let mut copy = trimmed(&stored().await);
    copy.metadata.name = "b".into();
    let refused = store.create(&copy).await.unwrap_err();
    assert!(refused.to_string().contains("last-applied"), "{refused}");
    assert!(store.get::<Volume>("b").await.unwrap().is_none());
}
