//! Orders to agents: numbered by the controller (so agents can refuse stale ones), sent down the
//! agent's live session, answered by an order result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::core::{blocking_method, Core};
use super::{now, Error, Registry, Result};
use crate::store::AppStatusRecord;

/// What an order asks an agent to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKind {
    Install {
        app: String,
        version: String,
        digest: String,
    },
    Activate {
        app: String,
        version: String,
        health_deadline: Option<Duration>,
    },
    /// Go back from `from` (the agent answers "already rolled back" if it no longer runs it).
    Rollback {
        app: String,
        from: String,
        to: Option<String>,
        reason: String,
    },
    Logs {
        app: String,
        lines: u32,
    },
}

impl OrderKind {
    /// The app every order is about.
    pub fn app(&self) -> &str {
        match self {
            Self::Install { app, .. }
            | Self::Activate { app, .. }
            | Self::Rollback { app, .. }
            | Self::Logs { app, .. } => app,
        }
    }
}

/// What became of an agent's order result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultReceipt {
    /// It answered an order in flight, and was delivered (its app status recorded).
    Delivered,
    /// No order with that number is in flight for this agent (never sent, already answered or
    /// timed out): ignored, nothing written.
    Unsolicited,
}

/// An order with its sequence number.
#[derive(Clone, Debug)]
pub struct Order {
    pub seq: u64,
    pub kind: OrderKind,
}

/// How an agent answered an order. Only `Applied` and `AlreadyInState` mean the order is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Applied,
    AlreadyInState,
    /// The order was invalid or not allowed on the agent; `field` names what was refused.
    Refused {
        field: String,
    },
    Failed,
    /// The agent had already applied order `agent_last_seq`, newer than this one, and ignored it.
    Stale {
        agent_last_seq: u64,
    },
}

/// An agent's answer.
#[derive(Clone, Debug)]
pub struct OrderOutcome {
    pub seq: u64,
    pub answer: Answer,
    /// What was done, or what went wrong, in the agent's words.
    pub message: String,
    pub status: Option<AppStatusRecord>,
    pub output: String,
}

impl OrderOutcome {
    /// Whether the order is done: applied now or already in that state.
    pub fn is_done(&self) -> bool {
        matches!(self.answer, Answer::Applied | Answer::AlreadyInState)
    }

    /// Why the order is not done, for events and CLI output.
    pub fn problem(&self) -> String {
        match &self.answer {
            Answer::Applied | Answer::AlreadyInState => String::new(),
            Answer::Refused { field } if !field.is_empty() => format!("refused ({field}): {}", self.message),
            Answer::Refused { .. } => format!("refused: {}", self.message),
            Answer::Failed => format!("failed: {}", self.message),
            Answer::Stale { agent_last_seq } => {
                format!("stale: agent has applied order {agent_last_seq}, the controller sent {}", self.seq)
            }
        }
    }
}

/// Which agents an admin action targets.
#[derive(Clone, Debug)]
pub enum Target {
    Agents(Vec<String>),
    Region(String),
    All,
}

/// Which agents an admin action targets, within one environment or across all of them.
#[derive(Clone, Debug)]
pub struct Scope {
    pub target: Target,
    /// `None`: every environment the target covers.
    pub environment: Option<super::Environment>,
}

impl From<Target> for Scope {
    fn from(target: Target) -> Self {
        Self { target, environment: None }
    }
}

/// Sequence numbers are reserved in blocks, durably, so numbering never goes backwards across a
/// controller restart without a flush per order.
const SEQ_BLOCK: u64 = 1024;

/// The furthest an agent's report may move the controller's order sequence at once: far more
/// orders than a controller issues between two backups, far less than the sequence's range.
const MAX_SEQ_JUMP: u64 = 1 << 20;
/// How far agents' reports may move the numbering in all, over the store's life: well below
/// the 2^32 an agent accepts past its last order, so no series of reports (one agent's, say)
/// can number orders beyond what honest agents accept.
pub const MAX_SEQ_JUMPS_TOTAL: u64 = 1 << 31;

/// Orders in flight: (agent, seq) → the order's app and who waits for the answer.
type PendingOrders = HashMap<(String, u64), (String, oneshot::Sender<OrderOutcome>)>;

/// Orders to agents: numbering, sending, and the answers. Cheap to clone.
#[derive(Clone)]
pub struct Orders {
    core: Core,
    registry: Registry,
    inner: Arc<State>,
}

struct State {
    pending: Mutex<PendingOrders>,
    /// The next number, and the end of the block reserved in the store.
    seq: Mutex<(u64, u64)>,
}

impl Orders {
    /// Reads the store (the numbering continues after every number reserved before, and
    /// agents' sequence reports are judged against that from the first hello on), so it runs
    /// on a blocking thread.
    pub(crate) fn new(core: Core, registry: Registry) -> Result<Self> {
        let reserved = core.store.seq_reserved()?;
        Ok(Self {
            core,
            registry,
            inner: Arc::new(State {
                pending: Mutex::new(HashMap::new()),
                seq: Mutex::new((reserved, reserved)),
            }),
        })
    }

    blocking_method!();

    /// The next order sequence number.
    pub async fn next_seq(&self) -> Result<u64> {
        {
            let mut s = self.inner.seq.lock().unwrap_or_else(|p| p.into_inner());
            if s.0 < s.1 {
                s.0 += 1;
                return Ok(s.0 - 1);
            }
        }
        let (from, to) = self.blocking(|c| Ok(c.core.store.reserve_seq(SEQ_BLOCK)?)).await?;
        let mut s = self.inner.seq.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 >= s.1 {
            *s = (from, to);
        }
        if s.0 >= s.1 {
            return Err(Error::Internal("the order sequence is exhausted".into()));
        }
        s.0 += 1;
        Ok(s.0 - 1)
    }

    /// Moves the order sequence past `agent_seq`, the highest order an agent reports having
    /// applied, so the controller's next orders are not stale to it (a controller restored from
    /// a backup). The report comes from an agent, so the jump is bounded: one agent must not be
    /// able to push the fleet-wide sequence to its end.
    pub async fn observe_agent_seq(&self, agent_seq: u64) -> Result<()> {
        {
            let s = self.inner.seq.lock().unwrap_or_else(|p| p.into_inner());
            if s.0 > agent_seq {
                return Ok(());
            }
            if agent_seq > s.0.saturating_add(MAX_SEQ_JUMP) || agent_seq >= u64::MAX / 2 {
                return Err(far_beyond(agent_seq));
            }
        }
        let reserved = self
            .blocking(move |c| {
                Ok(c.core.store.reserve_seq_after(agent_seq, SEQ_BLOCK, MAX_SEQ_JUMPS_TOTAL)?)
            })
            .await?;
        let Some((from, to)) = reserved else {
            tracing::error!(agent_seq, "agents' reports have moved the order numbering as far as it may go");
            return Err(far_beyond(agent_seq));
        };
        let mut s = self.inner.seq.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 <= agent_seq {
            tracing::warn!(
                agent_seq,
                controller_seq = s.0,
                "an agent has applied newer orders than this controller issued: moving past them"
            );
            *s = (from, to);
        }
        Ok(())
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
        let link = self.registry.link(agent_id).ok_or_else(|| Error::Offline(agent_id.to_owned()))?;
        let (done_tx, done_rx) = oneshot::channel();
        self.lock_pending().insert((agent_id.to_owned(), seq), (kind.app().to_owned(), done_tx));
        tracing::info!(agent_id, seq, ?kind, "order sent");
        self.core.metrics().order_sent();
        if link.tx.send(Order { seq, kind }).await.is_err() {
            self.lock_pending().remove(&(agent_id.to_owned(), seq));
            return Err(Error::Offline(agent_id.to_owned()));
        }
        // An answer that came in wins over the agent going offline right after it.
        let answer = tokio::select! {
            biased;
            answer = tokio::time::timeout(timeout, done_rx) => answer.map(Result::ok),
            () = link.offline.cancelled() => Ok(None),
        };
        match answer {
            Ok(Some(outcome)) => Ok(outcome),
            Ok(None) => {
                self.lock_pending().remove(&(agent_id.to_owned(), seq));
                Err(Error::Offline(agent_id.to_owned()))
            }
            Err(_) => {
                self.lock_pending().remove(&(agent_id.to_owned(), seq));
                Err(Error::NoAnswer(format!(
                    "agent {agent_id} did not answer order {seq} within {timeout:?}"
                )))
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, PendingOrders> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers an agent's answer to whoever waits for it, and records the app's new state. Only
    /// an answer to an order in flight counts, and only the status of the app that order named
    /// is recorded: an agent cannot write into its record by sending results nobody asked for.
    pub async fn order_result(&self, agent_id: &str, mut outcome: OrderOutcome) -> ResultReceipt {
        let Some((app, waiter)) = self.lock_pending().remove(&(agent_id.to_owned(), outcome.seq)) else {
            tracing::debug!(agent_id, seq = outcome.seq, "unsolicited order result ignored");
            return ResultReceipt::Unsolicited;
        };
        if outcome.status.as_ref().is_some_and(|s| s.app != app) {
            tracing::warn!(agent_id, seq = outcome.seq, %app, "order result reports another app; status ignored");
            outcome.status = None;
        }
        if let Some(status) = outcome.status.clone() {
            let id = agent_id.to_owned();
            let written = self
                .blocking(move |c| {
                    c.core.store.update_agent(&id, false, |r| {
                        r.last_seen = now();
                        let full = r.apps.len() >= crate::store::MAX_REPORTED_APPS;
                        match r.apps.iter_mut().find(|a| a.app == status.app) {
                            Some(a) => *a = status.clone(),
                            None if !full => r.apps.push(status.clone()),
                            None => tracing::warn!(agent_id = %r.id, "too many apps reported; status not recorded"),
                        }
                    })?;
                    Ok(())
                })
                .await;
            if let Err(e) = written {
                tracing::warn!(agent_id, error = %e, "order result's app status not recorded");
            }
        }
        if waiter.send(outcome).is_err() {
            tracing::debug!(agent_id, "order answered after its sender stopped waiting");
        }
        ResultReceipt::Delivered
    }

    /// Agents an admin action targets.
    pub async fn resolve_targets(&self, scope: &Scope) -> Result<Vec<String>> {
        let in_env =
            |a: &super::AgentView| scope.environment.as_ref().is_none_or(|e| a.record.environment == *e);
        let all: Vec<_> = self.registry.list_agents(None).await?;
        let ids: Vec<String> = match &scope.target {
            Target::All => {
                all.into_iter().filter(|a| !a.record.revoked && in_env(a)).map(|a| a.record.id).collect()
            }
            Target::Region(r) => all
                .into_iter()
                .filter(|a| !a.record.revoked && &a.record.region == r && in_env(a))
                .map(|a| a.record.id)
                .collect(),
            Target::Agents(ids) => {
                for id in ids {
                    match all.iter().find(|a| &a.record.id == id) {
                        None => return Err(Error::UnknownAgent(id.clone())),
                        Some(a) if a.record.revoked => return Err(Error::Revoked(format!("agent {id:?}"))),
                        Some(a) if !in_env(a) => {
                            return Err(Error::InvalidArgument(format!(
                                "agent {id:?} is in environment {}, not {}",
                                a.record.environment,
                                scope.environment.as_ref().map(|e| e.as_str()).unwrap_or_default()
                            )))
                        }
                        Some(_) => {}
                    }
                }
                let mut ids = ids.clone();
                ids.sort();
                ids.dedup();
                ids
            }
        };
        Ok(ids)
    }
}

/// An agent's sequence report the controller will not follow. The controller's own numbering is
/// not disclosed to the agent.
fn far_beyond(agent_seq: u64) -> Error {
    Error::PermissionDenied(format!(
        "the agent reports having applied order {agent_seq}, far beyond this controller's numbering: \
         session refused (if the controller really was restored from a very old backup, reset the \
         agent's state)"
    ))
}
