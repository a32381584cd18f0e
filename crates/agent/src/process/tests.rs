use std::os::unix::fs::PermissionsExt;

use super::*;

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// The tests that switch users need root, which CI has. Without it they must fail, not
/// silently pass.
fn require_root() {
    assert!(rustix::process::geteuid().is_root(), "this test switches users and must run as root (CI does)");
}

#[test]
fn stat_is_parsed_after_the_last_parenthesis() {
    let rest = "S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
    for comm in ["sleep", "a b", "x) (y", "(()", ") 7 7 7"] {
        let text = format!("4242 ({comm}) {rest}");
        assert_eq!(parse_stat(&text), Some(Stat { pgrp: 4242, start_time: 987654 }), "{comm}");
    }
    assert_eq!(parse_stat("4242 no parenthesis"), None);
    assert_eq!(parse_stat("4242 (short) S 1 2"), None);
    assert_eq!(parse_stat("4242 (bad) S 1 notanumber 2"), None);
}

fn sleeper() -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new("sleep");
    cmd.arg("30").process_group(0).kill_on_drop(true);
    cmd.spawn().unwrap()
}

#[tokio::test]
async fn only_a_provably_own_group_is_stopped() {
    let mut child = sleeper();
    let pgid = i32::try_from(child.id().unwrap()).unwrap();
    let stamp = ProcessStamp::capture(pgid).unwrap();
    assert_eq!(stamp.pgid, pgid);
    assert!(stamp.still_ours());

    let wrong_time = ProcessStamp { start_time: stamp.start_time + 1, ..stamp.clone() };
    assert!(!wrong_time.still_ours());
    let outcome = stop_stamped_group(&wrong_time, Signal::TERM, Duration::from_secs(5)).await;
    assert_eq!(outcome, StopOutcome::NotOurs);
    assert!(child.try_wait().unwrap().is_none(), "a stranger's group was signalled");

    let wrong_boot = ProcessStamp { boot_id: "00000000-0000-0000-0000-000000000000".into(), ..stamp.clone() };
    assert!(!wrong_boot.still_ours());
    let outcome = stop_stamped_group(&wrong_boot, Signal::TERM, Duration::from_secs(5)).await;
    assert_eq!(outcome, StopOutcome::NotOurs);
    assert!(child.try_wait().unwrap().is_none(), "a group from another boot was signalled");

    // The child is reaped concurrently, as an orphan would be by init, so the group ends.
    let (outcome, status) =
        tokio::join!(stop_stamped_group(&stamp, Signal::TERM, Duration::from_secs(10)), child.wait());
    assert_eq!(outcome, StopOutcome::Stopped);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.unwrap().signal(), Some(Signal::TERM.as_raw()));

    // Once the leader is gone the number proves nothing any more.
    assert_eq!(stop_stamped_group(&stamp, Signal::TERM, Duration::from_secs(1)).await, StopOutcome::Gone);
}

#[tokio::test]
async fn a_group_that_ignores_its_signal_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut cmd = tokio::process::Command::new("sh");
    // The shell ignores TERM (its `sleep` inherits that) and says when it is set up.
    let script = format!("trap '' TERM; sleep 30 & touch {}; wait", ready.display());
    cmd.args(["-c", &script]).process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let pgid = i32::try_from(child.id().unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the shell never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stamp = ProcessStamp::capture(pgid).unwrap();
    let (outcome, status) =
        tokio::join!(stop_stamped_group(&stamp, Signal::TERM, Duration::from_millis(300)), async {
            let status = child.wait().await;
            // The orphaned `sleep` is reparented away from this test; wait for the group.
            while group_alive(pgid) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            status
        });
    assert_eq!(outcome, StopOutcome::Killed);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.unwrap().signal(), Some(Signal::KILL.as_raw()));
}

#[tokio::test]
async fn children_get_only_allowlisted_variables_and_their_own() {
    // Variables this test process has (cargo sets several for every test binary) that
    // are not on the allowlist: none of them may reach the child.
    let parent_only: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| !INHERITED_ENV.contains(&k.as_str()))
        .collect();
    assert!(!parent_only.is_empty(), "the test process has variables outside the allowlist");
    assert!(std::env::var_os("PATH").is_some(), "the test environment has a PATH");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let log = Log::new(dir.path().join("logs/1.0.0.log"), 1 << 20);
    let env = vec![("FROM_RELEASE".to_owned(), "yes".to_owned())];
    let script = format!("env > {}", out.display());
    run_hook("env", &argv(&["sh", "-c", &script]), dir.path(), &env, Duration::from_secs(10), &log, None)
        .await
        .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    assert!(names.contains(&"FROM_RELEASE"), "{text}");
    assert!(names.contains(&"PATH"), "{text}");
    for name in &parent_only {
        // The shell sets PWD, SHLVL and `_` itself, whatever it inherits.
        if !["PWD", "SHLVL", "_"].contains(&name.as_str()) {
            assert!(!names.contains(&name.as_str()), "{name} leaked from the agent into {text}");
        }
    }
    for name in names {
        // The shell itself adds PWD, SHLVL and `_`; everything else came from the allowlist
        // or the release.
        assert!(
            INHERITED_ENV.contains(&name) || ["FROM_RELEASE", "PWD", "SHLVL", "_"].contains(&name),
            "unexpected variable {name} in {text}"
        );
    }
}

#[tokio::test]
async fn a_hook_runs_as_nobody_without_supplementary_groups() {
    require_root();
    let nobody = tokio::task::spawn_blocking(|| RunAs::resolve("nobody", None)).await.unwrap().unwrap();
    assert_eq!(nobody.uid, 65534);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = dir.path().join("id.txt");
    let log = Log::new(dir.path().join("logs/1.0.0.log"), 1 << 20);
    let script = format!("echo $(id -u) $(id -g) $(id -G) > {}", out.display());
    run_hook(
        "whoami",
        &argv(&["sh", "-c", &script]),
        dir.path(),
        &[],
        Duration::from_secs(10),
        &log,
        Some(&nobody),
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let want = format!("65534 {gid} {gid}", gid = nobody.gid);
    assert_eq!(text.trim(), want, "uid, gid and groups of the hook");
}

#[tokio::test]
async fn a_service_runs_as_the_requested_user() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = dir.path().join("uid.txt");
    let spec = ServiceSpec {
        argv: argv(&["sh", "-c", &format!("id -u > {}.tmp && mv {0}.tmp {0}; exec sleep 30", out.display())]),
        cwd: dir.path().to_path_buf(),
        env: vec![],
        stop_signal: Signal::TERM,
        stop_timeout: Duration::from_secs(5),
        run_as: Some(RunAs { uid: 65534, gid: 65534 }),
    };
    let sup = Supervised::start(spec, Log::new(dir.path().join("logs/svc.log"), 1 << 20));
    let mut stamp = sup.stamp.clone();
    let stamp = tokio::time::timeout(Duration::from_secs(10), stamp.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert!(stamp.still_ours());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !out.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the service never wrote its uid");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "65534");
    sup.stop().await;
    // A member killed on the way out (the shell's `mv`) is reaped by init, not by us: it
    // counts as alive until then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while group_alive(stamp.pgid) {
        assert!(tokio::time::Instant::now() < deadline, "the service's group outlived its stop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn identities_resolve_with_clear_errors() {
    let root = RunAs::resolve("root", None).unwrap();
    assert_eq!(root, RunAs { uid: 0, gid: 0 });
    assert_eq!(RunAs::resolve("0", Some("0")).unwrap(), root);
    assert_eq!(RunAs::resolve("nobody", Some("123")).unwrap().gid, 123);
    let err = RunAs::resolve("no-such-user-here", None).unwrap_err().to_string();
    assert_eq!(err, r#"user "no-such-user-here" does not exist"#);
    let err = RunAs::resolve("root", Some("no-such-group-here")).unwrap_err().to_string();
    assert_eq!(err, r#"group "no-such-group-here" does not exist"#);
    let err = RunAs::resolve("99999999999", None).unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
    // A uid without a passwd entry needs its group spelled out.
    let err = RunAs::resolve("4000000000", None).unwrap_err().to_string();
    assert!(err.contains("a group must be given"), "{err}");
    assert_eq!(RunAs::resolve("4000000000", Some("4000000000")).unwrap().uid, 4_000_000_000);
}

#[test]
fn only_root_switches_users() {
    let me = RunAs { uid: rustix::process::geteuid().as_raw(), gid: rustix::process::getegid().as_raw() };
    me.check_permitted().unwrap();
    if !rustix::process::geteuid().is_root() {
        let err = RunAs { uid: 0, gid: 0 }.check_permitted().unwrap_err().to_string();
        assert!(err.contains("not root"), "{err}");
    }
    let err = command_as(&[], Path::new("/"), &[], None).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

#[tokio::test]
async fn logs_are_not_world_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apps/shop/logs/1.0.0.log");
    let log = Log::new(path.clone(), 64);
    log.write(b"first line\n").await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().unwrap()), 0o750);
    assert_eq!(mode(&path), 0o640);
    // Rotation creates the new file with the same mode.
    log.write(&[b'x'; 60]).await;
    let mut rotated = path.clone().into_os_string();
    rotated.push(".1");
    assert_eq!(std::fs::read(&rotated).unwrap(), b"first line\n");
    assert_eq!(mode(&path), 0o640);
    // A log left by an older agent with wider permissions is tightened.
    let old = dir.path().join("apps/old/logs/1.0.0.log");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::set_permissions(old.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&old, "old\n").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    Log::new(old.clone(), 1 << 20).write(b"new\n").await;
    assert_eq!(mode(old.parent().unwrap()), 0o750);
    assert_eq!(mode(&old), 0o640);
}
