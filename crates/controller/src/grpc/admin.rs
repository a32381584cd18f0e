//! The admin service: parse, authorize by role against the admin registry, audit intent and
//! outcome, call the controller. Translation only.

use std::time::Duration;

use super::*;

/// The admin service.
#[derive(Clone)]
pub struct AdminSvc(pub Controller);

impl AdminSvc {
    /// The caller, checked against the admin registry by certificate serial and authorized for
    /// `action` by role. Every refusal is written to the audit log.
    async fn caller<T>(&self, req: &Request<T>, action: Action, target: &str) -> Result<AdminCaller, Status> {
        let caller = self.authenticate(req, action, target).await?;
        self.check_role(&caller, action, target).await?;
        Ok(caller)
    }

    /// The caller, checked against the admin registry by certificate serial, before knowing
    /// which action it asks for (`action` names the attempt in the audit log if refused).
    async fn authenticate<T>(
        &self,
        req: &Request<T>,
        action: Action,
        target: &str,
    ) -> Result<AdminCaller, Status> {
        let (name, serial) = require_admin(req)?;
        match self.0.registry().authenticate_admin(&name, &serial).await {
            Ok(caller) => Ok(caller),
            Err(e) => {
                tracing::warn!(admin = %name, %serial, action = action.audit_name(), error = %e, "admin refused");
                let params = serde_json::json!({"serial": serial});
                self.0
                    .audit()
                    .refusal(
                        &format!("admin/{name}"),
                        action.audit_name(),
                        target,
                        params,
                        &format!("refused: {e}"),
                    )
                    .await;
                Err(to_status(e))
            }
        }
    }

    /// Refuses `action` unless the caller's role allows it, auditing the refusal.
    async fn check_role(&self, caller: &AdminCaller, action: Action, target: &str) -> Result<(), Status> {
        let who = caller.to_string();
        if let Err(e) = Principal::Admin(caller.role).authorize(&who, action) {
            tracing::warn!(admin = %who, role = %caller.role, action = action.audit_name(), "admin action refused by role");
            let params = serde_json::json!({"serial": caller.serial, "role": caller.role});
            self.0.audit().refusal(&who, action.audit_name(), target, params, &format!("refused: {e}")).await;
            return Err(to_status(e));
        }
        Ok(())
    }

    /// Runs an admin action between its two audit entries: the intent is written and flushed
    /// first, and when it cannot be the action never runs (the caller gets `unavailable`); the
    /// outcome follows, naming the intent.
    async fn audited<T>(
        &self,
        admin: &AdminCaller,
        action: &str,
        target: &str,
        params: serde_json::Value,
        run: impl std::future::Future<Output = Result<T, logic::Error>>,
    ) -> Result<Result<T, logic::Error>, Status> {
        self.audited_with(admin, action, target, params, run, |_| "ok".to_string()).await
    }

    /// [`Self::audited`] for actions whose success says nothing yet: `describe` words the
    /// outcome from the result (how many agents did it, or whether the agent answered), so the
    /// log never says "ok" where nothing happened.
    async fn audited_with<T>(
        &self,
        admin: &AdminCaller,
        action: &str,
        target: &str,
        params: serde_json::Value,
        run: impl std::future::Future<Output = Result<T, logic::Error>>,
        describe: impl FnOnce(&T) -> String,
    ) -> Result<Result<T, logic::Error>, Status> {
        let actor = admin.to_string();
        self.0.audit().admit_action(&actor).map_err(to_status)?;
        let intent = self.0.audit().intent(&actor, action, target, params).await.map_err(to_status)?;
        let result = run.await;
        let outcome = match &result {
            Ok(v) => describe(v),
            Err(e) => format!("refused: {e}"),
        };
        self.0.audit().outcome(intent, &actor, action, target, serde_json::json!({}), &outcome).await;
        Ok(result)
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminSvc {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = self.caller(&req, Action::CreateToken, "*").await?;
        let r = req.into_inner();
        let region = (!r.region.is_empty()).then_some(r.region);
        let target = region.clone().unwrap_or_else(|| "*".into());
        let environment = match Environment::parse_or_default(&r.environment) {
            Ok(env) => env,
            Err(e) => {
                let asked = serde_json::json!({"environment": r.environment});
                self.0
                    .audit()
                    .refusal(&admin.to_string(), "token.create", &target, asked, &format!("refused: {e}"))
                    .await;
                return Err(to_status(e));
            }
        };
        let params = serde_json::json!({"ttl_secs": r.ttl_secs, "environment": environment});
        let token = NewToken {
            region,
            environment,
            labels: labels(r.labels),
            allow_agent_labels: r.allow_agent_labels,
            ttl: Duration::from_secs(r.ttl_secs),
        };
        let identity = admin.identity();
        let run = self
            .0
            .registry()
            .create_token(token, &identity)
            .instrument(tracing::info_span!("create_token", %admin));
        let result = self.audited(&admin, "token.create", &target, params, run).await?;
        let (token, expires) = result.map_err(to_status)?;
        Ok(Response::new(pb::CreateTokenResponse { token, expires_at_unix: expires }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.caller(&req, Action::ListAgents, "*").await?;
        let r = req.into_inner();
        let region = (!r.region.is_empty()).then_some(r.region);
        let agents = self.0.registry().list_agents(region).await.map_err(to_status)?;
        let environment = (!r.environment.is_empty())
            .then(|| Environment::parse(&r.environment))
            .transpose()
            .map_err(to_status)?;
        let agents = agents
            .into_iter()
            .filter(|v| environment.as_ref().is_none_or(|e| v.record.environment == *e))
            .map(agent_pb)
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn push_release(
        &self,
        req: Request<Streaming<pb::PushChunk>>,
    ) -> Result<Response<pb::PushReleaseResponse>, Status> {
        let admin = self.caller(&req, Action::PushRelease, "*").await?;
        let span = tracing::info_span!("push_release", %admin);
        let chunks = tokio_stream::StreamExt::map(req.into_inner(), |c| c.map(|c| c.data));
        let received = self.0.releases().receive_upload(chunks).instrument(span.clone()).await;
        let upload = match received {
            Ok(u) => u,
            Err(e) => {
                let status = match e {
                    logic::UploadError::Stream(s) => s,
                    logic::UploadError::Controller(e) => to_status(e),
                };
                span.in_scope(|| tracing::warn!(error = %status.message(), "push failed"));
                return Err(status);
            }
        };
        let size = upload.size();
        // Which release this is is only known once the bundle is read, so the intent names the
        // upload and the outcome names the release.
        let actor = admin.to_string();
        // Dropping the upload on a refusal removes it.
        self.0.audit().admit_action(&actor).map_err(to_status)?;
        let intent = match self
            .0
            .audit()
            .intent(&actor, "release.push", "upload", serde_json::json!({"bytes": size}))
            .await
        {
            Ok(seq) => seq,
            // Dropping the upload removes it.
            Err(e) => return Err(to_status(e)),
        };
        let result = self.0.releases().ingest(upload, actor.clone()).instrument(span.clone()).await;
        let target =
            result.as_ref().map(|(r, _)| format!("{}@{}", r.app, r.version)).unwrap_or_else(|_| "?".into());
        let params =
            result.as_ref().map(|(r, _)| serde_json::json!({"digest": r.digest})).unwrap_or_default();
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        self.0.audit().outcome(intent, &actor, "release.push", &target, params, &outcome).await;
        match result {
            Ok((rec, already_present)) => Ok(Response::new(pb::PushReleaseResponse {
                release: Some(release_info(rec)),
                already_present,
            })),
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "push refused"));
                Err(to_status(e))
            }
        }
    }

    async fn list_releases(
        &self,
        req: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        self.caller(&req, Action::ListReleases, "*").await?;
        let app = req.into_inner().app;
        let list =
            self.0.releases().list_releases((!app.is_empty()).then_some(app)).await.map_err(to_status)?;
        Ok(Response::new(pb::ListReleasesResponse { releases: list.into_iter().map(release_info).collect() }))
    }

    async fn remove_release(
        &self,
        req: Request<pb::RemoveReleaseRequest>,
    ) -> Result<Response<pb::RemoveReleaseResponse>, Status> {
        let target = format!("{}@{}", req.get_ref().app, req.get_ref().version);
        let admin = self.caller(&req, Action::RemoveRelease, &target).await?;
        let r = req.into_inner();
        let run = self
            .0
            .releases()
            .remove_release(r.app, r.version, admin.to_string())
            .instrument(tracing::info_span!("remove_release", %admin));
        let result = self.audited(&admin, "release.rm", &target, serde_json::json!({}), run).await?;
        result.map_err(to_status)?;
        Ok(Response::new(pb::RemoveReleaseResponse {}))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let admin = self.caller(&req, Action::Rollback, &req.get_ref().app.clone()).await?;
        let r = req.into_inner();
        let target = if !r.agent_ids.is_empty() {
            logic::Target::Agents(r.agent_ids)
        } else if !r.region.is_empty() {
            logic::Target::Region(r.region)
        } else if r.all {
            logic::Target::All
        } else {
            let why = "name the target: agents, a region, or all";
            let params = serde_json::json!({"app": r.app});
            self.0
                .audit()
                .refusal(&admin.to_string(), "rollback", &r.app, params, &format!("refused: {why}"))
                .await;
            return Err(Status::invalid_argument(why));
        };
        let to = (!r.to_version.is_empty()).then_some(r.to_version);
        let from = (!r.from_version.is_empty()).then_some(r.from_version);
        let params = serde_json::json!({"app": r.app, "target": format!("{target:?}"), "environment": r.environment, "from": from, "to": to, "reason": r.reason});
        let environment =
            match (!r.environment.is_empty()).then(|| Environment::parse(&r.environment)).transpose() {
                Ok(env) => env,
                Err(e) => {
                    self.0
                        .audit()
                        .refusal(&admin.to_string(), "rollback", &r.app, params, &format!("refused: {e}"))
                        .await;
                    return Err(to_status(e));
                }
            };
        let scope = logic::Scope { target, environment };
        let by = admin.to_string();
        let run = self
            .0
            .rollouts()
            .rollback(&r.app, &scope, from.clone(), to.clone(), &r.reason, &by)
            .instrument(tracing::info_span!("rollback", %admin, app = %r.app));
        let result = self
            .audited_with(&admin, "rollback", &r.app, params, run, |(results, _)| {
                let done = |want: logic::Answer| {
                    results.iter().filter(|(_, res, _)| res.as_ref().is_ok_and(|o| o.answer == want)).count()
                };
                let (applied, already) = (done(logic::Answer::Applied), done(logic::Answer::AlreadyInState));
                let rest = results.len() - applied - already;
                let verdict = if applied > 0 { "ok" } else { "nothing rolled back" };
                format!(
                    "{verdict}: {applied} of {} rolled back, {already} already off it, {rest} not done",
                    results.len()
                )
            })
            .await?;
        let (results, elapsed) = result.map_err(to_status)?;
        let outcomes = results
            .into_iter()
            .map(|(agent_id, res, took)| match res {
                Ok(o) => pb::AgentOutcome {
                    agent_id,
                    outcome: outcome_pb(&o.answer) as i32,
                    message: if o.is_done() { o.message.clone() } else { o.problem() },
                    status: o.status.map(app_status_pb),
                    elapsed_ms: took.as_millis() as u64,
                    unreachable: false,
                },
                Err(e) => pb::AgentOutcome {
                    agent_id,
                    outcome: pb::OrderOutcome::Unspecified as i32,
                    unreachable: matches!(e, logic::Error::Offline(_) | logic::Error::NoAnswer(_)),
                    message: e.to_string(),
                    status: None,
                    elapsed_ms: took.as_millis() as u64,
                },
            })
            .collect();
        Ok(Response::new(pb::RollbackResponse { outcomes, elapsed_ms: elapsed.as_millis() as u64 }))
    }

    async fn deploy(&self, req: Request<pb::DeployRequest>) -> Result<Response<pb::DeployResponse>, Status> {
        let target = format!("{}@{}", req.get_ref().app, req.get_ref().version);
        let admin = self.caller(&req, Action::Deploy, &target).await?;
        if req.get_ref().override_freeze {
            self.check_role(&admin, Action::OverrideFreeze, &target).await?;
        }
        if req.get_ref().skip_promotion {
            self.check_role(&admin, Action::SkipPromotion, &target).await?;
        }
        let r = req.into_inner();
        let app = r.app.clone();
        // A request that does not parse is refused before anything runs, and audited as such.
        let asked = serde_json::json!({"environment": r.environment, "start_at": r.start_at_unix, "ticket": r.ticket});
        let spec = match deploy_spec(r) {
            Ok(spec) => spec,
            Err(e) => {
                let why = format!("refused: {e}");
                self.0.audit().refusal(&admin.to_string(), "deploy", &target, asked, &why).await;
                return Err(to_status(e));
            }
        };
        let params = deploy_params(&spec);
        let by = admin.to_string();
        let run = self.0.rollouts().deploy(spec, &by).instrument(tracing::info_span!("deploy", %admin, %app));
        let result = self.audited(&admin, "deploy", &target, params, run).await?;
        let id = result.map_err(to_status)?;
        Ok(Response::new(pb::DeployResponse { id }))
    }

    async fn get_rollout(&self, req: Request<pb::RolloutRef>) -> Result<Response<pb::Rollout>, Status> {
        self.caller(&req, Action::GetRollout, &req.get_ref().id.clone()).await?;
        let id = req.into_inner().id;
        let r = self.0.rollouts().rollout((!id.is_empty()).then_some(id)).await.map_err(to_status)?;
        Ok(Response::new(rollout_pb(r)))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.caller(&req, Action::ListRollouts, "*").await?;
        let app = req.into_inner().app;
        let list = self.0.rollouts().rollouts((!app.is_empty()).then_some(app)).await.map_err(to_status)?;
        Ok(Response::new(pb::ListRolloutsResponse { rollouts: list.into_iter().map(rollout_pb).collect() }))
    }

    async fn control_rollout(
        &self,
        req: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        use logic::rollouts::approval::Decision;
        enum Act {
            Control(Control),
            Approve,
            Reject,
        }
        use pb::RolloutAction as A;
        let (act, action) = match A::try_from(req.get_ref().action) {
            Ok(A::Pause) => (Some(Act::Control(Control::Pause)), Action::PauseRollout),
            Ok(A::Resume) => (Some(Act::Control(Control::Resume)), Action::ResumeRollout),
            Ok(A::Abort) => (Some(Act::Control(Control::Abort)), Action::AbortRollout),
            Ok(A::Approve) => (Some(Act::Approve), Action::ApproveRollout),
            Ok(A::Reject) => (Some(Act::Reject), Action::RejectRollout),
            // An unknown action is checked as the least a rollout control needs, then refused.
            Ok(A::Unspecified) | Err(_) => (None, Action::PauseRollout),
        };
        let admin = self.caller(&req, action, &req.get_ref().id.clone()).await?;
        let r = req.into_inner();
        let Some(act) = act else {
            let why = format!("unknown rollout action {}", r.action);
            let params = serde_json::json!({"action": r.action});
            self.0
                .audit()
                .refusal(&admin.to_string(), "rollout.control", &r.id, params, &format!("refused: {why}"))
                .await;
            return Err(Status::invalid_argument(why));
        };
        tracing::info!(%admin, rollout = %r.id, action = action.audit_name(), "rollout control");
        let by = admin.to_string();
        let rollouts = self.0.rollouts();
        let run = async {
            match act {
                Act::Control(cmd) => rollouts.control(&r.id, cmd).await,
                Act::Approve => {
                    let note = (!r.note.is_empty()).then(|| r.note.clone());
                    rollouts.decide(&r.id, &by, Decision::Approve { note }).await.map(drop)
                }
                Act::Reject => {
                    rollouts.decide(&r.id, &by, Decision::Reject { reason: r.reason.clone() }).await.map(drop)
                }
            }
        };
        let params = serde_json::json!({"note": r.note, "reason": r.reason});
        let result = self.audited(&admin, action.audit_name(), &r.id, params, run).await?;
        result.map_err(to_status)?;
        let view = self.0.rollouts().rollout(Some(r.id)).await.map_err(to_status)?;
        Ok(Response::new(rollout_pb(view)))
    }

    async fn freeze(&self, req: Request<pb::FreezeRequest>) -> Result<Response<pb::FreezeResponse>, Status> {
        use pb::FreezeAction as F;
        let kind = F::try_from(req.get_ref().action).unwrap_or(F::Unspecified);
        let action = match kind {
            F::Add => Action::AddFreeze,
            F::Remove => Action::RemoveFreeze,
            // Listing, and unknown actions (refused below), need the least a freeze call needs.
            F::List | F::Unspecified => Action::ListFreezes,
        };
        let admin = self.caller(&req, action, &req.get_ref().id.clone()).await?;
        let r = req.into_inner();
        match kind {
            F::Add => {
                let recurrence = r
                    .recurrence
                    .as_ref()
                    .map(parse_recurrence)
                    .transpose()
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let f = FreezeWindow {
                    id: String::new(),
                    from: r.from_unix,
                    to: r.to_unix,
                    reason: r.reason,
                    app: (!r.app.is_empty()).then_some(r.app),
                    region: (!r.region.is_empty()).then_some(r.region),
                    created_by: admin.to_string(),
                    name: (!r.name.is_empty()).then_some(r.name),
                    recurrence,
                };
                let params = serde_json::to_value(&f).unwrap_or_default();
                let result =
                    self.audited(&admin, "freeze.add", "*", params, self.0.rollouts().freeze_add(f)).await?;
                let f = result.map_err(to_status)?;
                let windows = vec![freeze_pb(f, crate::time::now())];
                Ok(Response::new(pb::FreezeResponse { windows, removed: String::new() }))
            }
            F::List => {
                let list = self.0.rollouts().freezes().await.map_err(to_status)?;
                let now = crate::time::now();
                let windows = list.into_iter().map(|f| freeze_pb(f, now)).collect();
                Ok(Response::new(pb::FreezeResponse { windows, removed: String::new() }))
            }
            F::Remove => {
                let run = self.0.rollouts().freeze_rm(r.id.clone());
                let result = self.audited(&admin, "freeze.rm", &r.id, serde_json::json!({}), run).await?;
                let removed = result.map_err(to_status)?;
                Ok(Response::new(pb::FreezeResponse { windows: vec![], removed }))
            }
            F::Unspecified => Err(Status::invalid_argument(format!("unknown freeze action {}", r.action))),
        }
    }

    async fn issue_admin(
        &self,
        req: Request<pb::IssueAdminRequest>,
    ) -> Result<Response<pb::IssueAdminResponse>, Status> {
        let target = format!("admin/{}", req.get_ref().name);
        let admin = self.caller(&req, Action::AddAdmin, &target).await?;
        let r = req.into_inner();
        let params = serde_json::json!({"role": r.role});
        let (name, role, csr) = (r.name.clone(), r.role.clone(), r.csr_der);
        let ctl = self.0.clone();
        let caller = admin.clone();
        let run = async move {
            match role.parse::<Role>() {
                Ok(role) => ctl.registry().add_admin(name, role, csr, &caller).await,
                Err(e) => Err(e),
            }
        };
        let result = self.audited(&admin, Action::AddAdmin.audit_name(), &target, params, run).await?;
        let issued = result.map_err(to_status)?;
        Ok(Response::new(pb::IssueAdminResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.0.registry().ca_pem().to_owned(),
            serial: issued.serial,
        }))
    }

    async fn rekey_admin(
        &self,
        req: Request<pb::RekeyAdminRequest>,
    ) -> Result<Response<pb::IssueAdminResponse>, Status> {
        let asked = req.get_ref().name.clone();
        let admin = self.authenticate(&req, Action::RekeySelf, &format!("admin/{asked}")).await?;
        // Rekeying oneself needs no more than being a registered admin; another name needs the
        // admin role.
        let name = if asked.is_empty() { admin.name.clone() } else { asked };
        let action = if name == admin.name { Action::RekeySelf } else { Action::RekeyOther };
        let target = format!("admin/{name}");
        self.check_role(&admin, action, &target).await?;
        let run = self.0.registry().rekey_admin(name, req.into_inner().csr_der, &admin);
        let result = self.audited(&admin, action.audit_name(), &target, serde_json::json!({}), run).await?;
        let issued = result.map_err(to_status)?;
        Ok(Response::new(pb::IssueAdminResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.0.registry().ca_pem().to_owned(),
            serial: issued.serial,
        }))
    }

    async fn revoke_admin(
        &self,
        req: Request<pb::RevokeAdminRequest>,
    ) -> Result<Response<pb::RevokeAdminResponse>, Status> {
        let target = format!("admin/{}", req.get_ref().name);
        let admin = self.caller(&req, Action::RevokeAdmin, &target).await?;
        let r = req.into_inner();
        let serial = (!r.serial.is_empty()).then_some(r.serial);
        let params = serde_json::json!({"serial": serial});
        let run = self.0.registry().revoke_admin(r.name, serial.clone(), &admin);
        let result = self.audited(&admin, Action::RevokeAdmin.audit_name(), &target, params, run).await?;
        let revoked_serials = result.map_err(to_status)?;
        Ok(Response::new(pb::RevokeAdminResponse { revoked_serials }))
    }

    async fn list_admins(
        &self,
        req: Request<pb::ListAdminsRequest>,
    ) -> Result<Response<pb::ListAdminsResponse>, Status> {
        self.caller(&req, Action::ListAdmins, "*").await?;
        let admins = self.0.registry().list_admins().await.map_err(to_status)?;
        Ok(Response::new(pb::ListAdminsResponse { admins: admins.into_iter().map(admin_info).collect() }))
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        self.caller(&req, Action::Audit, "*").await?;
        let r = req.into_inner();
        if r.export_checkpoint {
            let cp = self.0.audit().checkpoint().await.map_err(to_status)?;
            return Ok(Response::new(pb::AuditResponse {
                checkpoint: Some(checkpoint_pb(cp)),
                ..Default::default()
            }));
        }
        if r.verify {
            let given = r.given_checkpoint.map(checkpoint);
            let v = self.0.audit().verify_with(given).await.map_err(to_status)?;
            return Ok(Response::new(pb::AuditResponse {
                verification: Some(verification_pb(v)),
                ..Default::default()
            }));
        }
        let app = (!r.app.is_empty()).then_some(r.app);
        let since = (r.since_unix > 0).then_some(r.since_unix);
        let entries = self.0.audit().entries(app, since).await.map_err(to_status)?;
        Ok(Response::new(pb::AuditResponse {
            entries: entries.into_iter().map(audit_entry_pb).collect(),
            ..Default::default()
        }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::FleetStatus>, Status> {
        self.caller(&req, Action::Status, "*").await?;
        Ok(Response::new(fleet_status_pb(self.0.rollouts().fleet_status().await.map_err(to_status)?)))
    }

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<pb::LogsResponse>, Status> {
        let admin = self.caller(&req, Action::Logs, &req.get_ref().agent_id.clone()).await?;
        let r = req.into_inner();
        let lines = if r.lines == 0 { 100 } else { r.lines };
        // Service logs can hold customer data: who read what is audited like any admin action.
        let target = format!("{}/{}", r.agent_id, r.app);
        let params = serde_json::json!({"agent": r.agent_id, "app": r.app, "lines": lines});
        let kind = OrderKind::Logs { app: r.app, lines };
        let run = self.0.orders().send_order(&r.agent_id, kind, Duration::from_secs(30));
        let o = self
            .audited_with(&admin, "logs.read", &target, params, run, |o| {
                if o.is_done() {
                    "ok".to_string()
                } else {
                    format!("not read: {}", o.problem())
                }
            })
            .await?
            .map_err(to_status)?;
        if !o.is_done() {
            return Err(Status::failed_precondition(o.problem()));
        }
        Ok(Response::new(pb::LogsResponse { text: o.output }))
    }

    async fn revoke_agent(
        &self,
        req: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        let admin = self.caller(&req, Action::RevokeAgent, &req.get_ref().agent_id.clone()).await?;
        let id = req.into_inner().agent_id;
        let identity = admin.identity();
        let run = self
            .0
            .registry()
            .revoke_agent(&id, &identity)
            .instrument(tracing::info_span!("revoke_agent", %admin, agent_id = %id));
        let result = self.audited(&admin, "agent.revoke", &id, serde_json::json!({}), run).await?;
        let was_online = result.map_err(to_status)?;
        Ok(Response::new(pb::RevokeAgentResponse { was_online }))
    }
}

/// What a deploy's audit entry records: the whole spec, with the environment always named and
/// the change note cut to its first KiB plus its length and SHA-256, so the entry stays under the
/// audit log's size cap and keeps every governance field (environment, reasons, flags, ticket).
fn deploy_params(spec: &logic::rollouts::RolloutSpec) -> serde_json::Value {
    use sha2::Digest;
    let mut params = serde_json::to_value(spec).unwrap_or_default();
    params["environment"] = spec.environment.to_string().into();
    if let Some(note) = &spec.note {
        let cut: String = note
            .chars()
            .scan(0, |n, c| {
                *n += c.len_utf8();
                (*n <= 1024).then_some(c)
            })
            .collect();
        params["note"] = cut.into();
        params["note_bytes"] = note.len().into();
        params["note_sha256"] = hex::encode(sha2::Sha256::digest(note.as_bytes())).into();
    }
    params
}
