//! `fhir-cdc status`: healthy while everything flows, degraded with the reason when a
//! subscription fails or capture is down (read from the databases, so it answers while the
//! daemon is down), 2 when a database does not answer. Real WAL, a real HTTP receiver.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// `fhir-cdc status --config CONFIG [--json]`: exit code and stdout.
fn status_cmd(config: &std::path::Path, json: bool) -> (i32, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-cdc"));
    c.args(["status", "--config"]).arg(config);
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn report(env: &TestEnv) -> (i32, Value) {
    let (code, out) = status_cmd(&env.config, true);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (code, v)
}

fn sub<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_healthy_then_why_not_and_works_with_the_daemon_down() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    let mut d = env.start().await;
    let ok = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &rx.url("ok?token=secret"),
        "id-only",
        json!({}),
    )
    .await;
    put_encounter(&env.store, "s1").await;
    wait_until("s1 delivered", Duration::from_secs(30), || async {
        rx.events("ok?token=secret").len() + rx.events("ok").len() == 1
    })
    .await;
    wait_settled(&env).await;

    // Healthy: the slot is read, capture holds its lock, nothing waits.
    let (code, r) = report(&env);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["healthy"], true);
    assert_eq!(r["slot"]["exists"], true);
    assert_eq!(r["slot"]["active"], true);
    assert_eq!(r["slot"]["level"], "ok");
    assert!(
        r["capture"]["lock_holder"]["pid"].as_i64().unwrap() > 0,
        "{r:#}"
    );
    assert!(r["capture"]["checkpoint_lsn"].is_string());
    let s = sub(&r, &ok);
    assert_eq!(s["status"], "active");
    assert_eq!(s["pending"], 0);
    let host = format!("127.0.0.1:{}", rx.port);
    assert_eq!(
        s["endpoint_host"],
        host.as_str(),
        "the host only, no path or query"
    );
    assert!(
        !r.to_string().contains("secret"),
        "no endpoint path or query"
    );

    // A subscriber that refuses: its event is a dead letter and it is in error.
    let bad = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("bad"), "id-only", json!({})).await;
    rx.answer("bad", 400);
    put_encounter(&env.store, "s2").await;
    wait_until("bad in error", Duration::from_secs(30), || async {
        status(api, &bad).await["status"] == "error"
    })
    .await;
    let (code, r) = report(&env);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["healthy"], false);
    assert_eq!(r["dead_letters"], 1);
    let b = sub(&r, &bad);
    assert_eq!(b["status"], "error");
    assert!(
        b["last_error"].as_str().unwrap().contains("HTTP 400"),
        "{b}"
    );
    let problems = r["problems"].to_string();
    assert!(
        problems.contains(&format!("subscription {bad} is in error")),
        "{problems}"
    );
    let (code, text) = status_cmd(&env.config, false);
    assert_eq!(code, 1);
    assert!(text.starts_with("fhir-cdc status: DEGRADED"), "{text}");
    assert!(
        text.contains(&format!("{bad}\terror\trest-hook\t{host}")),
        "{text}"
    );

    // A receiver failing for now (503): its events wait, counted, with the reason.
    let flaky =
        subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("flaky"), "id-only", json!({})).await;
    rx.answer("flaky", 503);
    put_encounter(&env.store, "s2b").await;
    put_encounter(&env.store, "s2c").await;
    wait_until("flaky in error", Duration::from_secs(60), || async {
        status(api, &flaky).await["status"] == "error"
    })
    .await;
    let flaky_state = |r: &Value| {
        let f = sub(r, &flaky);
        assert_eq!(f["status"], "error", "{f}");
        assert_eq!(f["pending"], 2, "s2b and s2c wait: {f}");
        assert!(
            f["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0,
            "{f}"
        );
        assert!(f["failures"].as_i64().unwrap() >= 3, "{f}");
        assert!(
            f["last_error"].as_str().unwrap().contains("HTTP 503"),
            "{f}"
        );
    };
    let (code, r) = report(&env);
    assert_eq!(code, 1);
    flaky_state(&r);

    // The daemon down: status still answers, from the databases, and says capture is not
    // running; the failing subscription still shows its reason and what waits for it.
    d.kill9();
    wait_until("the slot released", Duration::from_secs(30), || async {
        report(&env).1["slot"]["active"] == false
    })
    .await;
    put_encounter(&env.store, "s3").await;
    let (code, r) = report(&env);
    assert_eq!(code, 1);
    flaky_state(&r);
    assert!(r["capture"]["lock_holder"].is_null(), "{r:#}");
    assert!(
        r["problems"].to_string().contains("is not being read"),
        "{r:#}"
    );
    assert!(
        r["slot"]["lag_bytes"].as_u64().unwrap() > 0,
        "s3 waits in the WAL"
    );

    // A database that does not answer: exit 2.
    let port = free_port();
    let unreachable = env.config_variant("down.toml", |c| {
        c.source.url = format!("postgresql://postgres@127.0.0.1:{port}/fhir");
        c.queue.url = None;
    });
    let (code, _) = status_cmd(&unreachable, false);
    assert_eq!(code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_stop_shows_in_status_with_its_remedy_until_the_task_runs_again() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let mut d = env.start().await;
    put_encounter(&env.store, "f1").await;
    wait_until("capture checkpointed", Duration::from_secs(30), || async {
        env.store
            .query_opt(
                "SELECT 1 FROM fhir_cdc.checkpoint WHERE slot = $1 AND lsn > '0/0'",
                &[&env.slot],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    d.kill9();
    // The slot goes behind fhir-cdc's back: capture must stop and say what to do.
    wait_until("the slot released", Duration::from_secs(30), || async {
        report(&env).1["slot"]["active"] == false
    })
    .await;
    env.store
        .execute("SELECT pg_drop_replication_slot($1)", &[&env.slot])
        .await
        .unwrap();
    let mut c = env.spawn("capture");
    assert!(!c.exited().await, "a lost slot stops capture");
    let (code, r) = report(&env);
    assert_eq!(code, 1, "{r:#}");
    let s = &r["stopped"][0];
    assert_eq!(s["task"], "capture", "{r:#}");
    assert!(s["error"].as_str().unwrap().contains("slot"), "{s}");
    let remedy = s["remedy"].as_str().unwrap();
    assert!(remedy.contains("--resync-from-now"), "{remedy}");
    let (_, text) = status_cmd(&env.config, false);
    assert!(text.contains("capture stopped at"), "{text}");
    assert!(
        text.contains("fix: `fhir-cdc capture --resync-from-now`"),
        "{text}"
    );
    assert!(
        env.log_text().contains("remedy"),
        "the log line carries the remedy too"
    );

    // Capture running again clears it.
    let _c = env.spawn_args(&["capture", "--resync-from-now"]);
    wait_until("the stop forgotten", Duration::from_secs(60), || async {
        report(&env).1["stopped"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    })
    .await;
    let (_, r) = report(&env);
    assert_eq!(r["slot"]["exists"], true, "{r:#}");
}
