//! A subscription's progress is a cursor: retries of the head-of-line notification keep
//! its eventNumber and do not move the cursor, a dead letter moves it past, `requeue` sends
//! a dead letter again with its eventNumber, a subscription in error catches up in order,
//! and migration 006 turns a queue of per-event delivery rows (the form before it) into
//! cursors without losing or renumbering anything; migration 010 (event `resource` and
//! `filters` as text) delivers what was queued as jsonb. Real WAL, a real HTTP receiver, the
//! official validator.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// (eventNumber, resource id) of every event notification `name` received, in order.
fn arrivals(rx: &Receiver, name: &str) -> Vec<(i64, String)> {
    rx.events(name)
        .iter()
        .flat_map(|b| {
            let numbers = event_numbers(b);
            let ids: Vec<String> = b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .skip(1)
                .map(|e| {
                    let url = e["fullUrl"].as_str().unwrap_or_default();
                    url.rsplit('/').next().unwrap_or_default().to_string()
                })
                .collect();
            numbers.into_iter().zip(ids).collect::<Vec<_>>()
        })
        .collect()
}

async fn row(env: &TestEnv, id: &str) -> fhir_cdc::queue::subscriptions::SubscriptionRow {
    fhir_cdc::queue::subscriptions::get(&env.store, id)
        .await
        .unwrap()
        .unwrap()
}

async fn dead_numbers(env: &TestEnv, id: &str) -> Vec<(i64, bool)> {
    env.store
        .query(
            "SELECT event_number, requeued FROM fhir_cdc.dead_letter
             WHERE subscription_id = $1 ORDER BY 1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_through_retries_dead_letters_requeue_and_catch_up() {
    let mut env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    env.edit(|c| {
        c.delivery.max_attempts = 3;
        c.delivery.error_after_failures = 1;
    });
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    let id = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("c"), "id-only", json!({})).await;

    // Retries: every attempt carries eventNumber 1 and the cursor stays put. Retry-After
    // spaces the attempts a second apart, so the state between two of them can be read.
    rx.retry_after.lock().unwrap().insert("c".into(), 1);
    rx.answer("c", 503);
    put_encounter(&env.store, "e1").await;
    wait_until("two failed attempts", Duration::from_secs(30), || async {
        rx.events("c").len() >= 2
    })
    .await;
    let r = row(&env, &id).await;
    assert_eq!(
        r.cursor.number, 0,
        "nothing delivered: the cursor has not moved"
    );
    assert!(r.head_attempts >= 1, "the head's attempts are counted");
    // Attempts run out: a dead letter, and the cursor moves past it.
    wait_until("e1 dead-lettered", Duration::from_secs(30), || async {
        dead_numbers(&env, &id).await == [(1, false)]
    })
    .await;
    let tries = arrivals(&rx, "c");
    assert_eq!(tries.len(), 3, "max_attempts = 3: {tries:?}");
    assert!(
        tries.iter().all(|t| *t == (1, "e1".to_string())),
        "{tries:?}"
    );
    let r = row(&env, &id).await;
    assert_eq!((r.cursor.number, r.head_attempts), (1, 0));
    assert_eq!(status(api, &id).await["status"], "error");

    // The endpoint is back: the next event is number 2 and the subscription active again.
    rx.retry_after.lock().unwrap().remove("c");
    rx.answer("c", 200);
    put_encounter(&env.store, "e2").await;
    wait_until("e2 delivered", Duration::from_secs(30), || async {
        arrivals(&rx, "c").last() == Some(&(2, "e2".to_string()))
    })
    .await;
    wait_until("active again", Duration::from_secs(10), || async {
        status(api, &id).await["status"] == "active"
    })
    .await;
    assert_eq!(row(&env, &id).await.cursor.number, 2);

    // Error → active catch-up: events written while the endpoint fails go out in order
    // once it recovers. Retry-After holds the retries long enough that none runs out.
    rx.retry_after.lock().unwrap().insert("c".into(), 2);
    rx.answer("c", 503);
    put_encounter(&env.store, "e3").await;
    put_encounter(&env.store, "e4").await;
    wait_until("in error", Duration::from_secs(30), || async {
        status(api, &id).await["status"] == "error"
    })
    .await;
    rx.answer("c", 200);
    wait_until("caught up", Duration::from_secs(30), || async {
        row(&env, &id).await.cursor.number == 4
    })
    .await;
    let delivered: Vec<(i64, String)> = arrivals(&rx, "c").into_iter().skip(3).collect();
    let firsts: Vec<(i64, String)> =
        delivered
            .iter()
            .filter(|a| a.0 >= 2)
            .fold(Vec::new(), |mut v, a| {
                if v.last() != Some(a) {
                    v.push(a.clone());
                }
                v
            });
    assert_eq!(
        firsts,
        [
            (2, "e2".to_string()),
            (3, "e3".to_string()),
            (4, "e4".to_string())
        ],
        "in order, e3 retried with its number: {delivered:?}"
    );
    assert_eq!(status(api, &id).await["status"], "active");

    // Requeue: the dead letter goes out again with its own eventNumber, then is gone.
    let out = dead_letters_cli(&env, &["requeue", "--subscription", &id]);
    assert!(out.contains("1 event(s) requeued"), "{out}");
    wait_until("e1 sent again", Duration::from_secs(30), || async {
        arrivals(&rx, "c").last() == Some(&(1, "e1".to_string()))
    })
    .await;
    wait_until("dead letter gone", Duration::from_secs(10), || async {
        dead_numbers(&env, &id).await.is_empty()
    })
    .await;
    assert_eq!(
        row(&env, &id).await.cursor.number,
        4,
        "requeue leaves the cursor"
    );

    // $events looks every number up, the requeued one included.
    let ev: Value = reqwest::get(format!(
        "http://127.0.0.1:{api}/Subscription/{id}/$events?eventsSinceNumber=1&eventsUntilNumber=4"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(event_numbers(&ev), [1, 2, 3, 4]);
    assert_eq!(status_of(&ev)["eventsSinceSubscriptionStart"], "4");

    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(&rx.bodies("c"), "r5", &["--expect-subscription", &sub]);
    validate(&[ev], "r5", &["--expect-subscription", &sub]);
}

/// The queue as the code before migration 006 left it: migrations 001–005 applied, and
/// a subscription with delivered, dead, requeued (pending below a delivered one) and
/// pending deliveries, plus an event dispatch had not reached yet.
async fn old_queue(env: &TestEnv) {
    let q = &env.store;
    let mut sql = String::new();
    for f in [
        "001_init.sql",
        "002_channel.sql",
        "003_capture_gap.sql",
        "004_channels.sql",
        "005_event_topics.sql",
    ] {
        sql.push_str(&std::fs::read_to_string(repo().join("sql").join(f)).unwrap());
        sql.push('\n');
    }
    q.batch_execute(&sql).await.unwrap();
    q.batch_execute(
        "CREATE TABLE IF NOT EXISTS fhir_cdc.schema_migration (
             version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO fhir_cdc.schema_migration (version) VALUES (1), (2), (3), (4), (5);",
    )
    .await
    .unwrap();
    // Events 1..=7 of the topic; event 3 is another topic's.
    for i in 1..=7i64 {
        let topic = if i == 3 {
            "http://other"
        } else {
            ENCOUNTER_TOPIC
        };
        q.execute(
            "INSERT INTO fhir_cdc.event (id, topics, resource_type, resource_id, interaction,
                 commit_lsn, xid, commit_time)
             VALUES ($1, ARRAY[$2], 'Encounter', $3, 'create', '0/1', 1, now())",
            &[&i, &topic, &format!("old{i}")],
        )
        .await
        .unwrap();
    }
    q.batch_execute(&format!(
        "SELECT setval('fhir_cdc.event_id_seq', 7);
         INSERT INTO fhir_cdc.subscription (id, origin, topic, status, endpoint, content,
             content_type, resource, start_event_id, events_since_start, handshake_done)
         VALUES ('old', 'api', '{ENCOUNTER_TOPIC}', 'active', '{endpoint}', 'id-only',
             'application/fhir+json',
             '{{\"resourceType\": \"Subscription\", \"status\": \"active\", \"topic\": \"{ENCOUNTER_TOPIC}\",
               \"channelType\": {{\"code\": \"rest-hook\"}}, \"endpoint\": \"{endpoint}\",
               \"content\": \"id-only\"}}',
             0, 5, true);
         -- 1 delivered, 2 dead and requeued (pending again), 3 delivered, 4 dead, 5 pending
         -- (events 1, 2, 4, 5, 6); event 7 not dispatched yet.
         INSERT INTO fhir_cdc.delivery (subscription_id, event_number, event_id, state, attempts)
         VALUES ('old', 1, 1, 'delivered', 1), ('old', 2, 2, 'pending', 0),
                ('old', 3, 4, 'delivered', 1), ('old', 4, 5, 'dead', 3),
                ('old', 5, 6, 'pending', 2);
         INSERT INTO fhir_cdc.dead_letter (subscription_id, event_number, event_id, reason)
         VALUES ('old', 4, 5, 'gave up');
         INSERT INTO fhir_cdc.dispatch_cursor (topic, last_event_id) VALUES ('{ENCOUNTER_TOPIC}', 6);",
        endpoint = env.rx.url("old"),
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_006_turns_pending_and_dead_deliveries_into_a_cursor() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    old_queue(&env).await;
    let mut c = env.client().await;
    fhir_cdc::queue::migrate::run(&mut c).await.unwrap();
    let r = row(&env, "old").await;
    // Settled through 4 (event 5); 5 was pending with 2 attempts, which it keeps.
    assert_eq!((r.cursor.number, r.cursor.event_id), (4, 5));
    assert_eq!(r.head_attempts, 2);
    assert_eq!(dead_numbers(&env, "old").await, [(2, true), (4, false)]);
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = 'fhir_cdc' AND table_name IN ('delivery', 'dispatch_cursor')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);

    // The daemon sends the requeued 2 and the pending 5 with their numbers, then the
    // undispatched event 7 as 6.
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    wait_until(
        "the old queue delivered",
        Duration::from_secs(30),
        || async {
            row(&env, "old").await.cursor.number == 6 && dead_numbers(&env, "old").await.len() == 1
        },
    )
    .await;
    let got = arrivals(&rx, "old");
    assert!(got.contains(&(2, "old2".to_string())), "{got:?}");
    let tail: Vec<_> = got.iter().filter(|a| a.0 != 2).cloned().collect();
    assert_eq!(
        tail,
        [(5, "old6".to_string()), (6, "old7".to_string())],
        "{got:?}"
    );
    // History: every number maps to the event it had before the upgrade.
    let ev: Value = reqwest::get(format!(
        "http://127.0.0.1:{api}/Subscription/old/$events?eventsSinceNumber=1&eventsUntilNumber=6"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(event_numbers(&ev), [1, 2, 3, 4, 5, 6]);
    let ids: Vec<&str> = ev["entry"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|e| e["fullUrl"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(ids, ["old1", "old2", "old4", "old5", "old6", "old7"]);
    let sub = "http://fhir-cdc.test/fhir/Subscription/old";
    validate(&rx.bodies("old"), "r5", &["--expect-subscription", sub]);
}

const PATIENT_TOPIC_URL: &str = "http://fhir-cdc.test/topic/enc-patient";
const PATIENT_TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/enc-patient"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
canFilterBy = [{ resource = "Encounter", filterParameter = "patient" }]
"#;

/// Migration 010 stores an event's `resource` and `filters` as text. Events queued before
/// it, as jsonb, are delivered after it with the body and the canFilterBy values they were
/// queued with (a filtered full-resource subscription gets Patient/p1's and not p2's), and
/// events captured after it follow them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_010_delivers_events_queued_as_jsonb() {
    let env = TestEnv::aidbox(PATIENT_TOPIC).build().await;
    let rx = env.rx.clone();
    let d = env.start().await;
    let filter = json!({"filterBy": [{"resourceType": "Encounter", "filterParameter": "patient", "value": "Patient/p1"}]});
    let id = subscribe_active(
        env.api,
        PATIENT_TOPIC_URL,
        &rx.url("m"),
        "full-resource",
        filter,
    )
    .await;
    drop(d);

    // The queue as 009 left it, holding two events capture queued then.
    let q = env.client().await;
    q.batch_execute(
        "ALTER TABLE fhir_cdc.event
             ALTER COLUMN resource TYPE jsonb USING resource::jsonb,
             ALTER COLUMN filters TYPE jsonb USING filters::jsonb;
         DELETE FROM fhir_cdc.schema_migration WHERE version = 10;",
    )
    .await
    .unwrap();
    for (rid, patient) in [("old-p2", "Patient/p2"), ("old-p1", "Patient/p1")] {
        let body = json!({"resourceType": "Encounter", "id": rid, "meta": {"versionId": "7"},
            "status": "completed", "class": [{"coding": [{"code": "AMB"}]}], "subject": {"reference": patient}});
        let filters = json!({"patient": {"t": "reference", "v": [patient]}});
        q.execute(
            "INSERT INTO fhir_cdc.event (topics, resource_type, resource_id, version_id,
                 interaction, commit_lsn, xid, commit_time, resource, filters)
             VALUES (ARRAY[$1], 'Encounter', $2, '7', 'create', '0/1', 1, now(), $3, $4)",
            &[&PATIENT_TOPIC_URL, &rid, &body, &filters],
        )
        .await
        .unwrap();
    }

    let _d = env.start().await;
    let types: Vec<String> = q
        .query(
            "SELECT data_type FROM information_schema.columns
             WHERE table_schema = 'fhir_cdc' AND table_name = 'event'
               AND column_name IN ('resource', 'filters')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["text", "text"], "migrated");
    let body = json!({"resourceType": "Encounter", "status": "planned", "subject": {"reference": "Patient/p1"}});
    aidbox_put(&env.store, "Encounter", "new-p1", &body).await;
    wait_until(
        "both Patient/p1 events",
        Duration::from_secs(30),
        || async { rx.events("m").len() == 2 },
    )
    .await;
    let got = rx.events("m");
    let entry = |b: &Value| b["entry"][1]["resource"].clone();
    assert_eq!(event_numbers(&got[0]), [1]);
    assert_eq!(entry(&got[0])["id"], "old-p1", "p2's event is filtered out");
    assert_eq!(
        entry(&got[0])["status"],
        "completed",
        "the body queued as jsonb"
    );
    assert_eq!(event_numbers(&got[1]), [2]);
    assert_eq!(entry(&got[1])["id"], "new-p1");
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(&rx.bodies("m"), "r5", &["--expect-subscription", &sub]);
}
