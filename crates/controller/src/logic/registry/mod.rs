//! The registry: who may talk to the controller. Join tokens and enrollment
//! ([`enrollment`]), agents' certificates and revocation, live agent sessions ([`sessions`]) and
//! the admin registry ([`admins`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_pki::{Ca, Identity};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::core::{blocking_method, Core};
use super::{heartbeats, now, take_token, Buckets, Error, Result};
use crate::store::{AgentRecord, ReportedRelease};

pub mod admins;
mod enrollment;

pub use enrollment::NewToken;
mod sessions;

/// Sessions one agent may open back to back before the rate of one a second applies.
pub const SESSION_OPENS_BURST: u32 = 10;

/// The sending half of an agent's live session.
pub type SessionTx = mpsc::Sender<super::Order>;

struct Session {
    id: u64,
    /// The agent's environment and region, for the online gauge.
    environment: super::Environment,
    region: String,
    cancel: CancellationToken,
    /// Cancelled when the agent goes offline (its last session ends, not when a newer one
    /// replaces it): orders in flight to it will not be answered.
    offline: CancellationToken,
    tx: SessionTx,
    /// Unix time of the last heartbeat accepted, newer than the stored one while the
    /// agent's reports are unchanged.
    last_seen: Arc<AtomicI64>,
}

/// The way to an online agent: its session's sender, and a token cancelled when it goes
/// offline.
#[derive(Clone, Debug)]
pub struct Link {
    pub tx: SessionTx,
    pub offline: CancellationToken,
}

/// Enrollment, agent identity, live sessions and admins. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    core: Core,
    inner: Arc<State>,
}

struct State {
    ca: Ca,
    sessions: Mutex<HashMap<String, Session>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Per agent: session opens still allowed now, and when that was last topped up.
    session_opens: Buckets,
    /// Serializes changes to admin records (read, change, write).
    admins_lock: Mutex<()>,
}

/// The result of a successful enrollment.
#[derive(Debug)]
pub struct Enrolled {
    pub agent_id: String,
    pub cert_pem: String,
    pub region: String,
    pub environment: super::Environment,
    pub labels: BTreeMap<String, String>,
}

/// An agent as listed for admins.
#[derive(Clone, Debug)]
pub struct AgentView {
    pub record: AgentRecord,
    pub online: bool,
}

/// Handle for a registered session; dropping it does not end the session,
/// [`Registry::end_session`] does.
#[derive(Debug)]
pub struct SessionHandle {
    pub agent_id: String,
    pub session_id: u64,
    pub cancel: CancellationToken,
    last_seen: Arc<AtomicI64>,
}

impl Registry {
    pub(crate) fn new(core: Core, ca: Ca) -> Self {
        Self {
            core,
            inner: Arc::new(State {
                ca,
                sessions: Mutex::new(HashMap::new()),
                next_session: 1.into(),
                session_opens: Mutex::new(HashMap::new()),
                admins_lock: Mutex::new(()),
            }),
        }
    }

    blocking_method!();

    pub fn ca_pem(&self) -> &str {
        self.inner.ca.cert_pem()
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.core.settings.heartbeat_interval
    }

    /// An agent's record. Blocking: call it from a blocking context.
    pub(crate) fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        Ok(self.core.store.agent(id)?)
    }

    /// Revokes an agent: it is refused from now on, and its live session is closed.
    pub async fn revoke_agent(&self, agent_id: &str, by: &Identity) -> Result<bool> {
        let id = agent_id.to_owned();
        let (updated, newly) = self
            .blocking(move |c| {
                // The closure may run more than once (a concurrent update retries it); the value
                // of its last run is the one written.
                let mut newly = false;
                let updated = c.core.store.update_agent(&id, true, |r| {
                    newly = !r.revoked;
                    r.revoked = true;
                })?;
                Ok((updated, newly))
            })
            .await?;
        let Some(record) = updated else {
            return Err(Error::UnknownAgent(agent_id.to_owned()));
        };
        let live = {
            let mut sessions = self.lock_sessions();
            let live = sessions.remove(agent_id);
            self.core.metrics().agent_revoked(
                record.environment.as_str(),
                &record.region,
                newly,
                live.is_some(),
            );
            live
        };
        let was_online = live.is_some();
        if let Some(s) = live {
            s.cancel.cancel();
            s.offline.cancel();
        }
        tracing::warn!(agent_id, by = %by, was_online, "agent revoked");
        Ok(was_online)
    }
}
