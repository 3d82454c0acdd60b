//! `cobalt-controller`: reads config and flags, connects to etcd, serves the API until SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cobalt_controller::config::{ControllerConfig, Flags};
use cobalt_controller::http::{self, AppState, HttpMetrics, Tokens};
use cobalt_controller::scheduler::{self, SchedulerConfig, SchedulerMetrics};
use cobalt_reconcile::CancellationToken;
use cobalt_store::Store;

/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    /// Log format: text or json (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    log_format: cobalt_store::logging::LogFormat,
    /// Print the OpenAPI document and exit.
    #[arg(long, hide = true)]
    print_openapi: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cobalt_reconcile::memory::tune_allocator();
    let cli = Cli::parse();
    if cli.print_openapi {
        print!("{}", cobalt_controller::openapi::document_text());
        return Ok(());
    }
    cobalt_store::logging::init(cli.log_format);
    let config = ControllerConfig::load(&cli.flags)?;
    let store = Store::connect(&config.etcd)
        .await
        .context("etcd configuration")?;
    let tokens = match &config.tokens_file {
        Some(path) => Some(Arc::new(Tokens::load(path)?)),
        None => None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let http_metrics = HttpMetrics::new(&mut registry);
    let scheduler_metrics = SchedulerMetrics::new(&mut registry);
    let reconcile_metrics = cobalt_reconcile::Metrics::new(&mut registry);
    let shutdown = CancellationToken::new();
    tokio::spawn(cobalt_reconcile::shutdown::cancel_on_signal(
        shutdown.clone(),
    ));
    let state = AppState {
        store: store.clone(),
        tokens,
        deadline: http::DEFAULT_DEADLINE,
        bookmark_interval: std::time::Duration::from_secs(10),
        http_metrics,
        registry: Arc::new(registry),
        shutdown: shutdown.clone(),
    };

    let scheduler = tokio::spawn(scheduler::run(
        store.clone(),
        SchedulerConfig {
            identity: config.identity(),
            strategy: config.placement,
            lease_ttl: config.lease_ttl,
            resync: config.resync,
            rebalance: config.rebalance.clone(),
            event_ttl: config.event_ttl,
        },
        scheduler_metrics,
        reconcile_metrics,
        shutdown.clone(),
    ));
    let app = http::router(state);
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(listen = %config.listen, etcd = ?config.etcd.endpoints, tls = config.tls.is_some(), "serving the Cobalt API");
    let stop = shutdown.clone();
    let server = async move {
        match &config.tls {
            Some(tls) => {
                let listener = http::tls::TlsListener::new(tcp, &tls.cert, &tls.key)
                    .map_err(anyhow::Error::msg)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await?
            }
            None => {
                axum::serve(tcp, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await?
            }
        }
        anyhow::Ok(())
    };
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = shutdown.cancelled() => {
            // In-flight requests get a bounded grace period; watches end at once on shutdown.
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; exiting anyway");
            }
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, scheduler).await;
    tracing::info!("stopped");
    Ok(())
}
