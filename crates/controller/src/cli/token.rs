use std::time::Duration;

use convoy_proto::v1 as pb;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create a one-time join token; prints the token on stdout.
    Create {
        /// Bind the token to a region: the agent cannot enroll elsewhere.
        #[arg(long)]
        region: Option<String>,
        /// The environment the agent joins (`staging`, `production`, …); rollouts target one
        /// environment at a time.
        #[arg(long = "env", value_name = "NAME", default_value = "production")]
        environment: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A label the agent gets, KEY=VALUE; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Let the enrolling agent add labels of its own (`convoy-agent enroll --label`). Off by
        /// default: labels select rollout targets, so they come from whoever creates the token.
        #[arg(long)]
        allow_agent_labels: bool,
    },
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    let Command::Create { region, environment, ttl, labels, allow_agent_labels } = cmd;
    let labels = convoy_base::pairs::parse_pairs("label", &labels)?;
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let resp = client
        .create_token(pb::CreateTokenRequest {
            region: region.unwrap_or_default(),
            ttl_secs: ttl.as_secs(),
            labels: labels.into_iter().collect(),
            allow_agent_labels,
            environment,
        })
        .await
        .map_err(super::status_error)?
        .into_inner();
    println!("{}", resp.token);
    eprintln!("expires {}", super::fmt_time(resp.expires_at_unix));
    Ok(())
}
