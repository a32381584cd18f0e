//! `convoy freeze add|list|rm`: windows in which deploys are refused (rollbacks never are).

use convoy_proto::v1 as pb;

use super::Output;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Freeze deploys between two times (RFC 3339, e.g. 2026-12-24T00:00:00Z, or "now").
    Add {
        #[arg(long, value_parser = parse_time)]
        from: i64,
        #[arg(long, value_parser = parse_time)]
        to: i64,
        #[arg(long)]
        reason: String,
        /// Only this app [default: all apps].
        #[arg(long)]
        app: Option<String>,
        /// Only this region [default: all regions].
        #[arg(long)]
        region: Option<String>,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Rm {
        id: String,
    },
}

fn parse_time(s: &str) -> Result<i64, String> {
    if s == "now" {
        return Ok(crate::logic::now());
    }
    if let Some(rest) = s.strip_prefix("now+") {
        let d = humantime::parse_duration(rest).map_err(|e| format!("{s:?}: {e}"))?;
        return Ok(crate::logic::now() + d.as_secs() as i64);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not a time like 2026-12-24T00:00:00Z, now or now+2h: {e}"))
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let req = match &cmd {
        Command::Add { from, to, reason, app, region } => pb::FreezeRequest {
            action: "add".into(),
            from_unix: *from,
            to_unix: *to,
            reason: reason.clone(),
            app: app.clone().unwrap_or_default(),
            region: region.clone().unwrap_or_default(),
            id: String::new(),
        },
        Command::List { .. } => pb::FreezeRequest { action: "list".into(), ..Default::default() },
        Command::Rm { id } => pb::FreezeRequest { action: "rm".into(), id: id.clone(), ..Default::default() },
    };
    let resp = client.freeze(req).await.map_err(super::status_error)?.into_inner();
    match cmd {
        Command::Add { .. } => {
            println!("{}", resp.windows.first().map(|f| f.id.as_str()).unwrap_or_default())
        }
        Command::Rm { id } => println!("removed {id}"),
        Command::List { output: Output::Json } => {
            let list: Vec<super::json::Freeze> = resp.windows.into_iter().map(Into::into).collect();
            println!("{}", serde_json::to_string_pretty(&list)?)
        }
        Command::List { .. } => {
            let mut rows = vec![["ID", "FROM", "TO", "APP", "REGION", "REASON"].map(String::from)];
            for f in resp.windows {
                let opt = |x: Option<String>| x.unwrap_or_else(|| "*".into());
                rows.push([
                    f.id,
                    crate::cli::fmt_time(f.from_unix),
                    crate::cli::fmt_time(f.to_unix),
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
