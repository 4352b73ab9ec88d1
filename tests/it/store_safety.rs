//! Attaching never breaks the store: the publication names only the tables the profile
//! reads, so Postgres keeps accepting the store's own UPDATE and DELETE on tables without a
//! replica identity (publishing a whole schema makes it refuse them).

use crate::common::*;
use serde_json::json;
use std::time::Duration;

const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create"] }]

[[topic]]
url = "http://fhir-cdc.test/topic/condition"
resourceTrigger = [{ resource = "Condition", supportedInteraction = ["create"] }]
"#;

/// Tables the publication covers, as `schema.table`.
async fn published(store: &tokio_postgres::Client) -> Vec<String> {
    store
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables
             WHERE pubname = 'fhir_cdc' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The store's own writes to a table without a primary key.
async fn store_writes_keyless_table(store: &tokio_postgres::Client) {
    store
        .batch_execute("INSERT INTO audit_log VALUES (now(), 'a'), (now(), 'b')")
        .await
        .unwrap();
    let updated = store
        .execute("UPDATE audit_log SET what = 'c' WHERE what = 'a'", &[])
        .await
        .expect("the store may UPDATE its table without a replica identity");
    assert_eq!(updated, 1);
    let deleted = store
        .execute("DELETE FROM audit_log", &[])
        .await
        .expect("the store may DELETE from its table without a replica identity");
    assert!(deleted >= 2);
}

async fn encounter_notifies(store: &tokio_postgres::Client, rx: &Receiver, api: u16, id: &str) {
    subscribe_active(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url(id),
        "id-only",
        json!({}),
    )
    .await;
    aidbox_put(store, "Encounter", id, &json!({"status": "planned"})).await;
    wait_until(
        "the encounter notification",
        Duration::from_secs(30),
        || async { rx.events(id).len() == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_leaves_the_stores_other_tables_writable_and_adds_new_resource_tables() {
    let env = TestEnv::aidbox(TOPICS)
        .config(|c| c.source.publication_refresh_secs = 1)
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    store
        .batch_execute("CREATE TABLE audit_log (at timestamptz, what text)")
        .await
        .unwrap();
    let d = env.start().await;

    // Progress first: capture streams and delivers through the publication it made.
    encounter_notifies(store, rx, api, "e1").await;
    let tables = published(store).await;
    assert!(
        tables.contains(&"public.encounter".to_string()),
        "{tables:?}"
    );
    assert!(
        tables.contains(&"public.encounter_history".to_string()),
        "{tables:?}"
    );
    assert!(
        !tables.contains(&"public.audit_log".to_string()),
        "{tables:?}"
    );
    store_writes_keyless_table(store).await;

    // A resource table created after attaching is added to the publication and captured.
    store
        .batch_execute("SELECT aidbox_create_type('Condition')")
        .await
        .unwrap();
    wait_published(store, "condition").await;
    subscribe_active(
        api,
        "http://fhir-cdc.test/topic/condition",
        &rx.url("cond"),
        "id-only",
        json!({}),
    )
    .await;
    store
        .execute(
            "SELECT aidbox_put('Condition', 'c1', $1)",
            &[&json!({"clinicalStatus": {"text": "active"}, "subject": {"reference": "Patient/p1"}})],
        )
        .await
        .unwrap();
    wait_until(
        "the condition notification",
        Duration::from_secs(30),
        || async { rx.events("cond").len() == 1 },
    )
    .await;
    let mut all = rx.events("e1");
    all.extend(rx.events("cond"));
    validate(&all, "r5", &[]);
    assert!(
        d.log_text().contains("publication updated"),
        "{}",
        d.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_schema_publication_from_an_older_version_is_narrowed() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    store
        .batch_execute(
            "CREATE TABLE audit_log (at timestamptz, what text);
             CREATE PUBLICATION fhir_cdc FOR TABLES IN SCHEMA public
                 WITH (publish = 'insert, update, delete');",
        )
        .await
        .unwrap();
    // What the previous version did to the store: its own DELETE is refused.
    let refused = store
        .execute("DELETE FROM audit_log", &[])
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("does not have a replica identity")
            || format!("{refused:?}").contains("does not have a replica identity"),
        "{refused:?}"
    );

    let d = env.start().await;
    encounter_notifies(store, rx, api, "e2").await;
    validate(&rx.events("e2"), "r5", &[]);

    let tables = published(store).await;
    assert!(
        !tables.contains(&"public.audit_log".to_string()),
        "{tables:?}"
    );
    assert!(
        tables.contains(&"public.encounter".to_string()),
        "{tables:?}"
    );
    let schemas: i64 = store
        .query_one(
            "SELECT count(*) FROM pg_publication_namespace pn
             JOIN pg_publication p ON p.oid = pn.pnpubid WHERE p.pubname = 'fhir_cdc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0, "no schema is published whole any more");
    store_writes_keyless_table(store).await;
    assert!(
        d.log_text().contains("DROP TABLES IN SCHEMA"),
        "{}",
        d.log_text()
    );
}
