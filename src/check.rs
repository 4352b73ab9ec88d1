//! `fhir-cdc check`: validates the configuration and the database, and says what to fix
//! with the SQL to run.

use crate::config::Config;
use crate::queue;
use crate::store::{self, setup};

/// One finding: ok, or what is wrong and how to fix it.
pub struct Finding {
    pub ok: bool,
    /// Works, but an operator should know (printed as WARN; the exit status stays 0).
    pub warning: bool,
    pub what: String,
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        warning: false,
        what: what.into(),
        fix: None,
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        warning: true,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

/// Whether subscribers' secrets are sealed at rest, and with a key that loads.
fn secrets_at_rest(cfg: &Config) -> Finding {
    match crate::queue::sealed::load_key(&cfg.security) {
        Ok(Some(_)) => ok("security: endpoint header values and signing secrets are sealed (AES-256-GCM) in the queue"),
        Ok(None) => warn(
            "security: endpoint header values and signing secrets are stored in clear in fhir_cdc.subscription",
            "set [security] secrets_key_env (or secrets_key_file) to a key from `openssl rand -base64 32`; the next start seals what is stored",
        ),
        Err(e) => bad(format!("security: {e}"), "give a 32-byte base64 key (openssl rand -base64 32)"),
    }
}

fn bad(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        warning: false,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

/// Connects to a destination's broker and looks for its stream or exchange.
async fn destination(d: &crate::config::DestinationConfig) -> Finding {
    use crate::config::BrokerKind;
    let r = match d.kind {
        BrokerKind::Nats => crate::channel::nats::probe(d).await,
        BrokerKind::Amqp => crate::channel::amqp::probe(d).await,
    };
    match (r, d.kind) {
        (Ok(found), _) => ok(format!("destination {}: {} — {found}", d.id, d.public_url())),
        (Err(e), BrokerKind::Nats) => bad(
            format!("destination {}: {e}", d.id),
            "create a stream covering the subject, e.g. `nats stream add FHIR --subjects 'fhir.>' --storage file --dupe-window 2m`; check url, credentials_file, password_env",
        ),
        (Err(e), BrokerKind::Amqp) => bad(
            format!("destination {}: {e}", d.id),
            "declare the exchange and bind a queue, e.g. `rabbitmqadmin declare exchange name=fhir type=direct durable=true`; check url and password_env",
        ),
    }
}

pub async fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![
        ok(format!(
            "config: {} topic(s), profile {:?}, FHIR {:?}",
            cfg.topics.len(),
            cfg.source.profile,
            cfg.source.fhir_version
        )),
        secrets_at_rest(cfg),
    ];
    out.extend(topic_findings(cfg).await);
    if let Some(e) = &cfg.channels.email {
        out.push(email(e).await);
    }
    for d in &cfg.destinations {
        out.push(destination(d).await);
    }
    if cfg.topics.is_empty() {
        out.push(bad(
            "no [[topic]] configured: nothing will ever match",
            "add a [[topic]] entry (see config/example.toml)",
        ));
    }
    let store = match queue::connect(&cfg.source.url).await {
        Ok(c) => c,
        Err(e) => {
            out.push(bad(format!("cannot connect to source.url: {e}"), "check source.url (or FHIR_CDC_SOURCE_URL), that Postgres runs and accepts this user"));
            return out;
        }
    };
    out.push(ok(format!(
        "connected to the store database ({})",
        tls_state(&store).await
    )));
    out.extend(server_findings(cfg, &store).await);
    out.push(publication_finding(cfg, &store).await);
    out.extend(reads_finding(cfg, &store).await);
    out.extend(replica_identity_findings(cfg, &store).await);
    out.push(wal_keep_finding(&store).await);
    out.push(slot_finding(cfg, &store).await);
    out.push(queue_finding(cfg).await);
    out
}

/// Each topic compiles against the search parameters and FHIRPath of the FHIR version, and
/// which of its criteria fail on a minimal resource.
async fn topic_findings(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    match crate::capture::searcher(cfg).await {
        Ok(s) => {
            for t in &cfg.topics {
                match crate::fhir::trigger::compile(&t.topic, &s.registry, &s.fp) {
                    Ok(c) => {
                        out.push(ok(format!(
                            "topic {}: {} trigger(s), {} filter parameter(s)",
                            t.topic.url,
                            c.triggers.len(),
                            c.filters.len()
                        )));
                        for p in c.probe(&s).await {
                            out.push(ok(format!(
                                "topic {}: {p}; on_criteria_error = {:?} decides when that happens",
                                t.topic.url, t.on_criteria_error
                            )));
                        }
                    }
                    Err(e) => out.push(bad(e, "fix the topic's criteria (search parameters of source.fhir_version, FHIRPath)")),
                }
            }
        }
        Err(e) => out.push(bad(format!("FHIRPath engine: {e}"), "report this as a bug")),
    }
    out
}

/// The server's side: wal_level, the user's REPLICATION attribute, a free slot.
async fn server_findings(cfg: &Config, store: &tokio_postgres::Client) -> Vec<Finding> {
    let mut out = Vec::new();
    match setup::wal_level(store).await {
        Ok(level) if level == "logical" => out.push(ok("wal_level = logical")),
        Ok(level) => out.push(bad(
            format!("wal_level = {level} (logical replication needs logical)"),
            "ALTER SYSTEM SET wal_level = logical;  -- then restart Postgres",
        )),
        Err(e) => out.push(bad(
            format!("cannot read wal_level: {e}"),
            "grant the user access to pg_settings",
        )),
    }
    match setup::may_replicate(store).await {
        Ok(true) => out.push(ok("the user may replicate")),
        Ok(_) => out.push(bad(
            "the user lacks the REPLICATION attribute",
            "ALTER ROLE <user> REPLICATION;",
        )),
        Err(e) => out.push(bad(
            format!("cannot read role attributes: {e}"),
            "check the user",
        )),
    }
    match setup::free_slots(store).await {
        Ok(free) => {
            if free > 0
                || matches!(
                    setup::slot_plugin(store, &cfg.source.slot).await,
                    Ok(Some(_))
                )
            {
                out.push(ok(format!("replication slots: {free} free")));
            } else {
                out.push(bad(
                    "no free replication slot",
                    "ALTER SYSTEM SET max_replication_slots = 10;  -- then restart Postgres",
                ));
            }
        }
        Err(e) => out.push(bad(
            format!("cannot read max_replication_slots: {e}"),
            "check the user",
        )),
    }
    out
}

/// The slot: missing (and whether capture creates it), healthy, lost, or of another plugin.
async fn slot_finding(cfg: &Config, store: &tokio_postgres::Client) -> Finding {
    match setup::slot_state(store, &cfg.source.slot).await {
        Ok(Some(s)) if s.wal_status.as_deref() == Some("lost") => bad(
            format!("slot {} was invalidated (wal_status lost): changes since the last checkpoint were not captured", cfg.source.slot),
            "fhir-cdc capture --resync-from-now  -- makes a new slot and captures from now on; the gap is logged",
        ),
        Ok(Some(s)) if s.plugin == "pgoutput" => ok(format!(
            "slot {} exists (pgoutput, wal_status {})",
            cfg.source.slot,
            s.wal_status.as_deref().unwrap_or("unknown")
        )),
        Ok(Some(s)) => bad(
            format!("slot {} uses plugin {}", cfg.source.slot, s.plugin),
            format!(
                "SELECT pg_drop_replication_slot('{}');  -- or set source.slot to another name",
                cfg.source.slot
            ),
        ),
        Ok(None) if cfg.source.create_missing => ok(format!(
            "slot {} is missing; capture will create it: {}",
            cfg.source.slot,
            setup::slot_sql(&cfg.source.slot)
        )),
        Ok(None) => bad(
            format!("slot {} is missing", cfg.source.slot),
            setup::slot_sql(&cfg.source.slot),
        ),
        Err(e) => bad(format!("cannot read slots: {e}"), "check the user"),
    }
}

/// The queue database: reachable, and schema fhir_cdc can be created there.
async fn queue_finding(cfg: &Config) -> Finding {
    match queue::connect(cfg.queue_url()).await {
        Ok(q) => match queue::can_hold_schema(&q).await {
            Ok(true) => ok("queue database reachable; schema fhir_cdc can be created"),
            Ok(_) => bad(
                "the user cannot create schema fhir_cdc in the queue database",
                "GRANT CREATE ON DATABASE <db> TO <user>;",
            ),
            Err(e) => bad(format!("queue database: {e}"), "check queue.url"),
        },
        Err(e) => bad(
            format!("cannot connect to the queue database: {e}"),
            "check queue.url (or FHIR_CDC_QUEUE_URL)",
        ),
    }
}

/// Whether the publication covers exactly the tables the profile reads, and the SQL that
/// makes it so.
/// Whether the connection is encrypted, as the server sees it.
async fn tls_state(c: &tokio_postgres::Client) -> String {
    let row = c
        .query_opt(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await;
    match row {
        Ok(Some(r)) if r.get::<_, bool>(0) => {
            format!("TLS {}", r.get::<_, Option<String>>(1).unwrap_or_default())
        }
        Ok(Some(_)) => "not encrypted: add sslmode=verify-full to the URL to require TLS".into(),
        _ => "TLS state unknown".into(),
    }
}

async fn publication_finding(cfg: &Config, store: &tokio_postgres::Client) -> Finding {
    let name = &cfg.source.publication;
    let profile = match queue::pool(&cfg.source.url, 1) {
        Ok(pool) => store::from_config(&cfg.source, pool),
        Err(e) => return bad(format!("source.url: {e}"), "check source.url"),
    };
    let (now, sql) = match (
        setup::publication(store, name).await,
        setup::publication_plan(store, profile.as_ref(), name).await,
    ) {
        (Ok(now), Ok(sql)) => (now, sql.join(";\n         ")),
        (Err(e), _) | (_, Err(e)) => {
            return bad(
                format!("publication {name}: {e}"),
                "check the user and source.schema / source.tables",
            )
        }
    };
    let what = if !now.exists {
        format!("publication {name} is missing")
    } else if sql.is_empty() {
        return ok(format!(
            "publication {name} names the store's resource tables"
        ));
    } else if now.all_tables || !now.schemas.is_empty() {
        format!("publication {name} covers whole schemas: Postgres refuses the store's UPDATE/DELETE on their tables without a replica identity")
    } else {
        format!("publication {name} lacks some of the store's resource tables")
    };
    if cfg.source.create_missing {
        let will = if now.exists { "run" } else { "create it" };
        ok(format!("{what}; capture will {will}: {sql}"))
    } else {
        bad(what, sql)
    }
}

/// What the profile reads, and the grants a DBA gives the store user for it.
async fn reads_finding(cfg: &Config, store: &tokio_postgres::Client) -> Option<Finding> {
    let pool = queue::pool(&cfg.source.url, 1).ok()?;
    let profile = store::from_config(&cfg.source, pool);
    let catalog = setup::catalog(store).await.ok()?;
    let published = profile.publication_tables(&catalog).unwrap_or_default();
    let read = profile.read_tables(&catalog);
    let list = |t: &[store::TableName]| {
        t.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let user: String = store
        .query_one("SELECT current_user::text", &[])
        .await
        .ok()?
        .get(0);
    let grant = format!("GRANT SELECT ON {} TO {}", list(&read), store::ident(&user));
    let reads = if read == published {
        "reads the same tables by key".to_string()
    } else {
        format!("reads by key {}", list(&read))
    };
    Some(ok(format!(
        "profile {}: changes from {} (published); {reads}; never writes them. Grants it needs: {grant}",
        profile.name(),
        list(&published),
    )))
}

/// Published tables without a replica identity: Postgres refuses UPDATE/DELETE on them, so
/// the store's own writes would fail. Never caused by fhir-cdc's own publication plan; this
/// catches one made by hand.
async fn replica_identity_findings(cfg: &Config, store: &tokio_postgres::Client) -> Vec<Finding> {
    let rows = store
        .query(
            "SELECT quote_ident(p.schemaname) || '.' || quote_ident(p.tablename)
             FROM pg_publication_tables p
             JOIN pg_class c ON c.relname = p.tablename
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = p.schemaname
             WHERE p.pubname = $1
               AND (c.relreplident = 'n'
                    OR (c.relreplident = 'd' AND NOT EXISTS (
                        SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))",
            &[&cfg.source.publication],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            let table: String = r.get(0);
            bad(
                format!("published table {table} has no replica identity: Postgres refuses the store's UPDATE and DELETE on it"),
                format!("ALTER PUBLICATION {} DROP TABLE {table}", store::ident(&cfg.source.publication)),
            )
        })
        .collect()
}

/// `max_slot_wal_keep_size`: unlimited lets a stopped capture fill the store's disk; a limit
/// makes Postgres invalidate the slot instead (capture then stops and says so).
async fn wal_keep_finding(store: &tokio_postgres::Client) -> Finding {
    match setup::wal_keep(store).await {
        Ok(v) if v == "-1" => ok("max_slot_wal_keep_size = -1: a slot may retain WAL without limit while capture is stopped; consider a limit sized for your longest outage"),
        Ok(v) => ok(format!("max_slot_wal_keep_size = {v}: a slot further behind is invalidated (capture then stops with a clear error)")),
        Err(e) => bad(format!("cannot read max_slot_wal_keep_size: {e}"), "check the user"),
    }
}

/// Connects to the SMTP server of `[channels.email]` (TLS and login included).
async fn email(e: &crate::config::EmailConfig) -> Finding {
    match crate::channel::email::Email::from_config(e) {
        Err(err) => bad(
            err.to_string(),
            "fix [channels.email] (see config/example.toml)",
        ),
        Ok(m) => match m.test_connection().await {
            Ok(()) => ok(format!(
                "SMTP server {} answers ({})",
                e.smtp,
                if e.uses_tls() {
                    "TLS"
                } else {
                    "no TLS: full-resource email subscriptions are refused"
                }
            )),
            Err(err) => bad(
                format!("SMTP server {}: {err}", e.smtp),
                "check channels.email.smtp, ca_file, username and the password variable",
            ),
        },
    }
}
