//! Notification Bundles. One builder for every notification type, so handshakes, heartbeats,
//! events and `$status` answers cannot drift apart in shape.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

pub use super::vocab::Format;
use super::vocab::{Content, Interaction, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Handshake => "handshake",
            Kind::Heartbeat => "heartbeat",
            Kind::EventNotification => "event-notification",
            Kind::QueryStatus => "query-status",
            Kind::QueryEvent => "query-event",
        }
    }
}

/// The subscription's state as the status resource reports it.
#[derive(Debug, Clone)]
pub struct StatusInfo {
    pub subscription_id: String,
    pub status: Status,
    pub events_since_start: i64,
    pub topic_url: String,
    /// Delivery errors (coded `delivery-failure`).
    pub errors: Vec<String>,
    /// Capture gaps the subscription lived through (text only: no code fits).
    pub gaps: Vec<String>,
}

/// One event as a notification carries it.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_number: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub interaction: Interaction,
    pub timestamp: DateTime<Utc>,
    /// The resource body, when the payload is full-resource and the change was not a delete.
    pub resource: Option<Value>,
    /// Resources the topic's notificationShape adds (include/revInclude), full-resource only.
    pub related: Vec<Value>,
}

pub(crate) fn fhir_instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn error_concepts(info: &StatusInfo) -> Vec<Value> {
    let delivery = info.errors.iter().map(|m| {
        json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscription-error", "code": "delivery-failure"}], "text": m})
    });
    let gaps = info.gaps.iter().map(|m| json!({"text": m}));
    delivery.chain(gaps).collect()
}

/// Whether the status names the topic: an empty event payload SHALL NOT reveal it.
pub(crate) fn shows_topic(kind: Kind, content: Content) -> bool {
    content != Content::Empty || !matches!(kind, Kind::EventNotification | Kind::QueryEvent)
}

/// The status resource: `SubscriptionStatus` (R4B, R5) or the backport `Parameters` (R4).
pub(crate) fn status_resource(
    format: Format,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    content: Content,
    base_url: &str,
) -> Value {
    if format == Format::R4Backport {
        return backport_parameters(kind, info, events, content, base_url);
    }
    let id = uuid::Uuid::new_v4().to_string();
    let sub_ref = format!("{base_url}/Subscription/{}", info.subscription_id);
    let focus = |e: &Event| format!("{base_url}/{}/{}", e.resource_type, e.resource_id);
    let mut st = json!({
        "resourceType": "SubscriptionStatus",
        "id": id,
        "status": info.status.as_str(),
        "type": kind.as_str(),
        "eventsSinceSubscriptionStart": info.events_since_start.to_string(),
        "subscription": {"reference": sub_ref},
    });
    if shows_topic(kind, content) {
        st["topic"] = Value::String(info.topic_url.clone());
    }
    if !events.is_empty() {
        st["notificationEvent"] = events
            .iter()
            .map(|e| {
                let mut n = json!({
                    "eventNumber": e.event_number.to_string(),
                    "timestamp": fhir_instant(e.timestamp),
                });
                if content != Content::Empty {
                    n["focus"] = json!({"reference": focus(e)});
                    if !e.related.is_empty() {
                        n["additionalContext"] = e
                            .related
                            .iter()
                            .map(|r| json!({"reference": related_url(r, base_url)}))
                            .collect();
                    }
                }
                n
            })
            .collect();
    }
    let errors = error_concepts(info);
    if !errors.is_empty() {
        st["error"] = Value::Array(errors);
    }
    st
}

/// The Backport IG's R4 status: a `Parameters` resource.
fn backport_parameters(
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    content: Content,
    base_url: &str,
) -> Value {
    let id = uuid::Uuid::new_v4().to_string();
    let sub_ref = format!("{base_url}/Subscription/{}", info.subscription_id);
    let focus = |e: &Event| format!("{base_url}/{}/{}", e.resource_type, e.resource_id);
    let mut p = vec![json!({"name": "subscription", "valueReference": {"reference": sub_ref}})];
    if shows_topic(kind, content) {
        p.push(json!({"name": "topic", "valueCanonical": info.topic_url}));
    }
    p.push(json!({"name": "status", "valueCode": info.status.as_str()}));
    p.push(json!({"name": "type", "valueCode": kind.as_str()}));
    p.push(json!({"name": "events-since-subscription-start", "valueString": info.events_since_start.to_string()}));
    for e in events {
        let mut part = vec![
            json!({"name": "event-number", "valueString": e.event_number.to_string()}),
            json!({"name": "timestamp", "valueInstant": fhir_instant(e.timestamp)}),
        ];
        if content != Content::Empty {
            part.push(json!({"name": "focus", "valueReference": {"reference": focus(e)}}));
            for r in &e.related {
                part.push(json!({"name": "additional-context", "valueReference": {"reference": related_url(r, base_url)}}));
            }
        }
        p.push(json!({"name": "notification-event", "part": part}));
    }
    for e in error_concepts(info) {
        p.push(json!({"name": "error", "valueCodeableConcept": e}));
    }
    json!({
        "resourceType": "Parameters",
        "id": id,
        "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
        "parameter": p,
    })
}

/// A notification Bundle in the given format.
pub fn bundle(
    format: Format,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    content: Content,
    base_url: &str,
    now: DateTime<Utc>,
) -> Value {
    let status = status_resource(format, kind, info, events, content, base_url);
    let status_id = status["id"].as_str().unwrap_or_default().to_string();
    let mut first = json!({"fullUrl": format!("urn:uuid:{status_id}"), "resource": status});
    if format != Format::R5 {
        // History bundles: entry[0] reads as the $status (or $events) request it answers.
        let op = if kind == Kind::QueryEvent {
            "$events"
        } else {
            "$status"
        };
        first["request"] = json!({"method": "GET", "url": format!("{base_url}/Subscription/{}/{op}", info.subscription_id)});
        first["response"] = json!({"status": "200"});
    }
    let mut entries = vec![first];
    if content != Content::Empty {
        for e in events {
            let entry = event_entry(e, content, base_url);
            // One entry per resource version: a body-less entry (id-only, delete) for a
            // resource already listed replaces the earlier one.
            if entry.get("resource").is_none() {
                entries.retain(|x| x.get("resource").is_some() || x["fullUrl"] != entry["fullUrl"]);
            }
            entries.push(entry);
        }
    }
    if content == Content::FullResource {
        for e in events {
            for r in &e.related {
                let url = related_url(r, base_url);
                if entries.iter().any(|x| x["fullUrl"] == url.as_str()) {
                    continue;
                }
                let mut entry = json!({"fullUrl": url, "resource": r});
                if format != Format::R5 {
                    // History bundles: every entry carries a request and response.
                    entry["request"] = json!({"method": "GET", "url": format!("{}/{}", r["resourceType"].as_str().unwrap_or(""), r["id"].as_str().unwrap_or(""))});
                    entry["response"] = json!({"status": "200"});
                }
                entries.push(entry);
            }
        }
    }
    let mut b = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": if format == Format::R5 { "subscription-notification" } else { "history" },
        "timestamp": fhir_instant(now),
        "entry": entries,
    });
    match format {
        Format::R4Backport => {
            b["meta"] = json!({"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4"]})
        }
        Format::R4B => {
            b["meta"] = json!({"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification"]})
        }
        Format::R5 => {}
    }
    b
}

pub(crate) fn related_url(r: &Value, base_url: &str) -> String {
    format!(
        "{base_url}/{}/{}",
        r["resourceType"].as_str().unwrap_or(""),
        r["id"].as_str().unwrap_or("")
    )
}

fn event_entry(e: &Event, content: Content, base_url: &str) -> Value {
    let rel = format!("{}/{}", e.resource_type, e.resource_id);
    let (method, url, code) = match e.interaction {
        Interaction::Create => ("POST", e.resource_type.clone(), "201"),
        Interaction::Update => ("PUT", rel.clone(), "200"),
        Interaction::Delete => ("DELETE", rel.clone(), "204"),
    };
    let mut entry = json!({
        "fullUrl": format!("{base_url}/{rel}"),
        "request": {"method": method, "url": url},
        "response": {"status": code},
    });
    if content == Content::FullResource {
        if let Some(r) = &e.resource {
            entry["resource"] = r.clone();
        }
    }
    entry
}

/// An OperationOutcome with one error issue; `expression` names the element or parameter
/// (`Subscription.filterBy[0]`, `eventsSinceNumber`).
pub(crate) fn operation_outcome(code: &str, message: &str, expression: Option<&str>) -> Value {
    let mut issue = json!({"severity": "error", "code": code, "diagnostics": message});
    if let Some(e) = expression {
        issue["expression"] = json!([e]);
    }
    json!({"resourceType": "OperationOutcome", "issue": [issue]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StatusInfo {
        StatusInfo {
            subscription_id: "s1".into(),
            status: Status::Active,
            events_since_start: 3,
            topic_url: "http://t".into(),
            errors: vec![],
            gaps: vec![],
        }
    }

    fn ev(i: Interaction) -> Event {
        Event {
            event_number: 3,
            resource_type: "Encounter".into(),
            resource_id: "e1".into(),
            interaction: i,
            timestamp: Utc::now(),
            resource: Some(json!({"resourceType": "Encounter", "id": "e1"})),
            related: vec![],
        }
    }

    #[test]
    fn id_only_has_request_and_no_resource() {
        let b = bundle(
            Format::R5,
            Kind::EventNotification,
            &info(),
            &[ev(Interaction::Update)],
            Content::IdOnly,
            "http://x",
            Utc::now(),
        );
        assert_eq!(b["type"], "subscription-notification");
        assert_eq!(
            b["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"],
            "3"
        );
        assert_eq!(b["entry"][1]["request"]["method"], "PUT");
        assert!(b["entry"][1].get("resource").is_none());
    }

    #[test]
    fn empty_has_no_focus_no_topic() {
        let b = bundle(
            Format::R5,
            Kind::EventNotification,
            &info(),
            &[ev(Interaction::Create)],
            Content::Empty,
            "http://x",
            Utc::now(),
        );
        assert_eq!(b["entry"].as_array().unwrap().len(), 1);
        assert!(b["entry"][0]["resource"].get("topic").is_none());
        assert!(b["entry"][0]["resource"]["notificationEvent"][0]
            .get("focus")
            .is_none());
    }

    #[test]
    fn full_resource_delete_has_no_resource() {
        let mut e = ev(Interaction::Delete);
        e.resource = None;
        let b = bundle(
            Format::R5,
            Kind::EventNotification,
            &info(),
            &[e, ev(Interaction::Create)],
            Content::FullResource,
            "http://x",
            Utc::now(),
        );
        assert!(b["entry"][1].get("resource").is_none());
        assert_eq!(b["entry"][1]["request"]["method"], "DELETE");
        assert_eq!(b["entry"][2]["resource"]["id"], "e1");
    }

    #[test]
    fn handshake_counts_nothing() {
        let mut i = info();
        i.events_since_start = 0;
        let b = bundle(
            Format::R5,
            Kind::Handshake,
            &i,
            &[],
            Content::IdOnly,
            "http://x",
            Utc::now(),
        );
        assert_eq!(
            b["entry"][0]["resource"]["eventsSinceSubscriptionStart"],
            "0"
        );
        assert!(b["entry"][0]["resource"].get("notificationEvent").is_none());
    }
}
