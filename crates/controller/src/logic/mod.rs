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
pub mod heartbeats;
mod orders;
pub mod roles;
pub mod rollouts;

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

    /// Creates a one-time join token. Only its hash is stored.
    pub async fn create_token(
        &self,
        region: Option<String>,
        labels: BTreeMap<String, String>,
        allow_agent_labels: bool,
        ttl: Duration,
        created_by: &Identity,
    ) -> Result<(String, i64)> {
        if let Some(r) = &region {
            validate_word("region", r)?;
        }
        validate_labels(&labels)?;
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(Error::InvalidArgument("token ttl must be between 1s and 30 days".into()));
        }
        let raw: [u8; 32] = rand::random();
        let token = format!("cvt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
        let created_at = now();
        let rec = TokenRecord {
            region,
            labels,
            created_at,
            expires_at: created_at + ttl.as_secs().max(1) as i64,
            created_by: created_by.to_string(),
            used_by: None,
            allow_agent_labels,
        };
        let expires = rec.expires_at;
        let bound_region = rec.region.clone();
        let hash = token_hash(&token);
        self.blocking(move |c| Ok(c.inner.store.put_token(&hash, &rec)?)).await?;
        tracing::info!(region = ?bound_region, expires_at = expires, created_by = %created_by, "join token created");
        Ok((token, expires))
    }

    /// Enrolls an agent: checks the token, signs the CSR for an identity the controller
    /// chooses, and records the agent, all or nothing.
    pub async fn enroll(
        &self,
        token: String,
        requested_id: String,
        region: String,
        labels: BTreeMap<String, String>,
        csr_der: Vec<u8>,
    ) -> Result<Enrolled> {
        self.blocking(move |c| c.enroll_blocking(&token, &requested_id, &region, labels, &csr_der)).await
    }

    fn enroll_blocking(
        &self,
        token: &str,
        requested_id: &str,
        region: &str,
        mut labels: BTreeMap<String, String>,
        csr_der: &[u8],
    ) -> Result<Enrolled> {
        if !token.starts_with("cvt_") || token.len() != 47 {
            return Err(Error::TokenMalformed);
        }
        let hash = token_hash(token);
        let tok = self.inner.store.token(&hash)?.ok_or(Error::TokenUnknown)?;
        if let Some(by) = &tok.used_by {
            return Err(Error::TokenUsed(by.clone()));
        }
        let now = now();
        if now >= tok.expires_at {
            return Err(Error::TokenExpired(now - tok.expires_at));
        }
        let region = match (&tok.region, region) {
            (Some(bound), asked) if !asked.is_empty() && asked != bound => {
                return Err(Error::TokenRegion { bound: bound.clone(), asked: asked.to_owned() })
            }
            (Some(bound), _) => bound.clone(),
            (None, "") => return Err(Error::InvalidArgument("the agent must name its region".into())),
            (None, asked) => asked.to_owned(),
        };
        validate_word("region", &region)?;
        validate_labels(&labels)?;
        if !labels.is_empty() && !tok.allow_agent_labels {
            let asked: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return Err(Error::PermissionDenied(format!(
                "this join token does not let the agent choose labels (asked for {}); put them on the \
                 token, or create it with --allow-agent-labels",
                asked.join(", ")
            )));
        }
        // Labels the admin put on the token win over what the agent asks for.
        labels.extend(tok.labels.clone());
        let id = if requested_id.is_empty() {
            format!("agent-{}", hex::encode(rand::random::<[u8; 4]>()))
        } else {
            requested_id.to_owned()
        };
        let identity = Identity::agent(&id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if self.inner.store.agent(&id)?.is_some() {
            return Err(Error::AgentExists(id));
        }
        let issued = self
            .inner
            .ca
            .sign_csr(csr_der, &identity, self.inner.settings.agent_cert_lifetime)
            .map_err(|e| Error::Csr(e.to_string()))?;
        let rec = AgentRecord {
            id: id.clone(),
            region: region.clone(),
            labels: labels.clone(),
            first_seen: now,
            last_seen: now,
            cert_serial: issued.info.serial.clone(),
            cert_not_after: issued.info.not_after,
            agent_version: String::new(),
            releases: vec![],
            revoked: false,
            apps: vec![],
            previous_serial: None,
            previous_serial_until: 0,
            cert_serial_used: false,
        };
        match self.inner.store.commit_enrollment(&hash, &rec)? {
            Ok(()) => {}
            Err(EnrollConflict::TokenGone) => return Err(Error::TokenUnknown),
            Err(EnrollConflict::TokenUsed) => return Err(Error::TokenUsed("another agent".into())),
            Err(EnrollConflict::AgentExists) => return Err(Error::AgentExists(id)),
        }
        self.metrics().agent_enrolled(&region);
        tracing::info!(agent_id = %id, %region, serial = %issued.info.serial, "agent enrolled");
        Ok(Enrolled { agent_id: id, cert_pem: issued.cert_pem, region, labels })
    }

    /// Issues a new certificate for an enrolled, unrevoked agent from a CSR made with a new key.
    /// Only the agent's newest certificate (`serial`) may renew: a superseded one, still
    /// accepted for a short overlap, cannot mint a successor and lock the agent out.
    pub async fn renew(&self, agent_id: String, serial: String, csr_der: Vec<u8>) -> Result<String> {
        self.blocking(move |c| {
            let rec = c.inner.store.agent(&agent_id)?.ok_or_else(|| Error::UnknownAgent(agent_id.clone()))?;
            if rec.revoked {
                return Err(Error::Revoked(format!("agent {agent_id:?}")));
            }
            let superseded = || {
                Error::PermissionDenied(format!(
                    "certificate {serial} of agent {agent_id:?} has been superseded; only the newest may renew"
                ))
            };
            // The newest certificate renews; the one it replaced may too while the newest has
            // never been presented (the answer to its renewal was lost), within the overlap.
            let may_renew = |r: &AgentRecord| {
                r.cert_serial == serial
                    || (!r.cert_serial_used
                        && r.previous_serial.as_deref() == Some(serial.as_str())
                        && now() < r.previous_serial_until)
            };
            if !may_renew(&rec) {
                return Err(superseded());
            }
            let identity = Identity::agent(&agent_id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let issued = c
                .inner
                .ca
                .sign_csr(&csr_der, &identity, c.inner.settings.agent_cert_lifetime)
                .map_err(|e| Error::Csr(e.to_string()))?;
            let overlap = renewal_overlap(c.inner.settings.agent_cert_lifetime);
            // Checked again in the same atomic update: two renewals racing with one certificate
            // cannot both win.
            let mut raced = false;
            c.inner.store.update_agent(&agent_id, true, |r| {
                raced = !may_renew(r);
                if raced {
                    return;
                }
                // A lost answer's certificate is dropped: the serial that renewed stays the
                // previous one, within the overlap it already had.
                let replaced = std::mem::replace(&mut r.cert_serial, issued.info.serial.clone());
                if replaced == serial {
                    r.previous_serial = Some(replaced);
                    r.previous_serial_until = now() + overlap.as_secs() as i64;
                }
                r.cert_serial_used = false;
                r.cert_not_after = issued.info.not_after;
            })?;
            if raced {
                return Err(superseded());
            }
            tracing::info!(%agent_id, serial = %issued.info.serial, not_after = issued.info.not_after, "agent certificate renewed");
            Ok(issued.cert_pem)
        })
        .await
    }

    /// Refuses an agent certificate that is not the agent's newest (or, for a short overlap
    /// after a renewal, the one it replaced), and agents that are revoked or unknown. Called for
    /// every agent RPC with the serial of the verified client certificate.
    pub async fn check_agent_cert(&self, agent_id: &str, serial: &str) -> Result<AgentRecord> {
        let rec = self.check_agent(agent_id).await?;
        let current = rec.cert_serial == serial;
        let overlap = rec.previous_serial.as_deref() == Some(serial) && now() < rec.previous_serial_until;
        if current && !rec.cert_serial_used {
            // The renewed certificate is in use: from now on only it may renew.
            let (id, s) = (agent_id.to_owned(), serial.to_owned());
            self.blocking(move |c| {
                c.inner.store.update_agent(&id, true, |r| r.cert_serial_used |= r.cert_serial == s)?;
                Ok(())
            })
            .await?;
        }
        if current || overlap {
            return Ok(rec);
        }
        tracing::warn!(agent_id, serial, newest = %rec.cert_serial, "superseded agent certificate refused");
        Err(Error::PermissionDenied(format!(
            "certificate {serial} of agent {agent_id:?} has been superseded by a renewal; only the newest is accepted"
        )))
    }

    /// Refuses identities that are revoked or unknown.
    pub async fn check_agent(&self, agent_id: &str) -> Result<AgentRecord> {
        let id = agent_id.to_owned();
        let rec = self
            .blocking(move |c| Ok(c.inner.store.agent(&id)?))
            .await?
            .ok_or_else(|| Error::UnknownAgent(agent_id.to_owned()))?;
        if rec.revoked {
            return Err(Error::Revoked(format!("agent {agent_id:?}")));
        }
        Ok(rec)
    }

    /// Registers a live session for `agent_id` after its hello. A newer session replaces an
    /// older one for the same agent.
    pub async fn open_session(
        &self,
        agent_id: &str,
        agent_version: String,
        releases: Vec<ReportedRelease>,
        apps: Vec<crate::store::AppStatusRecord>,
        tx: SessionTx,
    ) -> Result<SessionHandle> {
        self.admit_session_open(agent_id)?;
        let region = self.check_agent(agent_id).await?.region;
        let id = agent_id.to_owned();
        self.blocking(move |c| {
            c.inner.store.update_agent(&id, true, |r| {
                r.last_seen = now();
                r.agent_version = agent_version.clone();
                r.releases = releases.clone();
                r.apps = apps.clone();
            })?;
            Ok(())
        })
        .await?;
        let session_id = self.inner.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let last_seen = Arc::new(AtomicI64::new(now()));
        let old = {
            let mut sessions = self.lock_sessions();
            let old = sessions.insert(
                agent_id.to_owned(),
                Session {
                    id: session_id,
                    region: region.clone(),
                    cancel: cancel.clone(),
                    tx,
                    last_seen: last_seen.clone(),
                },
            );
            // A session that replaces the agent's own older one changes no count.
            if old.is_none() {
                self.metrics().agent_online(&region);
            }
            old
        };
        if let Some(old) = old {
            old.cancel.cancel();
        }
        let handle = SessionHandle { agent_id: agent_id.to_owned(), session_id, cancel, last_seen };
        // A revocation that landed between the check above and the insert found no session to
        // close: look again now that the session is visible to it.
        if let Err(e) = self.check_agent(agent_id).await {
            self.end_session(&handle).await;
            return Err(e);
        }
        tracing::info!(agent_id, session_id, "agent online");
        Ok(handle)
    }

    /// Refuses an agent that opens sessions faster than [`SESSION_OPENS_BURST`] back to back
    /// and one a second after that: each open writes its record and starts its loop, and a
    /// reconnect loop must not turn that into a flood (nor reset a session's heartbeat budget).
    fn admit_session_open(&self, agent_id: &str) -> Result<()> {
        if take_token(&self.inner.session_opens, agent_id, SESSION_OPENS_BURST) {
            Ok(())
        } else {
            Err(Error::Busy(format!("agent {agent_id:?} reconnects too often: retry in a second")))
        }
    }

    /// Admits one audited action of `actor`: at most [`ACTIONS_BURST`] back to back and one a
    /// second after that. Each writes (and flushes) two audit entries, so a caller looping on
    /// an action, even one that fails, must not grow the log without bound.
    pub fn admit_action(&self, actor: &str) -> Result<()> {
        if take_token(&self.inner.action_rate, actor, ACTIONS_BURST) {
            Ok(())
        } else {
            Err(Error::Busy(format!("{actor} is acting too often: retry in a second")))
        }
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding this lock cannot leave the map inconsistent: every critical
        // section is a single insert or remove.
        self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat the session's [`heartbeats::Heartbeats`] judged: last-seen in memory
    /// always, the agent's record only for [`heartbeats::Verdict::Write`]. Not flushed:
    /// last-seen times are advisory, sled flushes them soon.
    pub async fn heartbeat(
        &self,
        handle: &SessionHandle,
        verdict: heartbeats::Verdict,
        releases: Vec<ReportedRelease>,
        apps: Vec<crate::store::AppStatusRecord>,
    ) -> Result<()> {
        handle.last_seen.store(now(), std::sync::atomic::Ordering::Relaxed);
        if verdict != heartbeats::Verdict::Write {
            return Ok(());
        }
        let id = handle.agent_id.clone();
        self.blocking(move |c| {
            c.inner.store.update_agent(&id, false, |r| {
                r.last_seen = now();
                r.releases = releases.clone();
                r.apps = apps.clone();
            })?;
            Ok(())
        })
        .await
    }

    /// Ends a session, unless a newer one has replaced it.
    pub async fn end_session(&self, handle: &SessionHandle) {
        let removed = {
            let mut sessions = self.lock_sessions();
            let removed = match sessions.get(&handle.agent_id) {
                Some(s) if s.id == handle.session_id => sessions.remove(&handle.agent_id),
                _ => None,
            };
            if let Some(s) = &removed {
                self.metrics().agent_offline(&s.region);
            }
            removed.is_some()
        };
        if removed {
            // Orders in flight on this session will not be answered: fail them now.
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(agent, _), _| agent != &handle.agent_id);
            let id = handle.agent_id.clone();
            let seen = self
                .blocking(move |c| Ok(c.inner.store.update_agent(&id, true, |r| r.last_seen = now())?))
                .await;
            if let Err(e) = seen {
                tracing::warn!(agent_id = %handle.agent_id, error = %e, "last-seen time not recorded");
            }
            // Tell the webhooks if it stays away.
            let this = self.clone();
            let id = handle.agent_id.clone();
            let after = self.inner.settings.offline_after;
            if !self.inner.settings.notify_urls.is_empty() {
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(after) => {
                            if !this.is_online(&id) {
                                this.notify("agent_offline", serde_json::json!({"agent": id, "offline_for_secs": after.as_secs()}));
                            }
                        }
                        () = this.inner.shutdown.cancelled() => {}
                    }
                });
            }
            tracing::info!(agent_id = %handle.agent_id, session_id = handle.session_id, "agent offline");
        }
    }

    /// Runs a task that holds the controller and ends at shutdown (a session's loop).
    pub fn spawn_tracked<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }

    /// Waits up to `limit` for tracked tasks to end, after sessions were closed.
    pub async fn wait_for_tasks(&self, limit: Duration) {
        self.inner.tasks.close();
        if tokio::time::timeout(limit, self.inner.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.inner.tasks.len(), "session tasks still running at shutdown");
        }
    }

    /// Closes every live session, so that a graceful shutdown does not wait on streams that
    /// would otherwise never end. Agents reconnect to the next controller.
    pub fn close_all_sessions(&self) {
        self.inner.shutdown.cancel();
        for (_, s) in self.lock_sessions().drain() {
            self.metrics().agent_offline(&s.region);
            s.cancel.cancel();
        }
    }

    pub fn is_online(&self, agent_id: &str) -> bool {
        self.lock_sessions().contains_key(agent_id)
    }

    /// Lists agents, optionally only one region's.
    pub async fn list_agents(&self, region: Option<String>) -> Result<Vec<AgentView>> {
        let records = self.blocking(|c| Ok(c.inner.store.agents()?)).await?;
        let sessions = self.lock_sessions();
        Ok(records
            .into_iter()
            .filter(|r| region.as_deref().is_none_or(|want| r.region == want))
            .map(|mut record| match sessions.get(&record.id) {
                Some(s) => {
                    record.last_seen =
                        record.last_seen.max(s.last_seen.load(std::sync::atomic::Ordering::Relaxed));
                    AgentView { online: true, record }
                }
                None => AgentView { online: false, record },
            })
            .collect())
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
