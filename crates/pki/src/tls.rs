//! rustls configurations: TLS 1.3 only, the Convoy CA as the only root; ALPN h2 for gRPC,
//! http/1.1 for the controller's HTTP listener.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{Error, Result};

/// A client certificate chain and its key, both PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::BadCertificate(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::NoPem { what: "certificate", source_name: what.into() });
    }
    Ok(certs)
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| Error::NoPem { what: "private key", source_name: what.into() })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// The controller's server config. Client certificates are verified against the CA when
/// presented but not required at the handshake, because enrollment must work without one;
/// every other RPC demands a verified identity.
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "server certificate")?, key(key_pem, "server key")?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server config of the controller's HTTP listener when it speaks HTTPS: the same
/// certificate and key as [`server_config`], TLS 1.3, ALPN `http/1.1`, and no client
/// certificates asked for (its clients, Prometheus and Alertmanager, authenticate with bearer
/// tokens and HMAC signatures, or not at all).
pub fn http_server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "server certificate")?, key(key_pem, "server key")?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting only the Convoy CA, presenting `identity` when given.
pub fn client_config(ca_pem: &str, identity: Option<&ClientIdentity>) -> Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(
            certs(&id.cert_pem, "client certificate")?,
            key(&id.key_pem, "client key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Which servers an outbound HTTP client ([`web_client_config`]) trusts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebTrust {
    /// None: the client speaks plain `http://` only (health probes of local services).
    Nothing,
    /// The operating system's root certificates, for `https://` webhooks.
    System,
}

/// The client config of the one outbound HTTP client (`convoy_transport::http`): TLS 1.3, the
/// same explicit `ring` provider as every config here, ALPN `http/1.1`, no client certificate,
/// and the servers `trust` says.
pub fn web_client_config(trust: WebTrust) -> Result<ClientConfig> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match trust {
        WebTrust::Nothing => builder.with_root_certificates(RootCertStore::empty()).with_no_client_auth(),
        WebTrust::System => {
            let verifier = rustls_platform_verifier::Verifier::new(provider())
                .map_err(|e| Error::Verifier(format!("the system's root certificates: {e}")))?;
            // `dangerous()` is only rustls's door for a custom verifier: this one verifies fully
            // (WebPKI chains to the system's roots, names, validity).
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
