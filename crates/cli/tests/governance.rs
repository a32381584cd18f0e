//! Release governance through the real admin API, with admins of different roles and real
//! agents in two environments: promotion from staging, change notes, two-person approval,
//! rejection, abort before the start, skipping promotion (admins only), a rollback in staging
//! ending a release's promotion, scheduled starts, and the environment in listings and status.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_pki::ClientIdentity;
use convoy_proto::v1 as pb;
use convoy_testkit::{DemoRelease, LocalAgent, LocalController, LocalOptions};
use pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// Production needs a completed staging rollout, one approval and a change note; `dr` needs an
/// hour of soak in staging.
const RULES: &str = r#"
[environments.production]
requires = ["staging"]
approvals = 1
require_note = true

[environments.dr]
requires = ["staging"]
soak = "1h"
"#;

/// (agent, region, environment)
const AGENTS: [(&str, &str, &str); 4] = [
    ("st-0", "eu-west", "staging"),
    ("eu-0", "eu-west", "production"),
    ("us-0", "us-east", "production"),
    ("dr-0", "eu-west", "dr"),
];

struct Gov {
    tmp: tempfile::TempDir,
    ctl: LocalController,
    key: SecretKey,
    agents: Vec<(String, u16, LocalAgent)>,
    /// Role approver: deploys (and may approve others' rollouts).
    dana: AdminServiceClient<Channel>,
    /// Role approver: approves.
    alex: AdminServiceClient<Channel>,
    /// Role deployer: may deploy, not approve.
    devin: AdminServiceClient<Channel>,
    /// The first admin, role admin.
    root: AdminServiceClient<Channel>,
}

impl Gov {
    async fn new() -> Self {
        Self::with_config(RULES).await
    }

    async fn with_config(config: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let opts = LocalOptions { extra_config: Some(config.into()), ..Default::default() };
        let ctl = LocalController::start(&tmp.path().join("ctl"), opts).await.unwrap();
        let key = SecretKey::generate();
        let mut agents = Vec::new();
        for (id, region, env) in AGENTS {
            let dir = tmp.path().join(id);
            ctl.enroll_in(&dir, id, region, env).await.unwrap();
            let port = free_port();
            let public = key.public();
            let mut agent = LocalAgent::spawn_with(&dir, |c| {
                c.trust = vec![public];
                c.vars.insert("PORT".into(), port.to_string());
                c.vars.insert("MODE2".into(), "healthy".into());
            })
            .unwrap();
            agent.wait_for(WAIT, |s| s.connected).await.unwrap();
            agents.push((id.to_string(), port, agent));
        }
        let client = |id: ClientIdentity| {
            let ctl = &ctl;
            async move { ctl.admin_as(&id).await.unwrap() }
        };
        let dana = client(ctl.add_admin("dana", "approver").await.unwrap()).await;
        let alex = client(ctl.add_admin("alex", "approver").await.unwrap()).await;
        let devin = client(ctl.add_admin("devin", "deployer").await.unwrap()).await;
        let root = ctl.admin().await.unwrap();
        Self { tmp, ctl, key, agents, dana, alex, devin, root }
    }

    async fn push(&self, version: &str) {
        let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
        self.ctl
            .push_demo_release(self.tmp.path(), exe, &self.key, DemoRelease::new(version, "healthy"))
            .await
            .unwrap();
    }

    fn serving(&self, id: &str) -> Option<String> {
        let (_, port, _) = self.agents.iter().find(|(a, _, _)| a == id).unwrap();
        get(*port).map(|s| s.trim_start_matches("demo-app ").to_string())
    }

    async fn rollout(&self, id: &str) -> pb::Rollout {
        self.ctl
            .admin()
            .await
            .unwrap()
            .get_rollout(pb::RolloutRef { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait_state(&self, id: &str, state: pb::RolloutState) -> pb::Rollout {
        eventually(WAIT, &format!("rollout {id} {state:?}"), || async {
            let r = self.rollout(id).await;
            (r.state == state as i32).then_some(r)
        })
        .await
    }

    async fn shutdown(self) {
        for (_, _, a) in self.agents {
            a.stop().await.unwrap();
        }
        self.ctl.stop().await.unwrap();
    }
}

fn deploy(version: &str, env: &str, note: &str) -> pb::DeployRequest {
    pb::DeployRequest {
        app: "shop-api".into(),
        version: version.into(),
        environment: env.into(),
        note: note.into(),
        waves: vec![100],
        ..Default::default()
    }
}

fn control(id: &str, action: &str, reason: &str, note: &str) -> pb::ControlRolloutRequest {
    let action = match action {
        "pause" => pb::RolloutAction::Pause,
        "resume" => pb::RolloutAction::Resume,
        "abort" => pb::RolloutAction::Abort,
        "approve" => pb::RolloutAction::Approve,
        "reject" => pb::RolloutAction::Reject,
        _ => pb::RolloutAction::Unspecified,
    };
    pb::ControlRolloutRequest {
        id: id.into(),
        action: action as i32,
        reason: reason.into(),
        note: note.into(),
    }
}

/// Deploys and returns the rollout id, or the refusal.
async fn try_deploy(
    c: &mut AdminServiceClient<Channel>,
    req: pb::DeployRequest,
) -> Result<String, tonic::Status> {
    Ok(c.deploy(req).await?.into_inner().id)
}

fn refused(r: Result<String, tonic::Status>, code: Code, words: &str) {
    let s = r.expect_err("the deploy was accepted");
    assert_eq!(s.code(), code, "{}", s.message());
    assert!(s.message().contains(words), "{:?} does not say {words:?}", s.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_reaches_production_through_staging_a_note_and_a_second_person() {
    let mut g = Gov::new().await;
    g.push("1.0.0").await;

    // Agents carry their token's environment; listings filter by it.
    let staging = g
        .dana
        .list_agents(pb::ListAgentsRequest { environment: "staging".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(
        staging.iter().map(|a| (a.id.as_str(), a.environment.as_str())).collect::<Vec<_>>(),
        [("st-0", "staging")]
    );

    // Production before staging: refused, naming the rule and what is missing.
    refused(
        try_deploy(&mut g.dana, deploy("1.0.0", "", "first release")).await,
        Code::FailedPrecondition,
        "shop-api@1.0.0 has not completed in staging",
    );
    let st = try_deploy(&mut g.dana, deploy("1.0.0", "staging", "")).await.unwrap();
    g.wait_state(&st, pb::RolloutState::Completed).await;
    assert_eq!(g.serving("st-0").as_deref(), Some("1.0.0"));
    assert_eq!(g.serving("eu-0"), None, "a staging rollout moves only staging agents");

    // Production wants a change note; dr wants an hour in staging.
    refused(
        try_deploy(&mut g.dana, deploy("1.0.0", "production", "")).await,
        Code::FailedPrecondition,
        "need a change note",
    );
    refused(
        try_deploy(&mut g.dana, deploy("1.0.0", "dr", "")).await,
        Code::FailedPrecondition,
        "of the 1h required (since rollout",
    );

    // With a note: it waits for a second person and moves nothing.
    let mut req = deploy("1.0.0", "production", "Adds the VAT field to orders.\nBacked up first.");
    req.ticket = "https://tickets.example/CHG-42".into();
    let prod = try_deploy(&mut g.dana, req).await.unwrap();
    let r = g.rollout(&prod).await;
    assert_eq!(r.state, pb::RolloutState::AwaitingApproval as i32);
    assert!(
        r.waiting.iter().any(|w| w.contains("1 more approval") && w.contains("admin/dana")),
        "{:?}",
        r.waiting
    );
    let spec = r.spec.unwrap();
    assert_eq!(spec.note.as_deref(), Some("Adds the VAT field to orders.\nBacked up first."));
    assert_eq!(spec.ticket.as_deref(), Some("https://tickets.example/CHG-42"));
    assert_eq!(spec.environment, "production");

    // The deployer's own approval is refused; so is one by a role that may not approve.
    let own = g.dana.control_rollout(control(&prod, "approve", "", "")).await.unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(own.message().contains("cannot approve"), "{}", own.message());
    let low = g.devin.control_rollout(control(&prod, "approve", "", "")).await.unwrap_err();
    assert_eq!(low.code(), Code::PermissionDenied);
    assert!(low.message().contains("needs role approver"), "{}", low.message());
    assert_eq!(g.rollout(&prod).await.state, pb::RolloutState::AwaitingApproval as i32);
    assert_eq!(g.serving("eu-0"), None, "nothing moved while it waited");

    // A second person approves: it runs to completion.
    g.alex.control_rollout(control(&prod, "approve", "", "risk reviewed")).await.unwrap();
    let done = g.wait_state(&prod, pb::RolloutState::Completed).await;
    let gate = done.approval.unwrap();
    assert_eq!((gate.required, gate.approvals.len()), (1, 1));
    assert_eq!(
        (gate.approvals[0].by.as_str(), gate.approvals[0].note.as_deref()),
        ("admin/alex", Some("risk reviewed"))
    );
    assert_eq!(g.serving("eu-0").as_deref(), Some("1.0.0"));
    assert_eq!(g.serving("us-0").as_deref(), Some("1.0.0"));
    assert_eq!(g.serving("dr-0"), None);

    // The audit log has the note with the deploy and the approval by its approver.
    let log = g.ctl.controller.audit().entries(Some("shop-api".into()), None).await.unwrap();
    assert!(log.iter().any(|e| e.action == "deploy"
        && e.actor == "admin/dana"
        && e.params["note"] == "Adds the VAT field to orders.\nBacked up first."
        && e.params["environment"] == "production"));
    let approvals: Vec<_> = g
        .ctl
        .controller
        .audit()
        .entries(None, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "rollout.approve" && e.target == prod)
        .map(|e| (e.actor, e.outcome))
        .collect();
    assert!(approvals.contains(&("admin/alex".to_string(), "ok".to_string())), "{approvals:?}");
    assert!(
        approvals.iter().any(|(who, outcome)| who == "admin/dana" && outcome.starts_with("refused")),
        "{approvals:?}"
    );

    // Status is per environment (dr runs nothing of the app, so it has no row).
    let status = g.dana.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let mut places: Vec<(String, String)> =
        status.regions.iter().map(|r| (r.environment.clone(), r.region.clone())).collect();
    places.sort();
    assert_eq!(
        places,
        [("production", "eu-west"), ("production", "us-east"), ("staging", "eu-west")]
            .map(|(e, r)| (e.to_string(), r.to_string()))
    );

    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejections_aborts_skips_rollbacks_and_schedules_move_nothing_they_should_not() {
    let mut g = Gov::new().await;
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        g.push(v).await;
    }
    let st = try_deploy(&mut g.dana, deploy("1.0.0", "staging", "")).await.unwrap();
    g.wait_state(&st, pb::RolloutState::Completed).await;

    // Rejected: it never starts, and says by whom and why.
    let prod = try_deploy(&mut g.dana, deploy("1.0.0", "production", "n")).await.unwrap();
    let no_reason = g.alex.control_rollout(control(&prod, "reject", "", "")).await.unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument, "{}", no_reason.message());
    g.alex.control_rollout(control(&prod, "reject", "no change window agreed", "")).await.unwrap();
    let r = g.rollout(&prod).await;
    assert_eq!(r.state, pb::RolloutState::Rejected as i32);
    assert!(r.failure.unwrap().contains("rejected by admin/alex: no change window agreed"));
    assert_eq!(g.serving("eu-0"), None);
    let late = g.alex.control_rollout(control(&prod, "approve", "", "")).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{}", late.message());

    // Aborted while awaiting approval: ends with nothing moved.
    let prod = try_deploy(&mut g.dana, deploy("1.0.0", "production", "n")).await.unwrap();
    let dup = try_deploy(&mut g.dana, deploy("1.0.0", "production", "n")).await;
    refused(dup, Code::AlreadyExists, "still AwaitingApproval");
    g.dana.control_rollout(control(&prod, "abort", "", "")).await.unwrap();
    assert_eq!(g.rollout(&prod).await.state, pb::RolloutState::Aborted as i32);
    assert_eq!(g.serving("eu-0"), None);

    // Skipping promotion is for admins only, needs a reason, and still waits for approval.
    let mut skip = deploy("1.1.0", "production", "hotfix");
    skip.skip_promotion = true;
    skip.skip_reason = "payment outage, staging is down".into();
    refused(try_deploy(&mut g.dana, skip.clone()).await, Code::PermissionDenied, "needs role admin");
    let mut no_reason = skip.clone();
    no_reason.skip_reason = String::new();
    refused(
        try_deploy(&mut g.root, no_reason).await,
        Code::InvalidArgument,
        "--skip-promotion needs a --reason",
    );
    let skipped = try_deploy(&mut g.root, skip).await.unwrap();
    let r = g.rollout(&skipped).await;
    assert_eq!(r.state, pb::RolloutState::AwaitingApproval as i32);
    assert!(r
        .events
        .iter()
        .any(|e| e.message.contains("promotion rules of production skipped: payment outage")));
    // The admin who created alex's name cannot have alex approve: that is one person.
    let own = g.alex.control_rollout(control(&skipped, "approve", "", "")).await.unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(own.message().contains("are not independent"), "{}", own.message());
    g.root.control_rollout(control(&skipped, "abort", "", "")).await.unwrap();

    // A rollback in staging ends the release's promotion.
    let st = try_deploy(&mut g.dana, deploy("1.2.0", "staging", "")).await.unwrap();
    g.wait_state(&st, pb::RolloutState::Completed).await;
    g.dana
        .rollback(pb::RollbackRequest {
            app: "shop-api".into(),
            agent_ids: vec!["st-0".into()],
            reason: "checkout errors in staging".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(g.serving("st-0").as_deref(), Some("1.0.0"));
    refused(
        try_deploy(&mut g.dana, deploy("1.2.0", "production", "n")).await,
        Code::FailedPrecondition,
        "was rolled back in staging by admin/dana (checkout errors in staging)",
    );

    // Scheduled: waits for its start, and an abort cancels it with nothing moved.
    let mut later = deploy("1.1.0", "staging", "");
    later.start_at_unix = convoy_controller::logic::now() + 3600;
    let sched = try_deploy(&mut g.dana, later).await.unwrap();
    let r = g.rollout(&sched).await;
    assert_eq!(r.state, pb::RolloutState::Scheduled as i32);
    assert!(r.waiting.iter().any(|w| w.starts_with("scheduled to start at")), "{:?}", r.waiting);
    let pause = g.dana.control_rollout(control(&sched, "pause", "", "")).await.unwrap_err();
    assert!(pause.message().contains("is scheduled and has not started"), "{}", pause.message());
    g.dana.control_rollout(control(&sched, "abort", "", "")).await.unwrap();
    assert_eq!(g.rollout(&sched).await.state, pb::RolloutState::Aborted as i32);
    assert_eq!(g.serving("st-0").as_deref(), Some("1.0.0"));

    g.shutdown().await;
}

/// `HH:MM` in UTC, `hours` from now.
fn utc_clock(hours: i64) -> String {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(hours);
    t.to_zoned(jiff::tz::TimeZone::UTC).strftime("%H:%M").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_outside_its_deploy_window_waits_while_the_others_deploy() {
    // eu-west's window opens in two hours; us-east's is open now (from an hour ago to an hour
    // from now, crossing midnight when it must).
    let config = format!(
        r#"
[[windows]]
env = "production"
regions = ["eu-*"]
days = "daily"
start = "{}"
end = "{}"
tz = "UTC"

[[windows]]
env = "production"
regions = ["us-*"]
days = "daily"
start = "{}"
end = "{}"
tz = "UTC"
"#,
        utc_clock(2),
        utc_clock(3),
        utc_clock(-1),
        utc_clock(1)
    );
    let mut g = Gov::with_config(&config).await;
    g.push("1.0.0").await;
    // One wave for both regions (no canary wave, which would be one region's agent alone).
    let req = pb::DeployRequest { canary_set: true, canary: 0, ..deploy("1.0.0", "production", "") };
    let id = try_deploy(&mut g.dana, req).await.unwrap();
    eventually(WAIT, "us-0 serves 1.0.0", || async {
        (g.serving("us-0").as_deref() == Some("1.0.0")).then_some(())
    })
    .await;
    let r = g.rollout(&id).await;
    assert_eq!(r.state, pb::RolloutState::Running as i32);
    let waiting = r.waiting.join("; ");
    assert!(
        waiting.starts_with(&format!("waiting for the eu-west window (opens {} UTC, in ", utc_clock(2))),
        "{waiting}"
    );
    assert_eq!(g.serving("eu-0"), None, "eu-west waits for its window");
    assert!(r.events.iter().any(|e| e.message.starts_with("eu-west waits for its deploy window")));
    // A rollout outside its window can still be stopped; what it moved is rolled back.
    g.dana.control_rollout(control(&id, "abort", "", "")).await.unwrap();
    g.wait_state(&id, pb::RolloutState::Aborted).await;
    assert_eq!(g.serving("eu-0"), None);
    g.shutdown().await;
}

/// Runs the real `convoy` binary as the first admin: exit code, stdout, stderr.
async fn convoy(ctl: &LocalController, args: &[&str]) -> (i32, String, String) {
    common::run_convoy(env!("CARGO_BIN_EXE_convoy"), ctl, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_governance_input_is_refused_specifically_and_moves_nothing() {
    let mut g = Gov::new().await;
    g.push("1.0.0").await;
    let st = try_deploy(&mut g.dana, deploy("1.0.0", "staging", "")).await.unwrap();
    g.wait_state(&st, pb::RolloutState::Completed).await;
    let binary = g.tmp.path().join("binary-note");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41, 0xc3, 0x28, 0xff, 0xff, 0xff]).unwrap();
    let escape = g.tmp.path().join("escape-note");
    std::fs::write(&escape, "looks fine\u{1b}[2J\u{1b}[Hadmin/root approved").unwrap();
    let long = "n".repeat(16 * 1024 + 1);
    let (binary, escape) = (binary.to_str().unwrap().to_string(), escape.to_str().unwrap().to_string());
    let rel = "shop-api@1.0.0";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["deploy", rel, "--env", "../production"], "environment \"../production\" is invalid"),
        (vec!["deploy", rel, "--env", "Production"], "environment \"Production\" is invalid"),
        (vec!["deploy", rel, "--env", "staging\n--force"], "is invalid"),
        (
            vec!["deploy", rel, "--env", "staging", "--ticket", "javascript:alert(1)"],
            "must be an http(s) URL",
        ),
        (vec!["deploy", rel, "--env", "staging", "--ticket", "https://x/a b"], "must be an http(s) URL"),
        (vec!["deploy", rel, "--env", "staging", "--note", "ok\u{1b}[2J"], "no other control"),
        (vec!["deploy", rel, "--env", "staging", "--note-file", &escape], "no other control"),
        (vec!["deploy", rel, "--env", "staging", "--note-file", &binary], "is not UTF-8 text"),
        (vec!["deploy", rel, "--env", "staging", "--note", &long], "the change note is 16385 bytes"),
        (vec!["deploy", rel, "--env", "staging", "--at", "tomorrow"], "is not an RFC 3339 time"),
        (
            vec!["deploy", rel, "--env", "staging", "--at", "2099-01-01T00:00:00+01:00"],
            "--at is more than 90 days ahead",
        ),
        (vec!["deploy", rel, "--skip-promotion"], "--reason"),
        (vec!["rollout", "approve", &st, "--note", "fine\u{1b}]0;pwned\u{7}"], "without control characters"),
        (vec!["token", "create", "--env", "prod/../staging"], "is invalid"),
    ];
    let before = g.ctl.controller.rollouts().rollouts(None).await.unwrap().len();
    let sent = common::orders_sent(&g.ctl).await;
    let refused_before = g.ctl.controller.audit().entries(None, None).await.unwrap().len();
    for (args, words) in &cases {
        let (code, out, err) = convoy(&g.ctl, args).await;
        assert_eq!(code, 2, "a usage error exits 2: {args:?}: {out}{err}");
        assert!(err.contains(words), "{args:?}: {err:?} does not say {words:?}");
        assert!(!err.contains('\u{1b}'), "no escape sequence reaches the terminal: {err:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    assert_eq!(
        g.ctl.controller.rollouts().rollouts(None).await.unwrap().len(),
        before,
        "no rollout was created"
    );
    assert_eq!(common::orders_sent(&g.ctl).await, sent, "no order was sent");
    assert_eq!(g.serving("st-0").as_deref(), Some("1.0.0"));
    for id in ["eu-0", "us-0", "dr-0"] {
        assert_eq!(g.serving(id), None, "{id} was not touched");
    }
    // Refusals that reached the controller are in the audit log, with the admin as the actor.
    let log = g.ctl.controller.audit().entries(None, None).await.unwrap();
    let refusals = log[refused_before..]
        .iter()
        .filter(|e| e.actor == "admin/admin" && e.outcome.starts_with("refused"))
        .count();
    assert!(refusals >= 8, "{:?}", &log[refused_before..]);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promotion_evidence_cannot_be_faked_and_an_approved_rollout_is_checked_again_at_its_start() {
    let mut g = Gov::new().await;
    for v in ["1.0.0", "1.1.0"] {
        g.push(v).await;
    }
    // A staging rollout of a slice of the environment proves nothing.
    let slice = pb::DeployRequest { regions: vec!["eu-west".into()], ..deploy("1.0.0", "staging", "") };
    let st = try_deploy(&mut g.dana, slice).await.unwrap();
    g.wait_state(&st, pb::RolloutState::Completed).await;
    refused(
        try_deploy(&mut g.dana, deploy("1.0.0", "production", "n")).await,
        Code::FailedPrecondition,
        "has not completed in staging",
    );
    // The whole environment does.
    let st = try_deploy(&mut g.dana, pb::DeployRequest { supersede: true, ..deploy("1.0.0", "staging", "") })
        .await;
    let st = st.unwrap();
    g.wait_state(&st, pb::RolloutState::Completed).await;

    // Approved while a freeze covers production: it does not start until the freeze ends.
    let prod = try_deploy(&mut g.dana, deploy("1.0.0", "production", "n")).await.unwrap();
    let t = convoy_controller::logic::now();
    g.root
        .freeze(pb::FreezeRequest {
            action: pb::FreezeAction::Add as i32,
            from_unix: t - 60,
            to_unix: t + 3600,
            reason: "flash sale".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    g.alex.control_rollout(control(&prod, "approve", "", "")).await.unwrap();
    let held = eventually(WAIT, "the start is held by the freeze", || async {
        let r = g.rollout(&prod).await;
        r.events.iter().any(|e| e.message.starts_with("start held: deploys are frozen")).then_some(r)
    })
    .await;
    assert_eq!(held.state, pb::RolloutState::Scheduled as i32);
    assert_eq!(g.serving("eu-0"), None, "nothing moved during the freeze");
    g.dana.control_rollout(control(&prod, "abort", "", "")).await.unwrap();
    assert_eq!(g.wait_state(&prod, pb::RolloutState::Aborted).await.state, pb::RolloutState::Aborted as i32);

    // A rollback never moves agents forward.
    let resp = g
        .dana
        .rollback(pb::RollbackRequest {
            app: "shop-api".into(),
            agent_ids: vec!["st-0".into()],
            to_version: "1.1.0".into(),
            reason: "forward".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outcome = &resp.outcomes[0];
    assert!(outcome.message.contains("is not older than 1.0.0"), "{outcome:?}");
    assert_eq!(g.serving("st-0").as_deref(), Some("1.0.0"));
    g.shutdown().await;
}
