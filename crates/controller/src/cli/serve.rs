use std::net::SocketAddr;

use convoy_base::logging::LogFormat;

use crate::server::{bind, Prepared};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// gRPC listen address (agents and admins); overrides the config.
    #[arg(long)]
    grpc_addr: Option<SocketAddr>,
    /// HTTP listen address (/healthz); overrides the config.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
}

pub async fn run(globals: &super::Globals, args: Args) -> anyhow::Result<()> {
    let config = globals.load_config()?;
    let prepared = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Prepared::open(&config)).await??
    };
    let (grpc, http) = bind(&config, args.grpc_addr, args.http_addr).await?;
    // Scripts and tests that pass port 0 learn the real ports from this line: the first thing
    // on stderr as text, the message of a log event as JSON.
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    match globals.log_format {
        LogFormat::Text => eprintln!("convoy listening grpc={grpc_addr} http={http_addr}"),
        LogFormat::Json => {
            tracing::info!(%grpc_addr, %http_addr, "convoy listening grpc={grpc_addr} http={http_addr}")
        }
    }
    prepared.serve(grpc, http, convoy_transport::shutdown_signal()).await?;
    Ok(())
}
