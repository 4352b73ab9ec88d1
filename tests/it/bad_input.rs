//! Invariant 5 and 6: bad input gives one clear log line naming only references, and stops
//! nothing else.

use crate::common::*;
use fhir_cdc::config::{GenericTable, ProfileKind};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_and_dead_endpoints_stop_nothing() {
    let env = TestEnv::empty(
        r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
"#,
    )
    .config(|c| {
        c.source.profile = ProfileKind::Generic;
        c.source.tables = vec![GenericTable {
            table: "res".into(),
            resource_type: None,
            type_column: Some("rtype".into()),
            id_column: "id".into(),
            resource_column: "resource".into(),
            version_column: Some("ver".into()),
            deleted_column: Some("gone".into()),
        }];
        // This test ran with the daemon's defaults for these.
        c.queue.flush_ms = 20;
        c.api.base_url = None;
        c.delivery.retry_max_ms = 300_000;
        c.delivery.timeout_secs = 10;
    })
    .build()
    .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    // A generic store whose resource column is text, so it can hold broken JSON.
    store
        .batch_execute(
            "CREATE TABLE res (id text PRIMARY KEY, rtype text NOT NULL, resource text,
                               gone boolean NOT NULL DEFAULT false, ver integer NOT NULL DEFAULT 1)",
        )
        .await
        .unwrap();
    let refused = format!("http://127.0.0.1:{}/nobody-listens", free_port());
    let d = env.start().await;
    let good = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("good"),
        "full-resource",
    )
    .await;
    let dead = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &refused,
        "id-only",
    )
    .await;
    wait_until("good handshake", Duration::from_secs(30), || async {
        !rx.bodies("good").is_empty()
    })
    .await;

    store
        .batch_execute(
            r#"INSERT INTO res (id, rtype, resource) VALUES ('g1', 'Encounter', '{"status":"planned"}');
               INSERT INTO res (id, rtype, resource) VALUES ('bad1', 'Encounter', '{"name": "Jane Doe", ');
               INSERT INTO res (id, rtype, resource) VALUES ('f1', 'Foo', '{"secret": "Jane Doe"}');
               INSERT INTO res (id, rtype, resource) VALUES ('s-broken', 'Subscription', '{"resourceType": "Subscr');
               INSERT INTO res (id, rtype, resource) VALUES ('s-unknown', 'Subscription',
                 '{"resourceType":"Subscription","status":"requested","topic":"http://nope/topic","channelType":{"code":"rest-hook"},"endpoint":"http://127.0.0.1:1/x","content":"id-only"}');
               INSERT INTO res (id, rtype, resource) VALUES ('g2', 'Encounter', '{"status":"finished"}');"#,
        )
        .await
        .unwrap();
    wait_until("two good events", Duration::from_secs(30), || async {
        rx.events("good").len() >= 2
    })
    .await;
    let ids: Vec<String> = rx
        .events("good")
        .iter()
        .map(|b| {
            b["entry"][1]["resource"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["g1", "g2"]);
    assert_eq!(
        rx.events("good")[1]["entry"][1]["resource"]["meta"]["versionId"],
        "1"
    );
    wait_until(
        "dead endpoint in error",
        Duration::from_secs(30),
        || async { status(api, &dead).await["status"] == "error" },
    )
    .await;
    assert_eq!(status(api, &good).await["status"], "active");
    // Subscriptions refused in the store are recorded in error, with the reason.
    for (id, reason) in [
        ("s-unknown", "unknown SubscriptionTopic"),
        ("s-broken", "not a JSON object"),
    ] {
        let st = status(api, id).await;
        assert_eq!(st["status"], "error", "{id}: {st}");
        let text = st["error"][0]["text"].as_str().unwrap_or_default();
        assert!(text.contains(reason), "{id}: {text}");
    }

    let log = d.log_text();
    if std::env::var("SHOW_LOG").is_ok() {
        eprintln!("{log}");
    }
    let bad_json: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Encounter/bad1"))
        .collect();
    assert_eq!(bad_json.len(), 1, "one line for the broken row:\n{log}");
    assert!(
        bad_json[0].contains("not valid JSON") || bad_json[0].contains("not a JSON object"),
        "{}",
        bad_json[0]
    );
    let foo: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"Foo\" is not a FHIR resource type"))
        .collect();
    assert_eq!(foo.len(), 1, "one line for the unknown type:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("handshake failed")
            && l.contains(&dead)
            && l.contains("connection")),
        "{log}"
    );
    assert!(!log.contains("Jane"), "PHI in the log:\n{log}");
    assert!(
        !log.contains("planned") && !log.contains("finished"),
        "resource content in the log:\n{log}"
    );
    validate(&rx.bodies("good"), "r5", &["--sequence", "strict"]);
}
