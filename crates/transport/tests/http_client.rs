//! The one HTTP client against a real server on 127.0.0.1. One test in this binary, because it
//! sets proxy variables in the process environment.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use convoy_transport::http::{HttpClient, HttpError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every request with 200 and a body naming the request line, once per connection.
async fn server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(m) => n += m,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let body = format!("first line\n{line}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                // The client may have gone; nothing to report to.
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// A TLS server with a certificate from a fresh Convoy CA, which completes handshakes only.
async fn tls_server() -> std::net::SocketAddr {
    let td = convoy_pki::TrustDomain::new("convoy.test").unwrap();
    let (ca, _) = convoy_pki::Ca::generate(&td).unwrap();
    let (cert, key) = ca.issue_controller(&["127.0.0.1".into()]).unwrap();
    let config = convoy_pki::http_server_config(&cert.cert_pem, &key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            // The handshake fails on the client's side; its outcome here tells nothing.
            tokio::spawn(async move { drop(acceptor.accept(s).await) });
        }
    });
    addr
}

#[tokio::test]
async fn requests_ignore_proxy_variables_and_plain_clients_refuse_https() {
    // A proxy that does not exist: a client that used it would fail to connect.
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        std::env::set_var(var, "http://127.0.0.1:1");
    }
    let addr = server().await;
    let t = Duration::from_secs(5);
    for client in
        [HttpClient::plain("convoy-test").unwrap(), HttpClient::with_system_roots("convoy-test").unwrap()]
    {
        let reply = client.get(&format!("http://{addr}/x?y=1"), t).await.unwrap();
        assert!(reply.is_success(), "{reply:?}");
        assert_eq!(reply.body.lines().last(), Some("GET /x?y=1 HTTP/1.1"), "{reply:?}");
        let url = format!("http://{addr}/hook");
        let status = client.post_json(&url, "{}".into(), &[("authorization", "Bearer t")], t).await.unwrap();
        assert_eq!(status, 200);
    }
    // An HTTPS server whose certificate comes from a CA no client trusts: both refuse it at
    // the handshake, and say so with the URL.
    let tls = tls_server().await;
    for client in
        [HttpClient::plain("convoy-test").unwrap(), HttpClient::with_system_roots("convoy-test").unwrap()]
    {
        let err = client.get_status(&format!("https://{tls}/"), t).await.unwrap_err();
        assert!(matches!(err, HttpError::Request { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("GET https://{tls}/: ")), "{err}");
    }
    // Nothing listens on port 1.
    let err =
        HttpClient::plain("convoy-test").unwrap().get_status("http://127.0.0.1:1/", t).await.unwrap_err();
    assert!(err.to_string().contains("GET http://127.0.0.1:1/"), "{err}");
}
