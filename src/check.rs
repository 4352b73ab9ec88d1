//! `fhir-cdc check`: validates the configuration and the database, and says what to fix
//! with the SQL to run.

use crate::capture::setup;
use crate::config::Config;
use crate::queue;

/// One finding: ok, or what is wrong and how to fix it.
pub struct Finding {
    pub ok: bool,
    pub what: String,
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        what: what.into(),
        fix: None,
    }
}

fn bad(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

pub async fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![ok(format!(
        "config: {} topic(s), profile {:?}, FHIR {:?}",
        cfg.topics.len(),
        cfg.source.profile,
        cfg.source.fhir_version
    ))];
    match crate::capture::searcher(cfg).await {
        Ok(s) => {
            for t in &cfg.topics {
                match crate::fhir::trigger::compile(&t.topic, &s.registry, &s.fp) {
                    Ok(c) => out.push(ok(format!(
                        "topic {}: {} trigger(s), {} filter parameter(s)",
                        t.topic.url,
                        c.triggers.len(),
                        c.filters.len()
                    ))),
                    Err(e) => out.push(bad(e, "fix the topic's criteria (search parameters of source.fhir_version, FHIRPath)")),
                }
            }
        }
        Err(e) => out.push(bad(format!("FHIRPath engine: {e}"), "report this as a bug")),
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
    out.push(ok("connected to the store database"));
    match store.query_one("SHOW wal_level", &[]).await {
        Ok(r) if r.get::<_, String>(0) == "logical" => out.push(ok("wal_level = logical")),
        Ok(r) => out.push(bad(
            format!(
                "wal_level = {} (logical replication needs logical)",
                r.get::<_, String>(0)
            ),
            "ALTER SYSTEM SET wal_level = logical;  -- then restart Postgres",
        )),
        Err(e) => out.push(bad(
            format!("cannot read wal_level: {e}"),
            "grant the user access to pg_settings",
        )),
    }
    match store
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) if r.get::<_, bool>(0) => out.push(ok("the user may replicate")),
        Ok(_) => out.push(bad(
            "the user lacks the REPLICATION attribute",
            "ALTER ROLE <user> REPLICATION;",
        )),
        Err(e) => out.push(bad(
            format!("cannot read role attributes: {e}"),
            "check the user",
        )),
    }
    match store
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int",
            &[],
        )
        .await
    {
        Ok(r) => {
            let free: i32 = r.get(0);
            if free > 0 || matches!(setup::slot_plugin(&store, &cfg.source.slot).await, Ok(Some(_))) {
                out.push(ok(format!("replication slots: {free} free")));
            } else {
                out.push(bad("no free replication slot", "ALTER SYSTEM SET max_replication_slots = 10;  -- then restart Postgres"));
            }
        }
        Err(e) => out.push(bad(format!("cannot read max_replication_slots: {e}"), "check the user")),
    }
    match setup::publication_exists(&store, &cfg.source.publication).await {
        Ok(true) => out.push(ok(format!("publication {} exists", cfg.source.publication))),
        Ok(false) => {
            let sql = setup::publication_sql(&store, &cfg.source)
                .await
                .unwrap_or_else(|e| format!("-- {e}"));
            if cfg.source.create_missing {
                out.push(ok(format!(
                    "publication {} is missing; capture will create it: {sql}",
                    cfg.source.publication
                )));
            } else {
                out.push(bad(
                    format!("publication {} is missing", cfg.source.publication),
                    sql,
                ));
            }
        }
        Err(e) => out.push(bad(
            format!("cannot read publications: {e}"),
            "check the user",
        )),
    }
    match setup::slot_plugin(&store, &cfg.source.slot).await {
        Ok(Some(p)) if p == "pgoutput" => {
            out.push(ok(format!("slot {} exists (pgoutput)", cfg.source.slot)))
        }
        Ok(Some(p)) => out.push(bad(
            format!("slot {} uses plugin {p}", cfg.source.slot),
            format!(
                "SELECT pg_drop_replication_slot('{}');  -- or set source.slot to another name",
                cfg.source.slot
            ),
        )),
        Ok(None) if cfg.source.create_missing => out.push(ok(format!(
            "slot {} is missing; capture will create it: {}",
            cfg.source.slot,
            setup::slot_sql(&cfg.source.slot)
        ))),
        Ok(None) => out.push(bad(
            format!("slot {} is missing", cfg.source.slot),
            setup::slot_sql(&cfg.source.slot),
        )),
        Err(e) => out.push(bad(format!("cannot read slots: {e}"), "check the user")),
    }
    match queue::connect(cfg.queue_url()).await {
        Ok(q) => match q
            .query_one("SELECT has_database_privilege(current_database(), 'CREATE') OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'fhir_cdc')", &[])
            .await
        {
            Ok(r) if r.get::<_, bool>(0) => out.push(ok("queue database reachable; schema fhir_cdc can be created")),
            Ok(_) => out.push(bad("the user cannot create schema fhir_cdc in the queue database", "GRANT CREATE ON DATABASE <db> TO <user>;")),
            Err(e) => out.push(bad(format!("queue database: {e}"), "check queue.url")),
        },
        Err(e) => out.push(bad(format!("cannot connect to the queue database: {e}"), "check queue.url (or FHIR_CDC_QUEUE_URL)")),
    }
    out
}
