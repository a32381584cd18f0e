//! The one place where TLS meets gRPC, and ([`http`]) the one outbound HTTP client.
//!
//! The controller accepts TCP connections, completes a TLS 1.3 handshake with rustls, reads the
//! verified client certificate's identity and hands the stream to tonic as [`TlsConn`], whose
//! [`PeerInfo`] every handler finds in its request extensions. Clients (agents and the admin
//! CLI) dial through [`connect`], which runs the same rustls stack on their side.
//!
//! tonic's built-in TLS is not used: it cannot express "client certificate optional at the
//! handshake, required by every RPC but enrollment", and it would hide the peer's parsed identity.

#![forbid(unsafe_code)]

pub mod http;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use convoy_pki::{CertInfo, Identity, TrustDomain};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from dialing the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid controller address {0:?}: expected HOST:PORT")]
    BadAddress(String),
    #[error("invalid TLS server name {0:?}")]
    BadServerName(String),
    #[error("cannot connect to the controller at {addr}: {}", error_chain(.source))]
    Connect { addr: String, source: tonic::transport::Error },
}

/// What the controller knows about the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's identity, if the client presented one.
    pub identity: Option<Identity>,
    pub cert: Option<CertInfo>,
}

/// A server-side TLS stream that tonic can serve, carrying its peer's verified identity.
pub struct TlsConn {
    inner: server::TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Its place under the connection limits, given back when tonic drops the connection.
    _slot: Slot,
    /// For a client without a certificate (enrollment): when the connection ends, whatever it
    /// is doing, so anonymous clients cannot hold connections.
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How many connections the listener holds at once.
///
/// A peer is its certificate's identity once the handshake is done (agents behind one NAT
/// address are different peers), and its IP address before that, or when it presents no
/// certificate (enrollment). Connections over a limit are closed as soon as they are accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, handshaking or established.
    pub total: usize,
    /// Connections from one IP address still in their TLS handshake.
    pub handshakes_per_ip: usize,
    /// Established connections of one identity; for clients without a certificate, of one IP
    /// address.
    pub per_peer: usize,
    /// How long a connection without a client certificate may stay open: enough to enroll.
    /// Such connections also share at most an eighth of `total`.
    pub anonymous_lifetime: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        // An agent needs one connection and an admin one per CLI call; a controller serves
        // thousands of agents, each holding a few file descriptors' worth of buffers.
        Self { total: 8192, handshakes_per_ip: 64, per_peer: 16, anonymous_lifetime: Duration::from_secs(30) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PeerKey {
    Handshaking(IpAddr),
    Anonymous(IpAddr),
    Identity(String),
}

/// The counts behind [`ConnLimits`], shared by the accept loop and every open connection.
struct Counts {
    limits: ConnLimits,
    total: usize,
    /// Established connections without a client certificate.
    anonymous: usize,
    peers: HashMap<PeerKey, usize>,
    refused: AtomicU64,
    last_warning: Mutex<Option<std::time::Instant>>,
}

/// One connection's place under the limits: the total, plus one peer key.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    key: Option<PeerKey>,
}

impl Slot {
    /// Takes a place in the total count, or `None` at the limit.
    fn take(counts: &Arc<Mutex<Counts>>) -> Option<Self> {
        let mut c = lock(counts);
        if c.total >= c.limits.total {
            return None;
        }
        c.total += 1;
        Some(Self { counts: counts.clone(), key: None })
    }

    /// Moves this connection under `key` (leaving its previous key), or refuses at that key's
    /// limit.
    fn enter(&mut self, key: PeerKey) -> bool {
        let mut c = lock(&self.counts);
        let max = match key {
            PeerKey::Handshaking(_) => c.limits.handshakes_per_ip,
            PeerKey::Anonymous(_) | PeerKey::Identity(_) => c.limits.per_peer,
        };
        let n = c.peers.get(&key).copied().unwrap_or(0);
        if n >= max {
            return false;
        }
        // Clients without a certificate get an eighth of the total between them, so they can
        // never crowd out agents and admins.
        if matches!(key, PeerKey::Anonymous(_)) && c.anonymous >= (c.limits.total / 8).max(1) {
            return false;
        }
        if let Some(old) = self.key.take() {
            leave(&mut c, &old);
        }
        if matches!(key, PeerKey::Anonymous(_)) {
            c.anonymous += 1;
        }
        c.peers.insert(key.clone(), n + 1);
        self.key = Some(key);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total -= 1;
        if let Some(k) = self.key.take() {
            leave(&mut c, &k);
        }
    }
}

/// The address a per-address cap counts: an IPv4 address, or an IPv6 address's /64 (one host
/// commonly holds a whole /64, so counting single addresses would give it millions of budgets).
fn network_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn leave(c: &mut Counts, key: &PeerKey) {
    if matches!(key, PeerKey::Anonymous(_)) {
        c.anonymous -= 1;
    }
    if let Some(n) = c.peers.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            c.peers.remove(key);
        }
    }
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    // Every critical section leaves the counts consistent; a panic cannot interrupt one midway.
    counts.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logs a refused connection, at most once a second with the count since the last warning:
/// a flood must not become a log flood.
fn refused(counts: &Mutex<Counts>, remote: SocketAddr, why: &str) {
    let c = lock(counts);
    let n = c.refused.fetch_add(1, Ordering::Relaxed) + 1;
    let mut last = c.last_warning.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
        *last = Some(now);
        tracing::warn!(%remote, reason = why, refused_so_far = n, "connection refused: limit reached");
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl TlsConn {
    /// An error once an anonymous connection's lifetime is over; registers for the wake-up.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let sleep = self.expires.as_mut()?;
        sleep.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(io::ErrorKind::TimedOut, "connection without a client certificate open too long")
        })
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections on `listener`, completes TLS handshakes concurrently and yields the
/// streams whose peers are acceptable. A client certificate that verifies against the CA but
/// carries no valid identity for `td` is dropped here; failed handshakes (wrong CA, TLS 1.2,
/// garbage) are logged and never reach tonic.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    td: TrustDomain,
    limits: ConnLimits,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let counts = Arc::new(Mutex::new(Counts {
        limits,
        total: 0,
        anonymous: 0,
        peers: HashMap::new(),
        refused: AtomicU64::new(0),
        last_warning: Mutex::new(None),
    }));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            // Over a limit, the connection is dropped (closed) right here, before any work.
            let Some(mut slot) = Slot::take(&counts) else {
                refused(&counts, remote, "too many connections in total");
                continue;
            };
            if !slot.enter(PeerKey::Handshaking(network_of(remote.ip()))) {
                refused(&counts, remote, "too many handshakes from this address");
                continue;
            }
            // Without TCP_NODELAY every small HTTP/2 frame waits on Nagle's algorithm.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let td = td.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => match peer_info(&stream, remote, &td) {
                        Ok(peer) => {
                            let key = match &peer.identity {
                                Some(id) => PeerKey::Identity(id.to_string()),
                                None => PeerKey::Anonymous(network_of(remote.ip())),
                            };
                            if !slot.enter(key) {
                                refused(&counts, remote, "too many connections from this peer");
                                return;
                            }
                            // The receiver is gone only when the server is shutting down.
                            let expires = peer
                                .identity
                                .is_none()
                                .then(|| Box::pin(tokio::time::sleep(limits.anonymous_lifetime)));
                            let conn = TlsConn { inner: stream, peer, _slot: slot, expires };
                            if tx.send(Ok(conn)).await.is_err() {
                                tracing::debug!(%remote, "connection dropped: the server is shutting down");
                            }
                        }
                        Err(reason) => {
                            tracing::warn!(%remote, %reason, "connection refused: unusable client certificate");
                        }
                    },
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "tls handshake failed"),
                    Err(_) => tracing::info!(%remote, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn peer_info(
    stream: &server::TlsStream<TcpStream>,
    remote: SocketAddr,
    td: &TrustDomain,
) -> Result<PeerInfo, String> {
    let (_, conn) = stream.get_ref();
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Ok(PeerInfo { remote: Some(remote), identity: None, cert: None });
    };
    let cert = CertInfo::from_der(leaf).map_err(|e| e.to_string())?;
    let identity = cert.identity(td).map_err(|e| e.to_string())?;
    Ok(PeerInfo { remote: Some(remote), identity: Some(identity), cert: Some(cert) })
}

/// Dial options for [`connect`].
#[derive(Clone, Debug)]
pub struct DialOptions {
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval; a peer that does not answer within `keepalive_timeout` is dead.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// The name checked against the controller's certificate; defaults to the address's host.
    pub server_name: Option<String>,
}

impl Default for DialOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            server_name: None,
        }
    }
}

/// Opens a mutual-TLS gRPC channel to the controller at `addr` (`HOST:PORT`).
pub async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    opts: &DialOptions,
) -> Result<Channel, Error> {
    let (host, _port) = addr.rsplit_once(':').ok_or_else(|| Error::BadAddress(addr.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = opts.server_name.clone().unwrap_or_else(|| host.to_owned());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| Error::BadServerName(name))?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| Error::BadAddress(addr.to_owned()))?
        .connect_timeout(opts.connect_timeout)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connector = TlsConnector::from(tls);
    let target = addr.to_owned();
    let dial = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls: client::TlsStream<TcpStream> = connector.connect(server_name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(dial)
        .await
        .map_err(|source| Error::Connect { addr: addr.to_owned(), source })
}

/// Completes on SIGINT or SIGTERM: what both binaries wait on before draining.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Formats an error with its whole source chain, since tonic's transport errors say little
/// at the top level ("transport error") and the cause is underneath.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(IpAddr::V4([0, 0, 0, 0].into()));
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap_or(IpAddr::V4([0, 0, 0, 0].into()));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::V4([0, 0, 0, 0].into()));
        assert_eq!(network_of(a), network_of(b));
        assert_ne!(network_of(a), network_of(c));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap_or(IpAddr::V4([0, 0, 0, 0].into()));
        assert_eq!(network_of(mapped), IpAddr::V4([127, 0, 0, 2].into()));
        let v4 = IpAddr::V4([127, 0, 0, 3].into());
        assert_eq!(network_of(v4), v4);
    }
}
