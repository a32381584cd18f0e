//! `convoy deploy APP@VERSION`: starts a rollout and prints its id.

use std::path::PathBuf;
use std::time::Duration;

use convoy_proto::v1 as pb;
use serde::Deserialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// APP@VERSION (or give it in the file).
    release: Option<String>,
    /// Rollout as code: a TOML file with the same fields as these flags.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Only agents in this region; repeatable.
    #[arg(long = "region")]
    regions: Vec<String>,
    /// Only agents with this label, KEY=VALUE; repeatable.
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selectors: Vec<String>,
    /// Agents in the first wave [default: 1].
    #[arg(long)]
    canary: Option<u32>,
    /// Cumulative wave sizes [default: 10%,50%,100%].
    #[arg(long, value_delimiter = ',')]
    waves: Vec<String>,
    /// Region prefixes in rollout order, e.g. ap,eu,us.
    #[arg(long, value_delimiter = ',')]
    region_order: Vec<String>,
    /// Agents activated at once within a wave [default: 10].
    #[arg(long)]
    max_parallel: Option<u32>,
    /// How long a wave must stay healthy before the next starts.
    #[arg(long, value_parser = humantime::parse_duration)]
    bake: Option<Duration>,
    /// Failures tolerated per wave: a count or a percentage [default: 0].
    #[arg(long)]
    max_failures: Option<String>,
    /// How long an activated release has to become healthy.
    #[arg(long, value_parser = humantime::parse_duration)]
    health_deadline: Option<Duration>,
    /// Deploy a release that was marked bad.
    #[arg(long)]
    force: bool,
    /// Allow a version older than what the targeted agents run.
    #[arg(long)]
    downgrade: bool,
    /// Replace an active rollout of the same app.
    #[arg(long)]
    supersede: bool,
    /// Fail the rollout (rolling back what it moved) if any targeted agent is offline, instead
    /// of completing and letting offline agents converge when they reconnect.
    #[arg(long)]
    require_all: bool,
    /// Deploy during a freeze window (needs --reason).
    #[arg(long, requires = "reason")]
    override_freeze: bool,
    /// Why a freeze is overridden or promotion rules are skipped.
    #[arg(long)]
    reason: Option<String>,
    /// The environment whose agents the rollout targets.
    #[arg(long = "env", value_name = "NAME")]
    environment: Option<String>,
    /// The change note: what changes and why (shown by `rollout status`, sent in notifications,
    /// written to the audit log).
    #[arg(long, conflicts_with = "note_file")]
    note: Option<String>,
    /// Read the change note from a file (its first 16 KiB).
    #[arg(long, value_name = "FILE")]
    note_file: Option<PathBuf>,
    /// The change ticket's URL.
    #[arg(long, value_name = "URL")]
    ticket: Option<String>,
    /// Start later, at an RFC 3339 time with its offset (2026-12-01T03:00:00+01:00); until then
    /// the rollout is `scheduled` and can be cancelled with `convoy rollout abort`.
    #[arg(long, value_name = "TIME", value_parser = parse_at)]
    at: Option<i64>,
    /// Skip the environment's promotion rules (admins only; needs --reason; audited).
    #[arg(long, requires = "reason")]
    skip_promotion: bool,
}

/// An RFC 3339 time with an offset, as Unix seconds.
fn parse_at(s: &str) -> Result<i64, String> {
    let t: jiff::Timestamp = s.parse().map_err(|e| {
        format!("{s:?} is not an RFC 3339 time with an offset (2026-12-01T03:00:00+01:00): {e}")
    })?;
    Ok(t.as_second())
}

/// The change note from `--note` or the first 16 KiB of `--note-file`.
fn read_note(note: Option<String>, file: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    use std::io::Read;
    let Some(path) = file else { return Ok(note) };
    let usage = |e: std::io::Error| super::Usage(format!("--note-file {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(usage)?;
    let mut bytes = Vec::new();
    f.take(crate::logic::rollouts::spec::MAX_NOTE as u64).read_to_end(&mut bytes).map_err(usage)?;
    // A cut inside a character drops the partial character.
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            if bytes.len() - valid > 3 {
                return Err(super::Usage(format!("--note-file {} is not UTF-8 text", path.display())).into());
            }
            String::from_utf8_lossy(&bytes[..valid]).into_owned()
        }
    };
    Ok(Some(text))
}

/// `rollout.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutFile {
    release: Option<String>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    selector: std::collections::BTreeMap<String, String>,
    canary: Option<u32>,
    #[serde(default)]
    waves: Vec<String>,
    #[serde(default)]
    region_order: Vec<String>,
    max_parallel: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    bake: Option<Duration>,
    max_failures: Option<String>,
    #[serde(default, with = "humantime_serde")]
    health_deadline: Option<Duration>,
    #[serde(default)]
    require_all: bool,
    environment: Option<String>,
    note: Option<String>,
    ticket: Option<String>,
}

fn percent(s: &str) -> anyhow::Result<u32> {
    let n = s.trim().trim_end_matches('%');
    n.parse().map_err(|_| anyhow::anyhow!("--waves: {s:?} is not a percentage like 10%"))
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let file = match &a.file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            toml::from_str::<RolloutFile>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => RolloutFile::default(),
    };
    // Flags win over the file.
    let release =
        a.release.or(file.release).ok_or_else(|| anyhow::anyhow!("name the release: APP@VERSION"))?;
    let (app, version) = super::release::parse_release(&release)?;
    let mut selector = file.selector;
    selector.extend(convoy_base::pairs::parse_pairs("selector", &a.selectors)?);
    let waves = if a.waves.is_empty() { file.waves } else { a.waves };
    let waves = waves.iter().map(|w| percent(w)).collect::<anyhow::Result<Vec<_>>>()?;
    let canary = a.canary.or(file.canary);
    let note = read_note(a.note.or(file.note), a.note_file.as_ref())?;
    let skip_reason = if a.skip_promotion { a.reason.clone().unwrap_or_default() } else { String::new() };
    let req = pb::DeployRequest {
        app,
        version,
        regions: if a.regions.is_empty() { file.regions } else { a.regions },
        selector: selector.into_iter().collect(),
        canary: canary.unwrap_or(0),
        canary_set: canary.is_some(),
        waves,
        region_order: if a.region_order.is_empty() { file.region_order } else { a.region_order },
        max_parallel: a.max_parallel.or(file.max_parallel).unwrap_or(0),
        bake_ms: a.bake.or(file.bake).map(|d| d.as_millis() as u64).unwrap_or(0),
        max_failures: a.max_failures.or(file.max_failures).unwrap_or_default(),
        health_deadline_ms: a
            .health_deadline
            .or(file.health_deadline)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        force: a.force,
        downgrade: a.downgrade,
        supersede: a.supersede,
        require_all: a.require_all || file.require_all,
        override_freeze: a.override_freeze,
        reason: if a.override_freeze { a.reason.unwrap_or_default() } else { String::new() },
        environment: a.environment.or(file.environment).unwrap_or_default(),
        note: note.unwrap_or_default(),
        ticket: a.ticket.or(file.ticket).unwrap_or_default(),
        start_at_unix: a.at.unwrap_or(0),
        skip_promotion: a.skip_promotion,
        skip_reason,
    };
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let resp = client.deploy(req).await.map_err(super::status_error)?.into_inner();
    println!("{}", resp.id);
    eprintln!("follow it with: convoy rollout status {} --watch", resp.id);
    Ok(())
}
