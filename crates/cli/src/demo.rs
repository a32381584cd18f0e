//! `convoy demo`: the whole story on one machine, in a temporary directory. A controller whose
//! production needs a completed staging rollout, a change note and a second person's approval;
//! one staging agent and six production agents in three regions; two admins, a deployer and an
//! approver; releases of a small HTTP service built, signed and pushed; a release promoted from
//! staging and approved; a bad release caught in staging and refused in production; a good
//! release region by region; and an Alertmanager alert that rolls the fleet back. Everything is
//! real: PKI, mutual TLS, signed bundles, processes, health checks, roles.

use std::time::{Duration, Instant};

use convoy_bundle::{BuildOptions, SecretKey};
use convoy_proto::v1 as pb;
use pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use convoy_controller::cli::{render_agents, table, Output};
use convoy_controller::logic::rollouts::Rollout;
use convoy_controller::logic::Environment;
use convoy_testkit::{http_get_root, write_demo_release, LocalAgent, LocalController, LocalOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Stay up after the demo, for exploring with the CLI, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

const STAGING: &str = "staging";
const PRODUCTION: &str = "production";

/// Production takes only releases that completed in staging, with a change note, once a
/// second admin approved.
const RULES: &str = r#"
[environments.production]
requires = ["staging"]
approvals = 1
require_note = true
"#;

/// (agent, region, environment)
const AGENTS: [(&str, &str, &str); 7] = [
    ("st-eu-1", "eu-west", STAGING),
    ("eu-1", "eu-west", PRODUCTION),
    ("eu-2", "eu-west", PRODUCTION),
    ("us-1", "us-east", PRODUCTION),
    ("us-2", "us-east", PRODUCTION),
    ("ap-1", "ap-south", PRODUCTION),
    ("ap-2", "ap-south", PRODUCTION),
];

struct Narrator(Instant);

impl Narrator {
    fn say(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

/// The agents' HTTP ports, by environment.
struct Fleet(Vec<(&'static str, u16)>);

impl Fleet {
    /// What each agent of `env` serves now (`None`: nothing answers).
    async fn serving(&self, env: &str) -> Vec<Option<String>> {
        let mut out = Vec::new();
        for (e, port) in &self.0 {
            if *e == env {
                let body = http_get_root(*port).await;
                out.push(body.map(|b| b.trim_start_matches("demo-app ").to_string()));
            }
        }
        out
    }

    /// "N/M <env> agents serve <version>", as observed.
    async fn count(&self, env: &str, version: &str) -> String {
        let all = self.serving(env).await;
        let n = all.iter().filter(|v| v.as_deref() == Some(version)).count();
        format!("{n}/{} {env} agents serve {version}", all.len())
    }

    /// What the staging agent serves, as observed.
    async fn staging(&self) -> String {
        let all = self.serving(STAGING).await;
        let what: Vec<&str> = all.iter().map(|v| v.as_deref().unwrap_or("nothing")).collect();
        format!("staging serves {}", what.join(", "))
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let n = Narrator(Instant::now());
    let tmp = tempfile::Builder::new().prefix("convoy-demo-").tempdir()?;
    let root = tmp.path();
    let exe = std::env::current_exe()?;

    let opts = LocalOptions { extra_config: Some(RULES.into()), ..LocalOptions::default() };
    let ctl = LocalController::start(&root.join("controller"), opts).await?;
    n.say(&format!(
        "controller up: CA and certificates in {}, gRPC (mTLS) on {}, HTTP on {}",
        ctl.dir.display(),
        ctl.grpc_addr,
        ctl.http_addr
    ));
    // The rule as the controller loaded it from its config.
    let production = Environment::default();
    let rule = ctl.config.environments.rule(&production);
    let mut needs: Vec<String> =
        rule.requires.iter().map(|e| format!("a completed rollout in {e}")).collect();
    if rule.require_note {
        needs.push("a change note".into());
    }
    if rule.approvals > 0 {
        needs.push(format!("{} approval(s) by an admin other than the deployer", rule.approvals));
    }
    n.say(&format!("promotion rule loaded: a release goes to {production} only with {}", needs.join(", ")));

    let key = SecretKey::generate();
    n.say(&format!("release signing key {} generated (the controller never sees it)", key.public().id()));

    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for (id, region, env) in AGENTS {
        let dir = root.join("agents").join(id);
        ctl.enroll_in(&dir, id, region, env).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let public = key.public();
        agents.push(LocalAgent::spawn_with(&dir, |c| {
            c.trust = vec![public];
            c.vars.insert("PORT".into(), port.to_string());
        })?);
        ports.push((env, port));
    }
    let fleet = Fleet(ports);
    for a in &mut agents {
        a.wait_for(Duration::from_secs(30), |s| s.connected).await?;
    }
    n.say("seven agents enrolled with one-time tokens bound to a region and an environment (keys generated on the agents): st-eu-1 in staging; six in production in eu-west, us-east, ap-south");

    let mut dana = ctl.admin_as(&ctl.add_admin("dana", "approver").await?).await?;
    let mut alex = ctl.admin_as(&ctl.add_admin("alex", "approver").await?).await?;
    n.say("admins added with their own certificates: dana (role approver: she may deploy, and approve the rollouts of others), alex (role approver)");

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

    let base = pb::DeployRequest { app: "shop-api".into(), waves: vec![50, 100], ..Default::default() };

    // 1.0.0: staging, then production with a note, waiting for alex.
    let spec = pb::DeployRequest { version: "1.0.0".into(), environment: STAGING.into(), ..base.clone() };
    let r = rollout(&ctl, &mut dana, spec, &n).await?;
    n.say(&format!(
        "rollout {} of 1.0.0 in staging: {:?}; {}",
        r.id,
        r.state,
        fleet.count(STAGING, "1.0.0").await
    ));

    let spec = pb::DeployRequest {
        version: "1.0.0".into(),
        environment: PRODUCTION.into(),
        note: "First release of shop-api: orders and checkout.".into(),
        ticket: "https://tickets.example/CHG-1001".into(),
        ..base.clone()
    };
    let id = deploy(&mut dana, spec, &n).await?;
    let seen = awaiting(&ctl, &mut dana, &id, &fleet, &n).await?;
    match dana.control_rollout(approve(&id, "")).await {
        Err(refusal) => {
            n.say(&format!("dana approves her own rollout {id} → refused: {}", refusal.message()))
        }
        Ok(_) => anyhow::bail!("the controller accepted dana's approval of her own rollout {id}"),
    }
    alex.control_rollout(approve(&id, "Reviewed the change; staging is healthy.")).await?;
    n.say(&format!("alex approves rollout {id} (note: \"Reviewed the change; staging is healthy.\")"));
    let r = follow(&ctl, &id, seen).await?;
    n.say(&format!(
        "rollout {} of 1.0.0 in production: {:?} in {} waves; {}",
        r.id,
        r.state,
        r.waves.len(),
        fleet.count(PRODUCTION, "1.0.0").await
    ));

    // 2.0.0: fails in staging, so production refuses it.
    let spec = pb::DeployRequest {
        version: "2.0.0".into(),
        environment: STAGING.into(),
        health_deadline_ms: 3000,
        ..base.clone()
    };
    let r = rollout(&ctl, &mut dana, spec, &n).await?;
    // What the controller recorded, not what the demo expects.
    let verdict = if ctl.controller.rollouts().is_marked_bad("shop-api", "2.0.0").await? {
        "2.0.0 is marked bad"
    } else {
        "2.0.0 is NOT marked bad"
    };
    n.say(&format!(
        "rollout {} of 2.0.0 in staging: {:?} — {}; {}, {verdict}",
        r.id,
        r.state,
        r.failure.clone().unwrap_or_default(),
        fleet.staging().await
    ));
    let spec = pb::DeployRequest {
        version: "2.0.0".into(),
        environment: PRODUCTION.into(),
        note: "Faster checkout.".into(),
        ..base.clone()
    };
    match dana.deploy(spec).await {
        Err(refusal) => n.say(&format!(
            "dana deploys shop-api@2.0.0 to production → refused: {}; {}",
            refusal.message(),
            fleet.count(PRODUCTION, "1.0.0").await
        )),
        Ok(r) => {
            anyhow::bail!("the controller accepted 2.0.0 into production: rollout {}", r.into_inner().id)
        }
    }

    // 3.0.0: staging, then production region by region once alex approves.
    let spec = pb::DeployRequest { version: "3.0.0".into(), environment: STAGING.into(), ..base.clone() };
    let r = rollout(&ctl, &mut dana, spec, &n).await?;
    n.say(&format!(
        "rollout {} of 3.0.0 in staging: {:?}; {}",
        r.id,
        r.state,
        fleet.count(STAGING, "3.0.0").await
    ));
    let spec = pb::DeployRequest {
        version: "3.0.0".into(),
        environment: PRODUCTION.into(),
        note: "Faster checkout, with the health check fixed.".into(),
        ticket: "https://tickets.example/CHG-1002".into(),
        region_order: vec!["ap".into(), "eu".into(), "us".into()],
        waves: vec![100],
        ..base
    };
    let id = deploy(&mut dana, spec, &n).await?;
    let seen = awaiting(&ctl, &mut dana, &id, &fleet, &n).await?;
    alex.control_rollout(approve(&id, "Staging ran it clean.")).await?;
    n.say(&format!("alex approves rollout {id} (note: \"Staging ran it clean.\")"));
    let r = follow(&ctl, &id, seen).await?;
    n.say(&format!(
        "rollout {} of 3.0.0 in production (ap, then eu, then us): {:?}; {}",
        r.id,
        r.state,
        fleet.count(PRODUCTION, "3.0.0").await
    ));

    let started = Instant::now();
    let token = ctl.config.hooks.alertmanager_token.clone().unwrap_or_default();
    let status = alert(ctl.http_addr, &token).await?;
    n.say(&format!(
        "Alertmanager alert CheckoutErrorRate (convoy_action=rollback) → HTTP {status}; fleet rolled back in {} ms: {} again; {}",
        started.elapsed().as_millis(),
        fleet.count(PRODUCTION, "1.0.0").await,
        fleet.staging().await
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

fn approve(id: &str, note: &str) -> pb::ControlRolloutRequest {
    pb::ControlRolloutRequest {
        id: id.into(),
        action: pb::RolloutAction::Approve as i32,
        note: note.into(),
        ..Default::default()
    }
}

/// Deploys as dana through the admin API, as `convoy deploy` does; returns the rollout id.
async fn deploy(
    dana: &mut AdminServiceClient<Channel>,
    spec: pb::DeployRequest,
    n: &Narrator,
) -> anyhow::Result<String> {
    let what = format!("shop-api@{} to {}", spec.version, spec.environment);
    let with = match (spec.note.is_empty(), spec.ticket.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!(" with note \"{}\"", spec.note),
        (false, false) => format!(" with note \"{}\" and ticket {}", spec.note, spec.ticket),
    };
    let id = dana.deploy(spec).await?.into_inner().id;
    n.say(&format!("dana deploys {what}{with} → rollout {id}"));
    Ok(id)
}

/// Deploys as dana and narrates the rollout's events until it ends.
async fn rollout(
    ctl: &LocalController,
    dana: &mut AdminServiceClient<Channel>,
    spec: pb::DeployRequest,
    n: &Narrator,
) -> anyhow::Result<Rollout> {
    let id = deploy(dana, spec, n).await?;
    follow(ctl, &id, 0).await
}

/// Narrates a rollout that should await approval: its events, its state and what it waits
/// for as the admin API reports them, and what production serves meanwhile. Returns the number
/// of events printed.
async fn awaiting(
    ctl: &LocalController,
    admin: &mut AdminServiceClient<Channel>,
    id: &str,
    fleet: &Fleet,
    n: &Narrator,
) -> anyhow::Result<usize> {
    let seen = print_events(&ctl.controller.rollouts().rollout(Some(id.into())).await?, 0);
    let r = admin.get_rollout(pb::RolloutRef { id: id.into() }).await?.into_inner();
    let state = pb::RolloutState::try_from(r.state)
        .map_or_else(|_| format!("state {}", r.state), |s| format!("{s:?}"));
    let version = r.spec.as_ref().map(|s| s.version.clone()).unwrap_or_default();
    let serving = fleet.serving(PRODUCTION).await;
    let moved = serving.iter().filter(|v| v.as_deref() == Some(version.as_str())).count();
    let count = format!("{moved}/{} production agents serve {version}", serving.len());
    let moved =
        if moved == 0 { format!("nothing moved: {count}") } else { format!("it moved agents: {count}") };
    n.say(&format!("rollout {id} is {state}: {}; {moved}", r.waiting.join("; ")));
    Ok(seen)
}

/// Prints the rollout's events after the first `seen`; returns how many it has.
fn print_events(r: &Rollout, seen: usize) -> usize {
    for e in r.events.iter().skip(seen) {
        println!("          · {}", e.message);
    }
    r.events.len()
}

/// Narrates a rollout's events after the first `seen` until it ends.
async fn follow(ctl: &LocalController, id: &str, mut seen: usize) -> anyhow::Result<Rollout> {
    loop {
        let r = ctl.controller.rollouts().rollout(Some(id.into())).await?;
        seen = print_events(&r, seen);
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
