//! The controller's configuration file (`convoy.toml`, written by `convoy init`).
//!
//! Layers: built-in defaults < the TOML file < flags. The raw file is parsed into [`RawConfig`]
//! (unknown fields are errors), then validated into [`Config`], whose paths are absolute.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_pki::TrustDomain;
use serde::{Deserialize, Serialize};

use crate::logic::rollouts::windows::{DeployWindows, WindowConfig};

/// The file name `convoy init` writes in its data directory.
pub const CONFIG_FILE: &str = "convoy.toml";
/// Where the admin CLI looks when neither `--config` nor `CONVOY_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "certs/convoy.toml";
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:7443";
/// The HTTP listener (metrics, hooks) is plain HTTP, so by default it listens on loopback only;
/// exposing it is a deliberate `http_addr` choice.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7480";

/// How long a client of the HTTP listener has to send a complete request head (request line and
/// headers). The same clock runs while a keep-alive connection waits for its next request, so it
/// is also the idle timeout.
pub const DEFAULT_HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client of the HTTP listener has to send a whole request body, from the end of its
/// head. The hooks' bodies are small JSON documents.
pub const DEFAULT_HTTP_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake on the HTTP listener (`[http] tls = true`) may take.
pub const DEFAULT_HTTP_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the HTTP listener holds open at once; more are closed as soon as they are accepted.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 512;
/// Connections one client IP address may hold open on the HTTP listener at once.
pub const DEFAULT_HTTP_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// The longest timeout the `[http]` section accepts: beyond it a timeout no longer bounds much.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(3600);

/// The shortest HMAC key the generic hook accepts.
pub const MIN_HMAC_KEY_LEN: usize = 32;

/// Configuration errors; each names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: &'static str, message: String },
}

/// The file as written on disk. Relative paths are relative to the file's directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub trust_domain: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where pushed bundles are stored, content-addressed.
    #[serde(default = "default_blob_dir")]
    pub blob_dir: PathBuf,
    /// Release public keys the controller checks pushed bundles against. Optional: agents always
    /// verify; with keys here, unsigned or badly signed bundles are refused already at push.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_trust: Vec<PathBuf>,
    /// The largest bundle a push may upload.
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: u64,
    #[serde(default = "default_grpc")]
    pub grpc_addr: String,
    #[serde(default = "default_http")]
    pub http_addr: String,
    /// Where admin commands dial the controller, `HOST:PORT`.
    pub controller: String,
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub agent_cert_lifetime: Duration,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    pub tls: RawTls,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub hooks: HooksConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// Promotion rules per environment (`[environments.NAME]`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub environments: std::collections::BTreeMap<String, crate::logic::rollouts::promotion::RawRule>,
    /// Deploy windows (`[[windows]]`): when a rollout may activate in an environment's regions.
    /// See [`crate::logic::rollouts::windows`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowConfig>,
}

/// The HTTP listener (`/healthz`, `/metrics`, the alert hooks): whether it speaks TLS, and the
/// bounds on what its clients can make the controller hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve HTTPS with the controller's own certificate and key (the gRPC listener's); clients
    /// are not asked for certificates.
    #[serde(default)]
    pub tls: bool,
    /// See [`DEFAULT_HTTP_HEADER_READ_TIMEOUT`]; also the keep-alive idle timeout.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_HTTP_BODY_READ_TIMEOUT`].
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// See [`DEFAULT_HTTP_TLS_HANDSHAKE_TIMEOUT`].
    #[serde(default = "default_tls_handshake_timeout", with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// See [`DEFAULT_HTTP_MAX_CONNECTIONS`].
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// See [`DEFAULT_HTTP_MAX_CONNECTIONS_PER_PEER`].
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
}

fn default_header_read_timeout() -> Duration {
    DEFAULT_HTTP_HEADER_READ_TIMEOUT
}
fn default_body_read_timeout() -> Duration {
    DEFAULT_HTTP_BODY_READ_TIMEOUT
}
fn default_tls_handshake_timeout() -> Duration {
    DEFAULT_HTTP_TLS_HANDSHAKE_TIMEOUT
}
fn default_max_connections() -> usize {
    DEFAULT_HTTP_MAX_CONNECTIONS
}
fn default_max_connections_per_peer() -> usize {
    DEFAULT_HTTP_MAX_CONNECTIONS_PER_PEER
}

// By hand, not derived: the defaults must agree with the serde defaults (see NotifyConfig).
impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            tls: false,
            header_read_timeout: DEFAULT_HTTP_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_HTTP_BODY_READ_TIMEOUT,
            tls_handshake_timeout: DEFAULT_HTTP_TLS_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_HTTP_MAX_CONNECTIONS_PER_PEER,
        }
    }
}

impl HttpConfig {
    /// Checks the values; on error, the field (under `http.`) and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (name, d) in [
            ("http.header_read_timeout", self.header_read_timeout),
            ("http.body_read_timeout", self.body_read_timeout),
            ("http.tls_handshake_timeout", self.tls_handshake_timeout),
        ] {
            if d < Duration::from_millis(100) || d > MAX_HTTP_TIMEOUT {
                return Err((
                    name,
                    format!(
                        "{} is out of range: use between 100ms and {}",
                        humantime::format_duration(d),
                        humantime::format_duration(MAX_HTTP_TIMEOUT)
                    ),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(("http.max_connections", "must be at least 1".into()));
        }
        if self.max_connections_per_peer == 0 {
            return Err(("http.max_connections_per_peer", "must be at least 1".into()));
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err((
                "http.max_connections_per_peer",
                format!(
                    "{} is more than http.max_connections ({}); one peer cannot hold more than all",
                    self.max_connections_per_peer, self.max_connections
                ),
            ));
        }
        Ok(())
    }
}

/// Alert hooks: `POST /v1/hooks/alertmanager` (bearer token) and `POST /v1/hooks/rollback`
/// (HMAC-signed).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager_token: Option<String>,
    /// Secrets for the generic hook, by key id (the id is the audit actor: `hook:<id>`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hmac_keys: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HookRule>,
}

/// Maps alert labels to an action. All `labels` must be equal and all `labels_regex` must match
/// (anchored) for the rule to apply; the first matching rule wins.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookRule {
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels_regex: std::collections::BTreeMap<String, String>,
    /// `rollback` or `pause`.
    pub action: String,
    #[serde(default = "default_app_label")]
    pub app_label: String,
    #[serde(default = "default_region_label")]
    pub region_label: String,
    /// The label naming the environment the alert is about (production when absent).
    #[serde(default = "default_environment_label")]
    pub environment_label: String,
}

fn default_app_label() -> String {
    "app".into()
}
fn default_environment_label() -> String {
    "environment".into()
}

fn default_region_label() -> String {
    "region".into()
}

/// Outbound webhooks for events.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Announce an agent offline for longer than this.
    #[serde(default = "default_offline_after", with = "humantime_serde")]
    pub offline_after: Duration,
}

fn default_offline_after() -> Duration {
    Duration::from_secs(60)
}

// By hand, not derived: the default must agree with the serde default, or `convoy init` would
// write a zero threshold.
impl Default for NotifyConfig {
    fn default() -> Self {
        Self { urls: vec![], offline_after: default_offline_after() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_cert: PathBuf,
    /// Only the controller needs the CA key; an admin's copy of the config may omit it.
    pub ca_key: Option<PathBuf>,
    pub server_cert: Option<PathBuf>,
    pub server_key: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_blob_dir() -> PathBuf {
    PathBuf::from("blobs")
}
fn default_max_bundle() -> u64 {
    4 << 30
}
fn default_grpc() -> String {
    DEFAULT_GRPC_ADDR.into()
}
fn default_http() -> String {
    DEFAULT_HTTP_ADDR.into()
}
fn default_lifetime() -> Duration {
    convoy_pki::DEFAULT_AGENT_CERT_LIFETIME
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub trust_domain: TrustDomain,
    pub state_dir: PathBuf,
    pub blob_dir: PathBuf,
    pub release_trust: Vec<PathBuf>,
    pub max_bundle_bytes: u64,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub controller: String,
    pub agent_cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    pub ca_cert: PathBuf,
    pub ca_key: Option<PathBuf>,
    pub server_cert: Option<PathBuf>,
    pub server_key: Option<PathBuf>,
    pub admin: Option<(PathBuf, PathBuf)>,
    pub hooks: HooksConfig,
    pub notify: NotifyConfig,
    pub http: HttpConfig,
    pub environments: crate::logic::rollouts::promotion::Rules,
    /// Checked at load: [`DeployWindows::parse`] accepts them.
    pub windows: Vec<WindowConfig>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        let raw: RawConfig =
            toml::from_str(&text).map_err(|e| Error::Parse { path: path.into(), message: e.to_string() })?;
        Self::validate(path, raw)
    }

    fn validate(path: &Path, raw: RawConfig) -> Result<Self, Error> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = std::path::absolute(&base).unwrap_or(base);
        let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let field = |field: &'static str, message: String| Error::Field { path: path.into(), field, message };
        let trust_domain =
            TrustDomain::new(&raw.trust_domain).map_err(|e| field("trust_domain", e.to_string()))?;
        let grpc_addr = raw
            .grpc_addr
            .parse()
            .map_err(|_| field("grpc_addr", format!("{:?} is not an IP:PORT address", raw.grpc_addr)))?;
        let http_addr = raw
            .http_addr
            .parse()
            .map_err(|_| field("http_addr", format!("{:?} is not an IP:PORT address", raw.http_addr)))?;
        if !raw.controller.contains(':') {
            return Err(field("controller", format!("{:?} is not HOST:PORT", raw.controller)));
        }
        if raw.agent_cert_lifetime < Duration::from_secs(3) {
            return Err(field("agent_cert_lifetime", "must be at least 3s".into()));
        }
        for (i, rule) in raw.hooks.rules.iter().enumerate() {
            if rule.action != "rollback" && rule.action != "pause" {
                return Err(field(
                    "hooks.rules",
                    format!("rule {i}: action {:?} is not rollback or pause", rule.action),
                ));
            }
            for (k, re) in &rule.labels_regex {
                regex::Regex::new(re)
                    .map_err(|e| field("hooks.rules", format!("rule {i}: labels_regex.{k}: {e}")))?;
            }
        }
        for u in &raw.notify.urls {
            if !u.starts_with("http://") && !u.starts_with("https://") {
                return Err(field(
                    "notify.urls",
                    format!("{u:?}: only http:// and https:// URLs are supported"),
                ));
            }
        }
        for (id, key) in &raw.hooks.hmac_keys {
            if key.len() < MIN_HMAC_KEY_LEN {
                return Err(field(
                    "hooks.hmac_keys",
                    format!("key {id:?} is {} bytes; HMAC keys need at least {MIN_HMAC_KEY_LEN}", key.len()),
                ));
            }
        }
        if raw.hooks.alertmanager_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(field("hooks.alertmanager_token", "must be at least 16 characters".into()));
        }
        if raw.heartbeat_interval.is_zero() {
            return Err(field("heartbeat_interval", "must be more than zero".into()));
        }
        raw.http.check().map_err(|(name, message)| field(name, message))?;
        if raw.http.tls && (raw.tls.server_cert.is_none() || raw.tls.server_key.is_none()) {
            return Err(field(
                "http.tls",
                "needs tls.server_cert and tls.server_key: the HTTP listener uses the controller's certificate"
                    .into(),
            ));
        }
        let environments = crate::logic::rollouts::promotion::Rules::parse(&raw.environments)
            .map_err(|message| field("environments", message))?;
        DeployWindows::parse(&raw.windows).map_err(|e| field("windows", e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            trust_domain,
            state_dir: abs(&raw.state_dir),
            blob_dir: abs(&raw.blob_dir),
            release_trust: raw.release_trust.iter().map(|p| abs(p)).collect(),
            max_bundle_bytes: raw.max_bundle_bytes,
            grpc_addr,
            http_addr,
            controller: raw.controller,
            agent_cert_lifetime: raw.agent_cert_lifetime,
            heartbeat_interval: raw.heartbeat_interval,
            ca_cert: abs(&raw.tls.ca_cert),
            ca_key: raw.tls.ca_key.as_deref().map(abs),
            server_cert: raw.tls.server_cert.as_deref().map(abs),
            server_key: raw.tls.server_key.as_deref().map(abs),
            admin: raw.admin.map(|a| (abs(&a.cert), abs(&a.key))),
            hooks: raw.hooks,
            notify: raw.notify,
            http: raw.http,
            environments,
            windows: raw.windows,
        })
    }

    /// Finds the config: an explicit path, else `CONVOY_CONFIG` (clap fills that in), else the
    /// default location `convoy init` uses in a checkout.
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        explicit.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, expected_err: Option<&str>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("convoy.toml");
        std::fs::write(&p, body).unwrap();
        match (Config::load(&p), expected_err) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{e} should mention {want}"),
            (Ok(_), Some(want)) => panic!("expected an error mentioning {want}"),
            (Err(e), None) => panic!("unexpected error {e}"),
        }
    }

    const OK: &str =
        "trust_domain = \"convoy.test\"\ncontroller = \"127.0.0.1:7443\"\n[tls]\nca_cert = \"ca.pem\"\n";

    #[test]
    fn config_errors_name_the_field() {
        check(OK, None);
        check(&OK.replace("convoy.test", "Not Valid"), Some("trust_domain"));
        check(&format!("grpc_addr = \"nope\"\n{OK}"), Some("grpc_addr"));
        check(&format!("http_addr = \"1.2.3.4\"\n{OK}"), Some("http_addr"));
        check(&format!("agent_cert_lifetime = \"1s\"\n{OK}"), Some("agent_cert_lifetime"));
        check(&format!("agent_cert_lifetime = \"soon\"\n{OK}"), Some("agent_cert_lifetime"));
        check(&format!("colour = \"blue\"\n{OK}"), Some("colour"));
        check(&OK.replace("controller = \"127.0.0.1:7443\"\n", ""), Some("controller"));
        check("this is [not toml", Some("config"));
        check(&format!("{OK}[[hooks.rules]]\naction = \"explode\"\n"), Some("hooks.rules"));
        check(
            &format!("{OK}[[hooks.rules]]\naction = \"pause\"\nlabels_regex = {{ sev = \"(\" }}\n"),
            Some("labels_regex.sev"),
        );
        check(&format!("{OK}[hooks]\nalertmanager_token = \"short\"\n"), Some("alertmanager_token"));
        check(&format!("{OK}[notify]\nurls = [\"ftp://x\"]\n"), Some("notify.urls"));
        check(&format!("{OK}[hooks.hmac_keys]\nops = \"too-short\"\n"), Some("hooks.hmac_keys"));
        check(&format!("{OK}[hooks.hmac_keys]\nops = \"{}\"\n", "k".repeat(MIN_HMAC_KEY_LEN)), None);
    }

    #[test]
    fn deploy_windows_are_checked_at_load_and_a_bad_one_is_named() {
        let entry = |env: &str, days: &str, tz: &str| {
            format!(
                "[[windows]]\nenv = \"{env}\"\nregions = [\"eu-*\"]\ndays = \"{days}\"\nstart = \"02:00\"\n\
                 end = \"05:00\"\ntz = \"{tz}\"\n"
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("convoy.toml");
        std::fs::write(&p, OK).unwrap();
        assert!(Config::load(&p).unwrap().windows.is_empty(), "no windows by default");
        let good = format!(
            "{OK}{}{}",
            entry("production", "mon-fri", "Europe/Berlin"),
            entry("staging", "daily", "UTC")
        );
        std::fs::write(&p, &good).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!((c.windows.len(), c.windows[0].regions.as_slice()), (2, &["eu-*".to_string()][..]));
        check(
            &format!("{good}{}", entry("production", "mon-fry", "Europe/Berlin")),
            Some("field `windows`: [[windows]] entry 3 (env \"production\"): `days`: unknown day \"fry\""),
        );
        check(
            &format!("{OK}{}", entry("production", "daily", "Mars/Olympus")),
            Some("entry 1 (env \"production\"): `tz`: unknown time zone \"Mars/Olympus\""),
        );
        check(&format!("{OK}[[windows]]\nenv = \"production\"\n"), Some("missing field `days`"));
    }

    #[test]
    fn http_section_defaults_and_errors_name_the_field() {
        let load = |body: &str| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("convoy.toml");
            std::fs::write(&p, body).unwrap();
            Config::load(&p)
        };
        // Absent: plain HTTP with the documented bounds.
        assert_eq!(load(OK).unwrap().http, HttpConfig::default());
        let d = HttpConfig::default();
        assert!(!d.tls);
        assert_eq!(d.header_read_timeout, Duration::from_secs(10));
        assert_eq!((d.max_connections, d.max_connections_per_peer), (512, 64));
        let with_certs = OK.replace(
            "ca_cert = \"ca.pem\"\n",
            "ca_cert = \"ca.pem\"\nserver_cert = \"c.pem\"\nserver_key = \"c.key\"\n",
        );
        let c = load(&format!(
            "{with_certs}[http]\ntls = true\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"500ms\"\n\
             tls_handshake_timeout = \"3s\"\nmax_connections = 4000\nmax_connections_per_peer = 3000\n"
        ))
        .unwrap();
        assert_eq!(
            c.http,
            HttpConfig {
                tls: true,
                header_read_timeout: Duration::from_secs(2),
                body_read_timeout: Duration::from_millis(500),
                tls_handshake_timeout: Duration::from_secs(3),
                max_connections: 4000,
                max_connections_per_peer: 3000,
            }
        );
        // Each bad value: the field named, and why.
        let table: &[(&str, &str, &str)] = &[
            ("header_read_timeout = \"0s\"", "http.header_read_timeout", "out of range"),
            ("header_read_timeout = \"2h\"", "http.header_read_timeout", "out of range"),
            ("header_read_timeout = \"soon\"", "header_read_timeout", "invalid"),
            ("header_read_timeout = 10", "header_read_timeout", "invalid type"),
            ("body_read_timeout = \"10ms\"", "http.body_read_timeout", "between 100ms and 1h"),
            ("tls_handshake_timeout = \"0s\"", "http.tls_handshake_timeout", "out of range"),
            ("max_connections = 0", "http.max_connections", "at least 1"),
            ("max_connections = -1", "max_connections", "invalid value"),
            ("max_connections_per_peer = 0", "http.max_connections_per_peer", "at least 1"),
            (
                "max_connections_per_peer = 513",
                "http.max_connections_per_peer",
                "more than http.max_connections (512)",
            ),
            ("tls = \"yes\"", "tls", "invalid type"),
            ("tls = true", "http.tls", "needs tls.server_cert"),
            ("timeout = \"1s\"", "timeout", "unknown field"),
        ];
        for (line, field, why) in table {
            let e = load(&format!("{OK}[http]\n{line}\n")).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(why), "{line}: {e} should name {field} and say {why}");
        }
    }
}
