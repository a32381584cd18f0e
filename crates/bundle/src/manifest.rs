//! The manifest: what a bundle contains, signed as canonical JSON bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, ReleaseConfig, Result};

/// The bundle format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u8,
    pub app: String,
    pub version: String,
    /// Seconds since the Unix epoch; from `--created-at` or `SOURCE_DATE_EPOCH` for
    /// reproducible builds.
    pub created_at: i64,
    pub payload: PayloadInfo,
    /// The sum of all file sizes once unpacked.
    pub unpacked_size: u64,
    /// Every entry, sorted by path; the payload holds them in exactly this order.
    pub files: Vec<FileEntry>,
    pub config: ReleaseConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// SHA-256 of the compressed payload, lowercase hex.
    pub sha256: String,
    /// Size of the compressed payload in bytes.
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symlink",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where a release may run. Absent fields mean "anywhere".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Checks an app name: a short, lowercase identifier usable as a directory name.
pub fn check_app(app: &str) -> Result<()> {
    let ok = !app.is_empty()
        && app.len() <= 64
        && app.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && app.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::BadManifest(format!("app {app:?} is invalid: use lowercase letters, digits, '-' and '_'")))
    }
}

/// Checks a version: semantic versioning (`1.4.2`, `2.0.0-rc.1`), so versions order.
pub fn check_version(version: &str) -> Result<semver::Version> {
    if version.len() > 64 {
        return Err(Error::BadManifest("version is longer than 64 characters".into()));
    }
    semver::Version::parse(version)
        .map_err(|e| Error::BadManifest(format!("version {version:?} is not a semantic version: {e}")))
}

/// Why a relative path inside a release is unsafe, if it is.
pub(crate) fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("empty path");
    }
    if path.starts_with('/') {
        return Some("absolute path");
    }
    if path.contains('\0') {
        return Some("NUL byte in path");
    }
    if path.contains('\\') {
        return Some("backslash in path");
    }
    for c in path.split('/') {
        match c {
            "" => return Some("empty path component"),
            "." => return Some("'.' component"),
            ".." => return Some("'..' component"),
            _ => {}
        }
    }
    None
}

/// Whether a symlink at `link` pointing to `target` stays inside the release directory.
pub(crate) fn symlink_stays_inside(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let mut stack: Vec<&str> = link.split('/').collect();
    stack.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return false;
                }
            }
            other => stack.push(other),
        }
    }
    true
}

impl Manifest {
    /// The canonical bytes that are signed: compact JSON, fields in declaration order, maps
    /// sorted.
    pub fn to_canonical(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses manifest bytes, requiring canonical form and a consistent, safe file list.
    pub fn from_canonical(bytes: &[u8]) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| Error::BadManifest(e.to_string()))?;
        if m.to_canonical() != bytes {
            return Err(Error::NonCanonicalManifest);
        }
        m.validate()?;
        Ok(m)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.format != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat(self.format));
        }
        check_app(&self.app)?;
        check_version(&self.version)?;
        if self.payload.sha256.len() != 64 || !self.payload.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadManifest("payload.sha256 is not a SHA-256 hex digest".into()));
        }
        let mut total = 0u64;
        let mut prev: Option<&str> = None;
        for f in &self.files {
            if let Some(reason) = path_problem(&f.path) {
                return Err(Error::UnsafePath { path: f.path.clone(), reason });
            }
            if let Some(p) = prev {
                if p >= f.path.as_str() {
                    return Err(Error::BadManifest(format!(
                        "files are not sorted and unique at {:?}",
                        f.path
                    )));
                }
            }
            prev = Some(&f.path);
            if f.mode & !0o777 != 0 {
                return Err(Error::SpecialMode(f.path.clone()));
            }
            match f.kind {
                EntryKind::File => {
                    let ok = f.sha256.as_ref().is_some_and(|h| h.len() == 64) && f.target.is_none();
                    if !ok {
                        return Err(Error::BadManifest(format!(
                            "file {:?} needs a sha256 and no target",
                            f.path
                        )));
                    }
                    total = total.saturating_add(f.size);
                }
                EntryKind::Dir => {
                    if f.size != 0 || f.sha256.is_some() || f.target.is_some() {
                        return Err(Error::BadManifest(format!("directory {:?} has file fields", f.path)));
                    }
                }
                EntryKind::Symlink => {
                    let Some(t) = &f.target else {
                        return Err(Error::BadManifest(format!("symlink {:?} has no target", f.path)));
                    };
                    if !symlink_stays_inside(&f.path, t) {
                        return Err(Error::SymlinkEscape { path: f.path.clone(), target: t.clone() });
                    }
                }
            }
        }
        if total != self.unpacked_size {
            return Err(Error::BadManifest(format!(
                "unpacked_size is {} but the files add up to {total}",
                self.unpacked_size
            )));
        }
        Ok(())
    }

    /// `app@version`.
    pub fn release_name(&self) -> String {
        format!("{}@{}", self.app, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_symlink_rules() {
        for (p, ok) in [
            ("a", true),
            ("a/b.txt", true),
            ("/etc", false),
            ("a/../b", false),
            ("./a", false),
            ("a//b", false),
            ("", false),
        ] {
            assert_eq!(path_problem(p).is_none(), ok, "{p}");
        }
        for (link, target, ok) in [
            ("a", "b", true),
            ("d/a", "../b", true),
            ("d/a", "../../b", false),
            ("a", "/etc/passwd", false),
            ("d/e/a", "../../x/../y", true),
            ("a", "..", false),
            ("a", ".", true),
        ] {
            assert_eq!(symlink_stays_inside(link, target), ok, "{link} -> {target}");
        }
    }
}
