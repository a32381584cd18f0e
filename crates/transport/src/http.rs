//! The one outbound HTTP client: agents' health probes, the controller's webhooks, the demo's
//! and the tests' requests all go through [`HttpClient`], a thin wrapper over reqwest on
//! rustls (TLS 1.3, the explicit `ring` provider, see [`convoy_pki::web_client_config`]).
//!
//! Every client: sends no request through a proxy (the environment's `HTTP_PROXY` and the like
//! are ignored), never follows a redirect (a 3xx is the answer), keeps no idle connection (each
//! request is a fresh one, so a probe sees what a new client would), and bounds every request,
//! connecting, sending and reading the answer, by the timeout it is given.

use std::time::Duration;

use convoy_pki::WebTrust;

/// Why a request got no answer, or an answer that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP client: {0}")]
    Build(String),
    #[error("{method} {url}: timed out after {timeout:?}")]
    Timeout { method: &'static str, url: String, timeout: Duration },
    #[error("{method} {url}: {message}")]
    Request { method: &'static str, url: String, message: String },
}

/// A status and, when asked for, the body (up to [`MAX_BODY`] bytes, lossily decoded).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The most body bytes [`HttpClient::get`] reads.
pub const MAX_BODY: usize = 64 << 10;

/// An HTTP/1.1 client; cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
}

impl HttpClient {
    /// A client for `http://` only (health probes of local services, tests): it trusts no
    /// server certificate, so an `https://` URL fails at the handshake.
    pub fn plain(user_agent: &str) -> Result<Self, HttpError> {
        Self::new(user_agent, WebTrust::Nothing)
    }

    /// A client for `http://` and for `https://` servers whose certificates chain to the
    /// operating system's roots (webhook receivers).
    pub fn with_system_roots(user_agent: &str) -> Result<Self, HttpError> {
        Self::new(user_agent, WebTrust::System)
    }

    fn new(user_agent: &str, trust: WebTrust) -> Result<Self, HttpError> {
        let tls = convoy_pki::web_client_config(trust).map_err(|e| HttpError::Build(e.to_string()))?;
        let inner = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .http1_only()
            .user_agent(user_agent.to_owned())
            .build()
            .map_err(|e| HttpError::Build(crate::error_chain(&e)))?;
        Ok(Self { inner })
    }

    /// `GET url`: the status only; the body is not read.
    pub async fn get_status(&self, url: &str, timeout: Duration) -> Result<u16, HttpError> {
        let resp = self.send("GET", self.inner.get(url), url, timeout).await?;
        Ok(resp.status().as_u16())
    }

    /// `GET url`: the status and the body.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Reply, HttpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut resp = self.send("GET", self.inner.get(url), url, timeout).await?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        let read = async {
            while let Some(chunk) = resp.chunk().await? {
                let room = MAX_BODY - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() == MAX_BODY {
                    break;
                }
            }
            Ok::<(), reqwest::Error>(())
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(())) => Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned() }),
            Ok(Err(e)) => Err(request_error("GET", url, e)),
            Err(_) => Err(HttpError::Timeout { method: "GET", url: url.to_owned(), timeout }),
        }
    }

    /// `POST url` with a JSON body and optional extra headers: the status.
    pub async fn post_json(
        &self,
        url: &str,
        body: String,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u16, HttpError> {
        let mut req = self.inner.post(url).header("content-type", "application/json").body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = self.send("POST", req, url, timeout).await?;
        Ok(resp.status().as_u16())
    }

    async fn send(
        &self,
        method: &'static str,
        req: reqwest::RequestBuilder,
        url: &str,
        timeout: Duration,
    ) -> Result<reqwest::Response, HttpError> {
        // reqwest's own timeout covers the request; the outer one also bounds what precedes it
        // (a resolver that hangs).
        match tokio::time::timeout(timeout, req.timeout(timeout).send()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_timeout() => Err(HttpError::Timeout { method, url: url.to_owned(), timeout }),
            Ok(Err(e)) => Err(request_error(method, url, e)),
            Err(_) => Err(HttpError::Timeout { method, url: url.to_owned(), timeout }),
        }
    }
}

fn request_error(method: &'static str, url: &str, e: reqwest::Error) -> HttpError {
    // reqwest's own text repeats the URL; the chain's sources say what happened.
    let mut message = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        source = s.source();
    }
    if message.is_empty() {
        message = e.without_url().to_string();
    }
    HttpError::Request { method, url: url.to_owned(), message }
}
