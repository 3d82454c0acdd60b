//! What Kubernetes clients read before anything else: API discovery (`/api`, `/apis`,
//! `/apis/cobalt.io/v1alpha1`), and the core `v1` events Cobalt records, so `kubectl get`,
//! `describe`, `apply`, `wait`, `delete` and `get events` work against Cobalt unchanged.
//!
//! Decision — only the legacy discovery documents are served. kubectl asks for the aggregated
//! form first (`Accept: …as=APIGroupDiscoveryList`, …, `application/json`) and reads the plain
//! one when the answer is plain JSON, as it does with any older API server.

use axum::extract::State;

use super::query::Query;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cobalt_api::event::{FieldSelector, EVENT_FIELDS};
use serde::Deserialize;
use serde_json::{json, Value};

use super::handlers::bounded;
use super::status::ApiError;
use super::AppState;

const GROUP: &str = "cobalt.io";
const VERSION: &str = "v1alpha1";

/// One resource of the discovery list: (plural, singular, kind, short names).
const RESOURCES: &[(&str, &str, &str, &[&str])] = &[
    ("volumes", "volume", "Volume", &["vol"]),
    ("machines", "machine", "Machine", &["mach"]),
    ("snapshots", "snapshot", "Snapshot", &["snap"]),
    ("claims", "claim", "Claim", &["cl"]),
];

fn server_addresses() -> Value {
    json!([{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}])
}

/// `GET /api`: the core group's versions. Cobalt serves `v1` only for events.
pub async fn core_versions() -> Response {
    Json(json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": server_addresses(),
    }))
    .into_response()
}

/// `GET /api/v1`: events only.
pub async fn core_resources() -> Response {
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "v1",
        "resources": [{
            "name": "events",
            "singularName": "event",
            "namespaced": true,
            "kind": "Event",
            "verbs": ["get", "list"],
            "shortNames": ["ev"],
        }],
    }))
    .into_response()
}

fn group() -> Value {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({
        "name": GROUP,
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

/// `GET /apis`: the one group Cobalt serves.
pub async fn groups() -> Response {
    Json(json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [group()],
    }))
    .into_response()
}

/// `GET /apis/cobalt.io`.
pub async fn group_doc() -> Response {
    let mut g = group();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Json(g).into_response()
}

/// `GET /apis/cobalt.io/v1alpha1`: the kinds, cluster-scoped, with their verbs and short names.
pub async fn group_resources() -> Response {
    let mut resources = Vec::new();
    for (plural, singular, kind, short) in RESOURCES {
        resources.push(json!({
            "name": plural,
            "singularName": singular,
            "namespaced": false,
            "kind": kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": short,
            "categories": ["all", "cobalt"],
        }));
        resources.push(json!({
            "name": format!("{plural}/status"),
            "singularName": "",
            "namespaced": false,
            "kind": kind,
            "verbs": ["get", "update"],
        }));
    }
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": resources,
    }))
    .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventParams {
    pub field_selector: Option<String>,
    pub watch: Option<String>,
}

/// `GET /api/v1/events` and `/api/v1/namespaces/NS/events`: the recorded events matching
/// `fieldSelector` (the namespace does not narrow them: Cobalt's objects are cluster-scoped).
pub async fn list_events(
    State(s): State<AppState>,
    Query(p): Query<EventParams>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if p.watch.as_deref().is_some_and(|w| w != "false" && w != "0") {
        return Err(ApiError::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "events cannot be watched; list them again (cobaltctl events, kubectl get events)",
        ));
    }
    let selector = FieldSelector::parse(p.field_selector.as_deref().unwrap_or(""), EVENT_FIELDS)
        .map_err(ApiError::bad_request)?;
    let (items, revision) = bounded(&s, s.store.list_events(&selector)).await?;
    if super::table::wanted(&headers) {
        return Ok(Json(event_table(&items, revision)).into_response());
    }
    Ok(Json(json!({
        "apiVersion": "v1",
        "kind": "EventList",
        "metadata": {"resourceVersion": revision.to_string()},
        "items": items,
    }))
    .into_response())
}

/// Events as `kubectl get events` shows them: last seen, type, reason, object, message.
fn event_table(events: &[cobalt_api::event::Event], revision: i64) -> Value {
    let now = chrono::Utc::now();
    let columns: Vec<Value> = ["Last Seen", "Type", "Reason", "Object", "Message"]
        .iter()
        .map(|name| json!({"name": name, "type": "string", "format": "", "description": "", "priority": 0}))
        .collect();
    let rows: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "cells": [
                    cobalt_api::table::human_duration((now - e.last_timestamp).num_seconds()),
                    e.type_.as_str(),
                    e.reason,
                    format!("{}/{}", e.involved_object.kind.to_ascii_lowercase(), e.involved_object.name),
                    e.message,
                ],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": e.metadata,
                },
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": revision.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}
