//! `[[destination]]`s against real brokers: NATS with JetStream and RabbitMQ. The servers
//! come from `FHIR_CDC_TEST_NATS_URL` / `FHIR_CDC_TEST_AMQP_URL` (scripts/brokers.sh starts
//! them on a fresh machine) or the local defaults; the restart test runs a `nats-server` of
//! its own. Each test makes its own streams, exchanges and queues and removes them.

use crate::common::*;
use async_nats::jetstream;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fhir_cdc::config::{BrokerKind, DestinationConfig};

/// The variable the daemon reads the AMQP password from (`password_env`).
const AMQP_PASSWORD_ENV: &str = "FHIR_CDC_TEST_AMQP_PASSWORD";

fn nats_url() -> String {
    std::env::var("FHIR_CDC_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The AMQP URL without its password (as a destination takes it) and the password.
fn amqp_url() -> (String, String) {
    let url = std::env::var("FHIR_CDC_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest@127.0.0.1:5672/%2f".into());
    let password = std::env::var(AMQP_PASSWORD_ENV).unwrap_or_else(|_| "guest".into());
    // The daemon is a child process: it inherits this.
    std::env::set_var(AMQP_PASSWORD_ENV, &password);
    (url, password)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        rand::rng().random_range(0..1_000_000u32)
    )
}

fn nats_destination(id: &str, url: &str, subject: &str) -> DestinationConfig {
    toml::from_str(&format!(
        "id = {id:?}\ntopic = {ENCOUNTER_TOPIC:?}\nkind = \"nats\"\nurl = {url:?}\nsubject = {subject:?}\ntimeout = 2\n"
    ))
    .unwrap()
}

fn amqp_destination(id: &str, exchange: &str, routing_key: &str) -> DestinationConfig {
    let (url, _) = amqp_url();
    let mut d: DestinationConfig = toml::from_str(&format!(
        "id = {id:?}\ntopic = {ENCOUNTER_TOPIC:?}\nkind = \"amqp\"\nurl = {url:?}\nexchange = {exchange:?}\nrouting_key = {routing_key:?}\ntimeout = 2\n"
    ))
    .unwrap();
    d.password_env = Some(AMQP_PASSWORD_ENV.into());
    assert_eq!(d.kind, BrokerKind::Amqp);
    d
}

/// A JetStream stream of the test's own covering `subject`, deleted by [`Stream::remove`].
struct Stream {
    js: jetstream::Context,
    name: String,
}

impl Stream {
    async fn create(url: &str, subject: &str) -> Stream {
        let client = async_nats::connect(url)
            .await
            .unwrap_or_else(|e| panic!("NATS at {url} (scripts/brokers.sh starts one): {e}"));
        let js = jetstream::new(client);
        let name = unique("FHIRCDC_");
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.to_string()],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
        Stream { js, name }
    }

    async fn count(&self) -> u64 {
        let mut s = self.js.get_stream(&self.name).await.unwrap();
        s.info().await.unwrap().state.messages
    }

    /// Every message: its Nats-Msg-Id, its Fhir-Event-First header and its body.
    async fn messages(&self) -> Vec<(String, String, Value)> {
        let s = self.js.get_stream(&self.name).await.unwrap();
        let n = self.count().await;
        let mut out = Vec::new();
        for seq in 1..=n {
            let m = s.get_raw_message(seq).await.unwrap();
            let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
            assert_eq!(h("Content-Type"), "application/fhir+json");
            out.push((
                h("Nats-Msg-Id"),
                h("Fhir-Event-First"),
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
        out
    }

    async fn remove(self) {
        let _ = self.js.delete_stream(&self.name).await;
    }
}

/// An exchange of the test's own with one queue bound to `routing_key`.
struct Exchange {
    channel: lapin::Channel,
    name: String,
    queue: String,
}

impl Exchange {
    async fn create(routing_key: &str) -> Exchange {
        let (url, password) = amqp_url();
        let mut u = reqwest::Url::parse(&url).unwrap();
        u.set_password(Some(&password)).unwrap();
        let conn = lapin::Connection::connect(u.as_str(), lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("AMQP at {url} (scripts/brokers.sh starts one): {e}"));
        let channel = conn.create_channel().await.unwrap();
        let name = unique("fhircdc.");
        let queue = format!("{name}.q");
        channel
            .exchange_declare(
                name.clone().into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                queue.clone().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.clone().into(),
                name.clone().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Exchange {
            channel,
            name,
            queue,
        }
    }

    /// Takes every message waiting in the queue: (message_id, Fhir-Event-First, body).
    async fn take(&self) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        let options = BasicGetOptions { no_ack: true };
        while let Some(m) = self
            .channel
            .basic_get(self.queue.clone().into(), options)
            .await
            .unwrap()
        {
            let p = &m.delivery.properties;
            assert_eq!(p.delivery_mode(), &Some(2), "messages are persistent");
            let first = p
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("Fhir-Event-First").cloned())
                .and_then(|v| v.as_long_string().map(|s| s.to_string()))
                .unwrap_or_default();
            out.push((
                p.message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                first,
                serde_json::from_slice(&m.delivery.data).unwrap(),
            ));
        }
        out
    }

    async fn remove(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(self.name.into(), ExchangeDeleteOptions::default())
            .await;
    }
}

fn first_number(body: &Value) -> i64 {
    event_numbers(body)[0]
}

/// 300 Encounters in 300 transactions, a few milliseconds apart.
async fn write_encounters(url: String, from: usize, to: usize) {
    let c = connect_to(&url).await;
    for i in from..to {
        put_encounter(&c, &format!("e{i}")).await;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

async fn connect_to(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_exactly_once_and_amqp_at_least_once_through_a_sigkill() {
    let subject = format!("{}.enc", unique("fhircdc."));
    let stream = Stream::create(&nats_url(), &subject).await;
    let exchange = Exchange::create("encounters").await;
    let nats = nats_destination("enc-nats", &nats_url(), &subject);
    let amqp = amqp_destination("enc-amqp", &exchange.name, "encounters");
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |f| f.destination = vec![nats, amqp])
        .build()
        .await;
    let mut daemon = env.start().await;
    // The point of the kill, seeded so a failure can be replayed.
    let seed: u64 = rand::rng().random();
    let kill_at = rand::rngs::StdRng::seed_from_u64(seed).random_range(20..200u64);
    eprintln!("seed {seed}: SIGKILL once {kill_at} messages are in the stream");
    let writer = tokio::spawn(write_encounters(env.url(), 0, 300));
    wait_until(
        "the stream to fill up to the kill point",
        Duration::from_secs(60),
        || {
            let s = &stream;
            async move { s.count().await >= kill_at }
        },
    )
    .await;
    daemon.kill9();
    let at_kill = stream.count().await;
    assert!(
        at_kill < 300,
        "the kill must land mid-stream ({at_kill} already in)"
    );
    let _daemon = env.start().await;
    writer.await.unwrap();
    for id in ["enc-nats", "enc-amqp"] {
        wait_until(
            &format!("{id} to report 300 events"),
            Duration::from_secs(60),
            || {
                let api = env.api;
                async move { status(api, id).await["eventsSinceSubscriptionStart"] == "300" }
            },
        )
        .await;
    }

    // JetStream: 1..300, once each, in order; the id names the destination and number.
    let stored = stream.messages().await;
    let numbers: Vec<i64> = stored.iter().map(|(_, _, b)| first_number(b)).collect();
    assert_eq!(
        numbers,
        (1..=300).collect::<Vec<_>>(),
        "JetStream holds each event once, in order"
    );
    for (id, first, body) in &stored {
        assert_eq!(id, &format!("enc-nats:{}", first_number(body)));
        assert_eq!(first, &first_number(body).to_string());
    }
    let bodies: Vec<Value> = stored.into_iter().map(|(_, _, b)| b).collect();
    validate(
        &bodies,
        "r5",
        &["--content", "id-only", "--sequence", "strict"],
    );

    // RabbitMQ: every number; first arrivals in order; a repeat has the same message id.
    let got = exchange.take().await;
    let mut seen = HashSet::new();
    let mut firsts = Vec::new();
    for (id, first, body) in &got {
        let n = first_number(body);
        assert_eq!(
            id,
            &format!("enc-amqp:{n}"),
            "a repeat carries the same message id"
        );
        assert_eq!(first, &n.to_string());
        if seen.insert(n) {
            firsts.push(n);
        }
    }
    assert_eq!(
        firsts,
        (1..=300).collect::<Vec<_>>(),
        "first arrivals in eventNumber order"
    );
    eprintln!("AMQP: {} messages for 300 events", got.len());
    let bodies: Vec<Value> = got.into_iter().map(|(_, _, b)| b).collect();
    validate(&bodies, "r5", &["--content", "id-only"]);
    stream.remove().await;
    exchange.remove().await;
}

/// A `nats-server -js` of the test's own, on a free port, storing in a directory that
/// survives its restarts.
struct OwnNats {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnNats {
    fn start() -> OwnNats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, dir.path());
        OwnNats { child, port, dir }
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        let bin = [
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
        ]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("nats-server is installed (scripts/brokers.sh installs it)");
        Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server")
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(self.port, self.dir.path());
    }

    async fn ready(&self) {
        wait_until(
            "nats-server to accept connections",
            Duration::from_secs(20),
            || {
                let url = self.url();
                async move { async_nats::connect(url).await.is_ok() }
            },
        )
        .await;
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_while_events_flow_loses_nothing() {
    let mut server = OwnNats::start();
    server.ready().await;
    let subject = "fhircdc.restart.enc";
    let stream = Stream::create(&server.url(), subject).await;
    let nats = nats_destination("enc-restart", &server.url(), subject);
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |f| f.destination = vec![nats])
        .build()
        .await;
    let _daemon = env.start().await;
    write_encounters(env.url(), 0, 50).await;
    wait_until(
        "the first events in the stream",
        Duration::from_secs(60),
        || {
            let s = &stream;
            async move { s.count().await >= 50 }
        },
    )
    .await;
    server.stop();
    // Events keep coming while the broker is away; sends fail and are retried. (A writer
    // running beside the first sends could finish before the stop on a slow machine.)
    let writer = tokio::spawn(write_encounters(env.url(), 50, 150));
    let q = env.client().await;
    wait_until(
        "events waiting while the broker is down",
        Duration::from_secs(30),
        || {
            let q = &q;
            async move { pending_events(q).await > 0 }
        },
    )
    .await;
    server.restart();
    server.ready().await;
    writer.await.unwrap();
    wait_until("150 events in the stream", Duration::from_secs(90), || {
        let s = &stream;
        async move { s.count().await >= 150 }
    })
    .await;
    wait_settled(&env).await;
    let stored = stream.messages().await;
    let numbers: Vec<i64> = stored.iter().map(|(_, _, b)| first_number(b)).collect();
    assert_eq!(
        numbers,
        (1..=150).collect::<Vec<_>>(),
        "nothing lost, nothing twice, in order"
    );
    let bodies: Vec<Value> = stored.into_iter().map(|(_, _, b)| b).collect();
    validate(&bodies, "r5", &["--content", "id-only"]);
    stream.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_stream_or_exchange_puts_the_destination_in_error() {
    let no_stream = nats_destination(
        "no-stream",
        &nats_url(),
        &format!("{}.x", unique("nostream.")),
    );
    let no_exchange = amqp_destination("no-exchange", &unique("noexchange."), "x");
    // An exchange that exists but routes nowhere: the mandatory message comes back.
    let unrouted = Exchange::create("bound-key").await;
    let no_queue = amqp_destination("no-queue", &unrouted.name, "other-key");
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |f| f.destination = vec![no_stream, no_exchange, no_queue])
        .build()
        .await;
    let check = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "{said}");
    assert!(
        said.contains("FIX   destination no-stream: no JetStream stream covers subject"),
        "{said}"
    );
    assert!(
        said.contains("FIX   destination no-exchange:") && said.contains("does not exist"),
        "{said}"
    );
    assert!(said.contains("ok    destination no-queue"), "{said}");
    let _daemon = env.start().await;
    put_encounter(&env.store, "e1").await;
    for (id, reason) in [
        ("no-stream", "no JetStream stream covers subject"),
        ("no-exchange", "does not exist"),
        ("no-queue", "returned the message"),
    ] {
        wait_until(&format!("{id} in error"), Duration::from_secs(30), || {
            let api = env.api;
            async move { status(api, id).await["status"] == "error" }
        })
        .await;
        let st = status(env.api, id).await;
        let text = st["error"].to_string();
        assert!(text.contains(reason), "{id}: {st}");
    }
    let dead = dead_letters_cli(&env, &["list"]);
    assert!(
        dead.contains("no-stream"),
        "the refused event is a dead letter: {dead}"
    );
    unrouted.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_destination_keeps_its_position_and_a_removed_one_turns_off() {
    let subject = format!("{}.enc", unique("fhircdc."));
    let stream = Stream::create(&nats_url(), &subject).await;
    let nats = nats_destination("enc-keep", &nats_url(), &subject);
    let mut env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |f| f.destination = vec![nats])
        .build()
        .await;
    let mut daemon = env.start().await;
    write_encounters(env.url(), 0, 5).await;
    wait_until("5 in the stream", Duration::from_secs(30), || {
        let s = &stream;
        async move { s.count().await >= 5 }
    })
    .await;

    // A client cannot take over or remove the operator's destination.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/Subscription/enc-keep", env.api);
    let mut resource: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(resource["channelType"]["code"], "nats");
    assert_eq!(resource["endpoint"], nats_url());
    resource["channelType"]["code"] = "rest-hook".into();
    resource["endpoint"] = env.rx.url("hijack").into();
    let put = http.put(&url).json(&resource).send().await.unwrap();
    assert_eq!(put.status(), 422);
    assert_eq!(http.delete(&url).send().await.unwrap().status(), 422);
    let mut post = resource.clone();
    post.as_object_mut().unwrap().remove("id");
    post["channelType"]["code"] = "nats".into();
    post["endpoint"] = nats_url().into();
    let created = http
        .post(format!("http://127.0.0.1:{}/Subscription", env.api))
        .json(&post)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 422, "brokers are operator-owned");

    // Changed in the file (more per message): same id, numbering goes on from 6.
    daemon.kill9();
    env.edit(|f| f.destination[0].max_count = 2);
    let mut daemon = env.start().await;
    write_encounters(env.url(), 5, 9).await;
    wait_until("9 events reported", Duration::from_secs(30), || {
        let api = env.api;
        async move { status(api, "enc-keep").await["eventsSinceSubscriptionStart"] == "9" }
    })
    .await;
    let stored = stream.messages().await;
    let numbers: Vec<i64> = stored
        .iter()
        .flat_map(|(_, _, b)| event_numbers(b))
        .collect();
    assert_eq!(numbers, (1..=9).collect::<Vec<_>>());

    // Removed from the file: off, with its history; later events do not go out.
    daemon.kill9();
    env.edit(|f| f.destination.clear());
    let _daemon = env.start().await;
    wait_until("enc-keep off", Duration::from_secs(30), || {
        let api = env.api;
        async move { status(api, "enc-keep").await["status"] == "off" }
    })
    .await;
    let before = stream.count().await;
    write_encounters(env.url(), 9, 12).await;
    wait_settled(&env).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stream.count().await,
        before,
        "an off destination publishes nothing"
    );
    let kept: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(
        kept["status"], "off",
        "the subscription and its history stay: {kept}"
    );
    stream.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_can_ask_for_a_handshake_and_heartbeats() {
    let subject = format!("{}.enc", unique("fhircdc."));
    let stream = Stream::create(&nats_url(), &subject).await;
    let mut nats = nats_destination("enc-hb", &nats_url(), &subject);
    nats.handshake = true;
    nats.heartbeat_period = Some(1);
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(move |f| f.destination = vec![nats])
        .build()
        .await;
    let _daemon = env.start().await;
    wait_until("handshake, then active", Duration::from_secs(30), || {
        let api = env.api;
        async move { status(api, "enc-hb").await["status"] == "active" }
    })
    .await;
    put_encounter(&env.store, "e1").await;
    wait_until(
        "a heartbeat after the event",
        Duration::from_secs(30),
        || {
            let s = &stream;
            async move {
                let types: Vec<String> = s
                    .messages()
                    .await
                    .iter()
                    .map(|m| {
                        m.2["entry"][0]["resource"]["type"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string()
                    })
                    .collect();
                types
                    .iter()
                    .skip_while(|t| *t != "event-notification")
                    .any(|t| t == "heartbeat")
            }
        },
    )
    .await;
    let stored = stream.messages().await;
    let types: Vec<&str> = stored
        .iter()
        .map(|m| {
            m.2["entry"][0]["resource"]["type"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(types[0], "handshake", "{types:?}");
    for (id, _, body) in &stored {
        let kind = body["entry"][0]["resource"]["type"]
            .as_str()
            .unwrap_or_default();
        if kind == "event-notification" {
            assert_eq!(id, "enc-hb:1");
        } else {
            assert!(id.starts_with(&format!("enc-hb:{kind}:")), "{id}");
        }
    }
    let bodies: Vec<Value> = stored.into_iter().map(|(_, _, b)| b).collect();
    validate(&bodies, "r5", &["--content", "id-only"]);
    stream.remove().await;
}
