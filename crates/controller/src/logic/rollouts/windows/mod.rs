//! Deploy windows: the local times at which a rollout may activate releases in an environment's
//! regions. Pure: every function takes the time it is asked about, so tests move the clock.
//!
//! Configured as `[[windows]]` entries of the controller's config ([`WindowConfig`]):
//!
//! ```toml
//! [[windows]]
//! env = "production"
//! regions = ["eu-*"]      # glob patterns ('*' any run, '?' one character); default ["*"]
//! days = "mon-fri"        # "mon-fri", "sat,sun", "mon,wed-fri", "fri-mon" (wraps), "daily"
//! start = "02:00"         # 24-hour HH:MM, local time in `tz`
//! end = "05:00"           # end <= start: the window crosses midnight; equal: 24 hours
//! tz = "Europe/Berlin"    # IANA name
//! ```
//!
//! Semantics ([`DeployWindows::state`]):
//! - A region of an environment that no entry covers is [`WindowState::Unrestricted`]. One
//!   covered by one or more entries may activate only inside one of them: the entries are a
//!   union, and a window that another overlaps or touches stays open until the last one closes.
//! - `days` names the day a window *starts*: with `days = "mon-fri"`, `start = "22:00"` and
//!   `end = "02:00"`, Friday 22:00 to Saturday 02:00 is open; Sunday night is not.
//! - Daylight saving time: a window opens (closes) at the first moment the local clock reads its
//!   start (end) time or later on that date. A time skipped by a spring-forward change therefore
//!   means the moment the clocks jump (02:30 on the last Sunday of March in Europe/Berlin opens
//!   at 03:00 CEST), and a time that occurs twice in autumn means its first occurrence (02:30
//!   CEST, not 02:30 CET). A window lying wholly inside the skipped hour does not open that day.
//!   Windows are measured in real time: 01:00–05:00 lasts three hours on the spring-forward
//!   night and five in autumn.
//!
//! The same weekly pattern, [`WeeklySpan`], and its parts ([`Days`], [`ClockTime`], [`Zone`])
//! serve the weekly recurring freezes.

use jiff::civil::Weekday;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;
mod weekly;

pub use weekly::{first_moment_at, ClockTime, Days, WeeklySpan, Zone};

/// How many days ahead the next opening, or the end of an open window, is looked for. A week
/// always holds an opening of every entry (its days are never empty), the second week covers an
/// occurrence a daylight-saving jump swallowed.
const HORIZON_DAYS: i64 = 15;

/// One `[[windows]]` entry of the controller's config, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// The environment the entry restricts, matched exactly.
    pub env: String,
    /// Region glob patterns (`*`, `?`); every region when left out.
    #[serde(default = "every_region")]
    pub regions: Vec<String>,
    /// The days a window starts on: `mon-fri`, `sat,sun`, `mon,wed-fri`, `daily`.
    pub days: String,
    /// `HH:MM`, local time in `tz`.
    pub start: String,
    /// `HH:MM`; at or before `start`, the window ends the next day.
    pub end: String,
    /// An IANA time zone name, `Europe/Berlin`.
    pub tz: String,
}

fn every_region() -> Vec<String> {
    vec!["*".into()]
}

/// What is wrong with one field of a window (or of a weekly freeze, which shares the parts).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must not be empty")]
    EmptyEnv,
    /// Not an environment name: it would never match an agent's environment, and the region
    /// would silently have no window.
    #[error("{0:?} is not an environment name (lowercase letters, digits and '-', starting with a letter)")]
    BadEnv(String),
    #[error("no patterns: leave `regions` out to cover every region")]
    EmptyRegions,
    #[error("region pattern {0:?} is empty or contains whitespace")]
    BadRegionPattern(String),
    #[error("no days given: use e.g. mon-fri, sat,sun, mon,wed-fri or daily")]
    NoDays,
    #[error("unknown day {0:?}: use mon, tue, wed, thu, fri, sat or sun, a range like mon-fri, or daily")]
    UnknownDay(String),
    #[error("{0:?} is not a time of day like 02:00 (24-hour HH:MM)")]
    BadTime(String),
    #[error("unknown time zone {0:?}: use an IANA name like Europe/Berlin")]
    UnknownTimeZone(String),
}

/// A `[[windows]]` entry that does not parse: which entry (counted from 1), which field, why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("[[windows]] entry {entry} (env {env:?}): `{field}`: {problem}")]
pub struct WindowError {
    pub entry: usize,
    pub env: String,
    pub field: &'static str,
    pub problem: Problem,
}

/// Whether a region may activate now, and until or from when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowState {
    /// No window covers this environment and region: it may activate at any time.
    Unrestricted,
    /// Inside a window that closes at `closes` (the end of the union of the windows that
    /// overlap or touch the current one, looked for up to two weeks ahead).
    Open { closes: Timestamp },
    /// Outside every window covering it; the next opens at `opens`, local time `at`
    /// (`"02:00 Europe/Berlin"`, with the weekday, `"Mon 02:00 Europe/Berlin"`, when it is more
    /// than a day away). `opens` is [`Timestamp::MAX`] and `at` is `"never"` only if no
    /// window opens again before the end of representable time.
    Closed { opens: Timestamp, at: String },
}

impl WindowState {
    /// Whether a release may be activated in this state.
    pub fn may_activate(&self) -> bool {
        !matches!(self, WindowState::Closed { .. })
    }

    /// For a closed region: `waiting for the eu-west window (opens 02:00 Europe/Berlin, in
    /// 3h12m)`. `None` when it may activate.
    pub fn waiting_message(&self, region: &str, now: Timestamp) -> Option<String> {
        match self {
            WindowState::Closed { opens, .. } if *opens == Timestamp::MAX => {
                Some(format!("waiting for the {region} window (no window opens again)"))
            }
            WindowState::Closed { opens, at } => Some(format!(
                "waiting for the {region} window (opens {at}, in {})",
                fmt_wait(opens.as_second() - now.as_second())
            )),
            _ => None,
        }
    }
}

/// A wait to the minute, rounded up: `3h12m`, `45m`, `2d3h`, `1m`.
fn fmt_wait(secs: i64) -> String {
    let minutes = (secs.max(0) + 59) / 60;
    let (d, h, m) = (minutes / 1440, minutes / 60 % 24, minutes % 60);
    match (d, h) {
        (0, 0) => format!("{}m", m.max(1)),
        (0, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// One validated `[[windows]]` entry.
#[derive(Clone, Debug)]
struct Rule {
    env: String,
    regions: Vec<String>,
    span: WeeklySpan,
}

/// The validated `[[windows]]` entries of a config. Empty: every region is unrestricted.
#[derive(Clone, Debug, Default)]
pub struct DeployWindows {
    rules: Vec<Rule>,
}

impl DeployWindows {
    /// Validates every entry; the first bad one is the error.
    pub fn parse(entries: &[WindowConfig]) -> Result<Self, WindowError> {
        let rules = entries
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let err = |field: &'static str| {
                    move |problem: Problem| WindowError { entry: i + 1, env: c.env.clone(), field, problem }
                };
                if c.env.trim().is_empty() {
                    return Err(err("env")(Problem::EmptyEnv));
                }
                if crate::logic::Environment::parse(&c.env).is_err() {
                    return Err(err("env")(Problem::BadEnv(c.env.clone())));
                }
                if c.regions.is_empty() {
                    return Err(err("regions")(Problem::EmptyRegions));
                }
                if let Some(p) = c.regions.iter().find(|p| p.is_empty() || p.chars().any(char::is_whitespace))
                {
                    return Err(err("regions")(Problem::BadRegionPattern(p.clone())));
                }
                let span = WeeklySpan {
                    days: c.days.parse().map_err(err("days"))?,
                    start: c.start.parse().map_err(err("start"))?,
                    end: c.end.parse().map_err(err("end"))?,
                    zone: c.tz.parse().map_err(err("tz"))?,
                };
                Ok(Rule { env: c.env.clone(), regions: c.regions.clone(), span })
            })
            .collect::<Result<_, _>>()?;
        Ok(DeployWindows { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `region` of `env` may activate at `now`: see the module documentation.
    pub fn state(&self, env: &str, region: &str, now: Timestamp) -> WindowState {
        let spans: Vec<&WeeklySpan> = self
            .rules
            .iter()
            .filter(|r| r.env == env && r.regions.iter().any(|p| glob_matches(p, region)))
            .map(|r| &r.span)
            .collect();
        if spans.is_empty() {
            return WindowState::Unrestricted;
        }
        let mut occurrences: Vec<(Timestamp, Timestamp, &WeeklySpan)> = spans
            .iter()
            .flat_map(|s| s.occurrences(now, HORIZON_DAYS).into_iter().map(move |(o, c)| (o, c, *s)))
            .collect();
        occurrences.sort_by_key(|&(open, close, _)| (open, close));
        let current = occurrences.iter().filter(|(o, c, _)| *o <= now && now < *c).map(|(_, c, _)| *c).max();
        if let Some(mut closes) = current {
            // The union: windows that start before the current one closes carry it on.
            for (open, close, _) in &occurrences {
                if *open > closes {
                    break;
                }
                closes = closes.max(*close);
            }
            return WindowState::Open { closes };
        }
        match occurrences.iter().find(|(open, _, _)| *open > now) {
            Some((opens, _, span)) => {
                let local = opens.to_zoned(span.zone.tz().clone());
                let day = if opens.as_second() - now.as_second() > 86_400 {
                    format!("{} ", weekday_name(local.weekday()))
                } else {
                    String::new()
                };
                let at = format!("{day}{:02}:{:02} {}", local.hour(), local.minute(), span.zone);
                WindowState::Closed { opens: *opens, at }
            }
            None => WindowState::Closed { opens: Timestamp::MAX, at: "never".into() },
        }
    }
}

fn weekday_name(d: Weekday) -> &'static str {
    ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][d.to_monday_zero_offset() as usize]
}

/// Glob matching over the whole text: `*` matches any run of characters, `?` exactly one.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen, and where in the text its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            star = Some((sp, st + 1));
            pi = sp + 1;
            ti = st + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}
