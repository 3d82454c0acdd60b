//! Move admission as a pure function: given a provisioned volume whose `spec.machine` differs
//! from where its data is (`status.machine`), and the machines as placement sees them, decide
//! whether the move may start (the **grant**: room reserved on the target, `status.move`
//! written), must wait (a `Moving=False` condition says why; the volume stays Ready where it
//! is), or must be dropped because the user changed `spec.machine` again before the cut-over.
//!
//! The grant is the only thing that reserves bytes on the target: until then the ledger counts
//! the volume only where its data is, so an edit naming a full machine overcommits nothing. The
//! agents carry the granted move out (node-agent `moves`); the scheduler never touches data.

use chrono::{DateTime, Utc};
use cobalt_api::{Capability, MoveStatus, Volume};

use super::placement::MachineView;

/// What the scheduler does about a volume's requested move.
#[derive(Clone, Debug, PartialEq)]
pub enum MoveDecision {
    /// No move is asked for, or the granted one is under way.
    Nothing,
    /// Reserve room on the target and start the move.
    Grant(MoveStatus),
    /// The move cannot start yet; the volume stays where it is.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// `spec.machine` no longer names the granted target and the move is not committed yet:
    /// drop it (the target discards its partial copy; the source keeps serving).
    Revoke,
}

/// The capabilities both ends of a move need.
pub use super::placement::STREAM_NEEDS as MOVE_NEEDS;

/// Decides about `v`'s move. `machines` counts reservations by `Volume::ledger_machines`, so
/// the target's reservable bytes do not include `v` until it is granted.
pub fn admit(v: &Volume, machines: &[MachineView], now: DateTime<Utc>) -> MoveDecision {
    let Some(status) = v.status.as_ref() else {
        return MoveDecision::Nothing;
    };
    let (Some(holder), Some(target)) = (status.machine.as_deref(), v.spec.machine.as_deref())
    else {
        return MoveDecision::Nothing;
    };
    if let Some(m) = &status.move_ {
        return if m.stage.is_committed() || m.to == target {
            MoveDecision::Nothing
        } else {
            MoveDecision::Revoke
        };
    }
    if holder == target || v.metadata.is_deleting() {
        return MoveDecision::Nothing;
    }
    let wait = |reason, message| MoveDecision::Wait { reason, message };
    let snapshots = v.snapshot_names();
    if !snapshots.is_empty() {
        return wait(
            "HasSnapshots",
            format!(
                "the volume has {} snapshot{} on machine {holder} ({}), and moves do not carry snapshots; delete them to move it, or set spec.machine back to {holder}",
                snapshots.len(),
                if snapshots.len() == 1 { "" } else { "s" },
                snapshots.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    let find = |name: &str| machines.iter().find(|m| m.name == name);
    let Some(to) = find(target) else {
        return wait(
            "TargetUnknown",
            format!("spec.machine names machine {target}, which is not registered; the volume stays on machine {holder}"),
        );
    };
    let Some(from) = find(holder) else {
        return wait(
            "SourceNotReady",
            format!("machine {holder}, which holds the data, is not registered; the volume cannot move until it is back"),
        );
    };
    if !from.ready {
        return wait(
            "SourceNotReady",
            format!("machine {holder}, which holds the data, is not ready; the volume cannot move until it returns"),
        );
    }
    if !to.ready {
        return wait(
            "TargetNotReady",
            format!("machine {target} is not ready; the volume stays on machine {holder} and moves when it is"),
        );
    }
    for (end, m) in [("source", from), ("target", to)] {
        if let Some(c) = MOVE_NEEDS.iter().find(|c| !m.capabilities.contains(c)) {
            return wait(
                "MoveUnsupported",
                format!("the {end} machine {}'s backend lacks the {c} capability that moves need; the volume stays on machine {holder}", m.name),
            );
        }
    }
    // A provisioned clone is independent of its source: the target needs only what the data
    // itself needs (compression).
    let needs: Vec<Capability> = v
        .spec
        .required_capabilities()
        .into_iter()
        .filter(|c| *c != Capability::Clone)
        .collect();
    if let Some(c) = needs.iter().find(|c| !to.capabilities.contains(c)) {
        return wait(
            "TargetLacksCapability",
            format!("machine {target}'s backend lacks the {c} capability this volume needs; it stays on machine {holder}"),
        );
    }
    let need = v.ledger_bytes();
    let free = to.reservable_bytes();
    if need > free {
        return wait(
            "InsufficientCapacity",
            format!(
                "machine {target} has {free} bytes reservable and the volume needs {need} ({} missing); it stays on machine {holder} and moves when room appears, or set spec.machine back to {holder}",
                need - free
            ),
        );
    }
    MoveDecision::Grant(MoveStatus::granted(holder, target, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::MoveStage;
    use cobalt_api::{Compression, VolumeSpec, VolumeStatus};

    const MIB: u64 = 1 << 20;

    fn machine(name: &str, reserved_mib: u64) -> MachineView {
        MachineView {
            name: name.into(),
            labels: Default::default(),
            ready: true,
            unschedulable: false,
            total_bytes: 1000 * MIB,
            max_fill_percent: 100,
            reserved_bytes: reserved_mib * MIB,
            capabilities: vec![
                Capability::Snapshot,
                Capability::SendReceive,
                Capability::Compression,
            ],
        }
    }

    fn on_m1_bound_to(target: &str) -> Volume {
        let mut v = Volume::new(
            "v",
            VolumeSpec {
                size: "100Mi".parse().unwrap(),
                machine: Some(target.into()),
                ..Default::default()
            },
        );
        v.status = Some(VolumeStatus {
            machine: Some("m1".into()),
            allocated_bytes: Some(100 * MIB),
            ..Default::default()
        });
        v
    }

    fn granted(v: &mut Volume, to: &str, stage: MoveStage) {
        let MoveDecision::Grant(mut m) = admit(
            &on_m1_bound_to(to),
            &[machine("m1", 0), machine(to, 0)],
            Utc::now(),
        ) else {
            panic!("not granted");
        };
        m.stage = stage;
        v.status.as_mut().unwrap().move_ = Some(Box::new(m));
    }

    #[test]
    fn a_move_that_fits_is_granted_from_the_holder_to_the_binding() {
        let v = on_m1_bound_to("m2");
        match admit(&v, &[machine("m1", 100), machine("m2", 0)], Utc::now()) {
            MoveDecision::Grant(m) => {
                assert_eq!((m.from.as_str(), m.to.as_str()), ("m1", "m2"));
                assert_eq!(m.stage, MoveStage::Seeding);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_volume_with_snapshots_waits_and_names_them() {
        let mut v = on_m1_bound_to("m2");
        v.status.as_mut().unwrap().snapshots = vec!["nightly".into()];
        let d = admit(&v, &[machine("m1", 100), machine("m2", 0)], Utc::now());
        let MoveDecision::Wait { reason, message } = d else {
            panic!("{d:?}")
        };
        assert_eq!(reason, "HasSnapshots");
        assert!(message.contains("nightly"), "{message}");
    }

    #[test]
    fn a_move_that_does_not_fit_waits_and_names_the_bytes_missing() {
        let v = on_m1_bound_to("m2");
        let d = admit(&v, &[machine("m1", 100), machine("m2", 950)], Utc::now());
        let MoveDecision::Wait { reason, message } = d else {
            panic!("{d:?}")
        };
        assert_eq!(reason, "InsufficientCapacity");
        assert!(
            message.contains("m2") && message.contains(&(50 * MIB).to_string()),
            "{message}"
        );
    }

    #[test]
    fn a_lost_source_or_an_unready_target_waits() {
        let v = on_m1_bound_to("m2");
        let mut m1 = machine("m1", 100);
        m1.ready = false;
        let d = admit(&v, &[m1, machine("m2", 0)], Utc::now());
        assert!(
            matches!(
                d,
                MoveDecision::Wait {
                    reason: "SourceNotReady",
                    ..
                }
            ),
            "{d:?}"
        );
        let mut m2 = machine("m2", 0);
        m2.ready = false;
        let d = admit(&v, &[machine("m1", 100), m2], Utc::now());
        assert!(
            matches!(
                d,
                MoveDecision::Wait {
                    reason: "TargetNotReady",
                    ..
                }
            ),
            "{d:?}"
        );
        let d = admit(&v, &[machine("m1", 100)], Utc::now());
        assert!(
            matches!(
                d,
                MoveDecision::Wait {
                    reason: "TargetUnknown",
                    ..
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn both_ends_need_snapshots_and_streams_and_the_target_what_the_data_needs() {
        let mut v = on_m1_bound_to("m2");
        let mut plain = machine("m2", 0);
        plain.capabilities = vec![Capability::Snapshot, Capability::SendReceive];
        v.spec.compression = Compression::Zstd;
        let d = admit(&v, &[machine("m1", 100), plain.clone()], Utc::now());
        assert!(
            matches!(
                d,
                MoveDecision::Wait {
                    reason: "TargetLacksCapability",
                    ..
                }
            ),
            "{d:?}"
        );
        plain.capabilities.clear();
        let d = admit(&v, &[machine("m1", 100), plain], Utc::now());
        assert!(
            matches!(
                d,
                MoveDecision::Wait {
                    reason: "MoveUnsupported",
                    ..
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn changing_the_binding_before_the_cut_over_revokes_and_after_it_does_not() {
        let machines = [machine("m1", 100), machine("m2", 100)];
        let mut v = on_m1_bound_to("m2");
        granted(&mut v, "m2", MoveStage::Converging);
        assert_eq!(
            admit(&v, &machines, Utc::now()),
            MoveDecision::Nothing,
            "under way"
        );
        v.spec.machine = Some("m1".into());
        assert_eq!(
            admit(&v, &machines, Utc::now()),
            MoveDecision::Revoke,
            "cancelled"
        );
        v.spec.machine = Some("m3".into());
        assert_eq!(
            admit(&v, &machines, Utc::now()),
            MoveDecision::Revoke,
            "redirected"
        );
        granted(&mut v, "m2", MoveStage::CuttingOver);
        v.spec.machine = Some("m1".into());
        assert_eq!(
            admit(&v, &machines, Utc::now()),
            MoveDecision::Nothing,
            "committed: it finishes, then moves back"
        );
    }

    #[test]
    fn a_volume_where_it_belongs_or_never_provisioned_needs_nothing() {
        let v = on_m1_bound_to("m1");
        assert_eq!(
            admit(&v, &[machine("m1", 100)], Utc::now()),
            MoveDecision::Nothing
        );
        let mut fresh = on_m1_bound_to("m2");
        fresh.status = None;
        assert_eq!(
            admit(&fresh, &[machine("m2", 0)], Utc::now()),
            MoveDecision::Nothing
        );
    }
}
