//! SubscriptionTopics written into the store's own tables take effect at their place in the
//! stream, survive restarts, and stop when deleted.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const X: &str = "http://fhir-cdc.test/topic/from-store";

fn topic(extra: Value) -> Value {
    let mut t = json!({
        "resourceType": "SubscriptionTopic",
        "url": X,
        "status": "active",
        "resourceTrigger": [{"resource": "Encounter", "supportedInteraction": ["create", "update"]}]
    });
    for (k, v) in extra.as_object().unwrap() {
        t[k] = v.clone();
    }
    t
}

async fn event_ids(q: &tokio_postgres::Client) -> Vec<String> {
    q.query(
        "SELECT resource_id FROM fhir_cdc.event WHERE $1 = ANY(topics) ORDER BY id",
        &[&X],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_topics_take_effect_in_stream_order() {
    // No topic in the file at all.
    let env = TestEnv::aidbox("").build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    store
        .execute("SELECT aidbox_create_type('SubscriptionTopic')", &[])
        .await
        .unwrap();
    let mut d = env.start().await;

    let sub = json!({
        "resourceType": "Subscription", "status": "requested", "topic": X,
        "channelType": {"code": "rest-hook"}, "endpoint": rx.url("store"), "content": "id-only"
    });
    let enc = json!({"status": "planned"});
    // One transaction: a change before the topic, the topic, a subscription to it, a change after.
    let tx = format!(
        "BEGIN;
         SELECT aidbox_put('Encounter', 'e0', '{enc}');
         SELECT aidbox_put('SubscriptionTopic', 'st', '{}');
         SELECT aidbox_put('Subscription', 's1', '{}');
         SELECT aidbox_put('Encounter', 'e1', '{enc}');
         COMMIT;",
        topic(json!({})),
        sub
    );
    store.batch_execute(&tx).await.unwrap();
    wait_until("event for e1", Duration::from_secs(30), || async {
        !rx.events("store").is_empty()
    })
    .await;
    let q = env.client().await;
    assert_eq!(
        event_ids(&q).await,
        ["e1"],
        "e0 came before the topic existed"
    );
    let ev = rx.events("store");
    assert_eq!(event_numbers(&ev[0]), vec![1]);
    assert_eq!(
        ev[0]["entry"][1]["fullUrl"],
        "http://fhir-cdc.test/fhir/Encounter/e1"
    );

    // The API knows it, and takes Subscriptions to it.
    let http = reqwest::Client::new();
    let topics: Value = http
        .get(format!("http://127.0.0.1:{api}/SubscriptionTopic?url={X}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(topics["total"], 1);
    let via_api = subscribe(api, X, &rx.url("api"), "id-only").await;

    // Restart: the topic is still there; both subscriptions get the next change.
    wait_settled(&env).await;
    d.kill9();
    d = env.start().await;
    aidbox_put(store, "Encounter", "e2", &enc).await;
    wait_until("e2 to both", Duration::from_secs(30), || async {
        rx.events("store").len() == 2 && rx.events("api").len() == 1
    })
    .await;
    assert_eq!(
        status(api, &via_api).await["eventsSinceSubscriptionStart"],
        "1"
    );

    // A topic whose criteria do not compile is refused, with the reason in the log.
    let bad = topic(json!({"url": "http://fhir-cdc.test/topic/criteria",
        "resourceTrigger": [{"resource": "Encounter", "queryCriteria": {"current": "nonsense=finished"}}]}));
    aidbox_put(store, "SubscriptionTopic", "bad", &bad).await;
    // Deleting the topic stops its events at that point.
    aidbox_delete(store, "SubscriptionTopic", "st").await;
    aidbox_put(store, "Encounter", "e3", &enc).await;
    let marker = json!({"status": "finished"});
    aidbox_put(store, "Patient", "marker", &marker).await;
    wait_until("capture past e3", Duration::from_secs(30), || async {
        d.log_text().contains("store topic removed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(event_ids(&q).await, ["e1", "e2"]);
    let log = d.log_text();
    assert!(
        log.contains("SubscriptionTopic in the store refused")
            && log.contains("no search parameter \"nonsense\""),
        "{log}"
    );
    let gone: Value = http
        .get(format!("http://127.0.0.1:{api}/SubscriptionTopic?url={X}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gone["total"], 0);
    validate(&rx.bodies("store"), "r5", &["--sequence", "strict"]);
    validate(&rx.bodies("api"), "r5", &["--sequence", "strict"]);
    drop(d);
}
