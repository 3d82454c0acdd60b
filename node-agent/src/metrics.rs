//! Agent metrics beyond the reconcile library's:
//! - `cobalt_agent_orphan_volumes` — subvolumes on this machine with no Volume object (reported,
//!   never deleted);
//! - `cobalt_agent_export_applies_total` — times the export set was applied to the NFS server
//!   (each one a reload); group commit keeps it far below the number of volumes changed.

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

static ORPHANS: OnceLock<Gauge> = OnceLock::new();
static EXPORT_APPLIES: OnceLock<Counter> = OnceLock::new();

pub fn register(registry: &mut Registry) {
    registry.register(
        "cobalt_agent_orphan_volumes",
        "Subvolumes with no Volume object",
        ORPHANS.get_or_init(Gauge::default).clone(),
    );
    registry.register(
        "cobalt_agent_export_applies",
        "Times the export set was applied to the NFS server",
        EXPORT_APPLIES.get_or_init(Counter::default).clone(),
    );
}

pub(crate) fn orphans(n: usize) {
    ORPHANS.get_or_init(Gauge::default).set(n as i64);
}

pub(crate) fn export_applied() {
    EXPORT_APPLIES.get_or_init(Counter::default).inc();
}
