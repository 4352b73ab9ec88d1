//! `$status` (instance and type level) and `$events`, GET and POST, with their parameters
//! read strictly.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde_json::{json, Value};

use super::auth::{needed, Action, Principal};
use super::params::Params;
use super::response::{bad_request, fhir_id, internal, json_body, not_found, Fhir};
use super::{ApiState, Shared};
use crate::fhir::notification::{bundle, status_resource, Kind, StatusInfo};
use crate::fhir::subscription::Content;
use crate::queue::gaps::{self, Gap};
use crate::queue::subscriptions::{self, SubscriptionRow};
use crate::queue::{dead, matched, retention};
use std::collections::HashMap;

/// Most events one `$events` answer carries.
const EVENTS_LIMIT: i64 = 1000;
const STATUS_CODES: &[&str] = &["requested", "active", "error", "off"];
const CONTENT_CODES: &[&str] = &["empty", "id-only", "full-resource"];
const EVENTS_PARAMS: &[&str] = &["eventsSinceNumber", "eventsUntilNumber", "content"];

/// The status of `row`: its last delivery error, then every capture gap (a slot lost and
/// resynced from now) that happened while it existed.
/// Dead letters are reported as an error entry, so a subscriber learns that events it will
/// not get by waiting exist (and an operator where to look).
fn status_info(row: &SubscriptionRow, since_start: i64, gaps: &[Gap], dead: i64) -> StatusInfo {
    let mut errors: Vec<String> = row.last_error.iter().cloned().collect();
    if dead > 0 {
        errors.push(format!(
            "{dead} event(s) of this subscription could not be delivered and are dead letters (fhir-cdc dead-letters list --subscription {})",
            row.id
        ));
    }
    StatusInfo {
        subscription_id: row.id.clone(),
        status: row.status,
        events_since_start: since_start,
        topic_url: row.topic.clone(),
        errors,
        gaps: gaps::affecting(gaps, row.created_at),
    }
}

/// A searchset of status resources (what `$status` answers).
fn status_searchset(
    s: &ApiState,
    rows: &[SubscriptionRow],
    since: &HashMap<String, i64>,
    gaps: &[Gap],
    dead: &HashMap<String, i64>,
) -> Value {
    let base = s.cfg.api.base_url();
    let entry: Vec<Value> = rows
        .iter()
        .map(|row| {
            let st = status_resource(
                s.cfg.source.fhir_version.into(),
                Kind::QueryStatus,
                &status_info(
                    row,
                    since.get(&row.id).copied().unwrap_or(row.cursor.number),
                    gaps,
                    dead.get(&row.id).copied().unwrap_or(0),
                ),
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

/// eventsSinceSubscriptionStart of each row: its settled events and those waiting after
/// its cursor (matched now, with its filters).
async fn since_start<C: tokio_postgres::GenericClient>(
    c: &C,
    rows: &[SubscriptionRow],
) -> Result<HashMap<String, i64>, Fhir> {
    let mut out = HashMap::new();
    for row in rows {
        let waiting = matched::count_pending(c, &row.track())
            .await
            .map_err(internal)?;
        out.insert(row.id.clone(), row.cursor.number + waiting);
    }
    Ok(out)
}

async fn load(s: &ApiState, id: &str) -> Result<SubscriptionRow, Fhir> {
    let id = fhir_id(id)?;
    let c = s.pool.get().await.map_err(internal)?;
    subscriptions::get(&**c, id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(&format!("Subscription/{id}")))
}

pub(super) async fn status_one(
    State(s): State<Shared>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Fhir, Fhir> {
    Params::parse(q.as_deref(), &[])?;
    let row = load(&s, &id).await?;
    let c = s.pool.get().await.map_err(internal)?;
    let gaps = gaps::recent(&**c).await.map_err(internal)?;
    let dead = dead::counts(&**c, std::slice::from_ref(&row.id))
        .await
        .map_err(internal)?;
    let rows = [row];
    let since = since_start(&**c, &rows).await?;
    Ok(Fhir(
        StatusCode::OK,
        status_searchset(&s, &rows, &since, &gaps, &dead),
    ))
}

pub(super) async fn status_all(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Fhir, Fhir> {
    let p = Params::parse(q.as_deref(), &["id", "status"])?;
    let ids = p.list("id", None)?;
    let statuses = p.list("status", Some(STATUS_CODES))?;
    let c = s.pool.get().await.map_err(internal)?;
    let rows = subscriptions::search(&**c, None, None)
        .await
        .map_err(internal)?;
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| ids.as_ref().is_none_or(|ids| ids.contains(&r.id)))
        .filter(|r| {
            statuses
                .as_ref()
                .is_none_or(|st| st.iter().any(|x| x == r.status.as_str()))
        })
        .collect();
    let gaps = gaps::recent(&**c).await.map_err(internal)?;
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let dead = dead::counts(&**c, &ids).await.map_err(internal)?;
    let since = since_start(&**c, &rows).await?;
    Ok(Fhir(
        StatusCode::OK,
        status_searchset(&s, &rows, &since, &gaps, &dead),
    ))
}

pub(super) async fn events_get(
    State(s): State<Shared>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Fhir, Fhir> {
    let p = Params::parse(q.as_deref(), EVENTS_PARAMS)?;
    events(&s, &who, &id, &p).await
}

/// POST form: the parameters in a Parameters body (or none).
pub(super) async fn events_post(
    State(s): State<Shared>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Fhir, Fhir> {
    let empty = body
        .as_ref()
        .is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace));
    let p = if empty {
        Params::parse(None, EVENTS_PARAMS)?
    } else {
        Params::from_parameters(&json_body(&headers, body)?, EVENTS_PARAMS)?
    };
    events(&s, &who, &id, &p).await
}

/// The content `$events` answers with: what was asked, never more than the subscription's
/// own level; full resources only for a caller that may read the topic's resource types.
async fn content(
    s: &ApiState,
    who: &Principal,
    row: &SubscriptionRow,
    p: &Params,
) -> Result<Content, Fhir> {
    let asked = match p.list("content", Some(CONTENT_CODES))? {
        None => row.content,
        Some(c) if c.len() == 1 => Content::parse(&c[0]).unwrap_or(row.content),
        Some(_) => return Err(bad_request("content", "content takes one value")),
    };
    let content = if asked > row.content {
        row.content
    } else {
        asked
    };
    if content == Content::FullResource {
        let topics = s.topics().await?;
        let types = topics
            .iter()
            .filter(|t| t.url == row.topic)
            .flat_map(|t| t.triggers.iter().map(|tr| tr.resource_type.clone()));
        for ty in types {
            if !who.0.allows(&ty, Action::Read) {
                let msg = format!(
                    "full-resource events need scope {}",
                    needed(&ty, Action::Read)
                );
                return Err(super::response::outcome(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &msg,
                    None,
                ));
            }
        }
    }
    Ok(content)
}

async fn events(s: &ApiState, who: &Principal, id: &str, p: &Params) -> Result<Fhir, Fhir> {
    let row = load(s, id).await?;
    let content = content(s, who, &row, p).await?;
    let c = s.pool.get().await.map_err(internal)?;
    let track = row.track();
    let latest = row.cursor.number
        + matched::count_pending(&**c, &track)
            .await
            .map_err(internal)?;
    let until = p.number("eventsUntilNumber")?.unwrap_or(latest);
    let since = p
        .number("eventsSinceNumber")?
        .unwrap_or_else(|| (until - EVENTS_LIMIT + 1).max(1));
    if since > until {
        return Err(bad_request(
            "eventsSinceNumber",
            "eventsSinceNumber is greater than eventsUntilNumber",
        ));
    }
    let floor = retention::floor(&**c, &row.topic).await.map_err(internal)?;
    let rows = matched::between(&**c, &track, floor, since, until, EVENTS_LIMIT as usize)
        .await
        .map_err(internal)?;
    let gaps = gaps::recent(&**c).await.map_err(internal)?;
    let dead = dead::counts(&**c, std::slice::from_ref(&row.id))
        .await
        .map_err(internal)?;
    drop(c);
    let shapes = s.topics.shapes(&row.topic).await;
    let mut events = Vec::with_capacity(rows.len());
    for p in &rows {
        events.push(s.payloads.event(content, &shapes, p).await);
    }
    let format = s.cfg.source.fhir_version.into();
    let base = s.cfg.api.base_url();
    let b = bundle(
        format,
        Kind::QueryEvent,
        &status_info(&row, latest, &gaps, dead.get(&row.id).copied().unwrap_or(0)),
        &events,
        content,
        &base,
        Utc::now(),
    );
    Ok(Fhir(StatusCode::OK, b))
}
