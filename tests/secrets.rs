//! A receiver's credential is the subscriber's secret: reads, searches and `$status` show
//! header values as `***`, an update that sends `***` back keeps the stored value (the
//! receiver still gets the real header), and the daemon never logs it. Real WAL, a real
//! HTTP receiver.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const SECRET: &str = "SECRET123";

async fn get(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_are_write_only() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    let extra =
        json!({"parameter": [{"name": "Authorization", "value": format!("Bearer {SECRET}")}]});
    let id = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("s"), "id-only", extra).await;

    // Read, search and $status never show the value.
    let read = get(format!("http://127.0.0.1:{api}/Subscription/{id}")).await;
    assert_eq!(read["parameter"][0]["name"], "Authorization");
    assert_eq!(read["parameter"][0]["value"], "***");
    let search = get(format!("http://127.0.0.1:{api}/Subscription?status=active")).await;
    assert_eq!(search["entry"].as_array().unwrap().len(), 1, "{search}");
    let st = get(format!("http://127.0.0.1:{api}/Subscription/{id}/$status")).await;
    for shown in [&read, &search, &st] {
        assert!(!shown.to_string().contains(SECRET), "{shown}");
    }

    // The read resource sent back as an update keeps the stored value.
    let r = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{api}/Subscription/{id}"))
        .json(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["parameter"][0]["value"], "***");
    put_encounter(&env.store, "x1").await;
    wait_until("the event", Duration::from_secs(30), || async {
        !rx.events("s").is_empty()
    })
    .await;
    let got = rx.got.lock().unwrap();
    let last = got.iter().rev().find(|g| g.hook == "s").unwrap();
    assert_eq!(
        last.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {SECRET}").as_str()),
        "the receiver still gets the stored credential"
    );
    drop(got);
    assert!(
        !env.log_text().contains(SECRET),
        "the daemon logged the secret"
    );
}

/// Hex HMAC-SHA256 of `parts`, as a receiver computes it.
fn hmac_hex(secret: &str, parts: &[&[u8]]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_carry_an_hmac_of_their_exact_body() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    let key = "a-signing-secret-of-the-subscriber";
    let extra = json!({"extension": [{
        "url": "https://www.medplum.com/fhir/StructureDefinition/subscription-secret",
        "valueString": key}]});
    let id = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("signed"), "id-only", extra).await;
    put_encounter(&env.store, "h1").await;
    wait_until("the event", Duration::from_secs(30), || async {
        !rx.events("signed").is_empty()
    })
    .await;
    let got = rx.got.lock().unwrap().clone();
    let signed: Vec<_> = got.iter().filter(|g| g.hook == "signed").collect();
    assert_eq!(signed.len(), 2, "handshake and event");
    for g in &signed {
        let h = |n: &str| g.headers.get(n).cloned().unwrap_or_default();
        assert_eq!(h("x-signature"), hmac_hex(key, &[g.raw.as_bytes()]));
        let ts = h("x-signature-timestamp");
        let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
        assert!((0..60).contains(&age), "timestamp {ts}");
        assert_eq!(
            h("x-signature-timestamped"),
            hmac_hex(key, &[ts.as_bytes(), b".", g.raw.as_bytes()])
        );
        assert_ne!(
            h("x-signature"),
            hmac_hex("another-secret-entirely", &[g.raw.as_bytes()])
        );
    }
    // The secret is write-only too.
    let read = get(format!("http://127.0.0.1:{api}/Subscription/{id}")).await;
    assert_eq!(read["extension"][0]["valueString"], "***");
    assert!(!env.log_text().contains(key));
    let bodies: Vec<Value> = signed.iter().map(|g| g.body.clone()).collect();
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(&bodies, "r5", &["--expect-subscription", &sub]);
}
