//! `convoy-agent`: enroll once, then run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use convoy_agent::{Agent, AgentConfig, EnrollOptions};
use convoy_base::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "convoy-agent",
    version,
    about = "The Convoy agent: installs and runs the releases its controller orders"
)]
struct Cli {
    /// How logs on stderr are written: text (coloured only on a terminal) or one JSON object
    /// per line.
    #[arg(long, global = true, value_enum, default_value_t, env = "CONVOY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a controller with a one-time token; the private key is generated here and never sent.
    Enroll {
        /// The controller's gRPC address, HOST:PORT.
        #[arg(long)]
        controller: String,
        /// The controller's CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// The join token from `convoy token create`.
        #[arg(long, env = "CONVOY_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long)]
        region: String,
        /// Requested agent id; the controller generates one when omitted.
        #[arg(long)]
        id: Option<String>,
        /// A label, KEY=VALUE; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        data_dir: PathBuf,
        /// The name to check the controller's certificate against, if not the address's host.
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Run the agent: hold a session with the controller until SIGINT or SIGTERM.
    Run {
        #[arg(long)]
        data_dir: PathBuf,
        /// A trusted release public key; repeatable (also `trust` in agent.toml). With none,
        /// every release is refused.
        #[arg(long = "trust", value_name = "FILE")]
        trust: Vec<PathBuf>,
        /// Valid signatures needed from distinct trusted keys.
        #[arg(long, default_value_t = 1)]
        require_signatures: usize,
        /// A per-host variable for `${NAME}` in releases, NAME=VALUE; repeatable (also `vars`
        /// in agent.toml).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Releases kept per app.
        #[arg(long, default_value_t = 3)]
        keep_releases: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    if let Err(e) = logging::init(log_format, "info") {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            logging::report_fatal(log_format, &format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::report_fatal(log_format, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll { controller, ca, token, region, id, labels, data_dir, server_name } => {
            let ca_pem = std::fs::read_to_string(&ca)
                .map_err(|e| anyhow::anyhow!("cannot read CA certificate {}: {e}", ca.display()))?;
            let labels = convoy_base::pairs::parse_pairs("label", &labels)?;
            let file = convoy_agent::enroll(EnrollOptions {
                controller,
                ca_pem,
                token,
                region,
                id,
                labels,
                data_dir: data_dir.clone(),
                server_name,
            })
            .await?;
            println!("enrolled as {} in region {} (data dir {})", file.id, file.region, data_dir.display());
            Ok(())
        }
        Command::Run { data_dir, trust, require_signatures, vars, keep_releases } => {
            let mut config = AgentConfig::new(data_dir);
            for p in &trust {
                config.trust.push(convoy_bundle::PublicKey::load(p)?);
            }
            config.require_signatures = require_signatures;
            config.vars = convoy_base::pairs::parse_pairs("variable", &vars)?;
            config.keep_releases = keep_releases;
            // Crash-safety tests make the agent abort at a named step; only test builds (the
            // `failpoints` feature) read the variable.
            #[cfg(feature = "failpoints")]
            {
                config.failpoint = std::env::var("CONVOY_AGENT_FAILPOINT").ok().filter(|f| !f.is_empty());
            }
            let agent = Agent::new(config)?;
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                convoy_transport::shutdown_signal().await;
                tracing::info!("signal received, stopping");
                stop.cancel();
            });
            agent.run(cancel).await?;
            Ok(())
        }
    }
}
