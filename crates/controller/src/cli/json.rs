//! The stable `-o json` shapes of the CLI: built from the typed admin API, serialized here and
//! nowhere else, so a renamed domain or wire field cannot change what scripts read. Documented
//! in docs/operations.md.

use std::collections::BTreeMap;

use convoy_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// `convoy freeze list -o json`: one per window.
#[derive(Debug, Serialize)]
pub struct Freeze {
    pub id: String,
    pub from: i64,
    pub to: i64,
    pub reason: String,
    pub app: Option<String>,
    pub region: Option<String>,
    pub created_by: String,
}

impl From<pb::FreezeWindow> for Freeze {
    fn from(f: pb::FreezeWindow) -> Self {
        Self {
            id: f.id,
            from: f.from_unix,
            to: f.to_unix,
            reason: f.reason,
            app: f.app,
            region: f.region,
            created_by: f.created_by,
        }
    }
}

/// `convoy audit -o json`: one per entry.
#[derive(Debug, Serialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub params: serde_json::Value,
    pub outcome: String,
    pub prev_hash: String,
    pub hash: String,
    /// `intent` or `outcome`; absent on single records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<&'static str>,
    /// On an outcome: the sequence number of its intent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<u64>,
}

impl From<pb::AuditEntry> for AuditEntry {
    fn from(e: pb::AuditEntry) -> Self {
        let phase = match pb::AuditPhase::try_from(e.phase) {
            Ok(pb::AuditPhase::Intent) => Some("intent"),
            Ok(pb::AuditPhase::Outcome) => Some("outcome"),
            _ => None,
        };
        Self {
            seq: e.seq,
            at: e.at_unix,
            actor: e.actor,
            action: e.action,
            target: e.target,
            params: serde_json::from_str(&e.params_json).unwrap_or(serde_json::Value::Null),
            outcome: e.outcome,
            prev_hash: e.prev_hash,
            hash: e.hash,
            phase,
            intent: e.intent,
        }
    }
}

/// An exported audit checkpoint file (`convoy audit export`), read back by `audit verify`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub head: String,
    pub at: i64,
    pub signature: String,
}

impl From<pb::AuditCheckpoint> for Checkpoint {
    fn from(c: pb::AuditCheckpoint) -> Self {
        Self { seq: c.seq, head: c.head, at: c.at_unix, signature: c.signature }
    }
}

impl From<Checkpoint> for pb::AuditCheckpoint {
    fn from(c: Checkpoint) -> Self {
        Self { seq: c.seq, head: c.head, at_unix: c.at, signature: c.signature }
    }
}

/// `convoy status -o json`: per app, per region.
pub type Status = BTreeMap<String, BTreeMap<String, RegionStatus>>;

/// One app in one region of `convoy status -o json`.
#[derive(Debug, Serialize)]
pub struct RegionStatus {
    pub desired: Vec<String>,
    pub running: BTreeMap<String, u64>,
    pub unhealthy: Vec<String>,
    pub offline: Vec<String>,
    pub drift: Vec<String>,
}

/// The stable shape of a fleet status.
pub fn status(s: pb::FleetStatus) -> Status {
    let mut out = Status::new();
    for r in s.regions {
        out.entry(r.app).or_default().insert(
            r.region,
            RegionStatus {
                desired: r.desired,
                running: r.running.into_iter().collect(),
                unhealthy: r.unhealthy,
                offline: r.offline,
                drift: r.drift,
            },
        );
    }
    out
}
