//! `convoy.toml`, the release's own description: the service to supervise, hooks, health checks.
//! Unknown fields are errors; values are checked at build time, so a bad release never ships.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The file every release directory must contain.
pub const CONFIG_FILE: &str = "convoy.toml";

const SIGNALS: [&str; 7] = ["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2"];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// A process the agent supervises. Relative paths in `command` resolve in the release directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_signal")]
    pub stop_signal: String,
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// The Unix user the agent runs the service and hooks as when the agent runs as root: a
    /// name (`^[a-z_][a-z0-9_-]{0,31}$`) or a decimal uid. Absent, they run as the agent's user.
    /// Left out of the manifest when absent, so manifests without it keep their exact bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The Unix group for the service and hooks, by name or decimal gid, under the same rule as
    /// `user`. It may be set without `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Commands run in the release directory around activation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_activate: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_activate: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_rollback: Option<Vec<String>>,
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// Health checking: exactly one of `http`, `tcp`, `exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_successes")]
    pub successes: u32,
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
}

/// The one check a [`Health`] section describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    Http(String),
    Tcp(String),
    Exec(Vec<String>),
}

impl Health {
    pub fn check(&self) -> Option<HealthCheck> {
        match (&self.http, &self.tcp, &self.exec) {
            (Some(u), None, None) => Some(HealthCheck::Http(u.clone())),
            (None, Some(a), None) => Some(HealthCheck::Tcp(a.clone())),
            (None, None, Some(c)) => Some(HealthCheck::Exec(c.clone())),
            _ => None,
        }
    }
}

fn default_signal() -> String {
    "SIGTERM".into()
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_successes() -> u32 {
    3
}
fn default_deadline() -> Duration {
    Duration::from_secs(60)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

/// Checks a `user` or `group` value: a POSIX-style account name, or a decimal numeric id.
/// Names follow the portable subset `useradd` accepts, so one that passes here can exist on any
/// host; ids are checked against the range the kernel takes, excluding 4294967295, which
/// `setuid` and friends read as "leave unchanged".
fn check_account(field: &str, value: &str) -> Result<()> {
    let bytes = value.as_bytes();
    if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) {
        let in_range = value.parse::<u32>().is_ok_and(|id| id != u32::MAX);
        if !in_range {
            return Err(bad(format!("{field}: numeric id {value} is out of range (0 to 4294967294)")));
        }
        if value.len() > 1 && bytes[0] == b'0' {
            return Err(bad(format!("{field}: numeric id {value:?} has a leading zero")));
        }
        return Ok(());
    }
    let name_ok = matches!(bytes.first(), Some(b) if b.is_ascii_lowercase() || *b == b'_')
        && bytes.len() <= 32
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if !name_ok {
        return Err(bad(format!(
            "{field}: {value:?} is neither a user or group name (a lowercase letter or '_', then up \
             to 31 of a-z, 0-9, '_', '-') nor a decimal numeric id"
        )));
    }
    Ok(())
}

/// The `${NAME}` references in `s`, or an error for a malformed reference.
fn references(field: &str, s: &str, out: &mut BTreeSet<String>) -> Result<()> {
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| bad(format!("{field}: unterminated \"${{\" in {s:?}")))?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(bad(format!("{field}: {name:?} is not a valid variable name (use A-Z, 0-9, _)")));
        }
        out.insert(name.to_owned());
        rest = &after[end + 1..];
    }
    Ok(())
}

fn substitute_str(s: &str, vars: &BTreeMap<String, String>) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated \"${{\" in {s:?}"))?;
        let name = &after[..end];
        let value =
            vars.get(name).ok_or_else(|| format!("variable ${{{name}}} is not defined on this agent"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ReleaseConfig {
    /// Parses and validates `convoy.toml` text. Errors name the field (and, for syntax and type
    /// errors, the line).
    pub fn parse(text: &str) -> Result<Self> {
        let config: ReleaseConfig =
            toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; also run on the config inside a parsed manifest.
    pub(crate) fn validate(&self) -> Result<()> {
        let argv = |field: &str, v: &[String]| -> Result<()> {
            if v.is_empty() || v[0].is_empty() {
                return Err(bad(format!("{field}: must be a non-empty argv list")));
            }
            Ok(())
        };
        if let Some(s) = &self.service {
            argv("service.command", &s.command)?;
            if !SIGNALS.contains(&s.stop_signal.as_str()) {
                return Err(bad(format!(
                    "service.stop_signal: {:?} is not one of {}",
                    s.stop_signal,
                    SIGNALS.join(", ")
                )));
            }
            for k in s.env.keys() {
                if k.is_empty() || k.contains('=') {
                    return Err(bad(format!("service.env: {k:?} is not a valid variable name")));
                }
            }
            if let Some(user) = &s.user {
                check_account("service.user", user)?;
            }
            if let Some(group) = &s.group {
                check_account("service.group", group)?;
            }
        }
        if let Some(h) = &self.hooks {
            for (name, hook) in [
                ("hooks.pre_activate", &h.pre_activate),
                ("hooks.post_activate", &h.post_activate),
                ("hooks.pre_rollback", &h.pre_rollback),
            ] {
                if let Some(v) = hook {
                    argv(name, v)?;
                }
            }
            if h.timeout.is_zero() {
                return Err(bad("hooks.timeout: must be more than zero"));
            }
        }
        if let Some(h) = &self.health {
            match h.check() {
                None => return Err(bad("health: exactly one of http, tcp or exec must be set")),
                Some(HealthCheck::Http(u)) if !u.starts_with("http://") => {
                    return Err(bad(format!("health.http: {u:?} must be an http:// URL")))
                }
                Some(HealthCheck::Exec(v)) => argv("health.exec", &v)?,
                Some(_) => {}
            }
            if h.interval.is_zero() || h.timeout.is_zero() {
                return Err(bad("health.interval and health.timeout must be more than zero"));
            }
            if h.successes == 0 {
                return Err(bad("health.successes: must be at least 1"));
            }
            if h.deadline < h.interval {
                return Err(bad("health.deadline: must be at least health.interval"));
            }
        }
        self.variables().map(|_| ())
    }

    /// The per-host variables (`${NAME}`) this release uses.
    pub fn variables(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        if let Some(s) = &self.service {
            for a in &s.command {
                references("service.command", a, &mut out)?;
            }
            for v in s.env.values() {
                references("service.env", v, &mut out)?;
            }
        }
        if let Some(h) = &self.health {
            for v in h.http.iter().chain(h.tcp.iter()).chain(h.exec.iter().flatten()) {
                references("health", v, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Replaces every `${NAME}` with the agent's value. An undefined variable is an error naming
    /// it, never an empty string.
    pub fn substitute(&self, vars: &BTreeMap<String, String>) -> std::result::Result<Self, String> {
        let sub_all = |v: &[String]| {
            v.iter().map(|a| substitute_str(a, vars)).collect::<std::result::Result<Vec<_>, _>>()
        };
        let mut out = self.clone();
        if let Some(s) = &mut out.service {
            s.command = sub_all(&s.command)?;
            for v in s.env.values_mut() {
                *v = substitute_str(v, vars)?;
            }
        }
        if let Some(h) = &mut out.health {
            h.http = h.http.as_deref().map(|u| substitute_str(u, vars)).transpose()?;
            h.tcp = h.tcp.as_deref().map(|u| substitute_str(u, vars)).transpose()?;
            h.exec = h.exec.as_deref().map(sub_all).transpose()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected_err: Option<&str>) {
        match (ReleaseConfig::parse(text), expected_err) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{e} should mention {want:?}"),
            (Ok(c), Some(want)) => panic!("expected an error mentioning {want:?}, got {c:?}"),
            (Err(e), None) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn convoy_toml_cases() {
        check("", None);
        check(
            r#"
[service]
command = ["bin/shop-api", "--port", "${PORT}"]
env = { RUST_LOG = "info" }
stop_signal = "SIGTERM"
stop_timeout = "10s"
[hooks]
pre_activate = ["bin/migrate"]
timeout = "60s"
[health]
http = "http://127.0.0.1:${PORT}/healthz"
interval = "1s"
timeout = "2s"
successes = 3
deadline = "60s"
"#,
            None,
        );
        check("[service]\ncommand = []\n", Some("service.command"));
        check("[service]\ncommand = [\"x\"]\nstop_signal = \"SIGFOO\"\n", Some("service.stop_signal"));
        check("[service]\ncommand = [\"x\"]\ncolour = 1\n", Some("colour"));
        check("[service]\ncommand = [\"x\"]\nstop_timeout = \"soon\"\n", Some("stop_timeout"));
        check("[health]\nhttp = \"http://x\"\ntcp = \"127.0.0.1:1\"\n", Some("exactly one"));
        check("[health]\n", Some("exactly one"));
        check("[health]\nhttp = \"ftp://x\"\n", Some("health.http"));
        check("[health]\ntcp = \"x:1\"\nsuccesses = 0\n", Some("health.successes"));
        check("[service]\ncommand = [\"x\", \"${lower}\"]\n", Some("not a valid variable name"));
        check("[service]\ncommand = [\"x\", \"${PORT\"]\n", Some("unterminated"));
        check("[unknown]\n", Some("unknown"));
        check("[service]\ncommand = \"x\"\n", Some("line 2"));
    }

    #[test]
    fn service_user_and_group() {
        let with = |user: Option<&str>, group: Option<&str>| {
            let mut text = String::from("[service]\ncommand = [\"bin/run\", \"${PORT}\"]\n");
            if let Some(u) = user {
                text.push_str(&format!("user = {u:?}\n"));
            }
            if let Some(g) = group {
                text.push_str(&format!("group = {g:?}\n"));
            }
            text
        };
        let thirty_two = format!("a{}", "b".repeat(31));
        let thirty_three = format!("a{}", "b".repeat(32));
        let good: Vec<(Option<&str>, Option<&str>)> = vec![
            (None, None),
            (Some("shop"), None),
            (Some("shop"), Some("shop")),
            (None, Some("www-data")),
            (Some("_svc"), Some("_svc")),
            (Some("svc_1-a"), None),
            (Some(&thirty_two), None),
            (Some("0"), Some("0")),
            (Some("1000"), Some("1000")),
            (Some("4294967294"), None),
        ];
        for (user, group) in good {
            let c = ReleaseConfig::parse(&with(user, group))
                .unwrap_or_else(|e| panic!("{user:?}/{group:?} should parse: {e}"));
            let s = c.service.as_ref().unwrap();
            assert_eq!((s.user.as_deref(), s.group.as_deref()), (user, group));
            // The fields do not disturb the variables the release uses.
            assert_eq!(c.variables().unwrap().into_iter().collect::<Vec<_>>(), ["PORT"]);
        }
        let bad: Vec<(Option<&str>, Option<&str>, &str)> = vec![
            (Some(""), None, "service.user"),
            (Some("Shop"), None, "service.user"),
            (Some("1shop"), None, "service.user"),
            (Some("-shop"), None, "service.user"),
            (Some("shop api"), None, "service.user"),
            (Some("shop$"), None, "service.user"),
            (Some("shop.api"), None, "service.user"),
            (Some("${USER}"), None, "service.user"),
            (Some("root\n"), None, "service.user"),
            (Some(&thirty_three), None, "service.user"),
            (Some("-1"), None, "service.user"),
            (Some("4294967295"), None, "out of range"),
            (Some("99999999999"), None, "out of range"),
            (Some("0100"), None, "leading zero"),
            (None, Some("Staff"), "service.group"),
            (Some("shop"), Some(""), "service.group"),
            (Some("shop"), Some("4294967296"), "service.group"),
        ];
        for (user, group, want) in bad {
            check(&with(user, group), Some(want));
        }
        // Types and unknown neighbours are still refused.
        check("[service]\ncommand = [\"x\"]\nuser = 1000\n", Some("user"));
        check("[service]\ncommand = [\"x\"]\nuid = \"shop\"\n", Some("uid"));
    }

    #[test]
    fn user_and_group_are_in_the_manifest_only_when_set() {
        let plain = ReleaseConfig::parse("[service]\ncommand = [\"x\"]\n").unwrap();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("user") && !json.contains("group"), "{json}");
        let set = ReleaseConfig::parse("[service]\ncommand = [\"x\"]\nuser = \"shop\"\ngroup = \"1000\"\n")
            .unwrap();
        let json = serde_json::to_string(&set).unwrap();
        assert!(json.contains(r#""user":"shop","group":"1000""#), "{json}");
        let back: ReleaseConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn substitution_names_undefined_variables() {
        let c = ReleaseConfig::parse(
            "[service]\ncommand = [\"x\", \"--port=${PORT}\"]\n[health]\ntcp = \"127.0.0.1:${PORT}\"\n",
        )
        .unwrap();
        assert_eq!(c.variables().unwrap().into_iter().collect::<Vec<_>>(), ["PORT"]);
        let vars = BTreeMap::from([("PORT".to_string(), "8080".to_string())]);
        let s = c.substitute(&vars).unwrap();
        assert_eq!(s.service.unwrap().command[1], "--port=8080");
        assert_eq!(s.health.unwrap().tcp.unwrap(), "127.0.0.1:8080");
        let err = c.substitute(&BTreeMap::new()).unwrap_err();
        assert!(err.contains("${PORT}"), "{err}");
    }
}
