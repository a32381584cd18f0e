//! For tests of the driver and convergence: a real controller on a real store (no listeners,
//! no sessions), and a fake [`Fleet`] whose agents answer orders as told.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::fleet::{Fleet, Report};
use super::machine::Reply;
use super::Rollouts;
use crate::logic::orders::OrderKind;
use crate::logic::Result;
use crate::store::{AgentRecord, AppStatusRecord};

/// The rollouts service of a controller on a fresh store in `dir`.
pub(crate) async fn controller(dir: &std::path::Path) -> Rollouts {
    let opts = crate::init::InitOptions {
        data_dir: dir.to_path_buf(),
        trust_domain: "convoy.test".into(),
        ..Default::default()
    };
    let config = crate::config::Config::load(&crate::init::init(&opts).unwrap()).unwrap();
    tokio::task::spawn_blocking(move || crate::server::Prepared::open(&config))
        .await
        .unwrap()
        .unwrap()
        .controller
        .rollouts()
        .clone()
}

/// An agent record, as enrollment and heartbeats leave it.
pub(crate) fn agent_record(id: &str, region: &str, app: &str, running: &str) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        region: region.into(),
        labels: Default::default(),
        first_seen: 0,
        last_seen: 0,
        cert_serial: String::new(),
        cert_not_after: 0,
        agent_version: String::new(),
        releases: vec![],
        revoked: false,
        apps: vec![AppStatusRecord { app: app.into(), current: running.into(), ..Default::default() }],
        previous_serial: None,
        previous_serial_until: 0,
        cert_serial_used: false,
        environment: Default::default(),
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct FakeAgent {
    pub online: bool,
    pub running: Option<String>,
    pub unhealthy: bool,
    /// Activations are not answered until released.
    pub hold: bool,
}

#[derive(Default)]
pub(crate) struct State {
    pub agents: BTreeMap<String, FakeAgent>,
    /// Every order, in the order sent.
    pub sent: Vec<(String, OrderKind)>,
    /// Activations being answered now, and the most at once.
    pub activating: BTreeSet<String>,
    pub peak: usize,
}

/// A fleet of fake agents: installs apply, activations apply (once released, if held),
/// rollbacks go to the release named.
#[derive(Clone, Default)]
pub(crate) struct FakeFleet {
    state: Arc<Mutex<State>>,
    released: Arc<Notify>,
}

impl FakeFleet {
    /// Online agents running `running`.
    pub(crate) fn new(agents: &[&str], running: &str) -> Self {
        let f = Self::default();
        for a in agents {
            let agent = FakeAgent { online: true, running: Some(running.into()), ..Default::default() };
            f.state().agents.insert(a.to_string(), agent);
        }
        f
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Answers `agent`'s held activation.
    pub(crate) fn release(&self, agent: &str) {
        if let Some(a) = self.state().agents.get_mut(agent) {
            a.hold = false;
        }
        self.released.notify_waiters();
    }

    /// Answers every held activation.
    pub(crate) fn release_all(&self) {
        for a in self.state().agents.values_mut() {
            a.hold = false;
        }
        self.released.notify_waiters();
    }

    /// The agents sent `what` orders, in order.
    pub(crate) fn sent(&self, what: fn(&OrderKind) -> bool) -> Vec<String> {
        self.state().sent.iter().filter(|(_, o)| what(o)).map(|(a, _)| a.clone()).collect()
    }

    fn held(&self, agent: &str) -> bool {
        self.state().agents.get(agent).is_some_and(|a| a.hold)
    }

    async fn activate(&self, agent: &str, version: &str) -> Reply {
        {
            let mut s = self.state();
            s.activating.insert(agent.to_owned());
            s.peak = s.peak.max(s.activating.len());
        }
        loop {
            let released = self.released.notified();
            if !self.held(agent) {
                break;
            }
            released.await;
        }
        let mut s = self.state();
        s.activating.remove(agent);
        if let Some(a) = s.agents.get_mut(agent) {
            a.running = Some(version.to_owned());
        }
        Reply::Done
    }
}

pub(crate) fn is_activate(o: &OrderKind) -> bool {
    matches!(o, OrderKind::Activate { .. })
}

pub(crate) fn is_rollback(o: &OrderKind) -> bool {
    matches!(o, OrderKind::Rollback { .. })
}

impl Fleet for FakeFleet {
    fn send(&self, agent: &str, order: OrderKind, _timeout: Duration) -> impl Future<Output = Reply> + Send {
        let (this, agent) = (self.clone(), agent.to_owned());
        async move {
            let online = {
                let mut s = this.state();
                s.sent.push((agent.clone(), order.clone()));
                s.agents.get(&agent).is_some_and(|a| a.online)
            };
            if !online {
                return Reply::Offline;
            }
            match order {
                OrderKind::Activate { version, .. } => this.activate(&agent, &version).await,
                OrderKind::Rollback { to, .. } => {
                    if let Some(a) = this.state().agents.get_mut(&agent) {
                        a.running = to;
                    }
                    Reply::Done
                }
                OrderKind::Install { .. } | OrderKind::Logs { .. } => Reply::Done,
            }
        }
    }

    fn online(&self, agent: &str) -> bool {
        self.state().agents.get(agent).is_some_and(|a| a.online)
    }

    fn reports(&self, _app: &str, agents: &[String]) -> impl Future<Output = Result<Vec<Report>>> + Send {
        let s = self.state();
        let reports = agents
            .iter()
            .filter_map(|id| {
                let a = s.agents.get(id)?;
                Some(Report {
                    agent: id.clone(),
                    online: a.online,
                    running: a.running.clone(),
                    unhealthy: a.unhealthy,
                    busy: false,
                })
            })
            .collect();
        std::future::ready(Ok(reports))
    }
}

/// Polls `check` every 10 ms until it gives a value; panics after 10 s.
pub(crate) async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
