//! What a machine token may write (ARCHITECTURE.md "Least privilege"): a storage machine's
//! credentials must not change what users declared. Pure — the handlers read the stored object
//! and ask here.
//!
//! A token with `role: machine, machine: NAME` may read everything and write only:
//! - its own Machine: create it when none exists (registration), change the labels under
//!   `cobalt.io/` (the backend's facts), and write its status;
//! - the status of a Volume that concerns it (bound to it, held by it, or either end of its move
//!   — `Volume::concerned_machines` of the stored object), where a move's or a clone seed's
//!   transfer credential may be set only by the machine the volume is bound to (the move's
//!   target; the source serves data to whoever holds that credential; either end may clear
//!   it), and `status.machine` may name only a machine the volume already concerns;
//! - the status of a Snapshot of such a volume (or held by it);
//! - on those Volumes and Snapshots, the agent's finalizer (`cobalt.io/agent`), added or removed,
//!   and nothing else of the object.
//!
//! Everything else — a spec, a delete, another machine's keys, a Claim — is 403.

use std::collections::BTreeSet;

use cobalt_api::{Resource, Volume, VolumeStatus, AGENT_FINALIZER};
use serde_json::Value;

/// The label prefix of facts an agent reports about its machine (`cobalt.io/backend`, …).
const COBALT_LABELS: &str = "cobalt.io/";

/// Who sent a request (put into the request by the authentication layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No tokens configured, or an admin token.
    Admin,
    /// A machine token: may write only what concerns `machine`.
    Machine(String),
}

impl Caller {
    pub fn machine(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Machine(m) => Some(m),
        }
    }
}

/// Which machines an object concerns, for machine tokens.
pub enum Concerns<'a> {
    /// Nobody's: no machine token may write it.
    Nobody,
    /// These machines'.
    Machines(BTreeSet<&'a str>),
    /// A Snapshot's: the machine holding it, and whoever the volume named concerns (looked up
    /// by the handler).
    VolumeOf {
        volume: &'a str,
        held_by: Option<&'a str>,
    },
}

/// The same object but for `resourceVersion`, `status` and, with `finalizer`, the agent's
/// finalizer: what a replace by a machine token may differ in.
fn without_agent_parts<R: Resource>(obj: &R, finalizer: bool) -> Result<Value, String> {
    let mut o = obj.clone();
    let meta = o.meta_mut();
    if finalizer {
        meta.finalizers.retain(|f| f != AGENT_FINALIZER);
    }
    meta.resource_version = Default::default();
    *o.status_mut() = None;
    serde_json::to_value(&o).map_err(|e| e.to_string())
}

fn denied(machine: &str, what: impl std::fmt::Display) -> String {
    format!("a machine token (machine {machine}) may not {what}")
}

/// A replace of `old` by `new` by machine `machine`, which `concerned` says the object concerns.
pub fn replace<R: Resource>(
    machine: &str,
    old: &R,
    new: &R,
    concerned: bool,
) -> Result<(), String> {
    if R::KIND == "Machine" {
        return replace_own_machine(machine, old, new);
    }
    if !matches!(R::KIND, "Volume" | "Snapshot") {
        return Err(denied(machine, format!("change a {}", R::KIND)));
    }
    if !concerned {
        return Err(denied(
            machine,
            format!(
                "change {} {}: it is not bound to, held by or moving to or from that machine",
                R::KIND,
                old.name()
            ),
        ));
    }
    if without_agent_parts(old, true)? != without_agent_parts(new, true)? {
        return Err(denied(
            machine,
            format!(
                "change {} {} beyond the finalizer {AGENT_FINALIZER}",
                R::KIND,
                old.name()
            ),
        ));
    }
    Ok(())
}

/// A machine's own Machine: only labels under `cobalt.io/` (what its backend is) may change.
fn replace_own_machine<R: Resource>(machine: &str, old: &R, new: &R) -> Result<(), String> {
    if old.name() != machine {
        return Err(denied(machine, format!("change machine {}", old.name())));
    }
    let strip = |o: &R| -> Result<Value, String> {
        let mut o = o.clone();
        o.meta_mut()
            .labels
            .retain(|k, _| !k.starts_with(COBALT_LABELS));
        without_agent_parts(&o, false)
    };
    if strip(old)? != strip(new)? {
        return Err(denied(
            machine,
            format!(
                "change its Machine beyond the labels under {}: the rest is the operator's",
                COBALT_LABELS
            ),
        ));
    }
    Ok(())
}

/// A create by machine `machine`: only its own Machine (registration).
pub fn create<R: Resource>(machine: &str, new: &R) -> Result<(), String> {
    if R::KIND == "Machine" && new.name() == machine {
        return Ok(());
    }
    Err(denied(
        machine,
        format!(
            "create {} {}: it may register only its own Machine",
            R::KIND,
            new.name()
        ),
    ))
}

/// A status write by machine `machine` on `old` (as stored), which `concerned` says concerns
/// it. A Volume's status is checked further by [`volume_status`].
pub fn status<R: Resource>(machine: &str, old: &R, concerned: bool) -> Result<(), String> {
    if R::KIND == "Claim" {
        return Err(denied(machine, "write a Claim's status"));
    }
    if !concerned {
        return Err(denied(
            machine,
            format!(
                "write the status of {} {}: it does not concern that machine",
                R::KIND,
                old.name()
            ),
        ));
    }
    Ok(())
}

/// The further rules of a Volume's status written by a machine: the transfer credentials only
/// from the machine the volume is bound to, and `status.machine` only a machine the volume
/// already concerns.
pub fn volume_status(machine: &str, old: &Volume, new: &VolumeStatus) -> Result<(), String> {
    let old_status = old.status.as_ref();
    let bound_here = old.spec.machine.as_deref() == Some(machine);
    let move_credential = |s: Option<&VolumeStatus>| {
        s.and_then(|s| s.move_.as_ref())
            .and_then(|m| m.credential_sha256.clone())
    };
    // Setting one grants access to the data; clearing one (the move or seed over) only takes
    // it away, which either end may do.
    let sets = |new: Option<String>, old: Option<String>| new.is_some() && new != old;
    if sets(move_credential(Some(new)), move_credential(old_status)) && !bound_here {
        return Err(denied(
            machine,
            format!(
                "set the move credential of volume {}: only the move's target may",
                old.name()
            ),
        ));
    }
    let seed = |s: Option<&VolumeStatus>| {
        s.and_then(|s| s.clone_seed.as_ref())
            .map(|c| c.credential_sha256.clone())
    };
    if sets(seed(Some(new)), seed(old_status)) && !bound_here {
        return Err(denied(
            machine,
            format!(
                "set the clone credential of volume {}: only the clone's machine may",
                old.name()
            ),
        ));
    }
    if let Some(to) = new.machine.as_deref() {
        if !old.concerned_machines().contains(to) {
            return Err(denied(
                machine,
                format!(
                    "say volume {} is on machine {to}, which it does not concern",
                    old.name()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::{Machine, MachineSpec, MoveStatus, Snapshot, VolumeSpec};

    fn volume(bound: &str, held: Option<&str>) -> Volume {
        let mut v = Volume::new("db", VolumeSpec::default());
        v.spec.machine = Some(bound.into());
        v.metadata.resource_version = "7".into();
        v.status = held.map(|h| VolumeStatus {
            machine: Some(h.into()),
            ..Default::default()
        });
        v
    }

    #[test]
    fn a_machine_may_add_and_remove_only_the_agent_finalizer_on_what_concerns_it() {
        let old = volume("m1", None);
        let mut new = old.clone();
        new.metadata.finalizers.push(AGENT_FINALIZER.into());
        new.metadata.resource_version = "".into();
        assert_eq!(replace("m1", &old, &new, true), Ok(()));
        assert_eq!(replace("m1", &new, &old, true), Ok(()), "removing it");
        let err = replace("m2", &old, &new, false).unwrap_err();
        assert!(
            err.contains("machine m2") && err.contains("not bound"),
            "{err}"
        );

        let mut spec = new.clone();
        spec.spec.size = "1Ti".parse().unwrap();
        let err = replace("m1", &old, &spec, true).unwrap_err();
        assert!(err.contains("beyond the finalizer"), "{err}");
        let mut other = old.clone();
        other.metadata.finalizers.push("example.com/keep".into());
        assert!(replace("m1", &old, &other, true).is_err());
        let mut labels = old.clone();
        labels.metadata.labels.insert("tier".into(), "gold".into());
        assert!(replace("m1", &old, &labels, true).is_err());
        let mut moved = old.clone();
        moved.spec.machine = Some("m1-evil".into());
        assert!(replace("m1", &old, &moved, true).is_err());
    }

    #[test]
    fn a_machine_changes_only_its_own_machines_cobalt_labels_and_registers_only_itself() {
        let old = Machine::new(
            "m1",
            MachineSpec {
                address: "10.0.0.1".into(),
                ..Default::default()
            },
        );
        let mut backend = old.clone();
        backend
            .metadata
            .labels
            .insert("cobalt.io/backend".into(), "btrfs".into());
        assert_eq!(replace("m1", &old, &backend, false), Ok(()));
        assert!(replace("m2", &old, &backend, true).is_err(), "not its own");
        let mut disk = old.clone();
        disk.metadata.labels.insert("disk".into(), "ssd".into());
        let err = replace("m1", &old, &disk, true).unwrap_err();
        assert!(err.contains("the operator's"), "{err}");
        let mut uncordon = old.clone();
        uncordon.spec.unschedulable = true;
        assert!(replace("m1", &old, &uncordon, true).is_err());
        let mut held = old.clone();
        held.metadata.finalizers.push(AGENT_FINALIZER.into());
        assert!(
            replace("m1", &old, &held, true).is_err(),
            "no finalizer on its Machine"
        );

        assert_eq!(create("m1", &old), Ok(()));
        assert!(create("m2", &old).is_err());
        assert!(create("m1", &volume("m1", None)).is_err());
        assert!(create("m1", &Snapshot::new("s", "db")).is_err());
    }

    #[test]
    fn a_volumes_status_only_from_machines_it_concerns_and_credentials_only_from_its_target() {
        let v = volume("m2", Some("m1"));
        assert!(status("m3", &v, false).is_err());
        assert_eq!(status("m1", &v, true), Ok(()));

        // Moving m1 → m2: only m2, the target, sets the credential the source checks.
        let mut moving = v.clone();
        let mut st = moving.status.clone().unwrap();
        st.move_ = Some(Box::new(MoveStatus::granted(
            "m1",
            "m2",
            chrono::Utc::now(),
        )));
        moving.status = Some(st.clone());
        let mut with_credential = st.clone();
        with_credential.move_.as_mut().unwrap().credential_sha256 = Some("ab".into());
        assert_eq!(volume_status("m2", &moving, &with_credential), Ok(()));
        let err = volume_status("m1", &moving, &with_credential).unwrap_err();
        assert!(err.contains("only the move's target"), "{err}");
        // The source clears the finished move, credential and all.
        let mut with = moving.clone();
        with.status = Some(with_credential.clone());
        let mut cleared = with_credential.clone();
        cleared.move_ = None;
        assert_eq!(volume_status("m1", &with, &cleared), Ok(()));

        // status.machine may name only a machine the volume concerns.
        let mut elsewhere = st.clone();
        elsewhere.machine = Some("m9".into());
        assert!(volume_status("m1", &moving, &elsewhere).is_err());
        let mut cut_over = st;
        cut_over.machine = Some("m2".into());
        assert_eq!(volume_status("m2", &moving, &cut_over), Ok(()));
    }
}
