//! `convoy release build`: a directory in, a signed, reproducible bundle out.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use convoy_base::files;
use sha2::{Digest, Sha256};

use crate::format::{write_header, Signature};
use crate::manifest::{check_app, check_version, symlink_stays_inside};
use crate::{
    io_err, EntryKind, Error, FileEntry, Manifest, PayloadInfo, ReleaseConfig, Result, SecretKey, Target,
    CONFIG_FILE, FORMAT_VERSION,
};

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub app: String,
    pub version: String,
    /// Recorded in the manifest and used as every entry's mtime, so builds are reproducible.
    pub created_at: i64,
    pub target: Option<Target>,
    pub zstd_level: i32,
}

/// Hashes and counts everything that passes through.
pub(crate) struct Hashing<T> {
    pub inner: T,
    pub hasher: Sha256,
    pub count: u64,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }

    pub fn digest_hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Source {
    rel: String,
    abs: PathBuf,
    kind: EntryKind,
    mode: u32,
    target: Option<String>,
}

/// Lists the directory's entries, sorted by path, refusing what a release cannot contain.
fn walk(root: &Path) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| Error::BadSource(format!("{} is not valid UTF-8", n.to_string_lossy())))?;
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            if let Some(reason) = crate::manifest::path_problem(&rel) {
                return Err(Error::BadSource(format!("{rel:?}: {reason}")));
            }
            let abs = entry.path();
            let meta = fs::symlink_metadata(&abs).map_err(io_err(&abs))?;
            let ft = meta.file_type();
            let (kind, mode, target) = if ft.is_symlink() {
                let t = fs::read_link(&abs).map_err(io_err(&abs))?;
                let t = t
                    .into_os_string()
                    .into_string()
                    .map_err(|_| Error::BadSource(format!("symlink {rel:?} target is not valid UTF-8")))?;
                if !symlink_stays_inside(&rel, &t) {
                    return Err(Error::SymlinkEscape { path: rel, target: t });
                }
                (EntryKind::Symlink, 0o777, Some(t))
            } else if ft.is_dir() {
                stack.push((abs.clone(), rel.clone()));
                (EntryKind::Dir, 0o755, None)
            } else if ft.is_file() {
                (EntryKind::File, if executable(&meta) { 0o755 } else { 0o644 }, None)
            } else {
                return Err(Error::BadSource(format!("{rel:?} is not a regular file, directory or symlink")));
            };
            out.push(Source { rel, abs, kind, mode, target });
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

#[cfg(unix)]
fn executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_meta: &fs::Metadata) -> bool {
    false
}

/// Builds a bundle of `dir` signed by `key` at `out`. The output appears atomically; on error
/// nothing is left behind.
pub fn build(dir: &Path, opts: &BuildOptions, key: &SecretKey, out: &Path) -> Result<Manifest> {
    check_app(&opts.app)?;
    check_version(&opts.version)?;
    let config_path = dir.join(CONFIG_FILE);
    let config_text = fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::BadSource(format!("{} has no {CONFIG_FILE}", dir.display())),
        _ => Error::Io { path: config_path.clone(), source: e },
    })?;
    let config = ReleaseConfig::parse(&config_text)?;
    let sources = walk(dir)?;

    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let payload_tmp = tempfile::tempfile_in(out_dir).map_err(io_err(out_dir))?;
    let mtime = opts.created_at.max(0) as u64;
    let mut files = Vec::with_capacity(sources.len());
    let mut unpacked_size = 0u64;
    let hashing = Hashing::new(io::BufWriter::new(payload_tmp));
    let encoder = zstd::stream::write::Encoder::new(hashing, opts.zstd_level).map_err(io_err(out))?;
    let mut tar = tar::Builder::new(encoder);
    tar.mode(tar::HeaderMode::Deterministic);
    for s in &sources {
        let mut header = tar::Header::new_gnu();
        header.set_mode(s.mode);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        let mut entry = FileEntry {
            path: s.rel.clone(),
            kind: s.kind,
            mode: s.mode,
            size: 0,
            sha256: None,
            target: None,
        };
        match s.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, &s.rel, io::empty()).map_err(io_err(&s.abs))?;
            }
            EntryKind::Symlink => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let t = s.target.clone().unwrap_or_default();
                tar.append_link(&mut header, &s.rel, &t).map_err(io_err(&s.abs))?;
                entry.target = Some(t);
            }
            EntryKind::File => {
                let f = fs::File::open(&s.abs).map_err(io_err(&s.abs))?;
                let size = f.metadata().map_err(io_err(&s.abs))?.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                // Read exactly the size in the header, even if the file grows meanwhile.
                let mut reader = Hashing::new(f.take(size));
                tar.append_data(&mut header, &s.rel, &mut reader).map_err(io_err(&s.abs))?;
                if reader.count != size {
                    return Err(Error::BadSource(format!("{:?} changed size while being read", s.rel)));
                }
                entry.size = size;
                entry.sha256 = Some(reader.digest_hex());
                unpacked_size += size;
            }
        }
        files.push(entry);
    }
    let encoder = tar.into_inner().map_err(io_err(out))?;
    let mut hashing = encoder.finish().map_err(io_err(out))?;
    hashing.flush().map_err(io_err(out))?;
    let payload = PayloadInfo { sha256: hashing.digest_hex(), size: hashing.count };
    let mut payload_file =
        hashing.inner.into_inner().map_err(|e| Error::Io { path: out.into(), source: e.into_error() })?;

    let manifest = Manifest {
        format: FORMAT_VERSION,
        app: opts.app.clone(),
        version: opts.version.clone(),
        created_at: opts.created_at,
        payload,
        unpacked_size,
        files,
        config,
        target: opts.target.clone(),
    };
    manifest.validate()?;
    let bytes = manifest.to_canonical();
    let sig = Signature { key_id: key.public().id(), sig: key.sign(&bytes) };

    files::replace_with(out, false, |f| {
        let mut w = io::BufWriter::new(f);
        write_header(&mut w, &bytes, &[sig])?;
        io::Seek::seek(&mut payload_file, io::SeekFrom::Start(0))?;
        io::copy(&mut payload_file, &mut w)?;
        w.flush()
    })?;
    Ok(manifest)
}
