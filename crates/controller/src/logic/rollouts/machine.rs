//! The rollout state machine: **where every decision of a rollout is made** — which agents are
//! activated next and how many at once, when a wave is done, when to bake, when a wave's
//! failures stop the rollout, what is rolled back, and when the rollout is complete.
//!
//! [`step`] is pure: it takes the rollout record and one [`Event`] (what happened) and returns
//! the next record and the [`Command`]s that carry the decision out. It does no I/O and reads no
//! clock; the driver ([`super::driver`]) runs the commands, in order, and feeds back what
//! happened. The commands of a step put the record's durable side effects (desired state, a
//! bad mark, the audit entry) first, then [`Command::Persist`], then what acts on agents, so an
//! action is never taken that the stored record does not yet show.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;

use super::{AgentStep, Control, LogEntry, Rollout, RolloutState, StopKind, WindowWait};
use stop::missing_agents;

/// An order the machine sends to one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Order {
    /// Download, verify and unpack the release ahead of its wave (pre-staging).
    Stage,
    /// Install (a no-op when staged), then activate behind the health gate.
    Activate,
    /// Go back from the rollout's release to `to` (`None`: the agent's own rollback target).
    RollBack { to: Option<String> },
}

/// How an agent answered an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Applied, or already in that state.
    Done,
    /// Answered but not done (refused, failed, stale): the agent's problem.
    NotDone(String),
    /// No live session, or it ended before the answer.
    Offline,
    /// No answer in time, or the order could not be sent.
    Error(String),
}

/// What the fleet says about an agent just before its activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub agent: String,
    pub online: bool,
    /// The release of the rollout's app it reports running, if any.
    pub running: Option<String>,
}

/// What happened: the machine's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The driver starts (a new rollout, or one resumed at controller start-up): nothing is in
    /// flight.
    Start,
    /// The answer to [`Command::Probe`].
    Probed(Vec<Probe>),
    /// An agent answered an order (a wave result, one agent at a time).
    Answered { agent: String, order: Order, reply: Reply },
    /// Agents of the baking wave reported unhealthy (all of those seen so far in this bake).
    Unhealthy { bake: u32, agents: Vec<String> },
    /// The bake timer ran out.
    BakeFinished { bake: u32 },
    /// Pause, resume, abort or supersede.
    Control(Control),
    /// Time passed: dispatch whatever may be dispatched.
    Tick,
    /// The regions of the rollout whose deploy window is closed now (all others may activate).
    Windows(Vec<WindowWait>),
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Write the record durably before going on.
    Persist,
    /// Ask the fleet about these agents (online, running release); answered by
    /// [`Event::Probed`] before any other event.
    Probe(Vec<String>),
    /// Send an order; answered by [`Event::Answered`].
    Send { agent: String, order: Order },
    /// Watch `agents`' health for `duration`; answered by [`Event::Unhealthy`] and
    /// [`Event::BakeFinished`] carrying `bake`.
    StartBake { bake: u32, agents: Vec<String>, duration: Duration },
    /// Stop watching the bake in progress.
    StopBake,
    /// Mark the rollout's release bad.
    MarkBad { reason: String },
    /// Make the release the desired one for every targeted agent, and for agents that join
    /// later and match.
    Complete,
    /// Bring these agents to their desired releases, in the background.
    Converge(Vec<String>),
    /// Tell the webhooks.
    Notify { kind: &'static str, body: serde_json::Value },
    /// Record the automatic rollback in the audit log.
    Audit { reason: String, agents: Vec<String>, outcome: &'static str },
}

/// What the machine keeps for one driver run and does not persist: orders in flight and the
/// bake in progress. A restarted driver has nothing in flight ([`Event::Start`] clears it).
#[derive(Clone, Debug, Default)]
pub struct Run {
    inflight: BTreeMap<String, Pending>,
    bake: Option<u32>,
    bakes: u32,
    /// The wave whose activations were announced, and the wave announced done.
    announced: Option<usize>,
    done: Option<usize>,
    /// Agents sent a rollback in this run (each is sent one).
    rollback_sent: BTreeSet<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Probe,
    Stage,
    Activate,
    RollBack,
}

impl Run {
    /// Agents with an order of this kind in flight.
    fn count(&self, kinds: &[Pending]) -> usize {
        self.inflight.values().filter(|p| kinds.contains(p)).count()
    }

    /// Agents with an activation (or the probe before one) in flight.
    pub fn activations_in_flight(&self) -> usize {
        self.count(&[Pending::Probe, Pending::Activate])
    }

    pub fn baking(&self) -> bool {
        self.bake.is_some()
    }
}

/// How soon a change must be written.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Durability {
    Unchanged,
    /// Written with the next persisted step: losing it repeats idempotent work (staging,
    /// rollback answers before the final record).
    Soon,
    Now,
}

/// Decides what follows `event` for rollout `r`, `now_ms` being the time (milliseconds since the
/// Unix epoch). A final rollout ignores every event.
pub fn step(r: &Rollout, event: Event, now_ms: u128) -> (Rollout, Vec<Command>) {
    let mut m = Machine {
        r: r.clone(),
        now_ms,
        durable: Vec::new(),
        actions: Vec::new(),
        write: Durability::Unchanged,
    };
    if !r.state.is_final() {
        m.handle(event);
    }
    m.finish()
}

struct Machine {
    r: Rollout,
    now_ms: u128,
    /// Side effects the record reports, run before it is persisted.
    durable: Vec<Command>,
    /// Actions that follow from the persisted record.
    actions: Vec<Command>,
    write: Durability,
}

impl Machine {
    fn finish(self) -> (Rollout, Vec<Command>) {
        let mut out = self.durable;
        if self.write == Durability::Now {
            out.push(Command::Persist);
        }
        out.extend(self.actions);
        (self.r, out)
    }

    fn changed(&mut self, how: Durability) {
        self.write = self.write.max(how);
    }

    fn note(&mut self, message: impl Into<String>) {
        let at = (self.now_ms / 1000) as i64;
        self.r.events.push(LogEntry { at, message: message.into() });
    }

    fn notify(&mut self, kind: &'static str, mut body: serde_json::Value) {
        if let Some(m) = body.as_object_mut() {
            m.insert("rollout".into(), self.r.id.clone().into());
            m.insert("app".into(), self.r.spec.app.clone().into());
            m.insert("version".into(), self.r.spec.version.clone().into());
        }
        self.actions.push(Command::Notify { kind, body });
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start => self.start(),
            Event::Probed(probes) => self.probed(probes),
            Event::Answered { agent, order: Order::Stage, reply } => self.staged(&agent, reply),
            Event::Answered { agent, order: Order::Activate, reply } => self.activated(&agent, reply),
            Event::Answered { agent, order: Order::RollBack { .. }, reply } => {
                self.rolled_back(&agent, reply)
            }
            Event::Unhealthy { bake, agents } => self.unhealthy(bake, &agents),
            Event::BakeFinished { bake } => self.baked(bake),
            Event::Control(c) => self.control(c),
            Event::Tick => self.advance(),
            Event::Windows(waits) => self.windows(waits),
        }
    }

    /// Deploy windows changed: agents of regions whose window is closed are not activated until
    /// it opens (what is in flight finishes; rollbacks never wait). Each region that starts
    /// waiting is noted once.
    fn windows(&mut self, mut waits: Vec<WindowWait>) {
        waits.sort_by(|a, b| a.region.cmp(&b.region));
        if waits == self.r.window_waits {
            return;
        }
        let old = std::mem::replace(&mut self.r.window_waits, waits.clone());
        for w in waits.iter().filter(|w| !old.iter().any(|o| o.region == w.region)) {
            self.note(format!("{} waits for its deploy window (opens {})", w.region, w.at));
        }
        for o in old.iter().filter(|o| !waits.iter().any(|w| w.region == o.region)) {
            self.note(format!("the {} deploy window is open", o.region));
        }
        self.changed(Durability::Now);
        self.advance();
    }

    /// Whether `agent` may be activated now: its region's deploy window is not closed.
    fn in_window(&self, agent: &str) -> bool {
        let region = self.r.agents.get(agent).map(|p| p.region.as_str()).unwrap_or_default();
        !self.r.window_waits.iter().any(|w| w.region == region)
    }

    /// Removes `agent`'s order in flight if it is of kind `kind`: an answer to anything else
    /// (an order of an earlier run, or one superseded by a rollback) is ignored.
    fn take(&mut self, agent: &str, kind: Pending) -> bool {
        if self.r.run.inflight.get(agent) == Some(&kind) {
            self.r.run.inflight.remove(agent);
            true
        } else {
            false
        }
    }

    fn start(&mut self) {
        self.r.run = Run::default();
        if self.r.stopping.is_some() {
            self.note("resuming the rollback after a restart");
            self.changed(Durability::Now);
            self.roll_back();
            return;
        }
        match self.r.state {
            RolloutState::Staging => self.stage(),
            RolloutState::Running => self.advance(),
            _ => {}
        }
    }

    /// Pre-stages the release on every targeted agent not yet staged, so waves are only
    /// activations. Agents offline now are activated (installing first) in their wave.
    fn stage(&mut self) {
        self.note("pre-staging: download, verify and unpack on every targeted agent");
        self.changed(Durability::Soon);
        let pending: Vec<String> = self
            .r
            .agents
            .values()
            .filter(|p| p.step == AgentStep::Pending && !self.r.run.inflight.contains_key(&p.id))
            .map(|p| p.id.clone())
            .collect();
        for id in pending {
            self.r.run.inflight.insert(id.clone(), Pending::Stage);
            self.actions.push(Command::Send { agent: id, order: Order::Stage });
        }
        self.staging_over();
    }

    fn staged(&mut self, agent: &str, reply: Reply) {
        if !self.take(agent, Pending::Stage) {
            return;
        }
        let Some(p) = self.r.agents.get_mut(agent) else { return };
        match reply {
            Reply::Done => p.step = AgentStep::Staged,
            Reply::NotDone(problem) => {
                p.error = Some(problem.clone());
                self.note(format!("agent {agent} could not stage: {problem}"));
            }
            Reply::Offline => {}
            Reply::Error(e) => p.error = Some(e),
        }
        self.changed(Durability::Soon);
        self.staging_over();
    }

    /// Once no staging order is in flight, a staging rollout runs; a running one (resumed
    /// while staging) may dispatch the agent that just staged.
    fn staging_over(&mut self) {
        if self.r.run.count(&[Pending::Stage]) > 0 {
            return;
        }
        if self.r.state == RolloutState::Staging {
            self.r.state = RolloutState::Running;
            self.changed(Durability::Now);
        }
        self.advance();
    }

    /// The next-wave decision: dispatch agents of the current wave up to `max_parallel` in
    /// flight; when the wave has nothing open or in flight, it is done, and the rollout bakes,
    /// moves to the next wave, or completes.
    fn advance(&mut self) {
        loop {
            if self.r.state != RolloutState::Running || self.r.stopping.is_some() || self.r.run.baking() {
                return;
            }
            let w = self.r.wave;
            let Some(wave) = self.r.waves.get(w).cloned() else {
                self.complete();
                return;
            };
            let open: Vec<String> = wave
                .iter()
                .filter(|id| !self.r.run.inflight.contains_key(*id))
                .filter(|id| {
                    self.r.agents.get(*id).is_some_and(|p| {
                        matches!(p.step, AgentStep::Pending | AgentStep::Staged | AgentStep::Activating)
                    })
                })
                .cloned()
                .collect();
            // Agents whose region waits for its window stay open, not dispatched: the wave is
            // not done until they have been activated too.
            let ready: Vec<String> = open.iter().filter(|id| self.in_window(id)).cloned().collect();
            if !ready.is_empty() && self.r.run.announced != Some(w) {
                self.r.run.announced = Some(w);
                self.note(format!(
                    "wave {} of {}: activating {} agent(s)",
                    w + 1,
                    self.r.waves.len(),
                    ready.len()
                ));
                self.changed(Durability::Soon);
            }
            let free = (self.r.spec.max_parallel as usize).saturating_sub(self.r.run.activations_in_flight());
            if free > 0 && !ready.is_empty() {
                let next: Vec<String> = ready.into_iter().take(free).collect();
                for id in &next {
                    self.r.run.inflight.insert(id.clone(), Pending::Probe);
                }
                self.actions.push(Command::Probe(next));
                return;
            }
            let busy = wave.iter().any(|id| self.r.run.inflight.contains_key(id));
            if busy || !open.is_empty() || !self.wave_done(w) {
                return;
            }
        }
    }

    /// Wave `w` has nothing open or in flight. Returns whether to go straight on to the next.
    fn wave_done(&mut self, w: usize) -> bool {
        if self.r.run.done != Some(w) {
            if let Some(reason) = missing_agents(&self.r) {
                self.stop(StopKind::AgentsMissing, reason);
                return false;
            }
            self.r.run.done = Some(w);
            let waves = self.r.waves.len();
            self.note(format!("wave {} of {waves} done", w + 1));
            self.notify("wave_done", json!({"wave": w + 1, "waves": waves}));
            self.changed(Durability::Now);
        }
        let last = w + 1 >= self.r.waves.len();
        if !last && !self.r.spec.bake.is_zero() {
            self.r.run.bakes += 1;
            let bake = self.r.run.bakes;
            self.r.run.bake = Some(bake);
            self.note(format!("baking for {}", humantime::format_duration(self.r.spec.bake)));
            self.changed(Durability::Now);
            let agents = self.r.waves[w].clone();
            self.actions.push(Command::StartBake { bake, agents, duration: self.r.spec.bake });
            return false;
        }
        self.r.wave += 1;
        self.changed(Durability::Now);
        true
    }

    fn probed(&mut self, probes: Vec<Probe>) {
        for probe in probes {
            if !self.take(&probe.agent, Pending::Probe) {
                continue;
            }
            if self.r.state != RolloutState::Running || self.r.stopping.is_some() {
                continue;
            }
            let version = self.r.spec.version.clone();
            let Some(p) = self.r.agents.get_mut(&probe.agent) else { continue };
            if !probe.online {
                p.step = AgentStep::Offline;
                self.note(format!("agent {} is offline: pending, it converges when it returns", probe.agent));
                self.changed(Durability::Now);
                continue;
            }
            if p.previous.is_none() {
                p.previous = probe.running.filter(|c| !c.is_empty() && *c != version);
            }
            p.step = AgentStep::Activating;
            self.r.run.inflight.insert(probe.agent.clone(), Pending::Activate);
            self.changed(Durability::Now);
            self.actions.push(Command::Send { agent: probe.agent, order: Order::Activate });
        }
        if self.r.stopping.is_some() {
            self.roll_back();
        } else {
            self.advance();
        }
    }

    fn activated(&mut self, agent: &str, reply: Reply) {
        if !self.take(agent, Pending::Activate) {
            return;
        }
        let now_ms = self.now_ms;
        let Some(p) = self.r.agents.get_mut(agent) else { return };
        let problem = match reply {
            Reply::Done => {
                p.step = AgentStep::Healthy;
                p.moved = true;
                p.activated_at_ms = Some(now_ms);
                None
            }
            Reply::Offline => {
                p.step = AgentStep::Offline;
                Some(format!("agent {agent} went offline: pending"))
            }
            Reply::NotDone(e) | Reply::Error(e) => {
                p.step = AgentStep::Failed;
                p.moved = true;
                p.error = Some(e.clone());
                Some(format!("agent {agent} failed: {e}"))
            }
        };
        if let Some(message) = problem {
            self.note(message);
        }
        self.changed(Durability::Now);
        if self.r.stopping.is_some() {
            self.roll_back();
            return;
        }
        let w = self.r.wave;
        let failures = self.failures_in_wave();
        let size = self.r.waves.get(w).map_or(0, Vec::len);
        if self.r.spec.max_failures.exceeded(failures, size) {
            let reason = format!(
                "{failures} failure(s) in wave {} of {}: over the failure threshold",
                w + 1,
                self.r.waves.len()
            );
            self.stop(StopKind::ReleaseFailed, reason);
            return;
        }
        self.advance();
    }

    fn failures_in_wave(&self) -> usize {
        let wave = self.r.waves.get(self.r.wave).map(Vec::as_slice).unwrap_or_default();
        wave.iter().filter(|id| self.r.agents.get(*id).is_some_and(|p| p.step == AgentStep::Failed)).count()
    }

    fn unhealthy(&mut self, bake: u32, agents: &[String]) {
        if self.r.run.bake != Some(bake) {
            return;
        }
        let wave = self.r.waves.get(self.r.wave).cloned().unwrap_or_default();
        let mut newly = 0;
        for id in agents.iter().filter(|id| wave.contains(id)) {
            if let Some(p) = self.r.agents.get_mut(id).filter(|p| p.step != AgentStep::Failed) {
                p.step = AgentStep::Failed;
                p.error = Some("unhealthy while baking".into());
                newly += 1;
            }
        }
        if newly == 0 {
            return;
        }
        self.changed(Durability::Now);
        if self.r.spec.max_failures.exceeded(self.failures_in_wave(), wave.len()) {
            let reason = format!("agent(s) {} became unhealthy while baking", agents.join(", "));
            self.stop(StopKind::ReleaseFailed, reason);
        }
    }

    fn baked(&mut self, bake: u32) {
        if self.r.run.bake != Some(bake) {
            return;
        }
        self.r.run.bake = None;
        self.r.wave += 1;
        self.changed(Durability::Now);
        self.advance();
    }

    fn stop_bake(&mut self) {
        if self.r.run.bake.take().is_some() {
            self.actions.push(Command::StopBake);
        }
    }

    fn control(&mut self, c: Control) {
        let stopping = self.r.stopping.is_some();
        match (c, self.r.state) {
            (Control::Pause, RolloutState::Staging | RolloutState::Running) if !stopping => {
                self.r.state = RolloutState::Paused;
                self.note("paused");
                self.stop_bake();
                self.changed(Durability::Now);
            }
            (Control::Resume, RolloutState::Paused) => {
                self.r.state = RolloutState::Running;
                self.note("resumed");
                self.changed(Durability::Now);
                self.advance();
            }
            (Control::Abort, _) => self.stop(StopKind::Aborted, "aborted".into()),
            (Control::Supersede, _) if !stopping => {
                self.r.state = RolloutState::Superseded;
                self.r.finished_at = Some((self.now_ms / 1000) as i64);
                self.note("superseded by a newer rollout");
                self.stop_bake();
                self.changed(Durability::Now);
            }
            // Pausing what is paused or stopping, resuming what runs: nothing to do.
            _ => {}
        }
    }

    /// Success: the release becomes the desired one; agents that did not take it are named and
    /// converge when they can.
    fn complete(&mut self) {
        self.durable.push(Command::Complete);
        let pending: Vec<String> =
            self.r.agents.values().filter(|p| p.step != AgentStep::Healthy).map(|p| p.id.clone()).collect();
        self.r.state = RolloutState::Completed;
        self.r.finished_at = Some((self.now_ms / 1000) as i64);
        self.notify("rollout_completed", json!({"pending": pending}));
        let summary = completion_summary(&self.r);
        self.note(summary);
        self.r.converging = pending.clone();
        self.changed(Durability::Now);
        self.actions.push(Command::Converge(pending));
    }
}

/// The final event of a completed rollout: "every targeted agent" only when that is true,
/// otherwise how many did not take the release, which, and that they converge on reconnect.
pub fn completion_summary(r: &Rollout) -> String {
    let ids = |step: &dyn Fn(AgentStep) -> bool| -> Vec<String> {
        r.agents.values().filter(|p| step(p.step)).map(|p| p.id.clone()).collect()
    };
    let total = r.agents.len();
    let healthy = ids(&|s| s == AgentStep::Healthy).len();
    if total > 0 && healthy == total {
        return "completed: every targeted agent runs the release".into();
    }
    let failed = ids(&|s| s == AgentStep::Failed);
    let offline = ids(&|s| !matches!(s, AgentStep::Healthy | AgentStep::Failed));
    let mut msg = format!("completed: {healthy} of {total} targeted agent(s) run the release");
    if !offline.is_empty() {
        msg.push_str(&format!(
            "; {} offline or unreachable ({}), converging when they reconnect",
            offline.len(),
            offline.join(", ")
        ));
    }
    if !failed.is_empty() {
        msg.push_str(&format!(
            "; {} failed within the failure threshold ({}) and will be retried",
            failed.len(),
            failed.join(", ")
        ));
    }
    msg
}

mod stop;
#[cfg(test)]
mod tests;
