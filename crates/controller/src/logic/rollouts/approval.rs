//! Two-person approval: a rollout into an environment with `approvals = N` waits, moving
//! nothing, until N admins other than its deployer approve it (each approval valid for the
//! environment's `approval_ttl`); an approver may reject it; one not approved in time expires.
//! Rollbacks never wait for approval.

use super::{Approval, Control, Rollout, RolloutState, Rollouts};
use crate::logic::{now, Error, Result};
use crate::store::Tree;

/// The longest approval note or rejection reason.
pub const MAX_WORDS: usize = 4096;

/// What an approver decided.
#[derive(Clone, Debug)]
pub enum Decision {
    Approve { note: Option<String> },
    Reject { reason: String },
}

impl Rollouts {
    /// Records an approval or a rejection of rollout `id` by `by` (`admin/NAME`). The deployer
    /// cannot approve their own rollout, nor can one admin approve twice. The last approval
    /// needed moves the rollout on (scheduled, or staging now) and starts its driver.
    pub async fn decide(&self, id: &str, by: &str, decision: Decision) -> Result<Rollout> {
        let words = match &decision {
            Decision::Approve { note } => note.as_deref().unwrap_or_default(),
            Decision::Reject { reason } => reason,
        };
        if words.len() > MAX_WORDS || words.chars().any(|c| c.is_control() || super::spec::is_invisible(c)) {
            return Err(Error::InvalidArgument(format!(
                "an approval's note or a rejection's reason is at most {MAX_WORDS} bytes of text on one line, without control characters"
            )));
        }
        let _gate = self.inner.gate.lock().await;
        let mut r = self.rollout(Some(id.to_owned())).await?;
        let t = now();
        if r.state == RolloutState::AwaitingApproval && self.expire_if_due(&mut r, t).await? {
            return Err(Error::FailedPrecondition(format!(
                "rollout {id} was not approved in time and has expired; deploy again"
            )));
        }
        if r.state != RolloutState::AwaitingApproval {
            return Err(Error::FailedPrecondition(format!(
                "rollout {id} is {}; only a rollout awaiting approval can be approved or rejected",
                state_name(r.state)
            )));
        }
        if let Decision::Approve { .. } = &decision {
            if by == r.created_by {
                return Err(Error::PermissionDenied(format!(
                    "{by} deployed rollout {id} and cannot approve it: approval needs a second person"
                )));
            }
            self.approver_is_independent(by, &r).await?;
        }
        let Some(gate) = r.approval.as_mut() else {
            return Err(Error::Internal(format!("rollout {id} awaits approval but has no approval gate")));
        };
        match decision {
            Decision::Reject { reason } => {
                if reason.trim().is_empty() {
                    return Err(Error::MissingReason("rejection"));
                }
                gate.rejected = Some(Approval { by: by.to_owned(), at: t, note: Some(reason.clone()) });
                r.state = RolloutState::Rejected;
                r.finished_at = Some(t);
                r.failure = Some(format!("rejected by {by}: {reason}"));
                r.event(format!("rejected by {by}: {reason}"));
            }
            Decision::Approve { note } => {
                if gate.approvals.iter().any(|a| a.by == by && a.at + gate.ttl_secs as i64 > t) {
                    return Err(Error::FailedPrecondition(format!("{by} has already approved rollout {id}")));
                }
                gate.approvals.retain(|a| a.by != by);
                gate.approvals.push(Approval { by: by.to_owned(), at: t, note: note.clone() });
                let (valid, required) = (gate.valid(t), gate.required as usize);
                let note = note.map(|n| format!(": {n}")).unwrap_or_default();
                r.event(format!("approved by {by} ({valid} of {required}){note}"));
                if valid >= required {
                    // Its driver starts it (at its start time), after checking again what the
                    // deploy checked: freezes, the bad mark, the promotion rule, the approvals.
                    match r.spec.start_at.filter(|at| *at > t) {
                        Some(at) => {
                            r.event(format!("approved; scheduled to start at {}", crate::cli_time(at)))
                        }
                        None => r.event("approved; starting"),
                    }
                    r.state = RolloutState::Scheduled;
                }
            }
        }
        self.save(&r).await?;
        let body = serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version, "by": by, "state": r.state});
        self.core.notify(
            if r.state == RolloutState::Rejected { "rollout_rejected" } else { "rollout_approved" },
            body,
        );
        if matches!(r.state, RolloutState::Scheduled | RolloutState::Staging) {
            self.spawn_driver(r.id.clone());
        }
        Ok(r)
    }

    /// Refuses an approval the deployer could have arranged alone: when the deployer is among
    /// the approver's controllers, or the approver among the deployer's. A name's controllers
    /// are the name itself, the admin who created it and every admin who issued one of its
    /// certificates, followed through those admins' own records (a rekey through a name one
    /// controls, or a name created by a name one created, does not hide the chain). The records
    /// `convoy init` and the migration made are roots and control nothing.
    async fn approver_is_independent(&self, by: &str, r: &Rollout) -> Result<()> {
        let records = self.registry.list_admins().await?;
        let controllers = |start: &str| {
            let mut seen = std::collections::BTreeSet::new();
            let mut todo = vec![start.to_owned()];
            while let Some(who) = todo.pop() {
                if !seen.insert(who.clone()) {
                    continue;
                }
                let Some(rec) = who.strip_prefix("admin/").and_then(|n| records.iter().find(|x| x.name == n))
                else {
                    continue;
                };
                todo.push(rec.created_by.clone());
                todo.extend(rec.certs.iter().map(|c| c.issued_by.clone()));
            }
            seen
        };
        let deployer = &r.created_by;
        if controllers(by).contains(deployer) || controllers(deployer).contains(by) {
            return Err(Error::PermissionDenied(format!(
                "{deployer}, who deployed rollout {}, and {by} are not independent: one created the other's name or issued one of its certificates; approval needs a second person",
                r.id
            )));
        }
        Ok(())
    }

    /// Abort or supersede of a rollout without a driver (awaiting approval): ends it at once.
    pub(super) async fn control_waiting(&self, id: &str, cmd: Control) -> Result<()> {
        let _gate = self.inner.gate.lock().await;
        let mut r = self.rollout(Some(id.to_owned())).await?;
        if r.state != RolloutState::AwaitingApproval {
            // A driver may have just been started by an approval: hand over to it.
            let tx = self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
            drop(_gate);
            if tx.is_some() {
                return Box::pin(self.control(id, cmd)).await;
            }
            return Err(Error::FailedPrecondition(format!(
                "rollout {id} is already {}",
                state_name(r.state)
            )));
        }
        let (state, what) = match cmd {
            Control::Abort => (RolloutState::Aborted, "aborted"),
            Control::Supersede => (RolloutState::Superseded, "superseded"),
            Control::Pause | Control::Resume => {
                return Err(Error::FailedPrecondition(format!(
                    "rollout {id} is awaiting approval and has not started: approve, reject or abort it"
                )))
            }
        };
        r.state = state;
        r.finished_at = Some(now());
        r.event(format!("{what} while awaiting approval; nothing had moved"));
        self.save(&r).await
    }

    /// Expires every rollout that waited for approval longer than its environment allows
    /// (called by the reconcile tick).
    pub(super) async fn expire_waiting(&self) -> Result<()> {
        let waiting: Vec<Rollout> = self
            .blocking(|c| Ok(c.core.store.list::<Rollout>(Tree::Rollouts)?))
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| r.state == RolloutState::AwaitingApproval)
            .collect();
        for r in waiting {
            let _gate = self.inner.gate.lock().await;
            // Read again under the gate: an approval may have moved it meanwhile.
            let mut r = self.rollout(Some(r.id)).await?;
            if r.state == RolloutState::AwaitingApproval {
                self.expire_if_due(&mut r, now()).await?;
            }
        }
        Ok(())
    }

    /// Expires `r` (awaiting approval) when its approval time has passed; returns whether it
    /// did. Call with the gate held.
    async fn expire_if_due(&self, r: &mut Rollout, t: i64) -> Result<bool> {
        let ttl = r.approval.as_ref().map_or(0, |g| g.ttl_secs as i64);
        if r.created_at + ttl > t {
            return Ok(false);
        }
        r.state = RolloutState::Expired;
        r.finished_at = Some(t);
        r.failure = Some("not approved in time".into());
        r.event("not approved in time: expired, nothing moved");
        self.save(r).await?;
        let target = format!("{}@{}", r.spec.app, r.spec.version);
        let params = serde_json::json!({"rollout": r.id, "environment": r.spec.environment});
        self.audit
            .record("controller", "rollout.expire", &target, params, "expired: not approved in time")
            .await;
        self.core.notify(
            "rollout_expired",
            serde_json::json!({"rollout": r.id, "app": r.spec.app, "version": r.spec.version}),
        );
        Ok(true)
    }
}

/// What a rollout waits for now, in words, if anything (`rollout status`).
pub fn waiting(r: &Rollout, t: i64) -> Vec<String> {
    let mut out = Vec::new();
    match (r.state, &r.approval) {
        (RolloutState::AwaitingApproval, Some(g)) => {
            let missing = (g.required as usize).saturating_sub(g.valid(t));
            let left = (r.created_at + g.ttl_secs as i64 - t).max(0) as u64;
            out.push(format!(
                "waiting for {missing} more approval(s) from admins other than {} (expires in {})",
                r.created_by,
                humantime::format_duration(std::time::Duration::from_secs(left))
            ));
        }
        (RolloutState::Staging | RolloutState::Running | RolloutState::Paused, _) => {
            let now = jiff::Timestamp::from_second(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            for w in &r.window_waits {
                let opens = jiff::Timestamp::from_second(w.opens).unwrap_or(jiff::Timestamp::MAX);
                let state = super::windows::WindowState::Closed { opens, at: w.at.clone() };
                out.extend(state.waiting_message(&w.region, now));
            }
        }
        (RolloutState::Scheduled, _) => {
            if let Some(at) = r.spec.start_at {
                let left = (at - t).max(0) as u64;
                out.push(format!(
                    "scheduled to start at {} (in {})",
                    crate::cli_time(at),
                    humantime::format_duration(std::time::Duration::from_secs(left))
                ));
            }
        }
        _ => {}
    }
    out
}

/// A state as the CLI names it.
pub fn state_name(s: RolloutState) -> &'static str {
    match s {
        RolloutState::AwaitingApproval => "awaiting_approval",
        RolloutState::Scheduled => "scheduled",
        RolloutState::Staging => "staging",
        RolloutState::Running => "running",
        RolloutState::Paused => "paused",
        RolloutState::Completed => "completed",
        RolloutState::RolledBack => "rolled_back",
        RolloutState::Aborted => "aborted",
        RolloutState::Superseded => "superseded",
        RolloutState::Rejected => "rejected",
        RolloutState::Expired => "expired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::rollouts::testing::controller;
    use crate::logic::rollouts::{plan, ApprovalGate, RolloutSpec};

    const DAY: i64 = 24 * 3600;

    fn awaiting(id: &str, created_at: i64) -> Rollout {
        let targets = [("eu-west".to_string(), "eu-0".to_string())];
        let mut r = plan::new_rollout(
            id.into(),
            RolloutSpec::new("shop-api", "1.1.0"),
            "d".into(),
            "admin/a",
            created_at,
            &targets,
        );
        r.state = RolloutState::AwaitingApproval;
        r.approval =
            Some(ApprovalGate { required: 2, ttl_secs: DAY as u64, approvals: vec![], rejected: None });
        r
    }

    #[test]
    fn approvals_count_only_while_they_are_valid() {
        let mut g = ApprovalGate { required: 2, ttl_secs: 100, approvals: vec![], rejected: None };
        g.approvals.push(Approval { by: "admin/b".into(), at: 1000, note: None });
        g.approvals.push(Approval { by: "admin/c".into(), at: 1050, note: None });
        assert_eq!(g.valid(1099), 2);
        assert_eq!(g.valid(1100), 1, "the first expired at its ttl");
        assert_eq!(g.valid(1150), 0);
    }

    #[tokio::test]
    async fn a_rollout_not_approved_in_time_expires_and_cannot_be_approved() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path()).await;
        let t = now();
        ctl.save(&awaiting("ro-1", t - 2 * DAY)).await.unwrap();
        ctl.save(&awaiting("ro-2", t - DAY / 2)).await.unwrap();
        ctl.save(&awaiting("ro-3", t - 2 * DAY)).await.unwrap();
        let e = ctl.decide("ro-1", "admin/b", Decision::Approve { note: None }).await.unwrap_err();
        assert!(e.to_string().contains("was not approved in time and has expired"), "{e}");
        let r = ctl.rollout(Some("ro-1".into())).await.unwrap();
        assert_eq!((r.state, r.failure.as_deref()), (RolloutState::Expired, Some("not approved in time")));
        // The reconcile tick expires what is due, and only that.
        ctl.expire_waiting().await.unwrap();
        assert_eq!(ctl.rollout(Some("ro-3".into())).await.unwrap().state, RolloutState::Expired);
        assert_eq!(ctl.rollout(Some("ro-2".into())).await.unwrap().state, RolloutState::AwaitingApproval);
        // One approval of two: still waiting, and the same admin cannot approve twice.
        let r = ctl.decide("ro-2", "admin/b", Decision::Approve { note: Some("ok".into()) }).await.unwrap();
        assert_eq!(r.state, RolloutState::AwaitingApproval);
        assert_eq!(
            waiting(&r, t),
            ["waiting for 1 more approval(s) from admins other than admin/a (expires in 12h)"]
        );
        let e = ctl.decide("ro-2", "admin/b", Decision::Approve { note: None }).await.unwrap_err();
        assert!(e.to_string().contains("has already approved"), "{e}");
        let e = ctl.decide("ro-2", "admin/a", Decision::Approve { note: None }).await.unwrap_err();
        assert!(e.to_string().contains("cannot approve it"), "{e}");
        let e = ctl
            .decide("ro-2", "admin/c", Decision::Approve { note: Some("\u{1b}[2J".into()) })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without control characters"), "{e}");
    }
}
