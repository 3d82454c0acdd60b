//! The volume scheduler: binds unbound volumes to machines, keeps the Scheduled condition, and
//! handles volumes on machines that went away.
//!
//! **Ledger**: reservations are derived from bindings in the cache (`spec.machine`), never kept
//! on the side. Placement runs under one lock and first waits until the cache has seen the
//! scheduler's own last write, so a decision never misses a reservation it made itself — which
//! is why a thousand volumes created at once cannot overcommit a machine. Each pass places every
//! pending volume at once (first-fit-decreasing for binpack).
//!
//! **Lost machines**: a volume bound by the scheduler to a machine whose agent is gone, and never
//! provisioned (`status.machine` empty), is rebound elsewhere. A provisioned one is marked
//! phase Lost, Ready=False reason MachineLost — never deleted, never recreated empty; the agent
//! sets it Ready again when it returns. A volume the *user* pinned is never moved.
//!
//! **Grants**: the ledger counts each bound volume at `Volume::ledger_bytes` — the reservation
//! of the size the scheduler granted (`status.allocatedBytes`, written in the binding's own
//! transaction) or of the limit in force, whichever is larger. A grow is granted here, under the
//! same placement lock, only if the machine can reserve the difference; otherwise the volume
//! keeps its size, stays Ready, and the condition `CapacityReserved` (False, reason
//! InsufficientCapacity) names the bytes missing. The agent never grows past the grant.
//!
//! **Moves**: a provisioned volume whose `spec.machine` names another machine than the one
//! holding its data asks for a move. [`moves::admit`] decides under the placement lock: the
//! grant (`status.move`, the only thing that reserves the target's bytes), a `Moving=False`
//! condition saying why it waits, or a revocation when `spec.machine` changed again before the
//! cut-over. The agents move the data; a volume whose holder is gone is Lost, move or not.
//!
//! **Pinned volumes** (`spec.machine` set by the user) are respected; if the machine lacks
//! capacity the Scheduled condition says so (reason PinnedOvercommitted) but the binding stays —
//! the user asked for it, and the quota still bounds the volume.
//!
//! Status ownership: the scheduler writes the Scheduled and CapacityReserved conditions,
//! `allocatedBytes`, phase Pending/Scheduled (only while the agent has not moved it further)
//! and phase Lost, `status.move` when granting or revoking it (and the Moving condition while no
//! move is granted); the agents write the rest.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use cobalt_api::{
    find_condition, set_condition, ConditionStatus, Machine, Volume, VolumePhase, VolumeStatus,
    AGENT_FINALIZER,
};
use cobalt_reconcile::{Action, Cache, Context, Reconciler};
use cobalt_store::Store;
use futures::StreamExt;
use tokio::sync::Mutex;

use super::metrics::SchedulerMetrics;
use super::moves::{self, MoveDecision};
use super::passes::{Pass, Passes, Seen};
use super::placement::{place_batch, Decision, MachineView, Request};
use crate::config::PlacementStrategy;

/// Annotation marking a binding the scheduler made (so it may move it; a user's pin it never moves).
pub const SCHEDULED_BY: &str = "cobalt.io/scheduled-by";
/// How long placement waits for the cache to reach the scheduler's own last write.
const OWN_WRITE_WAIT: Duration = Duration::from_secs(10);
/// Binding writes in flight at once.
const WRITE_CONCURRENCY: usize = 16;

/// True unless the volume already says its machine is lost (so the event is said once).
fn was_not_lost(v: &Volume) -> bool {
    v.status
        .as_ref()
        .is_none_or(|s| s.phase != VolumePhase::Lost)
}

/// Machines whose agents are alive, refreshed by the liveness poller.
pub type Alive = Arc<RwLock<BTreeSet<String>>>;

pub struct VolumeScheduler {
    /// Writes go through the leadership-fenced store.
    pub store: Store,
    pub machines: Cache<Machine>,
    pub alive: Alive,
    pub strategy: PlacementStrategy,
    pub metrics: SchedulerMetrics,
    /// Serialises placement; holds the revision of the last binding written.
    pub last_write: Mutex<i64>,
    /// When a placement pass may be skipped or must wait (see [`Passes`]); decided under
    /// `last_write`.
    pub passes: Passes,
    pub events: cobalt_store::Recorder,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Store(#[from] cobalt_store::Error),
}

fn is_alive(alive: &Alive, machine: &str) -> bool {
    alive.read().map(|a| a.contains(machine)).unwrap_or(false)
}

impl Reconciler<Volume> for VolumeScheduler {
    type Error = SchedulerError;

    async fn reconcile(
        &self,
        volume: Arc<Volume>,
        ctx: Context<Volume>,
    ) -> Result<Action, SchedulerError> {
        if volume.metadata.is_deleting() {
            return self.release_unprovisioned(&volume, &ctx).await;
        }
        let Some(machine) = volume.spec.machine.clone() else {
            self.schedule_pending(ctx.cache()).await?;
            return Ok(Action::Done);
        };
        let holder = volume.status.as_ref().and_then(|s| s.machine.clone());
        if let Some(holder) = holder {
            if holder != machine || volume.moving().is_some() {
                return self.reconcile_move(&volume, &ctx, &holder).await;
            }
        }
        let by_scheduler = volume.metadata.annotations.contains_key(SCHEDULED_BY);
        let provisioned = volume
            .status
            .as_ref()
            .and_then(|s| s.machine.as_ref())
            .is_some();
        if !is_alive(&self.alive, &machine) {
            if by_scheduler && !provisioned {
                // Never provisioned there: nothing to lose by placing it elsewhere.
                let mut unbound = (*volume).clone();
                unbound.spec.machine = None;
                unbound.metadata.annotations.remove(SCHEDULED_BY);
                let written = self.store.replace(&unbound).await?;
                ctx.wrote(written.metadata.revision());
                self.metrics.decision("rebound");
                tracing::info!(volume = %volume.metadata.name, %machine, "machine is gone before provisioning; rebinding");
                return Ok(Action::Done);
            }
            if provisioned {
                let update = self
                    .store
                    .update_status_from(&*volume, |v: &Volume| Some(lost_status(v, &machine)))
                    .await?;
                if update.written.is_some() && was_not_lost(&volume) {
                    self.events.warning(
                        &*volume,
                        "MachineLost",
                        format!("machine {machine}, which holds the data, is not ready; the data is kept there"),
                    );
                }
                ctx.wrote(update.written);
            }
            return Ok(Action::Done);
        }
        // A grow's check holds the placement lock until its grant is written (`placing`), so no
        // placement can take the same bytes in between.
        let (grant, mut placing) = self.grant(ctx.cache(), &volume, &machine).await?;
        let (reason, ok, message) = if by_scheduler {
            ("Bound", true, format!("bound to machine {machine}"))
        } else {
            match self.pinned_fits(ctx.cache(), &volume, &machine) {
                true => (
                    "Pinned",
                    true,
                    format!("pinned by the user to machine {machine}"),
                ),
                false => (
                    "PinnedOvercommitted",
                    false,
                    format!(
                        "pinned to machine {machine}, which lacks the capacity to reserve for it"
                    ),
                ),
            }
        };
        if volume
            .metadata
            .finalizers
            .iter()
            .any(|f| f == AGENT_FINALIZER)
        {
            let update = self
                .store
                .update_status_from(&*volume, |v: &Volume| {
                    let mut s = scheduled_status(v, ok, reason, &message);
                    grant.apply(&mut s, v);
                    Some(s)
                })
                .await?;
            ctx.wrote(update.written);
            if let (Some(last), Some(w)) = (placing.as_mut(), update.written) {
                **last = (**last).max(w);
            }
        } else {
            // A volume pinned at create: the finalizer and the Scheduled condition in one write.
            let mut held = (*volume).clone();
            held.metadata.finalizers.push(AGENT_FINALIZER.into());
            match self
                .store
                .replace_with_status(&held, |v| {
                    let mut s = scheduled_status(v, ok, reason, &message);
                    grant.apply(&mut s, v);
                    s
                })
                .await
            {
                Ok(written) => ctx.wrote(written.metadata.revision()),
                // Changed meanwhile: its change event brings it back.
                Err(cobalt_store::Error::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Action::Done)
    }
}

/// What the scheduler decided about a bound volume's size.
enum Grant {
    /// The allocation already matches the spec.
    Unchanged,
    /// Allocate the spec's size (a grow that fits, a shrink, or a first allocation).
    Size(u64),
    /// A grow that does not fit: the allocation stays, the message says why.
    Refused(String),
}

impl Grant {
    fn apply(&self, s: &mut VolumeStatus, v: &Volume) {
        match self {
            Grant::Unchanged => {}
            Grant::Size(bytes) => {
                s.allocated_bytes = Some(*bytes);
                s.conditions.retain(|c| c.type_ != "CapacityReserved");
            }
            Grant::Refused(message) => set_condition(
                &mut s.conditions,
                "CapacityReserved",
                ConditionStatus::False,
                "InsufficientCapacity",
                message,
                v.metadata.generation,
                Utc::now(),
            ),
        }
    }
}

impl VolumeScheduler {
    /// Decides the allocation of a volume bound to `machine`. A grow is checked against the
    /// ledger under the placement lock, which is returned held: the caller writes the grant
    /// before releasing it (and records the write's revision in it), so a grow and a placement
    /// cannot both take the last bytes of a machine.
    async fn grant(
        &self,
        cache: &Cache<Volume>,
        volume: &Volume,
        machine: &str,
    ) -> Result<(Grant, Option<tokio::sync::MutexGuard<'_, i64>>), SchedulerError> {
        let asked = volume.spec.size_bytes();
        let allocated = volume.status.as_ref().and_then(|s| s.allocated_bytes);
        match allocated {
            Some(a) if a == asked => return Ok((Grant::Unchanged, None)),
            // First allocation of a volume bound before allocations existed, or a shrink:
            // neither needs room.
            None => return Ok((Grant::Size(asked), None)),
            Some(a) if asked < a => return Ok((Grant::Size(asked), None)),
            Some(_) => {}
        }
        let last_write = self.last_write.lock().await;
        if !cache.wait_for_revision(*last_write, OWN_WRITE_WAIT).await {
            return Err(cobalt_store::Error::Unavailable {
                endpoints: "cache".into(),
                deadline: OWN_WRITE_WAIT,
                cause: "cache behind the scheduler's own writes".into(),
            }
            .into());
        }
        let volumes = cache.list();
        let views = self.machine_views(&volumes);
        let Some(m) = views.iter().find(|m| m.name == machine) else {
            let why = format!("machine {machine} is not registered");
            return Ok((Grant::Refused(why), None));
        };
        let in_force = volume
            .status
            .as_ref()
            .and_then(|s| s.usage.as_ref())
            .map_or(0, |u| u.limit_bytes);
        let wanted = volume.spec.reserved_bytes_for(asked.max(in_force));
        let more = wanted.saturating_sub(volume.ledger_bytes());
        let free = m.reservable_bytes();
        if more <= free {
            return Ok((Grant::Size(asked), Some(last_write)));
        }
        let why = format!(
            "growing to {asked} bytes needs {more} more bytes reserved on machine {machine}, which has {free} reservable; the volume keeps {} bytes",
            volume.granted_size_bytes()
        );
        Ok((Grant::Refused(why), None))
    }

    /// A provisioned volume whose binding names another machine, or whose move is under way:
    /// grants, holds back or revokes the move ([`moves::admit`]) under the placement lock, since
    /// a grant reserves bytes on the target.
    async fn reconcile_move(
        &self,
        volume: &Volume,
        ctx: &Context<Volume>,
        holder: &str,
    ) -> Result<Action, SchedulerError> {
        if !is_alive(&self.alive, holder) {
            if was_not_lost(volume) {
                self.events.warning(
                    volume,
                    "MachineLost",
                    format!("machine {holder}, which holds the data, is not ready; the data is kept there"),
                );
            }
            let update = self
                .store
                .update_status_from(volume, |v: &Volume| {
                    let mut s = lost_status(v, holder);
                    if s.move_.is_none() && v.spec.machine.as_deref() != Some(holder) {
                        set_condition(
                            &mut s.conditions,
                            "Moving",
                            ConditionStatus::False,
                            "SourceNotReady",
                            &format!("machine {holder}, which holds the data, is not ready; the volume cannot move until it returns"),
                            v.metadata.generation,
                            Utc::now(),
                        );
                    }
                    Some(s)
                })
                .await?;
            ctx.wrote(update.written);
            return Ok(Action::Done);
        }
        let mut last_write = self.last_write.lock().await;
        if !ctx
            .cache()
            .wait_for_revision(*last_write, OWN_WRITE_WAIT)
            .await
        {
            return Err(cobalt_store::Error::Unavailable {
                endpoints: "cache".into(),
                deadline: OWN_WRITE_WAIT,
                cause: "cache behind the scheduler's own writes".into(),
            }
            .into());
        }
        let volumes = ctx.cache().list();
        let views = self.machine_views(&volumes);
        let decision = moves::admit(volume, &views, Utc::now());
        let name = &volume.metadata.name;
        let update = match &decision {
            MoveDecision::Nothing => return Ok(Action::Done),
            MoveDecision::Grant(grant) => {
                tracing::info!(volume = %name, from = %grant.from, to = %grant.to, "move granted");
                self.metrics.decision("move-granted");
                self.store
                    .update_status_from(volume, |v: &Volume| {
                        let s = v.status.as_ref()?;
                        // The agent adds a snapshot to status.snapshots (compare-guarded) before
                        // taking it: a grant and a snapshot never cross.
                        if s.move_.is_some()
                            || !s.snapshots.is_empty()
                            || s.machine.as_deref() != Some(grant.from.as_str())
                            || v.spec.machine.as_deref() != Some(grant.to.as_str())
                        {
                            return None;
                        }
                        let mut s = s.clone();
                        s.move_ = Some(Box::new(grant.clone()));
                        s.phase = VolumePhase::Moving;
                        let (reason, message) = grant.describe();
                        set_condition(
                            &mut s.conditions,
                            "Moving",
                            ConditionStatus::True,
                            reason,
                            &message,
                            v.metadata.generation,
                            Utc::now(),
                        );
                        Some(s)
                    })
                    .await?
            }
            MoveDecision::Wait { reason, message } => {
                self.store
                    .update_status_from(volume, |v: &Volume| {
                        let mut s = v.status.clone()?;
                        if s.move_.is_some() {
                            return None;
                        }
                        set_condition(
                            &mut s.conditions,
                            "Moving",
                            ConditionStatus::False,
                            reason,
                            message,
                            v.metadata.generation,
                            Utc::now(),
                        );
                        Some(s)
                    })
                    .await?
            }
            MoveDecision::Revoke => {
                tracing::info!(volume = %name, "move cancelled: spec.machine changed before the cut-over");
                self.metrics.decision("move-revoked");
                self.store
                    .update_status_from(volume, |v: &Volume| {
                        let mut s = v.status.clone()?;
                        let m = s.move_.as_ref()?;
                        if m.stage.is_committed()
                            || v.spec.machine.as_deref() == Some(m.to.as_str())
                        {
                            return None;
                        }
                        s.move_ = None;
                        s.conditions.retain(|c| c.type_ != "Moving");
                        if s.phase == VolumePhase::Moving {
                            s.phase = VolumePhase::Ready;
                        }
                        Some(s)
                    })
                    .await?
            }
        };
        ctx.wrote(update.written);
        if let Some(w) = update.written {
            *last_write = (*last_write).max(w);
            match &decision {
                MoveDecision::Grant(g) => self.events.normal(
                    volume,
                    "MoveStarted",
                    format!("moving from machine {} to {}", g.from, g.to),
                ),
                MoveDecision::Revoke => self.events.normal(
                    volume,
                    "MoveCancelled",
                    "spec.machine changed before the cut-over: the data stays where it is",
                ),
                MoveDecision::Wait { reason, message } => {
                    self.events
                        .warning(volume, "MoveWaiting", format!("{reason}: {message}"))
                }
                MoveDecision::Nothing => {}
            }
        }
        Ok(Action::Done)
    }

    /// A volume being deleted whose machine is gone and which was never provisioned there has
    /// no data to wait for: the scheduler drops the agent's finalizer so the delete completes.
    /// (If an agent died between creating the data and reporting it, that data is left on the
    /// machine and reported there as unowned; it is never destroyed without a Volume.)
    async fn release_unprovisioned(
        &self,
        volume: &Volume,
        ctx: &Context<Volume>,
    ) -> Result<Action, SchedulerError> {
        let provisioned = volume
            .status
            .as_ref()
            .and_then(|s| s.machine.as_ref())
            .is_some();
        let held = volume
            .metadata
            .finalizers
            .iter()
            .any(|f| f == AGENT_FINALIZER);
        let machine_alive = volume
            .spec
            .machine
            .as_deref()
            .is_some_and(|m| is_alive(&self.alive, m));
        if provisioned || !held || machine_alive {
            return Ok(Action::Done);
        }
        let mut released = volume.clone();
        released
            .metadata
            .finalizers
            .retain(|f| f != AGENT_FINALIZER);
        match self.store.replace(&released).await {
            Ok(written) => {
                ctx.wrote(written.metadata.revision());
                tracing::info!(volume = %volume.metadata.name, "released: its machine is gone and it was never provisioned");
            }
            Err(cobalt_store::Error::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Action::Done)
    }

    fn machine_views(&self, volumes: &[Arc<Volume>]) -> Vec<MachineView> {
        machine_views(&self.machines.list(), &self.alive, volumes)
    }

    fn pinned_fits(&self, cache: &Cache<Volume>, volume: &Volume, machine: &str) -> bool {
        let volumes = cache.list();
        let views = self.machine_views(&volumes);
        // The ledger already counts this volume; it fits if the machine is not overcommitted.
        views.iter().find(|m| m.name == machine).is_some_and(|m| {
            let cap = (m.total_bytes as u128 * m.max_fill_percent as u128 / 100) as u64;
            m.reserved_bytes <= cap && m.reserved_bytes >= volume.ledger_bytes()
        })
    }

    /// Places every pending volume (one pass under the placement lock), unless
    /// [`super::passes`] says the pass is answered, changes nothing, or must wait.
    async fn schedule_pending(&self, cache: &Cache<Volume>) -> Result<(), SchedulerError> {
        // Placing before the machines are known would call every volume unschedulable.
        if tokio::time::timeout(OWN_WRITE_WAIT, self.machines.ready())
            .await
            .is_err()
        {
            return Err(cobalt_store::Error::Unavailable {
                endpoints: "cache".into(),
                deadline: OWN_WRITE_WAIT,
                cause: "the machine list has not loaded yet".into(),
            }
            .into());
        }
        let asked = self.passes.ask();
        let mut last_write = self.last_write.lock().await;
        if !self.passes.begin(asked).await {
            // A pass began after this reconcile asked and has ended (its lock is ours now): it
            // saw this volume as it is.
            return Ok(());
        }
        if !cache.wait_for_revision(*last_write, OWN_WRITE_WAIT).await {
            tracing::warn!(
                revision = *last_write,
                "cache has not caught up with our own bindings; deferring placement"
            );
            return Err(cobalt_store::Error::Unavailable {
                endpoints: "cache".into(),
                deadline: OWN_WRITE_WAIT,
                cause: "cache behind the scheduler's own writes".into(),
            }
            .into());
        }
        // Read before the lists, so a change landing in between makes the next pass run.
        let seen = Seen::now(cache, &self.machines, &self.alive);
        if self.passes.nothing_changed_since_last(&seen) {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let volumes = cache.list();
        let mut views = self.machine_views(&volumes);
        let pending: Vec<Arc<Volume>> = volumes
            .iter()
            .filter(|v| v.spec.machine.is_none() && !v.metadata.is_deleting())
            .cloned()
            .collect();
        self.metrics.pending(pending.len());
        if pending.is_empty() {
            return Ok(());
        }
        // A restore is placed where its snapshot is: read those snapshots (restores are rare,
        // so a fresh read each pass costs little and is never stale).
        let mut snapshot_machines: HashMap<String, String> = HashMap::new();
        for v in &pending {
            let Some(name) = v.spec.source.as_ref().and_then(|s| s.snapshot.as_deref()) else {
                continue;
            };
            if let Some(snap) = self.store.get::<cobalt_api::Snapshot>(name).await? {
                if let (true, Some(m)) = (snap.ready(), snap.machine()) {
                    snapshot_machines.insert(name.to_string(), m.to_string());
                }
            }
        }
        let requests: Vec<Request> = pending
            .iter()
            .map(|v| Request {
                name: v.metadata.name.to_string(),
                reserved_bytes: v.spec.reserved_bytes(),
                needs: v.spec.required_capabilities(),
                selector: v
                    .spec
                    .placement
                    .as_ref()
                    .map(|p| p.selector.clone())
                    .unwrap_or_default(),
                required_machine: v.spec.source.as_ref().map(|s| match &s.volume {
                    Some(volume) => cache
                        .get(volume)
                        .and_then(|src| {
                            src.status
                                .as_ref()
                                .and_then(|st| st.machine.as_deref())
                                .or(src.spec.machine.as_deref())
                                .map(str::to_string)
                        })
                        .unwrap_or_else(|| format!("(source volume {volume} is not placed)")),
                    None => {
                        let name = s.snapshot.as_deref().unwrap_or_default();
                        snapshot_machines.get(name).cloned().unwrap_or_else(|| {
                            format!("(snapshot {name} does not exist or is not ready)")
                        })
                    }
                }),
            })
            .collect();
        let this_pass = Pass::new(seen, &pending, &requests, &views);
        if self.passes.decides_as_last(this_pass) {
            return Ok(());
        }
        let decisions = place_batch(self.strategy, requests, &mut views);
        // Deciding is what takes a core; the writes after it wait on etcd.
        let placing_took = start.elapsed();
        self.metrics.placed(decisions.len(), placing_took);
        let by_name: HashMap<&str, &Arc<Volume>> = pending
            .iter()
            .map(|v| (v.metadata.name.as_str(), v))
            .collect();
        let writes = futures::stream::iter(decisions.into_iter().filter_map(|(name, decision)| {
            let volume = (*by_name.get(name.as_str())?).clone();
            Some(self.apply_decision(volume, decision))
        }))
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut failed = None;
        for result in writes {
            match result {
                Ok(revision) => *last_write = (*last_write).max(revision),
                // A fenced write means we are no longer leader: stop this pass.
                Err(e @ cobalt_store::Error::Fenced { .. }) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "writing a placement decision failed; it will be retried");
                    failed.get_or_insert(e);
                }
            }
        }
        self.passes.ended(this_pass, failed.is_none(), placing_took);
        // The reconciles this pass answered returned without a pass of their own: a failed
        // write makes this one retry (with backoff) on their behalf.
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Writes one decision; returns the highest revision written.
    async fn apply_decision(
        &self,
        volume: Arc<Volume>,
        decision: Decision,
    ) -> Result<i64, cobalt_store::Error> {
        match decision {
            Decision::Bind(machine) => {
                // One write: the binding, the agent's finalizer (so a delete waits for the data
                // to go) and the Scheduled condition.
                let mut bound = (*volume).clone();
                bound.spec.machine = Some(machine.clone().into());
                bound
                    .metadata
                    .annotations
                    .insert(SCHEDULED_BY.into(), "scheduler".into());
                if !bound
                    .metadata
                    .finalizers
                    .iter()
                    .any(|f| f == AGENT_FINALIZER)
                {
                    bound.metadata.finalizers.push(AGENT_FINALIZER.into());
                }
                let message = format!("bound to machine {machine}");
                let written = match self
                    .store
                    .replace_with_status_from(&*volume, &bound, |v| {
                        let mut s = scheduled_status(v, true, "Bound", &message);
                        s.allocated_bytes = Some(v.spec.size_bytes());
                        s
                    })
                    .await
                {
                    Ok(w) => w,
                    // The user (or a status writer) changed it meanwhile; its change event
                    // brings it back.
                    Err(cobalt_store::Error::Conflict { .. }) => return Ok(0),
                    Err(e) => return Err(e),
                };
                self.metrics.decision("bound");
                self.events.normal(&written, "Bound", message);
                Ok(written.metadata.revision())
            }
            Decision::Unschedulable(message) => {
                self.metrics.decision("unschedulable");
                // From the cached volume: a volume already saying why costs no read.
                let update = self
                    .store
                    .update_status_from(&*volume, |v: &Volume| {
                        Some(scheduled_status(v, false, "Unschedulable", &message))
                    })
                    .await?;
                if update.written.is_some() {
                    self.events
                        .warning(&update.object, "Unschedulable", message);
                }
                Ok(update.written.unwrap_or(0))
            }
        }
    }
}

/// What placement sees of each machine: readiness, labels, capabilities, capacity, and the
/// ledger of `volumes` (each counted on every machine of `Volume::ledger_machines`). A draining
/// machine takes no new volumes.
pub fn machine_views(
    machines: &[Arc<Machine>],
    alive: &Alive,
    volumes: &[Arc<Volume>],
) -> Vec<MachineView> {
    let mut views: Vec<MachineView> = machines
        .iter()
        .map(|m| MachineView {
            name: m.metadata.name.to_string(),
            labels: m.metadata.labels.clone(),
            ready: m.is_ready_with(is_alive(alive, &m.metadata.name)),
            capabilities: m
                .status
                .as_ref()
                .map(|s| s.capabilities.clone())
                .unwrap_or_default(),
            unschedulable: m.spec.unschedulable || m.spec.drain,
            total_bytes: m
                .status
                .as_ref()
                .map(|s| s.capacity.total_bytes)
                .unwrap_or(0),
            max_fill_percent: m.spec.max_fill,
            reserved_bytes: 0,
        })
        .collect();
    let index: HashMap<&str, usize> = views
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let mut reserved = vec![0u64; views.len()];
    for v in volumes {
        for machine in v.ledger_machines() {
            if let Some(&i) = index.get(machine) {
                reserved[i] += v.reserved_on(machine);
            }
        }
    }
    for (view, bytes) in views.iter_mut().zip(reserved) {
        view.reserved_bytes = bytes;
    }
    views
}

/// The volume's status with the Scheduled condition set (and phase Pending/Scheduled while the
/// agent has not taken over).
pub fn scheduled_status(v: &Volume, ok: bool, reason: &str, message: &str) -> VolumeStatus {
    let mut status = v.status.clone().unwrap_or_default();
    let condition = if ok {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    set_condition(
        &mut status.conditions,
        "Scheduled",
        condition,
        reason,
        message,
        v.metadata.generation,
        Utc::now(),
    );
    if matches!(status.phase, VolumePhase::Pending | VolumePhase::Scheduled) {
        status.phase = if ok {
            VolumePhase::Scheduled
        } else {
            VolumePhase::Pending
        };
    }
    status
}

fn lost_status(v: &Volume, machine: &str) -> VolumeStatus {
    let mut status = v.status.clone().unwrap_or_default();
    status.phase = VolumePhase::Lost;
    let message = format!("machine {machine} is not ready (its agent's lease expired); the data stays there until it returns");
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        "MachineLost",
        &message,
        v.metadata.generation,
        Utc::now(),
    );
    status
}

/// True when the Scheduled condition is True.
pub fn is_scheduled(v: &Volume) -> bool {
    v.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, "Scheduled"))
        .is_some_and(|c| c.is_true())
}
