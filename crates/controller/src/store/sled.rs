//! [`Backend`] on a local sled database: the store's on-disk format.
//!
//! A commit of one write (with at most a compare of the same key) is a sled compare-and-swap;
//! any other is a sled transaction over the trees it names, which sled serializes against
//! every other write. `get` waits for a transaction in progress; `scan` and `last` do not, and
//! see each key of it either before or after (every write is atomic per key).

use std::path::Path;

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::Transactional;

use super::backend::{Backend, Conflict, Pair, Tree, Txn};
use super::Result;

/// Whether sled could not open a store because another handle still holds its lock.
pub fn sled_locked(e: &::sled::Error) -> bool {
    matches!(e, ::sled::Error::Io(io) if convoy_base::files::lock_held(io))
}

/// How long [`SledBackend::open`] waits for a store another handle is still letting go of.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A sled database with one sled tree per [`Tree`], named by [`Tree::name`].
pub struct SledBackend {
    db: ::sled::Db,
    /// Indexed by [`Tree::index`].
    trees: Vec<::sled::Tree>,
}

fn pair((k, v): (::sled::IVec, ::sled::IVec)) -> Pair {
    (k.to_vec(), v.to_vec())
}

impl SledBackend {
    /// Opens (or creates) the database in `dir`. It is locked while open; a database just
    /// closed in this process (sled's background flusher lets go of it a moment after the last
    /// handle) is waited for up to [`LOCK_WAIT`]. Blocking.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ::sled::Config::new().path(dir).flush_every_ms(Some(500));
        let db = convoy_base::files::retry_while_busy(LOCK_WAIT, || config.open(), sled_locked)?;
        let trees = Tree::ALL.iter().map(|t| db.open_tree(t.name())).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { db, trees })
    }

    fn tree(&self, t: Tree) -> &::sled::Tree {
        &self.trees[t.index()]
    }

    /// A transaction on one key of one tree, done with sled's compare-and-swap instead of a
    /// transaction (which serializes against every other write): `None` if `txn` is not one.
    fn commit_single_key(&self, txn: &Txn) -> Option<Result<Result<(), Conflict>>> {
        let [write] = txn.writes.as_slice() else { return None };
        let tree = self.tree(write.tree);
        let outcome = match txn.compares.as_slice() {
            [] => match &write.value {
                Some(v) => tree.insert(&write.key, v.as_slice()).map(|_| Ok(())),
                None => tree.remove(&write.key).map(|_| Ok(())),
            },
            [c] if c.tree == write.tree && c.key == write.key => tree
                .compare_and_swap(&write.key, c.expected.as_deref(), write.value.as_deref())
                .map(|r| r.map_err(|_| Conflict)),
            _ => return None,
        };
        Some(outcome.map_err(Into::into))
    }
}

impl Backend for SledBackend {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree) -> Result<Vec<Pair>> {
        self.tree(tree).iter().map(|kv| Ok(pair(kv?))).collect()
    }

    fn last(&self, tree: Tree) -> Result<Option<Pair>> {
        Ok(self.tree(tree).last()?.map(pair))
    }

    fn commit(&self, txn: &Txn) -> Result<Result<(), Conflict>> {
        if let Some(outcome) = self.commit_single_key(txn) {
            return outcome;
        }
        let trees = txn.trees();
        if trees.is_empty() {
            return Ok(Ok(()));
        }
        let handles: Vec<::sled::Tree> = trees.iter().map(|t| self.tree(*t).clone()).collect();
        let slot = |t: Tree| trees.binary_search(&t).expect("`Txn::trees` names every tree of the txn");
        let outcome = handles.as_slice().transaction(|view: &Vec<TransactionalTree>| {
            for c in &txn.compares {
                let current = view[slot(c.tree)].get(&c.key)?;
                if current.as_deref() != c.expected.as_deref() {
                    return Err(ConflictableTransactionError::Abort(Conflict));
                }
            }
            for w in &txn.writes {
                let tree = &view[slot(w.tree)];
                match &w.value {
                    Some(v) => tree.insert(w.key.as_slice(), v.as_slice())?,
                    None => tree.remove(w.key.as_slice())?,
                };
            }
            Ok(())
        });
        match outcome {
            Ok(()) => Ok(Ok(())),
            Err(TransactionError::Abort(c)) => Ok(Err(c)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn generate_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }
}
