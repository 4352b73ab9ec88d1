//! Delivery on several instances sharing one queue: 50 subscriptions over two `deliver`
//! processes, one SIGKILLed mid-stream and one stopped with SIGTERM; and a topic where 5
//! endpoints hang while the other 45 keep getting every event within a second.

use crate::common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The tests of this file run one at a time: the latency bound of the hanging-endpoint
/// test is about the daemon, not about sharing two cores with three more daemons.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOPIC: &str = "http://fhir-cdc.test/topic/encounter-all";
const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter-all"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update", "delete"] }]
"#;

/// Creates `n` id-only subscriptions `s0…` through the API at `api`, all active.
async fn subscriptions(env: &TestEnv, api: u16, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(subscribe(api, TOPIC, &env.rx.url(&format!("s{i}")), "id-only").await);
    }
    wait_until("all active", Duration::from_secs(60), || async {
        let n: i64 = env
            .store
            .query_one(
                "SELECT count(*) FROM fhir_cdc.subscription WHERE status = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n as usize == ids.len()
    })
    .await;
    ids
}

/// Per hook: the eventNumbers received, in arrival order (duplicates kept).
fn numbers(env: &TestEnv, hooks: usize) -> Vec<Vec<i64>> {
    (0..hooks)
        .map(|i| {
            env.rx
                .events(&format!("s{i}"))
                .iter()
                .flat_map(event_numbers)
                .collect()
        })
        .collect()
}

/// Every hook got 1..=n, first arrivals in order; a resend after a kill repeats a number
/// already sent (at-least-once), never skips or reorders one.
fn assert_complete(got: &[Vec<i64>], n: i64) {
    for (i, nums) in got.iter().enumerate() {
        let mut first = Vec::new();
        for x in nums {
            if !first.contains(x) {
                first.push(*x);
            }
        }
        assert_eq!(first, (1..=n).collect::<Vec<_>>(), "hook s{i} got {nums:?}");
    }
}

/// One Bundle per (hook, eventNumber), first arrivals, for the validator.
fn first_bundles(env: &TestEnv, hooks: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..hooks {
        let mut seen = std::collections::HashSet::new();
        for b in env.rx.bodies(&format!("s{i}")) {
            if seen.insert(event_numbers(&b)) {
                out.push(b);
            }
        }
    }
    out
}

fn sigterm(d: &mut Daemon) {
    let pid = d.child.id().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliver_instances_share_50_subscriptions_through_a_kill_and_a_stop() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::aidbox(TOPICS)
        .config(|c| c.delivery.shutdown_grace_secs = 5)
        .build()
        .await;
    let port_b = free_port();
    let config_b = env.config_variant("b.toml", |c| {
        c.api.listen = format!("127.0.0.1:{port_b}").parse().unwrap()
    });
    let log = |name: &str| env.dir.path().join(name);
    let _capture = Daemon::start_args(&["capture"], &env.config, &log("capture.log"));
    let mut a = Daemon::start_args(&["deliver"], &env.config, &log("a.log"));
    let mut b = Daemon::start_args(&["deliver"], &config_b, &log("b.log"));
    wait_api(env.api).await;
    wait_api(port_b).await;
    let ids = subscriptions(&env, env.api, 50).await;
    assert_eq!(ids.len(), 50);
    let both_sent =
        a.log_text().contains("handshake accepted") && b.log_text().contains("handshake accepted");
    assert!(both_sent, "both instances took part in the handshakes");

    // 40 writes; B is SIGKILLed after the 15th, once it has delivered events.
    for i in 1..=40 {
        put_encounter(&env.store, &format!("k{i}")).await;
        if i == 15 {
            wait_until(
                "events delivered before the kill",
                Duration::from_secs(30),
                || async { numbers(&env, 50).iter().all(|n| !n.is_empty()) },
            )
            .await;
            b.kill9();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(
        "40 events on every hook",
        Duration::from_secs(120),
        || async {
            numbers(&env, 50)
                .iter()
                .all(|n| n.iter().max() == Some(&40))
        },
    )
    .await;
    assert_complete(&numbers(&env, 50), 40);

    // B comes back; A is stopped with SIGTERM while 20 more events go out.
    let mut b = Daemon::start_args(&["deliver"], &config_b, &log("b2.log"));
    wait_api(port_b).await;
    for i in 41..=60 {
        put_encounter(&env.store, &format!("k{i}")).await;
        if i == 45 {
            let asked = Instant::now();
            sigterm(&mut a);
            let code = loop {
                if let Some(s) = a.child.try_wait().unwrap() {
                    break s;
                }
                assert!(
                    asked.elapsed() < Duration::from_secs(8),
                    "SIGTERM: still running after the 5 s grace"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(code.success(), "SIGTERM exits 0, not {code:?}");
        }
    }
    wait_until(
        "60 events on every hook",
        Duration::from_secs(120),
        || async {
            numbers(&env, 50)
                .iter()
                .all(|n| n.iter().max() == Some(&60))
        },
    )
    .await;
    assert_complete(&numbers(&env, 50), 60);
    let dup: usize = numbers(&env, 50).iter().map(|n| n.len() - 60).sum();
    eprintln!("resends after the kill (at-least-once): {dup}");
    b.kill9();
    validate(&first_bundles(&env, 50), "r5", &["--sequence", "strict"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hanging_endpoints_do_not_hold_up_the_other_45() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::aidbox(TOPICS).build().await;
    let _d = env.start().await;
    let ids = subscriptions(&env, env.api, 50).await;
    for i in 0..5 {
        env.rx.answer(&format!("s{i}"), 0);
    }
    let mut written = HashMap::new();
    for n in 1..=5i64 {
        put_encounter(&env.store, &format!("h{n}")).await;
        written.insert(n, Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until("5 events on the 45", Duration::from_secs(30), || async {
        numbers(&env, 50)[5..].iter().all(|n| n.len() >= 5)
    })
    .await;
    let mut worst = Duration::ZERO;
    let mut per_event: HashMap<i64, Vec<u128>> = HashMap::new();
    for i in 5..50 {
        for (at, b) in env.rx.timed(&format!("s{i}")) {
            for n in event_numbers(&b) {
                let d = at.duration_since(written[&n]);
                per_event.entry(n).or_default().push(d.as_millis());
                worst = worst.max(d);
            }
        }
    }
    for (n, v) in per_event.iter_mut() {
        v.sort();
        eprintln!(
            "event {n}: ms min {} median {} max {}",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
    eprintln!("slowest of 225 deliveries beside 5 hanging endpoints: {worst:?}");
    assert!(worst < Duration::from_secs(1), "an event waited {worst:?}");
    assert_complete(&numbers(&env, 50)[5..], 5);
    assert_eq!(ids.len(), 50);
    validate(
        &first_bundles(&env, 50)[..],
        "r5",
        &["--sequence", "strict"],
    );
}
