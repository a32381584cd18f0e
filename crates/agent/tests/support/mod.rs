//! A small harness for agent-level tests: a scratch directory with the agent's data dir, a
//! canary directory next to it that no order may touch, bundles built and placed in the
//! download cache (so installs need no network), and orders submitted to an [`Executor`] with
//! their answers awaited under a timeout.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use convoy_agent::{ExecConfig, Executor};
use convoy_bundle::{BuildOptions, SecretKey, TrustStore};
use convoy_proto::v1 as pb;
use pb::OrderOutcome;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// How long one order may take before a test gives up on it.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(60);

/// One test's world.
pub struct Env {
    _tmp: tempfile::TempDir,
    /// The scratch root (canonical, mode 0711 so an unprivileged service can traverse it).
    pub root: PathBuf,
    /// The agent's data directory.
    pub data: PathBuf,
    /// Where releases' children write what the tests read (mode 0777).
    pub out: PathBuf,
    /// A directory outside the data dir that no order may change.
    pub canary: PathBuf,
    canary_before: Snapshot,
    /// The default release key.
    pub key: SecretKey,
    seq: AtomicU64,
    builds: AtomicU64,
}

impl Env {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        set_mode(&root, 0o711);
        let out = root.join("out");
        std::fs::create_dir(&out).unwrap();
        set_mode(&out, 0o777);
        let canary = root.join("canary");
        make_canary(&canary);
        let canary_before = snapshot(&canary);
        Self {
            _tmp: tmp,
            data: root.join("agent"),
            out,
            canary,
            canary_before,
            root,
            key: SecretKey::generate(),
            seq: AtomicU64::new(0),
            builds: AtomicU64::new(0),
        }
    }

    /// A config trusting `keys`, with the defaults otherwise.
    pub fn config(&self, keys: &[&SecretKey]) -> ExecConfig {
        let trust = TrustStore::new(keys.iter().map(|k| k.public()).collect(), 1);
        ExecConfig::new(self.data.clone(), trust)
    }

    /// Opens an executor and runs its start-up. A previous executor on the same data dir may
    /// still be letting go of its state store; opening is retried until it has.
    pub async fn open(&self, cfg: ExecConfig) -> Executor {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let exec = loop {
            match Executor::open(cfg.clone()) {
                Ok(e) => break e,
                // The state store's lock is still held by the executor being dropped.
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot open the executor: {e}"),
            }
        };
        exec.recover().await.unwrap();
        exec
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Writes a release source directory: `convoy.toml` and `files` (`bin/*` executable).
    pub fn release_src(&self, toml: &str, files: &[(&str, String)]) -> PathBuf {
        let n = self.builds.fetch_add(1, Ordering::SeqCst);
        let src = self.root.join(format!("src-{n}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("convoy.toml"), toml).unwrap();
        for (path, text) in files {
            let p = src.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            set_mode(&p, if path.starts_with("bin/") { 0o755 } else { 0o644 });
        }
        src
    }

    /// Builds and signs a bundle.
    pub fn bundle(
        &self,
        key: &SecretKey,
        app: &str,
        version: &str,
        toml: &str,
        files: &[(&str, String)],
    ) -> PathBuf {
        let src = self.release_src(toml, files);
        let out =
            self.root.join(format!("{app}-{version}-{}.bundle", self.builds.fetch_add(1, Ordering::SeqCst)));
        let opts = BuildOptions {
            app: app.into(),
            version: version.into(),
            created_at: 1_700_000_000,
            target: None,
            zstd_level: 3,
        };
        convoy_bundle::build(&src, &opts, key, &out).unwrap();
        out
    }

    /// Places a bundle in the agent's download cache; returns its digest.
    pub fn cache(&self, bundle: &Path) -> String {
        let digest = convoy_bundle::sha256_file(bundle).unwrap();
        let cache = self.data.join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::copy(bundle, cache.join(format!("{digest}.bundle"))).unwrap();
        digest
    }

    /// Builds, caches and installs a release; asserts it was applied.
    pub async fn install(
        &self,
        exec: &Executor,
        key: &SecretKey,
        app: &str,
        version: &str,
        toml: &str,
        files: &[(&str, String)],
    ) {
        let digest = self.cache(&self.bundle(key, app, version, toml, files));
        let r = self.order(exec, install(app, version, &digest)).await;
        expect(&r, OrderOutcome::Applied, "");
    }

    /// Installs and activates a release; asserts both were applied.
    pub async fn deploy(
        &self,
        exec: &Executor,
        key: &SecretKey,
        app: &str,
        version: &str,
        toml: &str,
        files: &[(&str, String)],
    ) {
        self.install(exec, key, app, version, toml, files).await;
        let r = self.order(exec, activate(app, version, 0)).await;
        expect(&r, OrderOutcome::Applied, "");
        assert_eq!(current(&self.data, app).as_deref(), Some(version));
    }

    /// Submits an order with the next sequence number and waits for its answer.
    pub async fn order(&self, exec: &Executor, kind: pb::order::Kind) -> pb::OrderResult {
        submit(exec, pb::Order { seq: self.next_seq(), kind: Some(kind) }).await
    }

    /// The canary directory is byte-for-byte (content, modes, listing) what it was.
    pub fn assert_canary_unchanged(&self) {
        assert_same(
            &self.canary_before,
            &snapshot(&self.canary),
            "the canary directory outside the data dir",
        );
    }

    pub fn release_dir(&self, app: &str, version: &str) -> PathBuf {
        self.data.join("apps").join(app).join("releases").join(version)
    }

    /// The script of a service that records each start in `out/<name>.starts` and sleeps.
    pub fn sleeper(&self, name: &str) -> String {
        format!("#!/bin/sh\necho $$ >> {}/{name}.starts\nexec sleep 300\n", self.out.display())
    }

    /// How many times the sleeper `name` started.
    pub fn starts(&self, name: &str) -> usize {
        std::fs::read_to_string(self.out.join(format!("{name}.starts")))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// The pid of the sleeper `name` if it runs now: its latest start, still alive and still
    /// the `sleep` it became (health probes also run in the release dir, so a process there is
    /// not necessarily the service).
    pub fn service_pid(&self, name: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.out.join(format!("{name}.starts"))).ok()?;
        let pid: i32 = text.lines().last()?.trim().parse().ok()?;
        let proc = PathBuf::from(format!("/proc/{pid}"));
        std::fs::read_link(proc.join("cwd")).ok()?;
        let comm = std::fs::read_to_string(proc.join("comm")).ok()?;
        (comm.trim() == "sleep").then_some(pid)
    }

    /// Processes whose working directory is `dir` or below it.
    pub fn processes_in(&self, dir: &Path) -> Vec<i32> {
        processes_under(dir)
    }

    /// Stops the executor's services and checks nothing of this test still runs.
    pub async fn finish(&self, exec: Executor) {
        exec.shutdown().await;
        drop(exec);
        let root = self.root.clone();
        eventually("no process of this test is left", Duration::from_secs(20), || {
            processes_under(&root).is_empty()
        })
        .await;
        self.assert_canary_unchanged();
    }
}

impl Drop for Env {
    /// Whatever happened, nothing this test started outlives it.
    fn drop(&mut self) {
        use rustix::process::{kill_process, kill_process_group, Pid, Signal};
        for raw in processes_under(&self.root) {
            let Some(pid) = Pid::from_raw(raw) else { continue };
            // Not every process leads a group; one that is gone already is fine.
            if kill_process_group(pid, Signal::KILL).is_err() {
                match kill_process(pid, Signal::KILL) {
                    Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                    Err(e) => eprintln!("cannot kill leftover process {raw}: {e}"),
                }
            }
        }
    }
}

pub fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Processes (by /proc) whose working directory is `dir` or below it.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
            if cwd.starts_with(dir) {
                // A zombie keeps no cwd; one that is readable is alive.
                out.push(pid);
            }
        }
    }
    out
}

/// A canary with files, a subdirectory named like a version an attack targets, a symlink and
/// odd modes.
fn make_canary(dir: &Path) {
    std::fs::create_dir_all(dir.join("1.0.0/bin")).unwrap();
    std::fs::write(dir.join("1.0.0/bin/run"), "#!/bin/sh\necho canary\n").unwrap();
    set_mode(&dir.join("1.0.0/bin/run"), 0o750);
    std::fs::write(dir.join("1.0.0.log"), "CANARY SECRET LOG LINE\n").unwrap();
    set_mode(&dir.join("1.0.0.log"), 0o600);
    std::fs::write(dir.join("x"), "x marks the spot").unwrap();
    std::fs::write(dir.join("x.bundle"), "not a bundle").unwrap();
    std::fs::create_dir_all(dir.join("releases")).unwrap();
    std::os::unix::fs::symlink("1.0.0", dir.join("current")).unwrap();
    set_mode(&dir.join("1.0.0"), 0o700);
}

/// Everything about a tree a test can compare: per relative path, kind, mode and content or
/// link target.
pub type Snapshot = BTreeMap<PathBuf, (char, u32, Vec<u8>)>;

pub fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            let entry = if meta.file_type().is_symlink() {
                ('l', 0, std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes())
            } else if meta.is_dir() {
                stack.push(p.clone());
                ('d', mode, vec![])
            } else {
                ('f', mode, std::fs::read(&p).unwrap())
            };
            out.insert(rel, entry);
        }
    }
    out
}

/// Fails naming every path that was added, removed or changed between two snapshots.
#[track_caller]
pub fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
    let mut changes = Vec::new();
    for (path, entry) in before {
        match after.get(path) {
            None => changes.push(format!("removed {}", path.display())),
            Some(e) if e != entry => changes.push(format!("changed {}", path.display())),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        changes.push(format!("added {}", path.display()));
    }
    assert!(changes.is_empty(), "{what} changed: {changes:?}");
}

/// The version `apps/<app>/current` points at.
pub fn current(data: &Path, app: &str) -> Option<String> {
    let t = std::fs::read_link(data.join("apps").join(app).join("current")).ok()?;
    t.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// A channel that never connects; installs of cached bundles do not use it.
pub fn lazy_channel() -> Channel {
    Endpoint::from_static("http://127.0.0.1:1").connect_lazy()
}

/// An order whose answer is still to come.
pub struct Pending {
    seq: u64,
    rx: mpsc::Receiver<pb::AgentMessage>,
}

impl Pending {
    pub async fn wait(mut self) -> pb::OrderResult {
        let seq = self.seq;
        let msg = tokio::time::timeout(ORDER_TIMEOUT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("order {seq} got no answer within {ORDER_TIMEOUT:?}"))
            .unwrap_or_else(|| panic!("order {seq}: the executor dropped the reply channel"));
        match msg.msg {
            Some(pb::agent_message::Msg::Result(r)) => {
                assert_eq!(r.seq, seq, "the answer is for another order");
                r
            }
            other => panic!("order {seq}: expected an order result, got {other:?}"),
        }
    }
}

/// Submits an order without waiting for its answer.
pub fn submit_pending(exec: &Executor, order: pb::Order) -> Pending {
    let (tx, rx) = mpsc::channel(4);
    let seq = order.seq;
    exec.submit(order, lazy_channel(), tx);
    Pending { seq, rx }
}

/// Submits an order and waits for its answer.
pub async fn submit(exec: &Executor, order: pb::Order) -> pb::OrderResult {
    submit_pending(exec, order).wait().await
}

pub fn outcome(r: &pb::OrderResult) -> OrderOutcome {
    OrderOutcome::try_from(r.outcome).unwrap_or(OrderOutcome::Unspecified)
}

/// Asserts the outcome and the refused field (empty for anything but a refusal).
#[track_caller]
pub fn expect(r: &pb::OrderResult, want: OrderOutcome, field: &str) {
    assert_eq!(
        (outcome(r), r.field.as_str()),
        (want, field),
        "order {}: unexpected answer: {:?} field {:?}: {}",
        r.seq,
        outcome(r),
        r.field,
        r.message
    );
}

pub fn install(app: &str, version: &str, digest: &str) -> pb::order::Kind {
    pb::order::Kind::Install(pb::InstallOrder {
        app: app.into(),
        version: version.into(),
        digest: digest.into(),
    })
}

pub fn activate(app: &str, version: &str, deadline_secs: u32) -> pb::order::Kind {
    pb::order::Kind::Activate(pb::ActivateOrder {
        app: app.into(),
        version: version.into(),
        health_deadline_secs: deadline_secs,
    })
}

pub fn rollback(app: &str, from: &str, to: &str, reason: &str) -> pb::order::Kind {
    pb::order::Kind::Rollback(pb::RollbackOrder {
        app: app.into(),
        from_version: from.into(),
        to_version: to.into(),
        reason: reason.into(),
    })
}

pub fn logs(app: &str, lines: u32) -> pb::order::Kind {
    pb::order::Kind::Logs(pb::LogsOrder { app: app.into(), lines })
}

/// Polls `cond` every 20 ms until it holds; fails the test naming `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `convoy.toml` health section that passes at once: an exec check of `true`, fast.
pub const HEALTHY: &str =
    "[health]\nexec = [\"true\"]\ninterval = \"50ms\"\ntimeout = \"5s\"\nsuccesses = 2\ndeadline = \"30s\"\n";

/// A release with a sleeper service (see [`Env::sleeper`]) and [`HEALTHY`].
pub fn service_toml(extra: &str) -> String {
    format!("[service]\ncommand = [\"bin/svc\"]\nstop_timeout = \"5s\"\n{extra}\n{HEALTHY}")
}
