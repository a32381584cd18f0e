//! The `convoy` command line: `convoy serve` runs the controller, every other subcommand is the
//! admin CLI talking to a controller over mutual-TLS gRPC. One module per noun.
//!
//! Data goes to stdout, diagnostics to stderr; `-o json` gives machine-readable listings.
//!
//! The `convoy` binary (its own package, so this library never links the agent) parses these
//! commands and adds `convoy demo`, which runs agents in process.

mod admins;
mod agents;
mod audit;
pub mod demo_app;
mod deploy;
mod freeze;
mod init;
pub(crate) mod json;
mod keys;
mod logs;
mod release;
mod rollback;
mod rollout;
mod serve;
mod status;
mod token;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use convoy_base::logging::LogFormat;

use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a CA, the controller's certificate, the first admin's certificate and a config.
    Init(init::Args),
    /// Run the controller.
    Serve(serve::Args),
    /// Join tokens for enrolling agents.
    #[command(subcommand)]
    Token(token::Command),
    /// List agents, or revoke one.
    Agents(agents::Args),
    /// Release signing keys.
    #[command(subcommand)]
    Keys(keys::Command),
    /// Release bundles: build, sign, verify, inspect, push, list, remove.
    #[command(subcommand)]
    Release(release::Command),
    /// The admin registry: add, rekey, list and revoke admins and their certificates.
    #[command(subcommand)]
    Admins(admins::Command),
    /// The audit log, or `audit verify` to check its hash chain.
    Audit(audit::Args),
    /// Start a rollout of APP@VERSION; prints its id.
    Deploy(deploy::Args),
    /// Follow and control rollouts.
    #[command(subcommand)]
    Rollout(rollout::Command),
    /// Freeze windows: deploys are refused inside them, rollbacks never are.
    #[command(subcommand)]
    Freeze(freeze::Command),
    /// Switch an app back to its previous (or a named, installed) release, at once.
    Rollback(rollback::Args),
    /// The tail of an app's output on one agent.
    Logs(logs::Args),
    /// Per app: releases running across the fleet, unhealthy and offline agents.
    Status(status::Args),
    /// The small HTTP service the demo deploys.
    #[command(hide = true)]
    DemoApp(demo_app::Args),
}

/// Output format for listings.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Where the config comes from, and flags that override it: the options every subcommand takes.
/// The `convoy` binary flattens them into its command line.
#[derive(Args, Clone, Debug, Default)]
pub struct Globals {
    /// The controller config file [default: certs/convoy.toml].
    #[arg(long, global = true, env = "CONVOY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The controller to talk to, HOST:PORT; overrides the config's `controller`.
    #[arg(long, global = true, env = "CONVOY_CONTROLLER")]
    pub controller: Option<String>,
    /// How logs on stderr are written: text (coloured only on a terminal) or one JSON object
    /// per line.
    #[arg(long, global = true, value_enum, default_value_t, env = "CONVOY_LOG_FORMAT")]
    pub log_format: LogFormat,
}

impl Globals {
    /// Loads the config the admin commands use, with flag overrides applied.
    pub(crate) fn load_config(&self) -> anyhow::Result<Config> {
        let path = Config::locate(self.config.as_deref());
        let mut config = Config::load(&path)?;
        if let Some(c) = &self.controller {
            config.controller = c.clone();
        }
        Ok(config)
    }
}

/// A request the controller refused, kept as its gRPC status so the exit code can follow it.
#[derive(Debug)]
pub struct Refused(pub tonic::Status);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The message may carry what others wrote (reasons, names): shown, never obeyed.
        write!(f, "controller refused ({:?}): {}", self.0.code(), agents::printable(self.0.message()))
    }
}

impl std::error::Error for Refused {}

/// Arguments the command line found invalid before asking the controller: exit code 2, as for
/// those clap refuses.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Turns a gRPC status into an error that reads well on a terminal.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    Refused(status).into()
}

/// The exit code of a command that failed with `err`: 2 (usage) when the controller found an
/// argument invalid, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Refused>() {
        Some(Refused(status)) if status.code() == tonic::Code::InvalidArgument => 2,
        _ if err.is::<Usage>() => 2,
        _ => 1,
    }
}

/// Runs a parsed command.
pub async fn run(config: &Globals, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => init::run(args),
        Command::Serve(args) => serve::run(config, args).await,
        Command::Token(cmd) => token::run(config, cmd).await,
        Command::Agents(args) => agents::run(config, args).await,
        Command::Keys(cmd) => keys::run(cmd),
        Command::Release(cmd) => release::run(config, cmd).await,
        Command::Admins(cmd) => admins::run(config, cmd).await,
        Command::Audit(args) => audit::run(config, args).await,
        Command::Deploy(args) => deploy::run(config, args).await,
        Command::Rollout(cmd) => rollout::run(config, cmd).await,
        Command::Freeze(cmd) => freeze::run(config, cmd).await,
        Command::Rollback(args) => rollback::run(config, args).await,
        Command::Logs(args) => logs::run(config, args).await,
        Command::Status(args) => status::run(config, args).await,
        Command::DemoApp(args) => demo_app::run(args).await,
    }
}

pub(crate) use crate::time::{fmt_ago, fmt_time};
pub use agents::{render as render_agents, table};
