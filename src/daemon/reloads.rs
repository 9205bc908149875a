//! The daemon's side of reloads: react to markers, take cuts, release holds, register exports.
//!
//! Every decision (which reloads are active, what a marker does, when an attempt starts or is
//! retried, when a hold is released and with which cut, when a reload is done or failed) is made by
//! the sans-IO [`ReloadPlan`] (`core::reload`, where the invariants are argued and property-tested).
//! This driver only feeds it (controls from the batcher, events of the export jobs, the registry's
//! answer for a marker, the retry deadline it asked for), performs its commands in the order
//! given, and reports progress once a second.
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
//!   [`MAX_ATTEMPTS`](crate::core::reload::MAX_ATTEMPTS) per session; a cut that cannot be taken
//!   counts too); a definite one, or too many, marks the reload `failed` with its reason and
//!   releases a table still held. Other tables are not affected.
//! - The marker of a reload that already finished, read again after a restart, is ignored.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::deliver::{finish_reload, retry, Sinks};
use crate::core::batch::{Control, Position};
use crate::core::reload::{AttemptId, Command, ReloadPlan};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::reload::export::{self, ExportEvent, Exporter, Progress, TableJob};
use crate::sink::layout;
use crate::sink::registry::migrate::marker_prefix;
use crate::sink::registry::{FileKind, FileRecord};
use crate::table::{quote_literal, TableName, TableSchema};

/// Messages from the coordinator to the stream thread.
#[derive(Debug)]
pub struct Release {
    pub table: TableName,
    pub cut: Lsn,
}

pub struct Coordinator {
    pub sinks: Sinks,
    pub exporter: Arc<Exporter>,
    pub catalog: Arc<tokio_postgres::Client>,
    pub registry_schema: String,
    pub release: mpsc::Sender<Release>,
}

/// What a successful export hands to registration.
type Exported = (Arc<TableSchema>, Vec<export::Part>);

/// What the coordinator keeps besides the plan: the export jobs, which are aborted when it is
/// dropped (session end), so an attempt of an earlier session can never keep writing into a reload
/// directory a new attempt uses; and each table's export progress.
struct Running {
    plan: ReloadPlan,
    jobs: tokio::task::JoinSet<()>,
    events: mpsc::UnboundedSender<JobEvent>,
    progress: HashMap<TableName, Arc<Progress>>,
}

/// The plan's clock reading: tokio's, so it agrees with `sleep_until` on the plan's deadlines.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// What an export job reports, named by its attempt.
enum JobEvent {
    Cut {
        attempt: AttemptId,
        tables: Vec<TableName>,
        cut: Lsn,
        snapshot: String,
    },
    Export(AttemptId, ExportEvent),
    Failed {
        attempt: AttemptId,
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
        let mut st = Running {
            plan: ReloadPlan::new(),
            jobs: tokio::task::JoinSet::new(),
            events: events_tx,
            progress: HashMap::new(),
        };
        let mut out = Vec::new();
        st.plan.resume(resume, &mut out);
        self.execute(&mut st, out).await?;
        let mut progress_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let mut out = Vec::new();
            let wake = st.plan.next_wake().map(tokio::time::Instant::from_std);
            tokio::select! {
                c = controls.recv() => {
                    match c {
                        None => return Ok(()),
                        Some(Control::ReloadStart { table, request, marker_commit_lsn }) => {
                            st.plan.marker(table, request, marker_commit_lsn, &mut out);
                        }
                        // Logged by the batcher's driver; nothing to coordinate.
                        Some(Control::MalformedMarker { .. }) => {}
                    }
                }
                Some(ev) = events.recv() => match ev {
                    JobEvent::Cut { attempt, tables, cut, snapshot } => {
                        st.plan.cut_taken(attempt, &tables, cut, &snapshot, &mut out);
                    }
                    JobEvent::Export(_, ExportEvent::Planned { reload_id, rows, bytes }) => {
                        let registry = self.sinks.registry.clone();
                        let _ = registry.reload_estimate(reload_id, rows, bytes).await;
                    }
                    JobEvent::Export(attempt, ExportEvent::Finished(done)) => {
                        let result = done.result.map(|parts| (done.schema, parts));
                        st.plan.export_finished(now(), attempt, &done.table, result, &mut out);
                    }
                    JobEvent::Failed { attempt, tables, error } => {
                        st.plan.attempt_failed(now(), attempt, &tables, &error, &mut out);
                    }
                },
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    st.plan.wake(now(), &mut out);
                }
                _ = progress_tick.tick() => {
                    for (t, id) in st.plan.active() {
                        let Some(p) = st.progress.get(t) else { continue };
                        let (rows, bytes) = (p.rows.load(Relaxed) as i64, p.bytes.load(Relaxed) as i64);
                        if rows > 0 || bytes > 0 {
                            let _ = self.sinks.registry.reload_progress(id, rows, bytes).await;
                        }
                    }
                }
            }
            self.execute(&mut st, out).await?;
        }
    }

    /// Performs the plan's commands in order. The answer to a `RecordRequest` is fed back at once
    /// and its commands run before any later one.
    async fn execute(&self, st: &mut Running, cmds: Vec<Command<Exported>>) -> Result<(), Error> {
        let sinks = &self.sinks;
        let mut queue = VecDeque::from(cmds);
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                Command::RecordRequest {
                    table,
                    request,
                    marker_commit_lsn,
                } => {
                    let id = retry("record reload request", sinks, || {
                        sinks
                            .registry
                            .reload_for_marker(&table, &request, marker_commit_lsn)
                    })
                    .await?;
                    match id {
                        // The marker of a finished reload, read again after a restart: stream on.
                        None => {
                            tracing::info!(table = %table, "marker of a finished reload read again; nothing to do")
                        }
                        Some(id) => {
                            tracing::info!(table = %table, reload = id, marker = %marker_commit_lsn, "reload requested")
                        }
                    }
                    let mut more = Vec::new();
                    st.plan.recorded(table, request, id, &mut more);
                    for c in more.into_iter().rev() {
                        queue.push_front(c);
                    }
                }
                Command::Joined { table, reload_id } => {
                    // A marker read again after a restart, or a second request while one runs: the
                    // running reload covers it.
                    tracing::info!(table = %table, reload = reload_id, "reload already running; marker joins it");
                }
                Command::StartAttempt { attempt, tables } => {
                    self.start_job(st, attempt, tables).await;
                }
                Command::RecordCut {
                    table,
                    reload_id,
                    cut,
                    snapshot,
                } => {
                    retry("record reload cut", sinks, || {
                        sinks.registry.record_cut(reload_id, cut, &snapshot, 0, 0)
                    })
                    .await?;
                    tracing::info!(table = %table, reload = reload_id, cut = %cut, "reload cut taken");
                }
                Command::Release { table, cut } => {
                    // Fails only when the batcher is gone, and the session with it.
                    let _ = self.release.send(Release { table, cut }).await;
                }
                Command::Register {
                    table,
                    reload_id,
                    cut,
                    output: (schema, parts),
                } => {
                    let rows: u64 = parts.iter().map(|p| p.rows).sum();
                    let bytes: u64 = parts.iter().map(|p| p.gz_bytes).sum();
                    self.register(&table, reload_id, cut, &schema, &parts)
                        .await?;
                    sinks.metrics.reload_rows.inc_by(rows);
                    sinks.metrics.reload_bytes.inc_by(bytes);
                    tracing::info!(table = %table, reload = reload_id, cut = %cut, rows, bytes, parts = parts.len(), "reload done");
                }
                Command::RetryLater {
                    table,
                    reload_id,
                    error,
                    after,
                } => {
                    tracing::warn!(table = %table, reload = reload_id, error = %error, retry_in = ?after, "reload attempt failed; retrying with a new cut");
                    sinks.metrics.error(&error);
                }
                Command::RecordFailure {
                    table,
                    reload_id,
                    error,
                } => {
                    tracing::error!(table = %table, reload = reload_id, error = %error, "reload failed");
                    sinks.metrics.error(&error);
                    let msg = error.to_string();
                    retry("record reload failure", sinks, || {
                        sinks.registry.fail_reload(reload_id, &msg)
                    })
                    .await?;
                }
                Command::EndMarker {
                    table,
                    reload_id,
                    request,
                    cut,
                    status,
                } => {
                    self.end_marker(&table, reload_id, &request, cut, status.as_str())
                        .await;
                    st.progress.remove(&table);
                }
            }
        }
        Ok(())
    }

    /// Starts an attempt: removes what earlier attempts left in the tables' reload directories,
    /// then, in the background, takes one cut and exports every table from it.
    async fn start_job(&self, st: &mut Running, attempt: AttemptId, tables: Vec<(TableName, i64)>) {
        while st.jobs.try_join_next().is_some() {}
        let mut list = Vec::new();
        for (t, reload_id) in tables {
            let progress = st.progress.entry(t.clone()).or_default().clone();
            progress.rows.store(0, Relaxed);
            progress.bytes.store(0, Relaxed);
            // Parts of an earlier attempt were never registered: remove them before writing new ones.
            let dir = self.sinks.layout.reload_dir(&t, reload_id);
            for o in self.sinks.store.list(&dir).await.unwrap_or_default() {
                let _ = self.sinks.store.delete(&o.location).await;
            }
            list.push(TableJob {
                table: t,
                reload_id,
                dir,
                progress,
            });
        }
        let exporter = self.exporter.clone();
        let events = st.events.clone();
        let tag = format!("{}_{}", std::process::id(), attempt.0);
        st.jobs.spawn(async move {
            let names: Vec<TableName> = list.iter().map(|j| j.table.clone()).collect();
            let cut = match export::take_cut(&exporter.source, &exporter.slot_name, &tag).await {
                Ok(c) => c,
                Err(error) => {
                    let _ = events.send(JobEvent::Failed {
                        attempt,
                        tables: names,
                        error,
                    });
                    return;
                }
            };
            let _ = events.send(JobEvent::Cut {
                attempt,
                tables: names.clone(),
                cut: cut.lsn,
                snapshot: cut.snapshot.clone(),
            });
            let (tx, mut rx) = mpsc::unbounded_channel();
            let forward = {
                let events = events.clone();
                tokio::spawn(async move {
                    while let Some(e) = rx.recv().await {
                        let _ = events.send(JobEvent::Export(attempt, e));
                    }
                })
            };
            if let Err(error) = exporter.run(cut, list, tx).await {
                let _ = events.send(JobEvent::Failed {
                    attempt,
                    tables: names,
                    error,
                });
            }
            let _ = forward.await;
        });
    }

    /// schema.yml, then parts + done in one transaction, then manifest and notice.
    async fn register(
        &self,
        table: &TableName,
        id: i64,
        cut: Lsn,
        schema: &TableSchema,
        parts: &[export::Part],
    ) -> Result<(), Error> {
        let sinks = &self.sinks;
        let dir = sinks.layout.reload_dir(table, id);
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
                batch_id: format!(
                    "{}/part-{:05}",
                    sinks.layout.reload_batch_id(table, id),
                    p.index
                ),
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
