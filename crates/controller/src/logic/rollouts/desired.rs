//! Desired state: the release each agent should run per app, and convergence to it — when an
//! agent connects, and every [`RECONCILE_EVERY`] for online agents whose reported release
//! differs from the desired one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fleet::Fleet;
use super::machine::Reply;
use super::Rollout;
use super::Rollouts;
use crate::logic::orders::OrderKind;
use crate::logic::{now, Environment, Error, Result};
use crate::store::{AgentRecord, Store, Tree};

/// How often online agents are checked against their desired state.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// How long a convergence order may take.
const CONVERGE_WAIT: Duration = Duration::from_secs(600);

/// What an agent should run for an app, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub version: String,
    pub digest: String,
    pub set_by: String,
    pub at: i64,
}

/// The desired release for agents that match a selector (late joiners), per app and
/// environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppRule {
    pub version: String,
    pub digest: String,
    pub regions: Vec<String>,
    pub selector: BTreeMap<String, String>,
}

fn desired_key(app: &str, agent: &str) -> String {
    format!("{app}/{agent}")
}

/// The key of an app's rule in an environment: `rule:APP` for production (as before
/// environments existed), `rule:APP@ENV` for the others (app names hold no `@`).
fn rule_key(app: &str, env: &Environment) -> String {
    if env.is_default() {
        format!("rule:{app}")
    } else {
        format!("rule:{app}@{env}")
    }
}

/// The desired-state tree, read once: per agent and app, and per app and environment for
/// agents that match.
#[derive(Default)]
pub(super) struct DesiredTable {
    explicit: BTreeMap<(String, String), Desired>,
    rules: BTreeMap<(String, Environment), AppRule>,
}

impl DesiredTable {
    /// Reads the tree; records that do not parse are left out, as if absent.
    pub(super) fn load(store: &Store) -> Result<Self> {
        let mut table = Self::default();
        for (key, value) in store.list::<serde_json::Value>(Tree::Desired)? {
            if let Some(rest) = key.strip_prefix("rule:") {
                let (app, env) = match rest.split_once('@') {
                    Some((app, env)) => match Environment::parse(env) {
                        Ok(env) => (app, env),
                        Err(_) => continue,
                    },
                    None => (rest, Environment::default()),
                };
                if let Ok(rule) = serde_json::from_value::<AppRule>(value) {
                    table.rules.insert((app.to_owned(), env), rule);
                }
            } else if let Some((app, agent)) = key.split_once('/') {
                if let Ok(d) = serde_json::from_value::<Desired>(value) {
                    table.explicit.insert((app.to_owned(), agent.to_owned()), d);
                }
            }
        }
        Ok(table)
    }

    /// The desired release per app for one agent: its own, else the app's rule if it matches.
    pub(super) fn wants(&self, agent: &AgentRecord) -> Vec<(String, Desired)> {
        let apps: BTreeSet<&String> = self
            .rules
            .keys()
            .filter(|(_, env)| *env == agent.environment)
            .map(|(app, _)| app)
            .chain(self.explicit.keys().map(|(app, _)| app))
            .collect();
        let mut out = Vec::new();
        for app in apps {
            if let Some(d) = self.explicit.get(&(app.clone(), agent.id.clone())) {
                out.push((app.clone(), d.clone()));
                continue;
            }
            let Some(rule) = self.rules.get(&(app.clone(), agent.environment.clone())) else { continue };
            let matches = (rule.regions.is_empty() || rule.regions.contains(&agent.region))
                && rule.selector.iter().all(|(k, v)| agent.labels.get(k) == Some(v));
            if matches {
                let d = Desired {
                    version: rule.version.clone(),
                    digest: rule.digest.clone(),
                    set_by: "rule".into(),
                    at: 0,
                };
                out.push((app.clone(), d));
            }
        }
        out
    }
}

/// The apps whose desired release `agent` does not report running.
pub(super) fn drift(agent: &AgentRecord, wants: Vec<(String, Desired)>) -> Vec<(String, Desired)> {
    wants
        .into_iter()
        .filter(|(app, want)| {
            let actual =
                agent.apps.iter().find(|a| a.app == *app).map(|a| a.current.as_str()).unwrap_or_default();
            actual != want.version
        })
        .collect()
}

impl Rollouts {
    /// A completed rollout's release becomes the desired one for every agent it targeted, and
    /// for agents that join later and match its regions and selector.
    pub(super) async fn record_completion(&self, r: &Rollout) -> Result<()> {
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
        let (app, env) = (r.spec.app.clone(), r.spec.environment.clone());
        let ids: Vec<String> = r.agents.keys().cloned().collect();
        self.blocking(move |c| {
            for id in &ids {
                c.core.store.put(Tree::Desired, &desired_key(&app, id), &desired, false)?;
            }
            c.core.store.put(Tree::Desired, &rule_key(&app, &env), &rule, true)?;
            Ok(())
        })
        .await
    }

    /// Records what a fleet rollback left each agent running (`(agent, environment, version)`),
    /// so convergence does not undo it. `targeted` counts the agents the rollback targeted per
    /// environment. One flush for the whole batch.
    pub(crate) async fn record_desired(
        &self,
        app: &str,
        running: Vec<(String, Environment, String)>,
        set_by: &str,
        target: &crate::logic::Target,
        targeted: BTreeMap<Environment, usize>,
    ) -> Result<()> {
        let (app, set_by) = (app.to_owned(), set_by.to_owned());
        let target = target.clone();
        self.blocking(move |c| {
            // Only releases the store holds enter desired state: what an agent reports running
            // is data about that agent, never a release to hand to others.
            let mut digests: BTreeMap<String, String> = BTreeMap::new();
            let mut unknown = Vec::new();
            for (agent, _, version) in &running {
                if digests.contains_key(version) {
                    continue;
                }
                match c.core.store.release(&app, version)? {
                    Some(r) => {
                        digests.insert(version.clone(), r.digest);
                    }
                    None => {
                        tracing::warn!(%app, %version, agent_id = %agent, "reported release is not in the store: desired state unchanged for it");
                        unknown.push(version.clone());
                    }
                }
            }
            let running: Vec<(String, Environment, String)> =
                running.into_iter().filter(|(_, _, v)| digests.contains_key(v)).collect();
            let last = running.len().saturating_sub(1);
            for (i, (agent, _, version)) in running.iter().enumerate() {
                let d = Desired {
                    version: version.clone(),
                    digest: digests[version].clone(),
                    set_by: set_by.clone(),
                    at: now(),
                };
                c.core.store.put(Tree::Desired, &desired_key(&app, agent), &d, i == last)?;
            }
            // Agents that join later follow the rollback too, not the release it undid: per
            // environment, since each has its own rule.
            for (env, targeted) in &targeted {
                let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
                for (_, _, v) in running.iter().filter(|(_, e, _)| e == env) {
                    *counts.entry(v).or_default() += 1;
                }
                // And only when most of the targeted agents report the same release: answers are
                // the agents' word, and a few of them must not choose the release for everyone.
                let majority = counts.into_iter().max_by_key(|(_, n)| *n).filter(|(_, n)| n * 2 > *targeted);
                let Some((version, _)) = majority else { continue };
                if let Some(mut rule) = c.core.store.get::<AppRule>(Tree::Desired, &rule_key(&app, env))? {
                    // Only a rollback of everything the rule covers changes it: a rollback of a
                    // few agents (or one agent's answer) speaks for those agents alone.
                    let whole = match &target {
                        crate::logic::Target::All => true,
                        crate::logic::Target::Region(r) => rule.regions == [r.clone()],
                        _ => false,
                    };
                    if whole && rule.version != *version {
                        rule.version = version.clone();
                        rule.digest = digests[version].clone();
                        c.core.store.put(Tree::Desired, &rule_key(&app, env), &rule, true)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// Apps with a rollout moving agents in an environment (staging, running or paused; not
    /// one waiting for approval or its start): convergence leaves them to it there.
    async fn apps_rolling_out(&self) -> Result<BTreeSet<(String, Environment)>> {
        Ok(self
            .rollouts(None)
            .await?
            .into_iter()
            .filter(|r| {
                matches!(
                    r.state,
                    super::RolloutState::Staging | super::RolloutState::Running | super::RolloutState::Paused
                )
            })
            .map(|r| (r.spec.app, r.spec.environment))
            .collect())
    }

    /// Brings one agent to its desired releases, unless a rollout of that app is in progress.
    /// Runs in the background; duplicate requests for the same agent are merged.
    pub fn converge(&self, agent_id: &str) {
        self.converge_with(self.sessions(), agent_id);
    }

    /// [`Self::converge`] over `fleet`.
    pub(crate) fn converge_with<F: Fleet>(&self, fleet: F, agent_id: &str) {
        {
            let mut busy = self.inner.converging.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(agent_id.to_owned()) {
                return;
            }
        }
        let this = self.clone();
        let id = agent_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = this.converge_now(&fleet, &id).await {
                tracing::warn!(agent_id = %id, error = %e, "convergence failed");
            }
            this.inner.converging.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }

    async fn converge_now<F: Fleet>(&self, fleet: &F, agent_id: &str) -> Result<()> {
        let id = agent_id.to_owned();
        let (record, wants) = self
            .blocking(move |c| {
                let Some(rec) = c.core.store.agent(&id)? else { return Ok((None, vec![])) };
                let wants = DesiredTable::load(&c.core.store)?.wants(&rec);
                Ok((Some(rec), wants))
            })
            .await?;
        let Some(record) = record.filter(|r| !r.revoked) else { return Ok(()) };
        let drifted = drift(&record, wants);
        if drifted.is_empty() {
            return Ok(());
        }
        let rolling_out = self.apps_rolling_out().await?;
        for (app, want) in drifted {
            if rolling_out.contains(&(app.clone(), record.environment.clone())) {
                continue;
            }
            let actual =
                record.apps.iter().find(|a| a.app == app).map(|a| a.current.clone()).unwrap_or_default();
            tracing::info!(agent_id, %app, from = %actual, to = %want.version, "converging to the desired release");
            let install =
                OrderKind::Install { app: app.clone(), version: want.version.clone(), digest: want.digest };
            let activate =
                OrderKind::Activate { app: app.clone(), version: want.version, health_deadline: None };
            for (what, order) in [("install", install), ("activation", activate)] {
                match fleet.send(agent_id, order, CONVERGE_WAIT).await {
                    Reply::Done => {}
                    Reply::NotDone(problem) => {
                        tracing::warn!(agent_id, %app, %problem, "convergence {what} did not apply");
                        break;
                    }
                    Reply::Offline => return Err(Error::Offline(agent_id.to_owned())),
                    Reply::Error(e) => return Err(Error::NoAnswer(e)),
                }
            }
        }
        Ok(())
    }

    /// Starts the periodic reconcile: every [`RECONCILE_EVERY`] until the controller stops.
    pub(crate) fn start_reconcile(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + RECONCILE_EVERY, RECONCILE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = this.reconcile(&this.sessions()).await {
                            tracing::warn!(error = %e, "reconcile failed");
                        }
                        if let Err(e) = this.expire_waiting().await {
                            tracing::warn!(error = %e, "expiring rollouts awaiting approval failed");
                        }
                    }
                    () = this.core.shutdown.cancelled() => return,
                }
            }
        });
    }

    /// One reconcile pass: starts convergence for every online, unrevoked agent whose reported
    /// release of an app differs from the desired one, unless a rollout of the app is in
    /// progress or the agent is busy with the app. Returns the agents it started.
    pub(crate) async fn reconcile<F: Fleet>(&self, fleet: &F) -> Result<Vec<String>> {
        let (agents, table) =
            self.blocking(|c| Ok((c.core.store.agents()?, DesiredTable::load(&c.core.store)?))).await?;
        let rolling_out = self.apps_rolling_out().await?;
        let mut started = Vec::new();
        for agent in agents.iter().filter(|a| !a.revoked && fleet.online(&a.id)) {
            let due = drift(agent, table.wants(agent)).into_iter().any(|(app, _)| {
                !rolling_out.contains(&(app.clone(), agent.environment.clone()))
                    && !agent.apps.iter().any(|s| s.app == app && s.busy)
            });
            if due {
                self.converge_with(fleet.clone(), &agent.id);
                started.push(agent.id.clone());
            }
        }
        Ok(started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::rollouts::testing::{
        agent_record, controller, eventually, is_activate, FakeAgent, FakeFleet,
    };
    use crate::logic::rollouts::{plan, RolloutSpec};

    fn rule(version: &str, regions: &[&str], selector: &[(&str, &str)]) -> AppRule {
        AppRule {
            version: version.into(),
            digest: format!("sha256:{version}"),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn an_agent_wants_its_own_release_else_the_rule_it_matches() {
        let mut table = DesiredTable::default();
        let prod = Environment::default();
        table.rules.insert(("shop-api".into(), prod), rule("1.1.0", &["eu-west"], &[("tier", "web")]));
        let mut web = agent_record("eu-0", "eu-west", "shop-api", "1.0.0");
        web.labels.insert("tier".into(), "web".into());
        let db = agent_record("eu-1", "eu-west", "shop-api", "1.0.0");
        let mut us = web.clone();
        us.region = "us-east".into();
        let version = |t: &DesiredTable, a: &AgentRecord| {
            t.wants(a).into_iter().map(|(_, d)| d.version).collect::<Vec<_>>()
        };
        assert_eq!(version(&table, &web), ["1.1.0"]);
        assert!(version(&table, &db).is_empty(), "the rule's selector does not match");
        assert!(version(&table, &us).is_empty(), "nor its regions");
        let mut staging = web.clone();
        staging.environment = Environment::parse("staging").unwrap();
        assert!(version(&table, &staging).is_empty(), "nor its environment");
        let rolled_back =
            Desired { version: "1.0.0".into(), digest: "d".into(), set_by: "rollback".into(), at: 1 };
        table.explicit.insert(("shop-api".into(), "eu-0".into()), rolled_back);
        assert_eq!(version(&table, &web), ["1.0.0"], "its own desired release wins over the rule");
        assert!(drift(&web, table.wants(&web)).is_empty());
    }

    #[tokio::test]
    async fn the_reconcile_converges_online_agents_that_drift_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path()).await;
        let mut busy = agent_record("eu-3", "eu-west", "shop-api", "1.0.0");
        busy.apps[0].busy = true;
        let records = vec![
            agent_record("eu-0", "eu-west", "shop-api", "1.0.0"),
            agent_record("eu-1", "eu-west", "shop-api", "1.1.0"),
            agent_record("eu-2", "eu-west", "shop-api", "1.0.0"),
            busy,
            agent_record("us-0", "us-east", "shop-api", "1.0.0"),
        ];
        let store = ctl.store().clone();
        tokio::task::spawn_blocking(move || {
            for r in &records {
                store.put_agent_for_test(r).unwrap();
            }
            store
                .put(
                    Tree::Desired,
                    &rule_key("shop-api", &Environment::default()),
                    &rule("1.1.0", &["eu-west"], &[]),
                    true,
                )
                .unwrap();
        })
        .await
        .unwrap();
        let fleet = FakeFleet::new(&["eu-0", "eu-1", "eu-3", "us-0"], "1.0.0");
        fleet.state().agents.insert("eu-2".into(), FakeAgent::default());
        // eu-1 runs the desired release, eu-2 is offline, eu-3 is busy, us-0 is not in the rule.
        assert_eq!(ctl.reconcile(&fleet).await.unwrap(), ["eu-0"]);
        eventually("eu-0 converges", || async { (fleet.sent(is_activate) == ["eu-0"]).then_some(()) }).await;
        let sent = fleet.state().sent.clone();
        assert!(
            matches!(&sent[..], [(a, OrderKind::Install { version: v1, digest, .. }), (b, OrderKind::Activate { version: v2, .. })]
                if a == "eu-0" && b == "eu-0" && v1 == "1.1.0" && v2 == "1.1.0" && digest == "sha256:1.1.0"),
            "{sent:?}"
        );
        // While a rollout of the app is in progress, the reconcile leaves it to the rollout.
        let targets = [("eu-west".to_string(), "eu-0".to_string())];
        let r = plan::new_rollout(
            "ro-9".into(),
            RolloutSpec::new("shop-api", "1.2.0"),
            "d".into(),
            "admin/a",
            0,
            &targets,
        );
        ctl.save(&r).await.unwrap();
        eventually("eu-0's convergence over", || async {
            (!ctl.inner.converging.lock().unwrap().contains("eu-0")).then_some(())
        })
        .await;
        assert!(ctl.reconcile(&fleet).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn only_a_rollback_of_the_rules_whole_scope_changes_the_rule() {
        use crate::logic::Target;
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path()).await;
        let store = ctl.store().clone();
        tokio::task::spawn_blocking(move || {
            for v in ["1.0.0", "1.1.0"] {
                let rec = crate::store::ReleaseRecord {
                    app: "shop-api".into(),
                    version: v.into(),
                    digest: format!("sha256:{v}"),
                    size: 1,
                    created_at: 0,
                    pushed_at: 0,
                    pushed_by: "admin/a".into(),
                    signers: vec![],
                    unpacked_size: 1,
                    files: 1,
                };
                store.insert_release(&rec).unwrap();
            }
            store
                .put(
                    Tree::Desired,
                    &rule_key("shop-api", &Environment::default()),
                    &rule("1.1.0", &["eu-west"], &[]),
                    true,
                )
                .unwrap();
        })
        .await
        .unwrap();
        let rule_version = || async {
            let store = ctl.store().clone();
            tokio::task::spawn_blocking(move || {
                store
                    .get::<AppRule>(Tree::Desired, &rule_key("shop-api", &Environment::default()))
                    .unwrap()
                    .unwrap()
                    .version
            })
            .await
            .unwrap()
        };
        let back = vec![("eu-0".to_string(), Environment::default(), "1.0.0".to_string())];
        let targeted = |n: usize| BTreeMap::from([(Environment::default(), n)]);
        // One agent's rollback, or another region's, speaks for those agents only.
        for target in [Target::Agents(vec!["eu-0".into()]), Target::Region("us-east".into())] {
            ctl.record_desired("shop-api", back.clone(), "rollback", &target, targeted(1)).await.unwrap();
            assert_eq!(rule_version().await, "1.1.0", "{target:?} changed the rule");
        }
        // A rollback of the rule's whole region moves it, when most targeted agents agree.
        let eu = Target::Region("eu-west".into());
        ctl.record_desired("shop-api", back.clone(), "rollback", &eu, targeted(3)).await.unwrap();
        assert_eq!(rule_version().await, "1.1.0", "one answer of three targeted agents");
        ctl.record_desired("shop-api", back.clone(), "rollback", &eu, targeted(1)).await.unwrap();
        assert_eq!(rule_version().await, "1.0.0");
    }
}
