//! The controller's HTTP listener (`/healthz`, `/metrics`, the alert hooks): an accept loop over
//! hyper's HTTP/1 server that bounds what its clients can make the controller hold.
//!
//! - **Connections.** At most `max_connections` open at once, and at most
//!   `max_connections_per_peer` from one IP address. A connection beyond either cap is accepted
//!   and closed at once, and counted (`convoy_http_connections_refused_total{limit}`).
//! - **Request heads.** A client has `header_read_timeout` to send its request line and headers,
//!   of at most [`MAX_HEAD_BYTES`]. hyper starts that clock whenever the connection waits for a
//!   request head, the first or the next on a kept-alive connection, so the same timeout closes
//!   idle keep-alive connections.
//! - **Request bodies.** A body must arrive whole within `body_read_timeout` of the handler being
//!   called and be at most [`MAX_BODY_BYTES`]; it is read before any handler runs (408 or 413
//!   otherwise). Handlers themselves are not timed: a hook's rollback must not be cut off half
//!   way.
//! - **TLS** (`[http] tls = true`): the handshake has `tls_handshake_timeout`.
//!
//! Timeouts are counted in `convoy_http_timeouts_total{phase}`.
//!
//! Shutdown: when `stop` is cancelled the listener closes, idle connections close, requests in
//! progress finish, and whatever is still open after the drain time is dropped.

/// Appends one line to a `String` (formatting into memory cannot fail).
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;

/// The largest request head (request line and headers) read; a longer one gets 431.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// The largest request body read; a longer one gets 413. The hooks take small JSON documents.
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// How long the accept loop pauses after an accept error (out of file descriptors, say), so
/// that it does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The listener's counters, rendered with the other metrics.
#[derive(Debug, Default)]
pub struct Counters {
    open: AtomicU64,
    refused_total: AtomicU64,
    refused_per_peer: AtomicU64,
    timeout_tls: AtomicU64,
    timeout_head: AtomicU64,
    timeout_body: AtomicU64,
}

impl Counters {
    /// Connections refused at the total cap and at the per-peer cap.
    pub fn refused(&self) -> (u64, u64) {
        (self.refused_total.load(Ordering::Relaxed), self.refused_per_peer.load(Ordering::Relaxed))
    }

    /// Connections closed because the TLS handshake, the request head or the request body did
    /// not arrive in time.
    pub fn timeouts(&self) -> (u64, u64, u64) {
        (
            self.timeout_tls.load(Ordering::Relaxed),
            self.timeout_head.load(Ordering::Relaxed),
            self.timeout_body.load(Ordering::Relaxed),
        )
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) fn render(&self, out: &mut String) {
        let (total, per_peer) = self.refused();
        let (tls, head, body) = self.timeouts();
        emit!(out, "# HELP convoy_http_connections Open connections on the HTTP listener.");
        emit!(out, "# TYPE convoy_http_connections gauge");
        emit!(out, "convoy_http_connections {}", self.open());
        emit!(
            out,
            "# HELP convoy_http_connections_refused_total HTTP connections closed at accept by a connection cap."
        );
        emit!(out, "# TYPE convoy_http_connections_refused_total counter");
        emit!(out, "convoy_http_connections_refused_total{{limit=\"per_peer\"}} {per_peer}");
        emit!(out, "convoy_http_connections_refused_total{{limit=\"total\"}} {total}");
        emit!(
            out,
            "# HELP convoy_http_timeouts_total HTTP connections closed because a client was too slow, by phase."
        );
        emit!(out, "# TYPE convoy_http_timeouts_total counter");
        emit!(out, "convoy_http_timeouts_total{{phase=\"request_body\"}} {body}");
        emit!(out, "convoy_http_timeouts_total{{phase=\"request_head\"}} {head}");
        emit!(out, "convoy_http_timeouts_total{{phase=\"tls_handshake\"}} {tls}");
    }
}

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    Total,
    PerPeer,
}

/// Open connections, in total and per peer address.
struct Slots {
    max_total: usize,
    max_per_peer: usize,
    counters: Arc<Counters>,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // Every critical section leaves the counts consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        // An IPv4 client of a dual-stack listener is the same peer as over IPv4.
        let ip = ip.to_canonical();
        let mut st = self.lock();
        if st.total >= self.max_total {
            return Err(Refused::Total);
        }
        let n = st.per_peer.entry(ip).or_default();
        if *n >= self.max_per_peer {
            return Err(Refused::PerPeer);
        }
        *n += 1;
        st.total += 1;
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { slots: self.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.slots.lock();
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_peer.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_peer.remove(&self.ip);
            }
        }
        self.slots.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection task shares.
struct Shared {
    app: axum::Router,
    http1: hyper::server::conn::http1::Builder,
    tls: Option<(TlsAcceptor, Duration)>,
    counters: Arc<Counters>,
}

/// Serves `app` on `listener` within the bounds of `config` until `stop` is cancelled, then
/// drains for at most `drain`. With `tls`, connections speak HTTPS.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    config: HttpConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    drain: Duration,
) {
    let body_limits = BodyLimits { timeout: config.body_read_timeout, counters: counters.clone() };
    let app = app.layer(axum::middleware::from_fn_with_state(body_limits, read_body));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let shared = Arc::new(Shared {
        app,
        http1,
        tls: tls.map(|c| (TlsAcceptor::from(c), config.tls_handshake_timeout)),
        counters: counters.clone(),
    });
    let slots = Arc::new(Slots {
        max_total: config.max_connections,
        max_per_peer: config.max_connections_per_peer,
        counters: counters.clone(),
        state: Default::default(),
    });
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match slots.admit(peer.ip()) {
                    Ok(slot) => {
                        conns.spawn(connection(stream, peer, slot, shared.clone(), stop.clone()));
                    }
                    Err(which) => {
                        let counter = match which {
                            Refused::Total => &counters.refused_total,
                            Refused::PerPeer => &counters.refused_per_peer,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, limit = ?which, "HTTP connection refused: connection cap reached");
                        drop(stream);
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP listener cannot accept connections");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        () = stop.cancelled() => break,
                    }
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "HTTP connection task failed");
                }
            }
            () = stop.cancelled() => break,
        }
    }
    drop(listener);
    // Connections saw `stop` too: idle ones are closing, busy ones finish their request.
    let drained = tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = conns.len(), "HTTP connections still open after the drain time; closing them");
        conns.shutdown().await;
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    _slot: Slot,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let Some((acceptor, handshake_timeout)) = &shared.tls else {
        return http1(stream, peer, &shared, &stop).await;
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(*handshake_timeout, acceptor.accept(stream)) => r,
        () = stop.cancelled() => return,
    };
    match handshake {
        Ok(Ok(tls)) => http1(tls, peer, &shared, &stop).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP listener: TLS handshake failed"),
        Err(_) => {
            shared.counters.timeout_tls.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "HTTP listener: TLS handshake timed out");
        }
    }
}

async fn http1<I>(io: I, peer: SocketAddr, shared: &Shared, stop: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = shared.http1.serve_connection(TokioIo::new(io), TowerToHyperService::new(shared.app.clone()));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            shared.counters.timeout_head.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "HTTP listener: request head not received in time");
        }
        Err(e) => tracing::debug!(%peer, error = %e, "HTTP connection ended with an error"),
    }
}

#[derive(Clone)]
struct BodyLimits {
    timeout: Duration,
    counters: Arc<Counters>,
}

/// Reads the whole request body within the time and size bounds before the handler runs.
async fn read_body(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) => {
            let too_long =
                std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_long {
                refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {MAX_BODY_BYTES} bytes"),
                )
            } else {
                refuse(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
            }
        }
        Err(_) => {
            limits.counters.timeout_body.fetch_add(1, Ordering::Relaxed);
            refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(limits.timeout)
                ),
            )
        }
    }
}

/// A JSON error that also closes the connection: the rest of the body was not read.
fn refuse(code: StatusCode, msg: String) -> Response {
    (code, [(axum::http::header::CONNECTION, "close")], axum::Json(serde_json::json!({"error": msg})))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(total: usize, per_peer: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max_total: total,
            max_per_peer: per_peer,
            counters: Default::default(),
            state: Default::default(),
        })
    }

    #[test]
    fn slots_cap_per_peer_and_in_total_and_free_on_drop() {
        let s = slots(3, 2);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let a1 = s.admit(a).unwrap();
        let _a2 = s.admit(a).unwrap();
        assert_eq!(s.admit(a).err(), Some(Refused::PerPeer));
        // The same peer over a dual-stack listener's IPv4-mapped address.
        assert_eq!(s.admit("::ffff:127.0.0.2".parse().unwrap()).err(), Some(Refused::PerPeer));
        let _b1 = s.admit(b).unwrap();
        assert_eq!(s.admit(b).err(), Some(Refused::Total));
        assert_eq!(s.counters.open(), 3);
        drop(a1);
        assert_eq!(s.counters.open(), 2);
        let _a3 = s.admit(a).unwrap();
        assert_eq!(s.lock().per_peer.get(&a), Some(&2));
    }

    /// The body bound in front of a handler that reports the length it got.
    #[tokio::test]
    async fn bodies_are_read_whole_up_to_the_size_bound() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/", axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }))
            .layer(axum::middleware::from_fn_with_state(
                BodyLimits { timeout: Duration::from_secs(5), counters: Default::default() },
                read_body,
            ));
        let post = |n: usize| Request::post("/").body(Body::from(vec![b'x'; n])).unwrap();
        let resp = app.clone().oneshot(post(MAX_BODY_BYTES)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let got = axum::body::to_bytes(resp.into_body(), 64).await.unwrap();
        assert_eq!(got, MAX_BODY_BYTES.to_string().as_bytes());
        let resp = app.oneshot(post(MAX_BODY_BYTES + 1)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers().get("connection").unwrap(), "close");
    }

    #[test]
    fn a_peer_with_no_connections_left_is_forgotten() {
        let s = slots(10, 10);
        let a: IpAddr = [127, 0, 0, 2].into();
        drop(s.admit(a).unwrap());
        assert!(s.lock().per_peer.is_empty());
        assert_eq!(s.lock().total, 0);
    }
}
