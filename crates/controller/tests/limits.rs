//! Resource bounds at the controller's edge: what one peer can make it hold.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::time::Duration;

use convoy_bundle::SecretKey;
use convoy_controller::logic::releases::MAX_DOWNLOADS_PER_AGENT;
use convoy_proto::v1 as pb;
use convoy_testkit::{LocalController, LocalOptions};
use tonic::Code;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// An agent that opens download streams and never reads them holds at most a few files open on
/// the controller: the rest are refused at once, and the controller keeps serving.
#[tokio::test]
async fn unread_download_streams_are_bounded_per_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    // A bundle much larger than HTTP/2 flow-control windows, so an unread stream really stalls
    // the controller's side (a small one would be sent whole into the client's buffers).
    let key = SecretKey::generate();
    let src = tmp.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("convoy.toml"), "").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..(3 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("data.bin"), noise).unwrap();
    let out = tmp.path().join("big.bundle");
    let opts = convoy_bundle::BuildOptions {
        app: "shop-api".into(),
        version: "1.0.0".into(),
        created_at: 0,
        target: None,
        zstd_level: 1,
    };
    convoy_bundle::build(&src, &opts, &key, &out).unwrap();
    let info = ctl.push_file(&out).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("a1"));
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let before = open_fds();
    const STREAMS: usize = 5_000;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..STREAMS {
        match client.download(pb::DownloadRequest { digest: info.digest.clone(), offset: 0 }).await {
            // Opened, and deliberately never read.
            Ok(stream) => held.push(stream.into_inner()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("downloads in progress"), "{}", s.message());
                refused += 1;
            }
        }
    }
    assert_eq!(held.len(), MAX_DOWNLOADS_PER_AGENT);
    assert_eq!(refused, STREAMS - MAX_DOWNLOADS_PER_AGENT);
    let grown = open_fds().saturating_sub(before);
    assert!(grown <= MAX_DOWNLOADS_PER_AGENT + 4, "{grown} more file descriptors for {STREAMS} streams");
    // Dropping the streams gives the permits back.
    drop(held);
    common::eventually(Duration::from_secs(10), "permits returned", || {
        let mut client = client.clone();
        let digest = info.digest.clone();
        async move { client.download(pb::DownloadRequest { digest, offset: 0 }).await.ok().map(drop) }
    })
    .await;
    ctl.stop().await.unwrap();
}

/// An enrollment is decoded before its token is checked, so it gets a small size bound.
#[tokio::test]
async fn oversized_unauthenticated_messages_are_refused_before_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), None).await.unwrap();
    let status = pb::enrollment_client::EnrollmentClient::new(ch)
        .enroll(pb::EnrollRequest { token: "x".into(), csr_der: vec![0u8; 1 << 20], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(common::agents(&ctl).await.is_empty());
    ctl.stop().await.unwrap();
}

/// The size of everything under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        total += if meta.is_dir() { dir_bytes(&e.path()) } else { meta.len() };
    }
    total
}

/// Reads a session until the controller ends it, and returns the status it ended with.
async fn closing_status(inbound: &mut tonic::Streaming<pb::ControllerMessage>) -> tonic::Status {
    loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("session ended without a status"),
            Err(s) => return s,
        }
    }
}

fn heartbeat(i: usize) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            seq: i as u64,
            releases: vec![],
            // Every heartbeat different and about 1 KiB, so each one would be a store write.
            apps: vec![pb::AppStatus {
                app: "web".into(),
                last_error: format!("{i:08} {}", "x".repeat(1000)),
                ..Default::default()
            }],
            last_order_seq: 0,
        })),
    }
}

/// An agent that sends heartbeats as fast as it can gets a few written, the rest dropped
/// unwritten, and then loses its session; the controller's state directory barely grows.
#[tokio::test]
async fn a_heartbeat_flood_is_throttled_and_the_state_directory_stays_bounded() {
    use convoy_controller::logic::heartbeats::{BURST, FLOOD_AFTER};
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("a1"));
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let state_dir = ctl.config.state_dir.clone();
    let before = dir_bytes(&state_dir);

    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(common::hello("a1")).await.unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    const SENT: usize = 20_000;
    let flood = tokio::spawn(async move {
        let mut sent = 0;
        for i in 0..SENT {
            if tx.send(heartbeat(i)).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let status = closing_status(&mut inbound).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("heartbeats over the rate"), "{}", status.message());
    let sent = flood.await.unwrap();
    assert!(sent >= (BURST + FLOOD_AFTER) as usize, "only {sent} heartbeats sent");

    // What was written is one of the first BURST heartbeats; nothing later reached the store.
    let agent = common::agents(&ctl).await.into_iter().find(|a| a.id == "a1").unwrap();
    let written: usize = agent.apps[0].last_error[..8].parse().unwrap();
    assert!(written < BURST as usize, "heartbeat {written} was written");
    let grown = dir_bytes(&state_dir).saturating_sub(before);
    // A few records of 1 KiB, plus the session's own bookkeeping; 20,000 writes would be ~20 MB.
    assert!(grown < 2 << 20, "state directory grew by {grown} bytes");

    // The agent may come back at an honest rate.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(common::hello("a1")).await.unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(inbound.message().await.unwrap().is_some(), "welcome");
    tx.send(heartbeat(SENT)).await.unwrap();
    common::eventually(Duration::from_secs(10), "the honest heartbeat recorded", || {
        let ctl = &ctl;
        async move {
            let a = common::agents(ctl).await.into_iter().find(|a| a.id == "a1")?;
            a.apps.first().filter(|s| s.last_error.starts_with(&format!("{SENT:08}"))).map(drop)
        }
    })
    .await;
    drop(tx);
    ctl.stop().await.unwrap();
}

/// Opens a TCP connection from `source` to `addr` and sends nothing: a stalled TLS handshake.
async fn stalled(source: [u8; 4], addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Whether the server closed `conn` (end of stream or reset) within a few seconds.
async fn closed_by_server(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// Connections are capped per identity, per address while handshaking, and in total; over a
/// cap a connection is closed at once and everyone else is still served.
#[tokio::test]
async fn connections_are_bounded_in_total_and_per_peer() {
    let limits =
        convoy_transport::ConnLimits { total: 24, handshakes_per_ip: 6, per_peer: 3, ..Default::default() };
    let tmp = tempfile::tempdir().unwrap();
    let opts = LocalOptions { conn_limits: limits, ..LocalOptions::default() };
    let ctl = LocalController::start(&tmp.path().join("ctl"), opts).await.unwrap();
    let addr = ctl.grpc_addr;
    let ca = ctl.ca_pem().unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let a1 = common::agent_identity(&tmp.path().join("a1"));
    let (cert, key) = ctl.config.admin.clone().unwrap();
    let admin = convoy_pki::ClientIdentity {
        cert_pem: std::fs::read_to_string(cert).unwrap(),
        key_pem: std::fs::read_to_string(key).unwrap(),
    };
    async fn list(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
        pb::admin_service_client::AdminServiceClient::new(ch)
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .map(drop)
    }

    // Per identity: three connections of the admin's are served, a fourth is closed.
    let mut held = Vec::new();
    for _ in 0..3 {
        let ch = common::dial(&addr.to_string(), &ca, Some(&admin)).await.unwrap();
        list(ch.clone()).await.unwrap();
        held.push(ch);
    }
    let fourth = common::dial(&addr.to_string(), &ca, Some(&admin)).await;
    if let Ok(ch) = fourth {
        assert!(list(ch).await.is_err(), "a fourth connection of one identity was served");
    }
    // Another identity is a different peer.
    let ch = common::dial(&addr.to_string(), &ca, Some(&a1)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(common::hello("a1")).await.unwrap();
    let mut session = pb::agent_service_client::AgentServiceClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(session.message().await.unwrap().is_some(), "the agent's welcome");
    drop((tx, session));
    // Closing one of the admin's connections frees its place.
    held.pop();
    common::eventually(Duration::from_secs(10), "a freed per-identity place", || {
        let (addr, ca, admin) = (addr.to_string(), ca.clone(), admin.clone());
        async move {
            let ch = common::dial(&addr, &ca, Some(&admin)).await.ok()?;
            list(ch.clone()).await.ok().map(|()| ch)
        }
    })
    .await;
    drop(held);

    // Handshakes per address: six stalled handshakes from 127.0.0.2 are held, a seventh from
    // there is closed at once, while 127.0.0.1 still connects.
    let mut from_2 = Vec::new();
    for _ in 0..6 {
        from_2.push(stalled([127, 0, 0, 2], addr).await);
    }
    let mut seventh = stalled([127, 0, 0, 2], addr).await;
    assert!(closed_by_server(&mut seventh).await, "a seventh handshake from one address was held");
    let ch = common::dial(&addr.to_string(), &ca, Some(&admin)).await.unwrap();
    list(ch.clone()).await.unwrap();
    drop(ch);

    // In total: fill the listener with stalled handshakes from other addresses; then a new
    // connection from anywhere is closed, until they go.
    let mut others = Vec::new();
    for host in 3..=5u8 {
        for _ in 0..6 {
            others.push(stalled([127, 0, 0, host], addr).await);
        }
    }
    // 6 + 18 = 24 held: the listener is full (the dropped admin channel may take a moment).
    common::eventually(Duration::from_secs(10), "the total cap refusing new connections", || async {
        let mut c = stalled([127, 0, 0, 6], addr).await;
        closed_by_server(&mut c).await.then_some(())
    })
    .await;
    drop(from_2);
    drop(others);
    common::eventually(Duration::from_secs(10), "connections served again", || {
        let (addr, ca, admin) = (addr.to_string(), ca.clone(), admin.clone());
        async move {
            let ch = common::dial(&addr, &ca, Some(&admin)).await.ok()?;
            list(ch).await.ok()
        }
    })
    .await;
    ctl.stop().await.unwrap();
}

/// Order results answering no order in flight write nothing, and a stream of them (which would
/// otherwise keep a session alive without heartbeats) closes the session.
#[tokio::test]
async fn unsolicited_order_results_write_nothing_and_a_flood_closes_the_session() {
    use convoy_controller::logic::heartbeats::FLOOD_AFTER;
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("a1"));
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let state_dir = ctl.config.state_dir.clone();
    let before = dir_bytes(&state_dir);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(common::hello("a1")).await.unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let flood = tokio::spawn(async move {
        for i in 0..5_000u64 {
            let result = pb::OrderResult {
                seq: i,
                outcome: pb::OrderOutcome::Applied as i32,
                status: Some(pb::AppStatus {
                    app: format!("app{i}"),
                    last_error: "x".repeat(100_000),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let m = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Result(result)) };
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let status = closing_status(&mut inbound).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&format!("more than {FLOOD_AFTER} messages")), "{}", status.message());
    flood.await.unwrap();
    let agent = common::agents(&ctl).await.into_iter().find(|a| a.id == "a1").unwrap();
    assert!(agent.apps.is_empty(), "unsolicited results were recorded: {:?}", agent.apps.len());
    let grown = dir_bytes(&state_dir).saturating_sub(before);
    assert!(grown < 2 << 20, "state directory grew by {grown} bytes");
    ctl.stop().await.unwrap();
}

/// A TLS connection without a client certificate, as an enrolling agent opens.
async fn anonymous_tls(
    addr: std::net::SocketAddr,
    ca: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = convoy_pki::client_config(ca, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap()
}

/// Connections without a client certificate (enrollment) get a short life and a small share of
/// the listener, so they can never crowd out agents and admins.
#[tokio::test]
async fn anonymous_connections_are_short_lived_and_capped_in_total() {
    use tokio::io::AsyncReadExt;
    let limits = convoy_transport::ConnLimits {
        total: 16,
        anonymous_lifetime: Duration::from_secs(1),
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(
        &tmp.path().join("ctl"),
        LocalOptions { conn_limits: limits, ..Default::default() },
    )
    .await
    .unwrap();
    let ca = ctl.ca_pem().unwrap();
    let addr = ctl.grpc_addr;
    // An eighth of 16: two anonymous connections are held, a third is closed at once.
    let started = std::time::Instant::now();
    let mut held = vec![anonymous_tls(addr, &ca).await, anonymous_tls(addr, &ca).await];
    let mut third = anonymous_tls(addr, &ca).await;
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "a third anonymous connection was held: {r:?}");
    // The held ones end by themselves after their lifetime, though the client never closes them.
    for conn in &mut held {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // The server's HTTP/2 settings frame.
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(r.is_ok(), "an anonymous connection outlived its lifetime");
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "closed before its lifetime");
    // Agents and admins are served throughout.
    let mut admin = ctl.admin().await.unwrap();
    admin.list_agents(pb::ListAgentsRequest::default()).await.unwrap();
    ctl.stop().await.unwrap();
}

/// An agent reconnecting in a loop is refused past a burst (each session open writes its record
/// and would reset the session's heartbeat budget), and an admin looping on an audited action
/// is refused past a burst before anything is written.
#[tokio::test]
async fn session_opens_and_audited_actions_are_rate_limited() {
    use convoy_controller::logic::{audit::ACTIONS_BURST, registry::SESSION_OPENS_BURST};
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("a1"));
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let mut refused = 0;
    for _ in 0..SESSION_OPENS_BURST + 5 {
        match client.session(tokio_stream::iter(vec![common::hello("a1")])).await {
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("reconnects too often"), "{}", s.message());
                refused += 1;
            }
        }
    }
    // One a second is earned back; the loop above takes well under five.
    assert!(refused >= 1, "no session open was refused");

    let mut admin = ctl.admin().await.unwrap();
    let before = ctl.controller.audit().entries(None, None).await.unwrap().len();
    let mut refused = 0;
    for _ in 0..ACTIONS_BURST + 20 {
        let r = admin.create_token(pb::CreateTokenRequest { ttl_secs: 60, ..Default::default() }).await;
        if let Err(s) = r {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("acting too often"), "{}", s.message());
            refused += 1;
        }
    }
    assert!(refused >= 1, "no action was refused");
    let written = ctl.controller.audit().entries(None, None).await.unwrap().len() - before;
    assert_eq!(written, 2 * (ACTIONS_BURST as usize + 20 - refused), "refused actions wrote nothing");
    ctl.stop().await.unwrap();
}
