//! Operating the daemon: `check` says what to fix, and capture and delivery ride out a
//! Postgres crash.

use crate::common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter" }]
"#;

fn check(cfg: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_what_to_fix() {
    let env = TestEnv::aidbox(TOPIC).build().await;
    let (ok, out) = check(&env.config);
    assert!(ok, "{out}");
    assert!(out.contains("ok    wal_level = logical"), "{out}");
    assert!(
        out.contains("capture will create it: CREATE PUBLICATION"),
        "{out}"
    );
    assert!(
        out.contains("ok    topic http://fhir-cdc.test/topic/encounter: 1 trigger(s)"),
        "{out}"
    );

    // A criterion on a parameter the resource type does not have is a configuration error.
    let typo = TOPIC.replace(
        "resourceTrigger = [{ resource = \"Encounter\" }]",
        "resourceTrigger = [{ resource = \"Encounter\", queryCriteria = { current = \"statsu=finished\" } }]",
    );
    assert_ne!(typo, TOPIC);
    let typo = env.config_variant("typo.toml", |c| c.topic = topics(&typo));
    let (ok, out) = check(&typo);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FIX") && out.contains("no search parameter \"statsu\""),
        "{out}"
    );

    let strict = env.config_variant("strict.toml", |c| {
        c.source.create_missing = false;
        c.source.slot = "fhir_cdc".into();
    });
    let (ok, out) = check(&strict);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FIX   publication fhir_cdc is missing"),
        "{out}"
    );
    // The publication names the store's resource and history tables, never a whole schema
    // (Postgres would refuse the store's UPDATE/DELETE on tables without a replica identity).
    assert!(
        out.contains("-> CREATE PUBLICATION \"fhir_cdc\" FOR TABLE \"public\".")
            && out.contains("\"public\".\"encounter\", \"public\".\"encounter_history\", "),
        "{out}"
    );
    assert!(!out.contains("TABLES IN SCHEMA"), "{out}");
    assert!(
        out.contains("-> SELECT pg_create_logical_replication_slot('fhir_cdc', 'pgoutput')"),
        "{out}"
    );

    // What the profile reads and the grants for it.
    assert!(
        out.contains("reads the same tables by key")
            && out.contains("GRANT SELECT ON \"public\".")
            && out.contains("\"public\".\"encounter\", \"public\".\"encounter_history\"")
            && out.contains("TO \"postgres\""),
        "{out}"
    );
    // A publication made by hand that names a table without a replica identity is flagged
    // (the store's own UPDATE/DELETE on it would fail), with the SQL that fixes it.
    env.store
        .batch_execute(
            "CREATE TABLE audit_log (at timestamptz, what text);
             CREATE PUBLICATION fhir_cdc FOR TABLE encounter, audit_log",
        )
        .await
        .unwrap();
    let (ok, out) = check(&strict);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FIX   published table public.audit_log has no replica identity")
            && out.contains("-> ALTER PUBLICATION \"fhir_cdc\" DROP TABLE public.audit_log"),
        "{out}"
    );
    env.store
        .batch_execute("DROP PUBLICATION fhir_cdc; DROP TABLE audit_log")
        .await
        .unwrap();

    let gone = env.config_variant("gone.toml", |c| {
        c.source.url = format!("postgresql://postgres@127.0.0.1:{}/{}", free_port(), env.db)
    });
    let (ok, out) = check(&gone);
    assert!(!ok);
    assert!(out.contains("FIX   cannot connect to source.url"), "{out}");

    // A broken file is refused before any database work, with the reason.
    let bad = write_file(env.dir.path(), "bad.toml", "[source]\nurl = 1\n");
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_is_ridden_out() {
    // Crashes Postgres: a cluster of its own.
    let env = TestEnv::aidbox(TOPIC).own_cluster().build().await;
    let (rx, api) = (&env.rx, env.api);
    let store = env.client().await;
    let d = env.start().await;
    let sub = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("r"),
        "id-only",
    )
    .await;
    wait_until("handshake", Duration::from_secs(30), || async {
        !rx.bodies("r").is_empty()
    })
    .await;
    aidbox_put(&store, "Encounter", "before", &json!({"status": "planned"})).await;
    wait_until("first event", Duration::from_secs(30), || async {
        rx.events("r").len() == 1
    })
    .await;
    drop(store);

    env.pg.restart(Duration::from_secs(2));
    let store = env.client().await;
    aidbox_put(&store, "Encounter", "after", &json!({"status": "planned"})).await;
    wait_until("event after the crash", Duration::from_secs(90), || async {
        rx.events("r").len() >= 2
    })
    .await;
    let urls: Vec<String> = rx
        .events("r")
        .iter()
        .map(|b| b["entry"][1]["fullUrl"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        urls,
        [
            "http://fhir-cdc.test/fhir/Encounter/before",
            "http://fhir-cdc.test/fhir/Encounter/after"
        ]
    );
    assert_eq!(status(api, &sub).await["eventsSinceSubscriptionStart"], "2");
    assert!(d.log_text().contains("reconnecting"), "{}", d.log_text());
    validate(&rx.bodies("r"), "r5", &["--sequence", "strict"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_delivered_events() {
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| c.queue.retention_hours = 0)
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let mut d = env.start().await;
    let ok = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("ok"),
        "id-only",
    )
    .await;
    wait_until("handshake", Duration::from_secs(30), || async {
        !rx.bodies("ok").is_empty()
    })
    .await;
    aidbox_put(store, "Encounter", "r1", &json!({"status": "planned"})).await;
    wait_until("delivered", Duration::from_secs(30), || async {
        rx.events("ok").len() == 1
    })
    .await;
    // A subscriber that goes down keeps its events pending.
    let down = subscribe(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("down"),
        "id-only",
    )
    .await;
    wait_until("down active", Duration::from_secs(30), || async {
        status(api, &down).await["status"] == "active"
    })
    .await;
    rx.answer("down", 503);
    aidbox_put(store, "Encounter", "r2", &json!({"status": "planned"})).await;
    wait_until("ok got r2", Duration::from_secs(30), || async {
        rx.events("ok").len() == 2
    })
    .await;

    // Retention runs when delivery starts: settled events go, the pending one stays.
    d.kill9();
    d = env.start().await;
    let q = env.client().await;
    wait_until("retention", Duration::from_secs(30), || async {
        d.log_text().contains("retention removed delivered events")
    })
    .await;
    let left: Vec<String> = q
        .query("SELECT resource_id FROM fhir_cdc.event ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["r2"], "r2 is still pending for the down subscriber");
    let ev: serde_json::Value = reqwest::get(format!(
        "http://127.0.0.1:{api}/Subscription/{ok}/$events?eventsSinceNumber=1&eventsUntilNumber=2"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    // r1 (eventNumber 1) was let go; r2 is still in the queue for the down subscriber, so
    // `ok` can still look it up as its eventNumber 2.
    assert_eq!(event_numbers(&ev), [2], "r1 was let go, r2 kept");
    assert_eq!(
        status(api, &ok).await["eventsSinceSubscriptionStart"],
        "2",
        "counts survive retention"
    );
}
