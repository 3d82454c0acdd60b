//! Shapes that keep objects small in memory, with the wire format and schema of the plain ones:
//! [`StringMap`], the map of strings that labels and annotations are; [`Word`], a short string
//! most objects share; and [`exact_vec`] for lists.
//!
//! A `BTreeMap<String, String>` allocates a whole node (about 540 bytes) for its first entry,
//! and most objects carry one to three labels and an annotation or two; a controller holding
//! 100,000 volumes paid for that twice a volume. This map keeps its entries in one `Vec` sorted
//! by key, exactly as large as they need once decoded, and serializes, deserializes and
//! documents itself (JSON Schema) as the JSON object a `BTreeMap` is: the wire format is the
//! same, keys in order.

use std::borrow::Cow;
use std::fmt;

use schemars::JsonSchema;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A small map of string keys to string values, ordered by key.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StringMap {
    /// Sorted by key; no key twice.
    entries: Vec<(String, String)>,
}

impl StringMap {
    pub const fn new() -> Self {
        StringMap {
            entries: Vec::new(),
        }
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut String> {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut String) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&String, &String)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Gives back memory the entries do not use (after building a map to keep for long).
    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
    }

    /// Builds the map from entries in any order; of a key given twice, the last value wins (as
    /// a JSON object's or a `BTreeMap`'s).
    fn from_entries(mut entries: Vec<(String, String)>) -> Self {
        if !entries.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable, so equal keys keep their order; then the last of each run is kept.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut kept: Vec<(String, String)> = Vec::with_capacity(entries.len());
            for e in entries {
                match kept.last_mut() {
                    Some(last) if last.0 == e.0 => *last = e,
                    _ => kept.push(e),
                }
            }
            entries = kept;
        }
        entries.shrink_to_fit();
        StringMap { entries }
    }
}

impl fmt::Debug for StringMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl std::ops::Index<&str> for StringMap {
    type Output = String;

    /// The value of `key`; panics if there is none (as a `BTreeMap`'s index does).
    fn index(&self, key: &str) -> &String {
        self.get(key)
            .unwrap_or_else(|| panic!("no entry for key {key:?}"))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for StringMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_entries(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>, const N: usize> From<[(K, V); N]> for StringMap {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for StringMap {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k.into(), v.into());
        }
    }
}

impl<'a> IntoIterator for &'a StringMap {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl IntoIterator for StringMap {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl Serialize for StringMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = StringMap;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StringMap, A::Error> {
                // The size hint comes from the input: bounded, so a hostile one cannot make
                // this reserve more than a few entries ahead of what arrives.
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(16));
                while let Some(entry) = access.next_entry::<String, String>()? {
                    entries.push(entry);
                }
                Ok(StringMap::from_entries(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

impl JsonSchema for StringMap {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <std::collections::BTreeMap<String, String> as JsonSchema>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <std::collections::BTreeMap<String, String> as JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <std::collections::BTreeMap<String, String> as JsonSchema>::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

/// A short string that most objects share: a condition's type and reason, a kind, the API
/// version. One of Cobalt's own words ([`WORDS`]) is held as a `&'static str` and costs no
/// allocation (a Ready volume carries eight of them in its conditions); any other is kept as it
/// came. Serialized and documented as a plain string.
pub type Word = Cow<'static, str>;

/// The words [`word`] holds without allocating, sorted: the API version, the kinds, and the
/// condition types and reasons Cobalt writes.
pub const WORDS: &[&str] = &[
    "AgentAlive",
    "Applied",
    "Bound",
    "CapacityReserved",
    "CapacityUnknown",
    "Claim",
    "CleaningUp",
    "CloneUnsupported",
    "Converging",
    "Created",
    "Creating",
    "CuttingOver",
    "DataMissing",
    "Deleting",
    "Drained",
    "Draining",
    "Exported",
    "Failed",
    "Found",
    "InsufficientCapacity",
    "Machine",
    "MachineLost",
    "MachineReady",
    "MoveFinished",
    "MoveUnsupported",
    "Moving",
    "NoClients",
    "NoExporter",
    "NotExported",
    "NotReady",
    "OrphanVolumes",
    "Pending",
    "Pinned",
    "PinnedOvercommitted",
    "Placed",
    "Provisioned",
    "Quota",
    "Ready",
    "ResizeBlocked",
    "ResizeUnsupported",
    "Resized",
    "Resizing",
    "RestoreUnsupported",
    "Scheduled",
    "Seeding",
    "Served",
    "Serving",
    "Snapshot",
    "SnapshotUnsupported",
    "SourceNotReady",
    "Taken",
    "TargetLacksCapability",
    "TargetNotReady",
    "TargetUnknown",
    "Unexported",
    "Unschedulable",
    "Volume",
    "VolumeDeleting",
    "VolumeNotReady",
    "cobalt.io/v1alpha1",
];

/// `s` as a [`Word`]: borrowed from [`WORDS`] if it is one, else copied.
pub fn word(s: &str) -> Word {
    match WORDS.binary_search(&s) {
        Ok(i) => Cow::Borrowed(WORDS[i]),
        Err(_) => Cow::Owned(s.to_string()),
    }
}

/// Deserializes a string as a [`Word`], without allocating for one of [`WORDS`].
pub(crate) fn deserialize_word<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Word, D::Error> {
    struct AWord;
    impl Visitor<'_> for AWord {
        type Value = Word;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Word, E> {
            Ok(word(s))
        }

        fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Word, E> {
            Ok(match WORDS.binary_search(&s.as_str()) {
                Ok(i) => Cow::Borrowed(WORDS[i]),
                Err(_) => Cow::Owned(s),
            })
        }
    }
    deserializer.deserialize_str(AWord)
}

/// Deserializes a list into a `Vec` exactly as large as its items: decoding grows a `Vec` by
/// doubling (room for four of the first item), and a cache holding 100,000 objects keeps every
/// spare slot. For the lists of objects kept long (conditions, finalizers, export clients).
pub(crate) fn exact_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut items = Vec::<T>::deserialize(deserializer)?;
    items.shrink_to_fit();
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn behaves_as_a_btreemap_of_strings() {
        let mut m = StringMap::new();
        let mut b = BTreeMap::new();
        for (k, v) in [
            ("tier", "gold"),
            ("app", "media"),
            ("tier", "silver"),
            ("z", "1"),
        ] {
            assert_eq!(
                m.insert(k.to_string(), v.to_string()),
                b.insert(k.to_string(), v.to_string())
            );
        }
        assert_eq!(m.remove("z"), b.remove("z"));
        assert_eq!(m.remove("absent"), None);
        assert_eq!(m.get("tier"), b.get("tier"));
        assert!(m.contains_key("app") && !m.contains_key("z"));
        assert!(m.iter().eq(b.iter()));
        assert_eq!(m.len(), b.len());
    }

    #[test]
    fn words_are_sorted_and_held_without_allocating() {
        assert!(WORDS.is_sorted(), "binary search needs WORDS sorted");
        assert!(matches!(word("Ready"), Cow::Borrowed(_)));
        assert!(matches!(word("SomethingNew"), Cow::Owned(_)));
        let c: crate::Condition = serde_json::from_str(
            r#"{"type": "Ready", "status": "True", "reason": "Serving", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert!(matches!(c.type_, Cow::Borrowed("Ready")));
        assert!(matches!(c.reason, Cow::Borrowed("Serving")));
        // Escaped, so not borrowed from the input: still found.
        let escaped: crate::Condition = serde_json::from_str(
            r#"{"type": "Re\u0061dy", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert!(matches!(escaped.type_, Cow::Borrowed("Ready")));
    }

    #[test]
    fn has_the_wire_format_and_schema_of_a_btreemap() {
        let b: BTreeMap<String, String> = [("b", "2"), ("a", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let m: StringMap = [("b", "2"), ("a", "1")].into();
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        // Out of order and a key given twice: the last value wins, as for a BTreeMap.
        let text = r#"{"b": "2", "a": "1", "b": "3"}"#;
        let from_m: StringMap = serde_json::from_str(text).unwrap();
        let from_b: BTreeMap<String, String> = serde_json::from_str(text).unwrap();
        assert!(from_m.iter().eq(from_b.iter()));
        assert_eq!(from_m.entries.capacity(), 2);
        let meta: crate::ObjectMeta =
            serde_json::from_str(r#"{"name": "a", "finalizers": ["cobalt.io/agent"]}"#).unwrap();
        assert_eq!(
            meta.finalizers.capacity(),
            1,
            "decoded lists keep no spare room"
        );
        assert_eq!(
            schemars::schema_for!(StringMap),
            schemars::schema_for!(BTreeMap<String, String>)
        );
        let not_strings = serde_json::from_str::<StringMap>(r#"{"a": 1}"#).unwrap_err();
        assert!(
            not_strings.to_string().contains("expected a string"),
            "{not_strings}"
        );
    }
}
