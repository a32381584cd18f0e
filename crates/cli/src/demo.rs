//! `convoy demo`: the whole story on one machine, in a temporary directory. A controller and six
//! agents in three regions; releases of a small HTTP service built, signed and pushed; a rollout
//! in waves; a bad release caught by its canary and rolled back automatically; a good release;
//! and an Alertmanager alert that rolls the fleet back. Everything is real: PKI, mutual TLS,
//! signed bundles, processes, health checks.

use std::time::{Duration, Instant};

use convoy_bundle::{BuildOptions, SecretKey};
use convoy_proto::v1 as pb;

use convoy_controller::cli::{render_agents, table, Output};
use convoy_controller::logic::rollouts::Rollout;
use convoy_testkit::{http_get_root, write_demo_release, LocalAgent, LocalController, LocalOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Stay up after the demo, for exploring with the CLI, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

const AGENTS: [(&str, &str); 6] = [
    ("eu-1", "eu-west"),
    ("eu-2", "eu-west"),
    ("us-1", "us-east"),
    ("us-2", "us-east"),
    ("ap-1", "ap-south"),
    ("ap-2", "ap-south"),
];

struct Narrator(Instant);

impl Narrator {
    fn say(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let n = Narrator(Instant::now());
    let tmp = tempfile::Builder::new().prefix("convoy-demo-").tempdir()?;
    let root = tmp.path();
    let exe = std::env::current_exe()?;

    let ctl = LocalController::start(&root.join("controller"), LocalOptions::default()).await?;
    n.say(&format!(
        "controller up: CA and certificates in {}, gRPC (mTLS) on {}, HTTP on {}",
        ctl.dir.display(),
        ctl.grpc_addr,
        ctl.http_addr
    ));

    let key = SecretKey::generate();
    n.say(&format!("release signing key {} generated (the controller never sees it)", key.public().id()));

    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for (id, region) in AGENTS {
        let dir = root.join("agents").join(id);
        ctl.enroll(&dir, id, region).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let public = key.public();
        agents.push(LocalAgent::spawn_with(&dir, |c| {
            c.trust = vec![public];
            c.vars.insert("PORT".into(), port.to_string());
        })?);
        ports.push((id, port));
    }
    for a in &mut agents {
        a.wait_for(Duration::from_secs(30), |s| s.connected).await?;
    }
    n.say("six agents enrolled with one-time tokens (keys generated on the agents) in eu-west, us-east, ap-south");

    for (version, mode, what) in [
        ("1.0.0", "healthy", "healthy"),
        ("2.0.0", "fail500", "answers 500 on /healthz"),
        ("3.0.0", "healthy", "healthy"),
    ] {
        let src = root.join("releases").join(version);
        write_demo_release(&src, &exe, version, mode, "")?;
        let out = root.join("releases").join(format!("shop-api-{version}.bundle"));
        let opts = BuildOptions {
            app: "shop-api".into(),
            version: version.into(),
            created_at: 1_767_225_600,
            target: None,
            zstd_level: 3,
        };
        let m = convoy_bundle::build(&src, &opts, &key, &out)?;
        ctl.push_file(&out).await?;
        n.say(&format!(
            "built, signed and pushed shop-api@{version} ({what}; {} files, payload sha256 {}…)",
            m.files.len(),
            &m.payload.sha256[..12]
        ));
    }

    let serving = |want: &str| {
        let want = format!("demo-app {want}");
        let ports = ports.iter().map(|(_, p)| *p).collect::<Vec<_>>();
        async move {
            let mut n = 0;
            for p in ports {
                n += usize::from(http_get_root(p).await.as_deref() == Some(want.as_str()));
            }
            n
        }
    };

    let base = pb::DeployRequest { app: "shop-api".into(), waves: vec![50, 100], ..Default::default() };
    let spec = pb::DeployRequest { version: "1.0.0".into(), ..base.clone() };
    let r = rollout(&ctl, spec, &n).await?;
    n.say(&format!(
        "rollout {} of 1.0.0: {:?} in {} waves; {}/6 agents serve 1.0.0",
        r.id,
        r.state,
        r.waves.len(),
        serving("1.0.0").await
    ));

    let spec = pb::DeployRequest { version: "2.0.0".into(), health_deadline_ms: 3000, ..base.clone() };
    let r = rollout(&ctl, spec, &n).await?;
    // What the controller recorded, not what the demo expects.
    let verdict = if ctl.controller.rollouts().is_marked_bad("shop-api", "2.0.0").await? {
        "2.0.0 is marked bad"
    } else {
        "2.0.0 is NOT marked bad"
    };
    n.say(&format!(
        "rollout {} of 2.0.0: {:?} — {}; {}/6 agents still serve 1.0.0, {verdict}",
        r.id,
        r.state,
        r.failure.clone().unwrap_or_default(),
        serving("1.0.0").await
    ));

    let spec = pb::DeployRequest {
        version: "3.0.0".into(),
        region_order: vec!["ap".into(), "eu".into(), "us".into()],
        waves: vec![100],
        ..base
    };
    let r = rollout(&ctl, spec, &n).await?;
    n.say(&format!(
        "rollout {} of 3.0.0 (ap, then eu, then us): {:?}; {}/6 agents serve 3.0.0",
        r.id,
        r.state,
        serving("3.0.0").await
    ));

    let started = Instant::now();
    let token = ctl.config.hooks.alertmanager_token.clone().unwrap_or_default();
    let status = alert(ctl.http_addr, &token).await?;
    n.say(&format!(
        "Alertmanager alert CheckoutErrorRate (convoy_action=rollback) → HTTP {status}; fleet rolled back in {} ms: {}/6 agents serve 1.0.0 again",
        started.elapsed().as_millis(),
        serving("1.0.0").await
    ));

    let log = ctl.controller.audit().entries(None, None).await?;
    println!("\n$ convoy audit");
    let mut rows = vec![["SEQ", "ACTOR", "ACTION", "TARGET", "OUTCOME"].map(String::from)];
    for e in &log {
        rows.push([
            e.seq.to_string(),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            e.outcome.clone(),
        ]);
    }
    print!("{}", table(&rows));
    match ctl.controller.audit().verify().await? {
        Ok(count) => println!("audit log: {count} entries, hash chain intact"),
        Err(problem) => anyhow::bail!("audit log does not verify: {problem}"),
    }
    let listed = ctl.admin().await?.list_agents(pb::ListAgentsRequest::default()).await?.into_inner();
    println!("\n$ convoy agents\n{}", render_agents(listed.agents, Output::Table)?);

    if args.keep {
        println!(
            "the fleet stays up; in another terminal:\n  export CONVOY_CONFIG={}\n  convoy agents\n  convoy status\n  convoy rollout list\nCtrl-C to stop.",
            ctl.config.path.display()
        );
        convoy_transport::shutdown_signal().await;
    }
    for a in agents {
        a.stop().await?;
    }
    ctl.stop().await?;
    n.say("demo finished");
    Ok(())
}

/// Deploys through the admin API, as `convoy deploy` does, and narrates the rollout's events.
async fn rollout(ctl: &LocalController, spec: pb::DeployRequest, n: &Narrator) -> anyhow::Result<Rollout> {
    let version = spec.version.clone();
    let id = ctl.admin().await?.deploy(spec).await?.into_inner().id;
    n.say(&format!("deploy shop-api@{version} → rollout {id} (canary first, then waves, health-gated)"));
    let mut seen = 0;
    loop {
        let r = ctl.controller.rollouts().rollout(Some(id.clone())).await?;
        for e in r.events.iter().skip(seen) {
            println!("          · {}", e.message);
        }
        seen = r.events.len();
        if r.state.is_final() {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts an Alertmanager (version 4) webhook, as Alertmanager would.
async fn alert(addr: std::net::SocketAddr, token: &str) -> anyhow::Result<u16> {
    let body = serde_json::json!({
        "version": "4",
        "status": "firing",
        "receiver": "convoy",
        "groupKey": "{}:{alertname=\"CheckoutErrorRate\"}",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "CheckoutErrorRate", "app": "shop-api", "convoy_action": "rollback", "severity": "page"},
            "annotations": {"summary": "checkout errors above 2%"},
            "startsAt": "2026-11-29T10:00:00Z",
            "fingerprint": "demo-1"
        }]
    })
    .to_string();
    let url = format!("http://{addr}/v1/hooks/alertmanager");
    let auth = format!("Bearer {token}");
    let status = convoy_testkit::http_client()?
        .post_json(&url, body, &[("authorization", auth.as_str())], Duration::from_secs(30))
        .await?;
    Ok(status)
}
