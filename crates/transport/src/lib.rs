//! The one place where TLS meets gRPC.
//!
//! The controller accepts TCP connections, completes a TLS 1.3 handshake with rustls, reads the
//! verified client certificate's identity and hands the stream to tonic as [`TlsConn`], whose
//! [`PeerInfo`] every handler finds in its request extensions. Clients (agents and the admin
//! CLI) dial through [`connect`], which runs the same rustls stack on their side.
//!
//! tonic's built-in TLS is not used: it cannot express "client certificate optional at the
//! handshake, required by every RPC but enrollment", and it would hide the peer's parsed identity.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
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
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
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
            // Without TCP_NODELAY every small HTTP/2 frame waits on Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let td = td.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => match peer_info(&stream, remote, &td) {
                        Ok(peer) => {
                            let _ = tx.send(Ok(TlsConn { inner: stream, peer })).await;
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
