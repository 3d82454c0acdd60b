//! The nfs-ganesha exporter: runs its own `ganesha.nfsd` (NFSv4 only, on its own port, pid file,
//! log and recovery directory, so several can run side by side) with one export file per volume
//! included from a main config, and reloads it with SIGHUP (≈0.2 s) when exports change, waiting
//! for ganesha to log that the reload is done: an export reported applied is served.
//!
//! Ganesha cannot export a BTRFS subvolume under its parent (it would cross a subvolume
//! boundary), so each exported subvolume is bind-mounted on `<dir>/exports/<name>.<dev>-<born>`
//! and that is exported, at pseudo path `/<name>`. `<dev>-<born>` is the subvolume's device
//! number and birth time, so a volume that comes back to this machine after a move (a new
//! subvolume under the same name) gets a new mount point and export id: ganesha keeps state of
//! a removed export's filesystem for a while, and reusing its path answered lookups with "stale
//! file handle" — or, the kernel having reused the device number, was refused as a duplicate.
//! NFSv4 shows numeric owners (no idmapping) and starts without a grace period.
//!
//! Ganesha's state can differ from the files: an agent killed between writing them and the
//! SIGHUP. So the first apply of every agent reloads whatever it finds, and a reload counts only
//! once ganesha logs it complete without refusing any export.
//!
//! Supervision: [`GaneshaExporter::ensure_running`] restarts a crashed ganesha. The process runs
//! in its own session, so an agent that is killed leaves it serving; the next agent adopts it
//! from the pid file — an agent restart causes no export blip. A graceful agent shutdown stops it.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cobalt_api::Access;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{assign_ids, write_atomically, ExportError, ExportSet, ExportSpec, Exporter};

/// How long a (re)started ganesha may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(15);
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// How long ganesha may take to confirm a reload (≈5 ms here with a handful of exports).
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// How soon the log is read again after a SIGHUP, doubling up to [`RELOAD_POLL_MAX`].
const RELOAD_POLL_FIRST: Duration = Duration::from_micros(250);
const RELOAD_POLL_MAX: Duration = Duration::from_millis(10);
/// What ganesha logs (at NIV_EVENT) once a SIGHUP's export reload is done.
const RELOAD_DONE: &str = "Reread exports complete";

enum Process {
    Started(Child),
    Adopted(u32),
}

pub struct GaneshaExporter {
    dir: PathBuf,
    port: u16,
    process: Mutex<Option<Process>>,
    /// What the last successful apply left on disk, so the next one touches only what changed
    /// (an apply must stay cheap with thousands of exports). `None` — at start and after any
    /// error — means: look at the disk and /proc/mounts again.
    applied: Mutex<Option<OnDisk>>,
    /// A reload was sent but not confirmed: the next apply reloads even if nothing changed.
    reload_owed: std::sync::atomic::AtomicBool,
}

/// Export files (path → content, the main config included) and bind mounts in place.
#[derive(Default)]
struct OnDisk {
    files: HashMap<PathBuf, String>,
    mounts: BTreeSet<PathBuf>,
}

impl OnDisk {
    /// Reads what is there now.
    fn scan(exports_d: &Path, config: &Path) -> OnDisk {
        let mut files = HashMap::new();
        let paths = std::fs::read_dir(exports_d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([config.to_path_buf()]);
        for path in paths {
            if let Ok(text) = std::fs::read_to_string(&path) {
                files.insert(path, text);
            }
        }
        OnDisk {
            files,
            mounts: mount_points(),
        }
    }

    /// Writes `text` to `path` unless it is there already; true if it wrote.
    fn write(&mut self, path: PathBuf, text: String) -> Result<bool, ExportError> {
        if self.files.get(&path) == Some(&text) {
            return Ok(false);
        }
        // What is on disk is known (scanned, then kept): no need to read it back first.
        write_atomically(&path, &text)?;
        self.files.insert(path, text);
        Ok(true)
    }
}

/// Which subvolume `e.source` is now: its device number and birth time (0 if they cannot be
/// read). The device number alone is not enough: the kernel reuses a destroyed subvolume's
/// anonymous device for the next one, and ganesha refused the new export as a duplicate of the
/// old one it still held ("Duplicate export id", the volume not served).
fn incarnation(e: &ExportSpec) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(&e.source) else {
        return "0".into();
    };
    let born = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{born:x}", m.dev())
}

/// The key and seed [`super::assign_ids`] takes for an export at `mountpoint`.
fn id_request(e: &ExportSpec, mountpoint: &Path) -> (String, String) {
    let key = mountpoint.display().to_string();
    let seed = format!("{}/{key}", e.uid);
    (key, seed)
}

/// The Export_Id and Path of each export file's text (what ganesha holds after its last reload).
fn ids_in_force<'a>(files: impl Iterator<Item = &'a String>) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for text in files {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| {
                    v.trim()
                        .trim_end_matches(';')
                        .trim()
                        .trim_matches('"')
                        .to_string()
                })
        };
        if let (Some(id), Some(path)) = (field("Export_Id ="), field("Path =")) {
            if let Ok(id) = id.parse() {
                out.insert(path, id);
            }
        }
    }
    out
}

/// One volume's export block (pure), with Export_Id `id`.
pub fn render_export(e: &ExportSpec, mountpoint: &Path, id: u32) -> String {
    let mut out = format!(
        "# {name} (uid {uid}); written by cobalt-agent\nEXPORT {{\n  Export_Id = {id};\n  Path = \"{path}\";\n  Pseudo = \"/{name}\";\n  Protocols = 4;\n  SecType = sys;\n  Access_Type = None;\n  Squash = Root_Squash;\n  FSAL {{ Name = VFS; }}\n",
        name = e.name,
        uid = e.uid,
        path = mountpoint.display()
    );
    for c in &e.clients {
        out.push_str(&format!(
            "  CLIENT {{ Clients = {}; Access_Type = {}; Squash = {}; }}\n",
            c.host,
            match c.access {
                Access::Rw => "RW",
                Access::Ro => "RO",
            },
            if c.root_squash {
                "Root_Squash"
            } else {
                "No_Root_Squash"
            }
        ));
    }
    out.push_str("}\n");
    out
}

/// The main config including every export file (pure).
pub fn render_main(port: u16, recovery: &Path, includes: &[PathBuf]) -> String {
    let mut out = format!(
        "# Written by cobalt-agent.\nNFS_CORE_PARAM {{\n  NFS_Port = {port};\n  Protocols = 4;\n  Enable_NLM = false;\n  Enable_RQUOTA = false;\n  Enable_UDP = false;\n}}\nNFSV4 {{\n  Graceless = true;\n  Allow_Numeric_Owners = true;\n  Only_Numeric_Owners = true;\n  RecoveryRoot = \"{}\";\n}}\nNFS_KRB5 {{ Active_krb5 = false; }}\n",
        recovery.display()
    );
    for inc in includes {
        out.push_str(&format!("%include \"{}\"\n", inc.display()));
    }
    out
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ExportError + 'a {
    move |source| ExportError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `mount --bind source target`, as a syscall (no process per export).
fn bind_mount(source: &Path, target: &Path) -> Result<(), ExportError> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ExportError::Io {
        op: "bind-mount onto",
        path: target.into(),
        source: e.into(),
    })
}

/// `umount -l target`: detached now, released once ganesha lets go of it.
fn detach(target: &Path) -> Result<(), ExportError> {
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(|e| ExportError::Io {
        op: "unmount",
        path: target.into(),
        source: e.into(),
    })
}

/// Mount points now mounted (read once per apply: /proc/mounts grows with every export).
fn mount_points() -> BTreeSet<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(PathBuf::from))
        .collect()
}

impl GaneshaExporter {
    /// Makes the disk, the mounts and ganesha hold exactly `set`, touching only what differs
    /// from `disk` (which it keeps current).
    fn apply_on(&self, disk: &mut OnDisk, set: &ExportSet) -> Result<(), ExportError> {
        let exports_d = self.exports_d();
        let mut changed = false;
        let wanted: BTreeSet<PathBuf> = set
            .values()
            .filter(|e| !e.clients.is_empty())
            .map(|e| exports_d.join(format!("{}.conf", e.name)))
            .collect();
        // The ids ganesha holds until it reloads, read before any file goes: a new export must
        // not take the id of one leaving in the same reload.
        let in_force = ids_in_force(
            disk.files
                .iter()
                .filter(|(p, _)| p.starts_with(&exports_d))
                .map(|(_, text)| text),
        );
        // Remove exports no longer wanted: file first (after the reload ganesha lets go), then mount.
        let stale: Vec<PathBuf> = disk
            .files
            .keys()
            .filter(|p| p.starts_with(&exports_d) && !wanted.contains(*p))
            .cloned()
            .collect();
        for path in stale {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
            disk.files.remove(&path);
            // A leftover `<name>.tmp` from an interrupted write is only a file.
            if path.extension().is_some_and(|x| x == "conf") {
                changed = true;
            }
        }
        let mut includes = Vec::new();
        let mut wanted_mounts = BTreeSet::new();
        let exported: Vec<(&ExportSpec, PathBuf)> = set
            .values()
            .filter(|e| !e.clients.is_empty())
            .map(|e| (e, self.mountpoint(e)))
            .collect();
        let requests: Vec<(String, String)> =
            exported.iter().map(|(e, mp)| id_request(e, mp)).collect();
        let ids = assign_ids(&requests, &in_force);
        for (e, mp) in exported {
            let id = ids[&id_request(e, &mp).0];
            wanted_mounts.insert(mp.clone());
            if !disk.mounts.contains(&mp) {
                std::fs::create_dir_all(&mp).map_err(io("create", &mp))?;
                bind_mount(&e.source, &mp)?;
                disk.mounts.insert(mp.clone());
            }
            let file = exports_d.join(format!("{}.conf", e.name));
            changed |= disk.write(file.clone(), render_export(e, &mp, id))?;
            includes.push(file);
        }
        changed |= disk.write(
            self.config(),
            render_main(self.port, &self.dir.join("recovery"), &includes),
        )?;
        if self.running() || self.adopt() {
            if changed || self.reload_owed.load(std::sync::atomic::Ordering::SeqCst) {
                self.reload()?;
            }
        } else {
            self.start()?;
            self.reload_owed
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        // Mounts of exports gone (or of an earlier subvolume of the same name), after the
        // reload has let go of them.
        let exports = self.dir.join("exports");
        let stale_mounts: Vec<PathBuf> = disk
            .mounts
            .iter()
            .filter(|m| m.parent() == Some(exports.as_path()) && !wanted_mounts.contains(*m))
            .cloned()
            .collect();
        for mp in stale_mounts {
            disk.mounts.remove(&mp);
            // Ganesha may hold it a moment after the reload; lazy unmount does not wait.
            detach(&mp)?;
            let _ = std::fs::remove_dir(&mp);
        }
        Ok(())
    }

    /// Uses `dir` (e.g. `<stateDir>/ganesha`) for config, mounts, pid file, log and recovery.
    pub fn new(dir: PathBuf, port: u16) -> Self {
        GaneshaExporter {
            dir,
            port,
            process: Mutex::new(None),
            applied: Mutex::new(None),
            // An adopted ganesha may not hold what the disk says: an agent killed between
            // writing the export files and signalling left it with the old set. The first apply
            // reloads whatever it finds.
            reload_owed: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("ganesha.conf")
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("ganesha.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("ganesha.log")
    }
    fn exports_d(&self) -> PathBuf {
        self.dir.join("exports.d")
    }
    fn mountpoint(&self, e: &ExportSpec) -> PathBuf {
        self.dir
            .join("exports")
            .join(format!("{}.{}", e.name, incarnation(e)))
    }

    fn pid(&self) -> Option<u32> {
        match self.process.lock().ok()?.as_ref()? {
            Process::Started(c) => Some(c.id()),
            Process::Adopted(p) => Some(*p),
        }
    }

    /// True while our ganesha runs.
    pub fn running(&self) -> bool {
        let Ok(mut guard) = self.process.lock() else {
            return false;
        };
        match guard.as_mut() {
            Some(Process::Started(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Process::Adopted(pid)) => process_is_ganesha(*pid),
            None => false,
        }
    }

    fn adopt(&self) -> bool {
        let Some(pid) = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            return false;
        };
        if process_is_ganesha(pid) {
            if let Ok(mut g) = self.process.lock() {
                *g = Some(Process::Adopted(pid));
            }
            tracing::info!(pid, "adopted the running nfs-ganesha");
            return true;
        }
        false
    }

    fn start(&self) -> Result<(), ExportError> {
        let mut cmd = Command::new("ganesha.nfsd");
        cmd.arg("-F")
            .arg("-f")
            .arg(self.config())
            .arg("-p")
            .arg(self.pid_file())
            .arg("-L")
            .arg(self.log_file())
            .arg("-N")
            .arg("NIV_EVENT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own session: survives an agent crash so exports keep serving (see module docs).
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|e| ExportError::Command {
            command: "ganesha.nfsd".into(),
            message: format!("{e} (install nfs-ganesha: `make deps`)"),
        })?;
        let pid = child.id();
        if let Ok(mut g) = self.process.lock() {
            *g = Some(Process::Started(child));
        }
        let start = Instant::now();
        while start.elapsed() < START_DEADLINE {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                tracing::info!(pid, port = self.port, "nfs-ganesha serving");
                return Ok(());
            }
            if !self.running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(ExportError::Command {
            command: "ganesha.nfsd".into(),
            message: format!(
                "did not start listening on port {}; log: {}",
                self.port,
                tail.join(" | ")
            ),
        })
    }

    /// Starts (or adopts) ganesha if it is not running; the supervisor calls this periodically.
    pub fn ensure_running(&self) -> Result<(), ExportError> {
        if self.running() || self.adopt() {
            return Ok(());
        }
        if !self.config().exists() {
            self.apply(&ExportSet::new())?;
            return Ok(());
        }
        tracing::warn!("nfs-ganesha is not running; starting it");
        self.start()
    }

    /// Sends SIGHUP and waits until ganesha logs that the export reload is done, so an export
    /// reported as applied is served (a client mounting right after a volume turns Ready must
    /// find it). Unconfirmed within [`RELOAD_DEADLINE`]: an error, and the next apply reloads.
    fn reload(&self) -> Result<(), ExportError> {
        use std::io::{Read, Seek, SeekFrom};
        use std::sync::atomic::Ordering;
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        self.reload_owed.store(true, Ordering::SeqCst);
        let log = self.log_file();
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
        let start = Instant::now();
        // A reload usually completes within a few milliseconds: look again soon, then less
        // often (a fixed 10 ms pause made every export wait for it, in front of Ready).
        let mut pause = RELOAD_POLL_FIRST;
        loop {
            let mut tail = String::new();
            if let Ok(mut f) = std::fs::File::open(&log) {
                if f.seek(SeekFrom::Start(from)).is_ok() {
                    let mut bytes = Vec::new();
                    let _ = f.read_to_end(&mut bytes);
                    tail = String::from_utf8_lossy(&bytes).into_owned();
                }
            }
            if tail.contains(RELOAD_DONE) {
                // A reload that refused part of the config ("Pseudo path … is a duplicate") still
                // says complete: the refusal is an error, and the next apply reloads again.
                let refused: Vec<&str> = tail
                    .lines()
                    .filter(|l| l.contains("CONFIG :CRIT"))
                    .filter_map(|l| l.rsplit_once(":CRIT :").map(|(_, m)| m.trim()))
                    .collect();
                if !refused.is_empty() {
                    return Err(ExportError::Command {
                        command: "ganesha.nfsd (SIGHUP)".into(),
                        message: format!("refused the exports: {}", refused.join("; ")),
                    });
                }
                self.reload_owed.store(false, Ordering::SeqCst);
                tracing::debug!(took = ?start.elapsed(), "nfs-ganesha reloaded its exports");
                return Ok(());
            }
            if start.elapsed() > RELOAD_DEADLINE || !self.running() {
                return Err(ExportError::Command {
                    command: "ganesha.nfsd (SIGHUP)".into(),
                    message: format!(
                        "did not confirm the export reload within {RELOAD_DEADLINE:?} (see {})",
                        log.display()
                    ),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(RELOAD_POLL_MAX);
        }
    }
}

fn process_is_ganesha(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with("ganesha"))
        .unwrap_or(false)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

impl Exporter for GaneshaExporter {
    fn apply(&self, set: &ExportSet) -> Result<(), ExportError> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let mut disk = match applied.take() {
            Some(d) => d,
            None => {
                let exports_d = self.exports_d();
                for d in [
                    &exports_d,
                    &self.dir.join("exports"),
                    &self.dir.join("recovery"),
                ] {
                    std::fs::create_dir_all(d).map_err(io("create", d))?;
                }
                OnDisk::scan(&exports_d, &self.config())
            }
        };
        // On error `applied` stays None: the next apply looks at the disk again.
        self.apply_on(&mut disk, set)?;
        *applied = Some(disk);
        Ok(())
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn supervise(&self) -> Result<(), ExportError> {
        self.ensure_running()
    }

    fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let start = Instant::now();
        while self.running() && start.elapsed() < STOP_DEADLINE {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.running() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Ok(mut g) = self.process.lock() {
            if let Some(Process::Started(c)) = g.as_mut() {
                let _ = c.wait();
            }
            *g = None;
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("exports")) {
            let mounted = mount_points();
            for e in entries.flatten() {
                if mounted.contains(&e.path()) {
                    let _ = detach(&e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::ExportClient;

    #[test]
    fn the_ids_in_force_are_read_back_from_the_export_files() {
        let e = ExportSpec {
            name: "media".into(),
            uid: "u-1".into(),
            source: "/pool/u-1".into(),
            clients: vec![],
        };
        let text = render_export(&e, Path::new("/state/ganesha/exports/media.7-1f"), 4242);
        assert_eq!(
            ids_in_force([text].iter()),
            HashMap::from([("/state/ganesha/exports/media.7-1f".to_string(), 4242)])
        );
    }

    #[test]
    fn an_export_lists_each_client_with_its_access_and_squash_and_denies_the_rest() {
        let e = ExportSpec {
            name: "media".into(),
            uid: "u-1".into(),
            source: "/pool/volumes/u-1".into(),
            clients: vec![
                ExportClient {
                    host: "10.0.0.0/24".into(),
                    access: Access::Rw,
                    root_squash: true,
                },
                ExportClient {
                    host: "10.0.1.7".into(),
                    access: Access::Ro,
                    root_squash: false,
                },
            ],
        };
        let text = render_export(&e, Path::new("/state/ganesha/exports/media"), 17);
        assert!(text.contains("Pseudo = \"/media\";"));
        assert!(text.contains("Path = \"/state/ganesha/exports/media\";"));
        assert!(
            text.contains("Access_Type = None;"),
            "unlisted hosts get nothing"
        );
        assert!(text
            .contains("CLIENT { Clients = 10.0.0.0/24; Access_Type = RW; Squash = Root_Squash; }"));
        assert!(text
            .contains("CLIENT { Clients = 10.0.1.7; Access_Type = RO; Squash = No_Root_Squash; }"));
        assert!(text.contains("Export_Id = 17;"));
        let main = render_main(12049, Path::new("/r"), &[PathBuf::from("/x/media.conf")]);
        assert!(
            main.contains("NFS_Port = 12049;")
                && main.contains("Graceless = true;")
                && main.contains("%include \"/x/media.conf\"")
        );
    }
}
