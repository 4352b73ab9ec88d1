//! The API is authenticated: bearer JWTs (SMART Backend Services: issuer, audience, RS256
//! keys from a JWKS served here, fetched again on an unknown kid, exp/nbf with leeway) and
//! static tokens; SMART v1/v2 scopes decide; `$events` never exceeds the subscription's own
//! content; without `[api.auth]` the API refuses a non-loopback address.

use crate::common::*;
use fhir_cdc::config::{AuthConfig, StaticToken};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create"] }]
"#;
const ISS: &str = "https://auth.fhir-cdc.test";
const AUD: &str = "https://fhir-cdc.test/fhir";
const STATIC_ENV: &str = "FHIR_CDC_TEST_STATIC_TOKEN";
const STATIC: &str = "static-token-for-the-auth-test-0123456789";

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An RSA key made with openssl: its PEM and its public JWK.
fn rsa_key(dir: &std::path::Path, kid: &str) -> (Vec<u8>, Value) {
    let pem = dir.join(format!("{kid}.pem"));
    let st = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    let out = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    let hex = hex.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(&n), "e": "AQAB"});
    (std::fs::read(&pem).unwrap(), jwk)
}

fn token(pem: &[u8], kid: &str, claims: Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    encode(&h, &claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

fn claims(scope: &str, exp_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"iss": ISS, "aud": AUD, "sub": "backend-1", "iat": now, "nbf": now - 5, "exp": now + exp_in, "scope": scope})
}

/// A JWKS endpoint that counts its fetches.
async fn jwks_server(keys: Value) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (h, keys) = (h.clone(), keys.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                axum::Json(keys)
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, hits)
}

fn sub_body(endpoint: &str, content: &str) -> Value {
    json!({"resourceType": "Subscription", "status": "requested", "topic": "http://fhir-cdc.test/topic/encounter",
           "channelType": {"code": "rest-hook"}, "endpoint": endpoint, "content": content})
}

async fn call(
    m: reqwest::Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut r = reqwest::Client::new().request(m, url);
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let resp = r.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, v, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_and_static_tokens_with_scopes_decide_and_events_never_exceed_the_subscription() {
    let keys = tempfile::tempdir().unwrap();
    let (pem, jwk) = rsa_key(keys.path(), "k1");
    let (other_pem, _) = rsa_key(keys.path(), "k2");
    let (jwks_url, fetches) = jwks_server(json!({"keys": [jwk]})).await;
    // SAFETY of intent: the daemon reads its static token from its environment.
    std::env::set_var(STATIC_ENV, STATIC);
    let env = TestEnv::aidbox(TOPIC)
        .config(move |c| {
            c.api.auth = Some(AuthConfig {
                issuer: Some(ISS.into()),
                audience: Some(AUD.into()),
                jwks_url: Some(jwks_url),
                jwks_file: None,
                leeway_secs: 30,
                tokens: vec![StaticToken {
                    env: STATIC_ENV.into(),
                    scopes: "system/Subscription.rs system/SubscriptionTopic.read".into(),
                }],
            })
        })
        .build()
        .await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let _d = env.start().await;
    let base = format!("http://127.0.0.1:{api}");
    use reqwest::Method as M;

    // Open: health, metrics, the CapabilityStatement.
    for p in ["/healthz", "/readyz", "/metrics", "/metadata"] {
        let r = reqwest::get(format!("{base}{p}")).await.unwrap();
        assert_eq!(r.status(), 200, "{p}");
    }
    // No token: 401 with a challenge.
    let (s, oo, h) = call(
        M::POST,
        &format!("{base}/Subscription"),
        None,
        Some(&sub_body(&rx.url("a"), "id-only")),
    )
    .await;
    assert_eq!(s, 401);
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer realm=\"fhir-cdc\""));
    assert_eq!(oo["resourceType"], "OperationOutcome");

    // Full rights (v1 words): create, read, topics.
    let admin = token(&pem, "k1", claims("system/Subscription.read system/Subscription.write system/SubscriptionTopic.read system/Encounter.read", 300));
    let (s, created, _) = call(
        M::POST,
        &format!("{base}/Subscription"),
        Some(&admin),
        Some(&sub_body(&rx.url("full"), "full-resource")),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let full_id = created["id"].as_str().unwrap().to_string();
    let (s, idonly, _) = call(
        M::POST,
        &format!("{base}/Subscription"),
        Some(&admin),
        Some(&sub_body(&rx.url("ids"), "id-only")),
    )
    .await;
    assert_eq!(s, 201);
    let ids_id = idonly["id"].as_str().unwrap().to_string();
    assert_eq!(
        call(
            M::GET,
            &format!("{base}/SubscriptionTopic"),
            Some(&admin),
            None
        )
        .await
        .0,
        200
    );

    // Read only (v2 letters): reads pass, writes get 403 naming the scope.
    let reader = token(&pem, "k1", claims("system/Subscription.rs", 300));
    assert_eq!(
        call(
            M::GET,
            &format!("{base}/Subscription/{full_id}"),
            Some(&reader),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            M::GET,
            &format!("{base}/Subscription/$status"),
            Some(&reader),
            None
        )
        .await
        .0,
        200
    );
    let (s, oo, _) = call(
        M::DELETE,
        &format!("{base}/Subscription/{full_id}"),
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(s, 403);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("system/Subscription.write"),
        "{oo}"
    );
    assert_eq!(
        call(
            M::GET,
            &format!("{base}/SubscriptionTopic"),
            Some(&reader),
            None
        )
        .await
        .0,
        403
    );

    // Refused tokens: expired, wrong audience, wrong issuer, an unknown key (the JWKS is
    // fetched again for it), garbage, a wrong static token.
    let mut wrong_aud = claims("system/Subscription.read", 300);
    wrong_aud["aud"] = json!("https://elsewhere");
    let mut wrong_iss = claims("system/Subscription.read", 300);
    wrong_iss["iss"] = json!("https://evil.example");
    let before = fetches.load(Ordering::SeqCst);
    for (what, t) in [
        (
            "expired",
            token(&pem, "k1", claims("system/Subscription.read", -120)),
        ),
        ("audience", token(&pem, "k1", wrong_aud)),
        ("issuer", token(&pem, "k1", wrong_iss)),
        (
            "unknown key",
            token(&other_pem, "k2", claims("system/Subscription.read", 300)),
        ),
        ("garbage", "not.a.jwt".to_string()),
        ("static", "wrong-static-token-0123456789".to_string()),
    ] {
        let (s, oo, h) = call(M::GET, &format!("{base}/Subscription"), Some(&t), None).await;
        assert_eq!(s, 401, "{what}: {oo}");
        assert!(h.contains_key("www-authenticate"), "{what}");
    }
    assert!(
        fetches.load(Ordering::SeqCst) > before,
        "the JWKS was not fetched again for an unknown kid"
    );

    // The static token works with its scopes.
    assert_eq!(
        call(M::GET, &format!("{base}/Subscription"), Some(STATIC), None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            M::POST,
            &format!("{base}/Subscription"),
            Some(STATIC),
            Some(&sub_body(&rx.url("x"), "id-only"))
        )
        .await
        .0,
        403
    );

    // $events: never more than the subscription's content; full resources need the
    // resource type's read scope.
    wait_until("handshakes", Duration::from_secs(30), || async {
        !rx.bodies("full").is_empty() && !rx.bodies("ids").is_empty()
    })
    .await;
    aidbox_put(store, "Encounter", "e1", &json!({"status": "planned"})).await;
    wait_until("both events", Duration::from_secs(30), || async {
        rx.events("full").len() == 1 && rx.events("ids").len() == 1
    })
    .await;
    let (s, ev, _) = call(
        M::GET,
        &format!("{base}/Subscription/{ids_id}/$events?content=full-resource"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        ev["entry"][1].get("resource").is_none(),
        "an id-only subscription's $events carried a resource: {ev}"
    );
    let (s, oo, _) = call(
        M::GET,
        &format!("{base}/Subscription/{full_id}/$events"),
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(s, 403, "{oo}");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("system/Encounter.read"),
        "{oo}"
    );
    let (s, ev, _) = call(
        M::GET,
        &format!("{base}/Subscription/{full_id}/$events"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(ev["entry"][1]["resource"]["resourceType"], "Encounter");
    let mut all = rx.bodies("full");
    all.extend(rx.bodies("ids"));
    validate(&all, "r5", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listen_without_auth_refuses_to_start() {
    let env = TestEnv::aidbox(TOPIC).build().await;
    let open = env.config_variant("open.toml", |c| {
        c.api.listen = format!("0.0.0.0:{}", free_port()).parse().unwrap();
    });
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["run", "--config"])
        .arg(&open)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[api.auth] is missing"), "{err}");
    // Saying so explicitly is allowed.
    let allowed = env.config_variant("allowed.toml", |c| {
        c.api.listen = format!("0.0.0.0:{}", free_port()).parse().unwrap();
        c.api.allow_unauthenticated = true;
    });
    let check = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config"])
        .arg(&allowed)
        .output()
        .unwrap();
    assert_ne!(
        check.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
