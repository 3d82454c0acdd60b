//! The published JSON Schemas are current, and every example manifest passes both the schemas
//! and the validator.

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn checked_in_schemas_match_the_types() {
    for (name, generated) in cobalt_api::schema::all() {
        let path = repo_root().join("schemas").join(name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make schemas`", path.display()));
        assert!(
            on_disk == generated,
            "{} is stale: run `make schemas` and commit the result",
            path.display()
        );
    }
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| std::fs::read_to_string(p).unwrap().contains("$schema="))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_pass_their_schema_and_the_validator() {
    let files = example_files();
    assert!(
        files.len() >= 3,
        "expected the volume, clone and machine examples: {files:?}"
    );
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap_or_default();
        let schema_ref = first
            .strip_prefix("# yaml-language-server: $schema=")
            .unwrap_or_else(|| panic!("{} must start with a $schema line", path.display()));
        let schema_path = path.parent().unwrap().join(schema_ref);
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&schema_path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        for doc in cobalt_api::manifest::parse_yaml_documents(&text).unwrap() {
            let problems: Vec<String> =
                validator.iter_errors(&doc).map(|e| e.to_string()).collect();
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
        }
        cobalt_api::manifest::parse_manifests(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn the_schema_refuses_what_the_validator_refuses() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("schemas/volume.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for bad in [
        r#"{"apiVersion":"cobalt.io/v1alpha1","kind":"Volume","metadata":{"name":"A_B"},"spec":{"size":"1Gi"}}"#,
        r#"{"apiVersion":"cobalt.io/v1alpha1","kind":"Volume","metadata":{"name":"a"},"spec":{"size":"1Gi","sise":1}}"#,
        r#"{"apiVersion":"cobalt.io/v1alpha1","kind":"Volume","metadata":{"name":"a"},"spec":{"size":"10GB"}}"#,
        r#"{"apiVersion":"cobalt.io/v1alpha1","kind":"Volume","metadata":{"name":"a"},"spec":{"size":"1Gi","compression":"gzip"}}"#,
    ] {
        let doc: serde_json::Value = serde_json::from_str(bad).unwrap();
        assert!(!validator.is_valid(&doc), "schema accepted {bad}");
    }
}
