//! Connecting to etcd: several endpoints, optional TLS with a client certificate, and a deadline
//! on every call so an unreachable etcd is a clear error, never a hang.
//!
//! Connecting is lazy: [`Store::connect`] succeeds while etcd is down, and calls fail with
//! [`Error::Unavailable`] until it is back. Daemons therefore start without etcd and become ready
//! by themselves when it appears.
//!
//! With several endpoints the client balances calls over them — but it keeps sending calls to a
//! member that crashed (each fails at once: "tcp connect error"). So a store given more than one
//! endpoint asks each member for its status every [`ENDPOINT_PROBE`] (and at once when a call
//! failed that way or timed out): a member that does not answer is taken out of the balancer
//! until it answers again. A member's crash costs the calls of at most one probe interval.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::Keys;

/// Default deadline for one etcd call.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a store with several endpoints checks that each member answers.
pub const ENDPOINT_PROBE: Duration = Duration::from_millis(500);

/// `etcd:` in the daemons' config files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://127.0.0.1:2379`, or `https://…` with `tls`.
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Deadline for each call, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// PEM files for etcd client TLS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// Client certificate and key, for etcd started with `--client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/cobalt".into()
}

fn default_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT.as_millis() as u64
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: default_prefix(),
            tls: None,
            request_timeout_ms: default_timeout_ms(),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }
}

/// A handle on Cobalt's data in etcd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Store {
    pub(crate) client: Client,
    pub(crate) keys: Keys,
    pub(crate) endpoints: String,
    pub(crate) timeout: Duration,
    pub(crate) fence: Option<crate::election::Fence>,
    /// The endpoint prober of a multi-endpoint store; it stops when the last clone goes.
    prober: Option<std::sync::Arc<Prober>>,
    /// Where object and status writes go instead of etcd ([`crate::remote`]).
    pub(crate) remote: Option<std::sync::Arc<dyn crate::remote::RemoteWrites>>,
}

/// The task checking a multi-endpoint store's endpoints, and how calls wake it.
struct Prober {
    task: tokio::task::JoinHandle<()>,
    suspect: std::sync::Arc<tokio::sync::Notify>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps the balancer's endpoints to the members that answer (never fewer than one): every
/// [`ENDPOINT_PROBE`], and at once when a call failed as a dead member makes it fail, each
/// endpoint is asked for its status over its own long-lived connection (cheap, and no
/// connection churn in etcd's logs).
async fn probe_endpoints(
    client: Client,
    endpoints: Vec<String>,
    options: ConnectOptions,
    suspect: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut probes: Vec<Option<Client>> = vec![None; endpoints.len()];
    let mut down: std::collections::BTreeSet<String> = Default::default();
    loop {
        tokio::select! {
            _ = suspect.notified() => {}
            _ = tokio::time::sleep(ENDPOINT_PROBE) => {}
        }
        for (e, probe) in endpoints.iter().zip(probes.iter_mut()) {
            if probe.is_none() {
                let options = options
                    .clone()
                    .with_connect_timeout(ENDPOINT_PROBE)
                    .with_timeout(ENDPOINT_PROBE);
                *probe = Client::connect([e], Some(options)).await.ok();
            }
            let answers = match probe.as_mut() {
                Some(c) => matches!(
                    tokio::time::timeout(ENDPOINT_PROBE, c.status()).await,
                    Ok(Ok(_))
                ),
                None => false,
            };
            let is_down = down.contains(e);
            if !answers && !is_down && down.len() + 1 < endpoints.len() {
                if client.remove_endpoint(e).await.is_ok() {
                    tracing::warn!(endpoint = %e, "etcd endpoint does not answer; using the others");
                    down.insert(e.clone());
                }
            } else if answers && is_down && client.add_endpoint(e).await.is_ok() {
                tracing::info!(endpoint = %e, "etcd endpoint is back");
                down.remove(e);
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.keys.prefix())
            .field("fenced", &self.fence.is_some())
            .field("writes_through_api", &self.remote.is_some())
            .finish()
    }
}

impl Store {
    /// Builds a client for `config`. Does not wait for etcd (see the module docs).
    pub async fn connect(config: &EtcdConfig) -> Result<Store> {
        if config.endpoints.is_empty() {
            return Err(Error::Invalid(
                "no etcd endpoints given (etcd.endpoints / --etcd-endpoints)".into(),
            ));
        }
        let timeout = config.request_timeout();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), timeout);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let probe_options = options.clone();
        let endpoints = config.endpoints.join(",");
        let client =
            tokio::time::timeout(timeout, Client::connect(&config.endpoints, Some(options)))
                .await
                .map_err(|_| unavailable(&endpoints, timeout, "connect timed out"))?
                .map_err(|e| match e {
                    etcd_client::Error::InvalidArgs(m) => {
                        Error::Invalid(format!("etcd endpoints {endpoints}: {m}"))
                    }
                    etcd_client::Error::InvalidUri(m) => {
                        Error::Invalid(format!("etcd endpoints {endpoints}: {m}"))
                    }
                    other => unavailable(&endpoints, timeout, other),
                })?;
        let prober = (config.endpoints.len() > 1).then(|| {
            let suspect = std::sync::Arc::new(tokio::sync::Notify::new());
            std::sync::Arc::new(Prober {
                task: tokio::spawn(probe_endpoints(
                    client.clone(),
                    config.endpoints.clone(),
                    probe_options.clone(),
                    suspect.clone(),
                )),
                suspect,
            })
        });
        Ok(Store {
            client,
            keys: Keys::new(&config.prefix),
            endpoints,
            timeout,
            fence: None,
            prober,
            remote: None,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The raw etcd client, for what the typed API does not cover (tests, benchmarks).
    pub fn raw(&self) -> Client {
        self.client.clone()
    }

    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one etcd call under the store's deadline, mapping transport failures to
    /// [`Error::Unavailable`].
    pub(crate) async fn call<T, F>(&self, fut: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                self.suspect_endpoints();
                Err(unavailable(
                    &self.endpoints,
                    self.timeout,
                    "deadline exceeded",
                ))
            }
            Ok(Err(e)) => Err(self.map_err(e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// A call failed as a dead or unreachable member makes it fail: have the endpoints checked.
    fn suspect_endpoints(&self) {
        if let Some(p) = &self.prober {
            p.suspect.notify_one();
        }
    }

    pub(crate) fn map_err(&self, e: etcd_client::Error) -> Error {
        if matches!(e, etcd_client::Error::TransportError(_))
            || e.to_string().contains("tcp connect error")
        {
            self.suspect_endpoints();
        }
        if let etcd_client::Error::GRpcStatus(status) = &e {
            if status
                .message()
                .contains("required revision has been compacted")
            {
                return Error::Compacted {
                    requested: 0,
                    compact_revision: 0,
                };
            }
            if status.message().contains("permission denied") {
                return Error::Forbidden(format!(
                    "etcd at {} denied this client's user ({}): with authentication on, a \
                     storage machine's user may only read and write its liveness key and events",
                    self.endpoints,
                    status.message()
                ));
            }
        }
        unavailable(&self.endpoints, self.timeout, e)
    }

    /// The current etcd revision (a linearizable read).
    pub async fn revision(&self) -> Result<i64> {
        let mut kv = self.client.kv_client();
        let key = self.keys.prefix().to_string();
        let resp = self
            .call(kv.get(key, Some(etcd_client::GetOptions::new().with_count_only())))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Compacts etcd's history up to `revision` (operators and tests; watchers behind it relist).
    pub async fn compact(&self, revision: i64) -> Result<()> {
        let mut kv = self.client.kv_client();
        self.call(kv.compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        ))
        .await?;
        Ok(())
    }
}

pub(crate) fn unavailable(
    endpoints: &str,
    deadline: Duration,
    cause: impl std::fmt::Display,
) -> Error {
    Error::Unavailable {
        endpoints: endpoints.to_string(),
        deadline,
        cause: cause.to_string(),
    }
}

fn tls_options(files: &TlsFiles) -> Result<TlsOptions> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| Error::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&files.ca)?));
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => {
            return Err(Error::Tls(
                "etcd.tls.cert and etcd.tls.key go together: give both or neither".into(),
            ))
        }
    }
    Ok(tls)
}

/// The etcd flags both daemons take (`--etcd-endpoints`, `--etcd-prefix`, `--etcd-ca`,
/// `--etcd-cert`, `--etcd-key`); each overrides the config file's `etcd:` key.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EtcdFlags {
    /// etcd endpoints, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Key prefix in etcd (default /cobalt).
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    /// CA that signed etcd's server certificate (turns on TLS to etcd).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd started with --client-cert-auth; needs --etcd-key.
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdFlags {
    /// Lays the flags given over `config`.
    pub fn apply(&self, config: &mut EtcdConfig) {
        if let Some(e) = &self.etcd_endpoints {
            config.endpoints = e.clone();
        }
        if let Some(p) = &self.etcd_prefix {
            config.prefix = p.clone();
        }
        if let Some(ca) = &self.etcd_ca {
            config.tls = Some(TlsFiles {
                ca: ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        }
    }
}
