//! The HTTP API (DESIGN.md "Interfaces"): resource routes under `/apis/cobalt.io/v1alpha1`,
//! health, metrics and the OpenAPI document.
//!
//! Stateless: everything is in etcd, so any number of controllers can serve the API at once.
//! Bounded: request bodies ≤ [`MAX_BODY_BYTES`], every request's etcd work under one deadline
//! (503 past it), watches buffered and time-limited (see [`watch`]).
//!
//! Decision — apply: `cobaltctl apply` does a client-side three-way merge (the manifest, the
//! `cobalt.io/last-applied` annotation, and the live object) and sends a replace with the
//! resourceVersion it read. The server needs no apply endpoint; a replace that changes nothing
//! writes nothing to etcd, so re-applying an unchanged manifest leaves etcd's revision alone.

pub mod auth;
pub mod discovery;
pub mod handlers;
pub mod kinds;
pub mod local;
pub mod metrics;
pub mod query;
pub mod scope;
pub mod status;
pub mod table;
pub mod tls;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cobalt_store::Store;
use prometheus_client::registry::Registry;

pub use auth::Tokens;
pub use metrics::HttpMetrics;
pub use status::ApiError;

/// Largest request body accepted (a manifest is a few KiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Deadline for a request's etcd work.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(1800);

pub const API_PREFIX: &str = "/apis/cobalt.io/v1alpha1";

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub tokens: Option<Arc<Tokens>>,
    pub deadline: Duration,
    pub bookmark_interval: Duration,
    pub http_metrics: HttpMetrics,
    pub registry: Arc<Registry>,
    /// Cancelled on shutdown: open watch streams end.
    pub shutdown: cobalt_reconcile::CancellationToken,
}

/// Builds the whole router.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/", get(discovery::group_resources))
        .route(
            "/{plural}",
            get(handlers::collection_get).post(handlers::create),
        )
        .route(
            "/{plural}/{name}",
            get(handlers::get)
                .put(handlers::replace)
                .patch(handlers::patch)
                .delete(handlers::delete),
        )
        .route(
            "/{plural}/{name}/status",
            get(handlers::get_status).put(handlers::replace_status),
        )
        .route("/{plural}/{name}/drainplan", get(handlers::drain_plan))
        .route("/{plural}/{name}/hold", axum::routing::put(handlers::hold));
    Router::new()
        .nest(API_PREFIX, api)
        .route("/api", get(discovery::core_versions))
        .route("/api/v1", get(discovery::core_resources))
        .route("/api/v1/events", get(discovery::list_events))
        .route(
            "/api/v1/namespaces/{namespace}/events",
            get(discovery::list_events),
        )
        .route("/apis", get(discovery::groups))
        .route("/apis/cobalt.io", get(discovery::group_doc))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .route(
            "/openapi/v3",
            get(|| async { axum::Json(crate::openapi::v3_index()) }),
        )
        .route(
            "/openapi/v3/apis/cobalt.io/v1alpha1",
            get(|State(s): State<AppState>| async move {
                let doc = crate::openapi::group_version_document();
                axum::Json(match s.tokens {
                    Some(_) => doc,
                    None => crate::openapi::without_auth(doc),
                })
            }),
        )
        .route("/version", get(version))
        .route("/ui", get(ui))
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    match handlers::bounded(&s, s.store.revision()).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &s.registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed").into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The server's version, in the shape `kubectl version` reads.
pub fn version_info() -> serde_json::Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.');
    serde_json::json!({
        "major": parts.next().unwrap_or("0"),
        "minor": parts.next().unwrap_or("0"),
        "gitVersion": format!("v{v}"),
        "gitCommit": option_env!("COBALT_GIT_COMMIT").unwrap_or("unknown"),
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        "compiler": "rustc",
    })
}

async fn version() -> Response {
    axum::Json(version_info()).into_response()
}

/// The live dashboard: one static page (no data in it), which reads the API with the token it
/// is given in its URL fragment.
async fn ui() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("ui.html"),
    )
        .into_response()
}

/// The OpenAPI document as this server behaves: with tokens every operation needs a bearer
/// token (401 without), without tokens none does.
async fn openapi(State(s): State<AppState>) -> Response {
    if s.tokens.is_some() {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            crate::openapi::document_text(),
        )
            .into_response();
    }
    axum::Json(crate::openapi::without_auth(crate::openapi::document())).into_response()
}
