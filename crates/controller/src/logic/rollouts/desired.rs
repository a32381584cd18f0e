//! Desired state: the release each agent should run per app, and convergence to it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::logic::orders::OrderKind;
use crate::logic::{now, Controller, Result};
use crate::store::Tree;

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

pub(super) fn desired_key(app: &str, agent: &str) -> String {
    format!("{app}/{agent}")
}

pub(super) fn rule_key(app: &str) -> String {
    format!("rule:{app}")
}

impl Controller {
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
    pub(super) fn desired_for(&self, agent: &crate::store::AgentRecord) -> Result<Vec<(String, Desired)>> {
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
}
