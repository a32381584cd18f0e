//! Freeze windows: times when deploys of an app, or to a region, are refused.
//!
//! A freeze is one-off (`from`..`to`, Unix seconds) or recurring ([`Recurrence`]): every year
//! between two times of the year (`11-26T00:00` to `12-02T23:59`, crossing the year end when
//! the end comes first, `12-20T00:00` to `01-02T00:00`), or every week on some days between two
//! times of day (`fri-sun`, `18:00` to `23:00`, crossing midnight when the end comes first), in
//! an IANA time zone. Local times follow the deploy windows' daylight-saving rule
//! ([`super::windows`]): a skipped time means the moment the clocks jump, a repeated time its
//! first occurrence. A freeze may carry a name, unique among freezes, that removal accepts in
//! place of its id.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use jiff::civil::Date;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::windows::{first_moment_at, ClockTime, Days, Problem, WeeklySpan, Zone};
use super::Rollouts;
use crate::logic::{Error, Result};
use crate::store::Tree;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FreezeWindow {
    pub id: String,
    /// One-off freezes: from when, Unix seconds. Recurring ones: unused (0).
    pub from: i64,
    /// One-off freezes: until when (exclusive), Unix seconds. Recurring ones: unused (0).
    pub to: i64,
    pub reason: String,
    pub app: Option<String>,
    pub region: Option<String>,
    pub created_by: String,
    /// Unique among freezes; removal accepts it in place of the id. Absent from older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Set: the freeze recurs, and `from`/`to` are unused. Absent from older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence: Option<Recurrence>,
}

impl FreezeWindow {
    /// Whether this window freezes a deploy of `app` to `regions` at time `t`.
    pub fn freezes(&self, app: &str, regions: &HashSet<String>, t: i64) -> bool {
        self.frozen_until(app, regions, t).is_some()
    }

    /// When the freeze of a deploy of `app` to `regions` at time `t` ends (exclusive, Unix
    /// seconds): `to`, or the end of the recurrence's current occurrence. `None`: not frozen.
    pub fn frozen_until(&self, app: &str, regions: &HashSet<String>, t: i64) -> Option<i64> {
        let covers = self.app.as_deref().is_none_or(|a| a == app)
            && self.region.as_ref().is_none_or(|r| regions.contains(r));
        if !covers {
            return None;
        }
        match &self.recurrence {
            None => (self.from <= t && t < self.to).then_some(self.to),
            Some(r) => r.active_at(Timestamp::from_second(t).ok()?).map(Timestamp::as_second),
        }
    }

    /// A recurring freeze's next start after `t`, Unix seconds; `None` for a one-off freeze.
    pub fn next_start(&self, t: i64) -> Option<i64> {
        let r = self.recurrence.as_ref()?;
        r.next_start(Timestamp::from_second(t).ok()?).map(Timestamp::as_second)
    }

    /// How refusals name it: `black-friday [fz-3]`, or the id alone.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} [{}]", self.id),
            None => self.id.clone(),
        }
    }
}

/// How a freeze recurs. Stored, and listed, as
/// `{"every": "year", "from": "11-26T00:00", "to": "12-02T23:59", "tz": "America/New_York"}` or
/// `{"every": "week", "days": "fri-sun", "from": "18:00", "to": "23:00", "tz": "Europe/Berlin"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "every", rename_all = "snake_case")]
pub enum Recurrence {
    /// Every year from `from` to `to`; a `to` at or before `from` ends the next year.
    Year { from: YearTime, to: YearTime, tz: Zone },
    /// On each of `days`, from `from` to `to`; a `to` at or before `from` ends the next day
    /// (equal: a whole day).
    Week { days: Days, from: ClockTime, to: ClockTime, tz: Zone },
}

/// A recurrence that does not parse, worded as the `convoy freeze add` flags that set it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecurrenceError {
    #[error("--every {0:?}: use year or week")]
    UnknownEvery(String),
    #[error("--{field}: {problem}")]
    Field { field: &'static str, problem: Problem },
    #[error("--{field} {value:?} is not a time of the year like 11-26T00:00 (MM-DDTHH:MM)")]
    BadYearTime { field: &'static str, value: String },
    #[error("--{field} {value:?}: February 29 is not in every year; use 02-28 or 03-01")]
    LeapDay { field: &'static str, value: String },
    #[error("--days is only for --every week")]
    DaysWithYear,
    #[error("a yearly freeze must end at another time of the year than it starts")]
    EmptyYear,
}

impl Recurrence {
    /// Validates a recurrence: `every` is `year` (`from`/`to` as `MM-DDTHH:MM`, no `days`) or
    /// `week` (`days` like `fri-sun`, `from`/`to` as `HH:MM`); `tz` an IANA name.
    pub fn parse(every: &str, days: &str, from: &str, to: &str, tz: &str) -> Result<Self, RecurrenceError> {
        let field = |field: &'static str| move |problem: Problem| RecurrenceError::Field { field, problem };
        let zone = || tz.parse::<Zone>().map_err(field("tz"));
        match every {
            "year" => {
                if !days.is_empty() {
                    return Err(RecurrenceError::DaysWithYear);
                }
                let (from, to) = (YearTime::parse("from", from)?, YearTime::parse("to", to)?);
                if from == to {
                    return Err(RecurrenceError::EmptyYear);
                }
                Ok(Recurrence::Year { from, to, tz: zone()? })
            }
            "week" => Ok(Recurrence::Week {
                days: days.parse().map_err(field("days"))?,
                from: from.parse().map_err(field("from"))?,
                to: to.parse().map_err(field("to"))?,
                tz: zone()?,
            }),
            other => Err(RecurrenceError::UnknownEvery(other.to_string())),
        }
    }

    /// The end of the occurrence `t` lies in; `None` between occurrences.
    pub fn active_at(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Recurrence::Week { .. } => self.weekly()?.containing(t).map(|(_, close)| close),
            Recurrence::Year { tz, .. } => {
                let year = t.to_zoned(tz.tz().clone()).year();
                [year.checked_sub(1)?, year]
                    .into_iter()
                    .filter_map(|y| self.in_year(y))
                    .find(|&(open, close)| open <= t && t < close)
                    .map(|(_, close)| close)
            }
        }
    }

    /// The first start after `t`.
    pub fn next_start(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Recurrence::Week { .. } => self.weekly()?.next_open(t),
            Recurrence::Year { tz, .. } => {
                let year = t.to_zoned(tz.tz().clone()).year();
                [Some(year), year.checked_add(1)]
                    .into_iter()
                    .flatten()
                    .filter_map(|y| self.in_year(y))
                    .map(|(open, _)| open)
                    .find(|&open| open > t)
            }
        }
    }

    fn weekly(&self) -> Option<WeeklySpan> {
        match self {
            Recurrence::Week { days, from, to, tz } => {
                Some(WeeklySpan { days: *days, start: *from, end: *to, zone: tz.clone() })
            }
            Recurrence::Year { .. } => None,
        }
    }

    /// A yearly recurrence's occurrence starting in `year`, `[open, close)`.
    fn in_year(&self, year: i16) -> Option<(Timestamp, Timestamp)> {
        let Recurrence::Year { from, to, tz } = self else { return None };
        let end_year = if to > from { year } else { year.checked_add(1)? };
        let open = first_moment_at(tz.tz(), from.on(year)?)?;
        let close = first_moment_at(tz.tz(), to.on(end_year)?)?;
        (close > open).then_some((open, close))
    }
}

/// A time of the year to the minute, `MM-DDTHH:MM` (`11-26T00:00`). February 29 is refused: a
/// yearly freeze must fall in every year.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct YearTime {
    month: i8,
    day: i8,
    time: ClockTime,
}

impl YearTime {
    fn parse(field: &'static str, s: &str) -> Result<Self, RecurrenceError> {
        let bad = || RecurrenceError::BadYearTime { field, value: s.to_string() };
        let (date, time) = s.split_once('T').ok_or_else(bad)?;
        let (month, day) = date.split_once('-').ok_or_else(bad)?;
        let number = |x: &str| {
            (x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit())).then(|| x.parse::<i8>().ok()).flatten()
        };
        let (month, day) = (number(month).ok_or_else(bad)?, number(day).ok_or_else(bad)?);
        let time: ClockTime = time.parse().map_err(|_| bad())?;
        if month == 2 && day == 29 {
            return Err(RecurrenceError::LeapDay { field, value: s.to_string() });
        }
        // 2025 is not a leap year: a day valid in it is valid in every year.
        Date::new(2025, month, day).map_err(|_| bad())?;
        Ok(YearTime { month, day, time })
    }

    fn on(self, year: i16) -> Option<jiff::civil::DateTime> {
        Some(Date::new(year, self.month, self.day).ok()?.to_datetime(self.time.time()))
    }
}

impl FromStr for YearTime {
    type Err = RecurrenceError;

    fn from_str(s: &str) -> Result<Self, RecurrenceError> {
        YearTime::parse("from", s)
    }
}

impl fmt::Display for YearTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}-{:02}T{}", self.month, self.day, self.time)
    }
}

impl Serialize for YearTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for YearTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a freeze name: 1 to 63 lowercase letters, digits and dashes, starting with a letter
/// or digit, and not `fz-…`, which would read as an id.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "freeze name {name:?}: use 1 to 63 lowercase letters, digits and dashes, e.g. black-friday"
        )));
    }
    if name.starts_with("fz-") {
        return Err(Error::InvalidArgument(format!(
            "freeze name {name:?}: names starting with fz- would read as freeze ids"
        )));
    }
    Ok(())
}

/// Held while a freeze is added, so that two adds cannot both find a name free.
static ADDING: Mutex<()> = Mutex::new(());

impl Rollouts {
    /// The freeze window, if any, that freezes a deploy of `app` to `regions` at `t`, and when
    /// that freeze ends (Unix seconds). Blocking.
    pub(super) fn active_freeze(
        &self,
        app: &str,
        regions: &HashSet<String>,
        t: i64,
    ) -> Result<Option<(FreezeWindow, i64)>> {
        let windows = self.core.store.list::<FreezeWindow>(Tree::Freezes)?;
        Ok(windows.into_iter().find_map(|(_, f)| f.frozen_until(app, regions, t).map(|until| (f, until))))
    }

    /// Freeze windows: add, list, remove.
    pub async fn freeze_add(&self, mut f: FreezeWindow) -> Result<FreezeWindow> {
        if f.recurrence.is_some() {
            if f.from != 0 || f.to != 0 {
                return Err(Error::InvalidArgument(
                    "a recurring freeze takes its times from its recurrence, not from and to".into(),
                ));
            }
        } else {
            if f.to <= f.from {
                return Err(Error::InvalidArgument("a freeze must end after it starts".into()));
            }
            if f.from < 0 || f.to > crate::time::LAST_RFC3339_SECOND {
                return Err(Error::InvalidArgument(
                    "a freeze must lie between 1970 and the end of year 9999".into(),
                ));
            }
        }
        if f.reason.trim().is_empty() {
            return Err(Error::MissingReason("freeze"));
        }
        if let Some(name) = &f.name {
            check_name(name)?;
        }
        self.blocking(move |c| {
            // The lock guards no data, so one poisoned by a panic elsewhere is still good.
            let _adding = ADDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(name) = &f.name {
                let existing = c.core.store.list::<FreezeWindow>(Tree::Freezes)?;
                if let Some((id, _)) = existing.iter().find(|(_, e)| e.name.as_ref() == Some(name)) {
                    return Err(Error::Conflict(format!(
                        "freeze {id} is already named {name:?}: names are unique among freezes"
                    )));
                }
            }
            f.id = format!("fz-{}", c.core.store.generate_id()? + 1);
            c.core.store.put(Tree::Freezes, &f.id, &f, true)?;
            Ok(f)
        })
        .await
    }

    pub async fn freezes(&self) -> Result<Vec<FreezeWindow>> {
        self.blocking(|c| {
            Ok(c.core.store.list::<FreezeWindow>(Tree::Freezes)?.into_iter().map(|(_, f)| f).collect())
        })
        .await
    }

    /// Removes the freeze with id, or else name, `id_or_name`; returns its id.
    pub async fn freeze_rm(&self, id_or_name: String) -> Result<String> {
        let removed = self
            .blocking(move |c| {
                if c.core.store.remove(Tree::Freezes, &id_or_name)? {
                    return Ok(Some(id_or_name));
                }
                let all = c.core.store.list::<FreezeWindow>(Tree::Freezes)?;
                match all.into_iter().find(|(_, f)| f.name.as_ref() == Some(&id_or_name)) {
                    Some((id, _)) => Ok(c.core.store.remove(Tree::Freezes, &id)?.then_some(id)),
                    None => Ok(None),
                }
            })
            .await?;
        removed.ok_or_else(|| Error::InvalidArgument("no freeze window with that id or name".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::DateTime;

    fn window() -> FreezeWindow {
        FreezeWindow {
            id: "fz-1".into(),
            from: 100,
            to: 200,
            reason: "peak".into(),
            app: Some("shop-api".into()),
            region: Some("eu-west".into()),
            created_by: "admin/a".into(),
            name: None,
            recurrence: None,
        }
    }

    /// Local time in a zone as Unix seconds.
    fn local(dt: &str, tz: &str) -> i64 {
        let dt: DateTime = dt.parse().unwrap();
        dt.to_zoned(jiff::tz::TimeZone::get(tz).unwrap()).unwrap().timestamp().as_second()
    }

    fn utc(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    fn recurring(r: Recurrence) -> FreezeWindow {
        FreezeWindow { from: 0, to: 0, app: None, region: None, recurrence: Some(r), ..window() }
    }

    #[test]
    fn a_window_freezes_its_app_and_region_while_it_lasts() {
        let f = window();
        let eu = HashSet::from(["eu-west".to_string(), "us-east".to_string()]);
        let us = HashSet::from(["us-east".to_string()]);
        assert!(f.freezes("shop-api", &eu, 100));
        assert!(f.freezes("shop-api", &eu, 199));
        assert_eq!(f.frozen_until("shop-api", &eu, 150), Some(200));
        assert!(!f.freezes("shop-api", &eu, 99), "not yet");
        assert!(!f.freezes("shop-api", &eu, 200), "over");
        assert!(!f.freezes("shop-api", &us, 150), "another region");
        assert!(!f.freezes("checkout", &eu, 150), "another app");
        assert_eq!(f.next_start(0), None, "one-off freezes have no next start");
        let everything = FreezeWindow { app: None, region: None, ..f };
        assert!(everything.freezes("checkout", &us, 150));
    }

    /// A record as stored before names and recurrences loads unchanged and behaves as before.
    #[test]
    fn records_in_the_format_before_recurrence_load_unchanged() {
        let stored = r#"{"id":"fz-7","from":100,"to":200,"reason":"peak","app":null,
                        "region":"eu-west","created_by":"admin/ops"}"#;
        let f: FreezeWindow = serde_json::from_str(stored).unwrap();
        assert_eq!((f.id.as_str(), f.from, f.to, f.region.as_deref()), ("fz-7", 100, 200, Some("eu-west")));
        assert_eq!((f.name.as_deref(), &f.recurrence), (None, &None));
        assert!(f.freezes("any-app", &HashSet::from(["eu-west".to_string()]), 150));
        assert_eq!(f.label(), "fz-7");
        // Written back, it has the same fields as before.
        let again: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(again, serde_json::from_str::<serde_json::Value>(stored).unwrap());
    }

    #[test]
    fn recurrences_round_trip_through_the_store_format() {
        let year = Recurrence::parse("year", "", "11-26T00:00", "12-02T23:59", "America/New_York").unwrap();
        let f = FreezeWindow { name: Some("black-friday".into()), ..recurring(year) };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            v["recurrence"],
            serde_json::json!({"every": "year", "from": "11-26T00:00", "to": "12-02T23:59", "tz": "America/New_York"})
        );
        assert_eq!(v["name"], "black-friday");
        let back: FreezeWindow = serde_json::from_value(v).unwrap();
        assert_eq!(back.recurrence, f.recurrence);
        assert_eq!(back.label(), "black-friday [fz-1]");
        let week = Recurrence::parse("week", "fri-sun", "18:00", "23:00", "Europe/Berlin").unwrap();
        let v = serde_json::to_value(&week).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"every": "week", "days": "fri-sun", "from": "18:00", "to": "23:00", "tz": "Europe/Berlin"})
        );
        assert_eq!(serde_json::from_value::<Recurrence>(v).unwrap(), week);
        let bad = serde_json::json!({"every": "week", "days": "fri-sun", "from": "18:00", "to": "23:00", "tz": "Nowhere/Land"});
        assert!(serde_json::from_value::<Recurrence>(bad).is_err());
    }

    #[test]
    fn a_yearly_freeze_recurs_in_its_zone() {
        let f = recurring(
            Recurrence::parse("year", "", "11-26T00:00", "12-02T23:59", "America/New_York").unwrap(),
        );
        let all = HashSet::from(["us-east".to_string()]);
        let ny = |dt: &str| local(dt, "America/New_York");
        let table = [
            ("2026-11-25T23:59", None),
            ("2026-11-26T00:00", Some(ny("2026-12-02T23:59"))),
            ("2026-11-30T12:00", Some(ny("2026-12-02T23:59"))),
            ("2026-12-02T23:58", Some(ny("2026-12-02T23:59"))),
            ("2026-12-02T23:59", None),
            ("2027-11-27T08:00", Some(ny("2027-12-02T23:59"))),
        ];
        for (now, until) in table {
            assert_eq!(f.frozen_until("shop-api", &all, ny(now)), until, "at {now} New York time");
        }
        // 00:00 in New York is 05:00Z in November (EST): 04:59Z is still outside.
        assert!(!f.freezes("shop-api", &all, utc("2026-11-26T04:59:00Z")));
        assert!(f.freezes("shop-api", &all, utc("2026-11-26T05:00:00Z")));
        assert_eq!(f.next_start(ny("2026-06-01T00:00")), Some(ny("2026-11-26T00:00")));
        assert_eq!(f.next_start(ny("2026-11-27T00:00")), Some(ny("2027-11-26T00:00")), "while active");
        assert_eq!(f.next_start(ny("2026-12-31T00:00")), Some(ny("2027-11-26T00:00")));
    }

    #[test]
    fn a_yearly_freeze_crosses_the_year_end() {
        let f =
            recurring(Recurrence::parse("year", "", "12-20T00:00", "01-02T00:00", "Europe/Berlin").unwrap());
        let all = HashSet::new();
        let b = |dt: &str| local(dt, "Europe/Berlin");
        let table = [
            ("2026-12-19T23:59", None),
            ("2026-12-20T00:00", Some(b("2027-01-02T00:00"))),
            ("2026-12-31T23:59", Some(b("2027-01-02T00:00"))),
            ("2027-01-01T12:00", Some(b("2027-01-02T00:00"))),
            ("2027-01-02T00:00", None),
            ("2027-06-01T00:00", None),
        ];
        for (now, until) in table {
            assert_eq!(f.frozen_until("shop-api", &all, b(now)), until, "at {now} Berlin time");
        }
        assert_eq!(f.next_start(b("2027-01-01T00:00")), Some(b("2027-12-20T00:00")));
        assert_eq!(f.next_start(b("2026-12-01T00:00")), Some(b("2026-12-20T00:00")));
    }

    /// Berlin 2026: 02:00-03:00 skipped on March 29, repeated on October 25.
    #[test]
    fn recurring_freezes_follow_daylight_saving_changes() {
        let all = HashSet::new();
        // Weekly, Sundays 02:30 to 04:00: on March 29 it starts when the clocks jump (03:00 CEST,
        // 01:00Z) and ends at 04:00 CEST (02:00Z); on October 25 it starts at the first 02:30
        // (CEST, 00:30Z) and ends at 04:00 CET (03:00Z).
        let f = recurring(Recurrence::parse("week", "sun", "02:30", "04:00", "Europe/Berlin").unwrap());
        let table = [
            ("2026-03-29T00:59:00Z", None),
            ("2026-03-29T01:00:00Z", Some(utc("2026-03-29T02:00:00Z"))),
            ("2026-03-29T02:00:00Z", None),
            ("2026-10-25T00:29:00Z", None),
            ("2026-10-25T00:30:00Z", Some(utc("2026-10-25T03:00:00Z"))),
            ("2026-10-25T02:59:00Z", Some(utc("2026-10-25T03:00:00Z"))),
            ("2026-10-25T03:00:00Z", None),
        ];
        for (now, until) in table {
            assert_eq!(f.frozen_until("a", &all, utc(now)), until, "weekly at {now}");
        }
        assert_eq!(f.next_start(utc("2026-03-28T12:00:00Z")), Some(utc("2026-03-29T01:00:00Z")));
        // Yearly, from a time the autumn change repeats to one the spring change skips.
        let f =
            recurring(Recurrence::parse("year", "", "10-25T02:30", "03-29T02:30", "Europe/Berlin").unwrap());
        for (now, until) in [
            ("2026-10-25T00:29:00Z", None),
            // It ends on 2027-03-29, the day after 2027's jump: 02:30 CEST.
            ("2026-10-25T00:30:00Z", Some(utc("2027-03-29T00:30:00Z"))),
            ("2027-03-29T00:29:00Z", Some(utc("2027-03-29T00:30:00Z"))),
            ("2027-03-29T00:30:00Z", None),
        ] {
            assert_eq!(f.frozen_until("a", &all, utc(now)), until, "yearly at {now}");
        }
        // 2026's occurrence ends at 02:30 on March 29, skipped: when the clocks jump (01:00Z).
        assert_eq!(f.frozen_until("a", &all, utc("2026-03-29T00:59:00Z")), Some(utc("2026-03-29T01:00:00Z")));
        assert_eq!(f.frozen_until("a", &all, utc("2026-03-29T01:00:00Z")), None);
    }

    #[test]
    fn a_weekly_freeze_holds_on_its_days_and_crosses_midnight() {
        let all = HashSet::new();
        let f = recurring(Recurrence::parse("week", "fri-sun", "18:00", "23:00", "UTC").unwrap());
        // 2026-06-12 is a Friday.
        let table = [
            ("2026-06-12T17:59:00Z", None),
            ("2026-06-12T18:00:00Z", Some(utc("2026-06-12T23:00:00Z"))),
            ("2026-06-14T22:00:00Z", Some(utc("2026-06-14T23:00:00Z"))), // Sunday
            ("2026-06-15T18:30:00Z", None),                              // Monday
        ];
        for (now, until) in table {
            assert_eq!(f.frozen_until("a", &all, utc(now)), until, "at {now}");
        }
        assert_eq!(f.next_start(utc("2026-06-15T00:00:00Z")), Some(utc("2026-06-19T18:00:00Z")));
        let night = recurring(Recurrence::parse("week", "fri", "22:00", "06:00", "UTC").unwrap());
        assert_eq!(
            night.frozen_until("a", &all, utc("2026-06-13T05:00:00Z")),
            Some(utc("2026-06-13T06:00:00Z"))
        );
        assert_eq!(night.frozen_until("a", &all, utc("2026-06-14T05:00:00Z")), None);
    }

    #[test]
    fn recurrences_are_validated_strictly() {
        use RecurrenceError as E;
        let table: &[(&str, &str, &str, &str, &str, E)] = &[
            ("month", "", "11-26T00:00", "12-02T00:00", "UTC", E::UnknownEvery("month".into())),
            ("", "", "11-26T00:00", "12-02T00:00", "UTC", E::UnknownEvery("".into())),
            ("year", "fri", "11-26T00:00", "12-02T00:00", "UTC", E::DaysWithYear),
            (
                "year",
                "",
                "11-26",
                "12-02T00:00",
                "UTC",
                E::BadYearTime { field: "from", value: "11-26".into() },
            ),
            (
                "year",
                "",
                "11-31T00:00",
                "12-02T00:00",
                "UTC",
                E::BadYearTime { field: "from", value: "11-31T00:00".into() },
            ),
            (
                "year",
                "",
                "13-01T00:00",
                "12-02T00:00",
                "UTC",
                E::BadYearTime { field: "from", value: "13-01T00:00".into() },
            ),
            (
                "year",
                "",
                "11-26T00:00",
                "12-2T00:00",
                "UTC",
                E::BadYearTime { field: "to", value: "12-2T00:00".into() },
            ),
            (
                "year",
                "",
                "11-26T00:00",
                "12-02T24:00",
                "UTC",
                E::BadYearTime { field: "to", value: "12-02T24:00".into() },
            ),
            (
                "year",
                "",
                "2026-11-26T00:00",
                "12-02T00:00",
                "UTC",
                E::BadYearTime { field: "from", value: "2026-11-26T00:00".into() },
            ),
            (
                "year",
                "",
                "02-29T00:00",
                "03-02T00:00",
                "UTC",
                E::LeapDay { field: "from", value: "02-29T00:00".into() },
            ),
            ("year", "", "11-26T00:00", "11-26T00:00", "UTC", E::EmptyYear),
            (
                "year",
                "",
                "11-26T00:00",
                "12-02T00:00",
                "Nowhere/Land",
                E::Field { field: "tz", problem: Problem::UnknownTimeZone("Nowhere/Land".into()) },
            ),
            ("week", "", "18:00", "23:00", "UTC", E::Field { field: "days", problem: Problem::NoDays }),
            (
                "week",
                "fri-sunday",
                "18:00",
                "23:00",
                "UTC",
                E::Field { field: "days", problem: Problem::UnknownDay("sunday".into()) },
            ),
            (
                "week",
                "fri",
                "6pm",
                "23:00",
                "UTC",
                E::Field { field: "from", problem: Problem::BadTime("6pm".into()) },
            ),
            (
                "week",
                "fri",
                "18:00",
                "11-26T00:00",
                "UTC",
                E::Field { field: "to", problem: Problem::BadTime("11-26T00:00".into()) },
            ),
            (
                "week",
                "fri",
                "18:00",
                "23:00",
                "",
                E::Field { field: "tz", problem: Problem::UnknownTimeZone("".into()) },
            ),
        ];
        for (every, days, from, to, tz, want) in table {
            let got = Recurrence::parse(every, days, from, to, tz);
            assert_eq!(got.as_ref().err(), Some(want), "{every} {days:?} {from} {to} {tz}");
        }
        assert_eq!(
            E::LeapDay { field: "from", value: "02-29T00:00".into() }.to_string(),
            "--from \"02-29T00:00\": February 29 is not in every year; use 02-28 or 03-01"
        );
        assert!(Recurrence::parse("week", "fri", "18:00", "18:00", "UTC").is_ok(), "a whole day");
    }

    #[test]
    fn names_are_checked() {
        for ok in ["black-friday", "q4", "2026-sale"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Black-Friday", "black friday", "-x", "fz-3", "fz-sale", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
