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

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

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

/// A set of weekdays, parsed from `mon-fri`, `sat,sun`, `mon,wed-fri`, `fri-mon` or `daily`
/// (case-insensitive); shown in the same form. Never empty.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Days(u8);

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Days {
    pub const ALL: Days = Days(0b111_1111);

    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.to_monday_zero_offset()) != 0
    }
}

impl FromStr for Days {
    type Err = Problem;

    fn from_str(s: &str) -> Result<Self, Problem> {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() {
            return Err(Problem::NoDays);
        }
        if s == "daily" {
            return Ok(Days::ALL);
        }
        let day = |name: &str| {
            let name = name.trim();
            DAY_NAMES.iter().position(|d| *d == name).ok_or_else(|| Problem::UnknownDay(name.to_string()))
        };
        let mut bits = 0u8;
        for item in s.split(',') {
            match item.split_once('-') {
                // A range may wrap past Sunday: fri-mon is fri, sat, sun, mon.
                Some((a, b)) => {
                    let (mut d, last) = (day(a)?, day(b)?);
                    bits |= 1 << d;
                    while d != last {
                        d = (d + 1) % 7;
                        bits |= 1 << d;
                    }
                }
                None => bits |= 1 << day(item)?,
            }
        }
        Ok(Days(bits))
    }
}

impl fmt::Display for Days {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Days::ALL {
            return f.write_str("daily");
        }
        let mut parts = vec![];
        let mut i = 0;
        while i < 7 {
            if self.0 & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let first = i;
            while i + 1 < 7 && self.0 & (1 << (i + 1)) != 0 {
                i += 1;
            }
            match i - first {
                0 => parts.push(DAY_NAMES[first].to_string()),
                1 => parts.push(format!("{},{}", DAY_NAMES[first], DAY_NAMES[i])),
                _ => parts.push(format!("{}-{}", DAY_NAMES[first], DAY_NAMES[i])),
            }
            i += 1;
        }
        f.write_str(&parts.join(","))
    }
}

impl fmt::Debug for Days {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Days({self})")
    }
}

impl Serialize for Days {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Days {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A time of day to the minute, `HH:MM` on a 24-hour clock (`00:00` to `23:59`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockTime {
    hour: i8,
    minute: i8,
}

impl ClockTime {
    pub fn time(self) -> Time {
        Time::constant(self.hour, self.minute, 0, 0)
    }
}

impl FromStr for ClockTime {
    type Err = Problem;

    fn from_str(s: &str) -> Result<Self, Problem> {
        let bad = || Problem::BadTime(s.to_string());
        let b = s.as_bytes();
        let digit = |i: usize| b.get(i).filter(|c| c.is_ascii_digit()).map(|c| (c - b'0') as i8);
        if b.len() != 5 || b[2] != b':' {
            return Err(bad());
        }
        let (h1, h2, m1, m2) = (digit(0), digit(1), digit(3), digit(4));
        let (Some(h1), Some(h2), Some(m1), Some(m2)) = (h1, h2, m1, m2) else {
            return Err(bad());
        };
        let (hour, minute) = (h1 * 10 + h2, m1 * 10 + m2);
        if hour > 23 || minute > 59 {
            return Err(bad());
        }
        Ok(ClockTime { hour, minute })
    }
}

impl fmt::Display for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

impl Serialize for ClockTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClockTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// An IANA time zone, looked up in the database compiled into the controller; shown and stored
/// by its canonical name.
#[derive(Clone)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl Zone {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }
}

impl FromStr for Zone {
    type Err = Problem;

    fn from_str(s: &str) -> Result<Self, Problem> {
        // An empty name would find nothing anyway; a fixed offset like "+02:00" is not a zone.
        let tz = (!s.trim().is_empty())
            .then(|| TimeZone::get(s).ok())
            .flatten()
            .ok_or_else(|| Problem::UnknownTimeZone(s.to_string()))?;
        let name = tz.iana_name().unwrap_or(s).to_string();
        Ok(Zone { name, tz })
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Zone {}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({})", self.name)
    }
}

impl Serialize for Zone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The first moment at which the local clock of `tz` reads `dt` or later: `dt` itself where it
/// occurs once, its first occurrence where it occurs twice (autumn), and the moment the clocks
/// jump where it is skipped (spring). `None` only at the ends of representable time.
pub fn first_moment_at(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the later offset, the skipped time is a moment before the jump, and the
            // jump is the next transition after it.
            let before_jump = after.to_timestamp(dt).ok()?;
            tz.following(before_jump).next().map(|t| t.timestamp())
        }
    }
}

/// A weekly pattern: on each of `days`, from `start` to `end` local time in `zone` (ending the
/// next day when `end <= start`). The unit of deploy windows and of weekly freezes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeeklySpan {
    pub days: Days,
    pub start: ClockTime,
    pub end: ClockTime,
    pub zone: Zone,
}

impl WeeklySpan {
    /// The occurrence starting on local date `d`, as `[open, close)`; none on other days, or
    /// when a daylight-saving jump swallows it whole.
    fn on(&self, d: Date) -> Option<(Timestamp, Timestamp)> {
        if !self.days.contains(d.weekday()) {
            return None;
        }
        let tz = self.zone.tz();
        let open = first_moment_at(tz, d.to_datetime(self.start.time()))?;
        let end_date = if self.end > self.start { d } else { d.tomorrow().ok()? };
        let close = first_moment_at(tz, end_date.to_datetime(self.end.time()))?;
        (close > open).then_some((open, close))
    }

    /// Occurrences starting from two local days before `t` to `ahead` days after, in order.
    fn occurrences(&self, t: Timestamp, ahead: i64) -> Vec<(Timestamp, Timestamp)> {
        let today = t.to_zoned(self.zone.tz().clone()).date();
        (-2..=ahead).filter_map(|i| today.checked_add(i.days()).ok()).filter_map(|d| self.on(d)).collect()
    }

    /// The occurrence `t` lies in, `[open, close)`.
    pub fn containing(&self, t: Timestamp) -> Option<(Timestamp, Timestamp)> {
        self.occurrences(t, 0).into_iter().find(|&(open, close)| open <= t && t < close)
    }

    /// The first opening after `t`.
    pub fn next_open(&self, t: Timestamp) -> Option<Timestamp> {
        self.occurrences(t, HORIZON_DAYS).into_iter().map(|(open, _)| open).find(|&open| open > t)
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A moment given as local time in a zone, `2026-03-29T03:00` in Europe/Berlin.
    fn at(local: &str, tz: &str) -> Timestamp {
        let dt: DateTime = local.parse().unwrap();
        dt.to_zoned(TimeZone::get(tz).unwrap()).unwrap().timestamp()
    }

    fn berlin(local: &str) -> Timestamp {
        at(local, "Europe/Berlin")
    }

    fn utc(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn window(env: &str, regions: &[&str], days: &str, start: &str, end: &str, tz: &str) -> WindowConfig {
        WindowConfig {
            env: env.into(),
            regions: regions.iter().map(|s| s.to_string()).collect(),
            days: days.into(),
            start: start.into(),
            end: end.into(),
            tz: tz.into(),
        }
    }

    fn windows(entries: &[WindowConfig]) -> DeployWindows {
        DeployWindows::parse(entries).unwrap()
    }

    fn open(closes: Timestamp) -> WindowState {
        WindowState::Open { closes }
    }

    fn closed(opens: Timestamp, at: &str) -> WindowState {
        WindowState::Closed { opens, at: at.into() }
    }

    #[test]
    fn the_config_entry_deserializes_with_default_regions() {
        let text = "[[windows]]\nenv = \"production\"\ndays = \"mon-fri\"\nstart = \"02:00\"\n\
                    end = \"05:00\"\ntz = \"Europe/Berlin\"\n";
        #[derive(Deserialize)]
        struct File {
            windows: Vec<WindowConfig>,
        }
        let f: File = toml::from_str(text).unwrap();
        assert_eq!(f.windows, [window("production", &["*"], "mon-fri", "02:00", "05:00", "Europe/Berlin")]);
        let e = toml::from_str::<File>(&format!("{text}colour = \"blue\"\n")).err().unwrap();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn a_weekday_window_opens_and_closes_in_its_zone() {
        let w = windows(&[window("production", &["eu-*"], "mon-fri", "02:00", "05:00", "Europe/Berlin")]);
        // 2026-06-10 is a Wednesday; Berlin is UTC+2 in summer.
        let table = [
            ("2026-06-10T01:59", closed(berlin("2026-06-10T02:00"), "02:00 Europe/Berlin")),
            ("2026-06-10T02:00", open(berlin("2026-06-10T05:00"))),
            ("2026-06-10T04:59", open(berlin("2026-06-10T05:00"))),
            ("2026-06-10T05:00", closed(berlin("2026-06-11T02:00"), "02:00 Europe/Berlin")),
            // Friday after the window: Monday is more than a day away, so the weekday shows.
            ("2026-06-12T06:00", closed(berlin("2026-06-15T02:00"), "Mon 02:00 Europe/Berlin")),
            ("2026-06-13T03:00", closed(berlin("2026-06-15T02:00"), "Mon 02:00 Europe/Berlin")),
        ];
        for (now, want) in table {
            assert_eq!(w.state("production", "eu-west", berlin(now)), want, "at {now}");
        }
        // The same instant seen from UTC: 00:00Z is 02:00 in Berlin.
        assert_eq!(
            w.state("production", "eu-west", utc("2026-06-10T00:00:00Z")),
            open(utc("2026-06-10T03:00:00Z"))
        );
    }

    #[test]
    fn unrestricted_regions_and_envs() {
        let w = windows(&[window("production", &["eu-*", "us-east"], "daily", "02:00", "03:00", "UTC")]);
        let noon = utc("2026-06-10T12:00:00Z");
        let table = [
            ("production", "eu-west", false),
            ("production", "us-east", false),
            ("production", "us-west", true),
            ("production", "ap-south", true),
            ("staging", "eu-west", true),
            ("Production", "eu-west", true),
        ];
        for (env, region, unrestricted) in table {
            let s = w.state(env, region, noon);
            assert_eq!(s == WindowState::Unrestricted, unrestricted, "{env}/{region}: {s:?}");
            assert_eq!(s.may_activate(), unrestricted, "{env}/{region}");
        }
        assert_eq!(DeployWindows::default().state("production", "eu-west", noon), WindowState::Unrestricted);
        assert!(DeployWindows::default().is_empty() && !w.is_empty());
    }

    #[test]
    fn globs_match_the_whole_region_name() {
        let table = [
            ("*", "eu-west", true),
            ("*", "", true),
            ("eu-*", "eu-west", true),
            ("eu-*", "eu-", true),
            ("eu-*", "us-eu-west", false),
            ("*-west", "eu-west", true),
            ("*-west", "eu-westish", false),
            ("eu-?", "eu-1", true),
            ("eu-?", "eu-12", false),
            ("eu-?", "eu-", false),
            ("e*-*t", "eu-west", true),
            ("e*-*t", "eu-wes", false),
            ("**a", "aaa", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyyb", false),
            ("us-east", "us-east", true),
            ("us-east", "us-east-2", false),
        ];
        for (pattern, text, want) in table {
            assert_eq!(glob_matches(pattern, text), want, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn a_window_crossing_midnight_closes_the_next_day() {
        let w = windows(&[window("prod", &["*"], "daily", "22:00", "02:00", "UTC")]);
        let table = [
            ("2026-06-10T21:59:00Z", closed(utc("2026-06-10T22:00:00Z"), "22:00 UTC")),
            ("2026-06-10T22:00:00Z", open(utc("2026-06-11T02:00:00Z"))),
            ("2026-06-10T23:59:59Z", open(utc("2026-06-11T02:00:00Z"))),
            ("2026-06-11T00:30:00Z", open(utc("2026-06-11T02:00:00Z"))),
            ("2026-06-11T02:00:00Z", closed(utc("2026-06-11T22:00:00Z"), "22:00 UTC")),
        ];
        for (now, want) in table {
            assert_eq!(w.state("prod", "eu", utc(now)), want, "at {now}");
        }
        // Equal start and end: a whole day from that time, back to back.
        let all_day = windows(&[window("prod", &["*"], "mon", "06:00", "06:00", "UTC")]);
        // 2026-06-08 is a Monday.
        assert_eq!(
            all_day.state("prod", "eu", utc("2026-06-09T05:59:00Z")),
            open(utc("2026-06-09T06:00:00Z"))
        );
        assert!(!all_day.state("prod", "eu", utc("2026-06-09T06:00:00Z")).may_activate());
    }

    #[test]
    fn days_name_the_day_a_window_starts() {
        // Friday night into Saturday is open although Saturday is not in mon-fri; Sunday night
        // into Monday is not, although Monday is.
        let w = windows(&[window("prod", &["*"], "mon-fri", "22:00", "02:00", "UTC")]);
        let table = [
            ("2026-06-12T23:00:00Z", open(utc("2026-06-13T02:00:00Z"))), // Friday 23:00
            ("2026-06-13T01:00:00Z", open(utc("2026-06-13T02:00:00Z"))), // Saturday 01:00
            ("2026-06-13T02:00:00Z", closed(utc("2026-06-15T22:00:00Z"), "Mon 22:00 UTC")),
            ("2026-06-13T23:00:00Z", closed(utc("2026-06-15T22:00:00Z"), "Mon 22:00 UTC")),
            ("2026-06-15T01:00:00Z", closed(utc("2026-06-15T22:00:00Z"), "22:00 UTC")), // Monday 01:00
            ("2026-06-15T22:30:00Z", open(utc("2026-06-16T02:00:00Z"))),
        ];
        for (now, want) in table {
            assert_eq!(w.state("prod", "eu", utc(now)), want, "at {now}");
        }
    }

    #[test]
    fn several_windows_are_a_union() {
        let w = windows(&[
            window("prod", &["eu-*"], "daily", "02:00", "04:00", "UTC"),
            window("prod", &["eu-west"], "daily", "03:00", "06:00", "UTC"),
            window("prod", &["*"], "sat,sun", "12:00", "13:00", "UTC"),
            // Touching the eu-west union at 06:00 carries it on.
            window("prod", &["eu-west"], "daily", "06:00", "07:00", "UTC"),
        ]);
        let table = [
            // eu-west: 02:00-04:00 ∪ 03:00-06:00 ∪ 06:00-07:00 is one window to 07:00.
            ("eu-west", "2026-06-10T02:30:00Z", open(utc("2026-06-10T07:00:00Z"))),
            ("eu-west", "2026-06-10T05:00:00Z", open(utc("2026-06-10T07:00:00Z"))),
            ("eu-west", "2026-06-10T07:00:00Z", closed(utc("2026-06-11T02:00:00Z"), "02:00 UTC")),
            // eu-north only has the first.
            ("eu-north", "2026-06-10T02:30:00Z", open(utc("2026-06-10T04:00:00Z"))),
            ("eu-north", "2026-06-10T05:00:00Z", closed(utc("2026-06-11T02:00:00Z"), "02:00 UTC")),
            // Every region also has the weekend noon window; us only that one.
            ("eu-north", "2026-06-13T12:30:00Z", open(utc("2026-06-13T13:00:00Z"))),
            ("us-east", "2026-06-13T12:30:00Z", open(utc("2026-06-13T13:00:00Z"))),
            ("us-east", "2026-06-10T02:30:00Z", closed(utc("2026-06-13T12:00:00Z"), "Sat 12:00 UTC")),
        ];
        for (region, now, want) in table {
            assert_eq!(w.state("prod", region, utc(now)), want, "{region} at {now}");
        }
    }

    /// 2026-03-29 (last Sunday of March): Berlin skips 02:00-03:00 (CET→CEST). 2026-10-25 (last
    /// Sunday of October): 02:00-03:00 happens twice (CEST, then CET).
    #[test]
    fn windows_follow_the_berlin_daylight_saving_changes() {
        let w =
            |start: &str, end: &str| windows(&[window("p", &["*"], "daily", start, end, "Europe/Berlin")]);
        let state = |w: &DeployWindows, now: &str| w.state("p", "eu", utc(now));
        // A clock moving across the spring-forward night, 01:00-05:00 window: it opens at 01:00
        // CET (00:00Z) and closes at 05:00 CEST (03:00Z), three real hours.
        let night = w("01:00", "05:00");
        for (now, want) in [
            ("2026-03-28T23:59:00Z", closed(utc("2026-03-29T00:00:00Z"), "01:00 Europe/Berlin")),
            ("2026-03-29T00:00:00Z", open(utc("2026-03-29T03:00:00Z"))),
            ("2026-03-29T00:59:59Z", open(utc("2026-03-29T03:00:00Z"))),
            ("2026-03-29T01:00:00Z", open(utc("2026-03-29T03:00:00Z"))), // 03:00 CEST
            ("2026-03-29T03:00:00Z", closed(utc("2026-03-29T23:00:00Z"), "01:00 Europe/Berlin")),
            // The next night is CEST throughout: 01:00 CEST is 23:00Z.
            ("2026-03-29T23:00:00Z", open(utc("2026-03-30T03:00:00Z"))),
        ] {
            assert_eq!(state(&night, now), want, "01:00-05:00 at {now}");
        }
        // A start skipped by the jump opens when the clocks jump (03:00 CEST = 01:00Z); the
        // window keeps its end.
        let skipped = w("02:30", "04:00");
        for (now, want) in [
            ("2026-03-29T00:30:00Z", closed(utc("2026-03-29T01:00:00Z"), "03:00 Europe/Berlin")),
            ("2026-03-29T01:00:00Z", open(utc("2026-03-29T02:00:00Z"))),
            ("2026-03-28T01:30:00Z", open(utc("2026-03-28T03:00:00Z"))), // the day before: CET
            ("2026-03-30T00:30:00Z", open(utc("2026-03-30T02:00:00Z"))), // the day after: CEST
        ] {
            assert_eq!(state(&skipped, now), want, "02:30-04:00 at {now}");
        }
        // An end skipped by the jump closes when the clocks jump.
        let early = w("01:00", "02:30");
        assert_eq!(state(&early, "2026-03-29T00:10:00Z"), open(utc("2026-03-29T01:00:00Z")));
        // A window wholly inside the skipped hour does not open that night.
        let lost = w("02:10", "02:50");
        assert_eq!(
            state(&lost, "2026-03-29T00:00:00Z"),
            closed(utc("2026-03-30T00:10:00Z"), "Mon 02:10 Europe/Berlin"),
            "skipped on the 29th, back on the 30th (02:10 CEST = 00:10Z)"
        );
        assert_eq!(state(&lost, "2026-03-28T01:20:00Z"), open(utc("2026-03-28T01:50:00Z")));

        // Autumn: 01:00-05:00 opens at 01:00 CEST (23:00Z) and closes at 05:00 CET (04:00Z).
        for (now, want) in [
            ("2026-10-24T22:59:00Z", closed(utc("2026-10-24T23:00:00Z"), "01:00 Europe/Berlin")),
            ("2026-10-24T23:00:00Z", open(utc("2026-10-25T04:00:00Z"))),
            ("2026-10-25T00:30:00Z", open(utc("2026-10-25T04:00:00Z"))), // first 02:30 (CEST)
            ("2026-10-25T01:30:00Z", open(utc("2026-10-25T04:00:00Z"))), // second 02:30 (CET)
            ("2026-10-25T04:00:00Z", closed(utc("2026-10-26T00:00:00Z"), "01:00 Europe/Berlin")),
        ] {
            assert_eq!(state(&night, now), want, "01:00-05:00 at {now}");
        }
        // A start or end that happens twice means its first occurrence: 02:30 CEST = 00:30Z.
        let twice = w("02:30", "04:00");
        assert_eq!(
            state(&twice, "2026-10-25T00:00:00Z"),
            closed(utc("2026-10-25T00:30:00Z"), "02:30 Europe/Berlin")
        );
        assert_eq!(state(&twice, "2026-10-25T00:30:00Z"), open(utc("2026-10-25T03:00:00Z")));
        let ends_twice = w("01:00", "02:30");
        assert_eq!(state(&ends_twice, "2026-10-25T00:00:00Z"), open(utc("2026-10-25T00:30:00Z")));
        assert!(!state(&ends_twice, "2026-10-25T01:00:00Z").may_activate(), "the second 02:00-02:30 is out");
    }

    #[test]
    fn the_waiting_message_names_the_region_the_zone_and_the_wait() {
        let w = windows(&[window("production", &["eu-*"], "daily", "02:00", "05:00", "Europe/Berlin")]);
        let now = berlin("2026-06-09T22:48");
        let s = w.state("production", "eu-west", now);
        assert_eq!(
            s.waiting_message("eu-west", now).as_deref(),
            Some("waiting for the eu-west window (opens 02:00 Europe/Berlin, in 3h12m)")
        );
        let inside = berlin("2026-06-10T03:00");
        assert_eq!(w.state("production", "eu-west", inside).waiting_message("eu-west", inside), None);
        assert_eq!(WindowState::Unrestricted.waiting_message("us-east", inside), None);
        for (secs, want) in
            [(0, "1m"), (30, "1m"), (60, "1m"), (61, "2m"), (3600, "1h00m"), (11_520, "3h12m")]
        {
            assert_eq!(fmt_wait(secs), want, "{secs}s");
        }
        assert_eq!(fmt_wait(2 * 86_400 + 3 * 3600), "2d3h");
    }

    #[test]
    fn every_parse_error_names_the_entry_field_and_problem() {
        let ok = window("production", &["eu-*"], "mon-fri", "02:00", "05:00", "Europe/Berlin");
        let table: Vec<(WindowConfig, &str, Problem)> = vec![
            (WindowConfig { env: " ".into(), ..ok.clone() }, "env", Problem::EmptyEnv),
            (
                WindowConfig { env: "Production".into(), ..ok.clone() },
                "env",
                Problem::BadEnv("Production".into()),
            ),
            (WindowConfig { regions: vec![], ..ok.clone() }, "regions", Problem::EmptyRegions),
            (
                WindowConfig { regions: vec!["eu-*".into(), "".into()], ..ok.clone() },
                "regions",
                Problem::BadRegionPattern("".into()),
            ),
            (
                WindowConfig { regions: vec!["eu west".into()], ..ok.clone() },
                "regions",
                Problem::BadRegionPattern("eu west".into()),
            ),
            (WindowConfig { days: "".into(), ..ok.clone() }, "days", Problem::NoDays),
            (WindowConfig { days: "fry".into(), ..ok.clone() }, "days", Problem::UnknownDay("fry".into())),
            (
                WindowConfig { days: "mon-fry".into(), ..ok.clone() },
                "days",
                Problem::UnknownDay("fry".into()),
            ),
            (WindowConfig { days: "mon,,fri".into(), ..ok.clone() }, "days", Problem::UnknownDay("".into())),
            (
                WindowConfig { days: "weekdays".into(), ..ok.clone() },
                "days",
                Problem::UnknownDay("weekdays".into()),
            ),
            (WindowConfig { start: "2:00".into(), ..ok.clone() }, "start", Problem::BadTime("2:00".into())),
            (WindowConfig { start: "24:00".into(), ..ok.clone() }, "start", Problem::BadTime("24:00".into())),
            (WindowConfig { start: "02:60".into(), ..ok.clone() }, "start", Problem::BadTime("02:60".into())),
            (
                WindowConfig { start: "02:00:00".into(), ..ok.clone() },
                "start",
                Problem::BadTime("02:00:00".into()),
            ),
            (WindowConfig { end: "5pm".into(), ..ok.clone() }, "end", Problem::BadTime("5pm".into())),
            (WindowConfig { end: "+5:00".into(), ..ok.clone() }, "end", Problem::BadTime("+5:00".into())),
            (
                WindowConfig { tz: "Europe/Bonn".into(), ..ok.clone() },
                "tz",
                Problem::UnknownTimeZone("Europe/Bonn".into()),
            ),
            (WindowConfig { tz: "".into(), ..ok.clone() }, "tz", Problem::UnknownTimeZone("".into())),
        ];
        for (entry, field, problem) in table {
            let env = entry.env.clone();
            let err = DeployWindows::parse(&[ok.clone(), entry]).unwrap_err();
            assert_eq!(err, WindowError { entry: 2, env, field, problem: problem.clone() });
            let text = err.to_string();
            assert!(
                text.starts_with("[[windows]] entry 2 (env ") && text.contains(&format!("`{field}`")),
                "{text}"
            );
        }
        let e = DeployWindows::parse(&[WindowConfig { days: "fry".into(), ..ok }]).unwrap_err().to_string();
        assert_eq!(
            e,
            "[[windows]] entry 1 (env \"production\"): `days`: unknown day \"fry\": use mon, tue, wed, thu, \
             fri, sat or sun, a range like mon-fri, or daily"
        );
    }

    #[test]
    fn days_parse_and_show_canonically() {
        let table = [
            ("mon-fri", "mon-fri"),
            ("sat,sun", "sat,sun"),
            ("SAT, Sun", "sat,sun"),
            ("mon,wed-fri", "mon,wed-fri"),
            ("fri-mon", "mon,fri-sun"),
            ("daily", "daily"),
            ("mon-sun", "daily"),
            ("sun-sat", "daily"),
            ("wed", "wed"),
            ("fri-fri", "fri"),
            ("tue,thu,tue", "tue,thu"),
        ];
        for (input, shown) in table {
            let d: Days = input.parse().unwrap();
            assert_eq!(d.to_string(), shown, "{input}");
            assert_eq!(d.to_string().parse::<Days>().unwrap(), d, "{input} round-trips");
        }
        let fri_mon: Days = "fri-mon".parse().unwrap();
        assert!(fri_mon.contains(Weekday::Sunday) && fri_mon.contains(Weekday::Monday));
        assert!(!fri_mon.contains(Weekday::Tuesday));
        assert_eq!("Europe/Berlin".parse::<Zone>().unwrap().name(), "Europe/Berlin");
        assert_eq!("09:05".parse::<ClockTime>().unwrap().to_string(), "09:05");
    }
}
