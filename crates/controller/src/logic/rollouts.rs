//! Rollouts: desired state moved across a fleet in waves, gated by health, persisted at every
//! step so that a restarted controller carries on to the same end state.
//!
//! One driver task per unfinished rollout owns its record: it is the only writer, and control
//! commands (pause, resume, abort, supersede) reach it through a channel and are acknowledged
//! once persisted.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use super::orders::OrderKind;
use super::{now, Controller, Error, Result};
use crate::store::Tree;

/// How many agents are pre-staged (download, verify, unpack) at once.
const STAGE_PARALLEL: usize = 16;
/// Extra time over the health deadline before an activation without an answer is a failure.
const ANSWER_SLACK: Duration = Duration::from_secs(30);

/// Failures tolerated per wave before the rollout stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    Count(u32),
    Percent(u32),
}

impl Threshold {
    pub fn parse(s: &str) -> Result<Self> {
        let bad =
            || Error::InvalidArgument(format!("--max-failures {s:?}: use a count (2) or a percentage (10%)"));
        match s.strip_suffix('%') {
            Some(p) => p.parse().ok().filter(|p| *p <= 100).map(Threshold::Percent).ok_or_else(bad),
            None => s.parse().map(Threshold::Count).map_err(|_| bad()),
        }
    }

    /// Whether `failures` among `wave_size` agents passes the threshold.
    pub fn exceeded(self, failures: usize, wave_size: usize) -> bool {
        match self {
            Threshold::Count(n) => failures > n as usize,
            Threshold::Percent(p) => failures * 100 > wave_size * p as usize,
        }
    }
}

/// What to deploy, where, and how carefully.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub app: String,
    pub version: String,
    pub regions: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub canary: u32,
    /// Cumulative percentages of the targeted agents, e.g. [10, 50, 100].
    pub waves: Vec<u32>,
    /// Region prefixes in the order regions go; waves run inside each region.
    pub region_order: Vec<String>,
    pub max_parallel: u32,
    #[serde(with = "humantime_serde")]
    pub bake: Duration,
    pub max_failures: Threshold,
    #[serde(default, with = "humantime_serde")]
    pub health_deadline: Option<Duration>,
    pub force: bool,
    #[serde(default)]
    pub downgrade: bool,
    pub supersede: bool,
    /// Set when a freeze window is overridden: the reason.
    pub override_freeze: Option<String>,
    /// Every targeted agent must take the release: an offline one fails the rollout (rolling
    /// back what it moved) instead of being left to converge when it reconnects.
    #[serde(default)]
    pub require_all: bool,
}

impl RolloutSpec {
    /// The safe defaults: a canary of one, then 10%, 50%, 100%, stop at the first failure.
    pub fn new(app: &str, version: &str) -> Self {
        Self {
            app: app.into(),
            version: version.into(),
            regions: vec![],
            selector: BTreeMap::new(),
            canary: 1,
            waves: vec![10, 50, 100],
            region_order: vec![],
            max_parallel: 10,
            bake: Duration::from_secs(0),
            max_failures: Threshold::Count(0),
            health_deadline: None,
            force: false,
            downgrade: false,
            supersede: false,
            override_freeze: None,
            require_all: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Staging,
    Running,
    Paused,
    Completed,
    /// Stopped by the failure policy; moved agents rolled back; release marked bad.
    RolledBack,
    Aborted,
    Superseded,
}

impl RolloutState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Completed
                | RolloutState::RolledBack
                | RolloutState::Aborted
                | RolloutState::Superseded
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStep {
    Pending,
    Staged,
    Activating,
    Healthy,
    Failed,
    /// Offline when its turn came: converges when it returns.
    Offline,
    RolledBack,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentProgress {
    pub id: String,
    pub region: String,
    pub wave: usize,
    pub step: AgentStep,
    /// What it ran before this rollout moved it: where a rollback sends it.
    pub previous: Option<String>,
    pub moved: bool,
    pub error: Option<String>,
    pub activated_at_ms: Option<u128>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub at: i64,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub digest: String,
    pub state: RolloutState,
    pub created_at: i64,
    pub created_by: String,
    pub finished_at: Option<i64>,
    pub waves: Vec<Vec<String>>,
    /// The wave being worked on.
    pub wave: usize,
    pub agents: BTreeMap<String, AgentProgress>,
    pub events: Vec<Event>,
    pub failure: Option<String>,
    /// Set on completion: targeted agents that did not take the release during the rollout
    /// (offline, or failed within `--max-failures`). They converge to it when they reconnect.
    #[serde(default)]
    pub converging: Vec<String>,
}

impl Rollout {
    fn event(&mut self, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(rollout = %self.id, app = %self.spec.app, "{message}");
        self.events.push(Event { at: now(), message });
    }
}

/// What an agent should run for an app, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Desired {
    pub version: String,
    pub digest: String,
    pub set_by: String,
    pub at: i64,
}

/// The desired release for agents that match a selector (late joiners), per app.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppRule {
    pub version: String,
    pub digest: String,
    pub regions: Vec<String>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BadRelease {
    pub reason: String,
    pub rollout: String,
    pub at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FreezeWindow {
    pub id: String,
    pub from: i64,
    pub to: i64,
    pub reason: String,
    pub app: Option<String>,
    pub region: Option<String>,
    pub created_by: String,
}

/// Control commands for a rollout's driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
    Supersede,
}

pub(crate) type ControlTx = mpsc::Sender<(Control, oneshot::Sender<Result<()>>)>;

fn desired_key(app: &str, agent: &str) -> String {
    format!("{app}/{agent}")
}

fn rule_key(app: &str) -> String {
    format!("rule:{app}")
}

/// Splits targeted agents into waves: the canary first, then cumulative percentages; with a
/// region order, one region after another with the waves inside each.
pub fn plan_waves(spec: &RolloutSpec, mut agents: Vec<(String, String)>) -> Vec<Vec<String>> {
    agents.sort();
    let rank = |region: &str| {
        spec.region_order
            .iter()
            .position(|p| region.starts_with(p.as_str()))
            .unwrap_or(spec.region_order.len())
    };
    let groups: Vec<Vec<String>> = if spec.region_order.is_empty() {
        vec![agents.into_iter().map(|(_, id)| id).collect()]
    } else {
        let mut by: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
        for (region, id) in agents {
            by.entry((rank(&region), region)).or_default().push(id);
        }
        by.into_values().collect()
    };
    let mut waves = Vec::new();
    let mut canary_left = spec.canary as usize;
    for group in groups {
        let n = group.len();
        let mut taken = 0usize;
        if canary_left > 0 {
            let c = canary_left.min(n);
            waves.push(group[..c].to_vec());
            taken = c;
            canary_left = 0;
        }
        let mut pcts = spec.waves.clone();
        if pcts.last() != Some(&100) {
            pcts.push(100);
        }
        for p in pcts {
            let upto = ((n * p as usize).div_ceil(100)).min(n);
            if upto > taken {
                waves.push(group[taken..upto].to_vec());
                taken = upto;
            }
        }
    }
    waves
}

impl Controller {
    fn save_rollout(&self, r: &Rollout) -> Result<()> {
        self.inner.store.put(Tree::Rollouts, &r.id, r, true)?;
        self.metrics().rollout_saved(&r.id, r.state);
        Ok(())
    }

    pub async fn rollout(&self, id: Option<String>) -> Result<Rollout> {
        self.blocking(move |c| {
            let all: Vec<(String, Rollout)> = c.inner.store.list(Tree::Rollouts)?;
            let found = match id {
                Some(id) => all.into_iter().find(|(k, _)| *k == id).map(|(_, r)| r),
                None => {
                    all.into_iter().map(|(_, r)| r).max_by(|a, b| creation_order(a).cmp(&creation_order(b)))
                }
            };
            found.ok_or_else(|| Error::InvalidArgument("no such rollout".into()))
        })
        .await
    }

    pub async fn rollouts(&self, app: Option<String>) -> Result<Vec<Rollout>> {
        self.blocking(move |c| {
            let mut all: Vec<Rollout> =
                c.inner.store.list(Tree::Rollouts)?.into_iter().map(|(_, r)| r).collect();
            all.retain(|r: &Rollout| app.as_deref().is_none_or(|a| r.spec.app == a));
            all.sort_by(|a, b| creation_order(a).cmp(&creation_order(b)));
            Ok(all)
        })
        .await
    }

    fn active_freeze(&self, app: &str, regions: &HashSet<String>) -> Result<Option<FreezeWindow>> {
        let t = now();
        Ok(self.inner.store.list::<FreezeWindow>(Tree::Freezes)?.into_iter().map(|(_, f)| f).find(|f| {
            f.from <= t
                && t < f.to
                && f.app.as_deref().is_none_or(|a| a == app)
                && f.region.as_ref().is_none_or(|r| regions.contains(r))
        }))
    }

    /// Starts a rollout. Checks everything first (release exists and is not bad, no freeze, no
    /// other active rollout of the app, agents to target), then persists it and starts its
    /// driver. Returns the rollout id.
    pub async fn deploy(&self, spec: RolloutSpec, by: &str) -> Result<String> {
        if spec.waves.iter().any(|p| *p == 0 || *p > 100) {
            return Err(Error::InvalidArgument("--waves are percentages between 1 and 100".into()));
        }
        if spec.waves.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidArgument("--waves must increase, e.g. 10%,50%,100%".into()));
        }
        if spec.max_parallel == 0 {
            return Err(Error::InvalidArgument("--max-parallel must be at least 1".into()));
        }
        if spec.override_freeze.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(Error::InvalidArgument("--override-freeze needs a --reason".into()));
        }
        let release =
            self.inner.store.release(&spec.app, &spec.version)?.ok_or_else(|| {
                Error::UnknownRelease(format!("{}@{} (push it first)", spec.app, spec.version))
            })?;
        let bad: Option<BadRelease> =
            self.inner.store.get(Tree::BadReleases, &format!("{}@{}", spec.app, spec.version))?;
        if let (Some(b), false) = (&bad, spec.force) {
            return Err(Error::FailedPrecondition(format!(
                "{}@{} is marked bad ({}, rollout {}); deploy it again only with --force",
                spec.app, spec.version, b.reason, b.rollout
            )));
        }
        let agents = self.list_agents(None).await?;
        let targets: Vec<(String, String)> = agents
            .iter()
            .filter(|a| !a.record.revoked)
            .filter(|a| spec.regions.is_empty() || spec.regions.contains(&a.record.region))
            .filter(|a| spec.selector.iter().all(|(k, v)| a.record.labels.get(k) == Some(v)))
            .map(|a| (a.record.region.clone(), a.record.id.clone()))
            .collect();
        if targets.is_empty() {
            return Err(Error::InvalidArgument("no agent matches the rollout's regions and selector".into()));
        }
        let regions: HashSet<String> = targets.iter().map(|(r, _)| r.clone()).collect();
        // Going back to an older version is a rollback, or an explicit downgrade.
        if !spec.downgrade {
            let new = semver::Version::parse(&spec.version).ok();
            let newer_running: Vec<String> = agents
                .iter()
                .filter(|a| targets.iter().any(|(_, id)| *id == a.record.id))
                .filter_map(|a| a.record.apps.iter().find(|s| s.app == spec.app))
                .filter(|s| semver::Version::parse(&s.current).ok() > new)
                .map(|s| s.current.clone())
                .collect();
            if let Some(v) = newer_running.first() {
                return Err(Error::FailedPrecondition(format!(
                    "{}@{} is older than {v}, which targeted agents run; use `convoy rollback`, or deploy with --downgrade",
                    spec.app, spec.version
                )));
            }
        }
        let active: Vec<Rollout> = self
            .rollouts(Some(spec.app.clone()))
            .await?
            .into_iter()
            .filter(|r| !r.state.is_final())
            .collect();
        if let Some(other) = active.first() {
            if !spec.supersede {
                return Err(Error::Conflict(format!(
                    "rollout {} of {} is still {:?}; wait, abort it, or pass --supersede",
                    other.id, spec.app, other.state
                )));
            }
        }
        if let Some(f) = self.active_freeze(&spec.app, &regions)? {
            if spec.override_freeze.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "deploys are frozen until {} ({}, freeze {}); use --override-freeze --reason TEXT",
                    crate::cli_time(f.to),
                    f.reason,
                    f.id
                )));
            }
        }
        if spec.supersede {
            if let Some(other) = active.first() {
                self.control(&other.id, Control::Supersede).await?;
            }
        }
        let waves = plan_waves(&spec, targets.clone());
        let id = format!("ro-{}", self.inner.store.generate_id()? + 1);
        let mut agents_progress = BTreeMap::new();
        for (w, wave) in waves.iter().enumerate() {
            for a in wave {
                let region =
                    targets.iter().find(|(_, id)| id == a).map(|(r, _)| r.clone()).unwrap_or_default();
                agents_progress.insert(
                    a.clone(),
                    AgentProgress {
                        id: a.clone(),
                        region,
                        wave: w,
                        step: AgentStep::Pending,
                        previous: None,
                        moved: false,
                        error: None,
                        activated_at_ms: None,
                    },
                );
            }
        }
        let mut r = Rollout {
            id: id.clone(),
            spec,
            digest: release.digest,
            state: RolloutState::Staging,
            created_at: now(),
            created_by: by.into(),
            finished_at: None,
            waves,
            wave: 0,
            agents: agents_progress,
            events: vec![],
            failure: None,
            converging: vec![],
        };
        let sizes: Vec<String> = r.waves.iter().map(|w| w.len().to_string()).collect();
        r.event(format!(
            "rollout of {}@{} started by {by}: {} agents in waves of {}",
            r.spec.app,
            r.spec.version,
            r.agents.len(),
            sizes.join(", ")
        ));
        if let Some(reason) = &r.spec.override_freeze {
            let msg = format!("freeze overridden: {reason}");
            r.event(msg);
        }
        let this = self.clone();
        let r2 = r.clone();
        self.blocking(move |c| c.save_rollout(&r2)).await?;
        self.notify("rollout_started", serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version, "agents": r.agents.len()}));
        this.spawn_driver(r.id.clone());
        Ok(id)
    }

    /// Sends a control command to a rollout's driver and waits until it is persisted.
    pub async fn control(&self, id: &str, cmd: Control) -> Result<()> {
        let tx = self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        let Some(tx) = tx else {
            let r = self.rollout(Some(id.to_owned())).await?;
            return Err(Error::FailedPrecondition(format!("rollout {id} is already {:?}", r.state)));
        };
        let (ack_tx, ack_rx) = oneshot::channel();
        tx.send((cmd, ack_tx))
            .await
            .map_err(|_| Error::FailedPrecondition(format!("rollout {id} has finished")))?;
        ack_rx.await.map_err(|_| Error::FailedPrecondition(format!("rollout {id} has finished")))?
    }

    /// Starts drivers for every unfinished rollout (controller start-up).
    pub async fn resume_rollouts(&self) -> Result<()> {
        for r in self.rollouts(None).await? {
            if !r.state.is_final() {
                tracing::info!(rollout = %r.id, state = ?r.state, "resuming rollout after restart");
                self.spawn_driver(r.id);
            }
        }
        Ok(())
    }

    fn spawn_driver(&self, id: String) {
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

    /// Records what a fleet rollback left each agent running (`(agent, version)` pairs), so
    /// convergence does not undo it. One flush for the whole batch.
    pub(crate) async fn record_desired(
        &self,
        app: &str,
        running: Vec<(String, String)>,
        set_by: &str,
    ) -> Result<()> {
        let (app, set_by) = (app.to_owned(), set_by.to_owned());
        self.blocking(move |c| {
            // Only releases the store holds enter desired state: what an agent reports running
            // is data about that agent, never a release to hand to others.
            let mut digests: BTreeMap<String, String> = BTreeMap::new();
            let mut unknown = Vec::new();
            for (agent, version) in &running {
                if digests.contains_key(version) {
                    continue;
                }
                match c.inner.store.release(&app, version)? {
                    Some(r) => {
                        digests.insert(version.clone(), r.digest);
                    }
                    None => {
                        tracing::warn!(%app, %version, agent_id = %agent, "reported release is not in the store: desired state unchanged for it");
                        unknown.push(version.clone());
                    }
                }
            }
            let running: Vec<(String, String)> =
                running.into_iter().filter(|(_, v)| digests.contains_key(v)).collect();
            let last = running.len().saturating_sub(1);
            for (i, (agent, version)) in running.iter().enumerate() {
                let d = Desired {
                    version: version.clone(),
                    digest: digests[version].clone(),
                    set_by: set_by.clone(),
                    at: now(),
                };
                c.inner.store.put(Tree::Desired, &desired_key(&app, agent), &d, i == last)?;
            }
            // Agents that join later follow the rollback too, not the release it undid.
            let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
            for (_, v) in &running {
                *counts.entry(v).or_default() += 1;
            }
            if let Some((version, _)) = counts.into_iter().max_by_key(|(_, n)| *n) {
                if let Some(mut rule) = c.inner.store.get::<AppRule>(Tree::Desired, &rule_key(&app))? {
                    if rule.version != *version {
                        rule.version = version.clone();
                        rule.digest = digests[version].clone();
                        c.inner.store.put(Tree::Desired, &rule_key(&app), &rule, true)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// The desired release per app for one agent.
    fn desired_for(&self, agent: &crate::store::AgentRecord) -> Result<Vec<(String, Desired)>> {
        let mut out = Vec::new();
        for (key, value) in self.inner.store.list::<serde_json::Value>(Tree::Desired)? {
            if let Some(app) = key.strip_prefix("rule:") {
                if let Ok(explicit) =
                    self.inner.store.get::<Desired>(Tree::Desired, &desired_key(app, &agent.id))
                {
                    if explicit.is_some() {
                        continue;
                    }
                }
                let Ok(rule) = serde_json::from_value::<AppRule>(value) else { continue };
                let matches = (rule.regions.is_empty() || rule.regions.contains(&agent.region))
                    && rule.selector.iter().all(|(k, v)| agent.labels.get(k) == Some(v));
                if matches {
                    out.push((
                        app.to_owned(),
                        Desired { version: rule.version, digest: rule.digest, set_by: "rule".into(), at: 0 },
                    ));
                }
            } else if let Some((app, id)) = key.split_once('/') {
                if id == agent.id {
                    if let Ok(d) = serde_json::from_value::<Desired>(value) {
                        out.push((app.to_owned(), d));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Brings one agent to its desired releases, unless a rollout of that app is in progress.
    /// Runs in the background; duplicate requests for the same agent are merged.
    pub fn converge(&self, agent_id: &str) {
        {
            let mut busy = self.inner.converging.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(agent_id.to_owned()) {
                return;
            }
        }
        let this = self.clone();
        let id = agent_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = this.converge_now(&id).await {
                tracing::warn!(agent_id = %id, error = %e, "convergence failed");
            }
            this.inner.converging.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }

    async fn converge_now(&self, agent_id: &str) -> Result<()> {
        let id = agent_id.to_owned();
        let (record, wants) = self
            .blocking(move |c| {
                let Some(rec) = c.inner.store.agent(&id)? else { return Ok((None, vec![])) };
                let wants = c.desired_for(&rec)?;
                Ok((Some(rec), wants))
            })
            .await?;
        let Some(record) = record else { return Ok(()) };
        if record.revoked {
            return Ok(());
        }
        for (app, want) in wants {
            let actual =
                record.apps.iter().find(|a| a.app == app).map(|a| a.current.clone()).unwrap_or_default();
            if actual == want.version {
                continue;
            }
            let active = self.rollouts(Some(app.clone())).await?.into_iter().any(|r| !r.state.is_final());
            if active {
                continue;
            }
            tracing::info!(agent_id, %app, from = %actual, to = %want.version, "converging to the desired release");
            let install = OrderKind::Install {
                app: app.clone(),
                version: want.version.clone(),
                digest: want.digest.clone(),
            };
            let o = self.send_order(agent_id, install, Duration::from_secs(600)).await?;
            if !o.is_done() {
                tracing::warn!(agent_id, %app, problem = %o.problem(), "convergence install did not apply");
                continue;
            }
            let activate = OrderKind::Activate {
                app: app.clone(),
                version: want.version.clone(),
                health_deadline: None,
            };
            let o = self.send_order(agent_id, activate, Duration::from_secs(600)).await?;
            if !o.is_done() {
                tracing::warn!(agent_id, %app, problem = %o.problem(), "convergence activation did not apply");
            }
        }
        Ok(())
    }

    /// Freeze windows: add, list, remove.
    pub async fn freeze_add(&self, mut f: FreezeWindow) -> Result<FreezeWindow> {
        if f.to <= f.from {
            return Err(Error::InvalidArgument("a freeze must end after it starts".into()));
        }
        if f.reason.trim().is_empty() {
            return Err(Error::InvalidArgument("a freeze needs a --reason".into()));
        }
        f.id = format!("fz-{}", self.inner.store.generate_id()? + 1);
        let f2 = f.clone();
        self.blocking(move |c| Ok(c.inner.store.put(Tree::Freezes, &f2.id, &f2, true)?)).await?;
        Ok(f)
    }

    pub async fn freezes(&self) -> Result<Vec<FreezeWindow>> {
        self.blocking(|c| {
            Ok(c.inner.store.list::<FreezeWindow>(Tree::Freezes)?.into_iter().map(|(_, f)| f).collect())
        })
        .await
    }

    pub async fn freeze_rm(&self, id: String) -> Result<()> {
        let existed = self.blocking(move |c| Ok(c.inner.store.remove(Tree::Freezes, &id)?)).await?;
        if existed {
            Ok(())
        } else {
            Err(Error::InvalidArgument("no such freeze window".into()))
        }
    }

    /// Per app: the desired release, agents per actual release, unhealthy, offline, drift.
    pub async fn fleet_status(&self) -> Result<serde_json::Value> {
        let agents = self.list_agents(None).await?;
        let this = self.clone();
        let desired: Vec<(String, Vec<(String, Desired)>)> = self
            .blocking(move |c| {
                let mut out = vec![];
                for a in c.inner.store.agents()? {
                    if !a.revoked {
                        out.push((a.id.clone(), c.desired_for(&a)?));
                    }
                }
                Ok(out)
            })
            .await?;
        let _ = this;
        let mut apps: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
        let mut add =
            |app: &str, region: &str, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
                let e = apps.entry(app.to_owned()).or_default().entry(region.to_owned()).or_insert_with(|| {
                serde_json::json!({"desired": [], "running": {}, "unhealthy": [], "offline": [], "drift": []})
            });
                if let Some(m) = e.as_object_mut() {
                    f(m);
                }
            };
        for a in agents.iter().filter(|a| !a.record.revoked) {
            let wants =
                desired.iter().find(|(id, _)| *id == a.record.id).map(|(_, w)| w.clone()).unwrap_or_default();
            let mut app_names: Vec<String> = a.record.apps.iter().map(|s| s.app.clone()).collect();
            app_names.extend(wants.iter().map(|(app, _)| app.clone()));
            app_names.sort();
            app_names.dedup();
            for app in app_names {
                let actual = a.record.apps.iter().find(|s| s.app == app);
                let current = actual
                    .map(|s| s.current.clone())
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| "(none)".into());
                let want = wants.iter().find(|(x, _)| *x == app).map(|(_, d)| d.version.clone());
                let id = a.record.id.clone();
                let online = a.online;
                let unhealthy = actual.is_some_and(|s| s.health == "unhealthy");
                add(&app, &a.record.region, &|m| {
                    if let Some(w) = &want {
                        if let Some(d) = m.get_mut("desired").and_then(|d| d.as_array_mut()) {
                            if !d.iter().any(|x| x == w) {
                                d.push(w.clone().into());
                            }
                        }
                        if *w != current {
                            if let Some(d) = m.get_mut("drift").and_then(|d| d.as_array_mut()) {
                                d.push(id.clone().into());
                            }
                        }
                    }
                    if let Some(r) = m.get_mut("running").and_then(|r| r.as_object_mut()) {
                        let n = r.get(&current).and_then(|v| v.as_u64()).unwrap_or(0);
                        r.insert(current.clone(), (n + 1).into());
                    }
                    if unhealthy {
                        if let Some(u) = m.get_mut("unhealthy").and_then(|u| u.as_array_mut()) {
                            u.push(id.clone().into());
                        }
                    }
                    if !online {
                        if let Some(o) = m.get_mut("offline").and_then(|o| o.as_array_mut()) {
                            o.push(id.clone().into());
                        }
                    }
                });
            }
        }
        Ok(serde_json::to_value(apps).unwrap_or_default())
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

/// Orders rollouts by creation: by second, then by id number (`ro-10` after `ro-9`; ids are
/// `ro-<n>` with `n` increasing, so a longer id is a later one).
fn creation_order(r: &Rollout) -> (i64, usize, &str) {
    (r.created_at, r.id.len(), &r.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(spec: &[(&str, usize)]) -> Vec<(String, String)> {
        let mut out = vec![];
        for (region, n) in spec {
            for i in 0..*n {
                out.push((region.to_string(), format!("{region}-{i}")));
            }
        }
        out
    }

    #[test]
    fn waves_canary_then_percentages_and_region_order() {
        let mut spec = RolloutSpec::new("a", "1.0.0");
        let w = plan_waves(&spec, agents(&[("eu-west", 10)]));
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 4, 5]);
        spec.region_order = vec!["ap".into(), "eu".into(), "us".into()];
        spec.waves = vec![50, 100];
        let w = plan_waves(&spec, agents(&[("us-east", 2), ("eu-west", 2), ("ap-south", 2)]));
        let regions: Vec<Vec<&str>> =
            w.iter().map(|wave| wave.iter().map(|id| id.split('-').next().unwrap()).collect()).collect();
        assert_eq!(regions, [vec!["ap"], vec!["ap"], vec!["eu"], vec!["eu"], vec!["us"], vec!["us"]]);
        spec.canary = 0;
        spec.waves = vec![100];
        spec.region_order = vec![];
        assert_eq!(plan_waves(&spec, agents(&[("x", 3)])).len(), 1);
    }

    #[test]
    fn rollouts_created_in_the_same_second_order_by_id_number() {
        let ro = |id: &str| Rollout {
            id: id.into(),
            spec: RolloutSpec::new("a", "1.0.0"),
            digest: String::new(),
            state: RolloutState::Completed,
            created_at: 1_767_225_600,
            created_by: "admin/test".into(),
            finished_at: None,
            waves: vec![],
            wave: 0,
            agents: BTreeMap::new(),
            events: vec![],
            failure: None,
            converging: vec![],
        };
        let mut list = [ro("ro-1000001"), ro("ro-10"), ro("ro-9")];
        list.sort_by(|a, b| creation_order(a).cmp(&creation_order(b)));
        let ids: Vec<&str> = list.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["ro-9", "ro-10", "ro-1000001"]);
    }

    /// Records written by the build before the rollout state machine still load, unchanged.
    #[test]
    fn records_written_by_earlier_builds_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let running = include_bytes!("rollouts/testdata/rollout-running-v1.json");
        let completed = include_bytes!("rollouts/testdata/rollout-completed-v1.json");
        store.put_raw_for_test(Tree::Rollouts, "ro-42", running.trim_ascii_end()).unwrap();
        store.put_raw_for_test(Tree::Rollouts, "ro-41", completed.trim_ascii_end()).unwrap();
        let r: Rollout = store.get(Tree::Rollouts, "ro-42").unwrap().unwrap();
        assert_eq!((r.state, r.wave, r.waves.len(), r.agents.len()), (RolloutState::Running, 2, 4, 6));
        assert_eq!(r.spec.max_failures, Threshold::Percent(25));
        assert_eq!(r.spec.bake, Duration::from_secs(120));
        assert_eq!(r.spec.health_deadline, Some(Duration::from_secs(20)));
        assert_eq!(r.spec.selector.get("tier").map(String::as_str), Some("web"));
        assert_eq!(r.agents["eu-0"].step, AgentStep::Activating);
        assert_eq!(r.agents["eu-0"].previous.as_deref(), Some("1.0.0"));
        assert_eq!(r.agents["eu-3"].step, AgentStep::Offline);
        assert_eq!(r.agents["us-0"].activated_at_ms, Some(1_767_225_605_120));
        assert_eq!(r.events.len(), 11);
        let c: Rollout = store.get(Tree::Rollouts, "ro-41").unwrap().unwrap();
        assert_eq!(
            (c.state, c.finished_at, c.converging.as_slice()),
            (RolloutState::Completed, Some(1_767_226_000), &["eu-3".to_string()][..])
        );
    }

    #[test]
    fn thresholds() {
        assert!(Threshold::parse("0").unwrap().exceeded(1, 5));
        assert!(!Threshold::parse("1").unwrap().exceeded(1, 5));
        assert!(!Threshold::parse("20%").unwrap().exceeded(1, 5));
        assert!(Threshold::parse("20%").unwrap().exceeded(2, 5));
        assert!(Threshold::parse("soon").is_err());
        assert!(Threshold::parse("120%").is_err());
    }
}
