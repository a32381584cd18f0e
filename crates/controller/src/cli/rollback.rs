//! `convoy rollback`: instant, because the previous release is already on every agent's disk.

use convoy_proto::v1 as pb;
use serde::Serialize;

use super::Output;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["agents", "region", "all"])))]
pub struct Args {
    app: String,
    /// An agent to roll back; repeatable.
    #[arg(long = "agent", value_name = "ID")]
    agents: Vec<String>,
    /// Every agent in this region.
    #[arg(long)]
    region: Option<String>,
    /// Every agent.
    #[arg(long)]
    all: bool,
    /// An installed release to switch to instead of the previous one.
    #[arg(long = "to", value_name = "VERSION")]
    to: Option<String>,
    /// Why: recorded with the action.
    #[arg(long, required = true)]
    reason: String,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Serialize)]
struct OutcomeJson {
    agent: String,
    ok: bool,
    offline: bool,
    error: String,
    current: String,
    elapsed_ms: u64,
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let resp = client
        .rollback(pb::RollbackRequest {
            app: a.app.clone(),
            agent_ids: a.agents,
            region: a.region.unwrap_or_default(),
            all: a.all,
            to_version: a.to.unwrap_or_default(),
            reason: a.reason,
        })
        .await
        .map_err(super::status_error)?
        .into_inner();
    let failed = resp.outcomes.iter().filter(|o| !o.ok).count();
    if a.output == Output::Json {
        let list: Vec<OutcomeJson> = resp
            .outcomes
            .iter()
            .map(|o| OutcomeJson {
                agent: o.agent_id.clone(),
                ok: o.ok,
                offline: o.offline,
                error: o.error.clone(),
                current: o.status.as_ref().map(|s| s.current.clone()).unwrap_or_default(),
                elapsed_ms: o.elapsed_ms,
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"app": a.app, "elapsed_ms": resp.elapsed_ms, "agents": list})
            )?
        );
    } else {
        let mut rows = vec![["AGENT", "RESULT", "NOW RUNNING", "TOOK"].map(String::from)];
        for o in &resp.outcomes {
            let result = if o.ok {
                "rolled back".to_string()
            } else if o.offline {
                "offline".to_string()
            } else {
                format!("failed: {}", o.error)
            };
            let now = o.status.as_ref().map(|s| s.current.clone()).unwrap_or_else(|| "-".into());
            rows.push([o.agent_id.clone(), result, now, format!("{} ms", o.elapsed_ms)]);
        }
        print!("{}", super::agents::table(&rows));
        eprintln!(
            "rollback of {} on {} agent(s) took {} ms; {} failed",
            a.app,
            resp.outcomes.len(),
            resp.elapsed_ms,
            failed
        );
    }
    if failed > 0 {
        anyhow::bail!("{failed} agent(s) did not roll back");
    }
    Ok(())
}
