//! Store profiles against each store's own tables, written the way that store writes them
//! (the statements of its REST and transaction paths, in their transaction grouping, from
//! `scripts/stores/<profile>.sql`): every create, update, delete and re-create comes out
//! once, with id and meta as the store serves them, the previous version read by key from
//! the store's history, and the store's tables without a primary key stay writable.

use crate::common::*;
use fhir_cdc::config::ProfileKind;
use serde_json::{json, Value};
use std::time::Duration;

const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/all"
resourceTrigger = [
  { resource = "Patient", supportedInteraction = ["create", "update", "delete"] },
  { resource = "Encounter", supportedInteraction = ["create", "update", "delete"] },
  { resource = "Observation", supportedInteraction = ["create", "update", "delete"] },
]

[[topic]]
url = "http://fhir-cdc.test/topic/deactivated"
resourceTrigger = [{ resource = "Patient", supportedInteraction = ["update"], fhirPathCriteria = "%previous.active = true and %current.active = false" }]
"#;

async fn run(c: &tokio_postgres::Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `(type, id, version, interaction)` of the events queued for `topic`, in order.
async fn queued(c: &tokio_postgres::Client, topic: &str) -> Vec<(String, String, String, String)> {
    c.query(
        "SELECT resource_type, resource_id, coalesce(version_id, ''), interaction
         FROM fhir_cdc.event WHERE $1 = ANY(topics) ORDER BY id",
        &[&topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn ev(t: &str, id: &str, v: &str, i: &str) -> (String, String, String, String) {
    (t.into(), id.into(), v.into(), i.into())
}

/// A store of `profile`'s layout (`init-store`'s SQL), the daemon running, and a full-resource
/// subscriber `all` on the all-types topic with `max_count`.
async fn profile_store(profile: ProfileKind, max_count: i64) -> (TestEnv, Daemon) {
    let env = TestEnv::empty(TOPICS)
        .config(move |c| c.source.profile = profile)
        .build()
        .await;
    let layout = fhir_cdc::store::init::layout_sql(profile).unwrap();
    run(&env.store, layout).await;
    let d = env.start().await;
    subscribe_active(
        env.api,
        "http://fhir-cdc.test/topic/all",
        &env.rx.url("all"),
        "full-resource",
        json!({ "maxCount": max_count }),
    )
    .await;
    (env, d)
}

/// Exactly `expected` queued for the all-types topic and `deactivated` for the `%previous`
/// topic (the previous version read by key), then every event notified to `all`.
async fn changes_are(
    env: &TestEnv,
    expected: &[(String, String, String, String)],
    deactivated: Vec<(String, String, String, String)>,
) {
    let store = &env.store;
    wait_until("every write queued", Duration::from_secs(30), || async {
        queued(store, "http://fhir-cdc.test/topic/all").await.len() >= expected.len()
    })
    .await;
    wait_settled(env).await;
    assert_eq!(
        queued(store, "http://fhir-cdc.test/topic/all").await,
        expected
    );
    assert_eq!(
        queued(store, "http://fhir-cdc.test/topic/deactivated").await,
        deactivated
    );
    wait_until("the notifications", Duration::from_secs(30), || async {
        env.rx.events("all").iter().flat_map(event_numbers).count() >= expected.len()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hfs_writes_become_exactly_their_fhir_changes() {
    // One event per Bundle: the two tenants' Patient/p1 version 1 would share a fullUrl
    // in one Bundle (bdl-7); events do not carry the tenant yet.
    let (env, _d) = profile_store(ProfileKind::Helios, 1).await;
    let store = &env.store;
    let published = published_tables(store).await;
    assert_eq!(published, ["resources"], "only HFS's resource table");

    // HFS's REST path: each statement its own transaction.
    run(
        store,
        r#"SELECT hfs_create('t1', 'Patient', 'p1', '{"active": true}')"#,
    )
    .await;
    run(store, "INSERT INTO search_index VALUES ('t1', 'Patient', 'p1', 'active', NULL, NULL, 'true', NULL, NULL)").await;
    run(
        store,
        r#"SELECT hfs_create('t2', 'Patient', 'p1', '{"active": true}')"#,
    )
    .await;
    run(
        store,
        r#"SELECT hfs_update('t1', 'Patient', 'p1', '{"active": false}')"#,
    )
    .await;
    // Search index rows replaced: UPDATE and DELETE on a table without a primary key.
    run(
        store,
        "UPDATE search_index SET value_token_code = 'false' WHERE resource_id = 'p1'",
    )
    .await;
    // A byte-identical PUT still writes a version in HFS.
    run(
        store,
        r#"SELECT hfs_update('t1', 'Patient', 'p1', '{"active": false}')"#,
    )
    .await;
    // A body TOASTed out of line; its soft delete leaves `data` unchanged in the WAL.
    run(store, "SELECT hfs_create('t1', 'Observation', 'o-big', jsonb_build_object('status', 'final', 'code', jsonb_build_object('text', 'big'), 'note', jsonb_build_array(jsonb_build_object('text', (SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 600) g)))))").await;
    run(store, "SELECT hfs_delete('t1', 'Observation', 'o-big')").await;
    run(store, "SELECT hfs_delete('t1', 'Patient', 'p1')").await;
    run(store, "DELETE FROM search_index WHERE resource_id = 'p1'").await;
    // Re-create after delete: the UPDATE and its history row in two transactions.
    run(
        store,
        r#"SELECT hfs_restore('t1', 'Patient', 'p1', '{"active": true}')"#,
    )
    .await;
    run(store, "SELECT hfs_restore_history('t1', 'Patient', 'p1')").await;
    // The transaction-bundle path: one transaction.
    run(
        store,
        r#"BEGIN;
           SELECT hfs_create('t1', 'Encounter', 'e1', '{"status": "planned"}');
           SELECT hfs_create('t1', 'Encounter', 'e2', '{"status": "planned"}');
           SELECT hfs_update('t1', 'Encounter', 'e1', '{"status": "in-progress"}');
           COMMIT;"#,
    )
    .await;
    run(
        store,
        r#"BEGIN; SELECT hfs_create('t1', 'Encounter', 'rolled-back', '{"status": "planned"}'); ROLLBACK;"#,
    )
    .await;

    let expected = vec![
        ev("Patient", "p1", "1", "create"),
        ev("Patient", "p1", "1", "create"),
        ev("Patient", "p1", "2", "update"),
        ev("Patient", "p1", "3", "update"),
        ev("Observation", "o-big", "1", "create"),
        ev("Observation", "o-big", "2", "delete"),
        ev("Patient", "p1", "4", "delete"),
        ev("Patient", "p1", "5", "create"),
        ev("Encounter", "e1", "1", "create"),
        ev("Encounter", "e2", "1", "create"),
        ev("Encounter", "e1", "2", "update"),
    ];
    // The previous version came from resource_history, per tenant: only t1's 1 → 2 fires.
    changes_are(&env, &expected, vec![ev("Patient", "p1", "2", "update")]).await;
    let bodies = env.rx.bodies("all");
    let resources = notified(&env.rx, "all");
    let p1v2 = resources
        .iter()
        .find(|r| r["id"] == "p1" && r["meta"]["versionId"] == "2")
        .expect("Patient/p1 version 2 in a notification");
    assert_eq!(p1v2["active"], false);
    assert!(p1v2["meta"]["lastUpdated"]
        .as_str()
        .is_some_and(|t| t.contains('T')));
    let big = resources
        .iter()
        .find(|r| r["id"] == "o-big")
        .expect("the TOASTed Observation");
    assert!(big["note"][0]["text"].as_str().unwrap().len() > 8000);
    validate(&bodies, "r5", &[]);
}

/// The subscriber's resources (not the status) from every event notification of `hook`.
fn notified(rx: &Receiver, hook: &str) -> Vec<Value> {
    rx.events(hook)
        .iter()
        .flat_map(|b| b["entry"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.get("resource").cloned())
        .filter(|r| r["resourceType"] != "SubscriptionStatus")
        .collect()
}

async fn write(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medplum_writes_become_exactly_their_fhir_changes() {
    let (env, _d) = profile_store(ProfileKind::Medplum, 50).await;
    let store = &env.store;
    let published = published_tables(store).await;
    assert_eq!(
        published,
        [
            "DiagnosticReport",
            "Encounter",
            "MedicationRequest",
            "Observation",
            "Patient",
            "Subscription"
        ],
        "only the resource tables, never _History, _Token or lookup tables"
    );

    let p = "11111111-1111-4111-8111-111111111111";
    let e1 = "22222222-2222-4222-8222-222222222222";
    let e2 = "33333333-3333-4333-8333-333333333333";
    let o = "44444444-4444-4444-8444-444444444444";
    let w =
        |ty: &str, id: &str, body: &str| format!("SELECT medplum_write('{ty}', '{id}', '{body}')");
    let p1 = write(store, &w("Patient", p, r#"{"active": true}"#)).await;
    let p2 = write(store, &w("Patient", p, r#"{"active": false}"#)).await;
    // A >8 KB body, TOASTed.
    let o1 = write(store, &format!("SELECT medplum_write('Observation', '{o}', jsonb_build_object('status', 'final', 'code', jsonb_build_object('text', 'big'), 'note', jsonb_build_array(jsonb_build_object('text', (SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 600) g)))))")).await;
    let p3 = write(store, &format!("SELECT medplum_delete('Patient', '{p}')")).await;
    assert_eq!(
        write(store, &format!("SELECT medplum_delete('Patient', '{p}')")).await,
        "",
        "deleting a deleted resource writes nothing"
    );
    // Re-create after delete: the upsert brings the row back.
    let p4 = write(store, &w("Patient", p, r#"{"active": true}"#)).await;
    // A transaction bundle: one transaction.
    let tx = store
        .simple_query(&format!(
            "BEGIN; {}; {}; {}; COMMIT;",
            w("Encounter", e1, r#"{"status": "planned"}"#),
            w("Encounter", e2, r#"{"status": "planned"}"#),
            w("Encounter", e1, r#"{"status": "in-progress"}"#)
        ))
        .await
        .unwrap();
    let versions: Vec<String> = tx
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    run(
        store,
        &format!(
            "BEGIN; {}; ROLLBACK;",
            w(
                "Encounter",
                "55555555-5555-4555-8555-555555555555",
                r#"{"status": "planned"}"#
            )
        ),
    )
    .await;
    // Medplum's token table has no primary key; it keeps taking UPDATE and DELETE.
    run(
        store,
        &format!("UPDATE \"Patient_Token\" SET value = 'x' WHERE \"resourceId\" = '{p}'"),
    )
    .await;

    let expected = vec![
        ev("Patient", p, &p1, "create"),
        ev("Patient", p, &p2, "update"),
        ev("Observation", o, &o1, "create"),
        ev("Patient", p, &p3, "delete"),
        ev("Patient", p, &p4, "create"),
        ev("Encounter", e1, &versions[0], "create"),
        ev("Encounter", e2, &versions[1], "create"),
        ev("Encounter", e1, &versions[2], "update"),
    ];
    // The previous version is the history row before: active true → false fires once.
    changes_are(&env, &expected, vec![ev("Patient", p, &p2, "update")]).await;
    let resources = notified(&env.rx, "all");
    let v2 = resources
        .iter()
        .find(|r| r["meta"]["versionId"] == p2.as_str())
        .expect("Patient version 2 in a notification");
    assert_eq!((v2["id"].as_str(), &v2["active"]), (Some(p), &json!(false)));
    validate(&env.rx.bodies("all"), "r5", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hapi_writes_become_exactly_their_fhir_changes() {
    let (env, _d) = profile_store(ProfileKind::Hapi, 50).await;
    let store = &env.store;
    let published = published_tables(store).await;
    assert_eq!(published, ["hfj_res_ver"], "only the version table");

    // HAPI bodies carry neither id nor meta.
    run(
        store,
        r#"SELECT hapi_create('Patient', 'p1', '{"resourceType": "Patient", "active": true}')"#,
    )
    .await;
    run(
        store,
        r#"SELECT hapi_update('Patient', 'p1', '{"resourceType": "Patient", "active": false}')"#,
    )
    .await;
    // An unchanged update writes nothing in HAPI (suppressUpdatesWithNoChange): no SQL.
    // A conditional update: the index lookup, then the update path, in one transaction.
    run(
        store,
        r#"BEGIN;
           SELECT res_id FROM hfj_spidx_token WHERE res_type = 'Patient' AND sp_name = '_id' AND sp_value = 'p1';
           SELECT hapi_update('Patient', 'p1', '{"resourceType": "Patient", "active": false, "gender": "male"}');
           COMMIT;"#,
    )
    .await;
    run(store, "SELECT hapi_create('Observation', 'o-big', jsonb_build_object('resourceType', 'Observation', 'status', 'final', 'code', jsonb_build_object('text', 'big'), 'note', jsonb_build_array(jsonb_build_object('text', (SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 600) g)))))").await;
    run(store, "SELECT hapi_delete('Observation', 'o-big')").await;
    run(store, "SELECT hapi_delete('Patient', 'p1')").await;
    // Re-create after delete: the update path.
    run(
        store,
        r#"SELECT hapi_update('Patient', 'p1', '{"resourceType": "Patient", "active": true}')"#,
    )
    .await;
    run(
        store,
        r#"BEGIN;
           SELECT hapi_create('Encounter', 'e1', '{"resourceType": "Encounter", "status": "planned"}');
           SELECT hapi_create('Encounter', 'e2', '{"resourceType": "Encounter", "status": "planned"}');
           SELECT hapi_update('Encounter', 'e1', '{"resourceType": "Encounter", "status": "in-progress"}');
           COMMIT;"#,
    )
    .await;
    run(
        store,
        r#"BEGIN; SELECT hapi_create('Encounter', 'rolled-back', '{"resourceType": "Encounter", "status": "planned"}'); ROLLBACK;"#,
    )
    .await;
    // A legacy JSONC row: the body is a gzip large object, which logical decoding never sees.
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(br#"{"resourceType":"Patient","gender":"female"}"#)
            .unwrap();
        e.finish().unwrap()
    };
    store
        .execute(
            "SELECT hapi_create_jsonc('Patient', 'p-legacy', $1)",
            &[&gz],
        )
        .await
        .unwrap();

    let expected = vec![
        ev("Patient", "p1", "1", "create"),
        ev("Patient", "p1", "2", "update"),
        ev("Patient", "p1", "3", "update"),
        ev("Observation", "o-big", "1", "create"),
        ev("Observation", "o-big", "2", "delete"),
        ev("Patient", "p1", "4", "delete"),
        ev("Patient", "p1", "5", "create"),
        ev("Encounter", "e1", "1", "create"),
        ev("Encounter", "e2", "1", "create"),
        ev("Encounter", "e1", "2", "update"),
        ev("Patient", "p-legacy", "1", "create"),
    ];
    changes_are(&env, &expected, vec![ev("Patient", "p1", "2", "update")]).await;
    let resources = notified(&env.rx, "all");
    let p1v2 = resources
        .iter()
        .find(|r| r["id"] == "p1" && r["meta"]["versionId"] == "2")
        .expect("Patient/p1 version 2 with id and meta restored");
    assert_eq!(p1v2["active"], false);
    assert!(p1v2["meta"]["lastUpdated"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let legacy = resources
        .iter()
        .find(|r| r["id"] == "p-legacy")
        .expect("the JSONC version read from its large object");
    assert_eq!(legacy["gender"], "female");
    validate(&env.rx.bodies("all"), "r5", &[]);
}

/// A full-resource payload carries the version of the event, read by key when its body was
/// not queued (no full-resource subscription existed then), never the store's newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_read_later_carry_the_version_of_the_event() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let store = &env.store;
    let _d = env.start().await;
    let id = subscribe_active(
        env.api,
        "http://fhir-cdc.test/topic/all",
        &env.rx.url("late"),
        "id-only",
        json!({"maxCount": 10}),
    )
    .await;
    for status in ["planned", "in-progress"] {
        aidbox_put(store, "Encounter", "e-late", &json!({ "status": status })).await;
    }
    wait_settled(&env).await;
    wait_until("two events queued", Duration::from_secs(30), || async {
        queued(store, "http://fhir-cdc.test/topic/all").await.len() == 2
    })
    .await;
    // Now full-resource; then the store moves on to a third version.
    let base = format!("http://127.0.0.1:{}", env.api);
    let http = reqwest::Client::new();
    let mut sub: Value = http
        .get(format!("{base}/Subscription/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    sub["content"] = json!("full-resource");
    let r = http
        .put(format!("{base}/Subscription/{id}"))
        .json(&sub)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    aidbox_put(
        store,
        "Encounter",
        "e-late",
        &json!({"status": "completed"}),
    )
    .await;
    wait_until("the third event", Duration::from_secs(30), || async {
        queued(store, "http://fhir-cdc.test/topic/all").await.len() == 3
    })
    .await;
    let versions: Vec<String> = queued(store, "http://fhir-cdc.test/topic/all")
        .await
        .into_iter()
        .map(|e| e.2)
        .collect();
    let bundle: Value = http
        .get(format!(
            "{base}/Subscription/{id}/$events?eventsSinceNumber=1&eventsUntilNumber=2&content=full-resource"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<(String, String)> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("resource"))
        .filter(|r| r["resourceType"] == "Encounter")
        .map(|r| {
            (
                r["status"].as_str().unwrap_or_default().to_string(),
                r["meta"]["versionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("planned".to_string(), versions[0].clone()),
            ("in-progress".to_string(), versions[1].clone())
        ],
        "each event with its own version, not the store's current one"
    );
    validate(&[bundle], "r5", &[]);
}

const AIDBOX_TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/high-glucose"
resourceTrigger = [{ resource = "Observation", supportedInteraction = ["create"], fhirPathCriteria = "(%current.value as Quantity).value > 140" }]
canFilterBy = [{ resource = "Observation", filterParameter = "patient" }]

[[topic]]
url = "http://fhir-cdc.test/topic/patients"
resourceTrigger = [{ resource = "Patient", supportedInteraction = ["create"] }]
"#;

/// Aidbox stores its own format: references as `{resourceType, id}`, choice types nested,
/// first-class extensions under Attribute keys. Topics match, filters select and payloads
/// carry FHIR JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aidbox_native_format_is_matched_filtered_and_delivered_as_fhir() {
    let env = TestEnv::aidbox(AIDBOX_TOPICS).build().await;
    let store = &env.store;
    // Aidbox's Attribute definitions, in its own table (not a resource table: not published).
    run(
        store,
        r#"CREATE TABLE attribute (id text PRIMARY KEY, txid bigint NOT NULL, ts timestamptz NOT NULL DEFAULT now(),
                                  resource_type text NOT NULL DEFAULT 'Attribute', status text NOT NULL, resource jsonb NOT NULL);
           INSERT INTO attribute (id, txid, status, resource) VALUES
             ('Patient.race', 1, 'created', '{"path": ["race"], "resource": {"id": "Patient", "resourceType": "Entity"},
               "extensionUrl": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"}'),
             ('Patient.birthsex', 1, 'created', '{"path": ["birthsex"], "resource": {"id": "Patient", "resourceType": "Entity"},
               "type": {"id": "code", "resourceType": "Entity"},
               "extensionUrl": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"}');"#,
    )
    .await;
    let _d = env.start().await;
    subscribe_active(
        env.api,
        "http://fhir-cdc.test/topic/high-glucose",
        &env.rx.url("glucose"),
        "full-resource",
        json!({"filterBy": [{"filterParameter": "patient", "value": "Patient/p1"}]}),
    )
    .await;
    subscribe_active(
        env.api,
        "http://fhir-cdc.test/topic/patients",
        &env.rx.url("patients"),
        "full-resource",
        json!({}),
    )
    .await;
    let obs = |subject: &str, value: i64| {
        json!({"status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
               "subject": {"resourceType": "Patient", "id": subject},
               "value": {"Quantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}},
               "effective": {"dateTime": "2024-05-01T10:00:00Z"}})
    };
    for (id, subject, value) in [("o1", "p1", 180), ("o2", "p1", 100), ("o3", "p2", 200)] {
        store
            .execute(
                "SELECT aidbox_put('Observation', $1, $2)",
                &[&id, &obs(subject, value)],
            )
            .await
            .unwrap();
    }
    store
        .execute(
            "SELECT aidbox_put('Patient', 'p1', $1)",
            &[&json!({"active": true, "birthsex": "F",
                      "race": {"text": "Asian", "ombCategory": [{"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2028-9", "display": "Asian"}]}})],
        )
        .await
        .unwrap();
    wait_until(
        "the patient notification",
        Duration::from_secs(30),
        || async { !env.rx.events("patients").is_empty() },
    )
    .await;
    wait_settled(&env).await;
    let focus: Vec<String> = env
        .rx
        .events("glucose")
        .iter()
        .flat_map(|b| {
            status_of(b)["notificationEvent"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|e| {
            e["focus"]["reference"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        focus,
        ["http://fhir-cdc.test/fhir/Observation/o1"],
        "the criterion read valueQuantity and the filter read subject.reference"
    );
    let o1 = &notified(&env.rx, "glucose")[0];
    assert_eq!(o1["subject"], json!({"reference": "Patient/p1"}));
    assert_eq!(o1["valueQuantity"]["value"], 180);
    assert_eq!(o1["effectiveDateTime"], "2024-05-01T10:00:00Z");
    assert!(o1.get("value").is_none());
    let p1 = &notified(&env.rx, "patients")[0];
    let urls: Vec<&str> = p1["extension"]
        .as_array()
        .expect("Attributes mapped to extensions")
        .iter()
        .filter_map(|e| e["url"].as_str())
        .collect();
    assert!(
        urls.contains(&"http://hl7.org/fhir/us/core/StructureDefinition/us-core-race")
            && urls.contains(&"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"),
        "{p1}"
    );
    assert!(p1.get("race").is_none() && p1.get("birthsex").is_none());
    let mut bundles = env.rx.bodies("glucose");
    bundles.extend(env.rx.bodies("patients"));
    validate(&bundles, "r5", &[]);
}

/// `[source] tenants`: only the listed tenants' changes are captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_configured_tenants_are_captured() {
    let env = TestEnv::empty(TOPICS)
        .config(|c| {
            c.source.profile = ProfileKind::Helios;
            c.source.tenants = Some(vec!["t1".into()]);
        })
        .build()
        .await;
    let store = &env.store;
    run(
        store,
        &std::fs::read_to_string(repo().join("scripts/stores/helios.sql")).unwrap(),
    )
    .await;
    let _d = env.start().await;
    for (tenant, id) in [("t2", "other"), ("t1", "ours"), ("t2", "other-2")] {
        run(
            store,
            &format!("SELECT hfs_create('{tenant}', 'Patient', '{id}', '{{\"active\": true}}')"),
        )
        .await;
    }
    run(
        store,
        "SELECT hfs_create('t1', 'Patient', 'ours-2', '{\"active\": true}')",
    )
    .await;
    wait_until("t1's changes queued", Duration::from_secs(30), || async {
        queued(store, "http://fhir-cdc.test/topic/all").await.len() >= 2
    })
    .await;
    wait_settled(&env).await;
    assert_eq!(
        queued(store, "http://fhir-cdc.test/topic/all").await,
        vec![
            ev("Patient", "ours", "1", "create"),
            ev("Patient", "ours-2", "1", "create")
        ]
    );
}
