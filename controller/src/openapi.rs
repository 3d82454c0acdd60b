//! The OpenAPI 3.1 document of the HTTP API, built from the same Rust types as the JSON Schemas
//! so it cannot drift. Served at `/openapi.json` and checked in as `schemas/openapi.json`
//! (`make schemas`; a test fails when stale).

use cobalt_api::{Claim, Machine, Snapshot, Volume};
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

/// The document as pretty JSON with a trailing newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

/// The document as a server without tokens serves it: no Authorization header is needed, so
/// none is asked for (`security: []`) and no operation answers 401.
pub fn without_auth(mut doc: Value) -> Value {
    doc["security"] = json!([]);
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for ops in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in ops.values_mut() {
                if let Some(r) = op.get_mut("responses").and_then(Value::as_object_mut) {
                    r.remove("401");
                }
            }
        }
    }
    doc
}

/// The document as kubectl reads it from `/openapi/v3/apis/cobalt.io/v1alpha1`: each kind's
/// schema carries `x-kubernetes-group-version-kind`, which `kubectl explain` looks kinds up by.
pub fn group_version_document() -> Value {
    let mut doc = document();
    let gvk = |kind: &str| json!({"group": "cobalt.io", "version": "v1alpha1", "kind": kind});
    for kind in ["Volume", "Machine", "Snapshot", "Claim"] {
        if let Some(schema) = doc.pointer_mut(&format!("/components/schemas/{kind}")) {
            schema["x-kubernetes-group-version-kind"] = json!([gvk(kind)]);
        }
    }
    // kubectl finds out whether PATCH takes `fieldValidation` (then validation is the
    // server's) from the operation's own GVK extension and inline parameters.
    let parameters = doc
        .pointer("/components/parameters")
        .cloned()
        .unwrap_or_default();
    let inline = |p: &Value| -> Value {
        p.get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/components/parameters/"))
            .and_then(|name| parameters.get(name).cloned())
            .unwrap_or_else(|| p.clone())
    };
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (plural, kind) in [
            ("volumes", "Volume"),
            ("machines", "Machine"),
            ("snapshots", "Snapshot"),
            ("claims", "Claim"),
        ] {
            let base = format!("{}/{plural}", crate::http::API_PREFIX);
            for path in [base.clone(), format!("{base}/{{name}}")] {
                let Some(ops) = paths.get_mut(&path).and_then(Value::as_object_mut) else {
                    continue;
                };
                for (method, op) in ops.iter_mut() {
                    if method == "parameters" {
                        continue;
                    }
                    op["x-kubernetes-group-version-kind"] = gvk(kind);
                    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                        for p in params.iter_mut() {
                            *p = inline(p);
                        }
                    }
                }
            }
        }
    }
    downlevel(&mut doc);
    doc["openapi"] = json!("3.0.0");
    doc
}

/// Rewrites JSON Schema 2020-12 forms kubectl's OpenAPI 3.0 reader cannot take into their 3.0
/// equivalents: `type: [T, "null"]` → `type: T, nullable: true`; `anyOf: [S, {type: null}]`
/// → S (as `allOf: [S]` when S is a reference) with `nullable: true`; `const: v` → `enum: [v]`.
fn downlevel(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(downlevel),
        Value::Object(o) => {
            if let Some(Value::Array(types)) = o.get("type").cloned() {
                let real: Vec<Value> = types.into_iter().filter(|t| t != "null").collect();
                if real.len() == 1 {
                    o.insert("type".into(), real[0].clone());
                    o.insert("nullable".into(), json!(true));
                } else {
                    o.remove("type");
                }
            }
            if let Some(c) = o.remove("const") {
                o.insert("enum".into(), json!([c]));
            }
            for key in ["anyOf", "oneOf"] {
                let Some(Value::Array(alts)) = o.get(key).cloned() else {
                    continue;
                };
                let real: Vec<Value> = alts
                    .iter()
                    .filter(|a| a.get("type") != Some(&json!("null")))
                    .cloned()
                    .collect();
                if real.len() == 1 && real.len() < alts.len() {
                    o.remove(key);
                    o.insert("nullable".into(), json!(true));
                    match real[0].as_object() {
                        Some(inner) if inner.contains_key("$ref") => {
                            o.insert("allOf".into(), json!([real[0].clone()]));
                        }
                        Some(inner) => {
                            for (k, x) in inner {
                                o.entry(k.clone()).or_insert(x.clone());
                            }
                        }
                        None => {}
                    }
                }
            }
            o.values_mut().for_each(downlevel);
        }
        _ => {}
    }
}

/// `/openapi/v3`: where the group version's document is. The hash changes with the document,
/// so clients caching it see a new one after an upgrade.
pub fn v3_index() -> Value {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    document_text().hash(&mut h);
    json!({"paths": {"apis/cobalt.io/v1alpha1": {
        "serverRelativeURL": format!("/openapi/v3/apis/cobalt.io/v1alpha1?hash={:016X}", h.finish())
    }}})
}

pub fn document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let volume = generator.subschema_for::<Volume>();
    let machine = generator.subschema_for::<Machine>();
    let snapshot = generator.subschema_for::<Snapshot>();
    let claim = generator.subschema_for::<Claim>();
    let mut schemas: Map<String, Value> = generator.take_definitions(true);
    schemas.insert("Status".into(), status_schema());
    schemas.insert("VolumeList".into(), list_schema(&volume));
    schemas.insert("MachineList".into(), list_schema(&machine));
    schemas.insert("SnapshotList".into(), list_schema(&snapshot));
    schemas.insert("ClaimList".into(), list_schema(&claim));
    schemas.insert("WatchEvent".into(), watch_event_schema());

    let mut paths = Map::new();
    for (plural, schema) in [
        ("volumes", "Volume"),
        ("machines", "Machine"),
        ("snapshots", "Snapshot"),
        ("claims", "Claim"),
    ] {
        let base = format!("{}/{plural}", crate::http::API_PREFIX);
        paths.insert(base.clone(), collection_path(plural, schema));
        paths.insert(format!("{base}/{{name}}"), item_path(plural, schema));
        paths.insert(
            format!("{base}/{{name}}/status"),
            status_path(plural, schema),
        );
    }
    paths.insert(
        format!("{}/claims/{{name}}/hold", crate::http::API_PREFIX),
        json!({
            "parameters": [param("name")],
            "put": {
                "operationId": "hold_claims",
                "summary": "Renew a held claim (spec.holdSeconds): keeps its etcd lease alive, or starts a new one. Without renewals for holdSeconds the claim is released.",
                "responses": with(error_responses(&[("403", "Reader token, or a machine token writing what does not concern its machine."), ("404", "Not found."), ("422", "The claim has no spec.holdSeconds.")]), "200", "Renewed; the claim.", r("Claim"), "application/json")
            }
        }),
    );
    paths.insert(
        "/healthz".into(),
        plain_get("Liveness: the process serves HTTP.", "text/plain"),
    );
    paths.insert(
        "/readyz".into(),
        plain_get(
            "Readiness: etcd answers within the deadline (else 503).",
            "text/plain",
        ),
    );
    paths.insert(
        "/metrics".into(),
        plain_get("Prometheus metrics.", "application/openmetrics-text"),
    );
    paths.insert(
        "/openapi.json".into(),
        json_get("This document.", json!({"type": "object"})),
    );
    paths.insert(
        "/openapi/v3".into(),
        json_get(
            "The index of OpenAPI v3 documents per group version, where kubectl looks (kubectl explain, apply).",
            json!({"type": "object", "required": ["paths"], "properties": {"paths": {"type": "object"}}}),
        ),
    );
    paths.insert(
        "/openapi/v3/apis/cobalt.io/v1alpha1".into(),
        json_get(
            "This document, as the cobalt.io/v1alpha1 group version's.",
            json!({"type": "object"}),
        ),
    );
    paths.insert(
        "/ui".into(),
        plain_get(
            "The live dashboard (HTML). It reads the API with the token given as /ui#token=TOKEN.",
            "text/html",
        ),
    );
    paths.insert(
        "/version".into(),
        json_get(
            "The server's version (major, minor, gitVersion, gitCommit, platform), as `kubectl version` reads it.",
            json!({"type": "object", "required": ["major", "minor", "gitVersion"], "properties": {
                "major": {"type": "string"}, "minor": {"type": "string"}, "gitVersion": {"type": "string"},
                "gitCommit": {"type": "string"}, "compiler": {"type": "string"}, "platform": {"type": "string"}
            }}),
        ),
    );

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Cobalt API",
            "version": "v1alpha1",
            "description": "Declarative volumes on storage machines: Volumes, Machines, Snapshots and Claims with spec/status, stored in etcd."
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "parameters": {
                "name": {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
                "dryRun": {"name": "dryRun", "in": "query", "required": false, "description": "All: validate and check conflicts, write nothing.", "schema": {"type": "string", "enum": ["All"]}},
                "labelSelector": {"name": "labelSelector", "in": "query", "required": false, "description": "key=value, key!=value, key, !key joined by commas.", "schema": {"type": "string"}},
                "watch": {"name": "watch", "in": "query", "required": false, "description": "Stream newline-delimited WatchEvents instead of a list.", "schema": {"type": "boolean"}},
                "resourceVersion": {"name": "resourceVersion", "in": "query", "required": false, "description": "With watch: continue after this revision (410 if compacted). With delete: precondition.", "schema": {"type": "string"}},
                "fieldValidation": {"name": "fieldValidation", "in": "query", "required": false, "description": "Accepted for kubectl; Cobalt always rejects unknown and duplicate fields (Strict), whatever the value.", "schema": {"type": "string", "enum": ["Strict", "Warn", "Ignore"]}},
                "fieldManager": {"name": "fieldManager", "in": "query", "required": false, "description": "Accepted for kubectl and ignored: Cobalt does not track field managers.", "schema": {"type": "string"}},
                "timeoutSeconds": {"name": "timeoutSeconds", "in": "query", "required": false, "description": "With watch: end the stream after this long (default 1800, at most 3600).", "schema": {"type": "integer", "minimum": 1}}
            }
        }
    })
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn param(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

fn error_responses(codes: &[(&str, &str)]) -> Map<String, Value> {
    let mut m = Map::new();
    for (code, description) in codes {
        m.insert((*code).into(), json!({"description": description, "content": {"application/json": {"schema": r("Status")}}}));
    }
    m.entry("400").or_insert_with(|| json!({"description": "A malformed or repeated query parameter, named.", "content": {"application/json": {"schema": r("Status")}}}));
    m.insert("401".into(), json!({"description": "No valid bearer token.", "content": {"application/json": {"schema": r("Status")}}}));
    m.insert("503".into(), json!({"description": "etcd unreachable within the deadline.", "content": {"application/json": {"schema": r("Status")}}}));
    m
}

fn with(
    mut base: Map<String, Value>,
    code: &str,
    description: &str,
    schema: Value,
    content_type: &str,
) -> Value {
    base.insert(
        code.into(),
        json!({"description": description, "content": {content_type: {"schema": schema}}}),
    );
    Value::Object(base)
}

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {
        "application/json": {"schema": r(schema)},
        "application/yaml": {"schema": r(schema)}
    }})
}

fn collection_path(plural: &str, schema: &str) -> Value {
    json!({
        "get": {
            "operationId": format!("list_{plural}"),
            "summary": format!("List {plural}, or watch them with ?watch=true."),
            "parameters": [param("labelSelector"), param("watch"), param("resourceVersion"), param("timeoutSeconds")],
            "responses": {
                "200": {"description": "The list, or (watch) a stream of WatchEvents, one JSON object per line.", "content": {
                    "application/json": {"schema": r(&format!("{schema}List"))},
                    "application/x-ndjson": {"schema": r("WatchEvent")}
                }},
                "400": {"description": "Bad query.", "content": {"application/json": {"schema": r("Status")}}},
                "410": {"description": "resourceVersion compacted: list again.", "content": {"application/json": {"schema": r("Status")}}},
                "503": {"description": "etcd unreachable.", "content": {"application/json": {"schema": r("Status")}}}
            }
        },
        "post": {
            "operationId": format!("create_{plural}"),
            "summary": format!("Create a {}.", schema.to_lowercase()),
            "parameters": [param("dryRun")],
            "requestBody": body(schema),
            "responses": with(error_responses(&[("400", "Malformed body (position given)."), ("403", "Reader token, or a machine token writing what does not concern its machine."), ("409", "AlreadyExists."), ("422", "Invalid: details.causes lists every field.")]), "201", "Created.", r(schema), "application/json")
        }
    })
}

fn item_path(plural: &str, schema: &str) -> Value {
    json!({
        "parameters": [param("name")],
        "get": {
            "operationId": format!("get_{plural}"),
            "responses": with(error_responses(&[("404", "Not found.")]), "200", "The object with its status.", r(schema), "application/json")
        },
        "put": {
            "operationId": format!("replace_{plural}"),
            "summary": "Replace metadata and spec; metadata.resourceVersion must be the current one.",
            "parameters": [param("dryRun")],
            "requestBody": body(schema),
            "responses": with(error_responses(&[("400", "Malformed body."), ("403", "Reader token, or a machine token writing what does not concern its machine."), ("404", "Not found."), ("409", "Conflict: stale resourceVersion."), ("422", "Invalid.")]), "200", "Replaced.", r(schema), "application/json")
        },
        "patch": {
            "operationId": format!("patch_{plural}"),
            "summary": "Apply a JSON merge patch (RFC 7386) to metadata and spec; status is not patched. A resourceVersion in the patch is a precondition.",
            "parameters": [param("dryRun"), param("fieldValidation"), param("fieldManager")],
            "requestBody": {"required": true, "content": {"application/merge-patch+json": {"schema": {"type": "object"}}}},
            "responses": with(error_responses(&[("400", "Malformed patch."), ("403", "Reader token, or a machine token writing what does not concern its machine."), ("404", "Not found."), ("409", "Conflict: the resourceVersion precondition failed, or the object kept changing."), ("415", "Not a merge patch (strategic merge, JSON patch and apply patches are not supported)."), ("422", "The patched object is invalid.")]), "200", "Patched.", r(schema), "application/json")
        },
        "delete": {
            "operationId": format!("delete_{plural}"),
            "parameters": [param("dryRun"), param("resourceVersion")],
            "responses": delete_responses(schema)
        }
    })
}

fn status_path(plural: &str, schema: &str) -> Value {
    json!({
        "parameters": [param("name")],
        "get": {
            "operationId": format!("get_{plural}_status"),
            "responses": with(error_responses(&[("404", "Not found.")]), "200", "The object with its status.", r(schema), "application/json")
        },
        "put": {
            "operationId": format!("replace_{plural}_status"),
            "summary": "Write the status (agents and controllers).",
            "parameters": [param("dryRun"), {
                "name": "Cobalt-Status-Precondition",
                "in": "header",
                "required": false,
                "description": "`<object create revision>/<status mod revision>` as the writer read them from etcd: the status is written only if both are still current (else 409).",
                "schema": {"type": "string", "pattern": "^[0-9]+/[0-9]+$"}
            }],
            "requestBody": body(schema),
            "responses": with(error_responses(&[("400", "Malformed body or precondition."), ("403", "Reader token, or a machine token writing what does not concern its machine."), ("404", "Not found."), ("409", "Conflict: the status precondition no longer holds."), ("422", "Invalid.")]), "200", "Updated (header Cobalt-Written-Revision: the etcd revision written, when something changed).", r(schema), "application/json")
        }
    })
}

fn delete_responses(schema: &str) -> Value {
    let mut m = error_responses(&[
        (
            "403",
            "Reader token, or a machine token writing what does not concern its machine.",
        ),
        ("404", "Not found."),
        ("409", "Precondition failed."),
    ]);
    for (code, description) in [
        ("200", "Deleted; the last state."),
        ("202", "Marked for deletion; finalizers remain."),
    ] {
        m.insert(code.into(), json!({"description": description, "content": {"application/json": {"schema": r(schema)}}}));
    }
    Value::Object(m)
}

/// A GET of a JSON document outside the resource model (`schema` describes it).
fn json_get(description: &str, schema: Value) -> Value {
    json!({"get": {"security": [], "description": description, "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}}}})
}

fn plain_get(description: &str, content_type: &str) -> Value {
    json!({"get": {"security": [], "description": description, "responses": {"200": {"description": "OK", "content": {content_type: {"schema": {"type": "string"}}}}}}})
}

fn status_schema() -> Value {
    json!({
        "type": "object",
        "description": "An error: what went wrong, and for invalid input every field at fault.",
        "required": ["kind", "status", "code", "reason", "message"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"const": "Status"},
            "status": {"const": "Failure"},
            "code": {"type": "integer"},
            "reason": {"type": "string", "enum": ["BadRequest", "Unauthorized", "Forbidden", "NotFound", "MethodNotAllowed", "AlreadyExists", "Conflict", "Expired", "UnsupportedMediaType", "Invalid", "ServiceUnavailable", "InternalError"]},
            "message": {"type": "string"},
            "details": {"type": "object", "properties": {
                "name": {"type": "string"},
                "kind": {"type": "string"},
                "causes": {"type": "array", "items": {"type": "object", "required": ["field", "message"], "properties": {
                    "field": {"type": "string", "description": "Path such as spec.export.clients[1].host"},
                    "message": {"type": "string"}
                }}}
            }}
        }
    })
}

fn list_schema(item: &schemars::Schema) -> Value {
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string", "description": "Watch from here to miss nothing."}}},
            "items": {"type": "array", "items": item}
        }
    })
}

fn watch_event_schema() -> Value {
    json!({
        "type": "object",
        "required": ["type", "object", "resourceVersion"],
        "properties": {
            "type": {"type": "string", "enum": ["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]},
            "object": {"type": "object"},
            "resourceVersion": {"type": "string", "description": "etcd revision of this event; resume a watch after it."}
        }
    })
}
