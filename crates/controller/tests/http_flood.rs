//! Thousands of half-sent requests against the controller's HTTP listener: each is closed by the
//! server once the header-read timeout has passed, their file descriptors are released, and the
//! alert hook keeps answering meanwhile. Alone in its file because it counts the process's open
//! file descriptors, which other tests running beside it would disturb.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::eventually;
use convoy_controller::config::HttpConfig;
use convoy_testkit::{LocalController, LocalOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

/// Longer than opening all the stalled connections takes on a loaded two-core machine (seconds),
/// so that every one is still open when the test looks.
const HEADER_TIMEOUT: Duration = Duration::from_secs(8);
const STALLED: usize = 2000;
/// The stalled connections come from 127.0.0.10 to 127.0.0.49 (Linux routes all of 127/8 to the
/// loopback interface), 50 from each: under the per-peer cap.
const SOURCES: usize = 40;
const PER_PEER: usize = 64;
/// How late after its timeout a loaded two-core machine may close a connection.
const SLACK: Duration = Duration::from_secs(3);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Lets this process hold `need` descriptors, if the hard limit allows.
fn raise_fd_limit(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < need {
        assert!(hard >= need, "this test needs {need} file descriptors; the hard limit is {hard}");
        setrlimit(Resource::RLIMIT_NOFILE, need, hard).unwrap();
    }
}

/// One HTTP/1.1 request on a fresh connection from 127.0.0.1; the status and the body.
async fn request(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{head}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn sample(text: &str, series: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| {
        panic!("{series} missing:\n{text}");
    });
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_half_sent_requests_are_closed_within_the_header_timeout() {
    raise_fd_limit(3 * STALLED as u64 + 1024);
    let tmp = tempfile::tempdir().unwrap();
    let http = HttpConfig {
        header_read_timeout: HEADER_TIMEOUT,
        max_connections: STALLED + 64,
        max_connections_per_peer: PER_PEER,
        ..HttpConfig::default()
    };
    let ctl = LocalController::start(
        &tmp.path().join("ctl"),
        LocalOptions { http: Some(http), ..Default::default() },
    )
    .await
    .unwrap();
    let addr = ctl.http_addr;
    let token = ctl.config.hooks.alertmanager_token.clone().unwrap();
    // One request first, so that whatever the listener opens lazily is open before counting.
    assert_eq!(request(addr, "GET /healthz HTTP/1.1", "").await.0, 200);
    let before = open_fds();

    let mut stalled = JoinSet::new();
    let opening = Instant::now();
    for i in 0..STALLED {
        let source = Ipv4Addr::new(127, 0, 0, 10 + (i % SOURCES) as u8);
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        let opened = Instant::now();
        let mut s = socket.connect(addr).await.unwrap();
        // Half stop inside the request line, half inside the headers.
        let partial: &[u8] = if i % 2 == 0 {
            b"GET /metr"
        } else {
            b"POST /v1/hooks/alertmanager HTTP/1.1\r\nHost: x\r\nContent-Le"
        };
        s.write_all(partial).await.unwrap();
        stalled.spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            (opened.elapsed(), Instant::now(), got)
        });
    }
    let opened_in = opening.elapsed();

    // While they are all open, an Alertmanager delivery is answered (its alert matches no rule,
    // so nothing is acted on), and a scrape counts them.
    let alert = json!({
        "version": "4",
        "status": "firing",
        "alerts": [{"status": "firing", "labels": {"alertname": "HighErrorRate"}, "startsAt": "2026-11-29T10:00:00Z", "fingerprint": "f1"}]
    });
    let (code, body) = request(
        addr,
        &format!("POST /v1/hooks/alertmanager HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json"),
        &alert.to_string(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("no rule matches"), "{body}");
    let (code, text) = request(addr, "GET /metrics HTTP/1.1", "").await;
    let answered = Instant::now();
    assert_eq!(code, 200);
    assert!(
        sample(&text, "convoy_http_connections") > STALLED as u64,
        "opening {STALLED} connections took {opened_in:?}; they should all be open now:\n{text}"
    );
    // Both ends of every stalled connection (give or take a few the controller opened or closed
    // since `before`).
    let during = open_fds();
    assert!(during + 16 >= before + 2 * STALLED, "{during} descriptors open, {before} before");

    // The server closes each one, without an answer, once its head has been stalled for the
    // timeout, and not long after.
    let mut slowest = Duration::ZERO;
    while let Some(done) = stalled.join_next().await {
        let (lived, closed_at, got) = done.unwrap();
        assert!(closed_at > answered, "a stalled connection was closed before the hook was answered");
        assert!(got.is_empty(), "a stalled request got an answer: {}", String::from_utf8_lossy(&got));
        assert!(lived >= HEADER_TIMEOUT, "closed after {lived:?}, before the timeout");
        assert!(lived <= HEADER_TIMEOUT + SLACK, "closed only after {lived:?}");
        slowest = slowest.max(lived);
    }
    eprintln!(
        "{STALLED} stalled connections opened in {opened_in:?}; {during} descriptors open, {before} before; \
         the last closed after {slowest:?}"
    );

    // Every descriptor is released, on the server's side as on the test's.
    eventually(Duration::from_secs(10), "file descriptors released", || async {
        (open_fds() <= before + 4).then_some(())
    })
    .await;
    let (code, text) = request(addr, "GET /metrics HTTP/1.1", "").await;
    assert_eq!(code, 200);
    assert!(sample(&text, "convoy_http_timeouts_total{phase=\"request_head\"}") >= STALLED as u64, "{text}");
    assert_eq!(sample(&text, "convoy_http_connections_refused_total{limit=\"per_peer\"}"), 0, "{text}");
    assert_eq!(sample(&text, "convoy_http_connections"), 1, "only the scrape itself:\n{text}");
    ctl.stop().await.unwrap();
}
