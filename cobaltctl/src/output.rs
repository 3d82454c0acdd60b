//! How objects are shown: tables (default and `-o wide`), `-o yaml|json|name`, and `describe`.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::kinds::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Wide,
    Yaml,
    Json,
    Name,
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
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

fn bytes(v: Option<u64>) -> String {
    match v {
        Some(b) => cobalt_api::Quantity::from_bytes(b)
            .round_up_mib()
            .to_string(),
        None => "-".into(),
    }
}

pub fn header(kind: Kind, wide: bool) -> Vec<&'static str> {
    match (kind, wide) {
        (Kind::Volume, false) => vec!["NAME", "SIZE", "MACHINE", "PHASE", "ENDPOINT", "AGE"],
        (Kind::Volume, true) => vec![
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
        (Kind::Machine, false) => vec!["NAME", "STATUS", "CAPACITY", "RESERVED", "VOLUMES", "AGE"],
        (Kind::Machine, true) => vec![
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
    }
}

pub fn row(kind: Kind, v: &Value, wide: bool) -> Vec<String> {
    match kind {
        Kind::Volume => {
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
                let selector = v
                    .pointer("/spec/placement/selector")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                let ready = condition(v, "Ready")
                    .map(|c| s(c, "/status").to_string())
                    .unwrap_or_else(|| "Unknown".into());
                r.extend([
                    bytes(v.pointer("/status/usage/usedBytes").and_then(Value::as_u64)),
                    match s(v, "/spec/compression") {
                        "" => "none".to_string(),
                        c => c.to_string(),
                    },
                    selector
                        .filter(|x| !x.is_empty())
                        .unwrap_or_else(|| "<none>".into()),
                    ready,
                ]);
            }
            r
        }
        Kind::Machine => {
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
                let labels = v
                    .pointer("/metadata/labels")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                r.extend([
                    match s(v, "/spec/address") {
                        "" => "<none>".into(),
                        a => a.into(),
                    },
                    bytes(
                        v.pointer("/status/capacity/usedBytes")
                            .and_then(Value::as_u64),
                    ),
                    labels
                        .filter(|x| !x.is_empty())
                        .unwrap_or_else(|| "<none>".into()),
                    (!v.pointer("/spec/unschedulable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false))
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

/// Aligned columns like kubectl's.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n") + "\n"
}

pub fn yaml(v: &Value) -> String {
    serde_saphyr::to_string(v).unwrap_or_else(|_| v.to_string())
}

/// `describe`: spec, status and conditions with ages, reasons in plain words.
pub fn describe(kind: Kind, v: &Value) -> String {
    let mut out = String::new();
    let push = |out: &mut String, k: &str, val: String| {
        out.push_str(&format!("{:<16}{}\n", format!("{k}:"), val))
    };
    push(&mut out, "Name", s(v, "/metadata/name").into());
    push(
        &mut out,
        "Kind",
        match kind {
            Kind::Volume => "Volume".into(),
            Kind::Machine => "Machine".into(),
        },
    );
    if let Some(labels) = v.pointer("/metadata/labels").and_then(Value::as_object) {
        push(
            &mut out,
            "Labels",
            labels
                .iter()
                .map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    push(&mut out, "Age", age(v));
    push(
        &mut out,
        "Generation",
        v.pointer("/metadata/generation")
            .map(|g| g.to_string())
            .unwrap_or_default(),
    );
    if let Some(d) = v
        .pointer("/metadata/deletionTimestamp")
        .and_then(Value::as_str)
    {
        push(&mut out, "Deleting since", d.into());
    }
    out.push_str("Spec:\n");
    for line in yaml(v.get("spec").unwrap_or(&Value::Null)).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    if let Some(status) = v.get("status") {
        out.push_str("Status:\n");
        let mut st = status.clone();
        if let Some(o) = st.as_object_mut() {
            o.remove("conditions");
        }
        for line in yaml(&st).lines() {
            out.push_str(&format!("  {line}\n"));
        }
        if let Some(conds) = status.get("conditions").and_then(Value::as_array) {
            out.push_str("Conditions:\n");
            let rows: Vec<Vec<String>> = conds
                .iter()
                .map(|c| {
                    let since = c["lastTransitionTime"]
                        .as_str()
                        .and_then(|t| t.parse::<DateTime<Utc>>().ok());
                    vec![
                        s(c, "/type").into(),
                        s(c, "/status").into(),
                        s(c, "/reason").into(),
                        since
                            .map(|t| human_duration((Utc::now() - t).num_seconds()))
                            .unwrap_or_default(),
                        s(c, "/message").into(),
                    ]
                })
                .collect();
            for line in table(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], &rows).lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
    } else {
        out.push_str(
            "Status:         nothing reported yet (no scheduler or agent has acted on it)\n",
        );
    }
    out
}
