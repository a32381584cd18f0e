//! The controller's HTTP listener on real loopback sockets: connection caps, the idle and body
//! timeouts, HTTPS with the controller's certificate, and `/metrics` gauges that follow the
//! fleet without reading the store.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, free_port};
use convoy_bundle::SecretKey;
use convoy_controller::config::HttpConfig;
use convoy_controller::logic::rollouts::{RolloutSpec, RolloutState};
use convoy_proto::v1 as pb;
use convoy_testkit::{DemoRelease, LocalAgent, LocalController, LocalOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(60);
/// How late a loaded two-core machine may be to close a connection.
const SLACK: Duration = Duration::from_secs(3);

async fn start(tmp: &Path, http: HttpConfig) -> LocalController {
    LocalController::start(&tmp.join("ctl"), LocalOptions { http: Some(http), ..Default::default() })
        .await
        .unwrap()
}

/// A connection to `addr` from the loopback address 127.0.0.`source`.
async fn connect_from(source: u8, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, source), 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the peer closes (or resets) the connection; what arrived, or `None` if it was
/// still open after `within`.
async fn until_closed(s: &mut (impl AsyncRead + Unpin), within: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(within, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
}

/// `GET path` with `Connection: close` over `s`: the status and the whole response, or `None`
/// when the connection closed without an answer.
async fn try_get_on(mut s: impl AsyncRead + AsyncWrite + Unpin, path: &str) -> Option<(u16, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let resp = String::from_utf8(until_closed(&mut s, WAIT).await.unwrap()).unwrap();
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, resp))
}

async fn get_on(s: impl AsyncRead + AsyncWrite + Unpin, path: &str) -> (u16, String) {
    try_get_on(s, path).await.expect("an HTTP answer")
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_on(TcpStream::connect(addr).await.unwrap(), path).await
}

/// The value of `series` in a Prometheus text response.
fn sample(text: &str, series: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| {
        panic!("{series} missing:\n{text}");
    });
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

/// Opens `n` connections from 127.0.0.`source` that each send half a request line and stall.
async fn stalled(n: usize, source: u8, addr: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = connect_from(source, addr).await;
        s.write_all(b"GET /heal").await.unwrap();
        held.push(s);
    }
    held
}

/// `GET /healthz` on a connection that stays open afterwards.
async fn healthz_kept_alive(s: &mut TcpStream) {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    while !resp.ends_with(b"ok\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&resp));
        resp.extend_from_slice(&buf[..n]);
    }
    assert!(resp.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&resp));
}

/// A connection the server accepted and then closed at once, sending nothing.
async fn refused_at_once(source: u8, addr: SocketAddr) {
    let started = Instant::now();
    let mut s = connect_from(source, addr).await;
    // The server may have closed it already; a failed write is part of that.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.ok();
    let got = until_closed(&mut s, SLACK).await.expect("a connection over the cap is closed at once");
    assert!(got.is_empty(), "a connection over the cap got an answer: {}", String::from_utf8_lossy(&got));
    assert!(started.elapsed() < SLACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_caps_are_closed_at_once_and_others_served() {
    let tmp = tempfile::tempdir().unwrap();
    // A header timeout far beyond the test, so that only the caps close anything.
    let http = HttpConfig {
        header_read_timeout: Duration::from_secs(600),
        max_connections: 12,
        max_connections_per_peer: 4,
        ..HttpConfig::default()
    };
    let ctl = start(tmp.path(), http).await;
    let addr = ctl.http_addr;

    // Peer .2 fills its share; its fifth connection is closed unanswered.
    let from_2 = stalled(4, 2, addr).await;
    refused_at_once(2, addr).await;
    // Other peers are served meanwhile (on a connection kept open: a closed one frees its place
    // a moment after the client sees it close, which would blur the counts below).
    let mut kept = connect_from(3, addr).await;
    healthz_kept_alive(&mut kept).await;

    // Peers .3 and .4 fill the listener: 12 connections. Everyone else is now closed at once,
    // including a peer with none open.
    let from_3 = stalled(3, 3, addr).await;
    let from_4 = stalled(4, 4, addr).await;
    refused_at_once(5, addr).await;
    refused_at_once(1, addr).await;

    // Peer .2 lets go: its places free up and requests are answered again.
    drop(from_2);
    let text = eventually(Duration::from_secs(10), "peer .2's places free", || async {
        let (code, text) = try_get_on(connect_from(1, addr).await, "/metrics").await?;
        // The eight still held, and this scrape.
        (code == 200 && sample(&text, "convoy_http_connections") == 9).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "convoy_http_connections_refused_total{limit=\"per_peer\"}"), 1, "{text}");
    assert!(sample(&text, "convoy_http_connections_refused_total{limit=\"total\"}") >= 2, "{text}");
    healthz_kept_alive(&mut kept).await;
    drop((kept, from_3, from_4));
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_and_slow_bodies_time_out() {
    let tmp = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(1);
    let http =
        HttpConfig { header_read_timeout: timeout, body_read_timeout: timeout, ..HttpConfig::default() };
    let ctl = start(tmp.path(), http).await;
    let addr = ctl.http_addr;

    // A kept-alive connection serves a request, then is closed once it has idled for the
    // header timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    healthz_kept_alive(&mut s).await;
    let answered = Instant::now();
    let rest = until_closed(&mut s, timeout + SLACK).await.expect("an idle connection is closed");
    assert!(rest.is_empty());
    let idled = answered.elapsed();
    assert!(idled >= timeout - Duration::from_millis(100), "closed after idling only {idled:?}");

    // A body that stops arriving gets 408 once the body timeout has passed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/hooks/rollback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"app\"").await.unwrap();
    let sent = Instant::now();
    let resp = until_closed(&mut s, timeout + SLACK).await.expect("a stalled body is answered and closed");
    let resp = String::from_utf8(resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    assert!(resp.contains("did not arrive within 1s"), "{resp}");
    assert!(sent.elapsed() >= timeout - Duration::from_millis(100));

    // A request head that reaches the size bound unfinished gets 431 without waiting for its
    // end. (Exactly the bound, so that the server reads all of it: closing with unread bytes
    // would reset the connection and could discard the answer.)
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut long = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: ".to_vec();
    long.resize(convoy_controller::http::MAX_HEAD_BYTES, b'p');
    s.write_all(&long).await.unwrap();
    let resp = until_closed(&mut s, SLACK).await.expect("an oversized head is answered and closed");
    assert!(resp.starts_with(b"HTTP/1.1 431 "), "{}", String::from_utf8_lossy(&resp));

    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(sample(&text, "convoy_http_timeouts_total{phase=\"request_body\"}"), 1, "{text}");
    assert!(sample(&text, "convoy_http_timeouts_total{phase=\"request_head\"}") >= 1, "{text}");
    ctl.stop().await.unwrap();
}

/// A TLS client that trusts the controller's CA and speaks HTTP/1.1.
fn https_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut config = (*convoy_pki::client_config(ca_pem, None).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn https_get(tls: &tokio_rustls::TlsConnector, addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    get_on(tls.connect(name, tcp).await.unwrap(), path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_with_the_controller_certificate_and_refuses_plain_http() {
    let tmp = tempfile::tempdir().unwrap();
    let handshake = Duration::from_secs(1);
    let http = HttpConfig { tls: true, tls_handshake_timeout: handshake, ..HttpConfig::default() };
    let ctl = start(tmp.path(), http).await;
    let addr = ctl.http_addr;
    let tls = https_client(&ctl.ca_pem().unwrap());

    let (code, resp) = https_get(&tls, addr, "/healthz").await;
    assert_eq!(code, 200, "{resp}");
    assert!(resp.ends_with("\r\n\r\nok\n"), "{resp}");

    // A client that does not trust the controller's CA does not get through.
    let other_ca = convoy_pki::Ca::generate(&convoy_pki::TrustDomain::new("other.test").unwrap()).unwrap().0;
    let stranger = https_client(other_ca.cert_pem());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(stranger.connect(name, tcp).await.is_err());

    // Plain HTTP to the HTTPS listener gets no HTTP answer.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let got = until_closed(&mut s, SLACK).await.expect("a plain HTTP request is closed");
    assert!(!got.starts_with(b"HTTP/"), "plain HTTP answered: {}", String::from_utf8_lossy(&got));

    // A client that never starts its handshake is closed once the handshake timeout passed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let opened = Instant::now();
    until_closed(&mut s, handshake + SLACK).await.expect("a silent TLS client is closed");
    assert!(opened.elapsed() >= handshake - Duration::from_millis(100));

    let (code, text) = https_get(&tls, addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(sample(&text, "convoy_http_timeouts_total{phase=\"tls_handshake\"}"), 1, "{text}");
    // The gRPC side is unchanged.
    assert!(common::agents(&ctl).await.is_empty());
    ctl.stop().await.unwrap();
}

/// The `convoy_agents` and `convoy_rollouts` lines of a scrape, sorted.
async fn gauges(addr: SocketAddr) -> Vec<String> {
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("convoy_agents{") || l.starts_with("convoy_rollouts{"))
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

/// The gauge lines for agents per region (region, offline, online) and rollouts per state.
fn expect(regions: &[(&str, u64, u64)], rollouts: &[(&str, u64)]) -> Vec<String> {
    let mut lines = vec![];
    for (region, offline, online) in regions {
        let labels = format!("environment=\"production\",region=\"{region}\"");
        lines.push(format!("convoy_agents{{{labels},state=\"offline\"}} {offline}"));
        lines.push(format!("convoy_agents{{{labels},state=\"online\"}} {online}"));
    }
    let states = [
        "aborted",
        "awaiting_approval",
        "completed",
        "expired",
        "paused",
        "rejected",
        "rolled_back",
        "running",
        "scheduled",
        "staging",
        "superseded",
    ];
    for state in states {
        let n = rollouts.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
        lines.push(format!("convoy_rollouts{{state=\"{state}\"}} {n}"));
    }
    lines.sort();
    lines
}

async fn until_gauges(addr: SocketAddr, want: Vec<String>) {
    eventually(WAIT, &format!("gauges {want:?}"), || {
        let want = want.clone();
        async move { (gauges(addr).await == want).then_some(()) }
    })
    .await;
}

fn spawn_agent(tmp: &Path, id: &str, key: &SecretKey) -> LocalAgent {
    let port = free_port();
    let public = key.public();
    LocalAgent::spawn_with(&tmp.join(id), |c| {
        c.trust = vec![public];
        c.vars.insert("PORT".into(), port.to_string());
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_gauges_follow_the_fleet_and_are_reloaded_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ctl = start(tmp.path(), HttpConfig::default()).await;
    let key = SecretKey::generate();
    assert_eq!(gauges(ctl.http_addr).await, expect(&[], &[]));

    // Enrolled: counted offline in their regions.
    for (id, region) in [("a1", "eu-west"), ("a2", "eu-west"), ("b1", "us-east")] {
        ctl.enroll(&tmp.path().join(id), id, region).await.unwrap();
    }
    assert_eq!(gauges(ctl.http_addr).await, expect(&[("eu-west", 2, 0), ("us-east", 1, 0)], &[]));

    // Connected.
    let mut a1 = spawn_agent(tmp.path(), "a1", &key);
    a1.wait_for(WAIT, |s| s.connected).await.unwrap();
    until_gauges(ctl.http_addr, expect(&[("eu-west", 1, 1), ("us-east", 1, 0)], &[])).await;

    // A rollout to eu-west: a1 takes it, a2 (offline) will converge when it returns.
    let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
    ctl.push_demo_release(tmp.path(), exe, &key, DemoRelease::new("1.0.0", "healthy")).await.unwrap();
    let spec = RolloutSpec {
        waves: vec![100],
        regions: vec!["eu-west".into()],
        ..RolloutSpec::new("shop-api", "1.0.0")
    };
    let id = ctl.controller.rollouts().deploy(spec, "admin/test").await.unwrap();
    let r = eventually(WAIT, "rollout done", || async {
        let r = ctl.controller.rollouts().rollout(Some(id.clone())).await.unwrap();
        r.state.is_final().then_some(r)
    })
    .await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(
        gauges(ctl.http_addr).await,
        expect(&[("eu-west", 1, 1), ("us-east", 1, 0)], &[("completed", 1)])
    );

    // Disconnected.
    a1.stop().await.unwrap();
    until_gauges(ctl.http_addr, expect(&[("eu-west", 2, 0), ("us-east", 1, 0)], &[("completed", 1)])).await;

    // Revoked: an offline agent, then a connected one. A region with no agent left is not shown.
    let mut admin = ctl.admin().await.unwrap();
    admin.revoke_agent(pb::RevokeAgentRequest { agent_id: "b1".into() }).await.unwrap();
    assert_eq!(gauges(ctl.http_addr).await, expect(&[("eu-west", 2, 0)], &[("completed", 1)]));
    let mut a1 = spawn_agent(tmp.path(), "a1", &key);
    a1.wait_for(WAIT, |s| s.connected).await.unwrap();
    until_gauges(ctl.http_addr, expect(&[("eu-west", 1, 1)], &[("completed", 1)])).await;
    admin.revoke_agent(pb::RevokeAgentRequest { agent_id: "a1".into() }).await.unwrap();
    let settled = expect(&[("eu-west", 1, 0)], &[("completed", 1)]);
    assert_eq!(gauges(ctl.http_addr).await, settled);
    // Revoking again changes nothing.
    admin.revoke_agent(pb::RevokeAgentRequest { agent_id: "b1".into() }).await.unwrap();
    assert_eq!(gauges(ctl.http_addr).await, settled);
    drop(admin);
    // The revoked agent keeps trying and is refused; stop it.
    a1.stop().await.ok();

    // A restarted controller counts the same from its store.
    let dir = ctl.dir.clone();
    ctl.stop().await.unwrap();
    ctl = LocalController::start(&dir, LocalOptions::default()).await.unwrap();
    assert_eq!(gauges(ctl.http_addr).await, settled);
    ctl.stop().await.unwrap();
}
