//! Test harness: a throwaway Postgres cluster with wal_level=logical, an Aidbox-style store,
//! a real webhook receiver, the daemon as a child process, and the conformance validator.
#![allow(dead_code)]

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub use fhir_cdc::config::ConfigFile;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Postgres cluster of its own, stopped and removed on drop.
pub struct Pg {
    pub dir: String,
    pub port: u16,
    pub bin: String,
}

impl Pg {
    pub fn start() -> Pg {
        Self::start_with(&[])
    }

    /// One cluster for all tests of this test binary that do not crash Postgres; each
    /// [`TestEnv`] gets a database and a slot of its own in it. A watcher started by
    /// `pg-cluster.sh` stops it when this process exits.
    pub fn shared() -> Arc<Pg> {
        static SHARED: std::sync::OnceLock<Arc<Pg>> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| Arc::new(Self::start_with(&[&std::process::id().to_string()])))
            .clone()
    }

    fn start_with(args: &[&str]) -> Pg {
        let out = Command::new(repo().join("scripts/pg-cluster.sh"))
            .arg("start")
            .args(args)
            .output()
            .expect("run scripts/pg-cluster.sh");
        assert!(
            out.status.success(),
            "pg-cluster.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            s.split(';')
                .find_map(|p| p.trim().strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_else(|| panic!("{k} missing in {s}"))
        };
        Pg {
            dir: get("PGDATA_DIR"),
            port: get("PGPORT").parse().unwrap(),
            bin: get("PG_BIN"),
        }
    }

    /// Crashes the server (immediate stop), waits `pause`, starts it again.
    pub fn restart(&self, pause: Duration) {
        let st = Command::new(repo().join("scripts/pg-cluster.sh"))
            .args(["restart", &self.dir, &pause.as_secs().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "pg-cluster.sh restart failed");
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub async fn client(&self, db: &str) -> Client {
        let (c, conn) = tokio_postgres::connect(&self.url(db), NoTls)
            .await
            .expect("connect to test cluster");
        tokio::spawn(conn);
        c
    }

    /// Creates database `fhir` with the Aidbox-style store of `scripts/aidbox-store.sql`.
    pub async fn aidbox_store(&self) -> Client {
        self.create_db("fhir", Layout::Aidbox).await
    }

    /// Creates database `db`, with the store tables of `layout`.
    pub async fn create_db(&self, db: &str, layout: Layout) -> Client {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let c = self.client(db).await;
        if layout == Layout::Aidbox {
            let sql = std::fs::read_to_string(repo().join("scripts/aidbox-store.sql")).unwrap();
            c.batch_execute(&sql).await.unwrap();
        }
        c
    }

    /// Runs SQL with psql (for destructors, which cannot await).
    fn psql(&self, db: &str, sql: &str) -> bool {
        Command::new(format!("{}/psql", self.bin))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// The store tables a test database starts with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// `scripts/aidbox-store.sql`.
    Aidbox,
    /// No tables: the test creates its own (generic profile).
    Empty,
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/pg-cluster.sh"))
            .args(["stop", &self.dir])
            .status();
    }
}

/// One received HTTP request.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub hook: String,
    pub body: Value,
    /// The body exactly as it arrived (signatures are over these bytes).
    pub raw: String,
    pub headers: HashMap<String, String>,
}

/// A webhook receiver at `http://127.0.0.1:{port}/hook/{name}` that records what it gets and
/// answers with the status set for that name (200 by default; 0 hangs for 30 s).
#[derive(Clone)]
pub struct Receiver {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Received>>>,
    pub answers: Arc<Mutex<HashMap<String, u16>>>,
    /// `Retry-After` seconds sent with non-2xx answers, by name.
    pub retry_after: Arc<Mutex<HashMap<String, u64>>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let r = Receiver {
            port: 0,
            got: Arc::default(),
            answers: Arc::default(),
            retry_after: Arc::default(),
        };
        let app = Router::new()
            .route("/hook/{name}", post(hook))
            .with_state(r.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await });
        Receiver { port, ..r }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/hook/{name}", self.port)
    }

    pub fn answer(&self, name: &str, status: u16) {
        self.answers.lock().unwrap().insert(name.into(), status);
    }

    pub fn bodies(&self, name: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.hook == name)
            .map(|r| r.body.clone())
            .collect()
    }

    /// Event notifications only (no handshakes), in arrival order.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.bodies(name)
            .into_iter()
            .filter(|b| status_of(b)["type"] == "event-notification")
            .collect()
    }

    /// Arrival times and bodies for one hook.
    pub fn timed(&self, name: &str) -> Vec<(Instant, Value)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.hook == name)
            .map(|r| (r.at, r.body.clone()))
            .collect()
    }

    pub fn all(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }
}

async fn hook(
    State(r): State<Receiver>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = r.answers.lock().unwrap().get(&name).copied().unwrap_or(200);
    if status == 0 {
        // "Hang": answer long after any sensible timeout.
        tokio::time::sleep(Duration::from_secs(30)).await;
        return StatusCode::OK.into_response();
    }
    let retry_after = r.retry_after.lock().unwrap().get(&name).copied();
    let raw = body.clone();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    let headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    r.got.lock().unwrap().push(Received {
        at: Instant::now(),
        hook: name,
        body,
        raw,
        headers,
    });
    let status = StatusCode::from_u16(status).unwrap();
    match retry_after {
        Some(secs) if !status.is_success() => {
            (status, [("retry-after", secs.to_string())]).into_response()
        }
        _ => status.into_response(),
    }
}

/// The SubscriptionStatus of a notification Bundle.
pub fn status_of(bundle: &Value) -> &Value {
    &bundle["entry"][0]["resource"]
}

/// Event numbers of a notification.
pub fn event_numbers(bundle: &Value) -> Vec<i64> {
    status_of(bundle)["notificationEvent"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["eventNumber"].as_str().unwrap().parse().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The daemon as a child process; SIGKILLed on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Daemon {
    pub fn start(config: &FsPath, log: &FsPath) -> Daemon {
        Self::start_cmd("run", config, log)
    }

    pub fn start_cmd(cmd: &str, config: &FsPath, log: &FsPath) -> Daemon {
        Self::start_args(&[cmd], config, log)
    }

    /// `fhir-cdc ARGS… --config CONFIG`.
    pub fn start_args(args: &[&str], config: &FsPath, log: &FsPath) -> Daemon {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env("FHIR_CDC_LOG", "info,fhir_cdc=debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn fhir-cdc");
        Daemon {
            child,
            log: log.to_path_buf(),
            config: config.to_path_buf(),
        }
    }

    /// SIGKILL: no chance to flush or confirm anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until its API on `port` answers `/readyz` (capture streaming), as [`wait_api`]
    /// does; when it exits first or is not ready within 60 s, the panic carries the end of
    /// its log, so a failure says why rather than only that it timed out.
    pub async fn wait_ready(&mut self, port: u16) {
        let http = reqwest::Client::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let url = format!("http://127.0.0.1:{port}/readyz");
            if http
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the daemon exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "timed out after 60s waiting for the daemon to be ready:\n{}",
            self.log_tail()
        );
    }

    /// The last 40 lines of its log.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (60 s at most) until the process exited on its own; whether it succeeded.
    pub async fn exited(&mut self) -> bool {
        let child = &mut self.child;
        wait_until("the process exited", Duration::from_secs(60), || {
            let gone = child.try_wait().unwrap().is_some();
            async move { gone }
        })
        .await;
        self.child.wait().unwrap().success()
    }
}

/// Runs `c`, which must succeed; its stdout, trimmed.
pub fn stdout_of(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `toml` and the topic files it names into `dir`.
pub fn write_file(dir: &FsPath, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits until no active subscription has an event waiting after its cursor, so a kill
/// that follows cannot cause a resend (at-least-once delivery resends what was sent but not
/// yet recorded as delivered). Waiting events are matched with each subscription's filters,
/// as delivery matches them.
pub async fn wait_settled(env: &TestEnv) {
    let q = env.client().await;
    wait_until("no pending events", Duration::from_secs(60), || {
        let q = &q;
        async move { pending_events(q).await == 0 }
    })
    .await;
}

/// Events waiting after the cursors of the active subscriptions, summed.
pub async fn pending_events(q: &Client) -> i64 {
    let rows = fhir_cdc::queue::subscriptions::search(q, Some("active"), None)
        .await
        .unwrap();
    let mut n = 0;
    for r in rows {
        n += fhir_cdc::queue::matched::count_pending(q, &r.track())
            .await
            .unwrap();
    }
    n
}

/// Waits until the daemon is ready: API up and capture streaming.
pub async fn wait_api(port: u16) {
    let http = reqwest::Client::new();
    wait_until("the daemon to be ready", Duration::from_secs(60), || {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
}

/// Runs the official validator over `bundles`; panics with its report when any fails.
///
/// validate.py runs unchanged, through `tests/conformance/validate_parse_once.py`, which
/// parses each FHIRPath invariant once instead of once per Bundle (about 7× faster; half of
/// the suite's time was the validator re-parsing the same dozen expressions).
/// `conformance::parsing_each_invariant_once_changes_no_report` shows the reports are the
/// same. R4 runs in the R4 environment (fhir.resources 6.4.0), where validate.py would
/// otherwise re-execute itself.
pub fn validate(bundles: &[Value], fhir: &str, extra: &[&str]) {
    assert!(!bundles.is_empty(), "nothing to validate");
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let mut f = std::fs::File::create(tmp.path()).unwrap();
    for b in bundles {
        writeln!(f, "{}", serde_json::to_string(b).unwrap()).unwrap();
    }
    let (r5, r4) = validator_pythons();
    let python = if fhir == "r4" { r4 } else { r5 };
    let out = Command::new(python)
        .arg(repo().join("tests/conformance/validate_parse_once.py"))
        .arg(validate_py())
        .args(["--fhir", fhir])
        .args(extra)
        .arg(tmp.path())
        .env("VALIDATE_PY_NO_REEXEC", "1")
        .output()
        .expect("run validate.py");
    assert!(
        out.status.success(),
        "validate.py --fhir {fhir} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `../shared/conformance/validate.py`.
pub fn validate_py() -> PathBuf {
    repo().join("../shared/conformance/validate.py")
}

/// The validator's Python for R5/R4B and for R4 (`conformance/setup.sh` makes both, once;
/// scripts/test.sh exports `FHIR_VALIDATOR_DIR`).
pub fn validator_pythons() -> (String, String) {
    let dir = match std::env::var("FHIR_VALIDATOR_DIR") {
        Ok(d) => d,
        Err(_) => {
            let mut c = Command::new("bash");
            c.arg(repo().join("../shared/conformance/setup.sh"));
            stdout_of(c, "conformance/setup.sh")
        }
    };
    (
        format!("{dir}/venv/bin/python"),
        format!("{dir}/venv-r4/bin/python"),
    )
}

/// POSTs an R5 Subscription; returns its id.
pub async fn subscribe(api_port: u16, topic: &str, endpoint: &str, content: &str) -> String {
    subscribe_with(api_port, topic, endpoint, content, serde_json::json!({})).await
}

/// POSTs an R5 Subscription with `extra` fields (heartbeatPeriod, maxCount, end, …).
pub async fn subscribe_with(
    api_port: u16,
    topic: &str,
    endpoint: &str,
    content: &str,
    extra: Value,
) -> String {
    let mut body = serde_json::json!({
        "resourceType": "Subscription",
        "status": "requested",
        "topic": topic,
        "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "rest-hook"},
        "endpoint": endpoint,
        "content": content,
        "contentType": "application/fhir+json",
        "parameter": [{"name": "X-Test", "value": "yes"}]
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/Subscription"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// GETs a Subscription's status resource from `$status`.
pub async fn status(api_port: u16, id: &str) -> Value {
    let v: Value = reqwest::get(format!(
        "http://127.0.0.1:{api_port}/Subscription/{id}/$status"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    v["entry"][0]["resource"].clone()
}

/// The config every test starts from; tests change it through [`ConfigFile`]'s fields.
fn base_config(url: &str, api_port: u16, slot: &str, topics: &str) -> ConfigFile {
    let text = format!(
        r#"[source]
url = "{url}"
profile = "aidbox"
fhir_version = "R5"
slot = "{slot}"
publication = "fhir_cdc"

[queue]
flush_ms = 10

[api]
listen = "127.0.0.1:{api_port}"
base_url = "http://fhir-cdc.test/fhir"

[delivery]
allow_private_endpoints = true
require_https_for_full_resource = false
retry_initial_ms = 100
retry_max_ms = 1000
timeout_secs = 5

{topics}
"#
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("test config does not parse: {e}\n{text}"))
}

type Edit = Box<dyn FnOnce(&mut ConfigFile) + Send>;

/// Builds a [`TestEnv`]: which cluster, which store tables, which config.
pub struct EnvBuilder {
    layout: Layout,
    topics: String,
    own_cluster: bool,
    edits: Vec<Edit>,
}

impl EnvBuilder {
    /// A cluster of the test's own, for tests that crash or restart Postgres.
    pub fn own_cluster(mut self) -> Self {
        self.own_cluster = true;
        self
    }

    /// Changes the config before it is written.
    pub fn config(mut self, f: impl FnOnce(&mut ConfigFile) + Send + 'static) -> Self {
        self.edits.push(Box::new(f));
        self
    }

    pub async fn build(self) -> TestEnv {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (pg, shared) = if self.own_cluster {
            (Arc::new(Pg::start()), false)
        } else {
            (Pg::shared(), true)
        };
        let db = format!("fhir_{n}");
        let slot = format!("fhir_cdc_{n}");
        let store = pg.create_db(&db, self.layout).await;
        let dir = tempfile::tempdir().unwrap();
        let api = free_port();
        let mut file = base_config(&pg.url(&db), api, &slot, &self.topics);
        for edit in self.edits {
            edit(&mut file);
        }
        let env = TestEnv {
            rx: Receiver::start().await,
            config: dir.path().join("c.toml"),
            log: dir.path().join("log"),
            pg,
            shared,
            db,
            slot,
            store,
            dir,
            api,
            file,
        };
        env.write_config();
        env
    }
}

/// One test's world: a database (with its own slot) in a cluster, a webhook receiver, a
/// config file, and the daemon when started. The database and slot go away on drop.
pub struct TestEnv {
    pub pg: Arc<Pg>,
    shared: bool,
    pub db: String,
    pub slot: String,
    /// A connection to the store (and queue) database.
    pub store: Client,
    pub rx: Receiver,
    pub dir: tempfile::TempDir,
    pub api: u16,
    /// The config as written to `config`; change it with [`TestEnv::edit`].
    pub file: ConfigFile,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl TestEnv {
    /// An Aidbox-style store with `topics` (TOML `[[topic]]` entries).
    pub fn aidbox(topics: &str) -> EnvBuilder {
        EnvBuilder {
            layout: Layout::Aidbox,
            topics: topics.to_string(),
            own_cluster: false,
            edits: Vec::new(),
        }
    }

    /// A database without tables: the test creates the store it needs.
    pub fn empty(topics: &str) -> EnvBuilder {
        EnvBuilder {
            layout: Layout::Empty,
            ..Self::aidbox(topics)
        }
    }

    pub fn url(&self) -> String {
        self.pg.url(&self.db)
    }

    /// A new connection to the test's database.
    pub async fn client(&self) -> Client {
        self.pg.client(&self.db).await
    }

    pub fn write_config(&self) {
        let text = toml::to_string(&self.file).expect("config serialises");
        write_file(self.dir.path(), "c.toml", &text);
    }

    /// Changes the config and writes it again (for the next daemon start).
    pub fn edit(&mut self, f: impl FnOnce(&mut ConfigFile)) {
        f(&mut self.file);
        self.write_config();
    }

    /// The config written to another file, for commands that should see a variant.
    pub fn config_variant(&self, name: &str, f: impl FnOnce(&mut ConfigFile)) -> PathBuf {
        let mut file = self.file.clone();
        f(&mut file);
        write_file(self.dir.path(), name, &toml::to_string(&file).unwrap())
    }

    /// `fhir-cdc run`, waited for until the API is ready and capture streams.
    pub async fn start(&self) -> Daemon {
        let mut d = self.spawn("run");
        d.wait_ready(self.api).await;
        d
    }

    /// The daemon with `cmd` (`run`, `capture`, `deliver`), not waited for.
    pub fn spawn(&self, cmd: &str) -> Daemon {
        Daemon::start_cmd(cmd, &self.config, &self.log)
    }

    /// The daemon with arguments (`["run", "--resync-from-now"]`), not waited for.
    pub fn spawn_args(&self, args: &[&str]) -> Daemon {
        Daemon::start_args(args, &self.config, &self.log)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !self.shared {
            return;
        }
        // The daemon is gone (declared after the env, dropped before it); its walsender
        // may take a moment to release the slot.
        let drop_slot = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{}'",
            self.slot
        );
        for _ in 0..50 {
            if self.pg.psql("postgres", &drop_slot) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.pg.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db),
        );
    }
}

/// `[[topic]]` entries from TOML text, for a config's `topic` list.
pub fn topics(toml_text: &str) -> Vec<fhir_cdc::config::TopicEntry> {
    #[derive(serde::Deserialize)]
    struct Topics {
        #[serde(default)]
        topic: Vec<fhir_cdc::config::TopicEntry>,
    }
    toml::from_str::<Topics>(toml_text)
        .expect("topic TOML parses")
        .topic
}

/// `"R4"`, `"R4B"`, `"R5"` as the config's FHIR version.
pub fn fhir_version(v: &str) -> fhir_cdc::fhir::FhirVersion {
    toml::Value::String(v.to_string())
        .try_into()
        .unwrap_or_else(|e| panic!("{v} is not a FHIR version: {e}"))
}

/// Waits until capture has added `table` (schema public) to the publication.
pub async fn wait_published(store: &Client, table: &str) {
    wait_until(
        &format!("{table} in the publication"),
        Duration::from_secs(30),
        || async {
            store
                .query_opt(
                    "SELECT 1 FROM pg_publication_tables WHERE pubname = 'fhir_cdc'
                 AND schemaname = 'public' AND tablename = $1",
                    &[&table],
                )
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
}

/// POSTs an R5 Subscription with `extra` fields and waits until its handshake made it
/// active; returns its id.
pub async fn subscribe_active(
    api_port: u16,
    topic: &str,
    endpoint: &str,
    content: &str,
    extra: Value,
) -> String {
    let id = subscribe_with(api_port, topic, endpoint, content, extra).await;
    wait_until(
        "the subscription active",
        Duration::from_secs(30),
        || async { status(api_port, &id).await["status"] == "active" },
    )
    .await;
    id
}

/// The tables publication `fhir_cdc` names (table names, sorted).
pub async fn published_tables(store: &Client) -> Vec<String> {
    let mut t: Vec<String> = store
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'fhir_cdc'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    t.sort();
    t
}

/// The path of a workload file made by `scripts/workload.sh` (gen.py; cached per machine):
/// `["5000", "7"]` for writes, `["3000", "7", "resources"]` for resources.
pub fn workload_file(args: &[&str]) -> String {
    let mut c = Command::new(repo().join("scripts/workload.sh"));
    c.args(args);
    stdout_of(c, "scripts/workload.sh")
}

/// The topic most tests subscribe to: every Encounter create, update and delete.
pub const ENCOUNTER_TOPIC: &str = "http://fhir-cdc.test/topic/encounter-all";
/// [`ENCOUNTER_TOPIC`] as the config's `[[topic]]` table.
pub const ENCOUNTER_TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter-all"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update", "delete"] }]
"#;

/// Runs `openssl ARGS` in `dir` (certificates and keys the tests make); it must succeed.
pub fn openssl(dir: &FsPath, args: &[&str]) {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    stdout_of(c, &format!("openssl {args:?}"));
}

/// Writes `body` as resource `rtype/id` into the Aidbox-style store, as the store's own
/// `aidbox_put` does (`scripts/aidbox-store.sql`).
pub async fn aidbox_put(store: &Client, rtype: &str, id: &str, body: &Value) {
    store
        .execute("SELECT aidbox_put($1, $2, $3)", &[&rtype, &id, body])
        .await
        .unwrap();
}

/// Deletes resource `rtype/id` from the Aidbox-style store, as the store's own
/// `aidbox_delete` does.
pub async fn aidbox_delete(store: &Client, rtype: &str, id: &str) {
    store
        .execute("SELECT aidbox_delete($1, $2)", &[&rtype, &id])
        .await
        .unwrap();
}

/// Writes an in-progress Encounter `id` into the Aidbox-style store.
pub async fn put_encounter(store: &Client, id: &str) {
    let body = serde_json::json!({"resourceType": "Encounter", "status": "in-progress", "class": [{"coding": [{"code": "AMB"}]}]});
    aidbox_put(store, "Encounter", id, &body).await;
}

/// `fhir-cdc dead-letters ARGS` against the test's config; its stdout (it must succeed).
pub fn dead_letters_cli(env: &TestEnv, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["dead-letters", "--config"])
        .arg(&env.config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
