//! What the controller may trust about an order's answer, end to end: rollbacks only ever go
//! back, an alert about an incident acts once however it is worded, a stale answer is never
//! success (and a controller restored from a backup moves past the agents' sequence numbers),
//! and hostile rollback input is refused at the controller's edge before any agent hears of it.
//! Real controller, real agents and services, real mutual-TLS gRPC, and the real `convoy` CLI.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_controller::logic::rollouts::{AgentStep, Rollout, RolloutSpec, RolloutState};
use convoy_controller::logic::{Answer, OrderKind, OrderOutcome, Target};
use convoy_testkit::{DemoRelease, LocalAgent, LocalController, LocalOptions};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const ORDER: Duration = Duration::from_secs(60);
const APP: &str = "shop-api";

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
    digests: std::collections::HashMap<String, String>,
}

impl Fleet {
    /// A controller and `ids` agents in eu-west, each serving the demo app on its own port.
    async fn new(ids: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
        let mut f = Self {
            tmp,
            ctl: Some(ctl),
            key: SecretKey::generate(),
            nodes: vec![],
            digests: Default::default(),
        };
        for id in ids {
            let dir = f.tmp.path().join(id);
            f.ctl().enroll(&dir, id, "eu-west").await.unwrap();
            f.nodes.push(Node { id: id.to_string(), port: free_port(), agent: None });
            f.start_agent(id);
            f.node(id).agent.as_mut().unwrap().wait_for(WAIT, |s| s.connected).await.unwrap();
        }
        f
    }

    fn ctl(&self) -> &LocalController {
        self.ctl.as_ref().unwrap()
    }

    fn node(&mut self, id: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    fn start_agent(&mut self, id: &str) {
        let dir = self.tmp.path().join(id);
        let public = self.key.public();
        let n = self.node(id);
        let port = n.port;
        n.agent = Some(
            LocalAgent::spawn_with(&dir, |c| {
                c.trust = vec![public];
                c.vars.insert("PORT".into(), port.to_string());
            })
            .unwrap(),
        );
    }

    async fn push(&mut self, version: &str) {
        let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
        let info = self
            .ctl()
            .push_demo_release(self.tmp.path(), exe, &self.key, DemoRelease::new(version, "healthy"))
            .await
            .unwrap();
        self.digests.insert(version.into(), info.digest);
    }

    async fn wait_final(&self, id: &str) -> Rollout {
        let c = &self.ctl().controller;
        eventually(WAIT, &format!("rollout {id} finishes"), || async {
            let r = c.rollouts().rollout(Some(id.into())).await.unwrap();
            r.state.is_final().then_some(r)
        })
        .await
    }

    /// A one-wave rollout of `version` to every agent; returns it once finished.
    async fn roll_out(&self, version: &str) -> Rollout {
        let spec = RolloutSpec { waves: vec![100], ..RolloutSpec::new(APP, version) };
        let id = self.ctl().controller.rollouts().deploy(spec, "admin/test").await.unwrap();
        self.wait_final(&id).await
    }

    /// A rollout that must complete with the whole fleet serving `version`.
    async fn deploy_ok(&self, version: &str) {
        let r = self.roll_out(version).await;
        assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
        assert!(self.all_serving(version), "after the rollout of {version}");
    }

    fn serving(&self, id: &str) -> Option<String> {
        let n = self.nodes.iter().find(|n| n.id == id).unwrap();
        get(n.port).map(|s| s.trim_start_matches("demo-app ").to_string())
    }

    fn all_serving(&self, version: &str) -> bool {
        self.nodes.iter().all(|n| self.serving(&n.id).as_deref() == Some(version))
    }

    /// The release `id`'s `current` link points at, on the agent's disk.
    fn current_on_disk(&self, id: &str) -> String {
        let link =
            std::fs::read_link(self.tmp.path().join(id).join("apps").join(APP).join("current")).unwrap();
        link.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// The highest order sequence number agent `id` has admitted, read without changing
    /// anything: once the agent has admitted any order, one numbered 1 (the first number a
    /// controller hands out) is at or below its mark and is answered "stale" with it.
    async fn agent_last_seq(&self, id: &str) -> u64 {
        let install = OrderKind::Install {
            app: APP.into(),
            version: "1.0.0".into(),
            digest: self.digests["1.0.0"].clone(),
        };
        let o = self.ctl().controller.orders().send_order_with_seq(id, 1, install, ORDER).await.unwrap();
        match o.answer {
            Answer::Stale { agent_last_seq } => agent_last_seq,
            other => panic!("an order numbered 1 must be stale, got {other:?}: {}", o.message),
        }
    }

    async fn shutdown(mut self) {
        for n in &mut self.nodes {
            if let Some(a) = n.agent.take() {
                a.stop().await.unwrap();
            }
        }
        if let Some(c) = self.ctl.take() {
            c.stop().await.unwrap();
        }
    }
}

/// Runs the `convoy` CLI against `ctl`: (exit code, stdout, stderr).
async fn convoy(ctl: &LocalController, args: &[&str]) -> (i32, String, String) {
    common::run_convoy(env!("CARGO_BIN_EXE_convoy"), ctl, args).await
}

/// `convoy rollback shop-api --all --reason r -o json [extra…]`: exit code and per-agent
/// (outcome, current, message), sorted by agent.
async fn cli_rollback_json(
    ctl: &LocalController,
    extra: &[&str],
) -> (i32, Vec<(String, String, String, String)>) {
    let mut args = vec!["rollback", APP, "--all", "--reason", "r", "-o", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = convoy(ctl, &args).await;
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: stdout {out:?}, stderr {err:?}"));
    assert_eq!(v["app"], APP);
    let mut rows: Vec<_> = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_string();
            (s("agent"), s("outcome"), s("current"), s("message"))
        })
        .collect();
    rows.sort();
    (code, rows)
}

/// POSTs an Alertmanager payload with the controller's bearer token: status and JSON body.
fn post_alert(ctl: &LocalController, body: &str) -> (u16, Value) {
    let token = ctl.config.hooks.alertmanager_token.clone().unwrap();
    let mut s = std::net::TcpStream::connect(ctl.http_addr).unwrap();
    let req = format!(
        "POST /v1/hooks/alertmanager HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// One firing alert in an Alertmanager webhook (version 4) payload.
fn firing(labels: Value, fingerprint: &str, starts_at: &str) -> String {
    json!({
        "version": "4",
        "groupKey": "{}:{}",
        "status": "firing",
        "receiver": "convoy",
        "groupLabels": {},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "truncatedAlerts": 0,
        "alerts": [{
            "status": "firing",
            "labels": labels,
            "annotations": {"summary": "trouble"},
            "startsAt": starts_at,
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.invalid/graph",
            "fingerprint": fingerprint
        }]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_twice_never_rolls_forward() {
    let mut f = Fleet::new(&["a1", "a2"]).await;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        f.push(v).await;
        f.deploy_ok(v).await;
    }

    // First rollback: 3.0.0 → 2.0.0 everywhere.
    let (code, rows) = cli_rollback_json(f.ctl(), &[]).await;
    assert_eq!(code, 0, "{rows:?}");
    assert_eq!(rows.len(), 2);
    for (agent, outcome, current, message) in &rows {
        assert_eq!((outcome.as_str(), current.as_str()), ("applied", "2.0.0"), "{agent}: {message}");
        assert!(message.contains("from 3.0.0 to 2.0.0"), "{agent}: {message}");
    }
    assert!(f.all_serving("2.0.0"));

    // Second rollback, in table form: one more step back, to 1.0.0, never forward to 3.0.0.
    let (code, out, err) = convoy(f.ctl(), &["rollback", APP, "--all", "--reason", "r"]).await;
    assert_eq!(code, 0, "{out}{err}");
    for id in ["a1", "a2"] {
        let line =
            out.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("no row for {id}: {out}"));
        assert!(line.contains("rolled back") && line.contains("from 2.0.0 to 1.0.0"), "{line}");
        assert_eq!(line.split_whitespace().rev().nth(2), Some("1.0.0"), "NOW RUNNING column: {line}");
    }
    assert!(err.contains("0 not done"), "{err}");
    assert!(f.all_serving("1.0.0"), "the second rollback went back, not forward");
    for id in ["a1", "a2"] {
        assert_eq!(f.current_on_disk(id), "1.0.0");
    }
    let listed = common::agents(f.ctl()).await;
    for a in &listed {
        let s = a.apps.iter().find(|s| s.app == APP).unwrap();
        assert_eq!(s.current, "1.0.0", "{}: {s:?}", a.id);
    }

    // Third rollback: nothing older is kept, so each agent refuses and the CLI fails.
    let (code, rows) = cli_rollback_json(f.ctl(), &[]).await;
    assert_ne!(code, 0, "{rows:?}");
    for (agent, outcome, current, message) in &rows {
        assert_eq!((outcome.as_str(), current.as_str()), ("refused", "1.0.0"), "{agent}: {message}");
        assert!(message.contains("no kept, known-good release"), "{agent}: {message}");
    }
    assert!(f.all_serving("1.0.0"));

    // Naming the release rolled back from makes a repeat idempotent: already done, exit 0.
    let sent = common::orders_sent(f.ctl()).await;
    let (code, rows) = cli_rollback_json(f.ctl(), &["--from", "2.0.0"]).await;
    assert_eq!(code, 0, "{rows:?}");
    for (agent, outcome, current, message) in &rows {
        assert_eq!((outcome.as_str(), current.as_str()), ("already_in_state", "1.0.0"), "{agent}: {message}");
        assert!(message.contains("already rolled back from shop-api@2.0.0"), "{agent}: {message}");
    }
    assert_eq!(common::orders_sent(f.ctl()).await, sent + 2, "one order per agent, answered, nothing more");
    let (code, out, err) =
        convoy(f.ctl(), &["rollback", APP, "--all", "--from", "2.0.0", "--reason", "r"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.lines().filter(|l| l.contains("nothing to do: already rolled back")).count() == 2, "{out}");
    assert!(f.all_serving("1.0.0"));
    for id in ["a1", "a2"] {
        assert_eq!(f.current_on_disk(id), "1.0.0");
    }
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_alert_about_the_same_incident_does_not_roll_further_back() {
    let mut f = Fleet::new(&["a1", "a2"]).await;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        f.push(v).await;
        f.deploy_ok(v).await;
    }
    let rollouts = f.ctl().controller.rollouts().rollouts(Some(APP.into())).await.unwrap();
    assert_eq!(
        rollouts.last().unwrap().spec.version,
        "3.0.0",
        "the latest rollout is the incident's release"
    );

    let first = firing(
        json!({"alertname": "CheckoutErrors", "app": APP, "convoy_action": "rollback", "severity": "page"}),
        "fp-checkout",
        "2026-11-29T10:00:00Z",
    );
    let (code, body) = post_alert(f.ctl(), &first);
    assert_eq!(code, 200, "{body}");
    let outcome = body["actions"][0]["outcome"].as_str().unwrap();
    assert!(outcome.contains("rolled back 2 of 2 agent(s) from shop-api@3.0.0"), "{body}");
    assert!(f.all_serving("2.0.0"));

    // Another alert, differently named and labelled, about the same app while it is still bad.
    let sent = common::orders_sent(f.ctl()).await;
    let second = firing(
        json!({"alertname": "LatencySLOBurn", "app": APP, "convoy_action": "rollback", "team": "storefront"}),
        "fp-latency",
        "2026-11-29T10:03:00Z",
    );
    let (code, body) = post_alert(f.ctl(), &second);
    assert_eq!(code, 200, "{body}");
    let outcome = body["actions"][0]["outcome"].as_str().unwrap();
    assert!(outcome.contains("already rolled back from shop-api@3.0.0"), "{body}");
    assert!(!outcome.contains("duplicate delivery"), "a different alert is not a duplicate delivery: {body}");
    assert_eq!(common::orders_sent(f.ctl()).await, sent, "the second alert sent no order");
    assert!(f.all_serving("2.0.0"), "the fleet did not go one more step back");
    for id in ["a1", "a2"] {
        assert_eq!(f.current_on_disk(id), "2.0.0");
    }

    // Scoped to a region it is a new (app, region, release) key: the rollback runs, and every
    // agent answers that it is no longer on 3.0.0. Still nothing moves.
    let third = firing(
        json!({"alertname": "CheckoutErrors", "app": APP, "region": "eu-west", "convoy_action": "rollback"}),
        "fp-checkout-eu",
        "2026-11-29T10:05:00Z",
    );
    let (code, body) = post_alert(f.ctl(), &third);
    assert_eq!(code, 200, "{body}");
    let outcome = body["actions"][0]["outcome"].as_str().unwrap();
    assert!(outcome.contains("rolled back 0 of 2") && outcome.contains("2 already off it"), "{body}");
    assert!(f.all_serving("2.0.0"));

    // Both alerts are audited under their own names.
    let log = f.ctl().controller.audit().entries(Some(APP.into()), None).await.unwrap();
    assert!(log
        .iter()
        .any(|e| e.actor == "alert:CheckoutErrors" && e.outcome.contains("rolled back 2 of 2")));
    assert!(log
        .iter()
        .any(|e| e.actor == "alert:LatencySLOBurn" && e.outcome.contains("already rolled back")));
    f.shutdown().await;
}

fn status(o: &OrderOutcome) -> &convoy_controller::store::AppStatusRecord {
    o.status.as_ref().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_answer_is_never_success() {
    let mut f = Fleet::new(&["a1"]).await;
    f.push("1.0.0").await;
    f.push("2.0.0").await;
    f.deploy_ok("1.0.0").await;
    let c = f.ctl().controller.clone();

    // A fresh order is applied and becomes the agent's high-water mark.
    let install =
        OrderKind::Install { app: APP.into(), version: "2.0.0".into(), digest: f.digests["2.0.0"].clone() };
    let seq = c.orders().next_seq().await.unwrap();
    let o = c.orders().send_order_with_seq("a1", seq, install, ORDER).await.unwrap();
    assert_eq!(o.answer, Answer::Applied, "{}", o.message);
    assert_eq!(f.agent_last_seq("a1").await, seq);

    // The same number again, and an older one, asking for a switch: stale, not done, no change.
    let activate = OrderKind::Activate { app: APP.into(), version: "2.0.0".into(), health_deadline: None };
    for s in [seq, seq - 1] {
        let o = c.orders().send_order_with_seq("a1", s, activate.clone(), ORDER).await.unwrap();
        assert_eq!(o.answer, Answer::Stale { agent_last_seq: seq }, "order {s}: {}", o.message);
        assert!(!o.is_done());
        assert_eq!(o.problem(), format!("stale: agent has applied order {seq}, the controller sent {s}"));
        assert_eq!(status(&o).current, "1.0.0");
    }
    assert_eq!(f.agent_last_seq("a1").await, seq, "a stale order does not move the agent's mark");
    assert_eq!(f.serving("a1").as_deref(), Some("1.0.0"));
    assert_eq!(f.current_on_disk("a1"), "1.0.0");
    let listed = common::agents(f.ctl()).await;
    assert_eq!(listed[0].apps.iter().find(|s| s.app == APP).unwrap().current, "1.0.0");

    // A rollout that meets a stale answer counts that agent failed, naming both numbers, and
    // does not count it done. (The agent is pushed ahead of this controller's numbering with
    // an explicit sequence number; the controller only learns an agent's mark on its hello.)
    let ahead = seq + 10_000;
    let noop =
        OrderKind::Install { app: APP.into(), version: "1.0.0".into(), digest: f.digests["1.0.0"].clone() };
    let o = c.orders().send_order_with_seq("a1", ahead, noop, ORDER).await.unwrap();
    assert_eq!(o.answer, Answer::AlreadyInState, "{}", o.message);
    let r = f.roll_out("2.0.0").await;
    assert_ne!(r.state, RolloutState::Completed, "{:?}", r.events);
    let a = &r.agents["a1"];
    assert_eq!(a.step, AgentStep::Failed, "{a:?}");
    let err = a.error.clone().unwrap_or_default();
    assert!(
        err.starts_with(&format!("stale: agent has applied order {ahead}, the controller sent ")),
        "{err}"
    );
    let sent: u64 = err.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(sent < ahead, "{err}");
    assert!(
        r.events
            .iter()
            .any(|e| e.message.contains(&format!("agent a1 failed: stale: agent has applied order {ahead}"))),
        "{:?}",
        r.events
    );
    assert_eq!(f.serving("a1").as_deref(), Some("1.0.0"), "nothing was switched");
    assert_eq!(f.current_on_disk("a1"), "1.0.0");
    f.shutdown().await;
}

/// Copies a directory tree (the controller's config, PKI and state), as a backup would.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst): (PathBuf, PathBuf) = (e.path(), to.join(e.file_name()));
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            copy_tree(&src, &dst);
        } else if ty.is_file() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restored_from_a_backup_moves_past_the_agents_sequence() {
    let mut f = Fleet::new(&["a1"]).await;
    f.push("1.0.0").await;
    f.push("1.1.0").await;
    f.deploy_ok("1.0.0").await;
    let dir = f.tmp.path().join("ctl");
    let addr = f.ctl().grpc_addr;

    // Back up the stopped controller's whole directory.
    f.ctl.take().unwrap().stop().await.unwrap();
    let backup = f.tmp.path().join("ctl-backup");
    copy_tree(&dir, &backup);

    // Life goes on after the backup: the controller runs again and sends more orders (a new
    // block of sequence numbers), and the agent gets far past anything the backup reserved.
    let restart = LocalOptions { grpc_addr: Some(addr), ..Default::default() };
    f.ctl = Some(LocalController::start(&dir, restart.clone()).await.unwrap());
    let c = f.ctl().controller.clone();
    eventually(WAIT, "a1 reconnects", || async { c.registry().is_online("a1").then_some(()) }).await;
    let noop =
        OrderKind::Install { app: APP.into(), version: "1.0.0".into(), digest: f.digests["1.0.0"].clone() };
    for _ in 0..3 {
        let o = c.orders().send_order("a1", noop.clone(), ORDER).await.unwrap();
        assert_eq!(o.answer, Answer::AlreadyInState, "{}", o.message);
    }
    let far = c.orders().next_seq().await.unwrap() + 3 * 1024;
    let o = c.orders().send_order_with_seq("a1", far, noop.clone(), ORDER).await.unwrap();
    assert_eq!(o.answer, Answer::AlreadyInState, "{}", o.message);
    assert_eq!(f.agent_last_seq("a1").await, far);
    f.ctl.take().unwrap().stop().await.unwrap();

    // Restore the backup and start it where the agent looks for its controller.
    std::fs::remove_dir_all(&dir).unwrap();
    copy_tree(&backup, &dir);
    f.ctl = Some(LocalController::start(&dir, restart).await.unwrap());
    let c = f.ctl().controller.clone();
    eventually(WAIT, "a1 reconnects to the restored controller", || async {
        c.registry().is_online("a1").then_some(())
    })
    .await;
    let next = c.orders().next_seq().await.unwrap();
    assert!(next > far, "the restored controller numbers orders after the agent's {far}, not from {next}");

    // A normal rollout completes, the agent counted done, nothing stale.
    let r = f.roll_out("1.1.0").await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(r.agents["a1"].step, AgentStep::Healthy, "{:?}", r.agents["a1"]);
    assert!(!r.events.iter().any(|e| e.message.contains("stale")), "{:?}", r.events);
    assert_eq!(f.serving("a1").as_deref(), Some("1.1.0"));
    // And so does a rollback.
    let (results, _) = c
        .rollouts()
        .rollback(APP, &Target::All.into(), None, None, "after restore", "admin/test")
        .await
        .unwrap();
    let o = results[0].1.as_ref().unwrap();
    assert_eq!(o.answer, Answer::Applied, "{}", o.message);
    assert_eq!(status(o).current, "1.0.0");
    assert_eq!(f.serving("a1").as_deref(), Some("1.0.0"));
    assert!(f.agent_last_seq("a1").await > far);
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_rollback_input_is_refused_before_any_agent_hears_of_it() {
    let mut f = Fleet::new(&["a1", "a2"]).await;
    for v in ["1.0.0", "2.0.0"] {
        f.push(v).await;
        f.deploy_ok(v).await;
    }
    let mut marks = Vec::new();
    for id in ["a1", "a2"] {
        marks.push(f.agent_last_seq(id).await);
    }
    let sent = common::orders_sent(f.ctl()).await;
    let cases: [(&[&str], &str); 5] = [
        (&["rollback", APP, "--all", "--to", "../../etc", "--reason", "r"], "../../etc"),
        (&["rollback", APP, "--all", "--from", "/etc", "--reason", "r"], "/etc"),
        (&["rollback", "../x", "--all", "--reason", "r"], "../x"),
        (
            &["rollback", APP, "--agent", "a1", "--to", "1.0.0/../../..", "--reason", "r", "-o", "json"],
            "1.0.0/../../..",
        ),
        (
            &["rollback", APP, "--region", "eu-west", "--from", "2.0.0\n--to=1.0.0", "--reason", "r"],
            "2.0.0\\n--to=1.0.0",
        ),
    ];
    for (args, value) in cases {
        let (code, out, err) = convoy(f.ctl(), args).await;
        assert_eq!(code, 2, "a usage error exits 2: {args:?}: {out}{err}");
        assert!(err.contains("InvalidArgument") && err.contains(value), "{args:?}: {err}");
        assert!(!err.contains("manifest"), "the message speaks of the argument, not a manifest: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(common::orders_sent(f.ctl()).await, sent, "no order was sent for {args:?}");
    }
    for (id, mark) in ["a1", "a2"].into_iter().zip(marks) {
        assert_eq!(f.agent_last_seq(id).await, mark, "{id} admitted no order");
        assert_eq!(f.current_on_disk(id), "2.0.0");
        assert_eq!(f.serving(id).as_deref(), Some("2.0.0"));
    }
    // The refusals are audited with the admin as the actor.
    let log = f.ctl().controller.audit().entries(None, None).await.unwrap();
    assert!(log.iter().filter(|e| e.action == "rollback").count() >= 5, "{log:?}");
    f.shutdown().await;
}

/// One agent's hello must not be able to push the fleet-wide order sequence to its end: a
/// report far beyond the controller's own numbering refuses that session and changes nothing.
#[tokio::test]
async fn an_agent_cannot_push_the_order_sequence_to_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    ctl.enroll(&tmp.path().join("rogue"), "rogue", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("rogue"));
    let before = ctl.controller.orders().next_seq().await.unwrap();
    for reported in [u64::MAX, u64::MAX / 2, before + (1 << 33)] {
        let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
        let mut hello = common::hello("rogue");
        if let Some(convoy_proto::v1::agent_message::Msg::Hello(h)) = &mut hello.msg {
            h.last_order_seq = reported;
        }
        let status = convoy_proto::v1::agent_service_client::AgentServiceClient::new(ch)
            .session(tokio_stream::iter(vec![hello]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{reported}: {status:?}");
        assert!(status.message().contains("far beyond"), "{}", status.message());
    }
    let after = ctl.controller.orders().next_seq().await.unwrap();
    assert!(after > before && after < before + 2048, "the sequence moved from {before} to {after}");
    ctl.stop().await.unwrap();
}

/// After a restart, agents' sequence reports are judged against the numbering the controller
/// stored, not against zero: an honest agent that applied orders numbered past the jump bound
/// (after an earlier legitimate jump) is not locked out.
#[tokio::test]
async fn a_restarted_controller_judges_agent_sequences_against_its_stored_numbering() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let ctl = LocalController::start(&dir, LocalOptions::default()).await.unwrap();
    ctl.enroll(&tmp.path().join("a1"), "a1", "eu-west").await.unwrap();
    let id = common::agent_identity(&tmp.path().join("a1"));
    let hello_with = |seq: u64| {
        let mut hello = common::hello("a1");
        if let Some(convoy_proto::v1::agent_message::Msg::Hello(h)) = &mut hello.msg {
            h.last_order_seq = seq;
        }
        hello
    };
    // A legitimate jump (a controller restored from a backup): the numbering moves past it.
    let jump = (1u64 << 20) - 10;
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut s = convoy_proto::v1::agent_service_client::AgentServiceClient::new(ch)
        .session(tokio_stream::iter(vec![hello_with(jump)]))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some(), "welcome");
    drop(s);
    let next = ctl.controller.orders().next_seq().await.unwrap();
    assert!(next > jump, "{next}");
    let grpc_addr = ctl.grpc_addr;
    ctl.stop().await.unwrap();
    let ctl =
        LocalController::start(&dir, LocalOptions { grpc_addr: Some(grpc_addr), ..LocalOptions::default() })
            .await
            .unwrap();
    // The agent has since applied orders a little past 2^20: within reach of the stored
    // numbering, though more than the jump bound past zero.
    let ch = common::dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(&id)).await.unwrap();
    let mut s = convoy_proto::v1::agent_service_client::AgentServiceClient::new(ch)
        .session(tokio_stream::iter(vec![hello_with(next + 20)]))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some(), "welcome after the restart");
    ctl.stop().await.unwrap();
}
