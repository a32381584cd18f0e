//! Starting a rollout: every check a deploy must pass (spec, release, targets in the
//! environment, downgrade, another active rollout, the environment's promotion rule, freezes),
//! then the record, in the state it starts in: awaiting approval, scheduled, or staging.

use std::collections::BTreeMap;

use super::promotion::{self, Evidence, RollbackMark};
use super::{
    plan, ApprovalGate, BadRelease, Control, DeployRefusal, Rollout, RolloutSpec, RolloutState, Rollouts,
};
use crate::logic::{now, Environment, Error, Result};
use crate::store::{AgentRecord, ReleaseRecord, Tree};

/// Agent ids per environment.
type Agents = BTreeMap<Environment, Vec<String>>;

impl Rollouts {
    /// Starts a rollout. Checks everything first (spec, release exists and is not bad, agents
    /// of the environment to target, no downgrade unless asked, no other active rollout of the
    /// app in the environment, the environment's promotion rule unless skipped, no freeze at
    /// its start), then persists it. A rollout into an environment that requires approvals
    /// waits for them; one with a later start time waits for it; the others start now.
    /// Returns the rollout id.
    pub async fn deploy(&self, spec: RolloutSpec, by: &str) -> Result<String> {
        let t = now();
        spec.validate(t)?;
        let _one_at_a_time = self.inner.deploying.lock().await;
        let release = self.deployable_release(&spec).await?;
        let agents: Vec<_> = self.registry.list_agents(None).await?.into_iter().map(|a| a.record).collect();
        let targets = plan::targets(&spec, &agents);
        if targets.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no agent in environment {} matches the rollout's regions and selector",
                spec.environment
            )));
        }
        // Going back to an older version is a rollback, or an explicit downgrade.
        if let Some(v) = plan::newer_running(&spec, &agents, &targets) {
            return Err(DeployRefusal::Downgrade {
                release: format!("{}@{}", spec.app, spec.version),
                running: v.to_string(),
            }
            .into());
        }
        let history = self.rollouts(Some(spec.app.clone())).await?;
        let active = history.iter().find(|r| !r.state.is_final() && r.spec.environment == spec.environment);
        if let (Some(other), false) = (active, spec.supersede) {
            return Err(DeployRefusal::RolloutActive {
                id: other.id.clone(),
                app: spec.app.clone(),
                state: format!("{:?}", other.state),
            }
            .into());
        }
        let rule = self.core.settings.promotion.rule(&spec.environment);
        promotion::note_required(&rule, &spec.environment, spec.note.is_some())
            .map_err(DeployRefusal::from)?;
        if spec.skip_promotion.is_none() {
            self.promotion_holds(&spec, &history, &agents, t).await?;
        }
        let starts = spec.start_at.unwrap_or(t).max(t);
        let (app, regions) = (spec.app.clone(), plan::regions(&targets));
        let freeze = self.blocking(move |c| c.active_freeze(&app, &regions, starts)).await?;
        if let (Some((f, until)), None) = (freeze, &spec.override_freeze) {
            return Err(DeployRefusal::Frozen {
                until: crate::cli_time(until),
                id: f.label(),
                reason: f.reason,
            }
            .into());
        }
        if let (Some(other), true) = (active, spec.supersede) {
            self.control(&other.id, Control::Supersede).await?;
        }
        let id = format!("ro-{}", self.blocking(|c| Ok(c.core.store.generate_id()?)).await? + 1);
        let mut r = plan::new_rollout(id, spec, release.digest, by, t, &targets);
        let sizes: Vec<String> = r.waves.iter().map(|w| w.len().to_string()).collect();
        r.event(format!(
            "rollout of {}@{} to {} created by {by}: {} agents in waves of {}",
            r.spec.app,
            r.spec.version,
            r.spec.environment,
            r.agents.len(),
            sizes.join(", ")
        ));
        if let Some(reason) = r.spec.override_freeze.clone() {
            r.event(format!("freeze overridden: {reason}"));
        }
        if let Some(reason) = r.spec.skip_promotion.clone() {
            r.event(format!("promotion rules of {} skipped: {reason}", r.spec.environment));
        }
        if rule.approvals > 0 {
            r.state = RolloutState::AwaitingApproval;
            r.approval = Some(ApprovalGate {
                required: rule.approvals,
                ttl_secs: rule.approval_ttl.as_secs(),
                approvals: vec![],
                rejected: None,
            });
            r.event(format!(
                "waiting for {} approval(s) from admins other than {by}, for {}",
                rule.approvals,
                humantime::format_duration(rule.approval_ttl)
            ));
        } else if starts > t {
            r.state = RolloutState::Scheduled;
            r.event(format!("scheduled to start at {}", crate::cli_time(starts)));
        }
        self.save(&r).await?;
        let kind = match r.state {
            RolloutState::AwaitingApproval => "rollout_awaiting_approval",
            RolloutState::Scheduled => "rollout_scheduled",
            _ => "rollout_started",
        };
        self.core.notify(kind, created_event(&r));
        if r.state != RolloutState::AwaitingApproval {
            self.spawn_driver(r.id.clone());
        }
        Ok(r.id)
    }

    /// The checks a waiting rollout passes again when it starts: its release is not marked
    /// bad (unless forced) and its environment's promotion rule holds (unless skipped).
    pub(super) async fn start_checks(&self, r: &Rollout) -> Result<()> {
        self.deployable_release(&r.spec).await?;
        // The environment's rule as it is now (the config may have changed since the deploy).
        let rule = self.core.settings.promotion.rule(&r.spec.environment);
        promotion::note_required(&rule, &r.spec.environment, r.spec.note.is_some())
            .map_err(DeployRefusal::from)?;
        let approved = r.approval.as_ref().map_or(0, |g| g.valid(now()));
        if approved < rule.approvals as usize {
            return Err(Error::FailedPrecondition(format!(
                "{} now requires {} approval(s) and rollout {} has {approved}",
                r.spec.environment, rule.approvals, r.id
            )));
        }
        if r.spec.skip_promotion.is_none() {
            let history = self.rollouts(Some(r.spec.app.clone())).await?;
            let agents: Vec<_> =
                self.registry.list_agents(None).await?.into_iter().map(|a| a.record).collect();
            self.promotion_holds(&r.spec, &history, &agents, now()).await?;
        }
        Ok(())
    }

    /// The release a spec names, refused when unknown or (without `force`) marked bad.
    async fn deployable_release(&self, spec: &RolloutSpec) -> Result<ReleaseRecord> {
        let (app, version) = (spec.app.clone(), spec.version.clone());
        let (release, bad) = self
            .blocking(move |c| {
                let release = c.core.store.release(&app, &version)?;
                let bad: Option<BadRelease> =
                    c.core.store.get(Tree::BadReleases, &format!("{app}@{version}"))?;
                Ok((release, bad))
            })
            .await?;
        let release = release
            .ok_or_else(|| Error::UnknownRelease(format!("{}@{} (push it first)", spec.app, spec.version)))?;
        if let (Some(b), false) = (&bad, spec.force) {
            return Err(DeployRefusal::MarkedBad {
                release: format!("{}@{}", spec.app, spec.version),
                reason: b.reason.clone(),
                rollout: b.rollout.clone(),
            }
            .into());
        }
        Ok(release)
    }

    /// Judges `spec` against its environment's promotion rule now: the app's rollouts
    /// (`history`), the agents as they report, the rollback marks and the bad mark.
    pub(super) async fn promotion_holds(
        &self,
        spec: &RolloutSpec,
        history: &[Rollout],
        agents: &[AgentRecord],
        t: i64,
    ) -> Result<()> {
        let rule = self.core.settings.promotion.rule(&spec.environment);
        if rule.requires.is_empty() {
            return Ok(());
        }
        let (rollbacks, unhealthy, not_running) =
            self.promotion_evidence(spec, &rule.requires, agents).await?;
        let key = format!("{}@{}", spec.app, spec.version);
        let bad: Option<BadRelease> =
            self.blocking(move |c| Ok(c.core.store.get(Tree::BadReleases, &key)?)).await?;
        let evidence = Evidence {
            rollouts: history,
            rollbacks: &rollbacks,
            unhealthy: &unhealthy,
            not_running: &not_running,
            marked_bad: bad.as_ref().map(|b| b.reason.as_str()),
        };
        promotion::check(&rule, &spec.app, &spec.version, &spec.environment, &evidence, t)
            .map_err(|r| DeployRefusal::from(r).into())
    }

    /// What the promotion rule judges in each required environment: the rollbacks recorded
    /// away from the release there, its agents there that report it unhealthy now, and those
    /// that have the app but run another release.
    async fn promotion_evidence(
        &self,
        spec: &RolloutSpec,
        required: &[Environment],
        agents: &[AgentRecord],
    ) -> Result<(BTreeMap<Environment, Vec<RollbackMark>>, Agents, Agents)> {
        let (mut unhealthy, mut not_running) = (Agents::new(), Agents::new());
        for a in agents.iter().filter(|a| !a.revoked && required.contains(&a.environment)) {
            let Some(s) = a.apps.iter().find(|s| s.app == spec.app) else { continue };
            if s.current != spec.version {
                not_running.entry(a.environment.clone()).or_default().push(a.id.clone());
            } else if s.health == "unhealthy" {
                unhealthy.entry(a.environment.clone()).or_default().push(a.id.clone());
            }
        }
        let prefixes: Vec<(Environment, String)> = required
            .iter()
            .map(|e| (e.clone(), promotion::mark_prefix(&spec.app, &spec.version, e)))
            .collect();
        let rollbacks = self
            .blocking(move |c| {
                let mut out: BTreeMap<Environment, Vec<RollbackMark>> = BTreeMap::new();
                for (key, mark) in c.core.store.list::<RollbackMark>(Tree::RollbackMarks)? {
                    if let Some((env, _)) = prefixes.iter().find(|(_, p)| key.starts_with(p.as_str())) {
                        out.entry(env.clone()).or_default().push(mark);
                    }
                }
                Ok(out)
            })
            .await?;
        Ok((rollbacks, unhealthy, not_running))
    }
}

/// The notification of a new rollout: what, where, who, why.
pub(super) fn created_event(r: &Rollout) -> serde_json::Value {
    serde_json::json!({
        "rollout": r.id,
        "app": r.spec.app,
        "version": r.spec.version,
        "environment": r.spec.environment,
        "agents": r.agents.len(),
        "state": r.state,
        "by": r.created_by,
        "note": r.spec.note,
        "ticket": r.spec.ticket,
        "start_at": r.spec.start_at,
    })
}
