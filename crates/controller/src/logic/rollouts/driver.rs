//! The rollout driver: one task per unfinished rollout, the only writer of its record.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use super::desired::{desired_key, rule_key, AppRule, Desired};
use super::{AgentStep, BadRelease, Control, Rollout, RolloutState};
use crate::logic::orders::OrderKind;
use crate::logic::{now, Controller, Error, Result};
use crate::store::Tree;

/// How many agents are pre-staged (download, verify, unpack) at once.
const STAGE_PARALLEL: usize = 16;
/// Extra time over the health deadline before an activation without an answer is a failure.
const ANSWER_SLACK: Duration = Duration::from_secs(30);

impl Controller {
    pub(super) fn spawn_driver(&self, id: String) {
        let (tx, rx) = mpsc::channel(8);
        self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), tx);
        let this = self.clone();
        let stop = self.inner.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = this.drive(&id, rx) => {
                    if let Err(e) = r {
                        tracing::error!(rollout = %id, error = %e, "rollout driver failed");
                    }
                }
                () = stop.cancelled() => {}
            }
            this.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }

    async fn load(&self, id: &str) -> Result<Rollout> {
        self.rollout(Some(id.to_owned())).await
    }

    async fn save(&self, r: &Rollout) -> Result<()> {
        let r = r.clone();
        self.blocking(move |c| c.save_rollout(&r)).await
    }

    /// Applies a control command to the record. Returns true when the driver should stop.
    async fn apply_control(&self, r: &mut Rollout, cmd: Control) -> Result<()> {
        match (cmd, r.state) {
            (_, s) if s.is_final() => {
                return Err(Error::FailedPrecondition(format!("rollout {} is already {s:?}", r.id)))
            }
            (Control::Pause, RolloutState::Paused)
            | (Control::Resume, RolloutState::Running | RolloutState::Staging) => {}
            (Control::Pause, _) => {
                r.state = RolloutState::Paused;
                r.event("paused");
            }
            (Control::Resume, _) => {
                r.state = RolloutState::Running;
                r.event("resumed");
            }
            (Control::Abort, _) => {
                r.failure = Some("aborted".into());
                r.event("abort requested: rolling back the agents this rollout moved");
                self.roll_back_moved(r).await;
                r.state = RolloutState::Aborted;
                r.finished_at = Some(now());
                self.notify("rolled_back", serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version, "reason": "aborted"}));
            }
            (Control::Supersede, _) => {
                r.state = RolloutState::Superseded;
                r.finished_at = Some(now());
                r.event("superseded by a newer rollout");
            }
        }
        self.save(r).await
    }

    async fn drive(
        &self,
        id: &str,
        mut cmds: mpsc::Receiver<(Control, oneshot::Sender<Result<()>>)>,
    ) -> Result<()> {
        let mut r = self.load(id).await?;
        loop {
            if r.state.is_final() {
                return Ok(());
            }
            match r.state {
                RolloutState::Paused => {
                    let Some((cmd, ack)) = cmds.recv().await else { return Ok(()) };
                    let res = self.apply_control(&mut r, cmd).await;
                    let _ = ack.send(res);
                }
                RolloutState::Staging => {
                    self.stage(&mut r).await?;
                    if r.state == RolloutState::Staging {
                        r.state = RolloutState::Running;
                    }
                    self.save(&r).await?;
                }
                RolloutState::Running => {
                    if r.wave >= r.waves.len() {
                        self.complete(&mut r).await?;
                        return Ok(());
                    }
                    match self.run_wave(&mut r, &mut cmds).await? {
                        WaveEnd::Done => {
                            if let Some(reason) = missing_agents(&r) {
                                self.fail(&mut r, reason, false).await?;
                                return Ok(());
                            }
                            let w = r.wave;
                            r.event(format!("wave {} of {} done", w + 1, r.waves.len()));
                            self.notify("wave_done", serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version, "wave": w + 1, "waves": r.waves.len()}));
                            let last = w + 1 >= r.waves.len();
                            if !last && !r.spec.bake.is_zero() {
                                self.save(&r).await?;
                                if let Some(reason) = self.bake(&mut r, &mut cmds).await? {
                                    self.fail(&mut r, reason, true).await?;
                                    return Ok(());
                                }
                                if r.state != RolloutState::Running {
                                    continue;
                                }
                            }
                            r.wave += 1;
                            self.save(&r).await?;
                        }
                        WaveEnd::Interrupted => {}
                        WaveEnd::Failed(reason) => {
                            self.fail(&mut r, reason, true).await?;
                            return Ok(());
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Pre-stages the release on every targeted online agent, so waves are only activations.
    async fn stage(&self, r: &mut Rollout) -> Result<()> {
        r.event("pre-staging: download, verify and unpack on every targeted agent");
        let sem = Arc::new(Semaphore::new(STAGE_PARALLEL));
        let mut set = JoinSet::new();
        for (id, p) in &r.agents {
            if p.step != AgentStep::Pending {
                continue;
            }
            let this = self.clone();
            let (id, sem) = (id.clone(), sem.clone());
            let kind = OrderKind::Install {
                app: r.spec.app.clone(),
                version: r.spec.version.clone(),
                digest: r.digest.clone(),
            };
            set.spawn(async move {
                let _p = sem.acquire_owned().await;
                let res = this.send_order(&id, kind, Duration::from_secs(600)).await;
                (id, res)
            });
        }
        while let Some(j) = set.join_next().await {
            let (id, res) = j.map_err(|e| Error::Internal(e.to_string()))?;
            let Some(p) = r.agents.get_mut(&id) else { continue };
            match res {
                Ok(o) if o.is_done() => p.step = AgentStep::Staged,
                Ok(o) => {
                    p.error = Some(o.problem());
                    r.event(format!("agent {id} could not stage: {}", o.problem()));
                }
                Err(Error::Offline(_)) => {}
                Err(e) => {
                    p.error = Some(e.to_string());
                }
            }
        }
        Ok(())
    }

    async fn run_wave(
        &self,
        r: &mut Rollout,
        cmds: &mut mpsc::Receiver<(Control, oneshot::Sender<Result<()>>)>,
    ) -> Result<WaveEnd> {
        let w = r.wave;
        let wave: Vec<String> = r.waves[w].clone();
        let mut todo: VecDeque<String> = wave
            .iter()
            .filter(|id| {
                matches!(
                    r.agents.get(*id).map(|p| p.step),
                    Some(AgentStep::Pending | AgentStep::Staged | AgentStep::Activating)
                )
            })
            .cloned()
            .collect();
        if !todo.is_empty() {
            r.event(format!("wave {} of {}: activating {} agent(s)", w + 1, r.waves.len(), todo.len()));
        }
        let deadline = r.spec.health_deadline;
        let mut inflight = JoinSet::new();
        let agents_now = self.list_agents(None).await?;
        loop {
            while r.state == RolloutState::Running && inflight.len() < r.spec.max_parallel as usize {
                let Some(id) = todo.pop_front() else { break };
                let view = agents_now.iter().find(|a| a.record.id == id);
                let online = self.is_online(&id);
                let Some(p) = r.agents.get_mut(&id) else { continue };
                if !online {
                    p.step = AgentStep::Offline;
                    r.event(format!("agent {id} is offline: pending, it converges when it returns"));
                    continue;
                }
                if p.previous.is_none() {
                    p.previous = view
                        .and_then(|v| v.record.apps.iter().find(|a| a.app == r.spec.app))
                        .map(|a| a.current.clone())
                        .filter(|c| !c.is_empty() && *c != r.spec.version);
                }
                p.step = AgentStep::Activating;
                let this = self.clone();
                let (app, version, digest) = (r.spec.app.clone(), r.spec.version.clone(), r.digest.clone());
                inflight.spawn(async move {
                    let wait = deadline.unwrap_or(Duration::from_secs(60)) + ANSWER_SLACK;
                    // Install first (a no-op when pre-staged), then activate.
                    let install = OrderKind::Install { app: app.clone(), version: version.clone(), digest };
                    let res = match this.send_order(&id, install, Duration::from_secs(600)).await {
                        Ok(o) if !o.is_done() => Ok(o),
                        Ok(_) => {
                            this.send_order(
                                &id,
                                OrderKind::Activate { app, version, health_deadline: deadline },
                                wait,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    (id, res)
                });
            }
            if inflight.is_empty() {
                break;
            }
            tokio::select! {
                Some(j) = inflight.join_next() => {
                    let (id, res) = j.map_err(|e| Error::Internal(e.to_string()))?;
                    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                    let Some(p) = r.agents.get_mut(&id) else { continue };
                    match res {
                        Ok(o) if o.is_done() => {
                            p.step = AgentStep::Healthy;
                            p.moved = true;
                            p.activated_at_ms = Some(started);
                        }
                        Ok(o) => {
                            p.step = AgentStep::Failed;
                            p.moved = true;
                            p.error = Some(o.problem());
                            r.event(format!("agent {id} failed: {}", o.problem()));
                        }
                        Err(Error::Offline(_)) => {
                            p.step = AgentStep::Offline;
                            r.event(format!("agent {id} went offline: pending"));
                        }
                        Err(e) => {
                            p.step = AgentStep::Failed;
                            p.moved = true;
                            p.error = Some(e.to_string());
                            r.event(format!("agent {id} failed: {e}"));
                        }
                    }
                    self.save(r).await?;
                    let failures = wave.iter().filter(|id| r.agents.get(*id).is_some_and(|p| p.step == AgentStep::Failed)).count();
                    if r.spec.max_failures.exceeded(failures, wave.len()) {
                        // Let in-flight activations finish so they can be rolled back too.
                        while let Some(j) = inflight.join_next().await {
                            if let Ok((id, res)) = j {
                                if let Some(p) = r.agents.get_mut(&id) {
                                    p.moved = true;
                                    p.step = if res.as_ref().is_ok_and(|o| o.is_done()) { AgentStep::Healthy } else { AgentStep::Failed };
                                }
                            }
                        }
                        return Ok(WaveEnd::Failed(format!(
                            "{failures} failure(s) in wave {} of {} passed --max-failures",
                            w + 1,
                            r.waves.len()
                        )));
                    }
                }
                Some((cmd, ack)) = cmds.recv() => {
                    let res = self.apply_control(r, cmd).await;
                    let _ = ack.send(res);
                    if r.state.is_final() {
                        return Ok(WaveEnd::Interrupted);
                    }
                }
            }
        }
        if r.state != RolloutState::Running || !todo.is_empty() {
            return Ok(WaveEnd::Interrupted);
        }
        Ok(WaveEnd::Done)
    }

    /// Waits `bake` while watching the wave's agents; an agent reporting unhealthy is a failure.
    async fn bake(
        &self,
        r: &mut Rollout,
        cmds: &mut mpsc::Receiver<(Control, oneshot::Sender<Result<()>>)>,
    ) -> Result<Option<String>> {
        r.event(format!("baking for {}", humantime::format_duration(r.spec.bake)));
        let until = tokio::time::Instant::now() + r.spec.bake;
        let wave = r.waves[r.wave].clone();
        loop {
            let agents = self.list_agents(None).await?;
            let unhealthy: Vec<String> = agents
                .iter()
                .filter(|a| wave.contains(&a.record.id))
                .filter(|a| a.record.apps.iter().any(|s| s.app == r.spec.app && s.health == "unhealthy"))
                .map(|a| a.record.id.clone())
                .collect();
            if !unhealthy.is_empty() {
                for id in &unhealthy {
                    if let Some(p) = r.agents.get_mut(id) {
                        p.step = AgentStep::Failed;
                        p.error = Some("unhealthy while baking".into());
                    }
                }
                let failures = wave
                    .iter()
                    .filter(|id| r.agents.get(*id).is_some_and(|p| p.step == AgentStep::Failed))
                    .count();
                if r.spec.max_failures.exceeded(failures, wave.len()) {
                    return Ok(Some(format!(
                        "agent(s) {} became unhealthy while baking",
                        unhealthy.join(", ")
                    )));
                }
            }
            if tokio::time::Instant::now() >= until {
                return Ok(None);
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250).min(until - tokio::time::Instant::now())) => {}
                Some((cmd, ack)) = cmds.recv() => {
                    let res = self.apply_control(r, cmd).await;
                    let _ = ack.send(res);
                    if r.state != RolloutState::Running {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Rolls back every agent this rollout moved, to the release it ran before.
    async fn roll_back_moved(&self, r: &mut Rollout) {
        let mut set = JoinSet::new();
        for (id, p) in &r.agents {
            if !p.moved || p.step == AgentStep::RolledBack {
                continue;
            }
            let this = self.clone();
            let id = id.clone();
            let kind = OrderKind::Rollback {
                app: r.spec.app.clone(),
                from: r.spec.version.clone(),
                to: p.previous.clone(),
                reason: format!("rollout {}", r.id),
            };
            let failed_itself = p.step == AgentStep::Failed;
            set.spawn(async move {
                let res = this.send_order(&id, kind, Duration::from_secs(120)).await;
                (id, res, failed_itself)
            });
        }
        while let Some(Ok((id, res, failed_itself))) = set.join_next().await {
            let Some(p) = r.agents.get_mut(&id) else { continue };
            match res {
                // "Already in state": the agent no longer runs the release (a failed activation
                // reverted itself to its known-good one).
                Ok(o) if o.is_done() => p.step = AgentStep::RolledBack,
                Ok(o) => {
                    let why = if failed_itself { " (its own activation had failed)" } else { "" };
                    r.event(format!("rollback of agent {id}{why} did not apply: {}", o.problem()));
                }
                Err(e) => r.event(format!("rollback of agent {id} failed: {e}")),
            }
        }
    }

    /// The failure policy: stop, roll back every moved agent, and (when the release is at
    /// fault, `mark_bad`) mark it bad. A `--require-all` rollout that met an offline agent
    /// fails without blaming the release.
    async fn fail(&self, r: &mut Rollout, reason: String, mark_bad: bool) -> Result<()> {
        r.event(format!("stopping: {reason}"));
        self.notify("rollout_failed", serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version, "reason": reason}));
        r.failure = Some(reason.clone());
        self.roll_back_moved(r).await;
        if mark_bad {
            let bad = BadRelease { reason: reason.clone(), rollout: r.id.clone(), at: now() };
            let key = format!("{}@{}", r.spec.app, r.spec.version);
            self.blocking(move |c| Ok(c.inner.store.put(Tree::BadReleases, &key, &bad, true)?)).await?;
        }
        r.state = RolloutState::RolledBack;
        r.finished_at = Some(now());
        let (event, outcome) = if mark_bad {
            (
                format!("rolled back; {}@{} is marked bad", r.spec.app, r.spec.version),
                "rolled back; release marked bad",
            )
        } else {
            ("rolled back the agents this rollout moved".to_string(), "rolled back")
        };
        r.event(event);
        self.notify(
            "rolled_back",
            serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version}),
        );
        let moved: Vec<String> = r.agents.values().filter(|p| p.moved).map(|p| p.id.clone()).collect();
        self.audit(
            "controller",
            "rollout.auto_rollback",
            &format!("{}@{}", r.spec.app, r.spec.version),
            serde_json::json!({"rollout": r.id, "reason": reason, "agents": moved}),
            outcome,
        )
        .await;
        self.save(r).await
    }

    /// Success: the release becomes the desired one for every targeted agent (offline ones
    /// converge when they return) and for agents that join later and match.
    async fn complete(&self, r: &mut Rollout) -> Result<()> {
        let desired = Desired {
            version: r.spec.version.clone(),
            digest: r.digest.clone(),
            set_by: r.id.clone(),
            at: now(),
        };
        let rule = AppRule {
            version: r.spec.version.clone(),
            digest: r.digest.clone(),
            regions: r.spec.regions.clone(),
            selector: r.spec.selector.clone(),
        };
        let app = r.spec.app.clone();
        let ids: Vec<String> = r.agents.keys().cloned().collect();
        self.blocking(move |c| {
            for id in &ids {
                c.inner.store.put(Tree::Desired, &desired_key(&app, id), &desired, false)?;
            }
            c.inner.store.put(Tree::Desired, &rule_key(&app), &rule, true)?;
            Ok(())
        })
        .await?;
        let pending: Vec<String> =
            r.agents.values().filter(|p| p.step != AgentStep::Healthy).map(|p| p.id.clone()).collect();
        r.state = RolloutState::Completed;
        r.finished_at = Some(now());
        self.notify("rollout_completed", serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version, "pending": pending}));
        let summary = completion_summary(r);
        r.event(summary);
        r.converging = pending.clone();
        self.save(r).await?;
        for id in pending {
            self.converge(&id);
        }
        Ok(())
    }
}

/// The final event of a completed rollout: "every targeted agent" only when that is true,
/// otherwise how many did not take the release, which, and that they converge on reconnect.
fn completion_summary(r: &Rollout) -> String {
    let ids = |step: &dyn Fn(AgentStep) -> bool| -> Vec<String> {
        r.agents.values().filter(|p| step(p.step)).map(|p| p.id.clone()).collect()
    };
    let total = r.agents.len();
    let healthy = ids(&|s| s == AgentStep::Healthy).len();
    if healthy == total {
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
            "; {} failed within --max-failures ({}) and will be retried",
            failed.len(),
            failed.join(", ")
        ));
    }
    msg
}

/// With `--require-all`: why the wave just done must fail the rollout (an agent in it was
/// offline or unreachable and did not take the release).
fn missing_agents(r: &Rollout) -> Option<String> {
    if !r.spec.require_all {
        return None;
    }
    let missing: Vec<String> = r.waves[r.wave]
        .iter()
        .filter(|id| r.agents.get(*id).is_some_and(|p| p.step == AgentStep::Offline))
        .cloned()
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} targeted agent(s) offline or unreachable ({}) and --require-all is set",
            missing.len(),
            missing.join(", ")
        )
    })
}

enum WaveEnd {
    Done,
    Interrupted,
    Failed(String),
}
