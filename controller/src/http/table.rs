//! Server-side tables: what `kubectl get` shows. kubectl asks with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io, …`; the columns are those of
//! `cobaltctl get` ([`cobalt_api::table`]), the wide ones at priority 1 (`-o wide`).

use axum::http::{header, HeaderMap};
use cobalt_api::Resource;
use serde_json::{json, Value};

/// True when the client asked for a Table.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("as=Table"))
}

/// The column definitions of kind `R`.
pub fn columns<R: Resource>() -> Value {
    let narrow = cobalt_api::table::header(R::KIND, false).len();
    let defs: Vec<Value> = cobalt_api::table::header(R::KIND, true)
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let title = name[..1].to_string() + &name[1..].to_ascii_lowercase();
            json!({
                "name": title,
                "type": "string",
                "format": if i == 0 { "name" } else { "" },
                "description": "",
                "priority": if i < narrow { 0 } else { 1 },
            })
        })
        .collect();
    Value::Array(defs)
}

/// One row: the cells and the object's metadata (what kubectl needs to name it).
pub fn row<R: Resource>(object: &R) -> Value {
    let v = serde_json::to_value(object).unwrap_or_default();
    let cells = cobalt_api::table::row(R::KIND, &v, true);
    json!({
        "cells": cells,
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": v.get("metadata").cloned().unwrap_or_default(),
        },
    })
}

/// A Table of `objects`; `with_columns` false for the second and later events of a watch.
pub fn table<R: Resource>(objects: &[&R], revision: Option<i64>, with_columns: bool) -> Value {
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "rows": objects.iter().map(|o| row(*o)).collect::<Vec<_>>(),
    });
    if with_columns {
        t["columnDefinitions"] = columns::<R>();
    }
    if let Some(r) = revision {
        t["metadata"]["resourceVersion"] = json!(r.to_string());
    }
    t
}
