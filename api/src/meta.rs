//! Object metadata shared by every kind, and the `Resource` trait that lets generic code (the
//! store, the reconcile library, the HTTP API) handle Volumes and Machines alike.
//!
//! Users set `name`, `labels` and `annotations`. The store sets `uid`, `creationTimestamp`,
//! `resourceVersion` (the etcd mod revision of the object key) and `generation` (bumped only when
//! the spec changes); values a user sends for those are ignored on create and must match on
//! replace. `deletionTimestamp` is set by a delete while `finalizers` remain.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::compact::{StringMap, Text};

/// The one API version of this release.
pub const API_VERSION: &str = "cobalt.io/v1alpha1";

/// Metadata of every object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Unique within its kind: a DNS-1123 label (lowercase letters, digits and '-', at most 63).
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: Text,
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub labels: StringMap,
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub annotations: StringMap,
    /// Set by the store on create; names the object's data for its whole life.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Bumps on every spec change; status.observedGeneration says which one was acted on.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: i64,
    /// The etcd mod revision of the object; a replace must send the current one.
    #[serde(default, skip_serializing_if = "Text::is_empty")]
    pub resource_version: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<DateTime<Utc>>,
    /// While any remain, a delete only marks the object (deletionTimestamp).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::compact::exact_vec"
    )]
    pub finalizers: Vec<Text>,
    /// Set on a copy kept in a cache without its last-applied annotation
    /// ([`ObjectMeta::trim_for_cache`]). Never serialized; the store refuses to write such a copy
    /// as it is, and takes the annotation from a fresh read where it writes one.
    #[serde(skip)]
    pub trimmed: bool,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl ObjectMeta {
    pub fn named(name: impl Into<Text>) -> Self {
        ObjectMeta {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The resourceVersion as an etcd revision (0 when unset or not a number).
    pub fn revision(&self) -> i64 {
        self.resource_version.parse().unwrap_or(0)
    }

    pub fn is_deleting(&self) -> bool {
        self.deletion_timestamp.is_some()
    }

    /// Leaves out the last-applied annotation, which only `cobaltctl apply` reads, from a copy
    /// a cache keeps (about 300 bytes of a volume's ~2 KB), and marks the copy [`trimmed`].
    ///
    /// [`trimmed`]: ObjectMeta::trimmed
    pub fn trim_for_cache(&mut self) {
        if self.annotations.remove(LAST_APPLIED).is_some() {
            self.trimmed = true;
        }
    }
}

/// The annotation `cobaltctl apply` keeps the manifest it last applied in (its three-way merge).
pub const LAST_APPLIED: &str = "cobalt.io/last-applied";

/// A shared object in a set keyed by its name: the name inside the object is the key, so a
/// cache or a watch holding 100,000 objects does not hold a copy of each name beside it. Equal,
/// ordered and hashed by name alone; look it up with a `&str`.
pub struct ByName<R>(pub std::sync::Arc<R>);

impl<R: Resource> std::borrow::Borrow<str> for ByName<R> {
    fn borrow(&self) -> &str {
        self.0.name()
    }
}

impl<R: Resource> PartialEq for ByName<R> {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl<R: Resource> Eq for ByName<R> {}

impl<R: Resource> PartialOrd for ByName<R> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<R: Resource> Ord for ByName<R> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name().cmp(other.0.name())
    }
}

impl<R: Resource> std::hash::Hash for ByName<R> {
    /// As the name's `str` hashes, as `Borrow<str>` requires.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name().hash(state)
    }
}

impl<R> Clone for ByName<R> {
    fn clone(&self) -> Self {
        ByName(self.0.clone())
    }
}

impl<R: std::fmt::Debug> std::fmt::Debug for ByName<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A kind stored by Cobalt: an object (metadata + spec) and a separately written status.
pub trait Resource:
    Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + std::fmt::Debug + 'static
{
    type Status: Serialize
        + DeserializeOwned
        + Clone
        + PartialEq
        + Default
        + Send
        + Sync
        + std::fmt::Debug
        + 'static;

    /// `Volume`, `Machine`.
    const KIND: &'static str;
    /// `volumes`, `machines`: the path segment in etcd keys and URLs.
    const PLURAL: &'static str;

    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
    fn status(&self) -> Option<&Self::Status>;
    fn status_mut(&mut self) -> &mut Option<Self::Status>;
    /// True when the two objects' specs are equal (generation bumps only when this is false).
    fn same_spec(&self, other: &Self) -> bool;

    fn name(&self) -> &str {
        &self.meta().name
    }

    /// The machines whose view holds a copy of this object (object and status): the agents it
    /// concerns. The store keeps `<prefix>/views/<machine>/<plural>/<name>/…` equal to the
    /// object in the same transaction as every write, so an agent watches its own view instead
    /// of every object of the kind. Empty (no views) for kinds every agent reads whole.
    fn machine_views(&self) -> std::collections::BTreeSet<&str> {
        std::collections::BTreeSet::new()
    }
}

/// Implements [`Resource`] for a struct with `metadata`, `spec` and `status: Option<_>` fields.
macro_rules! resource {
    ($ty:ty, $status:ty, $kind:literal, $plural:literal) => {
        $crate::meta::resource!($ty, $status, $kind, $plural, |_o| {
            std::collections::BTreeSet::new()
        });
    };
    ($ty:ty, $status:ty, $kind:literal, $plural:literal, $views:expr) => {
        impl $crate::Resource for $ty {
            type Status = $status;
            const KIND: &'static str = $kind;
            const PLURAL: &'static str = $plural;
            fn meta(&self) -> &$crate::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut $crate::ObjectMeta {
                &mut self.metadata
            }
            fn status(&self) -> Option<&$status> {
                self.status.as_ref()
            }
            fn status_mut(&mut self) -> &mut Option<$status> {
                &mut self.status
            }
            fn same_spec(&self, other: &Self) -> bool {
                self.spec == other.spec
            }
            fn machine_views(&self) -> std::collections::BTreeSet<&str> {
                let views: fn(&$ty) -> std::collections::BTreeSet<&str> = $views;
                views(self)
            }
        }
    };
}
pub(crate) use resource;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Volume, VolumeSpec};
    use std::collections::{BTreeSet, HashSet};
    use std::sync::Arc;

    fn volume(name: &str, machine: &str) -> ByName<Volume> {
        let mut v = Volume::new(name, VolumeSpec::default());
        v.spec.machine = Some(machine.into());
        ByName(Arc::new(v))
    }

    #[test]
    fn by_name_is_found_by_its_name_and_replaced_whole() {
        let mut ordered: BTreeSet<_> = [volume("b", "m1"), volume("a", "m1")].into();
        let mut hashed: HashSet<_> = ordered.iter().cloned().collect();
        assert_eq!(ordered.get("a").unwrap().0.name(), "a");
        assert!(hashed.contains("b") && !hashed.contains("c"));
        assert_eq!(
            ordered.iter().map(|o| o.0.name()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // `replace`, not `insert`, swaps in the newer object of the same name.
        ordered.replace(volume("a", "m2"));
        hashed.replace(volume("a", "m2"));
        for got in [&ordered.get("a").unwrap().0, &hashed.get("a").unwrap().0] {
            assert_eq!(got.spec.machine.as_deref(), Some("m2"));
        }
        assert_eq!((ordered.len(), hashed.len()), (2, 2));
    }
}
