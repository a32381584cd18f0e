//! gRPC handlers: translation between the wire and [`crate::logic`], and authorization by the
//! verified certificate's identity. No decisions are made here.

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

use crate::logic::admins::AdminCaller;
use crate::logic::heartbeats::{self, Heartbeats, Verdict};
use crate::logic::registry::NewToken;
use crate::logic::roles::{Action, Principal, Role};
use crate::logic::rollouts::{Control, FreezeWindow, SpecError};
use crate::logic::{self, Controller};
use crate::logic::{Environment, OrderKind};

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
        E::Spec(e) => Status::invalid_argument(spec_message(&e)),
        E::MissingReason(what) => Status::invalid_argument(format!("a {what} needs a --reason")),
        E::Deploy(e) => {
            use logic::rollouts::DeployRefusal as R;
            let how = match &e {
                R::Downgrade { .. } => "use `convoy rollback`, or deploy with --downgrade",
                R::RolloutActive { .. } => "wait, abort it, or pass --supersede",
                R::Frozen { .. } => "use --override-freeze --reason TEXT",
                R::MarkedBad { .. } => "deploy it again only with --force",
                R::Promotion(p)
                    if matches!(**p, logic::rollouts::promotion::Refusal::NoteRequired { .. }) =>
                {
                    "add a change note to the deploy"
                }
                R::Promotion(_) => "promote it first, or (admins only) pass --skip-promotion --reason TEXT",
            };
            let msg = format!("{msg}; {how}");
            match e {
                R::RolloutActive { .. } => Status::already_exists(msg),
                _ => Status::failed_precondition(msg),
            }
        }
        E::UnknownRelease(_) => Status::not_found(msg),
        E::Conflict(_) => Status::already_exists(msg),
        E::FailedPrecondition(_) => Status::failed_precondition(msg),
        E::Offline(_) | E::AuditUnavailable(_) => Status::unavailable(msg),
        E::AuditTampered(_) => Status::data_loss(msg),
        E::NoAnswer(_) => Status::deadline_exceeded(msg),
        E::Busy(_) | E::TooLarge(_) => Status::resource_exhausted(msg),
        E::OutOfRange(_) => Status::out_of_range(msg),
        E::Store(_) | E::Internal(_) => internal(msg),
    }
}

/// An internal failure: logged in full, answered with a generic message and an id that finds
/// the log line. Clients never see file paths or store errors.
pub(crate) fn internal(what: impl std::fmt::Display) -> Status {
    let id: u32 = rand::random();
    tracing::error!(error_id = format_args!("{id:08x}"), error = %what, "internal error");
    Status::internal(format!("internal error {id:08x}; the controller's log has the details"))
}

/// A refused rollout spec, worded as the `convoy deploy` flags that set it.
fn spec_message(e: &SpecError) -> String {
    match e {
        SpecError::WaveOutOfRange(_) => "--waves are percentages between 1 and 100".into(),
        SpecError::WavesNotIncreasing(_) => "--waves must increase, e.g. 10%,50%,100%".into(),
        SpecError::NoParallelism => "--max-parallel must be at least 1".into(),
        SpecError::OverrideWithoutReason => "--override-freeze needs a --reason".into(),
        SpecError::Threshold(s) => format!("--max-failures {s:?}: use a count (2) or a percentage (10%)"),
        SpecError::NoteTooLong(n) => {
            format!(
                "the change note is {n} bytes; --note and --note-file keep at most {}",
                logic::rollouts::spec::MAX_NOTE
            )
        }
        SpecError::NoteControl => {
            "--note may hold newlines and tabs but no other control or invisible characters".into()
        }
        SpecError::Ticket(t) => format!("--ticket {t:?} must be an http(s) URL"),
        SpecError::SkipWithoutReason => "--skip-promotion needs a --reason".into(),
        SpecError::TooMany(what) => {
            format!("the {what} lists more than {} entries", logic::rollouts::spec::MAX_LIST)
        }
        SpecError::Reason => format!(
            "--reason is at most {} bytes on one line, without control characters",
            logic::rollouts::spec::MAX_REASON
        ),
        SpecError::StartTooLate => {
            format!("--at is more than {} days ahead", logic::rollouts::spec::MAX_SCHEDULE_DAYS)
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

/// Why a session the controller ends is ending: revoked, or replaced / shutting down.
async fn closing_status(ctl: &Controller, agent_id: &str) -> Status {
    match ctl.registry().check_agent(agent_id).await {
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
            .registry()
            .enroll(r.token, r.agent_id, r.region, labels(r.labels), r.csr_der)
            .instrument(span.clone())
            .await;
        match result {
            Ok(e) => Ok(Response::new(pb::EnrollResponse {
                agent_id: e.agent_id,
                certificate_pem: e.cert_pem,
                ca_pem: self.0.registry().ca_pem().to_owned(),
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
        let rec = match ctl.registry().check_agent_cert(&agent_id, &serial).instrument(span.clone()).await {
            Ok(rec) => rec,
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "session refused"));
                return Err(to_status(e));
            }
        };
        // A session on the certificate a renewal replaced ends with the overlap.
        let superseded_at = (rec.cert_serial != serial).then(|| {
            let left = rec.previous_serial_until.saturating_sub(crate::time::now()).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_secs(left)
        });
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
        ctl.orders()
            .observe_agent_seq(hello.last_order_seq)
            .instrument(span.clone())
            .await
            .map_err(to_status)?;
        let (order_tx, mut order_rx) = mpsc::channel::<logic::Order>(64);
        let handle = ctl
            .registry()
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
        ctl.rollouts().converge(&agent_id);
        let (out_tx, out_rx) = mpsc::channel(64);
        let welcome = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Welcome(pb::Welcome {
                heartbeat_interval_secs: ctl.registry().heartbeat_interval().as_secs().max(1) as u32,
            })),
        };
        tell(&out_tx, Ok(welcome)).await;
        // A session that misses three heartbeats is dead even if TCP has not noticed.
        let silence = ctl.registry().heartbeat_interval() * 3;
        let mut beats = Heartbeats::new(ctl.registry().heartbeat_interval(), std::time::Instant::now());
        // Only accepted heartbeats keep a session alive, and messages nobody asked for (results
        // of no order in flight, unknown kinds) are bounded between two heartbeats.
        let mut alive_until = tokio::time::Instant::now() + silence;
        let mut unasked = 0u32;
        let tracked = ctl.clone();
        tracked.spawn_tracked(
            async move {
                loop {
                    tokio::select! {
                        () = async {
                            match superseded_at {
                                Some(t) => tokio::time::sleep_until(t).await,
                                None => std::future::pending().await,
                            }
                        } => {
                            tracing::warn!("session on a superseded certificate closed at the end of the overlap");
                            tell(&out_tx, Err(Status::permission_denied(
                                "this certificate has been superseded by a renewal; reconnect with the newest",
                            ))).await;
                            break;
                        }
                        () = handle.cancel.cancelled() => {
                            tell(&out_tx, Err(closing_status(&ctl, &handle.agent_id).await)).await;
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
                                tell(&out_tx, Err(closing_status(&ctl, &handle.agent_id).await)).await;
                                break;
                            }
                        },
                        msg = tokio::time::timeout_at(alive_until, inbound.message()) => match msg {
                            Ok(Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(hb)) }))) => {
                                let apps = reported_apps(&handle.agent_id, hb.apps);
                                let reported = releases(&handle.agent_id, hb.releases);
                                match beats.judge(std::time::Instant::now(), &reported, &apps) {
                                    Verdict::Dropped => continue,
                                    Verdict::Flood => {
                                        tracing::warn!("heartbeat flood, closing session");
                                        tell(&out_tx, Err(Status::resource_exhausted(format!(
                                            "more than {} heartbeats over the rate in a row; send one every {:?}",
                                            heartbeats::FLOOD_AFTER,
                                            ctl.registry().heartbeat_interval()
                                        )))).await;
                                        break;
                                    }
                                    v @ (Verdict::Write | Verdict::Unchanged) => {
                                        alive_until = tokio::time::Instant::now() + silence;
                                        // Late answers (to orders that timed out) are rare: the
                                        // allowance grows back by one per heartbeat, no faster.
                                        unasked = unasked.saturating_sub(1);
                                        if let Err(e) = ctl.registry().heartbeat(&handle, v, reported, apps).await {
                                            tracing::warn!(error = %e, "heartbeat not recorded");
                                        }
                                    }
                                }
                            }
                            Ok(Ok(Some(m))) => {
                                let receipt = match m.msg {
                                    Some(pb::agent_message::Msg::Result(r)) => ctl.orders().order_result(&handle.agent_id, outcome(r)).await,
                                    _ => logic::ResultReceipt::Unsolicited,
                                };
                                if receipt == logic::ResultReceipt::Unsolicited {
                                    unasked += 1;
                                    if unasked > heartbeats::FLOOD_AFTER {
                                        tracing::warn!("flood of unsolicited messages, closing session");
                                        tell(&out_tx, Err(Status::resource_exhausted(format!(
                                            "more than {} messages answering no order in flight",
                                            heartbeats::FLOOD_AFTER
                                        )))).await;
                                        break;
                                    }
                                }
                            }
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
                ctl.registry().end_session(&handle).await;
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
        let (agent_id, serial) = require_agent(&req)?;
        self.0.registry().check_agent_cert(&agent_id, &serial).await.map_err(to_status)?;
        let r = req.into_inner();
        let permit = self.0.releases().download_permit(&agent_id).map_err(to_status)?;
        let rx = self.0.releases().stream_blob(&r.digest, r.offset).await.map_err(to_status)?;
        tracing::info!(%agent_id, digest = %r.digest, offset = r.offset, "download started");
        let rx = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |chunk| {
            chunk
                .map(|c| pb::DownloadChunk { offset: c.offset, data: c.data, total_size: c.total })
                .map_err(to_status)
        });
        // The permit lives as long as the response stream: until the agent has read it all or
        // dropped it, however much of the bundle is already buffered.
        let stream = tokio_stream::StreamExt::map(rx, move |chunk| {
            let _held = &permit;
            chunk
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let (agent_id, serial) = require_agent(&req)?;
        let span = tracing::info_span!("renew", %agent_id);
        // A superseded certificate cannot renew itself back into validity.
        self.0
            .registry()
            .check_agent_cert(&agent_id, &serial)
            .instrument(span.clone())
            .await
            .map_err(to_status)?;
        match self
            .0
            .registry()
            .renew(agent_id, serial, req.into_inner().csr_der)
            .instrument(span.clone())
            .await
        {
            Ok(pem) => Ok(Response::new(pb::RenewResponse { certificate_pem: pem })),
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "renewal refused"));
                Err(to_status(e))
            }
        }
    }
}

mod admin;
mod convert;
pub use admin::AdminSvc;
use convert::*;

/// Sends a session its last word; a client that is already gone is no one to tell.
async fn tell(
    tx: &mpsc::Sender<Result<pb::ControllerMessage, Status>>,
    msg: Result<pb::ControllerMessage, Status>,
) {
    if tx.send(msg).await.is_err() {
        tracing::debug!("the agent left before the controller's message");
    }
}
