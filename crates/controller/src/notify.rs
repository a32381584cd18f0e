//! Outbound notifications: JSON events POSTed to configured webhook URLs (`http://`, or
//! `https://` verified against the system's roots), retried with backoff on a background task,
//! so a slow or broken receiver never holds up a rollout.

use std::time::Duration;

use convoy_transport::http::HttpClient;
use tokio::sync::mpsc;

const ATTEMPTS: u32 = 5;
/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

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
        let client = match HttpClient::with_system_roots(concat!("convoy/", env!("CARGO_PKG_VERSION"))) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "notifications configured but no HTTP client: disabled");
                return Self { tx: None };
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<serde_json::Value>();
        let spawn = move || {
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    for url in &urls {
                        let (client, url, body) = (client.clone(), url.clone(), event.to_string());
                        // Each delivery retries on its own, so one bad receiver delays nobody.
                        tokio::spawn(async move { deliver(&client, &url, body).await });
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
            if tx.send(event).is_err() {
                tracing::warn!(kind, "notification dropped: the delivery task has stopped");
            }
        }
    }
}

async fn deliver(client: &HttpClient, url: &str, body: String) {
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        match post(client, url, body.clone()).await {
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

/// POSTs the event; success is a 2xx status (a redirect is not followed).
async fn post(client: &HttpClient, url: &str, body: String) -> Result<(), String> {
    let status = client.post_json(url, body, &[], ATTEMPT_TIMEOUT).await.map_err(|e| e.to_string())?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}
