//! Signatures made with the controller's own TLS key (ECDSA P-256, SHA-256), for statements the
//! controller vouches for outside TLS, such as audit-log checkpoints. Anyone holding the
//! controller certificate can check them.

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivatePkcs8KeyDer};

use crate::{Error, Result};

/// A private key that signs statements: the controller's certificate key.
pub struct StatementSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for StatementSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatementSigner").field("key", &"<redacted>").finish()
    }
}

impl StatementSigner {
    /// Loads a PKCS#8 PEM key. Only ECDSA P-256 keys (what Convoy issues) are accepted.
    pub fn from_pem(key_pem: &str) -> Result<Self> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| Error::NoPem { what: "PKCS#8 private key", source_name: "controller key".into() })?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der.secret_pkcs8_der(), &rng)
            .map_err(|e| Error::BadKey(format!("not an ECDSA P-256 PKCS#8 key: {e}")))?;
        Ok(Self { key, rng })
    }

    /// Signs `message`: an ASN.1 DER ECDSA signature.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let sig = self.key.sign(&self.rng, message).map_err(|_| Error::BadKey("signing failed".into()))?;
        Ok(sig.as_ref().to_vec())
    }
}

/// Checks a signature made by [`StatementSigner`] with the public key of the first certificate
/// in `cert_pem`.
pub fn verify_statement(cert_pem: &str, message: &[u8], signature: &[u8]) -> Result<()> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| Error::NoPem { what: "certificate", source_name: "controller certificate".into() })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| Error::BadCertificate(e.to_string()))?;
    let public = cert.public_key().subject_public_key.data.to_vec();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public)
        .verify(message, signature)
        .map_err(|_| Error::BadSignature)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Ca, TrustDomain};

    #[test]
    fn controller_key_signs_and_its_certificate_verifies() {
        let td = TrustDomain::new("convoy.test").unwrap();
        let (ca, _) = Ca::generate(&td).unwrap();
        let (cert, key) = ca.issue_controller(&[]).unwrap();
        let signer = StatementSigner::from_pem(&key).unwrap();
        let sig = signer.sign(b"checkpoint 7").unwrap();
        verify_statement(&cert.cert_pem, b"checkpoint 7", &sig).unwrap();
        assert!(matches!(verify_statement(&cert.cert_pem, b"checkpoint 8", &sig), Err(Error::BadSignature)));
        let (other, _) = ca.issue_controller(&[]).unwrap();
        assert!(verify_statement(&other.cert_pem, b"checkpoint 7", &sig).is_err());
    }
}
