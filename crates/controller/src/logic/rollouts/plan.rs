//! Wave planning: which agents a rollout targets (`regions`, `selector`), and in which waves
//! (canary, cumulative percentages, region order). How many agents of a wave are activated at
//! once (`max_parallel`) is the machine's to enforce ([`super::machine`]).

use std::collections::{BTreeMap, HashSet};

use super::spec::RolloutSpec;
use super::{AgentProgress, AgentStep, Rollout, RolloutState};
use crate::store::AgentRecord;

/// The agents a spec targets, as `(region, id)`: not revoked, in its environment, in one of its
/// regions (any region when it names none), and carrying every label of its selector (any
/// labels when it has none).
pub fn targets(spec: &RolloutSpec, agents: &[AgentRecord]) -> Vec<(String, String)> {
    agents
        .iter()
        .filter(|a| !a.revoked && a.environment == spec.environment)
        .filter(|a| spec.regions.is_empty() || spec.regions.contains(&a.region))
        .filter(|a| spec.selector.iter().all(|(k, v)| a.labels.get(k) == Some(v)))
        .map(|a| (a.region.clone(), a.id.clone()))
        .collect()
}

/// The regions of `targets`.
pub fn regions(targets: &[(String, String)]) -> HashSet<String> {
    targets.iter().map(|(r, _)| r.clone()).collect()
}

/// Unless the spec allows a downgrade: a release newer than the spec's that a targeted agent
/// runs (deploying would go backwards there).
pub fn newer_running(
    spec: &RolloutSpec,
    agents: &[AgentRecord],
    targets: &[(String, String)],
) -> Option<String> {
    if spec.downgrade {
        return None;
    }
    let new = semver::Version::parse(&spec.version).ok();
    agents
        .iter()
        .filter(|a| targets.iter().any(|(_, id)| *id == a.id))
        .filter_map(|a| a.apps.iter().find(|s| s.app == spec.app))
        .find(|s| semver::Version::parse(&s.current).ok() > new)
        .map(|s| s.current.clone())
}

/// A new rollout's record: its waves planned, every agent pending, staging first.
pub fn new_rollout(
    id: String,
    spec: RolloutSpec,
    digest: String,
    by: &str,
    now: i64,
    targets: &[(String, String)],
) -> Rollout {
    let waves = plan_waves(&spec, targets.to_vec());
    let region: BTreeMap<&str, &str> = targets.iter().map(|(r, id)| (id.as_str(), r.as_str())).collect();
    let mut agents = BTreeMap::new();
    for (w, wave) in waves.iter().enumerate() {
        for a in wave {
            let progress = AgentProgress {
                id: a.clone(),
                region: region.get(a.as_str()).map(|r| r.to_string()).unwrap_or_default(),
                wave: w,
                step: AgentStep::Pending,
                previous: None,
                moved: false,
                error: None,
                activated_at_ms: None,
            };
            agents.insert(a.clone(), progress);
        }
    }
    Rollout {
        id,
        spec,
        digest,
        state: RolloutState::Staging,
        created_at: now,
        created_by: by.into(),
        finished_at: None,
        waves,
        wave: 0,
        agents,
        events: vec![],
        failure: None,
        converging: vec![],
        stopping: None,
        approval: None,
        window_waits: vec![],
        run: Default::default(),
    }
}

/// Splits targeted agents into waves: the canary first, then cumulative percentages; with a
/// region order, one region after another with the waves inside each.
pub fn plan_waves(spec: &RolloutSpec, mut agents: Vec<(String, String)>) -> Vec<Vec<String>> {
    agents.sort();
    let rank = |region: &str| {
        spec.region_order
            .iter()
            .position(|p| region.starts_with(p.as_str()))
            .unwrap_or(spec.region_order.len())
    };
    let groups: Vec<Vec<String>> = if spec.region_order.is_empty() {
        vec![agents.into_iter().map(|(_, id)| id).collect()]
    } else {
        let mut by: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
        for (region, id) in agents {
            by.entry((rank(&region), region)).or_default().push(id);
        }
        by.into_values().collect()
    };
    let mut waves = Vec::new();
    let mut canary_left = spec.canary as usize;
    for group in groups {
        let n = group.len();
        let mut taken = 0usize;
        if canary_left > 0 {
            let c = canary_left.min(n);
            waves.push(group[..c].to_vec());
            taken = c;
            canary_left = 0;
        }
        let mut pcts = spec.waves.clone();
        if pcts.last() != Some(&100) {
            pcts.push(100);
        }
        for p in pcts {
            let upto = ((n * p as usize).div_ceil(100)).min(n);
            if upto > taken {
                waves.push(group[taken..upto].to_vec());
                taken = upto;
            }
        }
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AppStatusRecord;

    fn agents(spec: &[(&str, usize)]) -> Vec<(String, String)> {
        let mut out = vec![];
        for (region, n) in spec {
            for i in 0..*n {
                out.push((region.to_string(), format!("{region}-{i}")));
            }
        }
        out
    }

    fn record(id: &str, region: &str, labels: &[(&str, &str)], running: Option<&str>) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            region: region.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            first_seen: 0,
            last_seen: 0,
            cert_serial: String::new(),
            cert_not_after: 0,
            agent_version: String::new(),
            releases: vec![],
            revoked: false,
            apps: running
                .map(|v| AppStatusRecord { app: "shop-api".into(), current: v.into(), ..Default::default() })
                .into_iter()
                .collect(),
            previous_serial: None,
            previous_serial_until: 0,
            cert_serial_used: false,
            environment: Default::default(),
        }
    }

    fn ids(targets: &[(String, String)]) -> Vec<&str> {
        targets.iter().map(|(_, id)| id.as_str()).collect()
    }

    #[test]
    fn waves_canary_then_percentages_and_region_order() {
        let mut spec = RolloutSpec::new("a", "1.0.0");
        let w = plan_waves(&spec, agents(&[("eu-west", 10)]));
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 4, 5]);
        spec.region_order = vec!["ap".into(), "eu".into(), "us".into()];
        spec.waves = vec![50, 100];
        let w = plan_waves(&spec, agents(&[("us-east", 2), ("eu-west", 2), ("ap-south", 2)]));
        let regions: Vec<Vec<&str>> =
            w.iter().map(|wave| wave.iter().map(|id| id.split('-').next().unwrap()).collect()).collect();
        assert_eq!(regions, [vec!["ap"], vec!["ap"], vec!["eu"], vec!["eu"], vec!["us"], vec!["us"]]);
        spec.canary = 0;
        spec.waves = vec![100];
        spec.region_order = vec![];
        assert_eq!(plan_waves(&spec, agents(&[("x", 3)])).len(), 1);
    }

    #[test]
    fn the_selector_targets_only_agents_with_every_label() {
        let fleet = [
            record("web-eu", "eu-west", &[("tier", "web"), ("canary", "yes")], None),
            record("web-us", "us-east", &[("tier", "web")], None),
            record("db-eu", "eu-west", &[("tier", "db"), ("canary", "yes")], None),
            record("bare", "eu-west", &[], None),
        ];
        let mut spec = RolloutSpec::new("shop-api", "1.1.0");
        assert_eq!(ids(&targets(&spec, &fleet)), ["web-eu", "web-us", "db-eu", "bare"], "no selector: all");
        spec.selector.insert("tier".into(), "web".into());
        assert_eq!(ids(&targets(&spec, &fleet)), ["web-eu", "web-us"]);
        spec.selector.insert("canary".into(), "yes".into());
        assert_eq!(ids(&targets(&spec, &fleet)), ["web-eu"], "every label must match");
        spec.selector.insert("canary".into(), "no".into());
        assert!(targets(&spec, &fleet).is_empty(), "a label with another value does not match");
    }

    #[test]
    fn regions_scope_the_rollout_and_revoked_agents_are_never_targeted() {
        let mut fleet = vec![
            record("eu-0", "eu-west", &[], None),
            record("eu-1", "eu-west", &[], None),
            record("us-0", "us-east", &[], None),
            record("ap-0", "ap-south", &[], None),
        ];
        fleet[1].revoked = true;
        let mut spec = RolloutSpec::new("shop-api", "1.1.0");
        spec.regions = vec!["eu-west".into(), "ap-south".into()];
        let t = targets(&spec, &fleet);
        assert_eq!(ids(&t), ["eu-0", "ap-0"]);
        assert_eq!(regions(&t), HashSet::from(["eu-west".to_string(), "ap-south".to_string()]));
        // A region is matched whole: "eu" is not "eu-west".
        spec.regions = vec!["eu".into()];
        assert!(targets(&spec, &fleet).is_empty());
        // The record plans only the targeted agents, each with its own region.
        spec.regions = vec!["us-east".into()];
        let r = new_rollout("ro-1".into(), spec.clone(), "d".into(), "admin/a", 0, &targets(&spec, &fleet));
        assert_eq!(r.agents.keys().collect::<Vec<_>>(), ["us-0"]);
        assert_eq!(r.agents["us-0"].region, "us-east");
        assert_eq!(r.waves, [vec!["us-0".to_string()]]);
    }

    #[test]
    fn a_rollout_targets_only_its_environment() {
        let staging = crate::logic::Environment::parse("staging").unwrap();
        let mut fleet = vec![record("eu-0", "eu-west", &[], None), record("eu-s", "eu-west", &[], None)];
        fleet[1].environment = staging.clone();
        let mut spec = RolloutSpec::new("shop-api", "1.1.0");
        assert_eq!(ids(&targets(&spec, &fleet)), ["eu-0"], "production by default");
        spec.environment = staging;
        assert_eq!(ids(&targets(&spec, &fleet)), ["eu-s"]);
        spec.environment = crate::logic::Environment::parse("qa").unwrap();
        assert!(targets(&spec, &fleet).is_empty());
    }

    #[test]
    fn an_older_release_is_refused_unless_the_spec_is_a_downgrade() {
        let fleet =
            [record("eu-0", "eu-west", &[], Some("2.0.0")), record("us-0", "us-east", &[], Some("1.0.0"))];
        let mut spec = RolloutSpec::new("shop-api", "1.5.0");
        let all = targets(&spec, &fleet);
        assert_eq!(newer_running(&spec, &fleet, &all).as_deref(), Some("2.0.0"));
        // Only targeted agents count.
        spec.regions = vec!["us-east".into()];
        assert_eq!(newer_running(&spec, &fleet, &targets(&spec, &fleet)), None);
        spec.regions = vec![];
        spec.downgrade = true;
        assert_eq!(newer_running(&spec, &fleet, &all), None);
    }
}
