//! `KEY=VALUE` arguments, as the command lines take labels, variables and selectors.

use std::collections::BTreeMap;

/// A pair that is not `KEY=VALUE`, has an empty key, or repeats a key.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what}: {message}")]
pub struct Error {
    /// What the pairs are (`label`, `variable`, ...), for the message.
    pub what: &'static str,
    pub message: String,
}

/// Parses `KEY=VALUE` pairs into a map, refusing duplicates and empty keys. `what` names them
/// in the error.
pub fn parse_pairs(what: &'static str, pairs: &[String]) -> Result<BTreeMap<String, String>, Error> {
    let mut map = BTreeMap::new();
    for p in pairs {
        let (k, v) =
            p.split_once('=').ok_or_else(|| Error { what, message: format!("{p:?} is not KEY=VALUE") })?;
        if k.is_empty() {
            return Err(Error { what, message: format!("{p:?} has an empty key") });
        }
        if map.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(Error { what, message: format!("{k:?} is given twice") });
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pairs_parse_and_refuse_bad_input() {
        let m = parse_pairs("label", &["a=b".into(), "c=d=e".into(), "f=".into()]).unwrap();
        assert_eq!((m["a"].as_str(), m["c"].as_str(), m["f"].as_str()), ("b", "d=e", ""));
        for bad in ["novalue", "=x"] {
            let e = parse_pairs("label", &[bad.into()]).unwrap_err().to_string();
            assert!(e.starts_with("invalid label: "), "{e}");
        }
        let e = parse_pairs("variable", &["a=1".into(), "a=2".into()]).unwrap_err().to_string();
        assert_eq!(e, "invalid variable: \"a\" is given twice");
    }
}
