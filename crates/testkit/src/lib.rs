//! A controller and agents in one process, on loopback: what `convoy demo` runs and what the
//! integration tests and benchmarks build on. Everything is real (PKI, TLS, gRPC over sockets,
//! sled on disk); only the process boundary is missing.
//!
//! The one crate besides the binaries that depends on both the controller and the agent
//! libraries: neither library depends on the other. [`support`] holds the helpers the
//! integration tests share.

#![forbid(unsafe_code)]

pub mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use convoy_agent::{Agent, AgentConfig, AgentStatus, EnrollOptions};
use convoy_proto::v1 as pb;
use convoy_transport::http::HttpClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use convoy_controller::config::{self, Config};
use convoy_controller::init::{init, InitOptions};
use convoy_controller::logic::Controller;
use convoy_controller::server::{self, Prepared};

/// Timings for a local fleet; tests shorten them.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub agent_cert_lifetime: Option<Duration>,
    pub heartbeat_interval: Duration,
    /// Reuse this gRPC address (a restart keeps the port agents know).
    pub grpc_addr: Option<SocketAddr>,
    /// The gRPC listener's connection limits.
    pub conn_limits: convoy_transport::ConnLimits,
    /// The HTTP listener's settings instead of the config file's `[http]` section.
    pub http: Option<config::HttpConfig>,
    /// TOML appended to the config file `convoy init` writes (environments, windows), read
    /// through the real config loader.
    pub extra_config: Option<String>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            agent_cert_lifetime: None,
            heartbeat_interval: Duration::from_secs(1),
            grpc_addr: None,
            conn_limits: convoy_transport::ConnLimits::default(),
            http: None,
            extra_config: None,
        }
    }
}

/// A running in-process controller.
pub struct LocalController {
    pub dir: PathBuf,
    pub config: Config,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub controller: Controller,
    stop: CancellationToken,
    task: JoinHandle<Result<(), server::Error>>,
}

impl LocalController {
    /// Starts a controller whose PKI and state live in `dir`; runs `convoy init` there first if
    /// it has no config yet.
    pub async fn start(dir: &Path, opts: LocalOptions) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(opts.grpc_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))))
            .await
            .context("binding the gRPC listener")?;
        let http = TcpListener::bind("127.0.0.1:0").await.context("binding the HTTP listener")?;
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;
        let config_path = dir.join(config::CONFIG_FILE);
        if !config_path.exists() {
            init(&InitOptions {
                data_dir: dir.to_path_buf(),
                trust_domain: "convoy.test".into(),
                controller: grpc_addr.to_string(),
                grpc_addr: grpc_addr.to_string(),
                http_addr: http_addr.to_string(),
                ..InitOptions::default()
            })?;
            if let Some(extra) = &opts.extra_config {
                let mut text = std::fs::read_to_string(&config_path)?;
                text.push_str(extra);
                std::fs::write(&config_path, text)?;
            }
        }
        let mut config = Config::load(&config_path)?;
        config.controller = grpc_addr.to_string();
        config.heartbeat_interval = opts.heartbeat_interval;
        if let Some(l) = opts.agent_cert_lifetime {
            config.agent_cert_lifetime = l;
        }
        if let Some(http) = opts.http {
            http.check().map_err(|(field, why)| anyhow::anyhow!("{field}: {why}"))?;
            config.http = http;
        }
        let mut prepared = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Prepared::open(&config))
                .await
                .context("opening the controller")??
        };
        prepared.conn_limits = opts.conn_limits;
        let controller = prepared.controller.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(prepared.serve(grpc, http, stop.clone().cancelled_owned()));
        Ok(Self { dir: dir.to_path_buf(), config, grpc_addr, http_addr, controller, stop, task })
    }

    /// Stops the controller and waits for it to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("controller task panicked")??;
        Ok(())
    }

    /// An admin client using the admin certificate `convoy init` made.
    pub async fn admin(&self) -> anyhow::Result<pb::admin_service_client::AdminServiceClient<Channel>> {
        convoy_controller::client::admin_client(&self.config).await
    }

    /// Adds an admin `name` with `role` through the registry (as the first admin) and returns
    /// its identity.
    pub async fn add_admin(&self, name: &str, role: &str) -> anyhow::Result<convoy_pki::ClientIdentity> {
        let kc = convoy_pki::generate_csr()?;
        let resp = self
            .admin()
            .await?
            .issue_admin(pb::IssueAdminRequest { name: name.into(), csr_der: kc.csr_der, role: role.into() })
            .await?
            .into_inner();
        Ok(convoy_pki::ClientIdentity { cert_pem: resp.certificate_pem, key_pem: kc.key_pem })
    }

    /// An admin client presenting `id`.
    pub async fn admin_as(
        &self,
        id: &convoy_pki::ClientIdentity,
    ) -> anyhow::Result<pb::admin_service_client::AdminServiceClient<Channel>> {
        let ch = support::dial(&self.grpc_addr.to_string(), &self.ca_pem()?, Some(id))
            .await
            .map_err(|e| anyhow::anyhow!("dialing the controller: {e}"))?;
        Ok(pb::admin_service_client::AdminServiceClient::new(ch))
    }

    /// A one-time join token, optionally bound to a region, for a production agent.
    pub async fn token(&self, region: Option<&str>, ttl: Duration) -> anyhow::Result<String> {
        self.token_in(region, "", ttl).await
    }

    /// A one-time join token into environment `env` (empty: production).
    pub async fn token_in(&self, region: Option<&str>, env: &str, ttl: Duration) -> anyhow::Result<String> {
        let resp = self
            .admin()
            .await?
            .create_token(pb::CreateTokenRequest {
                region: region.unwrap_or_default().to_owned(),
                ttl_secs: ttl.as_secs(),
                labels: Default::default(),
                allow_agent_labels: false,
                environment: env.to_owned(),
            })
            .await?;
        Ok(resp.into_inner().token)
    }

    /// Pushes a bundle file through the admin API, as `convoy release push` does.
    pub async fn push_file(&self, path: &Path) -> anyhow::Result<pb::ReleaseInfo> {
        let data = tokio::fs::read(path).await.with_context(|| format!("reading {}", path.display()))?;
        // In chunks, as the CLI sends them: one message may not exceed the admin message limit.
        let chunks: Vec<pb::PushChunk> = data
            .chunks(convoy_controller::logic::BUNDLE_CHUNK)
            .map(|c| pb::PushChunk { data: c.to_vec() })
            .collect();
        let resp = self.admin().await?.push_release(tokio_stream::iter(chunks)).await?;
        resp.into_inner().release.context("the controller returned no release")
    }

    /// Builds `app@version` of the demo service under `dir` (see [`write_demo_release`]; `exe`
    /// is the `convoy` binary that serves it), signs it with `key`, and pushes it.
    pub async fn push_demo_release(
        &self,
        dir: &Path,
        exe: &Path,
        key: &convoy_bundle::SecretKey,
        release: DemoRelease<'_>,
    ) -> anyhow::Result<pb::ReleaseInfo> {
        let DemoRelease { app, version, mode, extra } = release;
        let src = dir.join(format!("src-{app}-{version}"));
        write_demo_release(&src, exe, version, mode, extra)?;
        let out = dir.join(format!("{app}-{version}.bundle"));
        let opts = convoy_bundle::BuildOptions {
            app: app.into(),
            version: version.into(),
            created_at: 1_767_225_600,
            target: None,
            zstd_level: 3,
        };
        convoy_bundle::build(&src, &opts, key, &out)?;
        self.push_file(&out).await
    }

    pub fn ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.config.ca_cert)?)
    }

    /// Enrolls a production agent with a fresh region-bound token into `data_dir`.
    pub async fn enroll(&self, data_dir: &Path, id: &str, region: &str) -> anyhow::Result<()> {
        self.enroll_in(data_dir, id, region, "").await
    }

    /// Enrolls an agent of environment `env` (empty: production) into `data_dir`.
    pub async fn enroll_in(&self, data_dir: &Path, id: &str, region: &str, env: &str) -> anyhow::Result<()> {
        let token = self.token_in(Some(region), env, Duration::from_secs(600)).await?;
        convoy_agent::enroll(EnrollOptions {
            controller: self.grpc_addr.to_string(),
            ca_pem: self.ca_pem()?,
            token,
            region: region.into(),
            id: Some(id.into()),
            labels: Default::default(),
            data_dir: data_dir.to_path_buf(),
            server_name: None,
        })
        .await?;
        Ok(())
    }
}

/// An agent running in this process.
pub struct LocalAgent {
    pub id: String,
    pub data_dir: PathBuf,
    pub status: watch::Receiver<AgentStatus>,
    cancel: CancellationToken,
    task: JoinHandle<convoy_agent::Result<()>>,
}

impl LocalAgent {
    /// Runs the enrolled agent in `data_dir` with quick reconnects.
    pub fn spawn(data_dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(data_dir, |_| {})
    }

    /// Like [`Self::spawn`], with the config adjusted by `tweak` (trusted keys, variables).
    pub fn spawn_with(data_dir: &Path, tweak: impl FnOnce(&mut AgentConfig)) -> anyhow::Result<Self> {
        let mut config = AgentConfig::new(data_dir);
        config.reconnect_base = Duration::from_millis(100);
        config.reconnect_max = Duration::from_secs(2);
        config.heartbeat_interval = Duration::from_secs(1);
        tweak(&mut config);
        let agent = Agent::new(config)?;
        let id = agent.id().to_owned();
        let status = agent.status();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(agent.run(cancel.clone()));
        Ok(Self { id, data_dir: data_dir.to_path_buf(), status, cancel, task })
    }

    /// Waits until the agent's status satisfies `pred`, or fails after `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> anyhow::Result<AgentStatus> {
        let status = tokio::time::timeout(timeout, self.status.wait_for(|s| pred(s)))
            .await
            .with_context(|| format!("agent {} did not reach the expected state in {timeout:?}", self.id))??
            .clone();
        Ok(status)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await.context("agent task panicked")??;
        Ok(())
    }
}

/// Writes a release directory for the demo HTTP service (`convoy demo-app`): a `bin/app` script
/// that runs it from `convoy_exe`, and a `convoy.toml` with a service on `${PORT}` and an HTTP
/// health check. `extra` is appended to `convoy.toml` (hooks, for instance).
pub fn write_demo_release(
    dir: &Path,
    convoy_exe: &Path,
    version: &str,
    mode: &str,
    extra: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("bin"))?;
    let script = format!("#!/bin/sh\nexec '{}' demo-app \"$@\"\n", convoy_exe.display());
    std::fs::write(dir.join("bin/app"), script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("bin/app"), std::fs::Permissions::from_mode(0o755))?;
    }
    let toml = format!(
        "[service]\ncommand = [\"bin/app\", \"--port\", \"${{PORT}}\", \"--mode\", \"{mode}\", \"--version\", \"{version}\"]\nstop_timeout = \"2s\"\n\n[health]\nhttp = \"http://127.0.0.1:${{PORT}}/healthz\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nsuccesses = 2\ndeadline = \"4s\"\n{extra}"
    );
    std::fs::write(dir.join("convoy.toml"), toml)?;
    Ok(())
}

/// Which demo release to build: the app, its version, the demo service's mode (`healthy`,
/// `fail500`, `crash`, `hang`, or a `${VAR}`), and extra `convoy.toml` text.
#[derive(Clone, Copy, Debug)]
pub struct DemoRelease<'a> {
    pub app: &'a str,
    pub version: &'a str,
    pub mode: &'a str,
    pub extra: &'a str,
}

impl<'a> DemoRelease<'a> {
    pub fn new(version: &'a str, mode: &'a str) -> Self {
        Self { app: "shop-api", version, mode, extra: "" }
    }
}

/// The HTTP client the demo and the tests use: the workspace's one client, plain `http://`.
pub fn http_client() -> anyhow::Result<&'static HttpClient> {
    static CLIENT: OnceLock<HttpClient> = OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    let c = HttpClient::plain("convoy-testkit")?;
    Ok(CLIENT.get_or_init(|| c))
}

/// `GET /` on a local HTTP service (the demo app): the last line of the body, or `None` when
/// nothing answers within two seconds.
pub async fn http_get_root(port: u16) -> Option<String> {
    let reply =
        http_client().ok()?.get(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(2)).await.ok()?;
    reply.body.lines().last().map(|l| l.trim().to_string())
}
