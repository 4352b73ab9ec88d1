//! The slot never fills the store's disk: while nothing in the publication changes and the
//! cluster writes WAL elsewhere, capture keeps confirming positions (keepalives and its own
//! WAL heartbeat), so the slot advances. A slot invalidated by `max_slot_wal_keep_size`
//! stops capture with a clear error, never a silent re-creation; `--resync-from-now`
//! recovers knowingly.

use crate::common::*;
use serde_json::json;
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create"] }]
"#;

/// The slot's confirmed and restart LSNs and the checkpoint, as numbers of bytes since 0/0.
async fn positions(c: &tokio_postgres::Client, slot: &str) -> (i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT pg_wal_lsn_diff(s.confirmed_flush_lsn, '0/0')::int8,
                    pg_wal_lsn_diff(s.restart_lsn, '0/0')::int8,
                    coalesce(pg_wal_lsn_diff(c.lsn, '0/0')::int8, 0)
             FROM pg_replication_slots s LEFT JOIN fhir_cdc.checkpoint c ON c.slot = s.slot_name
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

async fn wal_now(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_store_beside_a_busy_database_does_not_hold_wal_back() {
    let env = TestEnv::aidbox(TOPIC)
        .own_cluster()
        .config(|c| c.source.wal_heartbeat_secs = 1)
        .build()
        .await;
    let store = env.client().await;
    let _d = env.start().await;
    // Progress first: capture streams and the slot exists.
    let (confirmed0, restart0, _) = positions(&store, &env.slot).await;
    assert!(confirmed0 > 0);

    // Another database of the cluster writes ~40 MB of WAL; the store writes nothing.
    let busy = env.pg.create_db("busy", Layout::Empty).await;
    busy.batch_execute("CREATE TABLE t (x text)").await.unwrap();
    for _ in 0..4 {
        busy.batch_execute("INSERT INTO t SELECT repeat('x', 1000) FROM generate_series(1, 10000)")
            .await
            .unwrap();
    }
    let busy_end = wal_now(&store).await;
    assert!(
        busy_end - confirmed0 > 30_000_000,
        "the busy database wrote too little WAL"
    );

    wait_until(
        "the slot confirmed past the busy WAL",
        Duration::from_secs(60),
        || async { positions(&store, &env.slot).await.0 >= busy_end },
    )
    .await;
    wait_until(
        "the slot's restart_lsn moved",
        Duration::from_secs(60),
        || async {
            // A checkpoint logs the running transactions the server needs to move restart_lsn.
            store.batch_execute("CHECKPOINT").await.unwrap();
            positions(&store, &env.slot).await.1 > restart0 + 30_000_000
        },
    )
    .await;
    // Invariant 2 still: the slot is never confirmed past the checkpoint.
    let (confirmed, _, checkpoint) = positions(&store, &env.slot).await;
    assert!(
        confirmed <= checkpoint,
        "confirmed {confirmed} past checkpoint {checkpoint}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", env.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("fhir_cdc_slot_lag_bytes"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_stops_capture_clearly_and_resync_from_now_recovers() {
    let env = TestEnv::aidbox(TOPIC).own_cluster().build().await;
    let (rx, api) = (&env.rx, env.api);
    let store = env.client().await;
    // Separate statements: ALTER SYSTEM may not run inside a transaction block.
    store
        .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .unwrap();
    store
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let mut d = env.start().await;
    let sub = subscribe_active(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("r"),
        "id-only",
        json!({}),
    )
    .await;
    aidbox_put(&store, "Encounter", "before", &json!({"status": "planned"})).await;
    wait_until("the first event", Duration::from_secs(30), || async {
        rx.events("r").len() == 1
    })
    .await;
    d.kill9();

    // While capture is down, WAL beyond max_slot_wal_keep_size: the slot is invalidated.
    store
        .batch_execute("CREATE TABLE junk (x text)")
        .await
        .unwrap();
    aidbox_put(&store, "Encounter", "lost", &json!({"status": "planned"})).await;
    wait_until("the slot invalidated", Duration::from_secs(120), || async {
        for sql in [
            "INSERT INTO junk SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            store.batch_execute(sql).await.unwrap();
        }
        let s: Option<String> = store
            .query_one(
                "SELECT wal_status::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot],
            )
            .await
            .unwrap()
            .get(0);
        s.as_deref() == Some("lost")
    })
    .await;

    // Capture stops with an error that says what was lost and how to go on.
    let mut d = env.spawn("run");
    wait_until("the daemon to stop", Duration::from_secs(60), || {
        let exited = d.child.try_wait().unwrap();
        async move { exited.is_some() }
    })
    .await;
    let status_code = d.child.try_wait().unwrap().unwrap();
    assert!(!status_code.success(), "capture went on with a lost slot");
    let log = env.log_text();
    assert!(log.contains("was invalidated"), "{log}");
    assert!(log.contains("--resync-from-now"), "{log}");
    // And nothing was re-created behind the user's back.
    let still: Option<String> = store
        .query_one(
            "SELECT wal_status::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still.as_deref(), Some("lost"));

    // Resync knowingly: a new slot, capture from now on, the gap logged.
    let _d = env.spawn_args(&["run", "--resync-from-now"]);
    wait_api(api).await;
    assert!(
        env.log_text().contains("resynced from now"),
        "{}",
        env.log_text()
    );
    aidbox_put(&store, "Encounter", "after", &json!({"status": "planned"})).await;
    wait_until(
        "the event after the resync",
        Duration::from_secs(30),
        || async { rx.events("r").len() == 2 },
    )
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
        ],
        "the change made while the slot was lost is the logged gap"
    );
    validate(&rx.bodies("r"), "r5", &["--sequence", "strict"]);

    // $status of the subscription that existed then names the gap; a newer one does not.
    let newer = subscribe_active(
        api,
        "http://fhir-cdc.test/topic/encounter",
        &rx.url("newer"),
        "id-only",
        json!({}),
    )
    .await;
    let searchset = status_bundle(api, &sub).await;
    let errors = searchset["entry"][0]["resource"]["error"].clone();
    let text = errors[0]["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("events may be missing") && text.contains("was invalidated"),
        "{errors}"
    );
    // The same status in a query-event notification ($events), checked by the validator.
    let events = get_json(api, &format!("Subscription/{sub}/$events")).await;
    assert_eq!(status_of(&events)["error"], errors);
    validate(&[events], "r5", &[]);
    assert!(status(api, &newer).await.get("error").is_none());
}

async fn status_bundle(api: u16, id: &str) -> serde_json::Value {
    get_json(api, &format!("Subscription/{id}/$status")).await
}

async fn get_json(api: u16, path: &str) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{api}/{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn readyz(api: u16) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{api}/readyz"))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of an unlabelled gauge in the Prometheus text.
async fn gauge(api: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{api}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_seconds_warns_degrades_readiness_above_the_limit_and_recovers() {
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| {
            c.source.lag.check_secs = 1;
            c.source.lag.warn_secs = 1;
            c.source.lag.max_secs = 3;
        })
        .build()
        .await;
    let _d = env.start().await;
    subscribe_active(
        env.api,
        "http://fhir-cdc.test/topic/encounter",
        &env.rx.url("lag"),
        "id-only",
        json!({}),
    )
    .await;
    assert_eq!(readyz(env.api).await.0, 200);
    wait_until("the lag gauges", Duration::from_secs(10), || async {
        gauge(env.api, "fhir_cdc_slot_lag_seconds").await == Some(0.0)
            && gauge(env.api, "fhir_cdc_slot_retained_bytes")
                .await
                .is_some()
    })
    .await;

    // The queue stalls (its checkpoint row locked) while the store commits a change.
    let mut locker = env.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE fhir_cdc.checkpoint IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    aidbox_put(
        &env.store,
        "Encounter",
        "lagging",
        &json!({"status": "planned"}),
    )
    .await;
    wait_until(
        "readiness degraded by lag",
        Duration::from_secs(30),
        || async {
            let (code, body) = readyz(env.api).await;
            code == 503 && body.starts_with("degraded: slot lag") && body.contains("max")
        },
    )
    .await;
    let seconds = gauge(env.api, "fhir_cdc_slot_lag_seconds").await.unwrap();
    assert!(seconds > 3.0, "lag seconds {seconds}");
    assert!(env.rx.events("lag").is_empty(), "not queued while stalled");

    // The queue frees up: the change is queued and delivered once, readiness returns.
    lock.rollback().await.unwrap();
    wait_until("ready again", Duration::from_secs(30), || async {
        readyz(env.api).await.0 == 200
    })
    .await;
    wait_until("the notification", Duration::from_secs(30), || async {
        env.rx.events("lag").len() == 1
    })
    .await;
    validate(&env.rx.bodies("lag"), "r5", &[]);
    let log = env.log_text();
    for line in [
        "above warn",
        "/readyz reports degraded",
        "back under the thresholds",
    ] {
        assert!(log.contains(line), "log lacks {line:?}: {log}");
    }
}
