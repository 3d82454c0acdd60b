//! Every shape problem of a document at once. Decoding stops at the first problem serde meets;
//! a user fixing a manifest wants them all (Kubernetes answers a 422 listing every cause). So
//! when a document does not decode, it is checked against its kind's JSON Schema — the same
//! schema editors and `schemas/` use — and each violation becomes a [`FieldError`] with the
//! field's path and, for enums, the allowed values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use jsonschema::error::ValidationErrorKind;
use jsonschema::Validator;
use serde_json::Value;

use crate::quantity::QUANTITY_FORMS;
use crate::validate::{dns1123_label_problem, FieldError};

fn validator<R: schemars::JsonSchema + crate::Resource>() -> Option<Arc<Validator>> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Arc<Validator>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = cache.get(R::KIND) {
        return Some(v.clone());
    }
    let schema = serde_json::to_value(schemars::schema_for!(R)).ok()?;
    let v = Arc::new(jsonschema::validator_for(&schema).ok()?);
    cache.insert(R::KIND, v.clone());
    Some(v)
}

/// `/spec/export/clients/1/host` → `spec.export.clients[1].host` (indices where `doc` has an
/// array).
fn field_path(doc: &Value, pointer: &str) -> String {
    let mut out = String::new();
    let mut at = Some(doc);
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(items)) => {
                out.push_str(&format!("[{seg}]"));
                at = seg.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            _ => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&seg);
                at = at.and_then(|v| v.get(&seg));
            }
        }
    }
    if out.is_empty() {
        "(root)".into()
    } else {
        out
    }
}

fn join(parent: &str, child: &str) -> String {
    if parent == "(root)" {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// What is wrong with `doc` as an `R`, every field at once (empty when the schema accepts it).
/// A bad `metadata.name` is included: it is the first thing a user reads.
pub fn shape_errors<R: schemars::JsonSchema + crate::Resource>(doc: &Value) -> Vec<FieldError> {
    let mut out: Vec<FieldError> = Vec::new();
    let mut push = |field: String, message: String| {
        if !out.iter().any(|e| e.field == field) {
            out.push(FieldError { field, message });
        }
    };
    if let Some(p) = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .and_then(dns1123_label_problem)
    {
        push("metadata.name".into(), p);
    }
    let Some(validator) = validator::<R>() else {
        return out;
    };
    for e in validator.iter_errors(doc) {
        describe(doc, &e, &mut push);
    }
    out
}

/// One schema violation as field errors. An `anyOf` that is not a size (an optional field is
/// "the type, or null") is described by the branch whose type matched.
fn describe(
    doc: &Value,
    e: &jsonschema::ValidationError<'_>,
    push: &mut impl FnMut(String, String),
) {
    let field = field_path(doc, e.instance_path().as_str());
    let value = e.instance().to_string();
    match e.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for u in unexpected {
                push(join(&field, u), "is not a known field".into());
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            push(join(&field, name), "is required".into());
        }
        ValidationErrorKind::Enum { options } => {
            let allowed: Vec<String> = options
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    o.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| o.to_string())
                })
                .collect();
            push(
                field,
                format!("{value} is not allowed; use one of: {}", allowed.join(", ")),
            );
        }
        ValidationErrorKind::Constant { expected_value } => {
            push(
                field,
                format!("{value} is not allowed; use {expected_value}"),
            );
        }
        ValidationErrorKind::AnyOf { .. } | ValidationErrorKind::OneOfNotValid { .. }
            if e.schema_path().as_str().contains("Quantity") =>
        {
            push(field, format!("{value} is not a size: {QUANTITY_FORMS}"));
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            let here = e.instance_path().as_str();
            // The branch whose type fits: its errors are not "wrong type" at this very place.
            let fitting = context.iter().filter(|branch| {
                !branch.iter().any(|b| {
                    b.instance_path().as_str() == here
                        && matches!(b.kind(), ValidationErrorKind::Type { .. })
                })
            });
            let mut described = false;
            for branch in fitting.take(1) {
                for b in branch {
                    describe(doc, b, push);
                    described = true;
                }
            }
            if !described {
                push(field, e.to_string());
            }
        }
        ValidationErrorKind::Type { .. } => {
            push(field, format!("{value} has the wrong type: {e}"));
        }
        _ => push(field, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Volume;

    #[test]
    fn every_problem_is_named_at_once() {
        let doc: Value = serde_json::from_str(
            r#"{"apiVersion":"cobalt.io/v1alpha1","kind":"Volume","metadata":{"name":"Bad_Name"},
                "spec":{"size":"-1Gi","compression":"gzip","sise":1,
                        "export":{"clients":[{"host":"10.0.0.1"},{"host":7}]}}}"#,
        )
        .unwrap();
        let errors = shape_errors::<Volume>(&doc);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "metadata.name",
            "spec.size",
            "spec.compression",
            "spec.sise",
            "spec.export.clients[1].host",
        ] {
            assert!(fields.contains(&f), "{f} missing from {errors:?}");
        }
        let compression = errors
            .iter()
            .find(|e| e.field == "spec.compression")
            .unwrap();
        assert!(
            compression.message.contains("zstd"),
            "{}",
            compression.message
        );
        let size = errors.iter().find(|e| e.field == "spec.size").unwrap();
        assert!(size.message.contains("is not a size"), "{}", size.message);
    }
}
