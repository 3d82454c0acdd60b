//! How objects are shown: tables (default and `-o wide`), `-o yaml|json|name`, and `describe`.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::kinds::Kind;
pub use cobalt_api::table::{age, bytes, condition, human_duration, s};

/// The table columns of `kind`.
pub fn header(kind: Kind, wide: bool) -> Vec<&'static str> {
    cobalt_api::table::header(kind.kind(), wide)
}

/// One table row of `v`.
pub fn row(kind: Kind, v: &Value, wide: bool) -> Vec<String> {
    cobalt_api::table::row(kind.kind(), v, wide)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Wide,
    Yaml,
    Json,
    Name,
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

fn since(t: &str) -> String {
    t.parse::<DateTime<Utc>>()
        .map(|t| human_duration((Utc::now() - t).num_seconds()))
        .unwrap_or_else(|_| "<unknown>".into())
}

fn event_age(e: &Value) -> String {
    let last = since(s(e, "/lastTimestamp"));
    match e.get("count").and_then(Value::as_u64) {
        Some(n) if n > 1 => format!("{last} (x{n} over {})", since(s(e, "/firstTimestamp"))),
        _ => last,
    }
}

/// `cobaltctl events`: LAST SEEN, TYPE, REASON, OBJECT, MESSAGE, oldest first.
pub fn event_table(items: &[Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            vec![
                event_age(e),
                s(e, "/type").into(),
                s(e, "/reason").into(),
                format!(
                    "{}/{}",
                    s(e, "/involvedObject/kind").to_ascii_lowercase(),
                    s(e, "/involvedObject/name")
                ),
                s(e, "/message").into(),
            ]
        })
        .collect();
    table(&["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], &rows)
}

/// The `Events:` section of `describe`: the `last` most recent, as kubectl shows them.
pub fn describe_events(list: &Value, last: usize) -> String {
    let items = list["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "Events:         <none>\n".into();
    }
    let shown = &items[items.len().saturating_sub(last)..];
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|e| {
            vec![
                s(e, "/type").into(),
                s(e, "/reason").into(),
                event_age(e),
                s(e, "/source/component").into(),
                s(e, "/message").into(),
            ]
        })
        .collect();
    let t = table(&["TYPE", "REASON", "AGE", "FROM", "MESSAGE"], &rows);
    let mut out = String::from("Events:\n");
    for line in t.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
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
            Kind::Snapshot => "Snapshot".into(),
            Kind::Claim => "Claim".into(),
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
    if kind == Kind::Volume {
        if v.pointer("/status/move").is_some() {
            let since = v
                .pointer("/status/move/started")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                .map(|t| format!(", for {}s", (Utc::now() - t).num_seconds()))
                .unwrap_or_default();
            push(
                &mut out,
                "Move",
                format!("{}{since}", move_progress(v, None)),
            );
        }
        if v.pointer("/status/lastMove").is_some() {
            push(&mut out, "Last move", move_summary(v));
        }
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

/// Bytes per second of a move, from successive observations of its status.
#[derive(Default)]
pub struct Rate {
    first: Option<(std::time::Instant, u64)>,
}

impl Rate {
    /// Records the bytes moved so far in `v`; returns the mean rate since the first sample.
    pub fn observe(&mut self, v: &Value) -> Option<f64> {
        let m = v.pointer("/status/move")?;
        let done = m["bytesSent"].as_u64().unwrap_or(0) + m["bytesDone"].as_u64().unwrap_or(0);
        let now = std::time::Instant::now();
        let (t0, b0) = *self.first.get_or_insert((now, done));
        let secs = now.duration_since(t0).as_secs_f64();
        (secs >= 0.5 && done > b0).then(|| (done - b0) as f64 / secs)
    }
}

/// Bytes for people: 1.5 GiB, 320 MiB, 12 KiB, 17 B.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// One line of a move's progress: the stage, bytes of this round against the source's
/// estimate, the rate and the ETA; or, before the move is granted, why it waits.
pub fn move_progress(v: &Value, rate: Option<f64>) -> String {
    let Some(m) = v.pointer("/status/move") else {
        return match condition(v, "Moving") {
            Some(c) if c["status"] == "False" => format!(
                "waiting: {} — {}",
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            ),
            _ => format!(
                "phase {}, on machine {}",
                s(v, "/status/phase"),
                s(v, "/status/machine")
            ),
        };
    };
    let stage = m["stage"].as_str().unwrap_or("?");
    let done = m["bytesDone"].as_u64().unwrap_or(0);
    let mut line = format!(
        "{stage:<12} {} → {}",
        m["from"].as_str().unwrap_or("?"),
        m["to"].as_str().unwrap_or("?")
    );
    if stage == "Seeding" || stage == "Converging" {
        match m["bytesTotal"].as_u64().filter(|t| *t > 0) {
            Some(total) => line.push_str(&format!(
                "  {} of {} ({}%)",
                human_bytes(done),
                human_bytes(total),
                done.min(total) * 100 / total
            )),
            None => line.push_str(&format!("  {}", human_bytes(done))),
        }
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            line.push_str(&format!("  {}/s", human_bytes(r as u64)));
            if let Some(total) = m["bytesTotal"].as_u64().filter(|t| *t > done) {
                line.push_str(&format!("  ETA {:.0}s", (total - done) as f64 / r));
            }
        }
    }
    if let Some(round) = m["rounds"].as_u64().filter(|r| *r > 0) {
        line.push_str(&format!("  round {}", round + 1));
    }
    if let Some(why) = m["stalled"].as_str() {
        line.push_str(&format!("  (stalled: {why})"));
    }
    line
}

/// What `move --wait` prints when the move is done, from `status.lastMove`.
pub fn move_summary(v: &Value) -> String {
    let Some(m) = v.pointer("/status/lastMove") else {
        return format!(
            "volume/{} is on machine {}",
            s(v, "/metadata/name"),
            s(v, "/status/machine")
        );
    };
    let took = match (
        m["started"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok()),
        m["finished"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok()),
    ) {
        (Some(a), Some(b)) => format!(" in {:.1}s", (b - a).num_milliseconds() as f64 / 1000.0),
        _ => String::new(),
    };
    let cut = m["cutOverMillis"]
        .as_u64()
        .map(|ms| format!(", cut-over {ms} ms"))
        .unwrap_or_default();
    format!(
        "volume/{} moved from machine {} to {}{took} ({} sent{cut})",
        s(v, "/metadata/name"),
        m["from"].as_str().unwrap_or("?"),
        m["to"].as_str().unwrap_or("?"),
        human_bytes(m["bytesSent"].as_u64().unwrap_or(0))
    )
}

#[cfg(test)]
mod move_tests {
    use super::*;

    #[test]
    fn move_progress_shows_stage_bytes_rate_and_eta_or_why_it_waits() {
        let v: Value = serde_json::json!({"status": {"move": {
            "from": "m1", "to": "m2", "stage": "Seeding", "started": "2026-12-01T00:00:00Z",
            "bytesDone": 512u64 << 20, "bytesTotal": 1u64 << 30, "rounds": 0}}});
        let line = move_progress(&v, Some((128u64 << 20) as f64));
        assert!(line.starts_with("Seeding"), "{line}");
        for part in [
            "m1 → m2",
            "512.0 MiB of 1.0 GiB (50%)",
            "128.0 MiB/s",
            "ETA 4s",
        ] {
            assert!(line.contains(part), "{part:?} in {line}");
        }
        let waiting: Value = serde_json::json!({"status": {"conditions": [{"type": "Moving",
            "status": "False", "reason": "InsufficientCapacity", "message": "m2 lacks 5 bytes"}]}});
        assert_eq!(
            move_progress(&waiting, None),
            "waiting: InsufficientCapacity — m2 lacks 5 bytes"
        );
        let done: Value = serde_json::json!({"metadata": {"name": "db"}, "status": {"lastMove": {
            "from": "m1", "to": "m2", "started": "2026-12-01T00:00:00Z",
            "finished": "2026-12-01T00:00:08.500Z", "bytesSent": 3u64 << 20, "cutOverMillis": 310}}});
        assert_eq!(
            move_summary(&done),
            "volume/db moved from machine m1 to m2 in 8.5s (3.0 MiB sent, cut-over 310 ms)"
        );
    }
}
