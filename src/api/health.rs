//! The HTTP face of a capture-only process (`fhir-cdc capture --health-listen ADDR`):
//! liveness, readiness and metrics, so an orchestrator can probe it and Prometheus can
//! scrape its slot lag. Opt-in, so a capture and a delivery process sharing one config file
//! on one host do not contend for `[api] listen`. It
//! carries no resource data, so it needs no authentication, as these paths of the full API.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio::sync::watch;

use crate::capture::lag::Health;

#[derive(Clone)]
struct Probe {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// Serves `/livez`, `/healthz`, `/readyz` and `/metrics` on `addr` (`capture
/// --health-listen`) until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(listen = %addr, "health and metrics listening (capture only)");
    let app = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(Probe { health, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await?;
    Ok(())
}

/// Ready while capture streams and its lag is not degraded; a standby waiting for the
/// slot's lock is alive but not ready.
async fn ready(State(p): State<Probe>) -> impl IntoResponse {
    if !p.health.is_streaming() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "capture is not streaming (standby, or starting)".to_string(),
        );
    }
    match p.health.degraded() {
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("degraded: {why}")),
        None => (StatusCode::OK, "ready".to_string()),
    }
}

async fn render(State(p): State<Probe>) -> impl IntoResponse {
    match &p.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed".into(),
        ),
    }
}
