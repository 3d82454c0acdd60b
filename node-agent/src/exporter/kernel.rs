//! The kernel NFS exporter: `/etc/exports.d/cobalt.exports` (one line per volume, a stable fsid,
//! rw/ro, root_squash/no_root_squash, sync) and `exportfs -ra` to apply it. Written only when
//! the content changes.

use std::path::PathBuf;
use std::process::Command;

use cobalt_api::Access;

use super::{stable_id, write_if_changed, ExportError, ExportSet, Exporter};

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

/// The exports file for `set` (pure).
pub fn render(set: &ExportSet) -> String {
    let mut out = String::from("# Written by cobalt-agent; edits are overwritten.\n");
    for e in set.values().filter(|e| !e.clients.is_empty()) {
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
                    stable_id(&e.uid)
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
        if !write_if_changed(&self.file, &render(set))? {
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
