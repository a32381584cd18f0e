//! Rollouts: desired state moved across a fleet in waves, gated by health, persisted at every
//! step so that a restarted controller carries on to the same end state.
//!
//! One driver task per unfinished rollout owns its record: it is the only writer, and control
//! commands (pause, resume, abort, supersede) reach it through a channel and are acknowledged
//! once persisted.
//!
//! - [`spec`]: the rollout spec and its validation.
//! - [`plan`]: which agents a rollout targets, in which waves.
//! - [`driver`]: the task that runs a rollout.
//! - [`desired`]: desired state per agent and app, and convergence to it.
//! - [`freeze`]: freeze windows.
//! - [`status`]: fleet status.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{now, Controller, Error, Result};
use crate::store::Tree;

pub mod desired;
pub mod driver;
pub mod freeze;
pub mod plan;
pub mod spec;
pub mod status;

pub use desired::{AppRule, Desired};
pub use freeze::FreezeWindow;
pub use plan::plan_waves;
pub use spec::{RolloutSpec, Threshold};

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
        let running = include_bytes!("testdata/rollout-running-v1.json");
        let completed = include_bytes!("testdata/rollout-completed-v1.json");
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
