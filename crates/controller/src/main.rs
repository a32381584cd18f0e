//! `convoy`: the controller (`convoy serve`) and the admin CLI.

use std::process::ExitCode;

use clap::Parser;
use convoy_controller::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The controller logs at info; admin commands stay quiet unless asked.
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        // The demo narrates; its components' logs would drown the story.
        Command::Demo(_) => "error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
