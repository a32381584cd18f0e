//! Stopping: the failure policy and abort — stop dispatching, roll back every agent the
//! rollout moved or is moving, and end rolled back (the release marked bad when at fault) or
//! aborted.

use serde_json::json;

use super::{Command, Durability, Machine, Order, Pending, Reply};
use crate::logic::rollouts::{AgentStep, Rollout, RolloutState, StopKind, Stopping};

impl Machine {
    /// The failure policy, and abort: stop dispatching and roll back every agent this rollout
    /// moved or is moving.
    pub(super) fn stop(&mut self, kind: StopKind, reason: String) {
        if self.r.stopping.is_some() {
            return;
        }
        if kind == StopKind::Aborted {
            self.note("abort requested: rolling back the agents this rollout moved");
        } else {
            self.note(format!("stopping: {reason}"));
            self.notify("rollout_failed", json!({"reason": reason}));
        }
        self.r.failure = Some(reason.clone());
        self.r.stopping = Some(Stopping { kind, reason });
        self.stop_bake();
        self.changed(Durability::Now);
        self.roll_back();
    }

    /// Sends the rollbacks once they may go (a failed rollout first lets activations in flight
    /// finish, so they are rolled back too; an abort rolls those back at once, which cancels
    /// their health gates), and ends the rollout when every rollback has answered.
    pub(super) fn roll_back(&mut self) {
        let Some(kind) = self.r.stopping.as_ref().map(|s| s.kind) else { return };
        if kind != StopKind::Aborted && self.r.run.activations_in_flight() > 0 {
            return;
        }
        let targets: Vec<String> = self
            .r
            .agents
            .values()
            .filter(|p| (p.moved || p.step == AgentStep::Activating) && p.step != AgentStep::RolledBack)
            .filter(|p| !self.r.run.rollback_sent.contains(&p.id))
            .map(|p| p.id.clone())
            .collect();
        for id in targets {
            let Some(p) = self.r.agents.get_mut(&id) else { continue };
            p.moved = true;
            let to = p.previous.clone();
            self.r.run.rollback_sent.insert(id.clone());
            self.r.run.inflight.insert(id.clone(), Pending::RollBack);
            self.changed(Durability::Now);
            self.actions.push(Command::Send { agent: id, order: Order::RollBack { to } });
        }
        if self.r.run.count(&[Pending::RollBack]) == 0 {
            self.end_stopped(kind);
        }
    }

    pub(super) fn rolled_back(&mut self, agent: &str, reply: Reply) {
        if !self.take(agent, Pending::RollBack) {
            return;
        }
        let Some(p) = self.r.agents.get_mut(agent) else { return };
        let why = if p.step == AgentStep::Failed { " (its own activation had failed)" } else { "" };
        let problem = match reply {
            // "Already in state": the agent no longer runs the release (a failed activation
            // reverted itself to its known-good one).
            Reply::Done => {
                p.step = AgentStep::RolledBack;
                None
            }
            Reply::NotDone(e) => Some(format!("rollback of agent {agent}{why} did not apply: {e}")),
            Reply::Offline => Some(format!("rollback of agent {agent} failed: agent {agent} is offline")),
            Reply::Error(e) => Some(format!("rollback of agent {agent} failed: {e}")),
        };
        if let Some(message) = problem {
            self.note(message);
        }
        self.changed(Durability::Soon);
        self.roll_back();
    }

    /// Every rollback has answered: the rollout ends, rolled back (the release marked bad when
    /// it is at fault) or aborted.
    fn end_stopped(&mut self, kind: StopKind) {
        let reason = self.r.stopping.as_ref().map(|s| s.reason.clone()).unwrap_or_default();
        let (app, version) = (self.r.spec.app.clone(), self.r.spec.version.clone());
        self.r.finished_at = Some((self.now_ms / 1000) as i64);
        self.changed(Durability::Now);
        let moved: Vec<String> = self.r.agents.values().filter(|p| p.moved).map(|p| p.id.clone()).collect();
        match kind {
            StopKind::Aborted => {
                self.r.state = RolloutState::Aborted;
                self.notify("rolled_back", json!({"reason": "aborted"}));
            }
            StopKind::ReleaseFailed => {
                self.durable.push(Command::MarkBad { reason: reason.clone() });
                self.r.state = RolloutState::RolledBack;
                self.note(format!("rolled back; {app}@{version} is marked bad"));
                self.notify("rolled_back", json!({}));
                let outcome = "rolled back; release marked bad";
                self.durable.push(Command::Audit { reason, agents: moved, outcome });
            }
            StopKind::AgentsMissing => {
                self.r.state = RolloutState::RolledBack;
                self.note("rolled back the agents this rollout moved");
                self.notify("rolled_back", json!({}));
                self.durable.push(Command::Audit { reason, agents: moved, outcome: "rolled back" });
            }
        }
    }
}

/// With `require_all`: why the wave just done must fail the rollout (an agent in it was
/// offline or unreachable and did not take the release).
pub(super) fn missing_agents(r: &Rollout) -> Option<String> {
    if !r.spec.require_all {
        return None;
    }
    let missing: Vec<String> = r
        .waves
        .get(r.wave)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|id| r.agents.get(*id).is_some_and(|p| p.step == AgentStep::Offline))
        .cloned()
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} targeted agent(s) offline or unreachable ({}) and the rollout requires every agent",
            missing.len(),
            missing.join(", ")
        )
    })
}
