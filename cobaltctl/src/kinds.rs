//! Kind names as users type them: `volume`, `volumes`, `vol`, `machine`, `machines`, `mach`,
//! `snapshot`, `snapshots`, `snap`, `claim`, `claims`, `cl`,
//! optionally with a name: `volume/media`.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Volume,
    Machine,
    Snapshot,
    Claim,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind, String> {
        match s.to_ascii_lowercase().as_str() {
            "volume" | "volumes" | "vol" | "vols" => Ok(Kind::Volume),
            "machine" | "machines" | "mach" | "machs" => Ok(Kind::Machine),
            "snapshot" | "snapshots" | "snap" | "snaps" => Ok(Kind::Snapshot),
            "claim" | "claims" | "cl" => Ok(Kind::Claim),
            other => Err(format!(
                "unknown kind {other:?}; use volume(s)/vol, machine(s)/mach, snapshot(s)/snap or claim(s)/cl"
            )),
        }
    }

    /// `kind` or `kind/name`.
    pub fn parse_ref(s: &str) -> Result<(Kind, Option<String>), String> {
        match s.split_once('/') {
            Some((k, n)) => Ok((Kind::parse(k)?, Some(n.to_string()))),
            None => Ok((Kind::parse(s)?, None)),
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Machine => "machines",
            Kind::Snapshot => "snapshots",
            Kind::Claim => "claims",
        }
    }

    /// The manifest `kind`: `Volume`, `Machine`, `Snapshot`.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Volume => "Volume",
            Kind::Machine => "Machine",
            Kind::Snapshot => "Snapshot",
            Kind::Claim => "Claim",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Machine => "machine",
            Kind::Snapshot => "snapshot",
            Kind::Claim => "claim",
        }
    }

    pub fn from_manifest_kind(kind: &str) -> Option<Kind> {
        match kind {
            "Volume" => Some(Kind::Volume),
            "Machine" => Some(Kind::Machine),
            "Snapshot" => Some(Kind::Snapshot),
            "Claim" => Some(Kind::Claim),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singular_plural_and_short_names_are_accepted() {
        for s in ["volume", "volumes", "vol", "Volume"] {
            assert_eq!(Kind::parse(s), Ok(Kind::Volume));
        }
        assert_eq!(
            Kind::parse_ref("machine/node-1"),
            Ok((Kind::Machine, Some("node-1".into())))
        );
        assert!(Kind::parse("pods").unwrap_err().contains("volume(s)"));
    }
}
