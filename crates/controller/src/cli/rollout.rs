//! `convoy rollout status|list|pause|resume|abort|approve|reject`.

use std::io::IsTerminal;
use std::time::Duration;

use convoy_proto::v1 as pb;

use super::agents::printable;
use super::json::Rollout;
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
    /// Stop and roll back every agent the rollout moved (a rollout awaiting approval or
    /// scheduled ends with nothing moved).
    Abort {
        id: String,
    },
    /// Approve a rollout awaiting approval (role approver; not its deployer).
    Approve {
        id: String,
        /// Why it is approved, kept with the approval.
        #[arg(long)]
        note: Option<String>,
    },
    /// Reject a rollout awaiting approval (role approver); it never starts.
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

fn render(r: &Rollout) -> String {
    let mut out = String::new();
    let count = |step: &str| r.agents.values().filter(|a| a.step == step).count();
    let elapsed = r.finished_at.unwrap_or_else(crate::logic::now) - r.created_at;
    out.push_str(&format!(
        "rollout {}  {}@{}  {}  {}  elapsed {}s\n",
        r.id,
        r.spec.app,
        r.spec.version,
        r.spec.environment,
        r.state.to_uppercase(),
        elapsed.max(0)
    ));
    out.push_str(&format!("by {}", r.created_by));
    if let Some(t) = &r.spec.ticket {
        out.push_str(&format!("  ticket {}", printable(t)));
    }
    out.push('\n');
    if let Some(note) = &r.spec.note {
        for line in note.lines() {
            out.push_str(&format!("  | {}\n", printable(line)));
        }
    }
    if let Some(g) = &r.approval {
        let who: Vec<String> = g.approvals.iter().map(|a| a.by.clone()).collect();
        out.push_str(&format!(
            "approvals: {} of {} required{}\n",
            g.approvals.len(),
            g.required,
            if who.is_empty() { String::new() } else { format!(" ({})", who.join(", ")) }
        ));
        if let Some(rej) = &g.rejected {
            out.push_str(&format!(
                "rejected by {}: {}\n",
                rej.by,
                printable(rej.note.as_deref().unwrap_or("-"))
            ));
        }
    }
    for w in &r.waiting {
        out.push_str(&format!("{}\n", printable(w)));
    }
    out.push_str(&format!(
        "agents: {} healthy, {} failed, {} rolled back, {} offline/pending, {} total\n",
        count("healthy"),
        count("failed"),
        count("rolled_back"),
        count("offline") + count("pending") + count("staged"),
        r.agents.len()
    ));
    if let Some(f) = &r.failure {
        out.push_str(&format!("failure: {}\n", printable(f)));
    }
    if !r.converging.is_empty() {
        out.push_str(&format!(
            "not yet on the release: {} agent(s) ({}); they converge when they reconnect\n",
            r.converging.len(),
            r.converging.join(", ")
        ));
    }
    if let Some(last) = r.events.last() {
        out.push_str(&format!("last event: {}\n", printable(&last.message)));
    }
    for (i, ids) in r.waves.iter().enumerate() {
        let done = ids.iter().filter(|id| r.agents.get(*id).is_some_and(|a| a.step == "healthy")).count();
        let bar = "#".repeat(done * 20 / ids.len().max(1));
        let marker = if i == r.wave as usize && r.state == "running" { ">" } else { " " };
        out.push_str(&format!("{marker} wave {:>2} [{bar:<20}] {done}/{}\n", i + 1, ids.len()));
        for id in ids {
            let (region, step, err) = match r.agents.get(id) {
                Some(a) => {
                    (a.region.as_str(), a.step, a.error.as_deref().map(|e| format!("  {}", printable(e))))
                }
                None => ("?", "?", None),
            };
            let err = err.unwrap_or_default();
            out.push_str(&format!("    {id:<16} {region:<10} {step:<12}{err}\n"));
        }
    }
    out
}

async fn get(
    client: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    id: &Option<String>,
) -> anyhow::Result<Rollout> {
    let r = client
        .get_rollout(pb::RolloutRef { id: id.clone().unwrap_or_default() })
        .await
        .map_err(super::status_error)?
        .into_inner();
    Ok(r.into())
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    use pb::RolloutAction as A;
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    match cmd {
        Command::Status { id, watch, output } => {
            let mut r = get(&mut client, &id).await?;
            let id = Some(r.id.clone());
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
                        for e in r.events.iter().skip(seen) {
                            if output == Output::Json {
                                println!("{}", serde_json::to_string(e)?);
                            } else {
                                println!("{} {}", crate::cli::fmt_time(e.at), printable(&e.message));
                            }
                        }
                        seen = r.events.len();
                    }
                    if r.is_final() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    r = get(&mut client, &id).await?;
                }
            }
            match r.state {
                "rolled_back" | "aborted" | "rejected" | "expired" | "superseded" if watch => {
                    anyhow::bail!("rollout {} ended {}", r.id, r.state)
                }
                _ => Ok(()),
            }
        }
        Command::List { app, output } => {
            let resp = client
                .list_rollouts(pb::ListRolloutsRequest { app: app.unwrap_or_default() })
                .await
                .map_err(super::status_error)?
                .into_inner();
            let list: Vec<Rollout> = resp.rollouts.into_iter().map(Into::into).collect();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let mut rows =
                vec![["ID", "RELEASE", "ENV", "STATE", "AGENTS", "STARTED", "BY"].map(String::from)];
            for r in list {
                rows.push([
                    r.id,
                    format!("{}@{}", r.spec.app, r.spec.version),
                    r.spec.environment,
                    r.state.to_string(),
                    r.agents.len().to_string(),
                    crate::cli::fmt_time(r.created_at),
                    r.created_by,
                ]);
            }
            print!("{}", super::agents::table(&rows));
            Ok(())
        }
        Command::Pause { id } => control(&mut client, id, A::Pause, String::new(), String::new()).await,
        Command::Resume { id } => control(&mut client, id, A::Resume, String::new(), String::new()).await,
        Command::Abort { id } => control(&mut client, id, A::Abort, String::new(), String::new()).await,
        Command::Approve { id, note } => {
            control(&mut client, id, A::Approve, String::new(), note.unwrap_or_default()).await
        }
        Command::Reject { id, reason } => control(&mut client, id, A::Reject, reason, String::new()).await,
    }
}

async fn control(
    client: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    id: String,
    action: pb::RolloutAction,
    reason: String,
    note: String,
) -> anyhow::Result<()> {
    let r = client
        .control_rollout(pb::ControlRolloutRequest { id: id.clone(), action: action as i32, reason, note })
        .await
        .map_err(super::status_error)?
        .into_inner();
    println!("rollout {id}: {}", Rollout::from(r).state);
    Ok(())
}
