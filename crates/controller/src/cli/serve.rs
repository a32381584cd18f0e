use std::net::SocketAddr;

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

pub async fn run(config: &super::Globals, args: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let prepared = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Prepared::open(&config)).await??
    };
    let (grpc, http) = bind(&config, args.grpc_addr, args.http_addr).await?;
    // Scripts and tests that pass port 0 learn the real ports from this line.
    eprintln!("convoy listening grpc={} http={}", grpc.local_addr()?, http.local_addr()?);
    prepared.serve(grpc, http, convoy_transport::shutdown_signal()).await?;
    Ok(())
}
