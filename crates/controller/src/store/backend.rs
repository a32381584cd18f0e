//! The byte-level storage interface the typed [`Store`](super::Store) is built on.
//!
//! A backend holds named trees (one per [`Tree`]) of byte keys and byte values, ordered by key.
//! Reads see every write committed before them. All writes go through [`Backend::commit`]: a
//! [`Txn`] whose compares are all checked, and whose writes are all applied, as one atomic step
//! across trees, or not at all. That is the whole contract a replicated backend (etcd-like) has
//! to provide:
//!
//! - **Linearizable compare-and-write.** A commit and every read are totally ordered and
//!   consistent with real time: a commit whose compares hold is applied entirely and seen by
//!   every read that starts after it returns; one whose compares do not hold changes nothing
//!   and returns [`Conflict`]. The typed store builds its read-modify-write operations (enrol,
//!   update an agent, reserve sequence numbers, append to the audit log) as "read, compute,
//!   commit comparing what was read, retry on conflict", so a backend with stale reads would
//!   still be correct but could retry without end.
//! - **Durability.** A write is durable (survives a crash of this process and of the machine)
//!   once [`Backend::flush`] returns after it. A backend whose commits are durable when they
//!   return (a replicated log) may make `flush` a no-op.
//! - **Unique, increasing ids** from [`Backend::generate_id`], also across restarts.
//!
//! Methods block; callers run them off the async threads.

use super::Result;

/// Every tree of the store. Record types of the first five live in [`super`]; the others hold
/// records whose types live with the logic that owns them (rollouts, desired state, bad
/// releases, freeze windows), accessed through the store's generic methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tree {
    /// Enrolled agents, keyed by agent id.
    Agents,
    /// Join tokens, keyed by the token's hash.
    Tokens,
    /// Releases, keyed by `app@version`.
    Releases,
    /// Counters (order sequence reservations), keyed by name, big-endian `u64` values.
    Meta,
    /// The audit log, keyed by big-endian sequence number.
    Audit,
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
    /// Every tree, in a fixed order.
    pub const ALL: [Tree; 14] = [
        Tree::Agents,
        Tree::Tokens,
        Tree::Releases,
        Tree::Meta,
        Tree::Audit,
        Tree::Rollouts,
        Tree::Desired,
        Tree::BadReleases,
        Tree::Freezes,
        Tree::HookSeen,
        Tree::RevokedAdmins,
        Tree::Admins,
        Tree::AuditCheckpoints,
        Tree::RollbackMarks,
    ];

    /// The tree's name, as stored (sled tree names; part of the on-disk format).
    pub fn name(self) -> &'static str {
        match self {
            Tree::Agents => "agents",
            Tree::Tokens => "tokens",
            Tree::Releases => "releases",
            Tree::Meta => "meta",
            Tree::Audit => "audit",
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

    /// The tree named `name`, if any.
    pub fn from_name(name: &str) -> Option<Tree> {
        Tree::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The tree's position in [`Tree::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One condition of a [`Txn`]: the value under `key` in `tree` is `expected` (`None`: absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub tree: Tree,
    pub key: Vec<u8>,
    pub expected: Option<Vec<u8>>,
}

/// One write of a [`Txn`]: `Some` stores the value under `key`, `None` deletes the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub tree: Tree,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// An atomic conditional write: if every compare holds (checked against the state before the
/// writes), every write is applied, in order (a later write to the same key wins); otherwise
/// nothing is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub writes: Vec<Write>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires the value under `key` to be `expected` (`None`: the key is absent).
    pub fn compare(mut self, tree: Tree, key: &[u8], expected: Option<&[u8]>) -> Self {
        self.compares.push(Compare { tree, key: key.to_vec(), expected: expected.map(<[u8]>::to_vec) });
        self
    }

    /// Stores `value` under `key`.
    pub fn put(mut self, tree: Tree, key: &[u8], value: Vec<u8>) -> Self {
        self.writes.push(Write { tree, key: key.to_vec(), value: Some(value) });
        self
    }

    /// Deletes `key` (nothing if it is absent).
    pub fn delete(mut self, tree: Tree, key: &[u8]) -> Self {
        self.writes.push(Write { tree, key: key.to_vec(), value: None });
        self
    }

    /// The distinct trees the transaction touches, in [`Tree`] order.
    pub fn trees(&self) -> Vec<Tree> {
        let mut trees: Vec<Tree> =
            self.compares.iter().map(|c| c.tree).chain(self.writes.iter().map(|w| w.tree)).collect();
        trees.sort_unstable();
        trees.dedup();
        trees
    }
}

/// A [`Txn`] was not applied because one of its compares did not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict;

/// A key-value pair as stored.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Byte-level storage for the controller: see the module documentation for the contract.
pub trait Backend: Send + Sync {
    /// The value under `key` in `tree`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Every pair of `tree`, in key order (bytewise).
    fn scan(&self, tree: Tree) -> Result<Vec<Pair>>;

    /// The pair of `tree` with the greatest key.
    fn last(&self, tree: Tree) -> Result<Option<Pair>>;

    /// Checks every compare of `txn` and, if all hold, applies every write, atomically across
    /// trees. `Ok(Err(Conflict))`: a compare did not hold and nothing changed. Not necessarily
    /// durable before [`Backend::flush`].
    fn commit(&self, txn: &Txn) -> Result<Result<(), Conflict>>;

    /// Makes every commit so far durable.
    fn flush(&self) -> Result<()>;

    /// A fresh id, greater than every id returned before (also before a restart).
    fn generate_id(&self) -> Result<u64>;
}
