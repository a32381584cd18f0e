//! The fleet as rollouts and convergence reach it: orders to agents, who is online, what they
//! report. In production that is [`Sessions`] (the live sessions and the agent registry); the
//! driver and convergence know only the [`Fleet`] trait, so they are tested without sessions.

use std::future::Future;
use std::time::Duration;

use super::machine::Reply;
use crate::logic::core::blocking_method;
use crate::logic::orders::{OrderKind, OrderOutcome};
use crate::logic::{Error, Orders, Registry, Result};

/// What an agent last reported about one app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub agent: String,
    pub online: bool,
    /// The release it runs, if any.
    pub running: Option<String>,
    pub unhealthy: bool,
    /// An activation or rollback of the app is in progress on the agent.
    pub busy: bool,
}

/// The agents, as the rollout driver and convergence reach them.
pub trait Fleet: Clone + Send + Sync + 'static {
    /// Sends an order and waits up to `timeout` for the agent's answer.
    fn send(&self, agent: &str, order: OrderKind, timeout: Duration) -> impl Future<Output = Reply> + Send;

    /// Whether the agent has a live session.
    fn online(&self, agent: &str) -> bool;

    /// What `agents` last reported about `app` (agents the registry does not know are left
    /// out).
    fn reports(&self, app: &str, agents: &[String]) -> impl Future<Output = Result<Vec<Report>>> + Send;
}

/// The production fleet: orders go down the agents' live sessions; reports come from the
/// registry.
#[derive(Clone)]
pub struct Sessions {
    registry: Registry,
    orders: Orders,
}

impl Sessions {
    pub fn new(registry: &Registry, orders: &Orders) -> Self {
        Self { registry: registry.clone(), orders: orders.clone() }
    }

    blocking_method!();
}

impl Fleet for Sessions {
    async fn send(&self, agent: &str, order: OrderKind, timeout: Duration) -> Reply {
        reply(self.orders.send_order(agent, order, timeout).await)
    }

    fn online(&self, agent: &str) -> bool {
        self.registry.is_online(agent)
    }

    async fn reports(&self, app: &str, agents: &[String]) -> Result<Vec<Report>> {
        let (app, agents) = (app.to_owned(), agents.to_vec());
        self.blocking(move |c| {
            let mut out = Vec::with_capacity(agents.len());
            for id in agents {
                let Some(rec) = c.registry.agent(&id)? else { continue };
                let status = rec.apps.iter().find(|s| s.app == app);
                out.push(Report {
                    online: c.registry.is_online(&id),
                    running: status.map(|s| s.current.clone()).filter(|v| !v.is_empty()),
                    unhealthy: status.is_some_and(|s| s.health == "unhealthy"),
                    busy: status.is_some_and(|s| s.busy),
                    agent: id,
                });
            }
            Ok(out)
        })
        .await
    }
}

/// An order's result as the machine sees it.
pub(crate) fn reply(res: Result<OrderOutcome>) -> Reply {
    match res {
        Ok(o) if o.is_done() => Reply::Done,
        Ok(o) => Reply::NotDone(o.problem()),
        Err(Error::Offline(_)) => Reply::Offline,
        Err(e) => Reply::Error(e.to_string()),
    }
}
