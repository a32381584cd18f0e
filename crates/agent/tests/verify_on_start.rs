//! Kept releases are re-verified wherever they start: against the trust set in force now (a key
//! removed from the trust set takes its releases with it) and against their signed manifest (a
//! tampered staged tree is refused before the switch, and the running release keeps running).

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use convoy_bundle::SecretKey;
use convoy_proto::v1 as pb;
use pb::OrderOutcome;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_key_left_the_trust_set_does_not_start() {
    let env = Env::new();
    let (k1, k2) = (SecretKey::generate(), SecretKey::generate());
    let exec = env.open(env.config(&[&k1, &k2])).await;
    env.deploy(&exec, &k1, "svc", "1.0.0", &service_toml(""), &[("bin/svc", env.sleeper("svc-1.0.0"))]).await;
    env.deploy(&exec, &k2, "svc", "2.0.0", &service_toml(""), &[("bin/svc", env.sleeper("svc-2.0.0"))]).await;
    env.finish(exec).await;

    // Trusting only K2: 2.0.0 starts again, 1.0.0 (signed by K1) cannot be rolled back to.
    let starts_v2 = env.starts("svc-2.0.0");
    let exec = env.open(env.config(&[&k2])).await;
    let v2 = env.release_dir("svc", "2.0.0");
    eventually("2.0.0's service runs again", Duration::from_secs(20), || {
        env.service_pid("svc-2.0.0").is_some()
    })
    .await;
    assert_eq!(env.starts("svc-2.0.0"), starts_v2 + 1);
    let pid = env.service_pid("svc-2.0.0");
    let starts_v1 = env.starts("svc-1.0.0");
    for to in ["1.0.0", ""] {
        let r = env.order(&exec, rollback("svc", "2.0.0", to, "key rotation test")).await;
        expect(&r, OrderOutcome::Refused, "release");
        assert!(r.message.contains("not trusted"), "{}", r.message);
        assert!(r.message.contains("svc@1.0.0"), "{}", r.message);
        assert_eq!(current(&env.data, "svc").as_deref(), Some("2.0.0"));
        assert_eq!(env.service_pid("svc-2.0.0"), pid, "2.0.0's service was disturbed");
        assert_eq!(env.starts("svc-1.0.0"), starts_v1, "1.0.0's service was started");
    }
    env.finish(exec).await;

    // Trusting only K1: 2.0.0 is current but no longer trusted, so it is not started, and the
    // app reports why.
    let starts_v2 = env.starts("svc-2.0.0");
    let exec = env.open(env.config(&[&k1])).await;
    assert!(env.processes_in(&v2).is_empty(), "an untrusted release was started");
    assert_eq!(env.starts("svc-2.0.0"), starts_v2, "an untrusted release was started");
    assert_eq!(current(&env.data, "svc").as_deref(), Some("2.0.0"));
    let status = exec.status("svc");
    assert!(status.last_error.contains("not trusted"), "{status:?}");
    assert!(status.last_error.contains("svc@2.0.0"), "{status:?}");
    assert_eq!(status.health, pb::Health::Unhealthy as i32, "{status:?}");
    env.finish(exec).await;
}

/// Ways to tamper with a staged release's `bin/svc`.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    Content,
    FileAdded,
    Mode,
    ReplacedByLink,
}

impl Tamper {
    const ALL: [Self; 4] = [Self::Content, Self::FileAdded, Self::Mode, Self::ReplacedByLink];

    fn apply(self, dir: &Path) {
        let svc = dir.join("bin/svc");
        match self {
            Self::Content => std::fs::write(&svc, b"#!/bin/sh\necho owned\n").unwrap(),
            Self::FileAdded => std::fs::write(dir.join("bin/extra"), "planted").unwrap(),
            Self::Mode => set_mode(&svc, 0o777),
            Self::ReplacedByLink => {
                std::fs::remove_file(&svc).unwrap();
                std::os::unix::fs::symlink("/bin/sh", &svc).unwrap();
            }
        }
    }

    fn undo(self, dir: &Path, original: &[u8]) {
        let svc = dir.join("bin/svc");
        match self {
            Self::FileAdded => std::fs::remove_file(dir.join("bin/extra")).unwrap(),
            Self::Content | Self::Mode | Self::ReplacedByLink => {
                std::fs::remove_file(&svc).unwrap();
                std::fs::write(&svc, original).unwrap();
                set_mode(&svc, 0o755);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_staged_release_is_refused_and_the_running_one_keeps_running() {
    let env = Env::new();
    let exec = env.open(env.config(&[&env.key])).await;
    env.deploy(&exec, &env.key, "tam", "1.0.0", &service_toml(""), &[("bin/svc", env.sleeper("tam-1.0.0"))])
        .await;
    env.install(&exec, &env.key, "tam", "2.0.0", &service_toml(""), &[("bin/svc", env.sleeper("tam-2.0.0"))])
        .await;
    let v2 = env.release_dir("tam", "2.0.0");
    let pid = env.service_pid("tam-1.0.0");
    assert!(pid.is_some());

    let original = std::fs::read(v2.join("bin/svc")).unwrap();
    for what in Tamper::ALL {
        what.apply(&v2);
        let r = env.order(&exec, activate("tam", "2.0.0", 0)).await;
        expect(&r, OrderOutcome::Refused, "release");
        assert!(r.message.contains("corrupted"), "{what:?}: {}", r.message);
        assert_eq!(current(&env.data, "tam").as_deref(), Some("1.0.0"), "{what:?}");
        assert_eq!(env.service_pid("tam-1.0.0"), pid, "{what:?}: 1.0.0's service was disturbed");
        assert_eq!(env.starts("tam-2.0.0"), 0, "{what:?}: the tampered release ran");
        assert_eq!(env.starts("tam-1.0.0"), 1, "{what:?}: 1.0.0 was restarted");
        let status = exec.status("tam");
        assert_eq!((status.current.as_str(), status.busy), ("1.0.0", false), "{what:?}");
        what.undo(&v2, &original);
    }

    // Untampered, the same release activates: the refusals were the tampering's doing.
    let r = env.order(&exec, activate("tam", "2.0.0", 0)).await;
    expect(&r, OrderOutcome::Applied, "");
    assert_eq!(current(&env.data, "tam").as_deref(), Some("2.0.0"));
    assert_eq!(env.service_pid("tam-1.0.0"), None);
    assert!(env.service_pid("tam-2.0.0").is_some());
    assert_eq!(env.starts("tam-2.0.0"), 1);
    env.finish(exec).await;
}
