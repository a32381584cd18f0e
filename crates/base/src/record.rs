//! The envelope every stored record is kept in: a JSON object with the record's fields and a
//! format version `v` beside them, so a build refuses records written in a format it does not
//! read instead of misreading them.
//!
//! ```text
//! {"v":1,"field":...,"other":...}
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

/// A stored record that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not JSON, or not the record's shape.
    #[error("{0}")]
    Malformed(String),
    /// Written in another format version.
    #[error("format version {found}, this build reads {expected}")]
    Version { found: u32, expected: u32 },
}

/// Encodes `body` (a struct) in format `version`. Fails only for a body that is not a JSON
/// object with string keys.
pub fn encode<T: Serialize>(version: u32, body: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Envelope { v: version, body })
}

/// Decodes a record, refusing any format but `version`.
pub fn decode<T: DeserializeOwned>(version: u32, bytes: &[u8]) -> Result<T, Error> {
    let env: Envelope<serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
    if env.v != version {
        return Err(Error::Version { found: env.v, expected: version });
    }
    serde_json::from_value(env.body).map_err(|e| Error::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct R {
        name: String,
        n: u32,
    }

    #[test]
    fn records_round_trip_and_other_versions_are_refused() {
        let r = R { name: "a".into(), n: 3 };
        let bytes = encode(1, &r).unwrap();
        assert_eq!(bytes, br#"{"v":1,"name":"a","n":3}"#);
        assert_eq!(decode::<R>(1, &bytes).unwrap(), r);
        assert!(matches!(decode::<R>(2, &bytes), Err(Error::Version { found: 1, expected: 2 })));
        assert!(matches!(decode::<R>(1, b"{\"v\":1}"), Err(Error::Malformed(_))));
        assert!(matches!(decode::<R>(1, b"not json"), Err(Error::Malformed(_))));
        assert!(encode(1, &3u32).is_err(), "a record must be a struct");
    }
}
