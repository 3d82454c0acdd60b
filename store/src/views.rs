//! Machine views: a copy of each object under `<prefix>/views/<machine>/<plural>/<name>/` for
//! every machine the object concerns ([`Resource::machine_views`]; for a Volume its bound
//! machine, the machine serving it and both ends of a recorded move).
//!
//! An agent lists and watches its own view ([`Scope::View`]) instead of every object of the
//! kind, so a volume event is delivered to the agents it concerns and the leader — not to every
//! machine of the fleet — and an agent holds only its own volumes in memory.
//!
//! The views are kept by the store in the **same transaction** as every write of the object
//! ([`view_ops`]), so a view never disagrees with the object at any revision:
//! - a machine that joins the object's set gets both halves (object and status) copied; the
//!   half this transaction does not write is guarded by the write (its mod revision or bytes)
//!   so the copy is the current one, and the object's copy carries the object's own
//!   resourceVersion;
//! - a machine that stays gets the halves this transaction writes;
//! - a machine that leaves has both copies deleted (its watch sees a delete: the volume no
//!   longer concerns it — not that it was deleted).
//!
//! Status writes that do not change the set (the usage reports) cost one more put per
//! concerned machine in the same transaction: one, two during a move.
//!
//! [`Store::repair_views`] rebuilds the views of a kind from the objects (the leader runs it when
//! it takes over, so a cluster whose data predates views, or an etcd restored from a backup
//! taken before them, is brought in line before agents rely on them).

use std::collections::{BTreeMap, BTreeSet};

use cobalt_api::Resource;
use etcd_client::{Compare, CompareOp, GetOptions, TxnOp};
use serde_json::Value;

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::objects::{encode, prefix_end};

/// Which copies of a kind a list or watch reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every object of the kind (the controller, the API, cobaltctl).
    #[default]
    All,
    /// The objects that concern one machine (its agent).
    View(String),
}

impl Scope {
    /// The key prefix the scope's objects live under.
    pub(crate) fn root(&self, keys: &Keys, plural: &str) -> String {
        match self {
            Scope::All => keys.kind(plural),
            Scope::View(machine) => keys.view_kind(machine, plural),
        }
    }
}

/// What one transaction does to an object, for [`view_ops`].
pub(crate) struct Transition<'a, R> {
    /// The object (with status) before the transaction; `None` when it is created.
    pub old: Option<&'a R>,
    /// The object (with status) after it; `None` when it is deleted. When the object key is not
    /// written, its resourceVersion must be the stored object's.
    pub new: Option<&'a R>,
    pub object_written: bool,
    pub status_written: bool,
}

/// The view writes of a transaction, and whether it copies a half it does not write (then the
/// caller must guard that half, so the copy is current).
pub(crate) struct ViewOps {
    pub ops: Vec<TxnOp>,
    pub copies_unwritten: bool,
}

/// The writes keeping every machine's view of one object equal to it across `t`.
pub(crate) fn view_ops<R: Resource>(keys: &Keys, t: Transition<'_, R>) -> Result<ViewOps> {
    let before: BTreeSet<&str> = t.old.map(|o| o.machine_views()).unwrap_or_default();
    let after: BTreeSet<&str> = t.new.map(|o| o.machine_views()).unwrap_or_default();
    let mut ops = Vec::new();
    let mut copies_unwritten = false;
    if let Some(new) = t.new {
        let name = new.name();
        for m in &after {
            let joins = !before.contains(m);
            // The object's copy before its status's: a view watch merges a status onto the
            // object it already has.
            if joins || t.object_written {
                let value = if t.object_written {
                    encode(new)?
                } else {
                    copies_unwritten = true;
                    encode_with_version(new)?
                };
                ops.push(TxnOp::put(keys.view_object(m, R::PLURAL, name), value, None));
            }
            if joins || t.status_written {
                copies_unwritten |= joins && !t.status_written;
                let key = keys.view_status(m, R::PLURAL, name);
                match new.status() {
                    Some(s) => ops.push(TxnOp::put(
                        key,
                        serde_json::to_vec(s).map_err(|e| Error::Invalid(e.to_string()))?,
                        None,
                    )),
                    None if !joins => ops.push(TxnOp::delete(key, None)),
                    None => {}
                }
            }
        }
    }
    if let Some(old) = t.old {
        let name = old.name();
        for m in before.difference(&after) {
            ops.push(TxnOp::delete(keys.view_object(m, R::PLURAL, name), None));
            ops.push(TxnOp::delete(keys.view_status(m, R::PLURAL, name), None));
        }
    }
    Ok(ViewOps {
        ops,
        copies_unwritten,
    })
}

/// The object without its status, keeping its resourceVersion: a copy written after the object
/// was (by a status write that adds a machine) says which revision of the object it is.
fn encode_with_version<R: Resource>(obj: &R) -> Result<Vec<u8>> {
    let mut value = serde_json::to_value(obj).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        map.remove("status");
    }
    serde_json::to_vec(&value).map_err(|e| Error::Invalid(e.to_string()))
}

/// What [`Store::repair_views`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// Objects whose copies were written or removed.
    pub objects: usize,
    /// View keys of objects that no longer exist, or of machines they no longer concern, removed.
    pub stray_keys: usize,
}

impl Store {
    /// Makes every machine's view of kind `R` equal to the objects: copies missing or different
    /// are written, copies nothing wants are removed. Each object's fix is one transaction
    /// guarded by the object's and its status's mod revisions (an object written meanwhile was
    /// kept right by that write and is left alone). Reads the whole kind and every view: meant
    /// for a leader taking over, not for every reconcile.
    pub async fn repair_views<R: Resource>(&self) -> Result<Repaired> {
        let (objects, _) = self.list_stored::<R>(&Scope::All, None).await?;
        // (machine, name) → (object copy without its resourceVersion, the revision it says it
        // is; status copy) as stored in the views.
        type Copy = (Option<(Value, i64)>, Option<Vec<u8>>);
        let mut copies: BTreeMap<(String, String), Copy> = BTreeMap::new();
        let views = self.keys.views();
        let mut kv = self.client.kv_client();
        let end = prefix_end(&views);
        let mut start = views.clone().into_bytes();
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_limit(500);
            let mut resp = self.call(kv.get(start.clone(), Some(options))).await?;
            let more = resp.more();
            let page = resp.take_kvs();
            let Some(last) = page.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            for item in &page {
                let key = String::from_utf8_lossy(item.key());
                let parts: Vec<&str> = key
                    .strip_prefix(&views)
                    .map(|rest| rest.split('/').collect())
                    .unwrap_or_default();
                let [machine, plural, name, part] = parts[..] else {
                    continue;
                };
                if plural != R::PLURAL {
                    continue;
                }
                let entry = copies
                    .entry((machine.to_string(), name.to_string()))
                    .or_default();
                match part {
                    "object" => entry.0 = Some(without_version(item.value(), item.mod_revision())),
                    "status" => entry.1 = Some(item.value().to_vec()),
                    _ => {}
                }
            }
            if !more {
                break;
            }
        }
        let mut done = Repaired::default();
        let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
        for stored in &objects {
            let o = &stored.object;
            let mut ops = Vec::new();
            for m in o.machine_views() {
                wanted.insert((m.to_string(), o.name().to_string()));
                let have = copies
                    .get(&(m.to_string(), o.name().to_string()))
                    .cloned()
                    .unwrap_or_default();
                let object = encode_with_version(o)?;
                let current = (
                    without_version(&object, 0).0,
                    stored.object_mod_revision,
                );
                let status = o
                    .status()
                    .map(|s| serde_json::to_vec(s).map_err(|e| Error::Invalid(e.to_string())))
                    .transpose()?;
                if have.0.as_ref() != Some(&current) {
                    ops.push(TxnOp::put(
                        self.keys.view_object(m, R::PLURAL, o.name()),
                        object,
                        None,
                    ));
                }
                if have.1 != status {
                    let key = self.keys.view_status(m, R::PLURAL, o.name());
                    ops.push(match status {
                        Some(s) => TxnOp::put(key, s, None),
                        None => TxnOp::delete(key, None),
                    });
                }
            }
            if ops.is_empty() {
                continue;
            }
            let guards = vec![
                Compare::mod_revision(
                    self.keys.object(R::PLURAL, o.name()),
                    CompareOp::Equal,
                    stored.object_mod_revision,
                ),
                Compare::mod_revision(
                    self.keys.status(R::PLURAL, o.name()),
                    CompareOp::Equal,
                    stored.status_mod_revision,
                ),
            ];
            if self.commit(guards, ops).await?.is_some() {
                done.objects += 1;
            }
        }
        // Copies no object wants. Each removal is guarded by the object still not wanting it:
        // absent, or present at the revision read above (a write since then keeps its views).
        let revisions: BTreeMap<&str, (i64, i64)> = objects
            .iter()
            .map(|s| {
                (
                    s.object.name(),
                    (s.object_mod_revision, s.status_mod_revision),
                )
            })
            .collect();
        for (machine, name) in copies.keys() {
            if wanted.contains(&(machine.clone(), name.clone())) {
                continue;
            }
            let (object_rev, status_rev) = revisions.get(name.as_str()).copied().unwrap_or((0, 0));
            let guards = vec![
                Compare::mod_revision(
                    self.keys.object(R::PLURAL, name),
                    CompareOp::Equal,
                    object_rev,
                ),
                Compare::mod_revision(
                    self.keys.status(R::PLURAL, name),
                    CompareOp::Equal,
                    status_rev,
                ),
            ];
            let ops = vec![
                TxnOp::delete(self.keys.view_object(machine, R::PLURAL, name), None),
                TxnOp::delete(self.keys.view_status(machine, R::PLURAL, name), None),
            ];
            if self.commit(guards, ops).await?.is_some() {
                done.stray_keys += 1;
            }
        }
        Ok(done)
    }
}

/// A view's object copy without its resourceVersion, and the revision of the object it is:
/// the one it carries (a copy written after the object was), else the copy's own `mod_revision`
/// (written with the object, in the same transaction).
fn without_version(bytes: &[u8], mod_revision: i64) -> (Value, i64) {
    let mut value: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let mut revision = mod_revision;
    if let Some(Value::Object(meta)) = value.get_mut("metadata") {
        if let Some(rv) = meta.remove("resourceVersion") {
            if let Some(r) = rv.as_str().and_then(|r| r.parse().ok()) {
                revision = r;
            }
        }
    }
    (value, revision)
}
