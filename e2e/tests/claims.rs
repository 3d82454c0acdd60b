//! Claims on the real three-machine cluster, with hosts in network namespaces: a storm of
//! claims racing for fewer volumes while the scheduler leader is killed, then the rest made from
//! the template; access that follows the claim; a held claim lapsing when its holder dies and
//! the next host finding the data; ordinals that stay put across restarts; a claim's resize.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use cobalt_api::{Claim, ClaimPhase, Volume, VolumePhase};
use cobalt_e2e::{binary, out, server_of, Cluster, NFS_PORT, TTL};
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

async fn claims(c: &Cluster) -> Vec<Claim> {
    c.store
        .list::<Claim>(&Default::default())
        .await
        .map(|(l, _)| l)
        .unwrap_or_default()
}

fn bound_reason(cl: &Claim) -> String {
    cl.status
        .as_ref()
        .and_then(|s| cobalt_api::find_condition(&s.conditions, "Bound"))
        .map(|b| b.reason.to_string())
        .unwrap_or_default()
}

fn ready(cl: &Claim) -> bool {
    cl.status
        .as_ref()
        .and_then(|s| cobalt_api::find_condition(&s.conditions, "Ready"))
        .is_some_and(|r| r.status == cobalt_api::ConditionStatus::True)
}

/// Runs `cobaltctl claim ARGS…` for many hosts at once (each its own process, like hosts
/// booting together); panics with the output of any that failed.
async fn claim_all(c: &mut Cluster, runs: Vec<Vec<String>>) {
    claim_all_at(c.api(), runs).await
}

/// Like [`claim_all`], against the API at `api`.
async fn claim_all_at(api: String, runs: Vec<Vec<String>>) {
    tokio::task::spawn_blocking(move || {
        let children: Vec<_> = runs
            .iter()
            .map(|args| {
                Command::new(binary("cobaltctl"))
                    .env("COBALT_SERVER", &api)
                    .env("COBALT_CONFIG", "/nonexistent")
                    .arg("claim")
                    .args(args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (child, args) in children.into_iter().zip(&runs) {
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "claim {args:?}: {}", out(&o));
        }
    })
    .await
    .unwrap();
}

/// Every claimed volume is held by exactly one claim, and every Bound claim's volume is distinct
/// and held by that claim (the etcd binding keys agree with the claims' status).
async fn assert_no_double_binding(c: &Cluster) -> BTreeMap<String, String> {
    let bindings = c.store.claim_bindings().await.unwrap();
    let mut by_volume = BTreeMap::new();
    for cl in claims(c).await {
        if let Some((volume, _)) = cl.bound_volume() {
            let previous = by_volume.insert(volume.to_string(), cl.metadata.name.to_string());
            assert!(
                previous.is_none(),
                "volume {volume} is bound to {} and {}",
                cl.metadata.name,
                previous.unwrap()
            );
            assert_eq!(
                bindings.get(volume).map(|r| r.claim.as_str()),
                Some(cl.metadata.name.as_str()),
                "the binding key of {volume} names its claim"
            );
        }
    }
    by_volume
}

fn volume_docs(names: impl Iterator<Item = String>) -> String {
    names
        .map(|n| {
            format!(
                "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {n}, labels: {{app: web}}}}\nspec: {{size: 8Mi}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_storm_binds_each_volume_once_then_creates_the_rest_and_access_follows_the_claim() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    c.apply_text(&volume_docs((0..20).map(|i| format!("web-data-{i:02}"))))
        .await;
    c.volumes_ready(20, Duration::from_secs(60)).await;

    // 30 hosts boot at once; the scheduler leader is killed while they claim.
    let leader_index = c.leader_index().await;
    let storm: Vec<Vec<String>> = (0..30)
        .map(|i| {
            vec![
                format!("web-{i:02}"),
                "--host".into(),
                format!("192.0.2.{}", i + 10),
                "--selector".into(),
                "app=web".into(),
            ]
        })
        .collect();
    // The hosts talk to the other controller's API; the leader dies once a few claims exist,
    // while the rest are still being created and bound.
    let other_api = format!("http://127.0.0.1:{}", c.controllers[1 - leader_index].1);
    let hosts = tokio::spawn(claim_all_at(other_api, storm));
    until("the storm under way", Duration::from_secs(30), || async {
        (claims(&c).await.len() >= 5).then_some(())
    })
    .await;
    c.controllers[leader_index].0.kill();
    hosts.await.unwrap();
    let (bound, pending) = until(
        "20 claims Bound and 10 Pending with a reason",
        TTL * 4 + Duration::from_secs(30),
        || async {
            let all = claims(&c).await;
            let bound: Vec<_> = all
                .iter()
                .filter(|cl| cl.phase() == ClaimPhase::Bound)
                .cloned()
                .collect();
            let pending: Vec<_> = all
                .iter()
                .filter(|cl| {
                    cl.phase() == ClaimPhase::Pending && bound_reason(cl) == "NoFreeVolume"
                })
                .cloned()
                .collect();
            (bound.len() == 20 && pending.len() == 10).then_some((bound, pending))
        },
    )
    .await;
    let by_volume = assert_no_double_binding(&c).await;
    assert_eq!(by_volume.len(), 20, "20 distinct volumes are bound");
    let message = pending[0]
        .status
        .as_ref()
        .and_then(|s| cobalt_api::find_condition(&s.conditions, "Bound"))
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("app=web") && message.contains("spec.create"),
        "{message}"
    );
    c.start_controller(leader_index, "spread");
    c.controller_serving(leader_index).await;

    // The pending ones come back with a template: each gets a volume made for it, no more.
    let again: Vec<Vec<String>> = pending
        .iter()
        .map(|cl| {
            vec![
                cl.metadata.name.to_string(),
                "--host".into(),
                cl.spec.host.clone(),
                "--selector".into(),
                "app=web".into(),
                "--create-size".into(),
                "8Mi".into(),
            ]
        })
        .collect();
    claim_all(&mut c, again).await;
    let all_ready = tokio::time::timeout(
        Duration::from_secs(60),
        until("all 30 claims Ready", Duration::from_secs(120), || async {
            let all = claims(&c).await;
            (all.len() == 30 && all.iter().all(ready)).then_some(())
        }),
    )
    .await;
    if all_ready.is_err() {
        let o = c.ctl(&["get", "claims", "-o", "wide"]).await;
        panic!("not all 30 claims are Ready:\n{}", out(&o));
    }
    let by_volume = assert_no_double_binding(&c).await;
    assert_eq!(by_volume.len(), 30);
    let (volumes, _) = c.store.list::<Volume>(&Default::default()).await.unwrap();
    assert_eq!(
        volumes.len(),
        30,
        "no orphan volume: one made per pending claim"
    );
    for cl in &pending {
        let v = volumes
            .iter()
            .find(|v| v.metadata.name == cl.metadata.name)
            .expect("made from the template");
        assert_eq!(
            v.metadata.labels.get("app").map(cobalt_api::Text::as_str),
            Some("web"),
            "labelled to match"
        );
    }

    // Access follows the claim: the claiming host reads and writes, another host cannot.
    let mine = bound[0].clone();
    let other = c.lan.host(101);
    let volume_name = mine.bound_volume().unwrap().0.to_string();
    let o = c
        .ctl(&[
            "claim",
            &mine.metadata.name,
            "--host",
            &c.client.addr.to_string(),
            "--selector",
            "app=web",
            "--root-squash",
            "false",
            "--wait",
            "--print-mount",
        ])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    let text = out(&o);
    assert!(
        text.contains(&format!("bound to volume/{volume_name}")),
        "{text}"
    );
    assert!(text.contains("mount -t nfs4"), "{text}");
    let v: Volume = c.store.get(&volume_name).await.unwrap().unwrap();
    let server = server_of(&v);
    let data = cobalt_testkit::nfs::pattern(3, 1 << 20);
    until(
        "the claiming host writes over NFS",
        Duration::from_secs(20),
        || async {
            c.nfs_write(&server, &format!("{volume_name}/data.bin"), &data)
                .ok()
        },
    )
    .await;
    assert_eq!(
        c.nfs_read(&server, &format!("{volume_name}/data.bin"))
            .unwrap(),
        data
    );
    assert!(
        other
            .nfs()
            .read(&server, NFS_PORT, &format!("/{volume_name}"), "data.bin")
            .is_err(),
        "a host without the claim is refused"
    );
    assert!(
        v.spec.export.as_ref().is_none_or(|e| e.clients.is_empty()),
        "the Volume's own spec is not edited"
    );

    // Releasing (deleting the claim) revokes the host's access and keeps the data.
    let o = c
        .ctl(&["delete", &format!("claim/{}", mine.metadata.name)])
        .await;
    assert!(o.status.success(), "{}", out(&o));
    until(
        "access revoked after the release",
        Duration::from_secs(20),
        || async {
            c.nfs_read(&server, &format!("{volume_name}/data.bin"))
                .is_err()
                .then_some(())
        },
    )
    .await;
    until(
        "the volume's binding is freed",
        Duration::from_secs(20),
        || async {
            let b = c.store.claim_bindings().await.ok()?;
            (!b.contains_key(&volume_name)).then_some(())
        },
    )
    .await;
    let kept: Volume = c
        .store
        .get(&volume_name)
        .await
        .unwrap()
        .expect("the volume is kept");
    assert_eq!(kept.status.unwrap().phase, VolumePhase::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_claim_lapses_when_its_holder_dies_and_ordinals_stay_put() {
    let mut c = Cluster::start("spread").await;
    c.machines_ready(3).await;
    let api = c.api();
    let client = c.client.addr.to_string();
    let ordinal_args = |name: &str, host: &str| -> Vec<String> {
        [
            name,
            "--host",
            host,
            "--strategy",
            "ordinal",
            "--group",
            "kafka",
            "--create-size",
            "16Mi",
            "--root-squash",
            "false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // Host A boots and holds its claim.
    let mut holder = {
        let mut cmd = Command::new(binary("cobaltctl"));
        cmd.env("COBALT_SERVER", &api)
            .env("COBALT_CONFIG", "/nonexistent")
            .arg("claim")
            .args(ordinal_args("kafka-a", &client))
            .args(["--hold", "--hold-seconds", "3"]);
        Daemon::spawn(&mut cmd, "holder-a")
    };
    let a = until("kafka-a Ready", Duration::from_secs(60), || async {
        let cl: Claim = c.store.get("kafka-a").await.ok()??;
        ready(&cl).then_some(cl)
    })
    .await;
    let s = a.status.clone().unwrap();
    assert_eq!(s.ordinal, Some(1), "numbering starts at 1");
    assert_eq!(s.volume.as_deref(), Some("kafka-1"));
    let v: Volume = c.store.get("kafka-1").await.unwrap().unwrap();
    assert_eq!(
        v.metadata
            .labels
            .get("cobalt.io/claim-group")
            .map(cobalt_api::Text::as_str),
        Some("kafka")
    );
    assert_eq!(
        v.metadata
            .labels
            .get("cobalt.io/ordinal")
            .map(cobalt_api::Text::as_str),
        Some("1")
    );
    let server = server_of(&v);
    let data = cobalt_testkit::nfs::pattern(5, 2 << 20);
    until("host A writes", Duration::from_secs(20), || async {
        c.nfs_write(&server, "kafka-1/log.bin", &data).ok()
    })
    .await;

    // Host A dies: after the hold time the claim is released, the volume kept.
    holder.kill();
    let released = until(
        "kafka-a Released",
        Duration::from_secs(3) + Duration::from_secs(20),
        || async {
            let cl: Claim = c.store.get("kafka-a").await.ok()??;
            (cl.phase() == ClaimPhase::Released).then_some(cl)
        },
    )
    .await;
    assert_eq!(bound_reason(&released), "HolderGone");
    until(
        "host A's access revoked",
        Duration::from_secs(20),
        || async {
            c.nfs_read(&server, "kafka-1/log.bin")
                .is_err()
                .then_some(())
        },
    )
    .await;

    // Host B takes the lowest free ordinal — A's — and finds A's data.
    let b_host = c.lan.host(101);
    let mut args = ordinal_args("kafka-b", &b_host.addr.to_string());
    args.push("--wait".into());
    claim_all(&mut c, vec![args]).await;
    let b: Claim = c.store.get("kafka-b").await.unwrap().unwrap();
    assert_eq!(b.status.as_ref().unwrap().ordinal, Some(1));
    assert_eq!(b.bound_volume().unwrap().0, "kafka-1");
    let v: Volume = c.store.get("kafka-1").await.unwrap().unwrap();
    let server = server_of(&v);
    let read = until("host B reads A's data", Duration::from_secs(20), || async {
        b_host
            .nfs()
            .read(&server, NFS_PORT, "/kafka-1", "log.bin")
            .ok()
    })
    .await;
    assert!(
        read == data,
        "the data survived the holder's death byte for byte"
    );

    // --mount: on a host whose kernel has no NFS client (this one) it fails saying so, with the
    // command to use elsewhere; the claim stays bound.
    if let Some(problem) = cobaltctl::claim::nfs_client_problem() {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = ordinal_args("kafka-b", &b_host.addr.to_string());
        args.extend(["--mount".into(), dir.path().display().to_string()]);
        let args: Vec<&str> = std::iter::once("claim")
            .chain(args.iter().map(String::as_str))
            .collect();
        let o = c.ctl(&args).await;
        let text = out(&o);
        assert!(!o.status.success(), "{text}");
        assert!(
            text.contains("has no NFS client") && text.contains(&problem),
            "{text}"
        );
        assert!(
            text.contains("mount -t nfs4 -o vers=4.1,port=2049"),
            "{text}"
        );
    }

    // More hosts: ordinals 2 and 3, each its own volume.
    claim_all(
        &mut c,
        vec![
            ordinal_args("kafka-c", "192.0.2.3"),
            ordinal_args("kafka-d", "192.0.2.4"),
        ],
    )
    .await;
    let numbers = until("ordinals 1..3 taken", Duration::from_secs(30), || async {
        let all = claims(&c).await;
        let n: BTreeMap<String, u32> = all
            .iter()
            .filter(|cl| cl.phase() == ClaimPhase::Bound)
            .filter_map(|cl| Some((cl.metadata.name.to_string(), cl.status.as_ref()?.ordinal?)))
            .collect();
        (n.len() == 3).then_some(n)
    })
    .await;
    let set: BTreeSet<u32> = numbers.values().copied().collect();
    assert_eq!(set, BTreeSet::from([1, 2, 3]), "{numbers:?}");

    // Stable across a restart: both controllers restart; a claim deleted and made again under
    // its name gets its number and volume back.
    let c_before = numbers["kafka-c"];
    for i in 0..2 {
        c.controllers[i].0.kill();
    }
    for i in 0..2 {
        c.start_controller(i, "spread");
        c.controller_serving(i).await;
    }
    let o = c.ctl(&["delete", "claim/kafka-c"]).await;
    assert!(o.status.success(), "{}", out(&o));
    claim_all(&mut c, vec![ordinal_args("kafka-c", "192.0.2.3")]).await;
    let again = until(
        "kafka-c bound again",
        TTL * 4 + Duration::from_secs(30),
        || async {
            let cl: Claim = c.store.get("kafka-c").await.ok()??;
            (cl.phase() == ClaimPhase::Bound).then_some(cl)
        },
    )
    .await;
    assert_eq!(again.status.as_ref().unwrap().ordinal, Some(c_before));
    assert_eq!(again.bound_volume().unwrap().0, format!("kafka-{c_before}"));
    for name in ["kafka-b", "kafka-d"] {
        let cl: Claim = c.store.get(name).await.unwrap().unwrap();
        assert_eq!(
            cl.status.unwrap().ordinal,
            Some(numbers[name]),
            "{name} kept its number"
        );
    }

    // Raising the claim's size grows its volume through the normal, capacity-checked path.
    let mut args = ordinal_args("kafka-b", &b_host.addr.to_string());
    let at = args.iter().position(|a| a == "16Mi").unwrap();
    args[at] = "32Mi".into();
    claim_all(&mut c, vec![args]).await;
    until("kafka-1 grown to 32Mi", Duration::from_secs(30), || async {
        let v: Volume = c.store.get("kafka-1").await.ok()??;
        let limit = v.status.as_ref()?.usage.as_ref()?.limit_bytes;
        (v.spec.size.to_string() == "32Mi" && limit == 32 << 20).then_some(())
    })
    .await;
    assert_no_double_binding(&c).await;
}
