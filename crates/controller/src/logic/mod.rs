//! The controller's logic: enrollment, certificate renewal, the agent registry and live sessions.
//! Nothing here knows about gRPC; [`crate::grpc`] translates to and from the wire.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use convoy_pki::{Ca, Identity};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod releases;

pub use releases::{BlobChunk, Upload, UploadError, BUNDLE_CHUNK};

use crate::store::{self, AgentRecord, EnrollConflict, ReportedRelease, Store, TokenRecord};

/// Everything the controller refuses, each with the specific reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("join token is malformed")]
    TokenMalformed,
    #[error("join token is unknown")]
    TokenUnknown,
    #[error("join token was already used (by agent {0})")]
    TokenUsed(String),
    #[error("join token expired {0}s ago")]
    TokenExpired(i64),
    #[error("join token is bound to region {bound:?} but the agent asked for region {asked:?}")]
    TokenRegion { bound: String, asked: String },
    #[error("agent id {0:?} is already enrolled")]
    AgentExists(String),
    #[error("{0} is revoked")]
    Revoked(String),
    #[error("agent {0:?} is not enrolled")]
    UnknownAgent(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{who} has role {role}; {action} needs role {needed} or higher")]
    RoleTooLow { who: String, action: &'static str, needed: roles::Role, role: roles::Role },
    #[error(
        "certificate {serial} of {who} is not recorded in the admin registry: it was not issued to \
         this admin through the registry, so it is refused"
    )]
    UnknownCertificate { who: String, serial: String },
    #[error(
        "admin {0:?} already exists: admin names are unique; `convoy admins rekey {0}` issues it a \
         new certificate"
    )]
    AdminExists(String),
    #[error("admin {0:?} is not in the admin registry")]
    UnknownAdmin(String),
    #[error("agent {0} is offline")]
    Offline(String),
    /// A per-peer resource limit was reached; the caller may retry later.
    #[error("{0}")]
    Busy(String),
    /// The order went out but no answer came in time: whether it applied is unknown.
    #[error("{0}")]
    NoAnswer(String),
    #[error("release {0} not found")]
    UnknownRelease(String),
    /// More than a limit allows (a bundle over the size limit).
    #[error("{0}")]
    TooLarge(String),
    /// A position past the end (a download offset past the bundle's size).
    #[error("{0}")]
    OutOfRange(String),
    /// An action that must say why (a rollback, a freeze) was given no reason.
    #[error("a {0} needs a reason")]
    MissingReason(&'static str),
    /// A deploy refused before it started; the gRPC layer says how to proceed anyway.
    #[error("{0}")]
    Deploy(#[from] rollouts::DeployRefusal),
    /// A rollout spec that cannot run; the gRPC layer words it in the CLI's terms.
    #[error("invalid rollout: {0}")]
    Spec(#[from] rollouts::SpecError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("bundle refused: {0}")]
    Bundle(#[from] convoy_bundle::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The audit log cannot be written, so an action that must be accounted for is refused.
    #[error("the audit log cannot be written, so the action was not taken: {0}")]
    AuditUnavailable(String),
    /// The audit log no longer matches a signed checkpoint.
    #[error("audit log tampered: {0}")]
    AuditTampered(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use crate::time::now;

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Checks a region or label string: short, printable, no separators that would confuse a shell
/// or a selector.
pub fn validate_word(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {s:?} is invalid: use 1-63 letters, digits, '-', '_', '.' or '/'"
        )))
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        validate_word("label key", k)?;
        validate_word(&format!("label {k} value"), v)?;
    }
    Ok(())
}

pub mod admins;
pub(crate) mod alerts;
pub mod audit;
mod enrollment;
pub mod heartbeats;
mod orders;
pub mod roles;
pub mod rollouts;
mod sessions;

pub use orders::{Answer, Order, OrderKind, OrderOutcome, ResultReceipt, Target};

/// Sessions one agent may open back to back before the rate of one a second applies.
pub const SESSION_OPENS_BURST: u32 = 10;
/// Audited actions one admin may take back to back before the rate of one a second applies.
pub const ACTIONS_BURST: u32 = 60;

/// Per key: tokens left and when they were last topped up.
type Buckets = Mutex<HashMap<String, (u32, std::time::Instant)>>;

/// Takes one of `key`'s tokens (at most `burst`, one earned per second); false when none is
/// left. The map forgets keys whose allowance is full again once it grows large.
fn take_token(buckets: &Buckets, key: &str, burst: u32) -> bool {
    let mut map = buckets.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    if map.len() > 100_000 {
        map.retain(|_, (_, at)| now.duration_since(*at).as_secs() < u64::from(burst));
    }
    let (tokens, at) = map.entry(key.to_owned()).or_insert((burst, now));
    let earned = now.duration_since(*at).as_secs();
    if earned > 0 {
        *tokens = (*tokens + earned.min(u64::from(burst)) as u32).min(burst);
        *at = now;
    }
    if *tokens == 0 {
        return false;
    }
    *tokens -= 1;
    true
}

/// Orders in flight: (agent, seq) → the order's app and who waits for the answer.
pub(crate) type PendingOrders = HashMap<(String, u64), (String, tokio::sync::oneshot::Sender<OrderOutcome>)>;

/// The sending half of an agent's live session.
pub type SessionTx = mpsc::Sender<Order>;

struct Session {
    id: u64,
    /// The agent's region, for the online gauge.
    region: String,
    cancel: CancellationToken,
    tx: SessionTx,
    /// Unix time of the last heartbeat accepted, newer than the stored one while the
    /// agent's reports are unchanged.
    last_seen: Arc<AtomicI64>,
}

/// What the controller runs on: its CA, its store and the live sessions. Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

/// Download streams one agent may have open at once (an agent downloads at most two at a time).
pub const MAX_DOWNLOADS_PER_AGENT: usize = 4;

/// How long an agent's previous certificate stays valid after a renewal: long enough for calls
/// in flight to finish, short enough that a copied old key is soon useless. A tenth of the
/// certificate lifetime, at most five minutes.
pub fn renewal_overlap(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(300))
}

/// The controller's tunables, from its config.
#[derive(Clone, Debug)]
pub struct Settings {
    pub agent_cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    pub blob_dir: std::path::PathBuf,
    /// Release keys checked at push; `None` checks structure and digests only.
    pub release_trust: Option<convoy_bundle::TrustStore>,
    pub max_bundle_bytes: u64,
    /// Webhook URLs that receive rollout and agent events.
    pub notify_urls: Vec<String>,
    /// An agent offline longer than this is announced to the webhooks.
    pub offline_after: Duration,
    /// The controller's own key and certificate, which sign and verify audit checkpoints.
    pub audit_key: audit::AuditKey,
}

struct Inner {
    ca: Ca,
    store: Store,
    settings: Settings,
    sessions: Mutex<HashMap<String, Session>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Orders in flight: (agent, seq) → the order's app and who waits for the answer.
    pending: Mutex<PendingOrders>,
    /// The audit rate of refused calls, per actor.
    refusals: Mutex<audit::RefusalLimits>,
    /// Per agent: session opens still allowed now, and when that was last topped up.
    session_opens: Buckets,
    /// Per admin: audited actions still allowed now.
    action_rate: Buckets,
    seq: Mutex<(u64, u64)>,
    drivers: Mutex<HashMap<String, rollouts::ControlTx>>,
    converging: Mutex<std::collections::HashSet<String>>,
    /// Cancelled when the controller shuts down: background drivers stop with it.
    shutdown: CancellationToken,
    /// Session tasks, which hold the controller (and so its store): a stopping controller
    /// waits for them, so the next one can open the store.
    tasks: tokio_util::task::TaskTracker,
    audit_lock: Mutex<()>,
    /// Download streams in progress per agent: each holds an open file and buffers, and an agent
    /// that opens streams without reading them must not exhaust the controller.
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Serializes changes to admin records (read, change, write).
    admins_lock: Mutex<()>,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) notifier: crate::notify::Notifier,
}

/// The result of a successful enrollment.
#[derive(Debug)]
pub struct Enrolled {
    pub agent_id: String,
    pub cert_pem: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
}

/// An agent as listed for admins.
#[derive(Clone, Debug)]
pub struct AgentView {
    pub record: AgentRecord,
    pub online: bool,
}

/// Handle for a registered session; dropping it does not end the session, [`Controller::end_session`] does.
#[derive(Debug)]
pub struct SessionHandle {
    pub agent_id: String,
    pub session_id: u64,
    pub cancel: CancellationToken,
    last_seen: Arc<AtomicI64>,
}

impl Controller {
    /// Reads the store, so it runs on a blocking thread.
    pub fn new(ca: Ca, store: Store, settings: Settings) -> Result<Self> {
        let notifier = crate::notify::Notifier::new(settings.notify_urls.clone());
        // Orders continue after every number reserved before: agents' sequence reports are
        // judged against that from the first hello on, not against zero.
        let reserved = store.seq_reserved()?;
        Ok(Self {
            inner: Arc::new(Inner {
                ca,
                store,
                settings,
                sessions: Mutex::new(HashMap::new()),
                next_session: 1.into(),
                pending: Mutex::new(HashMap::new()),
                refusals: Mutex::new(HashMap::new()),
                session_opens: Mutex::new(HashMap::new()),
                action_rate: Mutex::new(HashMap::new()),
                seq: Mutex::new((reserved, reserved)),
                drivers: Mutex::new(HashMap::new()),
                converging: Mutex::new(Default::default()),
                shutdown: CancellationToken::new(),
                tasks: tokio_util::task::TaskTracker::new(),
                audit_lock: Mutex::new(()),
                downloads: Mutex::new(HashMap::new()),
                admins_lock: Mutex::new(()),
                metrics: Default::default(),
                notifier,
            }),
        })
    }

    /// A permit for one download stream of `agent_id`, or `Busy` when it already has
    /// [`MAX_DOWNLOADS_PER_AGENT`] in progress.
    pub fn download_permit(&self, agent_id: &str) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .inner
            .downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent_id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_DOWNLOADS_PER_AGENT)))
            .clone();
        sem.try_acquire_owned().map_err(|_| {
            Error::Busy(format!(
                "agent {agent_id} already has {MAX_DOWNLOADS_PER_AGENT} downloads in progress; finish or cancel one first"
            ))
        })
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// Sets the metrics' gauges from the store: call once, before the controller serves (it
    /// blocks on the store). From then on they move with the changes, and a scrape reads only
    /// them.
    pub(crate) fn load_gauges(&self) -> Result<()> {
        let agents = self.inner.store.agents()?;
        let rollouts: Vec<(String, rollouts::Rollout)> = self.inner.store.list(store::Tree::Rollouts)?;
        self.metrics().load_gauges(
            agents.into_iter().map(|a| (a.region, a.revoked)),
            rollouts.into_iter().map(|(id, r)| (id, r.state)),
        );
        Ok(())
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn notify(&self, kind: &str, event: serde_json::Value) {
        self.inner.notifier.send(kind, event);
    }

    pub fn ca_pem(&self) -> &str {
        self.inner.ca.cert_pem()
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.inner.settings.heartbeat_interval
    }

    /// Runs a blocking store operation off the async threads.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Controller) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
    }

    /// Revokes an agent: it is refused from now on, and its live session is closed.
    pub async fn revoke_agent(&self, agent_id: &str, by: &Identity) -> Result<bool> {
        let id = agent_id.to_owned();
        let (updated, newly) = self
            .blocking(move |c| {
                // The closure may run more than once (a concurrent update retries it); the value
                // of its last run is the one written.
                let mut newly = false;
                let updated = c.inner.store.update_agent(&id, true, |r| {
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
            self.metrics().agent_revoked(&record.region, newly, live.is_some());
            live
        };
        let was_online = live.is_some();
        if let Some(s) = live {
            s.cancel.cancel();
        }
        tracing::warn!(agent_id, by = %by, was_online, "agent revoked");
        Ok(was_online)
    }
}
