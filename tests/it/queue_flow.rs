//! Capture keeps reading the slot while the queue is slow: store commits gather into the next
//! batch instead of waiting in line for a busy queue writer. Before, a busy writer was
//! handed a second batch and the stream then waited for room with the third, so it stopped
//! reading the slot until a queue commit finished; under a store's write burst that left
//! the walsender blocked on a full socket (docs/performance.md). Exactly-once queueing is
//! unchanged: the held-back batch commits with its checkpoint, once.

use crate::common::*;
use std::time::Duration;

/// Rows written while the queue is locked: more than the stream and the reader's read-ahead
/// took before the stream stopped on the old code (the test timed out there), fewer than
/// `batch_events` (5,000), so they all fit one waiting batch.
const HELD: i64 = 4000;

async fn rows_read(port: u16) -> i64 {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("fhir_cdc_rows_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

async fn events(c: &tokio_postgres::Client) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT count(*), count(DISTINCT resource_id) FROM fhir_cdc.event",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn checkpoint(c: &tokio_postgres::Client, slot: &str) -> i64 {
    c.query_one(
        "SELECT coalesce((SELECT pg_wal_lsn_diff(lsn, '0/0')::int8 FROM fhir_cdc.checkpoint
                          WHERE slot = $1), 0)",
        &[&slot],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_reads_on_while_the_queue_writer_is_blocked() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let mut capture = env.spawn_args(&["capture", "--health-listen", &health]);
    capture.wait_ready(port).await;

    // Progress first: capture streams and queues.
    put_encounter(&env.store, "first").await;
    wait_until(
        "the first event queued",
        Duration::from_secs(30),
        || async { events(&env.store).await.0 == 1 },
    )
    .await;
    let before = checkpoint(&env.store, &env.slot).await;
    assert!(before > 0, "the checkpoint moved with the first event");
    let read_before = rows_read(port).await;
    assert!(read_before >= 1, "the rows counter counts what was read");

    // The queue blocks: every COPY into the event table waits for this lock.
    let locker = env.pg.client(&env.db).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE fhir_cdc.event IN EXCLUSIVE MODE")
        .await
        .unwrap();

    // Store commits of 100 Encounters each, while the queue writer cannot write.
    for start in (0..HELD).step_by(100) {
        env.store
            .execute(
                "SELECT aidbox_put('Encounter', 'held-' || g,
                        '{\"resourceType\": \"Encounter\", \"status\": \"in-progress\"}'::jsonb)
                 FROM generate_series($1::int8, $1::int8 + 99) g",
                &[&start],
            )
            .await
            .unwrap();
    }

    // Capture read every one of them although none could be queued.
    wait_until(
        "every held row read from the slot",
        Duration::from_secs(30),
        || async { rows_read(port).await >= read_before + HELD },
    )
    .await;
    assert_eq!(
        events(&env.store).await.0,
        1,
        "nothing queued past the lock"
    );
    assert_eq!(
        checkpoint(&env.store, &env.slot).await,
        before,
        "the checkpoint waits for the events it covers"
    );

    // The lock goes: everything is queued, once, and the checkpoint moves.
    locker.batch_execute("ROLLBACK").await.unwrap();
    wait_until("the held rows queued", Duration::from_secs(30), || async {
        events(&env.store).await.0 > HELD
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        events(&env.store).await,
        (1 + HELD, 1 + HELD),
        "each change queued exactly once"
    );
    assert!(checkpoint(&env.store, &env.slot).await > before);
    drop(capture);
}
