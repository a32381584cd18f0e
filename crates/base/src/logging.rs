//! How the binaries log, for operators: to stderr, filtered by `RUST_LOG` (or the binary's
//! default), as text with ANSI colours only when stderr is a terminal, or with
//! `--log-format json` as one JSON object per line (`timestamp`, `level`, `message`, the
//! event's fields, `target`, spans) for a log shipper.

use std::io::IsTerminal;

/// The `--log-format` option of both binaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process's log subscriber. `default_filter` applies when `RUST_LOG` is unset
/// or invalid. Fails only if a subscriber is already installed.
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).try_init(),
    }
    .map_err(|e| format!("cannot install the logger: {e}"))
}

/// Reports the error a binary exits with: `error: ...` on stderr as text, or as a log event
/// in JSON, so that every line a daemon writes in JSON mode is JSON.
pub fn report_fatal(format: LogFormat, err: &dyn std::fmt::Display) {
    match format {
        LogFormat::Text => eprintln!("error: {err}"),
        LogFormat::Json => tracing::error!("{err}"),
    }
}
