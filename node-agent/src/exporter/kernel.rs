//! The kernel NFS exporter: `/etc/exports.d/cobalt.exports` (one line per volume, an fsid of its own,
//! rw/ro, root_squash/no_root_squash, sync) and `exportfs -ra` to apply it. Written only when
//! the content changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use cobalt_api::Access;

use super::{assign_ids, write_if_changed, ExportError, ExportSet, Exporter};

pub struct KernelExporter {
    pub file: PathBuf,
    /// `exportfs`, or a stand-in in tests.
    pub exportfs: PathBuf,
    pub port: u16,
}

impl KernelExporter {
    pub fn new(port: u16) -> Self {
        KernelExporter {
            file: "/etc/exports.d/cobalt.exports".into(),
            exportfs: "exportfs".into(),
            port,
        }
    }
}

/// The fsid of each exported path in an exports file's text (what the kernel has in force).
pub fn fsids_in_force(text: &str) -> HashMap<String, u32> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (path, rest) = l.split_once(' ')?;
            let fsid = rest.split("fsid=").nth(1)?;
            let fsid: String = fsid.chars().take_while(char::is_ascii_digit).collect();
            Some((path.to_string(), fsid.parse().ok()?))
        })
        .collect()
}

/// The exports file for `set` (pure), each export with an fsid of its own ([`assign_ids`]),
/// keeping those of `in_force` (from [`fsids_in_force`]).
pub fn render(set: &ExportSet, in_force: &HashMap<String, u32>) -> String {
    let mut out = String::from("# Written by cobalt-agent; edits are overwritten.\n");
    let requests: Vec<(String, String)> = set
        .values()
        .filter(|e| !e.clients.is_empty())
        .map(|e| (e.source.display().to_string(), e.uid.clone()))
        .collect();
    let ids = assign_ids(&requests, in_force);
    for e in set.values().filter(|e| !e.clients.is_empty()) {
        let fsid = ids[&e.source.display().to_string()];
        let rules: Vec<String> = e
            .clients
            .iter()
            .map(|c| {
                format!(
                    "{}({},sync,no_subtree_check,{},fsid={})",
                    c.host,
                    match c.access {
                        Access::Rw => "rw",
                        Access::Ro => "ro",
                    },
                    if c.root_squash {
                        "root_squash"
                    } else {
                        "no_root_squash"
                    },
                    fsid
                )
            })
            .collect();
        out.push_str(&format!("{} {}\n", e.source.display(), rules.join(" ")));
    }
    out
}

impl Exporter for KernelExporter {
    fn apply(&self, set: &ExportSet) -> Result<(), ExportError> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ExportError::Io {
                op: "create",
                path: dir.into(),
                source,
            })?;
        }
        let in_force = fsids_in_force(&std::fs::read_to_string(&self.file).unwrap_or_default());
        if !write_if_changed(&self.file, &render(set, &in_force))? {
            return Ok(());
        }
        let out = Command::new(&self.exportfs)
            .arg("-ra")
            .output()
            .map_err(|e| ExportError::Command {
                command: format!("{} -ra", self.exportfs.display()),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(ExportError::Command {
                command: format!("{} -ra", self.exportfs.display()),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn port(&self) -> u16 {
        self.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exporter::ExportSpec;
    use cobalt_api::ExportClient;

    #[test]
    fn fsids_are_read_back_and_kept_when_another_export_comes() {
        let spec = |name: &str, uid: &str| ExportSpec {
            name: name.into(),
            uid: uid.into(),
            source: format!("/pool/{uid}").into(),
            clients: vec![ExportClient {
                host: "10.0.0.0/24".into(),
                access: Access::Rw,
                root_squash: true,
            }],
        };
        let mut set = ExportSet::new();
        set.insert("a".into(), spec("a", "u-a"));
        let text = render(&set, &HashMap::new());
        let first = fsids_in_force(&text);
        // Another export comes: a keeps its fsid, the new one gets a different one.
        set.insert("b".into(), spec("b", "u-b"));
        let again = fsids_in_force(&render(&set, &first));
        assert_eq!(again["/pool/u-a"], first["/pool/u-a"]);
        assert_ne!(again["/pool/u-b"], again["/pool/u-a"]);
    }
}
