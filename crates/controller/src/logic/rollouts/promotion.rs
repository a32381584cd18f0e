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
    /// Agents per environment that have the app but no longer run the release.
    pub not_running: &'a BTreeMap<Environment, Vec<String>>,
    /// Why the release is marked bad, if it is.
    pub marked_bad: Option<&'a str>,
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
    #[error("{release} no longer runs in {env} (not on {agents}), so it is not promoted")]
    NotRunning { release: String, env: Environment, agents: String },
    #[error("rollout {rollout} of {release} in {env} ended {state} after it completed there, so it is not promoted")]
    LaterFailure { release: String, env: Environment, rollout: String, state: &'static str },
    #[error("{other} was rolled out in {env} (rollout {rollout}) after {release} completed there: complete {release} there again")]
    Interrupted { release: String, env: Environment, rollout: String, other: String },
    #[error("{release} is marked bad ({reason}), so it is not promoted")]
    MarkedBad { release: String, reason: String },
    #[error("deploys to {env} need a change note (--note or --note-file)")]
    NoteRequired { env: Environment },
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Whether a completed rollout proves its release in its environment: it covered the whole
/// environment and every agent it targeted took the release and stayed healthy.
fn proves(r: &Rollout) -> bool {
    r.spec.selector.is_empty()
        && r.spec.regions.is_empty()
        && r.converging.is_empty()
        && r.stopping.is_none()
        && !r.agents.is_empty()
        && r.agents.values().all(|a| a.step == super::AgentStep::Healthy)
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
    if rule.requires.is_empty() {
        return Ok(());
    }
    if let Some(reason) = evidence.marked_bad {
        return Err(Refusal::MarkedBad { release, reason: reason.to_owned() });
    }
    for env in &rule.requires {
        let of_release =
            |r: &&Rollout| r.spec.app == app && r.spec.version == version && r.spec.environment == *env;
        // The latest completion there that proves something: the whole environment (no
        // selector, no regions), every targeted agent healthy, none left to converge. A
        // re-deploy after a rollback starts the soak again.
        let completed = evidence
            .rollouts
            .iter()
            .filter(of_release)
            .filter(|r| r.state == RolloutState::Completed && proves(r))
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
        let later = evidence.rollouts.iter().filter(of_release).find(|r| {
            matches!(r.state, RolloutState::RolledBack | RolloutState::Aborted)
                && r.finished_at.is_some_and(|at| at >= done_at)
        });
        if let Some(r) = later {
            let state = if r.state == RolloutState::RolledBack { "rolled back" } else { "aborted" };
            return Err(Refusal::LaterFailure { release, env: env.clone(), rollout: r.id.clone(), state });
        }
        // The soak counts only while the release stays: another release rolled out there since
        // (even one rolled back again) interrupts it, and the release must complete there anew.
        let other = evidence.rollouts.iter().find(|r| {
            r.spec.app == app
                && r.spec.environment == *env
                && r.spec.version != version
                && r.created_at >= done_at
                && r.agents.values().any(|a| a.moved)
        });
        if let Some(r) = other {
            return Err(Refusal::Interrupted {
                release,
                env: env.clone(),
                rollout: r.id.clone(),
                other: format!("{}@{}", r.spec.app, r.spec.version),
            });
        }
        if let Some(agents) = evidence.unhealthy.get(env).filter(|a| !a.is_empty()) {
            return Err(Refusal::Unhealthy { release, env: env.clone(), agents: agents.join(", ") });
        }
        if let Some(agents) = evidence.not_running.get(env).filter(|a| !a.is_empty()) {
            return Err(Refusal::NotRunning { release, env: env.clone(), agents: agents.join(", ") });
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
        for a in r.agents.values_mut() {
            a.step = crate::logic::rollouts::AgentStep::Healthy;
        }
        r
    }

    type Agents = BTreeMap<Environment, Vec<String>>;

    /// One case: what the evidence holds, and the refusal wanted (`None`: accepted).
    struct Case {
        rollouts: Vec<Rollout>,
        marks: Vec<RollbackMark>,
        unhealthy: Vec<&'static str>,
        not_running: Vec<&'static str>,
        bad: Option<&'static str>,
        note: bool,
        now: i64,
        want: Option<&'static str>,
    }

    fn case(rollouts: Vec<Rollout>, now: i64, want: Option<&'static str>) -> Case {
        Case {
            rollouts,
            marks: vec![],
            unhealthy: vec![],
            not_running: vec![],
            bad: None,
            note: true,
            now,
            want,
        }
    }

    #[test]
    fn a_deploy_is_judged_on_completion_soak_rollbacks_health_and_note() {
        let rule = Rule {
            requires: vec![env("staging")],
            soak: Duration::from_secs(1800),
            require_note: true,
            ..Rule::default()
        };
        let prod = env("production");
        let done = || completed("ro-1", "1.4.2", "staging", 1000);
        let mark = |at: i64| RollbackMark { at, by: "alert:x".into(), reason: "5xx".into() };
        let with = |f: fn(&mut Rollout)| {
            let mut r = done();
            f(&mut r);
            r
        };
        let later = |state: RolloutState| {
            let mut r = completed("ro-2", "1.4.2", "staging", 1500);
            r.state = state;
            r
        };
        let cases = vec![
            case(vec![done()], 1000 + 1800, None),
            Case { note: false, ..case(vec![done()], 2800, Some("need a change note")) },
            case(vec![], 5000, Some("shop-api@1.4.2 has not completed in staging")),
            case(vec![completed("ro-1", "1.4.2", "qa", 1000)], 5000, Some("has not completed in staging")),
            case(
                vec![completed("ro-1", "1.4.1", "staging", 1000)],
                5000,
                Some("has not completed in staging"),
            ),
            case(vec![with(|r| r.state = RolloutState::Running)], 5000, Some("has not completed in staging")),
            // Completions that prove nothing: a slice of the environment, a failed or offline
            // agent, agents left to converge.
            case(
                vec![with(|r| {
                    r.spec.selector.insert("canary".into(), "yes".into());
                })],
                5000,
                Some("has not completed"),
            ),
            case(vec![with(|r| r.spec.regions = vec!["eu".into()])], 5000, Some("has not completed")),
            case(
                vec![with(|r| {
                    for a in r.agents.values_mut() {
                        a.step = crate::logic::rollouts::AgentStep::Failed;
                    }
                })],
                5000,
                Some("has not completed"),
            ),
            case(vec![with(|r| r.converging = vec!["a2".into()])], 5000, Some("has not completed")),
            case(vec![done()], 1000 + 600, Some("has run in staging for 10m of the 30m")),
            Case {
                marks: vec![mark(1200)],
                ..case(vec![done()], 5000, Some("rolled back in staging by alert:x (5xx)"))
            },
            Case { marks: vec![mark(900)], ..case(vec![done()], 5000, None) },
            case(
                vec![done(), later(RolloutState::RolledBack)],
                5000,
                Some("rollout ro-2 of shop-api@1.4.2 in staging ended rolled back"),
            ),
            case(vec![done(), later(RolloutState::Aborted)], 5000, Some("ended aborted")),
            case(
                vec![done(), {
                    let mut r = completed("ro-3", "1.5.0", "staging", 1400);
                    r.created_at = 1100;
                    r.agents.values_mut().for_each(|a| a.moved = true);
                    r
                }],
                5000,
                Some("shop-api@1.5.0 was rolled out in staging (rollout ro-3) after shop-api@1.4.2 completed there"),
            ),
            Case {
                unhealthy: vec!["s1"],
                ..case(vec![done()], 5000, Some("unhealthy in staging now (on s1)"))
            },
            Case {
                not_running: vec!["s2"],
                ..case(vec![done()], 5000, Some("no longer runs in staging (not on s2)"))
            },
            Case {
                bad: Some("canary failed"),
                ..case(vec![done()], 5000, Some("is marked bad (canary failed)"))
            },
        ];
        for (i, c) in cases.into_iter().enumerate() {
            let staging = |list: Vec<&str>| -> Agents {
                [(env("staging"), list.into_iter().map(String::from).collect())].into()
            };
            let rollbacks: BTreeMap<Environment, Vec<RollbackMark>> = [(env("staging"), c.marks)].into();
            let (unhealthy, not_running) = (staging(c.unhealthy), staging(c.not_running));
            let evidence = Evidence {
                rollouts: &c.rollouts,
                rollbacks: &rollbacks,
                unhealthy: &unhealthy,
                not_running: &not_running,
                marked_bad: c.bad,
            };
            let got = note_required(&rule, &prod, c.note)
                .and_then(|()| check(&rule, "shop-api", "1.4.2", &prod, &evidence, c.now));
            match (c.want, got) {
                (None, Ok(())) => {}
                (Some(w), Err(e)) => assert!(e.to_string().contains(w), "case {i}: {e} (wanted {w})"),
                (w, g) => panic!("case {i}: wanted {w:?}, got {g:?}"),
            }
        }
    }
}
