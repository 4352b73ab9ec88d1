//! Topic criteria and subscription filters through the whole daemon: real WAL, real
//! webhooks, the official search parameters and the FHIRPath engine.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOPICS: &str = r#"
[[topic]]
url = "http://t/enc-finished"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"], queryCriteria = { previous = "status:not=finished", current = "status=finished", resultForCreate = "test-passes", requireBoth = true } }]

[[topic]]
url = "http://t/enc-finished-not-on-create"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"], queryCriteria = { previous = "status:not=finished", current = "status=finished", resultForCreate = "test-fails", requireBoth = true } }]

[[topic]]
url = "http://t/enc-cancelled"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["update"], fhirPathCriteria = "%current.status = 'cancelled' and %previous.status != 'cancelled'" }]

[[topic]]
url = "http://t/obs-high"
resourceTrigger = [{ resource = "Observation", supportedInteraction = ["create", "update"], fhirPathCriteria = "(%current.value as Quantity).value > 140" }]
canFilterBy = [
  { resource = "Observation", filterParameter = "patient" },
  { resource = "Observation", filterParameter = "code" },
  { resource = "Observation", filterParameter = "value-quantity", comparator = ["gt", "lt"] },
  { resource = "Observation", filterParameter = "date", comparator = ["ge", "le"] },
]

[[topic]]
url = "http://t/finished-deleted"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["delete"], queryCriteria = { previous = "status=finished", current = "status=finished", resultForDelete = "test-passes", requireBoth = true } }]

[[topic]]
url = "http://t/not-boolean"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["update"], fhirPathCriteria = "%current.status" }]

[[topic]]
url = "http://t/multi"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create"] }, { resource = "Observation", supportedInteraction = ["create"] }]
canFilterBy = [{ resource = "Observation", filterParameter = "patient" }]
"#;

fn obs(patient: &str, code: &str, value: f64, date: &str) -> Value {
    json!({"status": "final", "subject": {"reference": format!("Patient/{patient}")},
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
           "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
           "effectiveDateTime": date})
}

async fn sub(api: u16, topic: &str, hook: &str, rx: &Receiver, filters: Value) -> String {
    subscribe_with(
        api,
        topic,
        &rx.url(hook),
        "id-only",
        json!({"filterBy": filters}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn criteria_and_filters_end_to_end() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let d = env.start().await;

    sub(api, "http://t/enc-finished", "s1", rx, json!([])).await;
    sub(
        api,
        "http://t/enc-finished-not-on-create",
        "s2",
        rx,
        json!([]),
    )
    .await;
    sub(api, "http://t/enc-cancelled", "s3", rx, json!([])).await;
    sub(
        api,
        "http://t/obs-high",
        "p1",
        rx,
        json!([{"filterParameter": "patient", "value": "Patient/p1"}]),
    )
    .await;
    sub(
        api,
        "http://t/obs-high",
        "p2",
        rx,
        json!([{"filterParameter": "patient", "value": "Patient/p2"}]),
    )
    .await;
    sub(
        api,
        "http://t/obs-high",
        "code",
        rx,
        json!([{"filterParameter": "code", "value": "http://loinc.org|2339-0"}]),
    )
    .await;
    sub(
        api,
        "http://t/obs-high",
        "gt200",
        rx,
        json!([{"filterParameter": "value-quantity", "comparator": "gt", "value": "200"}]),
    )
    .await;
    sub(
        api,
        "http://t/obs-high",
        "recent",
        rx,
        json!([{"filterParameter": "date", "comparator": "ge", "value": "2024-06-01"}]),
    )
    .await;
    sub(api, "http://t/obs-high", "and", rx,
        json!([{"filterParameter": "patient", "value": "Patient/p1,Patient/p2"}, {"filterParameter": "code", "value": "718-7"}])).await;
    sub(api, "http://t/finished-deleted", "s5", rx, json!([])).await;
    sub(api, "http://t/not-boolean", "s6", rx, json!([])).await;
    sub(api, "http://t/multi", "s7", rx, json!([{"resourceType": "Observation", "filterParameter": "patient", "value": "Patient/p2"}])).await;
    let hooks = [
        "s1", "s2", "s3", "p1", "p2", "code", "gt200", "recent", "and", "s5", "s6", "s7",
    ];
    wait_until("all handshakes", Duration::from_secs(60), || async {
        hooks.iter().all(|h| !rx.bodies(h).is_empty())
    })
    .await;

    // A filter with a modifier the topic does not allow is refused.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/Subscription"))
        .json(&json!({"resourceType": "Subscription", "topic": "http://t/obs-high", "channelType": {"code": "rest-hook"},
                      "endpoint": rx.url("x"), "content": "id-only",
                      "filterBy": [{"filterParameter": "value-quantity", "comparator": "ap", "value": "100"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    let put = |t: &'static str, id: &'static str, body: Value| {
        let store = &store;
        async move {
            store
                .execute("SELECT aidbox_put($1, $2, $3)", &[&t, &id, &body])
                .await
                .unwrap();
        }
    };
    put("Encounter", "e1", json!({"status": "planned"})).await;
    put("Encounter", "e1", json!({"status": "in-progress"})).await;
    put("Encounter", "e1", json!({"status": "finished"})).await;
    put(
        "Encounter",
        "e1",
        json!({"status": "finished", "priority": {"text": "x"}}),
    )
    .await;
    put("Encounter", "e2", json!({"status": "finished"})).await;
    put("Encounter", "e3", json!({"status": "planned"})).await;
    put("Encounter", "e3", json!({"status": "cancelled"})).await;
    put(
        "Encounter",
        "e3",
        json!({"status": "cancelled", "priority": {"text": "y"}}),
    )
    .await;
    put(
        "Observation",
        "o1",
        obs("p1", "2339-0", 150.0, "2024-07-01T08:00:00Z"),
    )
    .await;
    put(
        "Observation",
        "o2",
        obs("p2", "718-7", 250.0, "2024-01-15T08:00:00Z"),
    )
    .await;
    put(
        "Observation",
        "o3",
        obs("p1", "2339-0", 100.0, "2024-07-02T08:00:00Z"),
    )
    .await;
    aidbox_delete(store, "Encounter", "e1").await;
    aidbox_delete(store, "Encounter", "e3").await;
    // A last change every subscription of the multi topic sees marks the end of the stream.
    put("Encounter", "last", json!({"status": "planned"})).await;
    wait_until("end marker", Duration::from_secs(60), || async {
        rx.events("s7").iter().any(|b| {
            b["entry"][1]["fullUrl"]
                .as_str()
                .unwrap()
                .ends_with("/last")
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ids = |hook: &str| -> Vec<String> {
        rx.events(hook)
            .iter()
            .map(|b| {
                b["entry"][1]["fullUrl"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    // queryCriteria: the transition to finished, and a create that is finished (resultForCreate passes) …
    assert_eq!(ids("s1"), ["e1", "e2"]);
    // … but not that create when resultForCreate fails.
    assert_eq!(ids("s2"), ["e1"]);
    // fhirPathCriteria with %previous and %current: only the transition.
    assert_eq!(ids("s3"), ["e3"]);
    // Choice type (value as Quantity) > 140, then filters: patient, system|code, gt, ge date, AND + OR.
    assert_eq!(ids("p1"), ["o1"]);
    assert_eq!(ids("p2"), ["o2"]);
    assert_eq!(ids("code"), ["o1"]);
    assert_eq!(ids("gt200"), ["o2"]);
    assert_eq!(ids("recent"), ["o1"]);
    assert_eq!(ids("and"), ["o2"]);
    // A delete of a finished encounter (previous version from the history row), not of a cancelled one.
    assert_eq!(ids("s5"), ["e1"]);
    // A criterion that is not a boolean never fires, and says so once per change.
    assert!(ids("s6").is_empty());
    let log = d.log_text();
    assert!(
        log.contains("topic criteria could not be evaluated")
            && log.contains("http://t/not-boolean"),
        "{log}"
    );
    // Multi-type topic: the Observation filter leaves Encounters alone.
    assert_eq!(ids("s7"), ["e1", "e2", "e3", "o2", "last"]);

    for h in hooks {
        validate(&rx.bodies(h), "r5", &["--sequence", "strict"]);
    }
}
