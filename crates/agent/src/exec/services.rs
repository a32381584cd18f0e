//! Supervised services and the health monitor that keeps checking a release after its gate.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use convoy_bundle::ReleaseConfig;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{lock, Core, ExecError};
use crate::process::{self, Log, RunAs, ServiceSpec, Supervised};
use crate::state::HealthState;

/// Everything a child of one release is started with.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub app: String,
    pub version: String,
    /// The release's config with `${NAME}` substituted.
    pub config: ReleaseConfig,
    /// The environment for the service, hooks and exec health checks.
    pub env: Vec<(String, String)>,
    /// The identity the service, hooks and exec health checks run as (`[service] user` and
    /// `group`); `None` keeps the agent's own.
    pub run_as: Option<RunAs>,
}

impl Launch {
    /// Builds the children's environment: the release's own `env`, the per-host variables it
    /// references (and no others: an app never sees another app's variables), and Convoy's;
    /// resolves the identity they run as. Looks up the user database, so it runs on a blocking
    /// thread.
    pub fn new(
        core: &Core,
        app: &str,
        version: &str,
        raw: &ReleaseConfig,
        previous: Option<&str>,
    ) -> Result<Self, ExecError> {
        let config = raw.substitute(&core.cfg.vars).map_err(|e| ExecError::BadBundle {
            app: app.into(),
            version: version.into(),
            message: e,
        })?;
        let referenced = raw.variables().map_err(|e| ExecError::BadBundle {
            app: app.into(),
            version: version.into(),
            message: e.to_string(),
        })?;
        let mut env: BTreeMap<String, String> = core
            .cfg
            .vars
            .iter()
            .filter(|(k, _)| referenced.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(s) = &config.service {
            env.extend(s.env.clone());
        }
        env.insert("CONVOY_APP".into(), app.into());
        env.insert("CONVOY_VERSION".into(), version.into());
        env.insert("CONVOY_PREVIOUS_VERSION".into(), previous.unwrap_or_default().into());
        env.insert("CONVOY_RELEASE_DIR".into(), core.layout.release_dir(app, version).display().to_string());
        let run_as = config
            .service
            .as_ref()
            .map(|s| resolve_run_as(s.user.as_deref(), s.group.as_deref()))
            .transpose()
            .map_err(|e| ExecError::BadBundle {
                app: app.into(),
                version: version.into(),
                message: e.to_string(),
            })?
            .flatten();
        Ok(Self { app: app.into(), version: version.into(), config, env: env.into_iter().collect(), run_as })
    }

    pub fn dir(&self, core: &Core) -> std::path::PathBuf {
        core.layout.release_dir(&self.app, &self.version)
    }

    pub fn log(&self, core: &Core) -> Log {
        Log::new(core.layout.log_path(&self.app, &self.version), core.cfg.log_cap)
    }
}

/// The identity a release asks for, checked against what this agent may do.
fn resolve_run_as(user: Option<&str>, group: Option<&str>) -> crate::Result<Option<RunAs>> {
    let run_as = match (user, group) {
        (None, None) => return Ok(None),
        (Some(u), g) => RunAs::resolve(u, g)?,
        // A group alone keeps the agent's user.
        (None, Some(g)) => RunAs::resolve(&rustix::process::geteuid().as_raw().to_string(), Some(g))?,
    };
    run_as.check_permitted()?;
    Ok(Some(run_as))
}

/// The pending write of a started service's process-group stamp.
#[must_use = "a started service's stamp must be recorded before the activation is acknowledged"]
pub(crate) struct StampRecord(Option<tokio::task::JoinHandle<Result<(), ExecError>>>);

impl StampRecord {
    /// Waits until the stamp is in the flushed state store.
    pub async fn recorded(self) -> Result<(), ExecError> {
        match self.0 {
            None => Ok(()),
            Some(h) => h
                .await
                .map_err(|e| ExecError::Internal(format!("recording the service's process group: {e}")))?,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Services {
    core: Arc<Core>,
    running: Arc<Mutex<HashMap<String, Supervised>>>,
    monitors: Arc<StdMutex<HashMap<String, CancellationToken>>>,
}

impl Services {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core, running: Arc::default(), monitors: Arc::default() }
    }

    /// Starts the release's service, if it declares one, and records its process group so a
    /// restarted agent can stop an orphan. The record is written alongside whatever the caller
    /// does next (the health gate): the caller awaits [`StampRecord::recorded`] before it
    /// acknowledges anything.
    pub async fn start(&self, launch: &Launch) -> Result<StampRecord, ExecError> {
        let Some(service) = &launch.config.service else { return Ok(StampRecord(None)) };
        let spec = ServiceSpec {
            argv: service.command.clone(),
            cwd: launch.dir(&self.core),
            env: launch.env.clone(),
            stop_signal: process::signal_by_name(&service.stop_signal),
            stop_timeout: service.stop_timeout,
            run_as: launch.run_as,
        };
        let sup = Supervised::start(spec, launch.log(&self.core));
        // Record proof of the process group (boot id and start time), so a restarted agent
        // stops the orphan only if it is still ours.
        let mut stamp = sup.stamp.clone();
        let (core, app) = (self.core.clone(), launch.app.clone());
        let record = tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(2), stamp.wait_for(|s| s.is_some())).await.is_err() {
                tracing::warn!(%app, "service did not start within 2s; supervising anyway");
            }
            let stamp = stamp.borrow().clone();
            core.blocking(move |c| {
                let mut rec = c.state.app(&app)?;
                rec.service = stamp;
                Ok(c.state.put_app(&app, &rec)?)
            })
            .await
        });
        self.running.lock().await.insert(launch.app.clone(), sup);
        Ok(StampRecord(Some(record)))
    }

    /// Stops an app's service and its monitor.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn stop(&self, app: &str) -> Result<(), ExecError> {
        if let Some(token) = lock(&self.monitors).remove(app) {
            token.cancel();
        }
        let svc = self.running.lock().await.remove(app);
        if let Some(svc) = svc {
            svc.stop().await;
            let app = app.to_owned();
            self.core
                .blocking(move |c| {
                    let mut rec = c.state.app(&app)?;
                    rec.service = None;
                    Ok(c.state.put_app(&app, &rec)?)
                })
                .await?;
        }
        Ok(())
    }

    /// Stops every service (agent shutdown).
    pub async fn stop_all(&self) {
        for (_, t) in lock(&self.monitors).drain() {
            t.cancel();
        }
        let apps: Vec<String> = self.running.lock().await.keys().cloned().collect();
        for app in apps {
            if let Err(e) = self.stop(&app).await {
                tracing::warn!(%app, error = %e, "cannot record the stopped service");
            }
        }
    }

    /// Keeps checking health after the gate and reports changes in heartbeats.
    pub fn monitor(&self, launch: &Launch) {
        let Some(health) = launch.config.health.clone() else { return };
        let Some(check) = health.check() else { return };
        let token = CancellationToken::new();
        if let Some(old) = lock(&self.monitors).insert(launch.app.clone(), token.clone()) {
            old.cancel();
        }
        let core = self.core.clone();
        let (app, dir, env, run_as) =
            (launch.app.clone(), launch.dir(&self.core), launch.env.clone(), launch.run_as);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(health.interval) => {}
                    () = token.cancelled() => return,
                }
                let r = crate::health::probe(&core.http, &check, health.timeout, &dir, &env, run_as.as_ref())
                    .await;
                if token.is_cancelled() {
                    return;
                }
                core.set_live(&app, |l| match r {
                    Ok(()) => l.health = HealthState::Healthy,
                    Err(e) => {
                        l.health = HealthState::Unhealthy;
                        l.last_error = Some(e);
                    }
                });
            }
        });
    }
}
