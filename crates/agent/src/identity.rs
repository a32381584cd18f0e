//! The agent's identity on disk: `agent.toml` (who it is and where its controller is),
//! `identity.pem` (certificate and private key in one file, so a renewal replaces both in one
//! atomic rename) and `ca.pem` (the controller's CA).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use convoy_base::files;
use convoy_pki::{CertInfo, ClientIdentity};
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

    /// Writes `agent.toml` atomically, mode 0600: its per-host variables can hold secrets.
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let text = toml::to_string(self)
            .map_err(|e| Error::AgentFile { path: data_dir.join(AGENT_FILE), message: e.to_string() })?;
        files::write_atomic(&data_dir.join(AGENT_FILE), text.as_bytes(), true)?;
        Ok(())
    }
}

/// Creates the data directory (and any missing parents) with mode 0711, or sets an existing one
/// to 0711: the agent's own files in it (its private key, `agent.toml`, the state store, the
/// download cache) are private on their own, while services that run as another user must be
/// able to pass through it to reach their release directory. Nobody else can list it.
pub(crate) fn create_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o711).create(dir).map_err(io)?;
    let meta = std::fs::metadata(dir).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0o011 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
    }
    Ok(())
}

/// Creates a directory only the agent may enter (mode 0700), or tightens an existing one.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    let meta = std::fs::metadata(dir).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_data_dir_agent_file_and_key_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lib/convoy");
        create_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o711);
        let file = AgentFile {
            id: "a1".into(),
            region: "eu-west".into(),
            labels: BTreeMap::new(),
            controller: "127.0.0.1:7443".into(),
            server_name: None,
            trust: vec![],
            vars: [("DB_PASSWORD".to_owned(), "hunter2".to_owned())].into(),
        };
        file.save(&dir).unwrap();
        assert_eq!(mode(&dir.join(AGENT_FILE)), 0o600);
        assert_eq!(AgentFile::load(&dir).unwrap().vars["DB_PASSWORD"], "hunter2");
        write_identity(&dir, "CERT", "KEY").unwrap();
        assert_eq!(mode(&identity_path(&dir)), 0o600);
        // Saving again (a renewal, an edit) keeps the file private.
        file.save(&dir).unwrap();
        assert_eq!(mode(&dir.join(AGENT_FILE)), 0o600);

        // A directory that already exists with a looser mode is tightened; one that services
        // cannot pass through (as older agents left it) is opened for passing through only.
        let existing = tmp.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        for before in [0o755, 0o700, 0o777] {
            std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(before)).unwrap();
            create_data_dir(&existing).unwrap();
            assert_eq!(mode(&existing), 0o711, "from {before:o}");
        }
        // The agent's own directories are private.
        let private = dir.join("state");
        create_private_dir(&private).unwrap();
        assert_eq!(mode(&private), 0o700);
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&private).unwrap();
        assert_eq!(mode(&private), 0o700);
    }
}
