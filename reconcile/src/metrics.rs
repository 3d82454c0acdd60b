//! Prometheus metrics of the reconcile runtime, registered in a registry the binary passes in.
//!
//! - `cobalt_reconcile_total{kind,result}` — reconciles by result (`ok`, `requeue`, `error`)
//! - `cobalt_reconcile_errors_total{kind}`
//! - `cobalt_reconcile_duration_seconds{kind}` — histogram
//! - `cobalt_reconcile_queue_depth{kind}` — keys waiting (not counting those running)
//! - `cobalt_watch_restarts_total{kind}`, `cobalt_relists_total{kind}`
//! - `cobalt_runtime_alive_tasks` — tasks alive in the daemon's async runtime, read at scrape
//!   time (the soak watches it stay flat under churn)

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub kind: String,
    pub result: String,
}

/// Cheap to clone; clones update the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    reconciles: Family<ResultLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    duration: Family<KindLabel, Histogram>,
    queue_depth: Family<KindLabel, Gauge>,
    watch_restarts: Family<KindLabel, Counter>,
    relists: Family<KindLabel, Counter>,
    watch_events: Family<KindLabel, Counter>,
    watch_bytes: Family<KindLabel, Counter>,
    cached: Family<KindLabel, Gauge>,
}

fn kind(k: &str) -> KindLabel {
    KindLabel {
        kind: k.to_string(),
    }
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            queue_depth: Family::default(),
            watch_restarts: Family::default(),
            relists: Family::default(),
            watch_events: Family::default(),
            watch_bytes: Family::default(),
            cached: Family::default(),
        };
        registry.register(
            "cobalt_reconcile",
            "Reconciles by result",
            m.reconciles.clone(),
        );
        registry.register(
            "cobalt_reconcile_errors",
            "Reconciles that failed",
            m.errors.clone(),
        );
        registry.register(
            "cobalt_reconcile_duration_seconds",
            "Time one reconcile took",
            m.duration.clone(),
        );
        registry.register(
            "cobalt_reconcile_queue_depth",
            "Keys waiting to be reconciled",
            m.queue_depth.clone(),
        );
        registry.register(
            "cobalt_watch_restarts",
            "Watch streams resumed after breaking",
            m.watch_restarts.clone(),
        );
        registry.register(
            "cobalt_relists",
            "Full lists (start and after compaction)",
            m.relists.clone(),
        );
        registry.register(
            "cobalt_watch_events",
            "Object changes received from etcd watches",
            m.watch_events.clone(),
        );
        registry.register(
            "cobalt_watch_received_bytes",
            "Bytes of keys and values received from etcd watches",
            m.watch_bytes.clone(),
        );
        registry.register(
            "cobalt_cached_objects",
            "Objects held in the reflector's cache (an agent: the ones in its machine's view)",
            m.cached.clone(),
        );
        registry.register_collector(Box::new(RuntimeTasks));
        m
    }

    pub(crate) fn reconciled(&self, k: &str, result: &str, seconds: f64) {
        self.reconciles
            .get_or_create(&ResultLabel {
                kind: k.into(),
                result: result.into(),
            })
            .inc();
        if result == "error" {
            self.errors.get_or_create(&kind(k)).inc();
        }
        self.duration.get_or_create(&kind(k)).observe(seconds);
    }

    pub(crate) fn queue_depth(&self, k: &str, depth: usize) {
        self.queue_depth.get_or_create(&kind(k)).set(depth as i64);
    }

    pub(crate) fn watch_restarted(&self, k: &str) {
        self.watch_restarts.get_or_create(&kind(k)).inc();
    }

    pub(crate) fn relisted(&self, k: &str) {
        self.relists.get_or_create(&kind(k)).inc();
    }

    /// After the reflector applied a list or a watch event: the cache's size, and (for an event)
    /// the bytes its watch received for it.
    pub(crate) fn reflected(&self, k: &str, cached: usize, event_bytes: Option<u64>) {
        self.cached.get_or_create(&kind(k)).set(cached as i64);
        if let Some(bytes) = event_bytes {
            self.watch_events.get_or_create(&kind(k)).inc();
            self.watch_bytes.get_or_create(&kind(k)).inc_by(bytes);
        }
    }
}

/// Reads the runtime's task count when scraped (scrapes run on the runtime: the HTTP handler).
#[derive(Debug)]
struct RuntimeTasks;

impl Collector for RuntimeTasks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let tasks = ConstGauge::new(runtime.metrics().num_alive_tasks() as i64);
        let metric = encoder.encode_descriptor(
            "cobalt_runtime_alive_tasks",
            "Tasks alive in the async runtime",
            None,
            tasks.metric_type(),
        )?;
        tasks.encode(metric)
    }
}
