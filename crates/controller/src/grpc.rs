//! gRPC handlers: translation between the wire and [`crate::logic`], and authorization by the
//! verified certificate's identity. No decisions are made here.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use convoy_pki::Identity;
use convoy_proto::v1 as pb;
use convoy_transport::PeerInfo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::logic::admins::{AdminCaller, AdminRecord};
use crate::logic::roles::{Action, Principal, Role};
use crate::logic::rollouts::{Control, FreezeWindow, RolloutSpec, Threshold};
use crate::logic::OrderKind;
use crate::logic::{self, Controller};
use crate::store::{AppStatusRecord, ReportedRelease};

/// How long a new session may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Maps a domain error to a gRPC status: the one place where this happens.
pub fn to_status(err: logic::Error) -> Status {
    use logic::Error as E;
    let msg = err.to_string();
    match err {
        E::TokenMalformed | E::TokenUnknown => Status::unauthenticated(msg),
        E::TokenUsed(_)
        | E::TokenExpired(_)
        | E::TokenRegion { .. }
        | E::Revoked(_)
        | E::PermissionDenied(_)
        | E::RoleTooLow { .. }
        | E::UnknownCertificate { .. } => Status::permission_denied(msg),
        E::AgentExists(_) | E::AdminExists(_) => Status::already_exists(msg),
        E::UnknownAgent(_) | E::UnknownAdmin(_) => Status::not_found(msg),
        E::InvalidArgument(_) | E::Csr(_) | E::Bundle(_) => Status::invalid_argument(msg),
        E::UnknownRelease(_) => Status::not_found(msg),
        E::Conflict(_) => Status::already_exists(msg),
        E::FailedPrecondition(_) => Status::failed_precondition(msg),
        E::Offline(_) | E::AuditUnavailable(_) => Status::unavailable(msg),
        E::AuditTampered(_) => Status::data_loss(msg),
        E::NoAnswer(_) => Status::deadline_exceeded(msg),
        E::Busy(_) => Status::resource_exhausted(msg),
        E::Store(_) | E::Internal(_) => {
            tracing::error!(error = %msg, "internal error");
            Status::internal(msg)
        }
    }
}

fn peer_identity<T>(req: &Request<T>) -> Option<&Identity> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.identity.as_ref())
}

/// The calling agent's id and the serial of the certificate it presented.
fn require_agent<T>(req: &Request<T>) -> Result<(String, String), Status> {
    let serial = req.extensions().get::<PeerInfo>().and_then(|p| p.cert.as_ref()).map(|c| c.serial.clone());
    match (peer_identity(req), serial) {
        (Some(Identity::Agent(id)), Some(serial)) => Ok((id.clone(), serial)),
        (Some(Identity::Agent(_)), None) => {
            Err(Status::unauthenticated("the agent certificate has no readable serial"))
        }
        (Some(other), _) => Err(Status::permission_denied(format!(
            "{other} is not an agent: agent RPCs need an agent certificate"
        ))),
        (None, _) => Err(Status::unauthenticated("a client certificate is required for this RPC")),
    }
}

/// The admin name and certificate serial of the verified client certificate.
fn require_admin<T>(req: &Request<T>) -> Result<(String, String), Status> {
    let serial = req.extensions().get::<PeerInfo>().and_then(|p| p.cert.as_ref()).map(|c| c.serial.clone());
    match (peer_identity(req), serial) {
        (Some(Identity::Admin(name)), Some(serial)) => Ok((name.clone(), serial)),
        (Some(Identity::Admin(_)), None) => {
            Err(Status::unauthenticated("the admin certificate's serial could not be read"))
        }
        (Some(other), _) => Err(Status::permission_denied(format!(
            "{other} is not an admin: admin RPCs need an admin certificate"
        ))),
        (None, _) => Err(Status::unauthenticated("a client certificate is required for this RPC")),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

/// Whether a reported version is acceptable: empty (none) or a valid version, which is also a
/// safe path component for any agent it is passed on to.
fn version_ok(v: &str) -> bool {
    v.is_empty() || convoy_bundle::check_version(v).is_ok()
}

/// An agent's per-app reports, with entries that name an invalid app or version dropped: what an
/// agent says is data about itself, and only well-formed names may reach the store.
fn reported_apps(agent_id: &str, list: Vec<pb::AppStatus>) -> Vec<AppStatusRecord> {
    list.into_iter()
        .filter_map(|s| {
            let ok = convoy_bundle::check_app_name(&s.app).is_ok()
                && [&s.current, &s.known_good, &s.previous].iter().all(|v| version_ok(v))
                && s.installed.iter().all(|v| version_ok(v) && !v.is_empty());
            if !ok {
                tracing::warn!(agent_id, app = %s.app.escape_debug(), "dropping a malformed app report");
            }
            ok.then(|| app_status(s))
        })
        .collect()
}

fn app_status(s: pb::AppStatus) -> AppStatusRecord {
    let health = match pb::Health::try_from(s.health).unwrap_or(pb::Health::Unknown) {
        pb::Health::Unknown => "unknown",
        pb::Health::Checking => "checking",
        pb::Health::Healthy => "healthy",
        pb::Health::Unhealthy => "unhealthy",
        pb::Health::None => "no-check",
    };
    AppStatusRecord {
        app: s.app,
        current: s.current,
        known_good: s.known_good,
        previous: s.previous,
        health: health.into(),
        last_error: s.last_error,
        installed: s.installed,
        busy: s.busy,
    }
}

fn app_status_pb(s: AppStatusRecord) -> pb::AppStatus {
    let health = match s.health.as_str() {
        "checking" => pb::Health::Checking,
        "healthy" => pb::Health::Healthy,
        "unhealthy" => pb::Health::Unhealthy,
        "no-check" => pb::Health::None,
        _ => pb::Health::Unknown,
    };
    pb::AppStatus {
        app: s.app,
        current: s.current,
        known_good: s.known_good,
        previous: s.previous,
        health: health as i32,
        last_error: s.last_error,
        installed: s.installed,
        busy: s.busy,
    }
}

fn order_pb(o: logic::Order) -> pb::ControllerMessage {
    use pb::order::Kind;
    let kind = match o.kind {
        OrderKind::Install { app, version, digest } => {
            Kind::Install(pb::InstallOrder { app, version, digest })
        }
        OrderKind::Activate { app, version, health_deadline } => Kind::Activate(pb::ActivateOrder {
            app,
            version,
            health_deadline_secs: health_deadline.map(|d| d.as_secs().max(1) as u32).unwrap_or(0),
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

fn outcome(r: pb::OrderResult) -> logic::OrderOutcome {
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
fn outcome_pb(a: &logic::Answer) -> pb::OrderOutcome {
    match a {
        logic::Answer::Applied => pb::OrderOutcome::Applied,
        logic::Answer::AlreadyInState => pb::OrderOutcome::AlreadyInState,
        logic::Answer::Refused { .. } => pb::OrderOutcome::Refused,
        logic::Answer::Failed => pb::OrderOutcome::Failed,
        logic::Answer::Stale { .. } => pb::OrderOutcome::Stale,
    }
}

fn releases(agent_id: &str, list: Vec<pb::ReleaseRef>) -> Vec<ReportedRelease> {
    list.into_iter()
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

fn json_doc<T: serde::Serialize>(v: &T) -> Result<Response<pb::JsonDoc>, Status> {
    let json = serde_json::to_string(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::JsonDoc { json }))
}

fn release_info(r: crate::store::ReleaseRecord) -> pb::ReleaseInfo {
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

/// Why a session the controller ends is ending: revoked, or replaced / shutting down.
async fn closing_status(ctl: &Controller, agent_id: &str) -> Status {
    match ctl.check_agent(agent_id).await {
        Err(e) => to_status(e),
        Ok(_) => Status::aborted("session replaced or controller shutting down"),
    }
}

/// The enrollment service, reachable without a client certificate.
#[derive(Clone)]
pub struct EnrollmentSvc(pub Controller);

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentSvc {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let remote = req.extensions().get::<PeerInfo>().and_then(|p| p.remote);
        let r = req.into_inner();
        let span = tracing::info_span!("enroll", ?remote, requested_id = %r.agent_id, region = %r.region);
        let result = self
            .0
            .enroll(r.token, r.agent_id, r.region, labels(r.labels), r.csr_der)
            .instrument(span.clone())
            .await;
        match result {
            Ok(e) => Ok(Response::new(pb::EnrollResponse {
                agent_id: e.agent_id,
                certificate_pem: e.cert_pem,
                ca_pem: self.0.ca_pem().to_owned(),
                region: e.region,
                labels: e.labels.into_iter().collect(),
            })),
            Err(err) => {
                span.in_scope(|| tracing::warn!(error = %err, "enrollment refused"));
                Err(to_status(err))
            }
        }
    }
}

/// The agent service: sessions and renewal.
#[derive(Clone)]
pub struct AgentSvc(pub Controller);

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSvc {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let (agent_id, serial) = require_agent(&req)?;
        let span = tracing::info_span!("session", %agent_id);
        let ctl = self.0.clone();
        if let Err(e) = ctl.check_agent_cert(&agent_id, &serial).instrument(span.clone()).await {
            span.in_scope(|| tracing::warn!(error = %e, "session refused"));
            return Err(to_status(e));
        }
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(h)) }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument("the first message of a session must be a hello"))
            }
            Ok(Ok(None)) | Ok(Err(_)) => return Err(Status::cancelled("session closed before its hello")),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10s")),
        };
        if hello.agent_id != agent_id {
            span.in_scope(|| tracing::warn!(claimed = %hello.agent_id, "hello claims another agent id"));
            return Err(Status::permission_denied(format!(
                "hello claims agent {:?} but the certificate is for agent {agent_id:?}",
                hello.agent_id
            )));
        }
        // A controller restored from a backup may be behind the agents' sequence numbers: its
        // next orders would all be stale. Move past what this agent has applied.
        ctl.observe_agent_seq(hello.last_order_seq).instrument(span.clone()).await.map_err(to_status)?;
        let (order_tx, mut order_rx) = mpsc::channel::<logic::Order>(64);
        let handle = ctl
            .open_session(
                &agent_id,
                hello.agent_version,
                releases(&agent_id, hello.releases),
                reported_apps(&agent_id, hello.apps),
                order_tx,
            )
            .instrument(span.clone())
            .await
            .map_err(to_status)?;
        // An agent that returns (or joins late) gets what it should be running.
        ctl.converge(&agent_id);
        let (out_tx, out_rx) = mpsc::channel(64);
        let welcome = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Welcome(pb::Welcome {
                heartbeat_interval_secs: ctl.heartbeat_interval().as_secs().max(1) as u32,
            })),
        };
        let _ = out_tx.send(Ok(welcome)).await;
        // A session that misses three heartbeats is dead even if TCP has not noticed.
        let silence = ctl.heartbeat_interval() * 3;
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = handle.cancel.cancelled() => {
                            let _ = out_tx.send(Err(closing_status(&ctl, &handle.agent_id).await)).await;
                            break;
                        }
                        order = order_rx.recv() => match order {
                            Some(order) => {
                                if out_tx.send(Ok(order_pb(order))).await.is_err() {
                                    break;
                                }
                            }
                            // The registry dropped this session (revoked, replaced, shutting
                            // down): tell the agent why, as the cancellation branch does.
                            None => {
                                let _ = out_tx.send(Err(closing_status(&ctl, &handle.agent_id).await)).await;
                                break;
                            }
                        },
                        msg = tokio::time::timeout(silence, inbound.message()) => match msg {
                            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(hb)) }))) => {
                                let apps = reported_apps(&handle.agent_id, hb.apps);
                                let reported = releases(&handle.agent_id, hb.releases);
                                if let Err(e) = ctl.heartbeat(&handle.agent_id, reported, apps).await {
                                    tracing::warn!(error = %e, "heartbeat not recorded");
                                }
                            }
                            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Result(r)) }))) => {
                                ctl.order_result(&handle.agent_id, outcome(r)).await;
                            }
                            Ok(Ok(Some(_))) => tracing::debug!("unexpected message ignored"),
                            Ok(Ok(None)) => break,
                            Ok(Err(e)) => {
                                tracing::info!(error = %e, "session stream failed");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(silence_secs = silence.as_secs(), "no heartbeat, closing session");
                                break;
                            }
                        },
                    }
                }
                ctl.end_session(&handle).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type DownloadStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadChunk, Status>> + Send>>;

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let (agent_id, serial) = require_agent(&req)?;
        self.0.check_agent_cert(&agent_id, &serial).await.map_err(to_status)?;
        let r = req.into_inner();
        let permit = self.0.download_permit(&agent_id).map_err(to_status)?;
        let path = self.0.blob_path(&r.digest).map_err(to_status)?;
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| Status::internal(e.to_string()))?;
        let total = file.metadata().await.map_err(|e| Status::internal(e.to_string()))?.len();
        if r.offset > total {
            return Err(Status::out_of_range(format!(
                "offset {} is past the bundle's {total} bytes",
                r.offset
            )));
        }
        file.seek(std::io::SeekFrom::Start(r.offset)).await.map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(%agent_id, digest = %r.digest, offset = r.offset, total, "download started");
        let (tx, rx) = mpsc::channel(4);
        let ctl = self.0.clone();
        tokio::spawn(async move {
            let mut offset = r.offset;
            let mut buf = vec![0u8; logic::BUNDLE_CHUNK];
            while offset < total {
                let n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading bundle: {e}")))).await;
                        return;
                    }
                };
                let chunk = pb::DownloadChunk { offset, data: buf[..n].to_vec(), total_size: total };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                ctl.metrics().bytes_served(n as u64);
                offset += n as u64;
            }
        });
        // The permit lives as long as the response stream: until the agent has read it all or
        // dropped it, however much of the bundle is already buffered.
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |chunk| {
            let _held = &permit;
            chunk
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let (agent_id, serial) = require_agent(&req)?;
        let span = tracing::info_span!("renew", %agent_id);
        // A superseded certificate cannot renew itself back into validity.
        self.0.check_agent_cert(&agent_id, &serial).instrument(span.clone()).await.map_err(to_status)?;
        match self.0.renew(agent_id, req.into_inner().csr_der).instrument(span.clone()).await {
            Ok(pem) => Ok(Response::new(pb::RenewResponse { certificate_pem: pem })),
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "renewal refused"));
                Err(to_status(e))
            }
        }
    }
}

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
        match self.0.authenticate_admin(&name, &serial).await {
            Ok(caller) => Ok(caller),
            Err(e) => {
                tracing::warn!(admin = %name, %serial, action = action.audit_name(), error = %e, "admin refused");
                let params = serde_json::json!({"serial": serial});
                self.0
                    .audit(
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
            self.0.audit(&who, action.audit_name(), target, params, &format!("refused: {e}")).await;
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
        let actor = admin.to_string();
        let intent = self.0.audit_intent(&actor, action, target, params).await.map_err(to_status)?;
        let result = run.await;
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        self.0.audit_outcome(intent, &actor, action, target, serde_json::json!({}), &outcome).await;
        Ok(result)
    }
}

fn admin_info(r: AdminRecord) -> pb::AdminInfo {
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

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminSvc {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = self.caller(&req, Action::CreateToken, "*").await?;
        let r = req.into_inner();
        let region = (!r.region.is_empty()).then_some(r.region);
        let ttl = Duration::from_secs(r.ttl_secs);
        let target = region.clone().unwrap_or_else(|| "*".into());
        let identity = admin.identity();
        let run = self
            .0
            .create_token(region, labels(r.labels), r.allow_agent_labels, ttl, &identity)
            .instrument(tracing::info_span!("create_token", %admin));
        let params = serde_json::json!({"ttl_secs": r.ttl_secs});
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
        let agents = self.0.list_agents(region).await.map_err(to_status)?;
        let agents = agents
            .into_iter()
            .map(|v| pb::AgentInfo {
                id: v.record.id,
                region: v.record.region,
                labels: v.record.labels.into_iter().collect(),
                online: v.online,
                first_seen_unix: v.record.first_seen,
                last_seen_unix: v.record.last_seen,
                cert_serial: v.record.cert_serial,
                cert_not_after_unix: v.record.cert_not_after,
                releases: v
                    .record
                    .releases
                    .into_iter()
                    .map(|r| pb::ReleaseRef { app: r.app, version: r.version, active: r.active })
                    .collect(),
                revoked: v.record.revoked,
                agent_version: v.record.agent_version,
                apps: v.record.apps.into_iter().map(app_status_pb).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn push_release(
        &self,
        req: Request<Streaming<pb::PushChunk>>,
    ) -> Result<Response<pb::PushReleaseResponse>, Status> {
        use tokio::io::AsyncWriteExt;
        let admin = self.caller(&req, Action::PushRelease, "*").await?;
        let span = tracing::info_span!("push_release", %admin);
        let mut inbound = req.into_inner();
        let upload = self.0.incoming_path();
        let max = self.0.max_bundle_bytes();
        let received: Result<u64, Status> = async {
            let file = tokio::fs::File::create(&upload).await.map_err(|e| Status::internal(e.to_string()))?;
            let mut w = tokio::io::BufWriter::with_capacity(logic::BUNDLE_CHUNK, file);
            let mut size = 0u64;
            while let Some(chunk) = inbound.message().await? {
                size += chunk.data.len() as u64;
                if size > max {
                    return Err(Status::resource_exhausted(format!(
                        "bundle is larger than the {max}-byte limit"
                    )));
                }
                w.write_all(&chunk.data).await.map_err(|e| Status::internal(e.to_string()))?;
            }
            w.flush().await.map_err(|e| Status::internal(e.to_string()))?;
            w.get_ref().sync_all().await.map_err(|e| Status::internal(e.to_string()))?;
            Ok(size)
        }
        .instrument(span.clone())
        .await;
        let size = match received {
            Ok(n) => n,
            Err(status) => {
                let _ = tokio::fs::remove_file(&upload).await;
                span.in_scope(|| tracing::warn!(error = %status.message(), "push failed"));
                return Err(status);
            }
        };
        // Which release this is is only known once the bundle is read, so the intent names the
        // upload and the outcome names the release.
        let actor = admin.to_string();
        let intent = match self
            .0
            .audit_intent(&actor, "release.push", "upload", serde_json::json!({"bytes": size}))
            .await
        {
            Ok(seq) => seq,
            Err(e) => {
                if let Err(rm) = tokio::fs::remove_file(&upload).await {
                    tracing::warn!(error = %rm, "refused upload not removed");
                }
                return Err(to_status(e));
            }
        };
        let result = self.0.ingest(upload, actor.clone()).instrument(span.clone()).await;
        let target =
            result.as_ref().map(|(r, _)| format!("{}@{}", r.app, r.version)).unwrap_or_else(|_| "?".into());
        let params =
            result.as_ref().map(|(r, _)| serde_json::json!({"digest": r.digest})).unwrap_or_default();
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        self.0.audit_outcome(intent, &actor, "release.push", &target, params, &outcome).await;
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
        let list = self.0.list_releases((!app.is_empty()).then_some(app)).await.map_err(to_status)?;
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
            return Err(Status::invalid_argument("name the target: agents, a region, or all"));
        };
        let to = (!r.to_version.is_empty()).then_some(r.to_version);
        let from = (!r.from_version.is_empty()).then_some(r.from_version);
        let params = serde_json::json!({"app": r.app, "target": format!("{target:?}"), "from": from, "to": to, "reason": r.reason});
        let by = admin.to_string();
        let run = self
            .0
            .rollback(&r.app, &target, from.clone(), to.clone(), &r.reason, &by)
            .instrument(tracing::info_span!("rollback", %admin, app = %r.app));
        let result = self.audited(&admin, "rollback", &r.app, params, run).await?;
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
        let r = req.into_inner();
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
            spec.max_failures = Threshold::parse(&r.max_failures).map_err(to_status)?;
        }
        spec.health_deadline =
            (r.health_deadline_ms > 0).then(|| Duration::from_millis(r.health_deadline_ms));
        spec.force = r.force;
        spec.downgrade = r.downgrade;
        spec.supersede = r.supersede;
        spec.override_freeze = r.override_freeze.then_some(r.reason);
        spec.require_all = r.require_all;
        let params = serde_json::to_value(&spec).unwrap_or_default();
        let by = admin.to_string();
        let run = self.0.deploy(spec, &by).instrument(tracing::info_span!("deploy", %admin, app = %r.app));
        let result = self.audited(&admin, "deploy", &target, params, run).await?;
        let id = result.map_err(to_status)?;
        Ok(Response::new(pb::DeployResponse { id }))
    }

    async fn get_rollout(&self, req: Request<pb::RolloutRef>) -> Result<Response<pb::JsonDoc>, Status> {
        self.caller(&req, Action::GetRollout, &req.get_ref().id.clone()).await?;
        let id = req.into_inner().id;
        let r = self.0.rollout((!id.is_empty()).then_some(id)).await.map_err(to_status)?;
        json_doc(&r)
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::JsonDoc>, Status> {
        self.caller(&req, Action::ListRollouts, "*").await?;
        let app = req.into_inner().app;
        let list = self.0.rollouts((!app.is_empty()).then_some(app)).await.map_err(to_status)?;
        json_doc(&list)
    }

    async fn control_rollout(
        &self,
        req: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::JsonDoc>, Status> {
        let (cmd, action) = match req.get_ref().action.as_str() {
            "pause" => (Some(Control::Pause), Action::PauseRollout),
            "resume" => (Some(Control::Resume), Action::ResumeRollout),
            "abort" => (Some(Control::Abort), Action::AbortRollout),
            // An unknown action is checked as the least a rollout control needs, then refused.
            _ => (None, Action::PauseRollout),
        };
        let admin = self.caller(&req, action, &req.get_ref().id.clone()).await?;
        let r = req.into_inner();
        let Some(cmd) = cmd else {
            return Err(Status::invalid_argument(format!("unknown rollout action {:?}", r.action)));
        };
        tracing::info!(%admin, rollout = %r.id, action = %r.action, "rollout control");
        let action = format!("rollout.{}", r.action);
        let result =
            self.audited(&admin, &action, &r.id, serde_json::json!({}), self.0.control(&r.id, cmd)).await?;
        result.map_err(to_status)?;
        let view = self.0.rollout(Some(r.id)).await.map_err(to_status)?;
        json_doc(&view)
    }

    async fn freeze(&self, req: Request<pb::FreezeRequest>) -> Result<Response<pb::JsonDoc>, Status> {
        let action = match req.get_ref().action.as_str() {
            "add" => Action::AddFreeze,
            "rm" => Action::RemoveFreeze,
            // Listing, and unknown actions (refused below), need the least a freeze call needs.
            _ => Action::ListFreezes,
        };
        let admin = self.caller(&req, action, &req.get_ref().id.clone()).await?;
        let r = req.into_inner();
        match r.action.as_str() {
            "add" => {
                let f = FreezeWindow {
                    id: String::new(),
                    from: r.from_unix,
                    to: r.to_unix,
                    reason: r.reason,
                    app: (!r.app.is_empty()).then_some(r.app),
                    region: (!r.region.is_empty()).then_some(r.region),
                    created_by: admin.to_string(),
                };
                let params = serde_json::to_value(&f).unwrap_or_default();
                let result = self.audited(&admin, "freeze.add", "*", params, self.0.freeze_add(f)).await?;
                json_doc(&result.map_err(to_status)?)
            }
            "list" => json_doc(&self.0.freezes().await.map_err(to_status)?),
            "rm" => {
                let run = self.0.freeze_rm(r.id.clone());
                let result = self.audited(&admin, "freeze.rm", &r.id, serde_json::json!({}), run).await?;
                result.map_err(to_status)?;
                json_doc(&serde_json::json!({"removed": r.id}))
            }
            other => Err(Status::invalid_argument(format!("unknown freeze action {other:?}"))),
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
                Ok(role) => ctl.add_admin(name, role, csr, &caller).await,
                Err(e) => Err(e),
            }
        };
        let result = self.audited(&admin, Action::AddAdmin.audit_name(), &target, params, run).await?;
        let issued = result.map_err(to_status)?;
        Ok(Response::new(pb::IssueAdminResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.0.ca_pem().to_owned(),
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
        let run = self.0.rekey_admin(name, req.into_inner().csr_der, &admin);
        let result = self.audited(&admin, action.audit_name(), &target, serde_json::json!({}), run).await?;
        let issued = result.map_err(to_status)?;
        Ok(Response::new(pb::IssueAdminResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.0.ca_pem().to_owned(),
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
        let run = self.0.revoke_admin(r.name, serial.clone(), &admin);
        let result = self.audited(&admin, Action::RevokeAdmin.audit_name(), &target, params, run).await?;
        let revoked_serials = result.map_err(to_status)?;
        Ok(Response::new(pb::RevokeAdminResponse { revoked_serials }))
    }

    async fn list_admins(
        &self,
        req: Request<pb::ListAdminsRequest>,
    ) -> Result<Response<pb::ListAdminsResponse>, Status> {
        self.caller(&req, Action::ListAdmins, "*").await?;
        let admins = self.0.list_admins().await.map_err(to_status)?;
        Ok(Response::new(pb::ListAdminsResponse { admins: admins.into_iter().map(admin_info).collect() }))
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::JsonDoc>, Status> {
        self.caller(&req, Action::Audit, "*").await?;
        let r = req.into_inner();
        if r.export_checkpoint {
            return json_doc(&self.0.audit_checkpoint().await.map_err(to_status)?);
        }
        if r.verify {
            let given = if r.checkpoint.is_empty() {
                None
            } else {
                Some(serde_json::from_str(&r.checkpoint).map_err(|e| {
                    Status::invalid_argument(format!(
                        "the checkpoint is not an exported audit checkpoint: {e}"
                    ))
                })?)
            };
            return match self.0.audit_verify_with(given).await.map_err(to_status)? {
                Ok(v) => json_doc(
                    &serde_json::json!({"ok": true, "entries": v.entries, "checkpoint": v.checkpoint.map(|c| c.seq)}),
                ),
                Err(problem) => json_doc(&serde_json::json!({"ok": false, "problem": problem})),
            };
        }
        let app = (!r.app.is_empty()).then_some(r.app);
        let since = (r.since_unix > 0).then_some(r.since_unix);
        json_doc(&self.0.audit_log(app, since).await.map_err(to_status)?)
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::JsonDoc>, Status> {
        self.caller(&req, Action::Status, "*").await?;
        json_doc(&self.0.fleet_status().await.map_err(to_status)?)
    }

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<pb::LogsResponse>, Status> {
        let admin = self.caller(&req, Action::Logs, &req.get_ref().agent_id.clone()).await?;
        let r = req.into_inner();
        let lines = if r.lines == 0 { 100 } else { r.lines };
        // Service logs can hold customer data: who read what is audited like any admin action.
        let target = format!("{}/{}", r.agent_id, r.app);
        let params = serde_json::json!({"agent": r.agent_id, "app": r.app, "lines": lines});
        let kind = OrderKind::Logs { app: r.app, lines };
        let run = self.0.send_order(&r.agent_id, kind, Duration::from_secs(30));
        let o = self.audited(&admin, "logs.read", &target, params, run).await?.map_err(to_status)?;
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
            .revoke_agent(&id, &identity)
            .instrument(tracing::info_span!("revoke_agent", %admin, agent_id = %id));
        let result = self.audited(&admin, "agent.revoke", &id, serde_json::json!({}), run).await?;
        let was_online = result.map_err(to_status)?;
        Ok(Response::new(pb::RevokeAgentResponse { was_online }))
    }
}
