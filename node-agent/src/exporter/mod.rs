//! Exporters make a machine's NFS exports match a desired set, declaratively: [`Exporter::apply`]
//! gets the *full* set every time and changes only what differs, so it is idempotent and an
//! agent restart changes nothing for volumes whose export did not change.
//!
//! Rules: no clients listed → exported to nobody (no export at all); `rootSquash` defaults to
//! true; hosts were validated by the API (IP, CIDR, hostname).

pub mod batch;
pub mod ganesha;
pub mod kernel;

use std::collections::{BTreeMap, HashMap, HashSet};
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

/// Ids are in 1..=ID_SPACE (ganesha's Export_Id is 16 bits; the same range serves fsids).
const ID_SPACE: u32 = 60_000;

/// A stable small id per volume (ganesha Export_Id, kernel fsid), from its uid: where
/// [`assign_ids`] starts looking.
pub fn stable_id(uid: &str) -> u32 {
    // FNV-1a: stable across builds and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in uid.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    1 + h % ID_SPACE
}

/// Gives each export of a configuration an id no other export of it has — a hash alone
/// collides (hundreds of exports in 60,000 ids: likely), and two exports with one id is a
/// refused ganesha reload (every export on the machine stuck) or, with the kernel's fsid, file
/// handles of one volume resolving in another.
///
/// `wanted`: (key, seed) per export, the key naming it (its path) and the seed its
/// [`stable_id`]. `previous`: key → id in the configuration in force; an export keeps its id
/// while no other claims it first. A new export takes its seed's id, or the next one free —
/// free meaning used neither in the new configuration nor by another key in the one in force
/// (the server still holds those until it reloads). Deterministic: the same inputs, the same ids.
pub fn assign_ids(
    wanted: &[(String, String)],
    previous: &HashMap<String, u32>,
) -> HashMap<String, u32> {
    let held: HashMap<u32, &str> = previous.iter().map(|(k, id)| (*id, k.as_str())).collect();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut out = HashMap::new();
    // Exports already in force keep their ids (in key order, so a clash in the old
    // configuration resolves the same way every time).
    let mut keep: Vec<&(String, String)> = wanted
        .iter()
        .filter(|(k, _)| previous.contains_key(k))
        .collect();
    keep.sort();
    for (key, _) in keep {
        let id = previous[key];
        if taken.insert(id) {
            out.insert(key.clone(), id);
        }
    }
    let mut fresh: Vec<&(String, String)> = wanted
        .iter()
        .filter(|(k, _)| !out.contains_key(k))
        .collect();
    fresh.sort();
    for (key, seed) in fresh {
        let mut id = stable_id(seed);
        // At most ID_SPACE probes: more exports than ids cannot be served anyway, and the
        // server refuses them by name.
        for _ in 0..ID_SPACE {
            let busy = taken.contains(&id) || held.get(&id).is_some_and(|k| *k != key.as_str());
            if !busy {
                break;
            }
            id = id % ID_SPACE + 1;
        }
        taken.insert(id);
        out.insert(key.clone(), id);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("/exports/v{i}"), format!("uid-{i}")))
            .collect()
    }

    #[test]
    fn thousands_of_exports_get_distinct_ids_and_keep_them_as_others_come_and_go() {
        let first = assign_ids(&wanted(3000), &HashMap::new());
        let ids: HashSet<u32> = first.values().copied().collect();
        assert_eq!(ids.len(), 3000, "every export its own id");
        assert!(ids.iter().all(|id| (1..=ID_SPACE).contains(id)));
        // The hash alone collides at this size (what made ganesha refuse reloads).
        let hashed: HashSet<u32> = wanted(3000).iter().map(|(_, s)| stable_id(s)).collect();
        assert!(hashed.len() < 3000);
        // Half go, new ones come: those that stay keep their ids, no new one takes an id the
        // server still holds for an export leaving in the same reload.
        let mut next: Vec<(String, String)> = wanted(3000).into_iter().step_by(2).collect();
        next.extend((3000..4500).map(|i| (format!("/exports/v{i}"), format!("uid-{i}"))));
        let second = assign_ids(&next, &first);
        let ids: HashSet<u32> = second.values().copied().collect();
        assert_eq!(ids.len(), next.len());
        for (key, _) in next.iter().filter(|(k, _)| first.contains_key(k)) {
            assert_eq!(second[key], first[key], "{key} keeps its id");
        }
        for (key, _) in next.iter().filter(|(k, _)| !first.contains_key(k)) {
            let held_by_other = first.iter().any(|(k, id)| *id == second[key] && k != key);
            assert!(
                !held_by_other,
                "{key} took an id still held by another export"
            );
        }
        assert_eq!(assign_ids(&next, &first), second, "deterministic");
    }
}
