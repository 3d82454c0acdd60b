//! The Cobalt node agent: one per storage machine. It registers the Machine, holds its liveness
//! lease, and reconciles the volumes bound to it onto a [`backend::Backend`].
//!
//! Architecture invariants: exactly one agent per machine (the state-directory lock); data is
//! destroyed only after a fresh read confirms its Volume is being deleted, its move has cut
//! over elsewhere, or it is a stale copy this machine never published ([`published`]); a
//! volume's data is named by the Volume's uid, never its name.

pub mod api_writes;
pub mod backend;
pub mod config;
pub mod exporter;
pub mod http;
pub mod lock;
pub mod metrics;
pub mod moves;
pub mod plan;
pub mod pool;
pub mod published;
pub mod registration;
pub mod snapshots;
pub mod usage;
pub mod volumes;
