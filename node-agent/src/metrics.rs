//! Agent metrics beyond the reconcile library's: `cobalt_agent_orphan_volumes` — subvolumes on
//! this machine with no Volume object (reported, never deleted).

use std::sync::OnceLock;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

static ORPHANS: OnceLock<Gauge> = OnceLock::new();

pub fn register(registry: &mut Registry) {
    let g = ORPHANS.get_or_init(Gauge::default).clone();
    registry.register(
        "cobalt_agent_orphan_volumes",
        "Subvolumes with no Volume object",
        g,
    );
}

pub(crate) fn orphans(n: usize) {
    ORPHANS.get_or_init(Gauge::default).set(n as i64);
}
