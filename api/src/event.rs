//! Events: what happened to an object, for people ("bound to machine m1", "move finished",
//! "machine lost"). They have the shape of Kubernetes' core `v1` Event, so `kubectl get events`
//! and `kubectl describe` show them as they show any cluster's; `cobaltctl events` and
//! `cobaltctl describe` show them too.
//!
//! Events are aggregated: one per object and reason, whose `count` and `lastTimestamp` move
//! when the same thing happens again and whose `message` is the latest. They expire after a
//! TTL (one hour by default), so how many exist is bounded by the objects and reasons seen in
//! that hour. How they are written is in `cobalt_store::events`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Kubernetes' core API version, which Events belong to.
pub const EVENT_API_VERSION: &str = "v1";
/// Events are namespaced in Kubernetes; those of Cobalt's cluster-scoped objects live in
/// `default`, as Kubernetes puts the events of its own cluster-scoped objects.
pub const EVENT_NAMESPACE: &str = "default";

/// Normal (something went as intended) or Warning (something a person may have to look at).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMeta {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<DateTime<Utc>>,
}

/// The object an event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// Who reported an event: the daemon and the host it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSource {
    pub component: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub api_version: String,
    pub kind: String,
    pub metadata: EventMeta,
    pub involved_object: ObjectReference,
    /// CamelCase, machine-readable: `Bound`, `MoveFinished`, `MachineLost`, …
    pub reason: String,
    pub message: String,
    #[serde(rename = "type")]
    pub type_: EventType,
    pub count: u32,
    pub first_timestamp: DateTime<Utc>,
    pub last_timestamp: DateTime<Utc>,
    pub source: EventSource,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporting_component: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporting_instance: String,
}

impl Event {
    /// The name of the one event per object and reason: `volume.web.bound`. Names of objects
    /// are DNS labels and reasons are alphanumeric, so names never collide across kinds.
    pub fn name_for(kind: &str, name: &str, reason: &str) -> String {
        format!(
            "{}.{name}.{}",
            kind.to_ascii_lowercase(),
            reason.to_ascii_lowercase()
        )
    }

    /// True when this event is about `kind`/`name` (and, when `uid` is given, that very object:
    /// a volume deleted and created again under its name has a new uid).
    pub fn is_about(&self, kind: &str, name: &str, uid: Option<&str>) -> bool {
        self.involved_object.kind == kind
            && self.involved_object.name == name
            && uid.is_none_or(|u| {
                self.involved_object.uid.is_empty() || self.involved_object.uid == u
            })
    }
}

/// A field selector over events, as `kubectl` sends them
/// (`involvedObject.kind=Volume,involvedObject.name=web`): equality (`=`, `==`) and inequality
/// (`!=`) on the fields below, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

/// The fields a field selector may name, per kind (Kubernetes' own set for Events, and
/// `metadata.name`/`metadata.namespace` for Cobalt's kinds, as for custom resources).
pub const EVENT_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.namespace",
    "involvedObject.apiVersion",
    "reason",
    "type",
    "source",
    "reportingComponent",
];
pub const OBJECT_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];

impl FieldSelector {
    /// Parses `a=b,c!=d`; a field outside `allowed` is an error naming the allowed ones.
    pub fn parse(text: &str, allowed: &[&str]) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "fieldSelector term {term:?} is not field=value, field==value or field!=value"
                ));
            };
            let field = field.trim();
            if !allowed.contains(&field) {
                return Err(format!(
                    "fieldSelector: field {field:?} is not supported; supported fields: {}",
                    allowed.join(", ")
                ));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// True when every term holds, `field` giving each field's value (None: the empty string).
    /// Terms on `metadata.namespace` and `involvedObject.namespace` always hold: Cobalt's
    /// objects are cluster-scoped, and kubectl names its current namespace (or none) when it
    /// asks for their events.
    pub fn matches<'a>(&self, field: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.terms
            .iter()
            .filter(|(f, _, _)| !f.ends_with(".namespace"))
            .all(|(f, equal, value)| (field(f).unwrap_or("") == value) == *equal)
    }

    /// Matches an event.
    pub fn matches_event(&self, e: &Event) -> bool {
        self.matches(|f| match f {
            "metadata.name" => Some(e.metadata.name.as_str()),
            "involvedObject.kind" => Some(e.involved_object.kind.as_str()),
            "involvedObject.name" => Some(e.involved_object.name.as_str()),
            "involvedObject.uid" => Some(e.involved_object.uid.as_str()),
            "involvedObject.apiVersion" => Some(e.involved_object.api_version.as_str()),
            "reason" => Some(e.reason.as_str()),
            "type" => Some(e.type_.as_str()),
            "source" => Some(e.source.component.as_str()),
            "reportingComponent" => Some(e.reporting_component.as_str()),
            _ => None,
        })
    }

    /// Matches a cluster-scoped object by name.
    pub fn matches_object(&self, name: &str) -> bool {
        self.matches(|f| match f {
            "metadata.name" => Some(name),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, name: &str, reason: &str) -> Event {
        let now = Utc::now();
        Event {
            api_version: EVENT_API_VERSION.into(),
            kind: "Event".into(),
            metadata: EventMeta {
                name: Event::name_for(kind, name, reason),
                namespace: EVENT_NAMESPACE.into(),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: crate::API_VERSION.into(),
                kind: kind.into(),
                name: name.into(),
                uid: "u1".into(),
            },
            reason: reason.into(),
            message: "m".into(),
            type_: EventType::Normal,
            count: 1,
            first_timestamp: now,
            last_timestamp: now,
            source: EventSource::default(),
            reporting_component: String::new(),
            reporting_instance: String::new(),
        }
    }

    #[test]
    fn field_selectors_match_what_kubectl_describe_sends() {
        let e = event("Volume", "web", "Bound");
        let s = FieldSelector::parse(
            "involvedObject.name=web,involvedObject.namespace=,involvedObject.kind=Volume,involvedObject.uid=u1",
            EVENT_FIELDS,
        )
        .unwrap();
        assert!(s.matches_event(&e));
        // kubectl in namespace "default" asking for a cluster-scoped object's events.
        let s = FieldSelector::parse(
            "involvedObject.name=web,involvedObject.namespace=default,involvedObject.kind=Volume",
            EVENT_FIELDS,
        )
        .unwrap();
        assert!(s.matches_event(&e));
        for other in [
            "involvedObject.name=db",
            "involvedObject.kind=Machine",
            "type!=Normal",
            "involvedObject.uid=u2",
        ] {
            let s = FieldSelector::parse(other, EVENT_FIELDS).unwrap();
            assert!(!s.matches_event(&e), "{other} must not match");
        }
    }

    #[test]
    fn unsupported_fields_and_malformed_terms_are_named() {
        let err = FieldSelector::parse("spec.size=1Gi", OBJECT_FIELDS).unwrap_err();
        assert!(
            err.contains("spec.size") && err.contains("metadata.name"),
            "{err}"
        );
        let err = FieldSelector::parse("metadata.name", OBJECT_FIELDS).unwrap_err();
        assert!(err.contains("field=value"), "{err}");
        let s = FieldSelector::parse("metadata.name==web", OBJECT_FIELDS).unwrap();
        assert!(s.matches_object("web") && !s.matches_object("db"));
        let s = FieldSelector::parse("metadata.namespace=", OBJECT_FIELDS).unwrap();
        assert!(s.matches_object("web"));
        assert!(FieldSelector::parse("", OBJECT_FIELDS).unwrap().is_empty());
    }

    #[test]
    fn names_are_per_kind_object_and_reason() {
        assert_eq!(
            Event::name_for("Volume", "web", "MoveFinished"),
            "volume.web.movefinished"
        );
        assert_ne!(
            Event::name_for("Volume", "a", "Bound"),
            Event::name_for("Machine", "a", "Bound")
        );
    }
}
