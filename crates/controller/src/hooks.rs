//! The controller's HTTP side: `/healthz`, `/metrics`, and the alert hooks.
//!
//! `POST /v1/hooks/alertmanager` takes Alertmanager's webhook payload (version 4) with a bearer
//! token; `POST /v1/hooks/rollback` takes `{"app", "region", "reason"}` signed with HMAC-SHA256
//! over `"<timestamp>.<body>"`. Errors are JSON: 401 unauthenticated, 400 malformed, 409 replayed,
//! 422 no matching app, 503 when the state store or the audit log cannot be written. Nothing
//! changes on an error.
//!
//! Acting once: a delivery (and a signature, and a rollback away from a given release) is
//! recorded with an atomic insert-if-absent before anything is done. Only the request that wins
//! the insert acts; a concurrent or later duplicate sees the record and does nothing. When the
//! record cannot be written the hook refuses with 503 rather than risk acting twice.

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
use crate::logic::alerts::{claim_outcome, Claim, Request, Unavailable};
use crate::logic::{AlertPolicy, Environment};
use crate::time::now;

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
    environment_label: String,
}

/// A hook rule that cannot be compiled: a `labels_regex` that is not a valid regex.
#[derive(Debug, thiserror::Error)]
#[error("label {label:?}: {source}")]
pub struct ConfigError {
    label: String,
    #[source]
    source: regex::Error,
}

impl HookConfig {
    pub fn from_config(c: &HooksConfig) -> Result<Self, ConfigError> {
        let mut rules = Vec::new();
        for r in &c.rules {
            let mut regex = Vec::new();
            for (k, re) in &r.labels_regex {
                let compiled = regex::Regex::new(&format!("^(?:{re})$"))
                    .map_err(|source| ConfigError { label: k.clone(), source })?;
                regex.push((k.clone(), compiled));
            }
            rules.push(Rule {
                labels: r.labels.clone(),
                regex,
                action: r.action.clone(),
                app_label: r.app_label.clone(),
                region_label: r.region_label.clone(),
                environment_label: r.environment_label.clone(),
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
    ctl: AlertPolicy,
    hooks: HookConfig,
}

/// The HTTP routes. Hooks act through the alert policy, which can only roll back, pause or abort.
pub fn router(ctl: AlertPolicy, hooks: HookConfig) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/hooks/alertmanager", post(alertmanager))
        .route("/v1/hooks/rollback", post(generic))
        .with_state(AppState { ctl, hooks })
}

fn error(ctl: &AlertPolicy, hook: &str, code: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    let outcome = match code {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::BAD_REQUEST => "malformed",
        StatusCode::CONFLICT => "replayed",
        StatusCode::UNPROCESSABLE_ENTITY => "no_matching_app",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
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

/// The scrape: rendered from in-memory counts only, never from store records (see
/// [`crate::metrics`]).
async fn metrics(State(st): State<AppState>) -> Response {
    let body = st.ctl.metrics().render();
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
        // Alertmanager always sends a fingerprint; a sender that does not is identified by the
        // alert's labels, so distinct alerts never share one delivery record.
        let fingerprint = if alert.fingerprint.is_empty() {
            let labels = serde_json::to_string(&alert.labels).unwrap_or_default();
            format!("labels-{}", hex::encode(Sha256::digest(labels.as_bytes())))
        } else {
            alert.fingerprint.clone()
        };
        let environment = match alert.labels.get(&rule.environment_label) {
            None => Environment::default(),
            Some(e) => match Environment::parse(e) {
                Ok(e) => e,
                Err(e) => {
                    skipped.push(json!({"alert": name, "outcome": e.to_string()}));
                    continue;
                }
            },
        };
        let key = format!("am:{fingerprint}:{}:{}", alert.starts_at, rule.action);
        requests.push((
            key,
            Request {
                actor: format!("alert:{name}"),
                action: rule.action.clone(),
                app,
                region: alert.labels.get(&rule.region_label).cloned(),
                environment,
                reason: format!("alert {name}"),
            },
        ));
    }
    // Validate every app before acting on any: an error must change nothing.
    for (_, r) in &requests {
        let known = match ctl.knows_app(&r.app).await {
            Ok(k) => k,
            Err(e) => return unavailable(ctl, "alertmanager", e),
        };
        if !known {
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
        // Alerts acted on before a refusal keep their records, so Alertmanager's retry of this
        // delivery acts only on the rest.
        match claim_outcome(ctl.claim(&key).await) {
            Ok(Claim::Won) => {}
            Ok(Claim::Already) => {
                actions.push(
                    json!({"alert": r.actor, "app": r.app, "outcome": "duplicate delivery: already acted on"}),
                );
                continue;
            }
            Err(e) => return unavailable(ctl, "alertmanager", e),
        }
        let outcome = match ctl.act(&r).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing was done for this alert: give the delivery back so the retry acts.
                ctl.release(&key).await;
                return unavailable(ctl, "alertmanager", e);
            }
        };
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
    /// Production when left out.
    #[serde(default)]
    environment: Option<String>,
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
    let b: GenericBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                ctl,
                "rollback",
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"app\", \"region\", \"environment\", \"reason\"}}: {e}"),
            )
        }
    };
    let environment = match b.environment.as_deref().map(Environment::parse).transpose() {
        Ok(e) => e.unwrap_or_default(),
        Err(e) => return error(ctl, "rollback", StatusCode::BAD_REQUEST, e.to_string()),
    };
    let known = match ctl.knows_app(&b.app).await {
        Ok(k) => k,
        Err(e) => return unavailable(ctl, "rollback", e),
    };
    if !known {
        return error(
            ctl,
            "rollback",
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("no app named {:?} is deployed", b.app),
        );
    }
    match claim_outcome(ctl.claim(&replay_key).await) {
        Ok(Claim::Won) => {}
        Ok(Claim::Already) => {
            return error(
                ctl,
                "rollback",
                StatusCode::CONFLICT,
                "replayed request: this signature was already used",
            )
        }
        Err(e) => return unavailable(ctl, "rollback", e),
    }
    let r = Request {
        actor: format!("hook:{key_id}"),
        action: "rollback".into(),
        app: b.app,
        region: b.region,
        environment,
        reason: b.reason,
    };
    let outcome = match ctl.act(&r).await {
        Ok(o) => o,
        Err(e) => {
            // Nothing was done: the same signed request may be retried.
            ctl.release(&replay_key).await;
            return unavailable(ctl, "rollback", e);
        }
    };
    ctl.metrics().hook("rollback", "ok");
    (StatusCode::OK, axum::Json(json!({"app": r.app, "region": r.region, "outcome": outcome})))
        .into_response()
}

fn unavailable(ctl: &AlertPolicy, hook: &str, e: Unavailable) -> Response {
    error(ctl, hook, StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_refuses_instead_of_reading_as_not_seen() {
        assert_eq!(claim_outcome(Ok(true)).unwrap(), Claim::Won);
        assert_eq!(claim_outcome(Ok(false)).unwrap(), Claim::Already);
        let err = crate::logic::Error::Store(crate::store::Error::Sled(sled::Error::Unsupported(
            "disk full".into(),
        )));
        let refused = claim_outcome(Err(err)).unwrap_err();
        assert!(refused.0.contains("not acted on") && refused.0.contains("disk full"), "{refused}");
    }
}
