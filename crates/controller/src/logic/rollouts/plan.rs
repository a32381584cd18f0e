//! Wave planning: which agents a rollout targets, and in which waves.

use std::collections::BTreeMap;

use super::spec::RolloutSpec;

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
