//! Enrollment and agent identity: join tokens, enrolling an agent from a CSR, renewing its
//! certificate, and checking the certificate an agent presents.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use convoy_pki::Identity;
use sha2::{Digest, Sha256};

use super::{Enrolled, Registry};
use crate::logic::Environment;

/// What a join token binds the agent that uses it to.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// The region the agent must join; `None`: the agent names its own.
    pub region: Option<String>,
    pub environment: Environment,
    pub labels: BTreeMap<String, String>,
    /// Whether the agent may add labels of its own.
    pub allow_agent_labels: bool,
    pub ttl: Duration,
}
use crate::logic::{now, renewal_overlap, validate_labels, validate_word, Error, Result};
use crate::store::{AgentRecord, EnrollConflict, TokenRecord};

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl Registry {
    /// Creates a one-time join token. Only its hash is stored.
    pub async fn create_token(&self, t: NewToken, created_by: &Identity) -> Result<(String, i64)> {
        let NewToken { region, environment, labels, allow_agent_labels, ttl } = t;
        if let Some(r) = &region {
            validate_word("region", r)?;
        }
        validate_labels(&labels)?;
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(Error::InvalidArgument("token ttl must be between 1s and 30 days".into()));
        }
        let raw: [u8; 32] = rand::random();
        let token = format!("cvt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
        let created_at = now();
        let rec = TokenRecord {
            region,
            labels,
            created_at,
            expires_at: created_at + ttl.as_secs().max(1) as i64,
            created_by: created_by.to_string(),
            used_by: None,
            allow_agent_labels,
            environment,
        };
        let expires = rec.expires_at;
        let bound_region = rec.region.clone();
        let env = rec.environment.clone();
        let hash = token_hash(&token);
        self.blocking(move |c| Ok(c.core.store.put_token(&hash, &rec)?)).await?;
        tracing::info!(region = ?bound_region, environment = %env, expires_at = expires, created_by = %created_by, "join token created");
        Ok((token, expires))
    }

    /// Enrolls an agent: checks the token, signs the CSR for an identity the controller
    /// chooses, and records the agent, all or nothing.
    pub async fn enroll(
        &self,
        token: String,
        requested_id: String,
        region: String,
        labels: BTreeMap<String, String>,
        csr_der: Vec<u8>,
    ) -> Result<Enrolled> {
        self.blocking(move |c| c.enroll_blocking(&token, &requested_id, &region, labels, &csr_der)).await
    }

    pub(super) fn enroll_blocking(
        &self,
        token: &str,
        requested_id: &str,
        region: &str,
        mut labels: BTreeMap<String, String>,
        csr_der: &[u8],
    ) -> Result<Enrolled> {
        if !token.starts_with("cvt_") || token.len() != 47 {
            return Err(Error::TokenMalformed);
        }
        let hash = token_hash(token);
        let tok = self.core.store.token(&hash)?.ok_or(Error::TokenUnknown)?;
        if let Some(by) = &tok.used_by {
            return Err(Error::TokenUsed(by.clone()));
        }
        let now = now();
        if now >= tok.expires_at {
            return Err(Error::TokenExpired(now - tok.expires_at));
        }
        let region = match (&tok.region, region) {
            (Some(bound), asked) if !asked.is_empty() && asked != bound => {
                return Err(Error::TokenRegion { bound: bound.clone(), asked: asked.to_owned() })
            }
            (Some(bound), _) => bound.clone(),
            (None, "") => return Err(Error::InvalidArgument("the agent must name its region".into())),
            (None, asked) => asked.to_owned(),
        };
        validate_word("region", &region)?;
        validate_labels(&labels)?;
        if !labels.is_empty() && !tok.allow_agent_labels {
            let asked: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return Err(Error::PermissionDenied(format!(
                "this join token does not let the agent choose labels (asked for {}); put them on the \
                 token, or create it with --allow-agent-labels",
                asked.join(", ")
            )));
        }
        // Labels the admin put on the token win over what the agent asks for.
        labels.extend(tok.labels.clone());
        let id = if requested_id.is_empty() {
            format!("agent-{}", hex::encode(rand::random::<[u8; 4]>()))
        } else {
            requested_id.to_owned()
        };
        let identity = Identity::agent(&id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if self.core.store.agent(&id)?.is_some() {
            return Err(Error::AgentExists(id));
        }
        let issued = self
            .inner
            .ca
            .sign_csr(csr_der, &identity, self.core.settings.agent_cert_lifetime)
            .map_err(|e| Error::Csr(e.to_string()))?;
        let rec = AgentRecord {
            id: id.clone(),
            region: region.clone(),
            labels: labels.clone(),
            first_seen: now,
            last_seen: now,
            cert_serial: issued.info.serial.clone(),
            cert_not_after: issued.info.not_after,
            agent_version: String::new(),
            releases: vec![],
            revoked: false,
            apps: vec![],
            previous_serial: None,
            previous_serial_until: 0,
            cert_serial_used: false,
            environment: tok.environment.clone(),
        };
        match self.core.store.commit_enrollment(&hash, &rec)? {
            Ok(()) => {}
            Err(EnrollConflict::TokenGone) => return Err(Error::TokenUnknown),
            Err(EnrollConflict::TokenUsed) => return Err(Error::TokenUsed("another agent".into())),
            Err(EnrollConflict::AgentExists) => return Err(Error::AgentExists(id)),
        }
        self.core.metrics().agent_enrolled(rec.environment.as_str(), &region);
        tracing::info!(agent_id = %id, %region, environment = %rec.environment, serial = %issued.info.serial, "agent enrolled");
        Ok(Enrolled { agent_id: id, cert_pem: issued.cert_pem, region, environment: rec.environment, labels })
    }

    /// Issues a new certificate for an enrolled, unrevoked agent from a CSR made with a new key.
    /// Only the agent's newest certificate (`serial`) may renew: a superseded one, still
    /// accepted for a short overlap, cannot mint a successor and lock the agent out.
    pub async fn renew(&self, agent_id: String, serial: String, csr_der: Vec<u8>) -> Result<String> {
        self.blocking(move |c| {
            let rec = c.core.store.agent(&agent_id)?.ok_or_else(|| Error::UnknownAgent(agent_id.clone()))?;
            if rec.revoked {
                return Err(Error::Revoked(format!("agent {agent_id:?}")));
            }
            let superseded = || {
                Error::PermissionDenied(format!(
                    "certificate {serial} of agent {agent_id:?} has been superseded; only the newest may renew"
                ))
            };
            // The newest certificate renews; the one it replaced may too while the newest has
            // never been presented (the answer to its renewal was lost), within the overlap.
            let may_renew = |r: &AgentRecord| {
                r.cert_serial == serial
                    || (!r.cert_serial_used
                        && r.previous_serial.as_deref() == Some(serial.as_str())
                        && now() < r.previous_serial_until)
            };
            if !may_renew(&rec) {
                return Err(superseded());
            }
            let identity = Identity::agent(&agent_id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let issued = c
                .inner
                .ca
                .sign_csr(&csr_der, &identity, c.core.settings.agent_cert_lifetime)
                .map_err(|e| Error::Csr(e.to_string()))?;
            let overlap = renewal_overlap(c.core.settings.agent_cert_lifetime);
            // Checked again in the same atomic update: two renewals racing with one certificate
            // cannot both win.
            let mut raced = false;
            c.core.store.update_agent(&agent_id, true, |r| {
                raced = !may_renew(r);
                if raced {
                    return;
                }
                // A lost answer's certificate is dropped: the serial that renewed stays the
                // previous one, within the overlap it already had.
                let replaced = std::mem::replace(&mut r.cert_serial, issued.info.serial.clone());
                if replaced == serial {
                    r.previous_serial = Some(replaced);
                    r.previous_serial_until = now() + overlap.as_secs() as i64;
                }
                r.cert_serial_used = false;
                r.cert_not_after = issued.info.not_after;
            })?;
            if raced {
                return Err(superseded());
            }
            tracing::info!(%agent_id, serial = %issued.info.serial, not_after = issued.info.not_after, "agent certificate renewed");
            Ok(issued.cert_pem)
        })
        .await
    }

    /// Refuses an agent certificate that is not the agent's newest (or, for a short overlap
    /// after a renewal, the one it replaced), and agents that are revoked or unknown. Called for
    /// every agent RPC with the serial of the verified client certificate.
    pub async fn check_agent_cert(&self, agent_id: &str, serial: &str) -> Result<AgentRecord> {
        let rec = self.check_agent(agent_id).await?;
        let current = rec.cert_serial == serial;
        let overlap = rec.previous_serial.as_deref() == Some(serial) && now() < rec.previous_serial_until;
        if current && !rec.cert_serial_used {
            // The renewed certificate is in use: from now on only it may renew.
            let (id, s) = (agent_id.to_owned(), serial.to_owned());
            self.blocking(move |c| {
                c.core.store.update_agent(&id, true, |r| r.cert_serial_used |= r.cert_serial == s)?;
                Ok(())
            })
            .await?;
        }
        if current || overlap {
            return Ok(rec);
        }
        tracing::warn!(agent_id, serial, newest = %rec.cert_serial, "superseded agent certificate refused");
        Err(Error::PermissionDenied(format!(
            "certificate {serial} of agent {agent_id:?} has been superseded by a renewal; only the newest is accepted"
        )))
    }

    /// Refuses identities that are revoked or unknown.
    pub async fn check_agent(&self, agent_id: &str) -> Result<AgentRecord> {
        let id = agent_id.to_owned();
        let rec = self
            .blocking(move |c| Ok(c.core.store.agent(&id)?))
            .await?
            .ok_or_else(|| Error::UnknownAgent(agent_id.to_owned()))?;
        if rec.revoked {
            return Err(Error::Revoked(format!("agent {agent_id:?}")));
        }
        Ok(rec)
    }
}
