//! Fleet status: per app, environment and region, the desired release, what runs, and what
//! drifts.

use std::collections::BTreeMap;

use serde::Serialize;

use super::desired::DesiredTable;
use super::Rollouts;
use crate::logic::{AgentView, Environment, Result};

/// One app in one region.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RegionStatus {
    /// The desired releases of its agents (one, unless a rollout or rollback is partway).
    pub desired: Vec<String>,
    /// Agents per release they run (`(none)`: not installed).
    pub running: BTreeMap<String, u64>,
    pub unhealthy: Vec<String>,
    pub offline: Vec<String>,
    /// Agents not running their desired release.
    pub drift: Vec<String>,
}

/// Per app, per environment, per region.
pub type FleetStatus = BTreeMap<String, BTreeMap<Environment, BTreeMap<String, RegionStatus>>>;
type Status = FleetStatus;

impl Rollouts {
    /// Per app, environment and region: the desired release, agents per actual release,
    /// unhealthy, offline, drift.
    pub async fn fleet_status(&self) -> Result<FleetStatus> {
        let agents = self.registry.list_agents(None).await?;
        let table = self.blocking(|c| DesiredTable::load(&c.core.store)).await?;
        let mut apps = Status::new();
        for a in agents.iter().filter(|a| !a.record.revoked) {
            add_agent(&mut apps, &table, a);
        }
        Ok(apps)
    }
}

fn add_agent(apps: &mut Status, table: &DesiredTable, a: &AgentView) {
    let wants = table.wants(&a.record);
    let mut names: Vec<&String> = a.record.apps.iter().map(|s| &s.app).collect();
    names.extend(wants.iter().map(|(app, _)| app));
    names.sort();
    names.dedup();
    let id = &a.record.id;
    for app in names {
        let actual = a.record.apps.iter().find(|s| s.app == *app);
        let current =
            actual.map(|s| s.current.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| "(none)".into());
        let s = apps
            .entry(app.clone())
            .or_default()
            .entry(a.record.environment.clone())
            .or_default()
            .entry(a.record.region.clone())
            .or_default();
        if let Some((_, want)) = wants.iter().find(|(x, _)| x == app) {
            if !s.desired.contains(&want.version) {
                s.desired.push(want.version.clone());
            }
            if want.version != current {
                s.drift.push(id.clone());
            }
        }
        *s.running.entry(current).or_default() += 1;
        if actual.is_some_and(|s| s.health == "unhealthy") {
            s.unhealthy.push(id.clone());
        }
        if !a.online {
            s.offline.push(id.clone());
        }
    }
}
