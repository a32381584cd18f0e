//! The processes the agent starts and stops: a process group recorded by an earlier run is
//! signalled only if it provably is the one the agent started; children see a clean
//! environment; `[service] user` really switches the service, hooks and health checks.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use convoy_agent::state::{AppRecord, State};
use convoy_agent::{ProcessStamp, INHERITED_ENV};
use convoy_proto::v1 as pb;
use pb::OrderOutcome;
use support::*;

/// `sleep 300` in its own process group, reaped by a thread so its end is observable; returns
/// its pgid and where its exit status arrives.
fn foreign_sleeper(cwd: &Path) -> (i32, mpsc::Receiver<std::process::ExitStatus>) {
    let mut child =
        std::process::Command::new("sleep").arg("300").current_dir(cwd).process_group(0).spawn().unwrap();
    let pgid = i32::try_from(child.id()).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait().unwrap();
        tx.send(status).unwrap();
    });
    (pgid, rx)
}

fn kill_group(pgid: i32) {
    let pid = rustix::process::Pid::from_raw(pgid).unwrap();
    rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_process_group_is_stopped_only_if_provably_ours() {
    type Mangle = fn(ProcessStamp) -> ProcessStamp;
    let cases: [(&str, Mangle, bool); 3] = [
        ("a wrong start time", |s| ProcessStamp { start_time: s.start_time + 1, ..s }, true),
        (
            "another boot",
            |s| ProcessStamp { boot_id: "00000000-0000-0000-0000-000000000000".into(), ..s },
            true,
        ),
        // The control: the exact stamp is ours, so it is stopped.
        ("the exact stamp", |s| s, false),
    ];
    for (what, mangle, survives) in cases {
        let env = Env::new();
        let (pgid, exited) = foreign_sleeper(&env.out);
        let stamp = mangle(ProcessStamp::capture(pgid).unwrap());
        {
            let state = State::open(&env.data.join("state")).unwrap();
            let rec = AppRecord { service: Some(stamp), ..AppRecord::default() };
            state.put_app("ghost", &rec).unwrap();
            state.flush().unwrap();
        }
        let exec = env.open(env.config(&[&env.key])).await;
        if survives {
            // `recover` has returned: whatever it was going to signal, it has.
            assert!(exited.try_recv().is_err(), "{what}: a foreign process group was signalled");
            kill_group(pgid);
            let status = exited.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(status.signal(), Some(9), "{what}");
        } else {
            let status = exited.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(
                status.signal(),
                Some(15),
                "{what}: the agent's own orphan was not stopped with SIGTERM"
            );
        }
        env.finish(exec).await;
    }
}

/// The variables in an `env` dump.
fn dump(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_see_only_their_variables() {
    let env = Env::new();
    let mut cfg = env.config(&[&env.key]);
    cfg.vars =
        [("PORT", "18080"), ("OTHER_SECRET", "hunter2")].map(|(k, v)| (k.to_owned(), v.to_owned())).into();
    let exec = env.open(cfg).await;
    let out = env.out.display();
    let toml = format!(
        "[service]\ncommand = [\"bin/svc\", \"${{PORT}}\"]\nstop_timeout = \"5s\"\n\
         [hooks]\npost_activate = [\"sh\", \"-c\", \"env > {out}/hook.env\"]\n\
         [health]\nexec = [\"sh\", \"-c\", \"env > {out}/health.env\"]\ninterval = \"50ms\"\nsuccesses = 1\ndeadline = \"30s\"\n"
    );
    let svc =
        format!("#!/bin/sh\nenv > {out}/svc.env.tmp && mv {out}/svc.env.tmp {out}/svc.env\nexec sleep 300\n");
    env.deploy(&exec, &env.key, "envapp", "1.0.0", &toml, &[("bin/svc", svc)]).await;
    let svc_env = env.out.join("svc.env");
    eventually("the service dumped its environment", Duration::from_secs(20), || svc_env.exists()).await;

    // Names the test process has that no child may inherit; sh sets PWD, SHLVL and `_` itself.
    let parent_only: BTreeSet<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            !INHERITED_ENV.contains(&k.as_str()) && !["PWD", "SHLVL", "_", "OLDPWD"].contains(&k.as_str())
        })
        .collect();
    assert!(!parent_only.is_empty(), "the test process has no variable outside the allowlist to check with");
    for name in ["svc.env", "hook.env", "health.env"] {
        let vars = dump(&env.out.join(name));
        assert_eq!(vars.get("PORT").map(String::as_str), Some("18080"), "{name}: {vars:?}");
        assert_eq!(vars.get("CONVOY_APP").map(String::as_str), Some("envapp"), "{name}: {vars:?}");
        assert_eq!(vars.get("CONVOY_VERSION").map(String::as_str), Some("1.0.0"), "{name}: {vars:?}");
        assert!(!vars.contains_key("OTHER_SECRET"), "{name}: another variable leaked: {vars:?}");
        assert!(!vars.values().any(|v| v.contains("hunter2")), "{name}: a secret value leaked: {vars:?}");
        let leaked: Vec<&String> = parent_only.iter().filter(|k| vars.contains_key(*k)).collect();
        assert!(leaked.is_empty(), "{name}: inherited from the agent's environment: {leaked:?}");
    }
    env.finish(exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_hooks_and_health_checks_run_as_the_declared_user() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test switches users and must run as root (CI does); run it as root"
    );
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("the host has a `nobody` user");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_ne!(uid, 0);
    let env = Env::new();
    // The data dir as enrollment leaves it: private to the agent.
    std::fs::create_dir(&env.data).unwrap();
    set_mode(&env.data, 0o700);
    let exec = env.open(env.config(&[&env.key])).await;

    let (out, data) = (env.out.display(), env.data.display());
    let probe =
        |name: &str| format!("[\"sh\", \"-c\", \"id -u > {out}/{name}.uid; id -G > {out}/{name}.groups\"]");
    let toml = format!(
        "[service]\ncommand = [\"bin/svc\"]\nuser = \"nobody\"\nstop_timeout = \"5s\"\n\
         [hooks]\npre_activate = {}\npost_activate = [\"sh\", \"-c\", \"ls {data}/state > /dev/null 2>&1; echo $? > {out}/ls-state.rc; cat {data}/cache/* > /dev/null 2>&1; echo $? > {out}/cat-cache.rc\"]\n\
         [health]\nexec = {}\ninterval = \"50ms\"\nsuccesses = 1\ndeadline = \"30s\"\n",
        probe("pre"),
        probe("health"),
    );
    let svc = format!("#!/bin/sh\nid -G > {out}/svc.groups\nid -u > {out}/svc.uid.tmp && mv {out}/svc.uid.tmp {out}/svc.uid\nexec sleep 300\n");
    env.install(&exec, &env.key, "asnobody", "1.0.0", &toml, &[("bin/svc", svc)]).await;
    let r = env.order(&exec, activate("asnobody", "1.0.0", 0)).await;
    expect(&r, OrderOutcome::Applied, "");
    let svc_uid = env.out.join("svc.uid");
    eventually("the service wrote its uid", Duration::from_secs(20), || svc_uid.exists()).await;

    for name in ["pre", "health", "svc"] {
        let got = std::fs::read_to_string(env.out.join(format!("{name}.uid"))).unwrap();
        assert_eq!(got.trim(), uid.to_string(), "{name} ran as the wrong user");
        let groups = std::fs::read_to_string(env.out.join(format!("{name}.groups"))).unwrap();
        assert_eq!(groups.split_whitespace().collect::<Vec<_>>(), [gid.to_string()], "{name}: groups");
    }
    assert_eq!(uid, 65534, "nobody is 65534 on the hosts this runs on");
    // What the service user can reach stops at its release: the state and the cache stay
    // private.
    for rc in ["ls-state.rc", "cat-cache.rc"] {
        let code = std::fs::read_to_string(env.out.join(rc)).unwrap();
        assert_ne!(code.trim(), "0", "{rc}: the service user read the agent's private files");
    }
    assert_eq!(mode_of(&env.data) & 0o077, 0o011, "the data dir is traversable, not listable");
    for private in ["state", "cache"] {
        assert_eq!(mode_of(&env.data.join(private)) & 0o077, 0, "{private} is private");
    }
    assert_eq!(mode_of(&env.data.join("apps/asnobody/logs")) & 0o007, 0, "logs are not world-readable");
    env.finish(exec).await;
}
