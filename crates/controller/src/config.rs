//! The controller's configuration file (`convoy.toml`, written by `convoy init`).
//!
//! Layers: built-in defaults < the TOML file < flags. The raw file is parsed into [`RawConfig`]
//! (unknown fields are errors), then validated into [`Config`], whose paths are absolute.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_pki::TrustDomain;
use serde::{Deserialize, Serialize};

/// The file name `convoy init` writes in its data directory.
pub const CONFIG_FILE: &str = "convoy.toml";
/// Where the admin CLI looks when neither `--config` nor `CONVOY_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "certs/convoy.toml";
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:7443";
/// The HTTP listener (metrics, hooks) is plain HTTP, so by default it listens on loopback only;
/// exposing it is a deliberate `http_addr` choice.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7480";

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
}

fn default_app_label() -> String {
    "app".into()
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
            if !u.starts_with("http://") {
                return Err(field("notify.urls", format!("{u:?}: only http:// URLs are supported")));
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
}
