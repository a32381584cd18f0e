//! `convoy freeze add|list|rm`: windows in which deploys are refused (rollbacks never are).

use convoy_proto::v1 as pb;

use super::{Output, Usage};

const ADD_HELP: &str = "\
One-off: --from and --to are RFC 3339 times (2026-12-24T00:00:00Z), now, or now+DURATION.

Recurring: --every year takes --from and --to as MM-DDTHH:MM; --every week takes them as HH:MM
with --days (fri-sun, sat,sun, mon,wed-fri, daily: the days an occurrence starts on). Both need
--tz, an IANA time zone the times are in. A --to at or before --from crosses the year end (year:
--from 12-20T00:00 --to 01-02T00:00) or midnight (week; equal times: a whole day). The end is
exclusive. Where daylight saving skips a time, it means the moment the clocks jump; where it
repeats one, its first occurrence. February 29 is refused for yearly freezes.

Examples:
  convoy freeze add --from now --to now+48h --reason \"incident review\"
  convoy freeze add --name black-friday --every year --from 11-26T00:00 --to 12-02T23:59 \\
      --tz America/New_York --reason \"Black Friday to Cyber Monday\"
  convoy freeze add --name weekend-evenings --every week --days fri-sun --from 18:00 --to 23:00 \\
      --tz Europe/Berlin --reason \"weekend evening peak\" --app shop-api";

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Freeze deploys once between two times, or every year or every week.
    #[command(after_long_help = ADD_HELP)]
    Add(AddArgs),
    /// List the freezes: names, recurrences and, for recurring ones, the next start.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove a freeze by its id (fz-3) or its name.
    Rm {
        /// The freeze's id or name.
        id: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// Start: a time (2026-12-24T00:00:00Z, now, now+2h); with --every year MM-DDTHH:MM, with
    /// --every week HH:MM.
    #[arg(long)]
    from: String,
    /// End (exclusive), in the form of --from.
    #[arg(long)]
    to: String,
    #[arg(long)]
    reason: String,
    /// A name for the freeze, unique among freezes; `convoy freeze rm` accepts it in place of the
    /// id (lowercase letters, digits and dashes).
    #[arg(long)]
    name: Option<String>,
    /// Repeat the freeze every year or every week (needs --tz).
    #[arg(long, value_enum, requires = "tz")]
    every: Option<Every>,
    /// With --every week: the days an occurrence starts on, e.g. fri-sun, sat,sun, daily.
    #[arg(long, requires = "every")]
    days: Option<String>,
    /// With --every: the IANA time zone of --from and --to, e.g. America/New_York.
    #[arg(long, requires = "every")]
    tz: Option<String>,
    /// Only this app [default: all apps].
    #[arg(long)]
    app: Option<String>,
    /// Only this region [default: all regions].
    #[arg(long)]
    region: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Every {
    Year,
    Week,
}

fn parse_time(flag: &str, s: &str) -> Result<i64, Usage> {
    if s == "now" {
        return Ok(crate::logic::now());
    }
    if let Some(rest) = s.strip_prefix("now+") {
        let d = humantime::parse_duration(rest).map_err(|e| Usage(format!("{flag} {s:?}: {e}")))?;
        return Ok(crate::logic::now().saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        Usage(format!("{flag} {s:?} is not a time like 2026-12-24T00:00:00Z, now or now+2h: {e}"))
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
}

/// The request `convoy freeze add` sends: the flags' combinations checked here, the values by the
/// controller.
fn add_request(a: &AddArgs) -> Result<pb::FreezeRequest, Usage> {
    let (from_unix, to_unix, recurrence) = match a.every {
        None => (parse_time("--from", &a.from)?, parse_time("--to", &a.to)?, None),
        Some(every) => {
            let days = match (every, &a.days) {
                (Every::Week, None) => {
                    return Err(Usage("--every week needs --days, e.g. --days fri-sun".into()))
                }
                (Every::Year, Some(_)) => return Err(Usage("--days is only for --every week".into())),
                (_, days) => days.clone().unwrap_or_default(),
            };
            let recurrence = pb::FreezeRecurrence {
                every: match every {
                    Every::Year => "year".into(),
                    Every::Week => "week".into(),
                },
                days,
                from: a.from.clone(),
                to: a.to.clone(),
                tz: a.tz.clone().unwrap_or_default(),
            };
            (0, 0, Some(recurrence))
        }
    };
    Ok(pb::FreezeRequest {
        action: pb::FreezeAction::Add as i32,
        from_unix,
        to_unix,
        reason: a.reason.clone(),
        app: a.app.clone().unwrap_or_default(),
        region: a.region.clone().unwrap_or_default(),
        id: String::new(),
        name: a.name.clone().unwrap_or_default(),
        recurrence,
    })
}

/// How a freeze's times read in the table: `2026-11-27 00:00:00Z to 2026-11-30 00:00:00Z`,
/// `every year 11-26T00:00 to 12-02T23:59 America/New_York`, `every week fri-sun 18:00 to 23:00
/// Europe/Berlin`.
fn when(f: &pb::FreezeWindow) -> String {
    match &f.recurrence {
        None => format!("{} to {}", crate::cli::fmt_time(f.from_unix), crate::cli::fmt_time(f.to_unix)),
        Some(r) if r.days.is_empty() => format!("every {} {} to {} {}", r.every, r.from, r.to, r.tz),
        Some(r) => format!("every {} {} {} to {} {}", r.every, r.days, r.from, r.to, r.tz),
    }
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    let req = match &cmd {
        Command::Add(a) => add_request(a)?,
        Command::List { .. } => {
            pb::FreezeRequest { action: pb::FreezeAction::List as i32, ..Default::default() }
        }
        Command::Rm { id } => pb::FreezeRequest {
            action: pb::FreezeAction::Remove as i32,
            id: id.clone(),
            ..Default::default()
        },
    };
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let resp = client.freeze(req).await.map_err(super::status_error)?.into_inner();
    match cmd {
        Command::Add(_) => {
            println!("{}", resp.windows.first().map(|f| f.id.as_str()).unwrap_or_default())
        }
        Command::Rm { id } if id == resp.removed => println!("removed {id}"),
        Command::Rm { id } => println!("removed {} ({id})", resp.removed),
        Command::List { output: Output::Json } => {
            let list: Vec<super::json::Freeze> = resp.windows.into_iter().map(Into::into).collect();
            println!("{}", serde_json::to_string_pretty(&list)?)
        }
        Command::List { .. } => {
            let mut rows =
                vec![["ID", "NAME", "WHEN", "NEXT START", "APP", "REGION", "REASON"].map(String::from)];
            for f in resp.windows {
                let opt = |x: Option<String>| x.unwrap_or_else(|| "*".into());
                rows.push([
                    f.id.clone(),
                    f.name.clone().unwrap_or_else(|| "-".into()),
                    when(&f),
                    crate::cli::fmt_time(f.next_start_unix),
                    opt(f.app),
                    opt(f.region),
                    f.reason,
                ]);
            }
            print!("{}", super::agents::table(&rows));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Command,
    }

    fn add(args: &[&str]) -> Result<pb::FreezeRequest, String> {
        let argv = ["convoy", "add", "--reason", "sale"].iter().chain(args);
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.cmd {
            Command::Add(a) => add_request(&a).map_err(|e| e.to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn add_flags_combine_strictly() {
        let yearly = add(&[
            "--name",
            "black-friday",
            "--every",
            "year",
            "--from",
            "11-26T00:00",
            "--to",
            "12-02T23:59",
            "--tz",
            "America/New_York",
        ])
        .unwrap();
        assert_eq!((yearly.from_unix, yearly.to_unix, yearly.name.as_str()), (0, 0, "black-friday"));
        let r = yearly.recurrence.unwrap();
        assert_eq!(
            (r.every.as_str(), r.days.as_str(), r.from.as_str(), r.to.as_str(), r.tz.as_str()),
            ("year", "", "11-26T00:00", "12-02T23:59", "America/New_York")
        );
        let weekly =
            add(&["--every", "week", "--days", "fri-sun", "--from", "18:00", "--to", "23:00", "--tz", "UTC"])
                .unwrap();
        assert_eq!(weekly.recurrence.unwrap().days, "fri-sun");
        let once = add(&["--from", "2026-12-24T00:00:00Z", "--to", "now+1h"]).unwrap();
        assert_eq!((once.from_unix, once.recurrence), (1_798_070_400, None));
        for (args, want) in [
            (&["--every", "week", "--from", "18:00", "--to", "23:00", "--tz", "UTC"][..], "needs --days"),
            (
                &["--every", "year", "--days", "fri", "--from", "a", "--to", "b", "--tz", "UTC"][..],
                "only for --every week",
            ),
            (&["--every", "year", "--from", "11-26T00:00", "--to", "12-02T00:00"][..], "--tz"),
            (&["--tz", "UTC", "--from", "now", "--to", "now+1h"][..], "--every"),
            (&["--days", "fri", "--from", "now", "--to", "now+1h"][..], "--every"),
            (&["--every", "month", "--from", "now", "--to", "now+1h", "--tz", "UTC"][..], "month"),
            (&["--from", "11-26T00:00", "--to", "now"][..], "--from \"11-26T00:00\" is not a time"),
            (&["--from", "now", "--to", "now+soon"][..], "--to \"now+soon\""),
        ] {
            let err = add(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}
