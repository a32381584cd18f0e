//! Environments: every agent belongs to one (set by its join token), and every rollout targets
//! one. Promotion rules between environments live in [`crate::logic::rollouts::promotion`].

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// The environment of agents and rollouts that name none.
pub const DEFAULT: &str = "production";

/// An environment's name: 1-32 lowercase ASCII letters, digits and '-', starting with a letter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Environment(String);

impl Environment {
    /// Parses a name given at an edge (a request, the config); `what` names it in the error.
    pub fn parse(s: &str) -> Result<Self> {
        let ok = (1..=32).contains(&s.len())
            && s.as_bytes()[0].is_ascii_lowercase()
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::InvalidArgument(format!(
                "environment {s:?} is invalid: use 1-32 lowercase letters, digits or '-', starting with a letter"
            )))
        }
    }

    /// A name from a request where empty means the default.
    pub fn parse_or_default(s: &str) -> Result<Self> {
        if s.is_empty() {
            Ok(Self::default())
        } else {
            Self::parse(s)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the default environment (records leave it out).
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT
    }
}

impl Default for Environment {
    fn default() -> Self {
        Self(DEFAULT.to_owned())
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Environment {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<Environment> for String {
    fn from(e: Environment) -> String {
        e.0
    }
}

impl PartialEq<str> for Environment {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["production", "staging", "qa-2", "e"] {
            assert_eq!(Environment::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "Prod", "2nd", "-x", "a/b", "a b", "staging\n", &"x".repeat(33)] {
            let e = Environment::parse(bad).unwrap_err().to_string();
            assert!(e.contains("is invalid"), "{bad:?}: {e}");
        }
        assert_eq!(Environment::parse_or_default("").unwrap(), Environment::default());
        let stored: Result<Environment, _> = serde_json::from_str("\"../x\"");
        assert!(stored.is_err(), "a stored name is checked as well");
    }
}
