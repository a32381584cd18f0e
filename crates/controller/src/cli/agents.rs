use convoy_proto::v1 as pb;
use serde::Serialize;

use super::Output;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Only agents in this region.
    #[arg(long)]
    region: Option<String>,
    /// Only agents in this environment.
    #[arg(long = "env", value_name = "NAME")]
    environment: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Refuse this agent from now on and close its live session.
    Revoke { id: String },
}

#[derive(Serialize)]
struct AgentJson {
    id: String,
    region: String,
    environment: String,
    labels: std::collections::BTreeMap<String, String>,
    online: bool,
    revoked: bool,
    first_seen: i64,
    last_seen: i64,
    agent_version: String,
    cert_serial: String,
    cert_not_after: i64,
    releases: Vec<ReleaseJson>,
    apps: Vec<AppJson>,
}

#[derive(Serialize)]
struct AppJson {
    app: String,
    current: String,
    known_good: String,
    previous: String,
    health: String,
    last_error: String,
    installed: Vec<String>,
}

#[derive(Serialize)]
struct ReleaseJson {
    app: String,
    version: String,
    active: bool,
}

pub async fn run(config: &super::Globals, args: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    if let Some(Command::Revoke { id }) = args.command {
        let resp = client
            .revoke_agent(pb::RevokeAgentRequest { agent_id: id.clone() })
            .await
            .map_err(super::status_error)?
            .into_inner();
        println!("revoked {id}{}", if resp.was_online { " (its live session was closed)" } else { "" });
        return Ok(());
    }
    let resp = client
        .list_agents(pb::ListAgentsRequest {
            region: args.region.unwrap_or_default(),
            environment: args.environment.unwrap_or_default(),
        })
        .await
        .map_err(super::status_error)?
        .into_inner();
    print!("{}", render(resp.agents, args.output)?);
    Ok(())
}

/// Renders agents as a table or JSON.
pub fn render(mut agents: Vec<pb::AgentInfo>, output: Output) -> anyhow::Result<String> {
    agents.sort_by(|a, b| (&a.environment, &a.region, &a.id).cmp(&(&b.environment, &b.region, &b.id)));
    if output == Output::Json {
        let list: Vec<AgentJson> = agents
            .into_iter()
            .map(|a| AgentJson {
                id: a.id,
                region: a.region,
                environment: a.environment,
                labels: a.labels.into_iter().collect(),
                online: a.online,
                revoked: a.revoked,
                first_seen: a.first_seen_unix,
                last_seen: a.last_seen_unix,
                agent_version: a.agent_version,
                cert_serial: a.cert_serial,
                cert_not_after: a.cert_not_after_unix,
                releases: a
                    .releases
                    .into_iter()
                    .map(|r| ReleaseJson { app: r.app, version: r.version, active: r.active })
                    .collect(),
                apps: a
                    .apps
                    .into_iter()
                    .map(|s| AppJson {
                        health: pb::Health::from_wire(s.health).name().to_owned(),
                        app: s.app,
                        current: s.current,
                        known_good: s.known_good,
                        previous: s.previous,
                        last_error: s.last_error,
                        installed: s.installed,
                    })
                    .collect(),
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&list)? + "\n");
    }
    let mut rows = vec![
        ["ID", "ENV", "REGION", "LABELS", "STATE", "LAST SEEN", "CERT EXPIRES", "APPS"].map(String::from)
    ];
    for a in agents {
        let mut labels: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let releases: Vec<_> = a
            .apps
            .iter()
            .map(|s| {
                let health = match pb::Health::from_wire(s.health) {
                    // Shouted, so it stands out in the table.
                    pb::Health::Unhealthy => "UNHEALTHY",
                    h => h.name(),
                };
                format!("{}@{} ({health})", s.app, if s.current.is_empty() { "-" } else { &s.current })
            })
            .collect();
        let state = if a.revoked {
            "revoked"
        } else if a.online {
            "online"
        } else {
            "offline"
        };
        rows.push([
            a.id,
            a.environment,
            a.region,
            if labels.is_empty() { "-".into() } else { labels.join(",") },
            state.into(),
            super::fmt_ago(a.last_seen_unix),
            super::fmt_time(a.cert_not_after_unix),
            if releases.is_empty() { "-".into() } else { releases.join(",") },
        ]);
    }
    Ok(table(&rows))
}

/// Left-aligned columns separated by two spaces. Cells are shown with control characters
/// escaped: what agents, alerts or refused callers put into a field cannot fake rows or hide
/// text on the operator's terminal.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows.iter().map(|r| r.clone().map(|c| printable(&c))).collect();
    let mut widths = [0usize; N];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `s` with control characters (newlines, escape sequences, and the Unicode controls that
/// reorder text) written as `\u{..}` escapes.
pub(crate) fn printable(s: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(hidden) {
        return s.to_owned();
    }
    s.chars().map(|c| if hidden(c) { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_cannot_fake_rows_or_carry_escape_sequences() {
        let rows = vec![
            ["A".to_string(), "B".to_string()],
            ["x\n9999  admin/root  deploy".to_string(), "\u{1b}[2Jcleared\u{202e}txet".to_string()],
        ];
        let out = table(&rows);
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{202e}'), "{out:?}");
        assert!(out.contains("x\\u{a}9999"), "{out}");
        assert_eq!(printable("plain"), "plain");
    }
}
