//! TLS to Postgres on every connection: a cluster that refuses unencrypted connections, a
//! certificate made here, and `sslmode=verify-full` — capture (replication), the queue, the
//! LISTEN connection, delivery and the API all work; a wrong CA stops the daemon and says why.

use crate::common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
"#;

/// A CA named `name` (`name.crt`, `name.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
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
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    dir.join(format!("{name}.crt"))
}

/// `server.crt` / `server.key` for `localhost`, signed by CA `ca`.
fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// Turns TLS on in the cluster and refuses every unencrypted TCP connection.
async fn require_tls(env: &TestEnv, certs: &Path) {
    let data = Path::new(&env.pg.dir).join("data");
    for f in ["server.crt", "server.key"] {
        std::fs::copy(certs.join(f), data.join(f)).unwrap();
    }
    let st = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "chmod 600 '{d}/server.key' && if [ \"$(id -u)\" = 0 ]; then chown postgres: '{d}/server.crt' '{d}/server.key'; fi",
            d = data.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    use std::io::Write;
    writeln!(
        conf,
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
    )
    .unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\nhostnossl all all all reject\n",
    )
    .unwrap();
    env.store
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    // The reload is asynchronous: wait until a plain connection is refused.
    wait_until(
        "the cluster refusing unencrypted connections",
        Duration::from_secs(20),
        || async {
            tokio_postgres::connect(&env.url(), tokio_postgres::NoTls)
                .await
                .is_err()
        },
    )
    .await;
}

fn tls_url(env: &TestEnv, ca: &Path) -> String {
    format!(
        "postgresql://postgres@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
        env.pg.port,
        env.db,
        ca.display()
    )
}

/// TCP connections the server sees without TLS and with it (replication among them), apart
/// from the test's own `store` connection, opened before TLS was required.
async fn daemon_connections(c: &tokio_postgres::Client, env: &TestEnv) -> (i64, i64, i64) {
    let own: i32 = env
        .store
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT s.ssl),
                    count(*) FILTER (WHERE s.ssl),
                    count(*) FILTER (WHERE s.ssl AND a.backend_type = 'walsender')
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.pid NOT IN (pg_backend_pid(), $1) AND a.client_addr IS NOT NULL",
            &[&own],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_runs_over_verified_tls_and_a_wrong_ca_stops_with_a_clear_error() {
    let mut env = TestEnv::aidbox(TOPICS).own_cluster().build().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    let wrong_ca = make_ca(certs.path(), "other-ca");
    make_server_cert(certs.path(), "ca");
    require_tls(&env, certs.path()).await;
    let url = tls_url(&env, &ca);
    env.edit(|c| c.source.url = url.clone());

    let d = env.start().await;
    let id = subscribe_active(
        env.api,
        "http://fhir-cdc.test/topic/encounter",
        &env.rx.url("tls"),
        "full-resource",
        json!({}),
    )
    .await;
    // The test's own writes also go through the daemon's TLS code.
    let writer = fhir_cdc::db::connect(&url).await.expect("TLS connect");
    aidbox_put(&writer, "Encounter", "e-tls", &json!({"status": "planned"})).await;
    wait_until("the notification", Duration::from_secs(30), || async {
        env.rx.events("tls").len() == 1
    })
    .await;
    let bundles = env.rx.bodies("tls");
    validate(&bundles, "r5", &[]);
    let event = &env.rx.events("tls")[0];
    assert_eq!(
        status_of(event)["notificationEvent"][0]["focus"]["reference"],
        "http://fhir-cdc.test/fhir/Encounter/e-tls",
        "{id}"
    );
    assert_eq!(
        event["entry"][1]["resource"]["id"], "e-tls",
        "the resource read over TLS"
    );
    let (plain, tls, walsenders) = daemon_connections(&writer, &env).await;
    assert_eq!(plain, 0, "a connection without TLS");
    assert_eq!(walsenders, 1, "replication over TLS");
    assert!(
        tls >= 3,
        "queue, LISTEN and store connections over TLS: {tls}"
    );
    drop(d);

    // The same daemon trusting another CA: a clear, fatal error, not endless retries.
    let bad = env.config_variant("wrong-ca.toml", |c| {
        c.source.url = url.replace(&ca.display().to_string(), &wrong_ca.display().to_string())
    });
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("certificate"),
        "check names the certificate: {text}"
    );
    let mut run = Daemon::start_args(&["run"], &bad, &env.dir.path().join("bad.log"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = run.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon kept running with an untrusted server certificate: {}",
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success());
    let log = run.log_text();
    assert!(
        log.contains("certificate") && log.contains("UnknownIssuer"),
        "the log says the certificate is not trusted: {log}"
    );
}
