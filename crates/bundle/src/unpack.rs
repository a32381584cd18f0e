//! Verifying and unpacking: one streaming pass over the payload, checked against the signed
//! manifest entry by entry. Unpacking writes only inside a fresh destination directory and
//! removes it on any failure.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::build::Hashing;
use crate::format::read_header;
use crate::keys::KeyId;
use crate::manifest::path_problem;
use crate::{io_err, EntryKind, Error, Manifest, Result, TrustStore};
#[cfg(not(target_os = "linux"))]
use convoy_base::files::sync_dir;

/// Caps that bound the work and disk a bundle can demand.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_manifest_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub max_entries: usize,
    pub max_path_len: usize,
    /// log2 of the largest zstd window the decoder accepts.
    pub zstd_window_log_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 64 << 20,
            max_unpacked_bytes: 8 << 30,
            max_entries: 200_000,
            max_path_len: 1024,
            zstd_window_log_max: 27,
        }
    }
}

/// Checks a header's signatures against `trust` and parses its manifest: what an agent does
/// with a stored header before re-activating a kept release.
pub fn verify_header(header: &crate::Header, trust: &TrustStore) -> Result<Verified> {
    let signers = check_signatures(&header.manifest_bytes, &header.signatures, trust)?;
    let signed_by = header.signatures.iter().map(|s| s.key_id).collect();
    Ok(Verified { manifest: header.manifest()?, signers, signed_by, bundle_sha256: String::new() })
}

/// A bundle that passed every check.
#[derive(Clone, Debug)]
pub struct Verified {
    pub manifest: Manifest,
    /// Trusted keys whose signatures verified (empty when checked without a trust store).
    pub signers: Vec<KeyId>,
    /// Every key id the bundle carries a signature from, trusted or not.
    pub signed_by: Vec<KeyId>,
    /// SHA-256 of the whole bundle file (the release's identity), computed in the same pass.
    pub bundle_sha256: String,
}

/// Checks a bundle completely (signatures, payload digest, every file's size and hash, every
/// safety rule) without writing anything. With `trust = None` only structure and digests are
/// checked: that is what a controller without release keys does; agents always pass a store.
pub fn verify(path: &Path, trust: Option<&TrustStore>, limits: &Limits) -> Result<Verified> {
    let f = fs::File::open(path).map_err(io_err(path))?;
    whole(io::BufReader::with_capacity(256 << 10, f), trust, None, limits)
}

/// [`verify`] for any reader (used by the fuzz targets and by callers that stream).
pub fn verify_reader<R: Read>(r: R, trust: Option<&TrustStore>, limits: &Limits) -> Result<Verified> {
    whole(r, trust, None, limits)
}

/// Runs [`process`] while hashing every byte of the bundle, reading to its end.
fn whole<R: Read>(
    r: R,
    trust: Option<&TrustStore>,
    dest: Option<&Path>,
    limits: &Limits,
) -> Result<Verified> {
    let mut hashed = Hashing::new(r);
    let mut v = process(&mut hashed, trust, dest, limits)?;
    io::copy(&mut hashed, &mut io::sink()).map_err(Error::Read)?;
    v.bundle_sha256 = hashed.digest_hex();
    Ok(v)
}

/// Verifies and unpacks the bundle at `path` into `dest`, which must not exist yet. On error
/// `dest` is removed and nothing else was written.
pub fn unpack(path: &Path, trust: &TrustStore, dest: &Path, limits: &Limits) -> Result<Verified> {
    let f = fs::File::open(path).map_err(io_err(path))?;
    if let Err(e) = fs::create_dir(dest) {
        return Err(match e.kind() {
            io::ErrorKind::AlreadyExists => Error::DestinationExists(dest.to_path_buf()),
            _ => Error::Io { path: dest.to_path_buf(), source: e },
        });
    }
    let result = whole(io::BufReader::with_capacity(256 << 10, f), Some(trust), Some(dest), limits);
    if result.is_err() {
        // The unpack error is what the caller acts on and is returned unchanged; a tree that
        // cannot be removed here is a leftover unpack directory, which the agent's start-up
        // cleanup removes.
        let _ = make_tree_writable(dest).and_then(|()| fs::remove_dir_all(dest));
    }
    result
}

/// Gives `dir` and every directory below it mode 0755, so a tree holding read-only directories
/// (a hostile bundle may ship them, a release has them by design) can be removed.
///
/// Runs as root over trees that other users may be changing: a directory can be swapped for a
/// symbolic link at any moment. So every directory is opened without following a link and
/// changed through its descriptor, and the walk goes on from that descriptor, never by
/// resolving a path again; links, and anything that is not a directory by the time it is
/// opened, are left alone. Blocking.
#[cfg(target_os = "linux")]
pub fn make_tree_writable(dir: &Path) -> io::Result<()> {
    match rustix::fs::openat(rustix::fs::CWD, dir, dir_flags(), rustix::fs::Mode::empty()) {
        Ok(fd) => writable_below(fd),
        Err(e) if not_a_directory(e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A directory opened with these cannot be a symbolic link, nor a FIFO or device that would
/// block or act on open.
#[cfg(target_os = "linux")]
fn dir_flags() -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Open failures that mean "not a directory to walk": a link, another kind of file, or an entry
/// removed while the walk ran.
#[cfg(target_os = "linux")]
fn not_a_directory(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(e, Errno::NOTDIR | Errno::LOOP | Errno::NOENT)
}

#[cfg(target_os = "linux")]
fn writable_below(dir: std::os::fd::OwnedFd) -> io::Result<()> {
    use rustix::fs::{FileType, Mode};
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o755))?;
    let mut subdirs = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        // Some file systems do not report the type; the no-follow open below decides then.
        if matches!(entry.file_type(), FileType::Directory | FileType::Unknown) {
            subdirs.push(name.to_owned());
        }
    }
    for name in subdirs {
        match rustix::fs::openat(&dir, name.as_c_str(), dir_flags(), Mode::empty()) {
            Ok(fd) => writable_below(fd)?,
            Err(e) if not_a_directory(e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// [`make_tree_writable`] where directories cannot be opened relative to a descriptor: links
/// are skipped as they are found, which leaves a race the Linux version does not have.
#[cfg(all(unix, not(target_os = "linux")))]
pub fn make_tree_writable(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !fs::symlink_metadata(dir)?.is_dir() {
        return Ok(());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_tree_writable(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn make_tree_writable(_dir: &Path) -> io::Result<()> {
    Ok(())
}

fn check_signatures(manifest: &[u8], sigs: &[crate::Signature], trust: &TrustStore) -> Result<Vec<KeyId>> {
    if trust.is_empty() {
        return Err(Error::NoTrustedKeys);
    }
    if sigs.is_empty() {
        return Err(Error::Unsigned);
    }
    let mut good: Vec<KeyId> = Vec::new();
    for s in sigs {
        if let Some(key) = trust.find(&s.key_id) {
            // A trusted key's signature that fails means tampering: refuse outright.
            if !key.verify(manifest, &s.sig) {
                return Err(Error::BadSignature(s.key_id));
            }
            if !good.contains(&s.key_id) {
                good.push(s.key_id);
            }
        }
    }
    if good.len() < trust.required() {
        let signers = sigs.iter().map(|s| s.key_id.to_string()).collect::<Vec<_>>().join(", ");
        return Err(Error::NotEnoughSignatures { required: trust.required(), found: good.len(), signers });
    }
    Ok(good)
}

/// Counts decompressed bytes and fails past a cap, so a small payload cannot expand without
/// bound (tar headers and padding included).
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(CapExceeded));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[derive(Debug)]
struct CapExceeded;
impl std::fmt::Display for CapExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decompressed payload exceeds its cap")
    }
}
impl std::error::Error for CapExceeded {}

fn payload_err(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|i| i.is::<CapExceeded>()) {
        return Error::Limit("decompressed payload is larger than the manifest allows".into());
    }
    Error::BadPayload(e.to_string())
}

fn entry_kind(t: tar::EntryType) -> std::result::Result<EntryKind, &'static str> {
    use tar::EntryType as T;
    match t {
        T::Regular | T::Continuous => Ok(EntryKind::File),
        T::Directory => Ok(EntryKind::Dir),
        T::Symlink => Ok(EntryKind::Symlink),
        T::Link => Err("hardlink"),
        T::Char | T::Block => Err("device file"),
        T::Fifo => Err("FIFO"),
        T::GNUSparse => Err("sparse file"),
        _ => Err("unsupported tar entry"),
    }
}

fn process<R: Read>(
    mut r: R,
    trust: Option<&TrustStore>,
    dest: Option<&Path>,
    limits: &Limits,
) -> Result<Verified> {
    // Fail closed before reading anything when no keys are configured.
    if trust.is_some_and(TrustStore::is_empty) {
        return Err(Error::NoTrustedKeys);
    }
    let header = read_header(&mut r, limits.max_manifest_bytes)?;
    let signers = match trust {
        Some(t) => check_signatures(&header.manifest_bytes, &header.signatures, t)?,
        None => vec![],
    };
    let manifest = header.manifest()?;
    if manifest.unpacked_size > limits.max_unpacked_bytes {
        return Err(Error::Limit(format!(
            "unpacked size {} exceeds the {}-byte cap",
            manifest.unpacked_size, limits.max_unpacked_bytes
        )));
    }
    if manifest.files.len() > limits.max_entries {
        return Err(Error::Limit(format!(
            "{} entries exceed the cap of {}",
            manifest.files.len(),
            limits.max_entries
        )));
    }

    // The compressed stream may be at most one byte longer than promised, so an appended tail
    // is detected without being read to its end.
    let mut raw = Hashing::new((&mut r).take(manifest.payload.size + 1));
    let budget = manifest.unpacked_size
        + (manifest.files.len() as u64 + 4) * (2048 + limits.max_path_len as u64)
        + (1 << 20);
    let result = {
        let mut decoder = zstd::stream::read::Decoder::new(&mut raw).map_err(payload_err)?;
        decoder.window_log_max(limits.zstd_window_log_max).map_err(payload_err)?;
        let capped = Capped { inner: decoder, left: budget };
        let mut archive = tar::Archive::new(capped);
        // Drain the end-of-archive padding so the digest covers the whole stream.
        walk_entries(&mut archive, &manifest, dest, limits).and_then(|()| {
            let mut rest = archive.into_inner();
            io::copy(&mut rest, &mut io::sink()).map_err(payload_err)?;
            Ok(())
        })
    };
    // A failure inside the stream is usually explained better by the payload's digest: a flipped
    // byte or a swapped payload shows up as a digest mismatch, which says what really happened.
    io::copy(&mut raw, &mut io::sink()).map_err(Error::Read)?;
    let digest = raw.digest_hex();
    if raw.count != manifest.payload.size {
        return Err(Error::PayloadSize { expected: manifest.payload.size, actual: raw.count });
    }
    if digest != manifest.payload.sha256 {
        return Err(Error::PayloadDigest { expected: manifest.payload.sha256.clone(), actual: digest });
    }
    result?;
    if let Some(dest) = dest {
        make_durable(dest, &manifest)?;
    }
    let signed_by = header.signatures.iter().map(|s| s.key_id).collect();
    Ok(Verified { manifest, signers, signed_by, bundle_sha256: String::new() })
}

fn walk_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    manifest: &Manifest,
    dest: Option<&Path>,
    limits: &Limits,
) -> Result<()> {
    let index: HashMap<&str, usize> =
        manifest.files.iter().enumerate().map(|(i, f)| (f.path.as_str(), i)).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut symlinks: HashSet<String> = HashSet::new();
    let mut next = 0usize;
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    for entry in archive.entries().map_err(payload_err)? {
        let mut entry = entry.map_err(payload_err)?;
        if seen.len() >= limits.max_entries {
            return Err(Error::Limit(format!("more than {} entries", limits.max_entries)));
        }
        let raw_path = entry.path_bytes().into_owned();
        if raw_path.len() > limits.max_path_len {
            return Err(Error::Limit(format!(
                "a path of {} bytes exceeds the cap of {}",
                raw_path.len(),
                limits.max_path_len
            )));
        }
        let path = String::from_utf8(raw_path).map_err(|e| Error::UnsafePath {
            path: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            reason: "not valid UTF-8",
        })?;
        // Directories may carry a trailing slash in tar.
        let path = path.strip_suffix('/').map(str::to_owned).unwrap_or(path);
        if let Some(reason) = path_problem(&path) {
            return Err(Error::UnsafePath { path, reason });
        }
        let kind = entry_kind(entry.header().entry_type())
            .map_err(|kind| Error::ForbiddenEntry { path: path.clone(), kind })?;
        let ustar = entry.header().size().map_err(payload_err)?;
        if let Some(exts) = entry.pax_extensions().map_err(payload_err)? {
            for ext in exts {
                let ext = ext.map_err(payload_err)?;
                if ext.key_bytes() == b"size" {
                    let pax: u64 = std::str::from_utf8(ext.value_bytes())
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| {
                            Error::BadPayload(format!("entry {path:?} has an unreadable PAX size"))
                        })?;
                    if pax != ustar {
                        return Err(Error::PaxSizeMismatch { path, pax, ustar });
                    }
                }
            }
        }
        let mode = entry.header().mode().map_err(payload_err)?;
        if mode & 0o7000 != 0 {
            return Err(Error::SpecialMode(path));
        }
        if !seen.insert(path.clone()) {
            return Err(Error::Duplicate(path));
        }
        let expected = match manifest.files.get(next) {
            Some(e) if e.path == path => e,
            Some(e) => {
                return Err(if index.contains_key(path.as_str()) {
                    Error::Missing(e.path.clone())
                } else {
                    Error::Unlisted(path)
                })
            }
            None => return Err(Error::Unlisted(path)),
        };
        next += 1;
        if expected.kind != kind {
            return Err(Error::KindMismatch { path, expected: expected.kind.name(), actual: kind.name() });
        }
        if kind != EntryKind::Symlink && mode & 0o777 != expected.mode {
            return Err(Error::ModeMismatch { path, expected: expected.mode, actual: mode & 0o777 });
        }
        // No entry may be reached through a symlink unpacked earlier.
        let mut prefix = String::new();
        for c in path.split('/') {
            if !prefix.is_empty() {
                if symlinks.contains(&prefix) {
                    return Err(Error::ThroughSymlink { path, link: prefix });
                }
                prefix.push('/');
            }
            prefix.push_str(c);
        }
        let target = dest.map(|d| d.join(&path));
        match kind {
            EntryKind::Dir => {
                if let Some(t) = &target {
                    fs::create_dir(t).map_err(io_err(t))?;
                }
            }
            EntryKind::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                // The manifest's chains were resolved as a whole before the payload was read,
                // and this target must equal the manifest's; checking it on its own as well
                // keeps a stray target from being written even before that comparison.
                if !crate::manifest::symlink_stays_inside(&path, &link) {
                    return Err(Error::SymlinkEscape { path, target: link });
                }
                let want = expected.target.clone().unwrap_or_default();
                if link != want {
                    return Err(Error::TargetMismatch { path, expected: want, actual: link });
                }
                if let Some(t) = &target {
                    symlink(&link, t)?;
                }
                symlinks.insert(path);
            }
            EntryKind::File => {
                let size = entry.header().size().map_err(payload_err)?;
                if size != expected.size {
                    return Err(Error::SizeMismatch { path, expected: expected.size, actual: size });
                }
                total += size;
                if total > limits.max_unpacked_bytes {
                    return Err(Error::Limit(format!(
                        "unpacked bytes exceed the cap of {}",
                        limits.max_unpacked_bytes
                    )));
                }
                let (count, digest) = match &target {
                    Some(t) => write_file(&mut entry, t, expected.mode, &mut buf)?,
                    None => {
                        let mut sink = Hashing::new(io::sink());
                        io::copy(&mut entry, &mut sink).map_err(payload_err)?;
                        (sink.count, sink.digest_hex())
                    }
                };
                if count != size {
                    return Err(Error::SizeMismatch { path, expected: size, actual: count });
                }
                let want = expected.sha256.clone().unwrap_or_default();
                if digest != want {
                    return Err(Error::HashMismatch { path, expected: want, actual: digest });
                }
            }
        }
    }
    if let Some(missing) = manifest.files.get(next) {
        return Err(Error::Missing(missing.path.clone()));
    }
    Ok(())
}

/// Writes one file through a reused buffer, hashing as it goes. The fsync is deferred to
/// [`sync_files`], which batches them: one fsync per file in a row would dominate unpacking.
fn write_file<R: Read>(entry: &mut R, target: &Path, mode: u32, buf: &mut [u8]) -> Result<(u64, String)> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NOFOLLOW on top of create_new: never write through a link.
        opts.mode(mode).custom_flags(nofollow());
    }
    let mut f = opts.open(target).map_err(io_err(target))?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut count = 0u64;
    loop {
        let n = match entry.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(payload_err(e)),
        };
        sha2::Digest::update(&mut hasher, &buf[..n]);
        f.write_all(&buf[..n]).map_err(io_err(target))?;
        count += n as u64;
    }
    #[cfg(unix)]
    {
        // The creation mode was filtered by the umask; set it exactly.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(target))?;
    }
    Ok((count, hex::encode(sha2::Digest::finalize(hasher))))
}

/// Fsyncs the unpacked files from a few threads at once, so the file system can group them
/// into fewer journal commits.
#[cfg(not(target_os = "linux"))]
fn sync_files(dest: &Path, manifest: &Manifest) -> Result<()> {
    let files: Vec<PathBuf> =
        manifest.files.iter().filter(|f| f.kind == EntryKind::File).map(|f| dest.join(&f.path)).collect();
    let threads = 32.min(files.len().max(1));
    let chunk = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    for p in part {
                        fs::File::open(p).and_then(|f| f.sync_all()).map_err(io_err(p))?;
                    }
                    Ok::<(), Error>(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| Error::BadSource("fsync thread panicked".into()))??;
        }
        Ok(())
    })
}

/// `O_NOFOLLOW`, whose value differs between Linux architectures (arm64 has its own).
#[cfg(target_os = "linux")]
fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

#[cfg(all(unix, not(target_os = "linux")))]
fn nofollow() -> i32 {
    0x0100
}

/// `O_NONBLOCK`: opening a FIFO for reading returns at once instead of waiting for a writer.
#[cfg(target_os = "linux")]
fn nonblock() -> i32 {
    rustix::fs::OFlags::NONBLOCK.bits() as i32
}

#[cfg(all(unix, not(target_os = "linux")))]
fn nonblock() -> i32 {
    0x0004
}

/// Opens a file the manifest lists for reading, checking what was opened rather than what a
/// path pointed at a moment before: the tree may be changed by its service while it is checked.
/// A symbolic link is not followed and a FIFO does not block the open; anything that is not a
/// regular file of the listed mode and size is refused before a byte is read.
fn open_listed_file(p: &Path, f: &crate::FileEntry) -> Result<fs::File> {
    let mut opts = fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(nofollow() | nonblock());
    }
    let file = match opts.open(p) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::Missing(f.path.clone())),
        Err(e) => {
            // A symbolic link now in the file's place fails the no-follow open; name it.
            let now_a_link = fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
            return Err(if now_a_link {
                Error::KindMismatch {
                    path: f.path.clone(),
                    expected: EntryKind::File.name(),
                    actual: EntryKind::Symlink.name(),
                }
            } else {
                Error::Io { path: p.to_path_buf(), source: e }
            });
        }
    };
    let meta = file.metadata().map_err(io_err(p))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::KindMismatch {
            path: f.path.clone(),
            expected: EntryKind::File.name(),
            actual: EntryKind::Dir.name(),
        });
    }
    if !ft.is_file() {
        return Err(Error::ForbiddenEntry { path: f.path.clone(), kind: "special file" });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode != f.mode {
            return Err(Error::ModeMismatch { path: f.path.clone(), expected: f.mode, actual: mode });
        }
    }
    if meta.len() != f.size {
        return Err(Error::SizeMismatch { path: f.path.clone(), expected: f.size, actual: meta.len() });
    }
    Ok(file)
}

#[cfg(unix)]
fn symlink(link: &str, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(link, at).map_err(io_err(at))
}

#[cfg(not(unix))]
fn symlink(_link: &str, at: &Path) -> Result<()> {
    Err(Error::BadSource(format!("{}: symlinks need a Unix system", at.display())))
}

/// Applies the manifest's directory modes (last, so a read-only directory did not block its own
/// filling), then makes the whole tree durable before the unpack reports success.
///
/// On Linux one `syncfs` on the destination's file system does it (as OSTree does): it writes
/// back every file and directory in one pass, far cheaper than thousands of fsyncs. Elsewhere
/// every file and directory is fsynced, files from a few threads at once.
fn make_durable(dest: &Path, manifest: &Manifest) -> Result<()> {
    let dirs: Vec<(PathBuf, u32)> = manifest
        .files
        .iter()
        .filter(|f| f.kind == EntryKind::Dir)
        .map(|f| (dest.join(&f.path), f.mode))
        .collect();
    #[cfg(unix)]
    for (d, mode) in &dirs {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(d, fs::Permissions::from_mode(*mode)).map_err(io_err(d))?;
    }
    #[cfg(target_os = "linux")]
    {
        let root = fs::File::open(dest).map_err(io_err(dest))?;
        rustix::fs::syncfs(&root).map_err(|e| Error::Io { path: dest.to_path_buf(), source: e.into() })?;
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        sync_files(dest, manifest)?;
        for (d, _) in &dirs {
            sync_dir(d)?;
        }
        sync_dir(dest)
    }
}

/// Re-checks an unpacked release directory against its manifest: every entry present with the
/// right kind, mode, size and SHA-256 (symlinks: the right target), and nothing extra. Used
/// before a kept release is activated again, so a corrupted one is never switched to.
///
/// Symlinks are resolved as a chain against the manifest's tree first (see
/// [`Error::SymlinkEscape`] and [`Error::SymlinkLoop`]), the same rule unpacking applies: the
/// manifest handed in may not have come through the parser that enforces it.
pub fn verify_tree(dir: &Path, manifest: &Manifest) -> Result<()> {
    crate::manifest::check_symlink_chains(&manifest.files)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut expected: HashSet<&str> = HashSet::new();
    for f in &manifest.files {
        expected.insert(&f.path);
        let p = dir.join(&f.path);
        let meta = fs::symlink_metadata(&p).map_err(|_| Error::Missing(f.path.clone()))?;
        let ft = meta.file_type();
        let actual_kind = if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else {
            return Err(Error::ForbiddenEntry { path: f.path.clone(), kind: "special file" });
        };
        if actual_kind != f.kind {
            return Err(Error::KindMismatch {
                path: f.path.clone(),
                expected: f.kind.name(),
                actual: actual_kind.name(),
            });
        }
        #[cfg(unix)]
        if f.kind != EntryKind::Symlink {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode != f.mode {
                return Err(Error::ModeMismatch { path: f.path.clone(), expected: f.mode, actual: mode });
            }
        }
        match f.kind {
            EntryKind::Dir => {}
            EntryKind::Symlink => {
                let t = fs::read_link(&p).map_err(io_err(&p))?.to_string_lossy().into_owned();
                let want = f.target.clone().unwrap_or_default();
                if t != want {
                    return Err(Error::TargetMismatch { path: f.path.clone(), expected: want, actual: t });
                }
            }
            EntryKind::File => {
                if meta.len() != f.size {
                    return Err(Error::SizeMismatch {
                        path: f.path.clone(),
                        expected: f.size,
                        actual: meta.len(),
                    });
                }
                // One byte past the listed size is read at most, so a file that grows while it is
                // read shows up as a size mismatch instead of being read without end.
                let mut file = open_listed_file(&p, f)?.take(f.size.saturating_add(1));
                let mut h = <sha2::Sha256 as sha2::Digest>::new();
                let mut count = 0u64;
                loop {
                    let n = file.read(&mut buf).map_err(io_err(&p))?;
                    if n == 0 {
                        break;
                    }
                    count += n as u64;
                    sha2::Digest::update(&mut h, &buf[..n]);
                }
                if count != f.size {
                    return Err(Error::SizeMismatch {
                        path: f.path.clone(),
                        expected: f.size,
                        actual: count,
                    });
                }
                let digest = hex::encode(sha2::Digest::finalize(h));
                let want = f.sha256.clone().unwrap_or_default();
                if digest != want {
                    return Err(Error::HashMismatch { path: f.path.clone(), expected: want, actual: digest });
                }
            }
        }
    }
    // Nothing may have been added either.
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in fs::read_dir(&d).map_err(io_err(&d))? {
            let e = e.map_err(io_err(&d))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            if !expected.contains(rel.as_str()) {
                return Err(Error::Unlisted(rel));
            }
            if e.file_type().map_err(io_err(&d))?.is_dir() {
                stack.push((e.path(), rel));
            }
        }
    }
    Ok(())
}
