//! `cdc-egress status`: what the registry, the daemon row and the slot say, for people and scripts.
//!
//! Reads only; works whether or not the daemon runs. URLs are shown redacted.

use serde::Serialize;

use crate::config::Config;
use crate::error::Error;
use crate::source::conninfo::ConnInfo;
use crate::table::quote_ident;

#[derive(Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub mode: String,
    pub last_batch: Option<String>,
    pub last_commit_lsn: Option<String>,
    pub last_batch_at: Option<String>,
    pub rows_total: i64,
    pub schema_version: i32,
}

#[derive(Debug, Serialize)]
pub struct ReloadStatus {
    pub id: i64,
    pub table: String,
    pub status: String,
    pub requested_at: String,
    pub cut_lsn: Option<String>,
    pub rows: Option<i64>,
    pub estimate_rows: Option<i64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub source: String,
    pub slot: String,
    pub slot_exists: bool,
    pub slot_active: bool,
    pub confirmed_flush_lsn: Option<String>,
    pub slot_lag_bytes: Option<i64>,
    pub daemon_state: Option<String>,
    pub daemon_heartbeat_at: Option<String>,
    pub daemon_last_error: Option<String>,
    pub files: i64,
    pub unnotified_files: i64,
    pub tables: Vec<TableStatus>,
    pub reloads: Vec<ReloadStatus>,
}

fn pg(what: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(d) if d.code().code() == "42P01" || d.code().code() == "3F000" => Error::definite(
            "registry",
            format!(
                "{what}: the registry is not installed ({}); run `cdc-egress migrate`",
                d.message()
            ),
        ),
        _ => Error::transient("registry", format!("{what}: {e}")),
    }
}

pub async fn collect(config: &Config) -> Result<Status, Error> {
    let source = ConnInfo::parse(config.source.url.expose())?;
    let src = source.connect().await?;
    let reg = ConnInfo::parse(config.registry.url.expose())?
        .connect()
        .await?;
    let s = quote_ident(&config.registry.schema);
    let slot = crate::source::slot::slot_info(&src, &config.source.slot).await?;
    let daemon = reg
        .query_opt(
            &format!(
                "SELECT state, heartbeat_at::text, last_error FROM {s}.daemon WHERE slot_name = $1"
            ),
            &[&config.source.slot],
        )
        .await
        .map_err(|e| pg("read daemon state", e))?;
    let counts = reg
        .query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE notified_stream_seq IS NULL) FROM {s}.files"),
            &[],
        )
        .await
        .map_err(|e| pg("count files", e))?;
    let tables = reg
        .query(
            &format!(
                "SELECT t.table_schema || '.' || t.table_name, t.mode, f.batch_id, t.last_commit_lsn::text, \
                 f.created_at::text, t.rows_total, t.schema_version \
                 FROM {s}.tables t LEFT JOIN {s}.files f ON f.id = t.last_file_id ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(|e| pg("read tables", e))?
        .into_iter()
        .map(|r| TableStatus {
            table: r.get(0),
            mode: r.get(1),
            last_batch: r.get(2),
            last_commit_lsn: r.get(3),
            last_batch_at: r.get(4),
            rows_total: r.get(5),
            schema_version: r.get(6),
        })
        .collect();
    let reloads = reg
        .query(
            &format!(
                "SELECT id, table_schema || '.' || table_name, status, requested_at::text, cut_lsn::text, rows, \
                 estimate_rows, error FROM {s}.reloads \
                 WHERE status IN ('requested', 'running') OR finished_at > now() - interval '1 day' ORDER BY id"
            ),
            &[],
        )
        .await
        .map_err(|e| pg("read reloads", e))?
        .into_iter()
        .map(|r| ReloadStatus {
            id: r.get(0),
            table: r.get(1),
            status: r.get(2),
            requested_at: r.get(3),
            cut_lsn: r.get(4),
            rows: r.get(5),
            estimate_rows: r.get(6),
            error: r.get(7),
        })
        .collect();
    Ok(Status {
        source: source.redacted(),
        slot: config.source.slot.clone(),
        slot_exists: slot.is_some(),
        slot_active: slot.as_ref().is_some_and(|s| s.active_pid.is_some()),
        confirmed_flush_lsn: slot
            .as_ref()
            .and_then(|s| s.confirmed_flush)
            .map(|l| l.to_string()),
        slot_lag_bytes: slot.as_ref().and_then(|s| s.lag_bytes),
        daemon_state: daemon.as_ref().map(|r| r.get(0)),
        daemon_heartbeat_at: daemon.as_ref().map(|r| r.get(1)),
        daemon_last_error: daemon.as_ref().and_then(|r| r.get(2)),
        files: counts.get(0),
        unnotified_files: counts.get(1),
        tables,
        reloads,
    })
}

pub fn render_text(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "source      {}", s.source);
    let _ = writeln!(
        o,
        "slot        {} ({}{})",
        s.slot,
        if s.slot_exists { "exists" } else { "missing" },
        if s.slot_active { ", active" } else { "" }
    );
    let _ = writeln!(
        o,
        "confirmed   {}",
        s.confirmed_flush_lsn.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        o,
        "slot lag    {} bytes",
        s.slot_lag_bytes
            .map(|v| v.to_string())
            .unwrap_or("-".into())
    );
    let _ = writeln!(
        o,
        "daemon      {} (last seen {})",
        s.daemon_state.as_deref().unwrap_or("never ran"),
        s.daemon_heartbeat_at.as_deref().unwrap_or("-")
    );
    if let Some(e) = &s.daemon_last_error {
        let _ = writeln!(o, "last error  {e}");
    }
    let _ = writeln!(
        o,
        "files       {} ({} awaiting notice)",
        s.files, s.unnotified_files
    );
    let _ = writeln!(
        o,
        "\n{:<32} {:<10} {:>12} {:>6} {:<18} LAST BATCH",
        "TABLE", "MODE", "ROWS", "SCHEMA", "LAST LSN"
    );
    for t in &s.tables {
        let _ = writeln!(
            o,
            "{:<32} {:<10} {:>12} {:>6} {:<18} {}",
            t.table,
            t.mode,
            t.rows_total,
            t.schema_version,
            t.last_commit_lsn.as_deref().unwrap_or("-"),
            t.last_batch.as_deref().unwrap_or("-")
        );
    }
    if !s.reloads.is_empty() {
        let _ = writeln!(o, "\nRELOADS");
        for r in &s.reloads {
            let progress = match (r.rows, r.estimate_rows) {
                (Some(n), Some(e)) if e > 0 => format!("{n}/{e} rows"),
                (Some(n), _) => format!("{n} rows"),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "#{:<6} {:<32} {:<10} cut {} {} {}",
                r.id,
                r.table,
                r.status,
                r.cut_lsn.as_deref().unwrap_or("-"),
                progress,
                r.error.as_deref().unwrap_or("")
            );
        }
    }
    o
}
