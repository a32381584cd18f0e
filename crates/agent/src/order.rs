//! The agent's trust boundary for orders. A `pb::Order` from the controller is translated here
//! into a domain [`Order`] whose every field is validated: app names and versions follow the
//! bundle crate's rules (so they are safe path components), digests are 64 lowercase hex
//! characters, counts and durations are bounded. Nothing below this module sees a prost type or
//! builds a path from an unchecked string. A refused order names the field that was wrong.
//!
//! The answers go back as an [`Outcome`]: applied, already in that state, refused, failed or
//! stale. Only the first two mean "done"; the controller never reads the others as success.

use std::fmt;
use std::time::Duration;

use convoy_proto::v1 as pb;

/// The most log lines one Logs order may ask for.
pub const MAX_LOG_LINES: u32 = 10_000;
/// The longest health deadline an order may set.
pub const MAX_HEALTH_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// The longest app name (the bundle format's limit).
pub const MAX_APP_NAME_LEN: usize = 64;
/// The longest rollback reason kept.
pub const MAX_REASON_LEN: usize = 1024;

/// An app name that passed `convoy_bundle::check_app_name`: a safe single path component.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppName(String);

/// A release version that passed `convoy_bundle::check_version`: a semantic version, a safe
/// single path component.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(String);

/// A bundle digest: SHA-256, 64 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl AppName {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        // The bundle crate's message quotes the whole name; hostile input is only echoed short.
        if s.len() > MAX_APP_NAME_LEN {
            return Err(Refusal::new(
                "app",
                format!("{:?} is longer than {MAX_APP_NAME_LEN} bytes", truncate(s)),
            ));
        }
        convoy_bundle::check_app_name(s).map_err(|e| Refusal::new("app", e.to_string()))?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Version {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        Self::parse_field("version", s)
    }
    fn parse_field(field: &'static str, s: &str) -> Result<Self, Refusal> {
        if s.is_empty() {
            return Err(Refusal::new(field, "is empty"));
        }
        convoy_bundle::check_version(s).map_err(|e| Refusal::new(field, e.to_string()))?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        convoy_bundle::check_digest(s).map_err(|e| Refusal::new("digest", e.to_string()))?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    )*};
}
display_as_str!(AppName, Version, Digest);

/// What an order asks for, every field validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKind {
    /// Download, verify and unpack a release; no activation.
    Install { app: AppName, version: Version, digest: Digest },
    /// Switch to an installed release, health-gated.
    Activate { app: AppName, version: Version, health_deadline: Option<Duration> },
    /// Go back from `from`: to `to` if named, else to the newest kept known-good release
    /// activated before `from` that is not marked bad.
    Rollback { app: AppName, from: Version, to: Option<Version>, reason: String },
    /// Read the tail of the current release's log. Read-only.
    Logs { app: AppName, lines: u32 },
}

/// A validated order with its controller sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub seq: u64,
    pub kind: OrderKind,
}

impl OrderKind {
    pub fn app(&self) -> &AppName {
        match self {
            Self::Install { app, .. }
            | Self::Activate { app, .. }
            | Self::Rollback { app, .. }
            | Self::Logs { app, .. } => app,
        }
    }

    /// Read-only orders are not fenced by sequence numbers.
    pub fn is_read_only(&self) -> bool {
        matches!(self, Self::Logs { .. })
    }
}

/// An order field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub field: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self { field, message: message.into() }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "order field {}: {}", self.field, self.message)
    }
}

/// Shortens hostile input before it is echoed in an error.
fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_owned();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl TryFrom<pb::Order> for Order {
    type Error = (u64, Option<AppName>, Refusal);

    /// Validates every field. The error carries the sequence number and, when it was valid, the
    /// app, so the refusal can be answered with the app's status.
    fn try_from(o: pb::Order) -> Result<Self, Self::Error> {
        use pb::order::Kind;
        let seq = o.seq;
        let refuse = |app: Option<AppName>, r: Refusal| (seq, app, r);
        if seq == 0 {
            return Err(refuse(None, Refusal::new("seq", "is zero; orders are numbered from 1")));
        }
        let Some(kind) = o.kind else {
            return Err(refuse(
                None,
                Refusal::new("kind", "is missing or of a kind this agent does not know"),
            ));
        };
        let raw_app = match &kind {
            Kind::Install(i) => &i.app,
            Kind::Activate(a) => &a.app,
            Kind::Rollback(r) => &r.app,
            Kind::Logs(l) => &l.app,
        };
        let app = AppName::parse(raw_app).map_err(|r| refuse(None, r))?;
        let a = Some(app.clone());
        let kind = match kind {
            Kind::Install(i) => OrderKind::Install {
                app,
                version: Version::parse(&i.version).map_err(|r| refuse(a.clone(), r))?,
                digest: Digest::parse(&i.digest).map_err(|r| refuse(a.clone(), r))?,
            },
            Kind::Activate(x) => {
                let deadline = Duration::from_secs(x.health_deadline_secs.into());
                if deadline > MAX_HEALTH_DEADLINE {
                    return Err(refuse(
                        a,
                        Refusal::new(
                            "health_deadline_secs",
                            format!(
                                "{}s is more than the {}s maximum",
                                deadline.as_secs(),
                                MAX_HEALTH_DEADLINE.as_secs()
                            ),
                        ),
                    ));
                }
                OrderKind::Activate {
                    app,
                    version: Version::parse(&x.version).map_err(|r| refuse(a.clone(), r))?,
                    health_deadline: (!deadline.is_zero()).then_some(deadline),
                }
            }
            Kind::Rollback(r) => {
                let from = Version::parse_field("from_version", &r.from_version)
                    .map_err(|e| refuse(a.clone(), e))?;
                let to = if r.to_version.is_empty() {
                    None
                } else {
                    Some(
                        Version::parse_field("to_version", &r.to_version)
                            .map_err(|e| refuse(a.clone(), e))?,
                    )
                };
                if r.reason.len() > MAX_REASON_LEN {
                    return Err(refuse(
                        a,
                        Refusal::new("reason", format!("is longer than {MAX_REASON_LEN} bytes")),
                    ));
                }
                OrderKind::Rollback { app, from, to, reason: r.reason }
            }
            Kind::Logs(l) => {
                if l.lines > MAX_LOG_LINES {
                    return Err(refuse(
                        a,
                        Refusal::new(
                            "lines",
                            format!("{} is more than the {MAX_LOG_LINES} maximum", l.lines),
                        ),
                    ));
                }
                OrderKind::Logs { app, lines: l.lines.max(1) }
            }
        };
        Ok(Order { seq, kind })
    }
}

/// How an order ended. Only [`Outcome::Applied`] and [`Outcome::AlreadyInState`] mean done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The order changed the agent's state; the text says what was done.
    Applied(String),
    /// The agent already was in the asked-for state; nothing changed.
    AlreadyInState(String),
    /// The order was invalid or not allowed here; nothing changed.
    Refused(Refusal),
    /// The agent tried and failed; the text says what happened and what runs now.
    Failed(String),
    /// The order was not newer than one already applied; ignored.
    Stale { seq: u64, agent_last_seq: u64 },
}

impl Outcome {
    pub fn to_pb(&self) -> (pb::OrderOutcome, String, &'static str) {
        match self {
            Self::Applied(m) => (pb::OrderOutcome::Applied, m.clone(), ""),
            Self::AlreadyInState(m) => (pb::OrderOutcome::AlreadyInState, m.clone(), ""),
            Self::Refused(r) => (pb::OrderOutcome::Refused, r.to_string(), r.field),
            Self::Failed(m) => (pb::OrderOutcome::Failed, m.clone(), ""),
            Self::Stale { seq, agent_last_seq } => (
                pb::OrderOutcome::Stale,
                format!("agent has applied order {agent_last_seq}, this order is {seq}: ignored as stale"),
                "",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(app: &str, version: &str, digest: &str) -> pb::Order {
        pb::Order {
            seq: 7,
            kind: Some(pb::order::Kind::Install(pb::InstallOrder {
                app: app.into(),
                version: version.into(),
                digest: digest.into(),
            })),
        }
    }

    #[test]
    fn fields_are_validated_and_named() {
        let d = "a".repeat(64);
        let cases: Vec<(pb::Order, Option<&str>)> = vec![
            (install("shop-api", "1.0.0", &d), None),
            (install("/etc", "1.0.0", &d), Some("app")),
            (install("../x", "1.0.0", &d), Some("app")),
            (install("", "1.0.0", &d), Some("app")),
            (install("shop-api", "../../..", &d), Some("version")),
            (install("shop-api", "/etc", &d), Some("version")),
            (install("shop-api", "", &d), Some("version")),
            (install("shop-api", &"1".repeat(200), &d), Some("version")),
            (install("shop-api", "1.0.0", "../x"), Some("digest")),
            (install("shop-api", "1.0.0", &"A".repeat(64)), Some("digest")),
            (pb::Order { seq: 7, kind: None }, Some("kind")),
            (pb::Order { seq: 0, ..install("shop-api", "1.0.0", &d) }, Some("seq")),
        ];
        for (order, field) in cases {
            let got = Order::try_from(order.clone());
            match (field, got) {
                (None, Ok(_)) => {}
                (Some(f), Err((_, _, r))) => assert_eq!(r.field, f, "{order:?}: {r}"),
                (want, got) => panic!("{order:?}: wanted refusal of {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn stale_outcome_says_both_numbers() {
        let (kind, msg, _) = Outcome::Stale { seq: 3, agent_last_seq: 9 }.to_pb();
        assert_eq!(kind, pb::OrderOutcome::Stale);
        assert!(msg.contains("applied order 9") && msg.contains("order is 3"), "{msg}");
    }
}
