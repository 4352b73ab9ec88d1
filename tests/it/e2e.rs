//! End to end through real WAL, a real webhook and the official validator.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter-all"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update", "delete"] }]

[[topic]]
url = "http://fhir-cdc.test/topic/observation-deleted"
status = "active"
resourceTrigger = [{ resource = "http://hl7.org/fhir/StructureDefinition/Observation", supportedInteraction = ["delete"] }]
"#;

fn methods(bundles: &[Value]) -> Vec<(i64, String, String)> {
    bundles
        .iter()
        .map(|b| {
            let n = event_numbers(b)[0];
            let e = &b["entry"][1];
            (
                n,
                e["request"]["method"].as_str().unwrap().to_string(),
                e["fullUrl"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_delete_notify_in_commit_order() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let d = env.start().await;

    let enc = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter-all",
        &rx.url("enc"),
        "full-resource",
    )
    .await;
    let obs = subscribe(
        api,
        "http://fhir-cdc.test/topic/observation-deleted",
        &rx.url("obs"),
        "id-only",
    )
    .await;
    wait_until("both handshakes", Duration::from_secs(30), || async {
        rx.bodies("enc").len() == 1 && rx.bodies("obs").len() == 1
    })
    .await;
    assert_eq!(status_of(&rx.bodies("enc")[0])["type"], "handshake");
    assert_eq!(
        rx.got.lock().unwrap()[0]
            .headers
            .get("x-test")
            .map(String::as_str),
        Some("yes")
    );
    wait_until("active", Duration::from_secs(10), || async {
        status(api, &enc).await["status"] == "active"
    })
    .await;

    let put = |t: &'static str, id: &'static str, body: Value| {
        let store = &store;
        async move {
            store
                .execute("SELECT aidbox_put($1, $2, $3)", &[&t, &id, &body])
                .await
                .unwrap();
        }
    };
    put(
        "Encounter",
        "e1",
        json!({"status": "planned", "class": [{"coding": [{"code": "IMP"}]}]}),
    )
    .await;
    put("Encounter", "e1", json!({"status": "in-progress"})).await;
    put(
        "Observation",
        "o1",
        json!({"status": "final", "code": {"text": "x"}}),
    )
    .await;
    // Rolled back: never notifies.
    store
        .batch_execute(
            "BEGIN; SELECT aidbox_put('Encounter', 'e2', '{\"status\":\"planned\"}'); ROLLBACK;",
        )
        .await
        .unwrap();
    aidbox_delete(store, "Encounter", "e1").await;
    aidbox_delete(store, "Observation", "o1").await;
    put("Encounter", "e3", json!({"status": "planned"})).await;

    wait_until(
        "4 encounter events and 1 observation event",
        Duration::from_secs(30),
        || async { rx.events("enc").len() >= 4 && !rx.events("obs").is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enc_events = rx.events("enc");
    let base = "http://fhir-cdc.test/fhir";
    assert_eq!(
        methods(&enc_events),
        vec![
            (1, "POST".into(), format!("{base}/Encounter/e1")),
            (2, "PUT".into(), format!("{base}/Encounter/e1")),
            (3, "DELETE".into(), format!("{base}/Encounter/e1")),
            (4, "POST".into(), format!("{base}/Encounter/e3")),
        ]
    );
    // Full resource: id, type and meta come from the columns; a delete carries no resource.
    let r1 = &enc_events[0]["entry"][1]["resource"];
    assert_eq!(r1["resourceType"], "Encounter");
    assert_eq!(r1["id"], "e1");
    assert_eq!(r1["status"], "planned");
    assert!(r1["meta"]["versionId"].is_string());
    assert_eq!(
        enc_events[1]["entry"][1]["resource"]["status"],
        "in-progress"
    );
    assert!(enc_events[2]["entry"][1].get("resource").is_none());
    let obs_events = rx.events("obs");
    assert_eq!(
        methods(&obs_events),
        vec![(1, "DELETE".into(), format!("{base}/Observation/o1"))]
    );
    assert!(obs_events[0]["entry"][1].get("resource").is_none());

    let st = status(api, &enc).await;
    assert_eq!(st["eventsSinceSubscriptionStart"], "4");
    assert_eq!(st["type"], "query-status");
    let st = status(api, &obs).await;
    assert_eq!(st["eventsSinceSubscriptionStart"], "1");

    validate(&rx.bodies("enc"), "r5", &["--sequence", "strict"]);
    validate(&rx.bodies("obs"), "r5", &["--sequence", "strict"]);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_5000_rows_gives_5000_events() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let _d = env.start().await;
    let id = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter-all",
        &rx.url("big"),
        "id-only",
    )
    .await;
    wait_until("handshake", Duration::from_secs(30), || async {
        !rx.bodies("big").is_empty()
    })
    .await;

    store
        .batch_execute(
            "BEGIN;
             SELECT aidbox_put('Encounter', 'big-' || g, jsonb_build_object('status', 'planned', 'n', g))
             FROM generate_series(1, 5000) g;
             COMMIT;",
        )
        .await
        .unwrap();
    let q = env.client().await;
    wait_until("5000 queued events", Duration::from_secs(60), || async {
        let n: i64 = q
            .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
            .await
            .unwrap()
            .get(0);
        n >= 5000
    })
    .await;
    wait_until("5000 notifications", Duration::from_secs(180), || async {
        rx.events("big").len() >= 5000
    })
    .await;
    let n: i64 = q
        .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5000);
    let distinct: i64 = q
        .query_one(
            "SELECT count(DISTINCT resource_id) FROM fhir_cdc.event",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 5000);
    let numbers: Vec<i64> = rx.events("big").iter().flat_map(event_numbers).collect();
    assert_eq!(numbers, (1..=5000).collect::<Vec<_>>());
    assert_eq!(
        status(api, &id).await["eventsSinceSubscriptionStart"],
        "5000"
    );
    // Commit order within the transaction is kept.
    let first = &rx.events("big")[0]["entry"][1]["fullUrl"];
    assert_eq!(first, "http://fhir-cdc.test/fhir/Encounter/big-1");
}

const TWO_TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/enc-a"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
canFilterBy = [{ resource = "Encounter", filterParameter = "patient" }]

[[topic]]
url = "http://fhir-cdc.test/topic/enc-b"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create"] }]
canFilterBy = [{ resource = "Encounter", filterParameter = "patient" }, { resource = "Encounter", filterParameter = "status" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_for_two_topics_is_one_queue_row_and_each_topic_filters_it() {
    let env = TestEnv::aidbox(TWO_TOPICS).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let _d = env.start().await;
    let filter = |p: &str| json!({"filterBy": [{"resourceType": "Encounter", "filterParameter": "patient", "value": p}]});
    for (topic, hook, patient) in [
        ("enc-a", "a1", "Patient/1"),
        ("enc-b", "b1", "Patient/1"),
        ("enc-b", "b2", "Patient/2"),
    ] {
        let topic = format!("http://fhir-cdc.test/topic/{topic}");
        subscribe_active(api, &topic, &rx.url(hook), "id-only", filter(patient)).await;
    }
    for (id, patient) in [("x1", "Patient/1"), ("x2", "Patient/2")] {
        let body = json!({"resourceType": "Encounter", "status": "planned", "subject": {"reference": patient}});
        aidbox_put(store, "Encounter", id, &body).await;
    }
    wait_until("the notifications", Duration::from_secs(30), || async {
        rx.events("a1").len() == 1 && rx.events("b1").len() == 1 && rx.events("b2").len() == 1
    })
    .await;
    let rows = store
        .query(
            "SELECT resource_id, topics FROM fhir_cdc.event ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, Vec<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let both = vec![
        "http://fhir-cdc.test/topic/enc-a".to_string(),
        "http://fhir-cdc.test/topic/enc-b".to_string(),
    ];
    assert_eq!(rows, vec![("x1".into(), both.clone()), ("x2".into(), both)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.events("a1").len(), 1, "x2 is Patient/2's");
    for (hook, id) in [("a1", "x1"), ("b1", "x1"), ("b2", "x2")] {
        let b = &rx.events(hook)[0];
        assert!(
            b.to_string().contains(&format!("Encounter/{id}")),
            "{hook}: {b}"
        );
        validate(&rx.bodies(hook), "r5", &["--sequence", "strict"]);
    }
}

/// A daemon on the database's own machine reaches it through the server's Unix socket
/// (`?host=<directory>`): the replication stream goes over it too (the walsender's client
/// has no address), and a change still becomes a valid notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_url_naming_a_socket_directory_streams_over_the_unix_socket() {
    let mut env = TestEnv::aidbox(TOPICS).build().await;
    let url = format!(
        "postgresql:///{}?host={}&port={}&user=postgres",
        env.db, env.pg.dir, env.pg.port
    );
    env.edit(|c| c.source.url = url);
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let d = env.start().await;
    let app = format!("fhir-cdc-{}", env.slot);
    let socket: Option<bool> = store
        .query_opt(
            "SELECT client_addr IS NULL FROM pg_stat_replication WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert_eq!(
        socket,
        Some(true),
        "the replication stream is not on the socket"
    );

    let enc = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter-all",
        &rx.url("enc"),
        "full-resource",
    )
    .await;
    wait_until("active", Duration::from_secs(30), || async {
        status(api, &enc).await["status"] == "active"
    })
    .await;
    store
        .execute(
            "SELECT aidbox_put('Encounter', 'e1', '{\"status\": \"planned\"}')",
            &[],
        )
        .await
        .unwrap();
    wait_until("the event", Duration::from_secs(30), || async {
        !rx.events("enc").is_empty()
    })
    .await;
    let events = rx.events("enc");
    assert_eq!(events[0]["entry"][1]["resource"]["id"], "e1");
    validate(&rx.bodies("enc"), "r5", &["--sequence", "strict"]);
    drop(d);
}
