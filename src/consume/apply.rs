//! `cdc-egress apply`: the reference loader. It applies one source's files to a target PostgreSQL
//! incrementally, by the consumer rule, and can follow new batches as they are registered.
//!
//! The pure plan ([`crate::core::replay`]) decides what to apply; this driver reads the registry and
//! the objects, and carries out each step in one target transaction with the progress it reaches
//! ([`super::target`]). A crash anywhere leaves the target at the end of a step, and the next run
//! resumes after it: nothing is applied twice and nothing is skipped.
//!
//! `--follow` polls the registry (one cheap indexed query per interval) rather than the JetStream
//! notices: the registry is the commit record, a notice can only say what the registry already
//! holds, and polling needs no NATS permissions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio_postgres::Client;

use super::listing::{DdlFile, EntryRow, Listing, Objects, SchemaFile};
use super::target::{self, Naming, Stream};
use crate::core::replay::{self, DoneReload, Entry, EntryKind, Progress, Step};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::table::TableName;

/// Entries read from the registry per round.
const CHUNK: i64 = 1000;

/// What to apply, and how.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Only these source tables (empty: every table). A table renamed into or out of the set is
    /// followed under its new name.
    pub tables: Vec<TableName>,
    /// Apply only changes below this position (`verify`); reloads with a later cut are ignored.
    pub until: Option<Lsn>,
    /// An update or delete that does not hit exactly one row stops the loader (else it is counted).
    pub strict: bool,
    /// Apply the streaming files alone, every row, without reloads: the tables come out right only
    /// when they were empty at the initial export (a test of the files, not a consumer rule).
    pub ignore_reloads: bool,
}

/// What a run applied.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub streaming_files: u64,
    pub ddl_records: u64,
    pub reloads_loaded: u64,
    pub rows_applied: u64,
    pub entries_skipped: u64,
    /// Updates and deletes that hit no row or several (not strict mode only).
    pub misses: u64,
    /// Objects that could not be used (missing, or not matching their registry row) and were
    /// skipped (not strict mode only; strict mode stops at the first).
    pub unusable: Vec<String>,
    /// The last `files.id` applied.
    pub last_file_id: i64,
}

/// The loader: one source of a registry into one target.
pub struct Applier {
    listing: Listing,
    objects: Objects,
    target: Client,
    naming: Naming,
    stream: Stream,
    options: ApplyOptions,
    tables: BTreeSet<TableName>,
}

impl Applier {
    /// Opens the loader; creates the state schema in the target if needed.
    pub async fn open(
        listing: Listing,
        objects: Objects,
        target: Client,
        naming: Naming,
        options: ApplyOptions,
    ) -> Result<Applier, Error> {
        target::ensure_state(&target, &naming).await?;
        let stream = Stream {
            registry: listing.incarnation().await?,
            source: listing.source().to_string(),
        };
        let asked: BTreeSet<TableName> = options.tables.iter().cloned().collect();
        let mut target = target;
        // The table list is part of the progress: a target loaded for some tables never silently
        // skips the history of others.
        let tables = match target::recorded_tables(&target, &naming, &stream).await? {
            None => {
                let tx = target::begin_step(&mut target, &naming, &stream, 0).await?;
                target::set_tables(&tx, &naming, &stream, &asked).await?;
                tx.commit().await.map_err(|e| target::tgt("commit", e))?;
                asked
            }
            Some(recorded) => {
                let recorded: BTreeSet<TableName> = recorded.into_iter().collect();
                let fits = if recorded.is_empty() {
                    asked.is_empty()
                } else {
                    asked.is_subset(&recorded)
                };
                if !fits {
                    let list = |t: &BTreeSet<TableName>| {
                        if t.is_empty() {
                            "every table".to_string()
                        } else {
                            t.iter()
                                .map(TableName::dotted)
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    };
                    return Err(Error::definite(
                        Component::Config,
                        format!(
                            "this target loads {} of source {:?}, not {}: run apply with the same tables \
                             (or none), or load other tables into another --state-schema and database",
                            list(&recorded),
                            stream.source,
                            list(&asked)
                        ),
                    ));
                }
                recorded
            }
        };
        Ok(Applier {
            tables,
            listing,
            objects,
            target,
            naming,
            stream,
            options,
        })
    }

    pub fn target(&self) -> &Client {
        &self.target
    }

    fn wanted(&self, t: &TableName) -> bool {
        self.tables.is_empty() || self.tables.contains(t)
    }

    /// Applies everything registered so far; returns what it did.
    pub async fn catch_up(&mut self) -> Result<ApplyReport, Error> {
        let mut report = ApplyReport::default();
        loop {
            let progress = target::read_progress(&self.target, &self.naming, &self.stream).await?;
            report.last_file_id = progress.last_id;
            let rows = self.listing.entries_after(progress.last_id, CHUNK).await?;
            let mut reloads = self.listing.done_reloads(self.options.until).await?;
            reloads.retain(|t, _| self.wanted(t) && !self.options.ignore_reloads);
            let pending: Vec<(TableName, DoneReload)> =
                replay::pending_reloads(&progress, &reloads)
                    .map(|(t, r)| (t.clone(), r))
                    .collect();
            if rows.is_empty() && pending.is_empty() {
                return Ok(report);
            }
            let mut by_id: BTreeMap<i64, EntryRow> = BTreeMap::new();
            let mut applied: BTreeMap<TableName, Vec<Entry>> = BTreeMap::new();
            for (t, r) in &pending {
                let earlier = self
                    .listing
                    .entries_reaching(t, progress.last_id, r.cut)
                    .await?;
                applied.insert(t.clone(), earlier.iter().map(|e| e.entry.clone()).collect());
                by_id.extend(earlier.into_iter().map(|e| (e.entry.id, e)));
            }
            let new: Vec<Entry> = rows.iter().map(|e| e.entry.clone()).collect();
            let full = rows.len() as i64 == CHUNK;
            by_id.extend(rows.into_iter().map(|e| (e.entry.id, e)));
            let steps = replay::plan(&progress, &reloads, &new, &applied, self.options.until);
            self.execute(progress, steps, &by_id, &mut report).await?;
            if !full && pending.is_empty() {
                let progress =
                    target::read_progress(&self.target, &self.naming, &self.stream).await?;
                report.last_file_id = progress.last_id;
                return Ok(report);
            }
        }
    }

    /// Applies new entries as they are registered, every `poll`, until `stop` resolves.
    pub async fn follow(
        &mut self,
        poll: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<ApplyReport, Error> {
        let mut total = ApplyReport::default();
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        futures::pin_mut!(stop);
        loop {
            // Each step is one transaction: stopping in the middle of one rolls it back.
            let r = tokio::select! {
                r = self.catch_up() => r,
                _ = &mut stop => return Ok(total),
            };
            let r = match r {
                Ok(r) => r,
                Err(e) if e.is_transient() => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, "apply: retrying in {wait:?}");
                    tokio::select! {
                        _ = &mut stop => return Ok(total),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                Err(e) => return Err(e),
            };
            backoff.reset();
            total.add(&r);
            if r.streaming_files + r.ddl_records + r.reloads_loaded > 0 {
                tracing::info!(
                    files = r.streaming_files,
                    ddl = r.ddl_records,
                    reloads = r.reloads_loaded,
                    rows = r.rows_applied,
                    last_file_id = r.last_file_id,
                    "applied"
                );
            }
            tokio::select! {
                _ = &mut stop => return Ok(total),
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn execute(
        &mut self,
        mut progress: Progress,
        steps: Vec<Step>,
        rows: &BTreeMap<i64, EntryRow>,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        let mut skipped_to: Option<i64> = None;
        for step in steps {
            let wanted = match &step {
                Step::Load { table, .. } => self.wanted(table),
                Step::Apply { entry, .. } => self.wanted(&entry.table),
                Step::Skip { .. } => false,
            };
            if !wanted {
                skipped_to = step.advances_to().or(skipped_to);
                report.entries_skipped += 1;
                continue;
            }
            let (stream, naming) = (self.stream.clone(), self.naming.clone());
            let tables_after = self.tables_after(&step, rows).await?;
            let tx =
                target::begin_step(&mut self.target, &naming, &stream, progress.last_id).await?;
            match &step {
                Step::Load {
                    table,
                    reload,
                    reapply,
                } => {
                    let loaded = load_reload(
                        &tx,
                        &self.listing,
                        &self.objects,
                        &naming,
                        &stream,
                        table,
                        reload,
                    )
                    .await;
                    tolerate(
                        loaded.map(|()| Default::default()),
                        self.options.strict,
                        report,
                    )?;
                    for e in reapply {
                        let r = apply_entry(
                            &tx,
                            &self.objects,
                            &naming,
                            &stream,
                            &rows[&e.id],
                            Some(reload.cut),
                            self.options.until,
                            self.options.strict,
                        )
                        .await;
                        tolerate(r, self.options.strict, report)?;
                    }
                    target::set_loaded(&tx, &naming, &stream, table, reload.id).await?;
                    progress.loaded.insert(table.clone(), reload.id);
                    report.reloads_loaded += 1;
                }
                Step::Apply {
                    entry,
                    min_lsn,
                    until,
                } => {
                    let row = &rows[&entry.id];
                    let r = apply_entry(
                        &tx,
                        &self.objects,
                        &naming,
                        &stream,
                        row,
                        *min_lsn,
                        *until,
                        self.options.strict,
                    )
                    .await;
                    tolerate(r, self.options.strict, report)?;
                    match entry.kind {
                        EntryKind::Streaming => report.streaming_files += 1,
                        EntryKind::Ddl => report.ddl_records += 1,
                    }
                }
                Step::Skip { .. } => unreachable!("skips are not wanted"),
            }
            if let Some(t) = &tables_after {
                target::set_tables(&tx, &naming, &stream, t).await?;
            }
            if let Some(id) = step.advances_to() {
                target::set_progress(&tx, &naming, &stream, id).await?;
                progress.last_id = id;
                skipped_to = None;
            }
            tx.commit().await.map_err(|e| target::tgt("commit", e))?;
            if let Some(t) = tables_after {
                self.tables = t;
            }
        }
        if let Some(id) = skipped_to {
            let (stream, naming) = (self.stream.clone(), self.naming.clone());
            let tx =
                target::begin_step(&mut self.target, &naming, &stream, progress.last_id).await?;
            target::set_progress(&tx, &naming, &stream, id).await?;
            tx.commit().await.map_err(|e| target::tgt("commit", e))?;
        }
        Ok(())
    }

    /// Checks a step against renames and returns the table set after it, when it changes.
    /// - A load whose table's already-applied history holds its rename: the reload finished after
    ///   the loader followed the table to its new name, and loading it under the old one would
    ///   leave the new one stale. That is refused (a definite error): rebuild the target.
    /// - With a table list, a rename of a listed table brings the new name in (recorded with the
    ///   step); a rename *into* the list of a table not loaded is refused: its rows before the
    ///   rename were never applied here.
    async fn tables_after(
        &self,
        step: &Step,
        rows: &BTreeMap<i64, EntryRow>,
    ) -> Result<Option<BTreeSet<TableName>>, Error> {
        let renamed = async |row: &EntryRow| -> Result<Option<(TableName, TableName)>, Error> {
            if row.entry.kind != EntryKind::Ddl {
                return Ok(None);
            }
            let doc: DdlFile = self.objects.yaml(&row.object_path).await?;
            Ok(
                match (doc.event.as_str(), doc.table_before, doc.table_after) {
                    ("rename", Some(b), Some(a)) => Some((
                        TableName::new(b.schema, b.table),
                        TableName::new(a.schema, a.table),
                    )),
                    _ => None,
                },
            )
        };
        match step {
            Step::Load { table, reapply, .. } => {
                for e in reapply {
                    if let Some((before, after)) = renamed(&rows[&e.id]).await? {
                        if before == *table && after != *table {
                            return Err(Error::definite(
                                Component::Config,
                                format!(
                                    "a reload of {} finished after this target had followed its rename to {}: \
                                     load the source into an empty database (or another --state-schema) again",
                                    table.dotted(),
                                    after.dotted()
                                ),
                            ));
                        }
                    }
                }
                Ok(None)
            }
            Step::Apply { entry, .. } if !self.tables.is_empty() => {
                let Some((before, after)) = renamed(&rows[&entry.id]).await? else {
                    return Ok(None);
                };
                if self.tables.contains(&before) {
                    let mut t = self.tables.clone();
                    t.insert(after);
                    return Ok(Some(t).filter(|t| *t != self.tables));
                }
                Err(Error::definite(
                    Component::Config,
                    format!(
                        "{} was renamed from {}, which this target does not load: its earlier rows are not here; \
                         load both names into an empty database",
                        after.dotted(),
                        before.dotted()
                    ),
                ))
            }
            _ => Ok(None),
        }
    }
}

impl ApplyReport {
    fn add(&mut self, o: &ApplyReport) {
        self.streaming_files += o.streaming_files;
        self.ddl_records += o.ddl_records;
        self.reloads_loaded += o.reloads_loaded;
        self.rows_applied += o.rows_applied;
        self.entries_skipped += o.entries_skipped;
        self.misses += o.misses;
        self.unusable.extend(o.unusable.iter().cloned());
        self.last_file_id = o.last_file_id;
    }
}

/// Counts what an entry applied; outside strict mode an unusable object (an object-store error,
/// raised before any of its rows is applied) is recorded and skipped.
fn tolerate(
    r: Result<target::Applied, Error>,
    strict: bool,
    report: &mut ApplyReport,
) -> Result<(), Error> {
    match r {
        Ok(a) => {
            report.rows_applied += a.applied;
            report.misses += a.misses;
            Ok(())
        }
        Err(e) if !strict && !e.is_transient() && e.component() == Component::ObjectStore => {
            report.unusable.push(e.to_string());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn mismatch(object: &str, what: String) -> Error {
    Error::definite(Component::ObjectStore, format!("{object}: {what}"))
        .hint("the output does not match its registry row")
}

/// Replaces `table` by the parts of `reload`.
#[allow(clippy::too_many_arguments)]
async fn load_reload(
    tx: &tokio_postgres::Transaction<'_>,
    listing: &Listing,
    objects: &Objects,
    naming: &Naming,
    stream: &Stream,
    table: &TableName,
    reload: &DoneReload,
) -> Result<(), Error> {
    let parts = listing.reload_parts(reload.id).await?;
    let schema_path = parts[0].schema_path.as_deref().ok_or_else(|| {
        Error::definite(
            Component::Registry,
            format!("reload {} has no schema.yml", reload.id),
        )
    })?;
    let schema: SchemaFile = objects.yaml(schema_path).await?;
    let dest = naming.table(table);
    // Emptied first: reshaping rows about to go could fail (a type change they do not cast to).
    target::truncate(tx, &dest).await?;
    target::reshape(tx, naming, stream, table, &schema.columns).await?;
    for p in parts {
        let csv = objects
            .csv_reader(&p.object_path, Some(&p.checksum))
            .await?;
        let n = target::copy_rows(tx, &dest, &schema.columns, csv, &p.object_path).await?;
        if n != p.row_count as u64 {
            return Err(mismatch(
                &p.object_path,
                format!("{n} rows, registered {}", p.row_count),
            ));
        }
    }
    Ok(())
}

/// Applies one streaming file or DDL record, rows in `[min, until)`.
#[allow(clippy::too_many_arguments)]
async fn apply_entry(
    tx: &tokio_postgres::Transaction<'_>,
    objects: &Objects,
    naming: &Naming,
    stream: &Stream,
    row: &EntryRow,
    min: Option<Lsn>,
    until: Option<Lsn>,
    strict: bool,
) -> Result<target::Applied, Error> {
    let table = &row.entry.table;
    if row.entry.kind == EntryKind::Ddl {
        let doc: DdlFile = objects.yaml(&row.object_path).await?;
        target::apply_ddl(tx, naming, stream, table, &doc).await?;
        return Ok(target::Applied::default());
    }
    let schema_path = row.schema_path.as_deref().ok_or_else(|| {
        Error::definite(
            Component::Registry,
            format!("{} has no schema.yml", row.object_path),
        )
    })?;
    let schema: SchemaFile = objects.yaml(schema_path).await?;
    if schema.schema != table.schema || schema.table != table.name {
        return Err(mismatch(
            schema_path,
            format!(
                "names {}.{}, registered for {}",
                schema.schema,
                schema.table,
                table.dotted()
            ),
        ));
    }
    let records = objects.csv(&row.object_path, Some(&row.checksum)).await?;
    let data_rows = records.len().saturating_sub(1);
    if data_rows != row.row_count as usize {
        return Err(mismatch(
            &row.object_path,
            format!("{data_rows} rows, registered {}", row.row_count),
        ));
    }
    target::reshape(tx, naming, stream, table, &schema.columns).await?;
    let r = target::apply_rows(
        tx,
        &naming.table(table),
        &schema,
        &records,
        min,
        until,
        strict,
    )
    .await?;
    Ok(r)
}
