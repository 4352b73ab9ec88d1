//! Capture, the CDC stage: one logical replication slot in, `fhir_cdc.event` out.
//!
//! Transactions are queued whole: the events of every store commit up to some end LSN are
//! written in one queue transaction together with that LSN as the checkpoint, and only
//! after it commits is the LSN confirmed to the server. After a crash the stream restarts
//! at the checkpoint and commits at or below it are skipped, so each change is queued once.

pub mod profile;
pub mod setup;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser, TupleData};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::config::Config;
use crate::fhir::search::Searcher;
use crate::fhir::subscription::{self, Rules};
use crate::fhir::topic::{Interaction, Topic};
use crate::fhir::trigger::{self, ChangeEval, Compiled, Outcome};
use crate::queue::{self, batch, batch::Item, batch::QueuedEvent};
use profile::{Profile, RowChange, TableKind};

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

fn pg_time(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros + PG_EPOCH_OFFSET_SECS * 1_000_000)
        .single()
        .unwrap_or_else(Utc::now)
}

/// Runs capture until `shutdown` flips, reconnecting with backoff when Postgres goes away.
///
/// `streaming` is true while the slot is being read: the moment from which every store
/// commit is captured (what `/readyz` reports).
pub async fn run(
    cfg: Arc<Config>,
    searcher: Arc<Searcher>,
    streaming: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Configured topics must compile: a typo in a criterion is a configuration error.
    let mut configured = Vec::new();
    for t in &cfg.topics {
        let compiled = trigger::compile(&t.topic, &searcher.registry, &searcher.fp)
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        configured.push((t.topic.clone(), compiled));
    }
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let result = run_once(&cfg, &configured, &searcher, &streaming, &mut shutdown).await;
        streaming.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                metrics::counter!("fhir_cdc_capture_restarts_total").increment(1);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(500);
                }
                tracing::error!(
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "capture stopped; reconnecting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Replication connection settings from a `postgresql://` URL.
pub fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
) -> anyhow::Result<ReplicationConfig> {
    let u = url::Url::parse(url).context("source.url is not a postgresql:// URL")?;
    let host = u.host_str().unwrap_or("localhost").to_string();
    let user = if u.username().is_empty() {
        "postgres".to_string()
    } else {
        url_decode(u.username())
    };
    let password = u.password().map(url_decode).unwrap_or_default();
    let db = u.path().trim_start_matches('/');
    let db = if db.is_empty() {
        user.clone()
    } else {
        url_decode(db)
    };
    Ok(
        ReplicationConfig::new(host, user, password, db, slot, publication)
            .with_port(u.port().unwrap_or(5432))
            .with_application_name(format!("fhir-cdc-{slot}")),
    )
}

fn url_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

/// A topic capture matches against: configured, or created in the store.
struct Active {
    url: Arc<str>,
    topic: Topic,
    compiled: Compiled,
    /// The store resource's id, for topics that live in the store.
    store_id: Option<String>,
}

struct Relation {
    name: String,
    kind: TableKind,
}

struct Txn {
    commit_lsn: u64,
    xid: u32,
    commit_time: DateTime<Utc>,
    skip: bool,
    items: Vec<Item>,
    /// History rows seen in this transaction: the versions its updates and deletes replace.
    history: HashMap<(String, String), RowChange>,
}

/// Decoding state of one stream: relation cache, open transaction, unflushed items.
struct Stream<'a> {
    cfg: &'a Config,
    profile: Profile,
    topics: Vec<Active>,
    searcher: Arc<Searcher>,
    /// Tables already warned about updates without a previous version.
    warned_no_previous: std::collections::HashSet<u32>,
    parser: LogicalReplicationParser,
    relations: HashMap<u32, Relation>,
    checkpoint: u64,
    txn: Option<Txn>,
    pending: Vec<Item>,
    pending_events: usize,
    pending_end: Option<u64>,
    pending_since: Option<Instant>,
}

/// The search machinery for the store's FHIR version.
pub async fn searcher(cfg: &Config) -> anyhow::Result<Searcher> {
    Ok(Searcher {
        fp: crate::fhir::fhirpath::FhirPath::new(cfg.source.fhir_version).await?,
        registry: Arc::new(crate::fhir::search::registry::Registry::load(
            cfg.source.fhir_version,
        )),
    })
}

async fn run_once(
    cfg: &Config,
    configured: &[(Topic, Compiled)],
    searcher: &Arc<Searcher>,
    streaming: &AtomicBool,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let src = &cfg.source;
    let mut qc = queue::connect(cfg.queue_url())
        .await
        .context("connecting to the queue database")?;
    queue::migrate::run(&mut qc).await?;
    let store = queue::connect(&src.url)
        .await
        .context("connecting to the store database")?;
    let wal_level: String = store.query_one("SHOW wal_level", &[]).await?.get(0);
    anyhow::ensure!(
        wal_level == "logical",
        "the store runs with wal_level={wal_level}; set wal_level=logical and restart Postgres (run `fhir-cdc check` for details)"
    );
    setup::ensure(&store, src).await?;
    drop(store);

    // One active capture per slot; a second instance waits here as a standby.
    let lock_key = format!("fhir_cdc.capture.{}", src.slot);
    loop {
        let got: bool = qc
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[&lock_key],
            )
            .await?
            .get(0);
        if got {
            break;
        }
        tracing::info!(slot = %src.slot, "another capture holds the slot; waiting as standby");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }

    let checkpoint = batch::checkpoint(&qc, &src.slot).await?.unwrap_or(0);
    let mut rc = replication_config(&src.url, &src.slot, &src.publication)?
        .with_status_interval(Duration::from_secs(1));
    if checkpoint > 0 {
        rc = rc
            .with_start_lsn(Lsn(checkpoint))
            .with_ack_lsn(Lsn(checkpoint));
    }
    let mut repl = ReplicationClient::connect(rc)
        .await
        .context("starting replication")?;
    repl.wait_started().await.context("starting replication")?;
    streaming.store(true, Ordering::SeqCst);
    tracing::info!(slot = %src.slot, checkpoint = %queue::lsn_text(checkpoint), "capture streaming");

    let mut topics: Vec<Active> = configured
        .iter()
        .map(|(t, c)| Active {
            url: Arc::from(t.url.as_str()),
            topic: t.clone(),
            compiled: c.clone(),
            store_id: None,
        })
        .collect();
    for (store_id, topic) in queue::topics::load_store(&qc).await? {
        if topics.iter().any(|a| a.topic.url == topic.url) {
            continue;
        }
        match trigger::compile(&topic, &searcher.registry, &searcher.fp) {
            Ok(compiled) => topics.push(Active {
                url: Arc::from(topic.url.as_str()),
                topic,
                compiled,
                store_id: Some(store_id),
            }),
            Err(e) => {
                tracing::error!(topic = %store_id, error = %e, "stored topic does not compile; skipped")
            }
        }
    }
    let mut s = Stream {
        cfg,
        profile: Profile::new(src),
        topics,
        searcher: searcher.clone(),
        warned_no_previous: Default::default(),
        parser: LogicalReplicationParser::with_protocol_version(1),
        relations: HashMap::new(),
        checkpoint,
        txn: None,
        pending: Vec::new(),
        pending_events: 0,
        pending_end: None,
        pending_since: None,
    };
    let flush_after = Duration::from_millis(cfg.queue.flush_ms);
    loop {
        let deadline = s
            .pending_since
            .map(|t| tokio::time::Instant::from_std(t + flush_after));
        tokio::select! {
            ev = repl.recv() => {
                match ev.context("replication stream")? {
                    Some(ev) => {
                        if s.handle(ev).await? {
                            s.flush(&mut qc, &repl).await?;
                        }
                    }
                    None => anyhow::bail!("replication stream ended"),
                }
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                s.flush(&mut qc, &repl).await?;
            }
            _ = shutdown.changed() => {
                s.flush(&mut qc, &repl).await?;
                repl.shutdown().await.ok();
                return Ok(());
            }
        }
    }
}

impl Stream<'_> {
    /// Handles one replication event; returns true when the batch should be flushed now.
    async fn handle(&mut self, ev: ReplicationEvent) -> anyhow::Result<bool> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.txn = Some(Txn {
                    commit_lsn: final_lsn.0,
                    xid,
                    commit_time: pg_time(commit_time_micros),
                    // Queued before the crash: its end LSN is at or below the checkpoint.
                    skip: final_lsn.0 < self.checkpoint,
                    items: Vec::new(),
                    history: HashMap::new(),
                });
            }
            ReplicationEvent::XLogData { data, .. } => self.decode(data).await?,
            ReplicationEvent::Commit { end_lsn, .. } => {
                let Some(txn) = self.txn.take() else {
                    anyhow::bail!("commit without begin in the replication stream");
                };
                if txn.skip {
                    metrics::counter!("fhir_cdc_skipped_transactions_total").increment(1);
                    return Ok(false);
                }
                self.pending_events += txn
                    .items
                    .iter()
                    .filter(|i| matches!(i, Item::Event(_)))
                    .count();
                self.pending.extend(txn.items);
                self.pending_end = Some(end_lsn.0);
                self.pending_since.get_or_insert_with(Instant::now);
                return Ok(self.pending_events >= self.cfg.queue.batch_events);
            }
            ReplicationEvent::KeepAlive { .. } | ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                anyhow::bail!("replication stopped at a stop LSN")
            }
        }
        Ok(false)
    }

    async fn decode(&mut self, data: bytes::Bytes) -> anyhow::Result<()> {
        let msg = self
            .parser
            .parse_wal_message_bytes(data)
            .context("decoding pgoutput")?;
        let (rel_id, op, old, new): (u32, Interaction, Option<TupleData>, Option<TupleData>) =
            match msg.message {
                LogicalReplicationMessage::Relation {
                    relation_id,
                    namespace,
                    relation_name,
                    columns,
                    ..
                } => {
                    let cols: Vec<&str> = columns.iter().map(|c| c.name.as_ref()).collect();
                    let kind = self.profile.classify(&namespace, &relation_name, &cols);
                    self.relations.insert(
                        relation_id,
                        Relation {
                            name: relation_name.to_string(),
                            kind,
                        },
                    );
                    return Ok(());
                }
                LogicalReplicationMessage::Insert { relation_id, tuple } => {
                    (relation_id, Interaction::Create, None, Some(tuple))
                }
                LogicalReplicationMessage::Update {
                    relation_id,
                    old_tuple,
                    new_tuple,
                    ..
                } => (relation_id, Interaction::Update, old_tuple, Some(new_tuple)),
                LogicalReplicationMessage::Delete {
                    relation_id,
                    old_tuple,
                    ..
                } => (relation_id, Interaction::Delete, Some(old_tuple), None),
                LogicalReplicationMessage::Truncate { .. } => {
                    tracing::warn!(
                        "TRUNCATE of a store table seen; truncations do not produce notifications"
                    );
                    return Ok(());
                }
                _ => return Ok(()),
            };
        let Some(skip) = self.txn.as_ref().map(|t| t.skip) else {
            anyhow::bail!("row change outside a transaction in the replication stream");
        };
        if skip {
            return Ok(());
        }
        let Some(rel) = self.relations.get(&rel_id) else {
            anyhow::bail!("row change for relation {rel_id} before its description");
        };
        metrics::counter!("fhir_cdc_rows_total").increment(1);
        let change = match self
            .profile
            .change(&rel.name, &rel.kind, op, old.as_ref(), new.as_ref())
        {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(e) => {
                metrics::counter!("fhir_cdc_bad_rows_total").increment(1);
                tracing::error!(error = %e, "skipping a row that is not a resource");
                return Ok(());
            }
        };
        if matches!(rel.kind, TableKind::AidboxHistory(_)) {
            if let Some(t) = self.txn.as_mut() {
                t.history
                    .insert((change.resource_type.clone(), change.id.clone()), change);
            }
            return Ok(());
        }
        // The version this change replaces: the history row written just before it in this
        // transaction, else the old tuple when the table has REPLICA IDENTITY FULL.
        let previous_row = match change.interaction {
            Interaction::Create => None,
            _ => {
                let key = (change.resource_type.clone(), change.id.clone());
                let from_history = self.txn.as_mut().and_then(|t| t.history.remove(&key));
                from_history.or_else(|| {
                    old.as_ref()
                        .filter(|o| o.columns.iter().all(|c| !c.is_null() || c.is_unchanged()))
                        .and_then(|o| self.profile.row(&rel.name, &rel.kind, o).ok().flatten())
                })
            }
        };
        if change.resource_type == "Subscription" {
            let list: Vec<Topic> = self.topics.iter().map(|a| a.topic.clone()).collect();
            if let Some(item) = subscription_item(&change, &list, &self.searcher.registry, self.cfg)
            {
                self.push(item);
            }
            return Ok(());
        }
        if change.resource_type == "SubscriptionTopic" || change.resource_type == "Basic" {
            if let Some(item) = self.topic_change(&change) {
                self.push(item);
            }
            if change.resource_type == "SubscriptionTopic" {
                return Ok(());
            }
        }
        let wanted: Vec<&Active> = self
            .topics
            .iter()
            .filter(|a| a.topic.matches(&change.resource_type, change.interaction))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if previous_row.is_none()
            && change.interaction != Interaction::Create
            && wanted.iter().any(|a| a.compiled.has_criteria())
            && self.warned_no_previous.insert(rel_id)
        {
            tracing::warn!(
                table = %change.resource_type,
                "an update or delete arrived without its previous version; criteria evaluate the previous state as absent. \
                 Set REPLICA IDENTITY FULL on the table (generic profile) so pgoutput sends it"
            );
        }
        // Parse once, and only for changes some topic wants.
        let current = match change.resource() {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!("fhir_cdc_bad_rows_total").increment(1);
                tracing::error!(error = %e, "skipping a change whose resource is not valid JSON");
                return Ok(());
            }
        };
        let previous = match previous_row.as_ref().map(RowChange::resource) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "previous version is not valid JSON; evaluated as absent");
                None
            }
            None => None,
        };
        let current = current.map(Arc::new);
        let Some((commit_lsn, xid, commit_time)) = self
            .txn
            .as_ref()
            .map(|t| (t.commit_lsn, t.xid, t.commit_time))
        else {
            return Ok(());
        };
        let mut items = Vec::new();
        // Built once for every topic that evaluates something on this change.
        let eval = wanted
            .iter()
            .any(|a| a.compiled.has_criteria() || !a.compiled.filters.is_empty())
            .then(|| {
                ChangeEval::from_arcs(
                    &self.searcher,
                    previous.clone().map(Arc::new),
                    current.clone(),
                )
            });
        for a in wanted {
            let fires = if let (true, Some(ev)) = (a.compiled.has_criteria(), eval.as_ref()) {
                match a
                    .compiled
                    .evaluate(ev, &change.resource_type, change.interaction)
                    .await
                {
                    Outcome::Fires => true,
                    Outcome::DoesNotFire => false,
                    Outcome::Error(e) => {
                        metrics::counter!("fhir_cdc_trigger_errors_total").increment(1);
                        tracing::error!(topic = %a.url, reference = %change.reference(), error = %e,
                            "topic criteria could not be evaluated; the trigger does not fire");
                        false
                    }
                }
            } else {
                true
            };
            if !fires {
                continue;
            }
            let filters = match (&eval, a.compiled.filters.is_empty()) {
                (Some(ev), false) => {
                    let values = a.compiled.filter_values(ev, &change.resource_type).await;
                    serde_json::to_value(values).ok()
                }
                _ => None,
            };
            items.push(Item::Event(QueuedEvent {
                topic: a.url.clone(),
                resource_type: change.resource_type.clone(),
                resource_id: change.id.clone(),
                version_id: change.version_id.clone(),
                interaction: change.interaction,
                resource: current.clone(),
                filters,
                commit_lsn,
                xid,
                commit_time,
            }));
        }
        for item in items {
            self.push(item);
        }
        Ok(())
    }

    fn push(&mut self, item: Item) {
        if let Some(t) = self.txn.as_mut() {
            t.items.push(item);
        }
    }

    /// A SubscriptionTopic (or R4 backport Basic) written into the store: takes effect for
    /// the changes after it in the stream, and is recorded for restarts and delivery.
    fn topic_change(&mut self, change: &RowChange) -> Option<Item> {
        let registered = self
            .topics
            .iter()
            .position(|a| a.store_id.as_deref() == Some(change.id.as_str()));
        let unregister = |s: &mut Self| {
            registered.map(|i| {
                let a = s.topics.remove(i);
                tracing::info!(topic = %a.url, reference = %change.reference(), "store topic removed");
                Item::DeleteTopic {
                    store_id: change.id.clone(),
                }
            })
        };
        if change.interaction == Interaction::Delete {
            return unregister(self);
        }
        let resource = match change.resource() {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                if change.resource_type == "SubscriptionTopic" {
                    tracing::error!(error = %e, "SubscriptionTopic row is not valid JSON; ignored");
                }
                return None;
            }
        };
        let topic = match Topic::from_json(&resource) {
            Ok(t) => t,
            // An ordinary Basic resource, not a topic.
            Err(crate::fhir::topic::TopicError::NotATopic(_)) => return None,
            Err(e) => {
                tracing::error!(reference = %change.reference(), reason = %e, "SubscriptionTopic in the store refused");
                return unregister(self);
            }
        };
        let compiled = match topic
            .evaluable()
            .map_err(|e| e.to_string())
            .and_then(|()| trigger::compile(&topic, &self.searcher.registry, &self.searcher.fp))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(reference = %change.reference(), reason = %e, "SubscriptionTopic in the store refused");
                return unregister(self);
            }
        };
        let clash = self
            .topics
            .iter()
            .any(|a| a.topic.url == topic.url && a.store_id.as_deref() != Some(change.id.as_str()));
        if clash {
            tracing::error!(reference = %change.reference(), url = %topic.url, "SubscriptionTopic in the store has the url of another topic; ignored");
            return None;
        }
        let url = topic.url.clone();
        let active = Active {
            url: Arc::from(url.as_str()),
            topic,
            compiled,
            store_id: Some(change.id.clone()),
        };
        match registered {
            Some(i) => self.topics[i] = active,
            None => self.topics.push(active),
        }
        tracing::info!(topic = %url, reference = %change.reference(), "store topic registered");
        Some(Item::UpsertTopic {
            store_id: change.id.clone(),
            url,
            resource,
        })
    }

    async fn flush(
        &mut self,
        qc: &mut tokio_postgres::Client,
        repl: &ReplicationClient,
    ) -> anyhow::Result<()> {
        let Some(end) = self.pending_end else {
            return Ok(());
        };
        let t = Instant::now();
        let n = batch::write(qc, &self.cfg.source.slot, &self.pending, end)
            .await
            .context("writing events to the queue")?;
        // Only now, with the events committed, may the server forget this WAL.
        repl.update_applied_lsn(Lsn(end));
        self.checkpoint = end;
        metrics::counter!("fhir_cdc_events_queued_total").increment(n as u64);
        metrics::histogram!("fhir_cdc_batch_write_seconds").record(t.elapsed().as_secs_f64());
        metrics::gauge!("fhir_cdc_checkpoint_lsn").set(end as f64);
        tracing::debug!(events = n, lsn = %queue::lsn_text(end), "queued batch");
        self.pending.clear();
        self.pending_events = 0;
        self.pending_end = None;
        self.pending_since = None;
        Ok(())
    }
}

/// A Subscription written into the store becomes a queue item at its place in the stream.
fn subscription_item(
    change: &RowChange,
    topics: &[Topic],
    registry: &crate::fhir::search::registry::Registry,
    cfg: &Config,
) -> Option<Item> {
    if change.interaction == Interaction::Delete {
        return Some(Item::DeleteSubscription {
            id: change.id.clone(),
        });
    }
    let resource = match change.resource() {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::warn!(reference = %change.reference(), "Subscription row without a readable body; ignored");
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "Subscription row is not valid JSON; recorded in error");
            return Some(Item::RefuseSubscription {
                id: change.id.clone(),
                topic: String::new(),
                resource: serde_json::Value::Null,
                reason: e.to_string(),
            });
        }
    };
    let rules = Rules {
        registry: Some(registry),
        format: cfg.source.fhir_version.into(),
        topics,
        allow_private_endpoints: cfg.delivery.allow_private_endpoints,
        require_https_for_full_resource: cfg.delivery.require_https_for_full_resource,
    };
    match subscription::parse(&resource, &rules) {
        Ok(spec) => Some(Item::UpsertSubscription {
            id: change.id.clone(),
            spec: Box::new(spec),
            resource,
        }),
        Err(e) => {
            tracing::error!(reference = %change.reference(), reason = %e.message, "Subscription in the store refused");
            let topic = ["topic", "criteria"]
                .iter()
                .find_map(|k| resource.get(*k).and_then(serde_json::Value::as_str))
                .unwrap_or("")
                .to_string();
            Some(Item::RefuseSubscription {
                id: change.id.clone(),
                topic,
                reason: format!("{} ({})", e.message, e.expression),
                resource,
            })
        }
    }
}
