//! Fleet rollback: every targeted agent goes back at once, and what it left running becomes the
//! desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::promotion::{self, RollbackMark};
use super::Rollouts;
use crate::logic::{Answer, Environment, Error, OrderKind, OrderOutcome, Result, Scope};
use crate::store::Tree;

/// A name or version in an admin request that is not valid, worded as the request's `field`
/// (the bundle crate words the same check as a manifest problem).
fn invalid(field: &str, e: convoy_bundle::Error) -> Error {
    let why = match e {
        convoy_bundle::Error::BadManifest(m) => m,
        other => other.to_string(),
    };
    Error::InvalidArgument(format!("{field}: {why}"))
}

impl Rollouts {
    /// Whether the controller has marked `app@version` bad.
    pub async fn is_marked_bad(&self, app: &str, version: &str) -> Result<bool> {
        let key = format!("{app}@{version}");
        self.blocking(move |c| {
            Ok(c.core.store.get::<serde_json::Value>(crate::store::Tree::BadReleases, &key)?.is_some())
        })
        .await
    }

    /// Instant rollback on every targeted agent at once. Each agent is told the release it rolls
    /// back from: `from` if given, else the release it last reported running, so the same
    /// rollback delivered twice goes back once and a second one goes one step further. Returns
    /// each agent's outcome (an error for offline agents and agents not running the app) and
    /// the wall time.
    pub async fn rollback(
        &self,
        app: &str,
        scope: &Scope,
        from: Option<String>,
        to: Option<String>,
        reason: &str,
        by: &str,
    ) -> Result<(Vec<(String, Result<OrderOutcome>, Duration)>, Duration)> {
        if reason.trim().is_empty() {
            return Err(Error::MissingReason("rollback"));
        }
        if !super::spec::reason_ok(reason) {
            return Err(Error::InvalidArgument(format!(
                "a rollback's reason is at most {} bytes on one line, without control characters",
                super::spec::MAX_REASON
            )));
        }
        convoy_bundle::check_app_name(app).map_err(|e| invalid("app", e))?;
        if let Some(v) = &from {
            convoy_bundle::check_version(v).map_err(|e| invalid("from_version", e))?;
        }
        if let Some(v) = &to {
            convoy_bundle::check_version(v).map_err(|e| invalid("to_version", e))?;
        }
        // A rollback goes back, never forward: `--to` names an older release that is not marked
        // bad (moving agents forward is a rollout, with its waves, windows and approvals).
        if let Some(v) = &to {
            if self.is_marked_bad(app, v).await? {
                return Err(Error::FailedPrecondition(format!(
                    "{app}@{v} is marked bad: a rollback cannot go to it"
                )));
            }
        }
        let ids = self.orders.resolve_targets(scope).await?;
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no agent matches the target".into()));
        }
        let agents = self.registry.list_agents(None).await?;
        let env_of: HashMap<String, Environment> =
            agents.iter().map(|a| (a.record.id.clone(), a.record.environment.clone())).collect();
        let mut targeted: BTreeMap<Environment, usize> = BTreeMap::new();
        for id in &ids {
            *targeted.entry(env_of.get(id).cloned().unwrap_or_default()).or_default() += 1;
        }
        let running: HashMap<String, String> = agents
            .into_iter()
            .filter_map(|a| {
                let cur = a.record.apps.iter().find(|s| s.app == app)?.current.clone();
                (!cur.is_empty()).then_some((a.record.id, cur))
            })
            .collect();
        tracing::warn!(app, agents = ids.len(), by, reason, "fleet rollback");
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut rolled_from: HashMap<String, String> = HashMap::new();
        for id in ids {
            let this = self.clone();
            let from = from.clone().or_else(|| running.get(&id).cloned());
            if let Some(f) = &from {
                rolled_from.insert(id.clone(), f.clone());
            }
            let (app, to, reason) = (app.to_owned(), to.clone(), reason.to_owned());
            tasks.spawn(async move {
                let t = Instant::now();
                let r = match from {
                    Some(from) if to.as_deref().is_some_and(|to| !older(to, &from)) => {
                        Err(Error::FailedPrecondition(format!(
                            "a rollback goes back: {app}@{} is not older than {from}, which agent {id} runs",
                            to.as_deref().unwrap_or_default()
                        )))
                    }
                    Some(from) => {
                        let kind = OrderKind::Rollback { app, from, to, reason };
                        this.orders.send_order(&id, kind, Duration::from_secs(120)).await
                    }
                    None => Err(Error::FailedPrecondition(format!("agent {id} reports no release of {app}"))),
                };
                (id, r, t.elapsed())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.map_err(|e| Error::Internal(e.to_string()))?);
        }
        let elapsed = started.elapsed();
        self.core.metrics().observe_rollback(elapsed.as_secs_f64());
        out.sort_by(|a, b| a.0.cmp(&b.0));
        // What the rollback left running becomes the desired state, so a reconnecting agent
        // is not moved forward to the release that was just rolled back. An agent's report is
        // data about itself: it counts only where this rollback applied, and only if it names
        // the release asked for (`--to`) or one older than the release rolled back from, which
        // the controller has not marked bad.
        let mut running: Vec<(String, Environment, String)> = Vec::new();
        let mut marks: BTreeSet<(String, Environment)> = BTreeSet::new();
        for (id, res, _) in &out {
            let Some(o) = res.as_ref().ok().filter(|o| o.answer == Answer::Applied) else { continue };
            let Some(cur) = o.status.as_ref().map(|s| s.current.clone()).filter(|c| !c.is_empty()) else {
                continue;
            };
            let Some(from) = rolled_from.get(id) else { continue };
            let env = env_of.get(id).cloned().unwrap_or_default();
            // The release it went back from has failed there: its soak in that environment ends.
            marks.insert((from.clone(), env.clone()));
            let plausible = match &to {
                Some(t) => *t == cur,
                None => matches!(
                    (semver::Version::parse(&cur), semver::Version::parse(from)),
                    (Ok(c), Ok(f)) if c < f
                ),
            };
            if !plausible || self.is_marked_bad(app, &cur).await? {
                tracing::warn!(agent_id = %id, app, reported = %cur, %from, "rollback report not taken into desired state");
                continue;
            }
            running.push((id.clone(), env, cur));
        }
        let at = crate::logic::now();
        let marks: Vec<(String, RollbackMark)> = marks
            .into_iter()
            .map(|(from, env)| {
                let mark = RollbackMark { at, by: by.to_owned(), reason: reason.to_owned() };
                (promotion::mark_key(app, &from, &env, at), mark)
            })
            .collect();
        if !marks.is_empty() {
            self.blocking(move |c| {
                let last = marks.len() - 1;
                for (i, (key, mark)) in marks.iter().enumerate() {
                    c.core.store.put(Tree::RollbackMarks, key, mark, i == last)?;
                }
                Ok(())
            })
            .await?;
        }
        self.record_desired(app, running, &format!("rollback by {by}"), &scope.target, targeted).await?;
        Ok((out, elapsed))
    }
}

/// Whether version `a` is older than `b` (both valid versions, checked at the edge).
fn older(a: &str, b: &str) -> bool {
    matches!((semver::Version::parse(a), semver::Version::parse(b)), (Ok(a), Ok(b)) if a < b)
}
