//! Where an agent keeps things under its data directory:
//!
//! ```text
//! apps/<app>/releases/<version>/   unpacked releases
//! apps/<app>/releases/.tmp-*       unpacks in progress (removed at start-up)
//! apps/<app>/headers/<version>     the signed manifest of each installed release
//! apps/<app>/logs/<version>.log    service and hook output, size-capped
//! apps/<app>/current               relative symlink to releases/<version>
//! cache/                           downloaded bundles
//! state/                           sled: journal and app state
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use convoy_base::files;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::{Error, Result};

/// The most log text [`Layout::read_log`] callers should ask for: enough to diagnose a failed
/// start, small enough for one gRPC message.
pub const LOG_TAIL_MAX_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    pub fn app_dir(&self, app: &str) -> PathBuf {
        self.root.join("apps").join(app)
    }

    pub fn releases_dir(&self, app: &str) -> PathBuf {
        self.app_dir(app).join("releases")
    }

    pub fn release_dir(&self, app: &str, version: &str) -> PathBuf {
        self.releases_dir(app).join(version)
    }

    pub fn header_path(&self, app: &str, version: &str) -> PathBuf {
        self.app_dir(app).join("headers").join(version)
    }

    pub fn log_path(&self, app: &str, version: &str) -> PathBuf {
        self.app_dir(app).join("logs").join(format!("{version}.log"))
    }

    pub fn current_link(&self, app: &str) -> PathBuf {
        self.app_dir(app).join("current")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The version `current` points at, if any.
    pub fn read_current(&self, app: &str) -> Option<String> {
        let target = std::fs::read_link(self.current_link(app)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Points `current` at `version` atomically: a new symlink under a temporary name, renamed
    /// over `current`, then the directory fsynced. A reader sees the old target or the new one,
    /// never a missing link.
    pub fn swap_current(&self, app: &str, version: &str) -> Result<()> {
        let dir = self.app_dir(app);
        let tmp = dir.join(".current.tmp");
        remove_if_present(&tmp)?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("releases").join(version), &tmp).map_err(io(&tmp))?;
        let link = self.current_link(app);
        std::fs::rename(&tmp, &link).map_err(io(&link))?;
        files::sync_dir(&dir)?;
        Ok(())
    }

    /// A fresh temporary directory name for unpacking `version`.
    pub fn unpack_tmp(&self, app: &str, version: &str) -> PathBuf {
        self.releases_dir(app).join(format!(".tmp-{version}-{}", hex::encode(rand::random::<[u8; 4]>())))
    }

    /// Removes what an interrupted install or switch left behind.
    pub fn clean_leftovers(&self, app: &str) {
        let tmp = self.app_dir(app).join(".current.tmp");
        if let Err(e) = remove_if_present(&tmp) {
            tracing::warn!(error = %e, "an interrupted switch's link was not removed");
        }
        if let Ok(entries) = std::fs::read_dir(self.releases_dir(app)) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    make_writable(&e.path());
                    if let Err(err) = std::fs::remove_dir_all(e.path()) {
                        tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an unpack leftover");
                    }
                }
            }
        }
    }

    /// Removes one unpack directory this agent created (after a failed install).
    pub fn remove_tmp(&self, tmp: &Path) {
        make_writable(tmp);
        if let Err(e) = std::fs::remove_dir_all(tmp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove unpack directory");
            }
        }
    }

    /// Apps that have a directory on disk.
    pub fn apps_on_disk(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("apps")) else { return vec![] };
        let mut out: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    /// Removes a release directory, even one with read-only subdirectories.
    pub fn remove_release(&self, app: &str, version: &str) -> Result<()> {
        let dir = self.release_dir(app, version);
        make_writable(&dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        remove_if_present(&self.header_path(app, version))?;
        files::sync_dir(&self.releases_dir(app))?;
        Ok(())
    }
}

impl Layout {
    /// The last `lines` lines (all of them when `lines` is 0) of `apps/<app>/logs/<version>.log`,
    /// continued from its rotated predecessor `<version>.log.1` when the current file is short,
    /// and at most `max_bytes` bytes of text counted from the end. A missing log reads as empty.
    ///
    /// The app directory, `logs` and the files are opened without following symbolic links,
    /// and only regular files are read: whatever a release or a service managed to plant there,
    /// this reads nothing outside the agent's own log directory. Blocking: call it from a
    /// blocking context.
    pub fn read_log(&self, app: &str, version: &str, lines: usize, max_bytes: u64) -> Result<String> {
        check_names(app, version)?;
        let Some(logs) = self.open_logs_dir(app)? else { return Ok(String::new()) };
        let name = format!("{version}.log");
        let logs_path = self.app_dir(app).join("logs");
        let mut text = Vec::new();
        let mut cut = false;
        if let Some(f) = open_file_nofollow(&logs, &name, &logs_path.join(&name))? {
            (text, cut) = tail_bytes(f, max_bytes, &logs_path.join(&name))?;
        }
        let room = max_bytes.saturating_sub(text.len() as u64);
        if !cut && room > 0 && (lines == 0 || count_lines(&text) < lines) {
            let rotated = format!("{name}.1");
            if let Some(f) = open_file_nofollow(&logs, &rotated, &logs_path.join(&rotated))? {
                let (mut older, older_cut) = tail_bytes(f, room, &logs_path.join(&rotated))?;
                if !older.is_empty() && !older.ends_with(b"\n") && !text.is_empty() {
                    // The rotation split a line; keep the two halves apart rather than guessing.
                    older.push(b'\n');
                    if older.len() as u64 > room {
                        older.remove(0);
                    }
                }
                older.extend_from_slice(&text);
                text = older;
                cut = older_cut;
            }
        }
        if cut {
            // The first line read is most likely the tail of a longer one: drop the fragment.
            if let Some(i) = text.iter().position(|&b| b == b'\n') {
                text.drain(..=i);
            }
        }
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        let keep = if lines == 0 { all.len() } else { lines.min(all.len()) };
        let mut out = all[all.len() - keep..].join("\n");
        // Replacement characters for invalid bytes can make the text longer than what was read.
        while out.len() as u64 > max_bytes {
            let mut cut_at = out.len() - usize::try_from(max_bytes).unwrap_or(usize::MAX).min(out.len());
            while !out.is_char_boundary(cut_at) {
                cut_at += 1;
            }
            out.drain(..cut_at);
        }
        Ok(out)
    }

    /// Removes the logs of a pruned release (`<version>.log` and `<version>.log.1`), without
    /// following symbolic links. Missing logs are fine. Blocking.
    pub fn remove_logs(&self, app: &str, version: &str) -> Result<()> {
        check_names(app, version)?;
        let Some(logs) = self.open_logs_dir(app)? else { return Ok(()) };
        let logs_path = self.app_dir(app).join("logs");
        for name in [format!("{version}.log"), format!("{version}.log.1")] {
            match rustix::fs::unlinkat(&logs, name.as_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(Error::Io { path: logs_path.join(name), source: e.into() }),
            }
        }
        Ok(())
    }

    /// Opens `apps/<app>/logs` one component at a time below the data directory, refusing any
    /// component that is a symbolic link; `None` when one of them does not exist.
    fn open_logs_dir(&self, app: &str) -> Result<Option<OwnedFd>> {
        let root =
            rustix::fs::open(&self.root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| Error::Io { path: self.root.clone(), source: e.into() })?;
        let mut dir = root;
        let mut path = self.root.clone();
        for name in ["apps", app, "logs"] {
            path.push(name);
            match open_dir_nofollow(&dir, name, &path)? {
                Some(next) => dir = next,
                None => return Ok(None),
            }
        }
        Ok(Some(dir))
    }
}

fn check_names(app: &str, version: &str) -> Result<()> {
    // Both become path components, so only names a release could carry are accepted.
    if convoy_bundle::check_app_name(app).is_err() {
        return Err(Error::Invalid { what: "app", message: format!("{app:?} is not a valid app name") });
    }
    if convoy_bundle::check_version(version).is_err() {
        return Err(Error::Invalid {
            what: "version",
            message: format!("{version:?} is not a valid version"),
        });
    }
    Ok(())
}

/// Turns a failed no-follow open into a clear error: a symbolic link is named as such.
fn nofollow_error(dir: &OwnedFd, name: &str, path: &Path, err: Errno) -> Error {
    let is_link = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
    if is_link {
        Error::Symlink(path.to_path_buf())
    } else {
        Error::Io { path: path.to_path_buf(), source: err.into() }
    }
}

fn open_dir_nofollow(dir: &OwnedFd, name: &str, path: &Path) -> Result<Option<OwnedFd>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(nofollow_error(dir, name, path, e)),
    }
}

/// Opens a regular file without following a symbolic link. Non-blocking, so a FIFO planted in
/// its place cannot hang the reader before the type check refuses it.
fn open_file_nofollow(dir: &OwnedFd, name: &str, path: &Path) -> Result<Option<File>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(nofollow_error(dir, name, path, e)),
    };
    let st = rustix::fs::fstat(fd.as_fd())
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: e.into() })?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::Invalid {
            what: "log",
            message: format!("{} is not a regular file", path.display()),
        });
    }
    Ok(Some(File::from(fd)))
}

/// The last `max` bytes of a file, and whether anything before them was left out.
fn tail_bytes(mut f: File, max: u64, path: &Path) -> Result<(Vec<u8>, bool)> {
    let len = f.metadata().map_err(io(path))?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start)).map_err(io(path))?;
    let mut buf = Vec::new();
    // The file may grow while it is read; `take` keeps the bound.
    f.take(max).read_to_end(&mut buf).map_err(io(path))?;
    Ok((buf, start > 0))
}

fn count_lines(text: &[u8]) -> usize {
    let newlines = text.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(!text.is_empty() && !text.ends_with(b"\n"))
}

/// Makes a release tree removable. It may hold read-only directories, and a service can change
/// it while this runs as root: directories are opened without following links and changed
/// through their descriptors (see [`convoy_bundle::make_tree_writable`]). A failure is logged;
/// the removal that follows reports what it could not remove.
fn make_writable(dir: &Path) {
    if let Err(e) = convoy_bundle::make_tree_writable(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot make a directory tree writable");
    }
}

/// Removes a file or link, if there is one.
fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn layout_with_log(text: &str) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().join("data"));
        let path = layout.log_path("shop", "1.0.0");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        (dir, layout)
    }

    #[test]
    fn the_tail_spans_the_rotated_file_and_honours_the_line_count() {
        let (_dir, layout) = layout_with_log("c\nd\n");
        let mut rotated = layout.log_path("shop", "1.0.0").into_os_string();
        rotated.push(".1");
        std::fs::write(&rotated, "a\nb\n").unwrap();
        assert_eq!(layout.read_log("shop", "1.0.0", 3, LOG_TAIL_MAX_BYTES).unwrap(), "b\nc\nd");
        assert_eq!(layout.read_log("shop", "1.0.0", 2, LOG_TAIL_MAX_BYTES).unwrap(), "c\nd");
        assert_eq!(layout.read_log("shop", "1.0.0", 0, LOG_TAIL_MAX_BYTES).unwrap(), "a\nb\nc\nd");
        // No log yet reads as empty; names that are not an app or a version are refused.
        assert_eq!(layout.read_log("shop", "2.0.0", 10, LOG_TAIL_MAX_BYTES).unwrap(), "");
        assert_eq!(layout.read_log("other", "1.0.0", 10, LOG_TAIL_MAX_BYTES).unwrap(), "");
        assert!(layout.read_log("../shop", "1.0.0", 10, LOG_TAIL_MAX_BYTES).is_err());
        assert!(layout.read_log("shop", "../../x", 10, LOG_TAIL_MAX_BYTES).is_err());
    }

    #[test]
    fn a_large_log_returns_at_most_the_cap_from_its_end() {
        let line = format!("{}\n", "x".repeat(99));
        let mut text = line.repeat(3 * (1 << 20) / line.len());
        text.push_str("the last line\n");
        let (_dir, layout) = layout_with_log(&text);
        let tail = layout.read_log("shop", "1.0.0", 1_000_000, LOG_TAIL_MAX_BYTES).unwrap();
        assert!(tail.len() as u64 <= LOG_TAIL_MAX_BYTES, "{} bytes", tail.len());
        assert!(tail.len() as u64 > LOG_TAIL_MAX_BYTES - 200, "{} bytes", tail.len());
        assert!(tail.ends_with("the last line"));
        // Only whole lines: the fragment where the window starts is dropped.
        assert!(tail.lines().take(tail.lines().count() - 1).all(|l| l.len() == 99));
        // Invalid UTF-8 cannot push the text past the cap either.
        let (_dir, layout) = layout_with_log("");
        std::fs::write(layout.log_path("shop", "1.0.0"), vec![0xff; 4096]).unwrap();
        assert!(layout.read_log("shop", "1.0.0", 0, 1000).unwrap().len() <= 1000);
    }

    #[test]
    fn a_symlinked_logs_directory_is_refused() {
        let (dir, layout) = layout_with_log("mine\n");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("1.0.0.log"), "SECRET FROM OUTSIDE\n").unwrap();
        let logs = layout.app_dir("shop").join("logs");
        std::fs::remove_dir_all(&logs).unwrap();
        symlink(&outside, &logs).unwrap();
        let err = layout.read_log("shop", "1.0.0", 10, LOG_TAIL_MAX_BYTES).unwrap_err();
        assert!(matches!(&err, Error::Symlink(p) if p == &logs), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!err.to_string().contains("SECRET"));
        // Removing logs through the link must not touch the outside either.
        assert!(matches!(layout.remove_logs("shop", "1.0.0"), Err(Error::Symlink(_))));
        assert!(outside.join("1.0.0.log").exists());

        // The app directory itself as a link is refused the same way.
        let app = layout.app_dir("shop");
        std::fs::remove_dir_all(&app).unwrap();
        std::fs::create_dir_all(outside.join("logs")).unwrap();
        std::fs::write(outside.join("logs/1.0.0.log"), "SECRET FROM OUTSIDE\n").unwrap();
        symlink(&outside, &app).unwrap();
        assert!(matches!(layout.read_log("shop", "1.0.0", 10, LOG_TAIL_MAX_BYTES), Err(Error::Symlink(_))));
    }

    #[test]
    fn a_symlinked_log_file_is_refused() {
        let (dir, layout) = layout_with_log("");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "SECRET\n").unwrap();
        let path = layout.log_path("shop", "1.0.0");
        std::fs::remove_file(&path).unwrap();
        symlink(&secret, &path).unwrap();
        let err = layout.read_log("shop", "1.0.0", 10, LOG_TAIL_MAX_BYTES).unwrap_err();
        assert!(matches!(&err, Error::Symlink(p) if p == &path), "{err}");
        // A rotated file that is a link is refused too.
        std::fs::remove_file(&path).unwrap();
        let mut rotated = path.clone().into_os_string();
        rotated.push(".1");
        symlink(&secret, &rotated).unwrap();
        assert!(matches!(layout.read_log("shop", "1.0.0", 10, LOG_TAIL_MAX_BYTES), Err(Error::Symlink(_))));
        // Removing the logs removes the link, never its target.
        layout.remove_logs("shop", "1.0.0").unwrap();
        assert!(std::fs::symlink_metadata(&rotated).is_err());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET\n");
    }

    #[test]
    fn logs_of_a_pruned_release_are_removed() {
        let (_dir, layout) = layout_with_log("old\n");
        let keep = layout.log_path("shop", "2.0.0");
        std::fs::write(&keep, "new\n").unwrap();
        layout.remove_logs("shop", "1.0.0").unwrap();
        assert!(!layout.log_path("shop", "1.0.0").exists());
        assert!(keep.exists());
        // Removing what is already gone is fine.
        layout.remove_logs("shop", "1.0.0").unwrap();
        layout.remove_logs("nothing-here", "1.0.0").unwrap();
    }

    #[test]
    fn a_fifo_in_place_of_a_log_does_not_hang_the_reader() {
        let (_dir, layout) = layout_with_log("");
        let path = layout.log_path("shop", "1.0.0");
        std::fs::remove_file(&path).unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let err = layout.read_log("shop", "1.0.0", 10, LOG_TAIL_MAX_BYTES).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn removing_a_release_never_changes_a_directory_a_link_points_to() {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(&tmp.path().join("data"));
        let release = layout.release_dir("shop", "1.0.0");
        std::fs::create_dir_all(release.join("sub/inner")).unwrap();
        std::fs::write(release.join("sub/inner/file"), "release").unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::fs::write(outside.join("deep/secret"), "SECRET").unwrap();
        std::fs::set_permissions(outside.join("deep"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();

        // A service swaps one of the release's directories for a link to the outside directory
        // and back, over and over, while the tree is made writable again and again.
        let sub = release.join("sub");
        let stash = tmp.path().join("stash");
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (sub, stash, outside, stop) = (sub.clone(), stash.clone(), outside.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(&sub, &stash).unwrap();
                    symlink(&outside, &sub).unwrap();
                    std::thread::yield_now();
                    std::fs::remove_file(&sub).unwrap();
                    std::fs::rename(&stash, &sub).unwrap();
                }
            })
        };
        let started = Instant::now();
        let mut rounds = 0u32;
        while started.elapsed() < Duration::from_secs(2) {
            make_writable(&release);
            rounds += 1;
            assert_eq!(mode(&outside), 0o700, "the outside directory was changed in round {rounds}");
            assert_eq!(
                mode(&outside.join("deep")),
                0o700,
                "a directory below it was changed in round {rounds}"
            );
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();

        // Left as a link, the directory is removed as a link: the release goes, the outside stays.
        std::fs::set_permissions(release.join("sub/inner"), std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::rename(&sub, &stash).unwrap();
        symlink(&outside, &sub).unwrap();
        layout.remove_release("shop", "1.0.0").unwrap();
        assert!(std::fs::symlink_metadata(&release).is_err(), "the release is still there");
        assert_eq!(mode(&outside), 0o700);
        assert_eq!(mode(&outside.join("deep")), 0o700);
        assert_eq!(std::fs::read_to_string(outside.join("deep/secret")).unwrap(), "SECRET");

        // A release with read-only directories of its own is still removed.
        std::fs::create_dir_all(&release).unwrap();
        std::fs::rename(&stash, &sub).unwrap();
        std::fs::set_permissions(&release, std::fs::Permissions::from_mode(0o555)).unwrap();
        layout.remove_release("shop", "1.0.0").unwrap();
        assert!(std::fs::symlink_metadata(&release).is_err(), "a read-only release is still there");
    }
}
