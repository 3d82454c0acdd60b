//! Typed create/get/list/replace/delete of objects and writes of their status.
//!
//! Every write is one etcd transaction guarded by a compare, so concurrent writers never lose
//! each other's changes:
//! - create compares that the object key does not exist (else [`Error::AlreadyExists`]);
//! - replace compares the object key's mod revision with the `resourceVersion` sent
//!   (else [`Error::Conflict`]);
//! - status writes compare the *status* key's mod revision and the object's create revision, so
//!   spec writers and status writers never conflict with each other;
//! - with a fence ([`Store::fenced`]), every write also compares the leader key
//!   (else [`Error::Fenced`]).
//!
//! A replace or status write that would store the same bytes writes nothing.

use chrono::Utc;
use cobalt_api::selector::LabelSelector;
use cobalt_api::{Resource, LAST_APPLIED};
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use serde_json::Value;

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::keys::{Keys, Part};
use crate::views::{view_ops, Scope, Transition};

/// Keys fetched per range request when listing (keeps each response well under gRPC limits).
const LIST_PAGE: i64 = 500;
/// Bound on read-modify-write retries of a status update under contention.
pub(crate) const STATUS_RETRIES: usize = 16;

/// What a delete did.
#[derive(Debug, Clone, PartialEq)]
pub enum Deleted<R> {
    /// The object is gone; its last state.
    Gone(R),
    /// Finalizers remain: the object is marked with a deletionTimestamp and stays until they go.
    Pending(R),
}

/// What a status update did.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate<R> {
    pub object: R,
    /// The revision written, or `None` when the status was already as wanted.
    pub written: Option<i64>,
}

/// One object as read from etcd, with the revisions its compares need.
#[derive(Debug, Clone)]
pub struct Stored<R> {
    pub object: R,
    pub object_create_revision: i64,
    pub object_mod_revision: i64,
    /// 0 when no status has been written.
    pub status_mod_revision: i64,
}

impl Store {
    /// Creates `obj`. The store sets uid, creationTimestamp, generation 1 and resourceVersion;
    /// any status sent is ignored (status is written through [`Store::update_status`]).
    pub async fn create<R: Resource>(&self, obj: &R) -> Result<R> {
        if let Some(remote) = &self.remote {
            return self.remote_create(remote.as_ref(), obj).await;
        }
        let mut obj = obj.clone();
        let name = obj.name().to_string();
        as_new(&mut obj);
        let key = self.keys.object(R::PLURAL, &name);
        let mut ops = vec![TxnOp::put(key.clone(), encode(&obj)?, None)];
        ops.extend(
            view_ops(
                &self.keys,
                Transition {
                    old: None,
                    new: Some(&obj),
                    object_written: true,
                    status_written: false,
                },
            )?
            .into_ops(),
        );
        let txn = Txn::new()
            .when(self.with_fence(vec![Compare::create_revision(key, CompareOp::Equal, 0)]))
            .and_then(ops)
            .or_else(self.fence_probe());
        let resp = self.call(self.client.kv_client().txn(txn)).await?;
        if !resp.succeeded() {
            self.check_fence(&resp.op_responses())?;
            return Err(Error::AlreadyExists {
                kind: R::KIND,
                name,
            });
        }
        obj.meta_mut().resource_version = header_revision(resp.header()).to_string().into();
        Ok(obj)
    }

    /// Reads one object with its status (one range read: both at the same revision).
    pub async fn get<R: Resource>(&self, name: &str) -> Result<Option<R>> {
        Ok(self.get_stored(name).await?.map(|s| s.object))
    }

    /// Like [`Store::get`], with the revisions behind the object.
    pub async fn get_stored<R: Resource>(&self, name: &str) -> Result<Option<Stored<R>>> {
        let dir = self.keys.object_dir(R::PLURAL, name);
        let resp = self
            .call(
                self.client
                    .kv_client()
                    .get(dir, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut objects = assemble::<R>(&self.keys.kind(R::PLURAL), resp.kvs())?;
        Ok(objects.pop())
    }

    /// [`Store::get_stored`] of an object that must exist: [`Error::NotFound`] otherwise.
    pub(crate) async fn get_existing<R: Resource>(&self, name: &str) -> Result<Stored<R>> {
        self.get_stored::<R>(name)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: R::KIND,
                name: name.to_string(),
            })
    }

    /// Lists every object of a kind matching `selector`, and the revision they were read at
    /// (a watch from `revision + 1` continues exactly where the list ends).
    pub async fn list<R: Resource>(&self, selector: &LabelSelector) -> Result<(Vec<R>, i64)> {
        self.list_at(&Scope::All, selector, None).await
    }

    /// The objects of a kind that concern one machine (its view, see [`crate::views`]), and the
    /// revision they were read at, for a watch of the same scope to continue from.
    pub async fn list_in<R: Resource>(&self, scope: &Scope) -> Result<(Vec<R>, i64)> {
        self.list_at(scope, &LabelSelector::default(), None).await
    }

    /// [`Store::list_in`] with each object passed through `trim` as soon as it is decoded (for a
    /// cache that leaves out what it never reads, see
    /// [`cobalt_api::ObjectMeta::trim_for_cache`]): what is left out is freed before the next
    /// object is decoded, so its room is taken again at once.
    pub async fn list_in_trimmed<R: Resource>(
        &self,
        scope: &Scope,
        trim: fn(&mut R),
    ) -> Result<(Vec<R>, i64)> {
        let (stored, revision) = self.list_stored::<R>(scope, None, Some(trim)).await?;
        Ok((stored.into_iter().map(|s| s.object).collect(), revision))
    }

    /// [`Store::list`] as of revision `at` (`None`: the current one). Read page by page and
    /// decoded as it comes, so no more than a page of raw values is held at once (and no
    /// response nears gRPC's message size limit, however many objects there are).
    pub(crate) async fn list_at<R: Resource>(
        &self,
        scope: &Scope,
        selector: &LabelSelector,
        at: Option<i64>,
    ) -> Result<(Vec<R>, i64)> {
        let (stored, revision) = self.list_stored::<R>(scope, at, None).await?;
        let objects = stored
            .into_iter()
            .map(|s| s.object)
            .filter(|o| selector.matches(&o.meta().labels))
            .collect();
        Ok((objects, revision))
    }

    /// Every object of `scope` with the revisions behind it, read page by page.
    pub(crate) async fn list_stored<R: Resource>(
        &self,
        scope: &Scope,
        at: Option<i64>,
        trim: Option<fn(&mut R)>,
    ) -> Result<(Vec<Stored<R>>, i64)> {
        let prefix = scope.root(&self.keys, R::PLURAL);
        let end = prefix_end(&prefix);
        let mut kv = self.client.kv_client();
        let mut start = prefix.clone().into_bytes();
        let mut revision = at.unwrap_or(0);
        let mut stored: Vec<Stored<R>> = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut resp = self.call(kv.get(start.clone(), Some(options))).await?;
            if revision == 0 {
                revision = header_revision(resp.header());
            }
            let more = resp.more();
            let page = resp.take_kvs();
            let Some(last) = page.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            // Pages follow key order, so an object's status on the next page still finds it.
            assemble_into(&prefix, &mut stored, &page, trim)?;
            if !more {
                break;
            }
        }
        Ok((stored, revision))
    }

    /// Replaces the object's metadata and spec. `obj.metadata.resourceVersion` must be the
    /// current one. uid, creationTimestamp and deletionTimestamp are kept from the stored object;
    /// generation bumps when the spec changed. While the object is being deleted, removing its
    /// last finalizer deletes it.
    pub async fn replace<R: Resource>(&self, obj: &R) -> Result<R> {
        if let Some(remote) = &self.remote {
            return self.remote_replace(remote.as_ref(), obj).await;
        }
        self.replace_inner(obj, None::<fn(&R) -> R::Status>).await
    }

    /// Replaces metadata and spec like [`Store::replace`] and, in the same transaction, sets
    /// the status to what `status` computes from the object as it will be stored. One etcd
    /// write instead of two, and readers never see the new spec without its status. Fails with
    /// [`Error::Conflict`] if the object *or* its status changed since `obj` was read.
    pub async fn replace_with_status<R, F>(&self, obj: &R, status: F) -> Result<R>
    where
        R: Resource,
        F: FnOnce(&R) -> R::Status,
    {
        self.replace_inner(obj, Some(status)).await
    }

    /// Like [`Store::replace_with_status`], but tried first against `seen` — the object as last
    /// read, e.g. from a watch cache, of which `obj` is the edited copy — sparing the read: the
    /// transaction is guarded by `seen`'s resourceVersion and status bytes. If either moved, it
    /// falls back to [`Store::replace_with_status`], which reads (and reports a
    /// [`Error::Conflict`] if `obj` is stale).
    pub async fn replace_with_status_from<R, F>(&self, seen: &R, obj: &R, status: F) -> Result<R>
    where
        R: Resource,
        F: Fn(&R) -> R::Status,
    {
        // A cache's trimmed copy cannot be written from: the read path restores what it lacks.
        let optimistic = seen.name() == obj.name()
            && seen.meta().resource_version == obj.meta().resource_version
            && !obj.meta().is_deleting()
            && !seen.meta().trimmed
            && !obj.meta().trimmed;
        let Some(expected) = optimistic
            .then(|| seen.meta().resource_version.parse::<i64>().ok())
            .flatten()
        else {
            return self.replace_with_status(obj, status).await;
        };
        let name = obj.name().to_string();
        let mut new = replacement(seen, obj);
        *new.status_mut() = seen.status().cloned();
        let computed = status(&new);
        let object_changed = encode(&new)? != encode(seen)?;
        let status_changed = seen.status() != Some(&computed);
        if !object_changed && !status_changed {
            return Ok(seen.clone());
        }
        let key = self.keys.object(R::PLURAL, &name);
        let status_key = self.keys.status(R::PLURAL, &name);
        let guards = vec![
            Compare::mod_revision(key.clone(), CompareOp::Equal, expected),
            status_guard(&status_key, seen.status())?,
        ];
        let mut ops = Vec::new();
        if object_changed {
            ops.push(TxnOp::put(key, encode(&new)?, None));
        }
        if status_changed {
            let value = serde_json::to_vec(&computed).map_err(|e| Error::Invalid(e.to_string()))?;
            ops.push(TxnOp::put(status_key, value, None));
        }
        // Both halves are guarded, so the views can copy either.
        let mut after = new.clone();
        *after.status_mut() = Some(computed.clone());
        after.meta_mut().resource_version = seen.meta().resource_version.clone();
        ops.extend(
            view_ops(
                &self.keys,
                Transition {
                    old: Some(seen),
                    new: Some(&after),
                    object_written: object_changed,
                    status_written: status_changed,
                },
            )?
            .into_ops(),
        );
        match self.commit(guards, ops).await? {
            Some(revision) => {
                *new.status_mut() = Some(computed);
                if object_changed {
                    new.meta_mut().resource_version = revision.to_string().into();
                }
                Ok(new)
            }
            None => self.replace_with_status(obj, status).await,
        }
    }

    async fn replace_inner<R, F>(&self, obj: &R, status: Option<F>) -> Result<R>
    where
        R: Resource,
        F: FnOnce(&R) -> R::Status,
    {
        let name = obj.name().to_string();
        let sent = obj.meta().resource_version.clone();
        let conflict = || Error::Conflict {
            kind: R::KIND,
            name: name.clone(),
            sent: sent.to_string(),
        };
        let expected: i64 = sent.parse().map_err(|_| {
            Error::Invalid(format!(
                "metadata.resourceVersion {sent:?} must be the object's current resourceVersion"
            ))
        })?;
        let current = self.get_existing::<R>(&name).await?;
        if current.object_mod_revision != expected {
            return Err(conflict());
        }
        let old = &current.object;
        let mut new = replacement(old, obj);
        *new.status_mut() = old.status().cloned();
        let key = self.keys.object(R::PLURAL, &name);
        let mut ops = Vec::new();
        let mut guards = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )];
        if let Some(status) = status {
            let status = status(&new);
            if old.status() != Some(&status) {
                let status_key = self.keys.status(R::PLURAL, &name);
                guards.push(Compare::mod_revision(
                    status_key.clone(),
                    CompareOp::Equal,
                    current.status_mod_revision,
                ));
                let value =
                    serde_json::to_vec(&status).map_err(|e| Error::Invalid(e.to_string()))?;
                ops.push(TxnOp::put(status_key, value, None));
                *new.status_mut() = Some(status);
            }
        }
        let object_changed = encode(&new)? != encode(old)?;
        let status_written = !ops.is_empty();
        if !status_written && !object_changed {
            return Ok(current.object);
        }
        if new.meta().is_deleting() && new.meta().finalizers.is_empty() {
            let resp = self.commit(guards, self.delete_ops(old)?).await?;
            return match resp {
                Some(_) => Ok(new),
                None => Err(conflict()),
            };
        }
        if object_changed {
            ops.push(TxnOp::put(key, encode(&new)?, None));
        }
        let views = view_ops(
            &self.keys,
            Transition {
                old: Some(old),
                new: Some(&new),
                object_written: object_changed,
                status_written,
            },
        )?;
        if views.copies_unwritten && !status_written {
            guards.push(Compare::mod_revision(
                self.keys.status(R::PLURAL, &name),
                CompareOp::Equal,
                current.status_mod_revision,
            ));
        }
        ops.extend(views.into_ops());
        match self.commit(guards, ops).await? {
            Some(revision) => {
                if object_changed {
                    new.meta_mut().resource_version = revision.to_string().into();
                }
                Ok(new)
            }
            None => Err(conflict()),
        }
    }

    /// Deletes an object. With finalizers it is only marked (deletionTimestamp) and goes when
    /// the last finalizer is removed. `precondition` is an optional resourceVersion that must match.
    pub async fn delete<R: Resource>(
        &self,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<Deleted<R>> {
        let current = self.get_existing::<R>(name).await?;
        if let Some(rv) = precondition {
            if rv != current.object_mod_revision.to_string() {
                return Err(Error::Conflict {
                    kind: R::KIND,
                    name: name.into(),
                    sent: rv.into(),
                });
            }
        }
        let mut obj = current.object;
        let key = self.keys.object(R::PLURAL, name);
        let guard =
            Compare::mod_revision(key.clone(), CompareOp::Equal, current.object_mod_revision);
        if obj.meta().finalizers.is_empty() {
            return match self.commit(vec![guard], self.delete_ops(&obj)?).await? {
                Some(_) => Ok(Deleted::Gone(obj)),
                None => Err(Error::Conflict {
                    kind: R::KIND,
                    name: name.into(),
                    sent: current.object_mod_revision.to_string(),
                }),
            };
        }
        if obj.meta().is_deleting() {
            return Ok(Deleted::Pending(obj));
        }
        let before = obj.clone();
        obj.meta_mut().deletion_timestamp = Some(Utc::now());
        let mut ops = vec![TxnOp::put(key, encode(&obj)?, None)];
        let views = view_ops(
            &self.keys,
            Transition {
                old: Some(&before),
                new: Some(&obj),
                object_written: true,
                status_written: false,
            },
        )?;
        let mut guards = vec![guard];
        if views.copies_unwritten {
            guards.push(Compare::mod_revision(
                self.keys.status(R::PLURAL, name),
                CompareOp::Equal,
                current.status_mod_revision,
            ));
        }
        ops.extend(views.into_ops());
        match self.commit(guards, ops).await? {
            Some(revision) => {
                obj.meta_mut().resource_version = revision.to_string().into();
                Ok(Deleted::Pending(obj))
            }
            None => Err(Error::Conflict {
                kind: R::KIND,
                name: name.into(),
                sent: current.object_mod_revision.to_string(),
            }),
        }
    }

    /// Read-modify-write of an object's status. `change` gets the current object (with status)
    /// and returns the status it should have, or `None` to leave it. Nothing is written when the
    /// result equals what is stored. Retries on concurrent status writes, a bounded number of times.
    pub async fn update_status<R, F>(&self, name: &str, mut change: F) -> Result<StatusUpdate<R>>
    where
        R: Resource,
        F: FnMut(&R) -> Option<R::Status>,
    {
        if let Some(remote) = &self.remote {
            return self
                .remote_update_status(remote.as_ref(), name, change)
                .await;
        }
        for _ in 0..STATUS_RETRIES {
            let current = self.get_existing::<R>(name).await?;
            if let Some(update) = self.status_attempt(name, current, &mut change).await? {
                return Ok(update);
            }
        }
        Err(Error::Conflict {
            kind: R::KIND,
            name: name.to_string(),
            sent: format!("status (after {STATUS_RETRIES} attempts under contention)"),
        })
    }

    /// [`Store::update_status`] in one attempt, only if the object's create revision and the
    /// status key's mod revision are still `expect` (what the caller read): else
    /// [`Error::Conflict`]. What the API does for a write sent with a
    /// [`StatusPrecondition`](crate::StatusPrecondition).
    pub async fn update_status_if<R, F>(
        &self,
        name: &str,
        expect: crate::StatusPrecondition,
        mut change: F,
    ) -> Result<StatusUpdate<R>>
    where
        R: Resource,
        F: FnMut(&R) -> Option<R::Status>,
    {
        let conflict = || Error::Conflict {
            kind: R::KIND,
            name: name.to_string(),
            sent: format!("status precondition {}", expect.to_header()),
        };
        let current = self.get_existing::<R>(name).await?;
        if current.object_create_revision != expect.object_create_revision
            || current.status_mod_revision != expect.status_mod_revision
        {
            return Err(conflict());
        }
        self.status_attempt(name, current, &mut change)
            .await?
            .ok_or_else(conflict)
    }

    /// One guarded status write from `current`: `None` when a guard failed (the caller reads
    /// again or reports a conflict).
    async fn status_attempt<R, F>(
        &self,
        name: &str,
        current: Stored<R>,
        change: &mut F,
    ) -> Result<Option<StatusUpdate<R>>>
    where
        R: Resource,
        F: FnMut(&R) -> Option<R::Status>,
    {
        let mut object = current.object;
        let Some(status) = change(&object) else {
            return Ok(Some(StatusUpdate {
                object,
                written: None,
            }));
        };
        if object.status() == Some(&status) {
            return Ok(Some(StatusUpdate {
                object,
                written: None,
            }));
        }
        let key = self.keys.status(R::PLURAL, name);
        let guards = vec![
            Compare::create_revision(
                self.keys.object(R::PLURAL, name),
                CompareOp::Equal,
                current.object_create_revision,
            ),
            Compare::mod_revision(key.clone(), CompareOp::Equal, current.status_mod_revision),
        ];
        let value = serde_json::to_vec(&status).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut after = object.clone();
        *after.status_mut() = Some(status.clone());
        let views = view_ops(
            &self.keys,
            Transition {
                old: Some(&object),
                new: Some(&after),
                object_written: false,
                status_written: true,
            },
        )?;
        let mut guards = guards;
        if views.copies_unwritten {
            // A machine joins and gets the object copied: it must be the current one.
            guards.push(Compare::mod_revision(
                self.keys.object(R::PLURAL, name),
                CompareOp::Equal,
                current.object_mod_revision,
            ));
        }
        let mut ops = vec![TxnOp::put(key, value, None)];
        ops.extend(views.into_ops());
        if let Some(revision) = self.commit(guards, ops).await? {
            *object.status_mut() = Some(status);
            return Ok(Some(StatusUpdate {
                object,
                written: Some(revision),
            }));
        }
        Ok(None)
    }

    /// Like [`Store::update_status`], but first tries against `seen` — the object as last
    /// read, e.g. from a watch cache — sparing the read: the write is guarded by `seen`'s
    /// resourceVersion and by the stored status being byte for byte the one `seen` carries.
    /// If either moved, it falls back to the read-modify-write of [`Store::update_status`].
    pub async fn update_status_from<R, F>(&self, seen: &R, mut change: F) -> Result<StatusUpdate<R>>
    where
        R: Resource,
        F: FnMut(&R) -> Option<R::Status>,
    {
        let name = seen.name().to_string();
        if self.remote.is_some() {
            // Through the API the write is guarded by revisions `seen` does not carry.
            return self.update_status(&name, change).await;
        }
        let Ok(revision) = seen.meta().resource_version.parse::<i64>() else {
            return self.update_status(&name, change).await;
        };
        let Some(status) = change(seen) else {
            return Ok(StatusUpdate {
                object: seen.clone(),
                written: None,
            });
        };
        if seen.status() == Some(&status) {
            return Ok(StatusUpdate {
                object: seen.clone(),
                written: None,
            });
        }
        let key = self.keys.status(R::PLURAL, &name);
        let guards = vec![
            Compare::mod_revision(
                self.keys.object(R::PLURAL, &name),
                CompareOp::Equal,
                revision,
            ),
            status_guard(&key, seen.status())?,
        ];
        let value = serde_json::to_vec(&status).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut after = seen.clone();
        *after.status_mut() = Some(status.clone());
        if seen.meta().trimmed && !after.machine_views().is_subset(&seen.machine_views()) {
            // A machine joins and gets a copy of the object, which a cache's trimmed copy
            // cannot be: the read path writes it from the stored object.
            return self.update_status(&name, change).await;
        }
        // The object is guarded by `seen`'s resourceVersion, so a joining machine's copy of it
        // is current.
        let views = view_ops(
            &self.keys,
            Transition {
                old: Some(seen),
                new: Some(&after),
                object_written: false,
                status_written: true,
            },
        )?;
        let mut ops = vec![TxnOp::put(key, value, None)];
        ops.extend(views.into_ops());
        if let Some(written) = self.commit(guards, ops).await? {
            let object = after;
            return Ok(StatusUpdate {
                object,
                written: Some(written),
            });
        }
        self.update_status(&name, change).await
    }

    /// Deletes `old`'s keys and its copies in every view.
    fn delete_ops<R: Resource>(&self, old: &R) -> Result<Vec<TxnOp>> {
        let name = old.name();
        let mut ops = vec![
            TxnOp::delete(self.keys.object(R::PLURAL, name), None),
            TxnOp::delete(self.keys.status(R::PLURAL, name), None),
        ];
        ops.extend(
            view_ops(
                &self.keys,
                Transition {
                    old: Some(old),
                    new: None,
                    object_written: true,
                    status_written: true,
                },
            )?
            .into_ops(),
        );
        Ok(ops)
    }

    /// Runs a guarded transaction. `Some(revision)` when it applied, `None` when a guard failed;
    /// a failed fence is [`Error::Fenced`].
    pub(crate) async fn commit(
        &self,
        guards: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>> {
        if self.remote.is_some() {
            return Err(Error::Forbidden(
                "this store writes through the API, which takes creates, replaces and status \
                 writes only"
                    .into(),
            ));
        }
        let txn = Txn::new()
            .when(self.with_fence(guards))
            .and_then(ops)
            .or_else(self.fence_probe());
        let resp = self.call(self.client.kv_client().txn(txn)).await?;
        if resp.succeeded() {
            Ok(Some(header_revision(resp.header())))
        } else {
            self.check_fence(&resp.op_responses())?;
            Ok(None)
        }
    }

    fn with_fence(&self, mut guards: Vec<Compare>) -> Vec<Compare> {
        if let Some(f) = &self.fence {
            guards.push(f.compare());
        }
        guards
    }

    /// On a failed txn, reads the leader key so we can tell a lost election from a conflict.
    fn fence_probe(&self) -> Vec<TxnOp> {
        match &self.fence {
            Some(f) => vec![TxnOp::get(f.key.clone(), None)],
            None => vec![],
        }
    }

    fn check_fence(&self, responses: &[TxnOpResponse]) -> Result<()> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        let held = responses.iter().any(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .iter()
                .any(|kv| kv.create_revision() == fence.create_revision),
            _ => false,
        });
        if held {
            Ok(())
        } else {
            Err(Error::Fenced {
                election: fence.election.clone(),
            })
        }
    }
}

pub(crate) fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(0)
}

/// The first key after every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Makes `obj` what a create stores: a fresh uid, creationTimestamp now, generation 1, no
/// resourceVersion, deletionTimestamp or status.
pub(crate) fn as_new<R: Resource>(obj: &mut R) {
    let m = obj.meta_mut();
    m.uid = uuid::Uuid::new_v4().to_string();
    m.creation_timestamp = Some(Utc::now());
    m.generation = 1;
    m.resource_version.clear();
    m.deletion_timestamp = None;
    *obj.status_mut() = None;
}

/// Serializes an object without its status (status lives in its own key).
/// `obj` as it replaces `old`: the server-set fields (uid, timestamps) kept from `old`, the
/// generation bumped when the spec changed.
fn replacement<R: Resource>(old: &R, obj: &R) -> R {
    let mut new = obj.clone();
    let (o, m) = (old.meta(), new.meta_mut());
    if m.trimmed && !o.trimmed {
        // `obj` was edited from a cache's copy: the annotation left out comes from `old`, the
        // stored object, as it is.
        if let Some(applied) = o.annotations.get(LAST_APPLIED) {
            m.annotations
                .insert(LAST_APPLIED.to_string(), applied.to_string());
        }
        m.trimmed = false;
    }
    m.uid = o.uid.clone();
    m.creation_timestamp = o.creation_timestamp;
    m.deletion_timestamp = o.deletion_timestamp;
    m.generation = if old.same_spec(obj) {
        o.generation
    } else {
        o.generation + 1
    };
    new
}

/// Guards a write on the status key holding exactly `seen` (serialised as every writer does),
/// or being absent when `seen` is `None`.
fn status_guard<S: serde::Serialize>(key: &str, seen: Option<&S>) -> Result<Compare> {
    Ok(match seen {
        Some(old) => Compare::value(
            key,
            CompareOp::Equal,
            serde_json::to_vec(old).map_err(|e| Error::Invalid(e.to_string()))?,
        ),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    })
}

/// A copy kept without its last-applied annotation ([`ObjectMeta::trim_for_cache`]) is never
/// written: that would remove the annotation. Every write path that may get one takes the
/// stored object first; this is the net under them.
pub(crate) fn refuse_trimmed<R: Resource>(obj: &R) -> Result<()> {
    if obj.meta().trimmed {
        return Err(Error::Invalid(format!(
            "{} {}: a cache's copy without its {LAST_APPLIED} annotation cannot be written as it is",
            R::KIND,
            obj.name()
        )));
    }
    Ok(())
}

pub(crate) fn encode<R: Resource>(obj: &R) -> Result<Vec<u8>> {
    refuse_trimmed(obj)?;
    let mut value = serde_json::to_value(obj).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        map.remove("status");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            meta.remove("resourceVersion");
        }
    }
    serde_json::to_vec(&value).map_err(|e| Error::Invalid(e.to_string()))
}

/// Decodes an object key. Its resourceVersion is the key's mod revision — or, for a view's copy
/// written after the object was, the revision the copy carries (see [`crate::views`]).
pub(crate) fn decode_object<R: Resource>(kv: &KeyValue) -> Result<R> {
    let mut obj: R = serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv, e))?;
    if obj.meta().resource_version.is_empty() {
        obj.meta_mut().resource_version = kv.mod_revision().to_string().into();
    }
    Ok(obj)
}

pub(crate) fn decode_status<R: Resource>(kv: &KeyValue) -> Result<R::Status> {
    serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv, e))
}

fn corrupt(kv: &KeyValue, e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        message: e.to_string(),
    }
}

/// Groups a sorted range of keys under `root` into objects with their status.
fn assemble<R: Resource>(root: &str, kvs: &[KeyValue]) -> Result<Vec<Stored<R>>> {
    let mut out: Vec<Stored<R>> = Vec::new();
    assemble_into(root, &mut out, kvs, None)?;
    Ok(out)
}

/// Decodes `kvs` (in key order) onto `out`, a status onto the object just before it.
pub(crate) fn assemble_into<R: Resource>(
    root: &str,
    out: &mut Vec<Stored<R>>,
    kvs: &[KeyValue],
    trim: Option<fn(&mut R)>,
) -> Result<()> {
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key());
        let Some((name, part)) = Keys::parse_under(root, &key) else {
            continue;
        };
        match part {
            // "object" sorts before "status", so the object is already in `out`.
            Part::Object => out.push(Stored {
                object: {
                    let mut object = decode_object(kv)?;
                    // At once, so what is left out is freed before the next object is decoded
                    // (and its room taken again by that object's), not after the whole list.
                    if let Some(trim) = trim {
                        trim(&mut object);
                    }
                    object
                },
                object_create_revision: kv.create_revision(),
                object_mod_revision: kv.mod_revision(),
                status_mod_revision: 0,
            }),
            Part::Status => {
                // A status without its object cannot be written (status writes compare the
                // object's create revision), so an orphan is skipped.
                if let Some(s) = out.last_mut().filter(|s| s.object.name() == name) {
                    *s.object.status_mut() = Some(decode_status::<R>(kv)?);
                    s.status_mod_revision = kv.mod_revision();
                }
            }
            Part::Alive => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
    }
}
