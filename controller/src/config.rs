//! `cobalt-controller` configuration: a YAML file (`--config`) overlaid by flags; flags win.
//!
//! ```yaml
//! etcd: {endpoints: [http://127.0.0.1:2379], prefix: /cobalt}
//! listen: 127.0.0.1:7420
//! placement: binpack          # binpack | spread
//! leaseTTL: 10s               # scheduler election lease
//! tokensFile: /etc/cobalt/tokens.yaml
//! tls: {cert: server.pem, key: server-key.pem}   # HTTPS for the API
//! ```
//!
//! Decision: without a tokens file the API has no authentication, so the controller refuses to
//! listen on anything but loopback unless `--insecure` is given — an open, writable storage API
//! on a network must be a choice, not an accident.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use cobalt_store::EtcdConfig;
use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PlacementStrategy {
    /// Fill machines up: the most allocated machine that fits.
    #[default]
    Binpack,
    /// Spread load: the least allocated machine that fits.
    Spread,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerConfig {
    pub etcd: EtcdConfig,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub placement: PlacementStrategy,
    #[serde(
        default = "default_lease_ttl",
        rename = "leaseTTL",
        with = "cobalt_api::duration::serde_duration"
    )]
    pub lease_ttl: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    #[serde(default)]
    pub insecure: bool,
    /// This controller's name in the scheduler election (default: hostname-pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When and how the leader evens out machine fill (drains run regardless).
    #[serde(default)]
    pub rebalance: crate::scheduler::rebalance::Policy,
    /// How long events live after their last occurrence; 0 records none.
    #[serde(
        default = "default_event_ttl",
        rename = "eventTTL",
        with = "cobalt_api::duration::serde_duration"
    )]
    pub event_ttl: Duration,
    /// How often the scheduler reconciles every volume, machine and claim again without a
    /// change (the watch delivers changes at once; this is the safety net).
    #[serde(
        default = "default_resync",
        with = "cobalt_api::duration::serde_duration"
    )]
    pub resync: Duration,
}

fn default_resync() -> Duration {
    Duration::from_secs(60)
}

fn default_event_ttl() -> Duration {
    cobalt_store::DEFAULT_EVENT_TTL
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7420)))
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            etcd: EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]),
            listen: default_listen(),
            placement: PlacementStrategy::default(),
            lease_ttl: default_lease_ttl(),
            tokens_file: None,
            tls: None,
            insecure: false,
            name: None,
            rebalance: Default::default(),
            event_ttl: default_event_ttl(),
            resync: default_resync(),
        }
    }
}

/// Flags of `cobalt-controller`; each overrides the config file's key of the same meaning.
#[derive(Clone, Debug, Default, Parser)]
#[command(
    name = "cobalt-controller",
    version,
    about = "Cobalt controller: serves the HTTP API and, when elected leader, schedules volumes onto machines.",
    after_help = "Example:\n  cobalt-controller --etcd-endpoints http://127.0.0.1:2379 --listen 127.0.0.1:7420"
)]
pub struct Flags {
    /// YAML config file; flags override its keys.
    #[arg(long, env = "COBALT_CONTROLLER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: cobalt_store::EtcdFlags,
    /// Address of the HTTP API (default 127.0.0.1:7420).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long, value_enum)]
    pub placement: Option<PlacementStrategy>,
    /// Scheduler election lease, e.g. 10s.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// YAML file of bearer tokens: `tokens: [{token: …, role: admin|reader, name: …}]`.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow listening on a non-loopback address without a tokens file.
    #[arg(long)]
    pub insecure: bool,
    /// Name in the scheduler election (default hostname-pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Do not move volumes to even out machine fill (drains still run).
    #[arg(long)]
    pub no_rebalance: bool,
    /// How long events live after their last occurrence, e.g. 1h; 0s records none.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub event_ttl: Option<Duration>,
    /// How often the scheduler reconciles everything again without a change, e.g. 1m.
    #[arg(long, value_parser = cobalt_api::duration::parse_duration)]
    pub resync: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("refusing to listen on {0} without authentication: give --tokens-file, listen on 127.0.0.1, or pass --insecure")]
    Insecure(SocketAddr),
    #[error("{0}")]
    Invalid(String),
}

/// Reads a YAML config file into `T` with a message naming the file and the problem.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

impl ControllerConfig {
    /// The config file (if any) with the flags applied on top.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        let mut c: ControllerConfig = match &flags.config {
            Some(path) => read_yaml(path)?,
            None => ControllerConfig::default(),
        };
        flags.etcd.apply(&mut c.etcd);
        if let Some(l) = flags.listen {
            c.listen = l;
        }
        if let Some(p) = flags.placement {
            c.placement = p;
        }
        if let Some(t) = flags.lease_ttl {
            c.lease_ttl = t;
        }
        if let Some(t) = &flags.tokens_file {
            c.tokens_file = Some(t.clone());
        }
        if let (Some(cert), Some(key)) = (&flags.tls_cert, &flags.tls_key) {
            c.tls = Some(ListenerTls {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        c.insecure |= flags.insecure;
        if flags.name.is_some() {
            c.name = flags.name.clone();
        }
        if flags.no_rebalance {
            c.rebalance.enabled = false;
        }
        if let Some(t) = flags.event_ttl {
            c.event_ttl = t;
        }
        if let Some(t) = flags.resync {
            c.resync = t;
        }
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        if self.tokens_file.is_none() && !self.listen.ip().is_loopback() && !self.insecure {
            return Err(ConfigError::Insecure(self.listen));
        }
        if self.resync < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(format!(
                "resync {:?} is too short; at least 1s",
                self.resync
            )));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(format!(
                "leaseTTL {:?} is too short; at least 1s",
                self.lease_ttl
            )));
        }
        Ok(())
    }

    pub fn identity(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "controller".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_open_listeners_need_auth() {
        let dir = std::env::temp_dir().join(format!("cobalt-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("controller.yaml");
        std::fs::write(&file, "etcd: {endpoints: [http://10.0.0.1:2379]}\nlisten: 127.0.0.1:9000\nleaseTTL: 3s\nplacement: spread\n").unwrap();
        let flags = Flags {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..Default::default()
        };
        let c = ControllerConfig::load(&flags).unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.placement, PlacementStrategy::Spread);
        assert_eq!(c.etcd.endpoints, ["http://10.0.0.1:2379"]);

        let open = Flags {
            config: Some(file.clone()),
            listen: Some("0.0.0.0:7420".parse().unwrap()),
            ..Default::default()
        };
        assert!(matches!(
            ControllerConfig::load(&open),
            Err(ConfigError::Insecure(_))
        ));
        let insecure = Flags {
            insecure: true,
            ..open
        };
        assert!(ControllerConfig::load(&insecure).is_ok());

        std::fs::write(&file, "etcd: {endpoints: []}\nlisen: x\n").unwrap();
        let err = ControllerConfig::load(&Flags {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_example_config_loads_with_the_default_rebalance_policy() {
        let flags = Flags {
            config: Some(
                concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/controller.yaml").into(),
            ),
            ..Default::default()
        };
        let c = ControllerConfig::load(&flags).unwrap();
        assert_eq!(c.rebalance, crate::scheduler::rebalance::Policy::default());
        let off = ControllerConfig::load(&Flags {
            no_rebalance: true,
            ..flags
        })
        .unwrap();
        assert!(!off.rebalance.enabled);
    }
}
