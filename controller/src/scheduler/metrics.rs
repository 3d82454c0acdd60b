//! Scheduler metrics: `cobalt_scheduler_pending_volumes`, `cobalt_scheduler_placement_seconds`
//! (one pass), `cobalt_scheduler_decisions_total{outcome}`, `cobalt_scheduler_leader_transitions_total`,
//! `cobalt_scheduler_is_leader`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug)]
pub struct SchedulerMetrics {
    pending: Gauge,
    placement: Histogram,
    decisions: Family<Outcome, Counter>,
    pub(crate) transitions: Counter,
    pub(crate) leader: Gauge,
}

impl SchedulerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = SchedulerMetrics {
            pending: Gauge::default(),
            placement: Histogram::new(exponential_buckets(0.00001, 4.0, 12)),
            decisions: Family::default(),
            transitions: Counter::default(),
            leader: Gauge::default(),
        };
        registry.register(
            "cobalt_scheduler_pending_volumes",
            "Volumes waiting for a machine",
            m.pending.clone(),
        );
        registry.register(
            "cobalt_scheduler_placement_seconds",
            "Time to place one batch",
            m.placement.clone(),
        );
        registry.register(
            "cobalt_scheduler_decisions",
            "Placement decisions by outcome",
            m.decisions.clone(),
        );
        registry.register(
            "cobalt_scheduler_leader_transitions",
            "Times this controller became leader",
            m.transitions.clone(),
        );
        registry.register(
            "cobalt_scheduler_is_leader",
            "1 while this controller leads",
            m.leader.clone(),
        );
        m
    }

    pub(crate) fn pending(&self, n: usize) {
        self.pending.set(n as i64);
    }

    pub(crate) fn placed(&self, _n: usize, took: Duration) {
        self.placement.observe(took.as_secs_f64());
    }

    pub(crate) fn decision(&self, outcome: &str) {
        self.decisions
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }
}
