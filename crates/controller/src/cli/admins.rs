//! `convoy admins add|rekey|list|revoke`: the controller's admin registry.

use std::path::{Path, PathBuf};

use anyhow::Context;
use convoy_base::files;
use convoy_proto::v1 as pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use serde::Serialize;

use super::Output;
use crate::config::{Config, RawAdmin, RawConfig, RawTls};

const ROLES: [&str; 4] = ["viewer", "deployer", "approver", "admin"];

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Add an admin with a role and issue its first certificate. With -o DIR the key is
    /// generated here and DIR receives NAME.key (0600), NAME.pem, ca.pem and a ready-to-use
    /// convoy.toml; with --csr FILE the key stays wherever the CSR was made and the certificate
    /// is printed. An existing name is refused.
    Add {
        name: String,
        /// viewer, deployer, approver or admin.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ROLES))]
        role: String,
        #[command(flatten)]
        key: KeyOutput,
    },
    /// Issue another certificate for your own name (any role) or, as an admin, for NAME. Earlier
    /// certificates keep working until revoked with `admins revoke NAME --serial S`.
    Rekey {
        name: Option<String>,
        #[command(flatten)]
        key: KeyOutput,
    },
    /// Names, roles and certificate serials.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke every certificate of NAME, or only the one with --serial; refused on every
    /// connection from then on.
    Revoke {
        name: String,
        #[arg(long)]
        serial: Option<String>,
    },
}

/// Where a new certificate's key comes from.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct KeyOutput {
    /// A PKCS#10 request (PEM or DER) made where the key lives; the certificate goes to stdout.
    #[arg(long)]
    csr: Option<PathBuf>,
    /// Generate the key here and write it, the certificate and a config into this directory.
    #[arg(short = 'o', long = "output")]
    dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct AdminJson {
    name: String,
    role: String,
    created_by: String,
    created_at: i64,
    certs: Vec<CertJson>,
}

#[derive(Serialize)]
struct CertJson {
    serial: String,
    state: &'static str,
    issued_at: i64,
    issued_by: String,
    not_after: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<i64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    revoked_by: String,
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    match cmd {
        Command::Add { name, role, key } => {
            let prepared = prepare(&key, &name)?;
            let resp = client
                .issue_admin(pb::IssueAdminRequest {
                    name: name.clone(),
                    csr_der: prepared.csr_der.clone(),
                    role: role.clone(),
                })
                .await
                .map_err(super::status_error)?
                .into_inner();
            finish(&config, &name, prepared, &resp)?;
            eprintln!("admin {name} added with role {role}; certificate serial {}", resp.serial);
        }
        Command::Rekey { name, key } => {
            let name = match name {
                Some(n) => n,
                None => own_name(&config)?,
            };
            let prepared = prepare(&key, &name)?;
            let resp = client
                .rekey_admin(pb::RekeyAdminRequest { name: name.clone(), csr_der: prepared.csr_der.clone() })
                .await
                .map_err(super::status_error)?
                .into_inner();
            finish(&config, &name, prepared, &resp)?;
            eprintln!("new certificate for admin {name}; serial {}", resp.serial);
        }
        Command::List { output } => {
            let resp =
                client.list_admins(pb::ListAdminsRequest {}).await.map_err(super::status_error)?.into_inner();
            print!("{}", render(resp.admins, output)?);
        }
        Command::Revoke { name, serial } => {
            let resp = client
                .revoke_admin(pb::RevokeAdminRequest {
                    name: name.clone(),
                    serial: serial.unwrap_or_default(),
                })
                .await
                .map_err(super::status_error)?
                .into_inner();
            println!("revoked admin {name}: {}", resp.revoked_serials.join(", "));
        }
    }
    Ok(())
}

/// A CSR to send, and where its answer goes.
struct Prepared {
    csr_der: Vec<u8>,
    /// The generated key and the directory to write into, for -o.
    write_to: Option<(String, PathBuf)>,
}

fn prepare(key: &KeyOutput, name: &str) -> anyhow::Result<Prepared> {
    if let Some(path) = &key.csr {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let csr_der = match CertificateSigningRequestDer::from_pem_slice(&bytes) {
            Ok(der) => der.as_ref().to_vec(),
            // Not PEM: send it as DER and let the controller say whether it is a CSR.
            Err(_) => bytes,
        };
        return Ok(Prepared { csr_der, write_to: None });
    }
    let Some(dir) = &key.dir else {
        anyhow::bail!("give either --csr FILE or -o DIR");
    };
    for p in [dir.join(format!("{name}.key")), dir.join(crate::config::CONFIG_FILE)] {
        if p.exists() {
            anyhow::bail!("refusing to overwrite {}", p.display());
        }
    }
    let kc = convoy_pki::generate_csr()?;
    Ok(Prepared { csr_der: kc.csr_der.clone(), write_to: Some((kc.key_pem.clone(), dir.clone())) })
}

fn finish(
    config: &Config,
    name: &str,
    prepared: Prepared,
    resp: &pb::IssueAdminResponse,
) -> anyhow::Result<()> {
    match prepared.write_to {
        None => print!("{}", resp.certificate_pem),
        Some((key_pem, dir)) => {
            let cfg_path = write_admin_dir(config, &dir, name, &key_pem, resp)?;
            println!("{}", cfg_path.display());
            eprintln!("admin {name} can now use: convoy --config {} status", cfg_path.display());
        }
    }
    Ok(())
}

/// The admin name in this config's own certificate.
fn own_name(config: &Config) -> anyhow::Result<String> {
    let (cert, _) = config.admin.as_ref().context("the config names no admin certificate")?;
    let info = convoy_pki::CertInfo::from_pem(&files::read_to_string(cert)?)?;
    match info.identity(&config.trust_domain)? {
        convoy_pki::Identity::Admin(name) => Ok(name),
        other => anyhow::bail!("{} is a certificate for {other}, not an admin", cert.display()),
    }
}

/// Writes a new admin's key, certificate, CA and config into `dir`; returns the config's path.
fn write_admin_dir(
    config: &Config,
    dir: &Path,
    name: &str,
    key_pem: &str,
    resp: &pb::IssueAdminResponse,
) -> anyhow::Result<PathBuf> {
    let key_path = dir.join(format!("{name}.key"));
    let cfg_path = dir.join(crate::config::CONFIG_FILE);
    std::fs::create_dir_all(dir)?;
    files::write_new(&key_path, key_pem.as_bytes(), true)?;
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
        admin: Some(RawAdmin { cert: format!("{name}.pem").into(), key: format!("{name}.key").into() }),
        hooks: Default::default(),
        notify: Default::default(),
        http: Default::default(),
        environments: Default::default(),
        windows: vec![],
    };
    files::write_new(&cfg_path, toml::to_string(&raw)?.as_bytes(), true)?;
    Ok(cfg_path)
}

/// Renders the registry as a table or JSON.
fn render(mut admins: Vec<pb::AdminInfo>, output: Output) -> anyhow::Result<String> {
    admins.sort_by(|a, b| a.name.cmp(&b.name));
    let json: Vec<AdminJson> = admins
        .into_iter()
        .map(|a| AdminJson {
            name: a.name,
            role: a.role,
            created_by: a.created_by,
            created_at: a.created_at_unix,
            certs: a
                .certs
                .into_iter()
                .map(|c| CertJson {
                    serial: c.serial,
                    state: if c.revoked { "revoked" } else { "active" },
                    issued_at: c.issued_at_unix,
                    issued_by: c.issued_by,
                    not_after: c.not_after_unix,
                    revoked_at: c.revoked.then_some(c.revoked_at_unix),
                    revoked_by: c.revoked_by,
                })
                .collect(),
        })
        .collect();
    if output == Output::Json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&json)?));
    }
    let mut out =
        format!("{:<20} {:<9} {:<34} {:<8} {:<21} {}\n", "NAME", "ROLE", "SERIAL", "STATE", "CREATED", "BY");
    for a in json {
        let created = crate::cli_time(a.created_at);
        if a.certs.is_empty() {
            out.push_str(&format!(
                "{:<20} {:<9} {:<34} {:<8} {:<21} {}\n",
                a.name, a.role, "-", "-", created, a.created_by
            ));
        }
        for (i, c) in a.certs.iter().enumerate() {
            let (name, role, created, by) = if i == 0 {
                (a.name.as_str(), a.role.as_str(), created.as_str(), a.created_by.as_str())
            } else {
                ("", "", "", "")
            };
            out.push_str(&format!(
                "{name:<20} {role:<9} {:<34} {:<8} {created:<21} {by}\n",
                c.serial, c.state
            ));
        }
    }
    Ok(out)
}
