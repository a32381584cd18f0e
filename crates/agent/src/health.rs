//! Health checks: HTTP GET (2xx), TCP connect, or a command's exit status.

use std::path::Path;
use std::time::Duration;

use convoy_bundle::{Health, HealthCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::process::RunAs;

/// One probe, bounded by `timeout`. The error says what failed.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn probe(
    check: &HealthCheck,
    timeout: Duration,
    cwd: &Path,
    env: &[(String, String)],
    run_as: Option<&RunAs>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(check, cwd, env, run_as)).await {
        Ok(r) => r,
        Err(_) => Err(format!("health check timed out after {timeout:?}")),
    }
}

async fn probe_inner(
    check: &HealthCheck,
    cwd: &Path,
    env: &[(String, String)],
    run_as: Option<&RunAs>,
) -> Result<(), String> {
    match check {
        HealthCheck::Tcp(addr) => {
            tokio::net::TcpStream::connect(addr).await.map(|_| ()).map_err(|e| format!("tcp {addr}: {e}"))
        }
        HealthCheck::Http(url) => http_get(url).await,
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

/// A minimal HTTP/1.1 GET: enough to read a status line, with no client library to trust.
async fn http_get(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    let mut s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| format!("GET {url}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: convoy-agent\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|e| format!("GET {url}: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = s.read(&mut buf).await.map_err(|e| format!("GET {url}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {url}: no HTTP status line"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {url}: HTTP {status}"))
    }
}

/// Probes every `interval` until `successes` consecutive passes (healthy) or until `deadline`
/// (unhealthy, with the last error). Cancellation counts as a failure.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn gate(
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
        match probe(check, h.timeout, cwd, env, run_as).await {
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
        let dir = std::env::temp_dir();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tcp = HealthCheck::Tcp(addr.clone());
        assert!(probe(&tcp, Duration::from_secs(1), &dir, &[], None).await.is_ok());
        let ok = HealthCheck::Exec(vec!["sh".into(), "-c".into(), "test \"$X\" = yes".into()]);
        assert!(probe(&ok, Duration::from_secs(1), &dir, &[("X".into(), "yes".into())], None).await.is_ok());
        let err =
            probe(&ok, Duration::from_secs(1), &dir, &[("X".into(), "no".into())], None).await.unwrap_err();
        assert!(err.contains("exited with"), "{err}");
        let slow = HealthCheck::Exec(vec!["sleep".into(), "5".into()]);
        let err = probe(&slow, Duration::from_millis(50), &dir, &[], None).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        let cancel = CancellationToken::new();
        assert!(gate(&tcp, &health(3), Duration::from_secs(1), &dir, &[], &cancel, None).await.is_ok());
        drop(listener);
        let err =
            gate(&tcp, &health(1), Duration::from_millis(100), &dir, &[], &cancel, None).await.unwrap_err();
        assert!(err.contains("unhealthy after") && err.contains(&addr), "{err}");
        let err = probe(
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
}
