//! R4 (Backport IG) and R4B stores end to end: backport-form Subscriptions through the API
//! and through the store's own tables, history-Bundle notifications, batching, heartbeats,
//! `$status` and `$events` after a restart, each stream checked by the validator.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
"#;
const BP: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

fn backport_sub(
    endpoint: &str,
    content: &str,
    heartbeat: Option<u32>,
    max_count: Option<u32>,
) -> Value {
    let mut ext = vec![json!({"url": format!("{BP}backport-timeout"), "valueUnsignedInt": 5})];
    if let Some(h) = heartbeat {
        ext.push(json!({"url": format!("{BP}backport-heartbeat-period"), "valueUnsignedInt": h}));
    }
    if let Some(m) = max_count {
        ext.push(json!({"url": format!("{BP}backport-max-count"), "valuePositiveInt": m}));
    }
    json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BP}backport-subscription")]},
        "status": "requested",
        "reason": "test",
        "criteria": "http://fhir-cdc.test/topic/encounter",
        "channel": {
            "extension": ext,
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BP}backport-payload-content"), "valueCode": content}]},
            "header": ["Authorization: Bearer secret-token"]
        }
    })
}

async fn run_version(version: &str, validator: &str) {
    let v = fhir_version(version);
    let env = TestEnv::aidbox(TOPIC)
        .config(move |c| {
            c.source.fhir_version = v;
            c.source.publication_refresh_secs = 1;
        })
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let mut d = env.start().await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api}");

    let md: Value = http
        .get(format!("{base}/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        md["fhirVersion"],
        if version == "R4" { "4.0.1" } else { "4.3.0" }
    );
    assert!(md["instantiates"][0]
        .as_str()
        .unwrap()
        .contains("backport-subscription-server"));
    assert_eq!(
        md["rest"][0]["resource"][0]["extension"][0]["valueCanonical"],
        "http://fhir-cdc.test/topic/encounter"
    );
    // R5-shaped Subscriptions are not what an R4/R4B server takes.
    let r5 = json!({"resourceType": "Subscription", "status": "requested", "topic": "http://fhir-cdc.test/topic/encounter",
                    "channelType": {"code": "rest-hook"}, "endpoint": rx.url("x"), "content": "id-only"});
    let r = http
        .post(format!("{base}/Subscription"))
        .json(&r5)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "{version}");

    let r = http
        .post(format!("{base}/Subscription"))
        .json(&backport_sub(
            &rx.url("api"),
            "full-resource",
            Some(2),
            Some(2),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{version}: {}", r.text().await.unwrap());
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["criteria"], "http://fhir-cdc.test/topic/encounter");
    // Through the store's own tables, in the same backport form.
    let stored = backport_sub(&rx.url("store"), "id-only", None, None);
    aidbox_put(store, "Subscription", "store-sub", &stored).await;
    wait_until("both handshakes", Duration::from_secs(30), || async {
        !rx.bodies("api").is_empty() && !rx.bodies("store").is_empty()
    })
    .await;
    let hs = &rx
        .got
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.hook == "api")
        .unwrap()
        .clone();
    assert_eq!(
        hs.headers.get("authorization").map(String::as_str),
        Some("Bearer secret-token")
    );
    assert_eq!(hs.body["type"], "history");

    store
        .batch_execute(
            "BEGIN;
             SELECT aidbox_put('Encounter', 'v' || g, jsonb_build_object('status', 'planned',
                 'class', jsonb_build_object('system', 'http://terminology.hl7.org/CodeSystem/v3-ActCode', 'code', 'IMP')))
             FROM generate_series(1, 5) g;
             COMMIT;",
        )
        .await
        .unwrap();
    let numbers = |hook: &'static str| {
        let rx = rx.clone();
        move || {
            rx.bodies(hook)
                .iter()
                .filter(|b| kind(b) == "event-notification")
                .map(event_numbers_any)
                .collect::<Vec<_>>()
        }
    };
    wait_until("api events", Duration::from_secs(30), || {
        let n = numbers("api");
        async move { n().concat().len() == 5 }
    })
    .await;
    assert_eq!(
        numbers("api")(),
        vec![vec![1, 2], vec![3, 4], vec![5]],
        "{version}"
    );
    wait_until("store events", Duration::from_secs(30), || {
        let n = numbers("store");
        async move { n().concat().len() == 5 }
    })
    .await;
    // A heartbeat within period + 1 s of the last notification.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rx.bodies("api").iter().any(|b| kind(b) == "heartbeat"),
        "{version}: no heartbeat"
    );

    // Handshake refused → error; the client asks again → active.
    rx.answer("flaky", 503);
    let r = http
        .post(format!("{base}/Subscription"))
        .json(&backport_sub(&rx.url("flaky"), "id-only", None, None))
        .send()
        .await
        .unwrap();
    let flaky: Value = r.json().await.unwrap();
    let flaky_id = flaky["id"].as_str().unwrap().to_string();
    wait_until("flaky in error", Duration::from_secs(30), || async {
        http.get(format!("{base}/Subscription/{flaky_id}"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["status"]
            == "error"
    })
    .await;
    rx.answer("flaky", 200);
    let mut again = flaky.clone();
    again["status"] = json!("requested");
    assert_eq!(
        http.put(format!("{base}/Subscription/{flaky_id}"))
            .json(&again)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    wait_until("flaky active", Duration::from_secs(30), || async {
        http.get(format!("{base}/Subscription/{flaky_id}"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["status"]
            == "active"
    })
    .await;

    // A topic created in the store (R4: the backport Basic; R4B: SubscriptionTopic), with a
    // Subscription to it, in one transaction: it matches from its place in the stream on.
    let url = format!("http://fhir-cdc.test/topic/store-{version}");
    let (rtype, topic) = if version == "R4" {
        (
            "Basic",
            json!({
                "resourceType": "Basic",
                "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
                "modifierExtension": [{"url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.status", "valueCode": "active"}],
                "extension": [
                    {"url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.url", "valueUri": url},
                    {"url": "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.resourceTrigger", "extension": [
                        {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Encounter"},
                        {"url": "supportedInteraction", "valueCode": "create"}
                    ]}
                ]
            }),
        )
    } else {
        (
            "SubscriptionTopic",
            json!({"resourceType": "SubscriptionTopic", "url": url, "status": "active",
            "resourceTrigger": [{"resource": "Encounter", "supportedInteraction": ["create"]}]}),
        )
    };
    store
        .execute("SELECT aidbox_create_type($1)", &[&rtype])
        .await
        .unwrap();
    // A table created after fhir-cdc attached is captured once capture has added it to the
    // publication (every publication_refresh_secs).
    wait_published(store, &rtype.to_lowercase()).await;
    let mut to_store_topic = backport_sub(&rx.url("storetopic"), "id-only", None, None);
    to_store_topic["criteria"] = json!(url);
    let enc = json!({"status": "planned", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}});
    let sql = format!(
        "BEGIN;
         SELECT aidbox_put('Encounter', 'before-topic', '{enc}');
         SELECT aidbox_put('{rtype}', 'topic-1', '{topic}');
         SELECT aidbox_put('Subscription', 'to-store-topic', '{to_store_topic}');
         SELECT aidbox_put('Encounter', 'after-topic', '{enc}');
         COMMIT;"
    );
    store.batch_execute(&sql).await.unwrap();
    wait_until("store topic event", Duration::from_secs(30), || {
        let n = numbers("storetopic");
        async move { !n().is_empty() }
    })
    .await;
    let st_events: Vec<Value> = rx
        .bodies("storetopic")
        .into_iter()
        .filter(|b| kind(b) == "event-notification")
        .collect();
    assert_eq!(st_events.len(), 1, "{version}");
    assert_eq!(
        st_events[0]["entry"][1]["fullUrl"],
        "http://fhir-cdc.test/fhir/Encounter/after-topic"
    );

    wait_settled(&env).await;
    d.kill9();
    d = env.start().await;
    let st: Value = http
        .get(format!("{base}/Subscription/{id}/$status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events: Value = http
        .get(format!(
            "{base}/Subscription/{id}/$events?eventsSinceNumber=4&eventsUntilNumber=5"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kind(&events), "query-event");
    assert_eq!(event_numbers_any(&events), vec![4, 5]);
    let st_res = &st["entry"][0]["resource"];
    if version == "R4" {
        assert_eq!(st_res["resourceType"], "Parameters");
        let since = st_res["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "events-since-subscription-start")
            .unwrap();
        assert_eq!(since["valueString"], "7");
    } else {
        assert_eq!(st_res["resourceType"], "SubscriptionStatus");
        assert_eq!(st_res["eventsSinceSubscriptionStart"], "7");
    }
    validate(
        &rx.bodies("api"),
        validator,
        &["--sequence", "strict", "--content", "full-resource"],
    );
    validate(
        &rx.bodies("store"),
        validator,
        &["--sequence", "strict", "--content", "id-only"],
    );
    validate(&[events], validator, &[]);
    validate(&rx.bodies("flaky"), validator, &["--sequence", "strict"]);
    validate(
        &rx.bodies("storetopic"),
        validator,
        &["--sequence", "strict"],
    );
    drop(d);
}

/// The notification type of a Bundle in any version.
fn kind(b: &Value) -> String {
    let st = &b["entry"][0]["resource"];
    if st["resourceType"] == "Parameters" {
        st["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "type")
            .unwrap()["valueCode"]
            .as_str()
            .unwrap()
            .to_string()
    } else {
        st["type"].as_str().unwrap().to_string()
    }
}

/// Event numbers of a Bundle in any version.
fn event_numbers_any(b: &Value) -> Vec<i64> {
    let st = &b["entry"][0]["resource"];
    if st["resourceType"] != "Parameters" {
        return event_numbers(b);
    }
    st["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| {
            p["part"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == "event-number")
                .unwrap()["valueString"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r4_backport_end_to_end() {
    run_version("R4", "r4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r4b_end_to_end() {
    run_version("R4B", "r4b").await;
}
