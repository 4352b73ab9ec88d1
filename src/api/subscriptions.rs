//! Subscription create, read, update, delete and search, for stores whose own API cannot
//! take Subscriptions. Input goes through the one strict reader (400: invalid resource) and
//! then this server's policy (422: valid, not accepted).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::params::Params;
use super::response::{
    bad_request, fhir_id, internal, json_body, not_found, outcome, searchset, Fhir,
};
use super::{ApiState, Shared};
use crate::fhir::subscription::{self, secrets, Rules, SubscriptionSpec};
use crate::queue::subscriptions;

const STATUS_CODES: &[&str] = &["requested", "active", "error", "off"];

/// The strict read (400) then the policy (422).
async fn validate(s: &ApiState, v: &Value) -> Result<SubscriptionSpec, Fhir> {
    let format = s.cfg.source.fhir_version.into();
    let read = subscription::read(v, format).map_err(|e| {
        // Valid FHIR this server will not process (an unknown modifier extension, an R5
        // Subscription on an R4 server) is 422; an invalid resource is 400.
        let status = match e.code {
            "not-supported" => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        outcome(status, e.code, &e.message, Some(&e.expression))
    })?;
    let topics = s.topics().await?;
    let rules = Rules {
        registry: Some(&s.registry),
        format,
        topics: &topics,
        refuse_private: crate::channel::private::rule(s.cfg.delivery.allow_private_endpoints),
        require_https_for_full_resource: s.cfg.delivery.require_https_for_full_resource,
        email: s.cfg.channels.email_rules(),
    };
    subscription::check(read, &rules).map_err(|e| {
        outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code,
            &e.message,
            Some(&e.expression),
        )
    })
}

async fn stored(s: &ApiState, id: &str) -> Result<Value, Fhir> {
    let c = s.pool.get().await.map_err(internal)?;
    subscriptions::get(&**c, id)
        .await
        .map_err(internal)?
        .map(|r| r.to_resource())
        .ok_or_else(|| internal("subscription vanished after writing it"))
}

pub(super) async fn create(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Fhir> {
    let v = json_body(&headers, body)?;
    let spec = validate(&s, &v).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let c = s.pool.get().await.map_err(internal)?;
    subscriptions::upsert(&**c, &id, "api", &spec, &v)
        .await
        .map_err(internal)?;
    drop(c);
    let resource = stored(&s, &id).await?;
    tracing::info!(subscription = %id, topic = %spec.topic_url, "subscription created");
    let mut resp = Fhir(StatusCode::CREATED, resource).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("{}/Subscription/{id}", s.cfg.api.base_url())) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

pub(super) async fn update(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Fhir, Fhir> {
    let id = fhir_id(&id)?;
    let mut v = json_body(&headers, body)?;
    if let Some(body_id) = v.get("id").and_then(Value::as_str) {
        if body_id != id {
            return Err(bad_request(
                "Subscription.id",
                "resource id does not match the URL",
            ));
        }
    }
    let c = s.pool.get().await.map_err(internal)?;
    let Some(existing) = subscriptions::get(&**c, id).await.map_err(internal)? else {
        return Err(not_found(&format!("Subscription/{id}")));
    };
    operator_owned(&existing)?;
    // A read shows header values as `***`; sending that back keeps the stored value.
    secrets::restore_headers(&mut v, &existing.resource);
    let spec = validate(&s, &v).await?;
    if existing.topic != spec.topic_url {
        return Err(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "a Subscription's topic cannot change; create a new Subscription",
            Some("Subscription.topic"),
        ));
    }
    subscriptions::upsert(&**c, id, &existing.origin, &spec, &v)
        .await
        .map_err(internal)?;
    drop(c);
    Ok(Fhir(StatusCode::OK, stored(&s, id).await?))
}

/// A `[[destination]]` is the operator's: the config file changes it, not a client.
fn operator_owned(existing: &subscriptions::SubscriptionRow) -> Result<(), Fhir> {
    if existing.origin == "config" {
        return Err(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "this Subscription is a [[destination]] of the server's configuration file: the operator changes or removes it there",
            Some("Subscription"),
        ));
    }
    Ok(())
}

pub(super) async fn read(State(s): State<Shared>, Path(id): Path<String>) -> Result<Fhir, Fhir> {
    let id = fhir_id(&id)?;
    let c = s.pool.get().await.map_err(internal)?;
    match subscriptions::get(&**c, id).await.map_err(internal)? {
        Some(r) => Ok(Fhir(StatusCode::OK, r.to_resource())),
        None => Err(not_found(&format!("Subscription/{id}"))),
    }
}

pub(super) async fn delete(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, Fhir> {
    let id = fhir_id(&id)?;
    let c = s.pool.get().await.map_err(internal)?;
    if let Some(existing) = subscriptions::get(&**c, id).await.map_err(internal)? {
        operator_owned(&existing)?;
    }
    if subscriptions::delete(&**c, id).await.map_err(internal)? {
        tracing::info!(subscription = %id, "subscription deleted");
        s.hub.close(id, "subscription deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(&format!("Subscription/{id}")))
    }
}

pub(super) async fn search(State(s): State<Shared>, RawQuery(q): RawQuery) -> Result<Fhir, Fhir> {
    let p = Params::parse(q.as_deref(), &["status", "url"])?;
    let status = p.list("status", Some(STATUS_CODES))?;
    if status.as_ref().is_some_and(|l| l.len() > 1) {
        return Err(bad_request("status", "search by one status at a time"));
    }
    let status = status.and_then(|l| l.into_iter().next());
    let c = s.pool.get().await.map_err(internal)?;
    let rows = subscriptions::search(&**c, status.as_deref(), p.text("url"))
        .await
        .map_err(internal)?;
    let list = rows.iter().map(|r| r.to_resource()).collect();
    Ok(Fhir(StatusCode::OK, searchset(&s.cfg.api.base_url(), list)))
}
