//! Reading `-f FILE|DIR|-` into validated objects, with errors naming the file (and for YAML
//! errors the line and column). Nothing is sent unless every document of every file is valid.

use std::io::Read;
use std::path::{Path, PathBuf};

use cobalt_api::manifest::{parse_manifests, Manifest};

use crate::kinds::Kind;
use crate::merge::Applied;

/// One object to apply: its kind, name, and the manifest as `apply` sends it.
pub struct Object {
    pub kind: Kind,
    pub name: String,
    pub manifest: Applied,
}

fn files(path: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<(PathBuf, bool)> = std::fs::read_dir(path)?
            .filter_map(|e| {
                let e = e.ok()?;
                let path = e.path();
                // The entry's own type costs no stat; a symlink is followed like `is_dir` does.
                let is_dir = match e.file_type() {
                    Ok(t) if !t.is_symlink() => t.is_dir(),
                    _ => path.is_dir(),
                };
                Some((path, is_dir))
            })
            .collect();
        entries.sort();
        for (p, is_dir) in entries {
            if is_dir {
                if recursive {
                    files(&p, recursive, out)?;
                }
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(p);
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

pub fn load(sources: &[String], recursive: bool) -> anyhow::Result<Vec<Object>> {
    load_each(sources, recursive, |_| {})
}

/// [`load`], calling `each` with every object as soon as it is read (so a caller can start
/// reading the server's side while the rest of the files are read and parsed: each file is
/// parsed as soon as it is read).
pub fn load_each(
    sources: &[String],
    recursive: bool,
    mut each: impl FnMut(&Object),
) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut parse = |name: &str, text: &str| -> anyhow::Result<()> {
        for m in parse_manifests(text).map_err(|e| anyhow::anyhow!("{name}: {e}"))? {
            let (kind, value) = match &m {
                Manifest::Volume(v) => (Kind::Volume, serde_json::to_value(v)?),
                Manifest::Machine(mm) => (Kind::Machine, serde_json::to_value(mm)?),
                Manifest::Snapshot(sn) => (Kind::Snapshot, serde_json::to_value(sn)?),
                Manifest::Claim(cl) => (Kind::Claim, serde_json::to_value(cl)?),
            };
            let object = Object {
                kind,
                name: m.name().to_string(),
                manifest: Applied::new(&value),
            };
            each(&object);
            objects.push(object);
        }
        Ok(())
    };
    for source in sources {
        if source == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            parse("<stdin>", &text)?;
            continue;
        }
        let mut paths = Vec::new();
        files(Path::new(source), recursive, &mut paths)
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        for p in paths {
            let text =
                std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            parse(&p.display().to_string(), &text)?;
        }
    }
    Ok(objects)
}
