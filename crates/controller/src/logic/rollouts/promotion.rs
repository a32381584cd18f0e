//! Promotion rules per environment, from the controller's config:
//!
//! ```toml
//! [environments.production]
//! requires = ["staging"]   # the release must have completed a rollout there first…
//! soak = "30m"             # …and run there this long without a rollback or failed health check
//! approvals = 1            # approvals from someone other than the deployer
//! approval_ttl = "24h"     # how long a deploy waits for them, and how long one stays valid
//! require_note = true      # a change note on every deploy
//! ```
//!
//! [`check`] is pure: it judges a deploy against the rule and the evidence (the app's rollouts,
//! the rollbacks recorded against releases, the agents' health), and names what is missing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Rollout, RolloutState};
use crate::logic::Environment;

/// How long a deploy waits for approvals by default, and how long an approval stays valid.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(24 * 3600);
/// The most approvals an environment may require.
pub const MAX_APPROVALS: u32 = 10;

/// One environment's rule, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub requires: Vec<Environment>,
    pub soak: Duration,
    pub approvals: u32,
    pub approval_ttl: Duration,
    pub require_note: bool,
}

impl Default for Rule {
    /// An environment without a rule: nothing required.
    fn default() -> Self {
        Self {
            requires: vec![],
            soak: Duration::ZERO,
            approvals: 0,
            approval_ttl: DEFAULT_APPROVAL_TTL,
            require_note: false,
        }
    }
}

/// Every environment's rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules(BTreeMap<Environment, Rule>);

/// An `[environments.NAME]` table as written in the config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    pub soak: Option<Duration>,
    #[serde(default)]
    pub approvals: u32,
    #[serde(default, with = "humantime_serde")]
    pub approval_ttl: Option<Duration>,
    #[serde(default)]
    pub require_note: bool,
}

impl Rules {
    /// Validates the config's tables: names, required environments that exist and do not
    /// require each other in a circle, bounded approvals and durations.
    pub fn parse(raw: &BTreeMap<String, RawRule>) -> Result<Self, String> {
        let mut rules = BTreeMap::new();
        for (name, r) in raw {
            let env = Environment::parse(name).map_err(|e| e.to_string())?;
            let mut requires = Vec::new();
            for req in &r.requires {
                let req =
                    Environment::parse(req).map_err(|e| format!("environments.{name}.requires: {e}"))?;
                if req == env {
                    return Err(format!("environments.{name}.requires names {name} itself"));
                }
                if !requires.contains(&req) {
                    requires.push(req);
                }
            }
            if r.approvals > MAX_APPROVALS {
                return Err(format!(
                    "environments.{name}.approvals is {}; at most {MAX_APPROVALS}",
                    r.approvals
                ));
            }
            let ttl = r.approval_ttl.unwrap_or(DEFAULT_APPROVAL_TTL);
            if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 24 * 3600) {
                return Err(format!("environments.{name}.approval_ttl must be between 1m and 30 days"));
            }
            let soak = r.soak.unwrap_or_default();
            if soak > Duration::from_secs(90 * 24 * 3600) {
                return Err(format!("environments.{name}.soak must be at most 90 days"));
            }
            let rule = Rule {
                requires,
                soak,
                approvals: r.approvals,
                approval_ttl: ttl,
                require_note: r.require_note,
            };
            rules.insert(env, rule);
        }
        let rules = Self(rules);
        for env in rules.0.keys() {
            rules.check_no_circle(env, &mut vec![])?;
        }
        Ok(rules)
    }

    fn check_no_circle(&self, env: &Environment, path: &mut Vec<Environment>) -> Result<(), String> {
        if path.contains(env) {
            path.push(env.clone());
            let names: Vec<&str> = path.iter().map(Environment::as_str).collect();
            return Err(format!("environments require each other in a circle: {}", names.join(" → ")));
        }
        path.push(env.clone());
        for next in self.0.get(env).map(|r| r.requires.as_slice()).unwrap_or_default() {
            self.check_no_circle(next, path)?;
        }
        path.pop();
        Ok(())
    }

    /// The rule of `env`: its table, or nothing required.
    pub fn rule(&self, env: &Environment) -> Rule {
        self.0.get(env).cloned().unwrap_or_default()
    }
}

/// A fleet rollback away from a release, in one environment: it ends the release's soak there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackMark {
    pub at: i64,
    pub by: String,
    pub reason: String,
}

/// The store key of a rollback mark.
pub fn mark_key(app: &str, version: &str, env: &Environment, at: i64) -> String {
    format!("{app}@{version}/{env}/{at:020}")
}

/// The store key prefix of every rollback mark of a release in an environment.
pub fn mark_prefix(app: &str, version: &str, env: &Environment) -> String {
    format!("{app}@{version}/{env}/")
}

/// What a deploy into an environment is judged on.
pub struct Evidence<'a> {
    /// The app's rollouts, any environment.
    pub rollouts: &'a [Rollout],
    /// Rollback marks of the release, per environment.
    pub rollbacks: &'a BTreeMap<Environment, Vec<RollbackMark>>,
    /// Agents per environment that report the release unhealthy now.
    pub unhealthy: &'a BTreeMap<Environment, Vec<String>>,
}

/// Why a deploy breaks its environment's promotion rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{release} has not completed in {env} (the {target} rule requires it)")]
    NotCompleted { release: String, env: Environment, target: Environment },
    #[error(
        "{release} has run in {env} for {} of the {} required (since rollout {rollout} completed there)",
        human(*soaked),
        human(*needed)
    )]
    Soaking { release: String, env: Environment, soaked: Duration, needed: Duration, rollout: String },
    #[error("{release} was rolled back in {env} by {by} ({reason}) after it completed there, so it is not promoted")]
    RolledBack { release: String, env: Environment, by: String, reason: String },
    #[error("{release} is unhealthy in {env} now (on {agents}), so it is not promoted")]
    Unhealthy { release: String, env: Environment, agents: String },
    #[error("deploys to {env} need a change note (--note or --note-file)")]
    NoteRequired { env: Environment },
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Refuses a deploy into `target` without a change note when its rule requires one (skipping
/// the promotion rules does not skip this).
pub fn note_required(rule: &Rule, target: &Environment, has_note: bool) -> Result<(), Refusal> {
    if rule.require_note && !has_note {
        return Err(Refusal::NoteRequired { env: target.clone() });
    }
    Ok(())
}

/// Judges a deploy of `app@version` into `target` at `now` (unix seconds) against what `rule`
/// requires of other environments.
pub fn check(
    rule: &Rule,
    app: &str,
    version: &str,
    target: &Environment,
    evidence: &Evidence<'_>,
    now: i64,
) -> Result<(), Refusal> {
    let release = format!("{app}@{version}");
    for env in &rule.requires {
        // The latest completion there: a re-deploy after a rollback starts the soak again.
        let completed = evidence
            .rollouts
            .iter()
            .filter(|r| r.spec.app == app && r.spec.version == version && r.spec.environment == *env)
            .filter(|r| r.state == RolloutState::Completed)
            .filter_map(|r| r.finished_at.map(|at| (at, r)))
            .max_by_key(|(at, _)| *at);
        let Some((done_at, rollout)) = completed else {
            return Err(Refusal::NotCompleted { release, env: env.clone(), target: target.clone() });
        };
        if let Some(m) = evidence.rollbacks.get(env).and_then(|m| m.iter().rev().find(|m| m.at >= done_at)) {
            return Err(Refusal::RolledBack {
                release,
                env: env.clone(),
                by: m.by.clone(),
                reason: m.reason.clone(),
            });
        }
        if let Some(agents) = evidence.unhealthy.get(env).filter(|a| !a.is_empty()) {
            return Err(Refusal::Unhealthy { release, env: env.clone(), agents: agents.join(", ") });
        }
        let soaked = Duration::from_secs(now.saturating_sub(done_at).max(0) as u64);
        if soaked < rule.soak {
            return Err(Refusal::Soaking {
                release,
                env: env.clone(),
                soaked,
                needed: rule.soak,
                rollout: rollout.id.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::rollouts::{plan, RolloutSpec};

    fn env(s: &str) -> Environment {
        Environment::parse(s).unwrap()
    }

    fn raw(requires: &[&str], approvals: u32) -> RawRule {
        RawRule {
            requires: requires.iter().map(|s| s.to_string()).collect(),
            approvals,
            ..Default::default()
        }
    }

    #[test]
    fn config_tables_are_validated() {
        let ok: BTreeMap<String, RawRule> =
            [("production".to_string(), raw(&["staging"], 1)), ("staging".to_string(), raw(&[], 0))].into();
        let rules = Rules::parse(&ok).unwrap();
        assert_eq!(rules.rule(&env("production")).requires, [env("staging")]);
        assert_eq!(
            rules.rule(&env("qa")),
            Rule::default(),
            "an environment without a table requires nothing"
        );
        let cases: [(Vec<(&str, RawRule)>, &str); 5] = [
            (vec![("Prod", raw(&[], 0))], "is invalid"),
            (vec![("production", raw(&["production"], 0))], "itself"),
            (vec![("a", raw(&["b"], 0)), ("b", raw(&["a"], 0))], "circle"),
            (vec![("production", raw(&[], 11))], "at most 10"),
            (
                vec![("production", RawRule { approval_ttl: Some(Duration::from_secs(1)), ..raw(&[], 1) })],
                "approval_ttl",
            ),
        ];
        for (tables, want) in cases {
            let tables: BTreeMap<String, RawRule> =
                tables.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let e = Rules::parse(&tables).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    fn completed(id: &str, version: &str, in_env: &str, finished_at: i64) -> Rollout {
        let mut spec = RolloutSpec::new("shop-api", version);
        spec.environment = env(in_env);
        let mut r =
            plan::new_rollout(id.into(), spec, "d".into(), "admin/a", 0, &[("eu".into(), "a1".into())]);
        r.state = RolloutState::Completed;
        r.finished_at = Some(finished_at);
        r
    }

    type Marks = BTreeMap<Environment, Vec<RollbackMark>>;
    type Sick = BTreeMap<Environment, Vec<String>>;

    #[test]
    fn a_deploy_is_judged_on_completion_soak_rollbacks_health_and_note() {
        let rule = Rule {
            requires: vec![env("staging")],
            soak: Duration::from_secs(1800),
            require_note: true,
            ..Rule::default()
        };
        let prod = env("production");
        let none: Marks = BTreeMap::new();
        let well: Sick = BTreeMap::new();
        let in_staging = [completed("ro-1", "1.4.2", "staging", 1000)];
        let other_env = [completed("ro-1", "1.4.2", "qa", 1000)];
        let other_version = [completed("ro-1", "1.4.1", "staging", 1000)];
        let mut running = in_staging[0].clone();
        running.state = RolloutState::Running;
        let unfinished = [running];
        let rolled_back: Marks =
            [(env("staging"), vec![RollbackMark { at: 1200, by: "alert:x".into(), reason: "5xx".into() }])]
                .into();
        let rolled_back_before: Marks =
            [(env("staging"), vec![RollbackMark { at: 900, by: "admin/a".into(), reason: "old".into() }])]
                .into();
        let sick: Sick = [(env("staging"), vec!["s1".to_string()])].into();
        // (rollouts, rollback marks, unhealthy agents, has a note, now, the refusal wanted)
        type Case<'a> = (&'a [Rollout], &'a Marks, &'a Sick, bool, i64, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (&in_staging, &none, &well, true, 1000 + 1800, None),
            (&in_staging, &none, &well, false, 1000 + 1800, Some("need a change note")),
            (&[], &none, &well, true, 5000, Some("shop-api@1.4.2 has not completed in staging")),
            (&other_env, &none, &well, true, 5000, Some("has not completed in staging")),
            (&other_version, &none, &well, true, 5000, Some("has not completed in staging")),
            (&unfinished, &none, &well, true, 5000, Some("has not completed in staging")),
            (&in_staging, &none, &well, true, 1000 + 600, Some("has run in staging for 10m of the 30m")),
            (&in_staging, &rolled_back, &well, true, 5000, Some("rolled back in staging by alert:x (5xx)")),
            (&in_staging, &rolled_back_before, &well, true, 5000, None),
            (&in_staging, &none, &sick, true, 5000, Some("unhealthy in staging now (on s1)")),
        ];
        for (i, (rollouts, rollbacks, unhealthy, note, now, want)) in cases.into_iter().enumerate() {
            let evidence = Evidence { rollouts, rollbacks, unhealthy };
            let got = note_required(&rule, &prod, note)
                .and_then(|()| check(&rule, "shop-api", "1.4.2", &prod, &evidence, now));
            match (want, got) {
                (None, Ok(())) => {}
                (Some(w), Err(e)) => assert!(e.to_string().contains(w), "case {i}: {e} (wanted {w})"),
                (w, g) => panic!("case {i}: wanted {w:?}, got {g:?}"),
            }
        }
    }
}
