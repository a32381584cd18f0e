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

/// How many symlinks deep one resolution may nest before it counts as a loop. Linux gives up
/// after 40 links too (`MAXSYMLINKS`), so nothing the kernel would follow is refused for depth.
pub(crate) const MAX_SYMLINK_HOPS: usize = 40;

/// The longest symlink target a release may carry: the kernel refuses longer ones anyway
/// (`PATH_MAX` is 4,096 bytes with the terminating NUL), and the cap bounds resolution work.
pub(crate) const MAX_SYMLINK_TARGET: usize = 4095;

/// One location in a release tree as the kernel would reach it: a real entry of the tree (never
/// reached through a symlink) and how many components below it lie in directories that do not
/// exist in the release. Those may be created later, so `..` out of them is counted like a
/// directory's, which is the conservative reading.
#[derive(Clone, Copy)]
struct Loc {
    node: usize,
    missing: usize,
}

/// What resolving one symlink gave: where it ends, and how deeply links nest on the way there.
#[derive(Clone, Copy)]
enum Resolution {
    InProgress,
    Done { at: Loc, hops: usize },
}

struct Node<'a> {
    parent: usize,
    children: usize,
    /// The symlink's manifest entry, for symlinks.
    link: Option<&'a FileEntry>,
}

/// The release tree a file list describes, with every symlink resolved the way the kernel would
/// resolve it: component by component, following links that the list itself declares.
struct Tree<'a> {
    nodes: Vec<Node<'a>>,
    children: std::collections::HashMap<(usize, &'a str), usize>,
    resolved: std::collections::HashMap<usize, Resolution>,
}

/// Why a symlink chain is refused, before it is turned into an [`Error`] naming the link.
enum ChainProblem {
    Escape,
    Loop,
}

impl<'a> Tree<'a> {
    /// Builds the tree. Parent directories a list leaves out are implied; an entry below a
    /// symlink is refused because unpacking it would write through the link.
    fn new(files: &'a [FileEntry]) -> Result<Self> {
        let mut tree = Tree {
            nodes: vec![Node { parent: 0, children: 0, link: None }],
            children: std::collections::HashMap::new(),
            resolved: std::collections::HashMap::new(),
        };
        for f in files {
            if let Some(reason) = path_problem(&f.path) {
                return Err(Error::UnsafePath { path: f.path.clone(), reason });
            }
            let mut at = 0usize;
            for c in f.path.split('/') {
                if let Some(link) = tree.nodes[at].link {
                    return Err(Error::ThroughSymlink { path: f.path.clone(), link: link.path.clone() });
                }
                at = match tree.children.get(&(at, c)) {
                    Some(&child) => child,
                    None => {
                        let child = tree.nodes.len();
                        tree.nodes.push(Node { parent: at, children: 0, link: None });
                        tree.nodes[at].children += 1;
                        tree.children.insert((at, c), child);
                        child
                    }
                };
            }
            if f.kind == EntryKind::Symlink {
                // An entry listed before its parent symlink (only possible in an unsorted list)
                // would also be written through the link.
                if tree.nodes[at].children > 0 {
                    return Err(Error::BadManifest(format!("symlink {:?} has entries below it", f.path)));
                }
                tree.nodes[at].link = Some(f);
            }
        }
        Ok(tree)
    }

    /// Resolves every symlink, refusing any that leaves the tree or does not resolve.
    fn check_all(&mut self) -> Result<()> {
        for node in 0..self.nodes.len() {
            let Some(link) = self.nodes[node].link else { continue };
            self.resolve(node, 0).map_err(|problem| {
                let (path, target) = (link.path.clone(), link.target.clone().unwrap_or_default());
                match problem {
                    ChainProblem::Escape => Error::SymlinkEscape { path, target },
                    ChainProblem::Loop => Error::SymlinkLoop { path, target },
                }
            })?;
        }
        Ok(())
    }

    /// Where the symlink at `node` leads, and how deeply links nest on the way. Each link is
    /// resolved once and remembered, so a whole tree costs time linear in its targets' lengths;
    /// `depth` is how many links are being resolved around this one.
    fn resolve(&mut self, node: usize, depth: usize) -> std::result::Result<(Loc, usize), ChainProblem> {
        match self.resolved.get(&node) {
            Some(Resolution::Done { at, hops }) => return Ok((*at, *hops)),
            Some(Resolution::InProgress) => return Err(ChainProblem::Loop),
            None => {}
        }
        if depth >= MAX_SYMLINK_HOPS {
            return Err(ChainProblem::Loop);
        }
        let Some(link) = self.nodes[node].link else {
            return Ok((Loc { node, missing: 0 }, 0));
        };
        let target = link.target.as_deref().unwrap_or_default();
        if target.is_empty() || target.starts_with('/') || target.contains('\0') {
            return Err(ChainProblem::Escape);
        }
        self.resolved.insert(node, Resolution::InProgress);
        // A link's target is read relative to the directory that holds the link.
        let mut at = Loc { node: self.nodes[node].parent, missing: 0 };
        let mut inner = 0usize;
        for c in target.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if at.missing > 0 {
                        at.missing -= 1;
                    } else if at.node == 0 {
                        return Err(ChainProblem::Escape);
                    } else {
                        at.node = self.nodes[at.node].parent;
                    }
                }
                name => {
                    if at.missing > 0 {
                        at.missing += 1;
                        continue;
                    }
                    match self.children.get(&(at.node, name)).copied() {
                        None => at.missing = 1,
                        Some(child) if self.nodes[child].link.is_some() => {
                            let (to, hops) = self.resolve(child, depth + 1)?;
                            inner = inner.max(hops);
                            at = to;
                        }
                        Some(child) => at = Loc { node: child, missing: 0 },
                    }
                }
            }
        }
        let hops = inner + 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(ChainProblem::Loop);
        }
        self.resolved.insert(node, Resolution::Done { at, hops });
        Ok((at, hops))
    }
}

/// Resolves every symlink a file list declares against the tree the list describes, following
/// the list's own symlinks component by component, and refuses any chain that leaves the release
/// directory ([`Error::SymlinkEscape`]) or does not resolve within [`MAX_SYMLINK_HOPS`] nested
/// links ([`Error::SymlinkLoop`]). Checking each link on its own is not enough: `d/e/up -> ../..`
/// and `x -> d/e/up/../../secret` each look inside, yet `x` leads out of the tree.
pub(crate) fn check_symlink_chains(files: &[FileEntry]) -> Result<()> {
    for f in files {
        if let Some(t) = &f.target {
            if t.len() > MAX_SYMLINK_TARGET {
                return Err(Error::Limit(format!(
                    "symlink {:?} has a {}-byte target, more than {MAX_SYMLINK_TARGET}",
                    f.path,
                    t.len()
                )));
            }
        }
    }
    Tree::new(files)?.check_all()
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
        check_symlink_chains(&self.files)?;
        // The config is held to the same rules as convoy.toml: a manifest assembled by hand and
        // signed must not hand the agent values (a user name, a signal) that build would refuse.
        self.config.validate()?;
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

    fn dir(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            size: 0,
            sha256: None,
            target: None,
        }
    }

    fn file(path: &str) -> FileEntry {
        FileEntry { kind: EntryKind::File, mode: 0o644, sha256: Some("0".repeat(64)), ..dir(path) }
    }

    fn link(path: &str, target: &str) -> FileEntry {
        FileEntry { kind: EntryKind::Symlink, mode: 0o777, target: Some(target.into()), ..dir(path) }
    }

    #[derive(Debug)]
    enum Want {
        Ok,
        Escape(&'static str),
        Loop,
        Through,
        Limit,
    }

    #[test]
    fn symlink_chains_are_resolved_through_the_tree() {
        let long = "a/".repeat(MAX_SYMLINK_TARGET / 2 + 1);
        let chain: Vec<FileEntry> =
            (0..=MAX_SYMLINK_HOPS).map(|i| link(&format!("l{i:02}"), &format!("l{:02}", i + 1))).collect();
        let short_chain: Vec<FileEntry> = (0..MAX_SYMLINK_HOPS)
            .map(|i| link(&format!("l{i:02}"), &format!("l{:02}", i + 1)))
            .chain([file(&format!("l{MAX_SYMLINK_HOPS:02}"))])
            .collect();
        let cases: Vec<(&str, Vec<FileEntry>, Want)> = vec![
            ("plain links", vec![file("a"), link("b", "a"), dir("d"), link("d/c", "../a")], Want::Ok),
            (
                "a chain that ends inside",
                vec![dir("d"), dir("d/e"), link("d/e/up", "../.."), link("x", "d/e/up/d/e")],
                Want::Ok,
            ),
            ("a link to the root itself", vec![link("root", ".")], Want::Ok),
            ("a dangling link inside", vec![link("x", "missing/file")], Want::Ok),
            ("out of a missing directory and back", vec![link("x", "missing/deeper/../../a")], Want::Ok),
            (
                "the up-and-out chain",
                vec![dir("d"), dir("d/e"), link("d/e/up", "../.."), link("x", "d/e/up/../../secret")],
                Want::Escape("x"),
            ),
            (
                "through a directory link that sorts after the escaping one",
                vec![link("b", "z/dirlink/.."), dir("z"), link("z/dirlink", "..")],
                Want::Escape("b"),
            ),
            ("a link to the root, then up", vec![link("a", "b/.."), link("b", ".")], Want::Escape("a")),
            (
                "a chain of three",
                vec![link("a", "b/x"), link("b", "c/.."), link("c", ".")],
                Want::Escape("a"),
            ),
            ("lexically outside", vec![dir("d"), link("d/l", "../../etc")], Want::Escape("d/l")),
            ("absolute", vec![link("l", "/etc")], Want::Escape("l")),
            ("empty target", vec![link("l", "")], Want::Escape("l")),
            ("a two-link loop", vec![link("a", "b"), link("b", "a")], Want::Loop),
            ("a link into itself", vec![link("a", "a/x")], Want::Loop),
            ("a loop through a directory", vec![dir("d"), link("d/l", "../d/l/x")], Want::Loop),
            ("a chain one link too long", chain, Want::Loop),
            ("a chain just short enough", short_chain, Want::Ok),
            ("an entry below a link", vec![link("d", "e"), file("d/x"), dir("e")], Want::Through),
            ("a target longer than the kernel allows", vec![link("l", &long)], Want::Limit),
        ];
        for (name, files, want) in cases {
            let got = check_symlink_chains(&files);
            let ok = match (&want, &got) {
                (Want::Ok, Ok(())) => true,
                (Want::Escape(p), Err(Error::SymlinkEscape { path, .. })) => path == p,
                (Want::Loop, Err(Error::SymlinkLoop { .. })) => true,
                (Want::Through, Err(Error::ThroughSymlink { .. })) => true,
                (Want::Limit, Err(Error::Limit(_))) => true,
                _ => false,
            };
            assert!(ok, "{name}: wanted {want:?}, got {got:?}");
            // The verdict must not depend on the order of the list.
            let mut reversed = files.clone();
            reversed.reverse();
            let again = check_symlink_chains(&reversed);
            if !matches!(want, Want::Through) {
                assert_eq!(got.is_ok(), again.is_ok(), "{name}: order changed the verdict: {again:?}");
            }
        }
    }
}
