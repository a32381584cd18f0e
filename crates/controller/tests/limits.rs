//! Resource bounds at the controller's edge: what one peer can make it hold.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use convoy_bundle::SecretKey;
use convoy_controller::local::{LocalController, LocalOptions};
use convoy_controller::logic::MAX_DOWNLOADS_PER_AGENT;
use convoy_proto::v1 as pb;
use tonic::Code;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// An agent that opens download streams and never reads them holds at most a few files open on
/// the controller: the rest are refused at once, and the controller keeps serving.
#[tokio::test]
async fn unread_download_streams_are_bounded_per_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    // A bundle much larger than HTTP/2 flow-control windows, so an unread stream really stalls
    // the controller's side (a small one would be sent whole into the client's buffers).
    let key = SecretKey::generate();
    let src = tmp.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("convoy.toml"), "").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..(3 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("data.bin"), noise).unwrap();
    let out = tmp.path().join("big.bundle");
    let opts = convoy_bundle::BuildOptions {
        app: "shop-api".into(),
        version: "1.0.0".into(),
        created_at: 0,
        target: None,
        zstd_level: 1,
    };
    convoy_bundle::build(&src, &opts, &key, &out).unwrap();
    let info = ctl.push_file(&out).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("a1"));
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let before = open_fds();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        match client.download(pb::DownloadRequest { digest: info.digest.clone(), offset: 0 }).await {
            // Opened, and deliberately never read.
            Ok(stream) => held.push(stream.into_inner()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("downloads in progress"), "{}", s.message());
                refused += 1;
            }
        }
    }
    assert_eq!(held.len(), MAX_DOWNLOADS_PER_AGENT);
    assert_eq!(refused, 200 - MAX_DOWNLOADS_PER_AGENT);
    let grown = open_fds().saturating_sub(before);
    assert!(grown <= MAX_DOWNLOADS_PER_AGENT + 4, "{grown} more file descriptors for 200 streams");
    // Dropping the streams gives the permits back.
    drop(held);
    common::eventually(Duration::from_secs(10), "permits returned", || {
        let mut client = client.clone();
        let digest = info.digest.clone();
        async move { client.download(pb::DownloadRequest { digest, offset: 0 }).await.ok().map(drop) }
    })
    .await;
    ctl.stop().await.unwrap();
}

/// An enrollment is decoded before its token is checked, so it gets a small size bound.
#[tokio::test]
async fn oversized_unauthenticated_messages_are_refused_before_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), None).await.unwrap();
    let status = pb::enrollment_client::EnrollmentClient::new(ch)
        .enroll(pb::EnrollRequest { token: "x".into(), csr_der: vec![0u8; 1 << 20], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(common::agents(&ctl).await.is_empty());
    ctl.stop().await.unwrap();
}
