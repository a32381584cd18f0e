//! Crash-safe file writes: write to a temporary sibling, fsync, rename over the target, fsync
//! the directory. A reader sees the old file or the new one, never a torn one. The one place in
//! the workspace that does this.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O failure, naming the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct Error {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the path it happened on, for `map_err`.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error { path: path.to_path_buf(), source }
}

/// The directory `path` is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn open_options(private: bool) -> fs::OpenOptions {
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    opts
}

/// Atomically replaces `path` with `contents`; `private` files get mode 0600 from creation on.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    replace_with(path, private, |f| f.write_all(contents))
}

/// Atomically replaces `path` with what `fill` writes into a fresh temporary sibling: the
/// temporary is fsynced, renamed over `path`, and the directory fsynced. On failure the
/// temporary is removed and `path` is untouched.
pub fn replace_with(
    path: &Path,
    private: bool,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = parent(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = open_options(private).create_new(true).open(&tmp).map_err(io_err(&tmp))?;
        fill(&mut f).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: the temporary may not exist, and the caller's error is the one to report.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` with `contents`, failing if it already exists. Used where overwriting would
/// destroy something irreplaceable, such as a CA key.
pub fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let mut f = open_options(private).create_new(true).open(path).map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    sync_dir(parent(path))
}

/// Flushes a directory's entries (new names, renames) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Reads a whole (small) file, naming the path in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Whether opening a store failed because another handle (in this process or another) still
/// holds its lock file: what a store such as sled reports as an I/O error.
pub fn lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Calls `open` until it succeeds or fails with an error `busy` does not recognise, for at most
/// `wait`, polling every 10 ms: for a store whose lock a handle closing in this process lets go
/// of a moment later. Blocking.
pub fn retry_while_busy<T, E>(
    wait: std::time::Duration,
    mut open: impl FnMut() -> std::result::Result<T, E>,
    busy: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
    let until = std::time::Instant::now() + wait;
    loop {
        match open() {
            Err(e) if busy(&e) && std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn atomic_write_replaces_and_private_mode_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_atomic(&p, b"one", true).unwrap();
        write_atomic(&p, b"two", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
            write_atomic(&dir.path().join("pub"), b"x", false).unwrap();
            assert_eq!(fs::metadata(dir.path().join("pub")).unwrap().permissions().mode() & 0o777, 0o644);
            fs::remove_file(dir.path().join("pub")).unwrap();
        }
        assert!(write_new(&p, b"three", true).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left behind");
    }

    #[test]
    fn a_failed_fill_leaves_the_target_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bundle");
        write_atomic(&p, b"old", false).unwrap();
        let err = replace_with(&p, false, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left behind");
        let err = read_to_string(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
