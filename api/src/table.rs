//! The columns objects are shown in, shared by `cobaltctl get` and the API's server-side tables
//! (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`, what kubectl asks for): one
//! definition, so both show the same thing. Kinds are named by their `kind` (`Volume`, …); the
//! wide columns are the ones after [`header`]`(kind, false)`.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// A string field by JSON pointer, or "".
pub fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub fn age(v: &Value) -> String {
    let Some(t) = v
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<DateTime<Utc>>().ok())
    else {
        return "<unknown>".into();
    };
    human_duration((Utc::now() - t).num_seconds())
}

pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// A string map at `pointer` as `k=v,k2=v2`, or `<none>`.
fn pairs(v: &Value, pointer: &str) -> String {
    let joined = v
        .pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    if joined.is_empty() {
        "<none>".into()
    } else {
        joined
    }
}

pub fn bytes(v: Option<u64>) -> String {
    match v {
        Some(b) => crate::Quantity::from_bytes(b).round_up_mib().to_string(),
        None => "-".into(),
    }
}

pub fn header(kind: &str, wide: bool) -> Vec<&'static str> {
    match (kind, wide) {
        ("Volume", false) => vec!["NAME", "SIZE", "MACHINE", "PHASE", "ENDPOINT", "AGE"],
        ("Volume", true) => vec![
            "NAME",
            "SIZE",
            "MACHINE",
            "PHASE",
            "ENDPOINT",
            "AGE",
            "USED",
            "COMPRESSION",
            "SELECTOR",
            "READY",
        ],
        ("Machine", false) => vec!["NAME", "STATUS", "CAPACITY", "RESERVED", "VOLUMES", "AGE"],
        ("Machine", true) => vec![
            "NAME",
            "STATUS",
            "CAPACITY",
            "RESERVED",
            "VOLUMES",
            "AGE",
            "ADDRESS",
            "USED",
            "LABELS",
            "SCHEDULABLE",
        ],
        ("Claim", false) => vec!["NAME", "HOST", "PHASE", "VOLUME", "ORDINAL", "READY", "AGE"],
        ("Claim", true) => vec![
            "NAME", "HOST", "PHASE", "VOLUME", "ORDINAL", "READY", "AGE", "STRATEGY", "GROUP",
            "SELECTOR", "MACHINE", "REASON",
        ],
        (_, false) => vec!["NAME", "VOLUME", "READY", "MACHINE", "SIZE", "AGE"],
        (_, true) => vec![
            "NAME",
            "VOLUME",
            "READY",
            "MACHINE",
            "SIZE",
            "AGE",
            "EXCLUSIVE",
            "PHASE",
            "SCHEDULED",
        ],
    }
}

pub fn row(kind: &str, v: &Value, wide: bool) -> Vec<String> {
    match kind {
        "Volume" => {
            let machine = v
                .pointer("/status/machine")
                .or_else(|| v.pointer("/spec/machine"))
                .and_then(Value::as_str)
                .unwrap_or("<none>");
            let endpoint = match v.pointer("/status/endpoint") {
                Some(e) => format!("{}:{}", s(e, "/server"), s(e, "/path")),
                None => "<none>".into(),
            };
            let phase = match s(v, "/status/phase") {
                "" => "Pending",
                p => p,
            };
            let mut r = vec![
                s(v, "/metadata/name").into(),
                s(v, "/spec/size").into(),
                machine.into(),
                phase.into(),
                endpoint,
                age(v),
            ];
            if wide {
                let selector = pairs(v, "/spec/placement/selector");
                let ready = condition(v, "Ready")
                    .map(|c| s(c, "/status").to_string())
                    .unwrap_or_else(|| "Unknown".into());
                r.extend([
                    bytes(v.pointer("/status/usage/usedBytes").and_then(Value::as_u64)),
                    match s(v, "/spec/compression") {
                        "" => "none".to_string(),
                        c => c.to_string(),
                    },
                    selector,
                    ready,
                ]);
            }
            r
        }
        "Machine" => {
            let mut r = vec![
                s(v, "/metadata/name").into(),
                match s(v, "/status/phase") {
                    "" => "NotReady".into(),
                    p => p.into(),
                },
                bytes(
                    v.pointer("/status/capacity/totalBytes")
                        .and_then(Value::as_u64),
                ),
                bytes(
                    v.pointer("/status/capacity/reservedBytes")
                        .and_then(Value::as_u64),
                ),
                v.pointer("/status/volumes")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .to_string(),
                age(v),
            ];
            if wide {
                let labels = pairs(v, "/metadata/labels");
                r.extend([
                    match s(v, "/spec/address") {
                        "" => "<none>".into(),
                        a => a.into(),
                    },
                    bytes(
                        v.pointer("/status/capacity/usedBytes")
                            .and_then(Value::as_u64),
                    ),
                    labels,
                    (!v.pointer("/spec/unschedulable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false))
                    .to_string(),
                ]);
            }
            r
        }
        "Claim" => {
            let or_none = |x: &str| {
                if x.is_empty() {
                    "<none>".to_string()
                } else {
                    x.to_string()
                }
            };
            let ready = condition(v, "Ready")
                .map(|c| s(c, "/status").to_string())
                .unwrap_or_else(|| "False".into());
            let mut r = vec![
                s(v, "/metadata/name").into(),
                s(v, "/spec/host").into(),
                match s(v, "/status/phase") {
                    "" => "Pending".into(),
                    p => p.into(),
                },
                or_none(s(v, "/status/volume")),
                v.pointer("/status/ordinal")
                    .and_then(Value::as_u64)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                ready,
                age(v),
            ];
            if wide {
                let reason = condition(v, "Bound")
                    .filter(|c| s(c, "/status") != "True")
                    .map(|c| s(c, "/reason").to_string())
                    .unwrap_or_default();
                r.extend([
                    match s(v, "/spec/strategy") {
                        "" => "any".into(),
                        x => x.into(),
                    },
                    or_none(s(v, "/spec/group")),
                    pairs(v, "/spec/selector"),
                    or_none(s(v, "/status/machine")),
                    or_none(&reason),
                ]);
            }
            r
        }
        _ => {
            let mut r = vec![
                s(v, "/metadata/name").into(),
                s(v, "/spec/volume").into(),
                v.pointer("/status/readyToUse")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .to_string(),
                match s(v, "/status/machine") {
                    "" => "<none>".into(),
                    m => m.into(),
                },
                bytes(v.pointer("/status/sizeBytes").and_then(Value::as_u64)),
                age(v),
            ];
            if wide {
                r.extend([
                    bytes(v.pointer("/status/exclusiveBytes").and_then(Value::as_u64)),
                    match s(v, "/status/phase") {
                        "" => "Pending".into(),
                        p => p.into(),
                    },
                    v.pointer(&format!(
                        "/metadata/labels/{}",
                        crate::snapshot::SCHEDULED_LABEL.replace('/', "~1")
                    ))
                    .is_some()
                    .to_string(),
                ]);
            }
            r
        }
    }
}

pub fn condition<'a>(v: &'a Value, type_: &str) -> Option<&'a Value> {
    v.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}
