//! `convoy admins add NAME -o DIR` and `convoy admins revoke NAME`.

use std::path::PathBuf;

use convoy_pki::files;
use convoy_proto::v1 as pb;

use crate::config::{RawAdmin, RawConfig, RawTls};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Make a certificate for a new admin: the key is generated here, the controller signs a
    /// CSR. Writes NAME.key (0600), NAME.pem, ca.pem and a ready-to-use convoy.toml into DIR.
    Add {
        name: String,
        #[arg(short = 'o', long = "output")]
        dir: PathBuf,
    },
    /// Refuse this admin from now on, on every connection.
    Revoke { name: String },
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    match cmd {
        Command::Add { name, dir } => {
            let key_path = dir.join(format!("{name}.key"));
            let cfg_path = dir.join(crate::config::CONFIG_FILE);
            for p in [&key_path, &cfg_path] {
                if p.exists() {
                    anyhow::bail!("refusing to overwrite {}", p.display());
                }
            }
            let kc = convoy_pki::generate_csr()?;
            let resp = client
                .issue_admin(pb::IssueAdminRequest { name: name.clone(), csr_der: kc.csr_der.clone() })
                .await
                .map_err(super::status_error)?
                .into_inner();
            std::fs::create_dir_all(&dir)?;
            files::write_new(&key_path, kc.key_pem.as_bytes(), true)?;
            files::write_atomic(&dir.join(format!("{name}.pem")), resp.certificate_pem.as_bytes(), false)?;
            files::write_atomic(&dir.join("ca.pem"), resp.ca_pem.as_bytes(), false)?;
            let raw = RawConfig {
                trust_domain: config.trust_domain.to_string(),
                state_dir: "state".into(),
                blob_dir: "blobs".into(),
                release_trust: vec![],
                max_bundle_bytes: config.max_bundle_bytes,
                grpc_addr: config.grpc_addr.to_string(),
                http_addr: config.http_addr.to_string(),
                controller: config.controller.clone(),
                agent_cert_lifetime: config.agent_cert_lifetime,
                heartbeat_interval: config.heartbeat_interval,
                tls: RawTls { ca_cert: "ca.pem".into(), ca_key: None, server_cert: None, server_key: None },
                admin: Some(RawAdmin {
                    cert: format!("{name}.pem").into(),
                    key: format!("{name}.key").into(),
                }),
                hooks: Default::default(),
                notify: Default::default(),
            };
            files::write_new(&cfg_path, toml::to_string(&raw)?.as_bytes(), true)?;
            println!("{}", cfg_path.display());
            eprintln!("admin {name} can now use: convoy --config {} agents", cfg_path.display());
        }
        Command::Revoke { name } => {
            client
                .revoke_admin(pb::RevokeAdminRequest { name: name.clone() })
                .await
                .map_err(super::status_error)?;
            println!("revoked admin {name}");
        }
    }
    Ok(())
}
