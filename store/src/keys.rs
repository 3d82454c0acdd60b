//! The etcd key layout (DESIGN.md "etcd layout"), in one place:
//!
//! ```text
//! <prefix>/<plural>/<name>/object   apiVersion, kind, metadata, spec (JSON)
//! <prefix>/<plural>/<name>/status   status (JSON), written by agents and controllers only
//! <prefix>/machines/<name>/alive    bound to an agent's lease: present = alive
//! <prefix>/election/<name>          etcd election keys
//! <prefix>/events/<event name>       aggregated events, each on an expiring lease
//! <prefix>/views/<machine>/<plural>/<name>/object|status
//!                                   a copy of each object that concerns the machine
//!                                   (`Resource::machine_views`), kept in the same
//!                                   transaction as every write of the object: what its
//!                                   agent watches instead of the whole kind
//! ```
//! Names are DNS-1123 labels (validated before anything is written), so they never contain '/'.

/// Which key of an object a raw etcd key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Object,
    Status,
    Alive,
}

#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        Keys {
            prefix: if trimmed.starts_with('/') || trimmed.is_empty() {
                trimmed.to_string()
            } else {
                format!("/{trimmed}")
            },
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/<plural>/`: every key of every object of a kind.
    pub fn kind(&self, plural: &str) -> String {
        format!("{}/{plural}/", self.prefix)
    }

    /// `<prefix>/<plural>/<name>/`: every key of one object.
    pub fn object_dir(&self, plural: &str, name: &str) -> String {
        format!("{}/{plural}/{name}/", self.prefix)
    }

    pub fn object(&self, plural: &str, name: &str) -> String {
        format!("{}/{plural}/{name}/object", self.prefix)
    }

    pub fn status(&self, plural: &str, name: &str) -> String {
        format!("{}/{plural}/{name}/status", self.prefix)
    }

    pub fn alive(&self, machine: &str) -> String {
        self.alive_of("machines", machine)
    }

    /// `<prefix>/<plural>/<name>/alive`: present while a lease holds it.
    pub fn alive_of(&self, plural: &str, name: &str) -> String {
        format!("{}/{plural}/{name}/alive", self.prefix)
    }

    pub fn election(&self, name: &str) -> String {
        format!("{}/election/{name}", self.prefix)
    }

    /// `<prefix>/events/`: every event.
    pub fn events(&self) -> String {
        format!("{}/events/", self.prefix)
    }

    pub fn event(&self, name: &str) -> String {
        format!("{}/events/{name}", self.prefix)
    }

    /// `<prefix>/views/<machine>/<plural>/`: machine `machine`'s copies of a kind.
    pub fn view_kind(&self, machine: &str, plural: &str) -> String {
        format!("{}/views/{machine}/{plural}/", self.prefix)
    }

    /// `<prefix>/views/`: every machine's view.
    pub fn views(&self) -> String {
        format!("{}/views/", self.prefix)
    }

    pub fn view_object(&self, machine: &str, plural: &str, name: &str) -> String {
        format!("{}/views/{machine}/{plural}/{name}/object", self.prefix)
    }

    pub fn view_status(&self, machine: &str, plural: &str, name: &str) -> String {
        format!("{}/views/{machine}/{plural}/{name}/status", self.prefix)
    }

    /// Splits a key under `kind(plural)` into the object name and which part it is.
    pub fn parse<'a>(&self, plural: &str, key: &'a str) -> Option<(&'a str, Part)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(plural)?.strip_prefix('/')?;
        Self::parse_rest(rest)
    }

    /// Splits a key under `root` (a [`Keys::kind`] or [`Keys::view_kind`]) into the object
    /// name and which part it is.
    pub fn parse_under<'a>(root: &str, key: &'a str) -> Option<(&'a str, Part)> {
        Self::parse_rest(key.strip_prefix(root)?)
    }

    fn parse_rest(rest: &str) -> Option<(&str, Part)> {
        let (name, part) = rest.split_once('/')?;
        let part = match part {
            "object" => Part::Object,
            "status" => Part::Status,
            "alive" => Part::Alive,
            _ => return None,
        };
        Some((name, part))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_do_not_overlap_between_names() {
        let k = Keys::new("cobalt/");
        assert_eq!(k.object("volumes", "a"), "/cobalt/volumes/a/object");
        assert_eq!(
            k.parse("volumes", "/cobalt/volumes/a/status"),
            Some(("a", Part::Status))
        );
        assert_eq!(k.parse("volumes", "/cobalt/machines/a/status"), None);
        assert!(!k
            .object("volumes", "ab")
            .starts_with(&k.object_dir("volumes", "a")));
        assert_eq!(k.alive("n1"), "/cobalt/machines/n1/alive");
        let view = k.view_kind("m1", "volumes");
        assert_eq!(
            Keys::parse_under(&view, &k.view_status("m1", "volumes", "a")),
            Some(("a", Part::Status))
        );
        assert_eq!(
            Keys::parse_under(&view, &k.view_object("m10", "volumes", "a")),
            None
        );
    }
}
