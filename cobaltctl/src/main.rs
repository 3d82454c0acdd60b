//! `cobaltctl`: parses arguments and runs one verb.

use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use cobaltctl::client::{Client, Target};
use cobaltctl::commands::{self, WaitFor};
use cobaltctl::kinds::Kind;
use cobaltctl::output::Format;

#[derive(Parser)]
#[command(
    name = "cobaltctl",
    version,
    about = "Drive Cobalt: declare volumes and machines, watch them converge."
)]
struct Cli {
    /// API server URL (default http://127.0.0.1:7420, or the current context).
    #[arg(long, global = true, env = "COBALT_SERVER")]
    server: Option<String>,
    /// Bearer token.
    #[arg(long, global = true, env = "COBALT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Context from ~/.config/cobalt/config.yaml.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Verb,
}

// Parsed once per run: the size of the biggest variant (claim's options) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Verb {
    /// Create or update objects from manifests so they match the files.
    #[command(
        after_help = "Examples:\n  cobaltctl apply -f examples/volume.yaml\n  cobaltctl apply -R -f manifests/ --prune -l team=media\n  cat volume.yaml | cobaltctl apply -f -"
    )]
    Apply {
        /// File, directory or - (stdin); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Descend into subdirectories.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// `server`: validate and check conflicts on the server, change nothing.
        #[arg(long, value_parser = ["server"])]
        dry_run: Option<String>,
        /// Delete objects carrying these labels that are not in the applied files.
        #[arg(long, requires = "selector")]
        prune: bool,
        /// Label selector for --prune.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Requests kept in flight (objects of one kind are applied in parallel; kinds in the
        /// order Machine, Volume, Snapshot, Claim).
        #[arg(long, default_value_t = commands::DEFAULT_PARALLEL, value_parser = parallel)]
        parallel: usize,
    },
    /// List objects, or show one.
    #[command(
        after_help = "Examples:\n  cobaltctl get volumes\n  cobaltctl get vol media -o yaml\n  cobaltctl get machines -o wide\n  cobaltctl get volumes -l app=media -w"
    )]
    Get {
        /// volume(s) | machine(s), optionally kind/NAME.
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Format>,
        /// Label selector, e.g. disk=ssd,!legacy.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// After listing, stream changes.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show an object in detail: spec, status, conditions and why.
    #[command(after_help = "Example:\n  cobaltctl describe volume media")]
    Describe { kind: String, name: Option<String> },
    /// Delete objects by name or by manifest.
    #[command(
        after_help = "Examples:\n  cobaltctl delete volume media --wait\n  cobaltctl delete -f examples/volume.yaml"
    )]
    Delete {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        /// Wait until the objects are gone (their data deleted).
        #[arg(long)]
        wait: bool,
        /// For volumes: delete their snapshots first (a volume with snapshots is not deleted).
        #[arg(long)]
        with_snapshots: bool,
        #[arg(long, default_value = "60s", value_parser = cobalt_api::duration::parse_duration)]
        timeout: Duration,
    },
    /// Claim a persistent volume for this host (at boot): bind, wait, mount, and optionally hold.
    #[command(
        after_help = "Examples:\n  cobaltctl claim web-7 --host 10.0.0.7 --selector app=web --create-size 10Gi --wait\n  cobaltctl claim kafka-3 --host 10.0.0.13 --strategy ordinal --group kafka --create-size 50Gi --mount /var/lib/kafka --hold\n  cobaltctl claim -f /etc/cobalt/claim.yaml   (the same options as YAML: name, host, strategy, group, selector, create, hold, mount, ...)\n  cobaltctl get claims; cobaltctl delete claim/web-7 (releases the volume; its data is kept)"
    )]
    Claim {
        /// The claim's name (e.g. the host's name).
        name: Option<String>,
        /// The claim options as YAML (flags win over it).
        #[arg(short = 'f', long = "filename")]
        file: Option<std::path::PathBuf>,
        /// The address this host mounts from; the volume is exported to it.
        #[arg(long)]
        host: Option<String>,
        /// Labels the volume must carry: k=v[,k=v].
        #[arg(long)]
        selector: Option<String>,
        /// any (a free matching volume) or ordinal (the group's lowest free number).
        #[arg(long)]
        strategy: Option<String>,
        /// The claim group (ordinals are numbered per group).
        #[arg(long)]
        group: Option<String>,
        /// rw or ro.
        #[arg(long)]
        access: Option<String>,
        /// Map the host's root to an anonymous user (true|false; default true).
        #[arg(long)]
        root_squash: Option<bool>,
        /// Create a volume of this size when none is free.
        #[arg(long)]
        create_size: Option<String>,
        /// Create a volume from this Volume manifest's spec when none is free.
        #[arg(long)]
        create_from: Option<std::path::PathBuf>,
        /// Wait until the volume is bound and served to the host.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        timeout: Option<String>,
        /// Mount it here once served (mount -t nfs4; idempotent).
        #[arg(long)]
        mount: Option<std::path::PathBuf>,
        /// Extra mount options (e.g. hard,noatime).
        #[arg(long)]
        mount_options: Option<String>,
        /// Print the mount command.
        #[arg(long)]
        print_mount: bool,
        /// Keep renewing the claim while this process runs; it is released after --hold-seconds
        /// without a renewal.
        #[arg(long)]
        hold: bool,
        #[arg(long)]
        hold_seconds: Option<u32>,
    },
    /// Take a snapshot of a volume (a Snapshot object; its machine's agent takes it).
    #[command(
        after_help = "Examples:\n  cobaltctl snapshot volume/db --name db-before-upgrade --wait\n  cobaltctl get snapshots -l cobalt.io/volume=db\n  restore: a Volume with spec.source: {snapshot: db-before-upgrade}"
    )]
    Snapshot {
        /// volume/NAME
        target: String,
        /// The snapshot's name (default: VOLUME-YYYYMMDD-HHMMSS).
        #[arg(long)]
        name: Option<String>,
        /// Wait until it is taken (Ready).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "60s", value_parser = cobalt_api::duration::parse_duration)]
        timeout: Duration,
    },
    /// Wait for a condition or for deletion.
    #[command(
        after_help = "Examples:\n  cobaltctl wait volume/media --for=condition=Ready --timeout=60s\n  cobaltctl wait volume/media --for=delete"
    )]
    Wait {
        /// kind/NAME
        target: String,
        /// condition=TYPE[=true|false] or delete
        #[arg(long = "for")]
        for_: String,
        #[arg(long, default_value = "60s", value_parser = cobalt_api::duration::parse_duration)]
        timeout: Duration,
    },
    /// Move a volume's data to another machine (sets spec.machine; the agents do the rest).
    #[command(
        after_help = "Examples:\n  cobaltctl move volume/media --to node-2 --wait\n  cobaltctl move volume/media --to node-1 --wait --timeout 30m"
    )]
    Move {
        /// volume/NAME
        target: String,
        /// The machine to move it to.
        #[arg(long)]
        to: String,
        /// Follow the move until it is done (progress on the terminal).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "10m", value_parser = cobalt_api::duration::parse_duration)]
        timeout: Duration,
    },
    /// Stop placing new volumes on a machine (its volumes stay).
    #[command(after_help = "Example:\n  cobaltctl cordon node-1")]
    Cordon { name: String },
    /// Undo cordon and drain: the machine takes volumes again.
    #[command(after_help = "Example:\n  cobaltctl uncordon node-1")]
    Uncordon { name: String },
    /// Move every volume off a machine (sets spec.drain); the Drained condition shows progress.
    #[command(
        after_help = "Examples:\n  cobaltctl drain node-1 --dry-run\n  cobaltctl drain node-1 --wait\n  cobaltctl drain node-1 --pinned --wait --timeout 1h"
    )]
    Drain {
        name: String,
        /// Move volumes a user pinned to it too (re-pinned where they go).
        #[arg(long)]
        pinned: bool,
        /// Wait until the machine holds no volumes.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "30m", value_parser = cobalt_api::duration::parse_duration)]
        timeout: Duration,
        /// Print where each volume would go (or why it cannot), and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what apply would change. Exit 0: same, 1: different, 2+: error.
    #[command(after_help = "Example:\n  cobaltctl diff -f examples/volume.yaml")]
    Diff {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Requests kept in flight.
        #[arg(long, default_value_t = commands::DEFAULT_PARALLEL, value_parser = parallel)]
        parallel: usize,
    },
    /// Describe a field of a kind, from the schemas.
    #[command(
        after_help = "Examples:\n  cobaltctl explain volume\n  cobaltctl explain volume.spec.export.clients"
    )]
    Explain { path: String },
    /// Show recent events: all of them, or those of one object (bound, moved, failed, machine
    /// lost and back, …). Events live an hour after they last happened.
    #[command(
        after_help = "Examples:\n  cobaltctl events\n  cobaltctl events volume/media\n  cobaltctl events machine m1 --warnings"
    )]
    Events {
        /// `kind`, `kind/name`, or nothing for every event.
        what: Option<String>,
        name: Option<String>,
        /// Warnings only.
        #[arg(long)]
        warnings: bool,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Format>,
    },
    /// Print the client's version and the server's.
    #[command(after_help = "Example:\n  cobaltctl version\n  cobaltctl version --client")]
    Version {
        /// The client's version only (no server needed).
        #[arg(long)]
        client: bool,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  source <(cobaltctl completion bash)")]
    Completion { shell: clap_complete::Shell },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

/// `--parallel`: 1 to [`MAX_PARALLEL`].
fn parallel(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_PARALLEL).contains(&n) => Ok(n),
        _ => Err(format!("must be a number from 1 to {MAX_PARALLEL}")),
    }
}

/// Bound on `--parallel`: more requests in flight than this only queue in the server.
const MAX_PARALLEL: usize = 64;

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = || -> anyhow::Result<Client> {
        Ok(Client::new(Target::resolve(
            cli.server.clone(),
            cli.token.clone(),
            cli.context.clone(),
        )?)?)
    };
    match cli.command {
        Verb::Apply {
            files,
            recursive,
            dry_run,
            prune,
            selector,
            parallel,
        } => {
            let selector = if prune { selector } else { None };
            commands::apply(
                &client()?,
                &files,
                recursive,
                dry_run.is_some(),
                selector.as_deref(),
                parallel,
            )
            .await
        }
        Verb::Get {
            kind,
            name,
            output,
            selector,
            watch,
        } => commands::get(&client()?, &kind, name, output, selector.as_deref(), watch).await,
        Verb::Describe { kind, name } => commands::describe(&client()?, &kind, name).await,
        Verb::Events {
            what,
            name,
            warnings,
            output,
        } => commands::events(&client()?, what.as_deref(), name, warnings, output).await,
        Verb::Delete {
            kind,
            name,
            files,
            wait,
            with_snapshots,
            timeout,
        } => {
            commands::delete(
                &client()?,
                kind.as_deref(),
                name,
                &files,
                commands::DeleteOptions {
                    wait,
                    with_snapshots,
                    timeout,
                },
            )
            .await
        }
        Verb::Claim {
            name,
            file,
            host,
            selector,
            strategy,
            group,
            access,
            root_squash,
            create_size,
            create_from,
            wait,
            timeout,
            mount,
            mount_options,
            print_mount,
            hold,
            hold_seconds,
        } => {
            use cobaltctl::claim::{size_template, ClaimOptions};
            // Enum flags parse as their YAML form does (any|ordinal, rw|ro).
            fn word<T: serde::de::DeserializeOwned>(
                flag: &str,
                allowed: &str,
                v: Option<String>,
            ) -> anyhow::Result<Option<T>> {
                v.map(|v| {
                    serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                        anyhow::anyhow!("--{flag}: {v:?} is not allowed; use {allowed}")
                    })
                })
                .transpose()
            }
            let strategy = word("strategy", "any or ordinal", strategy)?;
            let access = word("access", "rw or ro", access)?;
            let mut labels = std::collections::BTreeMap::new();
            for pair in selector
                .iter()
                .flat_map(|s| s.split(','))
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--selector: {pair:?} is not key=value"))?;
                labels.insert(k.trim().to_string(), v.trim().to_string());
            }
            let flags = ClaimOptions {
                name,
                host,
                selector: labels,
                strategy,
                group,
                access,
                root_squash,
                create: create_size.as_deref().map(size_template).transpose()?,
                create_from,
                hold: hold.then_some(true),
                hold_seconds,
                wait: wait.then_some(true),
                timeout,
                mount,
                mount_options,
                print_mount: print_mount.then_some(true),
            };
            let options = match &file {
                Some(f) => ClaimOptions::from_file(f)?.overlay(flags),
                None => flags,
            };
            cobaltctl::claim::run(&client()?, options).await
        }
        Verb::Snapshot {
            target,
            name,
            wait,
            timeout,
        } => {
            let (kind, volume) = Kind::parse_ref(&target).map_err(anyhow::Error::msg)?;
            let volume = match (kind, volume) {
                (Kind::Volume, Some(n)) => n,
                _ => anyhow::bail!("snapshot needs volume/NAME, e.g. volume/db"),
            };
            commands::snapshot(&client()?, &volume, name, wait, timeout).await
        }
        Verb::Wait {
            target,
            for_,
            timeout,
        } => {
            let (kind, name) = Kind::parse_ref(&target).map_err(anyhow::Error::msg)?;
            let name =
                name.ok_or_else(|| anyhow::anyhow!("wait needs kind/NAME, e.g. volume/media"))?;
            let want = WaitFor::parse(&for_).map_err(anyhow::Error::msg)?;
            commands::wait_for(&client()?, kind, &name, &want, timeout).await?;
            println!("{}/{name} condition met", kind.singular());
            Ok(0)
        }
        Verb::Move {
            target,
            to,
            wait,
            timeout,
        } => {
            let (kind, name) = Kind::parse_ref(&target).map_err(anyhow::Error::msg)?;
            let name = match (kind, name) {
                (Kind::Volume, Some(n)) => n,
                _ => anyhow::bail!("move needs volume/NAME, e.g. volume/media"),
            };
            commands::move_volume(&client()?, &name, &to, wait, timeout).await
        }
        Verb::Cordon { name } => commands::cordon(&client()?, &name, true).await,
        Verb::Uncordon { name } => commands::cordon(&client()?, &name, false).await,
        Verb::Drain {
            name,
            pinned,
            dry_run: true,
            ..
        } => commands::drain_plan(&client()?, &name, pinned).await,
        Verb::Drain {
            name,
            pinned,
            wait,
            timeout,
            ..
        } => commands::drain(&client()?, &name, pinned, wait, timeout).await,
        Verb::Diff {
            files,
            recursive,
            parallel,
        } => commands::diff(&client()?, &files, recursive, parallel).await,
        Verb::Explain { path } => commands::explain(&path),
        Verb::Version {
            client: only_client,
        } => {
            println!("Client Version: v{}", env!("CARGO_PKG_VERSION"));
            if only_client {
                return Ok(0);
            }
            let v = client()?.server_version().await?;
            println!(
                "Server Version: {} ({})",
                v["gitVersion"].as_str().unwrap_or("unknown"),
                v["platform"].as_str().unwrap_or("unknown")
            );
            Ok(0)
        }
        Verb::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "cobaltctl",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
    }
}
