//! `convoy status`: per app, which releases the fleet runs, what is unhealthy or offline.

use std::collections::BTreeMap;

use convoy_proto::v1 as pb;
use serde::Serialize;

use super::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Default, Serialize)]
pub(crate) struct AppSummary {
    /// Agents per release they actually run.
    pub running: BTreeMap<String, usize>,
    pub unhealthy: Vec<String>,
    pub offline: Vec<String>,
    pub agents: usize,
}

/// Groups agents' reported app state per app.
pub(crate) fn summarize(agents: &[pb::AgentInfo]) -> BTreeMap<String, AppSummary> {
    let mut out: BTreeMap<String, AppSummary> = BTreeMap::new();
    for a in agents {
        for s in &a.apps {
            let e = out.entry(s.app.clone()).or_default();
            e.agents += 1;
            let current = if s.current.is_empty() { "(none)".to_string() } else { s.current.clone() };
            *e.running.entry(current).or_default() += 1;
            if s.health == pb::Health::Unhealthy as i32 {
                e.unhealthy.push(a.id.clone());
            }
            if !a.online {
                e.offline.push(a.id.clone());
            }
        }
    }
    out
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let agents = client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .map_err(super::status_error)?
        .into_inner()
        .agents;
    let summary = summarize(&agents);
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let mut rows = vec![["APP", "AGENTS", "RUNNING", "UNHEALTHY", "OFFLINE"].map(String::from)];
    for (app, s) in summary {
        let running: Vec<String> = s.running.iter().map(|(v, n)| format!("{v}×{n}")).collect();
        let list = |v: &Vec<String>| if v.is_empty() { "-".to_string() } else { v.join(",") };
        rows.push([app, s.agents.to_string(), running.join(" "), list(&s.unhealthy), list(&s.offline)]);
    }
    print!("{}", super::agents::table(&rows));
    Ok(())
}
