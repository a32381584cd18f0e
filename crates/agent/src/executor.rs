//! Applying orders: install, activate, rollback. Deploy, rollback and the automatic revert all go
//! through one activation path, journaled step by step, so that the rare path is the common one
//! and a crash at any step is finished or undone at start-up.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use convoy_bundle::{Limits, Manifest, ReleaseConfig, TrustStore};
use convoy_pki::files;
use convoy_proto::v1 as pb;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::download::{DownloadOptions, Downloader};
use crate::layout::Layout;
use crate::process::{self, Log, ServiceSpec, Supervised};
use crate::state::{Activation, ActivationKind, HealthState, InstalledRecord, State, Step};
use crate::Result;

/// How the executor behaves.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    pub data_dir: PathBuf,
    /// Release keys; empty means every bundle is refused.
    pub trust: TrustStore,
    /// Per-host variables for `${NAME}` and the environment of services and hooks.
    pub vars: BTreeMap<String, String>,
    /// Releases kept per app (the current, known-good and previous ones are never pruned).
    pub keep_releases: usize,
    pub log_cap: u64,
    pub limits: Limits,
    pub max_downloads: usize,
    pub download: DownloadOptions,
    /// Test hook: abort the process when this step is reached (crash-safety tests).
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
struct Live {
    health: HealthState,
    last_error: Option<String>,
    busy: bool,
}

/// Applies orders and supervises services. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ExecConfig,
    layout: Layout,
    state: State,
    downloader: Downloader,
    services: Mutex<HashMap<String, Supervised>>,
    app_locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    monitors: StdMutex<HashMap<String, CancellationToken>>,
    live: StdMutex<HashMap<String, Live>>,
    seq: StdMutex<()>,
    workers: StdMutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    /// The health gate in progress per app, so a rollback can cut it short.
    gates: StdMutex<HashMap<String, CancellationToken>>,
}

/// An admitted order waiting for its app's worker.
struct Job {
    order: pb::Order,
    channel: Channel,
    reply: mpsc::Sender<pb::AgentMessage>,
}

/// The outcome of an order, before it becomes a wire message.
pub struct Outcome {
    pub ok: bool,
    pub stale: bool,
    pub error: Option<String>,
    pub output: String,
    pub app: Option<String>,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation; a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Executor {
    pub fn open(cfg: ExecConfig) -> Result<Self> {
        let layout = Layout::new(&cfg.data_dir);
        let state = State::open(&layout.state_dir())?;
        let downloader =
            Downloader::new(layout.cache_dir(), cfg.max_downloads, cfg.download.clone(), cfg.trust.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                layout,
                state,
                downloader,
                services: Mutex::new(HashMap::new()),
                app_locks: StdMutex::new(HashMap::new()),
                monitors: StdMutex::new(HashMap::new()),
                live: StdMutex::new(HashMap::new()),
                seq: StdMutex::new(()),
                workers: StdMutex::new(HashMap::new()),
                gates: StdMutex::new(HashMap::new()),
            }),
        })
    }

    fn failpoint(&self, name: &str) {
        if self.inner.cfg.failpoint.as_deref() == Some(name) {
            tracing::error!(failpoint = name, "failpoint reached: aborting");
            std::process::abort();
        }
    }

    fn app_lock(&self, app: &str) -> Arc<Mutex<()>> {
        lock(&self.inner.app_locks).entry(app.to_owned()).or_default().clone()
    }

    fn set_live(&self, app: &str, f: impl FnOnce(&mut Live)) {
        f(lock(&self.inner.live).entry(app.to_owned()).or_default());
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.state.last_seq().unwrap_or(0)
    }

    /// Admits an order by sequence number: anything not newer than the last applied order is
    /// stale (a replay or reordering) and ignored. The new number is flushed before the order
    /// runs, so a replay after a crash is refused too.
    pub fn admit(&self, seq: u64) -> Result<bool> {
        let _g = lock(&self.inner.seq);
        let last = self.inner.state.last_seq()?;
        if seq <= last {
            return Ok(false);
        }
        self.inner.state.set_last_seq(seq)?;
        Ok(true)
    }

    /// Takes an order from the session: read-only orders run at once; others are admitted by
    /// sequence number here, in arrival order, then run one at a time per app (in order) while
    /// other apps' orders and the session's heartbeats carry on. Results go to `reply`.
    pub fn submit(&self, order: pb::Order, channel: Channel, reply: mpsc::Sender<pb::AgentMessage>) {
        use pb::order::Kind;
        let app = match &order.kind {
            Some(Kind::Install(i)) => i.app.clone(),
            Some(Kind::Activate(a)) => a.app.clone(),
            Some(Kind::Rollback(r)) => r.app.clone(),
            Some(Kind::Logs(_)) | None => {
                let this = self.clone();
                tokio::spawn(async move {
                    let r = this.apply(order, channel).await;
                    let _ = reply.send(result_message(r)).await;
                });
                return;
            }
        };
        // A rollback must not wait out a health gate in progress: the gate is cancelled, the
        // activation it guards reverts to the known-good release, and the rollback runs next.
        if matches!(order.kind, Some(Kind::Rollback(_))) {
            if let Some(gate) = lock(&self.inner.gates).get(&app) {
                tracing::warn!(%app, "rollback ordered during a health gate: cutting it short");
                gate.cancel();
            }
        }
        let job = Job { order, channel, reply };
        let mut workers = lock(&self.inner.workers);
        let tx = workers.entry(app).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let this = self.clone();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    let r = this.apply(job.order, job.channel).await;
                    let _ = job.reply.send(result_message(r)).await;
                }
            });
            tx
        });
        if let Err(mpsc::error::SendError(job)) = tx.send(job) {
            tracing::error!(seq = job.order.seq, "order worker is gone");
        }
    }

    /// Applies one order and reports the result.
    pub async fn apply(&self, order: pb::Order, channel: Channel) -> pb::OrderResult {
        let seq = order.seq;
        let outcome = self.apply_inner(order, channel).await;
        let status = outcome.app.as_deref().map(|a| self.status(a));
        pb::OrderResult {
            seq,
            ok: outcome.ok,
            error: outcome.error.unwrap_or_default(),
            stale: outcome.stale,
            status,
            output: outcome.output,
        }
    }

    async fn apply_inner(&self, order: pb::Order, channel: Channel) -> Outcome {
        use pb::order::Kind;
        let fail = |app: String, e: String| Outcome {
            ok: false,
            stale: false,
            error: Some(e),
            output: String::new(),
            app: Some(app),
        };
        let ok = |app: String| Outcome {
            ok: true,
            stale: false,
            error: None,
            output: String::new(),
            app: Some(app),
        };
        let Some(kind) = order.kind else {
            return Outcome {
                ok: false,
                stale: false,
                error: Some("order has no kind".into()),
                output: String::new(),
                app: None,
            };
        };
        let app = match &kind {
            Kind::Install(i) => i.app.clone(),
            Kind::Activate(a) => a.app.clone(),
            Kind::Rollback(r) => r.app.clone(),
            // Read-only: answered at once, not fenced by the sequence number.
            Kind::Logs(l) => {
                let text = match self.inner.layout.read_current(&l.app) {
                    Some(v) => Log::tail(&self.inner.layout.log_path(&l.app, &v), l.lines.max(1) as usize),
                    None => return fail(l.app.clone(), format!("app {} has no current release here", l.app)),
                };
                return Outcome {
                    ok: true,
                    stale: false,
                    error: None,
                    output: text,
                    app: Some(l.app.clone()),
                };
            }
        };
        if let Err(e) = convoy_bundle::check_app_name(&app) {
            return fail(app, e.to_string());
        }
        match self.admit(order.seq) {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(seq = order.seq, last = self.last_seq(), "stale order ignored");
                return Outcome { ok: true, stale: true, error: None, output: String::new(), app: Some(app) };
            }
            Err(e) => return fail(app, e.to_string()),
        }
        let result = match kind {
            Kind::Install(i) => self.install(&i.app, &i.version, &i.digest, channel).await,
            Kind::Activate(a) => {
                let deadline =
                    (a.health_deadline_secs > 0).then(|| Duration::from_secs(a.health_deadline_secs.into()));
                self.activate(&a.app, &a.version, ActivationKind::Deploy, deadline).await
            }
            Kind::Rollback(r) => {
                self.rollback(&r.app, (!r.to_version.is_empty()).then_some(r.to_version.as_str()), &r.reason)
                    .await
            }
            Kind::Logs(_) => Ok(()),
        };
        match result {
            Ok(()) => ok(app),
            Err(e) => {
                tracing::warn!(%app, error = %e, "order failed");
                self.set_live(&app, |l| l.last_error = Some(e.clone()));
                fail(app, e)
            }
        }
    }

    /// Downloads, verifies and unpacks a release. Idempotent; never touches `current`.
    pub async fn install(
        &self,
        app: &str,
        version: &str,
        digest: &str,
        channel: Channel,
    ) -> Result<(), String> {
        let guard = self.app_lock(app);
        let _g = guard.lock().await;
        let layout = &self.inner.layout;
        if let Some(rec) = self.inner.state.installed(app, version).map_err(|e| e.to_string())? {
            if rec.digest == digest && layout.release_dir(app, version).is_dir() {
                return Ok(());
            }
            if rec.digest != digest {
                return Err(format!("{app}@{version} is installed from a different bundle ({})", rec.digest));
            }
        }
        // A directory without a record is a crash between rename and record: redo it.
        if layout.release_dir(app, version).exists() {
            layout.remove_release(app, version).map_err(|e| e.to_string())?;
        }
        self.failpoint("install:before-download");
        let fetched = self.inner.downloader.fetch(channel, digest).await.map_err(|e| e.to_string())?;
        let trust = self.inner.cfg.trust.clone();
        let limits = self.inner.cfg.limits.clone();
        let vars = self.inner.cfg.vars.clone();
        let labels = self.inner.cfg.labels.clone();
        let tmp = layout.unpack_tmp(app, version);
        let releases_dir = layout.releases_dir(app);
        let bundle = fetched.path.clone();
        let (want_app, want_version) = (app.to_owned(), version.to_owned());
        let header = tokio::task::spawn_blocking(move || -> Result<convoy_bundle::Header, String> {
            let mut f = std::fs::File::open(&bundle).map_err(|e| e.to_string())?;
            let header =
                convoy_bundle::read_header(&mut f, limits.max_manifest_bytes).map_err(|e| e.to_string())?;
            let verified = convoy_bundle::verify_header(&header, &trust).map_err(|e| e.to_string())?;
            let m = &verified.manifest;
            if m.app != want_app || m.version != want_version {
                return Err(format!(
                    "bundle is {} but the order is for {want_app}@{want_version}",
                    m.release_name()
                ));
            }
            check_target(m, &labels)?;
            m.config.substitute(&vars)?;
            std::fs::create_dir_all(&releases_dir).map_err(|e| e.to_string())?;
            convoy_bundle::unpack(&bundle, &trust, &tmp, &limits).map_err(|e| e.to_string())?;
            Ok(header)
        })
        .await
        .map_err(|e| e.to_string())?;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                layout.clean_leftovers(app);
                return Err(format!("install of {app}@{version} refused: {e}"));
            }
        };
        let tmp = {
            // The unpack directory is the only `.tmp-` entry for this version.
            let mut found = None;
            if let Ok(entries) = std::fs::read_dir(layout.releases_dir(app)) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&format!(".tmp-{version}-")) {
                        found = Some(e.path());
                    }
                }
            }
            found.ok_or_else(|| "unpacked release directory vanished".to_string())?
        };
        self.failpoint("install:after-unpack");
        let dest = layout.release_dir(app, version);
        std::fs::rename(&tmp, &dest).map_err(|e| e.to_string())?;
        files::sync_dir(&layout.releases_dir(app)).map_err(|e| e.to_string())?;
        let mut header_bytes = Vec::new();
        convoy_bundle::write_header(&mut header_bytes, &header.manifest_bytes, &header.signatures)
            .map_err(|e| e.to_string())?;
        let header_path = layout.header_path(app, version);
        if let Some(d) = header_path.parent() {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        files::write_atomic(&header_path, &header_bytes, false).map_err(|e| e.to_string())?;
        self.failpoint("install:after-rename");
        let order = self.inner.state.next_install_order().map_err(|e| e.to_string())?;
        self.inner
            .state
            .put_installed(&InstalledRecord {
                app: app.into(),
                version: version.into(),
                digest: digest.into(),
                order,
            })
            .map_err(|e| e.to_string())?;
        // The unpacked release and its signed header are what is kept; the bundle can go.
        let _ = std::fs::remove_file(&fetched.path);
        tracing::info!(%app, %version, "release installed");
        Ok(())
    }

    /// Loads a kept release's manifest, re-checking its signature and every file.
    fn reverify(&self, app: &str, version: &str) -> Result<Manifest, String> {
        let layout = &self.inner.layout;
        let hp = layout.header_path(app, version);
        let mut f =
            std::fs::File::open(&hp).map_err(|e| format!("{app}@{version} has no stored manifest: {e}"))?;
        let header = convoy_bundle::read_header(&mut f, self.inner.cfg.limits.max_manifest_bytes)
            .map_err(|e| e.to_string())?;
        let v = convoy_bundle::verify_header(&header, &self.inner.cfg.trust).map_err(|e| e.to_string())?;
        convoy_bundle::verify_tree(&layout.release_dir(app, version), &v.manifest)
            .map_err(|e| format!("kept release {app}@{version} is corrupted: {e}"))?;
        Ok(v.manifest)
    }

    fn manifest(&self, app: &str, version: &str) -> Result<Manifest, String> {
        let mut f = std::fs::File::open(self.inner.layout.header_path(app, version))
            .map_err(|e| format!("{app}@{version} has no stored manifest: {e}"))?;
        let header = convoy_bundle::read_header(&mut f, self.inner.cfg.limits.max_manifest_bytes)
            .map_err(|e| e.to_string())?;
        header.manifest().map_err(|e| e.to_string())
    }

    /// Environment for services and hooks: per-host variables, then Convoy's own.
    fn env(
        &self,
        app: &str,
        version: &str,
        previous: Option<&str>,
        extra: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.inner.cfg.vars.clone().into_iter().collect();
        env.extend(extra.clone());
        env.push(("CONVOY_APP".into(), app.into()));
        env.push(("CONVOY_VERSION".into(), version.into()));
        env.push(("CONVOY_PREVIOUS_VERSION".into(), previous.unwrap_or_default().into()));
        env.push((
            "CONVOY_RELEASE_DIR".into(),
            self.inner.layout.release_dir(app, version).display().to_string(),
        ));
        env
    }

    fn log(&self, app: &str, version: &str) -> Log {
        Log::new(self.inner.layout.log_path(app, version), self.inner.cfg.log_cap)
    }

    async fn stop_service(&self, app: &str) {
        let svc = self.inner.services.lock().await.remove(app);
        if let Some(svc) = svc {
            svc.stop().await;
            if let Ok(mut rec) = self.inner.state.app(app) {
                rec.service_pgid = None;
                let _ = self.inner.state.put_app(app, &rec);
            }
        }
        if let Some(token) = lock(&self.inner.monitors).remove(app) {
            token.cancel();
        }
    }

    async fn start_service(
        &self,
        app: &str,
        version: &str,
        config: &ReleaseConfig,
        previous: Option<&str>,
    ) -> Result<(), String> {
        let Some(service) = &config.service else { return Ok(()) };
        let spec = ServiceSpec {
            argv: service.command.clone(),
            cwd: self.inner.layout.release_dir(app, version),
            env: self.env(app, version, previous, &service.env),
            stop_signal: process::signal_by_name(&service.stop_signal),
            stop_timeout: service.stop_timeout,
            run_as: None,
        };
        let sup = Supervised::start(spec, self.log(app, version));
        // Record the process group so a restarted agent can stop an orphan.
        let mut pgid = sup.pgid.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), pgid.wait_for(|g| *g != 0)).await;
        let g = *pgid.borrow();
        if let Ok(mut rec) = self.inner.state.app(app) {
            rec.service_pgid = (g != 0).then_some(g);
            let _ = self.inner.state.put_app(app, &rec);
        }
        self.inner.services.lock().await.insert(app.to_owned(), sup);
        Ok(())
    }

    /// Rolls back to `to` or the previous release. Instant: the release is already on disk.
    pub async fn rollback(&self, app: &str, to: Option<&str>, reason: &str) -> Result<(), String> {
        let rec = self.inner.state.app(app).map_err(|e| e.to_string())?;
        let target = match to {
            Some(v) => v.to_owned(),
            None => rec
                .previous
                .clone()
                .ok_or_else(|| format!("app {app} has no previous release to roll back to"))?,
        };
        tracing::warn!(%app, to = %target, %reason, "rollback ordered");
        self.activate(app, &target, ActivationKind::Rollback, None).await
    }

    /// The one activation path: journal, hooks, atomic switch, service restart, health gate,
    /// commit or automatic revert to the known-good release.
    pub async fn activate(
        &self,
        app: &str,
        to: &str,
        kind: ActivationKind,
        deadline: Option<Duration>,
    ) -> Result<(), String> {
        let guard = self.app_lock(app);
        let _g = guard.lock().await;
        self.set_live(app, |l| l.busy = true);
        let r = self.activate_locked(app, to, kind, deadline).await;
        self.set_live(app, |l| l.busy = false);
        r
    }

    async fn activate_locked(
        &self,
        app: &str,
        to: &str,
        kind: ActivationKind,
        deadline: Option<Duration>,
    ) -> Result<(), String> {
        let layout = &self.inner.layout;
        let state = &self.inner.state;
        let rec = state.app(app).map_err(|e| e.to_string())?;
        let from = layout.read_current(app);
        if from.as_deref() == Some(to)
            && rec.known_good.as_deref() == Some(to)
            && kind != ActivationKind::Revert
        {
            // Already active and committed: the same order twice changes nothing.
            return Ok(());
        }
        if state.installed(app, to).map_err(|e| e.to_string())?.is_none() {
            return Err(format!("{app}@{to} is not installed on this agent"));
        }
        let manifest = match kind {
            ActivationKind::Deploy
                if from.as_deref() != Some(to) && rec.known_good.as_deref() != Some(to) =>
            {
                self.manifest(app, to)?
            }
            _ => self.reverify(app, to)?,
        };
        let config = manifest.config.substitute(&self.inner.cfg.vars)?;
        let health_deadline =
            deadline.or(config.health.as_ref().map(|h| h.deadline)).unwrap_or(Duration::from_secs(60));
        state
            .put_activation(&Activation {
                app: app.into(),
                from: from.clone(),
                to: to.into(),
                kind,
                step: Step::Started,
                health_deadline_ms: health_deadline.as_millis() as u64,
            })
            .map_err(|e| e.to_string())?;
        let hooks_timeout = config.hooks.as_ref().map(|h| h.timeout).unwrap_or(Duration::from_secs(60));
        let to_dir = layout.release_dir(app, to);
        let env = self.env(app, to, from.as_deref(), &BTreeMap::new());
        let log = self.log(app, to);
        if kind == ActivationKind::Deploy {
            if let Some(h) = config.hooks.as_ref().and_then(|h| h.pre_activate.as_ref()) {
                if let Err(e) =
                    process::run_hook("pre_activate", h, &to_dir, &env, hooks_timeout, &log, None).await
                {
                    state.clear_activation(app).map_err(|e| e.to_string())?;
                    return Err(format!("deploy of {app}@{to} stopped before the switch: {e}"));
                }
            }
        }
        if kind == ActivationKind::Rollback {
            if let Some(cur) = &from {
                if let Ok(m) = self.manifest(app, cur) {
                    if let Some(h) = m.config.hooks.as_ref().and_then(|h| h.pre_rollback.as_ref()) {
                        let cur_env = self.env(app, cur, None, &BTreeMap::new());
                        if let Err(e) = process::run_hook(
                            "pre_rollback",
                            h,
                            &layout.release_dir(app, cur),
                            &cur_env,
                            hooks_timeout,
                            &self.log(app, cur),
                            None,
                        )
                        .await
                        {
                            tracing::warn!(%app, error = %e, "pre_rollback hook failed; rolling back anyway");
                        }
                    }
                }
            }
        }
        self.failpoint("activate:before-switch");
        self.stop_service(app).await;
        layout.swap_current(app, to).map_err(|e| e.to_string())?;
        self.failpoint("activate:after-switch");
        let mut a = state.activation(app).map_err(|e| e.to_string())?.ok_or("activation journal vanished")?;
        a.step = Step::Switched;
        state.put_activation(&a).map_err(|e| e.to_string())?;
        let mut rec = state.app(app).map_err(|e| e.to_string())?;
        let restore_previous = rec.previous.clone();
        if from.as_deref() != Some(to) {
            rec.previous = from.clone();
        }
        rec.current = Some(to.into());
        rec.health = HealthState::Checking;
        state.put_app(app, &rec).map_err(|e| e.to_string())?;
        self.set_live(app, |l| l.health = HealthState::Checking);
        self.failpoint("activate:after-journal");
        let verdict = self.confirm(app, to, &config, from.as_deref(), health_deadline).await;
        self.failpoint("activate:after-health");
        match verdict {
            Ok(()) => {
                // A revert restores what was already committed: nothing to prune after it.
                self.commit(app, to, &config, kind != ActivationKind::Revert).await;
                tracing::info!(%app, version = %to, ?kind, "release active and healthy");
                Ok(())
            }
            Err(e) => {
                // A revert that fails is not reverted again.
                let back_to = if kind == ActivationKind::Revert { None } else { rec.known_good.clone() };
                Err(self
                    .revert_after_failure(app, to, back_to, restore_previous, e, "failed its health check")
                    .await)
            }
        }
    }

    /// After a failed health gate: records it, then switches back to `back_to` (the known-good
    /// release) through the same activation path. Returns the error to report.
    async fn revert_after_failure(
        &self,
        app: &str,
        to: &str,
        back_to: Option<String>,
        restore_previous: Option<String>,
        e: String,
        what: &str,
    ) -> String {
        let state = &self.inner.state;
        if let Ok(mut rec) = state.app(app) {
            rec.health = HealthState::Unhealthy;
            rec.last_error = Some(e.clone());
            let _ = state.put_app(app, &rec);
        }
        self.set_live(app, |l| {
            l.health = HealthState::Unhealthy;
            l.last_error = Some(e.clone());
        });
        match back_to {
            Some(good) if good != to => {
                tracing::warn!(%app, failed = %to, back_to = %good, error = %e, "health gate failed, reverting");
                let revert = Box::pin(self.activate_locked(app, &good, ActivationKind::Revert, None)).await;
                // The failed release does not become the rollback target, and its error stays visible.
                if let Ok(mut r) = state.app(app) {
                    r.previous = restore_previous;
                    r.last_error = Some(e.clone());
                    let _ = state.put_app(app, &r);
                }
                self.set_live(app, |l| l.last_error = Some(e.clone()));
                match revert {
                    Ok(()) => format!("{app}@{to} {what} ({e}); rolled back to {good}"),
                    Err(e2) => format!("{app}@{to} {what} ({e}); rollback to {good} failed too: {e2}"),
                }
            }
            _ => {
                let _ = state.clear_activation(app);
                format!("{app}@{to} {what}: {e}")
            }
        }
    }

    /// Starts the release's service, runs `post_activate`, and waits on the health gate.
    async fn confirm(
        &self,
        app: &str,
        to: &str,
        config: &ReleaseConfig,
        from: Option<&str>,
        deadline: Duration,
    ) -> Result<(), String> {
        self.start_service(app, to, config, from).await?;
        let dir = self.inner.layout.release_dir(app, to);
        let env = self.env(app, to, from, &BTreeMap::new());
        if let Some(hooks) = &config.hooks {
            if let Some(h) = &hooks.post_activate {
                process::run_hook("post_activate", h, &dir, &env, hooks.timeout, &self.log(app, to), None)
                    .await?;
            }
        }
        let Some(health) = &config.health else { return Ok(()) };
        let Some(check) = health.check() else { return Ok(()) };
        let cancel = CancellationToken::new();
        lock(&self.inner.gates).insert(app.to_owned(), cancel.clone());
        let verdict = crate::health::gate(&check, health, deadline, &dir, &env, &cancel).await;
        lock(&self.inner.gates).remove(app);
        verdict.map_err(|e| {
            if cancel.is_cancelled() {
                "health gate cut short by a rollback order".to_string()
            } else {
                e
            }
        })
    }

    /// Marks a release known-good, ends its journal entry, keeps monitoring it, prunes.
    async fn commit(&self, app: &str, to: &str, config: &ReleaseConfig, prune: bool) {
        let state = &self.inner.state;
        let health = if config.health.is_some() { HealthState::Healthy } else { HealthState::None };
        if let Ok(mut rec) = state.app(app) {
            rec.known_good = Some(to.into());
            rec.health = health;
            rec.last_error = None;
            let _ = state.put_app(app, &rec);
        }
        let _ = state.clear_activation(app);
        self.set_live(app, |l| {
            l.health = health;
            l.last_error = None;
        });
        self.start_monitor(app, to, config);
        if prune {
            if let Err(e) = self.prune(app) {
                tracing::warn!(%app, error = %e, "pruning old releases failed");
            }
        }
    }

    /// Keeps checking health after the deploy and reports changes in heartbeats.
    fn start_monitor(&self, app: &str, version: &str, config: &ReleaseConfig) {
        let Some(health) = config.health.clone() else { return };
        let Some(check) = health.check() else { return };
        let token = CancellationToken::new();
        if let Some(old) = lock(&self.inner.monitors).insert(app.to_owned(), token.clone()) {
            old.cancel();
        }
        let this = self.clone();
        let (app, dir) = (app.to_owned(), self.inner.layout.release_dir(app, version));
        let env = self.env(&app, version, None, &BTreeMap::new());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(health.interval) => {}
                    () = token.cancelled() => return,
                }
                let r = crate::health::probe(&check, health.timeout, &dir, &env).await;
                if token.is_cancelled() {
                    return;
                }
                this.set_live(&app, |l| match r {
                    Ok(()) => l.health = HealthState::Healthy,
                    Err(e) => {
                        l.health = HealthState::Unhealthy;
                        l.last_error = Some(e);
                    }
                });
            }
        });
    }

    /// Keeps at most `keep_releases` per app, never the current, known-good or previous one.
    fn prune(&self, app: &str) -> Result<()> {
        let rec = self.inner.state.app(app)?;
        let current = self.inner.layout.read_current(app);
        let protected = [current, rec.known_good, rec.previous];
        let installed = self.inner.state.installed_for(app)?;
        let mut excess = installed.len().saturating_sub(self.inner.cfg.keep_releases.max(1));
        for r in installed {
            if excess == 0 {
                break;
            }
            if protected.iter().any(|p| p.as_deref() == Some(r.version.as_str())) {
                continue;
            }
            self.inner.layout.remove_release(app, &r.version)?;
            self.inner.state.remove_installed(app, &r.version)?;
            tracing::info!(%app, version = %r.version, "pruned old release");
            excess -= 1;
        }
        Ok(())
    }

    /// Start-up: clean leftovers, stop orphans of a previous run, finish or undo interrupted
    /// activations, and start the services of every app's current release.
    pub async fn recover(&self) -> Result<()> {
        let layout = &self.inner.layout;
        let state = &self.inner.state;
        self.inner.downloader.clean_partials(&[]);
        for app in layout.apps_on_disk() {
            layout.clean_leftovers(&app);
        }
        for (_, rec) in state.apps()? {
            if let Some(g) = rec.service_pgid {
                process::stop_group(g, rustix::process::Signal::TERM, Duration::from_secs(5)).await;
            }
        }
        let pending: Vec<Activation> = state.activations()?;
        for a in &pending {
            let current = layout.read_current(&a.app);
            tracing::warn!(app = %a.app, to = %a.to, step = ?a.step, current = ?current, "recovering interrupted activation");
            let switched = a.step == Step::Switched || current.as_deref() == Some(a.to.as_str());
            if !switched {
                state.clear_activation(&a.app)?;
                continue;
            }
            // Activated but unconfirmed: it must pass its health gate again, or go back.
            let mut rec = state.app(&a.app)?;
            if rec.current.as_deref() != Some(a.to.as_str()) {
                if a.from.as_deref() != Some(a.to.as_str()) {
                    rec.previous = a.from.clone();
                }
                rec.current = Some(a.to.clone());
                state.put_app(&a.app, &rec)?;
            }
        }
        for app in layout.apps_on_disk() {
            let Some(cur) = layout.read_current(&app) else { continue };
            let pending_here = pending
                .iter()
                .find(|a| a.app == app && layout.read_current(&app).as_deref() == Some(a.to.as_str()));
            if let Some(a) = pending_here {
                // Report "checking" from the first heartbeat on, not the last committed health.
                self.set_live(&app, |l| {
                    l.health = HealthState::Checking;
                    l.busy = true;
                });
                let this = self.clone();
                let a = a.clone();
                let deadline = Duration::from_millis(a.health_deadline_ms);
                // Re-run the gate through the normal path; a failure reverts to known-good.
                tokio::spawn(async move {
                    let _ = this.inner.state.clear_activation(&a.app);
                    let guard = this.app_lock(&a.app);
                    let _g = guard.lock().await;
                    let r = this.finish_recovered(&a.app, &a.to, deadline).await;
                    if let Err(e) = r {
                        tracing::warn!(app = %a.app, error = %e, "recovered activation did not confirm");
                    }
                });
                continue;
            }
            let manifest = match self.manifest(&app, &cur) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(%app, error = %e, "cannot read the current release's manifest");
                    continue;
                }
            };
            let config = match manifest.config.substitute(&self.inner.cfg.vars) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(%app, error = %e, "current release cannot start here");
                    continue;
                }
            };
            let rec = state.app(&app)?;
            if let Err(e) = self.start_service(&app, &cur, &config, rec.previous.as_deref()).await {
                tracing::error!(%app, error = %e, "cannot start service");
            }
            self.set_live(&app, |l| l.health = rec.health);
            self.start_monitor(&app, &cur, &config);
        }
        Ok(())
    }

    /// Confirms a release found switched-but-unconfirmed at start-up.
    async fn finish_recovered(&self, app: &str, to: &str, deadline: Duration) -> Result<(), String> {
        let manifest = self.reverify(app, to)?;
        let config = manifest.config.substitute(&self.inner.cfg.vars)?;
        let rec = self.inner.state.app(app).map_err(|e| e.to_string())?;
        self.set_live(app, |l| {
            l.health = HealthState::Checking;
            l.busy = true;
        });
        let verdict = self.confirm(app, to, &config, rec.previous.as_deref(), deadline).await;
        let result = match verdict {
            Ok(()) => {
                self.commit(app, to, &config, true).await;
                Ok(())
            }
            Err(e) => Err(self
                .revert_after_failure(
                    app,
                    to,
                    rec.known_good.clone(),
                    rec.previous.clone(),
                    e,
                    "did not confirm after restart",
                )
                .await),
        };
        // Busy until the outcome is final, so nobody reads a half-finished state as settled.
        self.set_live(app, |l| l.busy = false);
        result
    }

    /// Stops every supervised service (agent shutdown).
    pub async fn shutdown(&self) {
        // Dropping the queues ends the per-app workers, which hold references to the executor
        // (and through it the state store's file lock).
        lock(&self.inner.workers).clear();
        let services: Vec<(String, Supervised)> = self.inner.services.lock().await.drain().collect();
        for (_, s) in services {
            s.stop().await;
        }
        for (_, t) in lock(&self.inner.monitors).drain() {
            t.cancel();
        }
        if let Ok(apps) = self.inner.state.apps() {
            for (app, mut rec) in apps {
                rec.service_pgid = None;
                let _ = self.inner.state.put_app(&app, &rec);
            }
        }
    }

    /// What the agent reports for one app.
    pub fn status(&self, app: &str) -> pb::AppStatus {
        let rec = self.inner.state.app(app).unwrap_or_default();
        let live = lock(&self.inner.live).get(app).cloned().unwrap_or_default();
        let installed =
            self.inner.state.installed_for(app).unwrap_or_default().into_iter().map(|r| r.version).collect();
        let health = if live.health == HealthState::Unknown { rec.health } else { live.health };
        pb::AppStatus {
            app: app.into(),
            current: self.inner.layout.read_current(app).unwrap_or_default(),
            known_good: rec.known_good.unwrap_or_default(),
            previous: rec.previous.unwrap_or_default(),
            health: health_to_pb(health) as i32,
            last_error: live.last_error.or(rec.last_error).unwrap_or_default(),
            installed,
            busy: live.busy,
        }
    }

    /// Status of every app the agent knows.
    pub fn statuses(&self) -> Vec<pb::AppStatus> {
        let mut apps: Vec<String> = self.inner.layout.apps_on_disk();
        for (a, _) in self.inner.state.apps().unwrap_or_default() {
            if !apps.contains(&a) {
                apps.push(a);
            }
        }
        apps.sort();
        apps.iter().map(|a| self.status(a)).collect()
    }
}

fn result_message(r: pb::OrderResult) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(pb::agent_message::Msg::Result(r)) }
}

fn health_to_pb(h: HealthState) -> pb::Health {
    match h {
        HealthState::Unknown => pb::Health::Unknown,
        HealthState::Checking => pb::Health::Checking,
        HealthState::Healthy => pb::Health::Healthy,
        HealthState::Unhealthy => pb::Health::Unhealthy,
        HealthState::None => pb::Health::None,
    }
}

/// Refuses a release built for another OS, architecture or set of labels.
fn check_target(m: &Manifest, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if let Some(t) = &m.target {
        for (k, v) in &t.labels {
            if labels.get(k) != Some(v) {
                return Err(format!(
                    "{} targets agents labelled {k}={v}; this agent is not",
                    m.release_name()
                ));
            }
        }
        if let Some(os) = &t.os {
            if os != std::env::consts::OS {
                return Err(format!(
                    "{} targets os {os}, this agent runs {}",
                    m.release_name(),
                    std::env::consts::OS
                ));
            }
        }
        if let Some(arch) = &t.arch {
            if arch != std::env::consts::ARCH {
                return Err(format!(
                    "{} targets arch {arch}, this agent runs {}",
                    m.release_name(),
                    std::env::consts::ARCH
                ));
            }
        }
    }
    Ok(())
}
