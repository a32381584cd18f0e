//! Rollouts across three regions with real agents and real services: canary and waves, health
//! gates, automatic fleet rollback, pause/resume/abort, restart, convergence, freezes.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_controller::logic::rollouts::{AgentStep, Control, Rollout, RolloutSpec, RolloutState, Threshold};
use convoy_controller::logic::Environment;
use convoy_testkit::{DemoRelease, LocalAgent, LocalController, LocalOptions};

const WAIT: Duration = Duration::from_secs(60);
const REGIONS: [&str; 3] = ["ap-south", "eu-west", "us-east"];

struct Node {
    id: String,
    port: u16,
    agent: Option<LocalAgent>,
}

struct Fleet {
    tmp: tempfile::TempDir,
    ctl: Option<LocalController>,
    key: SecretKey,
    nodes: Vec<Node>,
}

impl Fleet {
    /// `per_region` agents in each of three regions. Agent `bad` (if any) gets MODE2=fail500.
    async fn new(per_region: usize, bad: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
        let mut f = Self { tmp, ctl: Some(ctl), key: SecretKey::generate(), nodes: vec![] };
        for region in REGIONS {
            for i in 0..per_region {
                let id = format!("{}-{i}", &region[..2]);
                let mode2 = if bad.contains(&id.as_str()) { "fail500" } else { "healthy" };
                f.add_agent(&id, region, mode2).await;
            }
        }
        f
    }

    fn ctl(&self) -> &LocalController {
        self.ctl.as_ref().unwrap()
    }

    async fn add_agent(&mut self, id: &str, region: &str, mode2: &str) {
        let dir = self.tmp.path().join(id);
        self.ctl().enroll(&dir, id, region).await.unwrap();
        let port = free_port();
        let node = Node { id: id.into(), port, agent: None };
        self.nodes.push(node);
        self.start_agent(id, mode2);
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        n.agent.as_mut().unwrap().wait_for(WAIT, |s| s.connected).await.unwrap();
    }

    fn start_agent(&mut self, id: &str, mode2: &str) {
        let dir = self.tmp.path().join(id);
        let public = self.key.public();
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        let port = n.port;
        let mode2 = mode2.to_string();
        n.agent = Some(
            LocalAgent::spawn_with(&dir, |c| {
                c.trust = vec![public];
                c.vars.insert("PORT".into(), port.to_string());
                c.vars.insert("MODE2".into(), mode2);
            })
            .unwrap(),
        );
    }

    async fn stop_agent(&mut self, id: &str) {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        n.agent.take().unwrap().stop().await.unwrap();
    }

    /// Pushes `shop-api@version` in `mode` (a literal mode, or "${MODE2}").
    async fn push(&self, version: &str, mode: &str) {
        let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
        self.ctl()
            .push_demo_release(self.tmp.path(), exe, &self.key, DemoRelease::new(version, mode))
            .await
            .unwrap();
    }

    async fn deploy(&self, spec: RolloutSpec) -> Result<String, String> {
        self.ctl().controller.rollouts().deploy(spec, "admin/test").await.map_err(|e| e.to_string())
    }

    async fn wait_final(&self, id: &str) -> Rollout {
        let c = &self.ctl().controller;
        eventually(WAIT, &format!("rollout {id} finishes"), || async {
            let r = c.rollouts().rollout(Some(id.into())).await.unwrap();
            r.state.is_final().then_some(r)
        })
        .await
    }

    async fn wait_for(&self, id: &str, what: &str, pred: impl Fn(&Rollout) -> bool) -> Rollout {
        let c = &self.ctl().controller;
        eventually(WAIT, what, || async {
            let r = c.rollouts().rollout(Some(id.into())).await.unwrap();
            pred(&r).then_some(r)
        })
        .await
    }

    fn serving(&self, id: &str) -> Option<String> {
        let n = self.nodes.iter().find(|n| n.id == id).unwrap();
        get(n.port).map(|s| s.trim_start_matches("demo-app ").to_string())
    }

    /// Whether every running agent serves `version` (and at least one runs).
    fn all_serving(&self, version: &str) -> bool {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.agent.is_some()).collect();
        !running.is_empty() && running.iter().all(|n| self.serving(&n.id).as_deref() == Some(version))
    }

    async fn shutdown(mut self) {
        for n in &mut self.nodes {
            if let Some(a) = n.agent.take() {
                a.stop().await.unwrap();
            }
        }
        self.ctl.take().unwrap().stop().await.unwrap();
    }
}

fn spec(version: &str) -> RolloutSpec {
    RolloutSpec::new("shop-api", version)
}

/// Brings the whole fleet to 1.0.0 with a plain rollout.
async fn baseline(f: &Fleet) {
    f.push("1.0.0", "healthy").await;
    let id = f.deploy(RolloutSpec { waves: vec![100], ..spec("1.0.0") }).await.unwrap();
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert!(f.all_serving("1.0.0"));
}

#[tokio::test]
async fn healthy_rollout_across_regions_follows_region_order() {
    let f = Fleet::new(2, &[]).await;
    baseline(&f).await;
    f.push("1.1.0", "healthy").await;
    let s = RolloutSpec {
        region_order: vec!["us".into(), "eu".into(), "ap".into()],
        waves: vec![50, 100],
        max_parallel: 1,
        ..spec("1.1.0")
    };
    let id = f.deploy(s).await.unwrap();
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert!(f.all_serving("1.1.0"));
    // Every us agent was activated before any eu agent, and eu before ap.
    let when = |prefix: &str| -> Vec<u128> {
        r.agents
            .values()
            .filter(|a| a.region.starts_with(prefix))
            .map(|a| a.activated_at_ms.unwrap())
            .collect()
    };
    for region in ["us", "eu", "ap"] {
        assert_eq!(when(region).len(), 2, "{region}: {:?}", r.agents);
    }
    assert!(when("us").iter().max() <= when("eu").iter().min(), "{:?}", r.agents);
    assert!(when("eu").iter().max() <= when("ap").iter().min(), "{:?}", r.agents);
    assert_eq!(r.waves[0], ["us-0"], "the canary is the first us agent");
    // Desired state and status agree: no drift anywhere.
    let status = f.ctl().controller.rollouts().fleet_status().await.unwrap();
    for region in REGIONS {
        assert_eq!(status["shop-api"][&Environment::default()][region].desired[0], "1.1.0");
        assert_eq!(status["shop-api"][&Environment::default()][region].drift.len(), 0, "{status:?}");
    }
    f.shutdown().await;
}

#[tokio::test]
async fn failing_canary_stops_the_rollout_and_marks_the_release_bad() {
    let f = Fleet::new(2, &[]).await;
    baseline(&f).await;
    f.push("2.0.0", "fail500").await;
    let id = f
        .deploy(RolloutSpec { health_deadline: Some(Duration::from_secs(2)), ..spec("2.0.0") })
        .await
        .unwrap();
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", r.events);
    let canary = &r.waves[0][0];
    assert_eq!(r.agents[canary].step, AgentStep::RolledBack);
    // Nobody else was switched.
    for (id, a) in &r.agents {
        if id != canary {
            assert!(!a.moved && matches!(a.step, AgentStep::Staged | AgentStep::Pending), "{id}: {a:?}");
        }
    }
    assert!(f.all_serving("1.0.0"));
    // The release is bad now: refused without --force.
    let err = f.deploy(spec("2.0.0")).await.unwrap_err();
    // (The controller's refusal is the domain's; the gRPC edge adds "--force" for the CLI.)
    assert!(err.contains("2.0.0 is marked bad"), "{err}");
    let forced = f
        .deploy(RolloutSpec { force: true, health_deadline: Some(Duration::from_secs(2)), ..spec("2.0.0") })
        .await;
    assert!(forced.is_ok(), "{forced:?}");
    f.wait_final(&forced.unwrap()).await;
    assert!(f.all_serving("1.0.0"));
    f.shutdown().await;
}

#[tokio::test]
async fn a_wave_past_its_failure_threshold_rolls_back_every_moved_agent() {
    let f = Fleet::new(2, &["eu-1", "us-1"]).await;
    baseline(&f).await;
    f.push("3.0.0", "${MODE2}").await;
    let s = RolloutSpec {
        canary: 1,
        waves: vec![100],
        max_failures: Threshold::Count(1),
        health_deadline: Some(Duration::from_secs(2)),
        ..spec("3.0.0")
    };
    let id = f.deploy(s).await.unwrap();
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", r.events);
    assert!(r.failure.as_deref().unwrap().contains("2 failure(s) in wave 2"), "{:?}", r.failure);
    for (id, a) in &r.agents {
        assert!(a.moved, "{id} was in a wave that ran");
        assert_eq!(a.step, AgentStep::RolledBack, "{id}");
    }
    assert!(f.all_serving("1.0.0"), "every moved agent is back on its previous release");
    f.shutdown().await;
}

#[tokio::test]
async fn pause_resume_and_abort() {
    let f = Fleet::new(1, &[]).await;
    baseline(&f).await;
    f.push("1.1.0", "healthy").await;
    f.push("1.2.0", "healthy").await;
    let c = &f.ctl().controller;

    let s = RolloutSpec { canary: 1, waves: vec![100], bake: Duration::from_secs(1), ..spec("1.1.0") };
    let id = f.deploy(s).await.unwrap();
    f.wait_for(&id, "canary done", |r| r.agents.values().any(|a| a.step == AgentStep::Healthy)).await;
    c.rollouts().control(&id, Control::Pause).await.unwrap();
    let paused = c.rollouts().rollout(Some(id.clone())).await.unwrap();
    assert_eq!(paused.state, RolloutState::Paused);
    // That the pause holds (nothing is sent while paused) is shown by state in the machine's
    // and the driver's tests; here, the pause is stored when acknowledged.
    assert_eq!(paused.agents.values().filter(|a| a.step == AgentStep::Healthy).count(), 1);
    c.rollouts().control(&id, Control::Resume).await.unwrap();
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::Completed);
    assert!(f.all_serving("1.1.0"));

    // Abort: the agents already moved go back.
    let s = RolloutSpec { canary: 1, waves: vec![100], bake: Duration::from_secs(30), ..spec("1.2.0") };
    let id = f.deploy(s).await.unwrap();
    f.wait_for(&id, "canary done", |r| r.agents.values().any(|a| a.step == AgentStep::Healthy)).await;
    c.rollouts().control(&id, Control::Abort).await.unwrap();
    let r = c.rollouts().rollout(Some(id.clone())).await.unwrap();
    assert_eq!(r.state, RolloutState::Aborted);
    assert!(f.all_serving("1.1.0"));
    assert!(
        c.rollouts().control(&id, Control::Resume).await.is_err(),
        "a finished rollout cannot be resumed"
    );
    f.shutdown().await;
}

#[tokio::test]
async fn a_controller_restart_mid_rollout_reaches_the_same_end() {
    let mut f = Fleet::new(1, &[]).await;
    baseline(&f).await;
    f.push("1.1.0", "healthy").await;
    let s = RolloutSpec { canary: 1, waves: vec![100], bake: Duration::from_secs(2), ..spec("1.1.0") };
    let id = f.deploy(s).await.unwrap();
    f.wait_for(&id, "canary done", |r| r.agents.values().any(|a| a.step == AgentStep::Healthy)).await;
    let ctl = f.ctl.take().unwrap();
    let addr = ctl.grpc_addr;
    ctl.stop().await.unwrap();
    let ctl = LocalController::start(
        &f.tmp.path().join("ctl"),
        LocalOptions { grpc_addr: Some(addr), ..Default::default() },
    )
    .await
    .unwrap();
    f.ctl = Some(ctl);
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert!(f.all_serving("1.1.0"));
    f.shutdown().await;
}

#[tokio::test]
async fn offline_and_late_agents_converge_to_the_desired_release() {
    let mut f = Fleet::new(1, &[]).await;
    baseline(&f).await;
    f.push("1.1.0", "healthy").await;
    f.stop_agent("eu-0").await;
    eventually(WAIT, "eu-0 offline", || async {
        common::agents(f.ctl()).await.iter().any(|a| a.id == "eu-0" && !a.online).then_some(())
    })
    .await;
    let id = f.deploy(RolloutSpec { waves: vec![100], ..spec("1.1.0") }).await.unwrap();
    let r = f.wait_final(&id).await;
    assert_eq!(r.state, RolloutState::Completed, "an offline agent is not a failure: {:?}", r.events);
    assert_eq!(r.agents["eu-0"].step, AgentStep::Offline);
    // The rollout says so instead of claiming every agent runs the release.
    let last = &r.events.last().unwrap().message;
    assert!(
        last.contains("2 of 3 targeted agent(s) run the release")
            && last.contains("1 offline or unreachable (eu-0)")
            && last.contains("converging when they reconnect"),
        "{last}"
    );
    assert_eq!(r.converging, ["eu-0"]);
    let status = admin_cli(&f, &["rollout", "status", &id]).await.unwrap();
    assert!(
        status.contains("not yet on the release: 1 agent(s) (eu-0); they converge when they reconnect"),
        "{status}"
    );
    let status = f.ctl().controller.rollouts().fleet_status().await.unwrap();
    assert_eq!(status["shop-api"][&Environment::default()]["eu-west"].drift[0], "eu-0", "{status:?}");
    // It comes back and converges.
    f.start_agent("eu-0", "healthy");
    eventually(WAIT, "eu-0 converges", || async {
        (f.serving("eu-0").as_deref() == Some("1.1.0")).then_some(())
    })
    .await;
    // An agent enrolled later into a matching region gets the desired release too.
    f.add_agent("ap-9", "ap-south", "healthy").await;
    eventually(WAIT, "late agent converges", || async {
        (f.serving("ap-9").as_deref() == Some("1.1.0")).then_some(())
    })
    .await;
    f.shutdown().await;
}

/// Runs `convoy ARGS` against the fleet's controller; stdout on success, stderr on failure.
async fn admin_cli(f: &Fleet, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convoy"))
        .arg("--config")
        .arg(f.ctl().dir.join("convoy.toml"))
        .arg("--controller")
        .arg(f.ctl().grpc_addr.to_string())
        .args(args)
        .output()
        .await
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn require_all_fails_a_rollout_that_cannot_reach_every_agent() {
    let mut f = Fleet::new(1, &[]).await;
    baseline(&f).await;
    f.push("1.1.0", "healthy").await;
    f.stop_agent("eu-0").await;
    eventually(WAIT, "eu-0 offline", || async {
        common::agents(f.ctl()).await.iter().any(|a| a.id == "eu-0" && !a.online).then_some(())
    })
    .await;
    let id = admin_cli(&f, &["deploy", "shop-api@1.1.0", "--waves", "100%", "--require-all"]).await.unwrap();
    let r = f.wait_final(id.trim()).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", r.events);
    let failure = r.failure.clone().unwrap();
    assert!(failure.contains("(eu-0)") && failure.contains("requires every agent"), "{failure}");
    assert!(r.spec.require_all);
    // The agents it had moved are back on the previous release.
    assert_eq!(r.agents["ap-0"].step, AgentStep::RolledBack, "{:?}", r.events);
    assert!(f.all_serving("1.0.0"));
    // An unreachable agent is not the release's fault: it is not marked bad, and with every
    // agent back the same deploy succeeds without --force.
    f.start_agent("eu-0", "healthy");
    eventually(WAIT, "eu-0 online", || async {
        common::agents(f.ctl()).await.iter().any(|a| a.id == "eu-0" && a.online).then_some(())
    })
    .await;
    let id = admin_cli(&f, &["deploy", "shop-api@1.1.0", "--waves", "100%", "--require-all"]).await.unwrap();
    let r = f.wait_final(id.trim()).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(r.events.last().unwrap().message, "completed: every targeted agent runs the release");
    assert!(f.all_serving("1.1.0"));
    f.shutdown().await;
}

#[tokio::test]
async fn freezes_block_deploys_not_rollbacks_and_one_rollout_per_app() {
    let f = Fleet::new(1, &[]).await;
    baseline(&f).await;
    f.push("1.1.0", "healthy").await;
    f.push("1.2.0", "healthy").await;
    let id = f.deploy(RolloutSpec { waves: vec![100], ..spec("1.1.0") }).await.unwrap();
    assert_eq!(f.wait_final(&id).await.state, RolloutState::Completed);
    let c = &f.ctl().controller;
    let now = convoy_controller::logic::now();
    let fz = c
        .rollouts()
        .freeze_add(convoy_controller::logic::rollouts::FreezeWindow {
            id: String::new(),
            from: now - 10,
            to: now + 3600,
            reason: "black friday".into(),
            app: None,
            region: Some("eu-west".into()),
            created_by: "admin/test".into(),
            name: None,
            recurrence: None,
        })
        .await
        .unwrap();
    let err = f.deploy(spec("1.2.0")).await.unwrap_err();
    assert!(err.contains("frozen") && err.contains("black friday"), "{err}");
    // Rollbacks are always allowed: the frozen region's agent really goes back, the others are
    // not touched.
    let (results, _) = c
        .rollouts()
        .rollback(
            "shop-api",
            &convoy_controller::logic::Target::Region("eu-west".into()).into(),
            None,
            None,
            "x",
            "admin/test",
        )
        .await
        .unwrap();
    let ids: Vec<&str> = results.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["eu-0"]);
    let o = results[0].1.as_ref().unwrap();
    assert_eq!(o.answer, convoy_controller::logic::Answer::Applied, "{}", o.message);
    assert_eq!(f.serving("eu-0").as_deref(), Some("1.0.0"));
    assert_eq!((f.serving("ap-0").as_deref(), f.serving("us-0").as_deref()), (Some("1.1.0"), Some("1.1.0")));
    let overridden = f
        .deploy(RolloutSpec {
            override_freeze: Some("hotfix for checkout".into()),
            waves: vec![100],
            bake: Duration::from_secs(30),
            ..spec("1.2.0")
        })
        .await
        .unwrap();
    let r = c.rollouts().rollout(Some(overridden.clone())).await.unwrap();
    assert!(r.events.iter().any(|e| e.message.contains("hotfix for checkout")));
    // One active rollout per app.
    let err = f.deploy(spec("1.2.0")).await.unwrap_err();
    assert!(err.contains(&format!("rollout {overridden} of shop-api is still")), "{err}");
    let newer = f
        .deploy(RolloutSpec {
            supersede: true,
            override_freeze: Some("again".into()),
            waves: vec![100],
            ..spec("1.2.0")
        })
        .await
        .unwrap();
    assert_eq!(c.rollouts().rollout(Some(overridden)).await.unwrap().state, RolloutState::Superseded);
    assert_eq!(f.wait_final(&newer).await.state, RolloutState::Completed);
    assert!(f.all_serving("1.2.0"));
    c.rollouts().freeze_rm(fz.id).await.unwrap();
    assert!(c.rollouts().freezes().await.unwrap().is_empty());
    f.shutdown().await;
}

/// `HH:MM` in UTC of `unix` shifted by `hours`.
fn utc_clock(unix: i64, hours: i64) -> String {
    let secs = (unix + hours * 3600).rem_euclid(86_400);
    format!("{:02}:{:02}", secs / 3600, secs / 60 % 60)
}

/// Recurring freezes through the CLI and the admin API: one that recurs now refuses a deploy and
/// the refusal names it; ones that do not recur now let the deploy through. They list with
/// their recurrence and next start, names are unique, and `rm` takes a name.
#[tokio::test]
async fn recurring_freezes_refuse_deploys_only_while_they_recur() {
    let f = Fleet::new(1, &[]).await;
    f.push("1.0.0", "healthy").await;
    let now = convoy_controller::logic::now();
    // Every day from an hour ago to an hour from now (crossing midnight where it must).
    let (from, to) = (utc_clock(now, -1), utc_clock(now, 1));
    let active = [
        "freeze",
        "add",
        "--name",
        "peak-hours",
        "--every",
        "week",
        "--days",
        "daily",
        "--from",
        &from,
        "--to",
        &to,
        "--tz",
        "UTC",
        "--reason",
        "evening peak",
    ];
    let id = admin_cli(&f, &active).await.unwrap();
    let id = id.trim();
    let err = admin_cli(&f, &["deploy", "shop-api@1.0.0", "--waves", "100%"]).await.unwrap_err();
    assert!(
        err.contains("frozen") && err.contains(&format!("peak-hours [{id}]")) && err.contains("evening peak"),
        "{err}"
    );
    assert!(err.contains("--override-freeze"), "{err}");
    let dup = admin_cli(&f, &active).await.unwrap_err();
    assert!(dup.contains("already named \"peak-hours\""), "{dup}");

    let list = admin_cli(&f, &["freeze", "list", "-o", "json"]).await.unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let listed = &list.as_array().unwrap()[0];
    assert_eq!(listed["name"], "peak-hours");
    assert_eq!(
        listed["recurrence"],
        serde_json::json!({"every": "week", "days": "daily", "from": from, "to": to, "tz": "UTC"})
    );
    let next = listed["next_start"].as_i64().unwrap();
    assert!(next > now && next <= now + 86_400, "tomorrow's start: {next} vs {now}");
    let table = admin_cli(&f, &["freeze", "list"]).await.unwrap();
    assert!(table.contains(&format!("every week daily {from} to {to} UTC")), "{table}");
    let removed = admin_cli(&f, &["freeze", "rm", "peak-hours"]).await.unwrap();
    assert_eq!(removed.trim(), format!("removed {id} (peak-hours)"));

    // Later today, and a sale season half a year away: neither freezes now.
    let (from, to) = (utc_clock(now, 2), utc_clock(now, 3));
    let later = [
        "freeze", "add", "--every", "week", "--days", "daily", "--from", &from, "--to", &to, "--tz", "UTC",
        "--reason", "later",
    ];
    let later = admin_cli(&f, &later).await.unwrap();
    let month = (now.rem_euclid(31_556_952) / 2_629_746) + 1;
    let (from, to) = if month <= 6 { ("08-10T00:00", "08-20T00:00") } else { ("02-10T00:00", "02-20T00:00") };
    let season = [
        "freeze",
        "add",
        "--name",
        "sale-season",
        "--every",
        "year",
        "--from",
        from,
        "--to",
        to,
        "--tz",
        "America/New_York",
        "--reason",
        "sales",
    ];
    admin_cli(&f, &season).await.unwrap();
    let id = admin_cli(&f, &["deploy", "shop-api@1.0.0", "--waves", "100%"]).await.unwrap();
    let r = f.wait_final(id.trim()).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    admin_cli(&f, &["freeze", "rm", later.trim()]).await.unwrap();
    admin_cli(&f, &["freeze", "rm", "sale-season"]).await.unwrap();
    assert!(f.ctl().controller.rollouts().freezes().await.unwrap().is_empty());
    f.shutdown().await;
}
