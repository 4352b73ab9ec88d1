//! Capture's CPU per row without Postgres: recorded pgoutput bytes through decode →
//! assemble → control → match → the queue's binary COPY rows, on one core. A stable figure
//! beside bench.sh's drains, whose rates move 2× between runs with the machine's load.
//!
//!   scripts/bench-capture.sh                       (makes the workload, runs this, and callgrind)
//!   cargo bench --bench capture -- resources.jsonl [ROWS]
//!
//! The stream is what the walsender sends for an Aidbox-style `observation` table: a Relation
//! message (the columns' real types: `resource` is jsonb), then Insert messages of ~1.3 KB
//! Observations (gen.py, without id and meta, as Aidbox stores them, in jsonb's text form)
//! in transactions of 100, the same setup as bench.sh's drains. Prints
//! ns and heap allocations per row for 1 topic and for bench.sh's 20 topics, beside
//! `serde_json` parsing the same bodies into a `Value` (the cost the lazy path avoids).

// Benchmarks, examples and tests may unwrap (a panic there is a failed run, not a daemon),
// and their `pub` items are for their own modules.
#![allow(clippy::unwrap_used, unreachable_pub)]

use bytes::{BufMut, Bytes, BytesMut};
use fhir_cdc::capture::assemble::Assembler;
use fhir_cdc::capture::control::{Active, ActiveTopics, Role};
use fhir_cdc::capture::decode::Decoder;
use fhir_cdc::capture::matcher::Matcher;
use fhir_cdc::config::Config;
use fhir_cdc::fhir::search::Searcher;
use fhir_cdc::fhir::trigger;
use fhir_cdc::queue::batch::{encode_events, Item, QueuedEvent};
use fhir_cdc::store::aidbox::Aidbox;
use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A value as Postgres prints a jsonb: the text pgoutput sends for Aidbox's `resource` column.
#[path = "../tests/support/jsonb_text.rs"]
mod jsonb;
use jsonb::jsonb_text;

/// The daemon's allocator, counting calls.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { INNER.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { INNER.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { INNER.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RELID: u32 = 16385;
/// Aidbox's columns and their type OIDs, as the Relation message names them: text, bigint,
/// timestamptz, an enum (sent as text) and jsonb.
const COLUMNS: [(&str, u32); 7] = [
    ("id", 25),
    ("txid", 20),
    ("cts", 1184),
    ("ts", 1184),
    ("resource_type", 25),
    ("status", 25),
    ("resource", 3802),
];

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn relation() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(RELID);
    cstr(&mut b, "public");
    cstr(&mut b, "observation");
    b.put_u8(b'd');
    b.put_u16(COLUMNS.len() as u16);
    for (i, (c, oid)) in COLUMNS.iter().enumerate() {
        b.put_u8(u8::from(i == 0));
        cstr(&mut b, c);
        b.put_u32(*oid);
        b.put_i32(-1);
    }
    b.freeze()
}

fn insert(id: &str, body: &str) -> Bytes {
    let cols = [
        id,
        "1234567",
        "2026-11-30 22:51:00.123456+00",
        "2026-11-30 22:51:00.123456+00",
        "Observation",
        "created",
        body,
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(RELID);
    b.put_u8(b'N');
    b.put_u16(cols.len() as u16);
    for c in cols {
        b.put_u8(b't');
        b.put_u32(c.len() as u32);
        b.put_slice(c.as_bytes());
    }
    b.freeze()
}

/// The topics of bench.sh: the 1-topic case, and 19 more (mixed triggers, 5 with a
/// fhirPathCriteria, 3 canFilterBy each).
fn topics_toml(n: usize) -> String {
    let mut t = String::from(
        r#"[[topic]]
url = "http://bench/topic/obs"
resourceTrigger = [{ resource = "Observation", supportedInteraction = ["create", "update", "delete"] }]
canFilterBy = [{ resource = "Observation", filterParameter = "patient" }, { resource = "Observation", filterParameter = "code" }, { resource = "Observation", filterParameter = "value-quantity" }]
"#,
    );
    for i in 2..=n {
        let trig = if i > 17 {
            r#"{ resource = "Observation", supportedInteraction = ["create"], fhirPathCriteria = "%current.status = 'final'" }"#
        } else {
            match i % 4 {
                0 => {
                    r#"{ resource = "Observation", supportedInteraction = ["create"], fhirPathCriteria = "(%current.value as Quantity).value > 100" }"#
                }
                1 => {
                    r#"{ resource = "Observation", supportedInteraction = ["create", "update"], queryCriteria = { current = "status=final", resultForCreate = "test-passes" } }"#
                }
                2 => {
                    r#"{ resource = "Observation", supportedInteraction = ["create", "update", "delete"] }"#
                }
                _ => r#"{ resource = "Encounter", supportedInteraction = ["create", "update"] }"#,
            }
        };
        t.push_str(&format!(
            "[[topic]]\nurl = \"http://bench/topic/t{i}\"\nresourceTrigger = [{trig}]\n\
             canFilterBy = [{{ resource = \"Observation\", filterParameter = \"patient\" }}, \
             {{ resource = \"Observation\", filterParameter = \"code\" }}, \
             {{ resource = \"Observation\", filterParameter = \"date\" }}]\n"
        ));
    }
    t
}

fn config(topics: usize) -> Config {
    let text = format!(
        "[source]\nurl = \"postgresql://bench@127.0.0.1/fhir\"\nprofile = \"aidbox\"\n\
         fhir_version = \"R4\"\n\n{}",
        topics_toml(topics)
    );
    Config::from_toml(&text, std::path::Path::new(".")).expect("bench config")
}

/// One pass over the stream; returns (events, queue bytes).
async fn pass(
    cfg: &Config,
    searcher: &Arc<Searcher>,
    active: Vec<Active>,
    stream: &[Vec<Bytes>],
) -> (usize, usize) {
    let profile = Arc::new(Aidbox::new("public", None).with_version(cfg.source.fhir_version));
    let mut decoder = Decoder::new(profile);
    decoder.decode(relation()).expect("relation");
    let mut assembler = Assembler::new(0);
    let mut topics = ActiveTopics::new(active, searcher.clone());
    let mut matcher = Matcher::new(searcher.clone());
    matcher.set_wanted(topics.fields());
    let full: HashSet<String> = HashSet::new();
    let (mut events, mut bytes) = (0, 0);
    let mut buf = BytesMut::new();
    for (t, txn) in stream.iter().enumerate() {
        assembler.begin(1000 + t as u64, t as u32, 0);
        let mut items: Vec<Item> = Vec::new();
        for m in txn {
            let Some(row) = decoder.decode(m.clone()).expect("decode") else {
                continue;
            };
            let Some(change) = assembler.row(row).expect("assemble") else {
                continue;
            };
            match topics.classify(&change, cfg) {
                Role::Control(item) => items.extend(item),
                Role::Resource(item) => {
                    items.extend(item);
                    let ev = matcher.event(&topics.active, &change).await;
                    items.extend(ev.map(Item::Event));
                }
            }
        }
        assembler.commit().expect("commit");
        let run: Vec<&QueuedEvent> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        buf.clear();
        encode_events(&run, &full, &mut buf).expect("encode");
        events += run.len();
        bytes += buf.len();
    }
    (events, bytes)
}

fn compile(cfg: &Config, searcher: &Searcher) -> Vec<Active> {
    cfg.topics
        .iter()
        .map(|t| {
            let mut c = trigger::compile(&t.topic, &searcher.registry, &searcher.fp)
                .expect("topic compiles");
            c.on_error = t.on_criteria_error;
            Active::new(t.topic.clone(), c, None)
        })
        .collect()
}

fn load(path: &str, rows: usize) -> (Vec<Vec<Bytes>>, Vec<String>) {
    let text = std::fs::read_to_string(path).expect("workload file");
    let bodies: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["resourceType"] == "Observation")
        .map(|mut r| {
            if let Some(o) = r.as_object_mut() {
                o.remove("id");
                o.remove("meta");
                o.remove("resourceType");
            }
            jsonb_text(&r)
        })
        .collect();
    assert!(!bodies.is_empty(), "no Observations in {path}");
    let msgs: Vec<Bytes> = (0..rows)
        .map(|i| insert(&format!("o{i}"), &bodies[i % bodies.len()]))
        .collect();
    (msgs.chunks(100).map(<[Bytes]>::to_vec).collect(), bodies)
}

/// What building a `serde_json::Value` of each body costs, measured in the same run.
fn serde_reference(bodies: &[String], rows: usize) {
    let t0 = Instant::now();
    let a0 = ALLOCS.load(Ordering::Relaxed);
    for i in 0..rows {
        let v: serde_json::Value = serde_json::from_str(&bodies[i % bodies.len()]).expect("json");
        std::hint::black_box(v);
    }
    let ns = t0.elapsed().as_nanos() as f64 / rows as f64;
    let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / rows as f64;
    println!("capture_bench_serde_value_ns_per_row={ns:.0}   # reference: serde_json::Value of the same body ({allocs:.1} allocations)");
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let Some(path) = args.first() else {
        eprintln!("usage: cargo bench --bench capture -- resources.jsonl [ROWS]   (scripts/bench-capture.sh makes one)");
        return;
    };
    let rows: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(50_000);
    let (stream, bodies) = load(path, rows);
    let avg = bodies.iter().map(String::len).sum::<usize>() / bodies.len();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // One case alone (callgrind runs: scripts/bench-capture.sh).
        let only: Option<usize> = std::env::var("CAPTURE_BENCH_TOPICS")
            .ok()
            .and_then(|v| v.parse().ok());
        println!("capture_bench_rows={rows}   # Observations of {avg} bytes from {path}, 100 per transaction, one core");
        if only.is_none() {
            serde_reference(&bodies, rows);
        }
        for n in [1, 20].into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
            let cfg = config(n);
            let v = cfg.source.fhir_version;
            let searcher = Arc::new(fhir_cdc::capture::searcher(&cfg).await.expect("searcher"));
            assert_eq!(searcher.registry.version(), v);
            // A warm-up pass of a fixed size (callgrind's two runs differ only in the measured
            // pass and the building of the stream), then the measured one.
            pass(&cfg, &searcher, compile(&cfg, &searcher), &stream[..stream.len().min(5)]).await;
            let t0 = Instant::now();
            let a0 = ALLOCS.load(Ordering::Relaxed);
            let (events, bytes) = pass(&cfg, &searcher, compile(&cfg, &searcher), &stream).await;
            let ns = t0.elapsed().as_nanos() as f64 / rows as f64;
            let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / rows as f64;
            assert_eq!(events, rows, "every row is an event");
            println!("capture_bench_{n}topic_ns_per_row={ns:.0}");
            println!("capture_bench_{n}topic_allocs_per_row={allocs:.1}");
            println!("capture_bench_{n}topic_queue_bytes_per_row={}", bytes / rows);
        }
    });
}
