//! Hostile bundles, built byte by byte inside the test, each refused with a specific error, and
//! never a byte written outside the scratch directory.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

use convoy_bundle::{
    unpack, verify, BuildOptions, EntryKind, Error, FileEntry, Limits, Manifest, PayloadInfo, ReleaseConfig,
    SecretKey, Service, TrustStore,
};
use sha2::{Digest, Sha256};

/// One raw tar entry, with full control over every field.
#[derive(Clone)]
struct Raw {
    path: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    data: Vec<u8>,
    link: Vec<u8>,
    pax: Vec<(String, String)>,
    header_size: Option<u64>,
}

fn file(path: &str, data: &[u8]) -> Raw {
    Raw {
        path: path.into(),
        kind: tar::EntryType::Regular,
        mode: 0o644,
        data: data.into(),
        link: vec![],
        pax: vec![],
        header_size: None,
    }
}
fn dir(path: &str) -> Raw {
    Raw { kind: tar::EntryType::Directory, mode: 0o755, ..file(path, b"") }
}
fn link(path: &str, target: &str) -> Raw {
    Raw { kind: tar::EntryType::Symlink, mode: 0o777, link: target.into(), ..file(path, b"") }
}

fn header_bytes(path: &[u8], kind: tar::EntryType, mode: u32, size: u64, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().unwrap();
        g.name[..path.len()].copy_from_slice(path);
        g.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
}

fn tar_bytes(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if !e.pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &e.pax {
                let rest = format!(" {k}={v}\n");
                let mut len = rest.len() + 1;
                while format!("{len}{rest}").len() != len {
                    len += 1;
                }
                body.extend_from_slice(format!("{len}{rest}").as_bytes());
            }
            out.extend(header_bytes(b"PaxHeader", tar::EntryType::XHeader, 0o644, body.len() as u64, b""));
            out.extend(body);
            pad(&mut out);
        }
        let size = e.header_size.unwrap_or(e.data.len() as u64);
        out.extend(header_bytes(&e.path, e.kind, e.mode, size, &e.link));
        out.extend(&e.data);
        pad(&mut out);
    }
    out.extend([0u8; 1024]);
    out
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn entry(path: &str, kind: EntryKind, data: &[u8], target: Option<&str>) -> FileEntry {
    let mode = match kind {
        EntryKind::File => 0o644,
        EntryKind::Dir => 0o755,
        EntryKind::Symlink => 0o777,
    };
    let is_file = kind == EntryKind::File;
    FileEntry {
        path: path.into(),
        kind,
        mode,
        size: if is_file { data.len() as u64 } else { 0 },
        sha256: is_file.then(|| sha(data)),
        target: target.map(String::from),
    }
}

fn manifest_for(files: Vec<FileEntry>, payload: &[u8]) -> Manifest {
    let unpacked_size = files.iter().map(|f| f.size).sum();
    Manifest {
        format: 1,
        app: "shop-api".into(),
        version: "1.0.0".into(),
        created_at: 0,
        payload: PayloadInfo { sha256: sha(payload), size: payload.len() as u64 },
        unpacked_size,
        files,
        config: ReleaseConfig::default(),
        target: None,
    }
}

fn bundle_bytes(manifest: &Manifest, payload: &[u8], keys: &[&SecretKey]) -> Vec<u8> {
    let bytes = manifest.to_canonical();
    let mut out = Vec::new();
    out.extend(b"CVYBNDL\x01");
    out.extend((bytes.len() as u32).to_le_bytes());
    out.extend(&bytes);
    out.extend((keys.len() as u16).to_le_bytes());
    for k in keys {
        out.extend(k.public().id().0);
        out.extend(sign(k, &bytes));
    }
    out.extend(payload);
    out
}

/// Signs manifest bytes the way the format does (the test checks the format from outside).
fn sign(key: &SecretKey, manifest: &[u8]) -> [u8; 64] {
    use ed25519_dalek::Signer;
    let text = key.to_text();
    let seed = base64_decode(text.trim().strip_prefix("convoy-ed25519-secret:").unwrap());
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed.try_into().unwrap());
    let mut msg = b"convoy bundle manifest v1\0".to_vec();
    msg.extend_from_slice(manifest);
    sk.sign(&msg).to_bytes()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A bundle whose manifest lists `files` and whose payload holds `entries`.
fn hostile(files: Vec<FileEntry>, entries: &[Raw], key: &SecretKey) -> Vec<u8> {
    let payload = zstd(&tar_bytes(entries));
    bundle_bytes(&manifest_for(files, &payload), &payload, &[key])
}

struct Case {
    name: &'static str,
    bundle: Vec<u8>,
    trust: TrustStore,
    limits: Limits,
    expect: fn(&Error) -> bool,
}

fn assert_scratch_clean(scratch: &Path) {
    let left: Vec<_> = std::fs::read_dir(scratch).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "scratch dir not clean: {left:?}");
}

#[test]
fn hostile_bundles_are_refused_specifically_and_leave_nothing() {
    let key = SecretKey::generate();
    let other = SecretKey::generate();
    let trust = TrustStore::new(vec![key.public()], 1);
    let tight = |f: fn(&mut Limits)| {
        let mut l = Limits::default();
        f(&mut l);
        l
    };
    let good_files = vec![entry("a.txt", EntryKind::File, b"hello", None)];
    let good_entries = vec![file("a.txt", b"hello")];
    let good = hostile(good_files.clone(), &good_entries, &key);
    let manifest_len = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    let payload_start = 12 + manifest_len + 2 + 72;

    let b_files = vec![entry("b.txt", EntryKind::File, b"other release", None)];
    let release_b = hostile(b_files, &[file("b.txt", b"other release")], &key);
    let mut a_with_b_payload = good[..payload_start].to_vec();
    a_with_b_payload.extend(
        &release_b[u32::from_le_bytes(release_b[8..12].try_into().unwrap()) as usize + 12 + 2 + 72..],
    );

    let mut flipped_payload = good.clone();
    let last = flipped_payload.len() - 3;
    flipped_payload[last] ^= 0x01;
    let mut flipped_manifest = good.clone();
    flipped_manifest[20] ^= 0x01;
    let truncated = good[..good.len() - 5].to_vec();

    let big = vec![0u8; 4 << 20];
    let cases = vec![
        Case {
            name: "absolute path",
            bundle: hostile(good_files.clone(), &[file("/etc/passwd", b"hello")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::UnsafePath { reason: "absolute path", .. }),
        },
        Case {
            name: "dot-dot path",
            bundle: hostile(good_files.clone(), &[file("../a.txt", b"hello")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::UnsafePath { reason: "'..' component", .. }),
        },
        Case {
            name: "symlink out of the release",
            bundle: hostile(
                vec![entry("l", EntryKind::Symlink, b"", Some("x"))],
                &[link("l", "../../etc")],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SymlinkEscape { .. }),
        },
        Case {
            name: "absolute symlink",
            bundle: hostile(vec![entry("l", EntryKind::Symlink, b"", Some("x"))], &[link("l", "/etc")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SymlinkEscape { .. }),
        },
        Case {
            name: "symlink chain: each link inside, the chain out",
            bundle: hostile(
                vec![
                    entry("d", EntryKind::Dir, b"", None),
                    entry("d/e", EntryKind::Dir, b"", None),
                    entry("d/e/up", EntryKind::Symlink, b"", Some("../..")),
                    entry("x", EntryKind::Symlink, b"", Some("d/e/up/../../secret")),
                ],
                &[dir("d"), dir("d/e"), link("d/e/up", "../.."), link("x", "d/e/up/../../secret")],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SymlinkEscape { path, .. } if path == "x"),
        },
        Case {
            name: "symlink chain through a directory link that arrives later",
            bundle: hostile(
                vec![
                    entry("b", EntryKind::Symlink, b"", Some("z/dirlink/..")),
                    entry("z", EntryKind::Dir, b"", None),
                    entry("z/dirlink", EntryKind::Symlink, b"", Some("..")),
                ],
                &[link("b", "z/dirlink/.."), dir("z"), link("z/dirlink", "..")],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SymlinkEscape { path, .. } if path == "b"),
        },
        Case {
            name: "symlink chain: a link to the root, then up",
            bundle: hostile(
                vec![
                    entry("a", EntryKind::Symlink, b"", Some("b/../secret")),
                    entry("b", EntryKind::Symlink, b"", Some(".")),
                ],
                &[link("a", "b/../secret"), link("b", ".")],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SymlinkEscape { path, .. } if path == "a"),
        },
        Case {
            name: "symlink loop",
            bundle: hostile(
                vec![
                    entry("a", EntryKind::Symlink, b"", Some("b")),
                    entry("b", EntryKind::Symlink, b"", Some("a")),
                ],
                &[link("a", "b"), link("b", "a")],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SymlinkLoop { .. }),
        },
        Case {
            name: "signed manifest with a service user build would refuse",
            bundle: {
                let p = zstd(&tar_bytes(&good_entries));
                let mut m = manifest_for(good_files.clone(), &p);
                m.config.service = Some(Service {
                    command: vec!["bin/run".into()],
                    env: Default::default(),
                    stop_signal: "SIGTERM".into(),
                    stop_timeout: std::time::Duration::from_secs(10),
                    user: Some("root;rm".into()),
                    group: None,
                });
                bundle_bytes(&m, &p, &[&key])
            },
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::Config(m) if m.contains("service.user")),
        },
        Case {
            name: "write through an earlier symlink",
            bundle: hostile(
                vec![
                    entry("d", EntryKind::Symlink, b"", Some("e")),
                    entry("d/x", EntryKind::File, b"hi", None),
                    entry("e", EntryKind::Dir, b"", None),
                ],
                &[link("d", "e"), file("d/x", b"hi"), dir("e")],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::ThroughSymlink { .. }),
        },
        Case {
            name: "hardlink",
            bundle: hostile(
                good_files.clone(),
                &[Raw { kind: tar::EntryType::Link, link: b"x".to_vec(), ..file("a.txt", b"") }],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::ForbiddenEntry { kind: "hardlink", .. }),
        },
        Case {
            name: "device file",
            bundle: hostile(
                good_files.clone(),
                &[Raw { kind: tar::EntryType::Char, ..file("a.txt", b"") }],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::ForbiddenEntry { kind: "device file", .. }),
        },
        Case {
            name: "fifo",
            bundle: hostile(
                good_files.clone(),
                &[Raw { kind: tar::EntryType::Fifo, ..file("a.txt", b"") }],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::ForbiddenEntry { kind: "FIFO", .. }),
        },
        Case {
            name: "setuid",
            bundle: hostile(good_files.clone(), &[Raw { mode: 0o4755, ..file("a.txt", b"hello") }], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SpecialMode(_)),
        },
        Case {
            name: "setgid",
            bundle: hostile(good_files.clone(), &[Raw { mode: 0o2755, ..file("a.txt", b"hello") }], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SpecialMode(_)),
        },
        Case {
            name: "duplicate name",
            bundle: hostile(good_files.clone(), &[file("a.txt", b"hello"), file("a.txt", b"hello")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::Duplicate(_)),
        },
        Case {
            name: "entry not in manifest",
            bundle: hostile(good_files.clone(), &[file("a.txt", b"hello"), file("z.txt", b"x")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::Unlisted(p) if p == "z.txt"),
        },
        Case {
            name: "manifest file missing",
            bundle: hostile(
                vec![
                    entry("a.txt", EntryKind::File, b"hello", None),
                    entry("b.txt", EntryKind::File, b"x", None),
                ],
                &good_entries,
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::Missing(p) if p == "b.txt"),
        },
        Case {
            name: "wrong file content",
            bundle: hostile(good_files.clone(), &[file("a.txt", b"HELLO")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::HashMismatch { .. }),
        },
        Case {
            name: "wrong file size",
            bundle: hostile(good_files.clone(), &[file("a.txt", b"hello!")], &key),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SizeMismatch { .. }),
        },
        Case {
            name: "PAX size disagrees with the ustar size",
            bundle: hostile(
                good_files.clone(),
                &[Raw { pax: vec![("size".into(), "3".into())], ..file("a.txt", b"hello") }],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::PaxSizeMismatch { pax: 3, ustar: 5, .. }),
        },
        Case {
            name: "small payload claims a huge file",
            bundle: hostile(
                good_files.clone(),
                &[Raw { header_size: Some(1 << 40), ..file("a.txt", b"hello") }],
                &key,
            ),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::SizeMismatch { .. }),
        },
        Case {
            name: "payload expands past the byte cap",
            bundle: hostile(vec![entry("big", EntryKind::File, &big, None)], &[file("big", &big)], &key),
            trust: trust.clone(),
            limits: tight(|l| l.max_unpacked_bytes = 1 << 20),
            expect: |e| matches!(e, Error::Limit(_)),
        },
        Case {
            name: "too many entries",
            bundle: hostile(
                vec![entry("a", EntryKind::Dir, b"", None), entry("b", EntryKind::Dir, b"", None)],
                &[dir("a"), dir("b")],
                &key,
            ),
            trust: trust.clone(),
            limits: tight(|l| l.max_entries = 1),
            expect: |e| matches!(e, Error::Limit(_)),
        },
        Case {
            name: "path too long",
            bundle: hostile(
                vec![entry(&"p".repeat(90), EntryKind::Dir, b"", None)],
                &[dir(&"p".repeat(90))],
                &key,
            ),
            trust: trust.clone(),
            limits: tight(|l| l.max_path_len = 64),
            expect: |e| matches!(e, Error::Limit(_)),
        },
        Case {
            name: "zstd window larger than allowed",
            bundle: {
                let t = tar_bytes(&[file("big", &big)]);
                let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
                enc.long_distance_matching(true).unwrap();
                enc.window_log(23).unwrap();
                enc.write_all(&t).unwrap();
                let payload = enc.finish().unwrap();
                bundle_bytes(
                    &manifest_for(vec![entry("big", EntryKind::File, &big, None)], &payload),
                    &payload,
                    &[&key],
                )
            },
            trust: trust.clone(),
            limits: tight(|l| l.zstd_window_log_max = 20),
            expect: |e| matches!(e, Error::BadPayload(m) if m.contains("indow") || m.contains("emory")),
        },
        Case {
            name: "truncated payload",
            bundle: truncated,
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::PayloadSize { .. }),
        },
        Case {
            name: "one flipped payload byte",
            bundle: flipped_payload,
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::PayloadDigest { .. }),
        },
        Case {
            name: "one flipped manifest byte",
            bundle: flipped_manifest,
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::BadSignature(_)),
        },
        Case {
            name: "manifest of A, payload of B",
            bundle: a_with_b_payload,
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::PayloadDigest { .. } | Error::PayloadSize { .. }),
        },
        Case {
            name: "valid signature from an untrusted key",
            bundle: hostile(good_files.clone(), &good_entries, &other),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::NotEnoughSignatures { required: 1, found: 0, .. }),
        },
        Case {
            name: "no trusted keys at all",
            bundle: good.clone(),
            trust: TrustStore::new(vec![], 1),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::NoTrustedKeys),
        },
        Case {
            name: "unsigned",
            bundle: {
                let p = zstd(&tar_bytes(&good_entries));
                bundle_bytes(&manifest_for(good_files.clone(), &p), &p, &[])
            },
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::Unsigned),
        },
        Case {
            name: "second signature required",
            bundle: good.clone(),
            trust: TrustStore::new(vec![key.public(), other.public()], 2),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::NotEnoughSignatures { required: 2, found: 1, .. }),
        },
        Case {
            name: "not a bundle",
            bundle: b"PK\x03\x04 a zip file".to_vec(),
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::BadMagic),
        },
        Case {
            name: "empty file",
            bundle: vec![],
            trust: trust.clone(),
            limits: Limits::default(),
            expect: |e| matches!(e, Error::Truncated(_)),
        },
    ];

    let tmp = tempfile::tempdir().unwrap();
    for case in cases {
        let bundles = tmp.path().join("bundles");
        let scratch = tmp.path().join("scratch");
        std::fs::create_dir_all(&bundles).unwrap();
        std::fs::create_dir_all(&scratch).unwrap();
        let path = bundles.join("hostile.bundle");
        std::fs::write(&path, &case.bundle).unwrap();
        let err = unpack(&path, &case.trust, &scratch.join("release"), &case.limits)
            .map(|_| ())
            .expect_err(case.name);
        assert!((case.expect)(&err), "{}: unexpected error {err:?}", case.name);
        assert!(!err.to_string().is_empty());
        assert_scratch_clean(&scratch);
        let verified = verify(&path, Some(&case.trust), &case.limits);
        assert!(verified.is_err(), "{}: verify accepted it", case.name);
        std::fs::remove_dir_all(&scratch).unwrap();
    }
    // The good bundle itself passes, so the cases above fail for their own reason.
    let path = tmp.path().join("good.bundle");
    std::fs::write(&path, &good).unwrap();
    let v = unpack(&path, &trust, &tmp.path().join("ok"), &Limits::default()).unwrap();
    assert_eq!(v.signers, vec![key.public().id()]);
    assert_eq!(std::fs::read(tmp.path().join("ok/a.txt")).unwrap(), b"hello");
}

#[test]
fn unpack_refuses_an_existing_destination_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let path = tmp.path().join("b.bundle");
    std::fs::write(
        &path,
        hostile(vec![entry("a.txt", EntryKind::File, b"hello", None)], &[file("a.txt", b"hello")], &key),
    )
    .unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep"), b"mine").unwrap();
    let err = unpack(&path, &TrustStore::new(vec![key.public()], 1), &dest, &Limits::default()).unwrap_err();
    assert!(matches!(err, Error::DestinationExists(_)), "{err:?}");
    assert_eq!(std::fs::read(dest.join("keep")).unwrap(), b"mine");
}

#[test]
fn build_refuses_bad_release_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let opts = BuildOptions {
        app: "shop-api".into(),
        version: "1.0.0".into(),
        created_at: 0,
        target: None,
        zstd_level: 3,
    };
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let out = tmp.path().join("out.bundle");
    let err = convoy_bundle::build(&src, &opts, &key, &out).unwrap_err();
    assert!(err.to_string().contains("has no convoy.toml"), "{err}");
    std::fs::write(src.join("convoy.toml"), "[service]\ncommand = []\n").unwrap();
    let err = convoy_bundle::build(&src, &opts, &key, &out).unwrap_err();
    assert!(err.to_string().contains("service.command"), "{err}");
    std::fs::write(src.join("convoy.toml"), "").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/etc/passwd", src.join("escape")).unwrap();
        let err = convoy_bundle::build(&src, &opts, &key, &out).unwrap_err();
        assert!(matches!(err, Error::SymlinkEscape { .. }), "{err:?}");
        std::fs::remove_file(src.join("escape")).unwrap();
        // Each link looks inside on its own; together they lead out, so build refuses them.
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::os::unix::fs::symlink("../..", src.join("d/e/up")).unwrap();
        std::os::unix::fs::symlink("d/e/up/../../secret", src.join("x")).unwrap();
        let err = convoy_bundle::build(&src, &opts, &key, &out).unwrap_err();
        assert!(matches!(&err, Error::SymlinkEscape { path, .. } if path == "x"), "{err:?}");
        std::fs::remove_file(src.join("x")).unwrap();
        std::fs::remove_dir_all(src.join("d")).unwrap();
    }
    for (app, version, want) in [("Shop API", "1.0.0", "app"), ("shop-api", "latest", "semantic version")] {
        let o = BuildOptions { app: app.into(), version: version.into(), ..opts.clone() };
        let err = convoy_bundle::build(&src, &o, &key, &out).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("src")]);
}

#[test]
fn symlink_chains_that_stay_inside_unpack() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let files = vec![
        entry("a.txt", EntryKind::File, b"hello", None),
        entry("d", EntryKind::Dir, b"", None),
        entry("d/e", EntryKind::Dir, b"", None),
        entry("d/e/up", EntryKind::Symlink, b"", Some("../..")),
        entry("x", EntryKind::Symlink, b"", Some("d/e/up/a.txt")),
    ];
    let entries =
        [file("a.txt", b"hello"), dir("d"), dir("d/e"), link("d/e/up", "../.."), link("x", "d/e/up/a.txt")];
    let path = tmp.path().join("b.bundle");
    std::fs::write(&path, hostile(files, &entries, &key)).unwrap();
    let dest = tmp.path().join("release");
    let v = unpack(&path, &TrustStore::new(vec![key.public()], 1), &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"hello");
    convoy_bundle::verify_tree(&dest, &v.manifest).unwrap();
}

/// A kept release is re-verified against a manifest the agent holds in memory; that check must
/// refuse an escaping chain even if the directory matches the manifest exactly.
#[cfg(unix)]
#[test]
fn verify_tree_refuses_escaping_symlink_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    let dir_path = scratch.join("release");
    std::fs::create_dir_all(dir_path.join("d/e")).unwrap();
    std::os::unix::fs::symlink("../..", dir_path.join("d/e/up")).unwrap();
    std::os::unix::fs::symlink("d/e/up/../../secret", dir_path.join("x")).unwrap();
    let files = vec![
        entry("d", EntryKind::Dir, b"", None),
        entry("d/e", EntryKind::Dir, b"", None),
        entry("d/e/up", EntryKind::Symlink, b"", Some("../..")),
        entry("x", EntryKind::Symlink, b"", Some("d/e/up/../../secret")),
    ];
    let m = manifest_for(files, b"");
    let err = convoy_bundle::verify_tree(&dir_path, &m).unwrap_err();
    assert!(matches!(&err, Error::SymlinkEscape { path, .. } if path == "x"), "{err:?}");

    std::fs::remove_file(dir_path.join("x")).unwrap();
    std::os::unix::fs::symlink("y", dir_path.join("x")).unwrap();
    std::os::unix::fs::symlink("x", dir_path.join("y")).unwrap();
    let files = vec![
        entry("d", EntryKind::Dir, b"", None),
        entry("d/e", EntryKind::Dir, b"", None),
        entry("d/e/up", EntryKind::Symlink, b"", Some("../..")),
        entry("x", EntryKind::Symlink, b"", Some("y")),
        entry("y", EntryKind::Symlink, b"", Some("x")),
    ];
    let err = convoy_bundle::verify_tree(&dir_path, &manifest_for(files, b"")).unwrap_err();
    assert!(matches!(err, Error::SymlinkLoop { .. }), "{err:?}");
    // Nothing beside the release directory was created by either check.
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("release")]);
}

/// Runs `verify_tree` on a thread of its own and fails the test if it does not return in time.
#[cfg(target_os = "linux")]
fn verify_tree_promptly(dir: &Path, manifest: &Manifest) -> Result<(), Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (dir, manifest) = (dir.to_path_buf(), manifest.clone());
    std::thread::spawn(move || tx.send(convoy_bundle::verify_tree(&dir, &manifest)).unwrap());
    rx.recv_timeout(std::time::Duration::from_secs(20)).expect("verify_tree hung")
}

#[cfg(target_os = "linux")]
fn mkfifo(path: &Path) {
    use rustix::fs::{FileType, Mode, CWD};
    rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
}

#[cfg(target_os = "linux")]
fn write_mode(path: &Path, data: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A kept release is re-verified as root while its service may change it: a FIFO in a listed
/// file's place must not hang the check, and a link must not be followed even to a file that
/// would match.
#[cfg(target_os = "linux")]
#[test]
fn verify_tree_refuses_a_fifo_or_a_link_in_a_files_place() {
    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("release");
    std::fs::create_dir_all(&release).unwrap();
    let a = release.join("a");
    write_mode(&a, b"content", 0o644);
    let m = manifest_for(vec![entry("a", EntryKind::File, b"content", None)], b"");
    verify_tree_promptly(&release, &m).unwrap();

    std::fs::remove_file(&a).unwrap();
    mkfifo(&a);
    let err = verify_tree_promptly(&release, &m).unwrap_err();
    assert!(matches!(&err, Error::ForbiddenEntry { path, .. } if path == "a"), "{err:?}");

    // The outside file matches the manifest exactly, so only not following the link refuses it.
    let outside = tmp.path().join("outside");
    write_mode(&outside, b"content", 0o644);
    std::fs::remove_file(&a).unwrap();
    std::os::unix::fs::symlink(&outside, &a).unwrap();
    let err = verify_tree_promptly(&release, &m).unwrap_err();
    assert!(matches!(err, Error::KindMismatch { actual: "symlink", .. }), "{err:?}");

    // A link to a FIFO would block whoever follows it.
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    std::fs::remove_file(&a).unwrap();
    std::os::unix::fs::symlink(&fifo, &a).unwrap();
    let err = verify_tree_promptly(&release, &m).unwrap_err();
    assert!(matches!(err, Error::KindMismatch { actual: "symlink", .. }), "{err:?}");
}

/// The same, with the file swapped while the check runs: whatever is in place when a file is
/// opened is what gets checked, so a swap between looking at the path and opening it cannot
/// make the check follow a link to a FIFO or open a FIFO and block.
#[cfg(target_os = "linux")]
#[test]
fn verify_tree_is_not_fooled_by_a_file_swapped_while_it_runs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("release");
    std::fs::create_dir_all(&release).unwrap();
    let a = release.join("a");
    write_mode(&a, b"content", 0o644);
    let m = manifest_for(vec![entry("a", EntryKind::File, b"content", None)], b"");

    let stage = tmp.path().join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    write_mode(&stage.join("file"), b"content", 0o644);
    mkfifo(&stage.join("fifo"));
    mkfifo(&tmp.path().join("outside-fifo"));
    std::os::unix::fs::symlink(tmp.path().join("outside-fifo"), stage.join("link")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stage, a, stop) = (stage.clone(), a.clone(), stop.clone());
        std::thread::spawn(move || {
            let next = stage.join("next");
            for src in ["file", "link", "fifo"].iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::fs::hard_link(stage.join(src), &next).unwrap();
                std::fs::rename(&next, &a).unwrap();
            }
        })
    };
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (release, m, stop) = (release.clone(), m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Any outcome but a hang is fine here: which object is in place is chance.
                let _outcome = convoy_bundle::verify_tree(&release, &m);
                rounds += 1;
            }
            tx.send(rounds).unwrap();
        });
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let rounds = rx.recv_timeout(std::time::Duration::from_secs(20));
    assert!(rounds.is_ok(), "verify_tree hung on a file swapped while it ran");
}
