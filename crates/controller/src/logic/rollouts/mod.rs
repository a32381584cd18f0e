//! Rollouts: desired state moved across a fleet in waves, gated by health, persisted at every
//! step so that a restarted controller carries on to the same end state.
//!
//! - [`spec`]: the rollout spec and its validation (domain errors, worded by the gRPC layer).
//! - [`plan`]: which agents a rollout targets, and in which waves.
//! - [`machine`]: **every decision of a running rollout** — the next wave, `max_parallel`,
//!   thresholds, bake, pause, abort, rollback, completion — as a pure `step` function.
//! - [`driver`]: one task per unfinished rollout, the only writer of its record: runs the
//!   machine's commands, persists each step before acting on it, and resumes from the stored
//!   step at start-up. Control commands (pause, resume, abort, supersede) reach it through a
//!   channel and are acknowledged once persisted.
//! - [`fleet`]: the agents as the driver reaches them ([`fleet::Fleet`]; the live sessions in
//!   production).
//! - [`desired`]: desired state per agent and app; convergence on connect and every
//!   [`desired::RECONCILE_EVERY`].
//! - [`freeze`]: freeze windows, one-off and recurring. [`status`]: fleet status.
//! - [`windows`]: deploy windows, the local times a region may activate in (pure).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::core::{blocking_method, Core};
use super::{now, Audit, Error, Orders, Registry, Result};
use crate::store::Tree;

pub mod approval;
mod deploy;
pub mod desired;
pub mod driver;
pub mod fleet;
pub mod freeze;
pub mod machine;
pub mod plan;
pub mod promotion;
mod rollback;
pub mod spec;
pub mod status;
#[cfg(test)]
pub(crate) mod testing;
pub mod windows;

pub use desired::{AppRule, Desired};
pub use freeze::FreezeWindow;
pub use plan::plan_waves;
pub use spec::{RolloutSpec, SpecError, Threshold};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Waits for approvals from admins other than the deployer; nothing moves.
    AwaitingApproval,
    /// Approved (or needing no approval), waits for its start time; nothing moves.
    Scheduled,
    Staging,
    Running,
    Paused,
    Completed,
    /// Stopped by the failure policy; moved agents rolled back; release marked bad.
    RolledBack,
    Aborted,
    Superseded,
    /// An approver rejected it before it started.
    Rejected,
    /// Not approved within the approval time: it never started.
    Expired,
}

impl RolloutState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Completed
                | RolloutState::RolledBack
                | RolloutState::Aborted
                | RolloutState::Superseded
                | RolloutState::Rejected
                | RolloutState::Expired
        )
    }

    /// Whether it has not started moving agents yet (and has no driver running the machine).
    pub fn is_waiting(self) -> bool {
        matches!(self, RolloutState::AwaitingApproval | RolloutState::Scheduled)
    }
}

/// A region waiting for its deploy window to open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowWait {
    pub region: String,
    /// When the window opens (Unix seconds).
    pub opens: i64,
    /// The opening as configured, `02:00 Europe/Berlin`.
    pub at: String,
}

/// An approval (or the rejection) of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a rollout into an environment with `approvals = N` waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalGate {
    pub required: u32,
    /// How long the rollout waits for them, and how long each stays valid.
    pub ttl_secs: u64,
    pub approvals: Vec<Approval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Approval>,
}

impl ApprovalGate {
    /// Approvals still valid at `now`.
    pub fn valid(&self, now: i64) -> usize {
        self.approvals.iter().filter(|a| a.at + self.ttl_secs as i64 > now).count()
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

/// Why a deploy was refused before it started; the gRPC layer adds how to proceed anyway.
#[derive(Debug, thiserror::Error)]
pub enum DeployRefusal {
    /// Older than what targeted agents run: that is a rollback, or an explicit downgrade.
    #[error("{release} is older than {running}, which targeted agents run")]
    Downgrade { release: String, running: String },
    /// Another rollout of the app has not ended.
    #[error("rollout {id} of {app} is still {state}")]
    RolloutActive { id: String, app: String, state: String },
    /// A freeze window covers the targets.
    #[error("deploys are frozen until {until} ({reason}, freeze {id})")]
    Frozen { until: String, reason: String, id: String },
    /// The release failed a rollout before.
    #[error("{release} is marked bad ({reason}, rollout {rollout})")]
    MarkedBad { release: String, reason: String, rollout: String },
    /// The environment's promotion rule is not met.
    #[error("{0}")]
    Promotion(Box<promotion::Refusal>),
}

impl From<promotion::Refusal> for DeployRefusal {
    fn from(r: promotion::Refusal) -> Self {
        Self::Promotion(Box::new(r))
    }
}

/// One line of a rollout's history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    pub at: i64,
    pub message: String,
}

/// Why a rollout stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopKind {
    /// A wave's failures passed the threshold: the release is at fault and is marked bad.
    ReleaseFailed,
    /// With `require_all`, an agent could not be reached: rolled back, the release not blamed.
    AgentsMissing,
    /// An admin or an alert aborted it.
    Aborted,
}

/// Set when a rollout stops and rolls back what it moved: a restarted driver finishes the
/// rollback instead of carrying on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopping {
    pub kind: StopKind,
    pub reason: String,
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
    pub events: Vec<LogEntry>,
    pub failure: Option<String>,
    /// Set on completion: targeted agents that did not take the release during the rollout
    /// (offline, or failed within `--max-failures`). They converge to it when they reconnect.
    #[serde(default)]
    pub converging: Vec<String>,
    /// Set once the rollout stops and rolls back (absent from records that never stopped, and
    /// from records written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping: Option<Stopping>,
    /// Set when its environment requires approvals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGate>,
    /// Regions whose deploy window is closed now: their agents wait to be activated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub window_waits: Vec<WindowWait>,
    /// Orders in flight and the bake in progress: the driver's run, never stored.
    #[serde(skip)]
    pub(crate) run: machine::Run,
}

impl Rollout {
    /// Adds a line to the history and logs it.
    fn event(&mut self, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(rollout = %self.id, app = %self.spec.app, "{message}");
        self.events.push(LogEntry { at: now(), message });
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BadRelease {
    pub reason: String,
    pub rollout: String,
    pub at: i64,
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

/// Rollouts, fleet rollbacks, desired state, freezes and fleet status. Cheap to clone.
#[derive(Clone)]
pub struct Rollouts {
    core: Core,
    registry: Registry,
    orders: Orders,
    audit: Audit,
    inner: Arc<State>,
}

struct State {
    /// The control channel of each running rollout's driver.
    drivers: Mutex<HashMap<String, ControlTx>>,
    /// Agents being converged now: one convergence per agent at a time.
    converging: Mutex<HashSet<String>>,
    /// Serializes changes to rollouts that have no driver (approvals, rejections, expiry,
    /// aborts of rollouts awaiting approval) and the start of their driver.
    gate: tokio::sync::Mutex<()>,
    /// Serializes deploys, from the check for another active rollout to the new record and
    /// its driver: two deploys of one app cannot both find none active.
    deploying: tokio::sync::Mutex<()>,
}

impl Rollouts {
    pub(crate) fn new(core: Core, registry: Registry, orders: Orders, audit: Audit) -> Self {
        Self {
            core,
            registry,
            orders,
            audit,
            inner: Arc::new(State {
                drivers: Mutex::new(HashMap::new()),
                converging: Mutex::new(HashSet::new()),
                gate: tokio::sync::Mutex::new(()),
                deploying: tokio::sync::Mutex::new(()),
            }),
        }
    }

    blocking_method!();

    /// The store, for tests that arrange or inspect records.
    #[cfg(test)]
    pub(crate) fn store(&self) -> &crate::store::Store {
        &self.core.store
    }

    fn save_rollout(&self, r: &Rollout) -> Result<()> {
        self.core.store.put(Tree::Rollouts, &r.id, r, true)?;
        self.core.metrics().rollout_saved(&r.id, r.state);
        Ok(())
    }

    /// Persists a rollout record (flushed), off the async threads.
    async fn save(&self, r: &Rollout) -> Result<()> {
        let r = r.clone();
        self.blocking(move |c| c.save_rollout(&r)).await
    }

    pub async fn rollout(&self, id: Option<String>) -> Result<Rollout> {
        self.blocking(move |c| {
            let all: Vec<(String, Rollout)> = c.core.store.list(Tree::Rollouts)?;
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
                c.core.store.list(Tree::Rollouts)?.into_iter().map(|(_, r)| r).collect();
            all.retain(|r: &Rollout| app.as_deref().is_none_or(|a| r.spec.app == a));
            all.sort_by(|a, b| creation_order(a).cmp(&creation_order(b)));
            Ok(all)
        })
        .await
    }

    /// Sends a control command to a rollout's driver and waits until it is persisted (an abort
    /// or a supersede: until the rollout has ended).
    pub async fn control(&self, id: &str, cmd: Control) -> Result<()> {
        let tx = self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        let Some(tx) = tx else {
            // A rollout awaiting approval has no driver: the approval gate handles it.
            return self.control_waiting(id, cmd).await;
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
            // One awaiting approval moves when approved; the reconcile tick expires it.
            if !r.state.is_final() && r.state != RolloutState::AwaitingApproval {
                tracing::info!(rollout = %r.id, state = ?r.state, "resuming rollout after restart");
                self.spawn_driver(r.id);
            }
        }
        Ok(())
    }
}

/// Orders rollouts by creation: by second, then by id number (`ro-10` after `ro-9`; ids are
/// `ro-<n>` with `n` increasing, so a longer id is a later one).
fn creation_order(r: &Rollout) -> (i64, usize, &str) {
    (r.created_at, r.id.len(), &r.id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rollouts_created_in_the_same_second_order_by_id_number() {
        let ro = |id: &str| {
            let targets = [("eu-west".to_string(), "eu-0".to_string())];
            let mut r = plan::new_rollout(
                id.into(),
                RolloutSpec::new("a", "1.0.0"),
                String::new(),
                "admin/test",
                0,
                &targets,
            );
            r.created_at = 1_767_225_600;
            r
        };
        let mut list = [ro("ro-1000001"), ro("ro-10"), ro("ro-9")];
        list.sort_by(|a, b| creation_order(a).cmp(&creation_order(b)));
        let ids: Vec<&str> = list.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["ro-9", "ro-10", "ro-1000001"]);
    }

    /// Records written by the build before the rollout state machine load unchanged, and a
    /// record that never stopped is written back in exactly the same shape.
    #[test]
    fn records_written_by_earlier_builds_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let running = include_bytes!("testdata/rollout-running-v1.json").trim_ascii_end();
        let completed = include_bytes!("testdata/rollout-completed-v1.json").trim_ascii_end();
        store.put_raw_for_test(Tree::Rollouts, "ro-42", running).unwrap();
        store.put_raw_for_test(Tree::Rollouts, "ro-41", completed).unwrap();
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
        assert_eq!(r.stopping, None);
        let c: Rollout = store.get(Tree::Rollouts, "ro-41").unwrap().unwrap();
        assert_eq!((c.state, c.finished_at), (RolloutState::Completed, Some(1_767_226_000)));
        assert_eq!(c.converging, ["eu-3"]);
        for (record, bytes) in [(&r, running), (&c, completed)] {
            let mut written = serde_json::to_value(record).unwrap();
            written.as_object_mut().unwrap().insert("v".into(), 1.into());
            let stored: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            assert_eq!(written, stored, "{}", record.id);
        }
    }
}
