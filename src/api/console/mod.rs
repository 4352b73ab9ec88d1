//! `/console`: a read-only page for the people who run fhir-cdc. It shows what
//! `fhir-cdc status` shows (read from the slot and the queue), a chart of the last hour and,
//! per subscription, this process's last attempts. The page and its script are embedded in
//! the binary (no CDN, no build step). The page itself carries no data: it fetches
//! `/console/api/*`, which the API's authentication guards like `GET /Subscription`, so
//! with auth on it shows a token form and nothing else until a token works. Nothing it
//! serves holds resource content, endpoint paths or header values: references, hosts,
//! numbers and the receivers' status codes only.

pub(crate) mod history;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

use super::response::{bad_request, Fhir};
use super::Shared;
use crate::delivery::journal::Journal;
use crate::queue;
use history::History;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// What the console reads besides the API's own state.
pub(crate) struct Console {
    pub(crate) journal: Arc<Journal>,
    pub(crate) history: Arc<History>,
    /// The store's database, for the slot (two connections at most).
    store: deadpool_postgres::Pool,
}

impl Console {
    pub(crate) fn new(store_url: &str, journal: Arc<Journal>) -> anyhow::Result<Self> {
        Ok(Console {
            journal,
            history: Arc::default(),
            store: queue::pool(store_url, 2)?,
        })
    }
}

/// An embedded asset, never framed, scripts from this origin only.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// The status report and the last hour. 503 with the reason when a database does not
/// answer (the page says so).
pub(crate) async fn state(State(s): State<Shared>) -> Result<Response, Fhir> {
    let c = &s.console;
    let (src, q) = match (c.store.get().await, s.pool.get().await) {
        (Ok(src), Ok(q)) => (src, q),
        (Err(e), _) | (_, Err(e)) => return Ok(unavailable(&e.to_string())),
    };
    let report = match crate::status::report_with(&src, &q, &s.cfg).await {
        Ok(r) => r,
        Err(e) => return Ok(unavailable(&e.to_string())),
    };
    let body = json!({
        "generated_at": chrono::Utc::now(),
        "report": report,
        "history": c.history.minutes(),
        "sample_every_seconds": history::SAMPLE_EVERY.as_secs(),
    });
    Ok(Json(body).into_response())
}

fn unavailable(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": format!("a database did not answer: {why}") })),
    )
        .into_response()
}

/// The last attempts this process made for one subscription, newest first.
pub(crate) async fn attempts(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Fhir> {
    if id.len() > 64 {
        return Err(bad_request("id", "a FHIR id has at most 64 characters"));
    }
    Ok(Json(json!({
        "subscription": id,
        "attempts": s.console.journal.last(&id),
    }))
    .into_response())
}
