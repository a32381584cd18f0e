//! The controller's logic, as services: [`Registry`] (enrollment, agent identity, sessions,
//! admins), [`Releases`] (bundles), [`Orders`] (orders to agents), [`Rollouts`] (rollouts,
//! rollbacks, desired state, freezes), [`Audit`] (the hash-chained log) and [`AlertPolicy`]
//! (what an alert does). [`Controller`] wires them once. Nothing here knows about gRPC or HTTP;
//! [`crate::grpc`] and [`crate::hooks`] parse, authorize and call.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_pki::Ca;

use crate::store::{self, Store};

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

pub(crate) mod alerts;
pub mod audit;
pub(crate) mod core;
pub mod environment;
pub mod heartbeats;
mod orders;
pub mod registry;
pub mod releases;
pub mod roles;
pub mod rollouts;

pub use alerts::AlertPolicy;
pub use audit::Audit;
pub use environment::Environment;
pub use orders::{Answer, Order, OrderKind, OrderOutcome, Orders, ResultReceipt, Scope, Target};
pub use registry::{admins, AgentView, Enrolled, Registry, SessionHandle, SessionTx};
pub use releases::{BlobChunk, Releases, Upload, UploadError, BUNDLE_CHUNK};
pub use rollouts::Rollouts;

use self::core::Core;

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

/// The controller: its services, wired once, each reaching only the services it depends on
/// (the arrows point one way: `AlertPolicy` → `Rollouts` → `Orders` → `Registry`; `Releases`,
/// `Audit` and the shared [`Core`] below them). Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Services>,
}

struct Services {
    core: Core,
    audit: Audit,
    registry: Registry,
    releases: Releases,
    orders: Orders,
    rollouts: Rollouts,
    alerts: AlertPolicy,
}

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
    /// Promotion rules per environment.
    pub promotion: rollouts::promotion::Rules,
    /// When rollouts may activate, per environment and region.
    pub windows: rollouts::windows::DeployWindows,
}

impl Controller {
    /// Wires the services over `store`. Reads the store, so it runs on a blocking thread.
    pub fn new(ca: Ca, store: Store, settings: Settings) -> Result<Self> {
        let core = Core::new(store, settings);
        let audit = Audit::new(core.clone());
        let registry = Registry::new(core.clone(), ca);
        let releases = Releases::new(core.clone());
        let orders = Orders::new(core.clone(), registry.clone())?;
        let rollouts = Rollouts::new(core.clone(), registry.clone(), orders.clone(), audit.clone());
        let alerts = AlertPolicy::new(
            core.clone(),
            audit.clone(),
            registry.clone(),
            releases.clone(),
            rollouts.clone(),
        );
        Ok(Self { inner: Arc::new(Services { core, audit, registry, releases, orders, rollouts, alerts }) })
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.inner.audit
    }

    /// Enrollment, agent identity, live sessions and admins.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Release bundles: ingest, listing, streaming to agents.
    pub fn releases(&self) -> &Releases {
        &self.inner.releases
    }

    /// Orders to agents and their answers.
    pub fn orders(&self) -> &Orders {
        &self.inner.orders
    }

    /// Rollouts, fleet rollbacks, desired state, freezes and fleet status.
    pub fn rollouts(&self) -> &Rollouts {
        &self.inner.rollouts
    }

    /// What alerts and signed hook calls do to the fleet.
    pub fn alerts(&self) -> &AlertPolicy {
        &self.inner.alerts
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        self.inner.core.metrics()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.core.store
    }

    /// Sets the metrics' gauges from the store: call once, before the controller serves (it
    /// blocks on the store). From then on they move with the changes, and a scrape reads only
    /// them.
    pub(crate) fn load_gauges(&self) -> Result<()> {
        let agents = self.store().agents()?;
        let rollouts: Vec<(String, rollouts::Rollout)> = self.store().list(store::Tree::Rollouts)?;
        self.metrics().load_gauges(
            agents.into_iter().map(|a| (a.environment.to_string(), a.region, a.revoked)),
            rollouts.into_iter().map(|(id, r)| (id, r.state)),
        );
        Ok(())
    }

    /// Runs a task that holds the controller and ends at shutdown (a session's loop).
    pub fn spawn_tracked<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.core.tasks.spawn(task);
    }

    /// Stops background work and closes every live session, so that a graceful shutdown does
    /// not wait on streams that would otherwise never end. Agents reconnect to the next
    /// controller.
    pub fn close_all_sessions(&self) {
        self.inner.core.shutdown.cancel();
        self.inner.registry.close_all_sessions();
    }

    /// Waits up to `limit` for tracked tasks to end, after sessions were closed.
    pub async fn wait_for_tasks(&self, limit: Duration) {
        let tasks = &self.inner.core.tasks;
        tasks.close();
        if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
            tracing::warn!(left = tasks.len(), "session tasks still running at shutdown");
        }
    }
}
