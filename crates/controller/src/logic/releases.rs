//! Releases on the controller: ingesting pushed bundles, listing, removing, serving blobs.
//!
//! Bundles are stored content-addressed (`blobs/sha256/<digest>`), metadata in sled. A release
//! is immutable: a different bundle claiming an existing `app@version` is refused.

use std::path::{Path, PathBuf};

use super::{now, Controller, Error, Result};
use crate::store::ReleaseRecord;

/// Size of the chunks bundles travel in, both ways.
pub const BUNDLE_CHUNK: usize = 256 * 1024;

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

/// Checks that a digest is 64 lowercase hex characters, so it is safe as a file name.
pub fn check_digest(digest: &str) -> Result<()> {
    convoy_bundle::check_digest(digest).map_err(|e| Error::InvalidArgument(e.to_string()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    convoy_base::files::sync_dir(dir).map_err(|e| Error::Internal(e.to_string()))
}

impl Controller {
    fn blob_root(&self) -> &Path {
        &self.inner.settings.blob_dir
    }

    /// Creates the blob directories and removes uploads a crash left half-written.
    pub fn prepare_blob_dir(&self) -> Result<()> {
        let root = self.blob_root();
        for d in [root.join("sha256"), root.join("incoming")] {
            std::fs::create_dir_all(&d).map_err(|e| io_err(&d, e))?;
        }
        let incoming = root.join("incoming");
        for entry in std::fs::read_dir(&incoming).map_err(|e| io_err(&incoming, e))?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(())
    }

    /// Where a push writes before the bundle is checked.
    pub fn incoming_path(&self) -> PathBuf {
        self.blob_root().join("incoming").join(format!("{}.upload", hex::encode(rand::random::<[u8; 8]>())))
    }

    pub fn max_bundle_bytes(&self) -> u64 {
        self.inner.settings.max_bundle_bytes
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
    /// present. The upload is consumed either way.
    pub async fn ingest(&self, upload: PathBuf, pushed_by: String) -> Result<(ReleaseRecord, bool)> {
        self.blocking(move |c| {
            let result = c.ingest_blocking(&upload, pushed_by);
            let _ = std::fs::remove_file(&upload);
            result
        })
        .await
    }

    fn ingest_blocking(&self, upload: &Path, pushed_by: String) -> Result<(ReleaseRecord, bool)> {
        // One pass: structure, signatures (when configured), digests and the bundle's own hash.
        let verified = convoy_bundle::verify(
            upload,
            self.inner.settings.release_trust.as_ref(),
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
        if let Some(existing) = self.inner.store.release(&m.app, &m.version)? {
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
        if let Some(existing) = self.inner.store.insert_release(&record)? {
            // Lost a race with an identical push of a different bundle; keep the winner's blob.
            if existing.digest != digest {
                let _ = std::fs::remove_file(&blob);
                return Err(Error::Conflict(format!("release {} was pushed concurrently", m.release_name())));
            }
            return Ok((existing, true));
        }
        tracing::info!(release = %m.release_name(), %digest, size, "release stored");
        Ok((record, false))
    }

    pub async fn list_releases(&self, app: Option<String>) -> Result<Vec<ReleaseRecord>> {
        let mut list = self.blocking(|c| Ok(c.inner.store.releases()?)).await?;
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
                .inner
                .store
                .release(&app, &version)?
                .ok_or_else(|| Error::UnknownRelease(format!("{app}@{version}")))?;
            let holders: Vec<String> = c
                .inner
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
            c.inner.store.remove_release(&app, &version)?;
            let still_used = c.inner.store.releases()?.iter().any(|r| r.digest == rec.digest);
            if !still_used {
                let _ = std::fs::remove_file(c.blob_root().join("sha256").join(&rec.digest));
            }
            tracing::info!(release = %format!("{app}@{version}"), %by, "release removed");
            Ok(())
        })
        .await
    }
}
