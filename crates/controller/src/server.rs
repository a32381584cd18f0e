//! Running the controller: gRPC (agents and admins) and HTTP (`/healthz`) on bound listeners,
//! until a shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use convoy_base::files;
use convoy_pki::Ca;
use convoy_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::grpc::{AdminSvc, AgentSvc, EnrollmentSvc};
use crate::logic::{Controller, Settings};
use crate::store::Store;

/// How long shutdown waits for in-flight RPCs and HTTP requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the audit log is checkpointed (when it grew) besides every 100 entries.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// Why the controller could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {what} is not set; the controller needs it")]
    Missing { path: String, what: &'static str },
    #[error(transparent)]
    Pki(#[from] convoy_pki::Error),
    #[error(transparent)]
    File(#[from] convoy_base::files::Error),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error("release trust keys: {0}")]
    Trust(#[from] convoy_bundle::Error),
    #[error(transparent)]
    Logic(#[from] crate::logic::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("hooks config: {0}")]
    Hooks(#[from] crate::hooks::ConfigError),
}

/// A controller ready to serve: its logic plus the TLS config its listener uses.
/// HTTP/2 streams one connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// The largest enrollment request decoded (a token and a CSR).
pub const MAX_ENROLL_MESSAGE: usize = 64 << 10;
/// The largest message an admin may send (a push chunk is 256 KiB).
pub const MAX_ADMIN_MESSAGE: usize = 1 << 20;
/// The largest message an agent may send (hello, heartbeat, order result with up to 1 MiB of log).
pub const MAX_AGENT_MESSAGE: usize = 2 << 20;

pub struct Prepared {
    pub controller: Controller,
    tls: std::sync::Arc<rustls::ServerConfig>,
    td: convoy_pki::TrustDomain,
    hooks: crate::hooks::HookConfig,
    /// The gRPC listener's connection limits.
    pub conn_limits: convoy_transport::ConnLimits,
    http: crate::config::HttpConfig,
    /// Set when the HTTP listener speaks HTTPS (`[http] tls = true`).
    http_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Prepared {
    /// Loads the CA, server certificate and state store named by `config`, and sets the metrics'
    /// gauges from the store. Blocking: async callers run it on the blocking pool.
    pub fn open(config: &Config) -> Result<Self, Error> {
        let path = config.path.display().to_string();
        let need = |p: &Option<std::path::PathBuf>, what| {
            p.clone().ok_or_else(|| Error::Missing { path: path.clone(), what })
        };
        let ca_pem = files::read_to_string(&config.ca_cert)?;
        let ca_key = files::read_to_string(&need(&config.ca_key, "tls.ca_key")?)?;
        let cert = files::read_to_string(&need(&config.server_cert, "tls.server_cert")?)?;
        let key = files::read_to_string(&need(&config.server_key, "tls.server_key")?)?;
        let ca = Ca::load(config.trust_domain.clone(), &ca_pem, &ca_key)?;
        // The controller's TLS key also signs audit checkpoints, verifiable with its certificate.
        let audit_key = crate::logic::audit::AuditKey {
            signer: std::sync::Arc::new(convoy_pki::StatementSigner::from_pem(&key)?),
            cert_pem: cert.clone(),
        };
        let tls = convoy_pki::server_config(&ca_pem, &cert, &key)?;
        let http_tls =
            if config.http.tls { Some(convoy_pki::http_server_config(&cert, &key)?) } else { None };
        let store = Store::open(&config.state_dir)?;
        migrate_admins(config, &store)?;
        let release_trust = if config.release_trust.is_empty() {
            None
        } else {
            Some(convoy_bundle::TrustStore::load(&config.release_trust, 1)?)
        };
        let settings = Settings {
            agent_cert_lifetime: config.agent_cert_lifetime,
            heartbeat_interval: config.heartbeat_interval,
            blob_dir: config.blob_dir.clone(),
            release_trust,
            max_bundle_bytes: config.max_bundle_bytes,
            notify_urls: config.notify.urls.clone(),
            offline_after: config.notify.offline_after,
            audit_key,
            promotion: config.environments.clone(),
            // Checked when the config was loaded.
            windows: crate::logic::rollouts::windows::DeployWindows::parse(&config.windows)
                .map_err(|e| crate::logic::Error::InvalidArgument(format!("config windows: {e}")))?,
        };
        let controller = Controller::new(ca, store, settings)?;
        controller.releases().prepare_blob_dir()?;
        controller.load_gauges()?;
        let hooks = crate::hooks::HookConfig::from_config(&config.hooks)?;
        Ok(Self {
            controller,
            tls,
            td: config.trust_domain.clone(),
            hooks,
            conn_limits: convoy_transport::ConnLimits::default(),
            http: config.http.clone(),
            http_tls,
        })
    }

    /// Serves until `shutdown` completes, then closes agent sessions and drains.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let grpc_addr = grpc.local_addr().ok();
        let http_addr = http.local_addr().ok();
        tracing::info!(?grpc_addr, ?http_addr, "controller serving");
        let stop = CancellationToken::new();
        let ctl = self.controller.clone();
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                shutdown.await;
                tracing::info!("shutting down: closing agent sessions");
                ctl.close_all_sessions();
                stop.cancel();
            });
        }
        let incoming = convoy_transport::incoming(grpc, self.tls, self.td, self.conn_limits);
        let ctl = self.controller;
        // Unfinished rollouts carry on where they stopped.
        ctl.rollouts().resume_rollouts().await?;
        // Online agents that drift from their desired state converge, not only on connect.
        ctl.rollouts().start_reconcile();
        // Awaited before returning: the task holds the controller (and so the store's lock),
        // and a stopped controller must release its store for the next one to open it.
        let checkpoints = {
            let (ctl, stop) = (ctl.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Err(e) = ctl.audit().checkpoint_if_grown().await {
                                tracing::error!(error = %e, "audit checkpoint not signed");
                            }
                        }
                        () = stop.cancelled() => break,
                    }
                }
            })
        };
        // Bounds on what one peer can make the controller hold: streams per connection, and
        // message sizes (an enrollment is decoded before its token is checked, so it gets the
        // smallest bound; hellos and heartbeats are small).
        let grpc_server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // Every RPC runs in a span naming it, so each log line says which call it belongs to.
            .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
            .add_service(
                pb::enrollment_server::EnrollmentServer::new(EnrollmentSvc(ctl.clone()))
                    .max_decoding_message_size(MAX_ENROLL_MESSAGE),
            )
            .add_service(
                pb::agent_service_server::AgentServiceServer::new(AgentSvc(ctl.clone()))
                    .max_decoding_message_size(MAX_AGENT_MESSAGE),
            )
            .add_service(
                pb::admin_service_server::AdminServiceServer::new(AdminSvc(ctl.clone()))
                    .max_decoding_message_size(MAX_ADMIN_MESSAGE),
            )
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        let app = crate::hooks::router(ctl.alerts().clone(), self.hooks);
        // The HTTP listener drains on its own within DRAIN_TIMEOUT of `stop`, then drops what is
        // left, so this task always ends.
        let http_task = tokio::spawn(crate::http::serve(
            http,
            app,
            self.http,
            self.http_tls,
            ctl.metrics().http.clone(),
            stop.clone(),
            DRAIN_TIMEOUT,
        ));
        let grpc_result = grpc_server.await;
        // Session loops end once their sessions are closed; the store is free after them.
        ctl.wait_for_tasks(DRAIN_TIMEOUT).await;
        // The gRPC server also ends when it fails: the HTTP listener stops with it.
        stop.cancel();
        let http_result = http_task.await.map_err(|e| Error::Http(std::io::Error::other(e)));
        if let Err(e) = checkpoints.await {
            tracing::error!(error = %e, "audit checkpoint task failed");
        }
        grpc_result?;
        http_result?;
        tracing::info!("controller stopped");
        Ok(())
    }
}

/// Applies the admin registry's upgrade rule ([`crate::logic::admins::migrate`]) with the admin
/// certificate the config points at, which for a controller set up by `convoy init` is the first
/// admin's. An unreadable certificate is not fatal: the registry then starts without it, and the
/// log says so.
fn migrate_admins(config: &Config, store: &Store) -> Result<(), Error> {
    let first = match &config.admin {
        None => None,
        Some((cert_path, _)) => {
            let parsed = files::read_to_string(cert_path)
                .map_err(Error::from)
                .and_then(|pem| Ok(convoy_pki::CertInfo::from_pem(&pem)?))
                .and_then(|info| Ok((info.identity(&config.trust_domain)?, info)));
            match parsed {
                Ok((convoy_pki::Identity::Admin(name), info)) => Some((name, info)),
                Ok((other, _)) => {
                    tracing::warn!(cert = %cert_path.display(), identity = %other, "the config's admin certificate is not an admin's");
                    None
                }
                Err(e) => {
                    tracing::warn!(cert = %cert_path.display(), error = %e, "cannot read the config's admin certificate");
                    None
                }
            }
        }
    };
    let done = crate::logic::admins::migrate(store, first.as_ref().map(|(n, i)| (n.as_str(), i)))?;
    if let Some(name) = &done.first_admin {
        tracing::warn!(admin = %name, revoked = ?done.revoked_names, "admin registry created from an older store: the first admin is recorded with role admin; other admins need new certificates");
    } else if !done.revoked_names.is_empty() {
        tracing::warn!(revoked = ?done.revoked_names, "admin registry created from an older store without a usable first admin certificate");
    }
    Ok(())
}

/// Binds both listeners from the config, with optional overrides from flags.
pub async fn bind(
    config: &Config,
    grpc_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
) -> std::io::Result<(TcpListener, TcpListener)> {
    let grpc_addr = grpc_addr.unwrap_or(config.grpc_addr);
    let http_addr = http_addr.unwrap_or(config.http_addr);
    let grpc = TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind gRPC address {grpc_addr}: {e}")))?;
    let http = TcpListener::bind(http_addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind HTTP address {http_addr}: {e}")))?;
    Ok((grpc, http))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::logic::rollouts::{Rollout, RolloutSpec, RolloutState};
    use crate::store::{AgentRecord, Tree};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn scrape(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
        resp
    }

    fn gauges(text: &str) -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("convoy_agents{") || l.starts_with("convoy_rollouts{"))
            .map(String::from)
            .collect();
        lines.sort();
        lines
    }

    /// A store of thousands of agents and hundreds of rollouts: the gauges are counted once at
    /// start-up, and a scrape after every record has become unreadable answers the same, so the
    /// scrape reads no record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_metrics_scrape_reads_no_store_record() {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::init::InitOptions {
            data_dir: dir.path().to_path_buf(),
            trust_domain: "convoy.test".into(),
            ..Default::default()
        };
        let config = Config::load(&crate::init::init(&opts).unwrap()).unwrap();
        let regions = ["ap-south", "eu-west", "us-east"];
        // Paused is the only unfinished state here: a paused rollout's driver waits for a command
        // and writes nothing, so the counts stay put while the test looks.
        let states = [
            RolloutState::Completed,
            RolloutState::RolledBack,
            RolloutState::Aborted,
            RolloutState::Superseded,
            RolloutState::Paused,
        ];
        {
            let store = Store::open(&config.state_dir).unwrap();
            for i in 0..3000 {
                store
                    .put_agent_for_test(&AgentRecord {
                        id: format!("agent-{i}"),
                        region: regions[i % 3].into(),
                        labels: Default::default(),
                        first_seen: 0,
                        last_seen: 0,
                        cert_serial: format!("{i:x}"),
                        cert_not_after: 0,
                        agent_version: String::new(),
                        releases: vec![],
                        revoked: i % 10 == 0,
                        apps: vec![],
                        previous_serial: None,
                        previous_serial_until: 0,
                        cert_serial_used: false,
                        environment: Default::default(),
                    })
                    .unwrap();
            }
            for i in 0..300 {
                let r = Rollout {
                    id: format!("ro-{i}"),
                    spec: RolloutSpec::new("shop-api", "1.0.0"),
                    digest: String::new(),
                    state: states[i % states.len()],
                    created_at: 0,
                    created_by: "admin/test".into(),
                    finished_at: None,
                    waves: vec![],
                    wave: 0,
                    agents: Default::default(),
                    events: vec![],
                    failure: None,
                    converging: vec![],
                    stopping: None,
                    approval: None,
                    window_waits: vec![],
                    run: Default::default(),
                };
                store.put(Tree::Rollouts, &r.id, &r, false).unwrap();
            }
            store.flush().unwrap();
        }
        let prepared = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Prepared::open(&config)).await.unwrap().unwrap()
        };
        let ctl = prepared.controller.clone();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(prepared.serve(grpc, http, stop.clone().cancelled_owned()));

        let before = gauges(&scrape(addr).await);
        // Each region has 1,000 agents, of which 100 (i % 30 fixed) are revoked.
        let mut want = vec![];
        for r in regions {
            want.push(format!(
                "convoy_agents{{environment=\"production\",region=\"{r}\",state=\"offline\"}} 900"
            ));
            want.push(format!(
                "convoy_agents{{environment=\"production\",region=\"{r}\",state=\"online\"}} 0"
            ));
        }
        for (s, n) in [
            ("aborted", 60),
            ("awaiting_approval", 0),
            ("completed", 60),
            ("expired", 0),
            ("paused", 60),
            ("rejected", 0),
            ("rolled_back", 60),
            ("running", 0),
            ("scheduled", 0),
            ("staging", 0),
            ("superseded", 60),
        ] {
            want.push(format!("convoy_rollouts{{state=\"{s}\"}} {n}"));
        }
        want.sort();
        assert_eq!(before, want);

        // Every listing of agents or rollouts now fails to decode...
        let store = ctl.store().clone();
        tokio::task::spawn_blocking(move || {
            store.put_garbage_for_test("agents", "agent-garbage").unwrap();
            store.put_garbage_for_test("rollouts", "ro-garbage").unwrap();
        })
        .await
        .unwrap();
        assert!(ctl.registry().list_agents(None).await.is_err());
        assert!(ctl.rollouts().rollouts(None).await.is_err());
        // ...and the scrape, which lists none, answers as before.
        assert_eq!(gauges(&scrape(addr).await), before);

        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
