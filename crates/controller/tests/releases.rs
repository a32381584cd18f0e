//! Releases on the controller: push, dedupe, immutability, listing, removal, and agents'
//! resumable downloads through a connection that gets cut.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{agent_identity, dial, eventually};
use convoy_bundle::{BuildOptions, SecretKey};
use convoy_proto::v1 as pb;
use convoy_testkit::{LocalAgent, LocalController, LocalOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn build_release(dir: &Path, key: &SecretKey, version: &str, payload: &[u8]) -> PathBuf {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("convoy.toml"), "").unwrap();
    std::fs::write(src.join("data.bin"), payload).unwrap();
    let out = dir.join(format!("shop-api-{version}.bundle"));
    let opts = BuildOptions {
        app: "shop-api".into(),
        version: version.into(),
        created_at: 0,
        target: None,
        zstd_level: 1,
    };
    convoy_bundle::build(&src, &opts, key, &out).unwrap();
    out
}

async fn push(ctl: &LocalController, path: &Path) -> Result<pb::PushReleaseResponse, tonic::Status> {
    let bytes = std::fs::read(path).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        for c in bytes.chunks(100_000) {
            let _ = tx.send(pb::PushChunk { data: c.to_vec() }).await;
        }
    });
    ctl.admin().await.unwrap().push_release(ReceiverStream::new(rx)).await.map(|r| r.into_inner())
}

async fn releases(ctl: &LocalController) -> Vec<pb::ReleaseInfo> {
    ctl.admin()
        .await
        .unwrap()
        .list_releases(pb::ListReleasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .releases
}

fn incoming_is_empty(ctl: &LocalController) -> bool {
    std::fs::read_dir(ctl.config.blob_dir.join("incoming")).unwrap().next().is_none()
}

#[tokio::test]
async fn push_stores_dedupes_and_keeps_releases_immutable() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    let v1 = build_release(tmp.path(), &key, "1.0.0", b"one");
    let first = push(&ctl, &v1).await.unwrap();
    assert!(!first.already_present);
    let info = first.release.unwrap();
    assert_eq!((info.app.as_str(), info.version.as_str()), ("shop-api", "1.0.0"));
    assert!(ctl.config.blob_dir.join("sha256").join(&info.digest).exists());
    assert_eq!(info.signers, vec![key.public().id().to_string()]);

    // The same bundle again is de-duplicated.
    let again = push(&ctl, &v1).await.unwrap();
    assert!(again.already_present);
    // A different bundle claiming the same app@version is refused.
    let other_dir = tmp.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let impostor = build_release(&other_dir, &key, "1.0.0", b"something else");
    let status = push(&ctl, &impostor).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("already exists with a different bundle"), "{}", status.message());

    // Garbage and truncated bundles are refused with the bundle's own error, nothing kept.
    let garbage = tmp.path().join("garbage.bundle");
    std::fs::write(&garbage, b"not a bundle at all").unwrap();
    let status = push(&ctl, &garbage).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("bad magic"), "{}", status.message());
    let bytes = std::fs::read(&v1).unwrap();
    let cut = tmp.path().join("cut.bundle");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let status = push(&ctl, &cut).await.unwrap_err();
    assert!(status.message().contains("payload size mismatch"), "{}", status.message());
    assert!(incoming_is_empty(&ctl));

    let v2 = build_release(tmp.path(), &key, "1.2.0", b"two");
    push(&ctl, &v2).await.unwrap();
    let v10 = build_release(tmp.path(), &key, "1.10.0", b"ten");
    push(&ctl, &v10).await.unwrap();
    let versions: Vec<_> = releases(&ctl).await.into_iter().map(|r| r.version).collect();
    assert_eq!(versions, ["1.0.0", "1.2.0", "1.10.0"], "sorted by semantic version");

    // Everything survives a restart.
    let addr = ctl.grpc_addr;
    ctl.stop().await.unwrap();
    let ctl = LocalController::start(
        &tmp.path().join("ctl"),
        LocalOptions { grpc_addr: Some(addr), ..Default::default() },
    )
    .await
    .unwrap();
    assert_eq!(releases(&ctl).await.len(), 3);
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn remove_refuses_releases_agents_keep() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    let info = push(&ctl, &build_release(tmp.path(), &key, "1.0.0", b"one")).await.unwrap().release.unwrap();
    // An agent that has 1.0.0 on disk (as the agent layout records it) reports it.
    let agent_dir = tmp.path().join("a1");
    ctl.enroll(&agent_dir, "a1", "eu-west").await.unwrap();
    std::fs::create_dir_all(agent_dir.join("apps/shop-api/releases/1.0.0")).unwrap();
    let mut agent = LocalAgent::spawn(&agent_dir).unwrap();
    agent.wait_for(Duration::from_secs(20), |s| s.connected).await.unwrap();
    let mut admin = ctl.admin().await.unwrap();
    let status = admin
        .remove_release(pb::RemoveReleaseRequest { app: "shop-api".into(), version: "1.0.0".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("a1"), "{}", status.message());
    assert_eq!(releases(&ctl).await.len(), 1);

    // Once the agent no longer keeps it, removal works and the blob goes.
    std::fs::remove_dir_all(agent_dir.join("apps")).unwrap();
    eventually(Duration::from_secs(20), "agent reports no releases", || async {
        let list = common::agents(&ctl).await;
        list[0].releases.is_empty().then_some(())
    })
    .await;
    admin
        .remove_release(pb::RemoveReleaseRequest { app: "shop-api".into(), version: "1.0.0".into() })
        .await
        .unwrap();
    assert!(releases(&ctl).await.is_empty());
    assert!(!ctl.config.blob_dir.join("sha256").join(&info.digest).exists());
    let status = admin
        .remove_release(pb::RemoveReleaseRequest { app: "shop-api".into(), version: "1.0.0".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    agent.stop().await.unwrap();
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn controller_with_release_keys_refuses_untrusted_bundles_at_push() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let trusted = SecretKey::generate();
    let stranger = SecretKey::generate();
    // Initialise, then point the config at a trusted key.
    LocalController::start(&dir, LocalOptions::default()).await.unwrap().stop().await.unwrap();
    std::fs::write(dir.join("release.pub"), trusted.public().to_text()).unwrap();
    let cfg = std::fs::read_to_string(dir.join("convoy.toml")).unwrap();
    std::fs::write(dir.join("convoy.toml"), format!("release_trust = [\"release.pub\"]\n{cfg}")).unwrap();
    let ctl = LocalController::start(&dir, LocalOptions::default()).await.unwrap();
    let status = push(&ctl, &build_release(tmp.path(), &stranger, "1.0.0", b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("valid signature"), "{}", status.message());
    assert!(releases(&ctl).await.is_empty());
    let other = tmp.path().join("o");
    std::fs::create_dir_all(&other).unwrap();
    push(&ctl, &build_release(&other, &trusted, "1.0.0", b"x")).await.unwrap();
    ctl.stop().await.unwrap();
}

/// A TCP relay that cuts the first connection after `cut_after` bytes flowed to the client.
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    cut_after: usize,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { continue };
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut sent = 0usize;
                    loop {
                        let k = sr.read(&mut buf).await?;
                        if k == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        cw.write_all(&buf[..k]).await?;
                        sent += k;
                        if n == 0 && sent >= cut_after {
                            return Ok(());
                        }
                    }
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn download_resumes_after_the_connection_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    // Incompressible content, so the bundle is large enough to take many chunks.
    let payload: Vec<u8> = (0..6_000_000u32).map(|_| rand::random::<u8>()).collect();
    let info =
        push(&ctl, &build_release(tmp.path(), &key, "1.0.0", &payload)).await.unwrap().release.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();

    let (proxy, connections) = cutting_proxy(ctl.grpc_addr, 2_000_000).await;
    let channel =
        dial(&proxy.to_string(), &ctl.ca_pem().unwrap(), Some(&agent_identity(&tmp.path().join("a1"))))
            .await
            .unwrap();
    let opts = convoy_agent::DownloadOptions { retry_base: Duration::from_millis(20), ..Default::default() };
    let key_trust = convoy_bundle::TrustStore::new(vec![key.public()], 1);
    let downloader = convoy_agent::Downloader::new(tmp.path().join("a1/cache"), 2, opts, key_trust.clone());
    let done = downloader.fetch(channel.clone(), &info.digest).await.unwrap();
    assert!(connections.load(Ordering::SeqCst) >= 2, "the first connection was cut");
    assert!(done.attempts >= 2, "{done:?}");
    assert_eq!(done.offsets[0], 0);
    assert!(done.offsets[1] > 0, "the second request resumed instead of restarting: {done:?}");
    assert!(done.received < info.size + info.size / 2, "resumed, not re-downloaded: {done:?}");
    let bytes = std::fs::read(&done.path).unwrap();
    assert_eq!(bytes.len() as u64, info.size);
    convoy_bundle::verify(&done.path, Some(&key_trust), &convoy_bundle::Limits::default()).unwrap();
    assert!(!tmp.path().join("a1/cache").join(format!("{}.partial", info.digest)).exists());
    // Cached: a second fetch makes no request.
    assert_eq!(downloader.fetch(channel.clone(), &info.digest).await.unwrap().attempts, 0);
    // Unknown digests and malformed ones fail fast with clear errors.
    let err = downloader.fetch(channel.clone(), &"0".repeat(64)).await.unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
    let err = downloader.fetch(channel, "../../etc/passwd").await.unwrap_err().to_string();
    assert!(err.contains("not a SHA-256 digest"), "{err}");
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn admins_cannot_download_and_agents_cannot_push() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let as_agent = dial(
        &ctl.grpc_addr.to_string(),
        &ctl.ca_pem().unwrap(),
        Some(&agent_identity(&tmp.path().join("a1"))),
    )
    .await
    .unwrap();
    let status = pb::admin_service_client::AdminServiceClient::new(as_agent)
        .push_release(tokio_stream::iter(vec![pb::PushChunk { data: b"x".to_vec() }]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let anon = dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), None).await.unwrap();
    let status = pb::agent_service_client::AgentServiceClient::new(anon)
        .download(pb::DownloadRequest { digest: "0".repeat(64), offset: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    ctl.stop().await.unwrap();
}

/// An internal failure reaches the client as a generic message with an id, never a path.
#[tokio::test]
async fn internal_errors_do_not_leak_controller_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    let bundle = build_release(tmp.path(), &key, "1.0.0", b"payload");
    let info = push(&ctl, &bundle).await.unwrap().release.unwrap();
    // Sabotage the stored blob: a directory where the file was, so reading it fails.
    let blob = ctl.controller.releases().blob_path(&info.digest).unwrap();
    std::fs::remove_file(&blob).unwrap();
    std::fs::create_dir(&blob).unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = agent_identity(&tmp.path().join("a1"));
    let ch = dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let status = match client.download(pb::DownloadRequest { digest: info.digest.clone(), offset: 0 }).await {
        Err(s) => s,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("a blob that cannot be read was streamed to its end"),
                    Err(s) => break s,
                }
            }
        }
    };
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().starts_with("internal error "), "{}", status.message());
    let dir = ctl.dir.display().to_string();
    assert!(!status.message().contains(&dir), "{} leaks {dir}", status.message());
    assert!(!status.message().contains("sha256"), "{}", status.message());
    ctl.stop().await.unwrap();
}
