//! Shapes that keep objects small in memory, with the wire format and schema of the plain ones:
//! [`Text`], a string held inline when short; [`StringMap`], the map of strings that labels and
//! annotations are; [`Word`], a short string most objects share; and [`exact_vec`] for lists.
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

/// A string held inside the object when it is [`Text::INLINE`] bytes or shorter (names, machine
/// names, label keys and values, paths, most condition messages), and on the heap otherwise.
///
/// A `String` of even one byte is a heap allocation: 32 bytes of the allocator's with its
/// header, beside the 24 of the `String` itself. A Ready volume carries about twenty short
/// strings, so a controller holding 100,000 volumes paid about 60 MB for them. `Text` is as
/// large as a `String` and serializes, deserializes and documents itself (JSON Schema) as a
/// plain string. It dereferences to `str`, so it reads like one.
#[derive(Clone, Default)]
pub struct Text(compact_str::CompactString);

impl Text {
    /// The longest string held inline.
    pub const INLINE: usize = std::mem::size_of::<String>();

    pub fn new(s: &str) -> Self {
        Text(compact_str::CompactString::new(s))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear()
    }

    /// Whether the string lives inside the `Text` (no allocation).
    pub fn is_inline(&self) -> bool {
        !self.0.is_heap_allocated()
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.0.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// Hashes as the `str` it holds, so a `HashMap<Text, _>` is found by `&str`.
impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

macro_rules! text_eq {
    ($($other:ty),*) => {$(
        impl PartialEq<$other> for Text {
            fn eq(&self, other: &$other) -> bool {
                self.as_str() == AsRef::<str>::as_ref(other)
            }
        }
        impl PartialEq<Text> for $other {
            fn eq(&self, other: &Text) -> bool {
                AsRef::<str>::as_ref(self) == other.as_str()
            }
        }
    )*};
}
text_eq!(str, String);

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text::new(s)
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Text {
        Text::new(s)
    }
}

/// Short strings are copied inline (the `String`'s buffer is freed); long ones keep it.
impl From<String> for Text {
    fn from(s: String) -> Text {
        if s.len() <= Text::INLINE {
            Text::new(&s)
        } else {
            Text(compact_str::CompactString::from_string_buffer(s))
        }
    }
}

impl From<Text> for String {
    fn from(s: Text) -> String {
        s.0.into_string()
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AText;
        impl Visitor<'_> for AText {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text::new(s))
            }

            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Text, E> {
                Ok(s.into())
            }
        }
        deserializer.deserialize_str(AText)
    }
}

impl JsonSchema for Text {
    fn schema_name() -> Cow<'static, str> {
        <String as JsonSchema>::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        <String as JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <String as JsonSchema>::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

/// A small map of string keys to string values, ordered by key.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StringMap {
    /// Sorted by key; no key twice.
    entries: Vec<(Text, Text)>,
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

    pub fn get(&self, key: &str) -> Option<&Text> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Text> {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    /// Whether `key` is set to `value`.
    pub fn has(&self, key: &str, value: &str) -> bool {
        self.get(key).is_some_and(|v| v == value)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<Text> {
        self.insert_text(key.into(), value.into())
    }

    fn insert_text(&mut self, key: Text, value: Text) -> Option<Text> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Text> {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Text, &mut Text) -> bool) {
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
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Text, &Text)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &Text> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Text> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Gives back memory the entries do not use (after building a map to keep for long).
    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
    }

    /// Builds the map from entries in any order; of a key given twice, the last value wins (as
    /// a JSON object's or a `BTreeMap`'s).
    fn from_entries(mut entries: Vec<(Text, Text)>) -> Self {
        if !entries.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable, so equal keys keep their order; then the last of each run is kept.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut kept: Vec<(Text, Text)> = Vec::with_capacity(entries.len());
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
    type Output = Text;

    /// The value of `key`; panics if there is none (as a `BTreeMap`'s index does).
    fn index(&self, key: &str) -> &Text {
        self.get(key)
            .unwrap_or_else(|| panic!("no entry for key {key:?}"))
    }
}

impl<K: Into<Text>, V: Into<Text>> FromIterator<(K, V)> for StringMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_entries(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<Text>, V: Into<Text>, const N: usize> From<[(K, V); N]> for StringMap {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<K: Into<Text>, V: Into<Text>> Extend<(K, V)> for StringMap {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert_text(k.into(), v.into());
        }
    }
}

impl<'a> IntoIterator for &'a StringMap {
    type Item = (&'a Text, &'a Text);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Text, Text)>,
        fn(&'a (Text, Text)) -> (&'a Text, &'a Text),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl IntoIterator for StringMap {
    type Item = (Text, Text);
    type IntoIter = std::vec::IntoIter<(Text, Text)>;

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
                while let Some(entry) = access.next_entry::<Text, Text>()? {
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
    fn text_holds_short_strings_inline_and_reads_as_a_string() {
        let short = "vol-000001";
        let long = "10737418240 bytes on machine m0017";
        for (s, inline) in [
            (short, true),
            (&"x".repeat(Text::INLINE), true),
            (long, false),
        ] {
            assert_eq!(Text::new(s).is_inline(), inline, "{s}");
            assert_eq!(
                Text::from(s.to_string()).is_inline(),
                inline,
                "{s} from a String"
            );
            let decoded: Text = serde_json::from_str(&format!("{s:?}")).unwrap();
            assert_eq!(decoded.is_inline(), inline, "{s} decoded");
            assert_eq!(decoded, s);
            assert_eq!(serde_json::to_string(&decoded).unwrap(), format!("{s:?}"));
        }
        // Escaped in JSON, so handed over as a String: still held inline when short.
        let escaped: Text = serde_json::from_str(r#""vol-\u0030""#).unwrap();
        assert!(escaped.is_inline());
        assert_eq!(escaped, "vol-0");
        // Found by &str in maps, ordered and compared as the str it holds.
        let set: std::collections::HashSet<Text> = [Text::new("b"), Text::new("a")].into();
        assert!(set.contains("a"));
        assert!(Text::new("a") < Text::new("b"));
        assert_eq!(String::from(Text::new(long)), long);
        assert_eq!(
            serde_json::to_value(schemars::schema_for!(Text)).unwrap()["type"],
            "string"
        );
    }

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
                m.insert(k.to_string(), v.to_string()).map(String::from),
                b.insert(k.to_string(), v.to_string())
            );
        }
        assert_eq!(m.remove("z").map(String::from), b.remove("z"));
        assert_eq!(m.remove("absent"), None);
        assert_eq!(
            m.get("tier").map(Text::as_str),
            b.get("tier").map(String::as_str)
        );
        assert!(m.contains_key("app") && !m.contains_key("z"));
        assert!(m
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .eq(b.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
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
        assert!(from_m
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .eq(from_b.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
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
