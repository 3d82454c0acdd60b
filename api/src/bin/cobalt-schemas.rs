//! Writes Cobalt's JSON Schemas into a directory: `cobalt-schemas schemas/`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "schemas".into()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in cobalt_api::schema::all() {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
