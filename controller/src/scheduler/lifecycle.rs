//! Machine lifecycle: a machine is Ready while its agent's `alive` key exists, NotReady (Ready
//! condition False, reason LeaseExpired) once the lease behind it has expired. The agent owns
//! capacity and volume counts in the same status; this writes only phase and the Ready condition.

use std::sync::Arc;

use chrono::Utc;
use cobalt_api::{set_condition, ConditionStatus, Machine, MachinePhase};
use cobalt_reconcile::{Action, Context, Reconciler};
use cobalt_store::Store;

use super::binding::{Alive, SchedulerError};

pub struct MachineLifecycle {
    pub store: Store,
    pub alive: Alive,
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
            .map(|a| a.contains(&name))
            .unwrap_or(false);
        let update = self
            .store
            .update_status::<Machine, _>(&name, |m| {
                let mut status = m.status.clone().unwrap_or_default();
                if alive {
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
                    set_condition(
                        &mut status.conditions,
                        "Ready",
                        ConditionStatus::False,
                        "LeaseExpired",
                        "the agent's liveness lease expired or it never registered",
                        m.metadata.generation,
                        Utc::now(),
                    );
                }
                Some(status)
            })
            .await?;
        ctx.wrote(update.written);
        Ok(Action::Done)
    }
}
