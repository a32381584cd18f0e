//! The agent's identity on disk: `agent.toml` (who it is and where its controller is),
//! `identity.pem` (certificate and private key in one file, so a renewal replaces both in one
//! atomic rename) and `ca.pem` (the controller's CA).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use convoy_pki::{files, CertInfo, ClientIdentity};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const AGENT_FILE: &str = "agent.toml";
pub const IDENTITY_FILE: &str = "identity.pem";
pub const CA_FILE: &str = "ca.pem";

/// `agent.toml`, written at enrollment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub id: String,
    pub region: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The controller's address, `HOST:PORT`.
    pub controller: String,
    /// The name checked against the controller's certificate, when not the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Trusted release public keys (paths, relative to the data directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<PathBuf>,
    /// Per-host variables for `${NAME}` in releases.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
}

impl AgentFile {
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(AGENT_FILE);
        if !path.exists() {
            return Err(Error::NotEnrolled(data_dir.to_path_buf()));
        }
        let text =
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        toml::from_str(&text).map_err(|e| Error::AgentFile { path, message: e.to_string() })
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let text = toml::to_string(self)
            .map_err(|e| Error::AgentFile { path: data_dir.join(AGENT_FILE), message: e.to_string() })?;
        files::write_atomic(&data_dir.join(AGENT_FILE), text.as_bytes(), false)?;
        Ok(())
    }
}

/// The certificate and key the agent presents.
pub(crate) struct Identity {
    pub client: ClientIdentity,
    pub info: CertInfo,
    pub ca_pem: String,
}

pub(crate) fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

pub(crate) fn write_identity(data_dir: &Path, cert_pem: &str, key_pem: &str) -> Result<()> {
    let body = format!("{}\n{}", cert_pem.trim_end(), key_pem);
    files::write_atomic(&identity_path(data_dir), body.as_bytes(), true)?;
    Ok(())
}

pub(crate) fn load_identity(data_dir: &Path) -> Result<Identity> {
    let pem = files::read_to_string(&identity_path(data_dir))?;
    let ca_pem = files::read_to_string(&data_dir.join(CA_FILE))?;
    let info = CertInfo::from_pem(&pem)?;
    Ok(Identity { client: ClientIdentity { cert_pem: pem.clone(), key_pem: pem }, info, ca_pem })
}
