//! The bundle container: magic, manifest, signatures, then the payload.

use std::io::{Read, Write};
use std::path::Path;

use crate::keys::KeyId;
use crate::{io_err, Error, Manifest, Result, SecretKey, FORMAT_VERSION};

/// The first seven bytes of every bundle; the eighth is the format version.
pub const MAGIC: &[u8; 7] = b"CVYBNDL";
const MAX_SIGNATURES: u16 = 16;

/// One signature over the manifest bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub key_id: KeyId,
    pub sig: [u8; 64],
}

/// Everything before the payload. The manifest is kept as raw bytes until its signatures have
/// been checked: nothing parses unauthenticated input more than it must.
#[derive(Clone, Debug)]
pub struct Header {
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<Signature>,
    /// Where the payload starts in the file.
    pub payload_offset: u64,
}

impl Header {
    pub fn manifest(&self) -> Result<Manifest> {
        Manifest::from_canonical(&self.manifest_bytes)
    }
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Truncated(what),
        _ => Error::Read(e),
    })
}

/// Reads the header, leaving `r` at the first payload byte.
pub fn read_header<R: Read>(r: &mut R, max_manifest: u64) -> Result<Header> {
    let mut magic = [0u8; 8];
    read_exact(r, &mut magic, "header")?;
    if &magic[..7] != MAGIC {
        return Err(Error::BadMagic);
    }
    if magic[7] != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat(magic[7]));
    }
    let mut len = [0u8; 4];
    read_exact(r, &mut len, "manifest length")?;
    let len = u64::from(u32::from_le_bytes(len));
    if len > max_manifest {
        return Err(Error::ManifestTooLarge(len, max_manifest));
    }
    let mut manifest_bytes = vec![0u8; len as usize];
    read_exact(r, &mut manifest_bytes, "manifest")?;
    let mut count = [0u8; 2];
    read_exact(r, &mut count, "signature count")?;
    let count = u16::from_le_bytes(count);
    if count > MAX_SIGNATURES {
        return Err(Error::Limit(format!("{count} signatures, at most {MAX_SIGNATURES} allowed")));
    }
    let mut signatures = Vec::with_capacity(count.into());
    for _ in 0..count {
        let mut rec = [0u8; 72];
        read_exact(r, &mut rec, "signature")?;
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&rec[..8]);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&rec[8..]);
        signatures.push(Signature { key_id: KeyId(key_id), sig });
    }
    let payload_offset = 8 + 4 + len + 2 + 72 * u64::from(count);
    Ok(Header { manifest_bytes, signatures, payload_offset })
}

/// Writes a header.
pub fn write_header<W: Write>(w: &mut W, manifest: &[u8], signatures: &[Signature]) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&[FORMAT_VERSION])?;
    let len = u32::try_from(manifest.len()).map_err(|_| std::io::Error::other("manifest too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(manifest)?;
    let count = u16::try_from(signatures.len()).map_err(|_| std::io::Error::other("too many signatures"))?;
    w.write_all(&count.to_le_bytes())?;
    for s in signatures {
        w.write_all(&s.key_id.0)?;
        w.write_all(&s.sig)?;
    }
    Ok(())
}

/// Adds a signature by `key` to the bundle at `path`, replacing the file atomically. Signing
/// twice with the same key changes nothing.
pub fn add_signature(path: &Path, key: &SecretKey) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let header = read_header(&mut f, u64::from(u32::MAX))?;
    header.manifest()?;
    let id = key.public().id();
    if header.signatures.iter().any(|s| s.key_id == id) {
        return Ok(());
    }
    let mut signatures = header.signatures.clone();
    signatures.push(Signature { key_id: id, sig: key.sign(&header.manifest_bytes) });
    convoy_base::files::replace_with(path, false, |tmp| {
        write_header(tmp, &header.manifest_bytes, &signatures)?;
        std::io::copy(&mut f, tmp).map(drop)
    })?;
    Ok(())
}
