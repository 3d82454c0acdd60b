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

/// A manifest as `apply` sends it: the part it manages ([`managed`]), and that part as the
/// last-applied annotation holds it. Worked out once per manifest, while the files are read
/// (and the server's list is still on its way).
pub struct Applied {
    pub value: Value,
    pub text: String,
}

impl Applied {
    pub fn new(manifest: &Value) -> Self {
        let value = managed(manifest);
        let text = value.to_string();
        Self { value, text }
    }
}

/// True when applying `manifest` to `live` would change nothing: `live` was last applied from
/// this very manifest and still holds every field the manifest sets. Then the three-way merge
/// returns `live` as it is, so this answers what `comparable(desired(live, manifest)) ==
/// comparable(live)` answers, without copying `live` — the common case of a repository
/// re-applied unchanged. `false` means "work out the merge".
pub fn unchanged(live: &Value, manifest: &Applied) -> bool {
    let last = live
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str);
    last == Some(manifest.text.as_str()) && holds(live, &manifest.value)
}

/// Every field of `manifest` is in `live` with the same value (objects compared key by key,
/// everything else whole, as [`three_way`] merges them).
fn holds(live: &Value, manifest: &Value) -> bool {
    match (live, manifest) {
        (Value::Object(l), Value::Object(m)) => m
            .iter()
            .all(|(key, mv)| l.get(key).is_some_and(|lv| holds(lv, mv))),
        _ => live == manifest,
    }
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
    fn unchanged_agrees_with_the_merge() {
        let manifest = json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "Volume", "metadata": {"name": "a", "labels": {"app": "x"}}, "spec": {"size": "1Gi", "export": {"clients": [{"host": "h", "access": "rw"}]}}});
        let mut live = manifest.clone();
        live["metadata"]["uid"] = json!("u");
        live["metadata"]["labels"]["added-by-hand"] = json!("y");
        live["spec"]["machine"] = json!("n");
        live["status"] = json!({"phase": "Ready"});
        // Never applied: the merge adds the annotation, so it is a change.
        assert!(!unchanged(&live, &Applied::new(&manifest)));
        let applied = desired(&live, &manifest);
        assert!(
            unchanged(&applied, &Applied::new(&manifest)),
            "re-applying what was applied"
        );
        assert_eq!(
            comparable(&desired(&applied, &manifest)),
            comparable(&applied)
        );
        // Someone changed a field the manifest sets, or removed one: the merge puts it back.
        for (path, value) in [
            ("/spec/size", Some(json!("2Gi"))),
            ("/metadata/labels/app", Some(json!("z"))),
            ("/spec/export/clients", Some(json!([]))),
            ("/spec/export", None),
        ] {
            let mut edited = applied.clone();
            match value {
                Some(v) => *edited.pointer_mut(path).unwrap() = v,
                None => {
                    edited["spec"].as_object_mut().unwrap().remove("export");
                }
            }
            assert!(
                !unchanged(&edited, &Applied::new(&manifest)),
                "{path} edited"
            );
            assert_ne!(
                comparable(&desired(&edited, &manifest)),
                comparable(&edited),
                "{path}: the merge changes it back"
            );
        }
        // A different manifest than the last applied one is never taken as unchanged.
        let mut other = manifest.clone();
        other["spec"]["compression"] = json!("zstd");
        assert!(!unchanged(&applied, &Applied::new(&other)));
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
