//! Crash safety: the real `convoy-agent` binary aborts at each journal step in turn (a test-only
//! failpoint), is restarted, and must come back with a complete release active, the interrupted
//! step finished or undone, and no leftovers.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_controller::local::{DemoRelease, LocalController, LocalOptions};
use convoy_controller::logic::OrderKind;
use convoy_proto::v1 as pb;

const WAIT: Duration = Duration::from_secs(30);

fn agent_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_convoy"))
        .with_file_name(format!("convoy-agent{}", std::env::consts::EXE_SUFFIX));
    assert!(p.exists(), "{} is missing: run the suite with `cargo test --workspace`", p.display());
    p
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
    let order =
        |id: String, kind: OrderKind| async move { c.send_order(&id, kind, Duration::from_secs(60)).await };
    let install = |v: &str| OrderKind::Install {
        app: "shop-api".into(),
        version: v.into(),
        digest: digests[v].clone(),
    };
    let activate =
        |v: &str| OrderKind::Activate { app: "shop-api".into(), version: v.into(), health_deadline: None };

    // (failpoint, release deployed when the agent dies, version active right after restart)
    let cases = [
        ("install:before-download", "2.0.0", "1.0.0"),
        ("install:after-unpack", "2.0.0", "1.0.0"),
        ("install:after-rename", "2.0.0", "1.0.0"),
        ("activate:before-switch", "2.0.0", "1.0.0"),
        ("activate:after-switch", "2.0.0", "2.0.0"),
        ("activate:after-journal", "2.0.0", "2.0.0"),
        ("activate:after-health", "2.0.0", "2.0.0"),
        // Activated but unconfirmed, and unhealthy: rolled back at restart.
        ("activate:after-switch", "3.0.0", "1.0.0"),
    ];
    for (n, (failpoint, target, expect)) in cases.iter().enumerate() {
        let id = format!("crash-{n}");
        let dir = tmp.path().join(&id);
        ctl.enroll(&dir, &id, "eu-west").await.unwrap();
        let port = free_port();

        // Phase 1: v1 deployed normally.
        let agent = spawn_agent(&dir, &key_path, port, None);
        wait_online(&ctl, &id).await;
        assert!(order(id.clone(), install("1.0.0")).await.unwrap().ok);
        assert!(order(id.clone(), activate("1.0.0")).await.unwrap().ok);
        assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));
        drop(agent);

        // Phase 2: the agent dies at the failpoint while deploying the target.
        let mut agent = spawn_agent(&dir, &key_path, port, Some(failpoint));
        wait_online(&ctl, &id).await;
        let _ = order(id.clone(), install(target)).await;
        if failpoint.starts_with("activate") {
            let _ = order(id.clone(), activate(target)).await;
        }
        let status = tokio::task::spawn_blocking(move || {
            let s = agent.0.wait().unwrap();
            std::mem::forget(agent);
            s
        })
        .await
        .unwrap();
        assert!(!status.success(), "{failpoint}: the agent should have aborted");

        // Phase 3: restart; a complete release is active and serving.
        let _agent = spawn_agent(&dir, &key_path, port, None);
        wait_online(&ctl, &id).await;
        let s = settled(&ctl, &id).await;
        assert_eq!(
            s.current,
            *expect,
            "case {n} ({failpoint}, {target}): {s:?}\nagent log:\n{}",
            std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
        );
        let link = std::fs::read_link(dir.join("apps/shop-api/current")).unwrap();
        assert_eq!(link, Path::new("releases").join(expect), "case {n}");
        assert!(
            dir.join("apps/shop-api").join(&link).join("convoy.toml").exists(),
            "case {n}: dangling current"
        );
        eventually(WAIT, "the active release serves", || async {
            (get(port).as_deref() == Some(format!("demo-app {expect}").as_str())).then_some(())
        })
        .await;
        assert!(leftovers(&dir).is_empty(), "case {n} ({failpoint}): leftovers {:?}", leftovers(&dir));

        // The state is consistent enough to carry on: deploying the target again works.
        if *target == "2.0.0" {
            let i = order(id.clone(), install("2.0.0")).await.unwrap();
            assert!(i.ok, "case {n}: {:?}", i.error);
            let a = order(id.clone(), activate("2.0.0")).await.unwrap();
            assert!(a.ok, "case {n}: {:?}", a.error);
            assert_eq!(get(port).as_deref(), Some("demo-app 2.0.0"));
        }
    }
    ctl.stop().await.unwrap();
}
