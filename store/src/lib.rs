//! Cobalt's resources on etcd.
//!
//! [`Store`] reads and writes typed objects ([`cobalt_api::Volume`], [`cobalt_api::Machine`])
//! in the layout of [`keys`]: each object's metadata+spec and its status live in separate keys,
//! so users (spec) and agents/controllers (status) never conflict. Every write is a guarded
//! transaction ([`objects`]); watches deliver whole-object events in order across etcd restarts
//! ([`watch`]); [`lease`]s carry liveness; [`election`] elects one leader and fences the others.
//!
//! Architecture invariant: the store never interprets spec fields beyond comparing them for
//! `generation`; what a Volume *means* is the business of the scheduler and agents.
//!
//! ```no_run
//! # async fn demo() -> cobalt_store::Result<()> {
//! use cobalt_store::{EtcdConfig, Store};
//! let store = Store::connect(&EtcdConfig::new(vec!["http://127.0.0.1:2379".into()])).await?;
//! let (volumes, revision) = store.list::<cobalt_api::Volume>(&Default::default()).await?;
//! let mut watch = store.watch_after_list(&volumes, revision);
//! let event = watch.next().await?;
//! # Ok(()) }
//! ```

pub mod claims;
pub mod connection;
pub mod election;
pub mod error;
pub mod events;
pub mod keys;
pub mod lease;
pub mod liveness;
pub mod logging;
pub mod objects;
pub mod remote;
pub mod views;
pub mod watch;

pub use claims::{Bind, ClaimRef};
pub use connection::{
    EtcdConfig, EtcdFlags, Store, TlsFiles, DEFAULT_REQUEST_TIMEOUT, ENDPOINT_PROBE,
};
pub use election::{Fence, Leadership};
pub use error::{Error, Result};
pub use events::{Recorder, DEFAULT_EVENT_TTL};
pub use lease::Lease;
pub use objects::{Deleted, StatusUpdate, Stored};
pub use remote::{RemoteWrites, StatusPrecondition};
pub use views::{Repaired, Scope};
pub use watch::{ResourceWatch, WatchEvent};
