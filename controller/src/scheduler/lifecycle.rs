//! Machine lifecycle, the one writer of a Machine's phase and Ready condition. Ready means
//! schedulable (`Machine::is_ready_with`): the agent's `alive` key exists and it has reported its
//! capacity. NotReady says which is missing: reason LeaseExpired (no agent holds the lease) or
//! CapacityUnknown (alive, capacity not reported yet). The agent owns capacity, volume count and
//! capabilities in the same status and never writes phase or Ready; placement uses the same
//! test, so what `get machines` shows and what the scheduler does agree.

use std::sync::Arc;

use chrono::Utc;
use cobalt_api::{set_condition, ConditionStatus, Machine, MachinePhase};
use cobalt_reconcile::{Action, Context, Reconciler};
use cobalt_store::Store;

use super::binding::{Alive, SchedulerError};

pub struct MachineLifecycle {
    pub store: Store,
    pub alive: Alive,
    pub events: cobalt_store::Recorder,
}

impl Reconciler<Machine> for MachineLifecycle {
    type Error = SchedulerError;

    async fn reconcile(
        &self,
        machine: Arc<Machine>,
        ctx: Context<Machine>,
    ) -> Result<Action, SchedulerError> {
        let name = machine.metadata.name.clone();
        let alive = self
            .alive
            .read()
            .map(|a| a.contains(name.as_str()))
            .unwrap_or(false);
        let update = self
            .store
            .update_status::<Machine, _>(&name, |m| {
                let mut status = m.status.clone().unwrap_or_default();
                let ready = m.is_ready_with(alive);
                if ready {
                    status.phase = MachinePhase::Ready;
                    set_condition(
                        &mut status.conditions,
                        "Ready",
                        ConditionStatus::True,
                        "AgentAlive",
                        "the agent holds its lease",
                        m.metadata.generation,
                        Utc::now(),
                    );
                } else {
                    status.phase = MachinePhase::NotReady;
                    let (reason, message) = if alive {
                        (
                            "CapacityUnknown",
                            "the agent is alive but has not reported its capacity yet",
                        )
                    } else {
                        (
                            "LeaseExpired",
                            "the agent's liveness lease expired or it never registered",
                        )
                    };
                    set_condition(
                        &mut status.conditions,
                        "Ready",
                        ConditionStatus::False,
                        reason,
                        message,
                        m.metadata.generation,
                        Utc::now(),
                    );
                }
                Some(status)
            })
            .await?;
        ctx.wrote(update.written);
        // Lost and back: phase changes from what this reconcile read, written by it.
        let was = machine.status.as_ref().map(|s| s.phase);
        let now = update.object.status.as_ref().map(|s| s.phase);
        if update.written.is_some() && was != now {
            match now {
                Some(MachinePhase::NotReady) if was == Some(MachinePhase::Ready) => {
                    self.events.warning(
                        &update.object,
                        "MachineLost",
                        "the agent's liveness lease expired: its volumes are Lost until it returns",
                    )
                }
                Some(MachinePhase::Ready) => self.events.normal(
                    &update.object,
                    "MachineReady",
                    "the agent holds its lease and reports capacity: the machine takes volumes",
                ),
                _ => {}
            }
        }
        Ok(Action::Done)
    }
}
