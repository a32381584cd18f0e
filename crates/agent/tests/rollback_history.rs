//! Rollbacks only go back, a repeated rollback is "already rolled back", stale orders change
//! nothing, and admission by sequence number is decided on arrival, not on completion.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use convoy_proto::v1 as pb;
use pb::OrderOutcome;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollbacks_walk_history_backwards_and_never_flip_flop() {
    let env = Env::new();
    let exec = env.open(env.config(&[&env.key])).await;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        let svc = env.sleeper(&format!("web-{v}"));
        env.deploy(&exec, &env.key, "web", v, &service_toml(""), &[("bin/svc", svc)]).await;
    }
    let running = |v: &str| env.service_pid(&format!("web-{v}")).is_some();
    assert!(running("3.0.0"));

    let r = env.order(&exec, rollback("web", "3.0.0", "", "bad deploy")).await;
    expect(&r, OrderOutcome::Applied, "");
    assert_eq!(current(&env.data, "web").as_deref(), Some("2.0.0"));
    assert_eq!(r.status.as_ref().unwrap().current, "2.0.0");
    assert!(running("2.0.0") && !running("3.0.0"));

    // The same rollback again (a retry, a second alert): nothing changes.
    let r = env.order(&exec, rollback("web", "3.0.0", "", "bad deploy")).await;
    expect(&r, OrderOutcome::AlreadyInState, "");
    assert!(r.message.contains("already rolled back from"), "{}", r.message);
    assert_eq!(current(&env.data, "web").as_deref(), Some("2.0.0"));

    // One more step back goes to 1.0.0, never forward to 3.0.0.
    let r = env.order(&exec, rollback("web", "2.0.0", "", "still bad")).await;
    expect(&r, OrderOutcome::Applied, "");
    assert_eq!(current(&env.data, "web").as_deref(), Some("1.0.0"));
    assert!(running("1.0.0") && !running("2.0.0") && !running("3.0.0"));

    // Nothing older than the first release.
    let r = env.order(&exec, rollback("web", "1.0.0", "", "and again")).await;
    expect(&r, OrderOutcome::Refused, "from_version");
    assert_eq!(current(&env.data, "web").as_deref(), Some("1.0.0"));
    assert!(running("1.0.0"));

    // A named target is honoured.
    let r = env.order(&exec, rollback("web", "1.0.0", "3.0.0", "operator's choice")).await;
    expect(&r, OrderOutcome::Applied, "");
    assert_eq!(current(&env.data, "web").as_deref(), Some("3.0.0"));
    assert!(running("3.0.0") && !running("1.0.0"));

    // Stale: a sequence number not above the last one admitted is ignored, whatever it asks.
    let last = exec.last_seq();
    let status_before = exec.status("web");
    let starts_before = env.starts("web-1.0.0");
    for seq in [last, last - 1, 1] {
        let r =
            submit(&exec, pb::Order { seq, kind: Some(rollback("web", "3.0.0", "1.0.0", "replay")) }).await;
        expect(&r, OrderOutcome::Stale, "");
        assert_eq!(r.agent_last_seq, last);
        let r = submit(&exec, pb::Order { seq, kind: Some(activate("web", "1.0.0", 0)) }).await;
        expect(&r, OrderOutcome::Stale, "");
        assert_eq!(current(&env.data, "web").as_deref(), Some("3.0.0"));
        assert_eq!(exec.last_seq(), last);
    }
    assert_eq!(exec.status("web"), status_before);
    assert_eq!(env.starts("web-1.0.0"), starts_before, "a stale order started a service");
    assert!(running("3.0.0"));

    env.finish(exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_queued_behind_a_health_gate_is_not_stale_when_a_later_one_finishes_first() {
    let env = Env::new();
    let exec = env.open(env.config(&[&env.key])).await;
    // App A's health check passes only once the test opens the gate.
    let gate = env.out.join("gate-open");
    let slow_toml = format!(
        "[health]\nexec = [\"test\", \"-f\", \"{}\"]\ninterval = \"50ms\"\ntimeout = \"5s\"\nsuccesses = 1\ndeadline = \"120s\"\n",
        gate.display()
    );
    env.install(&exec, &env.key, "slow", "1.0.0", &slow_toml, &[]).await;
    env.install(&exec, &env.key, "fast", "1.0.0", HEALTHY, &[]).await;

    let n = env.next_seq();
    let a1 = submit_pending(&exec, pb::Order { seq: n, kind: Some(activate("slow", "1.0.0", 0)) });
    eventually("app A is in its health gate", Duration::from_secs(20), || exec.status("slow").busy).await;
    // Queued behind A's gate.
    let a2 = submit_pending(&exec, pb::Order { seq: n + 1, kind: Some(activate("slow", "1.0.0", 0)) });
    // App B's order is newer and completes while A still waits.
    let b = submit(&exec, pb::Order { seq: n + 2, kind: Some(activate("fast", "1.0.0", 0)) }).await;
    expect(&b, OrderOutcome::Applied, "");
    assert_eq!(current(&env.data, "fast").as_deref(), Some("1.0.0"));
    assert!(exec.status("slow").busy, "app A's gate ended before the test opened it");
    assert_eq!(exec.last_seq(), n + 2);

    std::fs::write(&gate, "").unwrap();
    let a1 = a1.wait().await;
    expect(&a1, OrderOutcome::Applied, "");
    let a2 = a2.wait().await;
    expect(&a2, OrderOutcome::AlreadyInState, "");
    assert_eq!(current(&env.data, "slow").as_deref(), Some("1.0.0"));
    // Every order was admitted once; the agent's number is the newest.
    assert_eq!(exec.last_seq(), n + 2);
    assert_eq!(a2.agent_last_seq, n + 2);

    env.finish(exec).await;
}
