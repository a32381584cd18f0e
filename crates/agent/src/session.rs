//! The agent's long-lived session with its controller.

use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_proto::v1 as pb;
use convoy_transport::DialOptions;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::exec::{ExecConfig, Executor};
use crate::identity::{load_identity, write_identity, AgentFile};
use crate::{Backoff, Error, Result};

/// How the agent runs. Defaults suit production; tests shorten the timings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Heartbeat interval until the controller's welcome says otherwise.
    pub heartbeat_interval: Duration,
    pub dial: DialOptions,
    /// Trusted release keys, on top of those in `agent.toml`.
    pub trust: Vec<convoy_bundle::PublicKey>,
    /// Valid signatures needed from distinct trusted keys.
    pub require_signatures: usize,
    /// Per-host variables, on top of (and overriding) those in `agent.toml`.
    pub vars: std::collections::BTreeMap<String, String>,
    pub keep_releases: usize,
    pub download: crate::DownloadOptions,
    /// Test hook: abort at this step (see `Executor`).
    pub failpoint: Option<String>,
}

impl AgentConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            reconnect_base: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            dial: DialOptions::default(),
            trust: vec![],
            require_signatures: 1,
            vars: Default::default(),
            keep_releases: 3,
            download: crate::DownloadOptions::default(),
            failpoint: None,
        }
    }
}

/// What an agent is doing, for its owner (tests, the demo, a status endpoint).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub connected: bool,
    /// Sessions established since start.
    pub sessions: u64,
    /// Certificates renewed since start.
    pub renewals: u64,
    /// Why the last session ended or failed.
    pub last_error: Option<String>,
}

/// An enrolled agent, ready to run.
pub struct Agent {
    config: AgentConfig,
    file: AgentFile,
    status: watch::Sender<AgentStatus>,
    executor: Executor,
}

impl Agent {
    /// Loads the agent's enrollment from its data directory.
    pub fn new(config: AgentConfig) -> Result<Self> {
        let file = AgentFile::load(&config.data_dir)?;
        // Fail now, not on the first connection, if the identity is unreadable.
        load_identity(&config.data_dir)?;
        let mut keys = config.trust.clone();
        for p in &file.trust {
            let p = if p.is_absolute() { p.clone() } else { config.data_dir.join(p) };
            keys.push(
                convoy_bundle::PublicKey::load(&p)
                    .map_err(|e| Error::Invalid { what: "trusted key", message: e.to_string() })?,
            );
        }
        if keys.is_empty() {
            tracing::warn!("no trusted release keys configured: every release will be refused");
        }
        let mut vars = file.vars.clone();
        vars.extend(config.vars.clone());
        let mut exec = ExecConfig::new(
            config.data_dir.clone(),
            convoy_bundle::TrustStore::new(keys, config.require_signatures),
        );
        exec.vars = vars;
        exec.keep_releases = config.keep_releases;
        exec.download = config.download.clone();
        exec.failpoint = config.failpoint.clone();
        exec.download.failpoint = config.failpoint.clone();
        exec.labels = file.labels.clone();
        let executor = Executor::open(exec)?;
        Ok(Self { config, file, status: watch::Sender::new(AgentStatus::default()), executor })
    }

    /// The order executor, for inspection (tests, diagnostics).
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    pub fn id(&self) -> &str {
        &self.file.id
    }

    /// A receiver that sees every status change.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `cancel` fires: connect, serve the session, and on any failure reconnect with
    /// exponential backoff and jitter.
    pub async fn run(self, cancel: CancellationToken) -> Result<()> {
        let span = tracing::info_span!("agent", agent_id = %self.file.id);
        self.run_inner(cancel).instrument(span).await
    }

    async fn run_inner(self, cancel: CancellationToken) -> Result<()> {
        // Local state first: services run whether or not the controller is reachable.
        self.executor.recover().await?;
        let result = self.session_loop(&cancel).await;
        self.executor.shutdown().await;
        result
    }

    async fn session_loop(&self, cancel: &CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new(self.config.reconnect_base, self.config.reconnect_max);
        while !cancel.is_cancelled() {
            let mut established = false;
            let result = self.session_once(cancel, &mut established).await;
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_error = result.as_ref().err().map(|e| e.to_string());
            });
            if cancel.is_cancelled() {
                break;
            }
            if let Err(e) = &result {
                tracing::warn!(error = %e, "session ended");
            }
            if established {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => break,
            }
        }
        Ok(())
    }

    async fn connect(&self) -> Result<(Channel, convoy_pki::CertInfo)> {
        let id = load_identity(&self.config.data_dir)?;
        let tls = convoy_pki::client_config(&id.ca_pem, Some(&id.client))?;
        let mut dial = self.config.dial.clone();
        if dial.server_name.is_none() {
            dial.server_name = self.file.server_name.clone();
        }
        let channel = convoy_transport::connect(&self.file.controller, tls, &dial).await?;
        Ok((channel, id.info))
    }

    async fn session_once(&self, cancel: &CancellationToken, established: &mut bool) -> Result<()> {
        let (channel, cert) = tokio::select! {
            c = self.connect() => c?,
            () = cancel.cancelled() => return Ok(()),
        };
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(64);
        let (releases, apps) = self.snapshot().await?;
        let hello = pb::Hello {
            agent_id: self.file.id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            region: self.file.region.clone(),
            labels: self.file.labels.clone().into_iter().collect(),
            releases,
            apps,
            last_order_seq: self.executor.last_seq(),
        };
        // The receiving half is ours until the session starts: this send cannot find it gone.
        if tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await.is_err() {
            tracing::error!("the session's outbound queue closed before the hello");
        }
        let mut inbound = client.session(ReceiverStream::new(rx)).await.map_err(Error::Refused)?.into_inner();
        let mut interval = self.config.heartbeat_interval;
        match inbound.message().await.map_err(Error::Refused)? {
            Some(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Welcome(w)) }) => {
                if w.heartbeat_interval_secs > 0 {
                    interval = interval.min(Duration::from_secs(w.heartbeat_interval_secs.into()));
                }
            }
            _ => return Err(Error::Refused(tonic::Status::internal("controller sent no welcome"))),
        }
        *established = true;
        self.status.send_modify(|s| {
            s.connected = true;
            s.sessions += 1;
            s.last_error = None;
        });
        tracing::info!("session established");
        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            let renew_in = renew_delay(&cert);
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    seq += 1;
                    let (releases, apps) = self.snapshot().await?;
                    let hb = pb::Heartbeat {
                        seq,
                        releases,
                        apps,
                        last_order_seq: self.executor.last_seq(),
                    };
                    if tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                        return Err(Error::Refused(tonic::Status::unavailable("session stream closed")));
                    }
                }
                () = tokio::time::sleep(renew_in) => {
                    match self.renew(&mut client).await {
                        // The controller accepts only the newest certificate (after a short
                        // overlap), and this connection was authenticated with the old one:
                        // reconnect with the new one now.
                        Ok(_) => {
                            tracing::info!("reconnecting with the renewed certificate");
                            return Ok(());
                        }
                        Err(e) => tracing::warn!(error = %e, "certificate renewal failed, will retry"),
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Order(order)) })) => {
                        tracing::info!(seq = order.seq, "order received");
                        self.executor.submit(order, channel.clone(), tx.clone());
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(Error::Refused(tonic::Status::unavailable("controller closed the session"))),
                    Err(status) => return Err(Error::Refused(status)),
                },
            }
        }
    }

    /// What is on disk and each app's status, read off the async threads (sled and the file
    /// system block).
    async fn snapshot(&self) -> Result<(Vec<pb::ReleaseRef>, Vec<pb::AppStatus>)> {
        let exec = self.executor.clone();
        let dir = self.config.data_dir.clone();
        tokio::task::spawn_blocking(move || (scan_releases(&dir), exec.statuses()))
            .await
            .map_err(|e| Error::State(format!("status task: {e}")))
    }

    async fn renew(
        &self,
        client: &mut pb::agent_service_client::AgentServiceClient<Channel>,
    ) -> Result<convoy_pki::CertInfo> {
        let key_and_csr = tokio::task::spawn_blocking(convoy_pki::generate_csr)
            .await
            .map_err(|e| Error::Invalid { what: "key generation", message: e.to_string() })??;
        let resp = client
            .renew(pb::RenewRequest { csr_der: key_and_csr.csr_der.clone() })
            .await
            .map_err(Error::Refused)?
            .into_inner();
        let info = convoy_pki::CertInfo::from_pem(&resp.certificate_pem)?;
        write_identity(&self.config.data_dir, &resp.certificate_pem, &key_and_csr.key_pem)?;
        self.status.send_modify(|s| s.renewals += 1);
        tracing::info!(serial = %info.serial, not_after = info.not_after, "certificate renewed");
        Ok(info)
    }
}

/// Time until `cert` is due for renewal. An overdue renewal (a retry after a failure) waits a
/// little, scaled to the remaining lifetime, so a failing controller is not hammered.
fn renew_delay(cert: &convoy_pki::CertInfo) -> Duration {
    let now = unix_now();
    let wait = (cert.renew_at() - now).max(0) as u64;
    if wait == 0 {
        let remaining = (cert.not_after - now).max(1) as u64;
        return Duration::from_millis((remaining * 1000 / 20).clamp(200, 30_000));
    }
    Duration::from_secs(wait)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Lists the releases on disk: `apps/<app>/releases/<version>`, with the one `current` points at
/// marked active.
fn scan_releases(data_dir: &Path) -> Vec<pb::ReleaseRef> {
    let mut out = Vec::new();
    let Ok(apps) = std::fs::read_dir(data_dir.join("apps")) else {
        return out;
    };
    for app in apps.flatten() {
        let app_name = app.file_name().to_string_lossy().into_owned();
        let current = std::fs::read_link(app.path().join("current"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        let Ok(releases) = std::fs::read_dir(app.path().join("releases")) else {
            continue;
        };
        for rel in releases.flatten() {
            let version = rel.file_name().to_string_lossy().into_owned();
            if version.starts_with('.') {
                continue;
            }
            out.push(pb::ReleaseRef {
                app: app_name.clone(),
                active: current.as_deref() == Some(version.as_str()),
                version,
            });
        }
    }
    out.sort_by(|a, b| (&a.app, &a.version).cmp(&(&b.app, &b.version)));
    out
}
