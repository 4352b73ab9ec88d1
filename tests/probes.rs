//! A capture-only process (`fhir-cdc capture`, as the Kubernetes capture Deployment runs it)
//! answers the probes the manifests use and serves its metrics: the instance streaming the
//! slot is ready, a standby waiting on the slot's lock is alive but not ready.

mod common;

use common::*;
use std::time::Duration;

async fn get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_alone_answers_liveness_readiness_and_metrics() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let active = env.spawn("capture");
    wait_until(
        "the active capture ready",
        Duration::from_secs(30),
        || async { get(env.api, "/readyz").await.0 == 200 },
    )
    .await;
    assert_eq!(get(env.api, "/livez").await.0, 200);
    put_encounter(&env.store, "p1").await;
    wait_until("its metrics", Duration::from_secs(30), || async {
        let (code, m) = get(env.api, "/metrics").await;
        code == 200
            && m.lines().any(|l| l == "fhir_cdc_capture_streaming 1")
            && m.contains("fhir_cdc_slot_lag_bytes")
    })
    .await;

    // A second capture on the same slot waits as a standby: alive, not ready.
    let port = free_port();
    let second = env.config_variant("standby.toml", |c| {
        c.api.listen = format!("127.0.0.1:{port}").parse().unwrap();
    });
    let log = env.dir.path().join("standby.log");
    let _standby = Daemon::start_args(&["capture"], &second, &log);
    wait_until("the standby alive", Duration::from_secs(30), || async {
        get(port, "/livez").await.0 == 200
    })
    .await;
    let (code, why) = get(port, "/readyz").await;
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("not streaming"), "{why}");
    drop(active);
}
