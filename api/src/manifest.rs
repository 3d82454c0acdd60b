//! Reading manifests: multi-document YAML (JSON is YAML too) into typed, validated objects.
//!
//! Parsing runs in two steps so every error is one a user can act on:
//! 1. YAML syntax → a generic document; errors carry line and column.
//! 2. document → typed object; errors carry the field path (`spec.sise: unknown field …`),
//!    then [`crate::validate`] reports every semantic problem at once.
//!
//! Empty documents (a trailing `---`) are skipped.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::claim::Claim;
use crate::machine::Machine;
use crate::snapshot::Snapshot;
use crate::validate::{
    validate_claim, validate_machine, validate_snapshot, validate_volume, FieldError,
    ValidationErrors,
};
use crate::volume::Volume;
use crate::Resource;

/// One object from a manifest.
#[allow(clippy::large_enum_variant)] // a handful per file; boxing would only add noise
#[derive(Clone, Debug, PartialEq)]
pub enum Manifest {
    Volume(Volume),
    Machine(Machine),
    Snapshot(Snapshot),
    Claim(Claim),
}

impl Manifest {
    pub fn name(&self) -> &str {
        match self {
            Manifest::Volume(v) => v.name(),
            Manifest::Machine(m) => m.name(),
            Manifest::Snapshot(s) => s.name(),
            Manifest::Claim(c) => c.name(),
        }
    }

    /// `volume`, `machine`: the lowercase kind as `cobaltctl` prints it.
    pub fn kind_lower(&self) -> &'static str {
        match self {
            Manifest::Volume(_) => "volume",
            Manifest::Machine(_) => "machine",
            Manifest::Snapshot(_) => "snapshot",
            Manifest::Claim(_) => "claim",
        }
    }
}

/// Why a manifest was refused. `document` counts from 1 in the order the documents appear.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid YAML: {0}")]
    Syntax(String),
    #[error("document {document}: {error}")]
    Shape { document: usize, error: FieldError },
    #[error("document {document}: kind {kind:?} is unknown; expected Volume, Machine, Snapshot or Claim")]
    UnknownKind { document: usize, kind: String },
    #[error("document {document} ({kind}/{name}) is invalid: {errors}")]
    Invalid {
        document: usize,
        kind: &'static str,
        name: String,
        errors: ValidationErrors,
    },
}

/// At most this many documents in one manifest file (a GitOps repository's bundle of every
/// volume, say); the YAML parser's own default of 1,024 refused real repositories.
pub const MAX_DOCUMENTS: usize = 100_000;

/// Parses YAML text with one or more documents into generic values, skipping empty ones.
/// The parser's budget is sized for [`MAX_DOCUMENTS`] manifests (still finite against hostile
/// input); a file past it is refused saying so.
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: MAX_DOCUMENTS,
            max_nodes: MAX_DOCUMENTS * 100,
            max_events: MAX_DOCUMENTS * 400,
        },
    };
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
        let text = e.to_string();
        if text.contains("budget") {
            ManifestError::Syntax(format!(
                "the file is too large to read in one go ({text}): Cobalt reads up to {MAX_DOCUMENTS} manifests of ordinary size per file; split it into several files (apply -f DIR reads them all)"
            ))
        } else {
            ManifestError::Syntax(text)
        }
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Applies a JSON merge patch (RFC 7386) to `target`: objects merge key by key, `null` removes
/// a key, anything else (arrays included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Converts a generic document into a typed object, naming the offending field on failure.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(field_error)
}

/// serde's error as a field error, the path where it stopped naming the field.
fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = e.path().to_string();
    FieldError {
        field: if path == "." { "(root)".into() } else { path },
        message: e.into_inner().to_string(),
    }
}

/// Like [`from_value`], but a document that does not decode gets every shape problem at once
/// ([`crate::shape::shape_errors`]), the first one serde met included.
pub fn from_value_all<R: Resource + schemars::JsonSchema>(
    value: Value,
) -> Result<R, Vec<FieldError>> {
    // Decoded from a borrow: the document is copied only when it fails and is checked again.
    match serde_path_to_error::deserialize(&value).map_err(field_error) {
        Ok(object) => Ok(object),
        Err(first) => {
            let mut errors = crate::shape::shape_errors::<R>(&value);
            // serde's own words for the field it stopped at (they list what is expected).
            match errors.iter_mut().find(|e| e.field == first.field) {
                Some(e) => *e = first,
                None => errors.insert(0, first),
            }
            Err(errors)
        }
    }
}

/// Decodes and validates one document of any known kind.
pub fn decode_manifest(document: usize, value: Value) -> Result<Manifest, ManifestError> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let shape = |error| ManifestError::Shape { document, error };
    fn typed<R: Resource + schemars::JsonSchema>(
        document: usize,
        value: Value,
        validate: fn(&R) -> Result<(), ValidationErrors>,
    ) -> Result<R, ManifestError> {
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let object: R = from_value_all(value).map_err(|mut errors| {
            if errors.len() == 1 {
                ManifestError::Shape {
                    document,
                    error: errors.remove(0),
                }
            } else {
                ManifestError::Invalid {
                    document,
                    kind: R::KIND,
                    name,
                    errors: ValidationErrors(errors),
                }
            }
        })?;
        validate(&object).map_err(|errors| ManifestError::Invalid {
            document,
            kind: R::KIND,
            name: object.name().to_string(),
            errors,
        })?;
        Ok(object)
    }
    match kind.as_str() {
        "Volume" => typed(document, value, validate_volume).map(Manifest::Volume),
        "Machine" => typed(document, value, validate_machine).map(Manifest::Machine),
        "Snapshot" => typed(document, value, validate_snapshot).map(Manifest::Snapshot),
        "Claim" => typed(document, value, validate_claim).map(Manifest::Claim),
        "" => Err(shape(FieldError {
            field: "kind".into(),
            message: "is missing; expected Volume, Machine, Snapshot or Claim".into(),
        })),
        _ => Err(ManifestError::UnknownKind { document, kind }),
    }
}

/// Parses and validates every document of a manifest. Nothing is returned unless all are valid,
/// so a caller never applies half a file.
pub fn parse_manifests(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    parse_yaml_documents(text)?
        .into_iter()
        .enumerate()
        .map(|(i, doc)| decode_manifest(i + 1, doc))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The RFC's own worked example.
        let mut target = serde_json::json!({
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged"
        });
        let patch = serde_json::json!({
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null},
            "tags": ["example"]
        });
        merge_patch(&mut target, &patch);
        assert_eq!(
            target,
            serde_json::json!({
                "title": "Hello!",
                "author": {"givenName": "John"},
                "tags": ["example"],
                "content": "This will be unchanged",
                "phoneNumber": "+01-123-456-7890"
            })
        );
        let mut scalar = serde_json::json!("a");
        merge_patch(&mut scalar, &serde_json::json!({"b": {"c": null, "d": 1}}));
        assert_eq!(scalar, serde_json::json!({"b": {"d": 1}}));
    }

    const VOLUME: &str =
        "apiVersion: cobalt.io/v1alpha1\nkind: Volume\nmetadata: {name: a}\nspec: {size: 1Gi}\n";

    #[test]
    fn several_documents_parse_in_order_and_empty_ones_are_skipped() {
        let text = format!("{VOLUME}---\napiVersion: cobalt.io/v1alpha1\nkind: Machine\nmetadata: {{name: n1}}\n---\n");
        let docs = parse_manifests(&text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].kind_lower(), docs[0].name()), ("volume", "a"));
        assert_eq!((docs[1].kind_lower(), docs[1].name()), ("machine", "n1"));
    }

    #[test]
    fn yaml_syntax_errors_carry_line_and_column() {
        let err = parse_manifests("kind: Volume\nspec: {size: [1Gi\n").unwrap_err();
        let ManifestError::Syntax(msg) = err else {
            panic!("{err:?}")
        };
        assert!(msg.contains("line 2 column 14"), "{msg}");
    }

    #[test]
    fn a_file_of_thousands_of_manifests_is_read_whole() {
        let one = |i: usize| VOLUME.replace("name: media", &format!("name: v{i}"));
        let text: Vec<String> = (0..2_000).map(one).collect();
        let docs = parse_manifests(&text.join("---\n")).unwrap();
        assert_eq!(
            docs.len(),
            2_000,
            "past the YAML parser's default of 1,024 documents"
        );
    }

    #[test]
    fn unknown_fields_are_refused_naming_the_field_and_its_place() {
        let err =
            parse_manifests(&VOLUME.replace("size: 1Gi", "size: 1Gi, sise: 2Gi")).unwrap_err();
        let ManifestError::Shape { document: 1, error } = err else {
            panic!("{err:?}")
        };
        assert_eq!(error.field, "spec.sise");
        assert!(error.message.contains("sise"), "{}", error.message);
    }

    #[test]
    fn wrong_values_name_the_nested_field() {
        let text = VOLUME.replace(
            "size: 1Gi",
            "size: 1Gi, export: {clients: [{host: a}, {host: b, access: write}]}",
        );
        let ManifestError::Shape { error, .. } = parse_manifests(&text).unwrap_err() else {
            panic!()
        };
        assert_eq!(error.field, "spec.export.clients[1].access");
        assert!(error.message.contains("rw"), "{}", error.message);
        let bad_size = VOLUME.replace("1Gi", "10GB");
        let ManifestError::Shape { error, .. } = parse_manifests(&bad_size).unwrap_err() else {
            panic!()
        };
        assert_eq!(error.field, "spec.size");
    }

    #[test]
    fn invalid_objects_report_all_problems_and_nothing_is_returned() {
        let text = format!(
            "{VOLUME}---\n{}",
            VOLUME.replace("name: a", "name: A_B").replace("1Gi", "1k")
        );
        let err = parse_manifests(&text).unwrap_err();
        let ManifestError::Invalid {
            document: 2,
            errors,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["metadata.name", "spec.size"]);
    }

    #[test]
    fn unknown_and_missing_kinds_are_refused() {
        assert!(matches!(
            parse_manifests("kind: Pod\nmetadata: {name: x}\n"),
            Err(ManifestError::UnknownKind { kind, .. }) if kind == "Pod"
        ));
        assert!(matches!(
            parse_manifests("metadata: {name: x}\n"),
            Err(ManifestError::Shape { error, .. }) if error.field == "kind"
        ));
    }
}
