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
    /// Only agents of this environment (every environment the target covers when left out).
    #[arg(long = "env", value_name = "NAME")]
    environment: Option<String>,
    /// Every agent.
    #[arg(long)]
    all: bool,
    /// An installed release to switch to instead of the newest known-good one before it.
    #[arg(long = "to", value_name = "VERSION")]
    to: Option<String>,
    /// Roll back only agents running this release (the default: each agent's current one).
    /// Makes a repeated rollback idempotent: agents already off it answer "already rolled back".
    #[arg(long = "from", value_name = "VERSION")]
    from: Option<String>,
    /// Why: recorded with the action.
    #[arg(long, required = true)]
    reason: String,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Serialize)]
struct OutcomeJson {
    agent: String,
    /// `applied`, `already_in_state`, `refused`, `failed`, `stale` or `unreachable`.
    outcome: &'static str,
    message: String,
    current: String,
    elapsed_ms: u64,
}

/// The outcome's name, and whether it counts as done.
fn outcome_name(o: &pb::AgentOutcome) -> (&'static str, bool) {
    if o.unreachable {
        return ("unreachable", false);
    }
    match pb::OrderOutcome::try_from(o.outcome) {
        Ok(pb::OrderOutcome::Applied) => ("applied", true),
        Ok(pb::OrderOutcome::AlreadyInState) => ("already_in_state", true),
        Ok(pb::OrderOutcome::Refused) => ("refused", false),
        Ok(pb::OrderOutcome::Stale) => ("stale", false),
        Ok(pb::OrderOutcome::Failed) | Ok(pb::OrderOutcome::Unspecified) | Err(_) => ("failed", false),
    }
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let resp = client
        .rollback(pb::RollbackRequest {
            app: a.app.clone(),
            agent_ids: a.agents,
            region: a.region.unwrap_or_default(),
            environment: a.environment.unwrap_or_default(),
            all: a.all,
            to_version: a.to.unwrap_or_default(),
            from_version: a.from.unwrap_or_default(),
            reason: a.reason,
        })
        .await
        .map_err(super::status_error)?
        .into_inner();
    let failed = resp.outcomes.iter().filter(|o| !outcome_name(o).1).count();
    if a.output == Output::Json {
        let list: Vec<OutcomeJson> = resp
            .outcomes
            .iter()
            .map(|o| OutcomeJson {
                agent: o.agent_id.clone(),
                outcome: outcome_name(o).0,
                message: o.message.clone(),
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
            let result = match outcome_name(o).0 {
                "applied" => o.message.clone(),
                "already_in_state" => format!("nothing to do: {}", o.message),
                "unreachable" => format!("unreachable: {}", o.message),
                _ => o.message.clone(),
            };
            let now = o.status.as_ref().map(|s| s.current.clone()).unwrap_or_else(|| "-".into());
            rows.push([o.agent_id.clone(), result, now, format!("{} ms", o.elapsed_ms)]);
        }
        print!("{}", super::agents::table(&rows));
        eprintln!(
            "rollback of {} on {} agent(s) took {} ms; {} not done",
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
