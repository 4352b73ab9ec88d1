//! The HTTP API: Subscriptions for stores whose own API cannot take them, topics,
//! `$status`/`$events`, health and metrics. Every request gets an id (`x-request-id`); input
//! is read strictly, so a request can be refused (4xx, with an OperationOutcome naming what
//! is wrong) but never answered with a 500 for its content alone.

pub(crate) mod auth;
pub(crate) mod console;
pub mod health;
mod metadata;
mod operations;
mod params;
mod response;
mod subscriptions;
mod websocket;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio::sync::watch;

use crate::config::Config;
use crate::delivery::payload::Payloads;
use crate::fhir::topic::Topic;
use crate::queue;
use response::{internal, Fhir, MAX_BODY, REQUEST_ID};

pub struct ApiState {
    pub(crate) cfg: Arc<Config>,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) payloads: Payloads,
    /// Search parameters of the store's FHIR version, for checking filters.
    pub(crate) registry: Arc<crate::fhir::search::registry::Registry>,
    /// Set when capture runs in this process: ready only while it streams.
    /// Capture's health when it runs in this process (`/readyz`).
    pub(crate) capture: Option<Arc<crate::capture::lag::Health>>,
    pub(crate) topics: Arc<crate::topic_registry::TopicRegistry>,
    /// `[api.auth]`; `None`: the API listens on loopback only (or was told otherwise).
    pub(crate) auth: Option<Arc<auth::Auth>>,
    /// The websocket sockets of this process (delivery sends through the same hub).
    pub(crate) hub: Arc<crate::channel::websocket::Hub>,
    pub(crate) console: console::Console,
}

type Shared = Arc<ApiState>;

impl ApiState {
    /// Configured topics and those created in the store.
    async fn topics(&self) -> Result<Arc<Vec<Topic>>, Fhir> {
        self.topics.all().await.map_err(internal)
    }
}

pub(crate) fn router(state: Shared) -> Router {
    use operations::{events_get, events_post, status_all, status_one};
    Router::new()
        .route("/metadata", get(metadata::metadata))
        .route("/SubscriptionTopic", get(metadata::list_topics))
        .route("/SubscriptionTopic/{id}", get(metadata::read_topic))
        .route(
            "/Subscription",
            get(subscriptions::search).post(subscriptions::create),
        )
        .route(
            "/Subscription/{id}",
            get(subscriptions::read)
                .put(subscriptions::update)
                .delete(subscriptions::delete),
        )
        .route("/Subscription/$status", get(status_all).post(status_all))
        .route(
            "/Subscription/$get-ws-binding-token",
            get(websocket::token_type).post(websocket::token_type),
        )
        .route(
            "/Subscription/{id}/$get-ws-binding-token",
            get(websocket::token_one).post(websocket::token_one),
        )
        .route("/ws", get(websocket::socket))
        .route(
            "/Subscription/{id}/$status",
            get(status_one).post(status_one),
        )
        .route(
            "/Subscription/{id}/$events",
            get(events_get).post(events_post),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(metadata::ready))
        .route("/metrics", get(metadata::prometheus))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::script))
        .route("/console/console.css", get(console::style))
        .route("/console/api/state", get(console::state))
        .route("/console/api/attempts/{id}", get(console::attempts))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Gives each request an id: in the `x-request-id` answer header, and in the log line and
/// OperationOutcome of a 500.
async fn request_id(req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Serves the API until `shutdown` flips.
pub async fn serve(state: Shared, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(state.cfg.api.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", state.cfg.api.listen))?;
    let api = &state.cfg.api;
    if api.auth.is_none() && !api.listen.ip().is_loopback() {
        tracing::warn!(listen = %api.listen, "API listening WITHOUT AUTHENTICATION on a non-loopback address (api.allow_unauthenticated = true): anyone who reaches it can subscribe to PHI");
    }
    tracing::info!(listen = %state.cfg.api.listen, auth = api.auth.is_some(), "API listening");
    tokio::spawn(console::history::run(
        state.cfg.clone(),
        state.console.history.clone(),
        state.console.journal.clone(),
        shutdown.clone(),
    ));
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await?;
    Ok(())
}

/// What the API shares with delivery in the same process.
pub struct WithDelivery {
    pub payloads: Payloads,
    pub topics: Arc<crate::topic_registry::TopicRegistry>,
    /// The websocket sockets delivery sends through.
    pub hub: Arc<crate::channel::websocket::Hub>,
    /// Delivery's recent attempts, for the console.
    pub journal: Arc<crate::delivery::journal::Journal>,
}

/// Builds the API state from a config (pool sized for the API only; static tokens and the
/// JWKS loaded).
pub async fn state(
    cfg: Arc<Config>,
    metrics: Option<PrometheusHandle>,
    capture: Option<Arc<crate::capture::lag::Health>>,
    searcher: Arc<crate::fhir::search::Searcher>,
    d: WithDelivery,
) -> anyhow::Result<Shared> {
    let auth = match &cfg.api.auth {
        Some(a) => Some(Arc::new(auth::Auth::from_config(a).await?)),
        None => None,
    };
    Ok(Arc::new(ApiState {
        console: console::Console::new(&cfg.source.url, d.journal)?,
        auth,
        hub: d.hub,
        topics: d.topics,
        pool: queue::pool(cfg.queue_url(), 8)?,
        registry: searcher.registry.clone(),
        payloads: d.payloads,
        cfg,
        metrics,
        capture,
    }))
}
