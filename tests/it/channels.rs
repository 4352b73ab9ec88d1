//! The message channel and the rest-hook rules it shares: refusals (4xx) go to dead letters
//! at once and turn the subscription to error, `Retry-After` is honoured. Real WAL, a real
//! HTTP receiver, the official validator.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// The notification inside a message Bundle.
fn inner(message: &Value) -> &Value {
    &message["entry"][1]["resource"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_channel_wraps_each_notification_in_a_message_bundle() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (&env.rx, env.api);
    let _d = env.start().await;
    let channel = json!({"channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "message"}});
    let id = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("msg"), "id-only", channel).await;
    put_encounter(&env.store, "m1").await;
    put_encounter(&env.store, "m2").await;
    wait_until("2 event messages", Duration::from_secs(30), || async {
        rx.bodies("msg").len() >= 3
    })
    .await;
    let got = rx.bodies("msg");
    for m in &got {
        assert_eq!(m["type"], "message");
        let header = &m["entry"][0]["resource"];
        assert_eq!(header["resourceType"], "MessageHeader");
        assert_eq!(header["eventCoding"]["code"], "subscription-notification");
        assert_eq!(header["source"]["endpointUrl"], "http://fhir-cdc.test/fhir");
        assert_eq!(header["focus"][0]["reference"], m["entry"][1]["fullUrl"]);
        assert_eq!(inner(m)["type"], "subscription-notification");
    }
    assert_eq!(status_of(inner(&got[0]))["type"], "handshake");
    let events: Vec<i64> = got[1..]
        .iter()
        .flat_map(|m| event_numbers(inner(m)))
        .collect();
    assert_eq!(events, vec![1, 2]);
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(
        &got,
        "r5",
        &["--expect-subscription", &sub, "--sequence", "strict"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_refusal_is_not_retried_and_retry_after_is_honoured() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (&env.rx, env.api);
    let _d = env.start().await;
    let refused = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &rx.url("refuses"),
        "id-only",
        json!({}),
    )
    .await;
    let busy = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("busy"), "id-only", json!({})).await;
    rx.answer("refuses", 400);
    rx.answer("busy", 503);
    rx.retry_after.lock().unwrap().insert("busy".into(), 3);

    put_encounter(&env.store, "r1").await;
    wait_until("the refusal recorded", Duration::from_secs(30), || async {
        status(api, &refused).await["status"] == "error"
    })
    .await;
    // retry_initial_ms is 100 in tests: without the rules there would be many attempts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.events("refuses").len(), 1, "a 400 is not retried");
    let dead: i64 = env
        .store
        .query_one(
            "SELECT count(*) FROM fhir_cdc.dead_letter WHERE subscription_id = $1 AND event_number = 1 AND reason LIKE '%HTTP 400%'",
            &[&refused],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 1, "the refused event is a dead letter at once");
    let st = status(api, &refused).await;
    assert!(
        st["error"]
            .to_string()
            .contains("1 event(s) of this subscription could not be delivered"),
        "$status reports the dead letter: {st}"
    );
    let listed = dead_letters_cli(&env, &["list", "--subscription", &refused]);
    assert!(
        listed.contains(&format!("{refused}\t1\tEncounter/r1\tcreate")),
        "{listed}"
    );
    wait_until("the dead-letter gauge", Duration::from_secs(30), || async {
        let m = reqwest::get(format!("http://127.0.0.1:{api}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        m.lines()
            .any(|l| l.starts_with("fhir_cdc_dead_letters{") && l.ends_with(" 1"))
    })
    .await;

    wait_until(
        "the busy endpoint asked twice",
        Duration::from_secs(30),
        || async { rx.events("busy").len() >= 2 },
    )
    .await;
    let t = rx.timed("busy");
    let tries: Vec<_> = t
        .iter()
        .filter(|(_, b)| status_of(b)["type"] == "event-notification")
        .collect();
    let gap = tries[1].0 - tries[0].0;
    assert!(
        gap >= Duration::from_millis(2900),
        "Retry-After: 3 waited only {gap:?}"
    );

    // The endpoints recover: the refused subscription turns active again with event 2;
    // the busy one gets event 1 again (same number) and then 2.
    rx.answer("refuses", 200);
    rx.answer("busy", 200);
    put_encounter(&env.store, "r2").await;
    wait_until("both recovered", Duration::from_secs(30), || async {
        status(api, &refused).await["status"] == "active"
            && rx
                .events("refuses")
                .iter()
                .any(|b| event_numbers(b) == vec![2])
            && rx
                .events("busy")
                .iter()
                .any(|b| event_numbers(b) == vec![2])
    })
    .await;
    assert_eq!(
        status(api, &busy).await["status"],
        "active",
        "one 503 is not an error"
    );
    let delivered: Vec<Value> = rx.events("refuses").into_iter().skip(1).collect();
    validate(&delivered, "r5", &[]);
    validate(&rx.events("busy"), "r5", &[]);
}
