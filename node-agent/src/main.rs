//! `cobalt-agent`: reads config and flags, takes the state-directory lock, opens the pool,
//! registers the machine and reconciles its volumes until SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use clap::Parser;
use cobalt_agent::backend::btrfs::BtrfsBackend;
use cobalt_agent::backend::Backend;
use cobalt_agent::config::{AgentConfig, Cli, Command, PoolCommand};
use cobalt_agent::exporter::ganesha::GaneshaExporter;
use cobalt_agent::exporter::kernel::KernelExporter;
use cobalt_agent::exporter::{Exporter, NoExporter};
use cobalt_agent::lock::StateLock;
use cobalt_agent::volumes::{export_spec, Exports, VolumeAgent};
use cobalt_agent::{pool, registration};
use cobalt_api::Volume;
use cobalt_reconcile::reflector::reflect;
use cobalt_reconcile::{Cache, CancellationToken, Config, Controller};
use cobalt_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Pool(p)) = &cli.command {
        return match p {
            PoolCommand::Create { image, size, mount } => pool::create(image, size.bytes(), mount),
            PoolCommand::Destroy { image, mount } => pool::destroy(image, mount),
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = AgentConfig::load(&cli.flags)?;
    let _lock = StateLock::acquire(&config.state_dir)?;
    let backend: Arc<dyn Backend> = {
        let pool = config.backend.pool.clone();
        Arc::new(tokio::task::spawn_blocking(move || BtrfsBackend::open(pool)).await??)
    };
    let store = Store::connect(&config.etcd)
        .await
        .context("etcd configuration")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cobalt_reconcile::shutdown::cancel_on_signal(
        shutdown.clone(),
    ));

    let mut registry = prometheus_client::registry::Registry::default();
    let reconcile_metrics = cobalt_reconcile::Metrics::new(&mut registry);
    cobalt_agent::metrics::register(&mut registry);
    let registry = Arc::new(registry);

    // Registration waits for etcd without blocking the rest: the agent serves health meanwhile.
    let name = config.machine.clone();
    let mut tasks = vec![tokio::spawn({
        let (store, name, address, labels, stop) = (
            store.clone(),
            name.clone(),
            config.address.clone(),
            config.labels.clone(),
            shutdown.clone(),
        );
        async move {
            while let Err(e) = registration::register(&store, &name, &address, &labels).await {
                tracing::warn!(error = %e, "cannot register the machine yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            tracing::info!(machine = %name, "registered");
        }
    })];
    tasks.push(tokio::spawn(registration::keep_alive(
        store.clone(),
        name.clone(),
        config.lease_ttl,
        shutdown.clone(),
    )));
    let volumes = Cache::<Volume>::new();
    tasks.push(tokio::spawn(reflect(
        store.clone(),
        volumes.clone(),
        Some(reconcile_metrics.clone()),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(registration::report_status(
        store.clone(),
        name.clone(),
        backend.clone(),
        volumes.clone(),
        shutdown.clone(),
    )));
    let exporter: Arc<dyn Exporter> = match config.exporter.kind.as_str() {
        "ganesha" => Arc::new(GaneshaExporter::new(
            config.state_dir.join("ganesha"),
            config.exporter.port,
        )),
        "kernel" => Arc::new(KernelExporter::new(config.exporter.port)),
        _ => Arc::new(NoExporter),
    };
    let exports = Arc::new(Exports::new(exporter.clone()));
    // Start from the full export set, so volumes not yet reconciled keep their exports (no blip).
    {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = volumes.ready() => {}
        }
        let mut set = cobalt_agent::exporter::ExportSet::new();
        for v in volumes.list() {
            let here = v.spec.machine.as_deref() == Some(name.as_str());
            if here
                && !v.metadata.is_deleting()
                && backend.get(&v.metadata.uid).ok().flatten().is_some()
            {
                set.insert(v.metadata.name.clone(), export_spec(&v, backend.as_ref()));
            }
        }
        if let Err(e) = exports.replace_all(set).await {
            tracing::error!(error = %e, "applying the exports at start failed; the reconciler retries");
        }
    }
    tasks.push(tokio::spawn({
        let (exporter, stop) = (exporter.clone(), shutdown.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let e = exporter.clone();
                if let Ok(Err(err)) = tokio::task::spawn_blocking(move || e.supervise()).await {
                    tracing::warn!(error = %err, "exporter supervision");
                }
            }
        }
    }));
    tasks.push(tokio::spawn(cobalt_agent::volumes::report_usage(
        store.clone(),
        name.clone(),
        backend.clone(),
        volumes.clone(),
        config.usage_refresh,
        shutdown.clone(),
    )));
    let agent = VolumeAgent {
        machine: name.clone(),
        address: config.address.clone(),
        store: store.clone(),
        backend,
        exports,
    };
    let controller_config = Config {
        name: "volume-agent".into(),
        // Reconciles mostly wait on etcd and the exporter; more in flight means bigger export
        // batches (one reload for many volumes) in a burst.
        concurrency: 16,
        resync: Duration::from_secs(300),
        ..Config::default()
    };
    tasks.push(tokio::spawn(
        Controller::new(volumes, agent, controller_config)
            .with_metrics(reconcile_metrics)
            .run(shutdown.clone()),
    ));

    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                    text
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(machine = %name, pool = %config.backend.pool.display(), listen = %config.listen, "agent running");
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let _ = tokio::task::spawn_blocking(move || exporter.stop()).await;
    tracing::info!("stopped");
    Ok(())
}
