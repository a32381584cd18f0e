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
    /// One-off windows; 0 for recurring ones.
    pub from: i64,
    pub to: i64,
    pub reason: String,
    pub app: Option<String>,
    pub region: Option<String>,
    pub created_by: String,
    pub name: Option<String>,
    /// Recurring windows: how they recur; null for one-off ones.
    pub recurrence: Option<FreezeRecurrence>,
    /// Recurring windows: the next start after the listing, Unix seconds; null otherwise.
    pub next_start: Option<i64>,
}

/// `{every: "year", from: "11-26T00:00", to: "12-02T23:59", tz}` or
/// `{every: "week", days: "fri-sun", from: "18:00", to: "23:00", tz}`.
#[derive(Debug, Serialize)]
pub struct FreezeRecurrence {
    pub every: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days: Option<String>,
    pub from: String,
    pub to: String,
    pub tz: String,
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
            name: f.name,
            recurrence: f.recurrence.map(|r| FreezeRecurrence {
                every: r.every,
                days: (!r.days.is_empty()).then_some(r.days),
                from: r.from,
                to: r.to,
                tz: r.tz,
            }),
            next_start: (f.next_start_unix != 0).then_some(f.next_start_unix),
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
/// Per app, per environment, per region.
pub type Status = BTreeMap<String, BTreeMap<String, BTreeMap<String, RegionStatus>>>;

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
        out.entry(r.app).or_default().entry(r.environment).or_default().insert(
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

/// `convoy rollout status -o json` (and one per rollout in `convoy rollout list -o json`).
#[derive(Debug, Serialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub digest: String,
    /// `awaiting_approval`, `scheduled`, `staging`, `running`, `paused`, `completed`,
    /// `rolled_back`, `aborted`, `superseded`, `rejected` or `expired`.
    pub state: &'static str,
    pub created_at: i64,
    pub created_by: String,
    pub finished_at: Option<i64>,
    /// Agent ids per wave.
    pub waves: Vec<Vec<String>>,
    /// The wave being worked on (index into `waves`).
    pub wave: u32,
    /// By agent id.
    pub agents: BTreeMap<String, AgentProgress>,
    pub events: Vec<RolloutEvent>,
    pub failure: Option<String>,
    pub converging: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopping: Option<Stopping>,
    /// Set when its environment requires approvals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGate>,
    /// What it waits for now, in words (approvals, its start time, a deploy window).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
}

impl Rollout {
    /// Whether the rollout has ended.
    pub fn is_final(&self) -> bool {
        matches!(self.state, "completed" | "rolled_back" | "aborted" | "superseded" | "rejected" | "expired")
    }
}

#[derive(Debug, Serialize)]
pub struct RolloutSpec {
    pub app: String,
    pub version: String,
    pub regions: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub canary: u32,
    pub waves: Vec<u32>,
    pub region_order: Vec<String>,
    pub max_parallel: u32,
    /// A duration, e.g. `1m 30s`.
    #[serde(with = "humantime_serde")]
    pub bake: std::time::Duration,
    /// `{"count": N}` or `{"percent": P}`.
    pub max_failures: Threshold,
    #[serde(with = "humantime_serde")]
    pub health_deadline: Option<std::time::Duration>,
    pub force: bool,
    pub downgrade: bool,
    pub supersede: bool,
    pub override_freeze: Option<String>,
    pub require_all: bool,
    /// The environment whose agents it targets.
    pub environment: String,
    /// The change note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The change ticket's URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// When it starts (unix seconds), if scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_at: Option<i64>,
    /// Why the environment's promotion rules were skipped, if they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_promotion: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Approval {
    pub by: String,
    pub at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ApprovalGate {
    pub required: u32,
    pub ttl_secs: u64,
    pub approvals: Vec<Approval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Approval>,
}

impl From<pb::Approval> for Approval {
    fn from(a: pb::Approval) -> Self {
        Self { by: a.by, at: a.at_unix, note: a.note }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    Count(u32),
    Percent(u32),
}

#[derive(Debug, Serialize)]
pub struct AgentProgress {
    pub id: String,
    pub region: String,
    pub wave: u32,
    /// `pending`, `staged`, `activating`, `healthy`, `failed`, `offline` or `rolled_back`.
    pub step: &'static str,
    pub previous: Option<String>,
    pub moved: bool,
    pub error: Option<String>,
    pub activated_at_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct RolloutEvent {
    pub at: i64,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct Stopping {
    /// `release_failed`, `agents_missing` or `aborted`.
    pub kind: &'static str,
    pub reason: String,
}

fn state_name(s: i32) -> &'static str {
    use pb::RolloutState as S;
    match S::try_from(s) {
        Ok(S::Staging) => "staging",
        Ok(S::Running) => "running",
        Ok(S::Paused) => "paused",
        Ok(S::Completed) => "completed",
        Ok(S::RolledBack) => "rolled_back",
        Ok(S::Aborted) => "aborted",
        Ok(S::Superseded) => "superseded",
        Ok(S::AwaitingApproval) => "awaiting_approval",
        Ok(S::Scheduled) => "scheduled",
        Ok(S::Rejected) => "rejected",
        Ok(S::Expired) => "expired",
        Ok(S::Unspecified) | Err(_) => "unknown",
    }
}

fn step_name(s: i32) -> &'static str {
    use pb::AgentStep as S;
    match S::try_from(s) {
        Ok(S::Pending) => "pending",
        Ok(S::Staged) => "staged",
        Ok(S::Activating) => "activating",
        Ok(S::Healthy) => "healthy",
        Ok(S::Failed) => "failed",
        Ok(S::Offline) => "offline",
        Ok(S::RolledBack) => "rolled_back",
        Ok(S::Unspecified) | Err(_) => "unknown",
    }
}

fn stop_name(k: i32) -> &'static str {
    use pb::StopKind as K;
    match K::try_from(k) {
        Ok(K::ReleaseFailed) => "release_failed",
        Ok(K::AgentsMissing) => "agents_missing",
        Ok(K::Aborted) => "aborted",
        Ok(K::Unspecified) | Err(_) => "unknown",
    }
}

impl From<pb::RolloutSpec> for RolloutSpec {
    fn from(s: pb::RolloutSpec) -> Self {
        use pb::failure_threshold::Kind;
        let max_failures = match s.max_failures.and_then(|t| t.kind) {
            Some(Kind::Percent(p)) => Threshold::Percent(p),
            Some(Kind::Count(n)) => Threshold::Count(n),
            None => Threshold::Count(0),
        };
        Self {
            app: s.app,
            version: s.version,
            regions: s.regions,
            selector: s.selector.into_iter().collect(),
            canary: s.canary,
            waves: s.waves,
            region_order: s.region_order,
            max_parallel: s.max_parallel,
            bake: std::time::Duration::from_millis(s.bake_ms),
            max_failures,
            health_deadline: s.health_deadline_ms.map(std::time::Duration::from_millis),
            force: s.force,
            downgrade: s.downgrade,
            supersede: s.supersede,
            override_freeze: s.override_freeze,
            require_all: s.require_all,
            environment: s.environment,
            note: s.note,
            ticket: s.ticket,
            start_at: s.start_at_unix,
            skip_promotion: s.skip_promotion,
        }
    }
}

impl From<pb::Rollout> for Rollout {
    fn from(r: pb::Rollout) -> Self {
        let agents = r
            .agents
            .into_iter()
            .map(|a| {
                let progress = AgentProgress {
                    id: a.id.clone(),
                    region: a.region,
                    wave: a.wave,
                    step: step_name(a.step),
                    previous: a.previous,
                    moved: a.moved,
                    error: a.error,
                    activated_at_ms: a.activated_at_ms,
                };
                (a.id, progress)
            })
            .collect();
        Self {
            id: r.id,
            spec: r.spec.unwrap_or_default().into(),
            digest: r.digest,
            state: state_name(r.state),
            created_at: r.created_at_unix,
            created_by: r.created_by,
            finished_at: r.finished_at_unix,
            waves: r.waves.into_iter().map(|w| w.agent_ids).collect(),
            wave: r.wave,
            agents,
            events: r
                .events
                .into_iter()
                .map(|e| RolloutEvent { at: e.at_unix, message: e.message })
                .collect(),
            failure: r.failure,
            converging: r.converging,
            stopping: r.stopping.map(|s| Stopping { kind: stop_name(s.kind), reason: s.reason }),
            approval: r.approval.map(|g| ApprovalGate {
                required: g.required,
                ttl_secs: g.ttl_secs,
                approvals: g.approvals.into_iter().map(Approval::from).collect(),
                rejected: g.rejected.map(Approval::from),
            }),
            waiting: r.waiting,
        }
    }
}
