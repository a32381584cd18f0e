//! What the agent reports per app, in heartbeats and order answers: the outbound edge, so it
//! speaks the wire types.

use convoy_proto::v1 as pb;

use super::Core;
use crate::state::HealthState;

/// One app's status: the `current` link on disk, the committed record, and live health.
pub(crate) fn app_status(core: &Core, app: &str) -> pb::AppStatus {
    let rec = match core.state.app(app) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%app, error = %e, "cannot read app state");
            return pb::AppStatus {
                app: app.into(),
                current: core.layout.read_current(app).unwrap_or_default(),
                health: pb::Health::Unknown as i32,
                last_error: format!("agent state unreadable: {e}"),
                ..Default::default()
            };
        }
    };
    let live = core.live(app);
    let installed: Vec<String> = match core.state.installed_for(app) {
        Ok(r) => r.into_iter().map(|r| r.version).collect(),
        Err(e) => {
            tracing::error!(%app, error = %e, "cannot read installed releases");
            Vec::new()
        }
    };
    let current = core.layout.read_current(app);
    let previous = current.as_deref().and_then(|c| rec.rollback_target(c, &installed));
    let health = if live.health == HealthState::Unknown { rec.health } else { live.health };
    pb::AppStatus {
        app: app.into(),
        current: current.unwrap_or_default(),
        known_good: rec.known_good.unwrap_or_default(),
        previous: previous.unwrap_or_default(),
        health: health_to_pb(health) as i32,
        last_error: live.last_error.or(rec.last_error).unwrap_or_default(),
        installed,
        busy: live.busy,
    }
}

/// Status of every app the agent knows.
pub(crate) fn all(core: &Core) -> Vec<pb::AppStatus> {
    let mut apps: Vec<String> = core.layout.apps_on_disk();
    match core.state.apps() {
        Ok(recs) => {
            for (a, _) in recs {
                if !apps.contains(&a) {
                    apps.push(a);
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot list app state"),
    }
    apps.sort();
    apps.iter().map(|a| app_status(core, a)).collect()
}

fn health_to_pb(h: HealthState) -> pb::Health {
    match h {
        HealthState::Unknown => pb::Health::Unknown,
        HealthState::Checking => pb::Health::Checking,
        HealthState::Healthy => pb::Health::Healthy,
        HealthState::Unhealthy => pb::Health::Unhealthy,
        HealthState::None => pb::Health::None,
    }
}
