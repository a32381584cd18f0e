//! Installing a release: download (digest-checked), verify the signed manifest against the
//! trust set, check it can run here, unpack into a fresh temporary directory, then rename it
//! into `releases/` and record it. Never touches `current`.

use std::collections::BTreeMap;
use std::sync::Arc;

use convoy_base::files;
use convoy_bundle::Manifest;
use tonic::transport::Channel;

use super::{Core, ExecError};
use crate::download::Downloader;
use crate::order::{AppName, Digest, Outcome, Version};
use crate::state::InstalledRecord;

#[derive(Clone)]
pub(crate) struct Installer {
    core: Arc<Core>,
    downloader: Downloader,
}

impl Installer {
    pub fn new(core: Arc<Core>, downloader: Downloader) -> Self {
        Self { core, downloader }
    }

    /// Removes partial downloads left by a previous run (start-up).
    pub fn clean_partials(&self) {
        self.downloader.clean_partials(&[]);
    }

    /// Downloads, verifies and unpacks a release. Installing it twice changes nothing.
    pub async fn install(
        &self,
        app: &AppName,
        version: &Version,
        digest: &Digest,
        channel: Channel,
    ) -> Result<Outcome, ExecError> {
        let guard = self.core.app_lock(app.as_str());
        let _g = guard.lock().await;
        let (a, v) = (app.clone(), version.clone());
        let existing = self
            .core
            .blocking(move |c| {
                let rec = c.state.installed(a.as_str(), v.as_str())?;
                Ok(rec.map(|r| (r.digest, c.layout.release_dir(a.as_str(), v.as_str()).is_dir())))
            })
            .await?;
        match existing {
            Some((d, true)) if d == digest.as_str() => {
                return Ok(Outcome::AlreadyInState(format!("{app}@{version} is already installed")));
            }
            Some((d, _)) if d != digest.as_str() => {
                return Err(ExecError::DigestConflict {
                    app: app.to_string(),
                    version: version.to_string(),
                    digest: d,
                });
            }
            _ => {}
        }
        self.core.failpoint("install:before-download");
        let fetched = self.downloader.fetch(channel, digest.as_str()).await.map_err(ExecError::Download)?;
        self.core.failpoint("install:after-download");
        let (a, v, d) = (app.clone(), version.clone(), digest.clone());
        let bundle = fetched.path.clone();
        let r = self
            .core
            .blocking(move |c| {
                let tmp = c.layout.unpack_tmp(a.as_str(), v.as_str());
                let r = unpack_checked(c, &a, &v, &bundle, &tmp);
                if r.is_err() {
                    // Only the directory this install created is removed.
                    c.layout.remove_tmp(&tmp);
                }
                let header = r?;
                c.failpoint("install:after-unpack");
                // A directory without a record is what a crash between rename and record left:
                // it is replaced, and only now that the new tree is verified.
                c.layout.remove_release(a.as_str(), v.as_str())?;
                let dest = c.layout.release_dir(a.as_str(), v.as_str());
                std::fs::rename(&tmp, &dest)
                    .map_err(|e| crate::Error::Io { path: dest.clone(), source: e })?;
                files::sync_dir(&c.layout.releases_dir(a.as_str())).map_err(crate::Error::from)?;
                let mut header_bytes = Vec::new();
                convoy_bundle::write_header(&mut header_bytes, &header.manifest_bytes, &header.signatures)
                    .map_err(|e| ExecError::Internal(format!("encode header: {e}")))?;
                let header_path = c.layout.header_path(a.as_str(), v.as_str());
                if let Some(dir) = header_path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| crate::Error::Io { path: dir.to_path_buf(), source: e })?;
                }
                files::write_atomic(&header_path, &header_bytes, false).map_err(crate::Error::from)?;
                c.failpoint("install:after-rename");
                let order = c.state.next_install_order()?;
                c.state.put_installed(&InstalledRecord {
                    app: a.to_string(),
                    version: v.to_string(),
                    digest: d.to_string(),
                    order,
                })?;
                Ok(())
            })
            .await;
        // The unpacked release and its signed header are what is kept; the bundle can go, and
        // a bundle that failed verification must not be reused.
        if let Err(e) = std::fs::remove_file(&fetched.path) {
            tracing::warn!(path = %fetched.path.display(), error = %e, "cannot remove the downloaded bundle");
        }
        r?;
        tracing::info!(%app, %version, "release installed");
        Ok(Outcome::Applied(format!("installed {app}@{version}")))
    }
}

/// Verifies the bundle's header against the trust set and this host, then unpacks it into
/// `tmp` (verifying every byte on the way).
fn unpack_checked(
    c: &Core,
    app: &AppName,
    version: &Version,
    bundle: &std::path::Path,
    tmp: &std::path::Path,
) -> Result<convoy_bundle::Header, ExecError> {
    let bad = |message: String| ExecError::BadBundle {
        app: app.to_string(),
        version: version.to_string(),
        message,
    };
    let mut f = std::fs::File::open(bundle)
        .map_err(|e| crate::Error::Io { path: bundle.to_path_buf(), source: e })?;
    let header = convoy_bundle::read_header(&mut f, c.cfg.limits.max_manifest_bytes)
        .map_err(|e| bad(e.to_string()))?;
    let verified = convoy_bundle::verify_header(&header, &c.cfg.trust).map_err(|e| bad(e.to_string()))?;
    let m = &verified.manifest;
    if m.app != app.as_str() || m.version != version.as_str() {
        return Err(bad(format!("bundle is {} but the order is for {app}@{version}", m.release_name())));
    }
    check_target(m, &c.cfg.labels).map_err(bad)?;
    m.config.substitute(&c.cfg.vars).map_err(bad)?;
    let releases = c.layout.releases_dir(app.as_str());
    std::fs::create_dir_all(&releases).map_err(|e| crate::Error::Io { path: releases.clone(), source: e })?;
    convoy_bundle::unpack(bundle, &c.cfg.trust, tmp, &c.cfg.limits).map_err(|e| bad(e.to_string()))?;
    Ok(header)
}

/// Refuses a release built for another OS, architecture or set of labels.
fn check_target(m: &Manifest, labels: &BTreeMap<String, String>) -> Result<(), String> {
    let Some(t) = &m.target else { return Ok(()) };
    for (k, v) in &t.labels {
        if labels.get(k) != Some(v) {
            return Err(format!("{} targets agents labelled {k}={v}; this agent is not", m.release_name()));
        }
    }
    if let Some(os) = t.os.as_deref().filter(|os| *os != std::env::consts::OS) {
        return Err(format!(
            "{} targets os {os}, this agent runs {}",
            m.release_name(),
            std::env::consts::OS
        ));
    }
    if let Some(arch) = t.arch.as_deref().filter(|a| *a != std::env::consts::ARCH) {
        return Err(format!(
            "{} targets arch {arch}, this agent runs {}",
            m.release_name(),
            std::env::consts::ARCH
        ));
    }
    Ok(())
}
