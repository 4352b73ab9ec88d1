//! Subscription lifecycle through real WAL and a real webhook: handshake failure and
//! re-activation, heartbeats, maxCount batching, `end`, and `$status` across a restart.

use crate::common::*;
use serde_json::json;
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter" }]
"#;
const T: &str = "http://fhir-cdc.test/topic/encounter";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_heartbeats_batching_end_and_restart() {
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| c.delivery.error_after_failures = 1)
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let mut d = env.start().await;
    let http = reqwest::Client::new();

    // Handshake refused → error; the client fixes its endpoint and asks again → active.
    rx.answer("flaky", 500);
    let flaky = subscribe(api, T, &rx.url("flaky"), "id-only").await;
    wait_until("handshake failure", Duration::from_secs(30), || async {
        status(api, &flaky).await["status"] == "error"
    })
    .await;
    let st = status(api, &flaky).await;
    assert!(
        st["error"][0]["text"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{st}"
    );
    rx.answer("flaky", 200);
    let mut res: serde_json::Value = http
        .get(format!("http://127.0.0.1:{api}/Subscription/{flaky}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    res["status"] = json!("requested");
    assert_eq!(
        http.put(format!("http://127.0.0.1:{api}/Subscription/{flaky}"))
            .json(&res)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    wait_until("re-activated", Duration::from_secs(30), || async {
        status(api, &flaky).await["status"] == "active"
    })
    .await;

    // An endpoint that hangs: the call is abandoned after the subscription's timeout.
    rx.answer("hang", 0);
    let hang = subscribe_with(api, T, &rx.url("hang"), "id-only", json!({"timeout": 1})).await;
    let started = std::time::Instant::now();
    wait_until(
        "timeout counted as failure",
        Duration::from_secs(10),
        || async { status(api, &hang).await["status"] == "error" },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "timeout not applied"
    );
    let st = status(api, &hang).await;
    assert!(
        st["error"][0]["text"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{st}"
    );

    // Heartbeats: nothing else goes out, so one arrives every period (+1 s at most).
    let hb = subscribe_with(
        api,
        T,
        &rx.url("hb"),
        "id-only",
        json!({"heartbeatPeriod": 2}),
    )
    .await;
    // maxCount 2: five events of one transaction arrive as 2 + 2 + 1.
    let batched = subscribe_with(api, T, &rx.url("batch"), "id-only", json!({"maxCount": 2})).await;
    // end in 3 s: turned off then.
    let end = (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339();
    let ending = subscribe_with(api, T, &rx.url("end"), "id-only", json!({"end": end})).await;
    wait_until("handshakes", Duration::from_secs(30), || async {
        !rx.bodies("hb").is_empty()
            && !rx.bodies("batch").is_empty()
            && !rx.bodies("end").is_empty()
    })
    .await;

    tokio::time::sleep(Duration::from_secs(7)).await;
    let hb_times: Vec<_> = rx.timed("hb");
    let beats = hb_times
        .iter()
        .filter(|(_, b)| status_of(b)["type"] == "heartbeat")
        .count();
    assert!(beats >= 2, "{beats} heartbeats in 7 s with a 2 s period");
    for w in hb_times.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            gap <= Duration::from_secs(3),
            "heartbeat gap {gap:?} > period + 1 s"
        );
    }
    assert!(hb_times
        .iter()
        .skip(1)
        .all(|(_, b)| status_of(b)["eventsSinceSubscriptionStart"] == "0"));
    assert_eq!(status(api, &hb).await["status"], "active");
    wait_until("end reached", Duration::from_secs(10), || async {
        status(api, &ending).await["status"] == "off"
    })
    .await;

    store
        .batch_execute(
            "BEGIN;
             SELECT aidbox_put('Encounter', 'b' || g, jsonb_build_object('status', 'planned')) FROM generate_series(1, 5) g;
             COMMIT;",
        )
        .await
        .unwrap();
    wait_until("5 batched events", Duration::from_secs(30), || async {
        rx.events("batch")
            .iter()
            .map(|b| event_numbers(b).len())
            .sum::<usize>()
            == 5
    })
    .await;
    let sizes: Vec<Vec<i64>> = rx.events("batch").iter().map(event_numbers).collect();
    assert_eq!(sizes, vec![vec![1, 2], vec![3, 4], vec![5]]);
    assert_eq!(
        rx.events("batch")[0]["entry"].as_array().unwrap().len(),
        3,
        "status + 2 entries"
    );
    // The ended subscription got none of them.
    assert!(rx.events("end").is_empty());
    wait_until(
        "heartbeat subscription saw the events",
        Duration::from_secs(30),
        || async {
            rx.events("hb")
                .iter()
                .map(|b| event_numbers(b).len())
                .sum::<usize>()
                == 5
        },
    )
    .await;

    // After a restart, $status still knows the counts and states.
    wait_settled(&env).await;
    d.kill9();
    d = env.start().await;
    assert_eq!(
        status(api, &batched).await["eventsSinceSubscriptionStart"],
        "5"
    );
    assert_eq!(status(api, &batched).await["status"], "active");
    assert_eq!(status(api, &ending).await["status"], "off");
    assert_eq!(
        status(api, &flaky).await["eventsSinceSubscriptionStart"],
        "5"
    );
    // $events answers from the queue after the restart, inclusive bounds; asking for more
    // than the subscription's own content (id-only) gets id-only (issue 11).
    let ev: serde_json::Value = http
        .get(format!("http://127.0.0.1:{api}/Subscription/{batched}/$events?eventsSinceNumber=2&eventsUntilNumber=4&content=full-resource"))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(status_of(&ev)["type"], "query-event");
    assert_eq!(event_numbers(&ev), vec![2, 3, 4]);
    assert!(ev["entry"][1]["fullUrl"]
        .as_str()
        .unwrap()
        .contains("/Encounter/"));
    assert!(ev["entry"][1].get("resource").is_none(), "{ev}");
    let ev_post: serde_json::Value = http
        .post(format!("http://127.0.0.1:{api}/Subscription/{batched}/$events"))
        .json(&json!({"resourceType": "Parameters", "parameter": [{"name": "eventsSinceNumber", "valueString": "5"}]}))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(event_numbers(&ev_post), vec![5]);
    validate(&[ev, ev_post], "r5", &[]);
    // Subscription/$status filters by status.
    let off: serde_json::Value = http
        .get(format!(
            "http://127.0.0.1:{api}/Subscription/$status?status=off"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(off["total"], 1);
    assert!(off["entry"][0]["resource"]["subscription"]["reference"]
        .as_str()
        .unwrap()
        .ends_with(&ending));
    // Heartbeats after the events carry the count and never move it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = rx.bodies("hb").last().cloned().unwrap();
    assert_eq!(status_of(&last)["type"], "heartbeat");
    assert_eq!(status_of(&last)["eventsSinceSubscriptionStart"], "5");

    for h in ["hb", "batch", "flaky"] {
        validate(&rx.bodies(h), "r5", &["--sequence", "strict"]);
    }
    drop(d);
}
