//! The agent's own HTTP port (`listen`): `/healthz` (the process runs), `/readyz` (it is
//! registered, its volume cache is loaded and its start-up exports are applied: 503 with the
//! missing part named until then) and `/metrics` (Prometheus).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;

/// What `/readyz` waits for; each flag is set once by the part of the agent that owns it.
#[derive(Default)]
pub struct Readiness {
    pub registered: AtomicBool,
    pub volumes_loaded: AtomicBool,
    pub exports_applied: AtomicBool,
}

impl Readiness {
    /// `None` when ready, else what is still missing.
    pub fn missing(&self) -> Option<&'static str> {
        if !self.registered.load(Ordering::SeqCst) {
            Some("the machine is not registered in etcd yet")
        } else if !self.volumes_loaded.load(Ordering::SeqCst) {
            Some("the volume list has not loaded from etcd yet")
        } else if !self.exports_applied.load(Ordering::SeqCst) {
            Some("the exports have not been applied yet")
        } else {
            None
        }
    }
}

pub fn router(
    readiness: Arc<Readiness>,
    registry: Arc<prometheus_client::registry::Registry>,
) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = readiness.clone();
                async move {
                    match r.missing() {
                        None => (StatusCode::OK, "ok\n".to_string()),
                        Some(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                    text
                }
            }),
        )
}
