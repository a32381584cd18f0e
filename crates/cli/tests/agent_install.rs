//! Install, activate, supervise, health-check and roll back with real child processes: the
//! demo HTTP service (`convoy demo-app`), deployed through a real agent by a real controller.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, free_port, get};
use convoy_bundle::SecretKey;
use convoy_controller::logic::{Answer, OrderKind, OrderOutcome, Target};
use convoy_testkit::{DemoRelease, LocalAgent, LocalController, LocalOptions};

const WAIT: Duration = Duration::from_secs(30);
const ORDER: Duration = Duration::from_secs(60);

struct Fleet {
    tmp: tempfile::TempDir,
    ctl: LocalController,
    key: SecretKey,
    digests: std::collections::HashMap<String, String>,
}

impl Fleet {
    async fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
        Self { tmp, ctl, key: SecretKey::generate(), digests: Default::default() }
    }

    /// Builds and pushes `shop-api@version` running the demo service in `mode`.
    async fn release(&mut self, version: &str, mode: &str, extra: &str) {
        let exe = Path::new(env!("CARGO_BIN_EXE_convoy"));
        let r = DemoRelease { extra, ..DemoRelease::new(version, mode) };
        let info = self.ctl.push_demo_release(self.tmp.path(), exe, &self.key, r).await.unwrap();
        self.digests.insert(version.into(), info.digest);
    }

    /// Enrolls and runs an agent with this fleet's release key and its own PORT.
    async fn agent(&self, id: &str) -> (LocalAgent, u16) {
        let dir = self.tmp.path().join(id);
        self.ctl.enroll(&dir, id, "eu-west").await.unwrap();
        let port = free_port();
        let public = self.key.public();
        let mut agent = LocalAgent::spawn_with(&dir, |c| {
            c.trust = vec![public];
            c.vars.insert("PORT".into(), port.to_string());
            c.keep_releases = 2;
        })
        .unwrap();
        agent.wait_for(WAIT, |s| s.connected).await.unwrap();
        (agent, port)
    }

    async fn order(&self, agent: &str, kind: OrderKind) -> OrderOutcome {
        self.ctl.controller.orders().send_order(agent, kind, ORDER).await.unwrap()
    }

    async fn install(&self, agent: &str, version: &str) -> OrderOutcome {
        let digest = self.digests[version].clone();
        self.order(agent, OrderKind::Install { app: "shop-api".into(), version: version.into(), digest })
            .await
    }

    async fn deploy(&self, agent: &str, version: &str) -> OrderOutcome {
        let i = self.install(agent, version).await;
        assert!(i.is_done(), "install {version}: {}", i.message);
        self.order(
            agent,
            OrderKind::Activate { app: "shop-api".into(), version: version.into(), health_deadline: None },
        )
        .await
    }

    fn current_link(&self, agent: &str) -> PathBuf {
        self.tmp.path().join(agent).join("apps/shop-api/current")
    }
}

fn status(o: &OrderOutcome) -> &convoy_controller::store::AppStatusRecord {
    o.status.as_ref().unwrap()
}

#[tokio::test]
async fn healthy_deploy_commits_and_bad_releases_revert_automatically() {
    let mut f = Fleet::new().await;
    for (v, mode) in [("1.0.0", "healthy"), ("2.0.0", "fail500"), ("3.0.0", "crash"), ("4.0.0", "hang")] {
        f.release(v, mode, "").await;
    }
    let (agent, port) = f.agent("a1").await;

    let o = f.deploy("a1", "1.0.0").await;
    assert!(o.is_done(), "{}", o.message);
    assert_eq!(status(&o).current, "1.0.0");
    assert_eq!(status(&o).known_good, "1.0.0");
    assert_eq!(status(&o).health, "healthy");
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));

    // 500 on /healthz: reverted to 1.0.0, which answers again.
    let o = f.deploy("a1", "2.0.0").await;
    assert!(!o.is_done());
    let err = o.message.clone();
    assert!(err.contains("HTTP 500") && err.contains("rolled back to 1.0.0"), "{err}");
    assert_eq!(status(&o).current, "1.0.0");
    assert_eq!(status(&o).known_good, "1.0.0");
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));

    // Crash loop: the service never comes up; reverted.
    let o = f.deploy("a1", "3.0.0").await;
    assert!(!o.is_done());
    assert!(o.message.clone().contains("rolled back to 1.0.0"), "{}", o.message);
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));

    // A health endpoint that hangs: each probe times out, which counts as a failure.
    let o = f.deploy("a1", "4.0.0").await;
    assert!(!o.is_done());
    let err = o.message.clone();
    assert!(err.contains("timed out") && err.contains("rolled back to 1.0.0"), "{err}");
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));

    // The controller sees the state in the registry.
    let listed = common::agents(&f.ctl).await;
    let app = listed[0].apps.iter().find(|a| a.app == "shop-api").unwrap();
    assert_eq!(app.current, "1.0.0");
    agent.stop().await.unwrap();
    assert_eq!(get(port), None, "stopping the agent stops its services");
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn rollback_fencing_idempotence_and_corrupted_releases() {
    let mut f = Fleet::new().await;
    f.release("1.0.0", "healthy", "").await;
    f.release("1.1.0", "healthy", "").await;
    let (agent, port) = f.agent("a1").await;
    assert!(f.deploy("a1", "1.0.0").await.is_done());
    assert!(f.deploy("a1", "1.1.0").await.is_done());
    assert_eq!(get(port).as_deref(), Some("demo-app 1.1.0"));

    // Rolling back a committed release: the previous one serves again.
    let (results, _) = f
        .ctl
        .controller
        .rollouts()
        .rollback(
            "shop-api",
            &Target::Agents(vec!["a1".into()]).into(),
            None,
            None,
            "bad numbers",
            "admin/test",
        )
        .await
        .unwrap();
    let o = results[0].1.as_ref().unwrap();
    assert!(o.is_done(), "{}", o.message);
    assert_eq!(status(o).current, "1.0.0");
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));

    // A duplicate of an applied order changes nothing; an older one is ignored as stale.
    let seq = f.ctl.controller.orders().next_seq().await.unwrap();
    let activate =
        OrderKind::Activate { app: "shop-api".into(), version: "1.1.0".into(), health_deadline: None };
    let o = f.ctl.controller.orders().send_order_with_seq("a1", seq, activate.clone(), ORDER).await.unwrap();
    assert!(o.is_done() && !matches!(o.answer, Answer::Stale { .. }));
    assert_eq!(get(port).as_deref(), Some("demo-app 1.1.0"));
    let again = f.ctl.controller.orders().send_order_with_seq("a1", seq, activate, ORDER).await.unwrap();
    assert!(matches!(again.answer, Answer::Stale { .. }), "the same order twice is ignored the second time");
    let old = OrderKind::Activate { app: "shop-api".into(), version: "1.0.0".into(), health_deadline: None };
    let o = f.ctl.controller.orders().send_order_with_seq("a1", seq - 1, old, ORDER).await.unwrap();
    assert!(matches!(o.answer, Answer::Stale { .. }));
    assert_eq!(status(&o).current, "1.1.0", "a stale order changes nothing");
    assert_eq!(get(port).as_deref(), Some("demo-app 1.1.0"));
    // An activation of what is already active and committed is a no-op.
    let o = f
        .order(
            "a1",
            OrderKind::Activate { app: "shop-api".into(), version: "1.1.0".into(), health_deadline: None },
        )
        .await;
    assert!(o.is_done() && !matches!(o.answer, Answer::Stale { .. }));

    // Corrupt the kept 1.0.0: the rollback is refused and 1.1.0 keeps serving.
    let kept = f.tmp.path().join("a1/apps/shop-api/releases/1.0.0/bin/app");
    std::fs::write(&kept, "#!/bin/sh\necho pwned\n").unwrap();
    let o = f
        .order(
            "a1",
            OrderKind::Rollback {
                app: "shop-api".into(),
                from: "1.1.0".into(),
                to: Some("1.0.0".into()),
                reason: "test".into(),
            },
        )
        .await;
    assert!(!o.is_done());
    let err = o.message.clone();
    assert!(err.contains("kept release shop-api@1.0.0 is corrupted") && err.contains("bin/app"), "{err}");
    assert_eq!(get(port).as_deref(), Some("demo-app 1.1.0"));
    assert_eq!(std::fs::read_link(f.current_link("a1")).unwrap(), Path::new("releases/1.1.0"));

    // Rolling back to something never installed is a clear error too.
    let o = f
        .order(
            "a1",
            OrderKind::Rollback {
                app: "shop-api".into(),
                from: "1.1.0".into(),
                to: Some("9.9.9".into()),
                reason: "x".into(),
            },
        )
        .await;
    assert!(o.message.clone().contains("not installed"));
    agent.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn hooks_env_variables_and_a_failing_pre_activate() {
    let mut f = Fleet::new().await;
    let witness = f.tmp.path().join("hook-env.txt");
    let hook = format!(
        "\n[hooks]\npre_activate = [\"sh\", \"-c\", \"env | grep ^CONVOY_ | sort > '{}'\"]\ntimeout = \"5s\"\n",
        witness.display()
    );
    f.release("1.0.0", "healthy", &hook).await;
    f.release(
        "2.0.0",
        "healthy",
        "\n[hooks]\npre_activate = [\"sh\", \"-c\", \"echo migration failed >&2; exit 3\"]\n",
    )
    .await;
    f.release("3.0.0", "healthy", "").await;
    let (agent, port) = f.agent("a1").await;
    assert!(f.deploy("a1", "1.0.0").await.is_done());
    let env = std::fs::read_to_string(&witness).unwrap();
    assert!(env.contains("CONVOY_APP=shop-api"), "{env}");
    assert!(env.contains("CONVOY_VERSION=1.0.0"), "{env}");
    assert!(env.contains("CONVOY_PREVIOUS_VERSION=\n"), "{env}");
    assert!(env.contains("CONVOY_RELEASE_DIR=") && env.contains("releases/1.0.0"), "{env}");

    // A failing pre_activate stops the deploy before the switch.
    let o = f.deploy("a1", "2.0.0").await;
    assert!(!o.is_done());
    let err = o.message.clone();
    assert!(err.contains("stopped before the switch") && err.contains("pre_activate"), "{err}");
    assert_eq!(std::fs::read_link(f.current_link("a1")).unwrap(), Path::new("releases/1.0.0"));
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));
    // Its output is in the release's log, readable through the controller.
    let logs = f.order("a1", OrderKind::Logs { app: "shop-api".into(), lines: 50 }).await;
    assert!(logs.is_done());
    assert!(logs.output.contains("demo-app 1.0.0 listening"), "{}", logs.output);
    agent.stop().await.unwrap();

    // An agent without PORT defined refuses the install, naming the variable.
    let dir = f.tmp.path().join("a2");
    f.ctl.enroll(&dir, "a2", "eu-west").await.unwrap();
    let public = f.key.public();
    let mut a2 = LocalAgent::spawn_with(&dir, |c| c.trust = vec![public]).unwrap();
    a2.wait_for(WAIT, |s| s.connected).await.unwrap();
    let o = f.install("a2", "3.0.0").await;
    assert!(!o.is_done());
    assert!(o.message.clone().contains("${PORT} is not defined"));
    assert!(!dir.join("apps/shop-api/releases/3.0.0").exists());
    a2.stop().await.unwrap();

    // An agent with no trusted keys refuses everything.
    let dir = f.tmp.path().join("a3");
    f.ctl.enroll(&dir, "a3", "eu-west").await.unwrap();
    let mut a3 = LocalAgent::spawn(&dir).unwrap();
    a3.wait_for(WAIT, |s| s.connected).await.unwrap();
    let o = f.install("a3", "3.0.0").await;
    assert!(o.message.clone().contains("no trusted release keys"));
    a3.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn retention_keeps_current_known_good_and_previous() {
    let mut f = Fleet::new().await;
    for v in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
        f.release(v, "healthy", "").await;
    }
    f.release("1.4.0", "fail500", "").await;
    let (agent, _port) = f.agent("a1").await;
    for v in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
        assert!(f.deploy("a1", v).await.is_done());
    }
    // keep_releases = 2: only 1.3.0 (current, known-good) and 1.2.0 (previous) remain.
    let releases = f.tmp.path().join("a1/apps/shop-api/releases");
    let mut on_disk: Vec<String> = std::fs::read_dir(&releases)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, ["1.2.0", "1.3.0"]);
    // A failed deploy does not prune: the known-good release stays and serves.
    let o = f.deploy("a1", "1.4.0").await;
    assert!(!o.is_done());
    assert!(releases.join("1.3.0").exists() && releases.join("1.2.0").exists());
    assert_eq!(status(&o).known_good, "1.3.0");
    agent.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn current_is_never_missing_during_switches() {
    let mut f = Fleet::new().await;
    f.release("1.0.0", "healthy", "").await;
    f.release("1.1.0", "healthy", "").await;
    let (agent, _port) = f.agent("a1").await;
    assert!(f.deploy("a1", "1.0.0").await.is_done());
    assert!(f.deploy("a1", "1.1.0").await.is_done());
    let link = f.current_link("a1");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let target = std::fs::read_link(&link).expect("current must always exist");
                assert!(target.starts_with("releases"));
                reads += 1;
            }
            reads
        })
    };
    for (from, to) in [("1.1.0", "1.0.0"), ("1.0.0", "1.1.0"), ("1.1.0", "1.0.0")] {
        let kind = OrderKind::Rollback {
            app: "shop-api".into(),
            from: from.into(),
            to: Some(to.into()),
            reason: "flip".into(),
        };
        let o = f.order("a1", kind).await;
        assert_eq!(o.answer, Answer::Applied, "{}", o.message);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw `current` missing");
    assert!(reads > 100, "the reader ran during the switches ({reads} reads)");
    agent.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn the_service_keeps_running_and_supervised_without_the_controller() {
    let mut f = Fleet::new().await;
    f.release("1.0.0", "healthy", "").await;
    let (agent, port) = f.agent("a1").await;
    assert!(f.deploy("a1", "1.0.0").await.is_done());
    let Fleet { ctl, tmp, .. } = f;
    ctl.stop().await.unwrap();
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));
    // Kill the service behind the agent's back: the supervisor restarts it, controller or not.
    let out = std::process::Command::new("pkill")
        .args(["-f", &format!("demo-app --port {port}")])
        .status()
        .unwrap();
    assert!(out.success());
    eventually(WAIT, "service restarted by the supervisor", || async {
        (get(port).as_deref() == Some("demo-app 1.0.0")).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    drop(tmp);
}

async fn convoy_cli(ctl: &LocalController, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convoy"))
        .arg("--config")
        .arg(&ctl.config.path)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn rollback_logs_status_and_agents_from_the_cli() {
    let mut f = Fleet::new().await;
    f.release("1.0.0", "healthy", "").await;
    f.release("1.1.0", "healthy", "").await;
    let (a1, p1) = f.agent("a1").await;
    let (a2, p2) = f.agent("a2").await;
    for id in ["a1", "a2"] {
        assert!(f.deploy(id, "1.0.0").await.is_done());
        assert!(f.deploy(id, "1.1.0").await.is_done());
    }
    let (ok, out, _) = convoy_cli(&f.ctl, &["status", "-o", "json"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shop-api"]["production"]["eu-west"]["running"]["1.1.0"], 2);

    let (ok, _, err) = convoy_cli(&f.ctl, &["rollback", "shop-api", "--reason", "x"]).await;
    assert!(!ok && err.contains("--agent"), "{err}");
    let (ok, _, err) = convoy_cli(&f.ctl, &["rollback", "shop-api", "--all"]).await;
    assert!(!ok && err.contains("--reason"), "{err}");
    let (ok, _, err) =
        convoy_cli(&f.ctl, &["rollback", "shop-api", "--agent", "nobody", "--reason", "x"]).await;
    assert!(!ok && err.contains("nobody"), "{err}");

    let (ok, out, err) =
        convoy_cli(&f.ctl, &["rollback", "shop-api", "--all", "--reason", "checkout errors", "-o", "json"])
            .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["agents"].as_array().unwrap().len(), 2);
    for a in v["agents"].as_array().unwrap() {
        assert_eq!(a["outcome"], "applied", "{a}");
        assert_eq!(a["current"], "1.0.0");
    }
    assert_eq!(get(p1).as_deref(), Some("demo-app 1.0.0"));
    assert_eq!(get(p2).as_deref(), Some("demo-app 1.0.0"));

    let (ok, out, _) = convoy_cli(&f.ctl, &["logs", "a1", "shop-api", "--tail", "20"]).await;
    assert!(ok);
    assert!(out.contains("demo-app 1.0.0 listening"), "{out}");
    let (ok, _, err) = convoy_cli(&f.ctl, &["logs", "a1", "no-such-app"]).await;
    assert!(!ok && err.contains("no current release"), "{err}");

    let (ok, out, _) = convoy_cli(&f.ctl, &["agents"]).await;
    assert!(ok);
    assert!(out.lines().any(|l| l.starts_with("a1") && l.contains("shop-api@1.0.0 (healthy)")), "{out}");
    let (ok, out, _) = convoy_cli(&f.ctl, &["agents", "-o", "json"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["apps"][0]["known_good"], "1.0.0");
    // 1.1.0 was rolled back from, so it is no rollback target; nothing older than 1.0.0 is kept.
    assert_eq!(v[0]["apps"][0]["previous"], "");

    // An offline agent is reported, not waited on forever.
    a2.stop().await.unwrap();
    eventually(WAIT, "a2 offline", || async {
        common::agents(&f.ctl).await.iter().any(|a| a.id == "a2" && !a.online).then_some(())
    })
    .await;
    let (ok, out, _) =
        convoy_cli(&f.ctl, &["rollback", "shop-api", "--region", "eu-west", "--reason", "again"]).await;
    assert!(!ok);
    assert!(out.lines().any(|l| l.starts_with("a2") && l.contains("unreachable")), "{out}");
    // A second rollback goes further back, never forward onto 1.1.0: here there is nothing older.
    assert!(out.lines().any(|l| l.starts_with("a1") && l.contains("no kept, known-good release")), "{out}");
    assert_eq!(get(p1).as_deref(), Some("demo-app 1.0.0"));
    a1.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn releases_for_another_platform_or_labels_are_refused() {
    let f = Fleet::new().await;
    let (agent, _port) = f.agent("a1").await;
    let mut digests = Vec::new();
    for (version, target) in [
        ("5.0.0", convoy_bundle::Target { arch: Some("sparc64".into()), ..Default::default() }),
        (
            "5.1.0",
            convoy_bundle::Target {
                labels: [("tier".to_string(), "edge".to_string())].into(),
                ..Default::default()
            },
        ),
    ] {
        let src = f.tmp.path().join(format!("t-{version}"));
        convoy_testkit::write_demo_release(
            &src,
            Path::new(env!("CARGO_BIN_EXE_convoy")),
            version,
            "healthy",
            "",
        )
        .unwrap();
        let out = f.tmp.path().join(format!("t-{version}.bundle"));
        let opts = convoy_bundle::BuildOptions {
            app: "shop-api".into(),
            version: version.into(),
            created_at: 0,
            target: Some(target),
            zstd_level: 1,
        };
        convoy_bundle::build(&src, &opts, &f.key, &out).unwrap();
        digests.push((version, f.ctl.push_file(&out).await.unwrap().digest));
    }
    for ((version, digest), want) in
        digests.into_iter().zip(["targets arch sparc64", "targets agents labelled tier=edge"])
    {
        let o = f
            .order("a1", OrderKind::Install { app: "shop-api".into(), version: version.into(), digest })
            .await;
        assert!(!o.is_done());
        assert!(o.message.clone().contains(want), "{}", o.message);
        assert!(!f.tmp.path().join("a1/apps/shop-api/releases").join(version).exists());
    }
    agent.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}

#[tokio::test]
async fn a_rollback_cuts_a_health_gate_in_progress_short() {
    let mut f = Fleet::new().await;
    f.release("1.0.0", "healthy", "").await;
    f.release("2.0.0", "hang", "").await;
    let (agent, port) = f.agent("a1").await;
    assert!(f.deploy("a1", "1.0.0").await.is_done());
    assert!(f.install("a1", "2.0.0").await.is_done());
    // Activate 2.0.0 with a long deadline; its health endpoint never answers.
    let ctl = f.ctl.controller.clone();
    let activation = tokio::spawn(async move {
        let kind = OrderKind::Activate {
            app: "shop-api".into(),
            version: "2.0.0".into(),
            health_deadline: Some(Duration::from_secs(600)),
        };
        ctl.orders().send_order("a1", kind, Duration::from_secs(700)).await.unwrap()
    });
    eventually(WAIT, "2.0.0 switched and checking", || async {
        let a = common::agents(&f.ctl).await.remove(0);
        a.apps.iter().any(|s| s.current == "2.0.0" && s.busy).then_some(())
    })
    .await;
    let o = f
        .order(
            "a1",
            OrderKind::Rollback {
                app: "shop-api".into(),
                from: "2.0.0".into(),
                to: Some("1.0.0".into()),
                reason: "alert".into(),
            },
        )
        .await;
    assert!(o.is_done(), "{}", o.message);
    assert_eq!(status(&o).current, "1.0.0");
    let a = activation.await.unwrap();
    assert!(!a.is_done());
    assert!(a.message.clone().contains("cut short by a rollback"));
    assert_eq!(get(port).as_deref(), Some("demo-app 1.0.0"));
    agent.stop().await.unwrap();
    f.ctl.stop().await.unwrap();
}
