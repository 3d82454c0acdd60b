//! Moves (bench section `8_moves`), on the three-machine cluster in release mode:
//!
//! 1. **Throughput**: moving a 2 GiB zstd volume (half random, half compressible text) m1 → m2,
//!    from the `spec.machine` write to the flip of `status.machine`, against the floor measured
//!    in the same run between the same two pools: a read-only snapshot and
//!    `btrfs send --compressed-data | btrfs receive`. Target ≥ 0.8× the floor's throughput.
//! 2. **Incremental round**: 1 % of the volume rewritten, then the floor's incremental
//!    `send -p | receive` beside the bytes Cobalt's next move round carried.
//! 3. **Cut-over**: a client appends over NFS every 20 ms while a 64 MiB volume moves back and
//!    forth; per move the longest gap between two acknowledged appends (what a client sees) and
//!    `cutOverMillis` (what the target measured). p50/p99; target p99 ≤ 2 s.
//!
//! `COBALT_BENCH_QUICK=1`: a 256 MiB volume and 4 cut-overs instead of 2 GiB and 20.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cobalt_api::Volume;
use cobalt_e2e::{AppendWriter, Cluster};
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn sh(cmd: &str) {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes `bytes` into `path`: the first half random, the second half text.
fn fill(path: &std::path::Path, bytes: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let half = bytes / 2;
    let mut written = 0;
    let mut seed = 1;
    while written < half {
        let chunk = cobalt_testkit::nfs::pattern(seed, (4 << 20).min(half - written));
        f.write_all(&chunk).unwrap();
        written += chunk.len();
        seed += 1;
    }
    let text = "Cobalt moves volumes between storage machines with btrfs send. ".repeat(65536);
    while written < bytes {
        let n = text.len().min(bytes - written);
        f.write_all(&text.as_bytes()[..n]).unwrap();
        written += n;
    }
    f.sync_all().unwrap();
}

async fn settled(c: &Cluster, name: &str, to: &str) -> Volume {
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some(v)) = c.store.get::<Volume>(name).await {
            let s = v.status.as_ref().unwrap();
            if s.machine.as_deref() == Some(to) && s.move_.is_none() && s.endpoint.is_some() {
                return v;
            }
        }
        assert!(
            Instant::now() < end,
            "the move of {name} to {to} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn flipped(c: &Cluster, name: &str, to: &str) -> Instant {
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some(v)) = c.store.get::<Volume>(name).await {
            if v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(to) {
                return Instant::now();
            }
        }
        assert!(
            Instant::now() < end,
            "the move of {name} to {to} did not cut over"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn apply(c: &mut Cluster, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.yaml");
    std::fs::write(&path, text).unwrap();
    let o = c.ctl(&["apply", "-f", &path.display().to_string()]).await;
    assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
}

async fn ready(c: &mut Cluster, name: &str) -> Volume {
    let o = c
        .ctl(&[
            "wait",
            &format!("volume/{name}"),
            "--for=condition=Ready",
            "--timeout=120s",
        ])
        .await;
    assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
    c.store.get(name).await.unwrap().unwrap()
}

#[tokio::main]
async fn main() {
    let quick = std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (size, cut_overs) = if quick {
        (256usize << 20, 4)
    } else {
        (2usize << 30, 20)
    };
    let mut c = Cluster::start_with_pools("binpack", (size as u64 >> 20) * 3 + 1024).await;
    let client = c.client.addr.to_string();
    let volume = |name: &str, size: &str, machine: &str, compression: &str| {
        format!(
            "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  size: {size}\n  machine: {machine}\n  compression: {compression}\n  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
        )
    };

    // 1. The big move, and its floor between the same pools.
    let mib = size >> 20;
    apply(
        &mut c,
        &volume("big", &format!("{}Mi", mib + 256), "m1", "zstd"),
    )
    .await;
    let big = ready(&mut c, "big").await;
    let uid = big.metadata.uid.clone();
    let src = c.machine("m1").pool.path().to_path_buf();
    let dst = c.machine("m2").pool.path().to_path_buf();
    fill(&src.join("volumes").join(&uid).join("data.bin"), size);
    sh("sync");
    let floor_dir = dst.join("bench-floor");
    std::fs::create_dir_all(&floor_dir).unwrap();
    let snap = src.join("bench-floor-snap");
    sh(&format!(
        "btrfs -q subvolume snapshot -r {} {}",
        src.join("volumes").join(&uid).display(),
        snap.display()
    ));
    let t0 = Instant::now();
    sh(&format!(
        "btrfs send -q --compressed-data {} | btrfs receive -e {}",
        snap.display(),
        floor_dir.display()
    ));
    let floor_full = t0.elapsed();
    // 2. The floor's incremental round after 1 % changed.
    let change = size / 100;
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("volumes").join(&uid).join("data.bin"))
            .unwrap();
        f.seek(std::io::SeekFrom::Start((size / 4) as u64)).unwrap();
        f.write_all(&cobalt_testkit::nfs::pattern(99, change))
            .unwrap();
        f.sync_all().unwrap();
    }
    let snap2 = src.join("bench-floor-snap2");
    sh(&format!(
        "btrfs -q subvolume snapshot -r {} {}",
        src.join("volumes").join(&uid).display(),
        snap2.display()
    ));
    let t0 = Instant::now();
    sh(&format!(
        "btrfs send -q --compressed-data -p {} {} | btrfs receive -e {}",
        snap.display(),
        snap2.display(),
        floor_dir.display()
    ));
    let floor_incremental = t0.elapsed();
    let floor_incremental_bytes = {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "btrfs send -q --compressed-data -p {} {} | wc -c",
                    snap.display(),
                    snap2.display()
                ),
            ])
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    for s in [&snap, &snap2] {
        sh(&format!("btrfs -q subvolume delete {}", s.display()));
    }
    for e in std::fs::read_dir(&floor_dir).unwrap() {
        sh(&format!(
            "btrfs -q subvolume delete {}",
            e.unwrap().path().display()
        ));
    }
    std::fs::remove_dir(&floor_dir).unwrap();

    let t0 = Instant::now();
    let o = c.ctl(&["move", "volume/big", "--to", "m2"]).await;
    assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
    let flip = flipped(&c, "big", "m2").await;
    let moved = flip - t0;
    let big = settled(&c, "big", "m2").await;
    let last = big.status.as_ref().unwrap().last_move.clone().unwrap();
    let floor_mbps = size as f64 / floor_full.as_secs_f64() / 1e6;
    let move_mbps = size as f64 / moved.as_secs_f64() / 1e6;
    println!(
        "moves ({} MiB zstd volume, half random, half text; m1 → m2)",
        size >> 20
    );
    println!(
        "  move (spec.machine → status.machine flipped)  {moved:>8.2?}  {move_mbps:>7.1} MB/s  ({} MiB sent)",
        last.bytes_sent >> 20
    );
    println!(
        "  floor: btrfs send --compressed-data | receive {floor_full:>8.2?}  {floor_mbps:>7.1} MB/s  ratio {:.2}",
        move_mbps / floor_mbps
    );
    println!(
        "  floor incremental after 1% changed             {floor_incremental:>8.2?}  ({} KiB)",
        floor_incremental_bytes >> 10
    );
    let o = c
        .ctl(&["delete", "volume", "big", "--wait", "--timeout=300s"])
        .await;
    assert!(o.status.success(), "{}", cobalt_e2e::out(&o));

    // 3. Cut-overs under a writer.
    apply(&mut c, &volume("hot", "64Mi", "m1", "none")).await;
    let hot = ready(&mut c, "hot").await;
    let mut server = hot.status.unwrap().endpoint.unwrap().server;
    c.nfs_write(
        &server,
        "hot/seed.bin",
        &cobalt_testkit::nfs::pattern(3, 8 << 20),
    )
    .unwrap();
    let mut gaps = Vec::new();
    let mut measured = Vec::new();
    let (mut from, mut to) = ("m1", "m2");
    for _ in 0..cut_overs {
        let writer = AppendWriter::start(c.client.nfs(), &server, "hot", Duration::from_millis(20));
        let o = c.ctl(&["move", "volume/hot", "--to", to]).await;
        assert!(o.status.success(), "{}", cobalt_e2e::out(&o));
        let end = Instant::now() + Duration::from_secs(120);
        let v = loop {
            let v: Volume = c.store.get("hot").await.unwrap().unwrap();
            if let Some(e) = v.status.as_ref().and_then(|s| s.endpoint.as_ref()) {
                writer.follow(&e.server);
            }
            let s = v.status.as_ref().unwrap();
            if s.machine.as_deref() == Some(to) && s.move_.is_none() {
                break v;
            }
            assert!(Instant::now() < end, "cut-over move did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        server = v
            .status
            .as_ref()
            .unwrap()
            .endpoint
            .as_ref()
            .unwrap()
            .server
            .clone();
        writer.follow(&server);
        // A few appends on the new side, so the gap across the cut-over is closed.
        let settle = Instant::now() + Duration::from_secs(30);
        let before = c
            .nfs_read(&server, "hot/log.txt")
            .map(|l| l.len())
            .unwrap_or(0);
        while c
            .nfs_read(&server, "hot/log.txt")
            .map(|l| l.len())
            .unwrap_or(0)
            < before + 3 * cobalt_e2e::record_line(0).len()
        {
            assert!(Instant::now() < settle, "no appends after the cut-over");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = writer.finish();
        gaps.push(log.longest_gap.as_secs_f64() * 1e3);
        measured.push(
            v.status
                .unwrap()
                .last_move
                .unwrap()
                .cut_over_millis
                .unwrap_or(0) as f64,
        );
        (from, to) = (to, from);
    }
    let _ = from;
    gaps.sort_by(f64::total_cmp);
    measured.sort_by(f64::total_cmp);
    println!(
        "  cut-over with a writer appending every 20 ms ({cut_overs} moves of a 64 MiB volume)"
    );
    println!(
        "    longest gap between acknowledged appends  p50 {:>7.0} ms  p99 {:>7.0} ms",
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.99)
    );
    println!(
        "    cutOverMillis (target's own measure)       p50 {:>7.0} ms  p99 {:>7.0} ms",
        percentile(&measured, 0.5),
        percentile(&measured, 0.99)
    );

    let section = json!({
        "volume_bytes": size,
        "compression": "zstd",
        "move_seconds": moved.as_secs_f64(),
        "move_mb_per_s": move_mbps,
        "move_bytes_sent": last.bytes_sent,
        "move_cut_over_ms": last.cut_over_millis,
        "floor_send_receive_seconds": floor_full.as_secs_f64(),
        "floor_mb_per_s": floor_mbps,
        "ratio_to_floor": move_mbps / floor_mbps,
        "floor_incremental_1pct_seconds": floor_incremental.as_secs_f64(),
        "floor_incremental_1pct_bytes": floor_incremental_bytes,
        "cut_overs": cut_overs,
        "writer_gap_p50_ms": percentile(&gaps, 0.5),
        "writer_gap_p99_ms": percentile(&gaps, 0.99),
        "cut_over_ms_p50": percentile(&measured, 0.5),
        "cut_over_ms_p99": percentile(&measured, 0.99),
    });
    cobalt_e2e::record_bench_section("8_moves", section);
}
