//! `convoy audit [--app A] [--since T] [-o json]` and `convoy audit verify`.

use convoy_proto::v1 as pb;
use serde_json::Value;

use super::Output;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[arg(long)]
    app: Option<String>,
    /// Only entries since this time (RFC 3339) or this long ago (e.g. 2h).
    #[arg(long)]
    since: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Check the hash chain: detects a modified or removed entry.
    Verify,
}

fn since(s: &str) -> anyhow::Result<i64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(crate::logic::now() - d.as_secs() as i64);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow::anyhow!("--since {s:?}: use a time (2026-11-29T10:00:00Z) or a duration (2h)")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let since = a.since.as_deref().map(since).transpose()?.unwrap_or(0);
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let verify = matches!(a.command, Some(Command::Verify));
    let doc = client
        .audit(pb::AuditRequest { app: a.app.unwrap_or_default(), since_unix: since, verify })
        .await
        .map_err(super::status_error)?
        .into_inner();
    let v: Value = serde_json::from_str(&doc.json)?;
    if verify {
        if v["ok"] == true {
            println!("audit log intact: {} entries, hash chain verified", v["entries"]);
            return Ok(());
        }
        anyhow::bail!("audit log tampered: {}", v["problem"].as_str().unwrap_or("unknown problem"));
    }
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows = vec![["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"].map(String::from)];
    for e in v.as_array().cloned().unwrap_or_default() {
        let str_of = |x: &Value| x.as_str().map(String::from).unwrap_or_else(|| x.to_string());
        rows.push([
            str_of(&e["seq"]),
            crate::cli::fmt_time(e["at"].as_i64().unwrap_or(0)),
            str_of(&e["actor"]),
            str_of(&e["action"]),
            str_of(&e["target"]),
            str_of(&e["outcome"]),
        ]);
    }
    print!("{}", super::agents::table(&rows));
    Ok(())
}
