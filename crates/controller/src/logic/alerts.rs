//! The alert policy: what an alert (or a signed hook call) does to the fleet, once. The HTTP
//! edge (`hooks`) authenticates and parses a delivery into [`Request`]s; this module decides
//! and acts: pause or abort an active rollout, or roll the fleet back from the release the
//! incident is about, at most once per incident, with the intent audited first.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;

use std::time::Duration;

use crate::logic::core::{blocking_method, Core};
use crate::logic::roles::{Action, Principal};
use crate::logic::rollouts::{Control, Rollout, RolloutState};
use crate::logic::{Audit, Environment, OrderOutcome, Registry, Releases, Rollouts, Scope, Target};
use crate::store::Tree;
use crate::time::now;

/// What one alert or hook call asks for.
pub(crate) struct Request {
    pub actor: String,
    pub action: String,
    pub app: String,
    pub region: Option<String>,
    /// The environment the alert is about (production when the alert does not say).
    pub environment: Environment,
    pub reason: String,
}

/// Why a hook refuses to act at all: the record that makes it act once, or the audit intent
/// that makes it accountable, cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unavailable(pub String);

/// Who won the insert of a once-only record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This request recorded it first: it acts.
    Won,
    /// Another request (earlier or concurrent) did: this one does nothing.
    Already,
}

/// The decision on a once-only insert: a store error is never read as "not seen yet", since
/// acting on it could act twice.
pub(crate) fn claim_outcome(r: crate::logic::Result<bool>) -> Result<Claim, Unavailable> {
    match r {
        Ok(true) => Ok(Claim::Won),
        Ok(false) => Ok(Claim::Already),
        Err(e) => Err(Unavailable(format!("cannot record the delivery, so it was not acted on: {e}"))),
    }
}

/// What alerts and signed hook calls do to the fleet: reads, plus rollback, pause and abort,
/// each checked against [`Principal::Hook`]. The HTTP edge holds only this service, so hook
/// code cannot reach any other action even by mistake. Cheap to clone.
#[derive(Clone)]
pub struct AlertPolicy {
    core: Core,
    audit: Audit,
    registry: Registry,
    releases: Releases,
    rollouts: Rollouts,
}

/// When a delivery or signature was first acted on.
#[derive(serde::Serialize, Deserialize)]
struct Seen {
    at: i64,
}

impl AlertPolicy {
    pub(crate) fn new(
        core: Core,
        audit: Audit,
        registry: Registry,
        releases: Releases,
        rollouts: Rollouts,
    ) -> Self {
        Self { core, audit, registry, releases, rollouts }
    }

    blocking_method!();

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        self.core.metrics()
    }

    /// Pauses a rollout on behalf of `actor`.
    async fn pause(&self, actor: &str, rollout: &str) -> crate::logic::Result<()> {
        Principal::Hook.authorize(actor, Action::PauseRollout)?;
        self.rollouts.control(rollout, Control::Pause).await
    }

    /// Aborts a rollout on behalf of `actor`, rolling back the agents it moved.
    async fn abort(&self, actor: &str, rollout: &str) -> crate::logic::Result<()> {
        Principal::Hook.authorize(actor, Action::AbortRollout)?;
        self.rollouts.control(rollout, Control::Abort).await
    }

    /// Rolls an app back on behalf of `actor`.
    async fn rollback(
        &self,
        actor: &str,
        app: &str,
        scope: &Scope,
        from: Option<String>,
        reason: &str,
    ) -> crate::logic::Result<(Vec<(String, crate::logic::Result<OrderOutcome>, Duration)>, Duration)> {
        Principal::Hook.authorize(actor, Action::Rollback)?;
        self.rollouts.rollback(app, scope, from, None, reason, actor).await
    }

    /// Records `key` (a delivery, a signature, an incident) as acted on, atomically and
    /// durably. Returns whether this call recorded it (and so may act).
    pub(crate) async fn claim(&self, key: &str) -> crate::logic::Result<bool> {
        let key = key.to_owned();
        self.blocking(move |c| {
            Ok(c.core.store.insert_if_absent(Tree::HookSeen, &key, &Seen { at: now() })?)
        })
        .await
    }

    /// Forgets a once-only record whose action did not happen.
    async fn unclaim(&self, key: &str) -> crate::logic::Result<()> {
        let key = key.to_owned();
        self.blocking(move |c| Ok(c.core.store.remove(Tree::HookSeen, &key).map(|_| ())?)).await
    }

    /// During an active rollout: rollback aborts it (rolling back moved agents), pause pauses it.
    /// Otherwise rollback is a fleet rollback from the release the incident is about (the app's
    /// latest rollout, else what most targeted agents run), at most once per (app, region, release
    /// rolled back from): a further alert about the same incident is answered "already rolled back"
    /// and changes nothing, and never rolls the fleet one step further.
    ///
    /// The intent is audited before anything is read or done, the outcome after; an unwritable
    /// intent or once-only record refuses the whole action.
    pub(crate) async fn act(&self, r: &Request) -> Result<String, Unavailable> {
        let target = r.region.clone().unwrap_or_else(|| "*".into());
        let audit_target = format!("{}/{target}", r.app);
        let params =
            json!({"app": r.app, "region": r.region, "environment": r.environment, "reason": r.reason});
        let intent = self
            .audit
            .intent(&r.actor, &r.action, &audit_target, params.clone())
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        let result = self.decide_and_act(r, &target).await;
        let outcome = match &result {
            Ok(o) => o.clone(),
            Err(e) => format!("not acted: {e}"),
        };
        self.audit.outcome(intent, &r.actor, &r.action, &audit_target, params, &outcome).await;
        result
    }

    /// Gives back a once-only record for an action that did not happen.
    pub(crate) async fn release(&self, key: &str) {
        if let Err(e) = self.unclaim(key).await {
            tracing::error!(%key, error = %e, "could not release a once-only record: the same delivery will be answered as a duplicate");
        }
    }

    async fn decide_and_act(&self, r: &Request, target: &str) -> Result<String, Unavailable> {
        let rollouts = match self.rollouts.rollouts(Some(r.app.clone())).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(app = %r.app, error = %e, "cannot read rollouts: the hook does not act");
                return Err(Unavailable(format!("cannot read rollouts: {e}")));
            }
        };
        // Only the alert's environment: an alert about production never touches staging.
        let rollouts: Vec<Rollout> =
            rollouts.into_iter().filter(|ro| ro.spec.environment == r.environment).collect();
        // A rollout moving agents; one awaiting approval or its start moves nothing, and the
        // alert is about what runs now.
        let active = rollouts.iter().find(|x| {
            matches!(x.state, RolloutState::Staging | RolloutState::Running | RolloutState::Paused)
        });
        let outcome = match (active, r.action.as_str()) {
            (Some(ro), "rollback") => match self.abort(&r.actor, &ro.id).await {
                Ok(()) => format!("aborted rollout {} and rolled back its agents", ro.id),
                Err(e) => format!("abort of rollout {} failed: {e}", ro.id),
            },
            (Some(ro), _) => match self.pause(&r.actor, &ro.id).await {
                Ok(()) => format!("paused rollout {}", ro.id),
                Err(e) => format!("pause of rollout {} failed: {e}", ro.id),
            },
            (None, "pause") => "no active rollout to pause".to_string(),
            (None, _) => {
                // The release the incident is about: the last one a rollout completed (a rollout that
                // was rolled back, aborted or superseded left the fleet elsewhere), else what most
                // targeted agents run.
                // ... and one that covered the alert's whole scope: a rollout of a canary selector or
                // of other regions says nothing about what the alerting agents run.
                let covers = |ro: &&Rollout| {
                    ro.spec.selector.is_empty()
                        && (ro.spec.regions.is_empty()
                            || r.region
                                .as_ref()
                                .is_some_and(|want| ro.spec.regions.iter().any(|g| g == want)))
                };
                let completed =
                    rollouts.iter().rev().filter(covers).find(|ro| ro.state == RolloutState::Completed);
                let from = match completed {
                    Some(ro) => ro.spec.version.clone(),
                    None => self
                        .running_version(&r.app, r.region.as_deref(), &r.environment)
                        .await
                        .map_err(|e| Unavailable(format!("cannot read agents: {e}")))?,
                };
                if from.is_empty() {
                    return Ok(format!("no agent runs {}: nothing to roll back", r.app));
                }
                // Production keeps the key format from before environments.
                let once = if r.environment.is_default() {
                    format!("rb:{}:{target}:{from}", r.app)
                } else {
                    format!("rb:{}@{}:{target}:{from}", r.app, r.environment)
                };
                if claim_outcome(self.claim(&once).await)? == Claim::Already {
                    return Ok(format!("already rolled back from {}@{from} in {target}", r.app));
                }
                let target = r.region.clone().map(Target::Region).unwrap_or(Target::All);
                let scope = Scope { target, environment: Some(r.environment.clone()) };
                match self.rollback(&r.actor, &r.app, &scope, Some(from.clone()), &r.reason).await {
                    Ok((results, took)) => {
                        let count = |f: fn(&crate::logic::Answer) -> bool| {
                            results
                                .iter()
                                .filter(|(_, res, _)| res.as_ref().is_ok_and(|o| f(&o.answer)))
                                .count()
                        };
                        let applied = count(|a| *a == crate::logic::Answer::Applied);
                        let already = count(|a| *a == crate::logic::Answer::AlreadyInState);
                        let not_done = results.len() - applied - already;
                        if applied == 0 {
                            // Nothing moved (every agent unreachable, failing or already off it):
                            // the incident is given back so a later alert can try again.
                            self.release(&once).await;
                        }
                        format!(
                            "rolled back {applied} of {} agent(s) from {}@{from} in {} ms; {already} already off it; {not_done} not done",
                            results.len(),
                            r.app,
                            took.as_millis()
                        )
                    }
                    Err(e) => {
                        // The rollback was refused before any agent was ordered: give the incident
                        // back so a later alert can try again.
                        self.release(&once).await;
                        format!("rollback failed: {e}")
                    }
                }
            }
        };
        Ok(outcome)
    }

    /// Whether an app is known: a release of it was pushed.
    /// A store error is an error, never "unknown app".
    pub(crate) async fn knows_app(&self, app: &str) -> Result<bool, Unavailable> {
        let releases = self.releases.list_releases(Some(app.to_owned())).await.map_err(|e| {
            Unavailable(format!("cannot read releases, so the delivery was not acted on: {e}"))
        })?;
        Ok(!releases.is_empty())
    }

    /// The release most targeted agents of `env` run now (what a rollback would leave).
    async fn running_version(
        &self,
        app: &str,
        region: Option<&str>,
        env: &Environment,
    ) -> crate::logic::Result<String> {
        let agents = self.registry.list_agents(region.map(String::from)).await?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for a in agents.iter().filter(|a| a.record.environment == *env) {
            if let Some(s) = a.record.apps.iter().find(|s| s.app == app) {
                *counts.entry(s.current.clone()).or_default() += 1;
            }
        }
        Ok(counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v).unwrap_or_default())
    }
}
