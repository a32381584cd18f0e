use std::fmt;

use crate::{Error, Result};

/// The trust domain in every SPIFFE identity (`spiffe://<trust-domain>/...`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name.
    pub fn new(name: &str) -> Result<Self> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(Error::BadTrustDomain(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a certificate speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Controller,
    Agent(String),
    Admin(String),
}

impl Identity {
    /// Checks that an agent id or admin name is a safe, short path segment.
    pub fn validate_name(name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            && !name.starts_with('.');
        if ok {
            Ok(())
        } else {
            Err(Error::BadIdentity(format!(
                "{name:?} is not a valid name: use 1-64 letters, digits, '-', '_' or '.'"
            )))
        }
    }

    pub fn agent(id: &str) -> Result<Self> {
        Self::validate_name(id)?;
        Ok(Self::Agent(id.to_owned()))
    }

    pub fn admin(name: &str) -> Result<Self> {
        Self::validate_name(name)?;
        Ok(Self::Admin(name.to_owned()))
    }

    /// The SPIFFE URI for this identity in `td`.
    pub fn uri(&self, td: &TrustDomain) -> String {
        match self {
            Identity::Controller => format!("spiffe://{td}/controller"),
            Identity::Agent(id) => format!("spiffe://{td}/agent/{id}"),
            Identity::Admin(name) => format!("spiffe://{td}/admin/{name}"),
        }
    }

    /// Parses a SPIFFE URI, requiring it to belong to `td`.
    pub fn parse(uri: &str, td: &TrustDomain) -> Result<Self> {
        let prefix = format!("spiffe://{td}/");
        let rest = uri.strip_prefix(&prefix).ok_or_else(|| {
            Error::BadIdentity(format!("{uri:?} is not in trust domain {td:?}", td = td.as_str()))
        })?;
        match rest.split_once('/') {
            None if rest == "controller" => Ok(Identity::Controller),
            Some(("agent", id)) => Self::agent(id),
            Some(("admin", name)) => Self::admin(name),
            _ => Err(Error::BadIdentity(format!("{uri:?} names no known kind of identity"))),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Controller => f.write_str("controller"),
            Identity::Agent(id) => write!(f, "agent/{id}"),
            Identity::Admin(name) => write!(f, "admin/{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_refuses_foreign_or_odd_uris() {
        let td = TrustDomain::new("convoy.test").unwrap();
        for id in [Identity::Controller, Identity::Agent("eu-1".into()), Identity::Admin("ops".into())] {
            assert_eq!(Identity::parse(&id.uri(&td), &td).unwrap(), id);
        }
        for bad in [
            "spiffe://other/agent/x",
            "spiffe://convoy.test/agent/",
            "spiffe://convoy.test/agent/../x",
            "spiffe://convoy.test/agent/a/b",
            "spiffe://convoy.test/root/x",
            "https://convoy.test/agent/x",
        ] {
            assert!(Identity::parse(bad, &td).is_err(), "{bad} should be refused");
        }
        assert!(TrustDomain::new("Bad Domain").is_err());
    }
}
