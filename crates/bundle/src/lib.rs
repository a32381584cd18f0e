//! Convoy's release bundle: one file that carries a signed manifest and the release's files.
//!
//! ```text
//! magic "CVYBNDL" + format byte | manifest length (u32 LE) | manifest (canonical JSON)
//! | signature count (u16 LE) | signatures (key id, ed25519 signature) | payload (zstd tar)
//! ```
//!
//! Metadata comes before payload, so a reader knows and checks everything before reading a
//! payload byte. The manifest pins the SHA-256 and size of the payload and of every file; the
//! unpacker streams the payload once, refuses anything the manifest does not describe exactly,
//! and leaves nothing behind on failure. See `docs/bundle-format.md`.
//!
//! This crate is synchronous and pure: no tokio, no network. Callers in async code run it on a
//! blocking thread.

#![forbid(unsafe_code)]

mod build;
mod config;
mod format;
mod keys;
mod manifest;
mod unpack;

use std::path::PathBuf;

pub use build::{build, BuildOptions};
pub use config::{Health, HealthCheck, Hooks, ReleaseConfig, Service, CONFIG_FILE};
pub use format::{add_signature, read_header, write_header, Header, Signature, MAGIC};
pub use keys::{KeyId, PublicKey, SecretKey, TrustStore};
pub use manifest::{
    check_app as check_app_name, check_version, EntryKind, FileEntry, Manifest, PayloadInfo, Target,
    FORMAT_VERSION,
};
pub use unpack::{
    make_tree_writable, unpack, verify, verify_header, verify_reader, verify_tree, Limits, Verified,
};

/// Everything that can be wrong with a bundle, a key or a release directory. Each variant names
/// the specific problem, so an operator reading the error knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("I/O error while reading the bundle: {0}")]
    Read(#[source] std::io::Error),
    #[error("not a Convoy bundle (bad magic bytes)")]
    BadMagic,
    #[error("unsupported bundle format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedFormat(u8),
    #[error("bundle is truncated: {0}")]
    Truncated(&'static str),
    #[error("manifest is {0} bytes, more than the {1}-byte limit")]
    ManifestTooLarge(u64, u64),
    #[error("manifest is malformed: {0}")]
    BadManifest(String),
    #[error("manifest is not in canonical form")]
    NonCanonicalManifest,
    #[error("no trusted release keys are configured: refusing every bundle")]
    NoTrustedKeys,
    #[error("bundle carries no signature")]
    Unsigned,
    #[error("signature by key {0} does not verify")]
    BadSignature(KeyId),
    #[error("bundle needs {required} valid signature(s) from distinct trusted keys, found {found} (signers: {signers})")]
    NotEnoughSignatures { required: usize, found: usize, signers: String },
    #[error("bad key file {path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("convoy.toml: {0}")]
    Config(String),
    #[error("release directory: {0}")]
    BadSource(String),
    #[error("payload digest mismatch: manifest says {expected}, payload is {actual}")]
    PayloadDigest { expected: String, actual: String },
    #[error("payload size mismatch: manifest says {expected} bytes, payload is {actual}")]
    PayloadSize { expected: u64, actual: u64 },
    #[error("payload is not a valid zstd tar stream: {0}")]
    BadPayload(String),
    #[error("unsafe path {path:?} in payload: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error("entry {path:?} is a {kind}, which bundles may not contain")]
    ForbiddenEntry { path: String, kind: &'static str },
    #[error("entry {0:?} has the setuid, setgid or sticky bit")]
    SpecialMode(String),
    #[error("entry {path:?} has mode {actual:o}, manifest says {expected:o}")]
    ModeMismatch { path: String, expected: u32, actual: u32 },
    #[error("symlink {path:?} points to {target:?}, outside the release directory")]
    SymlinkEscape { path: String, target: String },
    #[error(
        "symlink {path:?} -> {target:?} does not resolve: it loops or nests more than {max} links deep",
        max = manifest::MAX_SYMLINK_HOPS
    )]
    SymlinkLoop { path: String, target: String },
    #[error("entry {path:?} would be written through symlink {link:?}")]
    ThroughSymlink { path: String, link: String },
    #[error("duplicate entry {0:?} in payload")]
    Duplicate(String),
    #[error("payload entry {0:?} is not listed in the manifest")]
    Unlisted(String),
    #[error("manifest file {0:?} is missing from the payload")]
    Missing(String),
    #[error("entry {path:?} is a {actual} in the payload but a {expected} in the manifest")]
    KindMismatch { path: String, expected: &'static str, actual: &'static str },
    #[error("file {path:?} is {actual} bytes, manifest says {expected}")]
    SizeMismatch { path: String, expected: u64, actual: u64 },
    #[error("file {path:?} has sha256 {actual}, manifest says {expected}")]
    HashMismatch { path: String, expected: String, actual: String },
    #[error("symlink {path:?} points to {actual:?}, manifest says {expected:?}")]
    TargetMismatch { path: String, expected: String, actual: String },
    #[error("entry {path:?} has a PAX size of {pax} but a header size of {ustar}")]
    PaxSizeMismatch { path: String, pax: u64, ustar: u64 },
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("destination {0} already exists")]
    DestinationExists(PathBuf),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Whether `s` is a SHA-256 digest in lowercase hex: safe as a file name and a lookup key.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A string offered as a digest that is not SHA-256 in lowercase hex. It holds at most the
/// first 80 bytes of what was offered, since that may be anything a peer sent.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a SHA-256 digest in lowercase hex")]
pub struct BadDigest(pub String);

/// Checks that `digest` is SHA-256 in lowercase hex ([`is_sha256_hex`]), so it is safe as a file
/// name: the one check every crate applies to digests it is given.
pub fn check_digest(digest: &str) -> std::result::Result<(), BadDigest> {
    if is_sha256_hex(digest) {
        return Ok(());
    }
    let mut end = digest.len().min(80);
    while !digest.is_char_boundary(end) {
        end -= 1;
    }
    let shown = if end < digest.len() { format!("{}…", &digest[..end]) } else { digest.to_owned() };
    Err(BadDigest(shown))
}

impl From<convoy_base::files::Error> for Error {
    fn from(e: convoy_base::files::Error) -> Self {
        Error::Io { path: e.path, source: e.source }
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = build::Hashing::new(std::io::BufReader::with_capacity(256 << 10, f));
    std::io::copy(&mut h, &mut std::io::sink()).map_err(io_err(path))?;
    Ok(h.digest_hex())
}
