//! The client-side three-way merge behind `apply`, so GitOps stays safe:
//! - fields in the manifest are set as written;
//! - fields in the last applied manifest but no longer in this one are removed;
//! - fields nobody applied (the scheduler's `spec.machine`, status, server metadata) are kept.
//!
//! Objects merge key by key; lists and scalars are replaced whole. The last applied manifest
//! lives in the `cobalt.io/last-applied` annotation.

use serde_json::{Map, Value};

pub const LAST_APPLIED: &str = "cobalt.io/last-applied";

/// `live` changed as `manifest` says, relative to `last` (what the previous apply sent).
pub fn three_way(live: &Value, last: Option<&Value>, manifest: &Value) -> Value {
    match (live, manifest) {
        (Value::Object(l), Value::Object(m)) => {
            let empty = Map::new();
            let last_map = match last {
                Some(Value::Object(o)) => o,
                _ => &empty,
            };
            let mut out = l.clone();
            for key in last_map.keys() {
                if !m.contains_key(key) {
                    out.remove(key);
                }
            }
            for (key, mv) in m {
                let merged = match l.get(key) {
                    Some(lv) => three_way(lv, last_map.get(key), mv),
                    None => mv.clone(),
                };
                out.insert(key.clone(), merged);
            }
            Value::Object(out)
        }
        _ => manifest.clone(),
    }
}

/// The part of a manifest `apply` manages: metadata name/labels/annotations/finalizers and spec.
pub fn managed(manifest: &Value) -> Value {
    let mut m = manifest.clone();
    if let Value::Object(o) = &mut m {
        o.remove("status");
        if let Some(Value::Object(meta)) = o.get_mut("metadata") {
            for server_field in [
                "uid",
                "generation",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
            ] {
                meta.remove(server_field);
            }
            if let Some(Value::Object(ann)) = meta.get_mut("annotations") {
                ann.remove(LAST_APPLIED);
                if ann.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
    }
    m
}

/// The object to send: `live` merged with `manifest`, carrying the new last-applied annotation.
pub fn desired(live: &Value, manifest: &Value) -> Value {
    let manifest = managed(manifest);
    let last: Option<Value> = live
        .pointer(&format!(
            "/metadata/annotations/{}",
            LAST_APPLIED.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok());
    let mut out = three_way(live, last.as_ref(), &manifest);
    let meta = out.as_object_mut().and_then(|o| {
        o.entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
    });
    if let Some(meta) = meta {
        let ann = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(ann) = ann {
            ann.insert(LAST_APPLIED.into(), Value::String(manifest.to_string()));
        }
    }
    out
}

/// `v` without status and server-set metadata, for comparing what apply would change.
pub fn comparable(v: &Value) -> Value {
    let mut c = v.clone();
    if let Value::Object(o) = &mut c {
        o.remove("status");
        if let Some(Value::Object(meta)) = o.get_mut("metadata") {
            for f in ["uid", "generation", "resourceVersion", "creationTimestamp"] {
                meta.remove(f);
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_nobody_applied_survive_and_fields_dropped_from_the_manifest_go() {
        let first = json!({"metadata": {"name": "a", "labels": {"app": "x", "tier": "hot"}}, "spec": {"size": "1Gi", "compression": "zstd"}});
        let live = json!({"metadata": {"name": "a", "uid": "u", "labels": {"app": "x", "tier": "hot", "added-by-hand": "y"}}, "spec": {"size": "1Gi", "compression": "zstd", "machine": "node-2"}, "status": {"phase": "Ready"}});
        let mut live = live;
        live["metadata"]["annotations"] = json!({LAST_APPLIED: managed(&first).to_string()});
        let second =
            json!({"metadata": {"name": "a", "labels": {"app": "x"}}, "spec": {"size": "2Gi"}});
        let out = desired(&live, &second);
        assert_eq!(
            out["spec"],
            json!({"size": "2Gi", "machine": "node-2"}),
            "compression removed, binding kept"
        );
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "x", "added-by-hand": "y"})
        );
        assert_eq!(out["metadata"]["uid"], "u");
        assert_eq!(out["status"]["phase"], "Ready");
    }

    #[test]
    fn applying_the_same_manifest_twice_changes_nothing() {
        let manifest = json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Volume", "metadata": {"name": "a"}, "spec": {"size": "1Gi"}});
        let mut live = manifest.clone();
        live["metadata"]["uid"] = json!("u");
        live["spec"]["machine"] = json!("n");
        let once = desired(&live, &manifest);
        let twice = desired(&once, &manifest);
        assert_eq!(comparable(&once), comparable(&twice));
    }

    #[test]
    fn lists_are_replaced_whole() {
        let live = json!({"spec": {"export": {"clients": [{"host": "a"}, {"host": "b"}]}}});
        let out = three_way(
            &live,
            None,
            &json!({"spec": {"export": {"clients": [{"host": "c"}]}}}),
        );
        assert_eq!(out["spec"]["export"]["clients"], json!([{"host": "c"}]));
    }
}
