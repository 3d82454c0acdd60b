//! The Cobalt controller: the HTTP API (`http`) in front of etcd and, when elected, the scheduler.
//!
//! Architecture invariant: the controller keeps no state of its own — any number can run, and
//! any can be killed at any time.

pub mod config;
pub mod http;
pub mod openapi;
pub mod scheduler;
