//! The rollout driver: one task per unfinished rollout, the only writer of its record. It
//! decides nothing: it feeds what happens to [`machine::step`] and runs the commands that come
//! back, in order — persisting the record before acting on it — and resumes a rollout from its
//! stored step at start-up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::fleet::{Fleet, Sessions};
use super::machine::{self, Command, Event, Order, Probe, Reply};
use super::windows::WindowState;
use super::Rollouts;
use super::{BadRelease, Control, Rollout, RolloutState, WindowWait};
use crate::logic::orders::OrderKind;
use crate::logic::{now, Error, Result};
use crate::store::Tree;

/// How many agents are pre-staged (download, verify, unpack) at once.
const STAGE_PARALLEL: usize = 16;
/// How long an install (download, verify, unpack) may take.
const INSTALL_WAIT: Duration = Duration::from_secs(600);
/// Extra time over the health deadline before an activation without an answer is a failure.
const ANSWER_SLACK: Duration = Duration::from_secs(30);
/// The health deadline when the spec sets none (the agent's default).
const DEFAULT_HEALTH_DEADLINE: Duration = Duration::from_secs(60);
const ROLLBACK_WAIT: Duration = Duration::from_secs(120);
/// How often the machine is nudged to dispatch what it may ([`Event::Tick`]).
const TICK: Duration = Duration::from_secs(5);
/// How often a baking wave's health is read.
const BAKE_POLL: Duration = Duration::from_millis(250);

type ControlRx = mpsc::Receiver<(Control, oneshot::Sender<Result<()>>)>;

impl Rollouts {
    /// The fleet as the live sessions reach it.
    pub(super) fn sessions(&self) -> Sessions {
        Sessions::new(&self.registry, &self.orders)
    }

    /// Starts the driver of rollout `id` over the live sessions; it stops with the controller.
    pub(super) fn spawn_driver(&self, id: String) {
        let stop = self.core.shutdown.child_token();
        drop(self.spawn_driver_with(self.sessions(), id, stop));
    }

    /// Starts the driver of rollout `id` over `fleet`, until it ends or `stop` is cancelled.
    pub(crate) fn spawn_driver_with<F: Fleet>(
        &self,
        fleet: F,
        id: String,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let (tx, rx) = mpsc::channel(8);
        self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), tx.clone());
        let ctl = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = drive(ctl.clone(), fleet, &id, rx) => {
                    if let Err(e) = r {
                        tracing::error!(rollout = %id, error = %e, "rollout driver failed");
                    }
                }
                () = stop.cancelled() => {}
            }
            let mut drivers = ctl.inner.drivers.lock().unwrap_or_else(|p| p.into_inner());
            if drivers.get(&id).is_some_and(|t| t.same_channel(&tx)) {
                drivers.remove(&id);
            }
        })
    }
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn answer(ack: oneshot::Sender<Result<()>>, res: Result<()>) {
    if ack.send(res).is_err() {
        tracing::debug!("the caller of a rollout control went away before its answer");
    }
}

async fn drive<F: Fleet>(ctl: Rollouts, fleet: F, id: &str, mut controls: ControlRx) -> Result<()> {
    let mut r = ctl.rollout(Some(id.to_owned())).await?;
    if r.state == RolloutState::Scheduled && !wait_for_start(&ctl, &mut r, &mut controls).await? {
        return Ok(());
    }
    let (events, mut answers) = mpsc::unbounded_channel();
    let mut d = Driver {
        ctl,
        fleet,
        r,
        events,
        tasks: JoinSet::new(),
        bake: None,
        stage_permits: Arc::new(Semaphore::new(STAGE_PARALLEL)),
        waiting: Vec::new(),
    };
    // Windows first: the start must not dispatch into a region whose window is closed.
    let waits = d.window_waits();
    d.feed(Event::Windows(waits)).await?;
    d.feed(Event::Start).await?;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !d.r.state.is_final() {
        tokio::select! {
            Some(event) = answers.recv() => d.feed(event).await?,
            Some((c, ack)) = controls.recv() => d.control(c, ack).await?,
            _ = tick.tick() => {
                let waits = d.window_waits();
                if waits != d.r.window_waits {
                    d.feed(Event::Windows(waits)).await?;
                }
                d.feed(Event::Tick).await?;
            }
            Some(Err(e)) = d.tasks.join_next() => {
                if e.is_panic() {
                    return Err(Error::Internal(format!("a rollout task panicked: {e}")));
                }
            }
        }
    }
    for ack in d.waiting.drain(..) {
        answer(ack, Ok(()));
    }
    Ok(())
}

/// Holds a scheduled rollout until its start time, and after it while a freeze covers it
/// (freezes beat schedules). An abort or supersede ends it with nothing moved; pause and
/// resume are refused. Returns whether the rollout goes on (it is then staging, persisted).
async fn wait_for_start(ctl: &Rollouts, r: &mut Rollout, controls: &mut ControlRx) -> Result<bool> {
    loop {
        let t = now();
        let start = r.spec.start_at.unwrap_or(t);
        let wait = if start > t {
            Duration::from_secs((start - t) as u64)
        } else {
            let (app, regions) = (r.spec.app.clone(), r.agents.values().map(|a| a.region.clone()).collect());
            let frozen = ctl.blocking(move |c| c.active_freeze(&app, &regions, t)).await?;
            match (frozen, &r.spec.override_freeze) {
                (Some((f, until)), None) => {
                    let note = format!(
                        "start held: deploys are frozen until {} ({}, freeze {})",
                        crate::cli_time(until),
                        f.reason,
                        f.label()
                    );
                    if r.events.last().is_none_or(|e| e.message != note) {
                        r.event(note);
                        ctl.save(r).await?;
                    }
                    TICK
                }
                _ => break,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Some((c, ack)) = controls.recv() => {
                let ended = match c {
                    Control::Abort => Some((RolloutState::Aborted, "aborted before its start")),
                    Control::Supersede => Some((RolloutState::Superseded, "superseded before its start")),
                    Control::Pause | Control::Resume => None,
                };
                let Some((state, what)) = ended else {
                    answer(ack, Err(Error::FailedPrecondition(format!(
                        "rollout {} is scheduled and has not started: abort it to cancel", r.id
                    ))));
                    continue;
                };
                r.state = state;
                r.finished_at = Some(now());
                r.event(format!("{what}; nothing had moved"));
                return match ctl.save(r).await {
                    Ok(()) => {
                        answer(ack, Ok(()));
                        Ok(false)
                    }
                    Err(e) => {
                        answer(ack, Err(Error::Internal(format!("the rollout could not be saved: {e}"))));
                        Err(e)
                    }
                };
            }
        }
    }
    // What held at the deploy must still hold now: the approvals, the release not marked bad,
    // the promotion rule.
    let t = now();
    if r.approval.as_ref().is_some_and(|g| g.valid(t) < g.required as usize) {
        r.state = RolloutState::Expired;
        r.finished_at = Some(t);
        r.failure = Some("its approvals expired before its start".into());
        r.event("its approvals expired before its start: nothing moved");
        ctl.save(r).await?;
        audit_start(ctl, r, "expired: its approvals expired before its start").await;
        return Ok(false);
    }
    if let Err(e) = ctl.start_checks(r).await {
        r.state = RolloutState::Aborted;
        r.finished_at = Some(t);
        r.failure = Some(format!("did not start: {e}"));
        r.event(format!("did not start: {e}; nothing moved"));
        ctl.save(r).await?;
        audit_start(ctl, r, &format!("did not start: {e}")).await;
        return Ok(false);
    }
    r.state = RolloutState::Staging;
    r.event("starting");
    ctl.save(r).await?;
    audit_start(ctl, r, "started").await;
    ctl.core.notify("rollout_started", super::deploy::created_event(r));
    Ok(true)
}

/// Records how a waiting rollout's start went.
async fn audit_start(ctl: &Rollouts, r: &Rollout, outcome: &str) {
    let target = format!("{}@{}", r.spec.app, r.spec.version);
    let params = serde_json::json!({"rollout": r.id, "environment": r.spec.environment});
    ctl.audit.record("controller", "rollout.start", &target, params, outcome).await;
}

struct Driver<F: Fleet> {
    ctl: Rollouts,
    fleet: F,
    r: Rollout,
    /// Where orders in flight and the bake report back.
    events: mpsc::UnboundedSender<Event>,
    tasks: JoinSet<()>,
    bake: Option<AbortHandle>,
    stage_permits: Arc<Semaphore>,
    /// Aborts and supersedes, answered once the rollout has ended.
    waiting: Vec<oneshot::Sender<Result<()>>>,
}

impl<F: Fleet> Driver<F> {
    /// The rollout's regions whose deploy window is closed now, in region order.
    fn window_waits(&self) -> Vec<WindowWait> {
        let windows = &self.ctl.core.settings.windows;
        if windows.is_empty() {
            return vec![];
        }
        let now = jiff::Timestamp::now();
        let env = self.r.spec.environment.as_str();
        let regions: std::collections::BTreeSet<&str> =
            self.r.agents.values().map(|a| a.region.as_str()).collect();
        regions
            .into_iter()
            .filter_map(|region| match windows.state(env, region, now) {
                WindowState::Closed { opens, at } => {
                    Some(WindowWait { region: region.to_owned(), opens: opens.as_second(), at })
                }
                WindowState::Unrestricted | WindowState::Open { .. } => None,
            })
            .collect()
    }

    /// Steps the machine through `event` and whatever its commands answer at once.
    async fn feed(&mut self, event: Event) -> Result<()> {
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let logged = self.r.events.len();
            let (next, commands) = machine::step(&self.r, event, now_ms());
            self.r = next;
            for e in self.r.events.iter().skip(logged) {
                tracing::info!(rollout = %self.r.id, app = %self.r.spec.app, "{}", e.message);
            }
            for command in commands {
                if let Some(answer) = self.run(command).await? {
                    queue.push_back(answer);
                }
            }
        }
        Ok(())
    }

    async fn control(&mut self, c: Control, ack: oneshot::Sender<Result<()>>) -> Result<()> {
        if let Err(e) = self.feed(Event::Control(c)).await {
            answer(ack, Err(Error::Internal(format!("the rollout driver failed: {e}"))));
            return Err(e);
        }
        match c {
            Control::Abort | Control::Supersede if !self.r.state.is_final() => self.waiting.push(ack),
            _ => answer(ack, Ok(())),
        }
        Ok(())
    }

    /// Runs one command; a probe's answer comes back at once, to be fed before anything else.
    async fn run(&mut self, command: Command) -> Result<Option<Event>> {
        match command {
            Command::Persist => self.ctl.save(&self.r).await?,
            Command::Probe(agents) => return Ok(Some(Event::Probed(self.probe(agents).await?))),
            Command::Send { agent, order } => self.send(agent, order),
            Command::StartBake { bake, agents, duration } => self.start_bake(bake, agents, duration),
            Command::StopBake => {
                if let Some(h) = self.bake.take() {
                    h.abort();
                }
            }
            Command::MarkBad { reason } => self.mark_bad(reason).await?,
            Command::Complete => self.ctl.record_completion(&self.r).await?,
            Command::Converge(agents) => {
                for agent in agents {
                    self.ctl.converge_with(self.fleet.clone(), &agent);
                }
            }
            Command::Notify { kind, body } => self.ctl.core.notify(kind, body),
            Command::Audit { reason, agents, outcome } => {
                let target = format!("{}@{}", self.r.spec.app, self.r.spec.version);
                let params = serde_json::json!({"rollout": self.r.id, "reason": reason, "agents": agents});
                self.ctl.audit.record("controller", "rollout.auto_rollback", &target, params, outcome).await;
            }
        }
        Ok(None)
    }

    async fn probe(&self, agents: Vec<String>) -> Result<Vec<Probe>> {
        let reports = self.fleet.reports(&self.r.spec.app, &agents).await?;
        Ok(agents
            .into_iter()
            .map(|agent| {
                let report = reports.iter().find(|r| r.agent == agent);
                Probe {
                    online: report.is_some_and(|r| r.online),
                    running: report.and_then(|r| r.running.clone()),
                    agent,
                }
            })
            .collect())
    }

    /// Sends an order in the background; its answer comes back as [`Event::Answered`].
    fn send(&mut self, agent: String, order: Order) {
        let (app, version, digest) =
            (self.r.spec.app.clone(), self.r.spec.version.clone(), self.r.digest.clone());
        let install = OrderKind::Install { app: app.clone(), version: version.clone(), digest };
        let deadline = self.r.spec.health_deadline;
        let reason = format!("rollout {}", self.r.id);
        let (fleet, events, permits) = (self.fleet.clone(), self.events.clone(), self.stage_permits.clone());
        self.tasks.spawn(async move {
            let reply = match &order {
                Order::Stage => match permits.acquire_owned().await {
                    Ok(permit) => {
                        let reply = fleet.send(&agent, install, INSTALL_WAIT).await;
                        drop(permit);
                        reply
                    }
                    Err(e) => Reply::Error(e.to_string()),
                },
                // Install first (a no-op when pre-staged), then activate.
                Order::Activate => match fleet.send(&agent, install, INSTALL_WAIT).await {
                    Reply::Done => {
                        let activate = OrderKind::Activate { app, version, health_deadline: deadline };
                        let wait = deadline.unwrap_or(DEFAULT_HEALTH_DEADLINE) + ANSWER_SLACK;
                        fleet.send(&agent, activate, wait).await
                    }
                    other => other,
                },
                Order::RollBack { to } => {
                    let kind = OrderKind::Rollback { app, from: version, to: to.clone(), reason };
                    fleet.send(&agent, kind, ROLLBACK_WAIT).await
                }
            };
            if events.send(Event::Answered { agent, order, reply }).is_err() {
                tracing::debug!("an order was answered after its rollout's driver stopped");
            }
        });
    }

    /// Watches the wave's health until `duration` has passed, reporting agents that turn
    /// unhealthy (every time one more does) and then the end of the bake.
    fn start_bake(&mut self, bake: u32, agents: Vec<String>, duration: Duration) {
        if let Some(h) = self.bake.take() {
            h.abort();
        }
        let (fleet, events, app) = (self.fleet.clone(), self.events.clone(), self.r.spec.app.clone());
        let until = tokio::time::Instant::now() + duration;
        self.bake = Some(self.tasks.spawn(async move {
            let mut seen: Vec<String> = Vec::new();
            loop {
                match fleet.reports(&app, &agents).await {
                    Ok(reports) => {
                        let unhealthy: Vec<String> =
                            reports.into_iter().filter(|r| r.unhealthy).map(|r| r.agent).collect();
                        if unhealthy.iter().any(|a| !seen.contains(a)) {
                            seen.clone_from(&unhealthy);
                            if events.send(Event::Unhealthy { bake, agents: unhealthy }).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "bake: the wave's health could not be read"),
                }
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    if events.send(Event::BakeFinished { bake }).is_err() {
                        tracing::debug!("a bake ended after its rollout's driver stopped");
                    }
                    return;
                }
                tokio::time::sleep(BAKE_POLL.min(left)).await;
            }
        }));
    }

    async fn mark_bad(&self, reason: String) -> Result<()> {
        let bad = BadRelease { reason, rollout: self.r.id.clone(), at: now() };
        let key = format!("{}@{}", self.r.spec.app, self.r.spec.version);
        self.ctl.blocking(move |c| Ok(c.core.store.put(Tree::BadReleases, &key, &bad, true)?)).await
    }
}

#[cfg(test)]
mod tests;
