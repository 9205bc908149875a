//! `cdc-egress status`: what the registry, the daemon row and the slot say, for people and scripts.
//!
//! Reads only; works whether or not the daemon runs. URLs are shown redacted. Everything is about the
//! configured source (`source.name`), plus one line per source in the registry, so an operator of
//! several daemons sharing it sees them all (`--set source.name=<name>` shows another in full).

use serde::Serialize;

use crate::config::Config;
use crate::error::{Component, Error};
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
    /// The table's last DDL record: `<event> at <commit LSN>`, a rename naming where the table went
    /// (README "Schema changes").
    pub last_ddl: Option<String>,
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

/// A `cdc-egress reload` request whose marker no daemon has read yet.
#[derive(Debug, Serialize)]
pub struct PendingRequest {
    pub request: String,
    pub table: String,
    pub requested_at: String,
    /// The marker lies below this source WAL position.
    pub before_lsn: Option<String>,
}

/// One source of the registry (README "Running several daemons"), as its daemon last reported.
#[derive(Debug, Serialize)]
pub struct SourceSummary {
    pub name: String,
    pub database: Option<String>,
    pub slot: Option<String>,
    pub daemon_state: Option<String>,
    pub confirmed_lsn: Option<String>,
    pub seconds_since_heartbeat: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    /// `source.name`: everything below is about this source's rows.
    pub source_name: String,
    /// The source database's URL, redacted.
    pub source: String,
    pub publication: String,
    pub publication_exists: bool,
    pub slot: String,
    pub slot_exists: bool,
    pub slot_active: bool,
    pub confirmed_flush_lsn: Option<String>,
    pub slot_lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub slot_wal_status: Option<String>,
    /// WAL that may still be written before the slot is lost (`max_slot_wal_keep_size`).
    pub slot_safe_wal_bytes: Option<i64>,
    pub slot_invalidation_reason: Option<String>,
    pub daemon_state: Option<String>,
    pub daemon_heartbeat_at: Option<String>,
    pub daemon_seconds_since_heartbeat: Option<f64>,
    pub daemon_pid: Option<i32>,
    pub daemon_host: Option<String>,
    pub daemon_last_error: Option<String>,
    pub pending_requests: Vec<PendingRequest>,
    /// Open transactions a reload's cut is waiting for.
    pub cut_blockers: Vec<crate::pg::slot::CutBlocker>,
    /// Things an operator should act on, in words.
    pub warnings: Vec<String>,
    pub files: i64,
    pub unnotified_files: i64,
    pub tables: Vec<TableStatus>,
    pub reloads: Vec<ReloadStatus>,
    /// Every source in the registry, this one included.
    pub sources: Vec<SourceSummary>,
}

pub async fn collect(config: &Config) -> Result<Status, Error> {
    let source = config.source_conninfo()?;
    let src = crate::pg::slot::connect_source(&source).await?;
    let reg = config.registry_conninfo()?.connect().await?;
    let s = quote_ident(&config.registry.schema);
    let version =
        crate::sink::registry::migrate::installed_version(&reg, &config.registry.schema).await?;
    if version == 0 {
        return Err(Error::definite(
            Component::Registry,
            format!(
                "the registry schema {} is not installed: run `cdc-egress migrate` (or start the daemon)",
                config.registry.schema
            ),
        ));
    }
    if version < crate::sink::registry::migrate::LATEST {
        return Err(Error::definite(
            Component::Registry,
            format!(
                "the registry schema {} is at version {version}, this cdc-egress reads {}: run \
                 `cdc-egress migrate` (or start the daemon of this version)",
                config.registry.schema,
                crate::sink::registry::migrate::LATEST
            ),
        ));
    }
    let name = &config.source.name;
    let slot = crate::pg::slot::slot_info(&src, &config.source.slot).await?;
    let publication_exists = src
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.source.publication],
        )
        .await
        .map_err(crate::pg::conninfo::pg_error)?
        .is_some();
    let daemon = reg
        .query_opt(
            &format!(
                "SELECT state, heartbeat_at::text, last_error, pid, host, \
                 extract(epoch FROM now() - heartbeat_at)::float8 FROM {s}.daemon WHERE source = $1"
            ),
            &[name],
        )
        .await
        .map_err(|e| crate::sink::registry::pg_err("read daemon state", e))?;
    let counts = reg
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE notified_stream_seq IS NULL) FROM {s}.files \
                 WHERE source = $1"
            ),
            &[name],
        )
        .await
        .map_err(|e| crate::sink::registry::pg_err("count files", e))?;
    let tables = reg
        .query(
            &format!(
                "SELECT t.table_schema || '.' || t.table_name, t.mode, f.batch_id, t.last_commit_lsn::text, \
                 f.created_at::text, t.rows_total, t.schema_version, \
                 (SELECT d.event || CASE WHEN d.event = 'rename' AND d.details->>'table' IS DISTINCT FROM t.table_name \
                          THEN ' to ' || (d.details->>'schema') || '.' || (d.details->>'table') ELSE '' END \
                          || ' at ' || d.commit_lsn::text \
                    FROM {s}.ddl_history d WHERE d.source = t.source AND d.table_schema = t.table_schema \
                     AND d.table_name = t.table_name ORDER BY d.commit_lsn DESC, d.seq DESC LIMIT 1) \
                 FROM {s}.tables t LEFT JOIN {s}.files f ON f.id = t.last_file_id WHERE t.source = $1 ORDER BY 1"
            ),
            &[name],
        )
        .await
        .map_err(|e| crate::sink::registry::pg_err("read tables", e))?
        .into_iter()
        .map(|r| TableStatus {
            table: r.get(0),
            mode: r.get(1),
            last_batch: r.get(2),
            last_commit_lsn: r.get(3),
            last_batch_at: r.get(4),
            rows_total: r.get(5),
            schema_version: r.get(6),
            last_ddl: r.get(7),
        })
        .collect();
    let reloads: Vec<ReloadStatus> = reg
        .query(
            &format!(
                "SELECT id, table_schema || '.' || table_name, status, requested_at::text, cut_lsn::text, rows, \
                 estimate_rows, error FROM {s}.reloads WHERE source = $1 \
                 AND (status IN ('requested', 'running') OR finished_at > now() - interval '1 day') ORDER BY id"
            ),
            &[name],
        )
        .await
        .map_err(|e| crate::sink::registry::pg_err("read reloads", e))?
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
    let pending_requests = if version >= 3 {
        reg.query(
            &format!(
                "SELECT q.request, q.table_schema || '.' || q.table_name, q.requested_at::text, q.wal_lsn::text \
                 FROM {s}.reload_requests q WHERE q.source = $1 AND q.read_at IS NULL \
                 AND q.requested_at > now() - interval '7 days' ORDER BY q.requested_at"
            ),
            &[name],
        )
        .await
        .map_err(|e| crate::sink::registry::pg_err("read reload requests", e))?
        .iter()
        .map(|r| PendingRequest {
            request: r.get(0),
            table: r.get(1),
            requested_at: r.get(2),
            before_lsn: r.get(3),
        })
        .collect()
    } else {
        Vec::new()
    };
    let waiting_for_cut = reloads
        .iter()
        .any(|r: &ReloadStatus| r.status == "running" && r.cut_lsn.is_none());
    let cut_blockers = if waiting_for_cut {
        crate::pg::slot::cut_blockers(&src, &config.source.slot).await?
    } else {
        Vec::new()
    };
    let sources = reg
        .query(
            &format!(
                "SELECT n.name, s.database, s.slot, d.state, d.confirmed_lsn::text, \
                 extract(epoch FROM now() - d.heartbeat_at)::float8 \
                 FROM (SELECT name FROM {s}.sources UNION SELECT source FROM {s}.daemon \
                       UNION SELECT $1::text) n \
                 LEFT JOIN {s}.sources s ON s.name = n.name LEFT JOIN {s}.daemon d ON d.source = n.name \
                 ORDER BY 1"
            ),
            &[name],
        )
        .await
        .map_err(|e| crate::sink::registry::pg_err("read sources", e))?
        .iter()
        .map(|r| SourceSummary {
            name: r.get(0),
            database: r.get(1),
            slot: r.get(2),
            daemon_state: r.get(3),
            confirmed_lsn: r.get(4),
            seconds_since_heartbeat: r.get(5),
        })
        .collect();
    let mut status = Status {
        source_name: name.clone(),
        source: source.redacted(),
        publication: config.source.publication.clone(),
        publication_exists,
        slot: config.source.slot.clone(),
        slot_exists: slot.is_some(),
        slot_active: slot.as_ref().is_some_and(|s| s.active_pid.is_some()),
        confirmed_flush_lsn: slot
            .as_ref()
            .and_then(|s| s.confirmed_flush)
            .map(|l| l.to_string()),
        slot_lag_bytes: slot.as_ref().and_then(|s| s.lag_bytes),
        slot_wal_status: slot.as_ref().and_then(|s| s.wal_status.clone()),
        slot_safe_wal_bytes: slot.as_ref().and_then(|s| s.safe_wal_size),
        slot_invalidation_reason: slot.as_ref().and_then(|s| s.invalidation_reason.clone()),
        daemon_state: daemon.as_ref().map(|r| r.get(0)),
        daemon_heartbeat_at: daemon.as_ref().map(|r| r.get(1)),
        daemon_seconds_since_heartbeat: daemon.as_ref().and_then(|r| r.get(5)),
        daemon_pid: daemon.as_ref().and_then(|r| r.get(3)),
        daemon_host: daemon.as_ref().and_then(|r| r.get(4)),
        daemon_last_error: daemon.as_ref().and_then(|r| r.get(2)),
        pending_requests,
        cut_blockers,
        warnings: Vec::new(),
        files: counts.get(0),
        unnotified_files: counts.get(1),
        tables,
        reloads,
        sources,
    };
    status.warnings = warnings(
        &status,
        slot.as_ref().and_then(crate::pg::slot::retention_warning),
    );
    Ok(status)
}

/// Seconds after which a daemon that has not written its row is presumed gone (it writes every 5 s).
const STALE_AFTER_SECONDS: f64 = 60.0;

/// What an operator should act on, derived from the facts above.
fn warnings(s: &Status, slot_retention: Option<String>) -> Vec<String> {
    let mut w = Vec::new();
    if !s.publication_exists {
        w.push(format!(
            "publication {} does not exist in the source database: the daemon cannot stream (CREATE PUBLICATION … or fix source.publication)",
            s.publication
        ));
    }
    if let Some(reason) = &s.slot_invalidation_reason {
        w.push(format!(
            "replication slot {} was invalidated ({reason}): it can no longer stream; see source.slot_lost in the README",
            s.slot
        ));
    } else if s.slot_wal_status.as_deref() == Some("lost") {
        w.push(format!(
            "replication slot {} has lost required WAL: it can no longer stream; see source.slot_lost in the README",
            s.slot
        ));
    } else if let Some(wmsg) = slot_retention.as_deref() {
        w.push(format!("replication slot {}: {wmsg}", s.slot));
    }
    let stale = s
        .daemon_seconds_since_heartbeat
        .is_some_and(|a| a > STALE_AFTER_SECONDS);
    if s.slot_exists && !s.slot_active && (s.daemon_state.is_none() || stale) {
        w.push(format!(
            "no daemon is reading slot {}: WAL accumulates until `cdc-egress run` starts (or `cdc-egress drop-slot` if it is retired)",
            s.slot
        ));
    }
    for p in &s.pending_requests {
        w.push(format!(
            "reload of {} (request {}) has waited since {} for a daemon to read its marker (before {} in the WAL)",
            p.table,
            p.request,
            p.requested_at,
            p.before_lsn.as_deref().unwrap_or("-")
        ));
    }
    for b in &s.cut_blockers {
        w.push(format!(
            "a reload's cut waits for an open transaction to end, and the slot retains WAL meanwhile: {b}"
        ));
    }
    w
}

pub fn render_text(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "source      {} ({})", s.source_name, s.source);
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
        "publication {}{}",
        s.publication,
        if s.publication_exists {
            ""
        } else {
            " (missing)"
        }
    );
    if let Some(ws) = &s.slot_wal_status {
        let _ = writeln!(
            o,
            "slot WAL    {ws}{}{}",
            s.slot_safe_wal_bytes
                .map(|b| format!(", {b} bytes until max_slot_wal_keep_size"))
                .unwrap_or_default(),
            s.slot_invalidation_reason
                .as_deref()
                .map(|r| format!(", invalidated: {r}"))
                .unwrap_or_default()
        );
    }
    let daemon = match (&s.daemon_state, s.daemon_seconds_since_heartbeat) {
        (None, _) => "never ran".to_string(),
        (Some(state), age) => {
            let age = age.unwrap_or(0.0);
            let who = format!(
                "pid {} on {}",
                s.daemon_pid.map(|p| p.to_string()).unwrap_or("-".into()),
                s.daemon_host
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .unwrap_or("?")
            );
            if age > STALE_AFTER_SECONDS && !s.slot_active {
                format!("not running (last: {state}, {who}, {age:.0}s ago)")
            } else {
                format!("{state} ({who}, last seen {age:.0}s ago)")
            }
        }
    };
    let _ = writeln!(o, "daemon      {daemon}");
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
    let ddl: Vec<&TableStatus> = s.tables.iter().filter(|t| t.last_ddl.is_some()).collect();
    if !ddl.is_empty() {
        let _ = writeln!(o, "\n{:<32} LAST SCHEMA CHANGE", "TABLE");
        for t in ddl {
            let _ = writeln!(
                o,
                "{:<32} {}",
                t.table,
                t.last_ddl.as_deref().unwrap_or("-")
            );
        }
    }
    for wmsg in &s.warnings {
        let _ = writeln!(o, "warning     {wmsg}");
    }
    if s.sources.len() > 1 {
        let _ = writeln!(
            o,
            "\n{:<20} {:<20} {:<20} {:<12} {:<18} LAST SEEN",
            "SOURCE", "DATABASE", "SLOT", "DAEMON", "CONFIRMED"
        );
        for x in &s.sources {
            let _ = writeln!(
                o,
                "{:<20} {:<20} {:<20} {:<12} {:<18} {}",
                x.name,
                x.database.as_deref().unwrap_or("-"),
                x.slot.as_deref().unwrap_or("-"),
                x.daemon_state.as_deref().unwrap_or("never ran"),
                x.confirmed_lsn.as_deref().unwrap_or("-"),
                x.seconds_since_heartbeat
                    .map(|a| format!("{a:.0}s ago"))
                    .unwrap_or("-".into())
            );
        }
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
