//! The controller's HTTP side: `/healthz`, `/metrics`, and the alert hooks.
//!
//! `POST /v1/hooks/alertmanager` takes Alertmanager's webhook payload (version 4) with a bearer
//! token; `POST /v1/hooks/rollback` takes `{"app", "region", "reason"}` signed with HMAC-SHA256
//! over `"<timestamp>.<body>"`. Errors are JSON: 401 unauthenticated, 400 malformed, 409 replayed,
//! 422 no matching app. Nothing changes on an error.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::HooksConfig;
use crate::logic::roles::HookActor;
use crate::logic::{now, Controller, Target};
use crate::store::Tree;

/// How old a signed request may be.
const MAX_SKEW_SECS: i64 = 300;

/// Hook settings with rules compiled.
#[derive(Clone)]
pub struct HookConfig {
    token: Option<String>,
    hmac_keys: BTreeMap<String, Vec<u8>>,
    rules: Vec<Rule>,
}

#[derive(Clone)]
struct Rule {
    labels: BTreeMap<String, String>,
    regex: Vec<(String, regex::Regex)>,
    action: String,
    app_label: String,
    region_label: String,
}

impl HookConfig {
    pub fn from_config(c: &HooksConfig) -> Result<Self, crate::server::Error> {
        let mut rules = Vec::new();
        for r in &c.rules {
            let mut regex = Vec::new();
            for (k, re) in &r.labels_regex {
                let compiled = regex::Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| crate::server::Error::Hooks(e.to_string()))?;
                regex.push((k.clone(), compiled));
            }
            rules.push(Rule {
                labels: r.labels.clone(),
                regex,
                action: r.action.clone(),
                app_label: r.app_label.clone(),
                region_label: r.region_label.clone(),
            });
        }
        Ok(Self {
            token: c.alertmanager_token.clone(),
            hmac_keys: c.hmac_keys.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect(),
            rules,
        })
    }
}

#[derive(Clone)]
struct AppState {
    ctl: HookActor,
    hooks: HookConfig,
}

/// The HTTP routes. Hooks act through `ctl`, which can only roll back or pause.
pub fn router(ctl: HookActor, hooks: HookConfig) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/hooks/alertmanager", post(alertmanager))
        .route("/v1/hooks/rollback", post(generic))
        .with_state(AppState { ctl, hooks })
}

fn error(ctl: &HookActor, hook: &str, code: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    let outcome = match code {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::BAD_REQUEST => "malformed",
        StatusCode::CONFLICT => "replayed",
        StatusCode::UNPROCESSABLE_ENTITY => "no_matching_app",
        _ => "error",
    };
    ctl.metrics().hook(hook, outcome);
    tracing::warn!(hook, status = code.as_u16(), error = %msg, "hook request refused");
    (code, axum::Json(json!({"error": msg}))).into_response()
}

/// Compares secrets without leaking where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

async fn metrics(State(st): State<AppState>) -> Response {
    let agents = match st.ctl.list_agents(None).await {
        Ok(a) => a
            .into_iter()
            .filter(|a| !a.record.revoked)
            .map(|a| (a.record.region, a.online))
            .collect::<Vec<_>>(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let rollouts: Vec<String> = st
        .ctl
        .rollouts(None)
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| {
            serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        })
        .collect();
    let body = st.ctl.metrics().render(&agents, &rollouts);
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

#[derive(Deserialize)]
struct AmPayload {
    #[serde(default)]
    version: Option<String>,
    alerts: Vec<AmAlert>,
}

#[derive(Deserialize)]
struct AmAlert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default, rename = "startsAt")]
    starts_at: String,
    #[serde(default)]
    fingerprint: String,
}

/// What one alert or hook call asks for.
struct Request {
    actor: String,
    action: String,
    app: String,
    region: Option<String>,
    reason: String,
}

async fn alertmanager(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let ctl = &st.ctl;
    let Some(token) = &st.hooks.token else {
        return error(
            ctl,
            "alertmanager",
            StatusCode::UNAUTHORIZED,
            "the alertmanager hook has no token configured",
        );
    };
    let given =
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => return error(ctl, "alertmanager", StatusCode::UNAUTHORIZED, "missing bearer token"),
        Some(g) if !same_secret(g, token) => {
            return error(ctl, "alertmanager", StatusCode::UNAUTHORIZED, "wrong bearer token")
        }
        Some(_) => {}
    }
    let payload: AmPayload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                ctl,
                "alertmanager",
                StatusCode::BAD_REQUEST,
                format!("not an Alertmanager webhook payload: {e}"),
            )
        }
    };
    if payload.version.as_deref().is_some_and(|v| v != "4") {
        return error(
            ctl,
            "alertmanager",
            StatusCode::BAD_REQUEST,
            "only webhook payload version 4 is supported",
        );
    }
    let mut requests = Vec::new();
    let mut skipped = Vec::new();
    for alert in &payload.alerts {
        let name = alert.labels.get("alertname").cloned().unwrap_or_else(|| "unnamed".into());
        if alert.status != "firing" {
            skipped.push(json!({"alert": name, "outcome": "resolved alerts do not act"}));
            continue;
        }
        let Some(rule) = st.hooks.rules.iter().find(|r| {
            r.labels.iter().all(|(k, v)| alert.labels.get(k) == Some(v))
                && r.regex.iter().all(|(k, re)| alert.labels.get(k).is_some_and(|v| re.is_match(v)))
        }) else {
            skipped.push(json!({"alert": name, "outcome": "no rule matches"}));
            continue;
        };
        let Some(app) = alert.labels.get(&rule.app_label).cloned() else {
            skipped.push(json!({"alert": name, "outcome": format!("no {} label", rule.app_label)}));
            continue;
        };
        let key = format!("am:{}:{}:{}", alert.fingerprint, alert.starts_at, rule.action);
        requests.push((
            key,
            Request {
                actor: format!("alert:{name}"),
                action: rule.action.clone(),
                app,
                region: alert.labels.get(&rule.region_label).cloned(),
                reason: format!("alert {name}"),
            },
        ));
    }
    // Validate every app before acting on any: an error must change nothing.
    for (_, r) in &requests {
        if !knows_app(ctl, &r.app).await {
            return error(
                ctl,
                "alertmanager",
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("no app named {:?} is deployed", r.app),
            );
        }
    }
    if requests.is_empty() && skipped.is_empty() {
        return error(ctl, "alertmanager", StatusCode::UNPROCESSABLE_ENTITY, "the payload has no alerts");
    }
    let mut actions = skipped;
    for (key, r) in requests {
        if ctl.seen(&key).await {
            actions.push(
                json!({"alert": r.actor, "app": r.app, "outcome": "duplicate delivery: already acted on"}),
            );
            continue;
        }
        let outcome = act(ctl, &r).await;
        ctl.mark_seen(&key).await;
        actions.push(json!({"alert": r.actor, "app": r.app, "region": r.region, "action": r.action, "outcome": outcome}));
    }
    ctl.metrics().hook("alertmanager", "ok");
    (StatusCode::OK, axum::Json(json!({"actions": actions}))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericBody {
    app: String,
    #[serde(default)]
    region: Option<String>,
    reason: String,
}

async fn generic(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let ctl = &st.ctl;
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (Some(ts), Some(sig)) = (header("x-convoy-timestamp"), header("x-convoy-signature")) else {
        return error(
            ctl,
            "rollback",
            StatusCode::UNAUTHORIZED,
            "missing X-Convoy-Timestamp or X-Convoy-Signature",
        );
    };
    let Ok(ts_num) = ts.parse::<i64>() else {
        return error(ctl, "rollback", StatusCode::UNAUTHORIZED, "X-Convoy-Timestamp is not Unix seconds");
    };
    if (now() - ts_num).abs() > MAX_SKEW_SECS {
        return error(
            ctl,
            "rollback",
            StatusCode::UNAUTHORIZED,
            "stale request: the timestamp is more than 5 minutes off",
        );
    }
    let Some(given) = sig.strip_prefix("sha256=").and_then(|h| hex::decode(h).ok()) else {
        return error(ctl, "rollback", StatusCode::UNAUTHORIZED, "X-Convoy-Signature must be sha256=<hex>");
    };
    let key_id = st.hooks.hmac_keys.iter().find_map(|(id, secret)| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&body);
        mac.verify_slice(&given).ok().map(|()| id.clone())
    });
    let Some(key_id) = key_id else {
        return error(
            ctl,
            "rollback",
            StatusCode::UNAUTHORIZED,
            "signature does not verify with any configured key",
        );
    };
    let replay_key = format!("sig:{}", hex::encode(&given));
    if ctl.seen(&replay_key).await {
        return error(
            ctl,
            "rollback",
            StatusCode::CONFLICT,
            "replayed request: this signature was already used",
        );
    }
    let b: GenericBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                ctl,
                "rollback",
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"app\", \"region\", \"reason\"}}: {e}"),
            )
        }
    };
    if !knows_app(ctl, &b.app).await {
        return error(
            ctl,
            "rollback",
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("no app named {:?} is deployed", b.app),
        );
    }
    ctl.mark_seen(&replay_key).await;
    let r = Request {
        actor: format!("hook:{key_id}"),
        action: "rollback".into(),
        app: b.app,
        region: b.region,
        reason: b.reason,
    };
    let outcome = act(ctl, &r).await;
    ctl.metrics().hook("rollback", "ok");
    (StatusCode::OK, axum::Json(json!({"app": r.app, "region": r.region, "outcome": outcome})))
        .into_response()
}

/// During an active rollout: rollback aborts it (rolling back moved agents), pause pauses it.
/// Otherwise rollback is a fleet rollback from the release the incident is about (the app's
/// latest rollout, else what most targeted agents run), at most once per (app, region, release
/// rolled back from): a further alert about the same incident is answered "already rolled back"
/// and changes nothing, and never rolls the fleet one step further.
async fn act(ctl: &HookActor, r: &Request) -> String {
    let rollouts = match ctl.rollouts(Some(r.app.clone())).await {
        Ok(list) => list,
        Err(e) => {
            tracing::error!(app = %r.app, error = %e, "cannot read rollouts: the hook does not act");
            return format!("not acted: cannot read rollouts: {e}");
        }
    };
    let active = rollouts.iter().find(|x| !x.state.is_final());
    let target = r.region.clone().unwrap_or_else(|| "*".into());
    let outcome = match (active, r.action.as_str()) {
        (Some(ro), "rollback") => match ctl.abort(&r.actor, &ro.id).await {
            Ok(()) => format!("aborted rollout {} and rolled back its agents", ro.id),
            Err(e) => format!("abort of rollout {} failed: {e}", ro.id),
        },
        (Some(ro), _) => match ctl.pause(&r.actor, &ro.id).await {
            Ok(()) => format!("paused rollout {}", ro.id),
            Err(e) => format!("pause of rollout {} failed: {e}", ro.id),
        },
        (None, "pause") => "no active rollout to pause".to_string(),
        (None, _) => {
            let from = match rollouts.last() {
                Some(ro) => ro.spec.version.clone(),
                None => match running_version(ctl, &r.app, r.region.as_deref()).await {
                    Ok(v) => v,
                    Err(e) => return format!("not acted: cannot read agents: {e}"),
                },
            };
            let once = format!("rb:{}:{target}:{from}", r.app);
            if from.is_empty() {
                format!("no agent runs {}: nothing to roll back", r.app)
            } else if ctl.seen(&once).await {
                format!("already rolled back from {}@{from} in {target}", r.app)
            } else {
                let t = r.region.clone().map(Target::Region).unwrap_or(Target::All);
                match ctl.rollback(&r.actor, &r.app, &t, Some(from.clone()), &r.reason).await {
                    Ok((results, took)) => {
                        ctl.mark_seen(&once).await;
                        let count = |f: fn(&crate::logic::Answer) -> bool| {
                            results
                                .iter()
                                .filter(|(_, res, _)| res.as_ref().is_ok_and(|o| f(&o.answer)))
                                .count()
                        };
                        let applied = count(|a| *a == crate::logic::Answer::Applied);
                        let already = count(|a| *a == crate::logic::Answer::AlreadyInState);
                        let not_done = results.len() - applied - already;
                        format!(
                            "rolled back {applied} of {} agent(s) from {}@{from} in {} ms; {already} already off it; {not_done} not done",
                            results.len(),
                            r.app,
                            took.as_millis()
                        )
                    }
                    Err(e) => format!("rollback failed: {e}"),
                }
            }
        }
    };
    ctl.audit(
        &r.actor,
        &r.action,
        &format!("{}/{target}", r.app),
        json!({"app": r.app, "region": r.region, "reason": r.reason}),
        &outcome,
    )
    .await;
    outcome
}

/// When a delivery or signature was first acted on.
#[derive(serde::Serialize, Deserialize)]
struct Seen {
    at: i64,
}

impl Controller {
    /// Whether a hook delivery or incident key was already acted on.
    pub(crate) async fn hook_seen(&self, key: &str) -> bool {
        let key = key.to_owned();
        self.blocking(move |c| Ok(c.store().get::<Seen>(Tree::HookSeen, &key)?.is_some()))
            .await
            .unwrap_or(false)
    }

    /// Records that a hook delivery or incident key was acted on.
    pub(crate) async fn mark_hook_seen(&self, key: &str) {
        let key = key.to_owned();
        let stored =
            self.blocking(move |c| Ok(c.store().put(Tree::HookSeen, &key, &Seen { at: now() }, true)?)).await;
        if let Err(e) = stored {
            // The action already happened; the worst outcome is that a redelivery acts again.
            tracing::error!(error = %e, "cannot record a hook delivery as acted on");
        }
    }
}

/// Whether an app is known: a release of it was pushed.
async fn knows_app(ctl: &HookActor, app: &str) -> bool {
    let releases = ctl.list_releases(Some(app.to_owned())).await.unwrap_or_default();
    !releases.is_empty()
}

/// The release most targeted agents run now (what a rollback would leave).
async fn running_version(ctl: &HookActor, app: &str, region: Option<&str>) -> crate::logic::Result<String> {
    let agents = ctl.list_agents(region.map(String::from)).await?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for a in agents {
        if let Some(s) = a.record.apps.iter().find(|s| s.app == app) {
            *counts.entry(s.current.clone()).or_default() += 1;
        }
    }
    Ok(counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v).unwrap_or_default())
}
