//! The rollout spec: what to deploy, where, and how carefully, and its validation.
//!
//! Errors here are domain errors ([`SpecError`]); the gRPC layer words them for the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::logic::Environment;

/// Why a rollout spec is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("wave size {0}% is not a percentage between 1 and 100")]
    WaveOutOfRange(u32),
    #[error("wave sizes must increase ({0}% is not above the wave before it)")]
    WavesNotIncreasing(u32),
    #[error("at least one agent must be activated at a time")]
    NoParallelism,
    #[error("a freeze can only be overridden with a reason")]
    OverrideWithoutReason,
    #[error("failure threshold {0:?} is neither a count nor a percentage up to 100%")]
    Threshold(String),
    #[error("the change note is {0} bytes; at most {MAX_NOTE} are kept")]
    NoteTooLong(usize),
    #[error("the change note contains control characters other than newlines and tabs")]
    NoteControl,
    #[error("the ticket {0:?} is not an http(s) URL of at most {MAX_TICKET} bytes")]
    Ticket(String),
    #[error("promotion rules can only be skipped with a reason")]
    SkipWithoutReason,
    #[error("the start time is more than {MAX_SCHEDULE_DAYS} days ahead")]
    StartTooLate,
    #[error("a reason is at most {MAX_REASON} bytes of text on one line")]
    Reason,
    #[error("{0} lists more than {MAX_LIST} entries")]
    TooMany(&'static str),
}

/// The most regions, region-order prefixes or selector labels a rollout may list.
pub const MAX_LIST: usize = 64;

/// The longest reason for overriding a freeze or skipping promotion.
pub const MAX_REASON: usize = 1024;

/// Whether `s` is a one-line reason of bounded size (it is shown in rollout histories).
pub fn reason_ok(s: &str) -> bool {
    s.len() <= MAX_REASON && !s.chars().any(|c| c.is_control() || is_invisible(c))
}

/// Characters that reorder or hide text on a terminal.
pub fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The longest change note kept (the CLI's `--note-file` reads at most this much).
pub const MAX_NOTE: usize = 16 * 1024;
/// The longest ticket URL.
pub const MAX_TICKET: usize = 2048;
/// How far ahead a deploy may be scheduled.
pub const MAX_SCHEDULE_DAYS: i64 = 90;

/// Failures tolerated per wave before the rollout stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    Count(u32),
    Percent(u32),
}

impl Threshold {
    /// A count (`2`) or a percentage (`10%`).
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::Threshold(s.to_owned());
        match s.strip_suffix('%') {
            Some(p) => p.parse().ok().filter(|p| *p <= 100).map(Threshold::Percent).ok_or_else(bad),
            None => s.parse().map(Threshold::Count).map_err(|_| bad()),
        }
    }

    /// Whether `failures` among `wave_size` agents passes the threshold.
    pub fn exceeded(self, failures: usize, wave_size: usize) -> bool {
        match self {
            Threshold::Count(n) => failures > n as usize,
            Threshold::Percent(p) => failures * 100 > wave_size * p as usize,
        }
    }
}

/// What to deploy, where, and how carefully.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub app: String,
    pub version: String,
    pub regions: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub canary: u32,
    /// Cumulative percentages of the targeted agents, e.g. [10, 50, 100].
    pub waves: Vec<u32>,
    /// Region prefixes in the order regions go; waves run inside each region.
    pub region_order: Vec<String>,
    pub max_parallel: u32,
    #[serde(with = "humantime_serde")]
    pub bake: Duration,
    pub max_failures: Threshold,
    #[serde(default, with = "humantime_serde")]
    pub health_deadline: Option<Duration>,
    pub force: bool,
    #[serde(default)]
    pub downgrade: bool,
    pub supersede: bool,
    /// Set when a freeze window is overridden: the reason.
    pub override_freeze: Option<String>,
    /// Every targeted agent must take the release: an offline one fails the rollout (rolling
    /// back what it moved) instead of being left to converge when it reconnects.
    #[serde(default)]
    pub require_all: bool,
    /// The environment whose agents it targets.
    #[serde(default, skip_serializing_if = "Environment::is_default")]
    pub environment: Environment,
    /// The change note: what changes and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The change ticket's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// When to start (unix seconds): until then the rollout is `scheduled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<i64>,
    /// Set when the environment's promotion rules were skipped: the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_promotion: Option<String>,
}

impl RolloutSpec {
    /// The safe defaults: a canary of one, then 10%, 50%, 100%, stop at the first failure.
    pub fn new(app: &str, version: &str) -> Self {
        Self {
            app: app.into(),
            version: version.into(),
            regions: vec![],
            selector: BTreeMap::new(),
            canary: 1,
            waves: vec![10, 50, 100],
            region_order: vec![],
            max_parallel: 10,
            bake: Duration::from_secs(0),
            max_failures: Threshold::Count(0),
            health_deadline: None,
            force: false,
            downgrade: false,
            supersede: false,
            override_freeze: None,
            require_all: false,
            environment: Environment::default(),
            note: None,
            ticket: None,
            start_at: None,
            skip_promotion: None,
        }
    }
}

impl RolloutSpec {
    /// Checks what the spec itself must satisfy (targets, releases and freezes are checked by
    /// [`crate::logic::Rollouts::deploy`]).
    pub fn validate(&self, now: i64) -> Result<(), SpecError> {
        if let Some(p) = self.waves.iter().find(|p| **p == 0 || **p > 100) {
            return Err(SpecError::WaveOutOfRange(*p));
        }
        if let Some(w) = self.waves.windows(2).find(|w| w[0] >= w[1]) {
            return Err(SpecError::WavesNotIncreasing(w[1]));
        }
        if self.max_parallel == 0 {
            return Err(SpecError::NoParallelism);
        }
        if self.override_freeze.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(SpecError::OverrideWithoutReason);
        }
        if self.skip_promotion.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(SpecError::SkipWithoutReason);
        }
        if [&self.override_freeze, &self.skip_promotion].into_iter().flatten().any(|r| !reason_ok(r)) {
            return Err(SpecError::Reason);
        }
        for (what, n) in [
            ("regions", self.regions.len()),
            ("region order", self.region_order.len()),
            ("selector", self.selector.len()),
        ] {
            if n > MAX_LIST {
                return Err(SpecError::TooMany(what));
            }
        }
        if let Some(note) = &self.note {
            if note.len() > MAX_NOTE {
                return Err(SpecError::NoteTooLong(note.len()));
            }
            if note.chars().any(|c| (c.is_control() && c != '\n' && c != '\t') || is_invisible(c)) {
                return Err(SpecError::NoteControl);
            }
        }
        if let Some(t) = &self.ticket {
            let url_ok = t.len() <= MAX_TICKET
                && (t.starts_with("https://") || t.starts_with("http://"))
                && t.len() > "https://".len()
                && !t.chars().any(|c| c.is_control() || c.is_whitespace() || is_invisible(c));
            if !url_ok {
                return Err(SpecError::Ticket(t.chars().take(80).collect()));
            }
        }
        if self.start_at.is_some_and(|at| at > now + MAX_SCHEDULE_DAYS * 24 * 3600) {
            return Err(SpecError::StartTooLate);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert!(Threshold::parse("0").unwrap().exceeded(1, 5));
        assert!(!Threshold::parse("1").unwrap().exceeded(1, 5));
        assert!(!Threshold::parse("20%").unwrap().exceeded(1, 5));
        assert!(Threshold::parse("20%").unwrap().exceeded(2, 5));
        assert_eq!(Threshold::parse("soon"), Err(SpecError::Threshold("soon".into())));
        assert_eq!(Threshold::parse("120%"), Err(SpecError::Threshold("120%".into())));
    }

    #[test]
    fn validation_names_what_is_wrong_without_cli_wording() {
        let ok = RolloutSpec::new("a", "1.0.0");
        assert_eq!(ok.validate(0), Ok(()));
        let cases = [
            (RolloutSpec { waves: vec![10, 0], ..ok.clone() }, SpecError::WaveOutOfRange(0)),
            (RolloutSpec { waves: vec![10, 101], ..ok.clone() }, SpecError::WaveOutOfRange(101)),
            (RolloutSpec { waves: vec![50, 20], ..ok.clone() }, SpecError::WavesNotIncreasing(20)),
            (RolloutSpec { max_parallel: 0, ..ok.clone() }, SpecError::NoParallelism),
            (
                RolloutSpec { override_freeze: Some(" ".into()), ..ok.clone() },
                SpecError::OverrideWithoutReason,
            ),
            (RolloutSpec { skip_promotion: Some("".into()), ..ok.clone() }, SpecError::SkipWithoutReason),
            (
                RolloutSpec { note: Some("x".repeat(MAX_NOTE + 1)), ..ok.clone() },
                SpecError::NoteTooLong(MAX_NOTE + 1),
            ),
            (RolloutSpec { note: Some("ok\u{1b}[2J".into()), ..ok.clone() }, SpecError::NoteControl),
            (
                RolloutSpec { ticket: Some("javascript:alert(1)".into()), ..ok.clone() },
                SpecError::Ticket("javascript:alert(1)".into()),
            ),
            (
                RolloutSpec { ticket: Some("https://x/a b".into()), ..ok.clone() },
                SpecError::Ticket("https://x/a b".into()),
            ),
            (RolloutSpec { start_at: Some(91 * 24 * 3600), ..ok.clone() }, SpecError::StartTooLate),
        ];
        let fine = RolloutSpec {
            note: Some("Adds the VAT field.\n\tBacked up.".into()),
            ticket: Some("https://tickets.example/CHG-1".into()),
            ..ok.clone()
        };
        assert_eq!(fine.validate(0), Ok(()));
        for (spec, want) in cases {
            let got = spec.validate(0).unwrap_err();
            assert_eq!(got, want);
            assert!(!got.to_string().contains("--"), "{got}");
        }
    }
}
