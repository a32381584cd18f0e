//! `convoy-agent enroll`: one-time join with a token and a locally generated key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use convoy_base::files;
use convoy_proto::v1 as pb;
use convoy_transport::DialOptions;

use crate::identity::{create_data_dir, identity_path, write_identity, AgentFile, AGENT_FILE, CA_FILE};
use crate::{Error, Result};

/// What `convoy-agent enroll` needs.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    pub controller: String,
    /// The CA certificate (PEM) the controller's certificate must chain to.
    pub ca_pem: String,
    pub token: String,
    pub region: String,
    pub id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub server_name: Option<String>,
}

/// Enrolls: generates a key pair here (the private key never leaves this machine), sends a CSR
/// with the token, and stores the issued certificate, the CA and `agent.toml` under the data
/// directory. Refuses to touch a directory that is already enrolled.
pub async fn enroll(opts: EnrollOptions) -> Result<AgentFile> {
    let dir = &opts.data_dir;
    for existing in [dir.join(AGENT_FILE), identity_path(dir)] {
        if existing.exists() {
            return Err(Error::AlreadyEnrolled(dir.clone(), existing));
        }
    }
    let tls = convoy_pki::client_config(&opts.ca_pem, None)?;
    let dial = DialOptions { server_name: opts.server_name.clone(), ..DialOptions::default() };
    let channel = convoy_transport::connect(&opts.controller, tls, &dial).await?;
    let key_and_csr = tokio::task::spawn_blocking(convoy_pki::generate_csr)
        .await
        .map_err(|e| Error::Invalid { what: "key generation", message: e.to_string() })??;
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
    let resp = client
        .enroll(pb::EnrollRequest {
            token: opts.token.clone(),
            agent_id: opts.id.clone().unwrap_or_default(),
            region: opts.region.clone(),
            labels: opts.labels.clone().into_iter().collect(),
            csr_der: key_and_csr.csr_der.clone(),
        })
        .await
        .map_err(Error::Refused)?
        .into_inner();
    create_data_dir(dir)?;
    files::write_atomic(&dir.join(CA_FILE), opts.ca_pem.as_bytes(), false)?;
    write_identity(dir, &resp.certificate_pem, &key_and_csr.key_pem)?;
    let file = AgentFile {
        id: resp.agent_id,
        region: resp.region,
        labels: resp.labels.into_iter().collect(),
        controller: opts.controller,
        server_name: opts.server_name,
        trust: vec![],
        vars: Default::default(),
    };
    // agent.toml is written last: its presence is what marks the directory as enrolled.
    file.save(dir)?;
    Ok(file)
}
