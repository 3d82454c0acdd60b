//! `cobalt-agent`: reads config and flags, takes the state-directory lock, opens the pool, and
//! wires the parts together — registration, liveness, usage reports, the exporter and the volume
//! reconciler — until SIGTERM. The parts live in the library; this file only builds them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use cobalt_agent::backend::btrfs::BtrfsBackend;
use cobalt_agent::backend::loopdev::{Filesystem, LoopBackend};
use cobalt_agent::backend::Backend;
use cobalt_agent::config::{AgentConfig, Cli, Command, ExporterKind, PoolCommand};
use cobalt_agent::exporter::batch::Exports;
use cobalt_agent::exporter::ganesha::GaneshaExporter;
use cobalt_agent::exporter::kernel::KernelExporter;
use cobalt_agent::exporter::{ExportSet, Exporter, NoExporter};
use cobalt_agent::http::Readiness;
use cobalt_agent::lock::StateLock;
use cobalt_agent::moves::Moves;
use cobalt_agent::plan::{role, Role};
use cobalt_agent::registration::{self, Identity};
use cobalt_agent::volumes::{export_spec, VolumeAgent};
use cobalt_agent::{pool, usage};
use cobalt_api::Volume;
use cobalt_reconcile::reflector::{reflect, reflect_in};
use cobalt_reconcile::{Cache, CancellationToken, Config, Controller};
use cobalt_store::{Scope, Store};

/// How often the agent looks for stale copies of volumes served elsewhere (also once at start).
const STALE_SWEEP: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cobalt_reconcile::memory::tune_allocator();
    let cli = Cli::parse();
    if let Some(Command::Pool(p)) = &cli.command {
        return Ok(match p {
            PoolCommand::Create { image, size, mount } => pool::create(image, size.bytes(), mount),
            PoolCommand::Destroy { image, mount } => pool::destroy(image, mount),
        }?);
    }
    cobalt_store::logging::init(cli.log_format);
    let config = AgentConfig::load(&cli.flags)?;
    let _lock = StateLock::acquire(&config.state_dir)?;
    let backend: Arc<dyn Backend> = {
        let pool = config.backend.pool.clone();
        match config.backend.kind.as_str() {
            "loop" => {
                let fs = Filesystem::parse(config.backend.filesystem.as_deref().unwrap_or("ext4"))
                    .map_err(anyhow::Error::msg)?;
                let mounts = config.state_dir.join("loop");
                Arc::new(
                    tokio::task::spawn_blocking(move || LoopBackend::open(pool, mounts, fs))
                        .await??,
                )
            }
            _ => Arc::new(tokio::task::spawn_blocking(move || BtrfsBackend::open(pool)).await??),
        }
    };
    let store = Store::connect(&config.etcd)
        .await
        .context("etcd configuration")?;
    // With `api`, objects and status are written through the controllers' API with the
    // machine's token; etcd is read, and written only for liveness and events.
    let store = match &config.api {
        Some(api) => {
            let writes = cobalt_agent::api_writes::ApiWrites::new(
                &api.server,
                &api.token()?,
                api.ca.as_deref(),
            )
            .map_err(anyhow::Error::msg)?;
            tracing::info!(server = %api.server, "writing objects and status through the API");
            store.with_remote_writes(Arc::new(writes))
        }
        None => store,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cobalt_reconcile::shutdown::cancel_on_signal(
        shutdown.clone(),
    ));

    let mut registry = prometheus_client::registry::Registry::default();
    let reconcile_metrics = cobalt_reconcile::Metrics::new(&mut registry);
    cobalt_agent::metrics::register(&mut registry);
    let registry = Arc::new(registry);
    let readiness = Arc::new(Readiness::default());

    let name = config.machine.clone();
    let me = Identity {
        name: name.clone(),
        address: config.address.clone(),
        labels: config.labels.clone(),
        agent_url: config.agent_url(),
    };
    let volumes = Cache::<Volume>::new();
    let snapshots = Cache::<cobalt_api::Snapshot>::new();
    let claims = Cache::<cobalt_api::Claim>::new();
    let mut tasks = vec![
        tokio::spawn(registration::keep_alive(
            store.clone(),
            name.clone(),
            config.lease_ttl,
            shutdown.clone(),
        )),
        // Only the volumes that concern this machine (its view): a volume event elsewhere in
        // the fleet is neither delivered here nor held in memory.
        tokio::spawn(reflect_in(
            store.clone(),
            Scope::View(name.clone()),
            volumes.clone(),
            Some(reconcile_metrics.clone()),
            shutdown.clone(),
        )),
        tokio::spawn(reflect(
            store.clone(),
            snapshots.clone(),
            Some(reconcile_metrics.clone()),
            shutdown.clone(),
        )),
        tokio::spawn(reflect(
            store.clone(),
            claims.clone(),
            Some(reconcile_metrics.clone()),
            shutdown.clone(),
        )),
        tokio::spawn(registration::run(
            store.clone(),
            me,
            backend.clone(),
            volumes.clone(),
            readiness.clone(),
            shutdown.clone(),
        )),
    ];
    let exporter: Arc<dyn Exporter> = match config.exporter.kind {
        ExporterKind::Ganesha => Arc::new(GaneshaExporter::new(
            config.state_dir.join("ganesha"),
            config.exporter.port,
        )),
        ExporterKind::Kernel => Arc::new(KernelExporter::new(config.exporter.port)),
        ExporterKind::None => Arc::new(NoExporter),
    };
    let exports = Arc::new(Exports::new(exporter.clone()));
    let published = {
        let b = backend.clone();
        Arc::new(
            cobalt_agent::published::Published::open(&config.state_dir, move || {
                Ok(b.list()
                    .map_err(std::io::Error::other)?
                    .into_iter()
                    .map(|r| r.uid)
                    .collect())
            })
            .with_context(|| {
                format!(
                    "cannot read the list of published volumes in {}",
                    config.state_dir.display()
                )
            })?,
        )
    };
    let moves = Moves::new(
        name.clone(),
        config.address.clone(),
        store.clone(),
        backend.clone(),
        exports.clone(),
        published,
        config.moves.clone(),
    );

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tasks.push(tokio::spawn({
        let (app, stop) = (
            cobalt_agent::http::router(readiness.clone(), registry)
                .merge(cobalt_agent::moves::source::router(moves.clone())),
            shutdown.clone(),
        );
        async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }
    }));
    tracing::info!(machine = %name, pool = %config.backend.pool.display(), listen = %config.listen, "agent running");

    // Start from the full export set, so volumes not yet reconciled keep their exports (no blip).
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = volumes.ready() => readiness.volumes_loaded.store(true, Ordering::SeqCst),
    }
    let mut set = ExportSet::new();
    let mut candidates = volumes.list();
    // A copy on the pool whose volume is not in this machine's view is looked up fresh: an etcd
    // whose views have not been written yet (controllers not upgraded first, or restored from an
    // old backup) must not make the agent withdraw what it serves. Normally there is none.
    let in_view: std::collections::HashSet<String> =
        candidates.iter().map(|v| v.metadata.uid.clone()).collect();
    for r in backend.list().unwrap_or_default() {
        if in_view.contains(&r.uid) {
            continue;
        }
        if let Ok(Some(v)) = store.get::<Volume>(&r.name).await {
            if v.metadata.uid == r.uid && role(&v, &name) == Role::Serving {
                tracing::warn!(volume = %r.name, "a volume served here is missing from this machine's view (written by the scheduler leader); exporting it as a fresh read says");
                candidates.push(Arc::new(v));
            }
        }
    }
    for v in candidates {
        let serving = matches!(role(&v, &name), Role::Serving | Role::MoveRequested { .. });
        // A move from here whose cut-over has begun is never served here again.
        let cut_over = v
            .moving()
            .is_some_and(|m| m.from == name && m.stage.is_committed());
        if serving
            && !cut_over
            && !v.metadata.is_deleting()
            && backend.get(&v.metadata.uid).ok().flatten().is_some()
        {
            set.insert(
                v.metadata.name.to_string(),
                export_spec(&v, backend.as_ref()),
            );
        }
    }
    match exports.replace_all(set).await {
        Ok(()) => readiness.exports_applied.store(true, Ordering::SeqCst),
        Err(e) => {
            tracing::error!(error = %e, "applying the exports at start failed; the reconciler retries")
        }
    }
    tasks.push(tokio::spawn(supervise(exporter.clone(), shutdown.clone())));
    if backend.can(cobalt_api::Capability::SendReceive) {
        let m = moves.clone();
        tasks.push(tokio::spawn(async move { m.sweep_staging().await }));
    }
    tasks.push(tokio::spawn(stop_pulls_leaving_view(
        moves.clone(),
        volumes.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn({
        let (m, volumes, stop) = (moves.clone(), volumes.clone(), shutdown.clone());
        async move {
            loop {
                m.sweep_stale_copies(&volumes.list()).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(STALE_SWEEP) => {}
                }
            }
        }
    }));
    tasks.push(tokio::spawn(usage::report_usage(
        store.clone(),
        name.clone(),
        backend.clone(),
        volumes.clone(),
        config.usage_refresh,
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(cobalt_agent::snapshots::report_space(
        store.clone(),
        name.clone(),
        backend.clone(),
        volumes.clone(),
        snapshots.clone(),
        config.usage_refresh,
        shutdown.clone(),
    )));
    let snapshot_agent = cobalt_agent::snapshots::SnapshotAgent::new(
        name.clone(),
        store.clone(),
        backend.clone(),
        volumes.clone(),
    );
    let events =
        cobalt_store::Recorder::start(store.clone(), "cobalt-agent", &name, config.event_ttl);
    let agent = VolumeAgent {
        events: events.clone(),
        machine: name.clone(),
        address: config.address.clone(),
        store: store.clone(),
        backend,
        exports,
        moves,
        snapshots: snapshots.clone(),
        claims: claims.clone(),
    };
    let controller_config = Config {
        name: "volume-agent".into(),
        // Reconciles mostly wait on etcd and the exporter; more in flight means bigger export
        // batches (one reload for many volumes) in a burst.
        concurrency: 16,
        resync: config.resync,
        ..Config::default()
    };
    // A snapshot waits on its volume: a volume change requeues its snapshots.
    let snapshots_of = snapshots.clone();
    tasks.push(tokio::spawn(
        Controller::new(
            snapshots.clone(),
            snapshot_agent,
            Config {
                name: "snapshot-agent".into(),
                concurrency: 4,
                resync: config.resync,
                ..Config::default()
            },
        )
        .watches(volumes.clone(), move |v: &Volume| {
            snapshots_of
                .list()
                .iter()
                .filter(|s| s.spec.volume == v.metadata.name)
                .map(|s| s.metadata.name.to_string())
                .collect()
        })
        .with_metrics(reconcile_metrics.clone())
        .run(shutdown.clone()),
    ));
    // A snapshot change requeues its volume (a delete waiting for its snapshots to go) and the
    // volumes restoring it.
    let volumes_of = volumes.clone();
    tasks.push(tokio::spawn(
        Controller::new(volumes, agent, controller_config)
            .watches(snapshots, move |s: &cobalt_api::Snapshot| {
                let mut keys: Vec<String> = volumes_of
                    .list()
                    .iter()
                    .filter(|v| {
                        v.spec.source.as_ref().and_then(|x| x.snapshot.as_deref())
                            == Some(s.metadata.name.as_str())
                    })
                    .map(|v| v.metadata.name.to_string())
                    .collect();
                keys.push(s.spec.volume.clone());
                keys
            })
            // A claim bound or released changes its volume's export.
            .watches(claims, |c: &cobalt_api::Claim| {
                c.status
                    .as_ref()
                    .and_then(|s| s.volume.clone())
                    .into_iter()
                    .collect()
            })
            .with_metrics(reconcile_metrics)
            .run(shutdown.clone()),
    ));
    shutdown.cancelled().await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let _ = tokio::task::spawn_blocking(move || exporter.stop()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Stops a move's pull as soon as its volume leaves this machine's view (a move cancelled
/// before its cut-over), until shutdown.
async fn stop_pulls_leaving_view(
    moves: Arc<cobalt_agent::moves::Moves>,
    volumes: Cache<Volume>,
    stop: CancellationToken,
) {
    let mut changes = volumes.subscribe();
    loop {
        let gone = tokio::select! {
            _ = stop.cancelled() => return,
            c = changes.recv() => match c {
                Ok(c) => c.deleted,
                // Fell behind: any of the missed changes may have been a departure.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        if gone {
            let present = volumes
                .list()
                .iter()
                .map(|v| v.metadata.uid.clone())
                .collect();
            moves.stop_pulls_not_in(&present);
        }
    }
}

/// Restarts the exporter's server if it died, every 2 s, until shutdown.
async fn supervise(exporter: Arc<dyn Exporter>, stop: CancellationToken) {
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
