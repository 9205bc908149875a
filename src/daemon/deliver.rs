//! Delivery of sealed batches and DDL records: upload → register → manifest → notice → report
//! persisted.
//!
//! Uploads of up to [`UPLOAD_CONCURRENCY`] batches overlap; everything from the registry commit on
//! happens strictly in seal order, so the file log and the notices of a table are in position order,
//! and persisted reports flow back to the ack in source order. Transient failures are retried in place
//! with capped exponential backoff (the batch, and therefore the ack, waits); a definite failure ends
//! the session.
//!
//! Delivery needs only the contracts of the registry ([`FileLog`]) and of the notifier ([`Publish`]),
//! so [`Sinks`] and the functions here are generic over them (defaulting to PostgreSQL and JetStream)
//! and `tests/delivery.rs` drives them over the in-memory doubles. Retrying a transient failure is
//! safe because of those contracts: a transient error may follow an effect that happened (a lost
//! reply), and both `commit_file` (on the batch id) and `publish_once` (on the message id) answer
//! a repeat with the original row or message.
//!
//! With a schema bucket (`nats.schema_bucket`), the entry of a row's table is written after its
//! notice and before its notice sequence is recorded (`announce_schema`): a crash in between
//! leaves the row unnotified, and start-up completes both again (the entry write is a no-op when it
//! landed, see `sink::notify::schemas`). So a row reported persisted, and every position the ack
//! passes, has its table's entry in the bucket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::core::ack::BatchId;
use crate::core::batch::{Position, Sealed};
use crate::error::{Component, Error};
use crate::observe::Metrics;
use crate::reload::notice::ReloadNotice;
use crate::sink::layout::Namespace;
use crate::sink::notify::schemas::{self, EntryPosition, SchemaEntry, SchemaHead};
use crate::sink::notify::{Notifier, Publish};
use crate::sink::registry::{FileKind, FileLog, FileRecord, Registered, Registry};
use crate::sink::spool::SpooledFile;
use crate::sink::store::Store;
use crate::sink::upload::{self, SchemaVersions};

/// Uploads in flight; together they hold at most `store::UPLOAD_BUDGET` (6 MiB) of file data.
pub const UPLOAD_CONCURRENCY: usize = 2;

/// Everything delivery needs, shared by the daemon and start-up recovery. `R` is the registry and
/// `N` the notifier: PostgreSQL and JetStream unless a test says otherwise.
#[derive(Clone)]
pub struct Sinks<R = Registry, N = Notifier> {
    pub store: Store,
    /// The names of this source's objects in `store`.
    pub layout: Namespace,
    pub registry: R,
    pub notifier: Option<N>,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
}

/// Runs `op` until it succeeds, retrying transient errors with backoff ([`crate::backoff`]: 200 ms
/// doubling to 30 s, jittered).
/// Returns the first definite error, or the last transient one if shutdown is requested meanwhile.
pub async fn retry<R, N, T, F, Fut>(what: &str, sinks: &Sinks<R, N>, mut op: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut shutdown = sinks.shutdown.clone();
    let mut failed = false;
    loop {
        // Once failing, an attempt may hang (a black-holed server): let shutdown interrupt it.
        let attempt = if failed {
            tokio::select! {
                r = op() => r,
                _ = shutdown.wait_for(|s| *s) => return Err(Error::transient(Component::Daemon, format!("{what}: interrupted by shutdown"))),
            }
        } else {
            op().await
        };
        match attempt {
            Ok(v) => {
                if failed {
                    tracing::info!("{what}: recovered");
                    sinks.metrics.clear_error();
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                failed = true;
                let delay = backoff.next_delay();
                sinks.metrics.error(&e);
                sinks
                    .metrics
                    .ready
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?delay, "{what} failed; retrying (nothing is acknowledged meanwhile)");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => return Err(e),
                }
            }
            Err(e) => {
                sinks.metrics.error(&e);
                return Err(e.context(what));
            }
        }
    }
}

/// Steps 3 and 4 for a committed row: manifest, then the notice and its recorded sequence. Used for
/// fresh batches and, at start-up, for rows a crash left without a recorded notice.
pub async fn finish_registered<R: FileLog, N: Publish>(
    sinks: &Sinks<R, N>,
    reg: &Registered,
) -> Result<(), Error> {
    retry("write manifest", sinks, || {
        upload::write_manifest(&sinks.store, &sinks.layout, reg)
    })
    .await?;
    crate::failpoint::hit("after_manifest");
    let seq = match &sinks.notifier {
        Some(n) => {
            let subject = match reg.record.kind {
                FileKind::Streaming => n.batch_subject(&reg.record.table),
                FileKind::Reload => n.reload_subject(&reg.record.table),
                FileKind::Ddl => n.ddl_subject(&reg.record.table),
            };
            let payload = upload::Notice::new(&sinks.store, &sinks.layout, reg).to_json();
            let started = Instant::now();
            let seq = retry("publish notice", sinks, || {
                n.publish_once(&subject, &reg.record.batch_id, payload.clone())
            })
            .await?;
            sinks
                .metrics
                .observe("publish", started.elapsed().as_secs_f64());
            crate::failpoint::hit("after_publish");
            announce_schema(sinks, n, &reg.record).await?;
            seq
        }
        // 0 records "no notice: NATS disabled" so start-up recovery does not revisit the row.
        None => 0,
    };
    retry("record notice sequence", sinks, || {
        sinks.registry.mark_notified(reg.id, seq)
    })
    .await
}

/// Completes every committed-but-unnotified row, in registry order (start-up recovery).
pub async fn finish_unnotified<R: FileLog, N: Publish>(
    sinks: &Sinks<R, N>,
) -> Result<usize, Error> {
    let rows = retry("read unnotified files", sinks, || {
        sinks.registry.unnotified()
    })
    .await?;
    let mut reloads = std::collections::BTreeSet::new();
    for reg in &rows {
        if let (FileKind::Reload, Some(id)) = (reg.record.kind, reg.record.reload_id) {
            reloads.insert(id);
            continue;
        }
        tracing::info!(batch = %reg.record.batch_id, "completing a batch committed before the last stop");
        finish_registered(sinks, reg).await?;
    }
    for id in reloads {
        tracing::info!(
            reload = id,
            "completing the notice of a reload committed before the last stop"
        );
        finish_reload(sinks, id).await?;
    }
    Ok(rows.len())
}

/// Consumes sealed batches and DDL records until the channel closes; reports each persisted one on
/// `persisted`, in the order received.
pub async fn deliver_batches<R: FileLog, N: Publish>(
    sinks: Sinks<R, N>,
    sealed: mpsc::Receiver<Sealed<SpooledFile>>,
    mut versions: SchemaVersions,
    persisted: mpsc::UnboundedSender<BatchId>,
) -> Result<(), Error> {
    let uploads = tokio_stream_from(sealed)
        .map(|item| {
            // A DDL record has no schema version of its own (0): its files must be the same bytes
            // on every replay, whatever batches were registered after it before a crash.
            let version = match &item {
                Sealed::Batch(b) => versions.version_for(&b.schema),
                Sealed::Ddl(_) => 0,
            };
            let sinks = sinks.clone();
            async move {
                let started = Instant::now();
                let rec = match &item {
                    Sealed::Batch(batch) => {
                        retry("upload batch", &sinks, || {
                            upload::upload_streaming(&sinks.store, &sinks.layout, batch, version)
                        })
                        .await?
                    }
                    Sealed::Ddl(ddl) => {
                        retry("upload DDL record", &sinks, || {
                            upload::upload_ddl(&sinks.store, &sinks.layout, ddl, version)
                        })
                        .await?
                    }
                };
                sinks
                    .metrics
                    .observe("upload", started.elapsed().as_secs_f64());
                Ok::<_, Error>((item, rec))
            }
        })
        .buffered(UPLOAD_CONCURRENCY);
    futures::pin_mut!(uploads);
    while let Some(done) = uploads.next().await {
        let (item, rec) = done?;
        crate::failpoint::hit("after_upload");
        let id = match &item {
            Sealed::Batch(batch) => {
                retry("register batch", &sinks, || {
                    sinks.registry.commit_file(&rec, Some(&batch.schema))
                })
                .await?
            }
            Sealed::Ddl(ddl) => {
                let id = retry("register DDL record", &sinks, || {
                    sinks.registry.commit_ddl(&rec, ddl)
                })
                .await?;
                crate::failpoint::hit("after_ddl_register");
                id
            }
        };
        crate::failpoint::hit("after_register");
        let reg = Registered {
            id,
            record: rec,
            notified_stream_seq: None,
        };
        finish_registered(&sinks, &reg).await?;
        match &item {
            Sealed::Batch(_) => {
                sinks.metrics.bytes_written.inc_by(reg.record.bytes);
                sinks
                    .metrics
                    .batch_sealed(&reg.record.table, &reg.record.ops);
                tracing::info!(
                    batch = %reg.record.batch_id,
                    rows = reg.record.rows,
                    bytes = reg.record.bytes,
                    registry_id = id,
                    "batch delivered"
                );
            }
            Sealed::Ddl(ddl) => tracing::info!(
                record = %reg.record.batch_id,
                event = ddl.change.event.as_str(),
                command = %ddl.change.command_tag,
                reload = ddl.reload_request.as_deref().unwrap_or("-"),
                registry_id = id,
                "DDL record delivered"
            ),
        }
        let id = item.id();
        drop(item); // removes a batch's spool file
        if persisted.send(id).is_err() {
            break;
        }
    }
    Ok(())
}

/// Writes the schema-bucket entry of the row `rec` (a streaming batch, a DDL record or a reload's
/// part) when it supersedes the stored one (see `sink::notify::schemas`). It holds from the row's
/// first position; a reload's from its cut with seq 0 (before every change committed there). The
/// document is read back from the object store, so start-up recovery writes the same entry as the
/// first attempt did.
async fn announce_schema<R: FileLog, N: Publish>(
    sinks: &Sinks<R, N>,
    n: &N,
    rec: &FileRecord,
) -> Result<(), Error> {
    let valid_from = match rec.kind {
        FileKind::Reload => rec.first.map(|p| Position::new(p.commit_lsn, 0)),
        FileKind::Streaming | FileKind::Ddl => rec.first,
    };
    let Some(valid_from) = valid_from.filter(|_| n.keeps_schemas()) else {
        return Ok(());
    };
    let key = schemas::schema_key(sinks.layout.source(), &rec.table);
    let mut head = SchemaHead {
        valid_from,
        state: "present".into(),
        fingerprint: Some(rec.schema_fingerprint.clone()),
    };
    if rec.kind == FileKind::Ddl {
        head.fingerprint = None;
    } else if retry("read schema entry", sinks, || n.schema_current(&key, &head)).await? {
        return Ok(());
    }
    let path = crate::sink::layout::stored_path(&rec.schema_path);
    // A document gone from the output (a retention rule) must not hold up delivery for ever.
    let Some(yaml) = retry("read schema document", sinks, || sinks.store.get_opt(&path)).await?
    else {
        tracing::warn!(
            object = %rec.schema_path,
            "the schema bucket's entry is skipped: its document is missing from the output"
        );
        return Ok(());
    };
    let doc = schemas::yaml_to_json(&yaml).map_err(|e| {
        Error::definite(
            Component::ObjectStore,
            format!("{} is not a YAML document: {e}", rec.schema_path),
        )
    })?;
    let (schema_yml, ddl_yml) = match rec.kind {
        FileKind::Ddl => {
            let mode = doc.get("mode_after").and_then(|m| m.as_str());
            head.state = schemas::state_after(mode).to_string();
            (None, Some(doc))
        }
        FileKind::Streaming | FileKind::Reload => (Some(doc), None),
    };
    let entry = SchemaEntry {
        source: sinks.layout.source().to_string(),
        table: rec.table.dotted(),
        schema: rec.table.schema.clone(),
        table_name: rec.table.name.clone(),
        state: head.state.clone(),
        kind: rec.kind.as_str().to_string(),
        valid_from: EntryPosition {
            commit_lsn: valid_from.commit_lsn.to_string(),
            seq: valid_from.seq,
        },
        schema_version: rec.schema_version,
        schema_fingerprint: head.fingerprint.clone(),
        batch_id: rec.batch_id.clone(),
        schema_yml,
        ddl_yml,
    };
    let value = entry.to_json();
    let written = retry("write schema entry", sinks, || {
        n.put_schema(&key, &head, value.clone())
    })
    .await?;
    if written {
        tracing::info!(key = %key, state = %head.state, valid_from = %valid_from.commit_lsn, "schema entry written");
    }
    crate::failpoint::hit("after_schema_entry");
    Ok(())
}

/// Gives every table of this source an entry in the schema bucket from its newest registry row
/// (start-up, after recovery), so tables that have not changed since the bucket was configured are
/// there too. Rows older than the stored entry change nothing (`announce_schema`); a table whose
/// documents cannot be read is skipped with a warning, since its next row writes its entry anyway.
pub async fn backfill_schemas(sinks: &Sinks) -> Result<(), Error> {
    let Some(n) = sinks.notifier.as_ref().filter(|n| n.keeps_schemas()) else {
        return Ok(());
    };
    let newest = retry("read newest rows per table", sinks, || {
        sinks.registry.newest_per_table()
    })
    .await?;
    for reg in &newest {
        // Old objects may be gone (a retention policy): never wait for them.
        let document = crate::sink::layout::stored_path(&reg.record.schema_path);
        if !retry("look for schema document", sinks, || {
            sinks.store.exists(&document)
        })
        .await?
        {
            tracing::warn!(table = %reg.record.table, path = %document, "no schema entry for this table until its next batch: its newest schema document is gone");
            continue;
        }
        if let Err(e) = announce_schema(sinks, n, &reg.record).await {
            if !e.is_transient() {
                tracing::warn!(table = %reg.record.table, error = %e, "no schema entry for this table until its next batch");
                continue;
            }
            return Err(e);
        }
    }
    Ok(())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Manifest and notice of a registered reload (also used by start-up recovery).
pub async fn finish_reload<R: FileLog, N: Publish>(
    sinks: &Sinks<R, N>,
    reload_id: i64,
) -> Result<(), Error> {
    let parts: Vec<Registered> = retry("read reload parts", sinks, || {
        sinks.registry.reload_files(reload_id)
    })
    .await?;
    let Some(notice) = ReloadNotice::new(&sinks.store, &sinks.layout, &parts) else {
        return Ok(());
    };
    let manifest = crate::sink::layout::stored_path(&parts[0].record.manifest_path);
    let body = notice.to_json();
    retry("write reload manifest", sinks, || {
        crate::sink::upload::put_manifest(&sinks.store, &manifest, body.clone())
    })
    .await?;
    let seq = match &sinks.notifier {
        Some(n) => {
            let subject = n.reload_subject(&parts[0].record.table);
            let seq = retry("publish reload notice", sinks, || {
                n.publish_once(&subject, &notice.batch_id, body.clone())
            })
            .await?;
            announce_schema(sinks, n, &parts[0].record).await?;
            seq
        }
        None => 0,
    };
    for p in &parts {
        retry("record notice sequence", sinks, || {
            sinks.registry.mark_notified(p.id, seq)
        })
        .await?;
    }
    Ok(())
}
