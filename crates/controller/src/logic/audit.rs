//! The audit log: append-only and hash-chained. Each entry holds the SHA-256 of the one before,
//! and its own hash covers its content and that link, so changing or removing any entry breaks
//! the chain at that point (`convoy audit verify`).
//!
//! Actions are written twice: an intent entry, flushed before the action runs (if it cannot be
//! written, the action is refused), and an outcome entry afterwards that names the intent's
//! sequence number. A crash between the two leaves an intent without an outcome, which is the
//! honest record of "started, result unknown".
//!
//! Removing the newest entries leaves a valid chain, so the controller also signs checkpoints
//! `{seq, head hash, time}` with its certificate's key, at least every minute (when the log grew)
//! and every [`CHECKPOINT_EVERY`] entries. Verification compares the log with the latest stored
//! checkpoint, or with one exported earlier and kept elsewhere.

use std::sync::Arc;

use convoy_pki::StatementSigner;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::core::{blocking_method, Core};
use super::{now, take_token, Buckets, Error, Result};
use crate::store::Tree;

/// Refused calls recorded per actor back to back before the rate of one a second applies.
pub const REFUSALS_BURST: u32 = 20;

/// Per actor: refusals that may still be recorded now, when that was last topped up, and how
/// many went unrecorded since the last recorded one.
pub(crate) type RefusalLimits = std::collections::HashMap<String, (u32, std::time::Instant, u64)>;

/// A checkpoint is signed whenever the log reaches a multiple of this many entries.
pub const CHECKPOINT_EVERY: u64 = 100;

/// Which half of an audited action an entry records. Entries without a phase are single
/// records (automatic decisions, and entries written before phases existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Intent,
    Outcome,
}

/// Characters kept of an entry's actor, action and target.
pub const MAX_FIELD_CHARS: usize = 256;
/// Characters kept of an entry's outcome.
pub const MAX_OUTCOME_CHARS: usize = 2048;
/// Bytes of an entry's parameters (as JSON) kept; larger ones are replaced by their size.
pub const MAX_PARAMS_BYTES: usize = 4096;

/// `s` cut to `max` characters, with a marker saying so.
fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…[{} bytes]", &s[..i], s.len()),
    }
}

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// On an outcome entry: the sequence number of its intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<u64>,
}

impl AuditEntry {
    /// An entry's content; sequence, time and hashes are set when it is appended. Fields that
    /// may carry what a caller sent are bounded, so no request can make an entry large.
    fn draft(actor: &str, action: &str, target: &str, params: serde_json::Value, outcome: &str) -> Self {
        let params_len = params.to_string().len();
        let params = if params_len > MAX_PARAMS_BYTES {
            serde_json::json!({"truncated": true, "bytes": params_len})
        } else {
            params
        };
        Self {
            seq: 0,
            at: 0,
            actor: bounded(actor, MAX_FIELD_CHARS),
            action: bounded(action, MAX_FIELD_CHARS),
            target: bounded(target, MAX_FIELD_CHARS),
            params,
            outcome: bounded(outcome, MAX_OUTCOME_CHARS),
            prev_hash: String::new(),
            hash: String::new(),
            phase: None,
            intent: None,
        }
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry: over every field but `hash`, in a fixed order. The phase fields are
/// only covered when set, so entries written before they existed keep their hashes.
pub fn entry_hash(e: &AuditEntry) -> String {
    let mut body =
        serde_json::json!([e.seq, e.at, e.actor, e.action, e.target, e.params, e.outcome, e.prev_hash]);
    if e.phase.is_some() || e.intent.is_some() {
        if let Some(list) = body.as_array_mut() {
            list.push(serde_json::json!(e.phase));
            list.push(serde_json::json!(e.intent));
        }
    }
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

/// A signed statement that the log had `seq` entries, the last with hash `head`, at time `at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub head: String,
    pub at: i64,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER, hex) by the controller certificate's key.
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes that are signed.
    fn message(seq: u64, head: &str, at: i64) -> Vec<u8> {
        format!("convoy audit checkpoint v1\nseq {seq}\nhead {head}\nat {at}\n").into_bytes()
    }

    fn store_key(seq: u64) -> String {
        format!("{seq:020}")
    }
}

/// What the controller signs checkpoints with and verifies them against.
#[derive(Clone, Debug)]
pub struct AuditKey {
    pub signer: Arc<StatementSigner>,
    /// The controller certificate (PEM) whose public key verifies the signatures.
    pub cert_pem: String,
}

/// A successful verification.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    pub entries: usize,
    /// The checkpoint the log was checked against, if any.
    pub checkpoint: Option<Checkpoint>,
}

fn fmt_time(t: i64) -> String {
    crate::cli_time(t)
}

/// Checks the chain link by link. Returns each entry's hash in order, or what is wrong.
fn check_chain(entries: &[(u64, serde_json::Value)]) -> std::result::Result<Vec<String>, String> {
    let mut prev = GENESIS.to_owned();
    let mut hashes = Vec::with_capacity(entries.len());
    for (expected_seq, (key, v)) in (1u64..).zip(entries.iter()) {
        let e: AuditEntry = match serde_json::from_value(v.clone()) {
            Ok(e) => e,
            Err(err) => return Err(format!("entry {key} is unreadable: {err}")),
        };
        if *key != expected_seq || e.seq != expected_seq {
            return Err(format!("entry {expected_seq} is missing (found {key} next): the log was cut"));
        }
        if e.prev_hash != prev {
            return Err(format!(
                "entry {} does not link to entry {}: an entry was removed or replaced",
                e.seq,
                e.seq - 1
            ));
        }
        if entry_hash(&e) != e.hash {
            return Err(format!("entry {} was modified: its content does not match its hash", e.seq));
        }
        prev = e.hash.clone();
        hashes.push(e.hash);
    }
    Ok(hashes)
}

/// Checks that a valid chain (its hashes in order) still contains what `cp` vouches for.
fn check_against(hashes: &[String], cp: &Checkpoint, what: &str) -> std::result::Result<(), String> {
    let len = hashes.len() as u64;
    if cp.seq > len {
        let missing = if cp.seq == len + 1 {
            format!("entry {}", cp.seq)
        } else {
            format!("entries {}-{}", len + 1, cp.seq)
        };
        return Err(format!(
            "{missing} missing: the log ends at entry {len} but the {what} signed at {} covers {} entries; the newest entries were removed",
            fmt_time(cp.at),
            cp.seq
        ));
    }
    let head = match cp.seq {
        0 => GENESIS,
        n => hashes[(n - 1) as usize].as_str(),
    };
    if head != cp.head {
        return Err(format!(
            "entry {} does not match the {what} signed at {}: entries up to {} were removed or replaced",
            cp.seq,
            fmt_time(cp.at),
            cp.seq
        ));
    }
    Ok(())
}

/// Audited actions one admin may take back to back before the rate of one a second applies.
pub const ACTIONS_BURST: u32 = 60;

/// The audit log: appends (intent, outcome, refusals), checkpoints and verification. Cheap to
/// clone.
#[derive(Clone)]
pub struct Audit {
    core: Core,
    inner: Arc<State>,
}

struct State {
    /// Serializes appends and checkpoints.
    lock: std::sync::Mutex<()>,
    /// The audit rate of refused calls, per actor.
    refusals: std::sync::Mutex<RefusalLimits>,
    /// Per admin: audited actions still allowed now.
    action_rate: Buckets,
}

impl Audit {
    pub(crate) fn new(core: Core) -> Self {
        Self {
            core,
            inner: Arc::new(State {
                lock: Default::default(),
                refusals: Default::default(),
                action_rate: Default::default(),
            }),
        }
    }

    blocking_method!();

    /// Admits one audited action of `actor`: at most [`ACTIONS_BURST`] back to back and one a
    /// second after that. Each writes (and flushes) two audit entries, so a caller looping on
    /// an action, even one that fails, must not grow the log without bound.
    pub fn admit_action(&self, actor: &str) -> Result<()> {
        if take_token(&self.inner.action_rate, actor, ACTIONS_BURST) {
            Ok(())
        } else {
            Err(Error::Busy(format!("{actor} is acting too often: retry in a second")))
        }
    }

    fn audit_key(&self) -> &AuditKey {
        &self.core.settings.audit_key
    }

    /// Appends one entry and flushes; signs a checkpoint when the log reaches a multiple of
    /// [`CHECKPOINT_EVERY`]. Blocking.
    fn append_blocking(&self, mut e: AuditEntry) -> Result<AuditEntry> {
        let _g = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = self.core.store.append_audit::<AuditEntry>(|last| {
            let (seq, prev_hash) = match last {
                Some(l) => (l.seq + 1, l.hash),
                None => (1, GENESIS.to_owned()),
            };
            e.seq = seq;
            e.prev_hash = prev_hash;
            e.at = now();
            e.hash = entry_hash(&e);
            (seq, e.clone())
        })?;
        if written.seq % CHECKPOINT_EVERY == 0 {
            // The entry is durable either way; a missed checkpoint is made up by the next one.
            if let Err(err) = self.checkpoint_locked(false) {
                tracing::error!(error = %err, seq = written.seq, "audit checkpoint could not be signed");
            }
        }
        Ok(written)
    }

    async fn append(&self, e: AuditEntry) -> Result<AuditEntry> {
        self.blocking(move |c| c.append_blocking(e)).await
    }

    /// Appends a single entry for an automatic decision (flushed before returning). Failures to
    /// audit are logged loudly; they do not undo the decision that already happened.
    /// Records a refused call, at most [`REFUSALS_BURST`] per actor back to back and one a
    /// second after that: past the rate, refusals are counted and the next one recorded says how
    /// many were not (a caller hammering refused calls must not grow the log without bound).
    pub async fn refusal(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        mut params: serde_json::Value,
        outcome: &str,
    ) {
        let suppressed = {
            let mut limits = self.inner.refusals.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            if limits.len() > 10_000 {
                // Forget only actors whose allowance is full again: a caller being limited
                // keeps its limit however many others there are.
                let full = u64::from(REFUSALS_BURST);
                limits.retain(|_, l| l.2 > 0 || now.duration_since(l.1).as_secs() < full);
            }
            let l = limits.entry(actor.to_owned()).or_insert((REFUSALS_BURST, now, 0));
            let earned = now.saturating_duration_since(l.1).as_secs();
            if earned > 0 {
                l.0 = (l.0 + earned.min(u64::from(REFUSALS_BURST)) as u32).min(REFUSALS_BURST);
                l.1 = now;
            }
            if l.0 == 0 {
                l.2 += 1;
                tracing::debug!(actor, action, "refusal over the audit rate: counted, not recorded");
                return;
            }
            l.0 -= 1;
            std::mem::take(&mut l.2)
        };
        if suppressed > 0 {
            if let Some(o) = params.as_object_mut() {
                o.insert("refusals_not_recorded_before".into(), suppressed.into());
            }
        }
        self.record(actor, action, target, params, outcome).await;
    }

    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        params: serde_json::Value,
        outcome: &str,
    ) {
        if let Err(e) = self.append(AuditEntry::draft(actor, action, target, params, outcome)).await {
            tracing::error!(error = %e, "audit entry could not be written");
        }
    }

    /// Records that `actor` is about to do `action`, flushed before returning. Returns the
    /// entry's sequence number for [`Self::audit_outcome`]. An error means the action must not
    /// run: it could not be accounted for.
    pub async fn intent(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        params: serde_json::Value,
    ) -> Result<u64> {
        let e = AuditEntry {
            phase: Some(Phase::Intent),
            ..AuditEntry::draft(actor, action, target, params, "pending")
        };
        match self.append(e).await {
            Ok(e) => Ok(e.seq),
            Err(e) => {
                tracing::error!(error = %e, actor, action, "audit intent could not be written: refusing the action");
                Err(Error::AuditUnavailable(e.to_string()))
            }
        }
    }

    /// Records how the action announced by intent `intent` ended. The action has happened, so a
    /// failure here is logged loudly rather than returned.
    pub async fn outcome(
        &self,
        intent: u64,
        actor: &str,
        action: &str,
        target: &str,
        params: serde_json::Value,
        outcome: &str,
    ) {
        let e = AuditEntry {
            phase: Some(Phase::Outcome),
            intent: Some(intent),
            ..AuditEntry::draft(actor, action, target, params, outcome)
        };
        let r = self.append(e).await;
        if let Err(e) = r {
            tracing::error!(error = %e, intent, actor, action, "audit outcome could not be written");
        }
    }

    /// Signs and stores a checkpoint of the current head. With `fresh` false, nothing is signed
    /// when the latest checkpoint already covers the head. Refuses to sign a log that no longer
    /// contains what the latest checkpoint vouches for: signing it would launder a truncation.
    /// The caller holds the audit lock.
    fn checkpoint_locked(&self, fresh: bool) -> Result<Option<Checkpoint>> {
        let store = &self.core.store;
        let (seq, head) = match store.audit_last_seq()? {
            Some(seq) => {
                let raw =
                    store.audit_at(seq)?.ok_or_else(|| Error::Internal("audit head vanished".into()))?;
                let e: AuditEntry = serde_json::from_value(raw)
                    .map_err(|e| Error::AuditTampered(format!("entry {seq} is unreadable: {e}")))?;
                (seq, e.hash)
            }
            None => (0, GENESIS.to_owned()),
        };
        if let Some((_, last)) = store.last::<Checkpoint>(Tree::AuditCheckpoints)? {
            let still_there = match last.seq {
                0 => true,
                n => store
                    .audit_at(n)?
                    .and_then(|v| serde_json::from_value::<AuditEntry>(v).ok())
                    .is_some_and(|e| e.hash == last.head),
            };
            if last.seq > seq || !still_there {
                return Err(Error::AuditTampered(format!(
                    "the log no longer matches checkpoint {} (signed at {}): run `convoy audit verify`",
                    last.seq,
                    fmt_time(last.at)
                )));
            }
            if !fresh && last.seq == seq {
                return Ok(None);
            }
        }
        let at = now();
        let sig = self
            .audit_key()
            .signer
            .sign(&Checkpoint::message(seq, &head, at))
            .map_err(|e| Error::Internal(format!("signing an audit checkpoint: {e}")))?;
        let cp = Checkpoint { seq, head, at, signature: hex::encode(sig) };
        store.put(Tree::AuditCheckpoints, &Checkpoint::store_key(seq), &cp, true)?;
        tracing::info!(seq, "audit checkpoint signed");
        Ok(Some(cp))
    }

    /// Signs a checkpoint if the log grew since the last one (the periodic routine).
    pub async fn checkpoint_if_grown(&self) -> Result<Option<Checkpoint>> {
        self.blocking(|c| {
            let _g = c.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
            c.checkpoint_locked(false)
        })
        .await
    }

    /// Signs and stores a fresh checkpoint of the current head, for export.
    pub async fn checkpoint(&self) -> Result<Checkpoint> {
        self.blocking(|c| {
            let _g = c.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
            c.checkpoint_locked(true)?.ok_or_else(|| Error::Internal("no checkpoint was signed".into()))
        })
        .await
    }

    /// Checks a checkpoint's signature against the controller certificate.
    fn check_signature(&self, cp: &Checkpoint) -> std::result::Result<(), String> {
        let sig = hex::decode(&cp.signature).map_err(|_| "its signature is not hex".to_string())?;
        convoy_pki::verify_statement(
            &self.audit_key().cert_pem,
            &Checkpoint::message(cp.seq, &cp.head, cp.at),
            &sig,
        )
        .map_err(|e| format!("{e}: it was altered or not signed by this controller"))
    }

    /// Entries, optionally only one app's and only since a time.
    pub async fn entries(&self, app: Option<String>, since: Option<i64>) -> Result<Vec<AuditEntry>> {
        self.blocking(move |c| {
            let mut out = Vec::new();
            for (_, v) in c.core.store.audit_raw()? {
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

    /// Checks the whole chain and the latest stored checkpoint. Returns the number of entries,
    /// or what is wrong and where.
    pub async fn verify(&self) -> Result<std::result::Result<usize, String>> {
        Ok(self.verify_with(None).await?.map(|v| v.entries))
    }

    /// Checks the whole chain, then that it still holds what a checkpoint vouches for: `given`
    /// (one exported earlier and kept elsewhere), else the latest stored one.
    pub async fn verify_with(
        &self,
        given: Option<Checkpoint>,
    ) -> Result<std::result::Result<Verified, String>> {
        self.blocking(move |c| {
            let entries = c.core.store.audit_raw()?;
            let hashes = match check_chain(&entries) {
                Ok(h) => h,
                Err(problem) => return Ok(Err(problem)),
            };
            let (cp, what) = match given {
                Some(cp) => (Some(cp), "given checkpoint"),
                None => (
                    c.core.store.last::<Checkpoint>(Tree::AuditCheckpoints)?.map(|(_, cp)| cp),
                    "latest checkpoint",
                ),
            };
            if let Some(cp) = &cp {
                if let Err(why) = c.check_signature(cp) {
                    return Ok(Err(format!("the {what} (entry {}) is not valid: {why}", cp.seq)));
                }
                if let Err(problem) = check_against(&hashes, cp, what) {
                    return Ok(Err(problem));
                }
            }
            Ok(Ok(Verified { entries: hashes.len(), checkpoint: cp }))
        })
        .await
    }
}

impl Audit {
    /// The bytes of the audit entry at `seq` as stored, for tests that tamper with the log to
    /// prove verification catches it.
    #[doc(hidden)]
    pub async fn entry_for_tests(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.blocking(move |c| Ok(c.core.store.audit_bytes_for_tests(seq)?)).await
    }

    /// Overwrites (`Some`) or deletes (`None`) the audit entry at `seq` as stored, for tests
    /// that tamper with the log to prove verification catches it.
    #[doc(hidden)]
    pub async fn tamper_for_tests(&self, seq: u64, bytes: Option<Vec<u8>>) -> Result<()> {
        self.blocking(move |c| Ok(c.core.store.tamper_audit_for_tests(seq, bytes.as_deref())?)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(seq: u64, head: &str) -> Checkpoint {
        Checkpoint { seq, head: head.into(), at: 0, signature: String::new() }
    }

    #[test]
    fn checkpoints_catch_a_shortened_or_rewritten_log() {
        let hashes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(check_against(&hashes, &cp(3, "c"), "checkpoint").is_ok());
        assert!(check_against(&hashes, &cp(2, "b"), "checkpoint").is_ok());
        assert!(check_against(&hashes, &cp(0, GENESIS), "checkpoint").is_ok());
        let cut = check_against(&hashes[..1], &cp(3, "c"), "checkpoint").unwrap_err();
        assert!(cut.contains("entries 2-3 missing") && cut.contains("ends at entry 1"), "{cut}");
        let one = check_against(&hashes[..2], &cp(3, "c"), "checkpoint").unwrap_err();
        assert!(one.contains("entry 3 missing"), "{one}");
        let replaced = check_against(&hashes, &cp(2, "x"), "checkpoint").unwrap_err();
        assert!(replaced.contains("entry 2 does not match"), "{replaced}");
    }

    #[test]
    fn hashes_of_entries_without_phases_are_unchanged() {
        let mut e = AuditEntry {
            seq: 1,
            at: 5,
            actor: "controller".into(),
            action: "x".into(),
            target: "t".into(),
            params: serde_json::json!({}),
            outcome: "ok".into(),
            prev_hash: GENESIS.into(),
            hash: String::new(),
            phase: None,
            intent: None,
        };
        let plain = entry_hash(&e);
        let body = serde_json::json!([1, 5, "controller", "x", "t", {}, "ok", GENESIS]);
        assert_eq!(plain, hex::encode(Sha256::digest(body.to_string().as_bytes())));
        e.phase = Some(Phase::Outcome);
        e.intent = Some(1);
        assert_ne!(entry_hash(&e), plain, "the phase and intent are covered by the hash");
    }
}
