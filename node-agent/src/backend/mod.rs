//! Storage backends: where a machine keeps its volumes. One trait, modelled on Flocker's
//! `IBlockDeviceAPI`, so the reconciler never knows which filesystem it drives, and a reusable
//! [`conformance`] suite any backend instantiates against the real thing.
//!
//! Backends are synchronous (they are syscalls and short commands); the agent calls them from
//! `spawn_blocking`. Every volume carries its own metadata on the backend ([`VolumeRecord`]), so
//! a restarted agent rediscovers its volumes without etcd.

pub mod btrfs;
pub mod conformance;

use std::path::PathBuf;

use cobalt_api::Compression;
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
    #[error("{path} is not a BTRFS filesystem (statfs type {found:#x}); point backend.pool at a mounted BTRFS directory")]
    NotBtrfs { path: PathBuf, found: i64 },
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
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// A place that holds volumes. Every method is idempotent where the name says so and safe to
/// call again after a crash at any point.
pub trait Backend: Send + Sync + 'static {
    /// Creates an empty volume, or does nothing if one with this uid exists with the same record.
    fn create(&self, record: &VolumeRecord) -> Result<()>;
    /// Creates `record` as a copy of `source_uid`'s current content with its own size limit.
    /// Idempotent like `create`.
    fn clone_from(&self, source_uid: &str, record: &VolumeRecord) -> Result<()>;
    /// Destroys a volume and everything in it. Unknown uid → [`BackendError::UnknownVolume`].
    fn destroy(&self, uid: &str) -> Result<()>;
    /// Sets the hard limit. Shrinking below what is used → [`BackendError::ResizeBlocked`].
    fn resize(&self, uid: &str, size_bytes: u64) -> Result<()>;
    fn set_compression(&self, uid: &str, compression: cobalt_api::Compression) -> Result<()>;
    fn compression(&self, uid: &str) -> Result<cobalt_api::Compression>;
    fn defragment(&self, uid: &str) -> Result<()>;
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
