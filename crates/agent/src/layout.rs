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

use std::path::{Path, PathBuf};

use convoy_pki::files;

use crate::{Error, Result};

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
        let _ = std::fs::remove_file(&tmp);
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
        let _ = std::fs::remove_file(self.app_dir(app).join(".current.tmp"));
        if let Ok(entries) = std::fs::read_dir(self.releases_dir(app)) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = make_writable(&e.path());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Removes one unpack directory this agent created (after a failed install).
    pub fn remove_tmp(&self, tmp: &Path) {
        if make_writable(tmp).is_ok() {
            if let Err(e) = std::fs::remove_dir_all(tmp) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %tmp.display(), error = %e, "cannot remove unpack directory");
                }
            }
        }
    }

    /// Removes a pruned release's log and its rotated predecessor.
    pub fn remove_logs(&self, app: &str, version: &str) -> Result<()> {
        let log = self.log_path(app, version);
        let mut rotated = log.clone().into_os_string();
        rotated.push(".1");
        for p in [log, PathBuf::from(rotated)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Io { path: p, source: e }),
            }
        }
        Ok(())
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
        let _ = make_writable(&dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        let _ = std::fs::remove_file(self.header_path(app, version));
        files::sync_dir(&self.releases_dir(app))?;
        Ok(())
    }
}

#[cfg(unix)]
fn make_writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.is_dir() || dir.is_symlink() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type()?.is_dir() {
            make_writable(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn make_writable(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}
