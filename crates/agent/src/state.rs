//! The agent's journal and state in sled. Every record carries a format version; every write
//! that an acknowledgement depends on is flushed first.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const FORMAT: u32 = 1;

/// Health as the agent last saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    #[default]
    Unknown,
    Checking,
    Healthy,
    Unhealthy,
    None,
}

/// Per-app state. The `current` symlink on disk is the truth for what is active; this mirrors
/// it and adds what the disk cannot say.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub current: Option<String>,
    /// The last release that passed its health gate.
    pub known_good: Option<String>,
    /// The release that was current before `current`: the default rollback target.
    pub previous: Option<String>,
    pub health: HealthState,
    pub last_error: Option<String>,
    /// Proof of the supervised service's process group (pgid, boot id, start time), so a
    /// restarted agent stops an orphan only if it is provably still its own. Records from
    /// before carried a bare pgid, which is ignored: it proves nothing after a reboot.
    #[serde(default)]
    pub service: Option<crate::process::ProcessStamp>,
    /// Releases that passed their health gate, oldest first, one entry per activation (bounded
    /// by [`HISTORY_LEN`]). A rollback walks it backwards from the release it rolls back from.
    /// Records written before it existed are seeded from `previous` and `known_good`.
    #[serde(default)]
    pub history: Vec<String>,
    /// Releases this agent rolled back from or reverted after a failed health gate: never
    /// chosen as an automatic rollback target again. An explicit deploy clears the mark.
    #[serde(default)]
    pub bad: std::collections::BTreeSet<String>,
}

/// How many committed activations an app's history keeps.
pub const HISTORY_LEN: usize = 64;

impl AppRecord {
    /// The history, seeded from the fields older records had.
    pub fn history(&self) -> Vec<String> {
        if !self.history.is_empty() {
            return self.history.clone();
        }
        self.previous.iter().chain(self.known_good.iter()).cloned().collect()
    }

    /// Records a committed activation of `version`.
    pub fn push_history(&mut self, version: &str) {
        let mut h = self.history();
        h.push(version.to_owned());
        let excess = h.len().saturating_sub(HISTORY_LEN);
        h.drain(..excess);
        self.history = h;
    }

    /// The newest release activated before the latest activation of `from` that passed its
    /// health gate, is not marked bad, is not `from` itself and is still installed: where a
    /// rollback from `from` goes. `None` when there is nothing to go back to.
    pub fn rollback_target(&self, from: &str, installed: &[String]) -> Option<String> {
        let h = self.history();
        let end = h.iter().rposition(|v| v == from).unwrap_or(h.len());
        h[..end]
            .iter()
            .rev()
            .find(|v| v.as_str() != from && !self.bad.contains(*v) && installed.contains(v))
            .cloned()
    }
}

/// An installed release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRecord {
    pub app: String,
    pub version: String,
    pub digest: String,
    /// Increasing install order, for retention.
    pub order: u64,
}

/// Why an activation is happening.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationKind {
    Deploy,
    Rollback,
    /// Automatic switch back after a failed health gate.
    Revert,
}

/// The steps of an activation, journaled before each is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Decided; `current` still points at `from`.
    Started,
    /// `current` points at `to`; the service may not run yet and health is unconfirmed.
    Switched,
}

/// An activation in flight, per app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub app: String,
    pub from: Option<String>,
    pub to: String,
    pub kind: ActivationKind,
    pub step: Step,
    pub health_deadline_ms: u64,
}

#[derive(Clone)]
pub struct State {
    db: sled::Db,
    meta: sled::Tree,
    apps: sled::Tree,
    installed: sled::Tree,
    journal: sled::Tree,
}

fn enc<T: Serialize>(body: &T) -> Result<Vec<u8>> {
    convoy_base::record::encode(FORMAT, body).map_err(|e| Error::State(format!("encode: {e}")))
}

fn dec<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    convoy_base::record::decode(FORMAT, bytes).map_err(|e| Error::State(format!("{what}: {e}")))
}

fn sled_err(e: sled::Error) -> Error {
    Error::State(e.to_string())
}

impl State {
    pub fn open(dir: &Path) -> Result<Self> {
        // A state store just closed in this process (an agent restarted in place) is let go
        // of by sled's flusher a moment after its last handle: wait for it briefly.
        let config = sled::Config::new().path(dir);
        let locked = |e: &sled::Error| matches!(e, sled::Error::Io(io) if convoy_base::files::lock_held(io));
        let db =
            convoy_base::files::retry_while_busy(std::time::Duration::from_secs(3), || config.open(), locked)
                .map_err(sled_err)?;
        let t = |n: &str| db.open_tree(n).map_err(sled_err);
        Ok(Self {
            meta: t("meta")?,
            apps: t("apps")?,
            installed: t("installed")?,
            journal: t("journal")?,
            db,
        })
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    pub fn last_seq(&self) -> Result<u64> {
        Ok(self
            .meta
            .get("last_seq")
            .map_err(sled_err)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Raises the last applied sequence number to `seq` (never lowers it) and flushes.
    pub fn raise_last_seq(&self, seq: u64) -> Result<()> {
        self.meta
            .fetch_and_update("last_seq", |old| {
                let old = old.and_then(|v| v.try_into().ok().map(u64::from_be_bytes)).unwrap_or(0);
                Some(old.max(seq).to_be_bytes().to_vec())
            })
            .map_err(sled_err)?;
        self.flush()
    }

    pub fn next_install_order(&self) -> Result<u64> {
        let id = self.db.generate_id().map_err(sled_err)?;
        Ok(id)
    }

    pub fn app(&self, app: &str) -> Result<AppRecord> {
        Ok(self.apps.get(app).map_err(sled_err)?.map(|b| dec("app", &b)).transpose()?.unwrap_or_default())
    }

    pub fn apps(&self) -> Result<Vec<(String, AppRecord)>> {
        self.apps
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), dec("app", &v)?))
            })
            .collect()
    }

    pub fn put_app(&self, app: &str, rec: &AppRecord) -> Result<()> {
        self.apps.insert(app, enc(rec)?).map_err(sled_err)?;
        self.flush()
    }

    pub fn installed(&self, app: &str, version: &str) -> Result<Option<InstalledRecord>> {
        let key = format!("{app}@{version}");
        self.installed.get(&key).map_err(sled_err)?.map(|b| dec("installed", &b)).transpose()
    }

    pub fn installed_for(&self, app: &str) -> Result<Vec<InstalledRecord>> {
        let mut out: Vec<InstalledRecord> = self
            .installed
            .scan_prefix(format!("{app}@"))
            .map(|kv| {
                let (_, v) = kv.map_err(sled_err)?;
                dec("installed", &v)
            })
            .collect::<Result<_>>()?;
        out.sort_by_key(|r| r.order);
        Ok(out)
    }

    pub fn put_installed(&self, rec: &InstalledRecord) -> Result<()> {
        self.installed.insert(format!("{}@{}", rec.app, rec.version), enc(rec)?).map_err(sled_err)?;
        self.flush()
    }

    pub fn remove_installed(&self, app: &str, version: &str) -> Result<()> {
        self.installed.remove(format!("{app}@{version}")).map_err(sled_err)?;
        self.flush()
    }

    pub fn activation(&self, app: &str) -> Result<Option<Activation>> {
        self.journal.get(app).map_err(sled_err)?.map(|b| dec("journal", &b)).transpose()
    }

    pub fn activations(&self) -> Result<Vec<Activation>> {
        self.journal.iter().map(|kv| dec("journal", &kv.map_err(sled_err)?.1)).collect()
    }

    pub fn put_activation(&self, a: &Activation) -> Result<()> {
        self.journal.insert(a.app.as_bytes(), enc(a)?).map_err(sled_err)?;
        self.flush()
    }

    pub fn clear_activation(&self, app: &str) -> Result<()> {
        self.journal.remove(app).map_err(sled_err)?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(history: &[&str], bad: &[&str]) -> AppRecord {
        AppRecord {
            history: history.iter().map(|s| s.to_string()).collect(),
            bad: bad.iter().map(|s| s.to_string()).collect(),
            ..AppRecord::default()
        }
    }

    #[test]
    fn rollback_only_goes_back() {
        let all: Vec<String> = ["1.0.0", "2.0.0", "3.0.0"].iter().map(|s| s.to_string()).collect();
        // (history, bad, from, expected target)
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a str, Option<&'a str>);
        let cases: &[Case] = &[
            (&["1.0.0", "2.0.0", "3.0.0"], &[], "3.0.0", Some("2.0.0")),
            // The second rollback: 3.0.0 was rolled back from (bad), 2.0.0 is current again.
            (&["1.0.0", "2.0.0", "3.0.0", "2.0.0"], &["3.0.0"], "2.0.0", Some("1.0.0")),
            // Nothing older than the first release.
            (&["1.0.0", "2.0.0", "3.0.0", "2.0.0", "1.0.0"], &["3.0.0", "2.0.0"], "1.0.0", None),
            (&["1.0.0"], &[], "1.0.0", None),
            // A bad release in between is skipped.
            (&["1.0.0", "2.0.0", "3.0.0"], &["2.0.0"], "3.0.0", Some("1.0.0")),
            // `from` never committed here (its gate is still running): the newest good one.
            (&["1.0.0", "2.0.0"], &[], "3.0.0", Some("2.0.0")),
        ];
        for (h, bad, from, want) in cases {
            assert_eq!(
                rec(h, bad).rollback_target(from, &all).as_deref(),
                *want,
                "{h:?} bad {bad:?} from {from}"
            );
        }
        // A release that is no longer installed is not a target.
        let some = vec!["1.0.0".to_string(), "3.0.0".to_string()];
        assert_eq!(
            rec(&["1.0.0", "2.0.0", "3.0.0"], &[]).rollback_target("3.0.0", &some).as_deref(),
            Some("1.0.0")
        );
    }

    #[test]
    fn old_records_seed_history() {
        let old = AppRecord {
            previous: Some("1.0.0".into()),
            known_good: Some("2.0.0".into()),
            ..AppRecord::default()
        };
        assert_eq!(old.history(), vec!["1.0.0", "2.0.0"]);
        let bytes = br#"{"v":1,"current":"2.0.0","known_good":"2.0.0","previous":"1.0.0","health":"healthy","last_error":null,"service_pgid":null}"#;
        let decoded: AppRecord = dec("app", bytes).unwrap();
        assert_eq!(
            decoded.rollback_target("2.0.0", &["1.0.0".into(), "2.0.0".into()]).as_deref(),
            Some("1.0.0")
        );
    }
}
