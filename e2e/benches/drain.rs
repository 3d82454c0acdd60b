//! Draining a machine (bench section `9_drain`), on the three-machine cluster in release mode:
//! N volumes of random data on m1, `cobaltctl drain m1 --wait` until the machine holds
//! nothing, against the bandwidth-bound time measured in the same run: the volumes' bytes ÷ the
//! rate of a raw `btrfs send | btrfs receive` of one of them between the same pools. Target
//! ≤ 1.25× (a drain sends one volume at a time out of a machine by default).
//!
//! `COBALT_BENCH_QUICK=1`: 3 volumes of 64 MiB instead of 4 of 768 MiB.

use std::process::Command;
use std::time::Instant;

use cobalt_api::Volume;
use cobalt_e2e::Cluster;
use serde_json::json;

fn sh(cmd: &str) {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fill(path: &std::path::Path, bytes: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0;
    let mut s = seed;
    while written < bytes {
        let chunk = cobalt_testkit::nfs::pattern(s, (4 << 20).min(bytes - written));
        f.write_all(&chunk).unwrap();
        written += chunk.len();
        s += 1000;
    }
    f.sync_all().unwrap();
}

#[tokio::main]
async fn main() {
    let quick = std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (count, mib) = if quick { (3usize, 64usize) } else { (4, 768) };
    let mut c = Cluster::start_with_pools("binpack", (count * mib * 2 + 2048) as u64).await;
    let client = c.client.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut uids = Vec::new();
    for i in 0..count {
        let name = format!("d{i}");
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: {}Mi\n  machine: m1\n  export:\n    clients: [{{host: {client}, access: rw}}]\n",
                mib + 128
            ),
        )
        .unwrap();
        let o = c.ctl(&["apply", "-f", &path.display().to_string()]).await;
        assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
        let o = c
            .ctl(&[
                "wait",
                &format!("volume/{name}"),
                "--for=condition=Ready",
                "--timeout=120s",
            ])
            .await;
        assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
        let v: Volume = c.store.get(&name).await.unwrap().unwrap();
        uids.push(v.metadata.uid.clone());
    }
    let src = c.machine("m1").pool.path().to_path_buf();
    let dst = c.machine("m2").pool.path().to_path_buf();
    for (i, uid) in uids.iter().enumerate() {
        fill(
            &src.join("volumes").join(uid).join("data.bin"),
            mib << 20,
            i as u64 + 1,
        );
    }
    sh("sync");
    // The floor: one volume's raw send | receive between the same pools.
    let snap = src.join("bench-drain-snap");
    let floor_dir = dst.join("bench-drain-floor");
    std::fs::create_dir_all(&floor_dir).unwrap();
    sh(&format!(
        "btrfs -q subvolume snapshot -r {} {}",
        src.join("volumes").join(&uids[0]).display(),
        snap.display()
    ));
    let t0 = Instant::now();
    sh(&format!(
        "btrfs send -q {} | btrfs receive -e {}",
        snap.display(),
        floor_dir.display()
    ));
    let floor_one = t0.elapsed();
    sh(&format!("btrfs -q subvolume delete {}", snap.display()));
    for e in std::fs::read_dir(&floor_dir).unwrap() {
        sh(&format!(
            "btrfs -q subvolume delete {}",
            e.unwrap().path().display()
        ));
    }
    std::fs::remove_dir(&floor_dir).unwrap();
    let rate = (mib << 20) as f64 / floor_one.as_secs_f64();
    let total = (count * mib) << 20;
    let bound = total as f64 / rate;

    // `machine: m1` pins them; a drain with --pinned moves them all.
    let t0 = Instant::now();
    let o = c
        .ctl(&["drain", "m1", "--pinned", "--wait", "--timeout", "1800s"])
        .await;
    assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
    let drained = t0.elapsed();
    assert!(c.machine("m1").volumes_on_disk().is_empty());
    let ratio = drained.as_secs_f64() / bound;
    println!("drain ({count} volumes of {mib} MiB of random data off m1)");
    println!("  cobaltctl drain m1 --pinned --wait        {drained:>8.2?}");
    println!(
        "  floor: bytes ÷ raw send|receive rate     {bound:>8.2}s  ({:.1} MB/s)  ratio {ratio:.2}",
        rate / 1e6
    );
    let section = json!({
        "volumes": count,
        "volume_mib": mib,
        "total_bytes": total,
        "drain_seconds": drained.as_secs_f64(),
        "floor_send_receive_mb_per_s": rate / 1e6,
        "floor_bandwidth_bound_seconds": bound,
        "ratio": ratio,
    });
    cobalt_e2e::record_bench_section("9_drain", section);
}
