//! Cobalt's generic reconcile runtime: the engine under both the scheduler and the node agents.
//!
//! A pipeline of small stages, each owning one promise:
//!
//! | stage | module | promise |
//! |---|---|---|
//! | reflector | [`reflector`] | the cache equals etcd: list at R, watch from R+1, relist on compaction, resume after restarts |
//! | cache | [`cache`] | in-memory reads; every change announced, a lagging reader told to resync everything |
//! | queue | [`queue`] | one entry per key, earliest run-at wins, one in flight per key, re-run after a mid-run change, fresh before resync, per-key backoff |
//! | runner | [`controller`] | bounded concurrency, read-your-writes, periodic resync, secondary watches, graceful shutdown, spans and metrics |
//!
//! ```no_run
//! use std::sync::Arc;
//! use cobalt_api::Volume;
//! use cobalt_reconcile::{Action, Cache, Config, Context, Controller, Reconciler};
//!
//! struct Echo;
//! impl Reconciler<Volume> for Echo {
//!     type Error = std::convert::Infallible;
//!     async fn reconcile(&self, v: Arc<Volume>, _ctx: Context<Volume>) -> Result<Action, Self::Error> {
//!         println!("{} wants {}", v.metadata.name, v.spec.size);
//!         Ok(Action::Done)
//!     }
//! }
//! # async fn run(store: cobalt_store::Store) {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let cache = Cache::<Volume>::new();
//! tokio::spawn(cobalt_reconcile::reflector::reflect(store, cache.clone(), None, shutdown.clone()));
//! Controller::new(cache, Echo, Config::default()).run(shutdown).await;
//! # }
//! ```

pub mod backoff;
pub mod cache;
pub mod controller;
pub mod memory;
pub mod metrics;
pub mod queue;
pub mod reflector;
pub mod shutdown;

pub use backoff::Backoff;
pub use cache::{Cache, Change};
pub use controller::{Action, Config, Context, Controller, Reconciler, RequeueHandle};
pub use metrics::Metrics;
pub use tokio_util::sync::CancellationToken;
