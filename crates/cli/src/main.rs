//! `convoy`: the controller (`convoy serve`), the admin CLI, and `convoy demo`.
//!
//! The commands live in the controller library ([`convoy_controller::cli`]); this package adds
//! the demo, which runs agents in process through `convoy-testkit`, so that the controller
//! library itself never links the agent.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use convoy_base::logging;
use convoy_controller::cli::{self, Globals};

mod demo;

#[derive(Parser, Debug)]
#[command(name = "convoy", version, about = "Convoy: signed releases to a fleet, with instant rollback")]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Controller(cli::Command),
    /// Run a self-contained local fleet and show it working.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The controller logs at info; admin commands stay quiet unless asked.
    let default_filter = match cli.command {
        Command::Controller(cli::Command::Serve(_)) => "info",
        // The demo narrates; its components' logs would drown the story.
        Command::Demo(_) => "error",
        Command::Controller(_) => "warn",
    };
    let log_format = cli.globals.log_format;
    if let Err(e) = logging::init(log_format, default_filter) {
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Controller(command) => cli::run(&cli.globals, command).await,
            Command::Demo(args) => demo::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::report_fatal(log_format, &format!("{e:#}"));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
