//! Create → Ready on the loop backend (bench section `11_loop_create`), on the three-machine
//! cluster with m3 on loop/ext4: N volumes of 64 MiB applied one after another with
//! `cobaltctl apply`, each timed from the apply until `cobaltctl wait --for=condition=Ready`
//! returns. *Floor*, in the same run and directory: what a volume of the loop backend is made of
//! by hand — `truncate` + `losetup --find` + `mkfs.ext4` + `mount` — for the same sizes.
//!
//! `COBALT_BENCH_QUICK=1`: 3 volumes instead of 10.

use std::process::Command;
use std::time::{Duration, Instant};

use cobalt_e2e::{out, Cluster};
use serde_json::json;

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let quick = std::env::var("COBALT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let n = if quick { 3 } else { 10 };
    let mut c = Cluster::start_with_loop_machine("spread", "ext4").await;
    c.machines_ready(3).await;
    let client = c.client.addr.to_string();
    let mut cobalt = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        c.apply_text(&format!(
            "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: l{i}}}\nspec:\n  size: 64Mi\n  machine: m3\n  export:\n    clients: [{{host: {client}, access: rw}}]\n"
        ))
        .await;
        let o = c
            .ctl(&[
                "wait",
                &format!("volume/l{i}"),
                "--for=condition=Ready",
                "--timeout=60s",
            ])
            .await;
        assert!(o.status.success(), "{}", out(&o));
        cobalt.push(t.elapsed());
    }
    // The floor: the same steps by hand, in a directory beside the agent's images.
    let dir = tempfile::tempdir().unwrap();
    let mut floor = Vec::new();
    for i in 0..n {
        let img = dir.path().join(format!("f{i}.img"));
        let mnt = dir.path().join(format!("f{i}"));
        std::fs::create_dir(&mnt).unwrap();
        let t = Instant::now();
        sh(&format!("truncate -s 64M {}", img.display()));
        let dev = sh(&format!("losetup --find --show {}", img.display()));
        sh(&format!("mkfs.ext4 -q -F -m 0 -E nodiscard {dev}"));
        sh(&format!("mount {dev} {}", mnt.display()));
        floor.push(t.elapsed());
        sh(&format!("umount {} && losetup -d {dev}", mnt.display()));
    }
    let (ours, raw) = (p50(cobalt), p50(floor));
    println!("loop create → Ready p50 {ours:.1} ms; floor (truncate+losetup+mkfs+mount) p50 {raw:.1} ms; {:.2}×", ours / raw);
    cobalt_e2e::record_bench_section(
        "11_loop_create",
        json!({
            "what": "apply → Ready of a 64 MiB ext4 volume on a loop machine, beside truncate + losetup + mkfs.ext4 + mount by hand (same run)",
            "quick": quick,
            "volumes": n,
            "p50_ms": (ours * 10.0).round() / 10.0,
            "floor_p50_ms": (raw * 10.0).round() / 10.0,
            "ratio": (ours / raw * 100.0).round() / 100.0,
        }),
    );
}
