//! Build → verify → unpack round trips, reproducibility, extra signatures, and property tests.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use convoy_bundle::{add_signature, build, unpack, verify, BuildOptions, Limits, SecretKey, TrustStore};
use proptest::prelude::*;

fn opts(version: &str) -> BuildOptions {
    BuildOptions {
        app: "shop-api".into(),
        version: version.into(),
        created_at: 1_700_000_000,
        target: None,
        zstd_level: 3,
    }
}

fn sample_release(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("static/css")).unwrap();
    std::fs::write(dir.join("convoy.toml"), "[service]\ncommand = [\"bin/run\", \"--port\", \"${PORT}\"]\n[health]\ntcp = \"127.0.0.1:${PORT}\"\n").unwrap();
    std::fs::write(dir.join("bin/run"), "#!/bin/sh\nexit 0\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("bin/run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("css/site.css", dir.join("static/current.css")).unwrap();
    }
    std::fs::write(dir.join("static/css/site.css"), "body{}".repeat(1000)).unwrap();
    let long = format!("static/{}", "deep/".repeat(30));
    std::fs::create_dir_all(dir.join(&long)).unwrap();
    std::fs::write(dir.join(long).join("file-with-a-long-path.txt"), "far away").unwrap();
    std::fs::write(dir.join("empty"), "").unwrap();
}

fn sha256_file(p: &Path) -> String {
    convoy_bundle::sha256_file(p).unwrap()
}

#[test]
fn build_verify_unpack_round_trip_preserves_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_release(&src);
    let key = SecretKey::generate();
    let out = tmp.path().join("shop-api-1.0.0.bundle");
    let built = build(&src, &opts("1.0.0"), &key, &out).unwrap();
    assert!(built.config.service.is_some());
    let trust = TrustStore::new(vec![key.public()], 1);
    let v = verify(&out, Some(&trust), &Limits::default()).unwrap();
    assert_eq!(v.manifest, built);
    assert_eq!(v.bundle_sha256, sha256_file(&out), "the verify pass also hashes the whole file");
    assert_eq!(v.signed_by, vec![key.public().id()]);
    let dest = tmp.path().join("release");
    unpack(&out, &trust, &dest, &Limits::default()).unwrap();
    for f in &built.files {
        let (a, b) = (src.join(&f.path), dest.join(&f.path));
        match f.kind {
            convoy_bundle::EntryKind::File => {
                assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{}", f.path)
            }
            convoy_bundle::EntryKind::Symlink => {
                assert_eq!(std::fs::read_link(&a).unwrap(), std::fs::read_link(&b).unwrap())
            }
            convoy_bundle::EntryKind::Dir => assert!(b.is_dir()),
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Modes are normalised: executables 0755, the rest 0644.
        assert_eq!(std::fs::metadata(dest.join("bin/run")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::metadata(dest.join("empty")).unwrap().permissions().mode() & 0o777, 0o644);
    }
}

#[test]
fn builds_are_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_release(&src);
    let key = SecretKey::generate();
    let (a, b) = (tmp.path().join("a.bundle"), tmp.path().join("b.bundle"));
    build(&src, &opts("1.0.0"), &key, &a).unwrap();
    // Touch every file: mtimes must not leak into the bundle.
    std::fs::write(src.join("empty"), "").unwrap();
    build(&src, &opts("1.0.0"), &key, &b).unwrap();
    assert_eq!(sha256_file(&a), sha256_file(&b));
    let c = tmp.path().join("c.bundle");
    build(&src, &opts("1.0.1"), &key, &c).unwrap();
    assert_ne!(sha256_file(&a), sha256_file(&c));
}

#[test]
fn extra_signatures_satisfy_a_two_key_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_release(&src);
    let (k1, k2) = (SecretKey::generate(), SecretKey::generate());
    let out = tmp.path().join("b.bundle");
    build(&src, &opts("1.0.0"), &k1, &out).unwrap();
    let both = TrustStore::new(vec![k1.public(), k2.public()], 2);
    assert!(verify(&out, Some(&both), &Limits::default()).is_err());
    add_signature(&out, &k2).unwrap();
    let before = sha256_file(&out);
    add_signature(&out, &k2).unwrap();
    assert_eq!(before, sha256_file(&out), "signing twice with one key changes nothing");
    let v = verify(&out, Some(&both), &Limits::default()).unwrap();
    assert_eq!(v.signers.len(), 2);
    // Rotation: a store with only the new key accepts it too.
    assert!(verify(&out, Some(&TrustStore::new(vec![k2.public()], 1)), &Limits::default()).is_ok());
}

#[test]
fn a_header_assembled_with_sign_manifest_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_release(&src);
    let (k1, k2) = (SecretKey::generate(), SecretKey::generate());
    let out = tmp.path().join("b.bundle");
    build(&src, &opts("1.0.0"), &k1, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let mut reader = bytes.as_slice();
    let header = convoy_bundle::read_header(&mut reader, 1 << 20).unwrap();
    // Replace k1's signature by k2's, written by hand in front of the untouched payload.
    let mut resigned = Vec::new();
    let sig = k2.sign_manifest(&header.manifest_bytes);
    assert_eq!(sig.key_id, k2.public().id());
    convoy_bundle::write_header(&mut resigned, &header.manifest_bytes, &[sig]).unwrap();
    resigned.extend_from_slice(reader);
    let only_k2 = TrustStore::new(vec![k2.public()], 1);
    let v = convoy_bundle::verify_reader(resigned.as_slice(), Some(&only_k2), &Limits::default()).unwrap();
    assert_eq!(v.signers, vec![k2.public().id()]);
    let only_k1 = TrustStore::new(vec![k1.public()], 1);
    assert!(convoy_bundle::verify_reader(resigned.as_slice(), Some(&only_k1), &Limits::default()).is_err());
}

#[test]
fn key_files_round_trip_and_reject_garbage() {
    let key = SecretKey::generate();
    let again = SecretKey::parse(&key.to_text()).unwrap();
    assert_eq!(again.public(), key.public());
    let public = convoy_bundle::PublicKey::parse(&key.public().to_text()).unwrap();
    assert_eq!(public.id(), key.public().id());
    assert!(format!("{key:?}").contains("redacted"));
    for bad in ["", "convoy-ed25519:@@@", "convoy-ed25519:AAAA", "ssh-ed25519 AAAA"] {
        assert!(convoy_bundle::PublicKey::parse(bad).is_err(), "{bad}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Any tree of small files survives a round trip byte for byte.
    #[test]
    fn random_trees_round_trip(files in proptest::collection::btree_map("[a-z]{1,8}(/[a-z]{1,8}){0,2}", proptest::collection::vec(any::<u8>(), 0..2048), 1..12)) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("convoy.toml"), "").unwrap();
        let mut written = Vec::new();
        for (path, data) in &files {
            let p = src.join(path);
            // Skip paths that collide with an existing file or directory.
            if p.exists() || p.ancestors().skip(1).any(|a| a.is_file()) || path == "convoy.toml" {
                continue;
            }
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            written.push((path.clone(), data.clone()));
        }
        let key = SecretKey::generate();
        let out = tmp.path().join("b.bundle");
        build(&src, &opts("1.0.0"), &key, &out).unwrap();
        let dest = tmp.path().join("dest");
        unpack(&out, &TrustStore::new(vec![key.public()], 1), &dest, &Limits::default()).unwrap();
        for (path, data) in written {
            prop_assert_eq!(std::fs::read(dest.join(&path)).unwrap(), data);
        }
    }

    /// Corrupting any byte of a bundle never yields a different accepted tree: it is refused,
    /// and refusal leaves nothing behind.
    #[test]
    fn any_single_byte_corruption_is_refused(pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("convoy.toml"), "").unwrap();
        std::fs::write(src.join("data.txt"), "payload ".repeat(200)).unwrap();
        let key = SecretKey::generate();
        let out = tmp.path().join("b.bundle");
        build(&src, &opts("1.0.0"), &key, &out).unwrap();
        let mut bytes = std::fs::read(&out).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= flip;
        std::fs::write(&out, &bytes).unwrap();
        let dest = tmp.path().join("dest");
        let result = unpack(&out, &TrustStore::new(vec![key.public()], 1), &dest, &Limits::default());
        prop_assert!(result.is_err(), "byte {} flipped by {:#x} was accepted", i, flip);
        prop_assert!(!dest.exists());
    }
}

#[test]
fn verify_tree_detects_corruption_and_additions() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_release(&src);
    let key = SecretKey::generate();
    let out = tmp.path().join("b.bundle");
    let m = build(&src, &opts("1.0.0"), &key, &out).unwrap();
    let dest = tmp.path().join("release");
    unpack(&out, &TrustStore::new(vec![key.public()], 1), &dest, &Limits::default()).unwrap();
    convoy_bundle::verify_tree(&dest, &m).unwrap();
    std::fs::write(dest.join("static/css/site.css"), "tampered").unwrap();
    let err = convoy_bundle::verify_tree(&dest, &m).unwrap_err();
    assert!(matches!(err, convoy_bundle::Error::SizeMismatch { .. }), "{err:?}");
    std::fs::write(dest.join("static/css/site.css"), "body{}".repeat(1000).replace('b', "c")).unwrap();
    let err = convoy_bundle::verify_tree(&dest, &m).unwrap_err();
    assert!(matches!(err, convoy_bundle::Error::HashMismatch { .. }), "{err:?}");
    std::fs::write(dest.join("static/css/site.css"), "body{}".repeat(1000)).unwrap();
    convoy_bundle::verify_tree(&dest, &m).unwrap();
    std::fs::write(dest.join("intruder"), "x").unwrap();
    let err = convoy_bundle::verify_tree(&dest, &m).unwrap_err();
    assert!(matches!(err, convoy_bundle::Error::Unlisted(_)), "{err:?}");
}
