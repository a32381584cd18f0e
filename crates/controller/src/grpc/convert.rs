//! Conversions between the wire types and the domain: the one place where proto messages are
//! built from domain values, or read into them.

use std::collections::BTreeMap;

use convoy_proto::v1 as pb;

use crate::logic::admins::AdminRecord;
use crate::logic::audit::{AuditEntry, Checkpoint, Phase, Verified};
use crate::logic::rollouts::freeze::{Recurrence, RecurrenceError};
use crate::logic::rollouts::status::FleetStatus;
use crate::logic::rollouts::{
    AgentProgress, AgentStep, Approval, FreezeWindow, Rollout, RolloutSpec, RolloutState, StopKind, Threshold,
};
use crate::logic::{self, OrderKind};
use crate::store::{self, AppStatusRecord, ReportedRelease};

pub(super) fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

/// Whether a reported version is acceptable: empty (none) or a valid version, which is also a
/// safe path component for any agent it is passed on to.
pub(super) fn version_ok(v: &str) -> bool {
    v.is_empty() || convoy_bundle::check_version(v).is_ok()
}

/// An agent's per-app reports, with entries that name an invalid app or version dropped: what an
/// agent says is data about itself, and only well-formed names may reach the store. Bounded:
/// at most [`store::MAX_REPORTED_APPS`] apps, each with its error cut to
/// [`store::MAX_REPORTED_ERROR`] bytes and at most [`store::MAX_REPORTED_RELEASES`] installed.
pub(super) fn reported_apps(agent_id: &str, list: Vec<pb::AppStatus>) -> Vec<AppStatusRecord> {
    if list.len() > store::MAX_REPORTED_APPS {
        tracing::warn!(agent_id, apps = list.len(), "too many apps reported; the rest are dropped");
    }
    list.into_iter()
        .take(store::MAX_REPORTED_APPS)
        .filter_map(|s| {
            let ok = convoy_bundle::check_app_name(&s.app).is_ok()
                && [&s.current, &s.known_good, &s.previous].iter().all(|v| version_ok(v))
                && s.installed.len() <= store::MAX_REPORTED_RELEASES
                && s.installed.iter().all(|v| version_ok(v) && !v.is_empty());
            if !ok {
                tracing::warn!(agent_id, app = %s.app.escape_debug(), "dropping a malformed app report");
            }
            ok.then(|| app_status(s))
        })
        .collect()
}

pub(super) fn app_status(s: pb::AppStatus) -> AppStatusRecord {
    let health = pb::Health::from_wire(s.health).name();
    AppStatusRecord {
        app: s.app,
        current: s.current,
        known_good: s.known_good,
        previous: s.previous,
        health: health.into(),
        last_error: cut(s.last_error, store::MAX_REPORTED_ERROR),
        installed: s.installed,
        busy: s.busy,
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub(super) fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

pub(super) fn app_status_pb(s: AppStatusRecord) -> pb::AppStatus {
    let health = pb::Health::from_name(&s.health);
    pb::AppStatus {
        app: s.app,
        current: s.current,
        known_good: s.known_good,
        previous: s.previous,
        health: health as i32,
        last_error: cut(s.last_error, store::MAX_REPORTED_ERROR),
        installed: s.installed,
        busy: s.busy,
    }
}

pub(super) fn order_pb(o: logic::Order) -> pb::ControllerMessage {
    use pb::order::Kind;
    let kind = match o.kind {
        OrderKind::Install { app, version, digest } => {
            Kind::Install(pb::InstallOrder { app, version, digest })
        }
        OrderKind::Activate { app, version, health_deadline } => Kind::Activate(pb::ActivateOrder {
            app,
            version,
            health_deadline_secs: health_deadline
                .map(|d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX))
                .unwrap_or(0),
        }),
        OrderKind::Rollback { app, from, to, reason } => Kind::Rollback(pb::RollbackOrder {
            app,
            from_version: from,
            to_version: to.unwrap_or_default(),
            reason,
        }),
        OrderKind::Logs { app, lines } => Kind::Logs(pb::LogsOrder { app, lines }),
    };
    pb::ControllerMessage {
        msg: Some(pb::controller_message::Msg::Order(pb::Order { seq: o.seq, kind: Some(kind) })),
    }
}

pub(super) fn outcome(r: pb::OrderResult) -> logic::OrderOutcome {
    use logic::Answer;
    let mut message = r.message;
    let answer = match pb::OrderOutcome::try_from(r.outcome) {
        Ok(pb::OrderOutcome::Applied) => Answer::Applied,
        Ok(pb::OrderOutcome::AlreadyInState) => Answer::AlreadyInState,
        Ok(pb::OrderOutcome::Refused) => Answer::Refused { field: r.field },
        Ok(pb::OrderOutcome::Failed) => Answer::Failed,
        Ok(pb::OrderOutcome::Stale) => Answer::Stale { agent_last_seq: r.agent_last_seq },
        // An answer without a known outcome is never read as success.
        Ok(pb::OrderOutcome::Unspecified) | Err(_) => {
            message = format!("agent answered without a known outcome ({}): {message}", r.outcome);
            Answer::Failed
        }
    };
    // An order's status report is checked like a heartbeat's.
    let status = r.status.and_then(|s| reported_apps("(order result)", vec![s]).pop());
    logic::OrderOutcome { seq: r.seq, answer, message, status, output: r.output }
}

/// The wire form of an agent's answer.
pub(super) fn outcome_pb(a: &logic::Answer) -> pb::OrderOutcome {
    match a {
        logic::Answer::Applied => pb::OrderOutcome::Applied,
        logic::Answer::AlreadyInState => pb::OrderOutcome::AlreadyInState,
        logic::Answer::Refused { .. } => pb::OrderOutcome::Refused,
        logic::Answer::Failed => pb::OrderOutcome::Failed,
        logic::Answer::Stale { .. } => pb::OrderOutcome::Stale,
    }
}

pub(super) fn releases(agent_id: &str, list: Vec<pb::ReleaseRef>) -> Vec<ReportedRelease> {
    if list.len() > store::MAX_REPORTED_RELEASES {
        tracing::warn!(agent_id, releases = list.len(), "too many releases reported; the rest are dropped");
    }
    list.into_iter()
        .take(store::MAX_REPORTED_RELEASES)
        .filter(|r| {
            let ok = convoy_bundle::check_app_name(&r.app).is_ok()
                && convoy_bundle::check_version(&r.version).is_ok();
            if !ok {
                tracing::warn!(agent_id, app = %r.app.escape_debug(), "dropping a malformed release report");
            }
            ok
        })
        .map(|r| ReportedRelease { app: r.app, version: r.version, active: r.active })
        .collect()
}

pub(super) fn release_info(r: crate::store::ReleaseRecord) -> pb::ReleaseInfo {
    pb::ReleaseInfo {
        app: r.app,
        version: r.version,
        digest: r.digest,
        size: r.size,
        created_at_unix: r.created_at,
        pushed_at_unix: r.pushed_at,
        pushed_by: r.pushed_by,
        signers: r.signers,
        unpacked_size: r.unpacked_size,
        files: r.files,
    }
}

pub(super) fn admin_info(r: AdminRecord) -> pb::AdminInfo {
    pb::AdminInfo {
        name: r.name,
        role: r.role.to_string(),
        certs: r
            .certs
            .into_iter()
            .map(|c| pb::AdminCertInfo {
                serial: c.serial,
                issued_at_unix: c.issued_at,
                issued_by: c.issued_by,
                not_after_unix: c.not_after,
                revoked: c.revoked,
                revoked_at_unix: c.revoked_at.unwrap_or(0),
                revoked_by: c.revoked_by.unwrap_or_default(),
            })
            .collect(),
        created_by: r.created_by,
        created_at_unix: r.created_at,
    }
}

/// A freeze as listed at `now`: a recurring one carries its next start after `now`.
pub(super) fn freeze_pb(f: FreezeWindow, now: i64) -> pb::FreezeWindow {
    pb::FreezeWindow {
        next_start_unix: f.next_start(now).unwrap_or(0),
        id: f.id,
        from_unix: f.from,
        to_unix: f.to,
        reason: f.reason,
        app: f.app,
        region: f.region,
        created_by: f.created_by,
        name: f.name,
        recurrence: f.recurrence.map(recurrence_pb),
    }
}

fn recurrence_pb(r: Recurrence) -> pb::FreezeRecurrence {
    match r {
        Recurrence::Year { from, to, tz } => pb::FreezeRecurrence {
            every: "year".into(),
            days: String::new(),
            from: from.to_string(),
            to: to.to_string(),
            tz: tz.to_string(),
        },
        Recurrence::Week { days, from, to, tz } => pb::FreezeRecurrence {
            every: "week".into(),
            days: days.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            tz: tz.to_string(),
        },
    }
}

/// A requested recurrence, validated.
pub(super) fn parse_recurrence(r: &pb::FreezeRecurrence) -> Result<Recurrence, RecurrenceError> {
    Recurrence::parse(&r.every, &r.days, &r.from, &r.to, &r.tz)
}

pub(super) fn audit_entry_pb(e: AuditEntry) -> pb::AuditEntry {
    let phase = match e.phase {
        None => pb::AuditPhase::Unspecified,
        Some(Phase::Intent) => pb::AuditPhase::Intent,
        Some(Phase::Outcome) => pb::AuditPhase::Outcome,
    };
    pb::AuditEntry {
        seq: e.seq,
        at_unix: e.at,
        actor: e.actor,
        action: e.action,
        target: e.target,
        params_json: e.params.to_string(),
        outcome: e.outcome,
        prev_hash: e.prev_hash,
        hash: e.hash,
        phase: phase as i32,
        intent: e.intent,
    }
}

pub(super) fn checkpoint_pb(c: Checkpoint) -> pb::AuditCheckpoint {
    pb::AuditCheckpoint { seq: c.seq, head: c.head, at_unix: c.at, signature: c.signature }
}

pub(super) fn checkpoint(c: pb::AuditCheckpoint) -> Checkpoint {
    Checkpoint { seq: c.seq, head: c.head, at: c.at_unix, signature: c.signature }
}

pub(super) fn verification_pb(v: Result<Verified, String>) -> pb::AuditVerification {
    match v {
        Ok(v) => pb::AuditVerification {
            ok: true,
            entries: v.entries as u64,
            checkpoint_seq: v.checkpoint.map(|c| c.seq),
            problem: String::new(),
        },
        Err(problem) => pb::AuditVerification { ok: false, problem, ..Default::default() },
    }
}

pub(super) fn fleet_status_pb(status: FleetStatus) -> pb::FleetStatus {
    let regions = status
        .into_iter()
        .flat_map(|(app, envs)| {
            envs.into_iter().flat_map(move |(env, regions)| {
                let app = app.clone();
                regions.into_iter().map(move |(region, s)| pb::RegionStatus {
                    app: app.clone(),
                    environment: env.to_string(),
                    region,
                    desired: s.desired,
                    running: s.running.into_iter().collect(),
                    unhealthy: s.unhealthy,
                    offline: s.offline,
                    drift: s.drift,
                })
            })
        })
        .collect();
    pb::FleetStatus { regions }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn rollout_state_pb(s: RolloutState) -> pb::RolloutState {
    match s {
        RolloutState::Staging => pb::RolloutState::Staging,
        RolloutState::Running => pb::RolloutState::Running,
        RolloutState::Paused => pb::RolloutState::Paused,
        RolloutState::Completed => pb::RolloutState::Completed,
        RolloutState::RolledBack => pb::RolloutState::RolledBack,
        RolloutState::Aborted => pb::RolloutState::Aborted,
        RolloutState::Superseded => pb::RolloutState::Superseded,
        RolloutState::AwaitingApproval => pb::RolloutState::AwaitingApproval,
        RolloutState::Scheduled => pb::RolloutState::Scheduled,
        RolloutState::Rejected => pb::RolloutState::Rejected,
        RolloutState::Expired => pb::RolloutState::Expired,
    }
}

pub(super) fn agent_step_pb(s: AgentStep) -> pb::AgentStep {
    match s {
        AgentStep::Pending => pb::AgentStep::Pending,
        AgentStep::Staged => pb::AgentStep::Staged,
        AgentStep::Activating => pb::AgentStep::Activating,
        AgentStep::Healthy => pb::AgentStep::Healthy,
        AgentStep::Failed => pb::AgentStep::Failed,
        AgentStep::Offline => pb::AgentStep::Offline,
        AgentStep::RolledBack => pb::AgentStep::RolledBack,
    }
}

fn stop_kind_pb(k: StopKind) -> pb::StopKind {
    match k {
        StopKind::ReleaseFailed => pb::StopKind::ReleaseFailed,
        StopKind::AgentsMissing => pb::StopKind::AgentsMissing,
        StopKind::Aborted => pb::StopKind::Aborted,
    }
}

fn threshold_pb(t: Threshold) -> pb::FailureThreshold {
    use pb::failure_threshold::Kind;
    let kind = match t {
        Threshold::Count(n) => Kind::Count(n),
        Threshold::Percent(p) => Kind::Percent(p),
    };
    pb::FailureThreshold { kind: Some(kind) }
}

pub(super) fn rollout_spec_pb(s: RolloutSpec) -> pb::RolloutSpec {
    pb::RolloutSpec {
        app: s.app,
        version: s.version,
        regions: s.regions,
        selector: s.selector.into_iter().collect(),
        canary: s.canary,
        waves: s.waves,
        region_order: s.region_order,
        max_parallel: s.max_parallel,
        bake_ms: millis(s.bake),
        max_failures: Some(threshold_pb(s.max_failures)),
        health_deadline_ms: s.health_deadline.map(millis),
        force: s.force,
        downgrade: s.downgrade,
        supersede: s.supersede,
        override_freeze: s.override_freeze,
        require_all: s.require_all,
        environment: s.environment.to_string(),
        note: s.note,
        ticket: s.ticket,
        start_at_unix: s.start_at,
        skip_promotion: s.skip_promotion,
    }
}

fn approval_pb(a: Approval) -> pb::Approval {
    pb::Approval { by: a.by, at_unix: a.at, note: a.note }
}

fn agent_progress_pb(a: AgentProgress) -> pb::AgentProgress {
    pb::AgentProgress {
        id: a.id,
        region: a.region,
        wave: u32::try_from(a.wave).unwrap_or(u32::MAX),
        step: agent_step_pb(a.step) as i32,
        previous: a.previous,
        moved: a.moved,
        error: a.error,
        activated_at_ms: a.activated_at_ms.map(|t| u64::try_from(t).unwrap_or(u64::MAX)),
    }
}

pub(super) fn rollout_pb(r: Rollout) -> pb::Rollout {
    let waiting = logic::rollouts::approval::waiting(&r, logic::now());
    pb::Rollout {
        waiting,
        approval: r.approval.map(|g| pb::ApprovalGate {
            required: g.required,
            ttl_secs: g.ttl_secs,
            approvals: g.approvals.into_iter().map(approval_pb).collect(),
            rejected: g.rejected.map(approval_pb),
        }),
        id: r.id,
        spec: Some(rollout_spec_pb(r.spec)),
        digest: r.digest,
        state: rollout_state_pb(r.state) as i32,
        created_at_unix: r.created_at,
        created_by: r.created_by,
        finished_at_unix: r.finished_at,
        waves: r.waves.into_iter().map(|agent_ids| pb::Wave { agent_ids }).collect(),
        wave: u32::try_from(r.wave).unwrap_or(u32::MAX),
        agents: r.agents.into_values().map(agent_progress_pb).collect(),
        events: r
            .events
            .into_iter()
            .map(|e| pb::RolloutEvent { at_unix: e.at, message: e.message })
            .collect(),
        failure: r.failure,
        converging: r.converging,
        stopping: r
            .stopping
            .map(|s| pb::RolloutStopping { kind: stop_kind_pb(s.kind) as i32, reason: s.reason }),
    }
}

pub(super) fn agent_pb(v: logic::AgentView) -> pb::AgentInfo {
    let r = v.record;
    pb::AgentInfo {
        id: r.id,
        region: r.region,
        environment: r.environment.to_string(),
        labels: r.labels.into_iter().collect(),
        online: v.online,
        first_seen_unix: r.first_seen,
        last_seen_unix: r.last_seen,
        cert_serial: r.cert_serial,
        cert_not_after_unix: r.cert_not_after,
        releases: r
            .releases
            .into_iter()
            .map(|r| pb::ReleaseRef { app: r.app, version: r.version, active: r.active })
            .collect(),
        revoked: r.revoked,
        agent_version: r.agent_version,
        apps: r.apps.into_iter().map(app_status_pb).collect(),
    }
}

/// The longest health deadline or bake time a deploy may ask for (agents refuse longer
/// health deadlines).
const MAX_DEPLOY_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A deploy request as a rollout spec. What an agent would refuse is refused here, before
/// anything starts: a rollout must not fail (and mark its release bad) on an argument.
pub(super) fn deploy_spec(r: pb::DeployRequest) -> Result<RolloutSpec, logic::Error> {
    use std::time::Duration;
    for (what, ms) in [("health deadline", r.health_deadline_ms), ("bake time", r.bake_ms)] {
        if Duration::from_millis(ms) > MAX_DEPLOY_DURATION {
            return Err(logic::Error::InvalidArgument(format!(
                "the {what} of {} is longer than {}",
                humantime::format_duration(Duration::from_millis(ms)),
                humantime::format_duration(MAX_DEPLOY_DURATION)
            )));
        }
    }
    let mut spec = RolloutSpec::new(&r.app, &r.version);
    spec.regions = r.regions;
    spec.selector = r.selector.into_iter().collect();
    if r.canary_set {
        spec.canary = r.canary;
    }
    if !r.waves.is_empty() {
        spec.waves = r.waves;
    }
    spec.region_order = r.region_order;
    if r.max_parallel > 0 {
        spec.max_parallel = r.max_parallel;
    }
    spec.bake = Duration::from_millis(r.bake_ms);
    if !r.max_failures.is_empty() {
        spec.max_failures = Threshold::parse(&r.max_failures)?;
    }
    spec.health_deadline = (r.health_deadline_ms > 0).then(|| Duration::from_millis(r.health_deadline_ms));
    spec.force = r.force;
    spec.downgrade = r.downgrade;
    spec.supersede = r.supersede;
    spec.override_freeze = r.override_freeze.then_some(r.reason);
    spec.require_all = r.require_all;
    spec.environment = logic::Environment::parse_or_default(&r.environment)?;
    // A note of blanks is no note.
    spec.note = (!r.note.trim().is_empty()).then_some(r.note);
    spec.ticket = (!r.ticket.is_empty()).then_some(r.ticket);
    spec.start_at = (r.start_at_unix != 0).then_some(r.start_at_unix);
    spec.skip_promotion = r.skip_promotion.then_some(r.skip_reason);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::cli::json;

    /// The CLI's `-o json` shape of a rollout is what the domain record serialized to before
    /// the admin API was typed: the round trip through the wire keeps every field.
    #[test]
    fn rollout_json_keeps_its_shape() {
        let stored = json!({
            "id": "ro-7",
            "spec": {
                "app": "shop-api", "version": "1.1.0", "regions": ["eu-west"],
                "selector": {"tier": "web"}, "canary": 1, "waves": [10, 50, 100],
                "region_order": ["eu"], "max_parallel": 10, "bake": "1m 30s",
                "max_failures": {"percent": 10}, "health_deadline": "30s", "force": false,
                "downgrade": false, "supersede": true, "override_freeze": "hotfix",
                "require_all": false
            },
            "digest": "ab12", "state": "rolled_back", "created_at": 100, "created_by": "admin/ops",
            "finished_at": 160, "waves": [["eu-1"], ["eu-2", "eu-3"]], "wave": 1,
            "agents": {
                "eu-1": {"id": "eu-1", "region": "eu-west", "wave": 0, "step": "rolled_back",
                         "previous": "1.0.0", "moved": true, "error": null, "activated_at_ms": 1234},
                "eu-2": {"id": "eu-2", "region": "eu-west", "wave": 1, "step": "failed",
                         "previous": null, "moved": false, "error": "unhealthy", "activated_at_ms": null}
            },
            "events": [{"at": 101, "message": "started"}],
            "failure": "wave 2: 1 failed", "converging": ["eu-3"],
            "stopping": {"kind": "release_failed", "reason": "wave 2"}
        });
        let domain: Rollout = serde_json::from_value(stored).unwrap();
        // Records leave the default environment out; the CLI always names it.
        let with_env = |mut v: Value| {
            v["spec"]["environment"] = "production".into();
            v
        };
        let before = with_env(serde_json::to_value(&domain).unwrap());
        let after = serde_json::to_value(json::Rollout::from(rollout_pb(domain.clone()))).unwrap();
        assert_eq!(before, after);

        let mut plain = domain;
        plain.stopping = None;
        plain.spec.max_failures = Threshold::Count(0);
        plain.spec.health_deadline = None;
        plain.spec.override_freeze = None;
        plain.finished_at = None;
        let before = with_env(serde_json::to_value(&plain).unwrap());
        let after = serde_json::to_value(json::Rollout::from(rollout_pb(plain))).unwrap();
        assert_eq!(before, after);
        assert!(after.get("stopping").is_none());
    }

    #[test]
    fn audit_and_freeze_json_keep_their_shape() {
        for stored in [
            json!({"seq": 3, "at": 9, "actor": "admin/ops", "action": "deploy", "target": "a@1",
                   "params": {"x": [1, "y"]}, "outcome": "ok", "prev_hash": "p", "hash": "h",
                   "phase": "outcome", "intent": 2}),
            json!({"seq": 1, "at": 9, "actor": "controller", "action": "rollout.mark_bad",
                   "target": "a@1", "params": {}, "outcome": "ok", "prev_hash": "p", "hash": "h"}),
        ] {
            let e: AuditEntry = serde_json::from_value(stored.clone()).unwrap();
            let after = serde_json::to_value(json::AuditEntry::from(audit_entry_pb(e))).unwrap();
            assert_eq!(stored, after);
        }
        // A freeze stored before names and recurrences lists as before, with those keys null.
        let stored = json!({"id": "fz-1", "from": 1, "to": 2, "reason": "peak", "app": null,
                            "region": "us-east", "created_by": "admin/ops"});
        let f: FreezeWindow = serde_json::from_value(stored.clone()).unwrap();
        let mut listed = stored.clone();
        for key in ["name", "recurrence", "next_start"] {
            listed[key] = serde_json::Value::Null;
        }
        assert_eq!(listed, serde_json::to_value(json::Freeze::from(freeze_pb(f, 5))).unwrap());
        // A recurring one lists its recurrence as stored, and its next start.
        for recurrence in [
            json!({"every": "year", "from": "11-26T00:00", "to": "12-02T23:59", "tz": "America/New_York"}),
            json!({"every": "week", "days": "fri-sun", "from": "18:00", "to": "23:00", "tz": "UTC"}),
        ] {
            let stored = json!({"id": "fz-2", "from": 0, "to": 0, "reason": "sale", "app": "shop",
                                "region": null, "created_by": "admin/ops", "name": "sale",
                                "recurrence": recurrence});
            let f: FreezeWindow = serde_json::from_value(stored.clone()).unwrap();
            // 2026-06-10T00:00Z, a Wednesday.
            let now = 1_781_049_600;
            let next = f.next_start(now).unwrap();
            assert!(next > now, "{recurrence}");
            let mut listed = stored.clone();
            listed["next_start"] = json!(next);
            assert_eq!(listed, serde_json::to_value(json::Freeze::from(freeze_pb(f.clone(), now))).unwrap());
            let pb = freeze_pb(f.clone(), now).recurrence.unwrap();
            assert_eq!(parse_recurrence(&pb).unwrap(), f.recurrence.unwrap(), "the wire form parses back");
        }
        let cp = Checkpoint { seq: 6, head: "h".into(), at: 5, signature: "s".into() };
        let file = serde_json::to_value(json::Checkpoint::from(checkpoint_pb(cp.clone()))).unwrap();
        assert_eq!(serde_json::to_value(&cp).unwrap(), file);
        assert_eq!(checkpoint(json::Checkpoint::from(checkpoint_pb(cp.clone())).into()), cp);
    }

    #[test]
    fn status_json_keeps_its_shape() {
        use crate::logic::rollouts::status::RegionStatus;
        let mut status = FleetStatus::new();
        let staging = logic::Environment::parse("staging").unwrap();
        for (app, env, region) in [
            ("api", logic::Environment::default(), "eu"),
            ("api", logic::Environment::default(), "us"),
            ("api", staging.clone(), "eu"),
            ("web", logic::Environment::default(), "eu"),
        ] {
            let s = RegionStatus {
                desired: vec!["1.0.0".into()],
                running: [("1.0.0".to_string(), 2), ("(none)".to_string(), 1)].into(),
                unhealthy: vec!["a".into()],
                offline: vec![],
                drift: vec!["b".into()],
            };
            status.entry(app.to_string()).or_default().entry(env).or_default().insert(region.to_string(), s);
        }
        let before: Value = serde_json::to_value(&status).unwrap();
        let after = serde_json::to_value(json::status(fleet_status_pb(status))).unwrap();
        assert_eq!(before, after);
    }
}
