//! Moves: carrying a volume's data from the machine holding it (the **source**) to the machine
//! its `spec.machine` names (the **target**), with the volume served at the source until a
//! short cut-over.
//!
//! The scheduler grants a move by writing `status.move` (room is then reserved on both ends).
//! From there the target drives ([`target`]): it pulls snapshots from the source's agent over
//! HTTP ([`source`] serves them) — a full seed, then incremental rounds until a round carries
//! little (`convergedBytes`) or takes under half a second — then writes stage CuttingOver. From that write on the source serves no more
//! writes (its plan unexports the volume, and the final request unexports it before the last
//! snapshot is taken, so every write the source acknowledged is in that snapshot). The target
//! receives the final increment, makes the live volume a writable snapshot of it with this
//! machine's quota and compression, exports it, and flips `status.machine` and
//! `status.endpoint` in one status write (stage CleaningUp). The source then destroys its copy
//! after a fresh read confirms the flip, and clears `status.move`.
//!
//! Every stage is in etcd, so any process can die at any point and the move resumes: a target
//! restarted mid-receive drops the partial stream and pulls again from the last complete
//! snapshot; a source restarted after the cut-over began keeps the volume unexported.
//!
//! **Credentials.** The target makes a random credential when it starts pulling and writes only
//! its SHA-256 to `status.move.credentialSha256`; the source answers a stream request only when
//! the bearer credential hashes to that value in a fresh read of the volume, the volume is
//! moving away from it, and the uid matches (401 without a credential, 403 with a wrong one).
//!
//! **Bounds.** One move in and one out per machine by default (`moves.maxIncoming`,
//! `moves.maxOutgoing`), an optional rate limit on what a machine sends (`moves.rateLimit`), an
//! idle timeout on every stream read, and a size bound on what a target accepts (twice the
//! volume's limit plus 64 MiB), so a corrupt or inflated stream cannot fill its pool.

pub mod source;
pub mod target;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cobalt_store::Store;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::backend::Backend;
use crate::exporter::batch::Exports;

/// Snapshots the source takes for moves are named `move-<unix millis>[-final]`.
pub const SNAPSHOT_PREFIX: &str = "move-";
/// Snapshots the source takes to seed a clone on another machine: `clone-<clone uid>-<millis>`.
pub const CLONE_SNAPSHOT_PREFIX: &str = "clone-";
/// The suffix of the snapshot taken after the source stopped serving.
pub const FINAL_SUFFIX: &str = "-final";

/// The agent's `moves:` configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MoveConfig {
    /// Moves this machine receives at once.
    pub max_incoming: usize,
    /// Streams this machine sends at once.
    pub max_outgoing: usize,
    /// Bytes per second this machine sends over all streams (0: unlimited).
    pub rate_limit: u64,
    /// A round that sent fewer bytes than this ends the converging: the cut-over follows.
    pub converged_bytes: u64,
    /// Incremental rounds before the cut-over at the latest.
    pub max_rounds: u32,
    /// A stream that delivers nothing for this long is abandoned (and retried).
    #[serde(with = "cobalt_api::duration::serde_duration")]
    pub idle_timeout: Duration,
}

impl Default for MoveConfig {
    fn default() -> Self {
        MoveConfig {
            max_incoming: 1,
            max_outgoing: 1,
            rate_limit: 0,
            converged_bytes: 16 << 20,
            max_rounds: 6,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What a machine shares between its move source and target sides.
pub struct Moves {
    pub machine: String,
    /// Where NFS clients reach this machine (for the endpoint written at cut-over).
    pub address: String,
    pub store: Store,
    pub backend: Arc<dyn Backend>,
    pub exports: Arc<Exports>,
    /// The uids this machine has published (a copy listed there is never destroyed as stale).
    pub published: Arc<crate::published::Published>,
    pub config: MoveConfig,
    incoming: Arc<tokio::sync::Semaphore>,
    outgoing: Arc<tokio::sync::Semaphore>,
    /// Volumes (by uid) whose cut-over has begun here as the source: never exported again.
    frozen: Mutex<HashSet<String>>,
    /// Pulls running here as the target, by uid, with the grant they serve.
    pulls: Mutex<HashMap<String, Pull>>,
    /// One lock per uid over its staging: a receive (which runs on past a cancelled pull)
    /// and a discard never interleave.
    staging: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    limiter: RateLimiter,
    http: reqwest::Client,
}

struct Pull {
    started: chrono::DateTime<chrono::Utc>,
    cancel: cobalt_reconcile::CancellationToken,
}

impl Moves {
    pub fn new(
        machine: String,
        address: String,
        store: Store,
        backend: Arc<dyn Backend>,
        exports: Arc<Exports>,
        published: Arc<crate::published::Published>,
        config: MoveConfig,
    ) -> Arc<Moves> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(config.idle_timeout)
            .build()
            .expect("an HTTP client with default TLS settings");
        Arc::new(Moves {
            machine,
            address,
            store,
            backend,
            exports,
            published,
            incoming: Arc::new(tokio::sync::Semaphore::new(config.max_incoming.max(1))),
            outgoing: Arc::new(tokio::sync::Semaphore::new(config.max_outgoing.max(1))),
            frozen: Mutex::new(HashSet::new()),
            pulls: Mutex::new(HashMap::new()),
            staging: Mutex::new(HashMap::new()),
            limiter: RateLimiter::new(config.rate_limit),
            config,
            http,
        })
    }

    /// True once this machine, as a move's source, has stopped serving the volume.
    pub fn is_frozen(&self, uid: &str) -> bool {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(uid)
    }

    fn freeze(&self, uid: &str) {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string());
    }

    /// The lock over `uid`'s staging.
    fn staging_lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.staging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid.to_string())
            .or_default()
            .clone()
    }

    /// Forgets a frozen volume once its copy here is gone.
    pub fn thaw(&self, uid: &str) {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }
}

/// A random credential (256 bits from the kernel) as hex.
pub fn new_credential() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex(&bytes))
}

/// SHA-256 of a credential, as hex: what `status.move.credentialSha256` holds.
pub fn credential_hash(credential: &str) -> String {
    hex(&sha2::Sha256::digest(credential.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time comparison of two hex digests.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Paces what a machine sends to `bytes_per_sec` over all its streams (0: no limit).
pub struct RateLimiter {
    bytes_per_sec: u64,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec,
            next: Mutex::new(None),
        }
    }

    /// How long the caller must wait before sending `bytes` (it then sends them).
    pub fn delay(&self, bytes: usize) -> Duration {
        if self.bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = next.filter(|n| *n > now).unwrap_or(now);
        *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64));
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_random_and_only_its_hash_matches() {
        let a = new_credential().unwrap();
        let b = new_credential().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same_digest(&credential_hash(&a), &credential_hash(&a)));
        assert!(!same_digest(&credential_hash(&a), &credential_hash(&b)));
        assert!(!same_digest(&credential_hash(&a), &a));
    }

    #[test]
    fn the_rate_limiter_paces_sends_over_all_streams() {
        let r = RateLimiter::new(1 << 20);
        assert_eq!(r.delay(1 << 19), Duration::ZERO);
        let second = r.delay(1 << 19);
        assert!(second > Duration::from_millis(400), "{second:?}");
        let third = r.delay(1 << 20);
        assert!(third > Duration::from_millis(900), "{third:?}");
        assert_eq!(RateLimiter::new(0).delay(1 << 30), Duration::ZERO);
    }
}
