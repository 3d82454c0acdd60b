//! JSON Schemas of the kinds, generated from the Rust types so they cannot drift.
//!
//! `make schemas` writes them to `schemas/` (checked in, so editors and CI tools can use them via
//! the `# yaml-language-server: $schema=…` line in each example); a test fails when the checked-in
//! files are stale.

use crate::{Claim, Machine, Snapshot, Volume};

/// `(file name, pretty JSON)` for every schema this release publishes.
pub fn all() -> Vec<(&'static str, String)> {
    let render = |schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        text
    };
    vec![
        ("volume.json", render(schemars::schema_for!(Volume))),
        ("machine.json", render(schemars::schema_for!(Machine))),
        ("snapshot.json", render(schemars::schema_for!(Snapshot))),
        ("claim.json", render(schemars::schema_for!(Claim))),
    ]
}
