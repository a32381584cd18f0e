//! The agent's journal and state in sled. Every record carries a format version; every write
//! that an acknowledgement depends on is flushed first.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

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
    /// Process group of the supervised service, so a restarted agent can stop an orphan.
    pub service_pgid: Option<i32>,
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

fn enc<T: Serialize>(body: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: FORMAT, body }).unwrap_or_default()
}

fn dec<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    let env: Envelope<serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| Error::State(format!("{what}: {e}")))?;
    if env.v != FORMAT {
        return Err(Error::State(format!("{what}: format version {} (this build reads {FORMAT})", env.v)));
    }
    serde_json::from_value(env.body).map_err(|e| Error::State(format!("{what}: {e}")))
}

fn sled_err(e: sled::Error) -> Error {
    Error::State(e.to_string())
}

impl State {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new().path(dir).open().map_err(sled_err)?;
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

    pub fn set_last_seq(&self, seq: u64) -> Result<()> {
        self.meta.insert("last_seq", &seq.to_be_bytes()).map_err(sled_err)?;
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
        self.apps.insert(app, enc(rec)).map_err(sled_err)?;
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
        self.installed.insert(format!("{}@{}", rec.app, rec.version), enc(rec)).map_err(sled_err)?;
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
        self.journal.insert(a.app.as_bytes(), enc(a)).map_err(sled_err)?;
        self.flush()
    }

    pub fn clear_activation(&self, app: &str) -> Result<()> {
        self.journal.remove(app).map_err(sled_err)?;
        self.flush()
    }
}
