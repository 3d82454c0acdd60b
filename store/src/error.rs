//! What can go wrong talking to the store, in words a user can act on.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} {name:?} was changed by someone else (resourceVersion {sent} is not the current one); read it again and retry")]
    Conflict {
        kind: &'static str,
        name: String,
        sent: String,
    },
    #[error("this process is no longer the leader of {election:?}; the write was refused")]
    Fenced { election: String },
    #[error("revision {requested} has been compacted (oldest available is {compact_revision}); list again")]
    Compacted {
        requested: i64,
        compact_revision: i64,
    },
    #[error("etcd at {endpoints} did not answer within {deadline:?} ({cause}); check that etcd is running and --etcd-endpoints is right")]
    Unavailable {
        endpoints: String,
        deadline: Duration,
        cause: String,
    },
    #[error("the API at {server} did not answer ({cause}); writes wait until a controller does")]
    ApiUnavailable { server: String, cause: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("refused: {0}")]
    Forbidden(String),
    #[error("stored data at {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error("etcd TLS setup failed: {0}")]
    Tls(String),
}

impl Error {
    /// True when retrying the same call later may succeed (etcd unreachable or slow).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::ApiUnavailable { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
