//! scripts/bench.sh's broker helper: makes and removes the bench's JetStream stream and
//! RabbitMQ exchange and queues, counts what they hold, and measures the physical limit the
//! daemon's figures stand beside: one publisher sending notification-sized messages one at a
//! time, each waiting for its acknowledgement (the JetStream publish ack, the AMQP publisher
//! confirm), as a destination's ordered sends do.
//!
//!   bench_broker nats-setup URL N        stream BENCH over bench.* (bench.d0 … bench.d{N-1})
//!   bench_broker nats-count URL          messages in BENCH
//!   bench_broker nats-teardown URL
//!   bench_broker nats-wait URL N WANT    waits for the first message and for WANT; prints
//!                                        "FIRST_EPOCH_S COUNT_AT_FIRST LAST_EPOCH_S COUNT"
//!   bench_broker nats-plain URL COUNT    acked publishes/s to benchplain.x (its own stream)
//!   bench_broker amqp-setup URL N        exchange fhircdc.bench, queues bench.d{i} bound by key d{i}
//!   bench_broker amqp-count URL N        messages in the N queues
//!   bench_broker amqp-teardown URL N
//!   bench_broker amqp-wait URL N WANT    as nats-wait, over the N queues
//!   bench_broker amqp-plain URL COUNT    confirmed publishes/s to queue bench.plain
//!
//! AMQP URLs carry the password here (a bench, not a destination).

// Benchmarks, examples and tests may unwrap (a panic there is a failed run, not a daemon),
// and their `pub` items are for their own modules.
#![allow(clippy::unwrap_used, unreachable_pub)]

use async_nats::jetstream;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

const STREAM: &str = "BENCH";
const EXCHANGE: &str = "fhircdc.bench";

/// An id-only notification of one event: the size the daemon sends.
fn body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "resourceType": "Bundle", "id": "0f0e1d2c-3b4a-5968-7786-95a4b3c2d1e0",
        "type": "subscription-notification", "timestamp": "2026-01-01T00:00:00.000Z",
        "entry": [{"fullUrl": "urn:uuid:1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809", "resource": {
            "resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
            "eventsSinceSubscriptionStart": "1", "topic": "http://bench/topic/obs",
            "subscription": {"reference": "http://fhir-cdc.test/fhir/Subscription/d0"},
            "notificationEvent": [{"eventNumber": "1", "timestamp": "2026-01-01T00:00:00.000Z",
                "focus": {"reference": "http://fhir-cdc.test/fhir/Observation/o-1"}}]}}]
    }))
    .expect("static JSON")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let n: usize = arg(2).parse().unwrap_or(1);
    match arg(0).as_str() {
        "nats-setup" => nats_stream(&arg(1), STREAM, "bench.*").await?,
        "nats-count" => println!("{}", nats_count(&arg(1), STREAM).await?),
        "nats-teardown" => {
            let js = jetstream::new(async_nats::connect(arg(1)).await?);
            let _ = js.delete_stream(STREAM).await;
            let _ = js.delete_stream("BENCHPLAIN").await;
        }
        "nats-plain" => println!("{}", nats_plain(&arg(1), n).await?),
        "nats-wait" | "amqp-wait" => {
            let want: u64 = arg(3).parse()?;
            let nats = arg(0) == "nats-wait";
            let js = match nats {
                true => Some(jetstream::new(async_nats::connect(arg(1)).await?)),
                false => None,
            };
            let ch = match nats {
                true => None,
                false => Some(amqp_channel(&arg(1)).await?),
            };
            // One connection polled every 10 ms: spawning a counter per poll loaded the
            // machine the measured deliver process runs on.
            let count = || async {
                match (&js, &ch) {
                    (Some(js), _) => Ok::<u64, Box<dyn std::error::Error>>(
                        js.get_stream(STREAM).await?.info().await?.state.messages,
                    ),
                    (_, Some(ch)) => amqp_queues(ch, n).await,
                    _ => Ok(0),
                }
            };
            let limit = Instant::now() + Duration::from_secs(600);
            let mut first = None;
            loop {
                let c = count().await?;
                let t = epoch();
                if first.is_none() && c > 0 {
                    first = Some((t, c));
                }
                if c >= want || Instant::now() > limit {
                    let (t0, c0) = first.unwrap_or((t, c));
                    println!("{t0:.3} {c0} {t:.3} {c}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        "amqp-setup" => amqp_setup(&arg(1), n).await?,
        "amqp-count" => println!("{}", amqp_count(&arg(1), n).await?),
        "amqp-teardown" => amqp_teardown(&arg(1), n).await?,
        "amqp-plain" => println!("{}", amqp_plain(&arg(1), n).await?),
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}

async fn nats_stream(
    url: &str,
    name: &str,
    subject: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let js = jetstream::new(async_nats::connect(url).await?);
    let _ = js.delete_stream(name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    Ok(())
}

async fn nats_count(url: &str, name: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let js = jetstream::new(async_nats::connect(url).await?);
    Ok(js.get_stream(name).await?.info().await?.state.messages)
}

/// Publishes one at a time, each with a message id and waiting for its ack.
async fn nats_plain(url: &str, count: usize) -> Result<u64, Box<dyn std::error::Error>> {
    nats_stream(url, "BENCHPLAIN", "benchplain.x").await?;
    let js = jetstream::new(async_nats::connect(url).await?);
    let body = bytes::Bytes::from(body());
    let t0 = Instant::now();
    for i in 0..count {
        let msg = jetstream::message::PublishMessage::build()
            .payload(body.clone())
            .message_id(format!("plain:{i}"))
            .header("Content-Type", "application/fhir+json");
        js.send_publish("benchplain.x", msg).await?.await?;
    }
    let rate = count as f64 / t0.elapsed().as_secs_f64();
    let _ = js.delete_stream("BENCHPLAIN").await;
    Ok(rate as u64)
}

async fn amqp_channel(url: &str) -> Result<lapin::Channel, Box<dyn std::error::Error>> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    Ok(conn.create_channel().await?)
}

async fn amqp_setup(url: &str, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let ch = amqp_channel(url).await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        EXCHANGE.into(),
        lapin::ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    for i in 0..n {
        let q = format!("bench.d{i}");
        let _ = ch
            .queue_delete(q.clone().into(), QueueDeleteOptions::default())
            .await;
        ch.queue_declare(
            q.clone().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.into(),
            EXCHANGE.into(),
            format!("d{i}").into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn amqp_count(url: &str, n: usize) -> Result<u64, Box<dyn std::error::Error>> {
    amqp_queues(&amqp_channel(url).await?, n).await
}

async fn amqp_queues(ch: &lapin::Channel, n: usize) -> Result<u64, Box<dyn std::error::Error>> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut total = 0;
    for i in 0..n {
        let q = ch
            .queue_declare(format!("bench.d{i}").into(), passive, FieldTable::default())
            .await?;
        total += u64::from(q.message_count());
    }
    Ok(total)
}

async fn amqp_teardown(url: &str, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let ch = amqp_channel(url).await?;
    for i in 0..n {
        let _ = ch
            .queue_delete(format!("bench.d{i}").into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .queue_delete("benchplain.x".into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
        .await;
    Ok(())
}

/// Persistent, mandatory publishes on a confirm channel, one at a time.
async fn amqp_plain(url: &str, count: usize) -> Result<u64, Box<dyn std::error::Error>> {
    let ch = amqp_channel(url).await?;
    let q = "benchplain.x";
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = body();
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let t0 = Instant::now();
    for i in 0..count {
        let props = lapin::BasicProperties::default()
            .with_message_id(format!("plain:{i}").into())
            .with_content_type("application/fhir+json".into())
            .with_delivery_mode(2);
        ch.basic_publish("".into(), q.into(), options, &body, props)
            .await?
            .await?;
    }
    let rate = count as f64 / t0.elapsed().as_secs_f64();
    let _ = ch
        .queue_delete(q.into(), QueueDeleteOptions::default())
        .await;
    Ok(rate as u64)
}
