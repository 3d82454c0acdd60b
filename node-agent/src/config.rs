//! `cobalt-agent` configuration: a YAML file (`--config`) overlaid by flags; flags win.
//!
//! ```yaml
//! etcd: {endpoints: [http://10.0.0.1:2379]}
//! machine: node-2                 # default: the hostname
//! address: 10.0.0.12              # where NFS clients reach this machine
//! labels: {disk: ssd}
//! stateDir: /var/lib/cobalt       # lock file; one agent per state directory
//! backend: {kind: btrfs, pool: /srv/cobalt}   # or {kind: loop, pool: /srv/images, filesystem: xfs}
//! exporter: {kind: ganesha, port: 2049}   # ganesha | kernel | none
//! listen: 127.0.0.1:7421          # health, metrics, and move streams to peer agents
//! leaseTTL: 10s
//! usageRefresh: 30s               # how often volume usage is re-read and reported
//! moves: {maxIncoming: 1, maxOutgoing: 1, rateLimit: 0, convergedBytes: 16777216,
//!         maxRounds: 6, idleTimeout: 30s}
//! api: {server: https://cobalt.example:7420, tokenFile: /etc/cobalt/machine.token, ca: /etc/cobalt/ca.pem}
//! ```
//!
//! With `api`, the agent's object and status writes go through the controllers' API with the
//! machine's token (`role: machine` in the controllers' tokens file), so its etcd credentials
//! may be read-only but for its liveness key and events (docs/operations.md "Least privilege").
//!
//! Peer agents pull moving volumes from `listen`, so for moves between machines it must be an
//! address they reach: the machine's own address (`10.0.0.12:7421`) or `0.0.0.0:7421` (then the
//! published agent URL uses `address`). The default, 127.0.0.1, serves only this machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cobalt_store::EtcdConfig;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// `btrfs` (default) or `loop`.
    #[serde(default = "btrfs")]
    pub kind: String,
    /// btrfs: the mounted BTRFS directory; loop: the directory holding the images.
    pub pool: PathBuf,
    /// loop: `ext4` (default) or `xfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
}

fn btrfs() -> String {
    "btrfs".into()
}

/// Which NFS server exports this machine's volumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    /// An nfs-ganesha the agent runs and supervises.
    Ganesha,
    /// The kernel NFS server (`/etc/exports.d/` + `exportfs -ra`).
    Kernel,
    /// No exports (volumes are reported Exported=False, reason NoExporter).
    #[default]
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExporterConfig {
    #[serde(default)]
    pub kind: ExporterKind,
    #[serde(default = "nfs_port")]
    pub port: u16,
}

fn nfs_port() -> u16 {
    2049
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            kind: ExporterKind::None,
            port: nfs_port(),
        }
    }
}

/// Where the agent writes objects and status when its etcd credentials may not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiConfig {
    /// The controllers' API, `http(s)://HOST:PORT`.
    pub server: String,
    /// A file holding this machine's token (`role: machine, machine: <this machine>`).
    pub token_file: PathBuf,
    /// CA of the API's certificate, when not in the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl ApiConfig {
    /// The token, read from `tokenFile` (surrounding whitespace dropped).
    pub fn token(&self) -> Result<String, ConfigError> {
        let text =
            std::fs::read_to_string(&self.token_file).map_err(|source| ConfigError::Read {
                path: self.token_file.clone(),
                source,
            })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "api.tokenFile {} is empty; it must hold the machine's token",
                self.token_file.display()
            )));
        }
        Ok(token)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    pub etcd: EtcdConfig,
    #[serde(default)]
    pub machine: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "state_dir")]
    pub state_dir: PathBuf,
    pub backend: BackendConfig,
    #[serde(default)]
    pub exporter: ExporterConfig,
    #[serde(default = "listen")]
    pub listen: SocketAddr,
    #[serde(
        default = "lease_ttl",
        rename = "leaseTTL",
        with = "cobalt_api::duration::serde_duration"
    )]
    pub lease_ttl: Duration,
    /// How long events live after their last occurrence; 0 records none.
    #[serde(
        default = "event_ttl",
        rename = "eventTTL",
        with = "cobalt_api::duration::serde_duration"
    )]
    pub event_ttl: Duration,
    /// How often volume usage is read (one pass over the pool) and changed figures reported.
    #[serde(
        default = "usage_refresh",
        with = "cobalt_api::duration::serde_duration"
    )]
    pub usage_refresh: Duration,
    /// How often every volume and snapshot is reconciled again even when nothing changed (the
    /// watch delivers changes at once; this is the safety net).
    #[serde(default = "resync", with = "cobalt_api::duration::serde_duration")]
    pub resync: Duration,
    /// Moves to and from this machine.
    #[serde(default)]
    pub moves: crate::moves::MoveConfig,
    /// Write objects and status through the controllers' API with a machine token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiConfig>,
}

impl AgentConfig {
    /// The URL peers reach this agent at (published on the Machine as `status.agentUrl`):
    /// `listen`, or, when it listens on every address, `address` with `listen`'s port.
    pub fn agent_url(&self) -> Option<String> {
        let ip = self.listen.ip();
        if !ip.is_unspecified() {
            return Some(format!("http://{}", self.listen));
        }
        if self.address.is_empty() {
            return None;
        }
        let host = match self.address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(a)) => format!("[{a}]"),
            _ => self.address.clone(),
        };
        Some(format!("http://{host}:{}", self.listen.port()))
    }
}

fn resync() -> Duration {
    Duration::from_secs(300)
}

fn usage_refresh() -> Duration {
    Duration::from_secs(30)
}

fn state_dir() -> PathBuf {
    "/var/lib/cobalt".into()
}

fn listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7421))
}

fn event_ttl() -> Duration {
    cobalt_store::DEFAULT_EVENT_TTL
}

fn lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Flags of `cobalt-agent` (run mode); each overrides the config file's key.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Flags {
    /// YAML config file; flags override its keys.
    #[arg(long, env = "COBALT_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: cobalt_store::EtcdFlags,
    /// This machine's name (default: the hostname).
    #[arg(long)]
    pub machine: Option<String>,
    /// Address NFS clients use to reach this machine.
    #[arg(long)]
    pub address: Option<String>,
    /// Labels for a newly registered Machine: key=value,key=value.
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// State directory (lock file); one agent per directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Backend: btrfs (default) or loop.
    #[arg(long)]
    pub backend: Option<String>,
    /// btrfs: the mounted BTRFS directory holding the volumes; loop: the images' directory.
    #[arg(long)]
    pub pool: Option<PathBuf>,
    /// loop backend: the filesystem of each volume, ext4 (default) or xfs.
    #[arg(long)]
    pub filesystem: Option<String>,
    /// Exporter: ganesha, kernel or none.
    #[arg(long, value_enum)]
    pub exporter: Option<ExporterKind>,
    /// NFS port of the exporter.
    #[arg(long)]
    pub export_port: Option<u16>,
    /// Health, metrics and move-stream address (default 127.0.0.1:7421); peers must reach it
    /// for moves: use the machine's address or 0.0.0.0.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Liveness lease, e.g. 10s.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// How often volume usage is refreshed, e.g. 30s.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub usage_refresh: Option<Duration>,
    /// Bytes per second this machine sends to move volumes away, e.g. 100Mi (0: unlimited).
    #[arg(long)]
    pub move_rate_limit: Option<cobalt_api::Quantity>,
    /// How long events live after their last occurrence, e.g. 1h; 0s records none.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub event_ttl: Option<Duration>,
    /// How often every volume is reconciled again without a change, e.g. 5m.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub resync: Option<Duration>,
    /// Write objects and status through the controllers' API at this URL (with --api-token-file).
    #[arg(long, requires = "api_token_file")]
    pub api_server: Option<String>,
    /// File holding this machine's API token (role machine).
    #[arg(long, requires = "api_server")]
    pub api_token_file: Option<PathBuf>,
    /// CA of the API's certificate.
    #[arg(long)]
    pub api_ca: Option<PathBuf>,
}

#[derive(Parser)]
#[command(
    name = "cobalt-agent",
    version,
    about = "Cobalt node agent: registers this machine, keeps its volumes (BTRFS subvolumes, or ext4/xfs images on loop devices) and exports them.",
    after_help = "Examples:\n  cobalt-agent --etcd-endpoints http://127.0.0.1:2379 --machine node-1 --pool /srv/cobalt\n  cobalt-agent pool create --image /var/lib/cobalt/pool.img --size 10G --mount /srv/cobalt"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
    /// Log format: text or json (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: cobalt_store::logging::LogFormat,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make or remove a loopback BTRFS pool (for demos and tests).
    #[command(subcommand)]
    Pool(PoolCommand),
}

#[derive(clap::Subcommand)]
pub enum PoolCommand {
    /// Create an image file, format it BTRFS and mount it.
    Create {
        #[arg(long)]
        image: PathBuf,
        /// Size, e.g. 10G or 512Mi.
        #[arg(long)]
        size: cobalt_api::Quantity,
        #[arg(long)]
        mount: PathBuf,
    },
    /// Unmount the pool (and anything mounted under it) and delete the image.
    Destroy {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        mount: PathBuf,
    },
}

/// Why the agent's configuration cannot be used; each message names the key or flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl AgentConfig {
    pub fn load(flags: &Flags) -> Result<AgentConfig, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut c: AgentConfig = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => AgentConfig {
                etcd: EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]),
                machine: String::new(),
                address: String::new(),
                labels: BTreeMap::new(),
                state_dir: state_dir(),
                backend: BackendConfig {
                    kind: btrfs(),
                    pool: PathBuf::new(),
                    filesystem: None,
                },
                exporter: ExporterConfig::default(),
                listen: listen(),
                lease_ttl: lease_ttl(),
                event_ttl: event_ttl(),
                usage_refresh: usage_refresh(),
                resync: resync(),
                moves: Default::default(),
                api: None,
            },
        };
        flags.etcd.apply(&mut c.etcd);
        if let Some(m) = &flags.machine {
            c.machine = m.clone();
        }
        if let Some(a) = &flags.address {
            c.address = a.clone();
        }
        if let Some(labels) = &flags.labels {
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    return invalid(format!("--labels {l:?}: write key=value"));
                };
                c.labels.insert(k.into(), v.into());
            }
        }
        if let Some(d) = &flags.state_dir {
            c.state_dir = d.clone();
        }
        if let Some(p) = &flags.pool {
            c.backend.pool = p.clone();
        }
        if let Some(k) = &flags.backend {
            c.backend.kind = k.clone();
        }
        if let Some(f) = &flags.filesystem {
            c.backend.filesystem = Some(f.clone());
        }
        if let Some(e) = flags.exporter {
            c.exporter.kind = e;
        }
        if let Some(p) = flags.export_port {
            c.exporter.port = p;
        }
        if let Some(l) = flags.listen {
            c.listen = l;
        }
        if let Some(t) = flags.lease_ttl {
            c.lease_ttl = t;
        }
        if let Some(t) = flags.event_ttl {
            c.event_ttl = t;
        }
        if let Some(t) = flags.usage_refresh {
            c.usage_refresh = t;
        }
        if let Some(t) = flags.resync {
            c.resync = t;
        }
        if let Some(r) = &flags.move_rate_limit {
            c.moves.rate_limit = r.bytes();
        }
        if let (Some(server), Some(token_file)) = (&flags.api_server, &flags.api_token_file) {
            c.api = Some(ApiConfig {
                server: server.clone(),
                token_file: token_file.clone(),
                ca: None,
            });
        }
        if let Some(ca) = &flags.api_ca {
            match &mut c.api {
                Some(api) => api.ca = Some(ca.clone()),
                None => return invalid("--api-ca needs api.server (or --api-server)".into()),
            }
        }
        if let Some(api) = &c.api {
            if !(api.server.starts_with("http://") || api.server.starts_with("https://")) {
                return invalid(format!(
                    "api.server {:?} must be an http:// or https:// URL",
                    api.server
                ));
            }
        }
        if c.machine.is_empty() {
            c.machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        if let Some(p) = cobalt_api::validate::dns1123_label_problem(&c.machine) {
            return invalid(format!("machine name {p}; set --machine"));
        }
        if c.resync < Duration::from_secs(1) {
            return invalid(format!("resync {:?} is too short; at least 1s", c.resync));
        }
        match (c.backend.kind.as_str(), c.backend.filesystem.as_deref()) {
            ("btrfs", None) => {}
            ("btrfs", Some(_)) => {
                return invalid(
                    "backend.filesystem applies to the loop backend only (btrfs volumes are subvolumes)".into(),
                )
            }
            ("loop", fs) => {
                if let Err(e) = crate::backend::loopdev::Filesystem::parse(fs.unwrap_or("ext4")) {
                    return invalid(format!("backend.filesystem: {e}"));
                }
            }
            (other, _) => {
                return invalid(format!(
                    "backend.kind {other:?} is not supported; use btrfs or loop"
                ))
            }
        }
        if c.backend.pool.as_os_str().is_empty() {
            return invalid(
                "no pool given: set backend.pool or --pool (btrfs: a mounted BTRFS directory; loop: a directory for the images)".into(),
            );
        }
        if c.exporter.kind != ExporterKind::None && c.address.is_empty() {
            return invalid("exporting needs the address clients reach this machine at: set address or --address".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Flags {
        Flags {
            config: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/agent.yaml").into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_example_config_loads_with_the_default_move_limits() {
        let c = AgentConfig::load(&example()).unwrap();
        assert_eq!(c.moves, crate::moves::MoveConfig::default());
        assert_eq!(c.agent_url().as_deref(), Some("http://127.0.0.1:7421"));
    }

    #[test]
    fn peers_reach_the_agent_at_its_listen_address_or_its_address_when_it_listens_everywhere() {
        let mut c = AgentConfig::load(&example()).unwrap();
        c.listen = "10.0.0.12:7421".parse().unwrap();
        assert_eq!(c.agent_url().as_deref(), Some("http://10.0.0.12:7421"));
        c.listen = "0.0.0.0:7500".parse().unwrap();
        c.address = "10.0.0.13".into();
        assert_eq!(c.agent_url().as_deref(), Some("http://10.0.0.13:7500"));
        c.address.clear();
        assert_eq!(c.agent_url(), None, "nothing reachable to publish");
    }

    #[test]
    fn a_rate_limit_flag_overrides_the_file_and_a_bad_moves_key_is_named() {
        let mut flags = example();
        flags.move_rate_limit = Some("100Mi".parse().unwrap());
        assert_eq!(
            AgentConfig::load(&flags).unwrap().moves.rate_limit,
            100 << 20
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(
            &path,
            "etcd: {endpoints: [http://127.0.0.1:2379]}\nbackend: {pool: /srv/cobalt}\nmoves: {maxIncomming: 2}\n",
        )
        .unwrap();
        let err = AgentConfig::load(&Flags {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("maxIncomming"), "{err}");
    }

    #[test]
    fn the_backend_flags_choose_loop_and_its_filesystem_and_bad_ones_are_named() {
        let mut flags = example();
        flags.backend = Some("loop".into());
        flags.filesystem = Some("xfs".into());
        let c = AgentConfig::load(&flags).unwrap();
        assert_eq!(
            (c.backend.kind.as_str(), c.backend.filesystem.as_deref()),
            ("loop", Some("xfs"))
        );
        flags.filesystem = Some("zfs".into());
        let err = AgentConfig::load(&flags).unwrap_err().to_string();
        assert!(
            err.contains("backend.filesystem") && err.contains("ext4 or xfs"),
            "{err}"
        );
        flags.backend = Some("btrfs".into());
        let err = AgentConfig::load(&flags).unwrap_err().to_string();
        assert!(err.contains("loop backend only"), "{err}");
        flags.backend = Some("zfs".into());
        flags.filesystem = None;
        let err = AgentConfig::load(&flags).unwrap_err().to_string();
        assert!(err.contains("btrfs or loop"), "{err}");
    }

    #[test]
    fn the_api_flags_set_where_writes_go_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("machine.token");
        std::fs::write(&token, "  abc-0123456789abcdef\n").unwrap();
        let mut flags = example();
        flags.api_server = Some("https://cobalt.example:7420".into());
        flags.api_token_file = Some(token.clone());
        flags.api_ca = Some("/etc/cobalt/ca.pem".into());
        let api = AgentConfig::load(&flags).unwrap().api.unwrap();
        assert_eq!(api.server, "https://cobalt.example:7420");
        assert_eq!(
            api.ca.as_deref(),
            Some(std::path::Path::new("/etc/cobalt/ca.pem"))
        );
        assert_eq!(api.token().unwrap(), "abc-0123456789abcdef");

        flags.api_server = Some("cobalt.example:7420".into());
        let err = AgentConfig::load(&flags).unwrap_err().to_string();
        assert!(err.contains("api.server") && err.contains("http"), "{err}");

        let mut ca_alone = example();
        ca_alone.api_ca = Some("/etc/cobalt/ca.pem".into());
        let err = AgentConfig::load(&ca_alone).unwrap_err().to_string();
        assert!(err.contains("--api-ca"), "{err}");

        std::fs::write(&token, "\n").unwrap();
        let err = api.token().unwrap_err().to_string();
        assert!(
            err.contains("api.tokenFile") && err.contains("empty"),
            "{err}"
        );
    }
}
