//! What a session does with each heartbeat: throttle the rate one agent can send at, and write
//! the agent's record only when what it reports has changed.
//!
//! An honest agent sends one heartbeat per interval. One that sends faster gets its extra
//! heartbeats dropped unread past a small burst, and one that keeps flooding loses its session.
//! A heartbeat that reports what the last one did costs a comparison and no store write; the
//! agent's last-seen time is kept in memory and written with the next change, or at least every
//! [`REWRITE_AFTER`].

use std::time::{Duration, Instant};

use crate::store::{AppStatusRecord, ReportedRelease};

/// Heartbeats accepted back to back before the rate applies.
pub const BURST: u32 = 8;
/// Heartbeats dropped in a row (each over the rate) before the session is closed.
pub const FLOOD_AFTER: u32 = 64;
/// An unchanged report is still written this often, so the stored last-seen time of an agent
/// stays roughly current even across a controller crash.
pub const REWRITE_AFTER: Duration = Duration::from_secs(60);

/// The verdict on one heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate and different from the last written report (or due for a rewrite):
    /// record it.
    Write,
    /// Within the rate but reporting what the last written one did: update last-seen in memory.
    Unchanged,
    /// Over the rate: ignored.
    Dropped,
    /// Over the rate for [`FLOOD_AFTER`] heartbeats in a row: close the session.
    Flood,
}

/// The per-session state behind [`Verdict`]s.
#[derive(Debug)]
pub struct Heartbeats {
    /// One token per `every`, at most [`BURST`].
    every: Duration,
    tokens: u32,
    refilled: Instant,
    dropped_in_row: u32,
    last: Option<(Vec<ReportedRelease>, Vec<AppStatusRecord>)>,
    written: Option<Instant>,
}

impl Heartbeats {
    /// For an agent told to send one heartbeat per `interval`. The rate allowed is twice that,
    /// so timer jitter never costs an honest agent a heartbeat.
    pub fn new(interval: Duration, now: Instant) -> Self {
        let every = (interval / 2).max(Duration::from_millis(10));
        Self { every, tokens: BURST, refilled: now, dropped_in_row: 0, last: None, written: None }
    }

    /// Judges one heartbeat arriving at `now`; remembers the report when the verdict is
    /// [`Verdict::Write`].
    pub fn judge(&mut self, now: Instant, releases: &[ReportedRelease], apps: &[AppStatusRecord]) -> Verdict {
        let earned = now.saturating_duration_since(self.refilled).as_nanos() / self.every.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled += self.every * earned.min(BURST);
            if self.tokens == BURST {
                self.refilled = now;
            }
        }
        if self.tokens == 0 {
            self.dropped_in_row += 1;
            return if self.dropped_in_row >= FLOOD_AFTER { Verdict::Flood } else { Verdict::Dropped };
        }
        self.tokens -= 1;
        self.dropped_in_row = 0;
        let same = self.last.as_ref().is_some_and(|(r, a)| r == releases && a == apps);
        let fresh = self.written.is_some_and(|t| now.saturating_duration_since(t) < REWRITE_AFTER);
        if same && fresh {
            return Verdict::Unchanged;
        }
        self.last = Some((releases.to_vec(), apps.to_vec()));
        self.written = Some(now);
        Verdict::Write
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(err: &str) -> Vec<AppStatusRecord> {
        vec![AppStatusRecord { app: "web".into(), last_error: err.into(), ..Default::default() }]
    }

    #[test]
    fn an_honest_agent_is_never_throttled_and_unchanged_reports_are_not_rewritten() {
        let t0 = Instant::now();
        let mut h = Heartbeats::new(Duration::from_secs(5), t0);
        assert_eq!(h.judge(t0, &[], &app("")), Verdict::Write);
        let mut writes = 0;
        for i in 1..100u32 {
            // One per interval, early or late by up to 0.8 s.
            let at = t0 + Duration::from_secs(5) * i - Duration::from_millis(u64::from(i % 3) * 400);
            match h.judge(at, &[], &app("")) {
                Verdict::Write => writes += 1,
                Verdict::Unchanged => {}
                v => panic!("heartbeat {i} judged {v:?}"),
            }
        }
        // About 495 s of unchanged reports: one rewrite per REWRITE_AFTER, no more.
        assert_eq!(writes, 495 / REWRITE_AFTER.as_secs() as usize);
        let at = t0 + Duration::from_secs(501);
        assert_eq!(h.judge(at, &[], &app("boom")), Verdict::Write, "a change is written at once");
        assert_eq!(h.judge(at + Duration::from_secs(5), &[], &app("boom")), Verdict::Unchanged);
        // An unchanged report is rewritten once it is REWRITE_AFTER old.
        assert_eq!(h.judge(at + REWRITE_AFTER, &[], &app("boom")), Verdict::Write);
    }

    #[test]
    fn a_flood_is_cut_to_the_burst_then_closed() {
        let t0 = Instant::now();
        let mut h = Heartbeats::new(Duration::from_secs(5), t0);
        let verdicts: Vec<Verdict> = (0..1000).map(|i| h.judge(t0, &[], &app(&i.to_string()))).collect();
        let written = verdicts.iter().filter(|v| **v == Verdict::Write).count();
        assert_eq!(written, BURST as usize);
        let flood_at = verdicts.iter().position(|v| *v == Verdict::Flood).unwrap_or(usize::MAX);
        assert_eq!(flood_at, (BURST + FLOOD_AFTER - 1) as usize);
        // The rate comes back with time.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(h.judge(later, &[], &app("x")), Verdict::Write);
    }
}
