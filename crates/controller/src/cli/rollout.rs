//! `convoy rollout status|list|pause|resume|abort`.

use std::io::IsTerminal;
use std::time::Duration;

use convoy_proto::v1 as pb;
use serde_json::Value;

use super::Output;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Waves, per-agent state, counts and elapsed time [default: the latest rollout].
    Status {
        id: Option<String>,
        /// Follow until the rollout ends.
        #[arg(long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// All rollouts.
    List {
        #[arg(long)]
        app: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop starting new activations (in-flight ones finish).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop and roll back every agent the rollout moved.
    Abort {
        id: String,
    },
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())
}

fn render(r: &Value) -> String {
    let mut out = String::new();
    let agents = r["agents"].as_object().cloned().unwrap_or_default();
    let count = |step: &str| agents.values().filter(|a| a["step"] == step).count();
    let elapsed =
        r["finished_at"].as_i64().unwrap_or_else(crate::logic::now) - r["created_at"].as_i64().unwrap_or(0);
    out.push_str(&format!(
        "rollout {}  {}@{}  {}  elapsed {}s\n",
        s(&r["id"]),
        s(&r["spec"]["app"]),
        s(&r["spec"]["version"]),
        s(&r["state"]).to_uppercase(),
        elapsed.max(0)
    ));
    out.push_str(&format!(
        "agents: {} healthy, {} failed, {} rolled back, {} offline/pending, {} total\n",
        count("healthy"),
        count("failed"),
        count("rolled_back"),
        count("offline") + count("pending") + count("staged"),
        agents.len()
    ));
    if let Some(f) = r["failure"].as_str() {
        out.push_str(&format!("failure: {f}\n"));
    }
    let converging: Vec<String> =
        r["converging"].as_array().cloned().unwrap_or_default().iter().map(s).collect();
    if !converging.is_empty() {
        out.push_str(&format!(
            "not yet on the release: {} agent(s) ({}); they converge when they reconnect\n",
            converging.len(),
            converging.join(", ")
        ));
    }
    if let Some(last) = r["events"].as_array().and_then(|e| e.last()) {
        out.push_str(&format!("last event: {}\n", s(&last["message"])));
    }
    let current = r["wave"].as_u64().unwrap_or(0) as usize;
    for (i, wave) in r["waves"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let ids: Vec<String> = wave.as_array().cloned().unwrap_or_default().iter().map(s).collect();
        let done = ids.iter().filter(|id| agents.get(*id).is_some_and(|a| a["step"] == "healthy")).count();
        let bar = "#".repeat(done * 20 / ids.len().max(1));
        let marker = if i == current && r["state"] == "running" { ">" } else { " " };
        out.push_str(&format!("{marker} wave {:>2} [{bar:<20}] {done}/{}\n", i + 1, ids.len()));
        for id in ids {
            let a = &agents[&id];
            let err = a["error"].as_str().map(|e| format!("  {e}")).unwrap_or_default();
            out.push_str(&format!("    {id:<16} {:<10} {:<12}{err}\n", s(&a["region"]), s(&a["step"])));
        }
    }
    out
}

async fn get(
    client: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    id: &Option<String>,
) -> anyhow::Result<Value> {
    let doc = client
        .get_rollout(pb::RolloutRef { id: id.clone().unwrap_or_default() })
        .await
        .map_err(super::status_error)?
        .into_inner();
    Ok(serde_json::from_str(&doc.json)?)
}

fn is_final(r: &Value) -> bool {
    matches!(r["state"].as_str(), Some("completed" | "rolled_back" | "aborted" | "superseded"))
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    match cmd {
        Command::Status { id, watch, output } => {
            let mut r = get(&mut client, &id).await?;
            let id = Some(s(&r["id"]));
            if !watch {
                if output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", render(&r));
                }
            } else {
                // A terminal gets a live view; a pipe gets one line per event.
                let tty = std::io::stdout().is_terminal() && output == Output::Table;
                let mut seen = 0usize;
                loop {
                    if tty {
                        print!("\x1b[2J\x1b[H{}", render(&r));
                    } else {
                        let events = r["events"].as_array().cloned().unwrap_or_default();
                        for e in events.iter().skip(seen) {
                            if output == Output::Json {
                                println!("{}", serde_json::to_string(e)?);
                            } else {
                                println!(
                                    "{} {}",
                                    crate::cli::fmt_time(e["at"].as_i64().unwrap_or(0)),
                                    s(&e["message"])
                                );
                            }
                        }
                        seen = events.len();
                    }
                    if is_final(&r) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    r = get(&mut client, &id).await?;
                }
            }
            match r["state"].as_str() {
                Some("rolled_back") | Some("aborted") if watch => {
                    anyhow::bail!("rollout {} ended {}", s(&r["id"]), s(&r["state"]))
                }
                _ => Ok(()),
            }
        }
        Command::List { app, output } => {
            let doc = client
                .list_rollouts(pb::ListRolloutsRequest { app: app.unwrap_or_default() })
                .await
                .map_err(super::status_error)?
                .into_inner();
            let list: Value = serde_json::from_str(&doc.json)?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let mut rows = vec![["ID", "RELEASE", "STATE", "AGENTS", "STARTED", "BY"].map(String::from)];
            for r in list.as_array().cloned().unwrap_or_default() {
                rows.push([
                    s(&r["id"]),
                    format!("{}@{}", s(&r["spec"]["app"]), s(&r["spec"]["version"])),
                    s(&r["state"]),
                    r["agents"].as_object().map(|a| a.len()).unwrap_or(0).to_string(),
                    crate::cli::fmt_time(r["created_at"].as_i64().unwrap_or(0)),
                    s(&r["created_by"]),
                ]);
            }
            print!("{}", super::agents::table(&rows));
            Ok(())
        }
        Command::Pause { id } => control(&mut client, id, "pause").await,
        Command::Resume { id } => control(&mut client, id, "resume").await,
        Command::Abort { id } => control(&mut client, id, "abort").await,
    }
}

async fn control(
    client: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    id: String,
    action: &str,
) -> anyhow::Result<()> {
    let doc = client
        .control_rollout(pb::ControlRolloutRequest {
            id: id.clone(),
            action: action.into(),
            reason: String::new(),
        })
        .await
        .map_err(super::status_error)?
        .into_inner();
    let r: Value = serde_json::from_str(&doc.json)?;
    println!("rollout {id}: {}", s(&r["state"]));
    Ok(())
}
