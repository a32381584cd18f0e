//! `convoy audit [--app A] [--since T] [-o json]`, `convoy audit verify [--checkpoint FILE]` and
//! `convoy audit export --checkpoint FILE`.

use std::path::PathBuf;

use anyhow::Context;
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
    /// Check the hash chain and the latest signed checkpoint: detects a modified or removed
    /// entry, including removal of the newest entries.
    Verify {
        /// Also prove the log still holds what this exported checkpoint vouches for.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
    },
    /// Sign a fresh checkpoint of the log and write it to a file, to keep off the controller.
    Export {
        #[arg(long, value_name = "FILE")]
        checkpoint: PathBuf,
    },
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
    // Read the checkpoint before connecting, so a wrong path fails without touching anything.
    let given = match &a.command {
        Some(Command::Verify { checkpoint: Some(path) }) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading checkpoint {}", path.display()))?,
        ),
        _ => None,
    };
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let mut req =
        pb::AuditRequest { app: a.app.unwrap_or_default(), since_unix: since, ..Default::default() };
    match &a.command {
        Some(Command::Verify { .. }) => {
            req.verify = true;
            req.checkpoint = given.unwrap_or_default();
        }
        Some(Command::Export { .. }) => req.export_checkpoint = true,
        None => {}
    }
    let doc = client.audit(req).await.map_err(super::status_error)?.into_inner();
    let v: Value = serde_json::from_str(&doc.json)?;
    match a.command {
        Some(Command::Export { checkpoint }) => {
            std::fs::write(&checkpoint, format!("{}\n", serde_json::to_string_pretty(&v)?))
                .with_context(|| format!("writing checkpoint {}", checkpoint.display()))?;
            println!(
                "checkpoint of {} entries written to {}; keep it off this host and check the log with `convoy audit verify --checkpoint FILE`",
                v["seq"],
                checkpoint.display()
            );
            return Ok(());
        }
        Some(Command::Verify { .. }) => {
            if v["ok"] == true {
                let against = match v["checkpoint"].as_u64() {
                    Some(n) => format!(", matches the signed checkpoint at entry {n}"),
                    None => ", no signed checkpoint yet".to_string(),
                };
                println!("audit log intact: {} entries, hash chain verified{against}", v["entries"]);
                return Ok(());
            }
            anyhow::bail!("audit log tampered: {}", v["problem"].as_str().unwrap_or("unknown problem"));
        }
        None => {}
    }
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows = vec![["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"].map(String::from)];
    for e in v.as_array().cloned().unwrap_or_default() {
        let str_of = |x: &Value| x.as_str().map(String::from).unwrap_or_else(|| x.to_string());
        let outcome = match (e["phase"].as_str(), e["intent"].as_u64()) {
            (Some("intent"), _) => "(intent)".to_string(),
            (_, Some(n)) => format!("{} (intent {n})", str_of(&e["outcome"])),
            _ => str_of(&e["outcome"]),
        };
        rows.push([
            str_of(&e["seq"]),
            crate::cli::fmt_time(e["at"].as_i64().unwrap_or(0)),
            str_of(&e["actor"]),
            str_of(&e["action"]),
            str_of(&e["target"]),
            outcome,
        ]);
    }
    print!("{}", super::agents::table(&rows));
    Ok(())
}
