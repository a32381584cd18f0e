//! The Convoy agent: it enrolls with a controller once, then keeps one mutual-TLS session open,
//! says hello with what it has on disk, sends heartbeats, renews its certificate well before it
//! expires, and reconnects with backoff when the controller goes away.
//!
//! The agent is a library first: [`Agent`] holds no process-global state, so several agents run
//! in one process (tests, the demo, benchmarks). The `convoy-agent` binary is a thin wrapper.

#![forbid(unsafe_code)]

mod download;
mod enroll;
mod exec;
mod health;
mod identity;
mod layout;
pub mod order;
mod process;
mod session;
pub mod state;

use std::path::PathBuf;
use std::time::Duration;

pub use download::{DownloadOptions, Downloaded, Downloader};
pub use enroll::{enroll, EnrollOptions};
pub use exec::{ExecConfig, ExecError, Executor, MAX_SEQ_JUMP};
pub use identity::{AgentFile, AGENT_FILE, CA_FILE, IDENTITY_FILE};
pub use layout::{Layout, LOG_TAIL_MAX_BYTES};
pub use process::{
    stop_stamped_group, Log, ProcessStamp, RunAs, ServiceSpec, StopOutcome, Supervised, INHERITED_ENV,
};
pub use session::{Agent, AgentConfig, AgentStatus};

/// Everything the agent reports as a failure, each naming what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is already enrolled (found {1}); use a new data directory")]
    AlreadyEnrolled(PathBuf, PathBuf),
    #[error("{0} is not enrolled: run `convoy-agent enroll` first")]
    NotEnrolled(PathBuf),
    #[error("agent file {path}: {message}")]
    AgentFile { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Pki(#[from] convoy_pki::Error),
    #[error(transparent)]
    Dial(#[from] convoy_transport::Error),
    #[error("controller refused: {}", .0.message())]
    Refused(tonic::Status),
    #[error("agent state: {0}")]
    State(String),
    #[error("invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("group {0:?} does not exist")]
    NoSuchGroup(String),
    #[error("cannot run a child as uid {uid} gid {gid}: the agent runs as uid {agent_uid}, not root, and can only run children as itself")]
    RunAsNotPermitted { uid: u32, gid: u32, agent_uid: u32 },
    #[error("{0} is a symbolic link: refusing to follow it")]
    Symlink(PathBuf),
    #[error("bundle {digest} is {size} bytes, more than the {max}-byte limit")]
    BundleTooLarge { digest: String, size: u64, max: u64 },
    #[error("download of bundle {digest} refused: {message}")]
    Download { digest: String, message: String },
}

impl From<convoy_base::files::Error> for Error {
    fn from(e: convoy_base::files::Error) -> Self {
        Error::Io { path: e.path, source: e.source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reconnection backoff: exponential with full jitter between half and all of the step,
/// capped at `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        step.mul_f64(jitter)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        assert!(b.next_delay() >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
