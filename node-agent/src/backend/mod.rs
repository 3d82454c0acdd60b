//! Storage backends: where a machine keeps its volumes. One trait, modelled on Flocker's
//! `IBlockDeviceAPI`, so the reconciler never knows which filesystem it drives, and a reusable
//! [`conformance`] suite any backend instantiates against the real thing.
//!
//! The trait has a **core** every backend implements (create, destroy, resize, list with
//! records, usage, capacity, path) and **capabilities** it declares as data
//! ([`Backend::capabilities`]): compression, clone, defragment, snapshot and send/receive (what
//! moves are made of, see [`stream`]). A capability's methods default to [`BackendError::Unsupported`], the agent
//! publishes the list on its Machine, the scheduler places volumes only where their spec can be
//! served, and the conformance suite runs a capability's cases only where it is declared.
//!
//! Backends are synchronous (they are syscalls and short commands); the agent calls them from
//! `spawn_blocking`. Every volume carries its own metadata on the backend ([`VolumeRecord`]), so
//! a restarted agent rediscovers its volumes without etcd.

pub mod btrfs;
pub mod conformance;
pub mod loopdev;
pub mod stream;

use std::path::PathBuf;

use cobalt_api::{Capability, Compression};
use serde::{Deserialize, Serialize};

/// What a backend stores with each volume, and lists back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    /// The Volume's uid: names the data for its whole life (renames and name reuse are safe).
    pub uid: String,
    /// The Volume's name when it was created, for people reading `list`.
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub compression: Compression,
}

/// Bytes used and the hard limit of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeUsage {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

/// Space held by one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotUsage {
    pub name: String,
    /// Bytes the snapshot references (the volume's content when it was taken).
    pub referenced_bytes: u64,
    /// Bytes only the snapshot holds: what deleting it frees.
    pub exclusive_bytes: u64,
}

/// The machine's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolCapacity {
    pub total_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no volume with uid {0} on this backend")]
    UnknownVolume(String),
    #[error("cannot shrink to {new_bytes} bytes: {used_bytes} bytes are in use; free space first or choose a larger size")]
    ResizeBlocked { used_bytes: u64, new_bytes: u64 },
    /// The backend does not declare `shrink` (or `grow`) and was asked to.
    #[error("{reason}")]
    ResizeUnsupported { reason: String },
    #[error("the pool {path} cannot be used: {reason}")]
    InvalidPool { path: PathBuf, reason: String },
    #[error("this backend cannot {capability} (it does not declare the capability)")]
    Unsupported { capability: Capability },
    #[error("{op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("volume {uid} exists with different metadata ({found}); refusing to reuse it")]
    Mismatch { uid: String, found: String },
    #[error("volume {uid} has no snapshot {name}")]
    UnknownSnapshot { uid: String, name: String },
    #[error("the stream for volume {uid} is not a complete stream: {reason}; nothing was kept")]
    BadStream { uid: String, reason: String },
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Runs a command; its stdout, or [`BackendError::Command`] with its stderr.
pub(crate) fn run(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output().map_err(|e| BackendError::Command {
        command: format!("{cmd:?}"),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(BackendError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Maps an I/O error of `op` on `path` to [`BackendError::Io`].
pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> BackendError + 'a {
    move |source| BackendError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A place that holds volumes. Every method is idempotent where the name says so and safe to
/// call again after a crash at any point.
pub trait Backend: Send + Sync + 'static {
    /// The backend's kind as published in the Machine label `cobalt.io/backend` (`btrfs`).
    fn kind(&self) -> &'static str;
    /// What this backend can do beyond the core. Methods of capabilities not listed here return
    /// [`BackendError::Unsupported`].
    fn capabilities(&self) -> Vec<Capability>;

    /// Creates an empty volume, or does nothing if one with this uid exists with the same record.
    fn create(&self, record: &VolumeRecord) -> Result<()>;
    /// Destroys a volume and everything in it. Unknown uid → [`BackendError::UnknownVolume`].
    fn destroy(&self, uid: &str) -> Result<()>;
    /// Sets the hard limit. Shrinking below what is used → [`BackendError::ResizeBlocked`];
    /// shrinking (growing) on a backend without the `shrink` (`grow`) capability →
    /// [`BackendError::ResizeUnsupported`] (the size stays).
    fn resize(&self, uid: &str, size_bytes: u64) -> Result<()>;

    /// Capability `clone`: creates `record` as a copy of `source_uid`'s current content with its
    /// own size limit. Idempotent like `create`.
    fn clone_from(&self, _source_uid: &str, _record: &VolumeRecord) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::Clone,
        })
    }
    /// Capability `compression`: compression of new writes.
    fn set_compression(&self, _uid: &str, _compression: Compression) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::Compression,
        })
    }
    /// Capability `compression`: the compression in force.
    fn compression(&self, _uid: &str) -> Result<Compression> {
        Err(BackendError::Unsupported {
            capability: Capability::Compression,
        })
    }
    /// Capability `defragment`: defragments the volume online (content unchanged).
    fn defragment(&self, _uid: &str) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::Defragment,
        })
    }

    /// Capability `snapshot`: a read-only, atomic point-in-time copy of the volume, named `name`
    /// (`[A-Za-z0-9._-]`, unique per volume). Idempotent.
    fn snapshot(&self, _uid: &str, _name: &str) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::Snapshot,
        })
    }
    /// Capability `snapshot`: the volume's snapshots, oldest first.
    fn snapshots(&self, _uid: &str) -> Result<Vec<String>> {
        Err(BackendError::Unsupported {
            capability: Capability::Snapshot,
        })
    }
    /// Capability `snapshot`: deletes one snapshot (the volume is untouched). Unknown → Ok.
    fn delete_snapshot(&self, _uid: &str, _name: &str) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::Snapshot,
        })
    }
    /// Capability `snapshot`: the space each snapshot of each of `uids` holds, by volume uid
    /// (current: one filesystem commit for the whole call, so call it for many volumes at once).
    fn snapshot_usage(
        &self,
        _uids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<SnapshotUsage>>> {
        Err(BackendError::Unsupported {
            capability: Capability::Snapshot,
        })
    }
    /// Capability `snapshot`: creates `record` as a writable copy of snapshot `name` of volume
    /// `uid` (a restore), with `record`'s own limit. Idempotent like `create`; the snapshot is
    /// untouched and the new volume does not depend on it afterwards.
    fn restore(&self, _uid: &str, _name: &str, _record: &VolumeRecord) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::Snapshot,
        })
    }
    /// Capability `sendReceive`: a stream of snapshot `name` of the volume — incremental on
    /// `parent` (an older snapshot of the same volume the receiver already holds) or full.
    fn send(&self, _uid: &str, _name: &str, _parent: Option<&str>) -> Result<stream::SendStream> {
        Err(BackendError::Unsupported {
            capability: Capability::SendReceive,
        })
    }
    /// Capability `sendReceive`: receives a stream made by [`Backend::send`] of volume `uid`
    /// into this backend's private staging area and returns the snapshot's name. The stream is
    /// kept only if it is complete (a truncated, corrupt or larger than `max_bytes` stream is an
    /// error and leaves nothing behind); a receive interrupted by a crash is simply run again.
    fn receive(
        &self,
        _uid: &str,
        _stream: &mut dyn std::io::Read,
        _max_bytes: u64,
    ) -> Result<String> {
        Err(BackendError::Unsupported {
            capability: Capability::SendReceive,
        })
    }
    /// Capability `sendReceive`: the complete snapshots received for `uid`, oldest first.
    fn received(&self, _uid: &str) -> Result<Vec<String>> {
        Err(BackendError::Unsupported {
            capability: Capability::SendReceive,
        })
    }
    /// Capability `sendReceive`: the uids with anything received (complete or not).
    fn staged(&self) -> Result<Vec<String>> {
        Err(BackendError::Unsupported {
            capability: Capability::SendReceive,
        })
    }
    /// Capability `sendReceive`: drops everything received for `uid` (never the live volume).
    fn discard_received(&self, _uid: &str) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::SendReceive,
        })
    }
    /// Capability `sendReceive`: makes the live volume `record.uid` a writable copy of the
    /// received snapshot `name`, with `record`'s limit and compression. Idempotent: an existing
    /// live volume with the same uid is kept as it is.
    fn promote(&self, _name: &str, _record: &VolumeRecord) -> Result<()> {
        Err(BackendError::Unsupported {
            capability: Capability::SendReceive,
        })
    }

    /// The labels the agent puts on its Machine for this backend, so manifests can select it:
    /// `cobalt.io/backend` = [`Backend::kind`], and whatever else the backend adds.
    fn labels(&self) -> std::collections::BTreeMap<String, String> {
        [(
            cobalt_api::BACKEND_LABEL.to_string(),
            self.kind().to_string(),
        )]
        .into()
    }
    /// True when the backend declares `capability`.
    fn can(&self, capability: Capability) -> bool {
        self.capabilities().contains(&capability)
    }
    /// Every volume on the backend with its record.
    fn list(&self) -> Result<Vec<VolumeRecord>>;
    /// One volume's record, if it exists (and its creation finished).
    fn get(&self, uid: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.list()?.into_iter().find(|r| r.uid == uid))
    }
    /// One volume's usage, current to this instant (may commit the filesystem to get it).
    fn usage(&self, uid: &str) -> Result<VolumeUsage>;
    /// Usage of every volume, by uid, in one pass. Figures may lag writes by the filesystem's
    /// commit interval; this is what periodic reporting uses, so it must stay cheap at
    /// thousands of volumes.
    fn usage_all(&self) -> Result<std::collections::HashMap<String, VolumeUsage>> {
        self.list()?
            .into_iter()
            .map(|r| Ok((r.uid.clone(), self.usage(&r.uid)?)))
            .collect()
    }
    fn capacity(&self) -> Result<PoolCapacity>;
    /// Where the volume's files are, for exporters.
    fn path(&self, uid: &str) -> PathBuf;
}
