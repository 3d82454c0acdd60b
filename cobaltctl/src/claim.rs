//! `cobaltctl claim`: what a host runs at boot to get its persistent volume. It applies a Claim
//! (from flags or a YAML file of the same options), waits until the volume is bound and served
//! to the host, prints or runs the mount, and with `--hold` keeps renewing the claim for as long
//! as it runs — when the host dies, the claim is released after `holdSeconds`.
//!
//! The options file is the flags' YAML form (camelCase keys); flags given on the command line
//! win over the file:
//!
//! ```yaml
//! name: kafka-0
//! host: 10.0.0.7
//! strategy: ordinal        # any | ordinal
//! group: kafka
//! selector: {app: kafka}
//! access: rw
//! rootSquash: false
//! create: {size: 10Gi}     # or createFrom: volume.yaml (a Volume manifest; its spec is used)
//! hold: true
//! holdSeconds: 15
//! wait: true
//! timeout: 5m
//! mount: /var/lib/kafka
//! mountOptions: hard,noatime
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cobalt_api::{Access, Claim, ClaimStrategy, Quantity, VolumeSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::client::{Client, CtlError};
use crate::commands::apply_one;
use crate::kinds::Kind;
use crate::manifests::Object;

/// The default hold: long enough to ride out a slow boot step, short enough for a quick
/// failover.
pub const DEFAULT_HOLD_SECONDS: u32 = 15;

/// The claim options, from flags or a file (see the module docs).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimOptions {
    pub name: Option<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub strategy: Option<ClaimStrategy>,
    pub group: Option<String>,
    pub access: Option<Access>,
    pub root_squash: Option<bool>,
    /// A Volume spec to create when none is free.
    pub create: Option<VolumeSpec>,
    /// A Volume manifest whose spec is the template.
    pub create_from: Option<PathBuf>,
    pub hold: Option<bool>,
    pub hold_seconds: Option<u32>,
    pub wait: Option<bool>,
    /// How long to wait for the volume (`2m`, `90s`).
    pub timeout: Option<String>,
    pub mount: Option<PathBuf>,
    pub mount_options: Option<String>,
    pub print_mount: Option<bool>,
}

impl ClaimOptions {
    /// Reads the YAML form.
    pub fn from_file(path: &Path) -> anyhow::Result<ClaimOptions> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading claim options {}", path.display()))?;
        serde_saphyr::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}\nallowed keys: name, host, selector, strategy, group, access, rootSquash, create, createFrom, hold, holdSeconds, wait, timeout, mount, mountOptions, printMount",
                path.display()
            )
        })
    }

    /// `self` with every option `flags` sets replacing the file's.
    pub fn overlay(self, flags: ClaimOptions) -> ClaimOptions {
        let mut selector = self.selector;
        selector.extend(flags.selector);
        ClaimOptions {
            name: flags.name.or(self.name),
            host: flags.host.or(self.host),
            selector,
            strategy: flags.strategy.or(self.strategy),
            group: flags.group.or(self.group),
            access: flags.access.or(self.access),
            root_squash: flags.root_squash.or(self.root_squash),
            create: flags.create.or(self.create),
            create_from: flags.create_from.or(self.create_from),
            hold: flags.hold.or(self.hold),
            hold_seconds: flags.hold_seconds.or(self.hold_seconds),
            wait: flags.wait.or(self.wait),
            timeout: flags.timeout.or(self.timeout),
            mount: flags.mount.or(self.mount),
            mount_options: flags.mount_options.or(self.mount_options),
            print_mount: flags.print_mount.or(self.print_mount),
        }
    }

    fn timeout(&self) -> anyhow::Result<Duration> {
        match &self.timeout {
            None => Ok(Duration::from_secs(300)),
            Some(t) => {
                cobalt_api::duration::parse_duration(t).map_err(|e| anyhow::anyhow!("timeout: {e}"))
            }
        }
    }

    /// The Claim these options declare. Errors name the option.
    pub fn claim(&self) -> anyhow::Result<Claim> {
        let Some(name) = &self.name else {
            bail!("name: is required (cobaltctl claim NAME, or name: in the options file)");
        };
        let Some(host) = &self.host else {
            bail!("host: is required: the address this host mounts from (--host 10.0.0.7)");
        };
        let mut c = Claim::new(name, host);
        c.spec.selector = self.selector.clone();
        c.spec.strategy = self.strategy.unwrap_or_default();
        c.spec.group = self.group.clone();
        c.spec.access = self.access.unwrap_or_default();
        c.spec.root_squash = self.root_squash.unwrap_or(true);
        c.spec.create = match (&self.create, &self.create_from) {
            (Some(_), Some(_)) => bail!("create, createFrom: give one template, not both"),
            (Some(spec), None) => Some(spec.clone()),
            (None, Some(path)) => Some(template_from(path)?),
            (None, None) => None,
        };
        if self.hold.unwrap_or(false) {
            c.spec.hold_seconds = Some(self.hold_seconds.unwrap_or(DEFAULT_HOLD_SECONDS));
        }
        cobalt_api::validate::validate_claim(&c).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(c)
    }
}

/// A template from a Volume manifest file.
fn template_from(path: &Path) -> anyhow::Result<VolumeSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the template {}", path.display()))?;
    let docs = cobalt_api::manifest::parse_manifests(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    match docs.as_slice() {
        [cobalt_api::manifest::Manifest::Volume(v)] => Ok(v.spec.clone()),
        _ => bail!(
            "{}: the template must be exactly one Volume manifest",
            path.display()
        ),
    }
}

/// A `--create-size` flag as a template.
pub fn size_template(size: &str) -> anyhow::Result<VolumeSpec> {
    let size: Quantity = size
        .parse()
        .map_err(|e| anyhow::anyhow!("--create-size: {e}"))?;
    Ok(VolumeSpec {
        size,
        ..VolumeSpec::default()
    })
}

/// The `mount` command for a claim's endpoint.
pub fn mount_command(endpoint: &Value, dir: &Path, options: Option<&str>) -> Vec<String> {
    let port = endpoint["port"].as_u64().unwrap_or(2049);
    let mut opts = format!("vers=4.1,port={port}");
    if let Some(o) = options.filter(|o| !o.is_empty()) {
        opts.push(',');
        opts.push_str(o);
    }
    vec![
        "mount".into(),
        "-t".into(),
        "nfs4".into(),
        "-o".into(),
        opts,
        format!(
            "{}:{}",
            endpoint["server"].as_str().unwrap_or(""),
            endpoint["path"].as_str().unwrap_or("/")
        ),
        dir.display().to_string(),
    ]
}

/// Whether `dir` is already an NFS mount of `source` (`server:/path`).
fn mounted(dir: &Path, source: &str) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[0] == source && Path::new(f[1]) == dir && f[2].starts_with("nfs")
        })
}

/// What keeps this host from mounting NFSv4, if anything: the mount helper missing, or a kernel
/// without the NFS client (no `nfs4` filesystem and no module to load).
pub fn nfs_client_problem() -> Option<String> {
    let helper = [
        "/sbin/mount.nfs4",
        "/usr/sbin/mount.nfs4",
        "/sbin/mount.nfs",
        "/usr/sbin/mount.nfs",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if !helper {
        return Some("mount.nfs4 is not installed (Debian: apt install nfs-common; RHEL: dnf install nfs-utils)".into());
    }
    let loaded = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("nfs4"));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let module = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/fs/nfs")
        .exists();
    if !loaded && !module {
        return Some(
            "the kernel has no NFS client (no nfs4 filesystem, no nfs module to load)".into(),
        );
    }
    None
}

fn ready(claim: &Value) -> bool {
    crate::output::condition(claim, "Ready").is_some_and(|c| c["status"] == "True")
}

fn why_waiting(claim: &Value) -> String {
    let conditions: Vec<String> = claim["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] != "True")
        .map(|c| {
            format!(
                "{}={} {}: {}",
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    if conditions.is_empty() {
        "no status yet (is a controller running?)".into()
    } else {
        conditions.join("; ")
    }
}

/// Runs `cobaltctl claim`. Returns the exit code.
pub async fn run(c: &Client, o: ClaimOptions) -> anyhow::Result<i32> {
    let claim = o.claim()?;
    let name = claim.metadata.name.clone();
    let object = Object {
        kind: Kind::Claim,
        name: name.to_string(),
        manifest: crate::merge::Applied::new(&serde_json::to_value(&claim)?),
    };
    let verb = apply_one(c, &object, false, None).await?;
    println!("claim/{name} {verb}");
    let hold = claim
        .spec
        .hold_seconds
        .map(|s| Duration::from_secs(s.into()));
    let every = hold.map(|h| (h / 3).max(Duration::from_millis(500)));
    if hold.is_some() {
        c.hold(&name).await?;
    }
    let wants_volume = o.wait.unwrap_or(false)
        || o.mount.is_some()
        || o.print_mount.unwrap_or(false)
        || hold.is_some();
    if wants_volume {
        let deadline = Instant::now() + o.timeout()?;
        let mut last_hold = Instant::now();
        let bound = loop {
            let now = c.get(Kind::Claim, &name).await?.unwrap_or_default();
            if ready(&now) {
                break now;
            }
            if Instant::now() > deadline {
                bail!(
                    "claim/{name} is not ready after {:?}: {}",
                    o.timeout()?,
                    why_waiting(&now)
                );
            }
            if every.is_some_and(|e| last_hold.elapsed() >= e) {
                c.hold(&name).await?;
                last_hold = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let s = &bound["status"];
        let ordinal = s["ordinal"]
            .as_u64()
            .map(|n| format!(" (ordinal {n})"))
            .unwrap_or_default();
        println!(
            "claim/{name} bound to volume/{}{ordinal} on machine {}",
            s["volume"].as_str().unwrap_or("?"),
            s["machine"].as_str().unwrap_or("?")
        );
        let endpoint = &s["endpoint"];
        let dir = o.mount.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/mnt/{}", s["volume"].as_str().unwrap_or(&name)))
        });
        let cmd = mount_command(endpoint, &dir, o.mount_options.as_deref());
        if o.print_mount.unwrap_or(false) {
            println!("{}", cmd.join(" "));
        }
        if let Some(dir) = &o.mount {
            if mounted(dir, &cmd[5]) {
                println!("{} is already mounted on {}", cmd[5], dir.display());
            } else if let Some(problem) = nfs_client_problem() {
                bail!(
                    "cannot mount on {}: this host has no NFS client: {problem}; the volume is bound and served, mount it with: {}",
                    dir.display(),
                    cmd.join(" ")
                );
            } else {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the mount point {}", dir.display()))?;
                let out = std::process::Command::new(&cmd[0])
                    .args(&cmd[1..])
                    .output()
                    .context("running mount")?;
                if !out.status.success() {
                    bail!(
                        "{} failed: {}",
                        cmd.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                println!("mounted {} on {}", cmd[5], dir.display());
            }
        }
    }
    notify_ready();
    let Some(every) = every else {
        return Ok(0);
    };
    println!("holding claim/{name}: renewing every {every:?}; stop this process to let the claim lapse after {:?}", hold.unwrap_or_default());
    hold_forever(c, &name, every).await
}

/// Tells systemd the claim is served (and mounted, with `--mount`) when run as a `Type=notify`
/// unit (`$NOTIFY_SOCKET` set): units ordered after it start only then. Best effort.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    if let (Ok(addr), Ok(sock)) = (addr, UnixDatagram::unbound()) {
        let _ = sock.send_to_addr(b"READY=1", &addr);
    }
}

/// Renews until SIGINT/SIGTERM. A failed renewal is retried at the same pace (the hold lapses
/// only if renewals keep failing for the whole hold time); a claim deleted meanwhile ends it.
async fn hold_forever(c: &Client, name: &str, every: Duration) -> anyhow::Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(0),
            _ = interrupt.recv() => return Ok(0),
            _ = tokio::time::sleep(every) => {}
        }
        match c.hold(name).await {
            Ok(_) => {}
            Err(CtlError::Api(f)) if f.reason == "NotFound" => {
                bail!("claim/{name} was deleted; no longer holding it")
            }
            Err(e) => eprintln!("warning: renewing claim/{name} failed (retrying): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_form_is_the_flags() {
        let file: ClaimOptions = serde_saphyr::from_str(
            "name: web-7\nhost: 10.0.0.7\nstrategy: ordinal\ngroup: web\nselector: {app: web}\ncreate: {size: 1Gi}\nhold: true\nholdSeconds: 20\n",
        )
        .unwrap();
        let flags = ClaimOptions {
            host: Some("10.0.0.8".into()),
            ..Default::default()
        };
        let c = file.overlay(flags).claim().unwrap();
        assert_eq!(c.spec.host, "10.0.0.8");
        assert_eq!(c.spec.strategy, ClaimStrategy::Ordinal);
        assert_eq!(c.spec.hold_seconds, Some(20));
        assert_eq!(c.spec.create.unwrap().size.to_string(), "1Gi");
    }

    #[test]
    fn bad_options_name_the_option() {
        let e = serde_saphyr::from_str::<ClaimOptions>("name: a\nhots: 1.2.3.4\n").unwrap_err();
        assert!(e.to_string().contains("hots"), "{e}");
        let no_group = ClaimOptions {
            name: Some("a".into()),
            host: Some("10.0.0.1".into()),
            strategy: Some(ClaimStrategy::Ordinal),
            ..Default::default()
        };
        let e = no_group.claim().unwrap_err().to_string();
        assert!(e.contains("spec.group"), "{e}");
        let no_host = ClaimOptions {
            name: Some("a".into()),
            ..Default::default()
        };
        assert!(no_host
            .claim()
            .unwrap_err()
            .to_string()
            .starts_with("host:"));
    }

    #[test]
    fn the_mount_command_uses_the_endpoint_and_the_options() {
        let e = serde_json::json!({"server": "10.0.0.2", "port": 2049, "path": "/web-3"});
        assert_eq!(
            mount_command(&e, Path::new("/srv/web"), Some("hard")).join(" "),
            "mount -t nfs4 -o vers=4.1,port=2049,hard 10.0.0.2:/web-3 /srv/web"
        );
    }
}
