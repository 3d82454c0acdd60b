//! The leader's balancer: on every change of the caches (and every 5 s), the
//! [`rebalance`](super::rebalance) planner over them, and its proposals applied the only way moves are ever asked for — by changing
//! `spec.machine` (annotated `cobalt.io/moved-by` and `cobalt.io/moved-at`). The scheduler then
//! grants each move and the agents carry it out, so a leader that dies mid-drain leaves nothing
//! half-done: the next leader plans again from etcd and sees the moves already asked for.
//!
//! A grow its machine cannot grant (`CapacityReserved=False`) moves an unpinned volume to a
//! machine where the grown size fits; the scheduler grants the grow there after the move.
//!
//! It also writes each draining machine's `Drained` condition ("3 volumes left, 1 moving; 1
//! blocked: …"; True once the machine holds nothing).

use std::time::Duration;

use chrono::Utc;
use cobalt_api::{set_condition, Capability, ConditionStatus, Machine, Volume};
use cobalt_reconcile::{Cache, CancellationToken};
use cobalt_store::Store;

use super::binding::{machine_views, Alive, SCHEDULED_BY};
use super::rebalance::{plan, DrainView, Policy, Proposal, VolumeView};

/// Who asked for a volume's last move (`drain` or `rebalance`).
pub const MOVED_BY: &str = "cobalt.io/moved-by";
/// When the balancer last moved the volume (RFC 3339), for the cooldown.
pub const MOVED_AT: &str = "cobalt.io/moved-at";
/// How often the balancer plans when nothing changes.
pub const EVERY: Duration = Duration::from_secs(5);
/// The pause after a change before planning, so a burst of changes is one pass.
const SETTLE: Duration = Duration::from_millis(50);
/// How long a pass waits for the cache to show its own writes.
const OWN_WRITE_WAIT: Duration = Duration::from_secs(10);

pub struct Balancer {
    /// Writes go through the leadership-fenced store.
    pub store: Store,
    pub volumes: Cache<Volume>,
    pub machines: Cache<Machine>,
    pub alive: Alive,
    pub policy: Policy,
}

/// What the planner sees of a provisioned volume.
pub fn volume_view(v: &Volume, policy: &Policy) -> Option<VolumeView> {
    let s = v.status.as_ref()?;
    let holder = s.machine.clone()?;
    if v.metadata.is_deleting() {
        return None;
    }
    let target = v
        .spec
        .machine
        .as_deref()
        .filter(|t| *t != holder)
        .map(str::to_string);
    let cooling = v
        .metadata
        .annotations
        .get(MOVED_AT)
        .and_then(|t| t.parse::<chrono::DateTime<Utc>>().ok())
        .is_some_and(|t| (Utc::now() - t).num_seconds() < policy.cooldown_seconds as i64);
    Some(VolumeView {
        name: v.metadata.name.to_string(),
        granted: s
            .move_
            .as_ref()
            .is_some_and(|m| Some(&m.to) == target.as_ref()),
        target,
        holder: holder.to_string(),
        bytes: v.ledger_bytes(),
        pinned: !v.metadata.annotations.contains_key(SCHEDULED_BY),
        selector: v
            .spec
            .placement
            .as_ref()
            .map(|p| p.selector.clone())
            .unwrap_or_default(),
        needs: v
            .spec
            .required_capabilities()
            .into_iter()
            .filter(|c| *c != Capability::Clone)
            .collect(),
        cooling,
        stalled: s.move_.as_ref().is_some_and(|m| m.stalled.is_some()),
        grow_to: cobalt_api::find_condition(&s.conditions, "CapacityReserved")
            .filter(|c| !c.is_true() && c.reason == "InsufficientCapacity")
            .map(|_| v.spec.reserved_bytes_for(v.spec.size_bytes())),
        snapshots: s.snapshots.len(),
    })
}

impl Balancer {
    pub async fn run(self, term: CancellationToken) {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = async { self.volumes.ready().await; self.machines.ready().await } => {}
        }
        let mut volumes = self.volumes.revision_watch();
        let mut machines = self.machines.revision_watch();
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "balancing pass failed; retrying");
            }
            // Plan again as soon as anything changed (a move finished: the next may start), or
            // after a while anyway (liveness, cooldowns); a short pause batches bursts.
            tokio::select! {
                _ = term.cancelled() => return,
                _ = volumes.changed() => {}
                _ = machines.changed() => {}
                _ = tokio::time::sleep(EVERY) => {}
            }
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(SETTLE) => {}
            }
        }
    }

    async fn pass(&self) -> Result<(), cobalt_store::Error> {
        let volumes = self.volumes.list();
        let machines = self.machines.list();
        let drains: Vec<DrainView> = machines
            .iter()
            .filter(|m| m.spec.drain && !m.metadata.is_deleting())
            .map(|m| DrainView {
                machine: m.metadata.name.to_string(),
                pinned_too: m.spec.drain_pinned,
            })
            .collect();
        let views: Vec<VolumeView> = volumes
            .iter()
            .filter_map(|v| volume_view(v, &self.policy))
            .collect();
        let p = plan(
            &machine_views(&machines, &self.alive, &volumes),
            &views,
            &drains,
            &self.policy,
        );
        for proposal in &p.proposals {
            self.apply(proposal).await?;
        }
        for m in &machines {
            let progress = p.drains.iter().find(|d| d.machine == m.metadata.name);
            let has = m
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Drained"));
            if progress.is_none() && !has {
                continue;
            }
            self.store
                .update_status::<Machine, _>(&m.metadata.name, |mach| {
                    let mut s = mach.status.clone().unwrap_or_default();
                    match progress {
                        Some(d) => set_condition(
                            &mut s.conditions,
                            "Drained",
                            if d.done() {
                                ConditionStatus::True
                            } else {
                                ConditionStatus::False
                            },
                            if d.done() {
                                "Empty"
                            } else if d.blocked.is_empty() {
                                "Draining"
                            } else {
                                "Blocked"
                            },
                            &d.message(),
                            mach.metadata.generation,
                            Utc::now(),
                        ),
                        None => s.conditions.retain(|c| c.type_ != "Drained"),
                    }
                    Some(s)
                })
                .await?;
        }
        Ok(())
    }

    /// Asks for one move: `spec.machine` set to the target, if the volume is still where the
    /// plan saw it; waits until the cache shows the write so the next pass plans on it.
    async fn apply(&self, p: &Proposal) -> Result<(), cobalt_store::Error> {
        let Some(v) = self.volumes.get(&p.volume) else {
            return Ok(());
        };
        let holder = v.status.as_ref().and_then(|s| s.machine.as_deref());
        if holder != Some(p.from.as_str()) || v.spec.machine.as_deref() != Some(p.from.as_str()) {
            return Ok(());
        }
        let mut moved = (*v).clone();
        moved.spec.machine = Some(p.to.clone().into());
        moved
            .metadata
            .annotations
            .insert(MOVED_BY.into(), p.reason.as_str().into());
        moved
            .metadata
            .annotations
            .insert(MOVED_AT.into(), Utc::now().to_rfc3339());
        match self.store.replace(&moved).await {
            Ok(written) => {
                tracing::info!(volume = %p.volume, from = %p.from, to = %p.to, bytes = p.bytes, reason = p.reason.as_str(), "move asked for");
                self.volumes
                    .wait_for_revision(written.metadata.revision(), OWN_WRITE_WAIT)
                    .await;
                Ok(())
            }
            // Changed meanwhile: the next pass plans on the new state.
            Err(cobalt_store::Error::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
