use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use convoy_bundle::{BuildOptions, SecretKey};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::*;

/// How the test controller misbehaves.
#[derive(Clone, Copy)]
enum Serve {
    Honest,
    /// Sends this many bytes after the bundle, announcing only the bundle's size.
    MoreThanAnnounced(usize),
    /// Sends and announces this many bytes after the bundle.
    MoreThanSigned(usize),
    /// Sends random bytes instead of a bundle.
    Garbage(usize),
    /// Announces a huge size, then sends the bundle.
    HugeTotal,
    /// Announces the bundle's size but ends every stream one byte before its end.
    OneByteShort,
}

#[derive(Clone)]
struct Controller {
    bundle: Arc<Vec<u8>>,
    serve: Serve,
    requests: Arc<AtomicU32>,
    served: Arc<AtomicU64>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for Controller {
    type SessionStream = Stream<pb::ControllerMessage>;
    type DownloadStream = Stream<pb::DownloadChunk>;

    async fn session(
        &self,
        _: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn renew(&self, _: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let len = self.bundle.len() as u64;
        let (body, total): (Vec<u8>, u64) = match self.serve {
            Serve::Honest => (self.bundle.to_vec(), len),
            Serve::MoreThanAnnounced(n) => ([&self.bundle[..], &vec![0u8; n]].concat(), len),
            Serve::MoreThanSigned(n) => ([&self.bundle[..], &vec![0u8; n]].concat(), len + n as u64),
            Serve::Garbage(n) => ((0..n).map(|_| rand::random::<u8>()).collect(), n as u64),
            Serve::HugeTotal => (self.bundle.to_vec(), 1 << 40),
            Serve::OneByteShort => (self.bundle[..self.bundle.len() - 1].to_vec(), len),
        };
        let start = usize::try_from(req.into_inner().offset).unwrap().min(body.len());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let served = self.served.clone();
        tokio::spawn(async move {
            let mut offset = start;
            for piece in body[start..].chunks(16 << 10) {
                let chunk =
                    pb::DownloadChunk { offset: offset as u64, data: piece.to_vec(), total_size: total };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                served.fetch_add(piece.len() as u64, Ordering::SeqCst);
                offset += piece.len();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A real, signed bundle with an incompressible megabyte in it.
fn bundle(key: &SecretKey) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("convoy.toml"), "[service]\ncommand = [\"bin/run\"]\n").unwrap();
    std::fs::write(src.join("bin/run"), "#!/bin/sh\nexit 0\n").unwrap();
    let noise: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    std::fs::write(src.join("noise"), noise).unwrap();
    let opts = BuildOptions {
        app: "shop".into(),
        version: "1.0.0".into(),
        created_at: 1_700_000_000,
        target: None,
        zstd_level: 1,
    };
    let out = dir.path().join("shop.bundle");
    convoy_bundle::build(&src, &opts, key, &out).unwrap();
    std::fs::read(out).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

struct Setup {
    _dir: tempfile::TempDir,
    cache: PathBuf,
    downloader: Downloader,
    channel: Channel,
    controller: Controller,
    digest: String,
}

/// Serves `bundle` from a gRPC server on a free local port and makes a downloader that
/// trusts `trusted`. The client's HTTP/2 windows are small, so a server cannot run far
/// ahead of what the agent has accepted.
async fn setup(bundle: Vec<u8>, serve: Serve, trusted: &SecretKey) -> Setup {
    let digest = sha256(&bundle);
    let controller =
        Controller { bundle: Arc::new(bundle), serve, requests: Arc::default(), served: Arc::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = pb::agent_service_server::AgentServiceServer::new(controller.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let opts =
        DownloadOptions { max_attempts: 2, retry_base: Duration::from_millis(10), ..Default::default() };
    let downloader = Downloader::new(&cache, 2, opts, TrustStore::new(vec![trusted.public()], 1));
    Setup { _dir: dir, cache, downloader, channel, controller, digest }
}

fn leftovers(cache: &Path) -> Vec<String> {
    match std::fs::read_dir(cache) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    }
}

async fn refused(serve: Serve) -> (String, Setup) {
    let key = SecretKey::generate();
    let s = setup(bundle(&key), serve, &key).await;
    let err = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap_err().to_string();
    assert_eq!(leftovers(&s.cache), Vec::<String>::new(), "a refused download left files behind");
    (err, s)
}

#[tokio::test]
async fn concurrent_fetches_of_one_digest_make_one_download() {
    let key = SecretKey::generate();
    let bytes = bundle(&key);
    let s = setup(bytes.clone(), Serve::Honest, &key).await;
    let other = s.downloader.clone();
    let (a, b) = tokio::join!(
        s.downloader.fetch(s.channel.clone(), &s.digest),
        other.fetch(s.channel.clone(), &s.digest)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.path, b.path);
    assert_eq!(std::fs::read(&a.path).unwrap(), bytes);
    assert_eq!(s.controller.requests.load(Ordering::SeqCst), 1, "one request for one digest");
    assert_eq!(a.attempts + b.attempts, 1, "the second caller found the cached bundle");
    assert_eq!(leftovers(&s.cache), vec![format!("{}.bundle", s.digest)]);
}

#[tokio::test]
async fn more_bytes_than_announced_are_refused() {
    let (err, _s) = refused(Serve::MoreThanAnnounced(100)).await;
    assert!(err.contains("but announced"), "{err}");
}

#[tokio::test]
async fn more_bytes_than_the_signed_size_are_refused() {
    let (err, _s) = refused(Serve::MoreThanSigned(100)).await;
    assert!(err.contains("signed bundle is"), "{err}");
}

#[tokio::test]
async fn garbage_is_refused_at_the_header() {
    let key = SecretKey::generate();
    let mut s = setup(vec![], Serve::Garbage(256 << 10), &key).await;
    s.digest = "ab".repeat(32);
    let err = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap_err().to_string();
    assert!(err.contains("not a valid bundle"), "{err}");
    assert!(s.controller.served.load(Ordering::SeqCst) < 200 << 10, "the download did not stop early");
    assert_eq!(leftovers(&s.cache), Vec::<String>::new());
}

#[tokio::test]
async fn a_huge_announced_size_is_refused() {
    let (err, s) = refused(Serve::HugeTotal).await;
    assert!(err.contains("more than the 4294967296-byte limit"), "{err}");
    assert!(s.controller.served.load(Ordering::SeqCst) < 512 << 10, "the download did not stop early");
}

#[tokio::test]
async fn an_untrusted_bundle_stops_the_download_at_its_header() {
    let (signer, trusted) = (SecretKey::generate(), SecretKey::generate());
    let bytes = bundle(&signer);
    let len = bytes.len() as u64;
    let s = setup(bytes, Serve::Honest, &trusted).await;
    let err = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap_err().to_string();
    assert!(err.contains("not accepted"), "{err}");
    let served = s.controller.served.load(Ordering::SeqCst);
    assert!(served < len / 2, "{served} of {len} bytes were sent before the refusal");
    assert_eq!(leftovers(&s.cache), Vec::<String>::new());
}

#[tokio::test]
async fn a_partial_download_resumes_and_a_bad_one_is_discarded() {
    let key = SecretKey::generate();
    let bytes = bundle(&key);
    let s = setup(bytes.clone(), Serve::Honest, &key).await;
    std::fs::create_dir_all(&s.cache).unwrap();
    let partial = s.cache.join(format!("{}.partial", s.digest));
    std::fs::write(&partial, &bytes[..100_000]).unwrap();
    let done = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap();
    assert_eq!(done.offsets, vec![100_000]);
    assert_eq!(std::fs::read(&done.path).unwrap(), bytes);

    // A partial that is not the start of a trusted bundle is thrown away, not resumed.
    let s = setup(bytes.clone(), Serve::Honest, &key).await;
    std::fs::create_dir_all(&s.cache).unwrap();
    let partial = s.cache.join(format!("{}.partial", s.digest));
    std::fs::write(&partial, vec![7u8; 100_000]).unwrap();
    let err = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap_err().to_string();
    assert!(err.contains("not a valid bundle"), "{err}");
    assert_eq!(leftovers(&s.cache), Vec::<String>::new());
    assert_eq!(s.controller.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_unknown_digest_leaves_nothing_behind() {
    let key = SecretKey::generate();
    let s = setup(vec![], Serve::Honest, &key).await;
    // The test controller answers any digest with an empty stream.
    let err = s.downloader.fetch(s.channel.clone(), &"cd".repeat(32)).await.unwrap_err().to_string();
    assert!(err.contains("not even a complete bundle header"), "{err}");
    assert_eq!(leftovers(&s.cache), Vec::<String>::new());
}

fn partials(cache: &Path) -> Vec<String> {
    leftovers(cache).into_iter().filter(|n| n.ends_with(".partial")).collect()
}

#[tokio::test]
async fn downloads_cut_one_byte_short_leave_no_partial_files() {
    let key = SecretKey::generate();
    let bytes = bundle(&key);
    let s = setup(bytes.clone(), Serve::OneByteShort, &key).await;
    let err = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap_err().to_string();
    assert!(err.contains("ended at"), "{err}");
    // Every attempt but the first resumed from what the previous one received.
    assert_eq!(s.controller.requests.load(Ordering::SeqCst), 2);
    assert_eq!(partials(&s.cache), Vec::<String>::new(), "a failed download kept its partial file");

    // The test controller serves the same signed bundle for any digest, so each of these
    // fetches gets all but the last byte of a valid download, then fails.
    for i in 0..4u8 {
        let digest = hex::encode([i; 32]);
        let err = s.downloader.fetch(s.channel.clone(), &digest).await.unwrap_err().to_string();
        assert!(err.contains("ended at"), "{err}");
        assert_eq!(partials(&s.cache), Vec::<String>::new(), "partial files accumulated");
    }
}

#[tokio::test]
async fn a_new_download_removes_partials_no_fetch_holds() {
    let key = SecretKey::generate();
    let bytes = bundle(&key);
    let s = setup(bytes.clone(), Serve::Honest, &key).await;
    std::fs::create_dir_all(&s.cache).unwrap();
    let stale = s.cache.join(format!("{}.partial", "ab".repeat(32)));
    std::fs::write(&stale, &bytes[..100_000]).unwrap();
    // A digest whose lock is held stands for a fetch in progress: its file stays.
    let busy_digest = "cd".repeat(32);
    let busy = s.cache.join(format!("{busy_digest}.partial"));
    std::fs::write(&busy, &bytes[..100_000]).unwrap();
    let busy_lock = s.downloader.digest_lock(&busy_digest);
    let held = busy_lock.lock().await;

    let done = s.downloader.fetch(s.channel.clone(), &s.digest).await.unwrap();
    assert_eq!(std::fs::read(&done.path).unwrap(), bytes);
    assert!(!stale.exists(), "a partial file no fetch holds was kept");
    assert!(busy.exists(), "the partial file of a running fetch was removed");
    drop(held);
}
