//! What the server offers (`/metadata`, SubscriptionTopics) and how it is (`/healthz`,
//! `/readyz`, `/metrics`).

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use serde_json::{json, Value};

use super::params::Params;
use super::response::{fhir_id, not_found, searchset, Fhir};
use super::Shared;
use crate::config::Config;
use crate::fhir::notification::fhir_instant;
use crate::queue;

pub(super) async fn metadata(State(s): State<Shared>) -> Result<Fhir, Fhir> {
    use crate::config::FhirVersion;
    let topics: Vec<Value> = s
        .topics()
        .await?
        .iter()
        .map(|t| json!({"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical", "valueCanonical": t.url}))
        .collect();
    let bp = "http://hl7.org/fhir/uv/subscriptions-backport";
    let (fhir_version, instantiates, op_status, op_events) = match s.cfg.source.fhir_version {
        FhirVersion::R4 => (
            "4.0.1",
            Some(format!(
                "{bp}/CapabilityStatement/backport-subscription-server-r4"
            )),
            format!("{bp}/OperationDefinition/backport-subscription-status"),
            format!("{bp}/OperationDefinition/backport-subscription-events"),
        ),
        FhirVersion::R4B => (
            "4.3.0",
            Some(format!(
                "{bp}/CapabilityStatement/backport-subscription-server"
            )),
            format!("{bp}/OperationDefinition/backport-subscription-status"),
            format!("{bp}/OperationDefinition/backport-subscription-events"),
        ),
        FhirVersion::R5 | FhirVersion::R6 => (
            "5.0.0",
            None,
            "http://hl7.org/fhir/OperationDefinition/Subscription-status".to_string(),
            "http://hl7.org/fhir/OperationDefinition/Subscription-events".to_string(),
        ),
    };
    let op_ws = if instantiates.is_some() {
        format!("{bp}/OperationDefinition/backport-subscription-get-ws-binding-token")
    } else {
        "http://hl7.org/fhir/OperationDefinition/Subscription-get-ws-binding-token".to_string()
    };
    let channels = if s.cfg.channels.email.is_some() {
        "rest-hook, websocket, email, message"
    } else {
        "rest-hook, websocket, message (email is not configured)"
    };
    let mut subscription = json!({
        "type": "Subscription",
        "extension": topics,
        "documentation": format!("Channels: {channels}. Payloads: empty, id-only, full-resource. Notifications: handshake, heartbeat, event-notification; query-status ($status), query-event ($events)."),
        "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}, {"code": "delete"}, {"code": "search-type"}],
        "searchParam": [{"name": "status", "type": "token"}, {"name": "url", "type": "uri"}],
        "operation": [{"name": "status", "definition": op_status}, {"name": "events", "definition": op_events}, {"name": "get-ws-binding-token", "definition": op_ws}]
    });
    if instantiates.is_some() {
        subscription["supportedProfile"] =
            json!([format!("{bp}/StructureDefinition/backport-subscription")]);
    }
    let mut cs = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhir_instant(Utc::now()),
        "kind": "instance",
        "software": {"name": "fhir-cdc", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhir-cdc topic-based subscriptions", "url": s.cfg.api.base_url()},
        "fhirVersion": fhir_version,
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "resource": [
                subscription,
                {"type": "SubscriptionTopic", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [{"name": "url", "type": "uri"}, {"name": "resource", "type": "uri"}]}
            ]
        }]
    });
    if let Some(i) = instantiates {
        cs["instantiates"] = json!([i]);
    }
    Ok(Fhir(StatusCode::OK, cs))
}

pub(super) async fn list_topics(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Fhir, Fhir> {
    let p = Params::parse(q.as_deref(), &["url", "resource"])?;
    let list = s
        .topics()
        .await?
        .iter()
        .filter(|t| p.text("url").is_none_or(|u| u == t.url))
        .filter(|t| {
            p.text("resource").is_none_or(|r| {
                let r = crate::fhir::topic::resource_type_of(r);
                t.triggers.iter().any(|tr| tr.resource_type == r)
            })
        })
        .map(|t| t.resource.clone())
        .collect();
    Ok(Fhir(StatusCode::OK, searchset(&s.cfg.api.base_url(), list)))
}

pub(super) async fn read_topic(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Fhir, Fhir> {
    let id = fhir_id(&id)?;
    match s.topics().await?.iter().find(|t| t.id == id) {
        Some(t) => Ok(Fhir(StatusCode::OK, t.resource.clone())),
        None => Err(not_found(&format!("SubscriptionTopic/{id}"))),
    }
}

pub(super) async fn ready(State(s): State<Shared>) -> impl IntoResponse {
    if let Some(c) = &s.capture {
        if !c.is_streaming() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "capture is not streaming yet".to_string(),
            );
        }
        if let Some(why) = c.degraded() {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("degraded: {why}"));
        }
    }
    match s.pool.get().await {
        Ok(c) if queue::ping(&**c).await.is_ok() => (StatusCode::OK, "ready".to_string()),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "queue database unreachable".to_string(),
        ),
    }
}

pub(super) async fn prometheus(State(s): State<Shared>) -> impl IntoResponse {
    if let Ok(c) = s.pool.get().await {
        // With capture in this process its lag monitor keeps the slot gauges.
        refresh_gauges(&c, &s.cfg, s.capture.is_none()).await;
    }
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed".into(),
        ),
    }
}

/// Gauges read from the database at scrape time: slot lag and queue depth.
async fn refresh_gauges(c: &deadpool_postgres::Client, cfg: &Config, slot_lag: bool) {
    if slot_lag {
        if let Ok(Some(lag)) = queue::slot_lag_bytes(&***c, &cfg.source.slot).await {
            metrics::gauge!(crate::metrics::SLOT_LAG_BYTES).set(lag);
        }
    }
    if let Ok(counts) = queue::subscriptions_by_status(&***c).await {
        for (status, n) in counts {
            metrics::gauge!(crate::metrics::SUBSCRIPTIONS, "status" => status).set(n);
        }
    }
    if let Ok(depths) = queue::pending_by_topic(&***c).await {
        for (topic, n) in depths {
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "topic" => topic).set(n);
        }
    }
}
