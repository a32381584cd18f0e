//! `convoy demo`: a controller and three agents in three regions, in a temporary directory.

use std::time::{Duration, Instant};

use convoy_proto::v1 as pb;

use crate::local::{LocalAgent, LocalController, LocalOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Stay up after the demo, for exploring with the CLI, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

const AGENTS: [(&str, &str); 3] = [("eu-1", "eu-west"), ("us-1", "us-east"), ("ap-1", "ap-south")];

pub async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("convoy-demo-").tempdir()?;
    let step = |what: &str| println!("[{:>6.2}s] {what}", started.elapsed().as_secs_f64());
    let ctl_dir = tmp.path().join("controller");
    let ctl = LocalController::start(&ctl_dir, LocalOptions::default()).await?;
    step(&format!("controller up: PKI in {}, gRPC on {}", ctl_dir.display(), ctl.grpc_addr));
    let mut agents = Vec::new();
    for (id, region) in AGENTS {
        let dir = tmp.path().join("agents").join(id);
        ctl.enroll(&dir, id, region).await?;
        agents.push(LocalAgent::spawn(&dir)?);
        step(&format!("agent {id} enrolled in {region} with a one-time token (key generated locally)"));
    }
    for a in &mut agents {
        a.wait_for(Duration::from_secs(20), |s| s.connected).await?;
    }
    step("all agents hold a mutual-TLS session");
    let listed = ctl.admin().await?.list_agents(pb::ListAgentsRequest::default()).await?.into_inner();
    println!("\n$ convoy agents\n{}", super::agents::render(listed.agents, super::Output::Table)?);
    if args.keep {
        println!("the fleet stays up; in another terminal:\n  export CONVOY_CONFIG={}\n  convoy agents\nCtrl-C to stop.", ctl.config.path.display());
        convoy_transport::shutdown_signal().await;
    }
    for a in agents {
        a.stop().await?;
    }
    ctl.stop().await?;
    step("demo finished");
    Ok(())
}
