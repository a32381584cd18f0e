use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::{Error, Identity, Result, TrustDomain};

/// How long an agent certificate lives unless the controller is configured otherwise.
pub const DEFAULT_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
const ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start slightly in the past so that small clock differences do not reject them.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A freshly issued certificate.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub info: CertInfo,
}

/// What the controller records about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// The single URI SAN.
    pub uri: String,
}

impl CertInfo {
    /// Parses a DER certificate and extracts its single URI SAN, serial and validity.
    /// A certificate with no URI SAN, or more than one, is refused.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| Error::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| Error::BadCertificate(format!("subject alternative names: {e}")))?
            .ok_or_else(|| Error::BadCertificate("no subject alternative name".into()))?;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let uri =
            uris.next().ok_or_else(|| Error::BadCertificate("no URI subject alternative name".into()))?;
        if uris.next().is_some() {
            return Err(Error::BadCertificate("more than one URI subject alternative name".into()));
        }
        Ok(Self {
            serial: hex_lower(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
            not_before: cert.validity().not_before.timestamp(),
            uri: uri.to_owned(),
        })
    }

    /// Parses the first certificate of a PEM file.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| Error::NoPem { what: "certificate", source_name: "input".into() })?;
        Self::from_der(&der)
    }

    /// When a holder should renew: two thirds into the certificate's lifetime, counted from
    /// its issue time (Convoy back-dates `not_before` by a fixed clock-skew allowance).
    pub fn renew_at(&self) -> i64 {
        let issued = self.not_before + CLOCK_SKEW.as_secs() as i64;
        let lifetime = (self.not_after - issued).max(0);
        issued + lifetime * 2 / 3
    }

    /// The identity in the certificate's URI SAN, checked against `td`.
    pub fn identity(&self, td: &TrustDomain) -> Result<Identity> {
        Identity::parse(&self.uri, td)
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A private key and the PKCS#10 request made with it. The key never leaves the machine that
/// generated it.
pub struct KeyAndCsr {
    pub key_pem: String,
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// Generates a fresh ECDSA P-256 key and a CSR for it. The subject is left empty: the controller
/// decides the certificate's identity and ignores anything a CSR asks for.
pub fn generate_csr() -> Result<KeyAndCsr> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr { key_pem: key.serialize_pem(), csr_der: csr.der().to_vec() })
}

/// The certificate authority: the trust root for identity on the wire.
pub struct Ca {
    td: TrustDomain,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.td).field("key", &"<redacted>").finish()
    }
}

fn offset(t: SystemTime) -> OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn leaf_params(
    td: &TrustDomain,
    identity: &Identity,
    lifetime: Duration,
    extra: Vec<SanType>,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let now = SystemTime::now();
    params.not_before = offset(now - CLOCK_SKEW);
    params.not_after = offset(now + lifetime);
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = dn;
    let uri = identity.uri(td).try_into().map_err(|_| Error::BadIdentity(identity.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.subject_alt_names.extend(extra);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        Identity::Controller => {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        }
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive serial with a non-zero first byte keeps the DER encoding at 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Creates a new CA for `td`. Returns it and its private key in PEM.
    pub fn generate(td: &TrustDomain) -> Result<(Self, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let now = SystemTime::now();
        params.not_before = offset(now - CLOCK_SKEW);
        params.not_after = offset(now + CA_LIFETIME);
        params.serial_number = Some(random_serial());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Convoy CA ({td})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        let ca = Self::load(td.clone(), &cert_pem, &key_pem)?;
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate and key.
    pub fn load(td: TrustDomain, cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { td, cert_pem: cert_pem.to_owned(), issuer })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the controller's server certificate with DNS names and IP addresses in `sans`.
    /// Returns the certificate and its new private key.
    pub fn issue_controller(&self, sans: &[String]) -> Result<(IssuedCert, String)> {
        let extra = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| Error::BadIdentity(format!("{s:?} is not a valid DNS name"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let key = KeyPair::generate()?;
        let params = leaf_params(&self.td, &Identity::Controller, SERVER_LIFETIME, extra)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued = finish(cert.pem(), cert.der())?;
        Ok((issued, key.serialize_pem()))
    }

    /// Issues an admin client certificate. Returns the certificate and its private key.
    pub fn issue_admin(&self, name: &str) -> Result<(IssuedCert, String)> {
        let key = KeyPair::generate()?;
        let params = leaf_params(&self.td, &Identity::admin(name)?, ADMIN_LIFETIME, vec![])?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((finish(cert.pem(), cert.der())?, key.serialize_pem()))
    }

    /// Issues an admin certificate for a CSR (the admin's key stays on their machine).
    pub fn sign_admin_csr(&self, csr_der: &[u8], name: &str) -> Result<IssuedCert> {
        self.sign_csr(csr_der, &Identity::admin(name)?, ADMIN_LIFETIME)
    }

    /// Signs a CSR for `identity`. The CSR's own signature must verify (proof of possession),
    /// but its subject and requested extensions are ignored: the CA sets them.
    pub fn sign_csr(&self, csr_der: &[u8], identity: &Identity, lifetime: Duration) -> Result<IssuedCert> {
        if csr_der.is_empty() {
            return Err(Error::BadCsr("the request carries no CSR".into()));
        }
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| Error::BadCsr(e.to_string()))?;
        let params = leaf_params(&self.td, identity, lifetime, vec![])?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        finish(cert.pem(), cert.der())
    }
}

fn finish(cert_pem: String, der: &[u8]) -> Result<IssuedCert> {
    Ok(IssuedCert { info: CertInfo::from_der(der)?, cert_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_subject_is_ignored_and_identity_comes_from_the_ca() {
        let td = TrustDomain::new("convoy.test").unwrap();
        let (ca, _) = Ca::generate(&td).unwrap();
        // A CSR that asks to be the controller.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::URI("spiffe://convoy.test/controller".try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap();
        let issued =
            ca.sign_csr(csr.der(), &Identity::agent("a1").unwrap(), Duration::from_secs(60)).unwrap();
        assert_eq!(issued.info.identity(&td).unwrap(), Identity::Agent("a1".into()));
        assert!(issued.info.not_after - issued.info.not_before <= 60 + 300);
    }

    #[test]
    fn malformed_csr_is_a_clear_error() {
        let td = TrustDomain::new("convoy.test").unwrap();
        let (ca, _) = Ca::generate(&td).unwrap();
        let id = Identity::agent("a1").unwrap();
        let err = ca.sign_csr(b"not a csr", &id, Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, Error::BadCsr(_)), "{err}");
        let err = ca.sign_csr(b"", &id, Duration::from_secs(60)).unwrap_err();
        assert!(err.to_string().contains("no CSR"), "{err}");
    }

    #[test]
    fn ca_reloads_from_pem_and_issues_verifiable_leaves() {
        let td = TrustDomain::new("convoy.test").unwrap();
        let (ca, key_pem) = Ca::generate(&td).unwrap();
        let ca2 = Ca::load(td.clone(), ca.cert_pem(), &key_pem).unwrap();
        let (server, _) = ca2.issue_controller(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(server.info.identity(&td).unwrap(), Identity::Controller);
        let (admin, _) = ca2.issue_admin("ops").unwrap();
        assert_eq!(admin.info.identity(&td).unwrap(), Identity::Admin("ops".into()));
        assert_ne!(server.info.serial, admin.info.serial);
    }
}
