//! Receivers that demand proof of who sends: `[[delivery.endpoint_auth]]` with OAuth2 client
//! credentials (a client secret, and a `private_key_jwt` assertion the token server verifies
//! with the public key) and with mutual TLS (a TLS receiver that requires a client
//! certificate signed by the test's CA; certificates made with openssl here). A 100-change
//! run reaches all three, tokens expire and are fetched again during it, a revoked token
//! (401) is replaced without a failed send, a token endpoint that is down is retried, and a
//! refused client is a permanent error with its reason. Real WAL; every Bundle validated.

use crate::common::*;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use fhir_cdc::config::{EndpointAuthConfig, EndpointAuthKind};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET_ENV: &str = "FHIR_CDC_ENDPOINT_AUTH_TEST_SECRET";
const CLIENT_SECRET: &str = "the-client-secret-of-fhir-cdc";
const WRONG_ENV: &str = "FHIR_CDC_ENDPOINT_AUTH_TEST_WRONG";
/// Token lifetime: short, so tokens are fetched again during a run.
const TOKEN_SECS: u64 = 1;

/// `ca.crt`, a server certificate for 127.0.0.1, a client certificate (CN fhir-cdc) signed
/// by the CA, and an RSA key pair for the client assertion.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    for (name, cn, ext) in [
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\n"),
        ("client", "fhir-cdc", "extendedKeyUsage=clientAuth\n"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "assertion.key",
        ],
    );
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            "assertion.key",
            "-pubout",
            "-out",
            "assertion.pub",
        ],
    );
}

/// A Python TLS receiver that requires a client certificate from `ca.crt`; it appends each
/// body with the client's CN to `got.jsonl`.
const MTLS_RECEIVER: &str = r#"
import http.server, json, ssl, sys
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cert = self.connection.getpeercert() or {}
        cn = dict(x[0] for x in cert.get("subject", ())).get("commonName")
        with open(d + "/got.jsonl", "a") as f:
            f.write(json.dumps({"cn": cn, "body": body.decode()}) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(d + "/server.crt", d + "/server.key")
ctx.load_verify_locations(d + "/ca.crt")
ctx.verify_mode = ssl.CERT_REQUIRED
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
with open(d + "/port.tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os
os.rename(d + "/port.tmp", d + "/port")
srv.serve_forever()
"#;

struct MtlsReceiver {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl MtlsReceiver {
    async fn start(dir: &Path) -> Self {
        std::fs::write(dir.join("receiver.py"), MTLS_RECEIVER).unwrap();
        let child = Command::new("python3")
            .arg(dir.join("receiver.py"))
            .arg(dir)
            .spawn()
            .unwrap();
        let port_file = dir.join("port");
        wait_until("the TLS receiver", Duration::from_secs(20), || async {
            port_file.exists()
        })
        .await;
        let port = std::fs::read_to_string(&port_file)
            .unwrap()
            .parse()
            .unwrap();
        MtlsReceiver {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// (client CN, body) of each request.
    fn got(&self) -> Vec<(Option<String>, Value)> {
        std::fs::read_to_string(self.dir.join("got.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let body = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
                (v["cn"].as_str().map(str::to_string), body)
            })
            .collect()
    }
}

impl Drop for MtlsReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token server and the receivers that check its tokens.
#[derive(Default)]
struct Auth {
    /// The public key of the `private_key_jwt` client.
    assertion_pub: Vec<u8>,
    token_url: String,
    /// token → (client id, expiry).
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    issued: Mutex<HashMap<String, usize>>,
    jtis: Mutex<HashSet<String>>,
    /// The secret client's token is revoked at its request number `revoke_after` (counted
    /// from 0 over all its tokens): uses, not time, so a live token is revoked in every run
    /// however slowly the machine goes.
    revoke_after: usize,
    secret_uses: AtomicUsize,
    /// Tokens revoked before they expired.
    revoked: Mutex<HashSet<String>>,
    unauthorized: AtomicUsize,
    down: AtomicBool,
    /// (hook, body) of accepted notifications.
    got: Mutex<Vec<(String, Value)>>,
}

type Shared = Arc<Auth>;

fn token_error(code: StatusCode, error: &str) -> (StatusCode, Json<Value>) {
    (code, Json(json!({"error": error})))
}

/// Checks a client-credentials request; the client's id when it is right.
fn client_of(
    a: &Auth,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<String, &'static str> {
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err("unsupported_grant_type");
    }
    if let Some(basic) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let raw = basic.strip_prefix("Basic ").ok_or("invalid_client")?;
        let pair = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(|_| "invalid_client")?;
        let pair = String::from_utf8(pair).map_err(|_| "invalid_client")?;
        let (id, secret) = pair.split_once(':').ok_or("invalid_client")?;
        return if id == "fhir-cdc-secret" && secret == CLIENT_SECRET {
            Ok(id.to_string())
        } else {
            Err("invalid_client")
        };
    }
    if form.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err("invalid_client");
    }
    let jwt = form.get("client_assertion").ok_or("invalid_client")?;
    let key =
        jsonwebtoken::DecodingKey::from_rsa_pem(&a.assertion_pub).map_err(|_| "server_error")?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS384);
    v.set_audience(&[a.token_url.as_str()]);
    v.set_issuer(&["fhir-cdc-jwt"]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<Value>(jwt, &key, &v).map_err(|_| "invalid_client")?;
    let c = data.claims;
    if c["sub"] != "fhir-cdc-jwt"
        || form.get("client_id").map(String::as_str) != Some("fhir-cdc-jwt")
    {
        return Err("invalid_client");
    }
    let jti = c["jti"].as_str().ok_or("invalid_client")?.to_string();
    if !a.jtis.lock().unwrap().insert(jti) {
        return Err("invalid_client");
    }
    Ok("fhir-cdc-jwt".into())
}

async fn token(
    State(a): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    if a.down.load(Ordering::SeqCst) {
        return token_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    }
    let client = match client_of(&a, &headers, &form) {
        Ok(c) => c,
        Err(e) => return token_error(StatusCode::UNAUTHORIZED, e),
    };
    if form.get("scope").map(String::as_str) != Some("system/*.write") {
        return token_error(StatusCode::BAD_REQUEST, "invalid_scope");
    }
    let t = uuid::Uuid::new_v4().to_string();
    let expires = Instant::now() + Duration::from_secs(TOKEN_SECS);
    a.tokens
        .lock()
        .unwrap()
        .insert(t.clone(), (client.clone(), expires));
    *a.issued.lock().unwrap().entry(client).or_default() += 1;
    (
        StatusCode::OK,
        Json(json!({"access_token": t, "token_type": "Bearer", "expires_in": TOKEN_SECS})),
    )
}

/// A receiver that takes only unexpired tokens of `client`.
async fn receive(
    a: &Auth,
    hook: &str,
    client: &str,
    headers: &HeaderMap,
    body: Value,
) -> StatusCode {
    let Some(t) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return StatusCode::UNAUTHORIZED;
    };
    let valid = matches!(a.tokens.lock().unwrap().get(t), Some((c, exp)) if c == client && Instant::now() < *exp);
    if !valid || a.revoke(client, t) {
        a.unauthorized.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    a.got.lock().unwrap().push((hook.to_string(), body));
    StatusCode::OK
}

impl Auth {
    /// Whether the secret client's live token `t` is refused as revoked: it was revoked
    /// before, or this is the request at which it is revoked.
    fn revoke(&self, client: &str, t: &str) -> bool {
        if client != "fhir-cdc-secret" {
            return false;
        }
        let mut revoked = self.revoked.lock().unwrap();
        if revoked.contains(t) {
            return true;
        }
        if self.secret_uses.fetch_add(1, Ordering::SeqCst) == self.revoke_after {
            revoked.insert(t.to_string());
            return true;
        }
        false
    }

    fn bodies(&self, hook: &str) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(h, _)| h == hook)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

/// Serves the token endpoint and the receivers; the token URL (the assertions' audience) is
/// known once the port is.
async fn serve(mut a: Auth) -> (Shared, u16) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    a.token_url = format!("http://127.0.0.1:{port}/token");
    let a = Arc::new(a);
    let app = Router::new()
        .route("/token", post(token))
        .route(
            "/secret/hook",
            post(
                |State(a): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    receive(&a, "secret", "fhir-cdc-secret", &h, b).await
                },
            ),
        )
        .route(
            "/jwt/hook",
            post(
                |State(a): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    receive(&a, "jwt", "fhir-cdc-jwt", &h, b).await
                },
            ),
        )
        .route(
            "/down/hook",
            post(
                |State(a): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    receive(&a, "down", "fhir-cdc-secret", &h, b).await
                },
            ),
        )
        .with_state(a.clone());
    tokio::spawn(async move { axum::serve(l, app).await });
    (a, port)
}

fn oauth(prefix: String, token_url: &str, client: &str) -> EndpointAuthConfig {
    EndpointAuthConfig {
        prefix,
        kind: EndpointAuthKind::Oauth2,
        token_url: Some(token_url.into()),
        client_id: Some(client.into()),
        client_secret_env: None,
        private_key_jwt: None,
        private_key_alg: None,
        private_key_id: None,
        scope: Some("system/*.write".into()),
        cert_file: None,
        key_file: None,
        ca_file: None,
    }
}

fn numbers(bodies: &[Value]) -> Vec<i64> {
    let mut n: Vec<i64> = bodies.iter().flat_map(event_numbers).collect();
    n.sort();
    n.dedup();
    n
}

/// A free port that nothing listens on (a token endpoint that is down).
fn closed_port() -> u16 {
    free_port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_and_mtls_receivers_get_every_event_of_a_100_change_run() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let mtls = MtlsReceiver::start(certs.path()).await;
    let (a, port) = serve(Auth {
        assertion_pub: std::fs::read(certs.path().join("assertion.pub")).unwrap(),
        revoke_after: 5,
        ..Default::default()
    })
    .await;
    let token_url = a.token_url.clone();
    // SAFETY of intent: the daemon reads the client secret from its environment.
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    let base = format!("http://127.0.0.1:{port}");
    let mtls_base = format!("https://127.0.0.1:{}/", mtls.port);
    let dir = certs.path().to_path_buf();
    let (tu, mb) = (token_url.clone(), mtls_base.clone());
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |c| {
            let mut secret = oauth(format!("{base}/secret/"), &tu, "fhir-cdc-secret");
            secret.client_secret_env = Some(SECRET_ENV.into());
            let mut jwt = oauth(format!("{base}/jwt/"), &tu, "fhir-cdc-jwt");
            jwt.private_key_jwt = Some(dir.join("assertion.key"));
            let cert = EndpointAuthConfig {
                prefix: mb,
                kind: EndpointAuthKind::Mtls,
                token_url: None,
                client_id: None,
                client_secret_env: None,
                private_key_jwt: None,
                private_key_alg: None,
                private_key_id: None,
                scope: None,
                cert_file: Some(dir.join("client.crt")),
                key_file: Some(dir.join("client.key")),
                ca_file: Some(dir.join("ca.crt")),
            };
            c.delivery.endpoint_auth = vec![secret, jwt, cert];
        })
        .build()
        .await;
    let api = env.api;
    let _d = env.start().await;

    // The TLS receiver refuses a client without a certificate.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.path().join("ca.crt")).unwrap())
        .unwrap();
    let bare = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    assert!(
        bare.post(&mtls_base).body("{}").send().await.is_err(),
        "no client certificate, no connection"
    );

    let hook = |p: &str| format!("http://127.0.0.1:{port}/{p}/hook");
    let s_secret =
        subscribe_active(api, ENCOUNTER_TOPIC, &hook("secret"), "id-only", json!({})).await;
    let s_jwt = subscribe_active(api, ENCOUNTER_TOPIC, &hook("jwt"), "id-only", json!({})).await;
    let s_mtls = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &format!("{mtls_base}hook"),
        "id-only",
        json!({}),
    )
    .await;

    // 100 changes over about 3 s: tokens (1 s) expire and are fetched again meanwhile.
    let started = Instant::now();
    for i in 0..100 {
        put_encounter(&env.store, &format!("e{i}")).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let all: Vec<i64> = (1..=100).collect();
    wait_until(
        "every event at the three receivers",
        Duration::from_secs(90),
        || async {
            let m: Vec<Value> = mtls.got().into_iter().map(|(_, b)| b).collect();
            numbers(&a.bodies("secret")) == all
                && numbers(&a.bodies("jwt")) == all
                && numbers(&m) == all
        },
    )
    .await;
    assert!(
        started.elapsed() > Duration::from_secs(TOKEN_SECS * 2),
        "the run outlived tokens"
    );
    let issued = a.issued.lock().unwrap().clone();
    assert!(
        issued["fhir-cdc-secret"] >= 2,
        "secret client tokens: {issued:?}"
    );
    assert!(
        issued["fhir-cdc-jwt"] >= 2,
        "private_key_jwt client tokens: {issued:?}"
    );
    assert_eq!(
        a.revoked.lock().unwrap().len(),
        1,
        "one live token was revoked during the run"
    );
    assert!(
        a.unauthorized.load(Ordering::SeqCst) >= 1,
        "the revoked token was refused at least once"
    );
    // The 401s were absorbed by a fresh token: no send counted as failed.
    for id in [&s_secret, &s_jwt, &s_mtls] {
        let st = status(api, id).await;
        assert_eq!(st["status"], "active", "{st}");
        assert!(st.get("error").is_none(), "{st}");
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("fhir_cdc_delivery_failures_total") && !l.ends_with(" 0")),
        "no failed send: {}",
        metrics
            .lines()
            .filter(|l| l.contains("failures"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every request to the TLS receiver carried the client certificate.
    assert!(mtls
        .got()
        .iter()
        .all(|(cn, _)| cn.as_deref() == Some("fhir-cdc")));
    for (id, bodies) in [
        (&s_secret, a.bodies("secret")),
        (&s_jwt, a.bodies("jwt")),
        (&s_mtls, mtls.got().into_iter().map(|(_, b)| b).collect()),
    ] {
        let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
        validate(&bodies, "r5", &["--expect-subscription", &sub]);
    }
    assert!(
        !env.log_text().contains(CLIENT_SECRET),
        "the client secret was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_is_permanent_and_a_token_endpoint_down_is_retried() {
    let (a, port) = serve(Auth {
        revoke_after: usize::MAX,
        ..Default::default()
    })
    .await;
    let token_url = a.token_url.clone();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    std::env::set_var(WRONG_ENV, "not-the-secret");
    let base = format!("http://127.0.0.1:{port}");
    let tu = token_url.clone();
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |c| {
            let mut refused = oauth(format!("{base}/refused/"), &tu, "fhir-cdc-secret");
            refused.client_secret_env = Some(WRONG_ENV.into());
            let mut down = oauth(format!("{base}/down/"), &tu, "fhir-cdc-secret");
            down.client_secret_env = Some(SECRET_ENV.into());
            let mut nowhere = oauth(
                format!("{base}/nowhere/"),
                &format!("http://127.0.0.1:{}/token", closed_port()),
                "fhir-cdc-secret",
            );
            nowhere.client_secret_env = Some(SECRET_ENV.into());
            c.delivery.endpoint_auth = vec![refused, down, nowhere];
        })
        .build()
        .await;
    let api = env.api;
    let _d = env.start().await;
    let hook = |p: &str| format!("http://127.0.0.1:{port}/{p}/hook");

    // A client the token endpoint refuses: its handshake fails for good, with the reason.
    let refused =
        subscribe_with(api, ENCOUNTER_TOPIC, &hook("refused"), "id-only", json!({})).await;
    wait_until("refused in error", Duration::from_secs(30), || async {
        status(api, &refused).await["status"] == "error"
    })
    .await;
    let st = status(api, &refused).await.to_string();
    assert!(
        st.contains("the token endpoint refused the client (HTTP 401): invalid_client"),
        "{st}"
    );

    // A token endpoint that cannot be reached is a connection failure, retried.
    let nowhere =
        subscribe_with(api, ENCOUNTER_TOPIC, &hook("nowhere"), "id-only", json!({})).await;
    wait_until("nowhere failed", Duration::from_secs(30), || async {
        status(api, &nowhere)
            .await
            .to_string()
            .contains("token endpoint")
    })
    .await;

    // Active, then the token endpoint goes down: the event waits (no dead letter) and goes
    // out once it is back.
    let down = subscribe_active(api, ENCOUNTER_TOPIC, &hook("down"), "id-only", json!({})).await;
    a.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(TOKEN_SECS + 1)).await;
    put_encounter(&env.store, "d1").await;
    wait_until(
        "the send failed on the token endpoint",
        Duration::from_secs(30),
        || async {
            let s = status(api, &down).await.to_string();
            s.contains("token endpoint answered HTTP 503")
        },
    )
    .await;
    let dead = dead_letters_cli(&env, &["list", "--subscription", &down]);
    assert!(
        !dead.contains(&down),
        "a retryable failure is not a dead letter: {dead}"
    );
    a.down.store(false, Ordering::SeqCst);
    wait_until(
        "d1 delivered after the token endpoint came back",
        Duration::from_secs(60),
        || async { numbers(&a.bodies("down")) == [1] },
    )
    .await;
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{down}");
    validate(&a.bodies("down"), "r5", &["--expect-subscription", &sub]);
    assert!(!env.log_text().contains(CLIENT_SECRET));
}
