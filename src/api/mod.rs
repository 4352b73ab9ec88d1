//! The HTTP API: Subscriptions for stores whose own API cannot take them, topics,
//! `$status`, health and metrics.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

use crate::config::Config;
use crate::delivery::payload::Payloads;
use crate::fhir::notification::{
    bundle, fhir_instant, operation_outcome, status_resource, Kind, StatusInfo,
};
use crate::fhir::subscription::{self, Rules};
use crate::fhir::topic::Topic;
use crate::queue::{self, subscriptions};

pub struct ApiState {
    pub cfg: Arc<Config>,
    pub pool: deadpool_postgres::Pool,
    pub metrics: Option<PrometheusHandle>,
    pub payloads: Payloads,
    /// Search parameters of the store's FHIR version, for checking filters.
    pub registry: Arc<crate::fhir::search::registry::Registry>,
    /// Set when capture runs in this process: ready only while it streams.
    pub capture_streaming: Option<Arc<AtomicBool>>,
    pub topics: Arc<crate::topics::Registry>,
}

type Shared = Arc<ApiState>;

/// A FHIR JSON answer.
struct Fhir(StatusCode, Value);

impl IntoResponse for Fhir {
    fn into_response(self) -> Response {
        let mut r = (self.0, self.1.to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        r
    }
}

fn outcome(status: StatusCode, code: &str, msg: &str, expr: Option<&str>) -> Fhir {
    Fhir(status, operation_outcome(code, msg, expr))
}

fn internal(e: impl std::fmt::Display) -> Fhir {
    tracing::error!(error = %e, "API request failed");
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "internal error; see the server log",
        None,
    )
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/metadata", get(metadata))
        .route("/SubscriptionTopic", get(list_topics))
        .route("/SubscriptionTopic/{id}", get(read_topic))
        .route(
            "/Subscription",
            get(search_subscriptions).post(create_subscription),
        )
        .route(
            "/Subscription/{id}",
            get(read_subscription)
                .put(update_subscription)
                .delete(delete_subscription),
        )
        .route("/Subscription/$status", get(status_all).post(status_all))
        .route(
            "/Subscription/{id}/$status",
            get(status_one).post(status_one),
        )
        .route("/Subscription/{id}/$events", get(events).post(events_post))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus))
        .with_state(state)
}

/// Serves the API until `shutdown` flips.
pub async fn serve(state: Shared, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(state.cfg.api.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", state.cfg.api.listen))?;
    tracing::info!(listen = %state.cfg.api.listen, "API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await?;
    Ok(())
}

async fn ready(State(s): State<Shared>) -> impl IntoResponse {
    if let Some(c) = &s.capture_streaming {
        if !c.load(Ordering::SeqCst) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "capture is not streaming yet",
            );
        }
    }
    match s.pool.get().await {
        Ok(c) if queue::ping(&**c).await.is_ok() => (StatusCode::OK, "ready"),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "queue database unreachable",
        ),
    }
}

async fn prometheus(State(s): State<Shared>) -> impl IntoResponse {
    if let Ok(c) = s.pool.get().await {
        refresh_gauges(&c, &s.cfg).await;
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
async fn refresh_gauges(c: &deadpool_postgres::Client, cfg: &Config) {
    if let Ok(Some(lag)) = queue::slot_lag_bytes(&***c, &cfg.source.slot).await {
        metrics::gauge!(crate::metrics::SLOT_LAG_BYTES).set(lag);
    }
    if let Ok(depths) = queue::pending_by_topic(&***c).await {
        for (topic, n) in depths {
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "topic" => topic).set(n);
        }
    }
}

impl ApiState {
    /// Configured topics and those created in the store.
    async fn topics(&self) -> Result<Arc<Vec<Topic>>, Fhir> {
        self.topics.all().await.map_err(internal)
    }
}

async fn metadata(State(s): State<Shared>) -> Result<Fhir, Fhir> {
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
    let mut subscription = json!({
        "type": "Subscription",
        "extension": topics,
        "documentation": "Channels: rest-hook. Payloads: empty, id-only, full-resource. Notifications: handshake, heartbeat, event-notification; query-status ($status), query-event ($events).",
        "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}, {"code": "delete"}, {"code": "search-type"}],
        "searchParam": [{"name": "status", "type": "token"}, {"name": "url", "type": "uri"}],
        "operation": [{"name": "status", "definition": op_status}, {"name": "events", "definition": op_events}]
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

fn searchset(base: &str, resources: Vec<Value>) -> Value {
    let total = resources.len();
    let entry: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let full = format!(
                "{base}/{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            );
            json!({"fullUrl": full, "resource": r, "search": {"mode": "match"}})
        })
        .collect();
    json!({"resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "searchset", "total": total, "entry": entry})
}

#[derive(Deserialize)]
struct TopicQuery {
    url: Option<String>,
    resource: Option<String>,
}

async fn list_topics(State(s): State<Shared>, Query(q): Query<TopicQuery>) -> Result<Fhir, Fhir> {
    let list = s
        .topics()
        .await?
        .iter()
        .filter(|t| q.url.as_deref().is_none_or(|u| u == t.url))
        .filter(|t| {
            q.resource.as_deref().is_none_or(|r| {
                let r = crate::fhir::topic::resource_type_of(r);
                t.triggers.iter().any(|tr| tr.resource_type == r)
            })
        })
        .map(|t| t.resource.clone())
        .collect();
    Ok(Fhir(StatusCode::OK, searchset(&s.cfg.api.base_url(), list)))
}

async fn read_topic(State(s): State<Shared>, Path(id): Path<String>) -> Result<Fhir, Fhir> {
    match s.topics().await?.iter().find(|t| t.id == id) {
        Some(t) => Ok(Fhir(StatusCode::OK, t.resource.clone())),
        None => Err(outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("SubscriptionTopic/{id} is not known"),
            None,
        )),
    }
}

fn parse_body(body: &str) -> Result<Value, Fhir> {
    serde_json::from_str(body).map_err(|e| {
        outcome(
            StatusCode::BAD_REQUEST,
            "structure",
            &format!(
                "request body is not valid JSON (line {} column {})",
                e.line(),
                e.column()
            ),
            None,
        )
    })
}

async fn validate(s: &ApiState, v: &Value) -> Result<subscription::SubscriptionSpec, Fhir> {
    let topics = s.topics().await?;
    let rules = Rules {
        registry: Some(&s.registry),
        format: s.cfg.source.fhir_version.into(),
        topics: &topics,
        allow_private_endpoints: s.cfg.delivery.allow_private_endpoints,
        require_https_for_full_resource: s.cfg.delivery.require_https_for_full_resource,
    };
    subscription::parse(v, &rules).map_err(|e| {
        let status = if e.code == "structure" {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        outcome(status, e.code, &e.message, Some(e.expression))
    })
}

async fn create_subscription(State(s): State<Shared>, body: String) -> Result<Response, Fhir> {
    let v = parse_body(&body)?;
    let spec = validate(&s, &v).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let c = s.pool.get().await.map_err(internal)?;
    subscriptions::upsert(&**c, &id, "api", &spec, &v)
        .await
        .map_err(internal)?;
    let row = subscriptions::get(&**c, &id)
        .await
        .map_err(internal)?
        .ok_or_else(|| internal("vanished"))?;
    tracing::info!(subscription = %id, topic = %spec.topic_url, "subscription created");
    let mut resp = Fhir(StatusCode::CREATED, row.to_resource()).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("{}/Subscription/{id}", s.cfg.api.base_url())) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

async fn update_subscription(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: String,
) -> Result<Fhir, Fhir> {
    let v = parse_body(&body)?;
    if let Some(body_id) = v.get("id").and_then(Value::as_str) {
        if body_id != id {
            return Err(outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "resource id does not match the URL",
                Some("id"),
            ));
        }
    }
    let spec = validate(&s, &v).await?;
    let c = s.pool.get().await.map_err(internal)?;
    let existing = subscriptions::get(&**c, &id).await.map_err(internal)?;
    let Some(existing) = existing else {
        return Err(outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Subscription/{id} is not known"),
            None,
        ));
    };
    if existing.topic != spec.topic_url {
        return Err(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "a Subscription's topic cannot change; create a new Subscription",
            Some("topic"),
        ));
    }
    subscriptions::upsert(&**c, &id, &existing.origin, &spec, &v)
        .await
        .map_err(internal)?;
    let row = subscriptions::get(&**c, &id)
        .await
        .map_err(internal)?
        .ok_or_else(|| internal("vanished"))?;
    Ok(Fhir(StatusCode::OK, row.to_resource()))
}

async fn read_subscription(State(s): State<Shared>, Path(id): Path<String>) -> Fhir {
    let c = match s.pool.get().await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    match subscriptions::get(&**c, &id).await {
        Ok(Some(r)) => Fhir(StatusCode::OK, r.to_resource()),
        Ok(None) => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Subscription/{id} is not known"),
            None,
        ),
        Err(e) => internal(e),
    }
}

async fn delete_subscription(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let c = match s.pool.get().await {
        Ok(c) => c,
        Err(e) => return internal(e).into_response(),
    };
    match subscriptions::delete(&**c, &id).await {
        Ok(true) => {
            tracing::info!(subscription = %id, "subscription deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Subscription/{id} is not known"),
            None,
        )
        .into_response(),
        Err(e) => internal(e).into_response(),
    }
}

#[derive(Deserialize)]
struct SubQuery {
    status: Option<String>,
    url: Option<String>,
}

async fn search_subscriptions(State(s): State<Shared>, Query(q): Query<SubQuery>) -> Fhir {
    let c = match s.pool.get().await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    match subscriptions::search(&**c, q.status.as_deref(), q.url.as_deref()).await {
        Ok(rows) => Fhir(
            StatusCode::OK,
            searchset(
                &s.cfg.api.base_url(),
                rows.iter().map(|r| r.to_resource()).collect(),
            ),
        ),
        Err(e) => internal(e),
    }
}

fn status_info(row: &subscriptions::SubscriptionRow) -> StatusInfo {
    StatusInfo {
        subscription_id: row.id.clone(),
        status: row.status,
        events_since_start: row.events_since_start,
        topic_url: row.topic.clone(),
        errors: row.last_error.iter().cloned().collect(),
    }
}

/// A searchset of status resources (what `$status` answers).
fn status_searchset(s: &ApiState, rows: &[subscriptions::SubscriptionRow]) -> Value {
    let base = s.cfg.api.base_url();
    let entry: Vec<Value> = rows
        .iter()
        .map(|row| {
            let st = status_resource(
                s.cfg.source.fhir_version.into(),
                Kind::QueryStatus,
                &status_info(row),
                &[],
                row.content,
                &base,
            );
            let id = st["id"].as_str().unwrap_or_default().to_string();
            json!({"fullUrl": format!("urn:uuid:{id}"), "resource": st, "search": {"mode": "match"}})
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": entry.len(),
        "entry": entry
    })
}

async fn load(s: &ApiState, id: &str) -> Result<subscriptions::SubscriptionRow, Fhir> {
    let c = s.pool.get().await.map_err(internal)?;
    subscriptions::get(&**c, id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("Subscription/{id} is not known"),
                None,
            )
        })
}

async fn status_one(State(s): State<Shared>, Path(id): Path<String>) -> Result<Fhir, Fhir> {
    let row = load(&s, &id).await?;
    Ok(Fhir(StatusCode::OK, status_searchset(&s, &[row])))
}

#[derive(Deserialize)]
struct StatusQuery {
    /// Comma-separated ids.
    id: Option<String>,
    /// Comma-separated statuses.
    status: Option<String>,
}

async fn status_all(State(s): State<Shared>, Query(q): Query<StatusQuery>) -> Result<Fhir, Fhir> {
    let c = s.pool.get().await.map_err(internal)?;
    let rows = subscriptions::search(&**c, None, None)
        .await
        .map_err(internal)?;
    let ids: Option<Vec<&str>> = q.id.as_deref().map(|v| v.split(',').collect());
    let statuses: Option<Vec<&str>> = q.status.as_deref().map(|v| v.split(',').collect());
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| ids.as_ref().is_none_or(|ids| ids.contains(&r.id.as_str())))
        .filter(|r| {
            statuses
                .as_ref()
                .is_none_or(|st| st.contains(&r.status.as_str()))
        })
        .collect();
    Ok(Fhir(StatusCode::OK, status_searchset(&s, &rows)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct EventsQuery {
    events_since_number: Option<i64>,
    events_until_number: Option<i64>,
    content: Option<String>,
}

/// Most events one `$events` answer carries.
const EVENTS_LIMIT: i64 = 1000;

async fn events(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Fhir, Fhir> {
    events_answer(&s, &id, q).await
}

/// POST form: the parameters in a Parameters body.
async fn events_post(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: String,
) -> Result<Fhir, Fhir> {
    let mut q = EventsQuery::default();
    if !body.trim().is_empty() {
        let v = parse_body(&body)?;
        for p in v["parameter"].as_array().into_iter().flatten() {
            let value = [
                "valueString",
                "valueCode",
                "valueInteger",
                "valueInteger64",
                "valueUnsignedInt",
            ]
            .iter()
            .find_map(|k| p.get(*k))
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            });
            match p["name"].as_str() {
                Some("eventsSinceNumber") => {
                    q.events_since_number = value.and_then(|v| v.parse().ok())
                }
                Some("eventsUntilNumber") => {
                    q.events_until_number = value.and_then(|v| v.parse().ok())
                }
                Some("content") => q.content = value,
                _ => {}
            }
        }
    }
    events_answer(&s, &id, q).await
}

async fn events_answer(s: &ApiState, id: &str, q: EventsQuery) -> Result<Fhir, Fhir> {
    let row = load(s, id).await?;
    let content = match q.content.as_deref() {
        None => row.content,
        Some(c) => subscription::Content::parse(c).ok_or_else(|| {
            outcome(
                StatusCode::BAD_REQUEST,
                "value",
                &format!("content {c:?} is not empty, id-only or full-resource"),
                None,
            )
        })?,
    };
    let until = q.events_until_number.unwrap_or(row.events_since_start);
    let since = q
        .events_since_number
        .unwrap_or_else(|| (until - EVENTS_LIMIT + 1).max(1));
    if since > until {
        return Err(outcome(
            StatusCode::BAD_REQUEST,
            "value",
            "eventsSinceNumber is greater than eventsUntilNumber",
            None,
        ));
    }
    let c = s.pool.get().await.map_err(internal)?;
    let rows = subscriptions::events_between(&**c, id, since, until, EVENTS_LIMIT)
        .await
        .map_err(internal)?;
    let shapes = s.topics.shapes(&row.topic).await;
    let mut events = Vec::with_capacity(rows.len());
    for p in &rows {
        events.push(s.payloads.event(content, &shapes, p).await);
    }
    Ok(Fhir(
        StatusCode::OK,
        bundle(
            s.cfg.source.fhir_version.into(),
            Kind::QueryEvent,
            &status_info(&row),
            &events,
            content,
            &s.cfg.api.base_url(),
            Utc::now(),
        ),
    ))
}

/// Builds the API state from a config (pool sized for the API only).
pub fn state(
    cfg: Arc<Config>,
    metrics: Option<PrometheusHandle>,
    capture_streaming: Option<Arc<AtomicBool>>,
    searcher: Arc<crate::fhir::search::Searcher>,
    payloads: Payloads,
    topics: Arc<crate::topics::Registry>,
) -> anyhow::Result<Shared> {
    Ok(Arc::new(ApiState {
        topics,
        pool: queue::pool(cfg.queue_url(), 8)?,
        registry: searcher.registry.clone(),
        payloads,
        cfg,
        metrics,
        capture_streaming,
    }))
}
