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
