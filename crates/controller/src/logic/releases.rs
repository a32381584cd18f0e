//! Releases on the controller: ingesting pushed bundles, listing, removing, serving blobs.
//!
//! Bundles are stored content-addressed (`blobs/sha256/<digest>`), metadata in sled. A release
//! is immutable: a different bundle claiming an existing `app@version` is refused.

use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::core::{blocking_method, Core};
use super::{now, Error, Result};

/// Why receiving an upload failed: the client's stream, or the controller.
#[derive(Debug)]
pub enum UploadError<E> {
    Stream(E),
    Controller(Error),
}
use crate::store::ReleaseRecord;

/// Size of the chunks bundles travel in, both ways.
pub const BUNDLE_CHUNK: usize = 256 * 1024;

/// One chunk of a stored bundle on its way to an agent.
#[derive(Debug)]
pub struct BlobChunk {
    pub offset: u64,
    pub data: Vec<u8>,
    /// The whole bundle's size.
    pub total: u64,
}

/// A pushed bundle being received: a file under `incoming/`, removed when dropped unless
/// [`Releases::ingest`] took it.
#[derive(Debug)]
pub struct Upload {
    path: PathBuf,
    size: u64,
}

impl Upload {
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Runs wherever the upload is dropped; a small unlink, never waited on. After a stored
        // upload was renamed into place, there is nothing left to remove.
        remove_quietly(&self.path);
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

/// Checks that a digest is 64 lowercase hex characters, so it is safe as a file name.
pub fn check_digest(digest: &str) -> Result<()> {
    convoy_bundle::check_digest(digest).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// Removes a file whose removal is tidying up, not the point: a failure is logged, a file
/// already gone is fine.
fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a file");
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    convoy_base::files::sync_dir(dir).map_err(|e| Error::Internal(e.to_string()))
}

/// Download streams one agent may have open at once (an agent downloads at most two at a time).
pub const MAX_DOWNLOADS_PER_AGENT: usize = 4;

/// Release bundles: upload and ingest, the release list, and streaming bundles to agents.
/// Cheap to clone.
#[derive(Clone)]
pub struct Releases {
    core: Core,
    /// Download streams in progress per agent: each holds an open file and buffers, and an agent
    /// that opens streams without reading them must not exhaust the controller.
    downloads: Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl Releases {
    pub(crate) fn new(core: Core) -> Self {
        Self { core, downloads: Default::default() }
    }

    blocking_method!();

    /// A permit for one download stream of `agent_id`, or `Busy` when it already has
    /// [`MAX_DOWNLOADS_PER_AGENT`] in progress.
    pub fn download_permit(&self, agent_id: &str) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent_id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_DOWNLOADS_PER_AGENT)))
            .clone();
        sem.try_acquire_owned().map_err(|_| {
            Error::Busy(format!(
                "agent {agent_id} already has {MAX_DOWNLOADS_PER_AGENT} downloads in progress; finish or cancel one first"
            ))
        })
    }

    fn blob_root(&self) -> &Path {
        &self.core.settings.blob_dir
    }

    /// Creates the blob directories and removes uploads a crash left half-written.
    pub fn prepare_blob_dir(&self) -> Result<()> {
        let root = self.blob_root();
        for d in [root.join("sha256"), root.join("incoming")] {
            std::fs::create_dir_all(&d).map_err(|e| io_err(&d, e))?;
        }
        let incoming = root.join("incoming");
        for entry in std::fs::read_dir(&incoming).map_err(|e| io_err(&incoming, e))?.flatten() {
            remove_quietly(&entry.path());
        }
        Ok(())
    }

    /// Where a push writes before the bundle is checked.
    fn incoming_path(&self) -> PathBuf {
        self.blob_root().join("incoming").join(format!("{}.upload", hex::encode(rand::random::<[u8; 8]>())))
    }

    /// Receives a pushed bundle's chunks into a new file under `incoming/`, refusing more than
    /// the size limit, and makes it durable.
    pub async fn receive_upload<E>(
        &self,
        mut chunks: impl tokio_stream::Stream<Item = std::result::Result<Vec<u8>, E>> + Unpin,
    ) -> std::result::Result<Upload, UploadError<E>> {
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        let path = self.incoming_path();
        let max = self.max_bundle_bytes();
        let io = |e: std::io::Error| UploadError::Controller(Error::Internal(format!("upload: {e}")));
        let file = tokio::fs::File::create(&path).await.map_err(io)?;
        // From here on, dropping the upload removes the file.
        let mut upload = Upload { path, size: 0 };
        let mut w = tokio::io::BufWriter::with_capacity(BUNDLE_CHUNK, file);
        while let Some(chunk) = chunks.next().await.transpose().map_err(UploadError::Stream)? {
            upload.size += chunk.len() as u64;
            if upload.size > max {
                return Err(UploadError::Controller(Error::TooLarge(format!(
                    "bundle is larger than the {max}-byte limit"
                ))));
            }
            w.write_all(&chunk).await.map_err(io)?;
        }
        w.flush().await.map_err(io)?;
        w.get_ref().sync_all().await.map_err(io)?;
        Ok(upload)
    }

    /// Streams the stored bundle with `digest` from `offset`, read on a task of its own through
    /// a small channel, so an agent that reads slowly holds one file and a few chunks.
    pub async fn stream_blob(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<BlobChunk>>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.blob_path(digest)?;
        let io = |e: std::io::Error| Error::Internal(format!("bundle {}: {e}", path.display()));
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let total = file.metadata().await.map_err(io)?.len();
        if offset > total {
            return Err(Error::OutOfRange(format!("offset {offset} is past the bundle's {total} bytes")));
        }
        file.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let ctl = self.clone();
        tokio::spawn(async move {
            let mut offset = offset;
            let mut buf = vec![0u8; BUNDLE_CHUNK];
            while offset < total {
                let n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let e = Error::Internal(format!("reading bundle {}: {e}", path.display()));
                        // The agent may be gone already; then nobody is left to tell.
                        if tx.send(Err(e)).await.is_err() {
                            tracing::debug!("download ended by the agent");
                        }
                        return;
                    }
                };
                let chunk = BlobChunk { offset, data: buf[..n].to_vec(), total };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                ctl.core.metrics().bytes_served(n as u64);
                offset += n as u64;
            }
        });
        Ok(rx)
    }

    pub fn max_bundle_bytes(&self) -> u64 {
        self.core.settings.max_bundle_bytes
    }

    /// The stored bundle with this digest.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        check_digest(digest)?;
        let p = self.blob_root().join("sha256").join(digest);
        if p.exists() {
            Ok(p)
        } else {
            Err(Error::UnknownRelease(format!("with digest {digest}")))
        }
    }

    /// Checks an uploaded bundle and stores it. Returns the record and whether it was already
    /// present. The upload is consumed either way (moved into the store, or removed).
    pub async fn ingest(&self, upload: Upload, pushed_by: String) -> Result<(ReleaseRecord, bool)> {
        self.blocking(move |c| {
            let result = c.ingest_blocking(&upload.path, pushed_by);
            drop(upload);
            result
        })
        .await
    }

    fn ingest_blocking(&self, upload: &Path, pushed_by: String) -> Result<(ReleaseRecord, bool)> {
        // One pass: structure, signatures (when configured), digests and the bundle's own hash.
        let verified = convoy_bundle::verify(
            upload,
            self.core.settings.release_trust.as_ref(),
            &convoy_bundle::Limits::default(),
        )?;
        let m = &verified.manifest;
        let digest = verified.bundle_sha256.clone();
        let size = std::fs::metadata(upload).map_err(|e| io_err(upload, e))?.len();
        let record = ReleaseRecord {
            app: m.app.clone(),
            version: m.version.clone(),
            digest: digest.clone(),
            size,
            created_at: m.created_at,
            pushed_at: now(),
            pushed_by,
            signers: verified.signed_by.iter().map(ToString::to_string).collect(),
            unpacked_size: m.unpacked_size,
            files: m.files.len() as u32,
        };
        if let Some(existing) = self.core.store.release(&m.app, &m.version)? {
            return if existing.digest == digest {
                Ok((existing, true))
            } else {
                Err(Error::Conflict(format!(
                    "release {} already exists with a different bundle (sha256 {}); releases are immutable: push a new version",
                    m.release_name(),
                    existing.digest
                )))
            };
        }
        let blob = self.blob_root().join("sha256").join(&digest);
        std::fs::rename(upload, &blob).map_err(|e| io_err(&blob, e))?;
        sync_dir(&self.blob_root().join("sha256"))?;
        if let Some(existing) = self.core.store.insert_release(&record)? {
            // Lost a race with an identical push of a different bundle; keep the winner's blob.
            if existing.digest != digest {
                remove_quietly(&blob);
                return Err(Error::Conflict(format!("release {} was pushed concurrently", m.release_name())));
            }
            return Ok((existing, true));
        }
        tracing::info!(release = %m.release_name(), %digest, size, "release stored");
        Ok((record, false))
    }

    pub async fn list_releases(&self, app: Option<String>) -> Result<Vec<ReleaseRecord>> {
        let mut list = self.blocking(|c| Ok(c.core.store.releases()?)).await?;
        list.retain(|r| app.as_deref().is_none_or(|a| r.app == a));
        list.sort_by(|a, b| {
            let va = semver::Version::parse(&a.version).ok();
            let vb = semver::Version::parse(&b.version).ok();
            (&a.app, va).cmp(&(&b.app, vb))
        });
        Ok(list)
    }

    /// Removes a release nobody runs or keeps.
    pub async fn remove_release(&self, app: String, version: String, by: String) -> Result<()> {
        self.blocking(move |c| {
            let rec = c
                .core
                .store
                .release(&app, &version)?
                .ok_or_else(|| Error::UnknownRelease(format!("{app}@{version}")))?;
            let holders: Vec<String> = c
                .core
                .store
                .agents()?
                .into_iter()
                .filter(|a| a.releases.iter().any(|r| r.app == app && r.version == version))
                .map(|a| a.id)
                .collect();
            if !holders.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "release {app}@{version} is still on agent(s) {}; it cannot be removed",
                    holders.join(", ")
                )));
            }
            c.core.store.remove_release(&app, &version)?;
            let still_used = c.core.store.releases()?.iter().any(|r| r.digest == rec.digest);
            if !still_used {
                remove_quietly(&c.blob_root().join("sha256").join(&rec.digest));
            }
            tracing::info!(release = %format!("{app}@{version}"), %by, "release removed");
            Ok(())
        })
        .await
    }
}
