//! Fetching bundles from the controller into the download cache: chunked, resumable after a
//! dropped connection, digest-checked before use, with a bound on concurrent downloads.
//!
//! The controller is not trusted with sizes: a download is capped by a configured maximum, and
//! as soon as the bundle's header has arrived its signatures are checked and the download is
//! held to the exact size the signed manifest gives. An unsigned or untrusted header ends the
//! download at once, and only one download per digest runs at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, PoisonError, Weak};
use std::time::Duration;

use convoy_bundle::TrustStore;
use convoy_proto::v1 as pb;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Semaphore};
use tonic::transport::Channel;
use tonic::Code;

use crate::{Backoff, Error, Result};

/// How downloads retry, how often they make progress durable, and how large they may get.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Bytes between fsyncs of the partial file: what survives a crash is what resumes.
    pub sync_every: u64,
    /// The largest bundle accepted, whatever the controller announces.
    pub max_bundle_size: u64,
    /// The largest signed manifest a bundle header may carry.
    pub max_manifest_bytes: u64,
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
            max_bundle_size: 4 << 30,
            max_manifest_bytes: convoy_bundle::Limits::default().max_manifest_bytes,
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

/// The download cache and its concurrency bound. Cheap to clone; clones share the bound and the
/// per-digest locks, so every download into one cache must go through clones of one downloader.
#[derive(Clone)]
pub struct Downloader {
    cache: PathBuf,
    permits: Arc<Semaphore>,
    opts: DownloadOptions,
    trust: TrustStore,
    in_flight: Arc<StdMutex<HashMap<String, Weak<Mutex<()>>>>>,
}

/// The most header bytes worth buffering: magic and version, manifest length, the largest
/// manifest accepted, signature count, and the bundle format's 16 signatures of 72 bytes.
fn header_cap(max_manifest: u64) -> u64 {
    8 + 4 + max_manifest + 2 + 16 * 72
}

fn check_digest(digest: &str) -> Result<()> {
    convoy_bundle::check_digest(digest).map_err(|e| Error::Invalid { what: "digest", message: e.to_string() })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

impl Downloader {
    /// A downloader into `cache`, running at most `max_concurrent` downloads at once and
    /// accepting only bundles whose header `trust` verifies.
    pub fn new(
        cache: impl Into<PathBuf>,
        max_concurrent: usize,
        opts: DownloadOptions,
        trust: TrustStore,
    ) -> Self {
        Self {
            cache: cache.into(),
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            opts,
            trust,
            in_flight: Arc::default(),
        }
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
                    if let Err(err) = std::fs::remove_file(e.path()) {
                        tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale partial download");
                    }
                }
            }
        }
    }

    /// The lock that serialises downloads of one digest.
    fn digest_lock(&self, digest: &str) -> Arc<Mutex<()>> {
        let mut map = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, lock| lock.strong_count() > 0);
        if let Some(lock) = map.get(digest).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(Mutex::new(()));
        map.insert(digest.to_owned(), Arc::downgrade(&lock));
        lock
    }

    async fn cached_async(&self, digest: &str) -> Result<Option<PathBuf>> {
        let p = self.cache.join(format!("{digest}.bundle"));
        let exists = tokio::fs::try_exists(&p).await.map_err(io(&p))?;
        Ok(exists.then_some(p))
    }

    /// Downloads the bundle with `digest`, resuming a partial file if one exists. A second
    /// caller for the same digest waits for the first and then gets the cached bundle.
    ///
    /// Refused for good: an announced or received size over
    /// [`DownloadOptions::max_bundle_size`], a header that is not a bundle or is not signed by
    /// the trust store, more bytes than the controller announced or than the signed size, and a
    /// digest mismatch. Transient network errors are retried, each attempt resuming where the
    /// last one stopped.
    ///
    /// A fetch that fails, for good or because its attempts ran out, removes its partial file:
    /// a controller could otherwise fill the disk by cutting many downloads short just before
    /// their end. Before a download starts, partial files no fetch is working on are removed
    /// too, so at most one per running download exists. Only a crash leaves a partial file
    /// behind for the next fetch of that digest to resume.
    pub async fn fetch(&self, channel: Channel, digest: &str) -> Result<Downloaded> {
        check_digest(digest)?;
        if let Some(path) = self.cached_async(digest).await? {
            return Ok(Downloaded { path, attempts: 0, offsets: vec![], received: 0 });
        }
        let lock = self.digest_lock(digest);
        let _one_at_a_time = lock.lock().await;
        if let Some(path) = self.cached_async(digest).await? {
            return Ok(Downloaded { path, attempts: 0, offsets: vec![], received: 0 });
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Invalid { what: "downloader", message: "closed".into() })?;
        tokio::fs::create_dir_all(&self.cache).await.map_err(io(&self.cache))?;
        self.remove_unheld_partials(digest).await;
        let partial = self.cache.join(format!("{digest}.partial"));
        match self.download(channel, digest, &partial).await {
            Ok(done) => Ok(done),
            Err(Failure::Keep(e) | Failure::Discard(e)) => {
                match tokio::fs::remove_file(&partial).await {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        tracing::warn!(path = %partial.display(), error = %err, "cannot remove a failed download")
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes the partial files of every digest but `own` whose fetch is not running: left by a
    /// fetch that was cancelled, or by a crash. The digest's lock is held while its file is
    /// removed, so a fetch of it cannot start meanwhile; a locked digest is being fetched, or
    /// is waiting to be, and keeps its file.
    async fn remove_unheld_partials(&self, own: &str) {
        let mut entries = match tokio::fs::read_dir(&self.cache).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(path = %self.cache.display(), error = %e, "cannot list the download cache");
                return;
            }
        };
        loop {
            let entry = match entries.next_entry().await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(path = %self.cache.display(), error = %e, "cannot list the download cache");
                    break;
                }
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = name.strip_suffix(".partial") else { continue };
            if digest == own {
                continue;
            }
            let lock = self.digest_lock(digest);
            let Ok(_unheld) = lock.try_lock() else { continue };
            let path = entry.path();
            match tokio::fs::remove_file(&path).await {
                Ok(()) => tracing::info!(path = %path.display(), "removed a partial download no fetch holds"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale partial download")
                }
            }
        }
    }

    async fn download(&self, channel: Channel, digest: &str, partial: &Path) -> Result<Downloaded, Failure> {
        let mut client =
            pb::agent_service_client::AgentServiceClient::new(channel).max_decoding_message_size(8 << 20);
        let mut backoff = Backoff::new(self.opts.retry_base, self.opts.retry_max);
        let mut progress = Progress::resume(partial, self, digest).await?;
        loop {
            let attempt = progress.offsets.len() as u32 + 1;
            match self.attempt(&mut client, digest, partial, &mut progress).await {
                Ok(()) => break,
                Err(Failure::Keep(Error::Refused(status)))
                    if retryable(status.code()) && attempt < self.opts.max_attempts =>
                {
                    let delay = backoff.next_delay();
                    tracing::warn!(%digest, attempt, error = %status.message(), delay_ms = delay.as_millis() as u64, "download interrupted, will resume");
                    tokio::time::sleep(delay).await;
                }
                // A non-retryable refusal (unknown digest, permission) and transient errors that
                // ran out of attempts both end the fetch, which then removes the partial file.
                Err(e) => return Err(e),
            }
        }
        let path = partial.to_path_buf();
        let actual = tokio::task::spawn_blocking(move || convoy_bundle::sha256_file(&path))
            .await
            .map_err(|e| Failure::Keep(Error::Invalid { what: "digest task", message: e.to_string() }))?
            .map_err(|e| Failure::Discard(Error::Invalid { what: "download", message: e.to_string() }))?;
        if actual != digest {
            return Err(Failure::Discard(Error::Invalid {
                what: "download",
                message: format!("downloaded bundle has sha256 {actual}, expected {digest}; discarded"),
            }));
        }
        let done = self.cache.join(format!("{digest}.bundle"));
        tokio::fs::rename(partial, &done).await.map_err(|e| Failure::Keep(io(&done)(e)))?;
        convoy_base::files::sync_dir(&self.cache).map_err(|e| Failure::Keep(e.into()))?;
        let Progress { offsets, received, .. } = progress;
        tracing::info!(%digest, attempts = offsets.len(), received, "download complete");
        Ok(Downloaded { path: done, attempts: offsets.len() as u32, offsets, received })
    }

    async fn attempt(
        &self,
        client: &mut pb::agent_service_client::AgentServiceClient<Channel>,
        digest: &str,
        partial: &Path,
        progress: &mut Progress,
    ) -> Result<(), Failure> {
        let keep = |e: Error| Failure::Keep(e);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .await
            .map_err(|e| keep(io(partial)(e)))?;
        let mut offset = file.metadata().await.map_err(|e| keep(io(partial)(e)))?.len();
        progress.offsets.push(offset);
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut stream = client
            .download(pb::DownloadRequest { digest: digest.to_owned(), offset })
            .await
            .map_err(|s| keep(Error::Refused(s)))?
            .into_inner();
        let mut unsynced = 0u64;
        let result = async {
            while let Some(chunk) = stream.message().await.map_err(|s| keep(Error::Refused(s)))? {
                if chunk.offset != offset {
                    return Err(keep(Error::Refused(tonic::Status::data_loss(format!(
                        "chunk at offset {} but {offset} expected",
                        chunk.offset
                    )))));
                }
                let end = offset.saturating_add(chunk.data.len() as u64);
                self.check_sizes(digest, chunk.total_size, end, progress.signed_size)?;
                // Checked before writing: refused bytes never reach the disk.
                w.write_all(&chunk.data).await.map_err(|e| keep(io(partial)(e)))?;
                progress.absorb(&chunk.data, self, digest)?;
                if let Some(signed) = progress.signed_size {
                    self.check_sizes(digest, chunk.total_size, end, Some(signed))?;
                }
                offset = end;
                progress.received += chunk.data.len() as u64;
                unsynced += chunk.data.len() as u64;
                if unsynced >= self.opts.sync_every {
                    w.flush().await.map_err(|e| keep(io(partial)(e)))?;
                    w.get_ref().sync_data().await.map_err(|e| keep(io(partial)(e)))?;
                    unsynced = 0;
                }
                #[cfg(feature = "failpoints")]
                if self.opts.failpoint.as_deref() == Some("download:mid") {
                    w.flush().await.map_err(|e| keep(io(partial)(e)))?;
                    w.get_ref().sync_data().await.map_err(|e| keep(io(partial)(e)))?;
                    tracing::error!(failpoint = "download:mid", "failpoint reached: aborting");
                    std::process::abort();
                }
            }
            match progress.signed_size {
                Some(size) if offset == size => Ok(()),
                // The stream ended early: resume from here.
                Some(size) => Err(keep(Error::Refused(tonic::Status::data_loss(format!(
                    "the stream ended at {offset} of {size} bytes"
                ))))),
                None => Err(Failure::Discard(Error::Download {
                    digest: digest.to_owned(),
                    message: format!("the controller sent {offset} bytes, not even a complete bundle header"),
                })),
            }
        }
        .await;
        // Whatever arrived is kept and made durable: the next attempt resumes after it.
        w.flush().await.map_err(|e| keep(io(partial)(e)))?;
        w.get_ref().sync_data().await.map_err(|e| keep(io(partial)(e)))?;
        result
    }

    /// Refuses sizes over the configured maximum, past what the controller announced, or
    /// different from the signed bundle size once that is known.
    fn check_sizes(
        &self,
        digest: &str,
        announced: u64,
        end: u64,
        signed: Option<u64>,
    ) -> Result<(), Failure> {
        let max = self.opts.max_bundle_size;
        if announced > max || end > max {
            return Err(Failure::Discard(Error::BundleTooLarge {
                digest: digest.to_owned(),
                size: announced.max(end),
                max,
            }));
        }
        let refuse =
            |message: String| Failure::Discard(Error::Download { digest: digest.to_owned(), message });
        if end > announced {
            return Err(refuse(format!("the controller sent {end} bytes but announced {announced}")));
        }
        if let Some(signed) = signed {
            if end > signed {
                return Err(refuse(format!(
                    "received {end} bytes, more than the signed bundle size {signed}"
                )));
            }
            if announced != signed {
                return Err(refuse(format!(
                    "the controller announces {announced} bytes but the signed bundle is {signed} bytes"
                )));
            }
        }
        Ok(())
    }

    /// Checks a bundle header prefix: `None` while it is incomplete, then the exact bundle size
    /// its verified manifest gives. Anything but a bundle header signed by trusted keys is
    /// refused.
    fn signed_size(&self, head: &[u8], digest: &str) -> Result<Option<u64>, Failure> {
        let refuse =
            |message: String| Failure::Discard(Error::Download { digest: digest.to_owned(), message });
        // Cheap completeness check first, so a large manifest arriving in many chunks is not
        // re-parsed for every one of them.
        // An oversized manifest length falls through, for `read_header` to refuse.
        if head.len() >= 12 {
            let len = u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]));
            if len <= self.opts.max_manifest_bytes && (head.len() as u64) < 12 + len + 2 {
                return Ok(None);
            }
        }
        let header = match convoy_bundle::read_header(&mut &head[..], self.opts.max_manifest_bytes) {
            Ok(h) => h,
            Err(convoy_bundle::Error::Truncated(_)) => return Ok(None),
            Err(e) => return Err(refuse(format!("not a valid bundle: {e}"))),
        };
        let verified = convoy_bundle::verify_header(&header, &self.trust)
            .map_err(|e| refuse(format!("the bundle header is not accepted: {e}")))?;
        let size = header
            .payload_offset
            .checked_add(verified.manifest.payload.size)
            .ok_or_else(|| refuse("the signed bundle size overflows".into()))?;
        if size > self.opts.max_bundle_size {
            return Err(Failure::Discard(Error::BundleTooLarge {
                digest: digest.to_owned(),
                size,
                max: self.opts.max_bundle_size,
            }));
        }
        Ok(Some(size))
    }
}

/// How an attempt failed: whether its partial file is still good for the next attempt of the
/// same fetch. When the fetch itself fails, the file is removed either way.
enum Failure {
    Keep(Error),
    Discard(Error),
}

/// What a download has established so far.
struct Progress {
    offsets: Vec<u64>,
    received: u64,
    /// The start of the file, kept until the header in it has been verified.
    head: Vec<u8>,
    /// The exact bundle size, once the signed header has been verified.
    signed_size: Option<u64>,
}

impl Progress {
    /// Picks up a partial file left by an earlier fetch: its header, if complete, must verify
    /// and the file must not exceed the signed size.
    async fn resume(partial: &Path, d: &Downloader, digest: &str) -> Result<Self, Failure> {
        let cap = header_cap(d.opts.max_manifest_bytes);
        let path = partial.to_path_buf();
        let head = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
            use std::io::Read;
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
                Err(e) => return Err(e),
            };
            let len = f.metadata()?.len();
            let mut head = Vec::new();
            f.take(cap).read_to_end(&mut head)?;
            Ok((head, len))
        })
        .await
        .map_err(|e| Failure::Keep(Error::Invalid { what: "download task", message: e.to_string() }))?;
        let (head, len) = head.map_err(|e| Failure::Discard(io(partial)(e)))?;
        let mut progress = Self { offsets: Vec::new(), received: 0, head, signed_size: None };
        if len > 0 {
            progress.signed_size = d.signed_size(&progress.head, digest)?;
            let limit = progress.signed_size.unwrap_or(d.opts.max_bundle_size);
            if len > limit {
                return Err(Failure::Discard(Error::Download {
                    digest: digest.to_owned(),
                    message: format!(
                        "the partial download holds {len} bytes, more than the bundle's {limit}"
                    ),
                }));
            }
            if progress.signed_size.is_some() {
                progress.head = Vec::new();
            }
        }
        Ok(progress)
    }

    /// Takes in newly written bytes; verifies the header as soon as it is complete.
    fn absorb(&mut self, data: &[u8], d: &Downloader, digest: &str) -> Result<(), Failure> {
        if self.signed_size.is_some() {
            return Ok(());
        }
        let cap = usize::try_from(header_cap(d.opts.max_manifest_bytes)).unwrap_or(usize::MAX);
        let take = cap.saturating_sub(self.head.len()).min(data.len());
        self.head.extend_from_slice(&data[..take]);
        self.signed_size = d.signed_size(&self.head, digest)?;
        if self.signed_size.is_some() {
            // The header is verified; its bytes are on disk and no longer needed here.
            self.head = Vec::new();
        }
        Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
