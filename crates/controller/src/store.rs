//! The controller's state in sled, behind one small interface.
//!
//! Named trees hold versioned JSON records. Every write that changes a state transition is
//! flushed before the call returns, so an acknowledged change survives a crash. The methods are
//! blocking; async callers run them on the blocking pool (see [`crate::logic`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    #[error("state store record {key:?} in {tree}: {reason}")]
    Corrupt { tree: &'static str, key: String, reason: String },
    #[error("state store record {key:?} in {tree} has format version {found}, this build reads {expected}")]
    Version { tree: &'static str, key: String, found: u32, expected: u32 },
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

/// The controller's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    agents: sled::Tree,
    tokens: sled::Tree,
    releases: sled::Tree,
    meta: sled::Tree,
}

/// Trees holding records whose types live with the logic that owns them (rollouts, desired
/// state, bad releases, freeze windows), accessed through the generic methods below.
#[derive(Clone, Copy, Debug)]
pub enum Tree {
    Rollouts,
    Desired,
    BadReleases,
    Freezes,
    /// Alert deliveries and hook signatures already acted on.
    HookSeen,
    /// Admin names revoked before the admin registry existed; read only by its migration.
    RevokedAdmins,
    /// The admin registry: one record per admin name.
    Admins,
    /// Signed audit-log checkpoints, keyed by zero-padded sequence number.
    AuditCheckpoints,
    /// Fleet rollbacks away from a release, per environment: they end its soak there.
    RollbackMarks,
}

impl Tree {
    fn name(self) -> &'static str {
        match self {
            Tree::Rollouts => "rollouts",
            Tree::Desired => "desired",
            Tree::BadReleases => "bad_releases",
            Tree::Freezes => "freezes",
            Tree::HookSeen => "hook_seen",
            Tree::RevokedAdmins => "revoked_admins",
            Tree::Admins => "admins",
            Tree::AuditCheckpoints => "audit_checkpoints",
            Tree::RollbackMarks => "rollback_marks",
        }
    }
}

/// Whether sled could not open a store because another handle still holds its lock.
pub fn sled_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.to_string().contains("could not acquire lock"))
}

/// How long [`Store::open`] waits for a store another handle is still letting go of.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Store {
    /// Opens (or creates) the store in `dir`. The store is locked while open; a store just
    /// closed in this process (sled's background flusher lets go of it a moment after the last
    /// handle) is waited for up to [`LOCK_WAIT`]. Blocking: call it off the async threads.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = sled::Config::new().path(dir).flush_every_ms(Some(500));
        let db = convoy_base::files::retry_while_busy(LOCK_WAIT, || config.open(), sled_locked)?;
        let agents = db.open_tree("agents")?;
        let tokens = db.open_tree("tokens")?;
        let releases = db.open_tree("releases")?;
        let meta = db.open_tree("meta")?;
        Ok(Self { db, agents, tokens, releases, meta })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn tree(&self, t: Tree) -> Result<sled::Tree> {
        Ok(self.db.open_tree(t.name())?)
    }

    /// Stores a record; `durable` flushes before returning.
    pub fn put<T: Serialize>(&self, t: Tree, key: &str, value: &T, durable: bool) -> Result<()> {
        self.tree(t)?.insert(key.as_bytes(), encode(value))?;
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    /// Stores a record only if the key is absent, atomically (compare-and-swap), and flushes
    /// before returning. Returns whether this call inserted it: of concurrent callers with the
    /// same key exactly one gets `true`.
    pub fn insert_if_absent<T: Serialize>(&self, t: Tree, key: &str, value: &T) -> Result<bool> {
        let won = self.tree(t)?.compare_and_swap(key.as_bytes(), None::<&[u8]>, Some(encode(value)))?.is_ok();
        if won {
            self.flush()?;
        }
        Ok(won)
    }

    /// The last record of a tree in key order.
    pub fn last<T: DeserializeOwned>(&self, t: Tree) -> Result<Option<(String, T)>> {
        self.tree(t)?
            .last()?
            .map(|(k, v)| Ok((String::from_utf8_lossy(&k).into_owned(), decode(t.name(), &k, &v)?)))
            .transpose()
    }

    pub fn get<T: DeserializeOwned>(&self, t: Tree, key: &str) -> Result<Option<T>> {
        self.tree(t)?.get(key.as_bytes())?.map(|b| decode(t.name(), key.as_bytes(), &b)).transpose()
    }

    /// Every record in a tree, in key order, with its key.
    pub fn list<T: DeserializeOwned>(&self, t: Tree) -> Result<Vec<(String, T)>> {
        self.tree(t)?
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode(t.name(), &k, &v)?))
            })
            .collect()
    }

    pub fn remove(&self, t: Tree, key: &str) -> Result<bool> {
        let existed = self.tree(t)?.remove(key.as_bytes())?.is_some();
        self.flush()?;
        Ok(existed)
    }

    /// Appends an audit entry built by `make` from the previous entry (if any), atomically with
    /// respect to other appends, and flushes. The audit tree is keyed by big-endian sequence.
    pub fn append_audit<T: Serialize + DeserializeOwned>(
        &self,
        make: impl FnOnce(Option<T>) -> (u64, T),
    ) -> Result<T> {
        let tree = self.db.open_tree("audit")?;
        let last = tree.last()?.map(|(k, v)| decode::<T>("audit", &k, &v)).transpose()?;
        let (seq, entry) = make(last);
        tree.insert(seq.to_be_bytes(), encode(&entry))?;
        self.flush()?;
        Ok(entry)
    }

    /// Every audit entry in order, as stored (raw JSON, so verification sees exactly what is
    /// on disk).
    pub fn audit_raw(&self) -> Result<Vec<(u64, serde_json::Value)>> {
        let tree = self.db.open_tree("audit")?;
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                Ok((seq, decode("audit", &k, &v)?))
            })
            .collect()
    }

    /// The sequence number of the newest audit entry, if any.
    pub fn audit_last_seq(&self) -> Result<Option<u64>> {
        let tree = self.db.open_tree("audit")?;
        Ok(tree.last()?.map(|(k, _)| k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0)))
    }

    /// The audit entry at `seq`, as stored.
    pub fn audit_at(&self, seq: u64) -> Result<Option<serde_json::Value>> {
        let tree = self.db.open_tree("audit")?;
        let key = seq.to_be_bytes();
        tree.get(key)?.map(|v| decode("audit", &key, &v)).transpose()
    }

    /// Direct access for tests that tamper with the log to prove verification catches it.
    pub fn audit_tree(&self) -> Result<sled::Tree> {
        Ok(self.db.open_tree("audit")?)
    }

    /// A fresh, increasing id.
    pub fn generate_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Reserves order sequence numbers up to `upto` (exclusive) durably; returns the previous
    /// reservation, from which numbering continues.
    /// The first order sequence number not yet reserved (1 for a new store).
    pub fn seq_reserved(&self) -> Result<u64> {
        Ok(self
            .meta
            .get("seq_reserved")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1))
    }

    pub fn reserve_seq(&self, block: u64) -> Result<(u64, u64)> {
        let old = self
            .meta
            .get("seq_reserved")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1);
        let new = old.saturating_add(block);
        self.meta.insert("seq_reserved", &new.to_be_bytes())?;
        self.flush()?;
        Ok((old, new))
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
        let read = |key: &str| -> Result<u64> {
            Ok(self
                .meta
                .get(key)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0))
        };
        let stored = read("seq_reserved")?.max(1);
        let jumped = read("seq_jumped")?;
        let jump = floor.saturating_add(1).saturating_sub(stored);
        let total = jumped.saturating_add(jump);
        if total > max_total_jump {
            return Ok(None);
        }
        let old = stored.max(floor.saturating_add(1));
        let new = old.saturating_add(block);
        self.meta.insert("seq_reserved", &new.to_be_bytes())?;
        self.meta.insert("seq_jumped", &total.to_be_bytes())?;
        self.flush()?;
        Ok(Some((old, new)))
    }

    pub fn put_token(&self, hash: &[u8], rec: &TokenRecord) -> Result<()> {
        self.tokens.insert(hash, encode(rec))?;
        self.flush()
    }

    pub fn token(&self, hash: &[u8]) -> Result<Option<TokenRecord>> {
        self.tokens.get(hash)?.map(|b| decode("tokens", hash, &b)).transpose()
    }

    /// Marks the token used and creates the agent in one transaction, then flushes. Fails
    /// without changing anything if the token was used meanwhile or the id is taken.
    pub fn commit_enrollment(&self, hash: &[u8], agent: &AgentRecord) -> Result<Result<(), EnrollConflict>> {
        let agent_bytes = encode(agent);
        let outcome = (&self.tokens, &self.agents).transaction(|(tokens, agents)| {
            let Some(raw) = tokens.get(hash)? else {
                return Err(ConflictableTransactionError::Abort(EnrollConflict::TokenGone));
            };
            let mut tok: TokenRecord = decode("tokens", hash, &raw)
                .map_err(|_| ConflictableTransactionError::Abort(EnrollConflict::TokenGone))?;
            if tok.used_by.is_some() {
                return Err(ConflictableTransactionError::Abort(EnrollConflict::TokenUsed));
            }
            if agents.get(agent.id.as_bytes())?.is_some() {
                return Err(ConflictableTransactionError::Abort(EnrollConflict::AgentExists));
            }
            tok.used_by = Some(agent.id.clone());
            tokens.insert(hash, encode(&tok))?;
            agents.insert(agent.id.as_bytes(), agent_bytes.clone())?;
            Ok(())
        });
        match outcome {
            Ok(()) => {
                self.flush()?;
                Ok(Ok(()))
            }
            Err(TransactionError::Abort(c)) => Ok(Err(c)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Inserts a release unless `app@version` exists. Returns the existing record if it does.
    pub fn insert_release(&self, rec: &ReleaseRecord) -> Result<Option<ReleaseRecord>> {
        let key = format!("{}@{}", rec.app, rec.version);
        match self.releases.compare_and_swap(key.as_bytes(), None::<&[u8]>, Some(encode(rec)))? {
            Ok(()) => {
                self.flush()?;
                Ok(None)
            }
            Err(e) => e.current.map(|b| decode("releases", key.as_bytes(), &b)).transpose(),
        }
    }

    pub fn release(&self, app: &str, version: &str) -> Result<Option<ReleaseRecord>> {
        let key = format!("{app}@{version}");
        self.releases.get(key.as_bytes())?.map(|b| decode("releases", key.as_bytes(), &b)).transpose()
    }

    pub fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.releases
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode("releases", &k, &v)
            })
            .collect()
    }

    pub fn remove_release(&self, app: &str, version: &str) -> Result<()> {
        self.releases.remove(format!("{app}@{version}").as_bytes())?;
        self.flush()
    }

    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        self.agents.get(id.as_bytes())?.map(|b| decode("agents", id.as_bytes(), &b)).transpose()
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode("agents", &k, &v)
            })
            .collect()
    }

    /// Writes an agent record as it is, unflushed: tests build large stores with it.
    #[cfg(test)]
    pub(crate) fn put_agent_for_test(&self, rec: &AgentRecord) -> Result<()> {
        self.agents.insert(rec.id.as_bytes(), encode(rec))?;
        Ok(())
    }

    /// Writes bytes that are no record into `tree` (`"agents"` or a [`Tree`]'s name): reading
    /// them fails, which shows a test whether a path reads records.
    #[cfg(test)]
    pub(crate) fn put_garbage_for_test(&self, tree: &str, key: &str) -> Result<()> {
        self.db.open_tree(tree)?.insert(key.as_bytes(), b"not a record".to_vec())?;
        self.flush()
    }

    /// Writes bytes as they are, flushed: tests load records written by earlier builds.
    #[cfg(test)]
    pub(crate) fn put_raw_for_test(&self, t: Tree, key: &str, bytes: &[u8]) -> Result<()> {
        self.tree(t)?.insert(key.as_bytes(), bytes)?;
        self.flush()
    }

    /// Applies `f` to an agent's record atomically. Returns the new record, or `None` when the
    /// agent does not exist. `durable` flushes before returning.
    pub fn update_agent(
        &self,
        id: &str,
        durable: bool,
        mut f: impl FnMut(&mut AgentRecord),
    ) -> Result<Option<AgentRecord>> {
        let mut decode_err = None;
        let new = self.agents.update_and_fetch(id.as_bytes(), |old| {
            let old = old?;
            match decode::<AgentRecord>("agents", id.as_bytes(), old) {
                Ok(mut rec) => {
                    f(&mut rec);
                    Some(encode(&rec))
                }
                Err(e) => {
                    decode_err = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = decode_err {
            return Err(e);
        }
        if durable {
            self.flush()?;
        }
        new.map(|b| decode("agents", id.as_bytes(), &b)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_of_the_order_numbering_are_bounded_in_total() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store.reserve_seq(16).unwrap();
        assert_eq!(first, (1, 17));
        // Reports below what is reserved move nothing and use none of the budget.
        assert_eq!(store.reserve_seq_after(5, 16, 100).unwrap(), Some((17, 33)));
        // Jumps count against the total: 60 + 40 fit in 100, one more does not.
        assert_eq!(store.reserve_seq_after(92, 16, 100).unwrap(), Some((93, 109)));
        assert_eq!(store.reserve_seq_after(148, 16, 100).unwrap(), Some((149, 165)));
        assert_eq!(store.reserve_seq_after(166, 16, 100).unwrap(), None);
        assert_eq!(store.seq_reserved().unwrap(), 165, "a refused jump changes nothing");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        at: i64,
    }

    #[test]
    fn generic_records_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(Tree::HookSeen, "k1", &Rec { at: 5 }, true).unwrap();
            assert_eq!(s.get::<Rec>(Tree::HookSeen, "k1").unwrap(), Some(Rec { at: 5 }));
            assert_eq!(s.get::<Rec>(Tree::HookSeen, "k2").unwrap(), None);
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.list::<Rec>(Tree::HookSeen).unwrap(), vec![("k1".to_string(), Rec { at: 5 })]);
        assert!(s.remove(Tree::HookSeen, "k1").unwrap());
        assert!(!s.remove(Tree::HookSeen, "k1").unwrap());
    }

    #[test]
    fn insert_if_absent_lets_exactly_one_concurrent_caller_win() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let s = s.clone();
                    scope.spawn(move || {
                        s.insert_if_absent(Tree::HookSeen, "delivery", &Rec { at: i }).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(wins, 1);
        assert!(!s.insert_if_absent(Tree::HookSeen, "delivery", &Rec { at: 99 }).unwrap());
        assert_ne!(s.get::<Rec>(Tree::HookSeen, "delivery").unwrap(), Some(Rec { at: 99 }));
    }
}
