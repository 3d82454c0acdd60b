//! Semantic validation that reports *every* problem at once, each with its field path
//! (`spec.export.clients[1].host`), so a user fixes a manifest in one round.
//!
//! Shape errors (unknown fields, wrong types, unknown enum values) are caught earlier, when the
//! manifest is parsed ([`crate::manifest`]); this module checks what the types cannot express.

use std::fmt;
use std::net::IpAddr;

use crate::claim::{Claim, ClaimStrategy, HOLD_SECONDS};
use crate::machine::Machine;
use crate::meta::{ObjectMeta, API_VERSION};
use crate::quantity::MIB;
use crate::snapshot::Snapshot;
use crate::volume::Volume;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.export.clients[1].host`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in one object.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

impl ValidationErrors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

/// Maximum length of names and label values.
pub const MAX_NAME_LEN: usize = 63;
/// Maximum dilation percentage.
pub const MAX_DILATION_PERCENT: u32 = 1000;

/// Why `name` is not a DNS-1123 label, if it is not one.
pub fn dns1123_label_problem(name: &str) -> Option<String> {
    const RULE: &str = "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters";
    if name.is_empty() {
        return Some(format!("is empty; {RULE}"));
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!("is {} characters long; {RULE}", name.len()));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Some(format!("{name:?} {RULE}"));
    }
    None
}

/// Why `host` is not an IP address, a CIDR or a hostname, if it is not one.
pub fn export_host_problem(host: &str) -> Option<String> {
    const RULE: &str = "must be an IP address, a CIDR (10.0.0.0/24) or a hostname";
    if let Some((addr, prefix)) = host.split_once('/') {
        let Ok(ip) = addr.parse::<IpAddr>() else {
            return Some(format!("{host:?} {RULE}: {addr:?} is not an IP address"));
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return match prefix.parse::<u8>() {
            Ok(p) if p <= max => None,
            _ => Some(format!(
                "{host:?} {RULE}: the prefix length must be 0 to {max}"
            )),
        };
    }
    if host.parse::<IpAddr>().is_ok() || is_hostname(host) {
        None
    } else {
        Some(format!("{host:?} {RULE}"))
    }
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_hostname(p) {
            return Some(format!(
                "key {key:?} has an invalid prefix {p:?}: it must be a DNS subdomain"
            ));
        }
    }
    if name.is_empty() || name.len() > MAX_NAME_LEN || !label_chars_ok(name) {
        return Some(format!(
            "key {key:?} must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (optionally behind a DNS prefix and '/')"
        ));
    }
    None
}

fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() || (value.len() <= MAX_NAME_LEN && label_chars_ok(value)) {
        None
    } else {
        Some(format!(
            "value {value:?} must be empty or at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

fn label_chars_ok(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn check_labels<'a>(
    errors: &mut ValidationErrors,
    field: &str,
    labels: impl Iterator<Item = (&'a str, &'a str)>,
) {
    for (k, v) in labels {
        for problem in [label_key_problem(k), label_value_problem(v)]
            .into_iter()
            .flatten()
        {
            errors.push(format!("{field}[{k}]"), problem);
        }
    }
}

fn check_header(
    errors: &mut ValidationErrors,
    api_version: &str,
    kind: &str,
    want_kind: &str,
    meta: &ObjectMeta,
) {
    if api_version != API_VERSION {
        errors.push(
            "apiVersion",
            format!("{api_version:?} is not supported; use {API_VERSION:?}"),
        );
    }
    if kind != want_kind {
        errors.push("kind", format!("{kind:?} is not {want_kind:?}"));
    }
    if let Some(p) = dns1123_label_problem(&meta.name) {
        errors.push("metadata.name", p);
    }
    check_labels(
        errors,
        "metadata.labels",
        meta.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    for key in meta.annotations.keys() {
        if let Some(p) = label_key_problem(key) {
            errors.push(format!("metadata.annotations[{key}]"), p);
        }
    }
    let annotation_bytes: usize = meta
        .annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if annotation_bytes > MAX_ANNOTATION_BYTES {
        errors.push(
            "metadata.annotations",
            format!(
                "{annotation_bytes} bytes in all is over the limit of {MAX_ANNOTATION_BYTES} (256 KiB)"
            ),
        );
    }
}

/// Keys and values of an object's annotations together, at most (Kubernetes' limit). One write
/// of a Volume carries it and its copies in the machine views it concerns (up to three) in one
/// etcd transaction, which must stay under etcd's request limit (`--max-request-bytes`, 1.5 MiB
/// by default).
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;

/// Checks a Volume; `Err` lists every problem.
pub fn validate_volume(v: &Volume) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    check_header(&mut errors, &v.api_version, &v.kind, "Volume", &v.metadata);
    let spec = &v.spec;
    if spec.size.bytes() < MIB {
        errors.push(
            "spec.size",
            format!("{} is below the minimum of 1Mi", spec.size),
        );
    }
    if spec.dilation > MAX_DILATION_PERCENT {
        errors.push(
            "spec.dilation",
            format!(
                "{} is out of range: 0 to {MAX_DILATION_PERCENT} percent",
                spec.dilation
            ),
        );
    }
    if let Some(source) = &spec.source {
        match (&source.volume, &source.snapshot) {
            (Some(_), Some(_)) | (None, None) => errors.push(
                "spec.source",
                "name exactly one of volume (a clone) or snapshot (a restore)",
            ),
            (Some(volume), None) => {
                if let Some(p) = dns1123_label_problem(volume) {
                    errors.push("spec.source.volume", p);
                } else if *volume == v.metadata.name {
                    errors.push("spec.source.volume", "a volume cannot be a clone of itself");
                }
            }
            (None, Some(snapshot)) => {
                if let Some(p) = dns1123_label_problem(snapshot) {
                    errors.push("spec.source.snapshot", p);
                }
            }
        }
    }
    if let Some(schedule) = &spec.snapshots {
        match schedule.period() {
            None => errors.push(
                "spec.snapshots.every",
                format!(
                    "{:?} is not a duration; write e.g. 1h, 30m or 10s",
                    schedule.every
                ),
            ),
            Some(p) if p < std::time::Duration::from_secs(1) => errors.push(
                "spec.snapshots.every",
                format!("{:?} is below the minimum of 1s", schedule.every),
            ),
            Some(_) => {}
        }
        if !(1..=crate::snapshot::MAX_KEEP).contains(&schedule.keep) {
            errors.push(
                "spec.snapshots.keep",
                format!(
                    "{} is out of range: 1 to {}",
                    schedule.keep,
                    crate::snapshot::MAX_KEEP
                ),
            );
        }
    }
    if let Some(placement) = &spec.placement {
        check_labels(
            &mut errors,
            "spec.placement.selector",
            placement
                .selector
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
    }
    if let Some(machine) = &spec.machine {
        if let Some(p) = dns1123_label_problem(machine) {
            errors.push("spec.machine", p);
        }
    }
    if let Some(export) = &spec.export {
        for (i, client) in export.clients.iter().enumerate() {
            if let Some(p) = export_host_problem(&client.host) {
                errors.push(format!("spec.export.clients[{i}].host"), p);
            }
            if export.clients[..i].iter().any(|c| c.host == client.host) {
                errors.push(
                    format!("spec.export.clients[{i}].host"),
                    format!("{:?} is listed twice", client.host),
                );
            }
        }
    }
    errors.into_result()
}

/// Checks a change to a stored Volume (`old` → `new`) beyond what [`validate_volume`] checks:
/// fields fixed at creation. `Err` lists every problem.
pub fn validate_volume_update(old: &Volume, new: &Volume) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    if old.spec.source != new.spec.source {
        let was = match &old.spec.source {
            Some(s) => format!("from {}", s.describe()),
            None => "empty".into(),
        };
        errors.push(
            "spec.source",
            format!("is immutable: the volume was created {was}; create a new volume instead"),
        );
    }
    errors.into_result()
}

/// Checks a Claim; `Err` lists every problem (a template is checked as the Volume it makes).
pub fn validate_claim(c: &Claim) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    check_header(&mut errors, &c.api_version, &c.kind, "Claim", &c.metadata);
    if let Some(p) = export_host_problem(&c.spec.host) {
        errors.push("spec.host", p);
    }
    check_labels(
        &mut errors,
        "spec.selector",
        c.spec
            .selector
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    match &c.spec.group {
        Some(g) => {
            if let Some(p) = label_value_problem(g).or_else(|| dns1123_label_problem(g)) {
                errors.push("spec.group", p);
            }
        }
        None if c.spec.strategy == ClaimStrategy::Ordinal => errors.push(
            "spec.group",
            "is required with strategy ordinal: ordinals are numbered per group",
        ),
        None => {}
    }
    if let Some(spec) = &c.spec.create {
        let v = crate::volume::Volume::new(c.metadata.name.clone(), spec.clone());
        if let Err(e) = validate_volume(&v) {
            for fe in e.0 {
                if let Some(rest) = fe.field.strip_prefix("spec.") {
                    errors.push(format!("spec.create.{rest}"), fe.message);
                }
            }
        }
    }
    if let Some(h) = c.spec.hold_seconds {
        if !HOLD_SECONDS.contains(&h) {
            errors.push(
                "spec.holdSeconds",
                format!(
                    "{h} is out of range: {} to {} seconds",
                    HOLD_SECONDS.start(),
                    HOLD_SECONDS.end()
                ),
            );
        }
    }
    errors.into_result()
}

/// Checks a change to a stored Claim: its strategy and group are fixed at creation (they decide
/// which volume and number it holds).
pub fn validate_claim_update(old: &Claim, new: &Claim) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    if old.spec.strategy != new.spec.strategy {
        errors.push(
            "spec.strategy",
            "is immutable: delete the claim and create it again",
        );
    }
    if old.spec.group != new.spec.group {
        errors.push(
            "spec.group",
            "is immutable: delete the claim and create it again",
        );
    }
    errors.into_result()
}

/// Checks a Snapshot; `Err` lists every problem.
pub fn validate_snapshot(s: &Snapshot) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    check_header(
        &mut errors,
        &s.api_version,
        &s.kind,
        "Snapshot",
        &s.metadata,
    );
    if let Some(p) = dns1123_label_problem(&s.spec.volume) {
        errors.push("spec.volume", p);
    }
    errors.into_result()
}

/// Checks a change to a stored Snapshot: its volume is fixed at creation.
pub fn validate_snapshot_update(old: &Snapshot, new: &Snapshot) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    if old.spec != new.spec {
        errors.push(
            "spec.volume",
            format!(
                "is immutable: the snapshot is of volume {}; create a new snapshot",
                old.spec.volume
            ),
        );
    }
    errors.into_result()
}

/// Checks a Machine; `Err` lists every problem.
pub fn validate_machine(m: &Machine) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    check_header(&mut errors, &m.api_version, &m.kind, "Machine", &m.metadata);
    if !(1..=100).contains(&m.spec.max_fill) {
        errors.push(
            "spec.maxFill",
            format!("{} is out of range: 1 to 100 percent", m.spec.max_fill),
        );
    }
    let address = &m.spec.address;
    if !address.is_empty() && address.parse::<IpAddr>().is_err() && !is_hostname(address) {
        errors.push(
            "spec.address",
            format!("{address:?} must be an IP address or a hostname"),
        );
    }
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Access, Export, ExportClient, VolumeSpec};

    fn volume(name: &str) -> Volume {
        Volume::new(
            name,
            VolumeSpec {
                size: "1Gi".parse().unwrap(),
                ..Default::default()
            },
        )
    }

    fn fields(r: Result<(), ValidationErrors>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_plain_volume_is_valid() {
        assert_eq!(validate_volume(&volume("media-site-42")), Ok(()));
    }

    #[test]
    fn annotations_are_bounded_in_all_so_a_write_with_its_view_copies_fits_one_etcd_request() {
        let mut v = volume("big");
        v.metadata
            .annotations
            .insert("example.com/notes".into(), "x".repeat(MAX_ANNOTATION_BYTES));
        assert_eq!(fields(validate_volume(&v)), ["metadata.annotations"]);
        let message = validate_volume(&v).unwrap_err().0.remove(0).message;
        assert!(message.contains("256 KiB"), "{message}");
        v.metadata
            .annotations
            .insert("example.com/notes".into(), "x".repeat(1024));
        assert_eq!(validate_volume(&v), Ok(()));
    }

    #[test]
    fn names_must_be_dns_labels_so_they_are_safe_as_paths() {
        for bad in ["../etc", "A_B", "", "-x", "x-", "a/b", &"a".repeat(64)] {
            assert_eq!(
                fields(validate_volume(&volume(bad))),
                ["metadata.name"],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_source_names_one_volume_or_one_snapshot_and_a_schedule_is_bounded() {
        let mut v = volume("restored");
        v.spec.source = Some(Box::new(crate::VolumeSource::snapshot("db-1")));
        assert_eq!(validate_volume(&v), Ok(()));
        v.spec.source = Some(Box::new(crate::VolumeSource {
            volume: Some("a".into()),
            snapshot: Some("b".into()),
        }));
        assert_eq!(fields(validate_volume(&v)), ["spec.source"]);
        v.spec.source = Some(Box::new(crate::VolumeSource::snapshot("Bad_Name")));
        v.spec.snapshots = Some(Box::new(crate::SnapshotSchedule {
            every: "soon".into(),
            keep: 0,
        }));
        assert_eq!(
            fields(validate_volume(&v)),
            [
                "spec.source.snapshot",
                "spec.snapshots.every",
                "spec.snapshots.keep"
            ]
        );
        v.spec.source = None;
        v.spec.snapshots = Some(Box::new(crate::SnapshotSchedule {
            every: "500ms".into(),
            keep: 24,
        }));
        let e = validate_volume(&v).unwrap_err();
        assert!(e.to_string().contains("minimum of 1s"), "{e}");
        v.spec.snapshots.as_mut().unwrap().every = "1h".into();
        assert_eq!(validate_volume(&v), Ok(()));
    }

    #[test]
    fn a_snapshot_names_a_volume_that_cannot_change() {
        let s = crate::Snapshot::new("db-1", "db");
        assert_eq!(validate_snapshot(&s), Ok(()));
        let bad = crate::Snapshot::new("db-1", "../db");
        assert_eq!(fields(validate_snapshot(&bad)), ["spec.volume"]);
        let other = crate::Snapshot::new("db-1", "web");
        assert_eq!(
            fields(validate_snapshot_update(&s, &other)),
            ["spec.volume"]
        );
        assert_eq!(validate_snapshot_update(&s, &s.clone()), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_with_its_field_path() {
        let mut v = volume("ok");
        v.spec.size = crate::Quantity::from_bytes(1000);
        v.spec.dilation = 5000;
        v.spec.export = Some(Export {
            clients: vec![
                ExportClient {
                    host: "10.0.0.0/24".into(),
                    access: Access::Rw,
                    root_squash: true,
                },
                ExportClient {
                    host: "not a host!".into(),
                    access: Access::Ro,
                    root_squash: true,
                },
                ExportClient {
                    host: "10.0.0.1/40".into(),
                    access: Access::Ro,
                    root_squash: true,
                },
            ],
        });
        let errs = validate_volume(&v).unwrap_err();
        let got: Vec<&str> = errs.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            got,
            [
                "spec.size",
                "spec.dilation",
                "spec.export.clients[1].host",
                "spec.export.clients[2].host"
            ]
        );
        assert!(errs.0[0].message.contains("1Mi"));
        assert!(errs.0[2].message.contains("CIDR"));
    }

    #[test]
    fn export_hosts_accept_ips_cidrs_and_hostnames() {
        for ok in [
            "10.0.0.12",
            "10.0.0.0/24",
            "fd00::1",
            "fd00::/64",
            "client-1.example.org",
            "localhost",
        ] {
            assert_eq!(export_host_problem(ok), None, "{ok}");
        }
        for bad in ["", "a..b", "10.0.0.0/33", "x/24", "-a.b", "a b"] {
            assert!(export_host_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn labels_and_selectors_are_checked() {
        let mut v = volume("ok");
        v.metadata.labels.insert("bad key!".into(), "v".into());
        v.spec.placement = Some(crate::Placement {
            selector: [("disk".to_string(), "-ssd".to_string())].into(),
        });
        assert_eq!(
            fields(validate_volume(&v)),
            ["metadata.labels[bad key!]", "spec.placement.selector[disk]"]
        );
    }

    #[test]
    fn clone_of_itself_and_bad_machine_names_are_refused() {
        let mut v = volume("a");
        v.spec.source = Some(Box::new(crate::VolumeSource::volume("a")));
        v.spec.machine = Some("Node_1".into());
        assert_eq!(
            fields(validate_volume(&v)),
            ["spec.source.volume", "spec.machine"]
        );
    }

    #[test]
    fn machine_fill_and_address_are_checked() {
        let mut m = Machine::new("node-1", Default::default());
        assert_eq!(validate_machine(&m), Ok(()));
        m.spec.max_fill = 0;
        m.spec.address = "bad address".into();
        assert_eq!(
            fields(validate_machine(&m)),
            ["spec.maxFill", "spec.address"]
        );
    }
}
