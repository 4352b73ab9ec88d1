//! The invariants at the moments they are about, with the daemon aborted there by a
//! failpoint (feature `failpoints`, on in `scripts/test.sh`; `src/failpoints.rs`):
//! - `queue-committed` (events committed to the queue, the slot not yet confirmed): after a
//!   restart each change is queued exactly once and every eventNumber is delivered;
//! - `numbered` (a notification's events numbered, nothing sent): after a restart the same
//!   numbers go out, gap-free, each once;
//! - `sent` (the receiver accepted, the mark not yet written): after a restart the
//!   notification comes again with the same eventNumber, and nothing is lost.
//!
//! Each test first proves the failpoint fired (the process aborted, and the log says so)
//! and that the daemon had made progress, before it checks the invariant.
#![cfg(feature = "failpoints")]

use crate::common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `fhir-cdc run` with the failpoint `name` armed.
fn armed(env: &TestEnv, name: &str) -> Daemon {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&env.log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["run", "--config"])
        .arg(&env.config)
        .env("FHIR_CDC_LOG", "info,fhir_cdc=debug")
        .env("FHIR_CDC_FAILPOINT", name)
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap();
    Daemon {
        child,
        log: env.log.clone(),
        config: env.config.clone(),
    }
}

/// Waits until the armed daemon aborted at `name`.
async fn fired(d: &mut Daemon, name: &str) {
    assert!(!d.exited().await, "aborted at {name}, not a clean exit");
    assert!(
        d.log_text().contains(&format!("failpoint {name} fired")),
        "the log says which failpoint fired"
    );
}

/// eventNumbers the receiver got at `hook`, in arrival order, duplicates kept.
fn arrivals(rx: &Receiver, hook: &str) -> Vec<i64> {
    rx.events(hook).iter().flat_map(event_numbers).collect()
}

async fn subscribed(env: &TestEnv) -> String {
    let d = env.start().await;
    let id = subscribe_active(
        env.api,
        ENCOUNTER_TOPIC,
        &env.rx.url("f"),
        "id-only",
        json!({}),
    )
    .await;
    drop(d);
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_committed_before_the_slot_confirm_queues_each_change_once() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let id = subscribed(&env).await;
    let mut d = armed(&env, "queue-committed");
    wait_api(env.api).await;
    for i in 0..30 {
        put_encounter(&env.store, &format!("q{i}")).await;
    }
    fired(&mut d, "queue-committed").await;
    // Progress: events were committed; the slot was not confirmed past them.
    let queued: i64 = env
        .store
        .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        queued > 0,
        "the queue transaction committed before the abort"
    );
    let behind: bool = env
        .store
        .query_one(
            "SELECT s.confirmed_flush_lsn < c.lsn FROM pg_replication_slots s, fhir_cdc.checkpoint c
             WHERE s.slot_name = $1 AND c.slot = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        behind,
        "the slot was not confirmed past the committed checkpoint"
    );

    let _d = env.start().await;
    let all: Vec<i64> = (1..=30).collect();
    wait_until(
        "every change delivered",
        Duration::from_secs(60),
        || async {
            let mut got = arrivals(&env.rx, "f");
            got.sort();
            got.dedup();
            got == all
        },
    )
    .await;
    let rows = env
        .store
        .query(
            "SELECT resource_id, count(*) FROM fhir_cdc.event GROUP BY resource_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 30, "one event per change");
    assert!(rows.iter().all(|r| r.get::<_, i64>(1) == 1), "none twice");
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(&env.rx.bodies("f"), "r5", &["--expect-subscription", &sub]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_before_the_send_keeps_the_numbers_gap_free() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let id = subscribed(&env).await;
    let mut d = armed(&env, "numbered");
    wait_api(env.api).await;
    for i in 0..5 {
        put_encounter(&env.store, &format!("n{i}")).await;
    }
    fired(&mut d, "numbered").await;
    assert!(
        arrivals(&env.rx, "f").is_empty(),
        "nothing was sent before the abort"
    );

    let _d = env.start().await;
    wait_until("five delivered", Duration::from_secs(60), || async {
        arrivals(&env.rx, "f").len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        arrivals(&env.rx, "f"),
        [1, 2, 3, 4, 5],
        "the same numbers, once each, in order"
    );
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(
        &env.rx.bodies("f"),
        "r5",
        &["--expect-subscription", &sub, "--sequence", "strict"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_before_the_mark_comes_again_with_the_same_number() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let id = subscribed(&env).await;
    let mut d = armed(&env, "sent");
    wait_api(env.api).await;
    for i in 0..5 {
        put_encounter(&env.store, &format!("s{i}")).await;
    }
    fired(&mut d, "sent").await;
    assert_eq!(
        arrivals(&env.rx, "f"),
        [1],
        "the receiver accepted event 1, then the abort"
    );
    let cursor: i64 = env
        .store
        .query_one(
            "SELECT cursor_number FROM fhir_cdc.subscription WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor, 0, "its mark was never written");

    let _d = env.start().await;
    wait_until("all five delivered", Duration::from_secs(60), || async {
        let got = arrivals(&env.rx, "f");
        got.len() >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = arrivals(&env.rx, "f");
    assert_eq!(
        got,
        [1, 1, 2, 3, 4, 5],
        "event 1 again with its number, then the rest"
    );
    let st = status(env.api, &id).await;
    assert_eq!(st["eventsSinceSubscriptionStart"], "5", "{st}");
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(&env.rx.bodies("f"), "r5", &["--expect-subscription", &sub]);
}
