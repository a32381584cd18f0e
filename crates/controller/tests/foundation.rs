//! Enrollment, authorization, sessions, revocation, restart and renewal, with a real controller
//! and real agents in this process over TLS on loopback.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::time::Duration;

use common::{agent_identity, agents, dial, eventually, hello};
use convoy_agent::EnrollOptions;
use convoy_pki::{Ca, ClientIdentity, TrustDomain};
use convoy_proto::v1 as pb;
use convoy_testkit::{LocalAgent, LocalController, LocalOptions};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

async fn controller(dir: &std::path::Path) -> LocalController {
    LocalController::start(&dir.join("ctl"), LocalOptions::default()).await.unwrap()
}

fn enroll_opts(ctl: &LocalController, token: String, region: &str, dir: &std::path::Path) -> EnrollOptions {
    EnrollOptions {
        controller: ctl.grpc_addr.to_string(),
        ca_pem: ctl.ca_pem().unwrap(),
        token,
        region: region.into(),
        id: Some("a1".into()),
        labels: Default::default(),
        data_dir: dir.to_path_buf(),
        server_name: None,
    }
}

#[tokio::test]
async fn enrollment_happy_path_then_session_shows_online() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    // Labels come from the token: the admin decides which rollouts an agent falls into.
    let token = ctl
        .admin()
        .await
        .unwrap()
        .create_token(pb::CreateTokenRequest {
            region: "eu-west".into(),
            ttl_secs: 60,
            labels: [("tier".to_string(), "edge".to_string())].into(),
            allow_agent_labels: false,
            environment: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let agent_dir = tmp.path().join("a1");
    let file = convoy_agent::enroll(enroll_opts(&ctl, token, "eu-west", &agent_dir)).await.unwrap();
    assert_eq!(file.id, "a1");
    assert_eq!(file.region, "eu-west");
    // The key was generated here and is private to the agent.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(agent_dir.join(convoy_agent::IDENTITY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let listed = agents(&ctl).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "a1");
    assert_eq!(listed[0].labels.get("tier").map(String::as_str), Some("edge"));
    assert!(!listed[0].online);
    assert!(!listed[0].cert_serial.is_empty());

    let mut agent = LocalAgent::spawn(&agent_dir).unwrap();
    agent.wait_for(WAIT, |s| s.connected).await.unwrap();
    eventually(WAIT, "agent listed online", || async { agents(&ctl).await[0].online.then_some(()) }).await;
    agent.stop().await.unwrap();
    eventually(WAIT, "agent listed offline after it stops", || async {
        (!agents(&ctl).await[0].online).then_some(())
    })
    .await;
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn token_checks_refuse_reuse_expiry_and_wrong_region_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;

    // Reused token.
    let token = ctl.token(Some("eu-west"), Duration::from_secs(60)).await.unwrap();
    convoy_agent::enroll(enroll_opts(&ctl, token.clone(), "eu-west", &tmp.path().join("a1"))).await.unwrap();
    let mut again = enroll_opts(&ctl, token, "eu-west", &tmp.path().join("a2"));
    again.id = Some("a2".into());
    let err = convoy_agent::enroll(again).await.unwrap_err().to_string();
    assert!(err.contains("already used"), "{err}");

    // Token bound to another region.
    let token = ctl.token(Some("eu-west"), Duration::from_secs(60)).await.unwrap();
    let mut wrong = enroll_opts(&ctl, token.clone(), "us-east", &tmp.path().join("a3"));
    wrong.id = Some("a3".into());
    let err = convoy_agent::enroll(wrong).await.unwrap_err().to_string();
    assert!(err.contains("bound to region \"eu-west\""), "{err}");
    // The refusal did not consume the token.
    let mut right = enroll_opts(&ctl, token, "eu-west", &tmp.path().join("a3"));
    right.id = Some("a3".into());
    convoy_agent::enroll(right).await.unwrap();

    // Unknown and malformed tokens.
    let mut unknown = enroll_opts(&ctl, format!("cvt_{}", "A".repeat(43)), "eu-west", &tmp.path().join("a4"));
    unknown.id = Some("a4".into());
    let err = convoy_agent::enroll(unknown).await.unwrap_err().to_string();
    assert!(err.contains("unknown"), "{err}");
    let mut garbage = enroll_opts(&ctl, "hello".into(), "eu-west", &tmp.path().join("a4"));
    garbage.id = Some("a4".into());
    let err = convoy_agent::enroll(garbage).await.unwrap_err().to_string();
    assert!(err.contains("malformed"), "{err}");

    // Expired token: the TTL is in whole seconds, so wait until it has passed.
    let token = ctl.token(None, Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut expired = enroll_opts(&ctl, token, "eu-west", &tmp.path().join("a5"));
    expired.id = Some("a5".into());
    let err = convoy_agent::enroll(expired).await.unwrap_err().to_string();
    assert!(err.contains("expired"), "{err}");

    // Only the two good enrollments exist, and refused agents wrote nothing to disk.
    let ids: Vec<_> = agents(&ctl).await.into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["a1", "a3"]);
    for refused in ["a2", "a4", "a5"] {
        assert!(!tmp.path().join(refused).exists(), "{refused} left files behind");
    }
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_csr_is_refused_clearly_and_the_token_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let token = ctl.token(Some("eu-west"), Duration::from_secs(60)).await.unwrap();
    let channel = dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), None).await.unwrap();
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
    let status = client
        .enroll(pb::EnrollRequest {
            token: token.clone(),
            agent_id: "a1".into(),
            region: "eu-west".into(),
            labels: Default::default(),
            csr_der: b"definitely not DER".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("certificate signing request"), "{}", status.message());
    assert!(agents(&ctl).await.is_empty());
    convoy_agent::enroll(enroll_opts(&ctl, token, "eu-west", &tmp.path().join("a1"))).await.unwrap();
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn authorization_follows_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let addr = ctl.grpc_addr.to_string();
    let ca = ctl.ca_pem().unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let agent_id = agent_identity(&tmp.path().join("a1"));

    // No client certificate: only enrollment is reachable.
    let anon = dial(&addr, &ca, None).await.unwrap();
    let status = pb::admin_service_client::AdminServiceClient::new(anon.clone())
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = pb::agent_service_client::AgentServiceClient::new(anon.clone())
        .renew(pb::RenewRequest { csr_der: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = pb::agent_service_client::AgentServiceClient::new(anon.clone())
        .session(tokio_stream::iter(vec![hello("a1")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // An agent certificate cannot call admin RPCs.
    let as_agent = dial(&addr, &ca, Some(&agent_id)).await.unwrap();
    let status = pb::admin_service_client::AdminServiceClient::new(as_agent.clone())
        .create_token(pb::CreateTokenRequest {
            region: "eu-west".into(),
            ttl_secs: 60,
            labels: Default::default(),
            allow_agent_labels: false,
            environment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("agent/a1 is not an admin"), "{}", status.message());

    // An agent cannot claim to be another agent in its hello.
    let status = pb::agent_service_client::AgentServiceClient::new(as_agent)
        .session(tokio_stream::iter(vec![hello("someone-else")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("certificate is for agent \"a1\""), "{}", status.message());

    // An admin certificate cannot open an agent session.
    let admin = ClientIdentity {
        cert_pem: std::fs::read_to_string(ctl.dir.join("admin.pem")).unwrap(),
        key_pem: std::fs::read_to_string(ctl.dir.join("admin.key")).unwrap(),
    };
    let as_admin = dial(&addr, &ca, Some(&admin)).await.unwrap();
    let status = pb::agent_service_client::AgentServiceClient::new(as_admin)
        .session(tokio_stream::iter(vec![hello("admin")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("admin/admin is not an agent"), "{}", status.message());
    assert!(!agents(&ctl).await[0].online);
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn foreign_ca_and_tls12_are_refused_at_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let addr = ctl.grpc_addr.to_string();
    let ca = ctl.ca_pem().unwrap();

    // A certificate with a valid-looking admin identity from another CA.
    let td = TrustDomain::new("convoy.test").unwrap();
    let (foreign, _) = Ca::generate(&td).unwrap();
    let (cert, key) = foreign.issue_admin("admin").unwrap();
    let id = ClientIdentity { cert_pem: cert.cert_pem, key_pem: key };
    let outcome = match dial(&addr, &ca, Some(&id)).await {
        Err(e) => Err(e),
        Ok(ch) => pb::admin_service_client::AdminServiceClient::new(ch)
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
    };
    assert!(outcome.is_err(), "a foreign CA's certificate must be refused");

    // A TLS 1.2-only client cannot complete a handshake.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    use rustls::pki_types::pem::PemObject;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let result = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await;
    assert!(result.is_err(), "TLS 1.2 handshake must fail");
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn revoked_agent_loses_its_session_and_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let mut agent = LocalAgent::spawn(&tmp.path().join("a1")).unwrap();
    agent.wait_for(WAIT, |s| s.connected).await.unwrap();

    let resp = ctl
        .admin()
        .await
        .unwrap()
        .revoke_agent(pb::RevokeAgentRequest { agent_id: "a1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.was_online);
    let status = agent.wait_for(WAIT, |s| !s.connected).await.unwrap();
    let why = status.last_error.unwrap_or_default();
    assert!(why.contains("revoked"), "{why}");
    // Its reconnections keep being refused.
    let status =
        agent.wait_for(WAIT, |s| s.last_error.as_deref().is_some_and(|e| e.contains("revoked"))).await;
    assert!(status.is_ok());
    let listed = agents(&ctl).await;
    assert!(listed[0].revoked && !listed[0].online);
    // A direct session attempt with its certificate is refused too.
    let ch = dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&agent_identity(&agent.data_dir)))
        .await
        .unwrap();
    let status = pb::agent_service_client::AgentServiceClient::new(ch)
        .session(tokio_stream::iter(vec![hello("a1")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(agent.status.borrow().sessions == 1);
    agent.stop().await.unwrap();

    // Revoking an unknown agent is a clear error.
    let status = ctl
        .admin()
        .await
        .unwrap()
        .revoke_agent(pb::RevokeAgentRequest { agent_id: "nobody".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn agents_reconnect_after_a_controller_restart_and_the_registry_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let mut running = Vec::new();
    for (id, region) in [("eu-1", "eu-west"), ("us-1", "us-east"), ("ap-1", "ap-south")] {
        let dir = tmp.path().join(id);
        ctl.enroll(&dir, id, region).await.unwrap();
        running.push(LocalAgent::spawn(&dir).unwrap());
    }
    for a in &mut running {
        a.wait_for(WAIT, |s| s.connected).await.unwrap();
    }
    let before = agents(&ctl).await;
    let addr = ctl.grpc_addr;
    ctl.stop().await.unwrap();
    for a in &mut running {
        a.wait_for(WAIT, |s| !s.connected).await.unwrap();
    }
    let ctl = LocalController::start(
        &tmp.path().join("ctl"),
        LocalOptions { grpc_addr: Some(addr), ..Default::default() },
    )
    .await
    .unwrap();
    for a in &mut running {
        a.wait_for(WAIT, |s| s.connected && s.sessions >= 2).await.unwrap();
    }
    let after = eventually(WAIT, "all agents online again", || async {
        let list = agents(&ctl).await;
        list.iter().all(|a| a.online).then_some(list)
    })
    .await;
    assert_eq!(after.len(), 3);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (&b.id, &b.region, b.first_seen_unix, &b.cert_serial),
            (&a.id, &a.region, a.first_seen_unix, &a.cert_serial)
        );
    }
    for a in running {
        a.stop().await.unwrap();
    }
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn certificates_are_renewed_before_they_expire() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = LocalOptions { agent_cert_lifetime: Some(Duration::from_secs(6)), ..Default::default() };
    let ctl = LocalController::start(&tmp.path().join("ctl"), opts).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let first = convoy_pki::CertInfo::from_pem(&agent_identity(&tmp.path().join("a1")).cert_pem).unwrap();
    let first_key = std::fs::read_to_string(tmp.path().join("a1").join(convoy_agent::IDENTITY_FILE)).unwrap();
    let mut agent = LocalAgent::spawn(&tmp.path().join("a1")).unwrap();
    agent.wait_for(WAIT, |s| s.renewals >= 1).await.unwrap();
    // Renewed two thirds into the 6 s life (4 s after issue, give or take the 1 s resolution of
    // certificate times), not at its end.
    let second = convoy_pki::CertInfo::from_pem(&agent_identity(&tmp.path().join("a1")).cert_pem).unwrap();
    let after = second.not_before - first.not_before;
    assert!((3..=5).contains(&after), "renewed {after} s into a 6 s certificate life");
    agent.wait_for(WAIT, |s| s.renewals >= 2).await.unwrap();
    let renewed = convoy_pki::CertInfo::from_pem(&agent_identity(&tmp.path().join("a1")).cert_pem).unwrap();
    assert_ne!(renewed.serial, first.serial);
    let renewed_pem =
        std::fs::read_to_string(tmp.path().join("a1").join(convoy_agent::IDENTITY_FILE)).unwrap();
    assert_ne!(
        renewed_pem.split("-----BEGIN PRIVATE KEY-----").nth(1),
        first_key.split("-----BEGIN PRIVATE KEY-----").nth(1),
        "every renewal uses a new key"
    );
    eventually(WAIT, "registry records the renewed certificate", || async {
        let a = agents(&ctl).await.remove(0);
        (a.cert_serial != first.serial).then_some(())
    })
    .await;
    // Past the first certificate's expiry the agent is connected: after each renewal it opened
    // a new session with the new certificate (the old one is refused after a short overlap).
    agent.wait_for(WAIT, |s| s.connected && s.sessions > s.renewals).await.unwrap();
    agent.stop().await.unwrap();
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn agents_choose_labels_only_when_the_token_allows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let token = |allow: bool| {
        let ctl = &ctl;
        async move {
            ctl.admin()
                .await
                .unwrap()
                .create_token(pb::CreateTokenRequest {
                    region: "eu-west".into(),
                    ttl_secs: 60,
                    labels: [("tier".to_string(), "edge".to_string())].into(),
                    allow_agent_labels: allow,
                    environment: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .token
        }
    };
    // An agent cannot put itself into a selector-targeted rollout.
    let t = token(false).await;
    let mut opts = enroll_opts(&ctl, t.clone(), "eu-west", &tmp.path().join("a1"));
    opts.labels = [("tier".to_string(), "payments".to_string())].into();
    let err = convoy_agent::enroll(opts).await.unwrap_err().to_string();
    assert!(err.contains("does not let the agent choose labels") && err.contains("tier=payments"), "{err}");
    assert!(agents(&ctl).await.is_empty(), "a refused enrollment creates no agent");
    // The refusal did not use the token up: the same token enrolls without labels of its own.
    convoy_agent::enroll(enroll_opts(&ctl, t, "eu-west", &tmp.path().join("a1"))).await.unwrap();
    // A token created with --allow-agent-labels lets the agent add labels; the token's win.
    let mut opts = enroll_opts(&ctl, token(true).await, "eu-west", &tmp.path().join("a2"));
    opts.id = Some("a2".into());
    opts.labels =
        [("rack".to_string(), "r7".to_string()), ("tier".to_string(), "payments".to_string())].into();
    convoy_agent::enroll(opts).await.unwrap();
    let a2 = agents(&ctl).await.into_iter().find(|a| a.id == "a2").unwrap();
    assert_eq!(a2.labels.get("rack").map(String::as_str), Some("r7"));
    assert_eq!(a2.labels.get("tier").map(String::as_str), Some("edge"));
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn a_superseded_agent_certificate_is_refused_after_the_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    // 20 s certificates: a 2 s overlap after renewal, and the old certificate still valid by
    // date when it is tried, so only the serial check can refuse it.
    let opts = LocalOptions { agent_cert_lifetime: Some(Duration::from_secs(20)), ..Default::default() };
    let ctl = LocalController::start(&tmp.path().join("ctl"), opts).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let old = agent_identity(&tmp.path().join("a1"));
    let (addr, ca) = (ctl.grpc_addr.to_string(), ctl.ca_pem().unwrap());
    let download = |id: ClientIdentity| {
        let (addr, ca) = (addr.clone(), ca.clone());
        async move {
            let ch = dial(&addr, &ca, Some(&id)).await.unwrap();
            pb::agent_service_client::AgentServiceClient::new(ch)
                .download(pb::DownloadRequest { digest: "0".repeat(64), offset: 0 })
                .await
                .map(|_| ())
        }
    };
    // Renew with the old certificate, as the agent does.
    let csr = convoy_pki::generate_csr().unwrap();
    let ch = dial(&addr, &ca, Some(&old)).await.unwrap();
    let renewed_at = std::time::Instant::now();
    let cert = pb::agent_service_client::AgentServiceClient::new(ch)
        .renew(pb::RenewRequest { csr_der: csr.csr_der.clone() })
        .await
        .unwrap()
        .into_inner()
        .certificate_pem;
    let new = ClientIdentity { cert_pem: cert, key_pem: csr.key_pem.clone() };
    // During the overlap the old certificate still works (calls in flight finish).
    let during = download(old.clone()).await.unwrap_err();
    assert_eq!(during.code(), Code::NotFound, "{during:?}");
    // A session opened on it now is closed when the overlap ends, not left running.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(common::hello("a1")).await.unwrap();
    let ch = dial(&addr, &ca, Some(&old)).await.unwrap();
    let mut session = pb::agent_service_client::AgentServiceClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match session.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("superseded"), "{}", ended.message());
    let overlap_end = renewed_at + convoy_controller::logic::renewal_overlap(Duration::from_secs(20));
    // Certificate times have one-second resolution.
    assert!(
        std::time::Instant::now() + Duration::from_secs(1) >= overlap_end,
        "closed before the overlap ended"
    );
    drop(tx);
    // After it, only the newest serial is accepted.
    let overlap = convoy_controller::logic::renewal_overlap(Duration::from_secs(20));
    tokio::time::sleep_until((renewed_at + overlap + Duration::from_millis(500)).into()).await;
    let after = download(old.clone()).await.unwrap_err();
    assert_eq!(after.code(), Code::PermissionDenied, "{after:?}");
    assert!(after.message().contains("superseded"), "{}", after.message());
    // The superseded certificate cannot renew itself back into validity either.
    let ch = dial(&addr, &ca, Some(&old)).await.unwrap();
    let again = pb::agent_service_client::AgentServiceClient::new(ch)
        .renew(pb::RenewRequest { csr_der: csr.csr_der })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");
    // The newest certificate works: the unknown digest is a NotFound, not a refusal.
    let ok = download(new).await.unwrap_err();
    assert_eq!(ok.code(), Code::NotFound, "{ok:?}");
    ctl.stop().await.unwrap();
}

/// Within the overlap, the certificate a renewal replaced may renew again only while the new
/// one has never been presented (its answer may have been lost); once the new one is in use, a
/// copy of the old key cannot mint a successor and lock the agent out.
#[tokio::test]
async fn only_the_newest_agent_certificate_in_use_may_renew() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = LocalOptions { agent_cert_lifetime: Some(Duration::from_secs(600)), ..Default::default() };
    let ctl = LocalController::start(&tmp.path().join("ctl"), opts).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let old = agent_identity(&tmp.path().join("a1"));
    let (addr, ca) = (ctl.grpc_addr.to_string(), ctl.ca_pem().unwrap());
    let renew = |id: ClientIdentity| {
        let (addr, ca) = (addr.clone(), ca.clone());
        async move {
            let csr = convoy_pki::generate_csr().unwrap();
            let ch = dial(&addr, &ca, Some(&id)).await.unwrap();
            pb::agent_service_client::AgentServiceClient::new(ch)
                .renew(pb::RenewRequest { csr_der: csr.csr_der })
                .await
                .map(|r| ClientIdentity { cert_pem: r.into_inner().certificate_pem, key_pem: csr.key_pem })
        }
    };
    let download = |id: ClientIdentity| {
        let (addr, ca) = (addr.clone(), ca.clone());
        async move {
            let ch = dial(&addr, &ca, Some(&id)).await.unwrap();
            pb::agent_service_client::AgentServiceClient::new(ch)
                .download(pb::DownloadRequest { digest: "0".repeat(64), offset: 0 })
                .await
                .map(|_| ())
                .unwrap_err()
                .code()
        }
    };
    let lost = renew(old.clone()).await.unwrap();
    // The answer never arrived: the old certificate renews again.
    let kept = renew(old.clone()).await.unwrap();
    // The certificate whose answer was lost was replaced: it is refused.
    assert_eq!(download(lost).await, Code::PermissionDenied);
    // The new certificate is presented: from now on only it may renew.
    assert_eq!(download(kept.clone()).await, Code::NotFound);
    let stolen = renew(old.clone()).await.unwrap_err();
    assert_eq!(stolen.code(), Code::PermissionDenied, "{stolen:?}");
    assert!(stolen.message().contains("superseded"), "{}", stolen.message());
    // The old certificate still works for calls in flight during the overlap, and the newest
    // renews.
    assert_eq!(download(old).await, Code::NotFound);
    renew(kept).await.unwrap();
    ctl.stop().await.unwrap();
}
