//! The unpacker must never panic or write outside its destination, whatever the bytes.
//!
//! The fuzzer's bytes are used twice. Read as a whole bundle, they exercise the header and
//! manifest parsers. Read as a tar stream, they become the payload of a bundle this target
//! assembles around them: a manifest describing the entries as well as the stream can be read,
//! signed with a fixed test key that the trust store accepts. Without that signature almost every
//! input would stop at the signature check and never reach the payload checks or the writes.
#![no_main]

use std::io::Read;
use std::path::Path;

use convoy_bundle::{
    EntryKind, FileEntry, Limits, Manifest, PayloadInfo, ReleaseConfig, SecretKey, TrustStore, FORMAT_VERSION,
};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// A fixed signing key, so runs are reproducible. It guards nothing: only this target trusts it.
const TEST_KEY: &str = "convoy-ed25519-secret:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// Describes a tar stream's entries as manifest entries, in stream order, as far as the stream
/// can be read. The unpacker then checks the very same bytes against this description, so
/// disagreements come from the tar parser's edge cases, which are what is being fuzzed.
fn describe(tar_bytes: &[u8]) -> Vec<FileEntry> {
    let mut files = Vec::new();
    let mut archive = tar::Archive::new(tar_bytes);
    let Ok(entries) = archive.entries() else { return files };
    for entry in entries {
        let Ok(mut entry) = entry else { break };
        let raw = entry.path_bytes().into_owned();
        let path = String::from_utf8_lossy(&raw);
        let path = path.strip_suffix('/').unwrap_or(&path).to_owned();
        let mode = entry.header().mode().unwrap_or(0) & 0o777;
        let kind = match entry.header().entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            // Hardlinks, devices and the like are listed as files: the unpacker must refuse
            // them for what they are, not because the manifest disagrees.
            _ => EntryKind::File,
        };
        let mut f = FileEntry { path, kind, mode, size: 0, sha256: None, target: None };
        match kind {
            EntryKind::Dir => {}
            EntryKind::Symlink => {
                let target = entry.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned());
                f.target = Some(target.unwrap_or_default());
            }
            EntryKind::File => {
                let mut hasher = Sha256::new();
                let mut buf = [0u8; 8192];
                loop {
                    match entry.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            f.size += n as u64;
                        }
                    }
                }
                f.sha256 = Some(hex::encode(hasher.finalize()));
            }
        }
        files.push(f);
    }
    files
}

/// A bundle may ship read-only directories; restore access so the scratch directory can go.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            // A directory that stays read-only only leaks a temporary directory, never a finding.
            if std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o755)).is_ok() {
                make_removable(&entry.path());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_unpacked_bytes: 16 << 20, ..Default::default() };
    // Only a panic would be a finding here; which error the raw bytes earn does not matter.
    let _ = convoy_bundle::verify_reader(data, None, &limits);

    let key = SecretKey::parse(TEST_KEY).expect("the fixed test key parses");
    let trust = TrustStore::new(vec![key.public()], 1);
    let Ok(payload) = zstd::bulk::compress(data, 1) else { return };
    let files = describe(data);
    let manifest = Manifest {
        format: FORMAT_VERSION,
        app: "fuzz".into(),
        version: "1.0.0".into(),
        created_at: 0,
        payload: PayloadInfo { sha256: hex::encode(Sha256::digest(&payload)), size: payload.len() as u64 },
        unpacked_size: files.iter().map(|f| f.size).fold(0u64, u64::saturating_add),
        files,
        config: ReleaseConfig::default(),
        target: None,
    };
    let manifest_bytes = manifest.to_canonical();
    let mut bundle = Vec::with_capacity(manifest_bytes.len() + payload.len() + 128);
    if convoy_bundle::write_header(&mut bundle, &manifest_bytes, &[key.sign_manifest(&manifest_bytes)])
        .is_err()
    {
        return;
    }
    bundle.extend_from_slice(&payload);

    // Only a panic would be a finding; verify may refuse what unpack refuses for its own reasons.
    let _ = convoy_bundle::verify_reader(bundle.as_slice(), Some(&trust), &limits);

    let Ok(tmp) = tempfile::tempdir() else { return };
    let path = tmp.path().join("b");
    if std::fs::write(&path, &bundle).is_err() {
        return;
    }
    let dest = tmp.path().join("out");
    match convoy_bundle::unpack(&path, &trust, &dest, &limits) {
        Ok(v) => {
            assert_eq!(v.manifest, manifest, "unpack reported a manifest other than the one signed");
            assert!(dest.is_dir());
        }
        Err(_) => assert!(!dest.exists(), "a failed unpack left its destination behind"),
    }
    // Nothing appeared beside the bundle and the destination.
    let mut beside: Vec<_> = std::fs::read_dir(tmp.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    beside.sort();
    assert!(beside.iter().all(|n| n == "b" || n == "out"), "unpack wrote beside its destination: {beside:?}");
    make_removable(&dest);
});
