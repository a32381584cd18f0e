//! Crash safety: the real `convoy-agent` binary aborts at each journal step in turn (a test-only
//! failpoint), is restarted, and must come back with a complete release active, the interrupted
//! step finished or undone, and no leftovers.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_controller::logic::OrderKind;
use convoy_proto::v1 as pb;
use convoy_testkit::{DemoRelease, LocalController, LocalOptions};

const WAIT: Duration = Duration::from_secs(30);
/// How long an agent may take to reach its failpoint. A failpoint that is never reached fails
/// the test after this, instead of hanging it.
const CRASH_WAIT: Duration = Duration::from_secs(60);

/// What phase 2 asks the agent to do.
#[derive(Clone, Debug)]
enum Action {
    Deploy(&'static str),
    Rollback(&'static str, &'static str),
}

/// Waits for the agent to abort at its failpoint, failing the test after [`CRASH_WAIT`].
async fn died(agent: AgentProc, what: &str, failpoint: &str) {
    let waited = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let until = std::time::Instant::now() + CRASH_WAIT;
        loop {
            if let Some(s) = agent.0.try_wait().unwrap() {
                std::mem::forget(agent);
                return Some(s);
            }
            if std::time::Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    match waited {
        Some(s) => assert!(!s.success(), "{what}: the agent should have aborted at {failpoint}"),
        None => panic!("{what}: failpoint {failpoint} was never reached within {CRASH_WAIT:?}"),
    }
}

fn agent_bin() -> PathBuf {
    common::agent_bin(env!("CARGO_BIN_EXE_convoy"))
}

/// A running agent process. Dropping it stops it gracefully (SIGTERM: it stops its services
/// too), so the suite leaves no processes behind; the crashes are the failpoints' aborts.
struct AgentProc(Child);
impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        for _ in 0..500 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(dir: &Path, key: &Path, port: u16, failpoint: Option<&str>) -> AgentProc {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .arg("--data-dir")
        .arg(dir)
        .arg("--trust")
        .arg(key)
        .arg("--var")
        .arg(format!("PORT={port}"));
    cmd.env("CONVOY_AGENT_FAILPOINT", failpoint.unwrap_or("")).env("RUST_LOG", "info");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
    cmd.stdout(Stdio::null()).stderr(log);
    AgentProc(cmd.spawn().unwrap())
}

async fn wait_online(ctl: &LocalController, id: &str) {
    eventually(WAIT, &format!("{id} online"), || async {
        common::agents(ctl).await.into_iter().any(|a| a.id == id && a.online).then_some(())
    })
    .await;
}

/// The app's status as the agent reports it, once no activation is in flight.
async fn settled(ctl: &LocalController, id: &str) -> pb::AppStatus {
    eventually(WAIT, &format!("{id} settled"), || async {
        let a = common::agents(ctl).await.into_iter().find(|a| a.id == id)?;
        let s = a.apps.into_iter().find(|s| s.app == "shop-api")?;
        let done =
            !s.busy && (s.health == pb::Health::Healthy as i32 || s.health == pb::Health::Unhealthy as i32);
        (a.online && done).then_some(s)
    })
    .await
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["apps/shop-api/releases", "apps/shop-api", "cache"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(".tmp-") || n.ends_with(".partial") || n == ".current.tmp" {
                    out.push(format!("{sub}/{n}"));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn agent_killed_at_every_journal_step_recovers_to_a_complete_release() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    let key_path = tmp.path().join("release.pub");
    std::fs::write(&key_path, key.public().to_text()).unwrap();
    let mut digests = std::collections::HashMap::new();
    for (v, mode) in [("1.0.0", "healthy"), ("2.0.0", "healthy"), ("3.0.0", "fail500")] {
        let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
        let info = ctl.push_demo_release(tmp.path(), exe, &key, DemoRelease::new(v, mode)).await.unwrap();
        digests.insert(v, info.digest);
    }
    let c = &ctl.controller;
    let order = |id: String, kind: OrderKind| async move {
        c.orders().send_order(&id, kind, Duration::from_secs(60)).await
    };
    let install = |v: &str| OrderKind::Install {
        app: "shop-api".into(),
        version: v.into(),
        digest: digests[v].clone(),
    };
    let activate =
        |v: &str| OrderKind::Activate { app: "shop-api".into(), version: v.into(), health_deadline: None };

    let rollback = |from: &str, to: &str| OrderKind::Rollback {
        app: "shop-api".into(),
        from: from.into(),
        to: Some(to.into()),
        reason: "crash test".into(),
    };

    // (failpoints, the order that meets the first one, version active after the last restart).
    // Each further failpoint is met by the restarted agent on its own (the recovery), so
    // `["activate:after-journal", "gate:started"]` kills the agent again during the health gate
    // its recovery re-runs.
    let cases: Vec<(&[&str], Action, &str)> = vec![
        (&["install:before-download"], Action::Deploy("2.0.0"), "1.0.0"),
        (&["download:mid"], Action::Deploy("2.0.0"), "1.0.0"),
        (&["install:after-unpack"], Action::Deploy("2.0.0"), "1.0.0"),
        (&["install:after-rename"], Action::Deploy("2.0.0"), "1.0.0"),
        (&["activate:before-switch"], Action::Deploy("2.0.0"), "1.0.0"),
        (&["activate:after-switch"], Action::Deploy("2.0.0"), "2.0.0"),
        (&["activate:after-journal"], Action::Deploy("2.0.0"), "2.0.0"),
        (&["activate:after-journal", "gate:started"], Action::Deploy("2.0.0"), "2.0.0"),
        (&["commit:before-clear"], Action::Deploy("2.0.0"), "2.0.0"),
        // Activated but unconfirmed, and unhealthy: rolled back at restart.
        (&["activate:after-switch"], Action::Deploy("3.0.0"), "1.0.0"),
        (&["activate:after-journal", "gate:started"], Action::Deploy("3.0.0"), "1.0.0"),
        // The automatic revert of the unhealthy release is itself interrupted.
        (&["revert:before-switch"], Action::Deploy("3.0.0"), "1.0.0"),
        (&["revert:after-switch"], Action::Deploy("3.0.0"), "1.0.0"),
        (&["revert:after-switch", "gate:started"], Action::Deploy("3.0.0"), "1.0.0"),
        // A rollback from 2.0.0 to 1.0.0, interrupted.
        (&["rollback:before-switch"], Action::Rollback("2.0.0", "1.0.0"), "2.0.0"),
        (&["rollback:after-switch"], Action::Rollback("2.0.0", "1.0.0"), "1.0.0"),
        (&["rollback:after-switch", "gate:started"], Action::Rollback("2.0.0", "1.0.0"), "1.0.0"),
    ];
    for (n, (failpoints, action, expect)) in cases.iter().enumerate() {
        let id = format!("crash-{n}");
        let what = format!("case {n} ({failpoints:?}, {action:?})");
        let dir = tmp.path().join(&id);
        ctl.enroll(&dir, &id, "eu-west").await.unwrap();
        let port = free_port();

        // Phase 1: v1 deployed normally (and v2 for the rollback cases).
        let agent = spawn_agent(&dir, &key_path, port, None);
        wait_online(&ctl, &id).await;
        let base: &[&str] =
            if matches!(action, Action::Rollback(..)) { &["1.0.0", "2.0.0"] } else { &["1.0.0"] };
        for v in base {
            let i = order(id.clone(), install(v)).await.unwrap();
            assert!(i.is_done(), "{what}: {}", i.message);
            let a = order(id.clone(), activate(v)).await.unwrap();
            assert!(a.is_done(), "{what}: {}", a.message);
        }
        drop(agent);

        // Phase 2: the agent dies at the first failpoint while applying the order.
        let agent = spawn_agent(&dir, &key_path, port, Some(failpoints[0]));
        wait_online(&ctl, &id).await;
        let orders = {
            let id = id.clone();
            let action = action.clone();
            let (install, activate, rollback) = (&install, &activate, &rollback);
            let kinds = match action {
                Action::Deploy(v) => vec![install(v), activate(v)],
                Action::Rollback(from, to) => vec![rollback(from, to)],
            };
            async move {
                for k in kinds {
                    // The agent dies mid-order: no answer is expected.
                    if order(id.clone(), k).await.is_err() {
                        break;
                    }
                }
            }
        };
        tokio::select! {
            () = orders => {}
            () = tokio::time::sleep(CRASH_WAIT) => {}
        }
        died(agent, &what, failpoints[0]).await;

        // Further failpoints: the restarted agent dies again during its own recovery.
        for fp in &failpoints[1..] {
            let agent = spawn_agent(&dir, &key_path, port, Some(fp));
            died(agent, &what, fp).await;
        }

        // Last: restart; a complete release is active, confirmed or reverted, and serving.
        let _agent = spawn_agent(&dir, &key_path, port, None);
        wait_online(&ctl, &id).await;
        let s = settled(&ctl, &id).await;
        assert_eq!(
            s.current,
            *expect,
            "{what}: {s:?}\nagent log:\n{}",
            std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
        );
        let link = std::fs::read_link(dir.join("apps/shop-api/current")).unwrap();
        assert_eq!(link, Path::new("releases").join(expect), "{what}");
        assert!(
            dir.join("apps/shop-api").join(&link).join("convoy.toml").exists(),
            "{what}: dangling current"
        );
        eventually(WAIT, "the active release serves", || async {
            (get(port).as_deref() == Some(format!("demo-app {expect}").as_str())).then_some(())
        })
        .await;
        assert!(leftovers(&dir).is_empty(), "{what}: leftovers {:?}", leftovers(&dir));
        // Settled means the journal is empty: the activation was committed or reverted.
        assert_eq!(s.known_good, *expect, "{what}: the active release is the confirmed one");

        // The state is consistent enough to carry on: deploying 2.0.0 again works.
        if *expect != "2.0.0" {
            let i = order(id.clone(), install("2.0.0")).await.unwrap();
            assert!(i.is_done(), "{what}: {}", i.message);
            let a = order(id.clone(), activate("2.0.0")).await.unwrap();
            assert!(a.is_done(), "{what}: {}", a.message);
            assert_eq!(get(port).as_deref(), Some("demo-app 2.0.0"));
        }
    }
    ctl.stop().await.unwrap();
}
