//! The driver over a real store and a fake fleet: orders in flight, persistence, controls,
//! and resuming from the stored step.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::logic::rollouts::testing::{controller, eventually, is_activate, is_rollback, FakeFleet};
use crate::logic::rollouts::{plan, AgentStep, Desired, RolloutSpec, RolloutState};

const FIVE: [&str; 5] = ["a", "b", "c", "d", "e"];

/// Stores a new rollout of shop-api@1.1.0 over `agents` (all in eu-west).
async fn new_rollout(ctl: &Rollouts, spec: RolloutSpec, agents: &[&str]) -> String {
    let targets: Vec<(String, String)> =
        agents.iter().map(|a| ("eu-west".to_string(), a.to_string())).collect();
    let r = plan::new_rollout("ro-7".into(), spec, "sha256:d".into(), "admin/test", now(), &targets);
    ctl.save(&r).await.unwrap();
    r.id
}

async fn stored(ctl: &Rollouts, id: &str) -> Rollout {
    ctl.rollout(Some(id.into())).await.unwrap()
}

async fn until(ctl: &Rollouts, id: &str, what: &str, pred: impl Fn(&Rollout) -> bool) -> Rollout {
    eventually(what, || async {
        let r = stored(ctl, id).await;
        pred(&r).then_some(r)
    })
    .await
}

fn steps(r: &Rollout) -> Vec<(&str, AgentStep)> {
    r.agents.values().map(|p| (p.id.as_str(), p.step)).collect()
}

#[tokio::test]
async fn no_more_than_max_parallel_activations_are_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let fleet = FakeFleet::new(&FIVE, "1.0.0");
    for a in fleet.state().agents.values_mut() {
        a.hold = true;
    }
    let spec =
        RolloutSpec { canary: 0, waves: vec![100], max_parallel: 2, ..RolloutSpec::new("shop-api", "1.1.0") };
    let id = new_rollout(&ctl, spec, &FIVE).await;
    let done = ctl.spawn_driver_with(fleet.clone(), id.clone(), CancellationToken::new());
    // Two activations go out and are held; the record shows exactly those two.
    eventually("two activations held", || async { (fleet.state().activating.len() == 2).then_some(()) })
        .await;
    let r = stored(&ctl, &id).await;
    let activating: Vec<&str> =
        r.agents.values().filter(|p| p.step == AgentStep::Activating).map(|p| p.id.as_str()).collect();
    assert_eq!(activating, ["a", "b"], "{:?}", steps(&r));
    assert_eq!(fleet.sent(is_activate), ["a", "b"]);
    // An answer lets exactly one more go.
    fleet.release("a");
    eventually("c activating", || async { fleet.state().activating.contains("c").then_some(()) }).await;
    assert_eq!(fleet.state().activating.iter().collect::<Vec<_>>(), ["b", "c"]);
    assert_eq!(fleet.sent(is_activate), ["a", "b", "c"]);
    fleet.release_all();
    let r = until(&ctl, &id, "completed", |r| r.state.is_final()).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(fleet.state().peak, 2);
    done.await.unwrap();
}

#[tokio::test]
async fn a_restarted_driver_resumes_mid_wave_from_the_stored_step() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let fleet = FakeFleet::new(&FIVE, "1.0.0");
    for held in ["c", "d"] {
        fleet.state().agents.get_mut(held).unwrap().hold = true;
    }
    let spec =
        RolloutSpec { canary: 1, waves: vec![100], max_parallel: 2, ..RolloutSpec::new("shop-api", "1.1.0") };
    let id = new_rollout(&ctl, spec, &FIVE).await;
    let stop = CancellationToken::new();
    let first = ctl.spawn_driver_with(fleet.clone(), id.clone(), stop.clone());
    let r = until(&ctl, &id, "c and d activating, a and b healthy", |r| {
        let s = |a: &str| r.agents[a].step;
        (s("a"), s("b"), s("c"), s("d"))
            == (AgentStep::Healthy, AgentStep::Healthy, AgentStep::Activating, AgentStep::Activating)
    })
    .await;
    assert_eq!(r.agents["e"].step, AgentStep::Staged);
    // The controller stops with two activations unanswered.
    stop.cancel();
    first.await.unwrap();
    assert!(ctl.control(&id, Control::Pause).await.is_err(), "no driver runs");
    fleet.state().sent.clear();
    fleet.release_all();
    let second = ctl.spawn_driver_with(fleet.clone(), id.clone(), CancellationToken::new());
    let r = until(&ctl, &id, "completed", |r| r.state.is_final()).await;
    second.await.unwrap();
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(fleet.sent(is_activate), ["c", "d", "e"], "a and b were done: not sent again");
    assert_eq!(fleet.sent(|o| matches!(o, OrderKind::Install { .. })), ["c", "d", "e"], "no re-staging");
    assert!(r
        .agents
        .values()
        .all(|p| p.step == AgentStep::Healthy && p.previous.as_deref() == Some("1.0.0")));
}

#[tokio::test]
async fn a_record_written_by_an_earlier_build_resumes_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let raw = include_bytes!("../testdata/rollout-running-v1.json").trim_ascii_end().to_vec();
    let store = ctl.store().clone();
    tokio::task::spawn_blocking(move || store.put_raw_for_test(Tree::Rollouts, "ro-42", &raw))
        .await
        .unwrap()
        .unwrap();
    // Its bake is two minutes; the test does not wait that long.
    let mut r = stored(&ctl, "ro-42").await;
    r.spec.bake = Duration::from_millis(20);
    ctl.save(&r).await.unwrap();
    let fleet = FakeFleet::new(&["us-0", "us-1"], "1.1.0");
    for a in ["eu-0", "eu-1", "eu-2", "eu-3"] {
        let agent = crate::logic::rollouts::testing::FakeAgent {
            online: a != "eu-3",
            running: Some("1.0.0".into()),
            ..Default::default()
        };
        fleet.state().agents.insert(a.into(), agent);
    }
    ctl.spawn_driver_with(fleet.clone(), "ro-42".into(), CancellationToken::new()).await.unwrap();
    let r = stored(&ctl, "ro-42").await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(fleet.sent(is_activate), ["eu-0", "eu-1", "eu-2"], "wave 3 from where it was, then wave 4");
    assert_eq!(r.agents["eu-3"].step, AgentStep::Offline);
    assert_eq!(r.converging, ["eu-3"]);
    assert_eq!(
        r.events.last().unwrap().message,
        "completed: 5 of 6 targeted agent(s) run the release; 1 offline or unreachable (eu-3), converging when they reconnect"
    );
    let store = ctl.store().clone();
    let desired: Option<Desired> =
        tokio::task::spawn_blocking(move || store.get(Tree::Desired, "shop-api/eu-3"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(desired.map(|d| d.version).as_deref(), Some("1.1.0"), "the unreachable agent converges later");
}

#[tokio::test]
async fn a_pause_is_acknowledged_once_stored_and_holds_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let fleet = FakeFleet::new(&FIVE[..3], "1.0.0");
    fleet.state().agents.get_mut("a").unwrap().hold = true;
    let spec = RolloutSpec { canary: 1, waves: vec![100], ..RolloutSpec::new("shop-api", "1.1.0") };
    let id = new_rollout(&ctl, spec, &FIVE[..3]).await;
    let done = ctl.spawn_driver_with(fleet.clone(), id.clone(), CancellationToken::new());
    until(&ctl, &id, "the canary activating", |r| r.agents["a"].step == AgentStep::Activating).await;
    ctl.control(&id, Control::Pause).await.unwrap();
    assert_eq!(stored(&ctl, &id).await.state, RolloutState::Paused, "acknowledged once stored");
    // The canary's answer is taken in; nothing more goes out while paused.
    fleet.release_all();
    let r = until(&ctl, &id, "the canary healthy", |r| r.agents["a"].step == AgentStep::Healthy).await;
    assert_eq!(r.state, RolloutState::Paused);
    assert_eq!(fleet.sent(is_activate), ["a"]);
    ctl.control(&id, Control::Resume).await.unwrap();
    let r = until(&ctl, &id, "completed", |r| r.state.is_final()).await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
    assert_eq!(fleet.sent(is_activate), ["a", "b", "c"]);
    done.await.unwrap();
}

#[tokio::test]
async fn an_abort_is_acknowledged_once_every_moved_agent_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let fleet = FakeFleet::new(&FIVE[..3], "1.0.0");
    let spec = RolloutSpec {
        canary: 1,
        waves: vec![100],
        bake: Duration::from_secs(600),
        ..RolloutSpec::new("shop-api", "1.1.0")
    };
    let id = new_rollout(&ctl, spec, &FIVE[..3]).await;
    let done = ctl.spawn_driver_with(fleet.clone(), id.clone(), CancellationToken::new());
    until(&ctl, &id, "the canary baking", |r| r.events.iter().any(|e| e.message.starts_with("baking"))).await;
    ctl.control(&id, Control::Abort).await.unwrap();
    let r = stored(&ctl, &id).await;
    assert_eq!(r.state, RolloutState::Aborted);
    assert_eq!(fleet.sent(is_rollback), ["a"]);
    assert_eq!(fleet.state().agents["a"].running.as_deref(), Some("1.0.0"));
    assert_eq!(r.agents["a"].step, AgentStep::RolledBack);
    assert!(ctl.control(&id, Control::Resume).await.is_err(), "an ended rollout takes no control");
    done.await.unwrap();
}
