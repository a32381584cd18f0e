//! `convoy audit [--app A] [--since T] [-o json]`, `convoy audit verify [--checkpoint FILE]` and
//! `convoy audit export --checkpoint FILE`.

use std::path::PathBuf;

use anyhow::Context;
use convoy_proto::v1 as pb;

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
        Some(Command::Verify { checkpoint: Some(path) }) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading checkpoint {}", path.display()))?;
            let cp: super::json::Checkpoint = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an exported audit checkpoint", path.display()))?;
            Some(pb::AuditCheckpoint::from(cp))
        }
        _ => None,
    };
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let mut req =
        pb::AuditRequest { app: a.app.unwrap_or_default(), since_unix: since, ..Default::default() };
    match &a.command {
        Some(Command::Verify { .. }) => {
            req.verify = true;
            req.given_checkpoint = given;
        }
        Some(Command::Export { .. }) => req.export_checkpoint = true,
        None => {}
    }
    let resp = client.audit(req).await.map_err(super::status_error)?.into_inner();
    match a.command {
        Some(Command::Export { checkpoint }) => {
            let cp = resp.checkpoint.ok_or_else(|| anyhow::anyhow!("the controller sent no checkpoint"))?;
            let cp = super::json::Checkpoint::from(cp);
            std::fs::write(&checkpoint, format!("{}\n", serde_json::to_string_pretty(&cp)?))
                .with_context(|| format!("writing checkpoint {}", checkpoint.display()))?;
            println!(
                "checkpoint of {} entries written to {}; keep it off this host and check the log with `convoy audit verify --checkpoint FILE`",
                cp.seq,
                checkpoint.display()
            );
            return Ok(());
        }
        Some(Command::Verify { .. }) => {
            let v =
                resp.verification.ok_or_else(|| anyhow::anyhow!("the controller sent no verification"))?;
            if v.ok {
                let against = match v.checkpoint_seq {
                    Some(n) => format!(", matches the signed checkpoint at entry {n}"),
                    None => ", no signed checkpoint yet".to_string(),
                };
                println!("audit log intact: {} entries, hash chain verified{against}", v.entries);
                return Ok(());
            }
            let problem = if v.problem.is_empty() { "unknown problem" } else { v.problem.as_str() };
            anyhow::bail!("audit log tampered: {problem}");
        }
        None => {}
    }
    let entries: Vec<super::json::AuditEntry> = resp.entries.into_iter().map(Into::into).collect();
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let mut rows = vec![["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"].map(String::from)];
    for e in entries {
        let outcome = match (e.phase, e.intent) {
            (Some("intent"), _) => "(intent)".to_string(),
            (_, Some(n)) => format!("{} (intent {n})", e.outcome),
            _ => e.outcome,
        };
        rows.push([e.seq.to_string(), crate::cli::fmt_time(e.at), e.actor, e.action, e.target, outcome]);
    }
    print!("{}", super::agents::table(&rows));
    Ok(())
}
