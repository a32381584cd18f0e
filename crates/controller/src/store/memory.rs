//! [`Backend`] in memory: for tests, and the reference for what the contract means. Nothing
//! survives the process; `flush` does nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::backend::{Backend, Conflict, Pair, Tree, Txn};
use super::Result;

/// Every tree as a `BTreeMap` (indexed by [`Tree::index`]), all under one lock, so a commit
/// is trivially atomic and linearizable.
#[derive(Default)]
pub struct MemoryBackend {
    trees: Mutex<[BTreeMap<Vec<u8>, Vec<u8>>; Tree::ALL.len()]>,
    next_id: AtomicU64,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, [BTreeMap<Vec<u8>, Vec<u8>>; Tree::ALL.len()]> {
        // A commit checks every compare before its first write and cannot panic while writing,
        // so a poisoned lock still guards a consistent state.
        self.trees.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()[tree.index()].get(key).cloned())
    }

    fn scan(&self, tree: Tree) -> Result<Vec<Pair>> {
        Ok(self.lock()[tree.index()].iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn last(&self, tree: Tree) -> Result<Option<Pair>> {
        Ok(self.lock()[tree.index()].last_key_value().map(|(k, v)| (k.clone(), v.clone())))
    }

    fn commit(&self, txn: &Txn) -> Result<Result<(), Conflict>> {
        let mut trees = self.lock();
        let holds = txn.compares.iter().all(|c| trees[c.tree.index()].get(&c.key) == c.expected.as_ref());
        if !holds {
            return Ok(Err(Conflict));
        }
        for w in &txn.writes {
            let tree = &mut trees[w.tree.index()];
            match &w.value {
                Some(v) => tree.insert(w.key.clone(), v.clone()),
                None => tree.remove(&w.key),
            };
        }
        Ok(Ok(()))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn generate_id(&self) -> Result<u64> {
        Ok(self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}
