//! The rollout spec: what to deploy, where, and how carefully, and its validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::logic::{Error, Result};

/// Failures tolerated per wave before the rollout stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    Count(u32),
    Percent(u32),
}

impl Threshold {
    pub fn parse(s: &str) -> Result<Self> {
        let bad =
            || Error::InvalidArgument(format!("--max-failures {s:?}: use a count (2) or a percentage (10%)"));
        match s.strip_suffix('%') {
            Some(p) => p.parse().ok().filter(|p| *p <= 100).map(Threshold::Percent).ok_or_else(bad),
            None => s.parse().map(Threshold::Count).map_err(|_| bad()),
        }
    }

    /// Whether `failures` among `wave_size` agents passes the threshold.
    pub fn exceeded(self, failures: usize, wave_size: usize) -> bool {
        match self {
            Threshold::Count(n) => failures > n as usize,
            Threshold::Percent(p) => failures * 100 > wave_size * p as usize,
        }
    }
}

/// What to deploy, where, and how carefully.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub app: String,
    pub version: String,
    pub regions: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub canary: u32,
    /// Cumulative percentages of the targeted agents, e.g. [10, 50, 100].
    pub waves: Vec<u32>,
    /// Region prefixes in the order regions go; waves run inside each region.
    pub region_order: Vec<String>,
    pub max_parallel: u32,
    #[serde(with = "humantime_serde")]
    pub bake: Duration,
    pub max_failures: Threshold,
    #[serde(default, with = "humantime_serde")]
    pub health_deadline: Option<Duration>,
    pub force: bool,
    #[serde(default)]
    pub downgrade: bool,
    pub supersede: bool,
    /// Set when a freeze window is overridden: the reason.
    pub override_freeze: Option<String>,
    /// Every targeted agent must take the release: an offline one fails the rollout (rolling
    /// back what it moved) instead of being left to converge when it reconnects.
    #[serde(default)]
    pub require_all: bool,
}

impl RolloutSpec {
    /// The safe defaults: a canary of one, then 10%, 50%, 100%, stop at the first failure.
    pub fn new(app: &str, version: &str) -> Self {
        Self {
            app: app.into(),
            version: version.into(),
            regions: vec![],
            selector: BTreeMap::new(),
            canary: 1,
            waves: vec![10, 50, 100],
            region_order: vec![],
            max_parallel: 10,
            bake: Duration::from_secs(0),
            max_failures: Threshold::Count(0),
            health_deadline: None,
            force: false,
            downgrade: false,
            supersede: false,
            override_freeze: None,
            require_all: false,
        }
    }
}
