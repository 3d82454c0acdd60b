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

use std::collections::{BTreeSet, HashMap};

use cobalt_api::Resource;
use etcd_client::{Compare, CompareOp, GetOptions, TxnOp};
use serde_json::Value;

use crate::connection::Store;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::objects::{assemble_into, encode, prefix_end, Stored};

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
    writes: Vec<ViewWrite>,
    pub copies_unwritten: bool,
}

/// One write to a view key.
#[derive(Debug, PartialEq)]
enum ViewWrite {
    Put(String, Vec<u8>),
    Delete(String),
}

impl ViewOps {
    pub(crate) fn into_ops(self) -> Vec<TxnOp> {
        self.writes
            .into_iter()
            .map(|w| match w {
                ViewWrite::Put(key, value) => TxnOp::put(key, value, None),
                ViewWrite::Delete(key) => TxnOp::delete(key, None),
            })
            .collect()
    }
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
                ops.push(ViewWrite::Put(keys.view_object(m, R::PLURAL, name), value));
            }
            if joins || t.status_written {
                copies_unwritten |= joins && !t.status_written;
                let key = keys.view_status(m, R::PLURAL, name);
                match new.status() {
                    Some(s) => ops.push(ViewWrite::Put(
                        key,
                        serde_json::to_vec(s).map_err(|e| Error::Invalid(e.to_string()))?,
                    )),
                    None if !joins => ops.push(ViewWrite::Delete(key)),
                    None => {}
                }
            }
        }
    }
    if let Some(old) = t.old {
        let name = old.name();
        for m in before.difference(&after) {
            ops.push(ViewWrite::Delete(keys.view_object(m, R::PLURAL, name)));
            ops.push(ViewWrite::Delete(keys.view_status(m, R::PLURAL, name)));
        }
    }
    Ok(ViewOps {
        writes: ops,
        copies_unwritten,
    })
}

/// The object without its status, keeping its resourceVersion: a copy written after the object
/// was (by a status write that adds a machine) says which revision of the object it is.
fn encode_with_version<R: Resource>(obj: &R) -> Result<Vec<u8>> {
    crate::objects::refuse_trimmed(obj)?;
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

/// What a view holds of one object on one machine, as hashes (the repair keeps one per copy,
/// not the copies): the object copy's bytes and `mod_revision`, the status copy's bytes.
#[derive(Default)]
struct Held {
    object: Option<(u64, i64)>,
    status: Option<u64>,
}

/// What the views hold of one object: per machine, a [`Held`]. A list, not a map: an object is
/// in one view, two during a move, and the repair holds one of these per object of the kind
/// (a map would allocate a whole node for each).
#[derive(Default)]
struct Copies(Vec<(String, Held)>);

impl Copies {
    fn entry(&mut self, machine: &str) -> &mut Held {
        let i = match self.0.iter().position(|(m, _)| m == machine) {
            Some(i) => i,
            None => {
                // Room for exactly one more: most objects are in one view.
                self.0.reserve_exact(1);
                self.0.push((machine.to_string(), Held::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    fn remove(&mut self, machine: &str) -> Option<Held> {
        let i = self.0.iter().position(|(m, _)| m == machine)?;
        Some(self.0.swap_remove(i).1)
    }

    fn machines(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(m, _)| m)
    }
}

fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Store {
    /// Makes every machine's view of kind `R` equal to the objects: copies missing or different
    /// are written, copies nothing wants are removed. Each object's fix is one transaction
    /// guarded by the object's and its status's mod revisions (an object written meanwhile was
    /// kept right by that write and is left alone). Reads every view, then the kind a page at a
    /// time, holding a digest per copy and one page of objects: meant for a leader taking over,
    /// not for every reconcile.
    pub async fn repair_views<R: Resource>(&self) -> Result<Repaired> {
        // name → what the views hold of it.
        let mut held: HashMap<String, Copies> = HashMap::new();
        let views = self.keys.views();
        let mut pages = self.pages(&views);
        while let Some(page) = pages.next().await? {
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
                let h = held.entry(name.to_string()).or_default().entry(machine);
                match part {
                    "object" => h.object = Some((digest(item.value()), item.mod_revision())),
                    "status" => h.status = Some(digest(item.value())),
                    _ => {}
                }
            }
        }
        let mut done = Repaired::default();
        // The objects, each with its status: a status key follows its object's key, possibly
        // on the next page, so an object is repaired when the next one starts.
        let root = self.keys.kind(R::PLURAL);
        let mut objects: Vec<Stored<R>> = Vec::new();
        let mut last: Option<Stored<R>> = None;
        let mut pages = self.pages(&root);
        while let Some(page) = pages.next().await? {
            objects.extend(last.take());
            assemble_into(&root, &mut objects, &page, None)?;
            last = objects.pop();
            for stored in objects.drain(..) {
                let copies = held.remove(stored.object.name()).unwrap_or_default();
                self.repair_one(&stored, copies, &mut done).await?;
            }
        }
        if let Some(stored) = last {
            let copies = held.remove(stored.object.name()).unwrap_or_default();
            self.repair_one(&stored, copies, &mut done).await?;
        }
        // Copies of objects that do not exist: removed while the object still does not.
        for (name, copies) in held {
            for machine in copies.machines() {
                let guards = vec![
                    Compare::create_revision(
                        self.keys.object(R::PLURAL, &name),
                        CompareOp::Equal,
                        0,
                    ),
                    Compare::create_revision(
                        self.keys.status(R::PLURAL, &name),
                        CompareOp::Equal,
                        0,
                    ),
                ];
                if self
                    .commit(guards, self.view_deletes::<R>(machine, &name))
                    .await?
                    .is_some()
                {
                    done.stray_keys += 1;
                }
            }
        }
        Ok(done)
    }

    /// Repairs the copies of one object, given what the views hold of it.
    async fn repair_one<R: Resource>(
        &self,
        stored: &Stored<R>,
        mut copies: Copies,
        done: &mut Repaired,
    ) -> Result<()> {
        let o = &stored.object;
        let name = o.name();
        let with_object = encode(o)?;
        let with_version = encode_with_version(o)?;
        let status = o
            .status()
            .map(|s| serde_json::to_vec(s).map_err(|e| Error::Invalid(e.to_string())))
            .transpose()?;
        let (plain, versioned) = (digest(&with_object), digest(&with_version));
        let mut ops = Vec::new();
        for m in o.machine_views() {
            let have = copies.remove(m).unwrap_or_default();
            // Right if written with the object (same revision, no resourceVersion inside) or
            // after it (carrying the object's resourceVersion).
            let object_right = match have.object {
                Some((d, rev)) => {
                    (d == plain && rev == stored.object_mod_revision) || d == versioned
                }
                None => false,
            };
            if !object_right {
                ops.push(TxnOp::put(
                    self.keys.view_object(m, R::PLURAL, name),
                    with_version.clone(),
                    None,
                ));
            }
            if have.status != status.as_deref().map(digest) {
                let key = self.keys.view_status(m, R::PLURAL, name);
                ops.push(match &status {
                    Some(s) => TxnOp::put(key, s.clone(), None),
                    None => TxnOp::delete(key, None),
                });
            }
        }
        let strays: Vec<String> = copies.0.into_iter().map(|(m, _)| m).collect();
        for m in &strays {
            ops.extend(self.view_deletes::<R>(m, name));
        }
        if ops.is_empty() {
            return Ok(());
        }
        let guards = vec![
            Compare::mod_revision(
                self.keys.object(R::PLURAL, name),
                CompareOp::Equal,
                stored.object_mod_revision,
            ),
            Compare::mod_revision(
                self.keys.status(R::PLURAL, name),
                CompareOp::Equal,
                stored.status_mod_revision,
            ),
        ];
        let copied = ops.len() > 2 * strays.len();
        if self.commit(guards, ops).await?.is_some() {
            done.objects += usize::from(copied);
            done.stray_keys += strays.len();
        }
        Ok(())
    }

    fn view_deletes<R: Resource>(&self, machine: &str, name: &str) -> Vec<TxnOp> {
        vec![
            TxnOp::delete(self.keys.view_object(machine, R::PLURAL, name), None),
            TxnOp::delete(self.keys.view_status(machine, R::PLURAL, name), None),
        ]
    }

    /// The keys under `prefix`, a page at a time, all at the revision of the first page.
    fn pages(&self, prefix: &str) -> Pages<'_> {
        Pages {
            store: self,
            kv: self.client.kv_client(),
            end: prefix_end(prefix),
            start: Some(prefix.as_bytes().to_vec()),
            revision: 0,
        }
    }
}

/// See [`Store::pages`].
struct Pages<'a> {
    store: &'a Store,
    kv: etcd_client::KvClient,
    end: Vec<u8>,
    /// `None` once the last page was read.
    start: Option<Vec<u8>>,
    revision: i64,
}

impl Pages<'_> {
    async fn next(&mut self) -> Result<Option<Vec<etcd_client::KeyValue>>> {
        let Some(start) = self.start.take() else {
            return Ok(None);
        };
        let mut options = GetOptions::new()
            .with_range(self.end.clone())
            .with_limit(500);
        if self.revision > 0 {
            options = options.with_revision(self.revision);
        }
        let mut resp = self.store.call(self.kv.get(start, Some(options))).await?;
        if self.revision == 0 {
            self.revision = crate::objects::header_revision(resp.header());
        }
        let more = resp.more();
        let page = resp.take_kvs();
        if let (true, Some(last)) = (more, page.last()) {
            let mut next = last.key().to_vec();
            next.push(0);
            self.start = Some(next);
        }
        Ok((!page.is_empty()).then_some(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::{MoveStatus, Volume, VolumeSpec, VolumeStatus};

    fn volume(spec: Option<&str>, serving: Option<&str>, moving_to: Option<&str>) -> Volume {
        let mut v = Volume::new(
            "v",
            VolumeSpec {
                size: "1Gi".parse().unwrap(),
                machine: spec.map(cobalt_api::Text::new),
                ..Default::default()
            },
        );
        v.metadata.resource_version = "7".into();
        if serving.is_some() || moving_to.is_some() {
            v.status = Some(VolumeStatus {
                machine: serving.map(cobalt_api::Text::new),
                move_: moving_to.map(|to| {
                    Box::new(MoveStatus::granted(
                        serving.unwrap_or_default(),
                        to,
                        chrono::Utc::now(),
                    ))
                }),
                ..Default::default()
            });
        }
        v
    }

    /// The writes as "put|delete <key under the views>", in order.
    fn described(ops: &ViewOps) -> Vec<String> {
        let short = |k: &str| k.trim_start_matches("/cobalt/views/").to_string();
        ops.writes
            .iter()
            .map(|w| match w {
                ViewWrite::Put(k, _) => format!("put {}", short(k)),
                ViewWrite::Delete(k) => format!("delete {}", short(k)),
            })
            .collect()
    }

    fn ops(old: Option<&Volume>, new: Option<&Volume>, object: bool, status: bool) -> ViewOps {
        view_ops(
            &Keys::new("/cobalt"),
            Transition {
                old,
                new,
                object_written: object,
                status_written: status,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_machine_joining_through_a_status_write_gets_both_halves_and_asks_for_a_guard() {
        let before = volume(Some("m1"), Some("m1"), None);
        let after = volume(Some("m1"), Some("m1"), Some("m2"));
        let o = ops(Some(&before), Some(&after), false, true);
        assert_eq!(
            described(&o),
            [
                "put m1/volumes/v/status",
                "put m2/volumes/v/object",
                "put m2/volumes/v/status"
            ]
        );
        assert!(o.copies_unwritten, "the object copied must be guarded");
    }

    #[test]
    fn a_status_write_that_keeps_the_set_puts_one_status_copy_per_machine() {
        let before = volume(Some("m1"), Some("m1"), None);
        let o = ops(Some(&before), Some(&before), false, true);
        assert_eq!(described(&o), ["put m1/volumes/v/status"]);
        assert!(!o.copies_unwritten);
    }

    #[test]
    fn a_machine_leaving_loses_both_copies_and_a_delete_removes_all() {
        let moving = volume(Some("m2"), Some("m1"), Some("m2"));
        let done = volume(Some("m2"), Some("m2"), None);
        assert_eq!(
            described(&ops(Some(&moving), Some(&done), false, true)),
            [
                "put m2/volumes/v/status",
                "delete m1/volumes/v/object",
                "delete m1/volumes/v/status"
            ]
        );
        assert_eq!(
            described(&ops(Some(&done), None, true, true)),
            ["delete m2/volumes/v/object", "delete m2/volumes/v/status"]
        );
    }

    #[test]
    fn a_copy_written_without_the_object_carries_its_resource_version() {
        let v = volume(Some("m1"), None, None);
        let bytes = encode_with_version(&v).unwrap();
        let back: Volume = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.metadata.resource_version, "7");
        assert!(back.status.is_none());
        let plain: Volume = serde_json::from_slice(&encode(&v).unwrap()).unwrap();
        assert_eq!(plain.metadata.resource_version, "");
    }
}
