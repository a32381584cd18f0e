//! Prometheus metrics, rendered in the text exposition format. Everything is kept in memory:
//! counters as atomics, and the gauges (agents by region and connection state, rollouts by
//! state) as counts the controller moves where agents enroll, connect, disconnect and are revoked
//! and where a rollout's state is saved, loaded once from the store at start-up
//! ([`Metrics::load_gauges`]). A scrape reads no store record: its cost does not grow with the
//! fleet or the rollout history.

/// Appends one line to a `String` (formatting into memory cannot fail).
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::logic::rollouts::RolloutState;

/// Upper bounds (seconds) of the rollback duration histogram.
const BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Every rollout state with its exposition name.
const ROLLOUT_STATES: [(RolloutState, &str); 11] = [
    (RolloutState::AwaitingApproval, "awaiting_approval"),
    (RolloutState::Scheduled, "scheduled"),
    (RolloutState::Staging, "staging"),
    (RolloutState::Running, "running"),
    (RolloutState::Paused, "paused"),
    (RolloutState::Completed, "completed"),
    (RolloutState::RolledBack, "rolled_back"),
    (RolloutState::Aborted, "aborted"),
    (RolloutState::Superseded, "superseded"),
    (RolloutState::Rejected, "rejected"),
    (RolloutState::Expired, "expired"),
];

fn state_index(s: RolloutState) -> usize {
    ROLLOUT_STATES.iter().position(|(x, _)| *x == s).unwrap_or_default()
}

#[derive(Default)]
pub struct Metrics {
    pub orders_sent: AtomicU64,
    pub bundle_bytes_served: AtomicU64,
    rollbacks: Mutex<Histogram>,
    hooks: Mutex<std::collections::BTreeMap<(String, String), u64>>,
    gauges: Mutex<Gauges>,
    /// The HTTP listener's connection and timeout counters.
    pub(crate) http: Arc<crate::http::Counters>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The gauges' counts.
#[derive(Default)]
struct Gauges {
    /// Per (environment, region): unrevoked agents, and how many of them have a live session.
    regions: BTreeMap<(String, String), RegionCount>,
    /// Rollouts per state, indexed like [`ROLLOUT_STATES`].
    rollouts: [u64; ROLLOUT_STATES.len()],
    /// The state of every unfinished rollout, to move it between counts when it changes. A
    /// finished rollout never changes state again, so it is dropped from here.
    unfinished: HashMap<String, RolloutState>,
}

#[derive(Clone, Copy, Default)]
struct RegionCount {
    enrolled: u64,
    online: u64,
}

impl Metrics {
    fn gauges(&self) -> std::sync::MutexGuard<'_, Gauges> {
        // Every critical section leaves the counts consistent, so a poisoned lock is usable.
        self.gauges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the gauges from the store's records: `agents` is (environment, region, revoked) per
    /// agent record,
    /// `rollouts` (id, state) per rollout record. No agent is online at start-up.
    pub fn load_gauges(
        &self,
        agents: impl IntoIterator<Item = (String, String, bool)>,
        rollouts: impl IntoIterator<Item = (String, RolloutState)>,
    ) {
        let mut g = Gauges::default();
        for (env, region, revoked) in agents {
            if !revoked {
                g.regions.entry((env, region)).or_default().enrolled += 1;
            }
        }
        for (id, state) in rollouts {
            g.rollouts[state_index(state)] += 1;
            if !state.is_final() {
                g.unfinished.insert(id, state);
            }
        }
        *self.gauges() = g;
    }

    /// An agent enrolled in `env` and `region`.
    pub fn agent_enrolled(&self, env: &str, region: &str) {
        self.gauges().regions.entry(place(env, region)).or_default().enrolled += 1;
    }

    /// An agent of `env` and `region` opened a session (not one that replaced its own older
    /// session).
    pub fn agent_online(&self, env: &str, region: &str) {
        self.gauges().regions.entry(place(env, region)).or_default().online += 1;
    }

    /// An agent of `env` and `region` lost its session.
    pub fn agent_offline(&self, env: &str, region: &str) {
        let mut g = self.gauges();
        let key = place(env, region);
        if let Some(c) = g.regions.get_mut(&key) {
            c.online = c.online.saturating_sub(1);
        }
        g.forget_if_empty(&key);
    }

    /// An agent of `env` and `region` was revoked: `newly` unless it already was; `was_online`
    /// when its session was closed by the revocation.
    pub fn agent_revoked(&self, env: &str, region: &str, newly: bool, was_online: bool) {
        let mut g = self.gauges();
        let key = place(env, region);
        if let Some(c) = g.regions.get_mut(&key) {
            if newly {
                c.enrolled = c.enrolled.saturating_sub(1);
            }
            if was_online {
                c.online = c.online.saturating_sub(1);
            }
        }
        g.forget_if_empty(&key);
    }

    /// A rollout's record was saved with `state`: counts it when it is new and moves it when its
    /// state changed. Only a rollout's first save may be unknown here, and a new rollout is never
    /// saved finished, so a finished rollout not among the unfinished ones was counted already.
    pub fn rollout_saved(&self, id: &str, state: RolloutState) {
        let mut g = self.gauges();
        match g.unfinished.get(id).copied() {
            Some(old) => {
                g.rollouts[state_index(old)] = g.rollouts[state_index(old)].saturating_sub(1);
                g.rollouts[state_index(state)] += 1;
                if state.is_final() {
                    g.unfinished.remove(id);
                } else {
                    g.unfinished.insert(id.to_owned(), state);
                }
            }
            None if !state.is_final() => {
                g.rollouts[state_index(state)] += 1;
                g.unfinished.insert(id.to_owned(), state);
            }
            None => {}
        }
    }

    pub fn observe_rollback(&self, secs: f64) {
        let mut h = self.rollbacks.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn hook(&self, hook: &str, outcome: &str) {
        *self
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((hook.into(), outcome.into()))
            .or_default() += 1;
    }

    pub fn order_sent(&self) {
        self.orders_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes_served(&self, n: u64) {
        self.bundle_bytes_served.fetch_add(n, Ordering::Relaxed);
    }

    /// Renders everything, from memory only.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let (regions, rollouts) = {
            let g = self.gauges();
            (g.regions.clone(), g.rollouts)
        };
        emit!(out, "# HELP convoy_agents Enrolled agents by environment, region and connection state.");
        emit!(out, "# TYPE convoy_agents gauge");
        for ((env, region), c) in regions.iter().filter(|(_, c)| c.enrolled > 0) {
            // A session that slipped in while its agent was being revoked is not counted.
            let online = c.online.min(c.enrolled);
            let (env, region) = (escape(env), escape(region));
            let labels = format!("environment=\"{env}\",region=\"{region}\"");
            emit!(out, "convoy_agents{{{labels},state=\"offline\"}} {}", c.enrolled - online);
            emit!(out, "convoy_agents{{{labels},state=\"online\"}} {online}");
        }
        let states: BTreeMap<&str, u64> =
            ROLLOUT_STATES.iter().enumerate().map(|(i, (_, name))| (*name, rollouts[i])).collect();
        emit!(out, "# HELP convoy_rollouts Rollouts by state.");
        emit!(out, "# TYPE convoy_rollouts gauge");
        for (state, n) in states {
            emit!(out, "convoy_rollouts{{state=\"{state}\"}} {n}");
        }
        emit!(out, "# HELP convoy_orders_sent_total Orders sent to agents.");
        emit!(out, "# TYPE convoy_orders_sent_total counter");
        emit!(out, "convoy_orders_sent_total {}", self.orders_sent.load(Ordering::Relaxed));
        emit!(out, "# HELP convoy_bundle_bytes_served_total Bundle bytes streamed to agents.");
        emit!(out, "# TYPE convoy_bundle_bytes_served_total counter");
        emit!(out, "convoy_bundle_bytes_served_total {}", self.bundle_bytes_served.load(Ordering::Relaxed));
        let h = self.rollbacks.lock().unwrap_or_else(|p| p.into_inner());
        emit!(out, "# HELP convoy_rollback_duration_seconds Fleet rollbacks: time until every targeted agent answered.");
        emit!(out, "# TYPE convoy_rollback_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            emit!(out, "convoy_rollback_duration_seconds_bucket{{le=\"{b}\"}} {}", h.counts[i]);
        }
        emit!(out, "convoy_rollback_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        emit!(out, "convoy_rollback_duration_seconds_sum {}", h.sum);
        emit!(out, "convoy_rollback_duration_seconds_count {}", h.count);
        drop(h);
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        emit!(out, "# HELP convoy_hook_requests_total Alert hook requests by hook and outcome.");
        emit!(out, "# TYPE convoy_hook_requests_total counter");
        for ((hook, outcome), n) in hooks.iter() {
            emit!(
                out,
                "convoy_hook_requests_total{{hook=\"{}\",outcome=\"{}\"}} {n}",
                escape(hook),
                escape(outcome)
            );
        }
        self.http.render(&mut out);
        out
    }
}

impl Gauges {
    /// A region without agents is not shown, as before any agent enrolled there.
    fn forget_if_empty(&mut self, key: &(String, String)) {
        if self.regions.get(key).is_some_and(|c| c.enrolled == 0 && c.online == 0) {
            self.regions.remove(key);
        }
    }
}

fn place(env: &str, region: &str) -> (String, String) {
    (env.to_owned(), region.to_owned())
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gauge part of the exposition as it was rendered from store records before the gauges
    /// were kept in memory: `agents` is (region, online) per unrevoked agent.
    fn from_records(agents: &[(&str, bool)], rollouts: &[RolloutState]) -> String {
        let mut out = String::new();
        let mut by_region: BTreeMap<(String, &str), u64> = Default::default();
        for (region, online) in agents {
            *by_region
                .entry((region.to_string(), if *online { "online" } else { "offline" }))
                .or_default() += 1;
            by_region.entry((region.to_string(), if *online { "offline" } else { "online" })).or_default();
        }
        out.push_str("# HELP convoy_agents Enrolled agents by environment, region and connection state.\n");
        out.push_str("# TYPE convoy_agents gauge\n");
        for ((region, state), n) in &by_region {
            out.push_str(&format!(
                "convoy_agents{{environment=\"production\",region=\"{}\",state=\"{state}\"}} {n}\n",
                escape(region)
            ));
        }
        let mut states: BTreeMap<&str, u64> = ROLLOUT_STATES.iter().map(|(_, s)| (*s, 0)).collect();
        for s in rollouts {
            *states.entry(ROLLOUT_STATES[state_index(*s)].1).or_default() += 1;
        }
        out.push_str("# HELP convoy_rollouts Rollouts by state.\n# TYPE convoy_rollouts gauge\n");
        for (state, n) in states {
            out.push_str(&format!("convoy_rollouts{{state=\"{state}\"}} {n}\n"));
        }
        out
    }

    fn gauges_part(m: &Metrics) -> String {
        let text = m.render();
        let end = text.find("# HELP convoy_orders_sent_total").unwrap();
        text[..end].to_string()
    }

    #[test]
    fn gauges_moved_by_events_render_as_the_records_did() {
        let m = Metrics::default();
        // Start-up: eu has a1, a2 and a revoked a0; us has u1; two rollouts, one unfinished.
        m.load_gauges(
            [
                ("production".into(), "eu".into(), false),
                ("production".into(), "eu".into(), false),
                ("production".into(), "eu".into(), true),
                ("production".into(), "us".into(), false),
            ],
            [("ro-1".into(), RolloutState::Completed), ("ro-2".into(), RolloutState::Running)],
        );
        assert_eq!(
            gauges_part(&m),
            from_records(
                &[("eu", false), ("eu", false), ("us", false)],
                &[RolloutState::Completed, RolloutState::Running]
            )
        );
        m.agent_online("production", "eu");
        m.agent_online("production", "us");
        m.agent_enrolled("production", "ap \"south\"");
        m.rollout_saved("ro-2", RolloutState::Paused);
        m.rollout_saved("ro-3", RolloutState::Staging);
        assert_eq!(
            gauges_part(&m),
            from_records(
                &[("eu", true), ("eu", false), ("us", true), ("ap \"south\"", false)],
                &[RolloutState::Completed, RolloutState::Paused, RolloutState::Staging]
            )
        );
        // us-1 revoked while online, an eu agent goes offline, ro-2 is aborted and saved twice,
        // ro-3 runs and completes.
        m.agent_revoked("production", "us", true, true);
        m.agent_offline("production", "eu");
        m.rollout_saved("ro-2", RolloutState::Aborted);
        m.rollout_saved("ro-2", RolloutState::Aborted);
        m.rollout_saved("ro-3", RolloutState::Running);
        m.rollout_saved("ro-3", RolloutState::Completed);
        assert_eq!(
            gauges_part(&m),
            from_records(
                &[("eu", false), ("eu", false), ("ap \"south\"", false)],
                &[RolloutState::Completed, RolloutState::Aborted, RolloutState::Completed]
            )
        );
        // Revoking an agent already revoked changes nothing; the last eu agents go.
        m.agent_revoked("production", "eu", false, false);
        m.agent_revoked("production", "eu", true, false);
        m.agent_revoked("production", "eu", true, false);
        assert_eq!(
            gauges_part(&m),
            from_records(
                &[("ap \"south\"", false)],
                &[RolloutState::Completed, RolloutState::Aborted, RolloutState::Completed]
            )
        );
        // Only unfinished rollouts are remembered.
        assert!(m.gauges().unfinished.is_empty());
    }

    #[test]
    fn a_session_of_an_agent_revoked_meanwhile_is_not_shown() {
        let m = Metrics::default();
        m.agent_enrolled("production", "eu");
        m.agent_revoked("production", "eu", true, false);
        // Its session opened just after the revocation removed none.
        m.agent_online("production", "eu");
        assert_eq!(gauges_part(&m), from_records(&[], &[]));
        m.agent_offline("production", "eu");
        assert!(m.gauges().regions.is_empty());
    }

    #[test]
    fn the_listener_counters_are_rendered() {
        let text = Metrics::default().render();
        for line in [
            "convoy_http_connections 0",
            "convoy_http_connections_refused_total{limit=\"per_peer\"} 0",
            "convoy_http_connections_refused_total{limit=\"total\"} 0",
            "convoy_http_timeouts_total{phase=\"request_head\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
