//! Notification Bundles written straight to bytes: the same document as
//! [`super::notification::bundle`] builds, serialised from borrowed structs without a
//! `serde_json::Value` map per object. A notification is built for every delivered event of
//! every subscription, so this is on the fan-out's hot path; the `Value` builder stays for
//! `$status`, `$events` and the R4 backport's `Parameters` form. `tests` check both give the
//! same document.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::notification::{
    bundle, fhir_instant, related_url, shows_topic, Event, Format, Kind, StatusInfo,
};
use super::subscription::Content;
use super::topic::Interaction;

const ERROR_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/subscription-error";
const R4B_PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleOut<'a> {
    resource_type: &'static str,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<Meta>,
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    entry: Vec<Entry<'a>>,
}

#[derive(Serialize)]
struct Meta {
    profile: [&'static str; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry<'a> {
    full_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Resource<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<Request>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<Response>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Resource<'a> {
    Status(Box<StatusOut<'a>>),
    Body(&'a Value),
}

#[derive(Serialize)]
struct Request {
    method: &'static str,
    url: String,
}

#[derive(Serialize)]
struct Response {
    status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusOut<'a> {
    resource_type: &'static str,
    id: &'a str,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    events_since_subscription_start: String,
    subscription: Reference,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notification_event: Vec<EventOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    error: Vec<Concept<'a>>,
}

#[derive(Serialize)]
struct Reference {
    reference: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventOut {
    event_number: String,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    focus: Option<Reference>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    additional_context: Vec<Reference>,
}

#[derive(Serialize)]
struct Concept<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    coding: Option<[Coding; 1]>,
    text: &'a str,
}

#[derive(Serialize)]
struct Coding {
    system: &'static str,
    code: &'static str,
}

/// The notification Bundle as JSON bytes.
pub(crate) fn bundle_bytes(
    format: Format,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    content: Content,
    base_url: &str,
    now: DateTime<Utc>,
) -> serde_json::Result<Vec<u8>> {
    if format == Format::R4Backport {
        return serde_json::to_vec(&bundle(format, kind, info, events, content, base_url, now));
    }
    let status_id = uuid::Uuid::new_v4().to_string();
    let status = status_out(&status_id, kind, info, events, content, base_url);
    let mut first = Entry {
        full_url: format!("urn:uuid:{status_id}"),
        resource: Some(Resource::Status(Box::new(status))),
        request: None,
        response: None,
    };
    if format != Format::R5 {
        let op = if kind == Kind::QueryEvent {
            "$events"
        } else {
            "$status"
        };
        first.request = Some(Request {
            method: "GET",
            url: format!("{base_url}/Subscription/{}/{op}", info.subscription_id),
        });
        first.response = Some(Response { status: "200" });
    }
    let mut entry = vec![first];
    event_entries(&mut entry, format, events, content, base_url);
    let b = BundleOut {
        resource_type: "Bundle",
        id: uuid::Uuid::new_v4().to_string(),
        meta: (format == Format::R4B).then_some(Meta {
            profile: [R4B_PROFILE],
        }),
        kind: if format == Format::R5 {
            "subscription-notification"
        } else {
            "history"
        },
        timestamp: fhir_instant(now),
        entry,
    };
    serde_json::to_vec(&b)
}

fn status_out<'a>(
    id: &'a str,
    kind: Kind,
    info: &'a StatusInfo,
    events: &[Event],
    content: Content,
    base_url: &str,
) -> StatusOut<'a> {
    let notification_event = events
        .iter()
        .map(|e| {
            let shown = content != Content::Empty;
            EventOut {
                event_number: e.event_number.to_string(),
                timestamp: fhir_instant(e.timestamp),
                focus: shown.then(|| Reference {
                    reference: format!("{base_url}/{}/{}", e.resource_type, e.resource_id),
                }),
                additional_context: if shown {
                    e.related
                        .iter()
                        .map(|r| Reference {
                            reference: related_url(r, base_url),
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    let delivery = info.errors.iter().map(|m| Concept {
        coding: Some([Coding {
            system: ERROR_SYSTEM,
            code: "delivery-failure",
        }]),
        text: m,
    });
    let gaps = info.gaps.iter().map(|m| Concept {
        coding: None,
        text: m,
    });
    StatusOut {
        resource_type: "SubscriptionStatus",
        id,
        status: info.status.as_str(),
        kind: kind.as_str(),
        events_since_subscription_start: info.events_since_start.to_string(),
        subscription: Reference {
            reference: format!("{base_url}/Subscription/{}", info.subscription_id),
        },
        topic: shows_topic(kind, content).then_some(info.topic_url.as_str()),
        notification_event,
        error: delivery.chain(gaps).collect(),
    }
}

/// The events' entries and, for full-resource, the related resources', with the builder's
/// rules: one entry per resource version (a body-less entry replaces an earlier one of the
/// same resource), and a related resource only once.
fn event_entries<'a>(
    entry: &mut Vec<Entry<'a>>,
    format: Format,
    events: &'a [Event],
    content: Content,
    base_url: &str,
) {
    if content == Content::Empty {
        return;
    }
    for e in events {
        let x = event_entry(e, content, base_url);
        if x.resource.is_none() {
            entry.retain(|y| y.resource.is_some() || y.full_url != x.full_url);
        }
        entry.push(x);
    }
    if content != Content::FullResource {
        return;
    }
    for r in events.iter().flat_map(|e| &e.related) {
        let url = related_url(r, base_url);
        if entry.iter().any(|x| x.full_url == url) {
            continue;
        }
        let (request, response) = if format == Format::R5 {
            (None, None)
        } else {
            let ty = r["resourceType"].as_str().unwrap_or("");
            let id = r["id"].as_str().unwrap_or("");
            (
                Some(Request {
                    method: "GET",
                    url: format!("{ty}/{id}"),
                }),
                Some(Response { status: "200" }),
            )
        };
        entry.push(Entry {
            full_url: url,
            resource: Some(Resource::Body(r)),
            request,
            response,
        });
    }
}

fn event_entry<'a>(e: &'a Event, content: Content, base_url: &str) -> Entry<'a> {
    let rel = format!("{}/{}", e.resource_type, e.resource_id);
    let (method, url, code) = match e.interaction {
        Interaction::Create => ("POST", e.resource_type.clone(), "201"),
        Interaction::Update => ("PUT", rel.clone(), "200"),
        Interaction::Delete => ("DELETE", rel.clone(), "204"),
    };
    let resource = match (content, &e.resource) {
        (Content::FullResource, Some(r)) => Some(Resource::Body(r)),
        _ => None,
    };
    Entry {
        full_url: format!("{base_url}/{rel}"),
        resource,
        request: Some(Request { method, url }),
        response: Some(Response { status: code }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::subscription::Status;
    use serde_json::json;

    fn info(errors: bool) -> StatusInfo {
        StatusInfo {
            subscription_id: "s1".into(),
            status: Status::Active,
            events_since_start: 3,
            topic_url: "http://t".into(),
            errors: if errors {
                vec!["HTTP 503".into()]
            } else {
                vec![]
            },
            gaps: if errors { vec!["a gap".into()] } else { vec![] },
        }
    }

    fn events() -> Vec<Event> {
        let t = Utc::now();
        let pat = json!({"resourceType": "Patient", "id": "p1"});
        let enc = |id: &str, v: &str| json!({"resourceType": "Encounter", "id": id, "meta": {"versionId": v}});
        vec![
            Event {
                event_number: 1,
                resource_type: "Encounter".into(),
                resource_id: "e1".into(),
                interaction: Interaction::Create,
                timestamp: t,
                resource: Some(enc("e1", "1")),
                related: vec![pat.clone()],
            },
            Event {
                event_number: 2,
                resource_type: "Encounter".into(),
                resource_id: "e1".into(),
                interaction: Interaction::Update,
                timestamp: t,
                resource: Some(enc("e1", "2")),
                related: vec![pat],
            },
            Event {
                event_number: 3,
                resource_type: "Encounter".into(),
                resource_id: "e1".into(),
                interaction: Interaction::Delete,
                timestamp: t,
                resource: None,
                related: vec![],
            },
        ]
    }

    /// The document with its generated ids replaced, so two builds compare equal.
    fn normalised(mut v: Value) -> Value {
        v["id"] = json!("B");
        let status_id = v["entry"][0]["resource"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            v["entry"][0]["fullUrl"],
            json!(format!("urn:uuid:{status_id}"))
        );
        v["entry"][0]["resource"]["id"] = json!("S");
        v["entry"][0]["fullUrl"] = json!("urn:uuid:S");
        v
    }

    #[test]
    fn the_bytes_are_the_document_the_value_builder_makes() {
        let now = Utc::now();
        let mut cases = 0;
        for format in [Format::R5, Format::R4B, Format::R4Backport] {
            for content in [Content::Empty, Content::IdOnly, Content::FullResource] {
                for kind in [Kind::EventNotification, Kind::Handshake, Kind::Heartbeat] {
                    for errors in [false, true] {
                        let evs = if kind == Kind::EventNotification {
                            events()
                        } else {
                            vec![]
                        };
                        let i = info(errors);
                        let v = bundle(format, kind, &i, &evs, content, "http://b", now);
                        let bytes =
                            bundle_bytes(format, kind, &i, &evs, content, "http://b", now).unwrap();
                        let w: Value = serde_json::from_slice(&bytes).unwrap();
                        assert_eq!(
                            normalised(w),
                            normalised(v),
                            "{format:?} {content:?} {kind:?} errors={errors}"
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 54);
    }
}
