//! Health checks: HTTP GET (2xx), TCP connect, or a command's exit status.

use std::path::Path;
use std::time::Duration;

use convoy_bundle::{Health, HealthCheck};
use convoy_transport::http::HttpClient;
use tokio_util::sync::CancellationToken;

use crate::process::RunAs;

/// The client HTTP probes use: plain `http://` (a release's health URL is refused otherwise),
/// no proxies from the environment, no redirects followed, no connection kept between probes.
pub(crate) fn http_client() -> crate::Result<HttpClient> {
    HttpClient::plain(concat!("convoy-agent/", env!("CARGO_PKG_VERSION")))
        .map_err(|e| crate::Error::Invalid { what: "health-check HTTP client", message: e.to_string() })
}

/// One probe, bounded by `timeout`. The error says what failed.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn probe(
    http: &HttpClient,
    check: &HealthCheck,
    timeout: Duration,
    cwd: &Path,
    env: &[(String, String)],
    run_as: Option<&RunAs>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(http, check, timeout, cwd, env, run_as)).await {
        Ok(r) => r,
        Err(_) => Err(format!("health check timed out after {timeout:?}")),
    }
}

async fn probe_inner(
    http: &HttpClient,
    check: &HealthCheck,
    timeout: Duration,
    cwd: &Path,
    env: &[(String, String)],
    run_as: Option<&RunAs>,
) -> Result<(), String> {
    match check {
        HealthCheck::Tcp(addr) => {
            tokio::net::TcpStream::connect(addr).await.map(|_| ()).map_err(|e| format!("tcp {addr}: {e}"))
        }
        HealthCheck::Http(url) => http_get(http, url, timeout).await,
        HealthCheck::Exec(argv) => {
            // An exec check runs as the service would: never with more privilege.
            let mut cmd = crate::process::command_as(argv, cwd, env, run_as).map_err(|e| e.to_string())?;
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            cmd.kill_on_drop(true);
            let status = cmd.status().await.map_err(|e| format!("exec {}: {e}", argv[0]))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exec {} exited with {status}", argv[0]))
            }
        }
    }
}

/// `GET url`: healthy on a 2xx status only. A redirect is not followed and is not healthy.
async fn http_get(http: &HttpClient, url: &str, timeout: Duration) -> Result<(), String> {
    if !url.starts_with("http://") {
        return Err(format!("{url}: only http:// is supported"));
    }
    let status = http.get_status(url, timeout).await.map_err(|e| e.to_string())?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {url}: HTTP {status}"))
    }
}

/// Probes every `interval` until `successes` consecutive passes (healthy) or until `deadline`
/// (unhealthy, with the last error). Cancellation counts as a failure.
#[tracing::instrument(level = "debug", skip_all)]
#[allow(clippy::too_many_arguments)]
pub async fn gate(
    http: &HttpClient,
    check: &HealthCheck,
    h: &Health,
    deadline: Duration,
    cwd: &Path,
    env: &[(String, String)],
    cancel: &CancellationToken,
    run_as: Option<&RunAs>,
) -> Result<(), String> {
    let until = tokio::time::Instant::now() + deadline;
    let mut streak = 0u32;
    let mut last_err = String::from("no health check completed before the deadline");
    loop {
        match probe(http, check, h.timeout, cwd, env, run_as).await {
            Ok(()) => {
                streak += 1;
                if streak >= h.successes {
                    return Ok(());
                }
            }
            Err(e) => {
                streak = 0;
                last_err = e;
            }
        }
        let next = tokio::time::Instant::now() + h.interval;
        if next > until {
            return Err(format!("unhealthy after {deadline:?}: {last_err}"));
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = cancel.cancelled() => return Err("health gate cancelled".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(successes: u32) -> Health {
        Health {
            http: None,
            tcp: None,
            exec: None,
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(200),
            successes,
            deadline: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn tcp_and_exec_probes_and_the_gate() {
        let http = http_client().unwrap();
        let dir = std::env::temp_dir();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tcp = HealthCheck::Tcp(addr.clone());
        assert!(probe(&http, &tcp, Duration::from_secs(1), &dir, &[], None).await.is_ok());
        let ok = HealthCheck::Exec(vec!["sh".into(), "-c".into(), "test \"$X\" = yes".into()]);
        assert!(probe(&http, &ok, Duration::from_secs(1), &dir, &[("X".into(), "yes".into())], None)
            .await
            .is_ok());
        let err = probe(&http, &ok, Duration::from_secs(1), &dir, &[("X".into(), "no".into())], None)
            .await
            .unwrap_err();
        assert!(err.contains("exited with"), "{err}");
        let slow = HealthCheck::Exec(vec!["sleep".into(), "5".into()]);
        let err = probe(&http, &slow, Duration::from_millis(50), &dir, &[], None).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        let cancel = CancellationToken::new();
        assert!(gate(&http, &tcp, &health(3), Duration::from_secs(1), &dir, &[], &cancel, None)
            .await
            .is_ok());
        drop(listener);
        let err = gate(&http, &tcp, &health(1), Duration::from_millis(100), &dir, &[], &cancel, None)
            .await
            .unwrap_err();
        assert!(err.contains("unhealthy after") && err.contains(&addr), "{err}");
        let err = probe(
            &http,
            &HealthCheck::Http("http://127.0.0.1:1/healthz".into()),
            Duration::from_secs(1),
            &dir,
            &[],
            None,
        )
        .await
        .unwrap_err();
        assert!(err.contains("GET http://127.0.0.1:1/healthz"), "{err}");
    }

    /// A real HTTP server on 127.0.0.1 answering each path with a canned response; `/hang`
    /// accepts and never answers.
    async fn canned_server() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(m) => n += m,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let status = match path.as_str() {
                        "/ok" => "200 OK",
                        "/empty" => "204 No Content",
                        "/moved" => "302 Found\r\nLocation: /ok",
                        "/broken" => "500 Internal Server Error",
                        "/hang" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        _ => "404 Not Found",
                    };
                    let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_is_healthy_on_2xx_only_follows_no_redirect_and_keeps_its_timeout() {
        let http = http_client().unwrap();
        let dir = std::env::temp_dir();
        let addr = canned_server().await;
        let check = |path: &str| HealthCheck::Http(format!("http://{addr}{path}"));
        let t = Duration::from_secs(5);
        for ok in ["/ok", "/empty"] {
            assert!(probe(&http, &check(ok), t, &dir, &[], None).await.is_ok(), "{ok}");
        }
        for (bad, why) in [("/moved", "HTTP 302"), ("/broken", "HTTP 500"), ("/nothing", "HTTP 404")] {
            let err = probe(&http, &check(bad), t, &dir, &[], None).await.unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let started = std::time::Instant::now();
        let err =
            probe(&http, &check("/hang"), Duration::from_millis(300), &dir, &[], None).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the probe outlived its timeout: {:?}",
            started.elapsed()
        );
        let err = probe(&http, &HealthCheck::Http("https://127.0.0.1:1/".into()), t, &dir, &[], None)
            .await
            .unwrap_err();
        assert!(err.contains("only http://"), "{err}");
    }
}
