//! A capture-only process (`fhir-cdc capture --health-listen`, as the Kubernetes capture
//! Deployment runs it)
//! answers the probes the manifests use and serves its metrics: the instance streaming the
//! slot is ready, a standby waiting on the slot's lock is alive but not ready.

use crate::common::*;
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
    // Without --health-listen a capture process listens on nothing (a capture and a
    // delivery process may share one config file on one host).
    let first = free_port();
    let health = format!("127.0.0.1:{first}");
    let active = env.spawn_args(&["capture", "--health-listen", &health]);
    wait_until(
        "the active capture ready",
        Duration::from_secs(30),
        || async { get(first, "/readyz").await.0 == 200 },
    )
    .await;
    assert_eq!(get(first, "/livez").await.0, 200);
    assert_eq!(get(env.api, "/livez").await.0, 0, "nothing on [api] listen");
    put_encounter(&env.store, "p1").await;
    wait_until("its metrics", Duration::from_secs(30), || async {
        let (code, m) = get(first, "/metrics").await;
        code == 200
            && m.lines().any(|l| l == "fhir_cdc_capture_streaming 1")
            && m.contains("fhir_cdc_slot_lag_bytes")
    })
    .await;

    // A second capture on the same slot waits as a standby: alive, not ready.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _standby = env.spawn_args(&["capture", "--health-listen", &addr]);
    wait_until("the standby alive", Duration::from_secs(30), || async {
        get(port, "/livez").await.0 == 200
    })
    .await;
    let (code, why) = get(port, "/readyz").await;
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("not streaming"), "{why}");
    drop(active);
}
