//! How the API answers: FHIR JSON, OperationOutcomes for refusals, and the request body
//! read strictly (size, media type, UTF-8, JSON). A 500 is our bug: it is logged with the
//! request id, which the OperationOutcome also carries.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::fhir::notification::operation_outcome;

/// Largest request body accepted.
pub(super) const MAX_BODY: usize = 256 * 1024;

tokio::task_local! {
    /// The id of the request being served, for 500s.
    pub(crate) static REQUEST_ID: String;
}

/// A FHIR JSON answer.
#[derive(Debug)]
pub(crate) struct Fhir(pub StatusCode, pub Value);

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

pub(super) fn outcome(status: StatusCode, code: &str, msg: &str, expr: Option<&str>) -> Fhir {
    Fhir(status, operation_outcome(code, msg, expr))
}

/// 400 naming the element or parameter.
pub(super) fn bad_request(expr: &str, msg: impl AsRef<str>) -> Fhir {
    outcome(StatusCode::BAD_REQUEST, "invalid", msg.as_ref(), Some(expr))
}

pub(super) fn not_found(what: &str) -> Fhir {
    outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        &format!("{what} is not known"),
        None,
    )
}

/// Our bug or an unreachable database: logged with the request id, which the answer names.
pub(super) fn internal(e: impl std::fmt::Display) -> Fhir {
    let id = REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "-".into());
    tracing::error!(request_id = %id, error = %e, "API request failed");
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        &format!("internal error; see the server log for request {id}"),
        None,
    )
}

/// The request body as a JSON object: within [`MAX_BODY`], a FHIR JSON media type (or
/// none), UTF-8, JSON.
pub(super) fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, Fhir> {
    check_media_type(headers)?;
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too-costly"
        } else {
            "structure"
        };
        outcome(
            status,
            code,
            &format!("request body: {}", e.body_text()),
            None,
        )
    })?;
    serde_json::from_slice(&body).map_err(|e| {
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

fn check_media_type(headers: &HeaderMap) -> Result<(), Fhir> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if matches!(
        essence,
        "application/fhir+json" | "application/json" | "application/json+fhir"
    ) {
        Ok(())
    } else {
        Err(outcome(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            &format!("media type {essence:?} is not supported; send application/fhir+json"),
            None,
        ))
    }
}

/// A FHIR id (`[A-Za-z0-9\-\.]{1,64}`) from a path.
pub(super) fn fhir_id(id: &str) -> Result<&str, Fhir> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(id)
    } else {
        Err(bad_request("id", "the id in the URL is not a FHIR id"))
    }
}

pub(super) fn searchset(base: &str, resources: Vec<Value>) -> Value {
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
