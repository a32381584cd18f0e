//! Convoy's PKI: the certificate authority that gives agents, admins and the controller their
//! identities on the wire, and the rustls configurations that enforce them.
//!
//! Every certificate carries exactly one URI SAN, `spiffe://<trust-domain>/<kind>/<name>`; that is
//! the identity the controller authorizes on. The TLS CA is a separate trust root from the release
//! signing keys: nothing here can make an agent run code.
//!
//! The crate is synchronous and free of tokio and tonic. rustls configs are built with an explicit
//! `ring` provider, so no process-global crypto state is touched.

#![forbid(unsafe_code)]

mod ca;
mod identity;
mod sign;
mod tls;

pub use ca::{generate_csr, Ca, CertInfo, IssuedCert, KeyAndCsr, DEFAULT_AGENT_CERT_LIFETIME};
pub use identity::{Identity, TrustDomain};
pub use sign::{verify_statement, StatementSigner};
pub use tls::{
    client_config, http_server_config, server_config, web_client_config, ClientIdentity, WebTrust,
};

/// Everything that can go wrong in the PKI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("malformed certificate signing request: {0}")]
    BadCsr(String),
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    #[error("invalid identity: {0}")]
    BadIdentity(String),
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomain(String),
    #[error("no PEM {what} found in {source_name}")]
    NoPem { what: &'static str, source_name: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("signing key: {0}")]
    BadKey(String),
    #[error("the signature does not verify with this certificate's public key")]
    BadSignature,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
