//! The one activation path. Deploy, rollback and the automatic revert after a failed health gate
//! all go through [`Activator::run`], which starts either fresh (from an order) or from the
//! journal (after a crash). Every step is journaled before it is taken; only a commit or the end
//! of a revert clears the journal, so a crash at any point, including during the health gate of
//! a recovered activation, is resumed the same way on the next start.
//!
//! ```text
//! Fresh:  verify -> journal Started -> pre hooks -> stop service -> swap `current`
//!         -> journal Switched -> confirm
//! Resume: (journal Switched, or `current` already points at the target) -> verify -> confirm
//! confirm: start service -> post_activate -> health gate
//!         -> healthy:   commit (known good, history, bad marks) -> clear journal
//!         -> unhealthy: mark bad -> revert to the known-good release (a fresh Revert run)
//! ```
//!
//! Wherever a release starts (activation, or an agent restart) its manifest is checked against
//! the trust set in force now and its files against the manifest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use convoy_bundle::Manifest;
use tokio_util::sync::CancellationToken;

use super::services::{Launch, Services};
use super::{lock, Core, ExecError};
use crate::order::{AppName, Outcome, Refusal, Version};
use crate::process;
use crate::state::{Activation, ActivationKind, AppRecord, HealthState, Step};

/// The health deadline when neither the order nor the release sets one.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub(crate) struct Activator {
    core: Arc<Core>,
    services: Services,
    /// The health gate in progress per app, with the release it gates, so a rollback from that
    /// release can cut it short.
    gates: Arc<StdMutex<HashMap<String, (String, CancellationToken)>>>,
}

/// Where a run starts.
enum Start {
    /// A new activation of `to`.
    Fresh { to: String, kind: ActivationKind, deadline: Option<Duration> },
    /// An activation found in the journal at start-up whose switch had happened.
    Resume(Activation),
}

impl Activator {
    pub fn new(core: Arc<Core>, services: Services) -> Self {
        Self { core, services, gates: Arc::default() }
    }

    /// Cancels the health gate in progress for `app` if it gates `from`, the release a
    /// rollback is rolling back from. A gate of another release (a revert to the known-good
    /// one, say) is left alone: the rollback then finds the agent already off `from`.
    pub fn cut_gate_short(&self, app: &str, from: &str) {
        if let Some((gating, gate)) = lock(&self.gates).get(app) {
            if gating == from {
                tracing::warn!(%app, %from, "rollback ordered during a health gate: cutting it short");
                gate.cancel();
            }
        }
    }

    /// Activates an installed release (a deploy's switch).
    pub async fn deploy(
        &self,
        app: &AppName,
        to: &Version,
        deadline: Option<Duration>,
    ) -> Result<Outcome, ExecError> {
        let app = app.as_str();
        let guard = self.core.app_lock(app);
        let _g = guard.lock().await;
        let rec = self.record(app).await?;
        if self.core.layout.read_current(app).as_deref() == Some(to.as_str())
            && rec.known_good.as_deref() == Some(to.as_str())
        {
            return Ok(Outcome::AlreadyInState(format!("{app}@{to} is already active and confirmed")));
        }
        self.busy(app, || {
            self.run(app, Start::Fresh { to: to.to_string(), kind: ActivationKind::Deploy, deadline })
        })
        .await?;
        Ok(Outcome::Applied(format!("{app}@{to} is active and healthy")))
    }

    /// Rolls back from `from`: to `to` if named, else to the newest kept known-good release
    /// activated before `from` that is not marked bad. An agent not running `from` changes
    /// nothing and says so.
    pub async fn rollback(
        &self,
        app: &AppName,
        from: &Version,
        to: Option<&Version>,
        reason: &str,
    ) -> Result<Outcome, ExecError> {
        let app = app.as_str();
        let guard = self.core.app_lock(app);
        let _g = guard.lock().await;
        let current = self.core.layout.read_current(app);
        if current.as_deref() != Some(from.as_str()) {
            let now = current.map(|c| format!("runs {c}")).unwrap_or_else(|| "runs no release".into());
            return Ok(Outcome::AlreadyInState(format!(
                "already rolled back from {app}@{from}: this agent {now}"
            )));
        }
        let rec = self.record(app).await?;
        let target = match to {
            Some(v) if v == from => {
                return Ok(Outcome::AlreadyInState(format!("{app}@{from} is already active")));
            }
            Some(v) => v.to_string(),
            None => {
                let a = app.to_owned();
                let installed: Vec<String> = self
                    .core
                    .blocking(move |c| {
                        Ok(c.state.installed_for(&a)?.into_iter().map(|r| r.version).collect())
                    })
                    .await?;
                rec.rollback_target(from.as_str(), &installed).ok_or_else(|| {
                    ExecError::Refused(Refusal::new(
                        "from_version",
                        format!("no kept, known-good release of {app} older than {from} to roll back to"),
                    ))
                })?
            }
        };
        tracing::warn!(%app, %from, to = %target, %reason, "rollback ordered");
        self.busy(app, || {
            self.run(app, Start::Fresh { to: target.clone(), kind: ActivationKind::Rollback, deadline: None })
        })
        .await?;
        Ok(Outcome::Applied(format!("rolled back {app} from {from} to {target}")))
    }

    async fn busy<F, Fut>(&self, app: &str, f: F) -> Result<(), ExecError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), ExecError>>,
    {
        self.core.set_live(app, |l| l.busy = true);
        let r = f().await;
        self.core.set_live(app, |l| l.busy = false);
        r
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn record(&self, app: &str) -> Result<AppRecord, ExecError> {
        let a = app.to_owned();
        self.core.blocking(move |c| Ok(c.state.app(&a)?)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn update(
        &self,
        app: &str,
        f: impl FnOnce(&mut AppRecord) + Send + 'static,
    ) -> Result<(), ExecError> {
        let a = app.to_owned();
        self.core
            .blocking(move |c| {
                let mut rec = c.state.app(&a)?;
                f(&mut rec);
                Ok(c.state.put_app(&a, &rec)?)
            })
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn journal(&self, a: Activation) -> Result<(), ExecError> {
        self.core.blocking(move |c| Ok(c.state.put_activation(&a)?)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn clear_journal(&self, app: &str) -> Result<(), ExecError> {
        let a = app.to_owned();
        self.core.blocking(move |c| Ok(c.state.clear_activation(&a)?)).await
    }

    /// Verifies a kept release (its signatures against the trust set in force now, every file
    /// against its manifest) and prepares what its children start with.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn prepare(&self, app: &str, version: &str, previous: Option<String>) -> Result<Launch, ExecError> {
        let (a, v) = (app.to_owned(), version.to_owned());
        self.core
            .blocking(move |c| {
                let manifest = verify_release(c, &a, &v)?;
                Launch::new(c, &a, &v, &manifest.config, previous.as_deref())
            })
            .await
    }

    /// One activation, fresh or resumed, to its end: committed, or reverted.
    async fn run(&self, app: &str, start: Start) -> Result<(), ExecError> {
        let (a, launch) = match start {
            Start::Fresh { to, kind, deadline } => {
                let (a, launch) = self.switch(app, &to, kind, deadline).await?;
                (a, Some(launch))
            }
            Start::Resume(a) => (a, None),
        };
        self.confirm_and_settle(app, a, launch).await
    }

    /// The fresh part: verify, journal, hooks, switch.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn switch(
        &self,
        app: &str,
        to: &str,
        kind: ActivationKind,
        deadline: Option<Duration>,
    ) -> Result<(Activation, Launch), ExecError> {
        let layout = &self.core.layout;
        let from = layout.read_current(app);
        let (a, t, f) = (app.to_owned(), to.to_owned(), from.clone());
        // One trip to a blocking thread: installed, verified, prepared.
        let launch = self
            .core
            .blocking(move |c| {
                if c.state.installed(&a, &t)?.is_none() {
                    return Err(ExecError::NotInstalled { app: a, version: t });
                }
                let manifest = verify_release(c, &a, &t)?;
                Launch::new(c, &a, &t, &manifest.config, f.as_deref())
            })
            .await?;
        let deadline =
            deadline.or(launch.config.health.as_ref().map(|h| h.deadline)).unwrap_or(DEFAULT_DEADLINE);
        let mut journal = Activation {
            app: app.into(),
            from: from.clone(),
            to: to.into(),
            kind,
            step: Step::Started,
            health_deadline_ms: deadline.as_millis() as u64,
        };
        self.journal(journal.clone()).await?;
        let hooks_timeout = launch.config.hooks.as_ref().map(|h| h.timeout).unwrap_or(DEFAULT_DEADLINE);
        if kind == ActivationKind::Deploy {
            if let Some(h) = launch.config.hooks.as_ref().and_then(|h| h.pre_activate.as_ref()) {
                let dir = launch.dir(&self.core);
                if let Err(e) = process::run_hook(
                    "pre_activate",
                    h,
                    &dir,
                    &launch.env,
                    hooks_timeout,
                    &launch.log(&self.core),
                    launch.run_as.as_ref(),
                )
                .await
                {
                    self.clear_journal(app).await?;
                    return Err(ExecError::Hook(format!(
                        "deploy of {app}@{to} stopped before the switch: {e}"
                    )));
                }
            }
        }
        if kind == ActivationKind::Rollback {
            self.pre_rollback(app, from.as_deref(), hooks_timeout).await;
        }
        let step = step_name(kind);
        self.core.failpoint(&format!("{step}:before-switch"));
        self.services.stop(app).await?;
        let (a, t) = (app.to_owned(), to.to_owned());
        self.core.blocking(move |c| Ok(c.layout.swap_current(&a, &t)?)).await?;
        self.core.failpoint(&format!("{step}:after-switch"));
        journal.step = Step::Switched;
        self.journal(journal.clone()).await?;
        let (prev, t) = (from.clone(), to.to_owned());
        self.update(app, move |rec| {
            if let Some(p) = prev.clone().filter(|p| *p != t) {
                // The release rolled back from is never an automatic target again.
                if kind == ActivationKind::Rollback {
                    rec.bad.insert(p);
                }
            }
            if prev.as_deref() != Some(t.as_str()) {
                rec.previous = prev;
            }
            rec.current = Some(t);
            rec.health = HealthState::Checking;
        })
        .await?;
        self.core.set_live(app, |l| l.health = HealthState::Checking);
        self.core.failpoint(&format!("{step}:after-journal"));
        Ok((journal, launch))
    }

    /// Runs the current release's `pre_rollback` hook; a failure is logged, the rollback goes on.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn pre_rollback(&self, app: &str, from: Option<&str>, timeout: Duration) {
        let Some(cur) = from else { return };
        // Most releases have no pre_rollback hook: a glance at the stored header says so
        // without hashing the whole tree, which keeps a rollback instant.
        let (a, v) = (app.to_owned(), cur.to_owned());
        let has_hook = self
            .core
            .blocking(move |c| {
                let hp = c.layout.header_path(&a, &v);
                let mut f =
                    std::fs::File::open(&hp).map_err(|e| crate::Error::Io { path: hp.clone(), source: e })?;
                let header = convoy_bundle::read_header(&mut f, c.cfg.limits.max_manifest_bytes)
                    .map_err(|e| ExecError::Internal(e.to_string()))?;
                let m = header.manifest().map_err(|e| ExecError::Internal(e.to_string()))?;
                Ok(m.config.hooks.is_some_and(|h| h.pre_rollback.is_some()))
            })
            .await;
        match has_hook {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(%app, error = %e, "pre_rollback hook skipped: the release rolled back from has no readable header");
                return;
            }
        }
        // The release rolled back from may be the very one that is distrusted or tampered
        // with: its hook runs only if it still verifies, signatures and every file.
        let launch = match self.prepare(app, cur, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%app, error = %e, "pre_rollback hook skipped: the release rolled back from does not verify");
                return;
            }
        };
        let Some(h) = launch.config.hooks.as_ref().and_then(|h| h.pre_rollback.clone()) else { return };
        let dir = launch.dir(&self.core);
        let log = launch.log(&self.core);
        if let Err(e) =
            process::run_hook("pre_rollback", &h, &dir, &launch.env, timeout, &log, launch.run_as.as_ref())
                .await
        {
            tracing::warn!(%app, error = %e, "pre_rollback hook failed; rolling back anyway");
        }
    }

    /// Starts the switched-to release, gates it, and commits or reverts.
    #[tracing::instrument(level = "debug", skip_all)]
    /// `verified` is the launch [`Self::switch`] prepared from the release it verified just
    /// before; a resumed activation verifies again.
    async fn confirm_and_settle(
        &self,
        app: &str,
        a: Activation,
        verified: Option<Launch>,
    ) -> Result<(), ExecError> {
        let prepared = match verified {
            Some(l) => Ok(l),
            None => {
                let rec = self.record(app).await?;
                self.prepare(app, &a.to, rec.previous.clone()).await
            }
        };
        let launch = match prepared {
            Ok(l) => l,
            Err(e) => return self.settle_failure(app, &a, e.to_string()).await,
        };
        let deadline = Duration::from_millis(a.health_deadline_ms);
        match self.confirm(&launch, deadline).await {
            Ok(()) => {
                self.commit(app, &a, &launch).await?;
                tracing::info!(%app, version = %a.to, kind = ?a.kind, "release active and healthy");
                Ok(())
            }
            Err(e) => self.settle_failure(app, &a, e).await,
        }
    }

    /// Service, `post_activate`, health gate.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn confirm(&self, launch: &Launch, deadline: Duration) -> Result<(), String> {
        let stamp = self.services.start(launch).await.map_err(|e| e.to_string())?;
        let verdict = self.gate(launch, deadline).await;
        // Whatever the verdict, the service's process group is on record before it is acted on.
        stamp.recorded().await.map_err(|e| e.to_string())?;
        verdict
    }

    /// `post_activate`, then the health gate.
    async fn gate(&self, launch: &Launch, deadline: Duration) -> Result<(), String> {
        let dir = launch.dir(&self.core);
        if let Some(hooks) = &launch.config.hooks {
            if let Some(h) = &hooks.post_activate {
                process::run_hook(
                    "post_activate",
                    h,
                    &dir,
                    &launch.env,
                    hooks.timeout,
                    &launch.log(&self.core),
                    launch.run_as.as_ref(),
                )
                .await?;
            }
        }
        let Some(health) = &launch.config.health else { return Ok(()) };
        let Some(check) = health.check() else { return Ok(()) };
        let cancel = CancellationToken::new();
        lock(&self.gates).insert(launch.app.clone(), (launch.version.clone(), cancel.clone()));
        self.core.failpoint("gate:started");
        let verdict = crate::health::gate(
            &self.core.http,
            &check,
            health,
            deadline,
            &dir,
            &launch.env,
            &cancel,
            launch.run_as.as_ref(),
        )
        .await;
        lock(&self.gates).remove(&launch.app);
        verdict.map_err(|e| {
            if cancel.is_cancelled() {
                "health gate cut short by a rollback order".to_string()
            } else {
                e
            }
        })
    }

    /// Marks the release known-good, records the activation and the bad marks, ends the journal
    /// entry, keeps monitoring, prunes.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn commit(&self, app: &str, a: &Activation, launch: &Launch) -> Result<(), ExecError> {
        let health = if launch.config.health.is_some() { HealthState::Healthy } else { HealthState::None };
        let (to, from, kind) = (a.to.clone(), a.from.clone(), a.kind);
        self.update(app, move |rec| {
            rec.known_good = Some(to.clone());
            rec.push_history(&to);
            match kind {
                // An explicit deploy of a release clears its bad mark: the operator chose it.
                ActivationKind::Deploy => {
                    rec.bad.remove(&to);
                }
                // Marked at the switch already; again here from the journal, so a crash between
                // the switch and that write cannot lose the mark.
                ActivationKind::Rollback => {
                    if let Some(f) = from.filter(|f| *f != to) {
                        rec.bad.insert(f);
                    }
                }
                ActivationKind::Revert => {}
            }
            rec.health = health;
            rec.last_error = None;
        })
        .await?;
        self.core.failpoint("commit:before-clear");
        self.clear_journal(app).await?;
        self.core.set_live(app, |l| {
            l.health = health;
            l.last_error = None;
        });
        self.services.monitor(launch);
        if a.kind != ActivationKind::Revert {
            let a = app.to_owned();
            if let Err(e) = self.core.blocking(move |c| prune(c, &a)).await {
                tracing::warn!(%app, error = %e, "pruning old releases failed");
            }
        }
        Ok(())
    }

    /// After a failed confirmation: marks the release bad and, for a deploy, reverts to the
    /// known-good release by a fresh Revert run. A failed rollback does not go forward again
    /// onto the release it rolled back from; a failed revert is not reverted again.
    async fn settle_failure(&self, app: &str, a: &Activation, error: String) -> Result<(), ExecError> {
        let rec = self.record(app).await?;
        let (to, e) = (a.to.clone(), error.clone());
        self.update(app, move |rec| {
            rec.health = HealthState::Unhealthy;
            rec.last_error = Some(e);
            rec.bad.insert(to);
        })
        .await?;
        self.core.set_live(app, |l| {
            l.health = HealthState::Unhealthy;
            l.last_error = Some(error.clone());
        });
        let what = match a.kind {
            ActivationKind::Deploy => "failed its health check",
            ActivationKind::Rollback => "(rollback target) failed its health check",
            ActivationKind::Revert => "(revert target) failed its health check",
        };
        let back_to = rec.known_good.clone().filter(|g| *g != a.to && a.kind == ActivationKind::Deploy);
        let Some(good) = back_to else {
            // Nothing to go back to: the release stays, reported unhealthy. The activation is
            // over, so its journal entry ends here.
            self.clear_journal(app).await?;
            return Err(ExecError::Unconfirmed(format!("{app}@{} {what}: {error}", a.to)));
        };
        tracing::warn!(%app, failed = %a.to, back_to = %good, %error, "health gate failed, reverting");
        let revert = Box::pin(
            self.run(app, Start::Fresh { to: good.clone(), kind: ActivationKind::Revert, deadline: None }),
        )
        .await;
        if revert.is_err() {
            // A revert that could not even start (its target no longer verifies, say) wrote no
            // journal entry of its own: the failed activation's entry would make the next start
            // re-gate, and possibly commit, the release that just failed. It ends here.
            let a2 = app.to_owned();
            let journal = self.core.blocking(move |c| Ok(c.state.activation(&a2)?)).await?;
            if journal.is_some_and(|j| j.to == a.to && j.kind == a.kind) {
                self.clear_journal(app).await?;
            }
        }
        // The failed release's error stays visible after the revert's commit cleared it.
        let e = error.clone();
        self.update(app, move |rec| rec.last_error = Some(e)).await?;
        self.core.set_live(app, |l| l.last_error = Some(error.clone()));
        Err(ExecError::Unconfirmed(match revert {
            Ok(()) => format!("{app}@{} {what} ({error}); rolled back to {good}", a.to),
            Err(e2) => format!("{app}@{} {what} ({error}); rollback to {good} failed too: {e2}", a.to),
        }))
    }

    /// Start-up: clean leftovers, stop orphans that are provably ours, resume interrupted
    /// activations, start every other app's current release after re-verifying it.
    pub async fn recover(&self) -> crate::Result<()> {
        let core = self.core.clone();
        let (apps, pending) = tokio::task::spawn_blocking(move || -> crate::Result<_> {
            let mut apps = Vec::new();
            for name in core.layout.apps_on_disk() {
                match AppName::parse(&name) {
                    Ok(a) => {
                        core.layout.clean_leftovers(a.as_str());
                        apps.push(a);
                    }
                    Err(r) => tracing::error!(dir = %name, error = %r, "ignoring an app directory with an invalid name"),
                }
            }
            Ok((apps, core.state.activations()?))
        })
        .await
        .map_err(|e| crate::Error::State(format!("recovery task: {e}")))??;
        for (app, rec) in self.core.state.apps()? {
            if let Some(stamp) = &rec.service {
                // Only a group that is provably the one this agent started (same boot, same
                // leader start time) is stopped: after a reboot the number can be anyone's.
                let outcome =
                    process::stop_stamped_group(stamp, rustix::process::Signal::TERM, Duration::from_secs(5))
                        .await;
                tracing::info!(%app, pgid = stamp.pgid, ?outcome, "previous run's service");
            }
        }
        for app in apps {
            let app = app.as_str();
            let current = self.core.layout.read_current(app);
            match pending.iter().find(|a| a.app == app) {
                Some(a)
                    if a.step == Step::Switched
                        || current.as_deref() == Some(a.to.as_str())
                        || a.kind == ActivationKind::Revert =>
                {
                    tracing::warn!(%app, to = %a.to, step = ?a.step, current = ?current, "resuming interrupted activation");
                    // Report "checking" from the first heartbeat on, not the last committed health.
                    self.core.set_live(app, |l| {
                        l.health = HealthState::Checking;
                        l.busy = true;
                    });
                    let this = self.clone();
                    let a = a.clone();
                    let switched = a.step == Step::Switched || current.as_deref() == Some(a.to.as_str());
                    tokio::spawn(async move {
                        let app = a.app.clone();
                        let guard = this.core.app_lock(&app);
                        let _g = guard.lock().await;
                        let start = if switched {
                            Start::Resume(a)
                        } else {
                            // A revert decided but not switched yet: the failed release must not
                            // stay, so the revert runs again from the start.
                            Start::Fresh { to: a.to.clone(), kind: a.kind, deadline: None }
                        };
                        let r = this.busy(&app, || this.run(&app, start)).await;
                        if let Err(e) = r {
                            tracing::warn!(%app, error = %e, "recovered activation did not confirm");
                        }
                    });
                }
                Some(a) => {
                    // Decided but never switched: `current` still points at the committed release.
                    tracing::warn!(%app, to = %a.to, "dropping an activation interrupted before its switch");
                    self.clear_journal(app).await.map_err(|e| crate::Error::State(e.to_string()))?;
                    self.start_current(app, current).await;
                }
                None => self.start_current(app, current).await,
            }
        }
        Ok(())
    }

    /// Starts the committed current release of an app after re-verifying it.
    async fn start_current(&self, app: &str, current: Option<String>) {
        let Some(cur) = current else { return };
        let r = async {
            let rec = self.record(app).await?;
            let launch = self.prepare(app, &cur, rec.previous.clone()).await?;
            self.services.start(&launch).await?.recorded().await?;
            self.core.set_live(app, |l| l.health = rec.health);
            self.services.monitor(&launch);
            Ok::<(), ExecError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::error!(%app, version = %cur, error = %e, "current release not started");
            self.core.set_live(app, |l| {
                l.health = HealthState::Unhealthy;
                l.last_error = Some(format!("{app}@{cur} not started: {e}"));
            });
        }
    }

    /// Stops every supervised service (agent shutdown).
    pub async fn shutdown(&self) {
        self.services.stop_all().await;
    }
}

/// The failpoint prefix for an activation kind.
fn step_name(kind: ActivationKind) -> &'static str {
    match kind {
        ActivationKind::Deploy => "activate",
        ActivationKind::Rollback => "rollback",
        ActivationKind::Revert => "revert",
    }
}

/// A kept release's manifest, its signatures checked against the trust set in force now and
/// every file against it.
pub(crate) fn verify_release(c: &Core, app: &str, version: &str) -> Result<Manifest, ExecError> {
    let hp = c.layout.header_path(app, version);
    let mut f = std::fs::File::open(&hp).map_err(|e| ExecError::Corrupted {
        app: app.into(),
        version: version.into(),
        source: Box::new(convoy_bundle::Error::Io { path: hp.clone(), source: e }),
    })?;
    let header = convoy_bundle::read_header(&mut f, c.cfg.limits.max_manifest_bytes).map_err(|e| {
        ExecError::Corrupted { app: app.into(), version: version.into(), source: Box::new(e) }
    })?;
    let v = convoy_bundle::verify_header(&header, &c.cfg.trust).map_err(|e| ExecError::Untrusted {
        app: app.into(),
        version: version.into(),
        source: Box::new(e),
    })?;
    convoy_bundle::verify_tree(&c.layout.release_dir(app, version), &v.manifest).map_err(|e| {
        ExecError::Corrupted { app: app.into(), version: version.into(), source: Box::new(e) }
    })?;
    Ok(v.manifest)
}

/// Keeps at most `keep_releases` per app, never the current, known-good, previous one or the
/// release a rollback would go to. Logs of pruned releases go too.
fn prune(c: &Core, app: &str) -> Result<(), ExecError> {
    let rec = c.state.app(app)?;
    let current = c.layout.read_current(app);
    let installed = c.state.installed_for(app)?;
    let names: Vec<String> = installed.iter().map(|r| r.version.clone()).collect();
    let target = current.as_deref().and_then(|cur| rec.rollback_target(cur, &names));
    let protected = [current, rec.known_good.clone(), rec.previous.clone(), target];
    let mut excess = installed.len().saturating_sub(c.cfg.keep_releases.max(1));
    for r in installed {
        if excess == 0 {
            break;
        }
        if protected.iter().any(|p| p.as_deref() == Some(r.version.as_str())) {
            continue;
        }
        c.layout.remove_release(app, &r.version)?;
        c.layout.remove_logs(app, &r.version)?;
        c.state.remove_installed(app, &r.version)?;
        tracing::info!(%app, version = %r.version, "pruned old release");
        excess -= 1;
    }
    Ok(())
}
