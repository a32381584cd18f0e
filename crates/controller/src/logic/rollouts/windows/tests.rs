#![allow(clippy::unwrap_used)]

use jiff::civil::DateTime;
use jiff::tz::TimeZone;

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
    assert_eq!(all_day.state("prod", "eu", utc("2026-06-09T05:59:00Z")), open(utc("2026-06-09T06:00:00Z")));
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
    let w = |start: &str, end: &str| windows(&[window("p", &["*"], "daily", start, end, "Europe/Berlin")]);
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
    for (secs, want) in [(0, "1m"), (30, "1m"), (60, "1m"), (61, "2m"), (3600, "1h00m"), (11_520, "3h12m")] {
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
        (WindowConfig { days: "mon-fry".into(), ..ok.clone() }, "days", Problem::UnknownDay("fry".into())),
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
