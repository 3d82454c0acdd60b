//! NFS exports end to end: real nfs-ganesha run by the agent, the real libnfs client
//! (`nfs-cp`, `nfs-cat`) on client hosts in their own network namespaces.

use std::process::Command;
use std::time::Duration;

use cobalt_agent::backend::btrfs::BtrfsBackend;
use cobalt_agent::backend::Backend;
use cobalt_api::{find_condition, Access, Export, ExportClient, Volume, VolumePhase, VolumeSpec};
use cobalt_store::{EtcdConfig, Store};
use cobalt_testkit::btrfs::BtrfsPool;
use cobalt_testkit::etcd::Etcd;
use cobalt_testkit::free_port;
use cobalt_testkit::netns::ClientHost;
use cobalt_testkit::process::Daemon;
use cobalt_testkit::wait::until;

struct Node {
    pool: BtrfsPool,
    state: tempfile::TempDir,
    port: u16,
}

impl Node {
    fn new() -> Node {
        cobalt_testkit::require("ganesha.nfsd");
        cobalt_testkit::require("nfs-cat");
        cobalt_testkit::process::reap_orphans();
        Node {
            pool: BtrfsPool::new(512),
            state: tempfile::tempdir().unwrap(),
            port: free_port(),
        }
    }

    fn agent(&self, etcd: &Etcd) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cobalt-agent"));
        cmd.arg("--etcd-endpoints")
            .arg(etcd.endpoints().join(","))
            .args([
                "--machine",
                "node-1",
                "--address",
                "127.0.0.1",
                "--exporter",
                "ganesha",
                "--lease-ttl",
                "2s",
            ])
            .arg("--export-port")
            .arg(self.port.to_string())
            .arg("--pool")
            .arg(self.pool.path())
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()));
        Daemon::spawn(&mut cmd, "agent")
    }

    fn ganesha_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state.path().join("ganesha/ganesha.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent's ganesha outlives a killed agent by design; the test must stop it.
        if let Some(pid) = self.ganesha_pid() {
            cobalt_testkit::process::kill_and_reap(pid);
        }
        // A killed agent cannot unmount its exports' bind mounts.
        cobalt_testkit::btrfs::unmount_under(self.state.path());
    }
}

fn client(host: &ClientHost, access: Access) -> ExportClient {
    ExportClient {
        host: host.addr.to_string().into(),
        access,
        root_squash: false,
    }
}

fn gateway(host: &ClientHost) -> String {
    host.gateway.to_string()
}

fn url(host: &ClientHost, port: u16, path: &str) -> String {
    format!("nfs://{}/{path}?version=4&nfsport={port}", host.gateway)
}

fn cat(host: &ClientHost, port: u16, path: &str) -> Result<String, String> {
    let o = host.run("nfs-cat", &[&url(host, port, path)]);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn put(host: &ClientHost, port: u16, local: &std::path::Path, path: &str) -> Result<(), String> {
    let o = host.run(
        "nfs-cp",
        &[&local.display().to_string(), &url(host, port, path)],
    );
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

async fn exported(store: &Store, name: &str, generation_at_least: i64) -> Volume {
    until(
        &format!("{name} exported"),
        Duration::from_secs(30),
        || async {
            let v: Volume = store.get(name).await.ok()??;
            let s = v.status.as_ref()?;
            let done = s.phase == VolumePhase::Ready
                && s.observed_generation >= generation_at_least
                && v.metadata.generation >= generation_at_least;
            done.then_some(v)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_follow_the_manifest_for_each_client_host() {
    let etcd = Etcd::start();
    let store = Store::connect(&EtcdConfig::new(etcd.endpoints()))
        .await
        .unwrap();
    let node = Node::new();
    let (writer, stranger, reader) = (ClientHost::new(), ClientHost::new(), ClientHost::new());
    let _agent = node.agent(&etcd);
    let port = node.port;

    let mut v = Volume::new(
        "media",
        VolumeSpec {
            size: "8Mi".parse().unwrap(),
            machine: Some("node-1".into()),
            ..Default::default()
        },
    );
    v.spec.export = Some(Export {
        clients: vec![client(&writer, Access::Rw), client(&reader, Access::Ro)],
    });
    store.create(&v).await.unwrap();
    let live = exported(&store, "media", 1).await;
    let status = live.status.as_ref().unwrap();
    let endpoint = status.endpoint.as_ref().expect("status.endpoint");
    assert_eq!((endpoint.path.as_str(), endpoint.port), ("/media", port));
    assert!(
        endpoint.mount.starts_with("mount -t nfs4 -o port="),
        "{}",
        endpoint.mount
    );
    let c = find_condition(&status.conditions, "Exported").unwrap();
    assert!(
        c.is_true() && c.message.contains(&format!("{} rw", writer.addr)),
        "{}",
        c.message
    );

    // Real data: 4 MiB written over NFSv4.1 land in the subvolume byte for byte and read back
    // the same; a file past the 8 MiB quota is refused.
    let data = cobalt_testkit::nfs::pattern(42, 4 << 20);
    writer
        .nfs()
        .write(&gateway(&writer), port, "/media", "data.bin", &data)
        .expect("rw client writes 4 MiB");
    let backend = BtrfsBackend::open(node.pool.path()).unwrap();
    assert!(
        std::fs::read(backend.path(&live.metadata.uid).join("data.bin")).unwrap() == data,
        "the subvolume holds exactly the bytes written over NFS"
    );
    assert!(
        writer
            .nfs()
            .read(&gateway(&writer), port, "/media", "data.bin")
            .unwrap()
            == data,
        "read back over NFS byte-identical"
    );
    writer
        .nfs()
        .write(
            &gateway(&writer),
            port,
            "/media",
            "big.bin",
            &cobalt_testkit::nfs::pattern(7, 16 << 20),
        )
        .expect_err("a write past the size must fail");
    // What landed is what was allocated: NFS writes chunks in parallel, so a chunk past a
    // refused one can extend the file's length over a hole — the length says nothing of what
    // the quota let in.
    let landed =
        std::fs::metadata(backend.path(&live.metadata.uid).join("big.bin")).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
    assert!(
        landed <= 8 << 20,
        "the quota stopped it: {landed} bytes of 16 MiB allocated"
    );
    std::fs::remove_file(backend.path(&live.metadata.uid).join("big.bin")).unwrap();
    assert!(
        reader
            .nfs()
            .write(&gateway(&reader), port, "/media", "ro.bin", &data[..8192])
            .is_err(),
        "ro host must not write data"
    );

    // Small files through libnfs too (the tools an operator reaches for).
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("hello.txt");
    std::fs::write(&local, "hello over nfs\n").unwrap();
    put(&writer, port, &local, "media/hello.txt").expect("rw client writes");
    assert_eq!(
        std::fs::read_to_string(backend.path(&live.metadata.uid).join("hello.txt")).unwrap(),
        "hello over nfs\n"
    );
    assert_eq!(
        cat(&writer, port, "media/hello.txt").unwrap(),
        "hello over nfs\n"
    );
    // A read-only host reads but cannot write; an unlisted host cannot mount.
    assert_eq!(
        cat(&reader, port, "media/hello.txt").unwrap(),
        "hello over nfs\n"
    );
    assert!(
        put(&reader, port, &local, "media/from-reader.txt").is_err(),
        "ro host must not write"
    );
    assert!(
        cat(&stranger, port, "media/hello.txt").is_err(),
        "unlisted host must not mount"
    );

    // Edit the manifest: the stranger becomes the writer, the writer is dropped. Nothing restarts.
    let ganesha = node.ganesha_pid().expect("ganesha pid");
    let mut edited: Volume = store.get("media").await.unwrap().unwrap();
    edited.spec.export = Some(Export {
        clients: vec![client(&stranger, Access::Rw)],
    });
    let edited = store.replace(&edited).await.unwrap();
    exported(&store, "media", edited.metadata.generation).await;
    until("access to flip", Duration::from_secs(15), || async {
        (cat(&stranger, port, "media/hello.txt").is_ok()
            && cat(&writer, port, "media/hello.txt").is_err())
        .then_some(())
    })
    .await;
    put(&stranger, port, &local, "media/from-stranger.txt").expect("the new writer writes");
    assert_eq!(
        node.ganesha_pid(),
        Some(ganesha),
        "ganesha was reloaded, not restarted"
    );

    // Delete: the export goes with the volume.
    store.delete::<Volume>("media", None).await.unwrap();
    until("the volume to be gone", Duration::from_secs(30), || async {
        store
            .get::<Volume>("media")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(cat(&stranger, port, "media/hello.txt").is_err());
    assert!(!node
        .state
        .path()
        .join("ganesha/exports.d/media.conf")
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_exports_serving_and_its_successor_adopts_ganesha() {
    let etcd = Etcd::start();
    let store = Store::connect(&EtcdConfig::new(etcd.endpoints()))
        .await
        .unwrap();
    let node = Node::new();
    let host = ClientHost::new();
    let mut agent = node.agent(&etcd);
    let port = node.port;
    let mut v = Volume::new(
        "data",
        VolumeSpec {
            size: "8Mi".parse().unwrap(),
            machine: Some("node-1".into()),
            ..Default::default()
        },
    );
    v.spec.export = Some(Export {
        clients: vec![client(&host, Access::Rw)],
    });
    store.create(&v).await.unwrap();
    exported(&store, "data", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("f.txt");
    std::fs::write(&local, "still here\n").unwrap();
    until("the export to serve", Duration::from_secs(15), || async {
        put(&host, port, &local, "data/f.txt").ok()
    })
    .await;
    let ganesha = node.ganesha_pid().unwrap();

    agent.kill();
    assert_eq!(
        cat(&host, port, "data/f.txt").unwrap(),
        "still here\n",
        "exports keep serving without the agent"
    );
    let _agent = node.agent(&etcd);
    let mut edited: Volume = store.get("data").await.unwrap().unwrap();
    edited.spec.size = "16Mi".parse().unwrap();
    let edited = store.replace(&edited).await.unwrap();
    exported(&store, "data", edited.metadata.generation).await;
    assert_eq!(
        node.ganesha_pid(),
        Some(ganesha),
        "the new agent adopted the running ganesha"
    );
    assert_eq!(cat(&host, port, "data/f.txt").unwrap(), "still here\n");
}
