//! The machine alone: events in, record and commands out. A `Sim` plays the driver's part
//! (answers probes at once, remembers which orders are out) and checks, at every step, that the
//! record is persisted after the side effects it reports and before anything acts on it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use crate::logic::rollouts::{plan, RolloutSpec, StopKind, Threshold};

struct Sim {
    r: Rollout,
    now_ms: u128,
    offline: BTreeSet<String>,
    running: BTreeMap<String, String>,
    /// Orders out, as the commands sent them.
    out: BTreeMap<String, Order>,
    /// The most activations out at once.
    peak: usize,
}

fn spec(version: &str) -> RolloutSpec {
    RolloutSpec::new("shop-api", version)
}

impl Sim {
    /// A rollout of `spec` over agents `"<region>/<id>"`, each running 1.0.0.
    fn new(spec: RolloutSpec, agents: &[&str]) -> Self {
        let targets: Vec<(String, String)> = agents
            .iter()
            .map(|a| a.split_once('/').unwrap())
            .map(|(region, id)| (region.to_string(), id.to_string()))
            .collect();
        let running = targets.iter().map(|(_, id)| (id.clone(), "1.0.0".to_string())).collect();
        let r = plan::new_rollout("ro-1".into(), spec, "sha256:d1".into(), "admin/test", 1, &targets);
        Self { r, now_ms: 1_000, offline: BTreeSet::new(), running, out: BTreeMap::new(), peak: 0 }
    }

    /// Steps the machine, answering probes at once as the driver does.
    fn feed(&mut self, event: Event) -> Vec<Command> {
        let mut all = Vec::new();
        let mut queue = vec![event];
        while let Some(event) = queue.pop() {
            assert!(all.len() < 10_000, "the machine does not settle: {:?}", &all[..20]);
            self.now_ms += 1_000;
            let (next, commands) = step(&self.r, event, self.now_ms);
            check(&self.r, &next, &commands);
            self.r = next;
            for c in &commands {
                match c {
                    Command::Probe(agents) => queue.push(Event::Probed(
                        agents
                            .iter()
                            .map(|a| Probe {
                                agent: a.clone(),
                                online: !self.offline.contains(a),
                                running: self.running.get(a).cloned(),
                            })
                            .collect(),
                    )),
                    Command::Send { agent, order } => {
                        self.out.insert(agent.clone(), order.clone());
                    }
                    _ => {}
                }
            }
            all.extend(commands);
        }
        let activations = self.out.values().filter(|o| **o == Order::Activate).count();
        self.peak = self.peak.max(activations);
        all
    }

    fn reply(&mut self, agent: &str, reply: Reply) -> Vec<Command> {
        let order = self.out.remove(agent).unwrap_or_else(|| panic!("no order out to {agent}"));
        self.feed(Event::Answered { agent: agent.into(), order, reply })
    }

    /// Starts the rollout and answers every staging order.
    fn start(&mut self) -> Vec<Command> {
        let mut commands = self.feed(Event::Start);
        let staging: Vec<String> =
            self.out.iter().filter(|(_, o)| **o == Order::Stage).map(|(a, _)| a.clone()).collect();
        for a in staging {
            commands.extend(self.reply(&a, Reply::Done));
        }
        commands
    }

    /// Agents with an activation out.
    fn activating(&self) -> Vec<String> {
        self.out.iter().filter(|(_, o)| **o == Order::Activate).map(|(a, _)| a.clone()).collect()
    }

    /// Answers every activation out with `Done` until none is left (the rollout may bake).
    fn activate_all(&mut self) -> Vec<Command> {
        let mut commands = Vec::new();
        while let Some(a) = self.activating().first().cloned() {
            commands.extend(self.reply(&a, Reply::Done));
        }
        commands
    }

    fn step_of(&self, agent: &str) -> AgentStep {
        self.r.agents[agent].step
    }

    fn last_event(&self) -> &str {
        self.r.events.last().map(|e| e.message.as_str()).unwrap_or_default()
    }
}

/// What every step must satisfy: durable side effects, then the record, then actions; every
/// activation, rollback, bake and end is preceded by a persisted record.
fn check(before: &Rollout, after: &Rollout, commands: &[Command]) {
    let durable =
        |c: &Command| matches!(c, Command::MarkBad { .. } | Command::Complete | Command::Audit { .. });
    let persist = commands.iter().position(|c| *c == Command::Persist);
    match persist {
        Some(p) => {
            assert!(
                commands[..p].iter().all(durable),
                "only side effects the record reports go first: {commands:?}"
            );
            assert!(!commands[p + 1..].iter().any(durable), "side effects after the record: {commands:?}");
        }
        None => assert!(!commands.iter().any(durable), "side effects without the record: {commands:?}"),
    }
    let acts = commands.iter().any(|c| {
        matches!(
            c,
            Command::Send { order: Order::Activate | Order::RollBack { .. }, .. } | Command::StartBake { .. }
        )
    });
    let ended = after.state.is_final() && !before.state.is_final();
    if acts || ended || after.state != before.state || after.wave != before.wave {
        assert!(persist.is_some(), "acted before persisting: {commands:?}");
    }
    assert_eq!(commands.iter().filter(|c| **c == Command::Persist).count(), persist.map_or(0, |_| 1));
}

fn sends(commands: &[Command], want: fn(&Order) -> bool) -> Vec<String> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Send { agent, order } if want(order) => Some(agent.clone()),
            _ => None,
        })
        .collect()
}

fn activations(commands: &[Command]) -> Vec<String> {
    sends(commands, |o| *o == Order::Activate)
}

fn rollbacks(commands: &[Command]) -> Vec<String> {
    sends(commands, |o| matches!(o, Order::RollBack { .. }))
}

fn notified(commands: &[Command]) -> Vec<&'static str> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Notify { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

/// Nothing that acts on agents or moves the rollout.
fn inert(commands: &[Command]) -> bool {
    commands.iter().all(|c| matches!(c, Command::Persist | Command::Notify { .. }))
}

const FIVE: [&str; 5] = ["eu-west/a", "eu-west/b", "eu-west/c", "eu-west/d", "eu-west/e"];

#[test]
fn max_parallel_bounds_the_activations_in_flight_in_a_wave() {
    let mut sim =
        Sim::new(RolloutSpec { canary: 0, waves: vec![100], max_parallel: 2, ..spec("1.1.0") }, &FIVE);
    let first = sim.start();
    assert_eq!(activations(&first), ["a", "b"]);
    assert!(inert(&sim.feed(Event::Tick)), "no slot free: a tick sends nothing");
    let next = sim.reply("a", Reply::Done);
    assert_eq!(activations(&next), ["c"], "one answer frees one slot");
    sim.activate_all();
    assert_eq!(sim.r.state, RolloutState::Completed, "{:?}", sim.r.events);
    assert_eq!(sim.peak, 2);
    assert!(sim.r.agents.values().all(|p| p.step == AgentStep::Healthy && p.moved));

    // With room for all, the wave goes at once.
    let mut sim =
        Sim::new(RolloutSpec { canary: 0, waves: vec![100], max_parallel: 10, ..spec("1.1.0") }, &FIVE);
    assert_eq!(activations(&sim.start()).len(), 5);
    assert_eq!(sim.peak, 5);
}

#[test]
fn waves_go_one_after_another_and_offline_agents_free_their_slot() {
    let mut sim = Sim::new(RolloutSpec { canary: 1, waves: vec![50, 100], ..spec("1.1.0") }, &FIVE);
    sim.offline.insert("d".into());
    assert_eq!(activations(&sim.start()), ["a"], "the canary alone");
    assert_eq!(activations(&sim.reply("a", Reply::Done)), ["b", "c"], "wave 2: up to 50%");
    sim.reply("b", Reply::Done);
    let wave3 = sim.reply("c", Reply::Done);
    assert_eq!(activations(&wave3), ["e"], "d is offline: skipped, not sent");
    assert_eq!(sim.step_of("d"), AgentStep::Offline);
    assert!(notified(&wave3).contains(&"wave_done"));
    sim.reply("e", Reply::Done);
    assert_eq!(sim.r.state, RolloutState::Completed);
    assert_eq!(sim.r.wave, 3);
}

#[test]
fn a_pause_holds_until_resumed() {
    let s = RolloutSpec { canary: 0, waves: vec![100], max_parallel: 1, ..spec("1.1.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    assert_eq!(activations(&sim.start()), ["a"]);
    let paused = sim.feed(Event::Control(Control::Pause));
    assert_eq!(sim.r.state, RolloutState::Paused);
    assert!(paused.contains(&Command::Persist) && inert(&paused));
    // The activation in flight finishes; nothing else is sent, however long the pause.
    assert!(inert(&sim.reply("a", Reply::Done)));
    assert_eq!(sim.step_of("a"), AgentStep::Healthy);
    for _ in 0..5 {
        assert!(sim.feed(Event::Tick).is_empty());
    }
    assert!(sim.feed(Event::Control(Control::Pause)).is_empty(), "pausing what is paused changes nothing");
    assert_eq!((sim.step_of("b"), sim.step_of("c")), (AgentStep::Staged, AgentStep::Staged));
    let resumed = sim.feed(Event::Control(Control::Resume));
    assert_eq!(sim.r.state, RolloutState::Running);
    assert_eq!(activations(&resumed), ["b"]);
    sim.activate_all();
    assert_eq!(sim.r.state, RolloutState::Completed);
}

#[test]
fn a_pause_during_a_bake_stops_it_and_the_resume_bakes_again() {
    let s = RolloutSpec { canary: 1, waves: vec![100], bake: Duration::from_secs(60), ..spec("1.1.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    sim.start();
    let baking = sim.reply("a", Reply::Done);
    let first = baking.iter().find_map(|c| match c {
        Command::StartBake { bake, agents, duration } => Some((*bake, agents.clone(), *duration)),
        _ => None,
    });
    let (bake, agents, duration) = first.unwrap();
    assert_eq!((agents, duration), (vec!["a".to_string()], Duration::from_secs(60)));
    assert!(activations(&baking).is_empty(), "the next wave waits for the bake");
    let paused = sim.feed(Event::Control(Control::Pause));
    assert!(paused.contains(&Command::StopBake));
    assert!(sim.feed(Event::BakeFinished { bake }).is_empty(), "a stopped bake's end moves nothing");
    assert_eq!(sim.r.wave, 0);
    let resumed = sim.feed(Event::Control(Control::Resume));
    let again = resumed.iter().find_map(|c| match c {
        Command::StartBake { bake, .. } => Some(*bake),
        _ => None,
    });
    assert!(again.is_some_and(|b| b != bake), "{resumed:?}");
    assert!(!notified(&resumed).contains(&"wave_done"), "the wave is announced done once");
    let next = sim.feed(Event::BakeFinished { bake: again.unwrap() });
    assert_eq!(activations(&next), ["b", "c"]);
}

#[test]
fn a_wave_past_its_threshold_stops_and_rolls_back_every_moved_agent() {
    let s = RolloutSpec { canary: 1, waves: vec![100], max_failures: Threshold::Count(1), ..spec("2.0.0") };
    let mut sim = Sim::new(s, &FIVE);
    sim.start();
    assert_eq!(activations(&sim.reply("a", Reply::Done)), ["b", "c", "d", "e"]);
    assert!(
        rollbacks(&sim.reply("b", Reply::NotDone("failed: health".into()))).is_empty(),
        "1 failure is allowed"
    );
    let stopping = sim.reply("c", Reply::Error("no answer".into()));
    assert_eq!(sim.r.failure.as_deref(), Some("2 failure(s) in wave 2 of 2: over the failure threshold"));
    assert_eq!(notified(&stopping), ["rollout_failed"]);
    assert!(rollbacks(&stopping).is_empty(), "activations in flight finish first, to be rolled back too");
    assert!(sim.feed(Event::Tick).is_empty(), "nothing new is dispatched while stopping");
    sim.reply("d", Reply::Done);
    let rolling = sim.reply("e", Reply::NotDone("failed: health".into()));
    assert_eq!(rollbacks(&rolling), ["a", "b", "c", "d", "e"]);
    assert!(rolling
        .contains(&Command::Send { agent: "a".into(), order: Order::RollBack { to: Some("1.0.0".into()) } }));
    for a in ["a", "b", "c", "d"] {
        assert!(!sim.r.state.is_final());
        sim.reply(a, Reply::Done);
    }
    let end = sim.reply("e", Reply::NotDone("refused (from_version): not running 2.0.0".into()));
    assert_eq!(sim.r.state, RolloutState::RolledBack);
    let reason = "2 failure(s) in wave 2 of 2: over the failure threshold".to_string();
    assert_eq!(end[0], Command::MarkBad { reason: reason.clone() });
    let moved: Vec<String> = FIVE.iter().map(|a| a[8..].to_string()).collect();
    assert_eq!(end[1], Command::Audit { reason, agents: moved, outcome: "rolled back; release marked bad" });
    assert_eq!(notified(&end), ["rolled_back"]);
    assert_eq!(sim.step_of("d"), AgentStep::RolledBack);
    assert_eq!(sim.step_of("e"), AgentStep::Failed, "its rollback did not apply: it says so");
    assert!(sim
        .r
        .events
        .iter()
        .any(|e| e.message.contains("rollback of agent e (its own activation had failed)")));
    assert_eq!(sim.last_event(), "rolled back; shop-api@2.0.0 is marked bad");
}

#[test]
fn a_wave_turning_unhealthy_while_baking_fails_the_rollout() {
    let s = RolloutSpec { canary: 1, waves: vec![100], bake: Duration::from_secs(60), ..spec("2.0.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    sim.start();
    sim.reply("a", Reply::Done);
    assert!(sim.r.run.baking());
    let bake = sim.r.run.bakes;
    assert!(
        sim.feed(Event::Unhealthy { bake: bake + 7, agents: vec!["a".into()] }).is_empty(),
        "another bake's"
    );
    assert!(sim.feed(Event::Unhealthy { bake, agents: vec!["x".into()] }).is_empty(), "not of this wave");
    let failed = sim.feed(Event::Unhealthy { bake, agents: vec!["a".into()] });
    assert_eq!(sim.r.failure.as_deref(), Some("agent(s) a became unhealthy while baking"));
    assert!(failed.contains(&Command::StopBake));
    assert_eq!(rollbacks(&failed), ["a"]);
    assert!(sim.feed(Event::BakeFinished { bake }).is_empty(), "the bake is over");
    let end = sim.reply("a", Reply::Done);
    assert_eq!(sim.r.state, RolloutState::RolledBack);
    assert!(matches!(end[0], Command::MarkBad { .. }));
    assert_eq!(
        (sim.step_of("b"), sim.r.agents["b"].moved),
        (AgentStep::Staged, false),
        "wave 2 never started"
    );
}

#[test]
fn an_abort_rolls_back_moved_and_activating_agents_at_once() {
    let s = RolloutSpec { canary: 1, waves: vec![100], ..spec("1.1.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    sim.start();
    assert_eq!(activations(&sim.reply("a", Reply::Done)), ["b", "c"]);
    sim.reply("b", Reply::Done);
    let abort = sim.feed(Event::Control(Control::Abort));
    assert_eq!(rollbacks(&abort), ["a", "b", "c"], "c's activation is in flight: rolled back too");
    assert_eq!(sim.r.stopping.as_ref().map(|s| s.kind), Some(StopKind::Aborted));
    // c's activation answer, arriving after its rollback went out, changes nothing.
    let late = Event::Answered { agent: "c".into(), order: Order::Activate, reply: Reply::Done };
    assert!(sim.feed(late).is_empty());
    assert!(sim.feed(Event::Control(Control::Abort)).is_empty(), "a second abort changes nothing");
    sim.reply("a", Reply::Done);
    sim.reply("b", Reply::Offline);
    let end = sim.reply("c", Reply::Done);
    assert_eq!(sim.r.state, RolloutState::Aborted);
    assert_eq!(sim.r.failure.as_deref(), Some("aborted"));
    assert!(!end.iter().any(|c| matches!(c, Command::MarkBad { .. } | Command::Audit { .. })));
    assert_eq!(notified(&end), ["rolled_back"]);
    assert_eq!(sim.step_of("c"), AgentStep::RolledBack);
    assert!(sim.r.events.iter().any(|e| e.message == "rollback of agent b failed: agent b is offline"));
    assert!(sim.feed(Event::Control(Control::Resume)).is_empty(), "an ended rollout ignores everything");
}

#[test]
fn completion_says_how_many_agents_were_unreachable() {
    let s = RolloutSpec { canary: 0, waves: vec![100], ..spec("1.1.0") };
    let mut sim = Sim::new(s, &["eu-west/a", "eu-west/b", "us-east/c", "us-east/d"]);
    sim.offline.insert("b".into());
    assert_eq!(activations(&sim.start()), ["a", "c", "d"]);
    sim.reply("a", Reply::Done);
    sim.reply("c", Reply::Offline);
    let end = sim.reply("d", Reply::Done);
    assert_eq!(sim.r.state, RolloutState::Completed);
    assert_eq!(end[0], Command::Complete, "desired state is recorded before the record says completed");
    assert_eq!(end[1], Command::Persist);
    assert_eq!(end.last(), Some(&Command::Converge(vec!["b".into(), "c".into()])));
    assert_eq!(sim.r.converging, ["b", "c"]);
    assert_eq!(
        sim.last_event(),
        "completed: 2 of 4 targeted agent(s) run the release; 2 offline or unreachable (b, c), converging when they reconnect"
    );
}

#[test]
fn require_all_fails_a_wave_with_an_unreachable_agent_without_blaming_the_release() {
    let s = RolloutSpec { canary: 1, waves: vec![100], require_all: true, ..spec("1.1.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    sim.offline.insert("c".into());
    sim.start();
    sim.reply("a", Reply::Done);
    let stopping = sim.reply("b", Reply::Done);
    assert_eq!(
        sim.r.failure.as_deref(),
        Some("1 targeted agent(s) offline or unreachable (c) and the rollout requires every agent")
    );
    assert_eq!(rollbacks(&stopping), ["a", "b"]);
    sim.reply("a", Reply::Done);
    let end = sim.reply("b", Reply::Done);
    assert_eq!(sim.r.state, RolloutState::RolledBack);
    assert!(!end.iter().any(|c| matches!(c, Command::MarkBad { .. })), "the release is not at fault");
    assert!(end.iter().any(|c| matches!(c, Command::Audit { outcome: "rolled back", .. })));
    assert_eq!(sim.last_event(), "rolled back the agents this rollout moved");
}

#[test]
fn a_downgrade_runs_to_completion_and_records_the_newer_release_as_previous() {
    let s = RolloutSpec { canary: 1, waves: vec![100], downgrade: true, ..spec("1.0.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    for v in sim.running.values_mut() {
        *v = "2.0.0".into();
    }
    sim.start();
    sim.activate_all();
    assert_eq!(sim.r.state, RolloutState::Completed, "{:?}", sim.r.events);
    assert!(sim.r.agents.values().all(|p| p.previous.as_deref() == Some("2.0.0")));
    assert_eq!(sim.last_event(), "completed: every targeted agent runs the release");
}

#[test]
fn a_restart_resumes_mid_wave_from_the_stored_record() {
    let s = RolloutSpec { canary: 1, waves: vec![100], max_parallel: 2, ..spec("1.1.0") };
    let mut sim = Sim::new(s, &FIVE);
    sim.start();
    assert_eq!(activations(&sim.reply("a", Reply::Done)), ["b", "c"]);
    sim.reply("b", Reply::Done);
    // The controller stops here: d is being activated, c's answer never comes.
    assert_eq!(sim.activating(), ["c", "d"]);
    let stored: Rollout = serde_json::from_value(serde_json::to_value(&sim.r).unwrap()).unwrap();
    assert_eq!(
        (stored.agents["c"].step, stored.agents["c"].previous.as_deref()),
        (AgentStep::Activating, Some("1.0.0"))
    );
    let mut resumed = Sim { r: stored, out: BTreeMap::new(), ..sim };
    resumed.running.insert("c".into(), "1.1.0".into());
    let again = resumed.feed(Event::Start);
    assert_eq!(
        activations(&again),
        ["c", "d"],
        "the unanswered activations go again, the healthy ones do not"
    );
    assert_eq!(resumed.r.agents["c"].previous.as_deref(), Some("1.0.0"), "kept from before the restart");
    resumed.activate_all();
    assert_eq!(resumed.r.state, RolloutState::Completed);
}

#[test]
fn a_restart_while_rolling_back_finishes_the_rollback() {
    let s = RolloutSpec { canary: 1, waves: vec![100], ..spec("2.0.0") };
    let mut sim = Sim::new(s, &FIVE[..3]);
    sim.start();
    sim.reply("a", Reply::Done);
    sim.reply("b", Reply::NotDone("failed: health".into()));
    sim.reply("c", Reply::Done);
    assert_eq!(sim.r.stopping.as_ref().map(|s| s.kind), Some(StopKind::ReleaseFailed));
    sim.reply("a", Reply::Done);
    let stored: Rollout = serde_json::from_value(serde_json::to_value(&sim.r).unwrap()).unwrap();
    assert_eq!(stored.state, RolloutState::Running, "not ended: the restart must not carry on the rollout");
    let mut resumed = Sim { r: stored, out: BTreeMap::new(), ..sim };
    let again = resumed.feed(Event::Start);
    assert_eq!(rollbacks(&again), ["b", "c"], "a is rolled back already");
    assert!(activations(&again).is_empty());
    resumed.reply("b", Reply::Done);
    resumed.reply("c", Reply::Done);
    assert_eq!(resumed.r.state, RolloutState::RolledBack);
}

#[test]
fn answers_to_orders_not_out_are_ignored() {
    let mut sim = Sim::new(RolloutSpec { canary: 0, waves: vec![100], ..spec("1.1.0") }, &FIVE[..2]);
    sim.start();
    for order in [Order::Stage, Order::RollBack { to: None }] {
        let stray = Event::Answered { agent: "a".into(), order, reply: Reply::Error("late".into()) };
        assert!(sim.feed(stray).is_empty());
    }
    let stranger = Event::Answered { agent: "zz".into(), order: Order::Activate, reply: Reply::Done };
    assert!(sim.feed(stranger).is_empty());
    assert_eq!(sim.step_of("a"), AgentStep::Activating);
}

#[test]
fn staging_problems_are_noted_and_the_agent_still_goes_in_its_wave() {
    let mut sim = Sim::new(RolloutSpec { canary: 0, waves: vec![100], ..spec("1.1.0") }, &FIVE[..2]);
    let staging = sim.feed(Event::Start);
    assert_eq!(sends(&staging, |o| *o == Order::Stage), ["a", "b"]);
    assert_eq!(sim.r.state, RolloutState::Staging);
    assert!(inert(&sim.reply("a", Reply::NotDone("refused (digest): mismatch".into()))));
    let running = sim.reply("b", Reply::Done);
    assert_eq!(sim.r.state, RolloutState::Running);
    assert_eq!(activations(&running), ["a", "b"]);
    assert_eq!(sim.r.agents["a"].error.as_deref(), Some("refused (digest): mismatch"));
}

#[test]
fn a_superseded_rollout_ends_without_rolling_back() {
    let mut sim = Sim::new(RolloutSpec { canary: 1, waves: vec![100], ..spec("1.1.0") }, &FIVE[..3]);
    sim.start();
    sim.reply("a", Reply::Done);
    let end = sim.feed(Event::Control(Control::Supersede));
    assert_eq!(sim.r.state, RolloutState::Superseded);
    assert!(rollbacks(&end).is_empty());
    assert_eq!(sim.last_event(), "superseded by a newer rollout");
}

fn closed(region: &str) -> WindowWait {
    WindowWait { region: region.into(), opens: 9_999, at: "02:00 Europe/Berlin".into() }
}

#[test]
fn a_region_whose_window_is_closed_waits_and_the_wave_waits_for_it() {
    let mut s = Sim::new(
        RolloutSpec { canary: 0, waves: vec![100], ..spec("1.1.0") },
        &["eu-west/eu-0", "us-east/us-0"],
    );
    s.feed(Event::Windows(vec![closed("eu-west")]));
    assert_eq!(s.r.window_waits, [closed("eu-west")]);
    assert_eq!(s.last_event(), "eu-west waits for its deploy window (opens 02:00 Europe/Berlin)");
    s.start();
    assert_eq!(s.activating(), ["us-0"], "only the open region is activated");
    s.activate_all();
    assert_eq!(s.r.state, RolloutState::Running, "the wave waits for the closed region");
    assert_eq!(s.step_of("eu-0"), AgentStep::Staged);
    // Ticks change nothing while the window stays closed; the same windows again are no change.
    assert!(s.feed(Event::Tick).is_empty());
    assert!(s.feed(Event::Windows(vec![closed("eu-west")])).is_empty());
    s.feed(Event::Windows(vec![]));
    assert!(s.r.events.iter().any(|e| e.message == "the eu-west deploy window is open"));
    assert_eq!(s.activating(), ["eu-0"]);
    s.activate_all();
    assert_eq!(s.r.state, RolloutState::Completed);
}

#[test]
fn rollbacks_never_wait_for_a_window() {
    let mut s = Sim::new(
        RolloutSpec { canary: 0, waves: vec![100], ..spec("1.1.0") },
        &["eu-west/eu-0", "us-east/us-0"],
    );
    s.start();
    assert_eq!(s.activating(), ["eu-0", "us-0"]);
    s.reply("eu-0", Reply::Done);
    // eu-west closes, then us-0 fails: the rollback of eu-0 goes out at once.
    s.feed(Event::Windows(vec![closed("eu-west")]));
    s.reply("us-0", Reply::NotDone("unhealthy".into()));
    assert_eq!(s.out.get("eu-0"), Some(&Order::RollBack { to: Some("1.0.0".into()) }), "{:?}", s.out);
}
