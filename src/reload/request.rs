//! `cdc-egress reload <schema.table>... [--wait]`: request reloads without talking to the daemon.
//!
//! The request is a comment on the registry schema in the source database,
//! `COMMENT ON SCHEMA <registry schema> IS 'cdc-egress reload <schema.table> request=<id>'`, one per
//! table, all in one transaction. The event trigger installed by `migrate` turns each into a
//! transactional logical message, so the marker reaches the daemon through the replication stream at
//! exactly the commit position of that transaction. A DBA can issue the same statement inside the
//! migration that rewrote the table.
//!
//! Before anything is written this command checks, with clear errors and no side effect: the table
//! exists, it is in the publication, no reload of it is active, and the event trigger is installed.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::Error;
use crate::register::migrate::{installed_version, marker_trigger_name};
use crate::source::conninfo::{pg_error, ConnInfo};
use crate::table::{quote_ident, quote_literal, TableName};

fn definite(msg: impl Into<String>) -> Error {
    Error::definite("reload", msg)
}

/// A random request id (hex), unique enough to correlate a request with its registry row.
fn request_id() -> String {
    let mut bytes = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    let t =
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64 ^ std::process::id() as u64;
    for (i, b) in t.to_be_bytes().iter().enumerate() {
        bytes[i] ^= b;
    }
    hex::encode(bytes)
}

/// Validates and places the markers; returns `(table, request id)` pairs.
pub async fn request(
    config: &Config,
    tables: &[String],
) -> Result<Vec<(TableName, String)>, Error> {
    if tables.is_empty() {
        return Err(Error::definite(
            "config",
            "name at least one table: cdc-egress reload schema.table ...",
        ));
    }
    let source = ConnInfo::parse(config.source.url.expose())?;
    let mut src = source.connect().await?;
    let registry = ConnInfo::parse(config.registry.url.expose())?
        .connect()
        .await?;
    let schema = &config.registry.schema;
    if installed_version(&registry, schema).await? == 0 {
        return Err(definite(format!(
            "the registry schema {schema} is not installed: run `cdc-egress migrate` first"
        )));
    }
    let trigger = marker_trigger_name(schema);
    let has_trigger = src
        .query_opt(
            "SELECT 1 FROM pg_event_trigger WHERE evtname = $1 AND evtenabled <> 'D'",
            &[&trigger],
        )
        .await
        .map_err(|e| pg_error(&e))?
        .is_some();
    if !has_trigger {
        return Err(definite(format!(
            "the reload-marker event trigger {trigger} is not installed in the source database \
             (event triggers need a superuser): run `cdc-egress migrate` as a superuser"
        )));
    }
    let mut parsed = Vec::new();
    for t in tables {
        let name = TableName::parse(t).ok_or_else(|| {
            Error::definite(
                "config",
                format!("{t:?} is not a table name; use schema.table"),
            )
        })?;
        if name.schema == *schema {
            return Err(definite(format!(
                "{name} is one of cdc-egress's own registry tables: they are never exported"
            )));
        }
        let exists = src
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&name.schema, &name.name],
            )
            .await
            .map_err(|e| pg_error(&e))?
            .is_some();
        if !exists {
            return Err(definite(format!(
                "table {name} does not exist in the source database"
            )));
        }
        let published = src
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&config.source.publication, &name.schema, &name.name],
            )
            .await
            .map_err(|e| pg_error(&e))?
            .is_some();
        if !published {
            return Err(definite(format!(
                "table {name} is not in publication {}: only published tables can be reloaded \
                 (ALTER PUBLICATION {} ADD TABLE {})",
                config.source.publication,
                quote_ident(&config.source.publication),
                name.quoted()
            )));
        }
        let active = registry
            .query_opt(
                &format!(
                    "SELECT id, status FROM {}.reloads WHERE table_schema = $1 AND table_name = $2 \
                     AND status IN ('requested', 'running')",
                    quote_ident(schema)
                ),
                &[&name.schema, &name.name],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        if let Some(r) = active {
            return Err(definite(format!(
                "a reload of {name} is already {} (reload #{}): wait for it to finish (cdc-egress status)",
                r.get::<_, String>(1),
                r.get::<_, i64>(0)
            )));
        }
        if parsed.iter().any(|(n, _): &(TableName, String)| n == &name) {
            continue;
        }
        parsed.push((name, request_id()));
    }
    let tx = src.transaction().await.map_err(|e| pg_error(&e))?;
    for (name, id) in &parsed {
        tx.batch_execute(&format!(
            "COMMENT ON SCHEMA {} IS {}",
            quote_ident(schema),
            quote_literal(&format!("cdc-egress reload {} request={id}", name.quoted()))
        ))
        .await
        .map_err(|e| pg_error(&e).context(format!("request a reload of {name}")))?;
    }
    tx.commit().await.map_err(|e| pg_error(&e))?;
    Ok(parsed)
}

/// Waits until every requested reload is done or failed, showing progress (a bar on a terminal,
/// log lines otherwise). Fails if any reload failed.
pub async fn wait(config: &Config, requests: &[(TableName, String)]) -> Result<(), Error> {
    let registry = ConnInfo::parse(config.registry.url.expose())?
        .connect()
        .await?;
    let ids: Vec<String> = requests.iter().map(|(_, r)| r.clone()).collect();
    let tty = std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>28} [{bar:30}] {pos}/{len} rows {msg} {per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut shown: std::collections::HashMap<String, indicatif::ProgressBar> = Default::default();
    let started = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let mut hinted = false;
    loop {
        let rows = registry
            .query(
                &format!(
                    "SELECT request, table_schema || '.' || table_name, status, coalesce(rows, 0), \
                     coalesce(estimate_rows, 0), coalesce(bytes, 0), error FROM {}.reloads WHERE request = ANY($1)",
                    quote_ident(&config.registry.schema)
                ),
                &[&ids],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        let mut finished = 0;
        let mut failed = Vec::new();
        for r in &rows {
            let (req, table, status): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let (done_rows, est, bytes): (i64, i64, i64) = (r.get(3), r.get(4), r.get(5));
            if status == "done" || status == "failed" {
                finished += 1;
            }
            if status == "failed" {
                failed.push(format!(
                    "{table}: {}",
                    r.get::<_, Option<String>>(6).unwrap_or_default()
                ));
            }
            if tty {
                let bar = shown.entry(req).or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new(est.max(1) as u64));
                    b.set_style(style.clone());
                    b.set_prefix(table.clone());
                    b
                });
                bar.set_length(est.max(done_rows).max(1) as u64);
                bar.set_position(done_rows as u64);
                bar.set_message(format!("{} {status}", indicatif::HumanBytes(bytes as u64)));
                if status == "done" || status == "failed" {
                    bar.finish();
                }
            }
        }
        if !tty && last_line.elapsed() >= Duration::from_secs(5) {
            for r in &rows {
                eprintln!(
                    "reload {}: {} rows of ~{} exported, {} bytes, {}",
                    r.get::<_, String>(1),
                    r.get::<_, i64>(3),
                    r.get::<_, i64>(4),
                    r.get::<_, i64>(5),
                    r.get::<_, String>(2)
                );
            }
            last_line = Instant::now();
        }
        if rows.len() < ids.len() && !hinted && started.elapsed() > Duration::from_secs(10) {
            // The registry row is created by the daemon when it reads the marker from the WAL.
            eprintln!(
                "still waiting for the daemon to read the request from the WAL: is `cdc-egress run` running for slot {}?",
                config.source.slot
            );
            hinted = true;
        }
        if finished == ids.len() && rows.len() == ids.len() {
            if failed.is_empty() {
                eprintln!(
                    "all reloads done in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            return Err(Error::definite(
                "reload",
                format!("reload failed: {}", failed.join("; ")),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
