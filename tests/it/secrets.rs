//! A receiver's credential is the subscriber's secret: reads, searches, `$status` and the
//! console show header values as `***` or not at all, an update that sends `***` back keeps
//! the stored value (the receiver still gets the real header), the daemon never logs it,
//! and with a `[security]` key the queue holds only ciphertext (secrets stored before the
//! key are sealed at the next start). Real WAL, a real HTTP receiver.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const SECRET: &str = "SECRET123";

async fn get(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_are_write_only() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    let extra =
        json!({"parameter": [{"name": "Authorization", "value": format!("Bearer {SECRET}")}]});
    let id = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("s"), "id-only", extra).await;

    // Read, search and $status never show the value.
    let read = get(format!("http://127.0.0.1:{api}/Subscription/{id}")).await;
    assert_eq!(read["parameter"][0]["name"], "Authorization");
    assert_eq!(read["parameter"][0]["value"], "***");
    let search = get(format!("http://127.0.0.1:{api}/Subscription?status=active")).await;
    assert_eq!(search["entry"].as_array().unwrap().len(), 1, "{search}");
    let st = get(format!("http://127.0.0.1:{api}/Subscription/{id}/$status")).await;
    for shown in [&read, &search, &st] {
        assert!(!shown.to_string().contains(SECRET), "{shown}");
    }

    // The read resource sent back as an update keeps the stored value.
    let r = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{api}/Subscription/{id}"))
        .json(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["parameter"][0]["value"], "***");
    put_encounter(&env.store, "x1").await;
    wait_until("the event", Duration::from_secs(30), || async {
        !rx.events("s").is_empty()
    })
    .await;
    let got = rx.got.lock().unwrap();
    let last = got.iter().rev().find(|g| g.hook == "s").unwrap();
    assert_eq!(
        last.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {SECRET}").as_str()),
        "the receiver still gets the stored credential"
    );
    drop(got);
    assert!(
        !env.log_text().contains(SECRET),
        "the daemon logged the secret"
    );
}

/// Hex HMAC-SHA256 of `parts`, as a receiver computes it.
fn hmac_hex(secret: &str, parts: &[&[u8]]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_carry_an_hmac_of_their_exact_body() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    let key = "a-signing-secret-of-the-subscriber";
    let extra = json!({"extension": [{
        "url": "https://www.medplum.com/fhir/StructureDefinition/subscription-secret",
        "valueString": key}]});
    let id = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("signed"), "id-only", extra).await;
    put_encounter(&env.store, "h1").await;
    wait_until("the event", Duration::from_secs(30), || async {
        !rx.events("signed").is_empty()
    })
    .await;
    let got = rx.got.lock().unwrap().clone();
    let signed: Vec<_> = got.iter().filter(|g| g.hook == "signed").collect();
    assert_eq!(signed.len(), 2, "handshake and event");
    for g in &signed {
        let h = |n: &str| g.headers.get(n).cloned().unwrap_or_default();
        assert_eq!(h("x-signature"), hmac_hex(key, &[g.raw.as_bytes()]));
        let ts = h("x-signature-timestamp");
        let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
        assert!((0..60).contains(&age), "timestamp {ts}");
        assert_eq!(
            h("x-signature-timestamped"),
            hmac_hex(key, &[ts.as_bytes(), b".", g.raw.as_bytes()])
        );
        assert_ne!(
            h("x-signature"),
            hmac_hex("another-secret-entirely", &[g.raw.as_bytes()])
        );
        // A body changed on the way does not verify.
        let tampered = g.raw.replacen("h1", "h2", 1);
        let tampered = if tampered == g.raw {
            format!("{} ", g.raw)
        } else {
            tampered
        };
        assert_ne!(h("x-signature"), hmac_hex(key, &[tampered.as_bytes()]));
    }
    // The secret is write-only too.
    let read = get(format!("http://127.0.0.1:{api}/Subscription/{id}")).await;
    assert_eq!(read["extension"][0]["valueString"], "***");
    assert!(!env.log_text().contains(key));
    let bodies: Vec<Value> = signed.iter().map(|g| g.body.clone()).collect();
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(&bodies, "r5", &["--expect-subscription", &sub]);
}

const KEY_ENV: &str = "FHIR_CDC_SECRETS_TEST_KEY";
const SIGNING: &str = "a-signing-secret-kept-sealed";

/// What the queue holds of subscription secrets, as text.
async fn stored(env: &TestEnv) -> String {
    let rows = env
        .store
        .query(
            "SELECT headers::text || coalesce(signing_secret, '') || resource::text
             FROM fhir_cdc.subscription",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// The `Authorization` header the receiver got on its last request to `hook`.
fn last_authorization(rx: &Receiver, hook: &str) -> Option<String> {
    let got = rx.got.lock().unwrap();
    got.iter()
        .rev()
        .find(|g| g.hook == hook)
        .and_then(|g| g.headers.get("authorization").cloned())
}

fn check_output(env: &TestEnv) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_the_queue_holds_only_ciphertext_and_old_secrets_are_sealed_at_start() {
    let mut env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    assert!(
        check_output(&env).contains(
            "WARN  security: endpoint header values and signing secrets are stored in clear"
        ),
        "check warns without a key"
    );
    // A populated queue from before the key: two subscriptions with secrets in clear.
    let mut d = env.start().await;
    let with_secrets = |n: &str| {
        json!({
            "parameter": [{"name": "Authorization", "value": format!("Bearer {SECRET}-{n}")}],
            "extension": [{"url": "https://www.medplum.com/fhir/StructureDefinition/subscription-secret",
                           "valueString": SIGNING}]
        })
    };
    let a = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &rx.url("a"),
        "id-only",
        with_secrets("a"),
    )
    .await;
    let b = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &rx.url("b"),
        "id-only",
        with_secrets("b"),
    )
    .await;
    assert!(
        stored(&env).await.contains(SECRET),
        "in clear before the key"
    );
    d.kill9();

    // The key: the next start seals what is stored.
    std::env::set_var(KEY_ENV, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=");
    env.edit(|c| c.security.secrets_key_env = Some(KEY_ENV.into()));
    assert!(check_output(&env)
        .contains("ok    security: endpoint header values and signing secrets are sealed"));
    let _d = env.start().await;
    wait_until(
        "the stored secrets sealed",
        Duration::from_secs(30),
        || async {
            let s = stored(&env).await;
            !s.contains(SECRET) && !s.contains(SIGNING) && s.matches("enc:v1:").count() >= 6
        },
    )
    .await;
    // A subscription created with the key is written sealed.
    let c = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &rx.url("c"),
        "id-only",
        with_secrets("c"),
    )
    .await;
    let s = stored(&env).await;
    assert!(!s.contains(SECRET) && !s.contains(SIGNING), "{s}");

    // Sends open them: every receiver gets its own credential and a valid signature.
    put_encounter(&env.store, "k1").await;
    for (hook, id) in [("a", &a), ("b", &b), ("c", &c)] {
        wait_until("the event", Duration::from_secs(30), || async {
            !rx.events(hook).is_empty()
        })
        .await;
        assert_eq!(
            last_authorization(&rx, hook).as_deref(),
            Some(format!("Bearer {SECRET}-{hook}").as_str()),
            "{hook}"
        );
        let got = rx.got.lock().unwrap().clone();
        let g = got.iter().rev().find(|g| g.hook == hook).unwrap();
        assert_eq!(
            g.headers.get("x-signature").cloned().unwrap_or_default(),
            hmac_hex(SIGNING, &[g.raw.as_bytes()])
        );
        let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
        validate(&rx.bodies(hook), "r5", &["--expect-subscription", &sub]);
    }

    // The redacted read sent back keeps the sealed value.
    let read = get(format!("http://127.0.0.1:{api}/Subscription/{a}")).await;
    let r = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{api}/Subscription/{a}"))
        .json(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    put_encounter(&env.store, "k2").await;
    wait_until("k2 at a", Duration::from_secs(30), || async {
        rx.events("a").len() >= 2
    })
    .await;
    assert_eq!(
        last_authorization(&rx, "a").as_deref(),
        Some(format!("Bearer {SECRET}-a").as_str())
    );
    assert!(!stored(&env).await.contains(SECRET));

    // Nothing shows them: reads, search, $status, the console, the log.
    for path in [
        format!("/Subscription/{a}"),
        "/Subscription".to_string(),
        format!("/Subscription/{a}/$status"),
        "/console/api/state".to_string(),
        format!("/console/api/attempts/{a}"),
    ] {
        let body = reqwest::get(format!("http://127.0.0.1:{api}{path}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !body.contains(SECRET) && !body.contains(SIGNING),
            "{path}: {body}"
        );
        assert!(!body.contains("enc:v1:"), "{path} shows ciphertext: {body}");
    }
    let log = env.log_text();
    assert!(!log.contains(SECRET) && !log.contains(SIGNING));

    // Another key does not open them: a delivery process refuses to start, rather than
    // send ciphertext as a credential.
    std::env::set_var(
        "FHIR_CDC_SECRETS_TEST_OTHER_KEY",
        "OTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTBmZWRjYmE=",
    );
    let other = env.config_variant("other-key.toml", |c| {
        c.security.secrets_key_env = Some("FHIR_CDC_SECRETS_TEST_OTHER_KEY".into());
        c.api.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["deliver", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong key must stop delivery");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not open with the [security] key"),
        "{err}"
    );
}
