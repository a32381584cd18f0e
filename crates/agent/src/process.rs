//! Child processes: hooks with timeouts, and supervised services that restart on crash with
//! backoff and stop with their signal, then SIGKILL. Output goes to a size-capped log file.
//!
//! Children start from an empty environment (plus a short allowlist and what the release
//! declares), may run as an unprivileged user, and a process group recorded by an earlier run is
//! only ever signalled after proving it is still the one this agent started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;
use rustix::process::{kill_process_group, Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Variables a child inherits from the agent's own environment. Everything else the agent
/// happens to carry (credentials, proxy settings, `LD_PRELOAD`, the controller's address) stays
/// out: a release sees only what it declares plus these, which let programs find binaries and
/// format text and time the way the host expects.
pub const INHERITED_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];

/// Builds a command: relative program paths with a `/` resolve in `cwd` (the release
/// directory); the child gets its own process group so the whole tree can be signalled, and a
/// clean environment: [`INHERITED_ENV`] from the agent, then `env`.
pub fn command(argv: &[String], cwd: &Path, env: &[(String, String)]) -> Command {
    let first = argv.first().map(String::as_str).unwrap_or_default();
    let program = Path::new(first);
    let program: PathBuf =
        if program.is_relative() && first.contains('/') { cwd.join(program) } else { program.to_path_buf() };
    let mut cmd = Command::new(program);
    cmd.args(argv.iter().skip(1)).current_dir(cwd).env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.process_group(0);
    cmd
}

/// Like [`command`], refusing an empty argv and, when `run_as` is given, switching the child to
/// that user and group (see [`RunAs::apply`]).
pub fn command_as(
    argv: &[String],
    cwd: &Path,
    env: &[(String, String)],
    run_as: Option<&RunAs>,
) -> Result<Command> {
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::Invalid { what: "command", message: "the command is empty".into() });
    }
    let mut cmd = command(argv, cwd, env);
    if let Some(r) = run_as {
        r.apply(&mut cmd)?;
    }
    Ok(cmd)
}

/// The user and group a child runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Resolves a user (a name, or a numeric id when it is all digits) and an optional group
    /// (likewise). Without a group the user's primary group is used; a numeric uid that has no
    /// passwd entry then needs an explicit group, so a child never lands in group 0 by default.
    ///
    /// Name lookups go through the system's user database and may block (NSS can be remote):
    /// call this from a blocking context.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Self> {
        use nix::unistd::{Group, Uid, User};
        let numeric =
            |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u32>());
        let lookup = |what: &str, e: nix::Error| Error::Invalid {
            what: "run-as identity",
            message: format!("looking up {what}: {e}"),
        };
        let (uid, primary) = match numeric(user) {
            Some(Ok(uid)) => {
                let entry =
                    User::from_uid(Uid::from_raw(uid)).map_err(|e| lookup(&format!("uid {uid}"), e))?;
                (uid, entry.map(|u| u.gid.as_raw()))
            }
            Some(Err(_)) => return Err(Error::NoSuchUser(user.to_owned())),
            None => {
                let entry = User::from_name(user)
                    .map_err(|e| lookup(&format!("user {user:?}"), e))?
                    .ok_or_else(|| Error::NoSuchUser(user.to_owned()))?;
                (entry.uid.as_raw(), Some(entry.gid.as_raw()))
            }
        };
        let gid = match group {
            Some(g) => match numeric(g) {
                Some(Ok(gid)) => gid,
                Some(Err(_)) => return Err(Error::NoSuchGroup(g.to_owned())),
                None => Group::from_name(g)
                    .map_err(|e| lookup(&format!("group {g:?}"), e))?
                    .ok_or_else(|| Error::NoSuchGroup(g.to_owned()))?
                    .gid
                    .as_raw(),
            },
            None => primary.ok_or_else(|| Error::Invalid {
                what: "run-as identity",
                message: format!("uid {uid} has no user database entry, so a group must be given"),
            })?,
        };
        // A numeric group is accepted without a group database entry: the kernel needs only
        // the number, and minimal images often lack the entry.
        Ok(Self { uid, gid })
    }

    /// Whether this agent may start a child as this identity: root may switch to anyone; any
    /// other agent only "switches" to its own uid and gid, which needs no privilege.
    pub fn check_permitted(&self) -> Result<()> {
        let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
        if uid == 0 || (self.uid == uid && self.gid == gid) {
            Ok(())
        } else {
            Err(Error::RunAsNotPermitted { uid: self.uid, gid: self.gid, agent_uid: uid })
        }
    }

    /// Makes `cmd` start as this identity. As root the child's uid and gid are set (the
    /// standard library also drops every supplementary group when root changes the uid); as
    /// the identity itself nothing needs to change.
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        self.check_permitted()?;
        if rustix::process::geteuid().is_root() {
            cmd.uid(self.uid).gid(self.gid);
        }
        Ok(())
    }
}

pub fn signal_by_name(name: &str) -> Signal {
    match name {
        "SIGINT" => Signal::INT,
        "SIGQUIT" => Signal::QUIT,
        "SIGHUP" => Signal::HUP,
        "SIGKILL" => Signal::KILL,
        "SIGUSR1" => Signal::USR1,
        "SIGUSR2" => Signal::USR2,
        _ => Signal::TERM,
    }
}

/// Signals a process group this process started; a group that is already gone is fine. A group
/// recorded by an earlier run must go through [`stop_stamped_group`] instead.
pub fn signal_group(pgid: i32, sig: Signal) {
    let Some(pid) = Pid::from_raw(pgid) else { return };
    match kill_process_group(pid, sig) {
        Ok(()) | Err(Errno::SRCH) => {}
        Err(e) => tracing::warn!(pgid, signal = ?sig, error = %e, "cannot signal process group"),
    }
}

/// Whether a process group still has members.
pub fn group_alive(pgid: i32) -> bool {
    Pid::from_raw(pgid).is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
}

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Proof that a process group is one this agent started: its number, the boot it was started
/// in, and its leader's start time. After a reboot or once the leader has exited, the number
/// can belong to anyone; the stamp tells the two apart. Stored with an app's state so a
/// restarted agent can stop an orphaned service without risking a stranger's processes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStamp {
    pub pgid: i32,
    pub boot_id: String,
    /// The leader's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    pgrp: i32,
    start_time: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from after the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: pgrp is field 5, starttime field 22.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let pgrp = fields.get(2)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(Stat { pgrp, start_time })
}

fn read_stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string(BOOT_ID).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Whether a stamped group can be signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ours,
    NotOurs,
    Gone,
}

impl ProcessStamp {
    /// Stamps the process group led by `pgid`, which must be running and lead its group.
    /// Reads `/proc`, which does not block on storage.
    pub fn capture(pgid: i32) -> Option<Self> {
        let stat = read_stat(pgid)?;
        if stat.pgrp != pgid {
            return None;
        }
        Some(Self { pgid, boot_id: boot_id()?, start_time: stat.start_time })
    }

    /// Whether the group is still the one stamped: same boot, and its leader still exists with
    /// the same start time. While that leader lives its number cannot be reused, so the group
    /// with that number is the one it founded.
    pub fn still_ours(&self) -> bool {
        self.verdict() == Verdict::Ours
    }

    fn verdict(&self) -> Verdict {
        if boot_id().as_deref() != Some(self.boot_id.as_str()) {
            return Verdict::NotOurs;
        }
        match read_stat(self.pgid) {
            None => Verdict::Gone,
            Some(s) if s.start_time == self.start_time => Verdict::Ours,
            Some(_) => Verdict::NotOurs,
        }
    }
}

/// What [`stop_stamped_group`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The group was ours and ended after the stop signal.
    Stopped,
    /// The group was ours and outlived the grace period, so it got SIGKILL.
    Killed,
    /// Another boot, or a different process now has the leader's number: nothing was signalled.
    NotOurs,
    /// The leader no longer exists, so the group cannot be proven ours: nothing was signalled.
    Gone,
}

/// Stops a group recorded by an earlier run, but only if [`ProcessStamp::still_ours`] holds:
/// `sig`, then SIGKILL if the group outlives `grace`. Ownership is proven once, up front; from
/// then on the group is followed for as long as it keeps existing, because its number cannot be
/// reused until it is empty.
pub async fn stop_stamped_group(stamp: &ProcessStamp, sig: Signal, grace: Duration) -> StopOutcome {
    let s = stamp.clone();
    let verdict = match tokio::task::spawn_blocking(move || s.verdict()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(pgid = stamp.pgid, error = %e, "cannot check a recorded process group; leaving it alone");
            Verdict::NotOurs
        }
    };
    match verdict {
        Verdict::NotOurs => return StopOutcome::NotOurs,
        Verdict::Gone => return StopOutcome::Gone,
        Verdict::Ours => {}
    }
    signal_group(stamp.pgid, sig);
    let until = tokio::time::Instant::now() + grace;
    while group_alive(stamp.pgid) {
        if tokio::time::Instant::now() >= until {
            signal_group(stamp.pgid, Signal::KILL);
            return StopOutcome::Killed;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    StopOutcome::Stopped
}

/// Log directories and files: readable by the agent's group at most, never by everyone, since
/// output can carry secrets.
const LOG_DIR_MODE: u32 = 0o750;
const LOG_FILE_MODE: u32 = 0o640;

/// An append-only log file that rotates to `<name>.1` past `cap` bytes. Shared by a service
/// and its hooks.
#[derive(Clone)]
pub struct Log {
    path: PathBuf,
    cap: u64,
    file: Arc<Mutex<Option<tokio::fs::File>>>,
}

impl Log {
    pub fn new(path: PathBuf, cap: u64) -> Self {
        Self { path, cap, file: Arc::new(Mutex::new(None)) }
    }

    /// Opens the log for appending, creating its directory (mode 0750) and the file (0640).
    /// A directory or file left by an older agent with wider permissions is tightened.
    async fn open(path: &Path) -> std::io::Result<tokio::fs::File> {
        if let Some(dir) = path.parent() {
            if let Some(parent) = dir.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            match tokio::fs::DirBuilder::new().mode(LOG_DIR_MODE).create(dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let meta = tokio::fs::symlink_metadata(dir).await?;
                    if meta.is_dir() && meta.permissions().mode() & 0o027 != 0 {
                        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(LOG_DIR_MODE))
                            .await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let file =
            tokio::fs::OpenOptions::new().create(true).append(true).mode(LOG_FILE_MODE).open(path).await?;
        if file.metadata().await?.permissions().mode() & 0o027 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(LOG_FILE_MODE)).await?;
        }
        Ok(file)
    }

    /// Appends to the log. Logging is best effort: a failure is reported to the agent's own
    /// log and never stops the service or hook whose output it is.
    pub async fn write(&self, bytes: &[u8]) {
        if let Err(e) = self.try_write(bytes).await {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write to log");
        }
    }

    async fn try_write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut guard = self.file.lock().await;
        let file = match guard.take() {
            Some(f) => f,
            None => Self::open(&self.path).await?,
        };
        let mut file = file;
        let size = file.metadata().await?.len();
        if size + bytes.len() as u64 > self.cap {
            file.flush().await?;
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            tokio::fs::rename(&self.path, &rotated).await?;
            file = Self::open(&self.path).await?;
        }
        file.write_all(bytes).await?;
        // A tokio file hands writes to a blocking thread; flushing waits for it, so the size
        // checked for rotation next time is the real one.
        file.flush().await?;
        // Kept only after a successful write, so a failure reopens the file next time.
        *guard = Some(file);
        Ok(())
    }

    /// Copies a child's output into the log until it closes.
    pub fn pump(&self, mut from: impl AsyncRead + Unpin + Send + 'static) {
        let log = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = from.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.write(&buf[..n]).await;
            }
        });
    }
}

/// Runs a hook to completion within `timeout`, as `run_as` when given; its output goes to `log`.
pub async fn run_hook(
    name: &str,
    argv: &[String],
    cwd: &Path,
    env: &[(String, String)],
    timeout: Duration,
    log: &Log,
    run_as: Option<&RunAs>,
) -> Result<(), String> {
    log.write(format!("--- hook {name}: {}\n", argv.join(" ")).as_bytes()).await;
    let mut cmd = command_as(argv, cwd, env, run_as).map_err(|e| format!("hook {name}: {e}"))?;
    let program = argv.first().map(String::as_str).unwrap_or_default();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("hook {name}: cannot start {program}: {e}"))?;
    if let Some(o) = child.stdout.take() {
        log.pump(o);
    }
    if let Some(e) = child.stderr.take() {
        log.pump(e);
    }
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("hook {name} failed: {program} exited with {status}")),
        Ok(Err(e)) => Err(format!("hook {name}: {e}")),
        Err(_) => {
            if let Some(g) = pgid {
                signal_group(g, Signal::KILL);
            }
            Err(format!("hook {name} timed out after {timeout:?}"))
        }
    }
}

/// What a supervised service runs.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// The identity the service runs as; `None` keeps the agent's own.
    pub run_as: Option<RunAs>,
}

/// A running supervised service.
pub struct Supervised {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The current child's process group, 0 when none runs.
    pub pgid: watch::Receiver<i32>,
    /// Proof of the current child's process group, to store so that a restarted agent can stop
    /// it with [`stop_stamped_group`]; `None` when none runs (or it exited before it could be
    /// stamped).
    pub stamp: watch::Receiver<Option<ProcessStamp>>,
}

impl Supervised {
    /// Starts supervising: start, restart on exit with backoff (100 ms doubling to 5 s, reset
    /// after 10 s of uptime), until stopped.
    pub fn start(spec: ServiceSpec, log: Log) -> Self {
        let cancel = CancellationToken::new();
        let (pgid_tx, pgid) = watch::channel(0);
        let (stamp_tx, stamp) = watch::channel(None);
        let c = cancel.clone();
        let argv0 = spec.argv.first().cloned().unwrap_or_default();
        let task = tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let started = tokio::time::Instant::now();
                let spawned = match command_as(&spec.argv, &spec.cwd, &spec.env, spec.run_as.as_ref()) {
                    Ok(mut cmd) => {
                        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
                        // If the supervisor itself is dropped without a stop (its runtime ends),
                        // the service must not outlive it unsupervised.
                        cmd.kill_on_drop(true);
                        cmd.spawn().map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                match spawned {
                    Ok(mut child) => {
                        if let Some(o) = child.stdout.take() {
                            log.pump(o);
                        }
                        if let Some(e) = child.stderr.take() {
                            log.pump(e);
                        }
                        let g = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
                        pgid_tx.send_replace(g);
                        let stamped = tokio::task::spawn_blocking(move || ProcessStamp::capture(g))
                            .await
                            .ok()
                            .flatten();
                        stamp_tx.send_replace(stamped);
                        tokio::select! {
                            status = child.wait() => {
                                pgid_tx.send_replace(0);
                                stamp_tx.send_replace(None);
                                // Reap what the service left in its group.
                                signal_group(g, Signal::KILL);
                                let msg = format!("--- service exited: {}\n", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
                                log.write(msg.as_bytes()).await;
                                tracing::warn!(%argv0, "service exited, restarting with backoff");
                            }
                            () = c.cancelled() => {
                                // Wait on our own child, not by polling the group: an exited but
                                // unreaped child would still look alive.
                                signal_group(g, spec.stop_signal);
                                if tokio::time::timeout(spec.stop_timeout, child.wait()).await.is_err() {
                                    signal_group(g, Signal::KILL);
                                    if let Err(e) = child.wait().await {
                                        tracing::warn!(%argv0, error = %e, "cannot reap the stopped service");
                                    }
                                }
                                // Anything the service left behind in its group goes too.
                                signal_group(g, Signal::KILL);
                                pgid_tx.send_replace(0);
                                stamp_tx.send_replace(None);
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        log.write(format!("--- cannot start {argv0}: {e}\n").as_bytes()).await;
                        tracing::warn!(%argv0, error = %e, "cannot start service, retrying with backoff");
                    }
                }
                if started.elapsed() > Duration::from_secs(10) {
                    delay = Duration::from_millis(100);
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = c.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
        Self { cancel, task, pgid, stamp }
    }

    /// Stops the service (its stop signal, then SIGKILL after the grace period) and waits.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "service supervisor ended abnormally");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
