//! The Cobalt node agent: one per storage machine. It registers the Machine, holds its liveness
//! lease, and reconciles the volumes bound to it onto a [`backend::Backend`].

pub mod backend;
