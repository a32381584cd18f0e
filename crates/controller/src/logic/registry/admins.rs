//! The admin registry: every admin is a record with a unique name, a role and the serial of
//! every certificate issued to that name. A certificate is honoured only if its serial is
//! recorded for its name and not revoked, so a certificate minted outside the registry (or a
//! second admin claiming an existing name) gets nowhere.
//!
//! Stores written before the registry existed hold no admin records: the first admin existed
//! only as the certificate file `convoy init` wrote, and revoked names sat in a `revoked_admins`
//! tree. [`migrate`] turns that layout into records at start-up (see its rule).

use convoy_pki::{CertInfo, Identity};
use serde::{Deserialize, Serialize};

use super::Registry;
use crate::logic::roles::Role;
use crate::logic::{now, Error, Result};
use crate::store::{Store, Tree};

/// Who created records that no admin created: the first admin and migrated names.
pub const INIT_ACTOR: &str = "convoy init";
pub const MIGRATION_ACTOR: &str = "migration";

/// One admin in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub name: String,
    pub role: Role,
    /// Every certificate ever issued to this name, oldest first.
    pub certs: Vec<AdminCert>,
    pub created_by: String,
    pub created_at: i64,
}

/// Unrevoked, unexpired certificates one admin may hold at once: a stolen certificate cannot
/// mint an unbounded number of successors, and the record stays small.
pub const MAX_ACTIVE_CERTS: usize = 4;

/// A certificate issued to an admin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCert {
    /// Lowercase hex, as [`CertInfo::serial`].
    pub serial: String,
    pub issued_at: i64,
    pub issued_by: String,
    pub not_after: i64,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub revoked_at: Option<i64>,
    #[serde(default)]
    pub revoked_by: Option<String>,
}

impl AdminCert {
    fn new(info: &CertInfo, by: &str) -> Self {
        Self {
            serial: info.serial.clone(),
            issued_at: now(),
            issued_by: by.to_owned(),
            not_after: info.not_after,
            revoked: false,
            revoked_at: None,
            revoked_by: None,
        }
    }

    fn revoke(&mut self, by: &str) {
        self.revoked = true;
        self.revoked_at = Some(now());
        self.revoked_by = Some(by.to_owned());
    }
}

/// A revoked admin name, as stores from before the registry recorded it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LegacyRevokedAdmin {
    by: String,
    at: i64,
}

/// A certificate the registry just issued.
#[derive(Clone, Debug)]
pub struct IssuedAdmin {
    pub cert_pem: String,
    pub serial: String,
}

/// The verified caller of an admin RPC, as the registry knows them.
#[derive(Clone, Debug)]
pub struct AdminCaller {
    pub name: String,
    pub role: Role,
    pub serial: String,
}

impl AdminCaller {
    pub fn identity(&self) -> Identity {
        Identity::Admin(self.name.clone())
    }
}

impl std::fmt::Display for AdminCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "admin/{}", self.name)
    }
}

/// Records the first admin, made by `convoy init`, with role `admin`. Refuses if the name is
/// taken.
pub fn record_first_admin(store: &Store, name: &str, cert: &CertInfo) -> Result<()> {
    let rec = AdminRecord {
        name: name.to_owned(),
        role: Role::Admin,
        certs: vec![AdminCert::new(cert, INIT_ACTOR)],
        created_by: INIT_ACTOR.to_owned(),
        created_at: now(),
    };
    if store.get::<AdminRecord>(Tree::Admins, name)?.is_some() {
        return Err(Error::AdminExists(name.to_owned()));
    }
    store.put(Tree::Admins, name, &rec, true)?;
    Ok(())
}

/// What [`migrate`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migration {
    /// The first admin recorded from its certificate, if any.
    pub first_admin: Option<String>,
    /// Names revoked under the old model, recorded without any usable certificate.
    pub revoked_names: Vec<String>,
}

/// Brings a store from before the admin registry up to date. The rule: only when the store holds
/// no admin records at all,
/// - the admin certificate the controller's config points at (the one `convoy init` wrote) is
///   recorded with role `admin`, its serial, and `created_by = "migration"`;
/// - every name in the old `revoked_admins` tree is recorded with no usable certificate (its
///   serials were never known), so the name stays taken and refused; if the first admin's name
///   was revoked, its certificate is recorded as revoked.
///
/// Other admins added under the old model were never recorded and their certificates are refused
/// until an admin issues them new ones (`convoy admins add`). A store that already has records is
/// left alone, so the rule runs at most once in effect.
pub fn migrate(store: &Store, first_admin: Option<(&str, &CertInfo)>) -> Result<Migration> {
    if !store.list::<AdminRecord>(Tree::Admins)?.is_empty() {
        return Ok(Migration::default());
    }
    let mut done = Migration::default();
    let revoked: Vec<(String, LegacyRevokedAdmin)> = store.list(Tree::RevokedAdmins)?;
    for (name, old) in &revoked {
        let rec = AdminRecord {
            name: name.clone(),
            role: Role::Viewer,
            certs: vec![],
            created_by: format!("{MIGRATION_ACTOR} (revoked by {} before the registry)", old.by),
            created_at: old.at,
        };
        store.put(Tree::Admins, name, &rec, false)?;
        done.revoked_names.push(name.clone());
    }
    if let Some((name, cert)) = first_admin {
        let mut c = AdminCert::new(cert, MIGRATION_ACTOR);
        let was_revoked = revoked.iter().find(|(n, _)| n == name);
        if let Some((_, old)) = was_revoked {
            c.revoke(&old.by);
        }
        let rec = AdminRecord {
            name: name.to_owned(),
            role: Role::Admin,
            certs: vec![c],
            created_by: MIGRATION_ACTOR.to_owned(),
            created_at: now(),
        };
        store.put(Tree::Admins, name, &rec, false)?;
        done.first_admin = Some(name.to_owned());
    }
    // One flush for the whole migration: a crash before it leaves no records, and the rule
    // simply runs again at the next start.
    store.flush()?;
    Ok(done)
}

fn unknown_cert(name: &str, serial: &str) -> Error {
    Error::UnknownCertificate { who: format!("admin/{name}"), serial: serial.to_owned() }
}

impl Registry {
    fn lock_admins(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data of its own, only the read-modify-write of admin records.
        self.inner.admins_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks an admin certificate against the registry: the name must be recorded and the
    /// certificate's serial recorded for it and not revoked. Called for every admin RPC.
    pub async fn authenticate_admin(&self, name: &str, serial: &str) -> Result<AdminCaller> {
        let (name, serial) = (name.to_owned(), serial.to_owned());
        self.blocking(move |c| {
            let rec = c
                .core
                .store
                .get::<AdminRecord>(Tree::Admins, &name)?
                .ok_or_else(|| unknown_cert(&name, &serial))?;
            let cert =
                rec.certs.iter().find(|x| x.serial == serial).ok_or_else(|| unknown_cert(&name, &serial))?;
            if cert.revoked {
                return Err(Error::Revoked(format!("admin/{name} certificate {serial}")));
            }
            Ok(AdminCaller { name, role: rec.role, serial })
        })
        .await
    }

    /// Creates an admin with `role` and issues its first certificate from a CSR. An existing
    /// name is refused: names are unique, and a new certificate for one is a rekey.
    pub async fn add_admin(
        &self,
        name: String,
        role: Role,
        csr_der: Vec<u8>,
        by: &AdminCaller,
    ) -> Result<IssuedAdmin> {
        Identity::validate_name(&name).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let by = by.to_string();
        self.blocking(move |c| {
            let _guard = c.lock_admins();
            if c.core.store.get::<AdminRecord>(Tree::Admins, &name)?.is_some() {
                return Err(Error::AdminExists(name));
            }
            let issued = c.inner.ca.sign_admin_csr(&csr_der, &name).map_err(|e| Error::Csr(e.to_string()))?;
            let rec = AdminRecord {
                name: name.clone(),
                role,
                certs: vec![AdminCert::new(&issued.info, &by)],
                created_by: by.clone(),
                created_at: now(),
            };
            c.core.store.put(Tree::Admins, &name, &rec, true)?;
            tracing::info!(admin = %name, %role, %by, serial = %issued.info.serial, "admin added");
            Ok(IssuedAdmin { cert_pem: issued.cert_pem, serial: issued.info.serial })
        })
        .await
    }

    /// Issues another certificate for an existing admin and records its serial. Earlier
    /// certificates keep working until revoked.
    pub async fn rekey_admin(&self, name: String, csr_der: Vec<u8>, by: &AdminCaller) -> Result<IssuedAdmin> {
        let by = by.to_string();
        self.blocking(move |c| {
            let _guard = c.lock_admins();
            let mut rec = c
                .core
                .store
                .get::<AdminRecord>(Tree::Admins, &name)?
                .ok_or_else(|| Error::UnknownAdmin(name.clone()))?;
            // Expired certificates cannot be used any more; they leave the record.
            let t = now();
            rec.certs.retain(|cert| cert.not_after > t);
            let active = rec.certs.iter().filter(|cert| !cert.revoked).count();
            if active >= MAX_ACTIVE_CERTS {
                return Err(Error::FailedPrecondition(format!(
                    "admin {name:?} already has {active} active certificates (at most {MAX_ACTIVE_CERTS}); \
                     revoke one of its serials first"
                )));
            }
            let issued = c.inner.ca.sign_admin_csr(&csr_der, &name).map_err(|e| Error::Csr(e.to_string()))?;
            rec.certs.push(AdminCert::new(&issued.info, &by));
            c.core.store.put(Tree::Admins, &name, &rec, true)?;
            tracing::info!(admin = %name, %by, serial = %issued.info.serial, "admin certificate issued");
            Ok(IssuedAdmin { cert_pem: issued.cert_pem, serial: issued.info.serial })
        })
        .await
    }

    /// Revokes one certificate of an admin, or all of them. Returns the serials revoked now.
    /// The caller cannot revoke the certificate it is calling with, nor all of its own: an admin
    /// never locks themselves out.
    pub async fn revoke_admin(
        &self,
        name: String,
        serial: Option<String>,
        by: &AdminCaller,
    ) -> Result<Vec<String>> {
        if name == by.name {
            match &serial {
                None => {
                    return Err(Error::InvalidArgument(
                        "an admin cannot revoke their own certificates; another admin can, or revoke one \
                         other certificate of yours with --serial"
                            .into(),
                    ))
                }
                Some(s) if *s == by.serial => {
                    return Err(Error::InvalidArgument(
                        "an admin cannot revoke the certificate they are calling with".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        let by = by.to_string();
        self.blocking(move |c| {
            let _guard = c.lock_admins();
            let mut rec = c
                .core
                .store
                .get::<AdminRecord>(Tree::Admins, &name)?
                .ok_or_else(|| Error::UnknownAdmin(name.clone()))?;
            let mut revoked = Vec::new();
            match &serial {
                Some(s) => {
                    let cert = rec.certs.iter_mut().find(|x| x.serial == *s).ok_or_else(|| {
                        Error::InvalidArgument(format!("admin {name:?} has no certificate with serial {s}"))
                    })?;
                    if cert.revoked {
                        return Err(Error::FailedPrecondition(format!(
                            "certificate {s} of admin {name:?} is already revoked"
                        )));
                    }
                    cert.revoke(&by);
                    revoked.push(s.clone());
                }
                None => {
                    for cert in rec.certs.iter_mut().filter(|x| !x.revoked) {
                        cert.revoke(&by);
                        revoked.push(cert.serial.clone());
                    }
                    if revoked.is_empty() {
                        return Err(Error::FailedPrecondition(format!(
                            "admin {name:?} has no certificate left to revoke"
                        )));
                    }
                }
            }
            c.core.store.put(Tree::Admins, &name, &rec, true)?;
            tracing::warn!(admin = %name, %by, ?revoked, "admin certificates revoked");
            Ok(revoked)
        })
        .await
    }

    /// One admin's record (`name` without the `admin/` prefix), if recorded.
    pub async fn admin(&self, name: &str) -> Result<Option<AdminRecord>> {
        let name = name.to_owned();
        self.blocking(move |c| Ok(c.core.store.get::<AdminRecord>(Tree::Admins, &name)?)).await
    }

    /// Every admin, in name order.
    pub async fn list_admins(&self) -> Result<Vec<AdminRecord>> {
        self.blocking(|c| {
            Ok(c.core.store.list::<AdminRecord>(Tree::Admins)?.into_iter().map(|(_, r)| r).collect())
        })
        .await
    }
}
