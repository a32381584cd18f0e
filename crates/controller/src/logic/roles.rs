//! Roles and what each may do: the one table that says which role every admin action needs,
//! and the alert hooks' own, narrower principal.
//!
//! Admin roles are ranked (`viewer` < `deployer` < `approver` < `admin`); a role may do what its
//! rank and every lower rank may do. Alert hooks are not on that ladder: they may roll back,
//! pause, and abort (an abort rolls back the agents a rollout moved), and nothing else.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// An admin's role, in increasing rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: agents, status, releases, rollouts, the audit log, freezes.
    Viewer,
    /// Viewer, plus push, deploy, rollback, pause/resume/abort and logs.
    Deployer,
    /// Deployer, plus approving rollouts.
    Approver,
    /// Everything: tokens, agent revocation, admins, freezes, release removal.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Deployer, Role::Approver, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown role {s:?}: use viewer, deployer, approver or admin"))
        })
    }
}

/// Everything an admin or a hook can ask the controller to do. Each admin RPC maps to exactly
/// one action (RPCs that multiplex, like `Freeze` and `ControlRollout`, by their sub-action).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    ListAgents,
    Status,
    ListReleases,
    GetRollout,
    ListRollouts,
    Audit,
    ListFreezes,
    PushRelease,
    Deploy,
    Rollback,
    PauseRollout,
    ResumeRollout,
    AbortRollout,
    Logs,
    ApproveRollout,
    RejectRollout,
    SkipPromotion,
    CreateToken,
    RevokeAgent,
    RemoveRelease,
    AddFreeze,
    RemoveFreeze,
    /// Deploying through a freeze window (`override_freeze` on a deploy): freezes are the
    /// admins', so is stepping over one.
    OverrideFreeze,
    AddAdmin,
    /// A new certificate for the caller's own name.
    RekeySelf,
    /// A new certificate for another admin's name.
    RekeyOther,
    RevokeAdmin,
    ListAdmins,
}

impl Action {
    /// The role an admin needs for this action: the single table of who may do what.
    pub fn required_role(self) -> Role {
        use Action as A;
        match self {
            A::ListAgents
            | A::Status
            | A::ListReleases
            | A::GetRollout
            | A::ListRollouts
            | A::Audit
            | A::ListFreezes
            | A::RekeySelf => Role::Viewer,
            A::PushRelease
            | A::Deploy
            | A::Rollback
            | A::PauseRollout
            | A::ResumeRollout
            | A::AbortRollout
            | A::Logs => Role::Deployer,
            A::ApproveRollout | A::RejectRollout => Role::Approver,
            A::CreateToken
            | A::RevokeAgent
            | A::RemoveRelease
            | A::AddFreeze
            | A::RemoveFreeze
            | A::OverrideFreeze
            | A::SkipPromotion
            | A::AddAdmin
            | A::RekeyOther
            | A::RevokeAdmin
            | A::ListAdmins => Role::Admin,
        }
    }

    /// The name this action has in the audit log.
    pub fn audit_name(self) -> &'static str {
        use Action as A;
        match self {
            A::ListAgents => "agents.list",
            A::Status => "status",
            A::ListReleases => "release.list",
            A::GetRollout => "rollout.get",
            A::ListRollouts => "rollout.list",
            A::Audit => "audit",
            A::ListFreezes => "freeze.list",
            A::PushRelease => "release.push",
            A::Deploy => "deploy",
            A::Rollback => "rollback",
            A::PauseRollout => "rollout.pause",
            A::ResumeRollout => "rollout.resume",
            A::AbortRollout => "rollout.abort",
            A::Logs => "logs",
            A::ApproveRollout => "rollout.approve",
            A::RejectRollout => "rollout.reject",
            A::SkipPromotion => "promotion.skip",
            A::CreateToken => "token.create",
            A::RevokeAgent => "agent.revoke",
            A::RemoveRelease => "release.rm",
            A::AddFreeze => "freeze.add",
            A::RemoveFreeze => "freeze.rm",
            A::OverrideFreeze => "freeze.override",
            A::AddAdmin => "admin.add",
            A::RekeySelf | A::RekeyOther => "admin.rekey",
            A::RevokeAdmin => "admin.revoke",
            A::ListAdmins => "admin.list",
        }
    }
}

/// Who is acting: an admin with a role from the registry, or an alert hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin(Role),
    Hook,
}

impl Principal {
    /// Whether this principal may perform `action`.
    pub fn may(self, action: Action) -> bool {
        match self {
            Principal::Admin(role) => role >= action.required_role(),
            // Hooks respond to incidents: they may stop a rollout or go back, never move forward
            // or change who can do what.
            Principal::Hook => {
                matches!(action, Action::Rollback | Action::PauseRollout | Action::AbortRollout)
            }
        }
    }

    /// Refuses `action` unless this principal may perform it; `who` names the caller.
    pub fn authorize(self, who: &str, action: Action) -> Result<()> {
        if self.may(action) {
            return Ok(());
        }
        Err(match self {
            Principal::Admin(role) => Error::RoleTooLow {
                who: who.to_owned(),
                action: action.audit_name(),
                needed: action.required_role(),
                role,
            },
            Principal::Hook => Error::PermissionDenied(format!(
                "{who} is an alert hook: hooks may only roll back or pause, not {}",
                action.audit_name()
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ranked_and_hooks_only_roll_back_or_pause() {
        assert!(Principal::Admin(Role::Viewer).may(Action::Status));
        assert!(!Principal::Admin(Role::Viewer).may(Action::Deploy));
        assert!(Principal::Admin(Role::Deployer).may(Action::Logs));
        assert!(!Principal::Admin(Role::Deployer).may(Action::ApproveRollout));
        assert!(Principal::Admin(Role::Approver).may(Action::ApproveRollout));
        assert!(!Principal::Admin(Role::Approver).may(Action::CreateToken));
        assert!(Principal::Admin(Role::Admin).may(Action::RevokeAdmin));
        let hook_may: Vec<_> = [
            Action::Deploy,
            Action::Rollback,
            Action::PauseRollout,
            Action::ResumeRollout,
            Action::AbortRollout,
            Action::CreateToken,
            Action::AddAdmin,
            Action::ListAgents,
        ]
        .into_iter()
        .filter(|a| Principal::Hook.may(*a))
        .collect();
        assert_eq!(hook_may, [Action::Rollback, Action::PauseRollout, Action::AbortRollout]);
        let err = Principal::Admin(Role::Viewer).authorize("admin/v", Action::Deploy).unwrap_err();
        assert!(
            err.to_string().contains("needs role deployer") && err.to_string().contains("viewer"),
            "{err}"
        );
        assert!(Principal::Hook.authorize("alert:x", Action::ResumeRollout).is_err());
        assert_eq!("approver".parse::<Role>().unwrap(), Role::Approver);
        assert!("root".parse::<Role>().is_err());
    }
}
