//! `convoy init`: a new CA, the controller's certificate, the first admin's certificate and a
//! config file. It never overwrites: if any target file exists, nothing is written.

use std::path::{Path, PathBuf};

use convoy_base::files;
use convoy_pki::{Ca, TrustDomain};

use crate::config::{
    HookRule, HooksConfig, RawAdmin, RawConfig, RawTls, CONFIG_FILE, DEFAULT_GRPC_ADDR, DEFAULT_HTTP_ADDR,
};

/// A random 32-byte secret, hex.
fn secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// What `convoy init` is asked to create.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub data_dir: PathBuf,
    pub trust_domain: String,
    /// DNS names and IP addresses in the controller's certificate.
    pub sans: Vec<String>,
    pub admin: String,
    /// Where admins and agents reach the controller, `HOST:PORT`.
    pub controller: String,
    pub grpc_addr: String,
    pub http_addr: String,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("certs"),
            trust_domain: "convoy.local".into(),
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            admin: "admin".into(),
            controller: "127.0.0.1:7443".into(),
            grpc_addr: DEFAULT_GRPC_ADDR.into(),
            http_addr: DEFAULT_HTTP_ADDR.into(),
        }
    }
}

/// `convoy init` failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("refusing to overwrite an existing PKI: {0} already exists (nothing was written)")]
    Exists(PathBuf),
    #[error("cannot create {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Pki(#[from] convoy_pki::Error),
    #[error(transparent)]
    File(#[from] convoy_base::files::Error),
    #[error("recording the first admin in the state store: {0}")]
    Store(#[from] crate::store::Error),
    #[error("recording the first admin in the admin registry: {0}")]
    Registry(#[from] crate::logic::Error),
}

const FILES: [&str; 7] =
    ["ca.pem", "ca.key", "controller.pem", "controller.key", "admin.pem", "admin.key", CONFIG_FILE];

/// Creates the PKI and config under `opts.data_dir`. Returns the config file's path.
pub fn init(opts: &InitOptions) -> Result<PathBuf, Error> {
    let td = TrustDomain::new(&opts.trust_domain)?;
    convoy_pki::Identity::validate_name(&opts.admin)?;
    let dir = &opts.data_dir;
    for f in FILES {
        let p = dir.join(f);
        if p.exists() {
            return Err(Error::Exists(p));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Dir { path: dir.clone(), source })?;
    let (ca, ca_key) = Ca::generate(&td)?;
    let (server, server_key) = ca.issue_controller(&opts.sans)?;
    let (admin, admin_key) = ca.issue_admin(&opts.admin)?;
    let raw = RawConfig {
        trust_domain: td.to_string(),
        state_dir: PathBuf::from("state"),
        blob_dir: PathBuf::from("blobs"),
        release_trust: vec![],
        max_bundle_bytes: 4 << 30,
        grpc_addr: opts.grpc_addr.clone(),
        http_addr: opts.http_addr.clone(),
        controller: opts.controller.clone(),
        agent_cert_lifetime: convoy_pki::DEFAULT_AGENT_CERT_LIFETIME,
        heartbeat_interval: std::time::Duration::from_secs(5),
        tls: RawTls {
            ca_cert: "ca.pem".into(),
            ca_key: Some("ca.key".into()),
            server_cert: Some("controller.pem".into()),
            server_key: Some("controller.key".into()),
        },
        admin: Some(RawAdmin { cert: "admin.pem".into(), key: "admin.key".into() }),
        hooks: HooksConfig {
            alertmanager_token: Some(secret()),
            hmac_keys: [("default".to_string(), secret())].into(),
            rules: ["rollback", "pause"]
                .iter()
                .map(|action| HookRule {
                    labels: [("convoy_action".to_string(), action.to_string())].into(),
                    labels_regex: Default::default(),
                    action: action.to_string(),
                    app_label: "app".into(),
                    region_label: "region".into(),
                    environment_label: "environment".into(),
                })
                .collect(),
        },
        notify: Default::default(),
        http: Default::default(),
        environments: Default::default(),
        windows: vec![],
    };
    let config = format!(
        "# Convoy controller configuration, written by `convoy init`.\n\
         # Relative paths are relative to this file's directory.\n{}",
        toml::to_string(&raw).map_err(|e| convoy_pki::Error::BadIdentity(e.to_string()))?
    );
    let write =
        |name: &str, body: &str, private: bool| files::write_new(&dir.join(name), body.as_bytes(), private);
    // The CA key goes first: if anything after it fails, a rerun refuses rather than minting a
    // second CA next to the first.
    write("ca.key", &ca_key, true)?;
    write("ca.pem", ca.cert_pem(), false)?;
    write("controller.key", &server_key, true)?;
    write("controller.pem", &server.cert_pem, false)?;
    write("admin.key", &admin_key, true)?;
    write("admin.pem", &admin.cert_pem, false)?;
    // The config holds the hook secrets.
    write(CONFIG_FILE, &config, true)?;
    // Last, so that a failure here leaves a complete PKI: the controller's start-up rule
    // records the first admin from admin.pem when the registry is empty.
    let store = crate::store::Store::open(&dir.join(&raw.state_dir))?;
    crate::logic::admins::record_first_admin(&store, &opts.admin, &admin.info)?;
    Ok(dir.join(CONFIG_FILE))
}

/// The files `convoy init` writes, for documentation and tests.
pub fn init_files(dir: &Path) -> Vec<PathBuf> {
    FILES.iter().map(|f| dir.join(f)).collect()
}
