//! The audit log: append-only and hash-chained. Each entry holds the SHA-256 of the one before,
//! and its own hash covers its content and that link, so changing or removing any entry breaks
//! the chain at that point (`convoy audit verify`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{now, Controller, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: i64,
    /// `admin/<name>`, `alert:<alertname>`, `hook:<key id>` or `controller`.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub params: serde_json::Value,
    pub outcome: String,
    pub prev_hash: String,
    pub hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry: over every field but `hash`, in a fixed order.
pub fn entry_hash(e: &AuditEntry) -> String {
    let body =
        serde_json::json!([e.seq, e.at, e.actor, e.action, e.target, e.params, e.outcome, e.prev_hash]);
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

impl Controller {
    /// Appends an entry (flushed before returning). Failures to audit are logged loudly; they
    /// do not undo the action that already happened.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        params: serde_json::Value,
        outcome: &str,
    ) {
        let (actor, action, target, outcome) =
            (actor.to_owned(), action.to_owned(), target.to_owned(), outcome.to_owned());
        let r = self
            .blocking(move |c| {
                let _g = c.inner.audit_lock.lock().unwrap_or_else(|p| p.into_inner());
                c.inner.store.append_audit::<AuditEntry>(|last| {
                    let (seq, prev_hash) = match last {
                        Some(l) => (l.seq + 1, l.hash),
                        None => (1, GENESIS.to_owned()),
                    };
                    let mut e = AuditEntry {
                        seq,
                        at: now(),
                        actor,
                        action,
                        target,
                        params,
                        outcome,
                        prev_hash,
                        hash: String::new(),
                    };
                    e.hash = entry_hash(&e);
                    (seq, e)
                })?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "audit entry could not be written");
        }
    }

    /// Entries, optionally only one app's and only since a time.
    pub async fn audit_log(&self, app: Option<String>, since: Option<i64>) -> Result<Vec<AuditEntry>> {
        self.blocking(move |c| {
            let mut out = Vec::new();
            for (_, v) in c.inner.store.audit_raw()? {
                let Ok(e) = serde_json::from_value::<AuditEntry>(v) else { continue };
                let app_ok = app.as_deref().is_none_or(|a| {
                    e.target == a
                        || e.target.starts_with(&format!("{a}@"))
                        || e.target.starts_with(&format!("{a}/"))
                        || e.params.get("app").and_then(|x| x.as_str()) == Some(a)
                });
                if app_ok && since.is_none_or(|s| e.at >= s) {
                    out.push(e);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Checks the whole chain. Returns the number of entries, or what is wrong and where.
    pub async fn audit_verify(&self) -> Result<std::result::Result<usize, String>> {
        self.blocking(|c| {
            let mut prev = GENESIS.to_owned();
            let entries = c.inner.store.audit_raw()?;
            for (expected_seq, (key, v)) in (1u64..).zip(entries.iter()) {
                let e: AuditEntry = match serde_json::from_value(v.clone()) {
                    Ok(e) => e,
                    Err(err) => return Ok(Err(format!("entry {key} is unreadable: {err}"))),
                };
                if *key != expected_seq || e.seq != expected_seq {
                    return Ok(Err(format!(
                        "entry {expected_seq} is missing (found {key} next): the log was cut"
                    )));
                }
                if e.prev_hash != prev {
                    return Ok(Err(format!(
                        "entry {} does not link to entry {}: an entry was removed or replaced",
                        e.seq,
                        e.seq - 1
                    )));
                }
                if entry_hash(&e) != e.hash {
                    return Ok(Err(format!(
                        "entry {} was modified: its content does not match its hash",
                        e.seq
                    )));
                }
                prev = e.hash.clone();
            }
            Ok(Ok(entries.len()))
        })
        .await
    }
}

impl Controller {
    /// The raw audit tree, for tests that tamper with the log to prove verification catches it.
    pub fn audit_tree_for_tests(&self) -> Result<sled::Tree> {
        Ok(self.inner.store.audit_tree()?)
    }
}
