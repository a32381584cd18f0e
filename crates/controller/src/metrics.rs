//! Prometheus metrics: counters kept as atomics, gauges computed at scrape time, rendered in the
//! text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the rollback duration histogram.
const BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
pub struct Metrics {
    pub orders_sent: AtomicU64,
    pub bundle_bytes_served: AtomicU64,
    rollbacks: Mutex<Histogram>,
    hooks: Mutex<std::collections::BTreeMap<(String, String), u64>>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
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

    /// Renders everything; `agents` is (region, online) per agent, `rollouts` each rollout's
    /// state name.
    pub fn render(&self, agents: &[(String, bool)], rollouts: &[String]) -> String {
        let mut out = String::new();
        let mut by_region: std::collections::BTreeMap<(String, &str), u64> = Default::default();
        for (region, online) in agents {
            *by_region.entry((region.clone(), if *online { "online" } else { "offline" })).or_default() += 1;
            by_region.entry((region.clone(), if *online { "offline" } else { "online" })).or_default();
        }
        let _ = writeln!(out, "# HELP convoy_agents Enrolled agents by region and connection state.");
        let _ = writeln!(out, "# TYPE convoy_agents gauge");
        for ((region, state), n) in &by_region {
            let _ = writeln!(out, "convoy_agents{{region=\"{}\",state=\"{state}\"}} {n}", escape(region));
        }
        let mut states: std::collections::BTreeMap<&str, u64> =
            ["staging", "running", "paused", "completed", "rolled_back", "aborted", "superseded"]
                .iter()
                .map(|s| (*s, 0))
                .collect();
        for s in rollouts {
            if let Some(n) = states.get_mut(s.as_str()) {
                *n += 1;
            }
        }
        let _ = writeln!(out, "# HELP convoy_rollouts Rollouts by state.");
        let _ = writeln!(out, "# TYPE convoy_rollouts gauge");
        for (state, n) in states {
            let _ = writeln!(out, "convoy_rollouts{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP convoy_orders_sent_total Orders sent to agents.");
        let _ = writeln!(out, "# TYPE convoy_orders_sent_total counter");
        let _ = writeln!(out, "convoy_orders_sent_total {}", self.orders_sent.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP convoy_bundle_bytes_served_total Bundle bytes streamed to agents.");
        let _ = writeln!(out, "# TYPE convoy_bundle_bytes_served_total counter");
        let _ = writeln!(
            out,
            "convoy_bundle_bytes_served_total {}",
            self.bundle_bytes_served.load(Ordering::Relaxed)
        );
        let h = self.rollbacks.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP convoy_rollback_duration_seconds Fleet rollbacks: time until every targeted agent answered.");
        let _ = writeln!(out, "# TYPE convoy_rollback_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "convoy_rollback_duration_seconds_bucket{{le=\"{b}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(out, "convoy_rollback_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "convoy_rollback_duration_seconds_sum {}", h.sum);
        let _ = writeln!(out, "convoy_rollback_duration_seconds_count {}", h.count);
        drop(h);
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP convoy_hook_requests_total Alert hook requests by hook and outcome.");
        let _ = writeln!(out, "# TYPE convoy_hook_requests_total counter");
        for ((hook, outcome), n) in hooks.iter() {
            let _ = writeln!(
                out,
                "convoy_hook_requests_total{{hook=\"{}\",outcome=\"{}\"}} {n}",
                escape(hook),
                escape(outcome)
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
