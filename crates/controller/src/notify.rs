//! Outbound notifications: JSON events POSTed to configured webhook URLs, retried with backoff
//! on a background task, so a slow or broken receiver never holds up a rollout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::UnboundedSender<serde_json::Value>>,
}

impl Notifier {
    /// With no URLs, notifications are dropped at once. The delivery task starts lazily, on the
    /// first event, inside whatever runtime emits it.
    pub fn new(urls: Vec<String>) -> Self {
        if urls.is_empty() {
            return Self { tx: None };
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<serde_json::Value>();
        let spawn = move || {
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    for url in &urls {
                        let (url, body) = (url.clone(), event.to_string());
                        // Each delivery retries on its own, so one bad receiver delays nobody.
                        tokio::spawn(async move { deliver(&url, &body).await });
                    }
                }
            });
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => spawn(),
            Err(_) => tracing::warn!("notifications configured outside a runtime: disabled"),
        }
        Self { tx: Some(tx) }
    }

    /// Queues an event; never blocks.
    pub fn send(&self, kind: &str, mut event: serde_json::Value) {
        if let Some(tx) = &self.tx {
            if let Some(m) = event.as_object_mut() {
                m.insert("event".into(), kind.into());
                m.insert("at".into(), crate::time::now().into());
            }
            let _ = tx.send(event);
        }
    }
}

async fn deliver(url: &str, body: &str) {
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        match post(url, body).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(%url, attempt, error = %e, "notification delivery failed");
                if attempt < ATTEMPTS {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    tracing::error!(%url, "notification dropped after {ATTEMPTS} attempts");
}

/// A minimal HTTP/1.1 POST of JSON; success is a 2xx status.
async fn post(url: &str, body: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// webhook URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let head = String::from_utf8_lossy(&buf[..n]);
        let code: u16 =
            head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no HTTP status")?;
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP {code}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| "timed out".to_string())?
}
