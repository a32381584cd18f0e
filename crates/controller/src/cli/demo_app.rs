//! `convoy demo-app`: the small HTTP service the demo and the tests deploy. Its behaviour is
//! chosen by the release that runs it, so a "bad release" is a real process misbehaving.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// Serves 200 on /healthz.
    Healthy,
    /// Serves 500 on /healthz.
    Fail500,
    /// Exits with an error right after starting.
    Crash,
    /// Accepts /healthz requests and never answers.
    Hang,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    port: u16,
    #[arg(long, value_enum, default_value = "healthy")]
    mode: Mode,
    /// The version it reports on `/`.
    #[arg(long, default_value = "0.0.0")]
    version: String,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.mode == Mode::Crash {
        tokio::time::sleep(Duration::from_millis(20)).await;
        anyhow::bail!("demo-app {}: crashing on purpose", a.version);
    }
    let mode = a.mode;
    let version = a.version.clone();
    let app =
        axum::Router::new().route("/", get(move || async move { format!("demo-app {version}\n") })).route(
            "/healthz",
            get(move || async move {
                match mode {
                    Mode::Fail500 => (StatusCode::INTERNAL_SERVER_ERROR, "broken\n"),
                    Mode::Hang => {
                        std::future::pending::<()>().await;
                        (StatusCode::OK, "never\n")
                    }
                    _ => (StatusCode::OK, "ok\n"),
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], a.port))).await?;
    eprintln!("demo-app {} listening on {} ({:?})", a.version, a.port, a.mode);
    axum::serve(listener, app).with_graceful_shutdown(convoy_transport::shutdown_signal()).await?;
    Ok(())
}
