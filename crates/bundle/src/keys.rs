//! Release signing keys: ed25519. The key id is derived from the public key, so it cannot be
//! forged independently of the key.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use sha2::{Digest, Sha256};

use crate::{io_err, Error, Result};

const SECRET_PREFIX: &str = "convoy-ed25519-secret:";
const PUBLIC_PREFIX: &str = "convoy-ed25519:";
/// Signatures cover this prefix and the manifest bytes, so they cannot be replayed as
/// signatures over anything else.
pub(crate) const SIGNING_CONTEXT: &[u8] = b"convoy bundle manifest v1\0";

/// The first 8 bytes of the SHA-256 of a public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A public release key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    pub fn id(&self) -> KeyId {
        let digest = Sha256::digest(self.0.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    /// The `.pub` file's text.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{} {}\n", B64.encode(self.0.as_bytes()), self.id())
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let body = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or("expected a convoy-ed25519 public key")?;
        let b64 = body.split_whitespace().next().unwrap_or_default();
        let bytes: [u8; 32] = B64
            .decode(b64)
            .map_err(|e| format!("bad base64: {e}"))?
            .try_into()
            .map_err(|_| "an ed25519 public key is 32 bytes".to_string())?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map(Self).map_err(|e| e.to_string())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text).map_err(|reason| Error::BadKey { path: path.into(), reason })
    }

    pub(crate) fn verify(&self, manifest: &[u8], sig: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(manifest);
        self.0.verify(&msg, &sig).is_ok()
    }
}

/// A private release key. Its `Debug` output is redacted.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.public().id())
    }
}

impl SecretKey {
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&rand::random()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The `.key` file's text.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", B64.encode(self.0.to_bytes()))
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let b64 = text.trim().strip_prefix(SECRET_PREFIX).ok_or("expected a convoy-ed25519 secret key")?;
        let bytes: [u8; 32] = B64
            .decode(b64)
            .map_err(|e| format!("bad base64: {e}"))?
            .try_into()
            .map_err(|_| "an ed25519 secret key is 32 bytes".to_string())?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&bytes)))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text).map_err(|reason| Error::BadKey { path: path.into(), reason })
    }

    /// A signature over raw manifest bytes, ready for [`crate::write_header`]. Tools that
    /// assemble a bundle themselves (test harnesses, fuzzers) use it; `build` and
    /// `add_signature` call it for you.
    pub fn sign_manifest(&self, manifest: &[u8]) -> crate::Signature {
        crate::Signature { key_id: self.public().id(), sig: self.sign(manifest) }
    }

    pub(crate) fn sign(&self, manifest: &[u8]) -> [u8; 64] {
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(manifest);
        self.0.sign(&msg).to_bytes()
    }
}

/// The keys an agent (or a verifier) trusts, and how many distinct ones must have signed.
#[derive(Clone, Debug)]
pub struct TrustStore {
    keys: Vec<PublicKey>,
    required: usize,
}

impl TrustStore {
    /// `required` is clamped to at least 1: a trust store never accepts unsigned bundles.
    pub fn new(keys: Vec<PublicKey>, required: usize) -> Self {
        Self { keys, required: required.max(1) }
    }

    pub fn load(paths: &[impl AsRef<Path>], required: usize) -> Result<Self> {
        let keys = paths.iter().map(|p| PublicKey::load(p.as_ref())).collect::<Result<Vec<_>>>()?;
        Ok(Self::new(keys, required))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn required(&self) -> usize {
        self.required
    }

    pub(crate) fn find(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.id() == *id)
    }
}
