//! The daemon's side of reloads: react to markers, take cuts, release holds, register exports.
//!
//! # Hand-over, step by step (ARCHITECTURE.md, invariant 3)
//! 1. The batcher reads a START marker in transaction `M`: it seals the table's open batch there and
//!    *holds* the table (its next rows are parked on disk; the ack cannot pass them).
//! 2. The coordinator records the reload (`running`), takes a cut `C` (temporary slot +
//!    exported snapshot, so `C` is after `M`'s commit), records `C` in the registry, and only then
//!    releases the hold with `C`: parked rows are streamed again, those below `C` (also in the
//!    export) in a batch of their own that the first row at or after `C` seals. The table's streaming
//!    batches after the reload therefore begin at or after `C`, and nothing is dropped, so a reload
//!    that fails later loses nothing.
//! 3. The export runs from the snapshot in the background; the stream, this table included, goes on,
//!    and the ack with it: the hold lasted only as long as taking the cut.
//! 4. When the parts are uploaded, the parts and `done` commit in one registry transaction; then the
//!    manifest, the reload notice, and an END marker in the WAL.
//!
//! # Restarts
//! - Crash before `C` is recorded: the hold pinned the ack below `M`, so `M` is read again after the
//!   restart and the same request (matched by its request id) starts over.
//! - Crash after `C` is recorded: the reload is restarted at session start with a new cut `C'`, the
//!   table held from the first streamed row. Streaming files registered in between may hold rows below
//!   `C'`; they are superseded by the reload, which is why the documented consumer rule applies
//!   streaming rows with `_commit_lsn >= cut_lsn` (for reloads that never restarted, this is exactly
//!   "every streaming batch after the reload").
//! - A transient failure (of the cut or the export) retries with a new cut after a backoff (up to
//!   [`MAX_ATTEMPTS`]); a definite one, or too many, marks the reload `failed` with its reason and
//!   releases a table still held. Other tables are not affected.
//! - The marker of a reload that already finished, read again after a restart, is ignored.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::deliver::{finish_reload, retry, Sinks};
use crate::core::batch::{Control, Position};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::reload::export::{self, ExportEvent, Exporter, Progress, TableExport, TableJob};
use crate::reload::notice::reload_batch_id;
use crate::sink::layout;
use crate::sink::registry::migrate::marker_prefix;
use crate::sink::registry::{FileKind, FileRecord};
use crate::table::{quote_literal, TableName};

pub const MAX_ATTEMPTS: u32 = 3;

/// Messages from the coordinator to the batcher thread.
#[derive(Debug)]
pub struct Release {
    pub table: TableName,
    pub cut: Lsn,
}

struct Active {
    reload_id: i64,
    request: String,
    cut: Option<Lsn>,
    attempts: u32,
    progress: Arc<Progress>,
}

pub struct Coordinator {
    pub sinks: Sinks,
    pub exporter: Arc<Exporter>,
    pub catalog: Arc<tokio_postgres::Client>,
    pub registry_schema: String,
    pub release: mpsc::Sender<Release>,
}

/// The export jobs of this coordinator. They are aborted when it is dropped (session end), so an
/// attempt of an earlier session can never keep writing into a reload directory a new attempt uses.
#[derive(Default)]
struct Jobs {
    started: u64,
    running: tokio::task::JoinSet<()>,
}

enum JobEvent {
    /// Start another attempt for these tables (after a backoff).
    Retry(Vec<TableName>),
    Cut {
        tables: Vec<TableName>,
        cut: Lsn,
        snapshot: String,
    },
    Export(ExportEvent),
    Failed {
        tables: Vec<TableName>,
        error: Error,
    },
}

impl Coordinator {
    /// Runs until the controls channel closes. `resume` are reloads to start now (their tables were
    /// held by the session before streaming began).
    pub async fn run(
        self,
        mut controls: mpsc::UnboundedReceiver<Control>,
        resume: Vec<(TableName, i64, String)>,
    ) -> Result<(), Error> {
        let (events_tx, mut events) = mpsc::unbounded_channel::<JobEvent>();
        let mut active: HashMap<TableName, Active> = HashMap::new();
        let mut jobs = Jobs::default();
        if !resume.is_empty() {
            for (t, id, request) in &resume {
                active.insert(
                    t.clone(),
                    Active {
                        reload_id: *id,
                        request: request.clone(),
                        cut: None,
                        attempts: 0,
                        progress: Default::default(),
                    },
                );
            }
            let tables: Vec<TableName> = resume.into_iter().map(|(t, _, _)| t).collect();
            self.start_job(&mut jobs, &tables, &active, &events_tx)
                .await?;
        }
        let mut progress_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                c = controls.recv() => {
                    let Some(Control::ReloadStart { table, request, marker_commit_lsn }) = c else { return Ok(()) };
                    if let Some(a) = active.get(&table) {
                        // A marker read again after a restart, or a second request while one runs: the
                        // running reload covers it. Release the hold with the cut we have, if any.
                        tracing::info!(table = %table, reload = a.reload_id, "reload already running; marker joins it");
                        if let Some(cut) = a.cut {
                            let _ = self.release.send(Release { table, cut }).await;
                        }
                        continue;
                    }
                    let Some(id) = retry("record reload request", &self.sinks, || {
                        self.sinks.registry.reload_for_marker(&table, &request, marker_commit_lsn)
                    })
                    .await? else {
                        // The marker of a finished reload, read again after a restart: stream on.
                        tracing::info!(table = %table, "marker of a finished reload read again; nothing to do");
                        let _ = self.release.send(Release { table, cut: Lsn::ZERO }).await;
                        continue;
                    };
                    tracing::info!(table = %table, reload = id, marker = %marker_commit_lsn, "reload requested");
                    active.insert(table.clone(), Active { reload_id: id, request, cut: None, attempts: 0, progress: Default::default() });
                    self.start_job(&mut jobs, std::slice::from_ref(&table), &active, &events_tx).await?;
                }
                Some(ev) = events.recv() => match ev {
                    JobEvent::Cut { tables, cut, snapshot } => {
                        for t in tables {
                            let Some(a) = active.get_mut(&t) else { continue };
                            a.cut = Some(cut);
                            a.attempts += 1;
                            let id = a.reload_id;
                            retry("record reload cut", &self.sinks, || {
                                self.sinks.registry.record_cut(id, cut, &snapshot, 0, 0)
                            })
                            .await?;
                            tracing::info!(table = %t, reload = id, cut = %cut, "reload cut taken");
                            if self.release.send(Release { table: t, cut }).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    JobEvent::Export(ExportEvent::Planned { reload_id, rows, bytes }) => {
                        let registry = self.sinks.registry.clone();
                        let _ = registry.reload_estimate(reload_id, rows, bytes).await;
                    }
                    JobEvent::Export(ExportEvent::Finished(done)) => {
                        self.finished(done, &mut active, &mut jobs, &events_tx).await?;
                    }
                    JobEvent::Retry(tables) => {
                        let tables: Vec<TableName> = tables.into_iter().filter(|t| active.contains_key(t)).collect();
                        if !tables.is_empty() {
                            self.start_job(&mut jobs, &tables, &active, &events_tx).await?;
                        }
                    }
                    JobEvent::Failed { tables, error } => {
                        for t in tables {
                            // A failed cut counts as an attempt too (with backoff), so it cannot spin.
                            if let Some(a) = active.get_mut(&t) {
                                if a.cut.is_none() {
                                    a.attempts += 1;
                                }
                            }
                            let failed = TableExport {
                                table: t.clone(),
                                reload_id: active.get(&t).map(|a| a.reload_id).unwrap_or(0),
                                schema: crate::table::TableSchema::new(t, 0, crate::table::ReplicaIdentity::Default, vec![]),
                                result: Err(error.clone()),
                            };
                            self.finished(failed, &mut active, &mut jobs, &events_tx).await?;
                        }
                    }
                },
                _ = progress_tick.tick() => {
                    for a in active.values() {
                        let (rows, bytes) = (a.progress.rows.load(Relaxed) as i64, a.progress.bytes.load(Relaxed) as i64);
                        if rows > 0 || bytes > 0 {
                            let _ = self.sinks.registry.reload_progress(a.reload_id, rows, bytes).await;
                        }
                    }
                }
            }
        }
    }

    async fn start_job(
        &self,
        jobs: &mut Jobs,
        tables: &[TableName],
        active: &HashMap<TableName, Active>,
        events: &mpsc::UnboundedSender<JobEvent>,
    ) -> Result<(), Error> {
        jobs.started += 1;
        while jobs.running.try_join_next().is_some() {}
        let mut list = Vec::new();
        for t in tables {
            let Some(a) = active.get(t) else { continue };
            a.progress.rows.store(0, Relaxed);
            a.progress.bytes.store(0, Relaxed);
            // Parts of an earlier attempt were never registered: remove them before writing new ones.
            let dir = layout::reload_dir(self.sinks.store.root(), t, a.reload_id);
            for o in self.sinks.store.list(&dir).await.unwrap_or_default() {
                let _ = self.sinks.store.delete(&o.location).await;
            }
            list.push(TableJob {
                table: t.clone(),
                reload_id: a.reload_id,
                progress: a.progress.clone(),
            });
        }
        let exporter = self.exporter.clone();
        let events = events.clone();
        let tag = format!("{}_{}", std::process::id(), jobs.started);
        jobs.running.spawn(async move {
            let names: Vec<TableName> = list.iter().map(|j| j.table.clone()).collect();
            let cut = match export::take_cut(&exporter.source, &exporter.slot_name, &tag).await {
                Ok(c) => c,
                Err(error) => {
                    let _ = events.send(JobEvent::Failed {
                        tables: names,
                        error,
                    });
                    return;
                }
            };
            let _ = events.send(JobEvent::Cut {
                tables: names.clone(),
                cut: cut.lsn,
                snapshot: cut.snapshot.clone(),
            });
            let (tx, mut rx) = mpsc::unbounded_channel();
            let forward = {
                let events = events.clone();
                tokio::spawn(async move {
                    while let Some(e) = rx.recv().await {
                        let _ = events.send(JobEvent::Export(e));
                    }
                })
            };
            if let Err(error) = exporter.run(cut, list, tx).await {
                let _ = events.send(JobEvent::Failed {
                    tables: names,
                    error,
                });
            }
            let _ = forward.await;
        });
        Ok(())
    }

    async fn finished(
        &self,
        done: TableExport,
        active: &mut HashMap<TableName, Active>,
        jobs: &mut Jobs,
        events: &mpsc::UnboundedSender<JobEvent>,
    ) -> Result<(), Error> {
        let Some(a) = active.get(&done.table) else {
            return Ok(());
        };
        let (id, cut, request) = (a.reload_id, a.cut.unwrap_or(Lsn::ZERO), a.request.clone());
        match done.result {
            Ok(parts) => {
                let rows: u64 = parts.iter().map(|p| p.rows).sum();
                let bytes: u64 = parts.iter().map(|p| p.gz_bytes).sum();
                self.register(&done.table, id, cut, &done.schema, &parts)
                    .await?;
                self.sinks.metrics.reload_rows.inc_by(rows);
                self.sinks.metrics.reload_bytes.inc_by(bytes);
                tracing::info!(table = %done.table, reload = id, cut = %cut, rows, bytes, parts = parts.len(), "reload done");
                self.end_marker(&done.table, id, &request, cut, "done")
                    .await;
                active.remove(&done.table);
            }
            Err(e) if e.is_transient() && a.attempts < MAX_ATTEMPTS => {
                let backoff = crate::backoff::jittered(
                    Duration::from_secs(2),
                    Duration::from_secs(32),
                    a.attempts.saturating_sub(1),
                );
                tracing::warn!(table = %done.table, reload = id, error = %e, retry_in = ?backoff, "reload attempt failed; retrying with a new cut");
                self.sinks.metrics.error(&e);
                let events = events.clone();
                let table = done.table.clone();
                jobs.running.spawn(async move {
                    tokio::time::sleep(backoff).await;
                    let _ = events.send(JobEvent::Retry(vec![table]));
                });
            }
            Err(e) => {
                tracing::error!(table = %done.table, reload = id, error = %e, "reload failed");
                self.sinks.metrics.error(&e);
                if a.cut.is_none() {
                    // Still held (no cut was ever taken): stream the table on, nothing dropped.
                    let _ = self
                        .release
                        .send(Release {
                            table: done.table.clone(),
                            cut: Lsn::ZERO,
                        })
                        .await;
                }
                let msg = e.to_string();
                retry("record reload failure", &self.sinks, || {
                    self.sinks.registry.fail_reload(id, &msg)
                })
                .await?;
                self.end_marker(&done.table, id, &request, cut, "failed")
                    .await;
                active.remove(&done.table);
            }
        }
        Ok(())
    }

    /// schema.yml, then parts + done in one transaction, then manifest and notice.
    async fn register(
        &self,
        table: &TableName,
        id: i64,
        cut: Lsn,
        schema: &crate::table::TableSchema,
        parts: &[export::Part],
    ) -> Result<(), Error> {
        let sinks = &self.sinks;
        let dir = layout::reload_dir(sinks.store.root(), table, id);
        let schema_path = dir.clone().join(layout::SCHEMA_FILE);
        let manifest_path = dir.clone().join(layout::MANIFEST_FILE);
        let rows: u64 = parts.iter().map(|p| p.rows).sum();
        let version = retry("read schema version", sinks, || {
            sinks
                .registry
                .schema_version_for(table, schema.fingerprint())
        })
        .await?;
        let doc = crate::core::encode::schema_yml::SchemaDoc::reload(schema, version, cut, rows);
        retry("upload reload schema.yml", sinks, || {
            sinks.store.put_bytes(&schema_path, doc.to_yaml())
        })
        .await?;
        let records: Vec<FileRecord> = parts
            .iter()
            .map(|p| FileRecord {
                batch_id: format!("{}/part-{:05}", reload_batch_id(table, id), p.index),
                table: table.clone(),
                kind: FileKind::Reload,
                object_path: p.path.to_string(),
                schema_path: schema_path.to_string(),
                manifest_path: manifest_path.to_string(),
                first: Some(Position::new(cut, 0)),
                last: Some(Position::new(cut, 0)),
                first_commit_ts: None,
                last_commit_ts: None,
                rows: p.rows,
                bytes: p.gz_bytes,
                csv_bytes: p.csv_bytes,
                checksum: format!("sha256:{}", p.sha256),
                schema_version: version,
                schema_fingerprint: schema.fingerprint().to_string(),
                reload_id: Some(id),
                part: Some(p.index as i32),
                ops: crate::core::batch::OpCounts {
                    insert: p.rows,
                    ..Default::default()
                },
            })
            .collect();
        retry("register reload", sinks, || {
            sinks.registry.complete_reload(id, &records)
        })
        .await?;
        crate::failpoint::hit("after_reload_register");
        finish_reload(sinks, id).await
    }

    async fn end_marker(&self, table: &TableName, id: i64, request: &str, cut: Lsn, status: &str) {
        let body = serde_json::json!({
            "kind": "reload_end", "schema": table.schema, "table": table.name,
            "request": request, "reload_id": id, "cut_lsn": cut.to_string(), "status": status,
        });
        let sql = format!(
            "SELECT pg_logical_emit_message(true, {}, {})",
            quote_literal(&marker_prefix(&self.registry_schema)),
            quote_literal(&body.to_string())
        );
        if let Err(e) = self.catalog.batch_execute(&sql).await {
            tracing::warn!(error = %e, table = %table, "could not write the reload END marker");
        }
    }
}
