//! Child processes: hooks with timeouts, and supervised services that restart on crash with
//! backoff and stop with their signal, then SIGKILL. Output goes to a size-capped log file.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

/// Builds a command: relative program paths with a `/` resolve in `cwd` (the release
/// directory); the child gets its own process group so the whole tree can be signalled.
pub fn command(argv: &[String], cwd: &Path, env: &[(String, String)]) -> Command {
    let program = Path::new(&argv[0]);
    let program: PathBuf = if program.is_relative() && argv[0].contains('/') {
        cwd.join(program)
    } else {
        program.to_path_buf()
    };
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]).current_dir(cwd).envs(env.iter().map(|(k, v)| (k, v)));
    cmd.process_group(0);
    cmd
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

/// Signals a process group; a group that is already gone is fine.
pub fn signal_group(pgid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pgid) {
        let _ = kill_process_group(pid, sig);
    }
}

/// Whether a process group still has members.
pub fn group_alive(pgid: i32) -> bool {
    Pid::from_raw(pgid).is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
}

/// Stops a process group: `sig`, then SIGKILL after `grace`.
pub async fn stop_group(pgid: i32, sig: Signal, grace: Duration) {
    signal_group(pgid, sig);
    let until = tokio::time::Instant::now() + grace;
    while group_alive(pgid) && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if group_alive(pgid) {
        signal_group(pgid, Signal::KILL);
    }
}

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

    pub async fn write(&self, bytes: &[u8]) {
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = tokio::fs::create_dir_all(dir).await;
            }
            *guard = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.ok();
        }
        let Some(f) = guard.as_mut() else { return };
        let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        if size + bytes.len() as u64 > self.cap {
            let _ = f.flush().await;
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            let _ = tokio::fs::rename(&self.path, &rotated).await;
            *guard = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.ok();
        }
        if let Some(f) = guard.as_mut() {
            let _ = f.write_all(bytes).await;
        }
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

    /// The last `lines` lines of the log (and its rotated predecessor if needed).
    pub fn tail(path: &Path, lines: usize) -> String {
        let mut rotated = path.to_path_buf().into_os_string();
        rotated.push(".1");
        let mut text = std::fs::read_to_string(&rotated).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Runs a hook to completion within `timeout`; its output goes to `log`.
pub async fn run_hook(
    name: &str,
    argv: &[String],
    cwd: &Path,
    env: &[(String, String)],
    timeout: Duration,
    log: &Log,
) -> Result<(), String> {
    log.write(format!("--- hook {name}: {}\n", argv.join(" ")).as_bytes()).await;
    let mut cmd = command(argv, cwd, env);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("hook {name}: cannot start {}: {e}", argv[0]))?;
    if let Some(o) = child.stdout.take() {
        log.pump(o);
    }
    if let Some(e) = child.stderr.take() {
        log.pump(e);
    }
    let pgid = child.id().map(|p| p as i32);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("hook {name} failed: {} exited with {status}", argv[0])),
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
}

/// A running supervised service.
pub struct Supervised {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The current child's process group, 0 when none runs.
    pub pgid: watch::Receiver<i32>,
}

impl Supervised {
    /// Starts supervising: start, restart on exit with backoff (100 ms doubling to 5 s, reset
    /// after 10 s of uptime), until stopped.
    pub fn start(spec: ServiceSpec, log: Log) -> Self {
        let cancel = CancellationToken::new();
        let (pgid_tx, pgid) = watch::channel(0);
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let mut cmd = command(&spec.argv, &spec.cwd, &spec.env);
                cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
                // If the supervisor itself is dropped without a stop (its runtime ends), the
                // service must not outlive it unsupervised.
                cmd.kill_on_drop(true);
                let started = tokio::time::Instant::now();
                match cmd.spawn() {
                    Ok(mut child) => {
                        if let Some(o) = child.stdout.take() {
                            log.pump(o);
                        }
                        if let Some(e) = child.stderr.take() {
                            log.pump(e);
                        }
                        let g = child.id().map(|p| p as i32).unwrap_or(0);
                        let _ = pgid_tx.send(g);
                        tokio::select! {
                            status = child.wait() => {
                                let _ = pgid_tx.send(0);
                                // Reap what the service left in its group.
                                signal_group(g, Signal::KILL);
                                let msg = format!("--- service exited: {}\n", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
                                log.write(msg.as_bytes()).await;
                                tracing::warn!(argv0 = %spec.argv[0], "service exited, restarting with backoff");
                            }
                            () = c.cancelled() => {
                                // Wait on our own child, not by polling the group: an exited but
                                // unreaped child would still look alive.
                                signal_group(g, spec.stop_signal);
                                if tokio::time::timeout(spec.stop_timeout, child.wait()).await.is_err() {
                                    signal_group(g, Signal::KILL);
                                    let _ = child.wait().await;
                                }
                                // Anything the service left behind in its group goes too.
                                signal_group(g, Signal::KILL);
                                let _ = pgid_tx.send(0);
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        log.write(format!("--- cannot start {}: {e}\n", spec.argv[0]).as_bytes()).await;
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
        Self { cancel, task, pgid }
    }

    /// Stops the service (its stop signal, then SIGKILL after the grace period) and waits.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}
