//! Exporters make a machine's NFS exports match a desired set, declaratively: [`Exporter::apply`]
//! gets the *full* set every time and changes only what differs, so it is idempotent and an
//! agent restart changes nothing for volumes whose export did not change.
//!
//! Rules: no clients listed → exported to nobody (no export at all); `rootSquash` defaults to
//! true; hosts were validated by the API (IP, CIDR, hostname).

pub mod batch;
pub mod ganesha;
pub mod kernel;

use std::collections::BTreeMap;
use std::path::PathBuf;

use cobalt_api::{Access, ExportClient};

/// One volume's export as the exporter needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSpec {
    /// The volume name: the NFS pseudo path is `/<name>`.
    pub name: String,
    pub uid: String,
    /// The volume's files (its subvolume).
    pub source: PathBuf,
    pub clients: Vec<ExportClient>,
}

/// Desired exports by volume name.
pub type ExportSet = BTreeMap<String, ExportSpec>;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
}

pub trait Exporter: Send + Sync + 'static {
    /// Makes the exports exactly `set`.
    fn apply(&self, set: &ExportSet) -> Result<(), ExportError>;
    /// The NFS port clients use.
    fn port(&self) -> u16;
    /// Restarts what the exporter runs if it died; called periodically.
    fn supervise(&self) -> Result<(), ExportError> {
        Ok(())
    }
    /// Stops what the exporter runs (on agent shutdown).
    fn stop(&self) {}
}

/// No NFS: volumes are provisioned but not exported (`exporter.kind: none`).
pub struct NoExporter;

impl Exporter for NoExporter {
    fn apply(&self, _set: &ExportSet) -> Result<(), ExportError> {
        Ok(())
    }
    fn port(&self) -> u16 {
        0
    }
}

/// A human summary of the rules, for the Exported condition.
pub fn describe_rules(clients: &[ExportClient]) -> String {
    clients
        .iter()
        .map(|c| {
            format!(
                "{} {}{}",
                c.host,
                match c.access {
                    Access::Rw => "rw",
                    Access::Ro => "ro",
                },
                if c.root_squash {
                    " root_squash"
                } else {
                    " no_root_squash"
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A stable small id per volume (ganesha Export_Id, kernel fsid), from its uid.
pub fn stable_id(uid: &str) -> u32 {
    // FNV-1a: stable across builds and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in uid.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    1 + h % 60_000
}

pub(crate) fn write_if_changed(path: &std::path::Path, text: &str) -> Result<bool, ExportError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    write_atomically(path, text)?;
    Ok(true)
}

/// Writes `text` to `path` through a temporary file and a rename, so readers never see half.
pub(crate) fn write_atomically(path: &std::path::Path, text: &str) -> Result<(), ExportError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|source| ExportError::Io {
        op: "write",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ExportError::Io {
        op: "rename",
        path: path.into(),
        source,
    })
}
