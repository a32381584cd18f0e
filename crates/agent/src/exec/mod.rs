//! Applying orders. The session hands every order to [`Executor::submit`] as it arrives; it is
//! validated at the boundary ([`crate::order`]), admitted by sequence number right there in
//! arrival order, and then run one at a time per app while other apps' orders carry on.
//!
//! - `install`: download, verify, unpack; never touches `current`.
//! - `activation`: the one journaled path for deploy, rollback and automatic revert, and the
//!   recovery of an activation a crash interrupted.
//! - `services`: supervised services and the health monitor after a deploy.
//! - `status`: what the agent reports per app.

mod activation;
mod error;
mod install;
mod services;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};

use convoy_bundle::{Limits, TrustStore};
use convoy_proto::v1 as pb;
use tokio::sync::{mpsc, Mutex};
use tonic::transport::Channel;

pub use error::ExecError;

use crate::download::{DownloadOptions, Downloader};
use crate::layout::Layout;
use crate::order::{AppName, Order, OrderKind, Outcome, Refusal};
use crate::state::{HealthState, State};
use crate::Result;

/// The most log text one Logs order returns.
pub const MAX_LOG_BYTES: u64 = crate::layout::LOG_TAIL_MAX_BYTES;

/// How the executor behaves.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    pub data_dir: PathBuf,
    /// Release keys; empty means every bundle is refused.
    pub trust: TrustStore,
    /// Per-host variables for `${NAME}`; a release's children see only those it references.
    pub vars: BTreeMap<String, String>,
    /// Releases kept per app (the current one and the rollback target are never pruned).
    pub keep_releases: usize,
    pub log_cap: u64,
    pub limits: Limits,
    pub max_downloads: usize,
    pub download: DownloadOptions,
    /// Test builds only: abort the process when this step is reached (crash-safety tests).
    pub failpoint: Option<String>,
    /// This agent's labels, for releases that target labels.
    pub labels: BTreeMap<String, String>,
}

impl ExecConfig {
    pub fn new(data_dir: PathBuf, trust: TrustStore) -> Self {
        Self {
            data_dir,
            trust,
            vars: BTreeMap::new(),
            keep_releases: 3,
            log_cap: 10 << 20,
            limits: Limits::default(),
            max_downloads: 2,
            download: DownloadOptions::default(),
            failpoint: None,
            labels: BTreeMap::new(),
        }
    }
}

/// Health and errors as they are right now, per app.
#[derive(Clone, Debug, Default)]
pub(crate) struct Live {
    pub health: HealthState,
    pub last_error: Option<String>,
    pub busy: bool,
}

/// What every part of the executor shares.
pub(crate) struct Core {
    pub cfg: ExecConfig,
    pub layout: Layout,
    pub state: State,
    /// The health probes' HTTP client (plain `http://`, no proxies, no redirects).
    pub http: convoy_transport::http::HttpClient,
    live: StdMutex<HashMap<String, Live>>,
    app_locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
}

pub(crate) fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation; a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    pub fn set_live(&self, app: &str, f: impl FnOnce(&mut Live)) {
        f(lock(&self.live).entry(app.to_owned()).or_default());
    }

    pub fn live(&self, app: &str) -> Live {
        lock(&self.live).get(app).cloned().unwrap_or_default()
    }

    /// The per-app lock: one install or activation per app at a time.
    pub fn app_lock(&self, app: &str) -> Arc<Mutex<()>> {
        lock(&self.app_locks).entry(app.to_owned()).or_default().clone()
    }

    /// Aborts the process at a named step. Compiled only into test builds.
    pub fn failpoint(&self, name: &str) {
        #[cfg(feature = "failpoints")]
        if self.cfg.failpoint.as_deref() == Some(name) {
            tracing::error!(failpoint = name, "failpoint reached: aborting");
            std::process::abort();
        }
        #[cfg(not(feature = "failpoints"))]
        let _ = name;
    }

    /// Runs blocking work (sled, files, hashing) off the async worker threads.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Core) -> std::result::Result<T, ExecError> + Send + 'static,
    ) -> std::result::Result<T, ExecError> {
        let core = self.clone();
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| ExecError::Internal(format!("blocking task: {e}")))?
    }
}

/// How far past the last applied order a new order's number may be (the controller's own bound
/// on the sequence jumps it makes); numbers from 2^63 on are never admitted (a controller
/// refuses an agent that reports them).
pub const MAX_SEQ_JUMP: u64 = 1 << 32;

/// Applies orders and supervises services. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    core: Arc<Core>,
    installer: install::Installer,
    activator: activation::Activator,
    /// The highest sequence number admitted; decided on arrival, persisted before the order runs.
    admitted: Arc<StdMutex<u64>>,
    workers: Arc<StdMutex<HashMap<String, mpsc::UnboundedSender<Job>>>>,
    /// Permits for Logs orders in progress.
    log_reads: Arc<tokio::sync::Semaphore>,
}

/// How many Logs orders an agent serves at once.
pub const MAX_LOG_READS: usize = 4;

/// An admitted order waiting for its app's worker.
struct Job {
    order: Order,
    channel: Channel,
    reply: mpsc::Sender<pb::AgentMessage>,
}

impl Executor {
    pub fn open(cfg: ExecConfig) -> Result<Self> {
        let layout = Layout::new(&cfg.data_dir);
        // Services that run as another user pass through the data dir to their release; the
        // state store and the download cache stay the agent's alone.
        crate::identity::create_data_dir(&cfg.data_dir)?;
        crate::identity::create_private_dir(&layout.state_dir())?;
        crate::identity::create_private_dir(&layout.cache_dir())?;
        let state = State::open(&layout.state_dir())?;
        let admitted = state.last_seq()?;
        let downloader =
            Downloader::new(layout.cache_dir(), cfg.max_downloads, cfg.download.clone(), cfg.trust.clone());
        let http = crate::health::http_client()?;
        let core = Arc::new(Core {
            cfg,
            layout,
            state,
            http,
            live: StdMutex::new(HashMap::new()),
            app_locks: StdMutex::new(HashMap::new()),
        });
        let services = services::Services::new(core.clone());
        Ok(Self {
            installer: install::Installer::new(core.clone(), downloader),
            activator: activation::Activator::new(core.clone(), services),
            core,
            admitted: Arc::new(StdMutex::new(admitted)),
            workers: Arc::new(StdMutex::new(HashMap::new())),
            log_reads: Arc::new(tokio::sync::Semaphore::new(MAX_LOG_READS)),
        })
    }

    /// The highest sequence number this agent has admitted.
    pub fn last_seq(&self) -> u64 {
        *lock(&self.admitted)
    }

    /// Takes an order from the session as it arrives. It is validated here (a refusal is
    /// answered at once and changes nothing), read-only orders run at once, and the others are
    /// admitted by sequence number in arrival order, then run one at a time per app.
    pub fn submit(&self, order: pb::Order, channel: Channel, reply: mpsc::Sender<pb::AgentMessage>) {
        let order = match Order::try_from(order) {
            Ok(o) => o,
            Err((seq, app, refusal)) => {
                tracing::warn!(seq, field = refusal.field, error = %refusal.message, "order refused");
                self.answer(seq, app, Outcome::Refused(refusal), String::new(), reply);
                return;
            }
        };
        let app = order.kind.app().clone();
        if let OrderKind::Logs { lines, .. } = &order.kind {
            let (seq, lines) = (order.seq, *lines);
            // Log reads are not fenced by sequence numbers, so they are bounded here: a few at
            // a time, each holding its permit until its answer is sent, so a controller that
            // floods them cannot make the agent buffer without limit.
            let Ok(permit) = self.log_reads.clone().try_acquire_owned() else {
                let busy = Outcome::Failed(format!(
                    "{MAX_LOG_READS} log reads are already in progress on this agent; try again"
                ));
                self.answer(seq, Some(app), busy, String::new(), reply);
                return;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let (outcome, text) = this.logs(&app, lines).await;
                this.send_answer(seq, Some(app), outcome, text, reply).await;
                drop(permit);
            });
            return;
        }
        {
            let mut admitted = lock(&self.admitted);
            if order.seq <= *admitted {
                let outcome = Outcome::Stale { seq: order.seq, agent_last_seq: *admitted };
                drop(admitted);
                tracing::info!(seq = order.seq, "stale order ignored");
                self.answer(order.seq, Some(app), outcome, String::new(), reply);
                return;
            }
            // An order numbered far past anything applied would make every later order stale
            // and lock this agent out of a controller that did not send it. (A new agent's
            // first order may carry any number the controller has reached.)
            let too_far =
                (*admitted > 0 && order.seq - *admitted > MAX_SEQ_JUMP) || order.seq >= u64::MAX / 2;
            if too_far {
                let refusal = Refusal::new(
                    "seq",
                    format!(
                        "order {} is more than {MAX_SEQ_JUMP} past the last applied order {}",
                        order.seq, *admitted
                    ),
                );
                drop(admitted);
                tracing::warn!(seq = order.seq, "order numbered far past the last applied one refused");
                self.answer(order.seq, Some(app), Outcome::Refused(refusal), String::new(), reply);
                return;
            }
            *admitted = order.seq;
        }
        // A rollback must not wait out a health gate in progress: the gate is cancelled, the
        // activation it guards reverts, and the rollback runs next.
        if let OrderKind::Rollback { from, .. } = &order.kind {
            self.activator.cut_gate_short(app.as_str(), from.as_str());
        }
        let job = Job { order, channel, reply };
        let mut workers = lock(&self.workers);
        let tx = workers.entry(app.as_str().to_owned()).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let this = self.clone();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    let seq = job.order.seq;
                    let app = job.order.kind.app().clone();
                    let outcome = this.run(job.order, job.channel).await;
                    this.answer(seq, Some(app), outcome, String::new(), job.reply);
                }
            });
            tx
        });
        if let Err(mpsc::error::SendError(job)) = tx.send(job) {
            tracing::error!(seq = job.order.seq, "order worker is gone");
        }
    }

    /// Sends an order's answer with the app's status, off the caller's task.
    fn answer(
        &self,
        seq: u64,
        app: Option<AppName>,
        outcome: Outcome,
        output: String,
        reply: mpsc::Sender<pb::AgentMessage>,
    ) {
        let this = self.clone();
        tokio::spawn(async move { this.send_answer(seq, app, outcome, output, reply).await });
    }

    /// Sends an order's answer with the app's status.
    async fn send_answer(
        &self,
        seq: u64,
        app: Option<AppName>,
        outcome: Outcome,
        output: String,
        reply: mpsc::Sender<pb::AgentMessage>,
    ) {
        let (kind, message, field) = outcome.to_pb();
        let agent_last_seq = self.last_seq();
        let core = self.core.clone();
        {
            // The status reads sled and the file system: off the async threads.
            let status = match app {
                Some(a) => {
                    tokio::task::spawn_blocking(move || status::app_status(&core, a.as_str())).await.ok()
                }
                None => None,
            };
            let result = pb::OrderResult {
                seq,
                message,
                outcome: kind as i32,
                field: field.to_owned(),
                agent_last_seq,
                status,
                output,
            };
            let msg = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Result(result)) };
            if reply.send(msg).await.is_err() {
                tracing::warn!(seq, "session closed before the order's answer could be sent");
            }
        }
    }

    /// Runs one admitted order: persists its sequence number first, so a replay after a crash
    /// is refused too, then applies it.
    async fn run(&self, order: Order, channel: Channel) -> Outcome {
        let seq = order.seq;
        if let Err(e) = self.core.blocking(move |c| Ok(c.state.raise_last_seq(seq)?)).await {
            return Outcome::Failed(format!("cannot record order {seq}: {e}"));
        }
        let app = order.kind.app().clone();
        let result = match order.kind {
            OrderKind::Install { app, version, digest } => {
                self.installer.install(&app, &version, &digest, channel).await
            }
            OrderKind::Activate { app, version, health_deadline } => {
                self.activator.deploy(&app, &version, health_deadline).await
            }
            OrderKind::Rollback { app, from, to, reason } => {
                self.activator.rollback(&app, &from, to.as_ref(), &reason).await
            }
            OrderKind::Logs { .. } => Err(ExecError::Internal("logs orders are not queued".into())),
        };
        match result {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(app = %app, seq, error = %e, "order did not apply");
                let outcome = e.into_outcome();
                if let Outcome::Failed(m) | Outcome::Refused(crate::order::Refusal { message: m, .. }) =
                    &outcome
                {
                    self.core.set_live(app.as_str(), |l| l.last_error = Some(m.clone()));
                }
                outcome
            }
        }
    }

    /// The tail of the current release's log, read without following links and capped.
    async fn logs(&self, app: &AppName, lines: u32) -> (Outcome, String) {
        let app = app.clone();
        let r = self
            .core
            .blocking(move |c| {
                let Some(cur) = c.layout.read_current(app.as_str()) else {
                    return Err(ExecError::Refused(crate::order::Refusal::new(
                        "app",
                        format!("app {app} has no current release here"),
                    )));
                };
                let cur = crate::order::Version::parse(&cur).map_err(|r| {
                    ExecError::Internal(format!("current release of {app} has a bad name: {}", r.message))
                })?;
                Ok(c.layout.read_log(app.as_str(), cur.as_str(), lines as usize, MAX_LOG_BYTES)?)
            })
            .await;
        match r {
            Ok(text) => (Outcome::Applied(format!("{} bytes of log", text.len())), text),
            Err(e) => (e.into_outcome(), String::new()),
        }
    }

    /// Start-up: clean leftovers, stop orphans of a previous run that are provably ours,
    /// resume interrupted activations, and start every app's current release (re-verified).
    pub async fn recover(&self) -> Result<()> {
        let installer = self.installer.clone();
        tokio::task::spawn_blocking(move || installer.clean_partials())
            .await
            .map_err(|e| crate::Error::State(format!("recovery task: {e}")))?;
        self.activator.recover().await
    }

    /// Stops every supervised service (agent shutdown).
    pub async fn shutdown(&self) {
        // Dropping the queues ends the per-app workers, which hold references to the executor
        // (and through it the state store's file lock).
        lock(&self.workers).clear();
        self.activator.shutdown().await;
    }

    /// What the agent reports for one app.
    pub fn status(&self, app: &str) -> pb::AppStatus {
        status::app_status(&self.core, app)
    }

    /// Status of every app the agent knows.
    pub fn statuses(&self) -> Vec<pb::AppStatus> {
        status::all(&self.core)
    }
}
