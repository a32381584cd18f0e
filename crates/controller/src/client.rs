//! The admin's mutual-TLS connection to a controller.

use convoy_base::files;
use convoy_pki::ClientIdentity;
use convoy_proto::v1::admin_service_client::AdminServiceClient;
use convoy_transport::DialOptions;
use tonic::transport::Channel;

use crate::config::Config;

/// An admin client for the controller named in `config`, authenticated with the admin
/// certificate the config points at.
pub async fn admin_client(config: &Config) -> anyhow::Result<AdminServiceClient<Channel>> {
    let (cert, key) = config.admin.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "config {}: no [admin] section: admin commands need an admin certificate",
            config.path.display()
        )
    })?;
    let identity =
        ClientIdentity { cert_pem: files::read_to_string(cert)?, key_pem: files::read_to_string(key)? };
    let ca = files::read_to_string(&config.ca_cert)?;
    let tls = convoy_pki::client_config(&ca, Some(&identity))?;
    let channel = convoy_transport::connect(&config.controller, tls, &DialOptions::default()).await?;
    Ok(AdminServiceClient::new(channel))
}
