//! Why an order did not apply. Each variant knows whether it is a refusal (nothing was tried and
//! nothing changed) or a failure (something was tried; the running release keeps running or was
//! reverted to), which is what the controller is told.

use crate::order::{Outcome, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// An order field or request that is not allowed here.
    #[error("{0}")]
    Refused(Refusal),
    #[error("{app}@{version} is not installed on this agent")]
    NotInstalled { app: String, version: String },
    /// The release's signatures do not verify against the trust set in force now (for example,
    /// its key was removed from `--trust`).
    #[error("{app}@{version} is not trusted any more: {source}")]
    Untrusted { app: String, version: String, source: Box<convoy_bundle::Error> },
    /// A kept release's files differ from its signed manifest.
    #[error("kept release {app}@{version} is corrupted: {source}")]
    Corrupted { app: String, version: String, source: Box<convoy_bundle::Error> },
    /// The bundle failed verification or cannot run here.
    #[error("install of {app}@{version} refused: {message}")]
    BadBundle { app: String, version: String, message: String },
    #[error("{app}@{version} is installed from a different bundle ({digest})")]
    DigestConflict { app: String, version: String, digest: String },
    /// A hook failed before the switch; nothing changed.
    #[error("{0}")]
    Hook(String),
    /// The release was switched to and did not confirm; the text says what runs now.
    #[error("{0}")]
    Unconfirmed(String),
    #[error("download: {0}")]
    Download(crate::Error),
    #[error("{0}")]
    Agent(#[from] crate::Error),
    #[error("{0}")]
    Internal(String),
}

impl ExecError {
    /// The answer the controller gets.
    pub fn into_outcome(self) -> Outcome {
        let field = match &self {
            Self::Refused(r) => return Outcome::Refused(r.clone()),
            Self::NotInstalled { .. } | Self::DigestConflict { .. } => "version",
            Self::Untrusted { .. } | Self::Corrupted { .. } | Self::BadBundle { .. } => "release",
            _ => return Outcome::Failed(self.to_string()),
        };
        Outcome::Refused(Refusal::new(field, self.to_string()))
    }
}
