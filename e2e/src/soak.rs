//! The soak: the cluster under steady churn (create, write over NFS, grow, delete) with fast
//! resyncs, while the daemons' resources are sampled — resident memory, open file descriptors,
//! threads, tasks alive in their async runtime (`cobalt_runtime_alive_tasks` from /metrics) —
//! and etcd's key count and database size. A leak shows as a slope; `make soak` reports the
//! slopes in bench/results.json and the short test in `make test` checks that, with every
//! volume deleted again, keys, descriptors and tasks are back where they started.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cobalt_api::{Volume, VolumePhase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{out, server_of, Cluster};

/// One observation: series name (`controller-0.fds`, `m1.tasks`, `etcd.keys`, …) → value.
pub type Sample = BTreeMap<String, f64>;

/// A process to watch: its name, pid and /metrics address (`host:port`).
#[derive(Clone, Debug)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    pub metrics: String,
}

/// The cluster's daemons: both controllers and every agent.
pub fn daemons(c: &Cluster) -> Vec<Watched> {
    let mut out: Vec<Watched> = c
        .controllers
        .iter()
        .enumerate()
        .filter_map(|(i, (d, port))| {
            Some(Watched {
                name: format!("controller-{i}"),
                pid: d.pid()?,
                metrics: format!("127.0.0.1:{port}"),
            })
        })
        .collect();
    out.extend(c.machines.iter().filter_map(|m| {
        Some(Watched {
            name: m.name.clone(),
            pid: m.agent_pid()?,
            metrics: format!("{}:7421", m.host.addr),
        })
    }));
    out
}

/// Resident KiB, threads (from /proc/PID/status) and open descriptors of `pid`.
pub fn proc_stats(pid: u32) -> Option<(f64, f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as f64;
    Some((field("VmRSS:")?, field("Threads:")?, fds))
}

/// `cobalt_runtime_alive_tasks` from the daemon's /metrics (plain HTTP/1.0, bounded).
pub async fn alive_tasks(addr: &str) -> Option<f64> {
    metric(addr, "cobalt_runtime_alive_tasks").await
}

/// The value of one series (its name with labels, as the exposition prints it) in the /metrics
/// of the daemon at `addr` (`host:port`).
pub async fn metric(addr: &str, series: &str) -> Option<f64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: cobalt\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// One sample of every daemon and of etcd.
pub async fn sample(c_store: &cobalt_store::Store, daemons: &[Watched]) -> Sample {
    let mut s = Sample::new();
    for d in daemons {
        if let Some((rss, threads, fds)) = proc_stats(d.pid) {
            s.insert(format!("{}.rss_kib", d.name), rss);
            s.insert(format!("{}.threads", d.name), threads);
            s.insert(format!("{}.fds", d.name), fds);
        }
        if let Some(t) = alive_tasks(&d.metrics).await {
            s.insert(format!("{}.tasks", d.name), t);
        }
    }
    let raw = c_store.raw();
    let count = |prefix: &'static str| {
        let mut kv = raw.kv_client();
        async move {
            kv.get(
                prefix,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await
            .ok()
            .map(|r| r.count() as f64)
        }
    };
    let (all, events) = (count("/cobalt/").await, count("/cobalt/events/").await);
    if let (Some(all), Some(events)) = (all, events) {
        s.insert("etcd.keys".into(), all - events);
        s.insert("etcd.events".into(), events);
    }
    if let Ok(st) = raw.maintenance_client().status().await {
        s.insert("etcd.db_bytes".into(), st.db_size() as f64);
    }
    s
}

/// Least-squares slope of `points` (seconds, value), per hour.
pub fn slope_per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 3600.0
    }
}

/// What a soak saw: samples (seconds since start, sample) and how much churn ran.
#[derive(Debug, Default)]
pub struct Soak {
    pub samples: Vec<(f64, Sample)>,
    pub cycles: usize,
    pub failed_cycles: usize,
}

impl Soak {
    /// Every series after the warm-up (the first `warmup` fraction of samples): slope per hour,
    /// mean, first and last value.
    pub fn slopes(&self, warmup: f64) -> BTreeMap<String, serde_json::Value> {
        let skip = (self.samples.len() as f64 * warmup) as usize;
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (t, s) in &self.samples[skip..] {
            for (k, v) in s {
                series.entry(k.clone()).or_default().push((*t, *v));
            }
        }
        series
            .into_iter()
            .map(|(k, pts)| {
                let mean = pts.iter().map(|p| p.1).sum::<f64>() / pts.len() as f64;
                let slope = slope_per_hour(&pts);
                let round = |x: f64| (x * 100.0).round() / 100.0;
                (
                    k,
                    serde_json::json!({
                        "slope_per_hour": round(slope),
                        "slope_percent_of_mean_per_hour":
                            if mean > 0.0 { round(slope / mean * 100.0) } else { 0.0 },
                        "mean": round(mean),
                        "first": pts.first().map(|p| p.1),
                        "last": pts.last().map(|p| p.1),
                    }),
                )
            })
            .collect()
    }
}

fn manifest(name: &str, size: &str, client: &str) -> String {
    format!(
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  \
         size: {size}\n  export:\n    clients: [{{host: {client}, access: rw, rootSquash: false}}]\n"
    )
}

async fn ready(c: &Cluster, name: &str, deadline: Duration) -> Option<Volume> {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Ok(Some(v)) = c.store.get::<Volume>(name).await {
            let ok = v.status.as_ref().is_some_and(|s| {
                s.phase == VolumePhase::Ready
                    && s.endpoint.is_some()
                    && s.observed_generation == v.metadata.generation
            });
            if ok {
                return Some(v);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Churns for `duration` with a window of `window` volumes (each new one created, written to
/// over NFS and every third grown; the oldest deleted once the window is full), sampling every
/// `every`. With `compact`, etcd's history before each sample is compacted away, as
/// `--auto-compaction-retention` does in production. Leaves the last window's volumes in place.
pub async fn run(
    c: &mut Cluster,
    duration: Duration,
    every: Duration,
    window: usize,
    compact: bool,
) -> Soak {
    let daemons = daemons(c);
    let samples: Arc<Mutex<Vec<(f64, Sample)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let sampler = {
        let (store, samples, stop) = (c.store.clone(), samples.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                if compact {
                    let mut kv = store.raw().kv_client();
                    if let Ok(r) = kv.get("/", None).await {
                        if let Some(h) = r.header() {
                            let _ = kv.compact(h.revision(), None).await;
                        }
                    }
                }
                let s = sample(&store, &daemons).await;
                samples
                    .lock()
                    .unwrap()
                    .push((start.elapsed().as_secs_f64(), s));
                let next = Instant::now() + every;
                while Instant::now() < next {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };
    let client = c.client.addr.to_string();
    let mut live: std::collections::VecDeque<String> = Default::default();
    let mut soak = Soak::default();
    let mut n = 0usize;
    while start.elapsed() < duration {
        n += 1;
        let name = format!("soak-{n}");
        let mut ok = c.try_apply(&manifest(&name, "16Mi", &client)).await;
        if ok {
            live.push_back(name.clone());
            match ready(c, &name, Duration::from_secs(60)).await {
                Some(v) => {
                    let (nfs, server) = (c.client.nfs(), server_of(&v));
                    let path = v
                        .status
                        .as_ref()
                        .and_then(|s| s.endpoint.clone())
                        .unwrap()
                        .path;
                    let data = cobalt_testkit::nfs::pattern(n as u64, 4096);
                    ok &= tokio::task::spawn_blocking(move || {
                        nfs.write(&server, crate::NFS_PORT, &path, "soak.bin", &data)
                    })
                    .await
                    .unwrap()
                    .is_ok();
                    if n % 3 == 0 {
                        ok &= c.try_apply(&manifest(&name, "32Mi", &client)).await;
                    }
                }
                None => ok = false,
            }
        }
        if live.len() > window {
            let oldest = live.pop_front().unwrap();
            let o = c.ctl(&["delete", &format!("volume/{oldest}")]).await;
            ok &= o.status.success();
        }
        soak.cycles += 1;
        if !ok {
            soak.failed_cycles += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    soak.samples = std::mem::take(&mut *samples.lock().unwrap());
    soak
}

impl Cluster {
    /// `cobaltctl apply -f -` of `text`; true when it succeeded (the output is logged if not).
    pub async fn try_apply(&mut self, text: &str) -> bool {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let path = file.path().to_string_lossy().into_owned();
        let o = self.ctl(&["apply", "-f", &path]).await;
        if !o.status.success() {
            eprintln!("soak: apply failed: {}", out(&o));
        }
        o.status.success()
    }
}
