//! Fleet status: per app and region, the desired release, what runs, and what drifts.

use std::collections::BTreeMap;

use super::desired::Desired;
use crate::logic::{Controller, Result};

impl Controller {
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
