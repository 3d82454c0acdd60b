//! Reading `-f FILE|DIR|-` into validated objects, with errors naming the file (and for YAML
//! errors the line and column). Nothing is sent unless every document of every file is valid.

use std::io::Read;
use std::path::{Path, PathBuf};

use cobalt_api::manifest::{parse_manifests, Manifest};
use serde_json::Value;

use crate::kinds::Kind;

/// One object to apply: its kind, name, and the manifest as JSON.
pub struct Object {
    pub kind: Kind,
    pub name: String,
    pub value: Value,
}

fn files(path: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
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
/// reading the server's side while the rest of the files are parsed).
pub fn load_each(
    sources: &[String],
    recursive: bool,
    mut each: impl FnMut(&Object),
) -> anyhow::Result<Vec<Object>> {
    let mut texts: Vec<(String, String)> = Vec::new();
    for source in sources {
        if source == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            texts.push(("<stdin>".into(), text));
            continue;
        }
        let mut paths = Vec::new();
        files(Path::new(source), recursive, &mut paths)
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        for p in paths {
            let text =
                std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            texts.push((p.display().to_string(), text));
        }
    }
    let mut objects = Vec::new();
    for (name, text) in texts {
        for m in parse_manifests(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))? {
            let (kind, value) = match &m {
                Manifest::Volume(v) => (Kind::Volume, serde_json::to_value(v)?),
                Manifest::Machine(mm) => (Kind::Machine, serde_json::to_value(mm)?),
                Manifest::Snapshot(sn) => (Kind::Snapshot, serde_json::to_value(sn)?),
                Manifest::Claim(cl) => (Kind::Claim, serde_json::to_value(cl)?),
            };
            let object = Object {
                kind,
                name: m.name().to_string(),
                value,
            };
            each(&object);
            objects.push(object);
        }
    }
    Ok(objects)
}
