//! Writes that go through a controller's API instead of straight to etcd (ARCHITECTURE.md
//! "Least privilege"). An agent whose etcd credentials may only read (and hold its own liveness
//! key and write events) gives its store a [`RemoteWrites`]: its creates, replaces and status
//! writes then go to the API with the machine's token, which lets through only what concerns the
//! machine. Reads, watches, leases, the liveness key and events stay on etcd.
//!
//! A status write keeps the store's compare-and-swap: the store reads the object from etcd, the
//! change is computed from it, and the API writes only if the object's create revision and the
//! status key's mod revision are still the ones read ([`StatusPrecondition`]); otherwise 409, and
//! the store reads again — the same bounded loop as [`Store::update_status`] on etcd.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cobalt_api::Resource;

use crate::error::{Error, Result};
use crate::objects::{StatusUpdate, STATUS_RETRIES};
use crate::Store;

/// A boxed future, so [`RemoteWrites`] can be a trait object.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The revisions a status write expects, as read from etcd: the object's create revision (the
/// same object, not a new one of the same name) and the status key's mod revision (0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusPrecondition {
    pub object_create_revision: i64,
    pub status_mod_revision: i64,
}

impl StatusPrecondition {
    /// The HTTP header carrying it: `Cobalt-Status-Precondition: <create>/<status>`.
    pub const HEADER: &'static str = "cobalt-status-precondition";
    /// The response header carrying the revision a status write made (absent: nothing written).
    pub const WRITTEN_HEADER: &'static str = "cobalt-written-revision";

    pub fn to_header(self) -> String {
        format!(
            "{}/{}",
            self.object_create_revision, self.status_mod_revision
        )
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (a, b) = text.trim().split_once('/')?;
        Some(StatusPrecondition {
            object_create_revision: a.parse().ok()?,
            status_mod_revision: b.parse().ok()?,
        })
    }
}

/// Where a store sends its object and status writes (JSON bodies, as the API takes them).
/// Implementations map the answers to [`Error`]: 404 → NotFound, 409 → AlreadyExists or
/// Conflict, 403 → Forbidden, unreachable → Unavailable.
pub trait RemoteWrites: Send + Sync + 'static {
    /// `POST /<plural>`: the object as created.
    fn create<'a>(
        &'a self,
        kind: &'static str,
        plural: &'static str,
        body: Vec<u8>,
    ) -> Pending<'a, Vec<u8>>;
    /// `PUT /<plural>/<name>` (guarded by the body's resourceVersion): the object as stored.
    fn replace<'a>(
        &'a self,
        kind: &'static str,
        plural: &'static str,
        name: &'a str,
        body: Vec<u8>,
    ) -> Pending<'a, Vec<u8>>;
    /// `PUT /<plural>/<name>/status` under `expect`: the object as stored, and the revision
    /// written (`None`: nothing changed).
    fn write_status<'a>(
        &'a self,
        kind: &'static str,
        plural: &'static str,
        name: &'a str,
        body: Vec<u8>,
        expect: StatusPrecondition,
    ) -> Pending<'a, (Vec<u8>, Option<i64>)>;
}

fn decode<R: Resource>(body: &[u8]) -> Result<R> {
    serde_json::from_slice(body).map_err(|e| {
        Error::Invalid(format!(
            "the API answered a {} that does not parse: {e}",
            R::KIND
        ))
    })
}

impl Store {
    /// This store, with its object and status writes sent to `remote` (reads stay on etcd).
    pub fn with_remote_writes(&self, remote: Arc<dyn RemoteWrites>) -> Store {
        let mut s = self.clone();
        s.remote = Some(remote);
        s
    }

    pub(crate) async fn remote_create<R: Resource>(
        &self,
        remote: &dyn RemoteWrites,
        obj: &R,
    ) -> Result<R> {
        let body = serde_json::to_vec(obj).map_err(|e| Error::Invalid(e.to_string()))?;
        decode(&remote.create(R::KIND, R::PLURAL, body).await?)
    }

    pub(crate) async fn remote_replace<R: Resource>(
        &self,
        remote: &dyn RemoteWrites,
        obj: &R,
    ) -> Result<R> {
        if obj.meta().trimmed {
            return Err(Error::Invalid(format!(
                "{} {} is a trimmed cache copy and cannot be written as it is",
                R::KIND,
                obj.name()
            )));
        }
        let body = serde_json::to_vec(obj).map_err(|e| Error::Invalid(e.to_string()))?;
        decode(&remote.replace(R::KIND, R::PLURAL, obj.name(), body).await?)
    }

    /// [`Store::update_status`] through the API: read from etcd, change, write under the
    /// revisions read; read again on a conflict, a bounded number of times.
    pub(crate) async fn remote_update_status<R, F>(
        &self,
        remote: &dyn RemoteWrites,
        name: &str,
        mut change: F,
    ) -> Result<StatusUpdate<R>>
    where
        R: Resource,
        F: FnMut(&R) -> Option<R::Status>,
    {
        for _ in 0..STATUS_RETRIES {
            let current = self.get_existing::<R>(name).await?;
            let object = current.object;
            let Some(status) = change(&object) else {
                return Ok(StatusUpdate {
                    object,
                    written: None,
                });
            };
            if object.status() == Some(&status) {
                return Ok(StatusUpdate {
                    object,
                    written: None,
                });
            }
            let mut body = object.clone();
            *body.status_mut() = Some(status);
            let body = serde_json::to_vec(&body).map_err(|e| Error::Invalid(e.to_string()))?;
            let expect = StatusPrecondition {
                object_create_revision: current.object_create_revision,
                status_mod_revision: current.status_mod_revision,
            };
            match remote
                .write_status(R::KIND, R::PLURAL, name, body, expect)
                .await
            {
                Ok((answer, written)) => {
                    return Ok(StatusUpdate {
                        object: decode(&answer)?,
                        written,
                    })
                }
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict {
            kind: R::KIND,
            name: name.to_string(),
            sent: format!("status (after {STATUS_RETRIES} attempts under contention)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_precondition_round_trips_through_its_header_and_refuses_garbage() {
        let p = StatusPrecondition {
            object_create_revision: 12,
            status_mod_revision: 0,
        };
        assert_eq!(StatusPrecondition::parse(&p.to_header()), Some(p));
        for bad in ["", "12", "a/b", "12/", "/3", "1/2/3"] {
            assert_eq!(StatusPrecondition::parse(bad), None, "{bad:?}");
        }
    }
}
