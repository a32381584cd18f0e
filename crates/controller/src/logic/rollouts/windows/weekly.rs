//! The weekly pattern deploy windows and weekly freezes share: days of the week, a time of day,
//! a time zone, and the openings of a weekly span in real time across daylight-saving changes.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use super::{Problem, HORIZON_DAYS};

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
    pub(super) fn occurrences(&self, t: Timestamp, ahead: i64) -> Vec<(Timestamp, Timestamp)> {
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
