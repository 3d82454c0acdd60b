//! `cobaltctl`, the Cobalt command line: kubectl's conventions over Cobalt's HTTP API.
//! The binary is argument parsing; the verbs live in [`commands`], the three-way merge behind
//! `apply` in [`merge`], output in [`output`].

pub mod claim;
pub mod client;
pub mod commands;
pub mod kinds;
pub mod manifests;
pub mod merge;
pub mod output;
