//! Subscriptions through the API (and their refusals) and through the store's own tables.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter" }]
canFilterBy = [{ resource = "Encounter", filterParameter = "patient" }]
"#;

fn sub(extra: Value) -> Value {
    let mut s = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "topic": "http://fhir-cdc.test/topic/encounter",
        "channelType": {"code": "rest-hook"},
        "endpoint": "http://127.0.0.1:9/hook",
        "content": "id-only"
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_crud_refusals_and_store_subscriptions() {
    // The default: full-resource payloads need an https endpoint.
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| c.delivery.require_https_for_full_resource = true)
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let _d = env.start().await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api}");

    // Refusals: each an OperationOutcome naming the element.
    let cases = [
        (sub(json!({"topic": "http://nope/topic"})), 422, "topic"),
        (
            sub(json!({"channelType": {"code": "carrier-pigeon"}})),
            422,
            "channelType",
        ),
        (sub(json!({"endpoint": "not a url"})), 422, "endpoint"),
        (
            sub(json!({"content": "full-resource", "endpoint": "http://hooks.example.org/x"})),
            422,
            "endpoint",
        ),
        (
            sub(json!({"filterBy": [{"filterParameter": "code", "value": "x"}]})),
            422,
            "filterBy[0]",
        ),
    ];
    for (body, code, expr) in cases {
        let r = http
            .post(format!("{base}/Subscription"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code);
        assert_eq!(r.headers()["content-type"], "application/fhir+json");
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(
            oo["issue"][0]["expression"][0],
            format!("Subscription.{expr}"),
            "{oo}"
        );
    }
    let r = http
        .post(format!("{base}/Subscription"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");

    // CRUD and search.
    let id = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("api"),
        "id-only",
    )
    .await;
    wait_until("active", Duration::from_secs(30), || async {
        status(api, &id).await["status"] == "active"
    })
    .await;
    let got: Value = http
        .get(format!("{base}/Subscription/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["status"], "active");
    assert_eq!(got["endpoint"], rx.url("api"));
    let found: Value = http
        .get(format!(
            "{base}/Subscription?status=active&url={}",
            rx.url("api")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["total"], 1);
    assert_eq!(found["entry"][0]["resource"]["id"], id);
    let none: Value = http
        .get(format!("{base}/Subscription?status=off"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none["total"], 0);
    let topics: Value = http
        .get(format!("{base}/SubscriptionTopic"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        topics["entry"][0]["resource"]["url"],
        "http://fhir-cdc.test/topic/encounter"
    );
    let md: Value = http
        .get(format!("{base}/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(md["resourceType"], "CapabilityStatement");
    assert_eq!(md["fhirVersion"], "5.0.0");
    let sub_res = &md["rest"][0]["resource"][0];
    assert_eq!(
        sub_res["extension"][0]["valueCanonical"],
        "http://fhir-cdc.test/topic/encounter"
    );
    assert!(sub_res["documentation"]
        .as_str()
        .unwrap()
        .contains("rest-hook"));
    assert_eq!(sub_res["operation"][1]["name"], "events");

    // PUT with status requested re-handshakes.
    let mut upd = got.clone();
    upd["status"] = json!("requested");
    let r = http
        .put(format!("{base}/Subscription/{id}"))
        .json(&upd)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until("second handshake", Duration::from_secs(30), || async {
        rx.bodies("api")
            .iter()
            .filter(|b| status_of(b)["type"] == "handshake")
            .count()
            == 2
    })
    .await;

    // A Subscription written into the store's own tables takes effect at its place in the stream.
    store
        .execute(
            "SELECT aidbox_put('Encounter', 'before', '{\"status\":\"planned\"}')",
            &[],
        )
        .await
        .unwrap();
    let stored = sub(json!({"endpoint": rx.url("store")}));
    store
        .batch_execute(&format!(
            "BEGIN;
             SELECT aidbox_put('Subscription', 'store-sub-1', '{}'::jsonb);
             SELECT aidbox_put('Encounter', 'after', '{{\"status\":\"planned\"}}');
             COMMIT;",
            stored.to_string().replace('\'', "''")
        ))
        .await
        .unwrap();
    wait_until(
        "store subscription event",
        Duration::from_secs(30),
        || async { !rx.events("store").is_empty() },
    )
    .await;
    let ev = rx.events("store");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0]["entry"][1]["fullUrl"],
        "http://fhir-cdc.test/fhir/Encounter/after"
    );
    assert_eq!(status_of(&rx.bodies("store")[0])["type"], "handshake");
    // Deleting it in the store removes it.
    aidbox_delete(store, "Subscription", "store-sub-1").await;
    wait_until(
        "store subscription gone",
        Duration::from_secs(30),
        || async {
            http.get(format!("{base}/Subscription/store-sub-1"))
                .send()
                .await
                .unwrap()
                .status()
                == 404
        },
    )
    .await;

    // DELETE through the API stops it.
    let r = http
        .delete(format!("{base}/Subscription/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .get(format!("{base}/Subscription/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    validate(&rx.bodies("api"), "r5", &[]);
    validate(&rx.bodies("store"), "r5", &["--sequence", "strict"]);
}
