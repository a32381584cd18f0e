//! The controller's state, behind one small interface.
//!
//! [`Store`] is the typed API the services use: named trees of versioned JSON records, agents,
//! tokens, releases, the audit log, order sequence reservations. It is built on a byte-level
//! [`Backend`] (see [`backend`] for the contract a backend must meet): [`SledBackend`], the
//! local database every controller runs on, or [`MemoryBackend`] in tests. Every read-modify-write
//! is "read, compute, commit comparing what was read, retry on conflict", so it stays atomic on
//! any backend that provides linearizable compare-and-write, replicated ones included.
//!
//! Every write that changes a state transition is flushed before the call returns, so an
//! acknowledged change survives a crash. The methods are blocking; async callers run them on
//! the blocking pool (see [`crate::logic`]).

pub mod backend;
pub mod memory;
pub mod sled;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use self::backend::{Backend, Conflict, Tree, Txn};
pub use self::memory::MemoryBackend;
pub use self::sled::{sled_locked, SledBackend, LOCK_WAIT};

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state store: {0}")]
    Sled(#[from] ::sled::Error),
    /// A failure of a backend other than sled.
    #[error("state store: {0}")]
    Backend(String),
    #[error("state store record {key:?} in {tree}: {reason}")]
    Corrupt { tree: &'static str, key: String, reason: String },
    #[error("state store record {key:?} in {tree} has format version {found}, this build reads {expected}")]
    Version { tree: &'static str, key: String, found: u32, expected: u32 },
    #[error("audit entry {seq} would not come after the last one, {last}")]
    AuditOrder { seq: u64, last: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The format version of every record this build writes.
const FORMAT: u32 = 1;

fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    // Records are structs with string keys, which always serialize; a non-struct record is a
    // programming error caught by the tests.
    convoy_base::record::encode(FORMAT, body).expect("records are structs")
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<T> {
    let key = String::from_utf8_lossy(key).into_owned();
    convoy_base::record::decode(FORMAT, bytes).map_err(|e| match e {
        convoy_base::record::Error::Version { found, expected } => {
            Error::Version { tree, key, found, expected }
        }
        convoy_base::record::Error::Malformed(reason) => Error::Corrupt { tree, key, reason },
    })
}

/// A big-endian `u64` as stored in the meta tree and as audit keys; `None` if it is not one.
fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn key_string(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

const SEQ_RESERVED: &[u8] = b"seq_reserved";
const SEQ_JUMPED: &[u8] = b"seq_jumped";

/// A join token as stored: only its hash is the key, never the token itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub region: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Whether the enrolling agent may add labels of its own (`--allow-agent-labels`); by
    /// default an agent's labels come from its token only, so it cannot put itself into a
    /// selector-targeted rollout.
    #[serde(default)]
    pub allow_agent_labels: bool,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: String,
    pub used_by: Option<String>,
    /// The environment the enrolling agent joins (tokens from before environments: production).
    #[serde(default)]
    pub environment: crate::logic::Environment,
}

/// A release an agent reported having on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedRelease {
    pub app: String,
    pub version: String,
    pub active: bool,
}

/// An enrolled agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub cert_serial: String,
    pub cert_not_after: i64,
    pub agent_version: String,
    pub releases: Vec<ReportedRelease>,
    pub revoked: bool,
    /// Per-app state the agent last reported.
    #[serde(default)]
    pub apps: Vec<AppStatusRecord>,
    /// The serial a renewal replaced, accepted until `previous_serial_until` so sessions and
    /// calls in flight during the renewal finish; after that only `cert_serial` is.
    #[serde(default)]
    pub previous_serial: Option<String>,
    #[serde(default)]
    pub previous_serial_until: i64,
    /// Whether the newest certificate has been presented since it was issued. Until it has,
    /// the one it replaced may renew again (the answer to its renewal may have been lost).
    #[serde(default)]
    pub cert_serial_used: bool,
    /// Set by its join token (agents enrolled before environments: production).
    #[serde(default)]
    pub environment: crate::logic::Environment,
}

/// Apps one agent's record holds at most; reports beyond are dropped.
pub const MAX_REPORTED_APPS: usize = 64;
/// Releases one agent's record holds at most (in total, and installed per app).
pub const MAX_REPORTED_RELEASES: usize = 256;
/// Bytes of an app's last error kept; longer ones are cut.
pub const MAX_REPORTED_ERROR: usize = 2048;

/// What an agent reported about one app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatusRecord {
    pub app: String,
    pub current: String,
    pub known_good: String,
    pub previous: String,
    pub health: String,
    pub last_error: String,
    pub installed: Vec<String>,
    pub busy: bool,
}

/// A release stored on the controller. The bundle itself is a blob named by its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub app: String,
    pub version: String,
    pub digest: String,
    pub size: u64,
    pub created_at: i64,
    pub pushed_at: i64,
    pub pushed_by: String,
    pub signers: Vec<String>,
    pub unpacked_size: u64,
    pub files: u32,
}

/// Why an enrollment commit did not happen.
#[derive(Debug)]
pub enum EnrollConflict {
    TokenGone,
    TokenUsed,
    AgentExists,
}

/// The controller's state store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl Store {
    /// Opens (or creates) the sled store in `dir`. The store is locked while open; a store just
    /// closed in this process (sled's background flusher lets go of it a moment after the last
    /// handle) is waited for up to [`LOCK_WAIT`]. Blocking: call it off the async threads.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self::with_backend(Arc::new(SledBackend::open(dir)?)))
    }

    /// A store on `backend`.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }

    /// Applies a transaction without compares, which cannot conflict.
    fn write(&self, txn: Txn) -> Result<()> {
        debug_assert!(txn.compares.is_empty());
        self.backend
            .commit(&txn)?
            .map_err(|Conflict| Error::Backend("a write without conditions was refused as a conflict".into()))
    }

    /// Stores a record; `durable` flushes before returning.
    pub fn put<T: Serialize>(&self, t: Tree, key: &str, value: &T, durable: bool) -> Result<()> {
        self.write(Txn::new().put(t, key.as_bytes(), encode(value)))?;
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    /// Stores a record only if the key is absent, atomically (compare-and-swap), and flushes
    /// before returning. Returns whether this call inserted it: of concurrent callers with the
    /// same key exactly one gets `true`.
    pub fn insert_if_absent<T: Serialize>(&self, t: Tree, key: &str, value: &T) -> Result<bool> {
        let key = key.as_bytes();
        let txn = Txn::new().compare(t, key, None).put(t, key, encode(value));
        let won = self.backend.commit(&txn)?.is_ok();
        if won {
            self.flush()?;
        }
        Ok(won)
    }

    /// The last record of a tree in key order.
    pub fn last<T: DeserializeOwned>(&self, t: Tree) -> Result<Option<(String, T)>> {
        self.backend.last(t)?.map(|(k, v)| Ok((key_string(&k), decode(t.name(), &k, &v)?))).transpose()
    }

    pub fn get<T: DeserializeOwned>(&self, t: Tree, key: &str) -> Result<Option<T>> {
        self.backend.get(t, key.as_bytes())?.map(|b| decode(t.name(), key.as_bytes(), &b)).transpose()
    }

    /// Every record in a tree, in key order, with its key.
    pub fn list<T: DeserializeOwned>(&self, t: Tree) -> Result<Vec<(String, T)>> {
        self.backend
            .scan(t)?
            .into_iter()
            .map(|(k, v)| Ok((key_string(&k), decode(t.name(), &k, &v)?)))
            .collect()
    }

    /// Removes a record and flushes. Returns whether it existed: of concurrent callers removing
    /// the same record exactly one gets `true`.
    pub fn remove(&self, t: Tree, key: &str) -> Result<bool> {
        let key = key.as_bytes();
        let existed = loop {
            let Some(current) = self.backend.get(t, key)? else { break false };
            let txn = Txn::new().compare(t, key, Some(&current)).delete(t, key);
            if self.backend.commit(&txn)?.is_ok() {
                break true;
            }
        };
        self.flush()?;
        Ok(existed)
    }

    /// Appends an audit entry built by `make` from the previous entry (if any), atomically with
    /// respect to other appends, and flushes. The audit tree is keyed by big-endian sequence;
    /// `make` returns the new entry's, which must come after the previous entry's. `make` runs
    /// again, with the newer previous entry, when a concurrent append got there first.
    pub fn append_audit<T: Serialize + DeserializeOwned>(
        &self,
        mut make: impl FnMut(Option<T>) -> (u64, T),
    ) -> Result<T> {
        loop {
            let last = self.backend.last(Tree::Audit)?;
            let previous = last.as_ref().map(|(k, v)| decode::<T>("audit", k, v)).transpose()?;
            let (seq, entry) = make(previous);
            let key = seq.to_be_bytes();
            let mut txn = Txn::new().compare(Tree::Audit, &key, None);
            if let Some((last_key, last_value)) = &last {
                let last_seq = be_u64(last_key).unwrap_or(0);
                if seq <= last_seq {
                    return Err(Error::AuditOrder { seq, last: last_seq });
                }
                txn = txn.compare(Tree::Audit, last_key, Some(last_value));
            }
            let txn = txn.put(Tree::Audit, &key, encode(&entry));
            if self.backend.commit(&txn)?.is_ok() {
                self.flush()?;
                return Ok(entry);
            }
        }
    }

    /// Every audit entry in order, as stored (raw JSON, so verification sees exactly what is
    /// on disk).
    pub fn audit_raw(&self) -> Result<Vec<(u64, serde_json::Value)>> {
        self.backend
            .scan(Tree::Audit)?
            .into_iter()
            .map(|(k, v)| Ok((be_u64(&k).unwrap_or(0), decode("audit", &k, &v)?)))
            .collect()
    }

    /// The sequence number of the newest audit entry, if any.
    pub fn audit_last_seq(&self) -> Result<Option<u64>> {
        Ok(self.backend.last(Tree::Audit)?.map(|(k, _)| be_u64(&k).unwrap_or(0)))
    }

    /// The audit entry at `seq`, as stored.
    pub fn audit_at(&self, seq: u64) -> Result<Option<serde_json::Value>> {
        let key = seq.to_be_bytes();
        self.backend.get(Tree::Audit, &key)?.map(|v| decode("audit", &key, &v)).transpose()
    }

    /// The bytes of the audit entry at `seq`, exactly as stored: for tests that tamper with
    /// the log to prove verification catches it.
    #[doc(hidden)]
    pub fn audit_bytes_for_tests(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.backend.get(Tree::Audit, &seq.to_be_bytes())
    }

    /// Overwrites (`Some`) or deletes (`None`) the audit entry at `seq`, bypassing the chain,
    /// and flushes: for tests that tamper with the log to prove verification catches it.
    #[doc(hidden)]
    pub fn tamper_audit_for_tests(&self, seq: u64, bytes: Option<&[u8]>) -> Result<()> {
        let key = seq.to_be_bytes();
        self.write(match bytes {
            Some(b) => Txn::new().put(Tree::Audit, &key, b.to_vec()),
            None => Txn::new().delete(Tree::Audit, &key),
        })?;
        self.flush()
    }

    /// A fresh, increasing id.
    pub fn generate_id(&self) -> Result<u64> {
        self.backend.generate_id()
    }

    /// The stored counter `key` of the meta tree, as stored (for the compare) and as a number.
    fn meta(&self, key: &[u8]) -> Result<(Option<Vec<u8>>, Option<u64>)> {
        let raw = self.backend.get(Tree::Meta, key)?;
        let value = raw.as_deref().and_then(be_u64);
        Ok((raw, value))
    }

    /// The first order sequence number not yet reserved (1 for a new store).
    pub fn seq_reserved(&self) -> Result<u64> {
        Ok(self.meta(SEQ_RESERVED)?.1.unwrap_or(1))
    }

    /// Reserves order sequence numbers up to `upto` (exclusive) durably; returns the previous
    /// reservation, from which numbering continues.
    pub fn reserve_seq(&self, block: u64) -> Result<(u64, u64)> {
        loop {
            let (raw, stored) = self.meta(SEQ_RESERVED)?;
            let old = stored.unwrap_or(1);
            let new = old.saturating_add(block);
            let txn = Txn::new().compare(Tree::Meta, SEQ_RESERVED, raw.as_deref()).put(
                Tree::Meta,
                SEQ_RESERVED,
                new.to_be_bytes().to_vec(),
            );
            if self.backend.commit(&txn)?.is_ok() {
                self.flush()?;
                return Ok((old, new));
            }
        }
    }

    /// Reserves a block of sequence numbers that starts after `floor` (and after anything
    /// reserved before), unless moving up to `floor` would bring the total of such moves past
    /// `max_total_jump` (then `None`, and nothing changes).
    pub fn reserve_seq_after(
        &self,
        floor: u64,
        block: u64,
        max_total_jump: u64,
    ) -> Result<Option<(u64, u64)>> {
        loop {
            let (raw_reserved, reserved) = self.meta(SEQ_RESERVED)?;
            let (raw_jumped, jumped) = self.meta(SEQ_JUMPED)?;
            let stored = reserved.unwrap_or(0).max(1);
            let jump = floor.saturating_add(1).saturating_sub(stored);
            let total = jumped.unwrap_or(0).saturating_add(jump);
            if total > max_total_jump {
                return Ok(None);
            }
            let old = stored.max(floor.saturating_add(1));
            let new = old.saturating_add(block);
            let txn = Txn::new()
                .compare(Tree::Meta, SEQ_RESERVED, raw_reserved.as_deref())
                .compare(Tree::Meta, SEQ_JUMPED, raw_jumped.as_deref())
                .put(Tree::Meta, SEQ_RESERVED, new.to_be_bytes().to_vec())
                .put(Tree::Meta, SEQ_JUMPED, total.to_be_bytes().to_vec());
            if self.backend.commit(&txn)?.is_ok() {
                self.flush()?;
                return Ok(Some((old, new)));
            }
        }
    }

    pub fn put_token(&self, hash: &[u8], rec: &TokenRecord) -> Result<()> {
        self.write(Txn::new().put(Tree::Tokens, hash, encode(rec)))?;
        self.flush()
    }

    pub fn token(&self, hash: &[u8]) -> Result<Option<TokenRecord>> {
        self.backend.get(Tree::Tokens, hash)?.map(|b| decode("tokens", hash, &b)).transpose()
    }

    /// Marks the token used and creates the agent in one transaction, then flushes. Fails
    /// without changing anything if the token was used meanwhile or the id is taken.
    pub fn commit_enrollment(&self, hash: &[u8], agent: &AgentRecord) -> Result<Result<(), EnrollConflict>> {
        let id = agent.id.as_bytes();
        let agent_bytes = encode(agent);
        loop {
            let Some(raw) = self.backend.get(Tree::Tokens, hash)? else {
                return Ok(Err(EnrollConflict::TokenGone));
            };
            let Ok(mut tok) = decode::<TokenRecord>("tokens", hash, &raw) else {
                return Ok(Err(EnrollConflict::TokenGone));
            };
            if tok.used_by.is_some() {
                return Ok(Err(EnrollConflict::TokenUsed));
            }
            if self.backend.get(Tree::Agents, id)?.is_some() {
                return Ok(Err(EnrollConflict::AgentExists));
            }
            tok.used_by = Some(agent.id.clone());
            let txn = Txn::new()
                .compare(Tree::Tokens, hash, Some(&raw))
                .compare(Tree::Agents, id, None)
                .put(Tree::Tokens, hash, encode(&tok))
                .put(Tree::Agents, id, agent_bytes.clone());
            if self.backend.commit(&txn)?.is_ok() {
                self.flush()?;
                return Ok(Ok(()));
            }
        }
    }

    /// Inserts a release unless `app@version` exists. Returns the existing record if it does.
    pub fn insert_release(&self, rec: &ReleaseRecord) -> Result<Option<ReleaseRecord>> {
        let key = format!("{}@{}", rec.app, rec.version);
        let key = key.as_bytes();
        let txn = Txn::new().compare(Tree::Releases, key, None).put(Tree::Releases, key, encode(rec));
        loop {
            if self.backend.commit(&txn)?.is_ok() {
                self.flush()?;
                return Ok(None);
            }
            // Removed again since the commit saw it: try again.
            if let Some(existing) = self.backend.get(Tree::Releases, key)? {
                return decode("releases", key, &existing).map(Some);
            }
        }
    }

    pub fn release(&self, app: &str, version: &str) -> Result<Option<ReleaseRecord>> {
        let key = format!("{app}@{version}");
        self.backend
            .get(Tree::Releases, key.as_bytes())?
            .map(|b| decode("releases", key.as_bytes(), &b))
            .transpose()
    }

    pub fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.backend.scan(Tree::Releases)?.into_iter().map(|(k, v)| decode("releases", &k, &v)).collect()
    }

    pub fn remove_release(&self, app: &str, version: &str) -> Result<()> {
        self.write(Txn::new().delete(Tree::Releases, format!("{app}@{version}").as_bytes()))?;
        self.flush()
    }

    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        self.backend
            .get(Tree::Agents, id.as_bytes())?
            .map(|b| decode("agents", id.as_bytes(), &b))
            .transpose()
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.backend.scan(Tree::Agents)?.into_iter().map(|(k, v)| decode("agents", &k, &v)).collect()
    }

    /// Writes an agent record as it is, unflushed: tests build large stores with it.
    #[cfg(test)]
    pub(crate) fn put_agent_for_test(&self, rec: &AgentRecord) -> Result<()> {
        self.write(Txn::new().put(Tree::Agents, rec.id.as_bytes(), encode(rec)))
    }

    /// Writes bytes that are no record into `tree` (a [`Tree`]'s name, such as `"agents"`):
    /// reading them fails, which shows a test whether a path reads records.
    #[cfg(test)]
    pub(crate) fn put_garbage_for_test(&self, tree: &str, key: &str) -> Result<()> {
        let t = Tree::from_name(tree).ok_or_else(|| Error::Backend(format!("no tree {tree:?}")))?;
        self.write(Txn::new().put(t, key.as_bytes(), b"not a record".to_vec()))?;
        self.flush()
    }

    /// Writes bytes as they are, flushed: tests load records written by earlier builds.
    #[cfg(test)]
    pub(crate) fn put_raw_for_test(&self, t: Tree, key: &str, bytes: &[u8]) -> Result<()> {
        self.write(Txn::new().put(t, key.as_bytes(), bytes.to_vec()))?;
        self.flush()
    }

    /// Applies `f` to an agent's record atomically. Returns the new record, or `None` when the
    /// agent does not exist. `durable` flushes before returning. `f` runs again, on the newer
    /// record, when a concurrent update got there first.
    pub fn update_agent(
        &self,
        id: &str,
        durable: bool,
        mut f: impl FnMut(&mut AgentRecord),
    ) -> Result<Option<AgentRecord>> {
        let key = id.as_bytes();
        loop {
            let Some(raw) = self.backend.get(Tree::Agents, key)? else { return Ok(None) };
            let mut rec: AgentRecord = decode("agents", key, &raw)?;
            f(&mut rec);
            let txn = Txn::new().compare(Tree::Agents, key, Some(&raw)).put(Tree::Agents, key, encode(&rec));
            if self.backend.commit(&txn)?.is_ok() {
                if durable {
                    self.flush()?;
                }
                return Ok(Some(rec));
            }
        }
    }
}

#[cfg(test)]
mod tests;
