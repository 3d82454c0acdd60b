//! Hostile input, property-tested: whatever text a user (or an attacker) sends, the parsers of
//! sizes, label selectors and manifests never panic, and every rejection says which field is at
//! fault — for a document with several faults, every one of them at once.

use cobalt_api::manifest::{parse_manifests, ManifestError};
use cobalt_api::selector::LabelSelector;
use cobalt_api::Quantity;
use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 400,
        ..ProptestConfig::default()
    }
}

/// Text made of the characters these parsers care about, and some they do not.
fn texty(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            'a', 'z', 'A', '0', '9', '.', '-', '+', '_', '/', '=', '!', ',', '(', ')', ' ', ':',
            '{', '}', '[', ']', '"', '\'', '#', '\n', '\t', 'é', '∞', 'K', 'i', 'M', 'G', 'e',
        ]),
        0..max,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// A field of a Volume, sometimes made bad: (value, is it bad).
fn choice(good: Vec<Value>, bad: Vec<Value>) -> impl Strategy<Value = (Option<Value>, bool)> {
    let good: Vec<(Option<Value>, bool)> = good.into_iter().map(|v| (Some(v), false)).collect();
    let bad: Vec<(Option<Value>, bool)> = bad.into_iter().map(|v| (Some(v), true)).collect();
    prop_oneof![prop::sample::select(good), prop::sample::select(bad)]
}

/// A Volume manifest with a random subset of its fields broken, and the fields broken.
fn volume_with_faults() -> impl Strategy<Value = (String, Vec<&'static str>)> {
    (
        choice(
            vec![json!("media"), json!("db-1")],
            vec![json!("Bad_Name"), json!("-x"), json!("a".repeat(70))],
        ),
        choice(
            vec![json!("1Gi"), json!("500Mi"), json!(1048576)],
            vec![
                json!("-1Gi"),
                json!("10GB"),
                json!("big"),
                json!(-5),
                json!([1]),
            ],
        ),
        choice(
            vec![json!("zstd"), json!("none")],
            vec![json!("gzip"), json!(3), json!({"a": 1})],
        ),
        any::<bool>(),
        choice(
            vec![
                json!("10.0.0.7"),
                json!("192.168.0.0/24"),
                json!("client.example"),
            ],
            vec![json!(7), json!(null), json!(["x"])],
        ),
    )
        .prop_map(|(name, size, compression, unknown, host)| {
            let mut faults = Vec::new();
            let mut spec = serde_json::Map::new();
            for (field, (value, bad)) in [("spec.size", size), ("spec.compression", compression)] {
                if bad {
                    faults.push(field);
                }
                let key = field.trim_start_matches("spec.");
                spec.insert(key.into(), value.unwrap());
            }
            if unknown {
                spec.insert("sise".into(), json!("2Gi"));
                faults.push("spec.sise");
            }
            if host.1 {
                faults.push("spec.export.clients[0].host");
            }
            spec.insert(
                "export".into(),
                json!({"clients": [{"host": host.0.unwrap()}]}),
            );
            if name.1 {
                faults.push("metadata.name");
            }
            let doc = json!({
                "apiVersion": "cobalt.io/v1alpha1",
                "kind": "Volume",
                "metadata": {"name": name.0.unwrap()},
                "spec": spec,
            });
            (doc.to_string(), faults)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sizes_parse_round_trip_or_say_why(s in texty(24)) {
        match s.parse::<Quantity>() {
            Ok(q) => {
                let again: Quantity = q.to_string().parse().unwrap();
                prop_assert_eq!(again.bytes(), q.bytes());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn numbers_with_any_suffix_never_panic(
        n in any::<u64>(),
        frac in prop::option::of(0u32..1000),
        suffix in prop::sample::select(vec!["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "E", "X", "i"]),
    ) {
        let text = match frac {
            Some(f) => format!("{n}.{f}{suffix}"),
            None => format!("{n}{suffix}"),
        };
        let _ = text.parse::<Quantity>();
    }

    #[test]
    fn selectors_parse_or_say_why(s in texty(40)) {
        if let Err(e) = s.parse::<LabelSelector>() {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn arbitrary_text_is_never_a_panic(s in texty(200)) {
        let _ = parse_manifests(&s);
    }

    #[test]
    fn every_fault_of_a_volume_is_named_at_once((doc, faults) in volume_with_faults()) {
        match parse_manifests(&doc) {
            Ok(_) => prop_assert!(faults.is_empty(), "accepted with faults {:?}: {}", faults, doc),
            Err(e) => {
                let fields: Vec<String> = match &e {
                    ManifestError::Shape { error, .. } => vec![error.field.clone()],
                    ManifestError::Invalid { errors, .. } => {
                        errors.0.iter().map(|f| f.field.clone()).collect()
                    }
                    other => panic!("{other}: {doc}"),
                };
                prop_assert!(!faults.is_empty(), "refused a good document: {}: {}", e, doc);
                prop_assert!(fields.iter().all(|f| !f.is_empty()));
                for f in &faults {
                    prop_assert!(fields.iter().any(|x| x == f), "{} not named in {}: {}", f, e, doc);
                }
            }
        }
    }
}
