//! `convoy logs AGENT APP`: the tail of an app's service and hook output on one agent.

use convoy_proto::v1 as pb;

#[derive(clap::Args, Debug)]
pub struct Args {
    agent: String,
    app: String,
    /// How many lines.
    #[arg(long, default_value_t = 100)]
    tail: u32,
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let resp = client
        .logs(pb::LogsRequest { agent_id: a.agent, app: a.app, lines: a.tail })
        .await
        .map_err(super::status_error)?
        .into_inner();
    println!("{}", resp.text);
    Ok(())
}
