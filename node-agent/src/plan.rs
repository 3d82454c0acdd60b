//! The agent's decisions, as pure code: what to do for one Volume given what this machine holds
//! ([`plan`]), and what status to report afterwards ([`status`]). No etcd, no backend, no clock
//! beyond the timestamp passed in — every branch is a table test below. The reconciler
//! (`volumes.rs`) only executes the [`Step`]s and fills in the [`Report`].
//!
//! **Whose volume is it?** Two fields say: `spec.machine` is where it should be, `status.machine`
//! where its data is. From one machine's view ([`role`]):
//! - data here, or bound here and never provisioned anywhere → [`Role::Serving`];
//! - data here but bound elsewhere → [`Role::MoveRequested`]: this machine is the source of a
//!   move; it serves the data until the move's cut-over (see `moves`), then stops serving;
//! - bound here but the data is elsewhere → [`Role::AwaitingData`]: nothing is created here; once
//!   the scheduler grants the move, this machine pulls the data (`moves::target`);
//! - the data has moved from here to another machine (`status.move.from` is this machine, stage
//!   CleaningUp) → [`Role::MovedAway`]: the local copy is destroyed after a fresh read;
//! - otherwise → [`Role::NotHere`].
//!
//! **Safety invariant:** a volume that has been provisioned (`status.machine` set) is never
//! created empty — not on another machine, and not on its own machine when its data has gone
//! missing there (that is reported as `Failed`, reason `DataMissing`). The executor checks the
//! same with a fresh read before any step that creates data.

use chrono::{DateTime, Utc};
use cobalt_api::{
    set_condition, Capability, Compression, ConditionStatus, Endpoint, MoveStage, Usage, Volume,
    VolumePhase, VolumeStatus, AGENT_FINALIZER,
};

use crate::backend::VolumeRecord;

/// The annotation whose value, when it changes, asks for one defragmentation.
pub const DEFRAGMENT_ANNOTATION: &str = "cobalt.io/defragment";

/// What this machine is to a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    NotHere,
    Serving,
    /// The data is here; `spec.machine` names `to`.
    MoveRequested {
        to: String,
    },
    /// Bound here; the data is on `on`.
    AwaitingData {
        on: String,
    },
    /// The data moved from here to `to`; the local copy is left to destroy.
    MovedAway {
        to: String,
    },
}

pub fn role(v: &Volume, machine: &str) -> Role {
    let bound_here = v.spec.machine.as_deref() == Some(machine);
    let holder = v.status.as_ref().and_then(|s| s.machine.as_deref());
    if let (Some(m), Some(h)) = (v.moving(), holder) {
        if m.from == machine && h != machine && m.stage == MoveStage::CleaningUp {
            return Role::MovedAway { to: h.to_string() };
        }
    }
    match holder {
        Some(h) if h == machine && bound_here => Role::Serving,
        Some(h) if h == machine => Role::MoveRequested {
            to: v.spec.machine.as_deref().unwrap_or("(unbound)").to_string(),
        },
        Some(h) if bound_here => Role::AwaitingData { on: h.to_string() },
        Some(_) => Role::NotHere,
        None if bound_here => Role::Serving,
        None => Role::NotHere,
    }
}

/// True when a copy of `v`'s data on `machine` is **stale**: another machine holds the data
/// (`status.machine` names it, so that copy is the one clients were given), and the copy here
/// is no part of a move — not the source's copy of a finished move (the source's own
/// [`Step::CleanUpMovedAway`] destroys that), and not the target's copy promoted at a cut-over
/// (only from stage CuttingOver on).
///
/// Such copies are left by a crash between making data and publishing it: a volume created
/// here whose agent died before writing `status.machine`, then rebound elsewhere while this
/// machine was gone; a clone seeded or restored here likewise. Never published, they hold
/// nothing a client wrote — but a later move to this machine must not mistake one for its
/// promoted copy, so it is destroyed (after a fresh read) before a move's cut-over can begin.
/// A volume provisioned nowhere (`status.machine` empty) is never judged stale: an emptied
/// status must not read as "the data is elsewhere".
pub fn stale_here(v: &Volume, machine: &str) -> bool {
    let Some(holder) = v.status.as_ref().and_then(|s| s.machine.as_deref()) else {
        return false;
    };
    holder != machine
        && !v
            .moving()
            .is_some_and(|m| m.from == machine || (m.to == machine && m.stage.is_committed()))
}

/// What the machine knows of the volume, gathered by the executor before planning.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The volume's record on this machine's backend, if its data is here.
    pub on_disk: Option<VolumeRecord>,
    /// What this machine's backend can do.
    pub capabilities: Vec<Capability>,
    /// For a clone: the source volume's uid, when the source's data is on this machine.
    pub clone_source_uid: Option<String>,
    /// Snapshots this machine took to send the volume away (`move-*`).
    pub move_snapshots: Vec<String>,
    /// For a clone whose source's data is on another machine: that machine and the source's
    /// uid (the clone is seeded from a snapshot of it, streamed from there).
    pub clone_source_remote: Option<(String, String)>,
    /// For a restore: the snapshot's volume uid and backend name, when it is taken and on this
    /// machine.
    pub restore_source: Option<(String, String)>,
}

/// One thing the executor does, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    AddFinalizer,
    /// Creates empty data (after a fresh read confirms the binding).
    Create(VolumeRecord),
    /// Creates data as a copy of the source (after a fresh read confirms the binding).
    Clone {
        source_uid: String,
        record: VolumeRecord,
    },
    /// Creates data as a writable copy of snapshot `snapshot` of volume `volume_uid` (after a
    /// fresh read confirms the binding).
    Restore {
        volume_uid: String,
        snapshot: String,
        record: VolumeRecord,
    },
    /// Creates data as a copy of the source held by machine `from`, streamed from a snapshot of
    /// it (after a fresh read confirms the binding).
    SeedClone {
        from: String,
        record: VolumeRecord,
    },
    Resize {
        from_bytes: u64,
        to_bytes: u64,
    },
    SetCompression(Compression),
    Defragment {
        token: String,
    },
    Export,
    Unexport,
    /// Drops the snapshots of a move from here that is no longer under way (cancelled).
    DropMoveSnapshots(Vec<String>),
    /// Destroys the copy left here after a move (after a fresh read confirms the data is
    /// served by the target), then clears `status.move`.
    CleanUpMovedAway,
    /// Status phase Deleting before the data goes, so watchers see it.
    MarkDeleting,
    /// Destroys the data (after a fresh read confirms the deletion).
    Destroy,
    RemoveFinalizer,
    WriteStatus,
}

/// Why a volume cannot be served as declared: phase Failed, Ready=False with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The plan for one volume, and what the plan alone already knows about its status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub problem: Option<Problem>,
    /// Parts of the spec this machine's backend cannot serve (reported, not fatal).
    pub unsupported: Vec<String>,
    /// `spec.machine` asks for this machine; the data stays here until a move carries it over.
    pub move_requested: Option<String>,
    /// A clone whose source is not on this machine yet: the executor retries with backoff.
    pub waiting_for_source: Option<String>,
}

impl Plan {
    fn of(steps: Vec<Step>) -> Plan {
        Plan {
            steps,
            ..Plan::default()
        }
    }
}

/// The record the volume's data should carry: the granted size (never more than the scheduler
/// reserved) and the spec's compression.
pub fn record(v: &Volume) -> VolumeRecord {
    VolumeRecord {
        uid: v.metadata.uid.clone(),
        name: v.metadata.name.to_string(),
        size_bytes: v.granted_size_bytes(),
        compression: v.spec.compression,
    }
}

/// Decides what to do for `v` on `machine`.
pub fn plan(v: &Volume, machine: &str, seen: &Observed) -> Plan {
    let has_finalizer = v.metadata.finalizers.iter().any(|f| f == AGENT_FINALIZER);
    if let Role::MovedAway { .. } = role(v, machine) {
        // Also when deleted: the target destroys its copy, this machine its own.
        return Plan::of(vec![Step::Unexport, Step::CleanUpMovedAway]);
    }
    if v.metadata.is_deleting() {
        // The machine holding the data (or bound and never provisioned) destroys it.
        let holder = v
            .status
            .as_ref()
            .and_then(|s| s.machine.as_deref())
            .or(v.spec.machine.as_deref());
        if holder != Some(machine) || !has_finalizer {
            return Plan::default();
        }
        let mut steps = Vec::new();
        if v.status.as_ref().map(|s| s.phase) != Some(VolumePhase::Deleting) {
            steps.push(Step::MarkDeleting);
        }
        steps.extend([Step::Unexport, Step::Destroy]);
        // A finished move's source still has a copy to destroy: the Volume stays until it has.
        if v.moving().is_none_or(|m| m.from == machine) {
            steps.push(Step::RemoveFinalizer);
        }
        return Plan::of(steps);
    }
    let mut plan = match role(v, machine) {
        Role::NotHere | Role::AwaitingData { .. } | Role::MovedAway { .. } => {
            return Plan::default()
        }
        Role::MoveRequested { to } => Plan {
            move_requested: Some(to),
            ..Plan::default()
        },
        Role::Serving => Plan::default(),
    };
    if !has_finalizer && plan.move_requested.is_none() {
        plan.steps.push(Step::AddFinalizer);
    }
    let wanted = record(v);
    let provisioned_here = v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(machine);
    match &seen.on_disk {
        None if provisioned_here => {
            plan.steps = vec![Step::Unexport, Step::WriteStatus];
            plan.problem = Some(Problem {
                reason: "DataMissing",
                message: format!(
                    "the volume was provisioned on machine {machine}, but its data is not on the pool; it is not recreated empty — restore the data or delete the volume"
                ),
            });
            return plan;
        }
        None => match &v.spec.source {
            Some(source) if source.snapshot.is_some() => {
                let snapshot = source.snapshot.clone().unwrap_or_default();
                match &seen.restore_source {
                    _ if !seen.capabilities.contains(&Capability::Snapshot) => {
                        plan.steps.push(Step::WriteStatus);
                        plan.problem = Some(Problem {
                            reason: "RestoreUnsupported",
                            message: format!(
                                "machine {machine}'s backend cannot restore snapshots"
                            ),
                        });
                        return plan;
                    }
                    Some((volume_uid, name)) => plan.steps.push(Step::Restore {
                        volume_uid: volume_uid.clone(),
                        snapshot: name.clone(),
                        record: wanted.clone(),
                    }),
                    None => {
                        plan.steps.clear();
                        plan.waiting_for_source = Some(format!("snapshot {snapshot}"));
                        return plan;
                    }
                }
            }
            Some(source) => match (&seen.clone_source_uid, &seen.clone_source_remote) {
                (Some(uid), _) if seen.capabilities.contains(&Capability::Clone) => {
                    plan.steps.push(Step::Clone {
                        source_uid: uid.clone(),
                        record: wanted.clone(),
                    })
                }
                (None, Some((from, _))) if seen.capabilities.contains(&Capability::SendReceive) => {
                    plan.steps.push(Step::SeedClone {
                        from: from.clone(),
                        record: wanted.clone(),
                    })
                }
                (None, None) if seen.capabilities.contains(&Capability::Clone) => {
                    plan.steps.clear();
                    plan.waiting_for_source = Some(source.clone_of().unwrap_or_default().into());
                    return plan;
                }
                _ => {
                    plan.steps.push(Step::WriteStatus);
                    plan.problem = Some(Problem {
                        reason: "CloneUnsupported",
                        message: format!(
                            "machine {machine}'s backend cannot make a copy of {} where it is",
                            source.describe()
                        ),
                    });
                    return plan;
                }
            },
            None => plan.steps.push(Step::Create(wanted.clone())),
        },
        Some(current) => {
            if current.size_bytes != wanted.size_bytes {
                plan.steps.push(Step::Resize {
                    from_bytes: current.size_bytes,
                    to_bytes: wanted.size_bytes,
                });
            }
            if current.compression != wanted.compression
                && seen.capabilities.contains(&Capability::Compression)
            {
                plan.steps.push(Step::SetCompression(wanted.compression));
            }
        }
    }
    if !wanted.compression.is_none() && !seen.capabilities.contains(&Capability::Compression) {
        plan.unsupported.push(format!(
            "compression {:?}: this machine's backend does not compress, so data is stored uncompressed",
            wanted.compression
        ));
    }
    if let Some(token) = defragment_token(v) {
        if seen.capabilities.contains(&Capability::Defragment) {
            plan.steps.push(Step::Defragment { token });
        } else {
            plan.unsupported.push(
                "defragment: this machine's backend cannot defragment; the request is ignored"
                    .into(),
            );
        }
    }
    let committed = v
        .moving()
        .is_some_and(|m| m.from == machine && m.stage.is_committed());
    if committed {
        // The cut-over has begun: this machine must not take another write.
        plan.steps.extend([Step::Unexport, Step::WriteStatus]);
        return plan;
    }
    let moving_from_here = v.moving().is_some_and(|m| m.from == machine);
    if !seen.move_snapshots.is_empty() && !moving_from_here {
        plan.steps
            .push(Step::DropMoveSnapshots(seen.move_snapshots.clone()));
    }
    plan.steps.extend([Step::Export, Step::WriteStatus]);
    plan
}

/// The defragment token not yet done, if any.
fn defragment_token(v: &Volume) -> Option<String> {
    let token = v.metadata.annotations.get(DEFRAGMENT_ANNOTATION)?;
    let done = v.status.as_ref().and_then(|s| s.defragmented.as_ref());
    (done.map(String::as_str) != Some(token.as_str())).then(|| token.to_string())
}

/// How the volume is exported after the plan ran.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportState {
    Exported { endpoint: Endpoint, rules: String },
    NoExporter,
    NoClients,
    Unexported,
}

/// What executing the plan found, for the status.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub machine: String,
    pub plan: Plan,
    /// The hard limit in force after the steps.
    pub limit_bytes: u64,
    /// A shrink the backend refused (the data does not fit the smaller size).
    pub resize_blocked: Option<(&'static str, String)>,
    /// The defragment token that finished, if one ran.
    pub defragmented: Option<String>,
    pub export: ExportState,
    /// Claims whose host the applied export includes.
    pub claims: Vec<String>,
}

/// The status to write for `v` after the plan ran: starts from the current status, so fields
/// other actors own (the scheduler's Scheduled and CapacityReserved conditions, the allocation)
/// are kept.
pub fn status(v: &Volume, report: &Report, now: DateTime<Utc>) -> VolumeStatus {
    let generation = v.metadata.generation;
    let mut s = v.status.clone().unwrap_or_default();
    let set = |s: &mut VolumeStatus, type_: &str, ok: bool, reason: &str, message: &str| {
        let status = if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        set_condition(
            &mut s.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    };
    s.observed_generation = generation;
    s.clone_seed = None;
    if let Some(problem) = &report.plan.problem {
        s.phase = VolumePhase::Failed;
        s.endpoint = None;
        set(&mut s, "Ready", false, problem.reason, &problem.message);
        return s;
    }
    let machine = &report.machine;
    s.machine = Some(machine.clone().into());
    // Used bytes come from the periodic pool-wide refresh; a new volume starts at what was
    // last reported, or 0.
    let used_bytes = s.usage.as_ref().map_or(0, |u| u.used_bytes);
    s.usage = Some(Usage {
        used_bytes,
        limit_bytes: report.limit_bytes,
        updated: s.usage.as_ref().and_then(|u| u.updated),
    });
    if let Some(token) = &report.defragmented {
        s.defragmented = Some(token.clone());
    }
    set(
        &mut s,
        "Provisioned",
        true,
        "Created",
        &format!("on machine {machine}"),
    );
    s.endpoint = None;
    s.claims = match &report.export {
        ExportState::Exported { .. } => report.claims.clone(),
        _ => Vec::new(),
    };
    match &report.export {
        ExportState::Exported { endpoint, rules } => {
            s.endpoint = Some(endpoint.clone());
            set(&mut s, "Exported", true, "Applied", rules);
        }
        ExportState::NoExporter => set(
            &mut s,
            "Exported",
            false,
            "NoExporter",
            "this machine's agent runs without an NFS exporter",
        ),
        ExportState::NoClients => set(
            &mut s,
            "Exported",
            false,
            "NoClients",
            "no clients are listed in spec.export, so it is exported to nobody",
        ),
        ExportState::Unexported => set(&mut s, "Exported", false, "Unexported", "not exported"),
    }
    match &report.resize_blocked {
        Some((reason, message)) => set(&mut s, "ResizeBlocked", true, reason, message),
        None => s.conditions.retain(|c| c.type_ != "ResizeBlocked"),
    }
    if report.plan.unsupported.is_empty() {
        s.conditions.retain(|c| c.type_ != "Unsupported");
    } else {
        let message = report.plan.unsupported.join("; ");
        set(&mut s, "Unsupported", true, "BackendCapability", &message);
    }
    let ready = match v.moving() {
        Some(m) => {
            let (reason, message) = m.describe();
            set(&mut s, "Moving", true, reason, &message);
            if m.stage < MoveStage::CleaningUp {
                s.phase = VolumePhase::Moving;
            } else {
                s.phase = VolumePhase::Ready;
            }
            !m.stage.is_committed() || m.stage == MoveStage::CleaningUp
        }
        None => {
            // While no move is granted, the scheduler's Moving condition says why.
            if report.plan.move_requested.is_none() {
                s.conditions.retain(|c| c.type_ != "Moving");
            }
            s.phase = VolumePhase::Ready;
            true
        }
    };
    if ready {
        set(&mut s, "Ready", true, "Provisioned", "the volume is ready");
    } else {
        set(
            &mut s,
            "Ready",
            false,
            "CuttingOver",
            "the volume is cutting over to its new machine; it is served again there in a moment",
        );
    }
    s
}

/// The status of a volume whose data is being destroyed.
pub fn deleting_status(v: &Volume, now: DateTime<Utc>) -> VolumeStatus {
    let mut s = v.status.clone().unwrap_or_default();
    s.phase = VolumePhase::Deleting;
    s.endpoint = None;
    set_condition(
        &mut s.conditions,
        "Ready",
        ConditionStatus::False,
        "Deleting",
        "the volume is being deleted: unexported, its data is being destroyed",
        v.metadata.generation,
        now,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use cobalt_api::{find_condition, VolumeSource, VolumeSpec};

    const MIB: u64 = 1 << 20;
    const ALL: [Capability; 5] = [
        Capability::Compression,
        Capability::Clone,
        Capability::Defragment,
        Capability::Snapshot,
        Capability::SendReceive,
    ];

    fn volume() -> Volume {
        let mut v = Volume::new(
            "media",
            VolumeSpec {
                size: "64Mi".parse().unwrap(),
                machine: Some("m1".into()),
                ..Default::default()
            },
        );
        v.metadata.uid = "uid-1".into();
        v.metadata.generation = 3;
        v.metadata.finalizers = vec![AGENT_FINALIZER.into()];
        v
    }

    fn provisioned_on(mut v: Volume, machine: &str) -> Volume {
        v.status = Some(VolumeStatus {
            machine: Some(machine.into()),
            allocated_bytes: Some(64 * MIB),
            phase: VolumePhase::Ready,
            ..Default::default()
        });
        v
    }

    fn seen(on_disk: Option<VolumeRecord>) -> Observed {
        Observed {
            on_disk,
            capabilities: ALL.to_vec(),
            clone_source_uid: None,
            move_snapshots: vec![],
            clone_source_remote: None,
            restore_source: None,
        }
    }

    fn on_disk(v: &Volume) -> Option<VolumeRecord> {
        Some(VolumeRecord {
            size_bytes: 64 * MIB,
            compression: Compression::None,
            ..record(v)
        })
    }

    #[test]
    fn roles_follow_the_binding_and_where_the_data_is() {
        let v = volume();
        assert_eq!(role(&v, "m1"), Role::Serving);
        assert_eq!(role(&v, "m2"), Role::NotHere);
        let mut moved = provisioned_on(v, "m1");
        moved.spec.machine = Some("m2".into());
        assert_eq!(role(&moved, "m1"), Role::MoveRequested { to: "m2".into() });
        assert_eq!(role(&moved, "m2"), Role::AwaitingData { on: "m1".into() });
        assert_eq!(role(&moved, "m3"), Role::NotHere);
    }

    #[test]
    fn a_new_bound_volume_is_created_exported_and_reported() {
        let v = volume();
        let p = plan(&v, "m1", &seen(None));
        assert_eq!(
            p.steps,
            [Step::Create(record(&v)), Step::Export, Step::WriteStatus]
        );
        assert_eq!(p.problem, None);
    }

    #[test]
    fn a_missing_finalizer_is_added_first() {
        let mut v = volume();
        v.metadata.finalizers.clear();
        assert_eq!(plan(&v, "m1", &seen(None)).steps[0], Step::AddFinalizer);
    }

    #[test]
    fn an_unchanged_volume_is_only_exported_and_reported() {
        let v = provisioned_on(volume(), "m1");
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps,
            [Step::Export, Step::WriteStatus]
        );
    }

    #[test]
    fn a_granted_grow_resizes_and_an_ungranted_one_does_not() {
        let mut v = provisioned_on(volume(), "m1");
        v.spec.size = "128Mi".parse().unwrap();
        // Not granted yet: the allocation is still 64Mi.
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps,
            [Step::Export, Step::WriteStatus]
        );
        v.status.as_mut().unwrap().allocated_bytes = Some(128 * MIB);
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps[0],
            Step::Resize {
                from_bytes: 64 * MIB,
                to_bytes: 128 * MIB
            }
        );
    }

    #[test]
    fn a_shrink_needs_no_grant() {
        let mut v = provisioned_on(volume(), "m1");
        v.spec.size = "32Mi".parse().unwrap();
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps[0],
            Step::Resize {
                from_bytes: 64 * MIB,
                to_bytes: 32 * MIB
            }
        );
    }

    #[test]
    fn a_compression_change_is_applied_where_the_backend_compresses_and_reported_where_not() {
        let mut v = provisioned_on(volume(), "m1");
        v.spec.compression = Compression::Zstd;
        let p = plan(&v, "m1", &seen(on_disk(&v)));
        assert_eq!(p.steps[0], Step::SetCompression(Compression::Zstd));
        assert!(p.unsupported.is_empty());
        let plain = Observed {
            capabilities: vec![],
            ..seen(on_disk(&v))
        };
        let p = plan(&v, "m1", &plain);
        assert_eq!(p.steps, [Step::Export, Step::WriteStatus]);
        assert_eq!(p.unsupported.len(), 1, "{p:?}");
    }

    #[test]
    fn a_new_defragment_token_defragments_once() {
        let mut v = provisioned_on(volume(), "m1");
        v.metadata
            .annotations
            .insert(DEFRAGMENT_ANNOTATION.into(), "t1".into());
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps[0],
            Step::Defragment { token: "t1".into() }
        );
        v.status.as_mut().unwrap().defragmented = Some("t1".into());
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps,
            [Step::Export, Step::WriteStatus]
        );
    }

    #[test]
    fn a_restore_is_made_from_the_local_snapshot_or_waits_for_it() {
        let mut v = volume();
        v.spec.source = Some(Box::new(VolumeSource::snapshot("db-1")));
        let p = plan(&v, "m1", &seen(None));
        assert!(
            p.steps.is_empty(),
            "the snapshot is not here (yet): nothing is created"
        );
        assert_eq!(p.waiting_for_source.as_deref(), Some("snapshot db-1"));
        let mut here = seen(None);
        here.restore_source = Some(("db-uid".into(), "snap-uid".into()));
        let p = plan(&v, "m1", &here);
        assert!(p.steps.contains(&Step::Restore {
            volume_uid: "db-uid".into(),
            snapshot: "snap-uid".into(),
            record: record(&v),
        }));
        // Provisioned already: never restored again over the data.
        let p = plan(&v, "m1", &seen(on_disk(&v)));
        assert!(!p.steps.iter().any(|s| matches!(s, Step::Restore { .. })));
        here.capabilities.retain(|c| *c != Capability::Snapshot);
        let p = plan(&v, "m1", &here);
        assert_eq!(p.problem.unwrap().reason, "RestoreUnsupported");
    }

    #[test]
    fn a_clone_is_made_from_the_local_source_seeded_from_a_remote_one_or_waits() {
        let mut v = volume();
        v.spec.source = Some(Box::new(VolumeSource::volume("base")));
        let p = plan(&v, "m1", &seen(None));
        assert!(p.steps.is_empty(), "no source here yet: nothing is created");
        assert_eq!(p.waiting_for_source.as_deref(), Some("base"));
        let with_source = Observed {
            clone_source_uid: Some("uid-base".into()),
            ..seen(None)
        };
        assert_eq!(
            plan(&v, "m1", &with_source).steps[0],
            Step::Clone {
                source_uid: "uid-base".into(),
                record: record(&v)
            }
        );
        // The source is on another machine: seeded from there where this backend can receive.
        let remote = Observed {
            clone_source_remote: Some(("m2".into(), "uid-base".into())),
            ..seen(None)
        };
        assert_eq!(
            plan(&v, "m1", &remote).steps[0],
            Step::SeedClone {
                from: "m2".into(),
                record: record(&v)
            }
        );
        let cannot_receive = Observed {
            capabilities: vec![Capability::Clone],
            ..remote
        };
        assert_eq!(
            plan(&v, "m1", &cannot_receive).problem.unwrap().reason,
            "CloneUnsupported"
        );
        let no_clones = Observed {
            capabilities: vec![],
            ..with_source
        };
        let p = plan(&v, "m1", &no_clones);
        assert_eq!(p.steps, [Step::WriteStatus]);
        assert_eq!(p.problem.unwrap().reason, "CloneUnsupported");
    }

    #[test]
    fn a_volume_bound_elsewhere_stays_where_its_data_is_and_is_never_created_empty() {
        let mut v = provisioned_on(volume(), "m1");
        v.spec.machine = Some("m2".into());
        // The target has no data and must not make any (it pulls once the move is granted).
        assert_eq!(plan(&v, "m2", &seen(None)), Plan::default());
        // The source keeps serving; while no move is granted the scheduler's condition stays.
        set_condition(
            &mut v.status.as_mut().unwrap().conditions,
            "Moving",
            ConditionStatus::False,
            "InsufficientCapacity",
            "machine m2 lacks room",
            3,
            Utc::now(),
        );
        let p = plan(&v, "m1", &seen(on_disk(&v)));
        assert_eq!(p.steps, [Step::Export, Step::WriteStatus]);
        assert_eq!(p.move_requested.as_deref(), Some("m2"));
        let s = status(&v, &report(&v, p), Utc::now());
        assert_eq!(s.phase, VolumePhase::Ready);
        assert_eq!(s.machine.as_deref(), Some("m1"));
        let moving = find_condition(&s.conditions, "Moving").unwrap();
        assert_eq!(moving.reason, "InsufficientCapacity");
    }

    fn moving(mut v: Volume, stage: MoveStage) -> Volume {
        v.spec.machine = Some("m2".into());
        v.status.as_mut().unwrap().move_ = Some(Box::new(cobalt_api::MoveStatus {
            stage,
            rounds: 1,
            ..cobalt_api::MoveStatus::granted("m1", "m2", Utc::now())
        }));
        v
    }

    #[test]
    fn the_source_serves_until_the_cut_over_and_never_after() {
        let v = moving(provisioned_on(volume(), "m1"), MoveStage::Converging);
        let p = plan(&v, "m1", &seen(on_disk(&v)));
        assert_eq!(p.steps, [Step::Export, Step::WriteStatus]);
        let s = status(&v, &report(&v, p), Utc::now());
        assert_eq!(s.phase, VolumePhase::Moving);
        assert!(find_condition(&s.conditions, "Ready").unwrap().is_true());
        assert_eq!(
            find_condition(&s.conditions, "Moving").unwrap().reason,
            "Converging"
        );
        let v = moving(provisioned_on(volume(), "m1"), MoveStage::CuttingOver);
        let p = plan(&v, "m1", &seen(on_disk(&v)));
        assert_eq!(p.steps, [Step::Unexport, Step::WriteStatus]);
        let mut r = report(&v, p);
        r.export = ExportState::Unexported;
        let s = status(&v, &r, Utc::now());
        assert_eq!(s.phase, VolumePhase::Moving);
        assert_eq!(s.endpoint, None);
        let ready = find_condition(&s.conditions, "Ready").unwrap();
        assert_eq!((ready.is_true(), &*ready.reason), (false, "CuttingOver"));
        // Snapshots of an ongoing move are kept; those of a cancelled one go.
        let mut with_snaps = seen(on_disk(&v));
        with_snaps.move_snapshots = vec!["move-1".into()];
        let v = moving(provisioned_on(volume(), "m1"), MoveStage::Seeding);
        assert!(!plan(&v, "m1", &with_snaps)
            .steps
            .iter()
            .any(|s| matches!(s, Step::DropMoveSnapshots(_))));
        let v = provisioned_on(volume(), "m1");
        assert_eq!(
            plan(&v, "m1", &with_snaps).steps[0],
            Step::DropMoveSnapshots(vec!["move-1".into()])
        );
    }

    #[test]
    fn after_the_flip_the_target_serves_and_the_source_cleans_up_even_when_deleted() {
        let mut v = moving(provisioned_on(volume(), "m1"), MoveStage::CleaningUp);
        v.status.as_mut().unwrap().machine = Some("m2".into());
        assert_eq!(role(&v, "m1"), Role::MovedAway { to: "m2".into() });
        assert_eq!(role(&v, "m2"), Role::Serving);
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps,
            [Step::Unexport, Step::CleanUpMovedAway]
        );
        let p = plan(&v, "m2", &seen(on_disk(&v)));
        assert_eq!(p.steps, [Step::Export, Step::WriteStatus]);
        let s = status(&v, &report(&v, p), Utc::now());
        assert_eq!(s.phase, VolumePhase::Ready);
        assert_eq!(
            find_condition(&s.conditions, "Moving").unwrap().reason,
            "CleaningUp"
        );
        // Deleted before the source cleaned up: the source still destroys its copy, and the
        // target keeps the finalizer until it has.
        v.metadata.deletion_timestamp = Some(Utc::now());
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps,
            [Step::Unexport, Step::CleanUpMovedAway]
        );
        assert_eq!(
            plan(&v, "m2", &seen(on_disk(&v))).steps,
            [Step::MarkDeleting, Step::Unexport, Step::Destroy]
        );
        v.status.as_mut().unwrap().move_ = None;
        assert_eq!(
            plan(&v, "m2", &seen(on_disk(&v))).steps.last(),
            Some(&Step::RemoveFinalizer)
        );
    }

    #[test]
    fn a_copy_is_stale_only_where_the_data_is_published_elsewhere_and_no_move_needs_it() {
        // Provisioned nowhere: nothing is elsewhere, whatever is here is not judged.
        assert!(!stale_here(&volume(), "m2"));
        let mut empty_status = provisioned_on(volume(), "m1");
        empty_status.status.as_mut().unwrap().machine = None;
        assert!(!stale_here(&empty_status, "m2"));
        // Served by m1: a copy on m1 is the data; on m2 or m3 it is stale.
        let v = provisioned_on(volume(), "m1");
        assert!(!stale_here(&v, "m1"));
        assert!(stale_here(&v, "m2"));
        assert!(stale_here(&v, "m3"));
        // Bound to m2, no move granted yet: a copy already on m2 is stale too (the move would
        // otherwise flip to it).
        let mut bound = v.clone();
        bound.spec.machine = Some("m2".into());
        assert!(stale_here(&bound, "m2"));
        // A move m1 → m2 before its cut-over: nothing on m2 may be live yet.
        for stage in [MoveStage::Seeding, MoveStage::Converging] {
            let m = moving(provisioned_on(volume(), "m1"), stage);
            assert!(stale_here(&m, "m2"), "{stage:?}");
            assert!(stale_here(&m, "m3"), "{stage:?}");
            assert!(!stale_here(&m, "m1"), "{stage:?}");
        }
        // From the cut-over on, m2's live copy is the promoted one.
        let m = moving(provisioned_on(volume(), "m1"), MoveStage::CuttingOver);
        assert!(!stale_here(&m, "m2"));
        // After the flip, m1's copy is the source's to clean up, not a stale copy.
        let mut flipped = moving(provisioned_on(volume(), "m1"), MoveStage::CleaningUp);
        flipped.status.as_mut().unwrap().machine = Some("m2".into());
        assert!(!stale_here(&flipped, "m1"));
        assert!(!stale_here(&flipped, "m2"));
        assert!(stale_here(&flipped, "m3"));
    }

    #[test]
    fn provisioned_data_gone_from_its_own_machine_is_failed_not_recreated() {
        let v = provisioned_on(volume(), "m1");
        let p = plan(&v, "m1", &seen(None));
        assert_eq!(p.steps, [Step::Unexport, Step::WriteStatus]);
        let s = status(&v, &report(&v, p), Utc::now());
        assert_eq!(s.phase, VolumePhase::Failed);
        assert_eq!(
            find_condition(&s.conditions, "Ready").unwrap().reason,
            "DataMissing"
        );
        assert_eq!(s.endpoint, None);
    }

    #[test]
    fn a_deleted_volume_is_destroyed_by_the_machine_holding_its_data() {
        let mut v = provisioned_on(volume(), "m1");
        v.metadata.deletion_timestamp = Some(Utc::now());
        assert_eq!(
            plan(&v, "m1", &seen(on_disk(&v))).steps,
            [
                Step::MarkDeleting,
                Step::Unexport,
                Step::Destroy,
                Step::RemoveFinalizer
            ]
        );
        v.status.as_mut().unwrap().phase = VolumePhase::Deleting;
        assert_eq!(plan(&v, "m1", &seen(on_disk(&v))).steps[0], Step::Unexport);
        // Bound elsewhere but the data is on m1: m1 destroys it, the other does nothing.
        v.spec.machine = Some("m2".into());
        assert_eq!(plan(&v, "m1", &seen(on_disk(&v))).steps.len(), 3);
        assert_eq!(plan(&v, "m2", &seen(None)), Plan::default());
        // Without the finalizer there is nothing left to do.
        v.metadata.finalizers.clear();
        assert_eq!(plan(&v, "m1", &seen(on_disk(&v))), Plan::default());
    }

    fn report(v: &Volume, plan: Plan) -> Report {
        Report {
            claims: Vec::new(),
            machine: v
                .status
                .as_ref()
                .and_then(|s| s.machine.as_deref())
                .unwrap_or("m1")
                .to_string(),
            plan,
            limit_bytes: 64 * MIB,
            resize_blocked: None,
            defragmented: None,
            export: ExportState::NoClients,
        }
    }

    #[test]
    fn status_reports_ready_with_the_limit_in_force_and_keeps_other_actors_fields() {
        let mut v = provisioned_on(volume(), "m1");
        set_condition(
            &mut v.status.as_mut().unwrap().conditions,
            "Scheduled",
            ConditionStatus::True,
            "Bound",
            "bound to machine m1",
            1,
            Utc::now(),
        );
        let mut r = report(&v, plan(&v, "m1", &seen(on_disk(&v))));
        r.resize_blocked = Some(("InUse", "cannot shrink".into()));
        r.export = ExportState::Exported {
            endpoint: Endpoint {
                server: "10.0.0.1".into(),
                port: 2049,
                path: "/media".into(),
                mount: "mount".into(),
            },
            rules: "10.0.0.0/24 rw".into(),
        };
        let s = status(&v, &r, Utc::now());
        assert_eq!(s.phase, VolumePhase::Ready);
        assert_eq!(s.observed_generation, 3);
        assert_eq!(s.usage.as_ref().unwrap().limit_bytes, 64 * MIB);
        assert_eq!(s.allocated_bytes, Some(64 * MIB));
        assert!(s.endpoint.is_some());
        for (t, ok) in [
            ("Scheduled", true),
            ("Provisioned", true),
            ("Exported", true),
            ("ResizeBlocked", true),
            ("Ready", true),
        ] {
            let c = find_condition(&s.conditions, t).unwrap_or_else(|| panic!("{t}"));
            assert_eq!(c.is_true(), ok, "{t}");
        }
        // Resolved conditions go away.
        let mut v2 = v.clone();
        v2.status = Some(s);
        let s2 = status(
            &v2,
            &report(&v2, plan(&v2, "m1", &seen(on_disk(&v2)))),
            Utc::now(),
        );
        assert!(find_condition(&s2.conditions, "ResizeBlocked").is_none());
        assert_eq!(s2.endpoint, None, "exported to nobody now");
    }

    #[test]
    fn deleting_status_unexports_and_says_so() {
        let v = provisioned_on(volume(), "m1");
        let s = deleting_status(&v, Utc::now());
        assert_eq!(s.phase, VolumePhase::Deleting);
        assert_eq!(
            find_condition(&s.conditions, "Ready").unwrap().reason,
            "Deleting"
        );
    }
}
