//! Alert hooks, the audit log, notifications and metrics, against a running controller with real
//! agents and services.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_controller::logic::audit::{AuditEntry, Phase};
use convoy_controller::logic::rollouts::{AgentStep, RolloutSpec, RolloutState};
use convoy_proto::v1 as pb;
use convoy_testkit::{DemoRelease, LocalAgent, LocalController, LocalOptions};
use hmac::Mac;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// POSTs `body` to the controller's HTTP side; returns status and JSON body.
fn post(addr: std::net::SocketAddr, path: &str, headers: &[(&str, String)], body: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

fn alert(name: &str, status: &str, labels: Value, fingerprint: &str) -> String {
    let mut l = labels;
    l["alertname"] = json!(name);
    json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"x\"}",
        "status": status,
        "receiver": "convoy",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "truncatedAlerts": 0,
        "alerts": [{
            "status": status,
            "labels": l,
            "annotations": {"summary": "errors"},
            "startsAt": "2026-11-29T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.invalid/graph",
            "fingerprint": fingerprint
        }]
    })
    .to_string()
}

struct Fleet {
    tmp: tempfile::TempDir,
    ctl: LocalController,
    key: SecretKey,
    agents: Vec<(String, u16, LocalAgent)>,
}

impl Fleet {
    async fn new(patch_config: impl FnOnce(&str) -> String) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ctl");
        LocalController::start(&dir, LocalOptions::default()).await.unwrap().stop().await.unwrap();
        let cfg = std::fs::read_to_string(dir.join("convoy.toml")).unwrap();
        std::fs::write(dir.join("convoy.toml"), patch_config(&cfg)).unwrap();
        let ctl = LocalController::start(&dir, LocalOptions::default()).await.unwrap();
        let mut f = Self { tmp, ctl, key: SecretKey::generate(), agents: vec![] };
        for (id, region) in [("eu-1", "eu-west"), ("us-1", "us-east")] {
            let d = f.tmp.path().join(id);
            f.ctl.enroll(&d, id, region).await.unwrap();
            let port = free_port();
            let public = f.key.public();
            let mut a = LocalAgent::spawn_with(&d, |c| {
                c.trust = vec![public];
                c.vars.insert("PORT".into(), port.to_string());
            })
            .unwrap();
            a.wait_for(WAIT, |s| s.connected).await.unwrap();
            f.agents.push((id.into(), port, a));
        }
        f
    }

    async fn push(&self, version: &str) {
        let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
        self.ctl
            .push_demo_release(self.tmp.path(), exe, &self.key, DemoRelease::new(version, "healthy"))
            .await
            .unwrap();
    }

    async fn roll_out(&self, version: &str) {
        let c = &self.ctl.controller;
        let id = c
            .rollouts()
            .deploy(RolloutSpec { waves: vec![100], ..RolloutSpec::new("shop-api", version) }, "admin/test")
            .await
            .unwrap();
        let r = eventually(WAIT, "rollout done", || async {
            let r = c.rollouts().rollout(Some(id.clone())).await.unwrap();
            r.state.is_final().then_some(r)
        })
        .await;
        assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    }

    fn serving(&self, id: &str) -> Option<String> {
        let port = self.agents.iter().find(|a| a.0 == id).unwrap().1;
        get(port).map(|s| s.trim_start_matches("demo-app ").to_string())
    }

    fn token(&self) -> String {
        self.ctl.config.hooks.alertmanager_token.clone().unwrap()
    }

    async fn shutdown(self) {
        for (_, _, a) in self.agents {
            a.stop().await.unwrap();
        }
        self.ctl.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alertmanager_hook_auth_errors_dedupe_and_actions() {
    let f = Fleet::new(|c| c.to_string()).await;
    f.push("1.0.0").await;
    f.push("1.1.0").await;
    f.roll_out("1.0.0").await;
    f.roll_out("1.1.0").await;
    let http = f.ctl.http_addr;
    let path = "/v1/hooks/alertmanager";
    let bearer = vec![("Authorization", format!("Bearer {}", f.token()))];
    let firing_eu = alert(
        "CheckoutErrors",
        "firing",
        json!({"app": "shop-api", "region": "eu-west", "convoy_action": "rollback"}),
        "fp1",
    );

    // Refusals, each specific, none changing anything.
    let (code, body) = post(http, path, &[], &firing_eu);
    assert_eq!((code, body["error"].as_str().unwrap()), (401, "missing bearer token"));
    let (code, body) = post(http, path, &[("Authorization", "Bearer nope".into())], &firing_eu);
    assert_eq!((code, body["error"].as_str().unwrap()), (401, "wrong bearer token"));
    let (code, body) = post(http, path, &bearer, "{\"alerts\": [");
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not an Alertmanager webhook payload"));
    let unknown = alert("X", "firing", json!({"app": "ghost-app", "convoy_action": "rollback"}), "fp0");
    let (code, body) = post(http, path, &bearer, &unknown);
    assert_eq!(code, 422, "{body}");
    assert!(f.serving("eu-1").as_deref() == Some("1.1.0") && f.serving("us-1").as_deref() == Some("1.1.0"));

    // A resolved alert does nothing.
    let resolved = alert(
        "CheckoutErrors",
        "resolved",
        json!({"app": "shop-api", "region": "eu-west", "convoy_action": "rollback"}),
        "fp1",
    );
    let (code, body) = post(http, path, &bearer, &resolved);
    assert_eq!(code, 200);
    assert!(body["actions"][0]["outcome"].as_str().unwrap().contains("resolved"), "{body}");
    assert_eq!(f.serving("eu-1").as_deref(), Some("1.1.0"));

    // Firing, for eu-west: only eu rolls back.
    let (code, body) = post(http, path, &bearer, &firing_eu);
    assert_eq!(code, 200, "{body}");
    assert!(body["actions"][0]["outcome"].as_str().unwrap().contains("rolled back 1 of 1"), "{body}");
    assert_eq!(f.serving("eu-1").as_deref(), Some("1.0.0"));
    assert_eq!(f.serving("us-1").as_deref(), Some("1.1.0"));
    // Delivered again: acts once.
    let (_, body) = post(http, path, &bearer, &firing_eu);
    assert!(body["actions"][0]["outcome"].as_str().unwrap().contains("duplicate delivery"), "{body}");
    assert_eq!(f.serving("eu-1").as_deref(), Some("1.0.0"));
    // Audited with the alert as the actor.
    let log = f.ctl.controller.audit().entries(Some("shop-api".into()), None).await.unwrap();
    let entry =
        log.iter().find(|e| e.actor == "alert:CheckoutErrors" && e.phase == Some(Phase::Outcome)).unwrap();
    assert_eq!(entry.action, "rollback");
    assert!(entry.outcome.contains("rolled back"));

    // During a rollout: pause pauses it, rollback aborts it and rolls back its agents.
    f.push("1.2.0").await;
    let c = &f.ctl.controller;
    let s = RolloutSpec {
        canary: 1,
        waves: vec![100],
        bake: Duration::from_secs(60),
        ..RolloutSpec::new("shop-api", "1.2.0")
    };
    let id = c.rollouts().deploy(s, "admin/test").await.unwrap();
    eventually(WAIT, "canary healthy", || async {
        let r = c.rollouts().rollout(Some(id.clone())).await.unwrap();
        r.agents.values().any(|a| a.step == AgentStep::Healthy).then_some(())
    })
    .await;
    let pause = alert("Latency", "firing", json!({"app": "shop-api", "convoy_action": "pause"}), "fp2");
    let (code, body) = post(http, path, &bearer, &pause);
    assert_eq!(code, 200);
    assert!(body["actions"][0]["outcome"].as_str().unwrap().contains("paused"), "{body}");
    assert_eq!(c.rollouts().rollout(Some(id.clone())).await.unwrap().state, RolloutState::Paused);
    let abort = alert("Errors", "firing", json!({"app": "shop-api", "convoy_action": "rollback"}), "fp3");
    let (_, body) = post(http, path, &bearer, &abort);
    assert!(body["actions"][0]["outcome"].as_str().unwrap().contains("aborted"), "{body}");
    let r = c.rollouts().rollout(Some(id)).await.unwrap();
    assert_eq!(r.state, RolloutState::Aborted);
    assert!(f.serving("eu-1").as_deref() != Some("1.2.0") && f.serving("us-1").as_deref() != Some("1.2.0"));
    // After an aborted rollout the incident is about the release the last completed rollout
    // left (1.1.0, still on us-1), not the aborted one nobody runs: the alert moves us-1.
    let later = alert("Errors", "firing", json!({"app": "shop-api", "convoy_action": "rollback"}), "fp4");
    let (code, body) = post(http, path, &bearer, &later);
    assert_eq!(code, 200, "{body}");
    let outcome = body["actions"][0]["outcome"].as_str().unwrap();
    assert!(outcome.contains("rolled back 1 of 2") && outcome.contains("@1.1.0"), "{body}");
    assert_eq!(f.serving("us-1").as_deref(), Some("1.0.0"));
    assert_eq!(f.serving("eu-1").as_deref(), Some("1.0.0"));
    // Another alert about the same incident does not roll the fleet a step further.
    let again = alert("Errors", "firing", json!({"app": "shop-api", "convoy_action": "rollback"}), "fp5");
    let (_, body) = post(http, path, &bearer, &again);
    assert!(
        body["actions"][0]["outcome"].as_str().unwrap().contains("already rolled back from shop-api@1.1.0"),
        "{body}"
    );
    assert_eq!(f.serving("us-1").as_deref(), Some("1.0.0"));
    f.shutdown().await;
}

fn sign(secret: &str, ts: i64, body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generic_hook_hmac_staleness_replay_and_audit_verify() {
    let f = Fleet::new(|c| c.to_string()).await;
    f.push("1.0.0").await;
    f.push("1.1.0").await;
    f.roll_out("1.0.0").await;
    f.roll_out("1.1.0").await;
    let http = f.ctl.http_addr;
    let secret = f.ctl.config.hooks.hmac_keys["default"].clone();
    let body = json!({"app": "shop-api", "region": "us-east", "reason": "pager"}).to_string();
    let now = convoy_controller::logic::now();
    let hdr =
        |ts: i64, sig: String| vec![("X-Convoy-Timestamp", ts.to_string()), ("X-Convoy-Signature", sig)];

    let (code, b) = post(http, "/v1/hooks/rollback", &hdr(now, sign("wrong-key", now, &body)), &body);
    assert_eq!(code, 401, "{b}");
    assert!(b["error"].as_str().unwrap().contains("does not verify"));
    let old = now - 600;
    let (code, b) = post(http, "/v1/hooks/rollback", &hdr(old, sign(&secret, old, &body)), &body);
    assert_eq!(code, 401);
    assert!(b["error"].as_str().unwrap().contains("stale"), "{b}");
    let bad_body = "{\"app\": 3}";
    let (code, _) = post(http, "/v1/hooks/rollback", &hdr(now, sign(&secret, now, bad_body)), bad_body);
    assert_eq!(code, 400);
    assert_eq!(f.serving("us-1").as_deref(), Some("1.1.0"), "refusals changed nothing");

    let good = hdr(now, sign(&secret, now, &body));
    let (code, b) = post(http, "/v1/hooks/rollback", &good, &body);
    assert_eq!(code, 200, "{b}");
    assert_eq!(f.serving("us-1").as_deref(), Some("1.0.0"));
    assert_eq!(f.serving("eu-1").as_deref(), Some("1.1.0"));
    let (code, b) = post(http, "/v1/hooks/rollback", &good, &body);
    assert_eq!(code, 409, "{b}");
    assert!(b["error"].as_str().unwrap().contains("replayed"));
    let log = f.ctl.controller.audit().entries(None, None).await.unwrap();
    assert!(log.iter().any(|e| e.actor == "hook:default" && e.action == "rollback"));
    assert!(log.iter().any(|e| e.actor == "admin/test" || e.actor.starts_with("admin/")));
    assert!(log.iter().any(|e| e.action == "deploy" || e.action == "release.push"));

    // The chain verifies; a modified entry is detected.
    let n = f.ctl.controller.audit().verify().await.unwrap().unwrap();
    assert!(n >= 2);
    let ctl = &f.ctl.controller;
    let v = ctl.audit().entry_for_tests(1).await.unwrap().expect("entry 1");
    let mut entry: Value = serde_json::from_slice(&v).unwrap();
    entry["outcome"] = json!("nothing to see here");
    ctl.audit().tamper_for_tests(1, Some(serde_json::to_vec(&entry).unwrap())).await.unwrap();
    let problem = f.ctl.controller.audit().verify().await.unwrap().unwrap_err();
    assert!(problem.contains("entry 1 was modified"), "{problem}");
    // Removing an entry is detected too.
    ctl.audit().tamper_for_tests(1, Some(v)).await.unwrap();
    assert!(f.ctl.controller.audit().verify().await.unwrap().is_ok());
    assert!(ctl.audit().entry_for_tests(2).await.unwrap().is_some());
    ctl.audit().tamper_for_tests(2, None).await.unwrap();
    let problem = f.ctl.controller.audit().verify().await.unwrap().unwrap_err();
    assert!(problem.contains("missing") || problem.contains("does not link"), "{problem}");
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_are_delivered_and_retried_and_metrics_parse() {
    // A receiver that fails the first request, then accepts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (received, attempts) = (received.clone(), attempts.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = vec![0u8; 65536];
                let n = s.read(&mut buf).unwrap_or(0);
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n == 0 {
                    let _ = s.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n");
                    continue;
                }
                if let Some(body) = text.split("\r\n\r\n").nth(1) {
                    if let Ok(v) = serde_json::from_str::<Value>(body) {
                        received.lock().unwrap().push(v);
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            }
        });
    }
    let mut f = Fleet::new(|c| {
        let c = c.replace("[notify]", &format!("[notify]\nurls = [\"{url}\"]"));
        assert!(c.contains("offline_after = \"1m\""), "{c}");
        c.replace("offline_after = \"1m\"", "offline_after = \"1s\"")
    })
    .await;
    f.push("1.0.0").await;
    f.roll_out("1.0.0").await;
    eventually(WAIT, "events delivered", || async {
        let got = received.lock().unwrap().clone();
        let kinds: Vec<String> =
            got.iter().map(|e| e["event"].as_str().unwrap_or_default().to_string()).collect();
        ["rollout_started", "wave_done", "rollout_completed"]
            .iter()
            .all(|k| kinds.iter().any(|x| x == k))
            .then_some(())
    })
    .await;
    assert!(
        attempts.load(std::sync::atomic::Ordering::SeqCst) > received.lock().unwrap().len(),
        "one delivery was retried"
    );

    // /metrics: well-formed Prometheus text with the families we promise.
    let text = http_get(f.ctl.http_addr, "/metrics");
    check_prometheus_text(&text);
    // Where Prometheus' own checker is installed, it must agree.
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for family in [
        "convoy_agents",
        "convoy_rollouts",
        "convoy_orders_sent_total",
        "convoy_rollback_duration_seconds",
        "convoy_hook_requests_total",
        "convoy_bundle_bytes_served_total",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing:\n{text}");
    }
    assert!(
        text.contains("convoy_agents{environment=\"production\",region=\"eu-west\",state=\"online\"} 1"),
        "{text}"
    );
    assert!(text.contains("convoy_rollouts{state=\"completed\"} 1"), "{text}");

    // An agent that stays away longer than `offline_after` is announced.
    let (id, _, agent) = f.agents.remove(0);
    agent.stop().await.unwrap();
    eventually(WAIT, "agent_offline event", || async {
        let got = received.lock().unwrap().clone();
        got.iter().any(|e| e["event"] == "agent_offline" && e["agent"] == id.as_str()).then_some(())
    })
    .await;
    f.shutdown().await;
}

/// The checks `promtool check metrics` makes on structure: HELP and TYPE before samples, one
/// TYPE per family, valid names and label syntax, numeric values, cumulative histogram buckets
/// ending in +Inf equal to _count.
fn check_prometheus_text(text: &str) {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut typed: std::collections::HashMap<String, String> = Default::default();
    let mut last_bucket: Option<f64> = None;
    let mut inf = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(name_ok(name), "{line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(typed.insert(name.into(), kind.into()).is_none(), "duplicate TYPE: {line}");
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, val) = pair.split_once('=').unwrap();
                assert!(name_ok(k) && val.starts_with('"') && val.ends_with('"'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "sample before its TYPE: {line}");
        if name.ends_with("_bucket") {
            if let Some(prev) = last_bucket {
                assert!(v >= prev, "histogram buckets must be cumulative: {line}");
            }
            last_bucket = Some(v);
            if series.contains("le=\"+Inf\"") {
                inf = Some(v);
            }
        }
        if name.ends_with("_count") && typed.get(family).is_some_and(|k| k == "histogram") {
            assert_eq!(Some(v), inf, "+Inf bucket must equal _count");
            last_bucket = None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_deliveries_act_once() {
    let f = Fleet::new(|c| c.to_string()).await;
    f.push("1.0.0").await;
    f.push("1.1.0").await;
    f.roll_out("1.0.0").await;
    f.roll_out("1.1.0").await;
    let http = f.ctl.http_addr;
    let bearer = vec![("Authorization", format!("Bearer {}", f.token()))];
    let firing = alert("Errors", "firing", json!({"app": "shop-api", "convoy_action": "rollback"}), "fp-c");
    // Both requests are in flight together: the once-only record decides, not timing.
    let send = || {
        let (bearer, firing) = (bearer.clone(), firing.clone());
        tokio::task::spawn_blocking(move || post(http, "/v1/hooks/alertmanager", &bearer, &firing))
    };
    let (a, b) = tokio::join!(send(), send());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    let outcomes: Vec<String> =
        [a.1, b.1].iter().map(|v| v["actions"][0]["outcome"].as_str().unwrap().to_string()).collect();
    assert_eq!(outcomes.iter().filter(|o| o.contains("rolled back 2 of 2")).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| o.contains("already acted on")).count(), 1, "{outcomes:?}");
    assert_eq!(f.serving("eu-1").as_deref(), Some("1.0.0"));
    assert_eq!(f.serving("us-1").as_deref(), Some("1.0.0"), "rolled back once, not one step further");
    // One intent and one outcome for the alert, not two actions.
    let log = f.ctl.controller.audit().entries(None, None).await.unwrap();
    let by_alert: Vec<_> = log.iter().filter(|e| e.actor == "alert:Errors").collect();
    assert_eq!(by_alert.len(), 2, "{by_alert:?}");
    assert_eq!(by_alert[0].phase, Some(Phase::Intent));
    assert_eq!(by_alert[1].phase, Some(Phase::Outcome));
    assert_eq!(by_alert[1].intent, Some(by_alert[0].seq));
    assert!(by_alert[1].outcome.contains("rolled back 2 of 2"), "{:?}", by_alert[1]);
    f.shutdown().await;
}

/// The intent entry for `action` by `actor` and the outcome that names it.
fn pair<'a>(log: &'a [AuditEntry], actor: &str, action: &str) -> (&'a AuditEntry, &'a AuditEntry) {
    let intent = log
        .iter()
        .rev()
        .find(|e| e.actor == actor && e.action == action && e.phase == Some(Phase::Intent))
        .unwrap_or_else(|| panic!("no intent for {action} by {actor}: {log:?}"));
    let outcome = log
        .iter()
        .find(|e| e.phase == Some(Phase::Outcome) && e.intent == Some(intent.seq))
        .unwrap_or_else(|| panic!("no outcome for intent {}: {log:?}", intent.seq));
    assert!(outcome.seq > intent.seq && outcome.action == action && outcome.actor == actor);
    assert_eq!(intent.outcome, "pending");
    (intent, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_and_hook_actions_write_intent_then_outcome_and_log_reads_are_audited() {
    let f = Fleet::new(|c| c.to_string()).await;
    f.push("1.0.0").await;
    f.push("1.1.0").await;
    f.roll_out("1.0.0").await;
    let mut admin = f.ctl.admin().await.unwrap();
    let id = admin
        .deploy(pb::DeployRequest {
            app: "shop-api".into(),
            version: "1.1.0".into(),
            waves: vec![100],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let c = &f.ctl.controller;
    eventually(WAIT, "deploy done", || async {
        c.rollouts().rollout(Some(id.clone())).await.unwrap().state.is_final().then_some(())
    })
    .await;
    admin
        .rollback(pb::RollbackRequest {
            app: "shop-api".into(),
            region: "eu-west".into(),
            reason: "errors".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.logs(pb::LogsRequest { agent_id: "eu-1".into(), app: "shop-api".into(), lines: 5 }).await.unwrap();
    // The same rollback again moves nobody, and the log says so instead of "ok".
    admin
        .rollback(pb::RollbackRequest {
            app: "shop-api".into(),
            region: "eu-west".into(),
            from_version: "1.1.0".into(),
            reason: "errors".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let log = c.audit().entries(None, None).await.unwrap();

    let actor = log.iter().find(|e| e.action == "deploy").unwrap().actor.clone();
    assert!(actor.starts_with("admin/"), "{actor}");
    let (intent, outcome) = pair(&log, &actor, "deploy");
    assert_eq!(intent.target, "shop-api@1.1.0");
    assert_eq!(outcome.outcome, "ok");
    // The latest rollback moved nobody; the one before moved eu-1.
    let (_, outcome) = pair(&log, &actor, "rollback");
    assert_eq!(outcome.outcome, "nothing rolled back: 0 of 1 rolled back, 1 already off it, 0 not done");
    let first = log.iter().find(|e| e.action == "rollback" && e.phase == Some(Phase::Outcome)).unwrap();
    assert_eq!(first.outcome, "ok: 1 of 1 rolled back, 0 already off it, 0 not done");
    let (intent, outcome) = pair(&log, &actor, "logs.read");
    assert_eq!(intent.target, "eu-1/shop-api");
    assert_eq!(outcome.outcome, "ok");
    // A hook rollback has the same shape, with the alert as the actor.
    let bearer = vec![("Authorization", format!("Bearer {}", f.token()))];
    let firing = alert(
        "Latency",
        "firing",
        json!({"app": "shop-api", "region": "us-east", "convoy_action": "rollback"}),
        "fp-p",
    );
    let (code, body) = post(f.ctl.http_addr, "/v1/hooks/alertmanager", &bearer, &firing);
    assert_eq!(code, 200, "{body}");
    let log = c.audit().entries(None, None).await.unwrap();
    let (intent, outcome) = pair(&log, "alert:Latency", "rollback");
    assert_eq!(intent.target, "shop-api/us-east");
    assert!(outcome.outcome.contains("rolled back 1 of 1"), "{outcome:?}");
    assert!(c.audit().verify().await.unwrap().is_ok());
    f.shutdown().await;
}

/// Runs `convoy ARGS` against a controller; stdout on success, stderr on failure.
async fn cli(ctl: &LocalController, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convoy"))
        .arg("--config")
        .arg(ctl.dir.join("convoy.toml"))
        .arg("--controller")
        .arg(ctl.grpc_addr.to_string())
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

async fn create_tokens(ctl: &LocalController, n: usize) {
    for _ in 0..n {
        ctl.token(Some("eu-west"), Duration::from_secs(60)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_checkpoints_catch_removal_of_the_newest_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let ctl = LocalController::start(&dir, LocalOptions::default()).await.unwrap();
    create_tokens(&ctl, 3).await;
    let early = tmp.path().join("early.json");
    let out = cli(&ctl, &["audit", "export", "--checkpoint", early.to_str().unwrap()]).await.unwrap();
    assert!(out.contains("checkpoint of 6 entries"), "{out}");
    create_tokens(&ctl, 2).await;
    let late = tmp.path().join("late.json");
    cli(&ctl, &["audit", "export", "--checkpoint", late.to_str().unwrap()]).await.unwrap();
    let cp: Value = serde_json::from_str(&std::fs::read_to_string(&late).unwrap()).unwrap();
    assert_eq!(cp["seq"], 10, "{cp}");
    let out = cli(&ctl, &["audit", "verify"]).await.unwrap();
    assert!(out.contains("10 entries") && out.contains("checkpoint at entry 10"), "{out}");
    let state_dir = ctl.config.state_dir.clone();
    ctl.stop().await.unwrap();

    // With the controller stopped, someone removes the three newest entries from its store.
    let db = eventually(WAIT, "the store is released", || async { sled::open(&state_dir).ok() }).await;
    let audit = db.open_tree("audit").unwrap();
    for seq in 8u64..=10 {
        assert!(audit.remove(seq.to_be_bytes()).unwrap().is_some());
    }
    db.flush().unwrap();
    drop((audit, db));
    let ctl = eventually(WAIT, "the controller restarts", || async {
        LocalController::start(&dir, LocalOptions::default()).await.ok()
    })
    .await;

    // The remaining chain is valid, but the stored checkpoint and the exported one both vouch
    // for ten entries.
    let err = cli(&ctl, &["audit", "verify"]).await.unwrap_err();
    assert!(err.contains("entries 8-10 missing") && err.contains("latest checkpoint"), "{err}");
    let err = cli(&ctl, &["audit", "verify", "--checkpoint", late.to_str().unwrap()]).await.unwrap_err();
    assert!(err.contains("entries 8-10 missing") && err.contains("given checkpoint"), "{err}");
    // The log up to the earlier checkpoint is intact, and that is provable.
    let out = cli(&ctl, &["audit", "verify", "--checkpoint", early.to_str().unwrap()]).await.unwrap();
    assert!(out.contains("checkpoint at entry 6"), "{out}");
    // The controller will not sign over the cut log.
    assert!(ctl.controller.audit().checkpoint().await.unwrap_err().to_string().contains("no longer matches"));

    // A checkpoint file that was edited, or signed by another key, is rejected.
    let mut forged: Value = serde_json::from_str(&std::fs::read_to_string(&early).unwrap()).unwrap();
    forged["seq"] = json!(5);
    forged["head"] = ctl.controller.audit().entries(None, None).await.unwrap()[4].hash.clone().into();
    let forged_path = tmp.path().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let err =
        cli(&ctl, &["audit", "verify", "--checkpoint", forged_path.to_str().unwrap()]).await.unwrap_err();
    assert!(err.contains("given checkpoint (entry 5) is not valid") && err.contains("signature"), "{err}");
    let mut bad_sig: Value = serde_json::from_str(&std::fs::read_to_string(&early).unwrap()).unwrap();
    let sig = bad_sig["signature"].as_str().unwrap().to_string();
    let flipped = format!("{}{}", &sig[..sig.len() - 2], if sig.ends_with("00") { "01" } else { "00" });
    bad_sig["signature"] = json!(flipped);
    std::fs::write(&forged_path, bad_sig.to_string()).unwrap();
    let err =
        cli(&ctl, &["audit", "verify", "--checkpoint", forged_path.to_str().unwrap()]).await.unwrap_err();
    assert!(err.contains("is not valid"), "{err}");
    ctl.stop().await.unwrap();
}

/// A rollout that covered only other regions says nothing about what an alerting region runs:
/// the hook rolls back from the release the last rollout covering the alert's region completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alert_rolls_back_from_the_last_rollout_that_covered_its_region() {
    let f = Fleet::new(|c| c.to_string()).await;
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        f.push(v).await;
    }
    f.roll_out("1.0.0").await;
    f.roll_out("1.1.0").await;
    // 1.2.0 goes to us-east only, and completes there.
    let c = &f.ctl.controller;
    let spec = RolloutSpec {
        waves: vec![100],
        regions: vec!["us-east".into()],
        ..RolloutSpec::new("shop-api", "1.2.0")
    };
    let id = c.rollouts().deploy(spec, "admin/test").await.unwrap();
    let r = eventually(WAIT, "us-east rollout done", || async {
        let r = c.rollouts().rollout(Some(id.clone())).await.unwrap();
        r.state.is_final().then_some(r)
    })
    .await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!((f.serving("eu-1").as_deref(), f.serving("us-1").as_deref()), (Some("1.1.0"), Some("1.2.0")));
    let bearer = vec![("Authorization", format!("Bearer {}", f.token()))];
    let eu = alert(
        "CheckoutErrors",
        "firing",
        json!({"app": "shop-api", "region": "eu-west", "convoy_action": "rollback"}),
        "fp-eu",
    );
    let (code, body) = post(f.ctl.http_addr, "/v1/hooks/alertmanager", &bearer, &eu);
    assert_eq!(code, 200, "{body}");
    let outcome = body["actions"][0]["outcome"].as_str().unwrap();
    assert!(outcome.contains("rolled back 1 of 1") && outcome.contains("@1.1.0"), "{body}");
    assert_eq!((f.serving("eu-1").as_deref(), f.serving("us-1").as_deref()), (Some("1.0.0"), Some("1.2.0")));
    f.shutdown().await;
}
