//! Every notification type and payload, per FHIR version, through the official validator.

use crate::common::validate;
use chrono::Utc;
use fhir_cdc::fhir::notification::{bundle, Event, Format, Kind, StatusInfo};
use fhir_cdc::fhir::subscription::{Content, Status};
use fhir_cdc::fhir::topic::Interaction;
use serde_json::{json, Value};

const BASE: &str = "https://fhir.example.org/fhir";

fn info(since: i64, status: Status, errors: &[&str]) -> StatusInfo {
    StatusInfo {
        subscription_id: "sub-1".into(),
        status,
        events_since_start: since,
        topic_url: "http://example.org/topic/encounter".into(),
        errors: errors.iter().map(|s| s.to_string()).collect(),
        // A status with errors also carries a capture gap (a text-only error).
        gaps: if errors.is_empty() {
            vec![]
        } else {
            vec!["events may be missing: capture resumed from now".into()]
        },
    }
}

/// An Encounter valid in `f`'s version (`class` is a Coding before R5, a list after).
fn encounter(f: Format, id: &str, n: i64) -> Value {
    let class =
        json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"});
    let class = if f == Format::R5 {
        json!([{"coding": [class]}])
    } else {
        class
    };
    json!({"resourceType": "Encounter", "id": id, "meta": {"versionId": n.to_string()}, "status": "in-progress",
           "class": class, "subject": {"reference": "Patient/p1"}})
}

fn event(f: Format, n: i64, id: &str, interaction: Interaction) -> Event {
    Event {
        event_number: n,
        resource_type: "Encounter".into(),
        resource_id: id.into(),
        interaction,
        timestamp: Utc::now(),
        resource: (interaction != Interaction::Delete).then(|| encounter(f, id, n)),
        // What a notificationShape include adds (full-resource only).
        related: if interaction == Interaction::Delete {
            vec![]
        } else {
            vec![json!({"resourceType": "Patient", "id": "p1", "active": true})]
        },
    }
}

fn name(f: Format) -> &'static str {
    match f {
        Format::R4Backport => "r4",
        Format::R4B => "r4b",
        Format::R5 => "r5",
    }
}

/// A whole stream for one subscription: handshake, three event notifications (one batch of
/// two, one of them a delete), a heartbeat, an error-state notification.
fn stream(f: Format, content: Content) -> Vec<Value> {
    let now = Utc::now();
    vec![
        bundle(
            f,
            Kind::Handshake,
            &info(0, Status::Requested, &[]),
            &[],
            content,
            BASE,
            now,
        ),
        bundle(
            f,
            Kind::EventNotification,
            &info(1, Status::Active, &[]),
            &[event(f, 1, "e1", Interaction::Create)],
            content,
            BASE,
            now,
        ),
        bundle(
            f,
            Kind::EventNotification,
            &info(3, Status::Active, &[]),
            &[
                event(f, 2, "e1", Interaction::Update),
                event(f, 3, "e2", Interaction::Delete),
            ],
            content,
            BASE,
            now,
        ),
        bundle(
            f,
            Kind::Heartbeat,
            &info(3, Status::Active, &[]),
            &[],
            content,
            BASE,
            now,
        ),
        bundle(
            f,
            Kind::EventNotification,
            &info(4, Status::Error, &["endpoint answered HTTP 503"]),
            &[event(f, 4, "e3", Interaction::Create)],
            content,
            BASE,
            now,
        ),
    ]
}

#[test]
fn every_type_and_payload_validates_per_version() {
    for f in [Format::R5, Format::R4B, Format::R4Backport] {
        for content in [Content::Empty, Content::IdOnly, Content::FullResource] {
            let s = stream(f, content);
            validate(
                &s,
                name(f),
                &["--sequence", "strict", "--content", content.as_str()],
            );
        }
        // query-status and query-event, as $status and $events answer.
        let now = Utc::now();
        let q = vec![
            bundle(
                f,
                Kind::QueryStatus,
                &info(4, Status::Active, &[]),
                &[],
                Content::IdOnly,
                BASE,
                now,
            ),
            bundle(
                f,
                Kind::QueryEvent,
                &info(4, Status::Active, &[]),
                &[
                    event(f, 1, "e1", Interaction::Create),
                    event(f, 2, "e1", Interaction::Update),
                ],
                Content::FullResource,
                BASE,
                now,
            ),
        ];
        validate(&q, name(f), &[]);
    }
}

#[test]
fn history_bundles_answer_status_and_events() {
    let b = bundle(
        Format::R4Backport,
        Kind::QueryEvent,
        &info(2, Status::Active, &[]),
        &[event(Format::R4Backport, 2, "e", Interaction::Create)],
        Content::IdOnly,
        BASE,
        Utc::now(),
    );
    assert_eq!(b["type"], "history");
    assert_eq!(
        b["entry"][0]["request"]["url"],
        format!("{BASE}/Subscription/sub-1/$events")
    );
    assert_eq!(b["entry"][0]["resource"]["resourceType"], "Parameters");
    let b = bundle(
        Format::R4B,
        Kind::Heartbeat,
        &info(2, Status::Active, &[]),
        &[],
        Content::IdOnly,
        BASE,
        Utc::now(),
    );
    assert_eq!(
        b["entry"][0]["request"]["url"],
        format!("{BASE}/Subscription/sub-1/$status")
    );
    assert_eq!(
        b["entry"][0]["resource"]["resourceType"],
        "SubscriptionStatus"
    );
    let b = bundle(
        Format::R5,
        Kind::Heartbeat,
        &info(2, Status::Active, &[]),
        &[],
        Content::IdOnly,
        BASE,
        Utc::now(),
    );
    assert!(b["entry"][0].get("request").is_none());
}

#[test]
fn id_only_batches_list_each_resource_once() {
    let b = bundle(
        Format::R5,
        Kind::EventNotification,
        &info(2, Status::Active, &[]),
        &[
            event(Format::R5, 1, "e1", Interaction::Create),
            event(Format::R5, 2, "e1", Interaction::Update),
        ],
        Content::IdOnly,
        BASE,
        Utc::now(),
    );
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{b}");
    assert_eq!(entries[1]["request"]["method"], "PUT");
    assert_eq!(
        b["entry"][0]["resource"]["notificationEvent"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
