//! Orders to agents: numbered by the controller (so agents can refuse stale ones), sent down the
//! agent's live session, answered by an order result.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{now, Controller, Error, Result};
use crate::store::AppStatusRecord;

/// What an order asks an agent to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKind {
    Install { app: String, version: String, digest: String },
    Activate { app: String, version: String, health_deadline: Option<Duration> },
    Rollback { app: String, to: Option<String>, reason: String },
    Logs { app: String, lines: u32 },
}

/// An order with its sequence number.
#[derive(Clone, Debug)]
pub struct Order {
    pub seq: u64,
    pub kind: OrderKind,
}

/// An agent's answer.
#[derive(Clone, Debug, Default)]
pub struct OrderOutcome {
    pub seq: u64,
    pub ok: bool,
    /// The agent had already applied a newer order and ignored this one.
    pub stale: bool,
    pub error: Option<String>,
    pub status: Option<AppStatusRecord>,
    pub output: String,
}

/// Which agents an admin action targets.
#[derive(Clone, Debug)]
pub enum Target {
    Agents(Vec<String>),
    Region(String),
    All,
}

/// Sequence numbers are reserved in blocks, durably, so numbering never goes backwards across a
/// controller restart without a flush per order.
const SEQ_BLOCK: u64 = 1024;

impl Controller {
    /// The next order sequence number.
    pub async fn next_seq(&self) -> Result<u64> {
        {
            let mut s = self.inner.seq.lock().unwrap_or_else(|p| p.into_inner());
            if s.0 < s.1 {
                s.0 += 1;
                return Ok(s.0 - 1);
            }
        }
        let (from, to) = self.blocking(|c| Ok(c.inner.store.reserve_seq(SEQ_BLOCK)?)).await?;
        let mut s = self.inner.seq.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 >= s.1 {
            *s = (from, to);
        }
        s.0 += 1;
        Ok(s.0 - 1)
    }

    /// Sends an order and waits up to `timeout` for the agent's answer.
    pub async fn send_order(
        &self,
        agent_id: &str,
        kind: OrderKind,
        timeout: Duration,
    ) -> Result<OrderOutcome> {
        let seq = self.next_seq().await?;
        self.send_order_with_seq(agent_id, seq, kind, timeout).await
    }

    /// Sends an order with an explicit sequence number. Normal callers use [`Self::send_order`];
    /// this exists so fencing (stale orders are ignored) can be exercised.
    pub async fn send_order_with_seq(
        &self,
        agent_id: &str,
        seq: u64,
        kind: OrderKind,
        timeout: Duration,
    ) -> Result<OrderOutcome> {
        let tx = {
            let sessions = self.lock_sessions();
            sessions.get(agent_id).map(|s| s.tx.clone())
        }
        .ok_or_else(|| Error::Offline(agent_id.to_owned()))?;
        let (done_tx, done_rx) = oneshot::channel();
        self.lock_pending().insert((agent_id.to_owned(), seq), done_tx);
        tracing::info!(agent_id, seq, ?kind, "order sent");
        self.metrics().order_sent();
        if tx.send(Order { seq, kind }).await.is_err() {
            self.lock_pending().remove(&(agent_id.to_owned(), seq));
            return Err(Error::Offline(agent_id.to_owned()));
        }
        match tokio::time::timeout(timeout, done_rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(Error::Offline(agent_id.to_owned())),
            Err(_) => {
                self.lock_pending().remove(&(agent_id.to_owned(), seq));
                Err(Error::FailedPrecondition(format!(
                    "agent {agent_id} did not answer order {seq} within {timeout:?}"
                )))
            }
        }
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, u64), oneshot::Sender<OrderOutcome>>>
    {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers an agent's answer to whoever waits for it, and records the app's new state.
    pub async fn order_result(&self, agent_id: &str, outcome: OrderOutcome) {
        if let Some(status) = outcome.status.clone() {
            let id = agent_id.to_owned();
            let _ = self
                .blocking(move |c| {
                    c.inner.store.update_agent(&id, false, |r| {
                        r.last_seen = now();
                        match r.apps.iter_mut().find(|a| a.app == status.app) {
                            Some(a) => *a = status.clone(),
                            None => r.apps.push(status.clone()),
                        }
                    })?;
                    Ok(())
                })
                .await;
        }
        if let Some(waiter) = self.lock_pending().remove(&(agent_id.to_owned(), outcome.seq)) {
            let _ = waiter.send(outcome);
        }
    }

    /// Agents an admin action targets.
    pub async fn resolve_targets(&self, target: &Target) -> Result<Vec<String>> {
        let all = self.list_agents(None).await?;
        let ids: Vec<String> = match target {
            Target::All => all.into_iter().filter(|a| !a.record.revoked).map(|a| a.record.id).collect(),
            Target::Region(r) => all
                .into_iter()
                .filter(|a| !a.record.revoked && &a.record.region == r)
                .map(|a| a.record.id)
                .collect(),
            Target::Agents(ids) => {
                for id in ids {
                    if !all.iter().any(|a| &a.record.id == id) {
                        return Err(Error::UnknownAgent(id.clone()));
                    }
                }
                ids.clone()
            }
        };
        Ok(ids)
    }

    /// Instant rollback on every targeted agent at once. Returns each agent's outcome (an error
    /// for offline agents) and the wall time.
    pub async fn rollback(
        &self,
        app: &str,
        target: &Target,
        to: Option<String>,
        reason: &str,
        by: &str,
    ) -> Result<(Vec<(String, Result<OrderOutcome>, Duration)>, Duration)> {
        if reason.trim().is_empty() {
            return Err(Error::InvalidArgument("a rollback needs a --reason".into()));
        }
        convoy_bundle::check_app_name(app).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let ids = self.resolve_targets(target).await?;
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no agent matches the target".into()));
        }
        tracing::warn!(app, agents = ids.len(), by, reason, "fleet rollback");
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let this = self.clone();
            let kind = OrderKind::Rollback { app: app.to_owned(), to: to.clone(), reason: reason.to_owned() };
            tasks.spawn(async move {
                let t = Instant::now();
                let r = this.send_order(&id, kind, Duration::from_secs(120)).await;
                (id, r, t.elapsed())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.map_err(|e| Error::Internal(e.to_string()))?);
        }
        let elapsed = started.elapsed();
        self.metrics().observe_rollback(elapsed.as_secs_f64());
        out.sort_by(|a, b| a.0.cmp(&b.0));
        // What the rollback left running becomes the desired state, so a reconnecting agent
        // is not moved forward to the release that was just rolled back.
        let running: Vec<(String, String)> = out
            .iter()
            .filter_map(|(id, res, _)| {
                let o = res.as_ref().ok().filter(|o| o.ok)?;
                Some((id.clone(), o.status.as_ref()?.current.clone()))
            })
            .collect();
        self.record_desired(app, running, &format!("rollback by {by}")).await?;
        Ok((out, elapsed))
    }
}
