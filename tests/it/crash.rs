//! Invariants 1–3 under SIGKILL: while 20,000 resources are written in many transactions,
//! the daemon is killed at random points at least five times and restarted. Afterwards the
//! queue holds exactly one event per matching change, the slot never confirmed past an
//! unqueued change, and the subscriber saw every eventNumber from 1 to N.

use crate::common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
workers = 2
"#;

const TXNS: usize = 400;
const PER_TXN: usize = 50;
const EXPECTED: i64 = (TXNS * PER_TXN) as i64;

/// Transaction k creates 50 Encounters when k is even and updates the previous ones when odd.
fn txn_sql(k: usize) -> String {
    let base = k - (k % 2);
    format!(
        "BEGIN;
         SELECT aidbox_put('Encounter', 'e{base}-' || g, jsonb_build_object('status', '{}', 'n', g))
         FROM generate_series(1, {PER_TXN}) g;
         SELECT aidbox_put('Patient', 'p{k}', '{{\"active\": true}}');
         COMMIT;",
        if k.is_multiple_of(2) {
            "planned"
        } else {
            "in-progress"
        }
    )
}

/// A subscription to the Encounter topic on hook `hook`, batches of up to 100 (every Bundle is
/// validated, at about 40 ms each), waited for until its handshake arrived.
async fn subscribe_batched(env: &TestEnv, hook: &str) -> String {
    let sub = subscribe_with(
        env.api,
        "http://fhir-cdc.test/topic/encounter",
        &env.rx.url(hook),
        "id-only",
        serde_json::json!({"maxCount": 100}),
    )
    .await;
    wait_until("handshake", Duration::from_secs(30), || async {
        !env.rx.bodies(hook).is_empty()
    })
    .await;
    sub
}

/// Seeded kill points: the seed is printed, `CRASH_SEED` repeats a run.
fn seeded(test: &str) -> StdRng {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (CRASH_SEED={seed} repeats these kill points)");
    StdRng::seed_from_u64(seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| {
            c.queue.flush_ms = 5;
            c.queue.batch_events = 300;
            c.delivery.batch_window_ms = 100;
        })
        .build()
        .await;
    let (rx, api) = (&env.rx, env.api);
    // The writer task owns its connection.
    let store = env.client().await;
    let mut d = env.start().await;
    let sub = subscribe_batched(&env, "crash").await;

    let writer = tokio::spawn(async move {
        for k in 0..TXNS {
            store.batch_execute(&txn_sql(k)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });

    let mut rng = seeded("crash test");
    let q = env.client().await;
    let mut kills = 0;
    let mut checkpoints = BTreeSet::new();
    while kills < 5 || !writer.is_finished() {
        // Progress first: the daemon streams the slot before it is killed.
        wait_api(api).await;
        let wait = rng.random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        d.kill9();
        kills += 1;
        // Invariant 2, with the daemon dead: the slot never confirmed past the checkpoint,
        // which moves only with the events it covers. Both must exist by now.
        let row = q
            .query_one(
                "SELECT s.confirmed_flush_lsn::text, c.lsn::text, s.confirmed_flush_lsn <= c.lsn
                 FROM pg_replication_slots s JOIN fhir_cdc.checkpoint c ON c.slot = s.slot_name
                 WHERE s.slot_name = $1",
                &[&env.slot],
            )
            .await
            .unwrap_or_else(|e| panic!("kill {kills}: no slot or no checkpoint yet: {e}"));
        let (confirmed, checkpoint, ok): (Option<String>, String, bool) =
            (row.get(0), row.get(1), row.get(2));
        assert!(
            ok,
            "kill {kills}: slot confirmed {confirmed:?} past the queued checkpoint {checkpoint}"
        );
        checkpoints.insert(checkpoint);
        d = env.spawn("run");
        if kills > 40 {
            panic!("writer did not finish");
        }
    }
    writer.await.unwrap();
    wait_api(api).await;
    assert!(
        checkpoints.len() >= 3,
        "the checkpoint hardly moved between kills: {checkpoints:?}"
    );

    // Invariant 1: exactly one event per matching change.
    wait_until("all events queued", Duration::from_secs(120), || async {
        let n: i64 = q
            .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
            .await
            .unwrap()
            .get(0);
        n >= EXPECTED
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let row = q
        .query_one(
            "SELECT count(*), count(DISTINCT (resource_id, version_id, interaction)),
                    count(*) FILTER (WHERE interaction = 'create'), count(*) FILTER (WHERE interaction = 'update')
             FROM fhir_cdc.event",
            &[],
        )
        .await
        .unwrap();
    let (total, distinct, creates, updates): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(total, EXPECTED, "events queued");
    assert_eq!(distinct, EXPECTED, "an event queued twice");
    assert_eq!((creates, updates), (EXPECTED / 2, EXPECTED / 2));
    // Every store version of every Encounter is there.
    let missing: i64 = q
        .query_one(
            "SELECT count(*) FROM (
                 SELECT id, txid::text FROM encounter UNION SELECT id, txid::text FROM encounter_history) v
             WHERE NOT EXISTS (SELECT 1 FROM fhir_cdc.event e WHERE e.resource_id = v.id AND e.version_id = v.txid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missing, 0, "store versions without an event");

    // Invariant 3: gap-free numbering, every number delivered at least once.
    wait_until(
        "every eventNumber delivered",
        Duration::from_secs(300),
        || async {
            let seen: BTreeSet<i64> = rx.events("crash").iter().flat_map(event_numbers).collect();
            seen.len() as i64 >= EXPECTED
        },
    )
    .await;
    let seen: BTreeSet<i64> = rx.events("crash").iter().flat_map(event_numbers).collect();
    assert_eq!(seen, (1..=EXPECTED).collect::<BTreeSet<_>>());
    // The queue agrees: the cursor settled exactly EXPECTED events, none waits, none died.
    let row = fhir_cdc::queue::subscriptions::get(&q, &sub)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.cursor.number, EXPECTED);
    assert_eq!(
        fhir_cdc::queue::matched::count_pending(&q, &row.track())
            .await
            .unwrap(),
        0
    );
    let dead: i64 = q
        .query_one(
            "SELECT count(*) FROM fhir_cdc.dead_letter WHERE subscription_id = $1",
            &[&sub],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
    // Per subscription, arrival order never goes backwards except for a resend after a kill.
    let arrivals: Vec<i64> = rx.events("crash").iter().flat_map(event_numbers).collect();
    let mut max = 0;
    for n in arrivals {
        assert!(n <= max + 1, "event {n} arrived before {}", max + 1);
        max = max.max(n);
    }
    // Every Bundle received, resends after kills included, is a valid notification.
    validate(&rx.bodies("crash"), "r5", &["-q"]);
    eprintln!(
        "crash test: {kills} SIGKILLs, {EXPECTED} events, {} notifications received",
        rx.events("crash").len()
    );
    drop(d);
}

/// A SIGKILL while capture works through one 30,000-row store transaction, after it has
/// written part of it in chunks into the open queue transaction: nothing of it is queued at
/// the kill (the chunks roll back), and after the restart all of it is, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_inside_a_30000_row_transaction_queues_it_once() {
    const ROWS: i64 = 30_000;
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| {
            c.delivery.batch_window_ms = 100;
            // Chunks of 1,000 events: 30 of them in one queue transaction.
            c.queue.batch_events = 1_000;
        })
        .build()
        .await;
    let (rx, api) = (&env.rx, env.api);
    let store = env.client().await;
    let mut d = env.start().await;
    let sub = subscribe_batched(&env, "big").await;
    let mut rng = seeded("big transaction crash test");
    store
        .batch_execute(&format!(
            "BEGIN;
             SELECT aidbox_put('Encounter', 'big-' || g, jsonb_build_object('status', 'planned', 'n', g))
             FROM generate_series(1, {ROWS}) g;
             COMMIT;"
        ))
        .await
        .unwrap();
    // Capture has written a chunk when a session holds a write lock on the event table
    // while no event is visible: only the open queue transaction of this store transaction
    // writes events before its commit. Kill it at a seeded point after that.
    let q = env.client().await;
    wait_until(
        "a chunk of the transaction written into an open queue transaction",
        Duration::from_secs(60),
        || async { open_event_writes(&q).await > 0 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
    d.kill9();
    let queued: i64 = q
        .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        queued, 0,
        "the kill came after the transaction was queued: it proves nothing"
    );

    d = env.start().await;
    wait_until(
        "the whole transaction queued",
        Duration::from_secs(180),
        || async {
            let n: i64 = q
                .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
                .await
                .unwrap()
                .get(0);
            n >= ROWS
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let row = q
        .query_one(
            "SELECT count(*), count(DISTINCT resource_id) FROM fhir_cdc.event",
            &[],
        )
        .await
        .unwrap();
    let (total, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((total, distinct), (ROWS, ROWS));
    wait_until(
        "every eventNumber delivered",
        Duration::from_secs(300),
        || async {
            let seen: BTreeSet<i64> = rx.events("big").iter().flat_map(event_numbers).collect();
            seen.len() as i64 >= ROWS
        },
    )
    .await;
    let seen: BTreeSet<i64> = rx.events("big").iter().flat_map(event_numbers).collect();
    assert_eq!(seen, (1..=ROWS).collect::<BTreeSet<_>>());
    assert_eq!(
        status(api, &sub).await["eventsSinceSubscriptionStart"],
        ROWS.to_string()
    );
    validate(&rx.bodies("big"), "r5", &["-q"]);
    drop(d);
}

/// Capture's sessions that have copied events into `fhir_cdc.event` in a transaction that
/// has not committed (0 when the event table has visible rows).
async fn open_event_writes(q: &tokio_postgres::Client) -> i64 {
    q.query_one(
        "SELECT CASE WHEN EXISTS (SELECT FROM fhir_cdc.event) THEN 0 ELSE count(*) END
         FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
              JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE c.relname = 'event' AND c.relnamespace = 'fhir_cdc'::regnamespace
           AND l.mode = 'RowExclusiveLock' AND a.query LIKE 'COPY fhir_cdc.event%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Writes transactions of [`txn_sql`], at least `txns` of them and until `stop` is set,
/// reconnecting after Postgres goes away; a transaction cut off by the crash is written
/// again (if it had committed, it adds versions: the checks below count what the store
/// holds, not what was sent). Writing until told keeps every restart inside the writes
/// whatever the seeded pauses add up to; a fixed count could end before the last restart.
async fn write_through_restarts(
    url: String,
    txns: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut k = 0;
    while k < txns || !stop.load(std::sync::atomic::Ordering::SeqCst) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        match c.batch_execute(&txn_sql(k)).await {
            Ok(()) => {
                k += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            Err(_) => client = None,
        }
    }
}

/// The slot's confirmed position is at or below the checkpoint; returns the checkpoint.
async fn checkpoint_covers_slot(q: &tokio_postgres::Client, slot: &str) -> String {
    let row = q
        .query_one(
            "SELECT s.confirmed_flush_lsn::text, c.lsn::text, s.confirmed_flush_lsn <= c.lsn
             FROM pg_replication_slots s JOIN fhir_cdc.checkpoint c ON c.slot = s.slot_name
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot and checkpoint exist");
    let (confirmed, checkpoint, ok): (Option<String>, String, bool) =
        (row.get(0), row.get(1), row.get(2));
    assert!(
        ok,
        "slot confirmed {confirmed:?} past the checkpoint {checkpoint}"
    );
    checkpoint
}

/// Postgres itself crashes (immediate stop) and comes back, at seeded random points, while
/// the store is written and the daemon streams: the daemon rides it out and every store
/// version is queued exactly once and delivered with gap-free numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_immediate_restarts_mid_stream_lose_and_duplicate_nothing() {
    const TXNS: usize = 200;
    let env = TestEnv::aidbox(TOPIC)
        .own_cluster()
        .config(|c| {
            c.queue.flush_ms = 5;
            c.queue.batch_events = 300;
            c.delivery.batch_window_ms = 100;
        })
        .build()
        .await;
    let (rx, api) = (&env.rx, env.api);
    let _d = env.start().await;
    let sub = subscribe_batched(&env, "pg").await;
    let mut rng = seeded("postgres restart test");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(write_through_restarts(env.url(), TXNS, stop.clone()));

    let mut last = String::new();
    for restart in 1..=3 {
        // Progress first: the daemon streams and the checkpoint moved since the last crash.
        wait_api(api).await;
        wait_until(
            "the checkpoint to move",
            Duration::from_secs(60),
            || async {
                let q = env.client().await;
                let c: Option<String> = q
                    .query_opt(
                        "SELECT lsn::text FROM fhir_cdc.checkpoint WHERE slot = $1",
                        &[&env.slot],
                    )
                    .await
                    .unwrap()
                    .map(|r| r.get(0));
                c.is_some_and(|c| c != last)
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        assert!(
            !writer.is_finished(),
            "restart {restart} came after the writes"
        );
        env.pg.restart(Duration::from_secs(1));
        last = checkpoint_covers_slot(&env.client().await, &env.slot).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    wait_api(api).await;

    // Every store version of every Encounter has exactly one event.
    let q = env.client().await;
    let versions: i64 = q
        .query_one(
            "SELECT count(*) FROM (SELECT id, txid FROM encounter
                                   UNION SELECT id, txid FROM encounter_history) v",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(versions >= (TXNS * PER_TXN) as i64, "{versions} versions");
    wait_until("all events queued", Duration::from_secs(120), || async {
        let n: i64 = q
            .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
            .await
            .unwrap()
            .get(0);
        n >= versions
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let row = q
        .query_one(
            "SELECT count(*), count(DISTINCT (resource_id, version_id)) FROM fhir_cdc.event",
            &[],
        )
        .await
        .unwrap();
    let (total, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (total, distinct),
        (versions, versions),
        "events vs store versions"
    );
    checkpoint_covers_slot(&q, &env.slot).await;

    // Delivered gap-free, each number at least once, every Bundle valid.
    wait_until(
        "every eventNumber delivered",
        Duration::from_secs(300),
        || async {
            let seen: BTreeSet<i64> = rx.events("pg").iter().flat_map(event_numbers).collect();
            seen.len() as i64 >= versions
        },
    )
    .await;
    let seen: BTreeSet<i64> = rx.events("pg").iter().flat_map(event_numbers).collect();
    assert_eq!(seen, (1..=versions).collect::<BTreeSet<_>>());
    assert_eq!(
        status(api, &sub).await["eventsSinceSubscriptionStart"],
        versions.to_string()
    );
    validate(&rx.bodies("pg"), "r5", &["-q"]);
}
