//! The API served in-process on an ephemeral loopback port: what tests (and tools embedding
//! Cobalt) start instead of a `cobalt-controller` process. Same router, same state, no
//! scheduler. It stops when the [`LocalApi`] is dropped.
//!
//! ```ignore
//! let api = LocalApi::start(store, None, Duration::from_secs(1)).await?;
//! reqwest::get(format!("{}/healthz", api.url)).await?;
//! ```

use std::sync::Arc;
use std::time::Duration;

use cobalt_reconcile::CancellationToken;
use cobalt_store::Store;

use super::{router, AppState, HttpMetrics, Tokens, DEFAULT_DEADLINE};

pub struct LocalApi {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stop: CancellationToken,
}

impl LocalApi {
    /// Serves the API over `store` on 127.0.0.1 (a free port), with `tokens` if given and watch
    /// bookmarks every `bookmark_interval`.
    pub async fn start(
        store: Store,
        tokens: Option<Arc<Tokens>>,
        bookmark_interval: Duration,
    ) -> std::io::Result<LocalApi> {
        let mut registry = prometheus_client::registry::Registry::default();
        let stop = CancellationToken::new();
        let state = AppState {
            store,
            tokens,
            deadline: DEFAULT_DEADLINE,
            bookmark_interval,
            http_metrics: HttpMetrics::new(&mut registry),
            registry: Arc::new(registry),
            shutdown: stop.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = router(state);
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
        });
        Ok(LocalApi { url, stop })
    }
}

impl Drop for LocalApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
