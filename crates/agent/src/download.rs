//! Fetching bundles from the controller into the download cache: chunked, resumable after a
//! dropped connection, digest-checked before use, with a bound on concurrent downloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use convoy_proto::v1 as pb;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::Code;

use crate::{Backoff, Error, Result};

/// How downloads retry and how often they make progress durable.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Bytes between fsyncs of the partial file: what survives a crash is what resumes.
    pub sync_every: u64,
    /// Test builds only: abort once the first chunk is on disk (`download:mid`).
    pub failpoint: Option<String>,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            sync_every: 8 << 20,
            failpoint: None,
        }
    }
}

/// A finished download.
#[derive(Clone, Debug)]
pub struct Downloaded {
    pub path: PathBuf,
    /// Requests made; 0 when the bundle was already cached.
    pub attempts: u32,
    /// The offset each request started from.
    pub offsets: Vec<u64>,
    /// Bytes received over the network.
    pub received: u64,
}

/// The download cache and its concurrency bound. Cheap to clone.
#[derive(Clone)]
pub struct Downloader {
    cache: PathBuf,
    permits: Arc<Semaphore>,
    opts: DownloadOptions,
}

fn check_digest(digest: &str) -> Result<()> {
    if convoy_bundle::is_sha256_hex(digest) {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "digest",
            message: format!("{digest:?} is not a lowercase SHA-256 hex digest"),
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

impl Downloader {
    pub fn new(cache: impl Into<PathBuf>, max_concurrent: usize, opts: DownloadOptions) -> Self {
        Self { cache: cache.into(), permits: Arc::new(Semaphore::new(max_concurrent.max(1))), opts }
    }

    /// The cached, verified bundle for `digest`, if present.
    pub fn cached(&self, digest: &str) -> Option<PathBuf> {
        let p = self.cache.join(format!("{digest}.bundle"));
        p.exists().then_some(p)
    }

    /// Removes partial downloads whose bundle is no longer wanted. Called at start-up.
    pub fn clean_partials(&self, keep: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.cache) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(d) = name.strip_suffix(".partial") {
                if !keep.iter().any(|k| k == d) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Downloads the bundle with `digest`, resuming a partial file if one exists.
    pub async fn fetch(&self, channel: Channel, digest: &str) -> Result<Downloaded> {
        check_digest(digest)?;
        if let Some(path) = self.cached(digest) {
            return Ok(Downloaded { path, attempts: 0, offsets: vec![], received: 0 });
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Invalid { what: "downloader", message: "closed".into() })?;
        tokio::fs::create_dir_all(&self.cache).await.map_err(io(&self.cache))?;
        let partial = self.cache.join(format!("{digest}.partial"));
        let mut client =
            pb::agent_service_client::AgentServiceClient::new(channel).max_decoding_message_size(8 << 20);
        let mut backoff = Backoff::new(self.opts.retry_base, self.opts.retry_max);
        let mut offsets = Vec::new();
        let mut received = 0u64;
        loop {
            let attempt = offsets.len() as u32 + 1;
            match self.attempt(&mut client, digest, &partial, &mut offsets, &mut received).await {
                Ok(()) => break,
                Err(Error::Refused(status))
                    if retryable(status.code()) && attempt < self.opts.max_attempts =>
                {
                    let delay = backoff.next_delay();
                    tracing::warn!(%digest, attempt, error = %status.message(), delay_ms = delay.as_millis() as u64, "download interrupted, will resume");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        let path = partial.clone();
        let actual = tokio::task::spawn_blocking(move || convoy_bundle::sha256_file(&path))
            .await
            .map_err(|e| Error::Invalid { what: "digest task", message: e.to_string() })?
            .map_err(|e| Error::Invalid { what: "download", message: e.to_string() })?;
        if actual != digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(Error::Invalid {
                what: "download",
                message: format!("downloaded bundle has sha256 {actual}, expected {digest}; discarded"),
            });
        }
        let done = self.cache.join(format!("{digest}.bundle"));
        tokio::fs::rename(&partial, &done).await.map_err(io(&done))?;
        convoy_pki::files::sync_dir(&self.cache)?;
        tracing::info!(%digest, attempts = offsets.len(), received, "download complete");
        Ok(Downloaded { path: done, attempts: offsets.len() as u32, offsets, received })
    }

    async fn attempt(
        &self,
        client: &mut pb::agent_service_client::AgentServiceClient<Channel>,
        digest: &str,
        partial: &Path,
        offsets: &mut Vec<u64>,
        received: &mut u64,
    ) -> Result<()> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .await
            .map_err(io(partial))?;
        let mut offset = file.metadata().await.map_err(io(partial))?.len();
        offsets.push(offset);
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut stream = client
            .download(pb::DownloadRequest { digest: digest.to_owned(), offset })
            .await
            .map_err(Error::Refused)?
            .into_inner();
        let mut unsynced = 0u64;
        let result = async {
            while let Some(chunk) = stream.message().await.map_err(Error::Refused)? {
                if chunk.offset != offset {
                    return Err(Error::Refused(tonic::Status::data_loss(format!(
                        "chunk at offset {} but {offset} expected",
                        chunk.offset
                    ))));
                }
                w.write_all(&chunk.data).await.map_err(io(partial))?;
                offset += chunk.data.len() as u64;
                *received += chunk.data.len() as u64;
                unsynced += chunk.data.len() as u64;
                if unsynced >= self.opts.sync_every {
                    w.flush().await.map_err(io(partial))?;
                    w.get_ref().sync_data().await.map_err(io(partial))?;
                    unsynced = 0;
                }
                #[cfg(feature = "failpoints")]
                if self.opts.failpoint.as_deref() == Some("download:mid") {
                    w.flush().await.map_err(io(partial))?;
                    w.get_ref().sync_data().await.map_err(io(partial))?;
                    tracing::error!(failpoint = "download:mid", "failpoint reached: aborting");
                    std::process::abort();
                }
                if offset > chunk.total_size {
                    return Err(Error::Refused(tonic::Status::data_loss("more data than the bundle's size")));
                }
            }
            Ok(())
        }
        .await;
        // Whatever arrived is kept and made durable: the next attempt resumes after it.
        w.flush().await.map_err(io(partial))?;
        w.get_ref().sync_data().await.map_err(io(partial))?;
        result
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::DataLoss
    )
}
