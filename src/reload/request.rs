//! `cdc-egress reload <schema.table>... [--wait]`: request reloads without talking to the daemon.
//!
//! The request is a comment on the registry schema in the source database,
//! `COMMENT ON SCHEMA <registry schema> IS 'cdc-egress reload <schema.table> request=<id> source=<name>'`,
//! one per table, all in one transaction; only the daemon of that `source.name` acts on it. The event trigger installed by `migrate` turns each into a
//! transactional logical message, so the marker reaches the daemon through the replication stream at
//! exactly the commit position of that transaction. A DBA can issue the same statement inside the
//! migration that rewrote the table.
//!
//! Before anything is written this command checks, with clear errors and no side effect: the table
//! exists, it is in the publication, no reload of it is active, and the event trigger is installed.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Component, Error};
use crate::pg::conninfo::pg_error;
use crate::sink::registry::migrate::{installed_version, marker_trigger_name};
use crate::table::{quote_ident, quote_literal, TableName};

fn definite(msg: impl Into<String>) -> Error {
    Error::definite(Component::Reload, msg)
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
            Component::Config,
            "name at least one table: cdc-egress reload schema.table ...",
        ));
    }
    let mut src = crate::pg::slot::connect_source(&config.source_conninfo()?).await?;
    let registry = config.registry_conninfo()?.connect().await?;
    let schema = &config.registry.schema;
    let publication = &config.source.publication;
    let pub_exists = src
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(pg_error)?
        .is_some();
    if !pub_exists {
        return Err(Error::definite(
            Component::Config,
            format!(
                "publication {publication} (source.publication) does not exist in the source database: \
                 create it (CREATE PUBLICATION {} FOR ALL TABLES) or fix source.publication",
                quote_ident(publication)
            ),
        ));
    }
    match installed_version(&registry, schema).await? {
        0 => {
            return Err(definite(format!(
                "the registry schema {schema} is not installed: run `cdc-egress migrate` first"
            )))
        }
        v if v < crate::sink::registry::migrate::LATEST => {
            return Err(definite(format!(
                "the registry schema {schema} is at version {v}, this cdc-egress needs {}: run `cdc-egress migrate` \
                 (or restart the daemon with this version) first",
                crate::sink::registry::migrate::LATEST
            )))
        }
        _ => {}
    }
    let trigger = marker_trigger_name(schema);
    let has_trigger = src
        .query_opt(
            "SELECT 1 FROM pg_event_trigger WHERE evtname = $1 AND evtenabled <> 'D'",
            &[&trigger],
        )
        .await
        .map_err(pg_error)?
        .is_some();
    if !has_trigger {
        return Err(definite(format!(
            "the reload-marker event trigger {trigger} is not installed in the source database \
             (event triggers need a superuser): run `cdc-egress migrate` as a superuser"
        )));
    }
    // A trigger installed by a version before source names ignores a comment naming a source:
    // the request would silently never reach a daemon.
    let current = src
        .query_opt(
            "SELECT prosrc LIKE '%source=%' FROM pg_proc WHERE oid = to_regprocedure($1)",
            &[&format!("{}.reload_marker()", quote_ident(schema))],
        )
        .await
        .map_err(pg_error)?
        .is_some_and(|r| r.get::<_, bool>(0));
    if !current {
        return Err(definite(format!(
            "the reload-marker event trigger {trigger} was installed by an older cdc-egress and does \
             not know source names: run `cdc-egress migrate` as a superuser to refresh it"
        )));
    }
    let mut parsed = Vec::new();
    for t in tables {
        let name = TableName::parse(t).ok_or_else(|| {
            Error::definite(
                Component::Config,
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
            .map_err(pg_error)?
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
            .map_err(pg_error)?
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
                    "SELECT id, status FROM {}.reloads WHERE source = $3 AND table_schema = $1 \
                     AND table_name = $2 AND status IN ('requested', 'running')",
                    quote_ident(schema)
                ),
                &[&name.schema, &name.name, &config.source.name],
            )
            .await
            .map_err(pg_error)?;
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
    let tx = src.transaction().await.map_err(pg_error)?;
    for (name, id) in &parsed {
        tx.batch_execute(&format!(
            "COMMENT ON SCHEMA {} IS {}",
            quote_ident(schema),
            quote_literal(&format!(
                "cdc-egress reload {} request={id} source={}",
                name.quoted(),
                config.source.name
            ))
        ))
        .await
        .map_err(|e| pg_error(e).context(format!("request a reload of {name}")))?;
    }
    tx.commit().await.map_err(pg_error)?;
    // Remember the requests, so `status` and `--wait` can tell that no daemon has read them yet. The
    // markers are in the WAL already; this row is only for people, so failing to write it is a warning.
    let wal: Option<String> = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .ok()
        .map(|r| r.get(0));
    for (name, id) in &parsed {
        if let Err(e) = registry
            .execute(
                &format!(
                    "INSERT INTO {}.reload_requests (request, table_schema, table_name, wal_lsn, source) \
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5) ON CONFLICT DO NOTHING",
                    quote_ident(schema)
                ),
                &[id, &name.schema, &name.name, &wal, &config.source.name],
            )
            .await
        {
            tracing::warn!(error = %pg_error(e), "cannot record the reload request in the registry");
        }
    }
    Ok(parsed)
}

/// A reload as `--wait` last saw it.
struct Seen {
    id: i64,
    table: String,
    status: String,
    rows: i64,
    estimate: i64,
    bytes: i64,
    parts: i32,
    cut: Option<String>,
    error: Option<String>,
}

/// How often `reload --wait` reads the registry.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Whether a `reload --wait` may end: every request was answered by a daemon (`answered`, counted
/// before `seen` was read) and every reload seen has finished. At least one reload must be seen:
/// an answered request always has one.
fn wait_is_over(answered: i64, requested: usize, seen: &[Seen]) -> bool {
    answered as usize == requested
        && !seen.is_empty()
        && seen
            .iter()
            .all(|r| r.status == "done" || r.status == "failed")
}

/// Waits until every requested reload is done or failed, showing progress (a bar on a terminal,
/// log lines otherwise), and says what it waits for when nothing moves: no daemon reading the
/// request, or open transactions the cut must wait for. Ends with each reload's id, rows and where
/// its files are. Fails if any reload failed, or when `timeout` passes first (the reloads go on).
pub async fn wait(
    config: &Config,
    requests: &[(TableName, String)],
    timeout: Option<Duration>,
) -> Result<(), Error> {
    let registry = config.registry_conninfo()?.connect().await?;
    let source = config.source_conninfo()?.connect().await?;
    let ids: Vec<String> = requests.iter().map(|(_, r)| r.clone()).collect();
    let tty = std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>28} [{bar:30}] {pos}/{len} rows {msg} {per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut shown: std::collections::HashMap<i64, indicatif::ProgressBar> = Default::default();
    let started = Instant::now();
    let mut progress_line = crate::observe::Throttle::new(Duration::from_secs(5));
    let mut last_hint = Instant::now();
    let rs = quote_ident(&config.registry.schema);
    loop {
        // Requests a daemon has read: each has its own reload row or joined another one. Counted
        // *before* the reloads are read: a daemon may answer between the two queries, and a request
        // counted as answered here already has its reload row (the answer creates or joins it, and
        // reload rows are never deleted), so `seen` below includes it. Read the other way round, a
        // request answered in between counted as answered while its reload was missing from `seen`,
        // and the wait ended at once, reporting nothing.
        let answered: i64 = registry
            .query_one(
                &format!(
                    "SELECT count(*) FROM unnest($1::text[]) q(request) \
                     WHERE EXISTS (SELECT 1 FROM {rs}.reloads r WHERE r.request = q.request) \
                     OR EXISTS (SELECT 1 FROM {rs}.reload_requests p WHERE p.request = q.request AND p.reload_id IS NOT NULL)"
                ),
                &[&ids],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        let seen: Vec<Seen> = registry
            .query(
                // A request is answered by the reload it created or joined (another request's
                // reload of the same table, when one was already active).
                &format!(
                    "SELECT id, table_schema || '.' || table_name, status, coalesce(rows, 0), \
                     coalesce(estimate_rows, 0), coalesce(bytes, 0), coalesce(parts, 0), cut_lsn::text, error \
                     FROM {rs}.reloads WHERE request = ANY($1) \
                     OR id IN (SELECT reload_id FROM {rs}.reload_requests WHERE request = ANY($1)) ORDER BY id"
                ),
                &[&ids],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| Seen {
                id: r.get(0),
                table: r.get(1),
                status: r.get(2),
                rows: r.get(3),
                estimate: r.get(4),
                bytes: r.get(5),
                parts: r.get(6),
                cut: r.get(7),
                error: r.get(8),
            })
            .collect();
        let finished = seen
            .iter()
            .filter(|r| r.status == "done" || r.status == "failed")
            .count();
        let print_lines = !tty && progress_line.ready();
        for r in &seen {
            if tty {
                let bar = shown.entry(r.id).or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new(r.estimate.max(1) as u64));
                    b.set_style(style.clone());
                    b.set_prefix(r.table.clone());
                    b
                });
                bar.set_length(r.estimate.max(r.rows).max(1) as u64);
                bar.set_position(r.rows as u64);
                bar.set_message(format!(
                    "{} {}",
                    indicatif::HumanBytes(r.bytes as u64),
                    r.status
                ));
                if r.status == "done" || r.status == "failed" {
                    bar.finish();
                }
            } else if print_lines {
                eprintln!(
                    "reload #{} {}: {} rows of ~{} exported, {} bytes, {}",
                    r.id, r.table, r.rows, r.estimate, r.bytes, r.status
                );
            }
        }
        let all_answered = answered as usize == ids.len();
        if wait_is_over(answered, ids.len(), &seen) {
            return finish(config, &registry, &seen, started.elapsed()).await;
        }
        if last_hint.elapsed() >= Duration::from_secs(10) {
            last_hint = Instant::now();
            let slot = crate::pg::slot::slot_info(&source, &config.source.slot).await?;
            if !all_answered {
                // The registry row is created by the daemon when it reads the marker from the WAL.
                let confirmed = slot
                    .as_ref()
                    .and_then(|s| s.confirmed_flush)
                    .map(|l| l.to_string())
                    .unwrap_or("-".into());
                let why = match slot.as_ref().map(|s| s.active_pid) {
                    None => format!("replication slot {} does not exist", config.source.slot),
                    Some(None) => format!(
                        "no daemon is reading slot {} (confirmed {confirmed})",
                        config.source.slot
                    ),
                    Some(Some(pid)) => format!(
                        "the daemon (pid {pid}) has not reached the request yet (confirmed {confirmed})"
                    ),
                };
                eprintln!("waiting for a daemon to read the request from the WAL: {why}; is `cdc-egress run` running?");
            }
            if seen
                .iter()
                .any(|r| r.status == "running" && r.cut.is_none())
            {
                let retained = slot
                    .as_ref()
                    .and_then(|s| s.lag_bytes)
                    .map(|b| {
                        format!(
                            "; slot {} retains {b} bytes of WAL meanwhile",
                            config.source.slot
                        )
                    })
                    .unwrap_or_default();
                for b in crate::pg::slot::cut_blockers(&source, &config.source.slot).await? {
                    eprintln!(
                        "the reload's cut waits for an open transaction to end: {b}{retained}"
                    );
                }
            }
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
            return Err(Error::transient(
                Component::Reload,
                format!(
                    "gave up waiting after {}: {} of {} requests read by a daemon, {} of {} reloads finished \
                     (they go on; see cdc-egress status)",
                    humantime::format_duration(t),
                    answered,
                    ids.len(),
                    finished,
                    seen.len()
                ),
            ));
        }
        // Two indexed registry reads per poll: cheap enough to poll often, so the wait ends within
        // a tenth of a second of the reload's end (at 500 ms, the wait added 0.25 s on average).
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Prints each finished reload (id, rows, parts, where its files are) and fails if any failed.
async fn finish(
    config: &Config,
    registry: &tokio_postgres::Client,
    seen: &[Seen],
    took: Duration,
) -> Result<(), Error> {
    let store =
        crate::sink::store::Store::open(&config.output.url, &config.output.options_exposed()).ok();
    let mut failed = Vec::new();
    for r in seen {
        if r.status == "failed" {
            failed.push(format!(
                "{}: {}",
                r.table,
                r.error.clone().unwrap_or_default()
            ));
            continue;
        }
        let manifest: Option<String> = registry
            .query_opt(
                &format!(
                    "SELECT manifest_path FROM {}.files WHERE reload_id = $1 ORDER BY id LIMIT 1",
                    quote_ident(&config.registry.schema)
                ),
                &[&r.id],
            )
            .await
            .map_err(pg_error)?
            .and_then(|row| row.get(0));
        let place = match (manifest, &store) {
            (Some(m), Some(st)) => st.url_of(&crate::sink::layout::stored_path(&m)),
            (Some(m), None) => m,
            (None, _) => "-".into(),
        };
        println!(
            "reload #{} of {} done: {} rows in {} part(s), cut {}, manifest {place}",
            r.id,
            r.table,
            r.rows,
            r.parts,
            r.cut.as_deref().unwrap_or("-")
        );
    }
    if !failed.is_empty() {
        return Err(Error::definite(
            Component::Reload,
            format!("reload failed: {}", failed.join("; ")),
        ));
    }
    eprintln!("all reloads done in {:.1}s", took.as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{wait_is_over, Seen};

    fn seen(status: &str) -> Seen {
        Seen {
            id: 1,
            table: "public.t".into(),
            status: status.into(),
            rows: 0,
            estimate: 0,
            bytes: 0,
            parts: 0,
            cut: None,
            error: None,
        }
    }

    #[test]
    fn a_wait_ends_only_when_every_request_is_answered_and_every_reload_seen_has_finished() {
        assert!(wait_is_over(1, 1, &[seen("done")]));
        assert!(wait_is_over(2, 2, &[seen("done"), seen("failed")]));
        assert!(!wait_is_over(1, 1, &[seen("running")]));
        assert!(!wait_is_over(1, 2, &[seen("done")]));
        // Answered, but its reload not read (yet): not over, however the two reads interleave.
        assert!(!wait_is_over(1, 1, &[]));
    }
}
