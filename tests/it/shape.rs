//! notificationShape: full-resource notifications carry the included and rev-included
//! resources, read from the store, in every FHIR version's form.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://t/enc"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
notificationShape = [{ resource = "Encounter", include = ["Encounter:patient"], revInclude = ["Observation:encounter"] }]
"#;

async fn run(version: &str, validator: &str) {
    let v = fhir_version(version);
    let env = TestEnv::aidbox(TOPIC)
        .config(move |c| c.source.fhir_version = v)
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let _d = env.start().await;
    let class = if version == "R5" {
        json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}]}])
    } else {
        json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"})
    };
    let sub_id = if version == "R5" {
        subscribe(api, "http://t/enc", &rx.url("full"), "full-resource").await
    } else {
        let bp = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
        let body = json!({"resourceType": "Subscription", "status": "requested", "reason": "t", "criteria": "http://t/enc",
            "channel": {"type": "rest-hook", "endpoint": rx.url("full"), "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": format!("{bp}backport-payload-content"), "valueCode": "full-resource"}]}}});
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{api}/Subscription"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_until("handshake", Duration::from_secs(30), || async {
        !rx.bodies("full").is_empty()
    })
    .await;

    aidbox_put(store, "Patient", "p1", &json!({"active": true})).await;
    let obs = json!({"status": "final", "code": {"text": "x"}, "encounter": {"reference": "Encounter/e1"}});
    aidbox_put(store, "Observation", "o1", &obs).await;
    let other = json!({"status": "final", "code": {"text": "y"}, "encounter": {"reference": "Encounter/e9"}});
    aidbox_put(store, "Observation", "o2", &other).await;
    let enc = json!({"status": "planned", "class": class, "subject": {"reference": "Patient/p1"}});
    aidbox_put(store, "Encounter", "e1", &enc).await;
    wait_until("event", Duration::from_secs(30), || async {
        rx.bodies("full").len() >= 2
    })
    .await;
    let b = rx.bodies("full").last().cloned().unwrap();
    let urls: Vec<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|e| e["fullUrl"].as_str().unwrap())
        .collect();
    let base = "http://fhir-cdc.test/fhir";
    assert_eq!(
        urls,
        [
            format!("{base}/Encounter/e1"),
            format!("{base}/Patient/p1"),
            format!("{base}/Observation/o1")
        ],
        "{version}"
    );
    assert_eq!(b["entry"][2]["resource"]["active"], true);
    assert_eq!(
        b["entry"][3]["resource"]["encounter"]["reference"],
        "Encounter/e1"
    );
    let _ = sub_id;
    validate(
        &rx.bodies("full"),
        validator,
        &["--sequence", "strict", "--content", "full-resource"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_and_rev_include_r5() {
    run("R5", "r5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_and_rev_include_r4() {
    run("R4", "r4").await;
}
