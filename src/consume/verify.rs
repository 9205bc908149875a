//! `cdc-egress verify`: proves that the files equal the source, row by row, at one position.
//!
//! # How the comparison is exact
//! 1. A temporary slot gives a snapshot of the source consistent at an LSN `S` (as a reload's cut),
//!    imported into a read-only transaction that stays open for the comparison.
//! 2. Every change below `S` is registered once the source's slot has confirmed `S` (the daemon
//!    acknowledges only what is persisted, README "Acknowledgement"), so `verify` waits for that,
//!    or says how far it got.
//! 3. The tables are rebuilt from the files into scratch schemas of a PostgreSQL you name by the
//!    reference loader ([`super::apply`]) with the bound `S`: reloads with a cut below `S`, rows
//!    with `_commit_lsn < S`. That is the table the consumer rule gives as of `S`.
//! 4. Both sides are read in the same order (the key's text, or the whole row's text for a table
//!    without a key, `COLLATE "C"`) through cursors, with the same session settings as the files
//!    (UTC, ISO dates, `extra_float_digits = 3`), and merged: a key on one side only is missing or
//!    extra, a key on both with another row text is different. Only the published columns and the
//!    publication's row filter of the source are compared. Memory holds one cursor page per side,
//!    whatever the table's size; the servers sort.

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::apply::{Applier, ApplyOptions, ApplyReport};
use super::listing::{Listing, Objects};
use super::target::Naming;
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::pg::conninfo::ConnInfo;
use crate::table::{quote_ident, TableName};

/// Rows fetched per cursor page.
const PAGE: i32 = 2000;

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Only these tables (empty: every published table).
    pub tables: Vec<TableName>,
    /// Differing keys shown per table, at most.
    pub samples: usize,
    /// How long to wait for the daemon to confirm the position.
    pub wait: Duration,
    /// Leave the scratch schemas in place (for inspection).
    pub keep_scratch: bool,
    /// Show progress on the terminal.
    pub progress: bool,
}

/// The outcome for one table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    /// Rows of the source compared (published rows at the position).
    pub source_rows: u64,
    /// Rows the files give.
    pub file_rows: u64,
    /// In the source, not in the files.
    pub missing: u64,
    /// In the files, not in the source.
    pub extra: u64,
    /// The same key, another row.
    pub different: u64,
    /// Columns on one side only.
    pub column_differences: Vec<String>,
    /// Up to `samples` keys (or rows, without a key) of each kind: `missing <key>` / `extra <key>`
    /// / `different <key>`.
    pub samples: Vec<String>,
    /// How rows were matched: `key (a, b)` or `whole row`.
    pub matched_by: String,
}

impl TableReport {
    pub fn equal(&self) -> bool {
        self.missing == 0
            && self.extra == 0
            && self.different == 0
            && self.column_differences.is_empty()
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// The position compared at.
    pub position: String,
    pub source: String,
    pub tables: Vec<TableReport>,
    pub applied: ApplyReport,
    pub equal: bool,
    /// With `--keep-scratch`: the prefix of the scratch schemas left for inspection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_schemas: Option<String>,
}

/// The inputs of [`verify`].
pub struct VerifyInputs<'a> {
    pub source: &'a ConnInfo,
    pub slot: &'a str,
    pub publication: &'a str,
    pub listing: Listing,
    pub objects: Objects,
    /// The PostgreSQL that holds the scratch schemas.
    pub scratch: &'a ConnInfo,
    /// The registry's schema: when it lives in the source database, its tables may be published
    /// (`FOR ALL TABLES`), but the daemon never streams them, so they are not compared.
    pub registry_schema: &'a str,
}

fn src(what: impl std::fmt::Display, e: tokio_postgres::Error) -> Error {
    Error::from_postgres(Component::Source, e).context(format!("verify: {what}"))
}

/// Verifies; see the module documentation.
pub async fn verify(input: VerifyInputs<'_>, opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    // 0. No reload may be under way: a table's rows below a running reload's cut are in no file yet.
    wait_reloads_idle(&input.listing, opts.wait).await?;
    // 1. The position and its snapshot.
    // Unique per run (a PID repeats across containers and hosts): a run never meets another's
    // scratch state.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
    let tag = format!("cdc_egress_verify_{}_{nonce:x}", std::process::id());
    let cut =
        crate::reload::export::take_cut(input.source, input.slot, &format!("verify_{nonce:x}"))
            .await?;
    let position = cut.lsn;
    let imported = async {
        let c = crate::pg::slot::connect_source(input.source).await?;
        // A transaction on the plain client (it stays open for the whole comparison).
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::table::quote_literal(&cut.snapshot)
        ))
        .await
        .map_err(|e| src("import the snapshot", e))?;
        Ok::<_, Error>(c)
    };
    let imported = imported.await;
    cut.release().await;
    let source_tx = imported?;
    // 2. What to compare, as the snapshot sees the publication.
    let tables =
        tables_to_compare(&source_tx, input.publication, input.registry_schema, opts).await?;
    // 3. Wait for the registry to cover the position.
    wait_confirmed(input.source, input.slot, position, opts.wait).await?;
    // A reload the daemon started meanwhile (for a DDL or publication change below the position
    // that it had not read yet) would leave its table's rows below the position in no file.
    let active = input.listing.active_reloads().await?;
    if !active.is_empty() {
        return Err(Error::transient(
            Component::Reload,
            format!(
                "verify: reloads started while verify waited ({}): run it again when they are done",
                active.join(", ")
            ),
        ));
    }
    // 4. Rebuild every table from the files (renames need the other names' history); 5. lock and
    //    compare the asked ones. The state schema is the tag itself: a source schema always gets `<tag>_`.
    let naming = Naming {
        state_schema: tag.clone(),
        schema_prefix: format!("{tag}_"),
        unlogged: true,
    };
    let cleanup = input.scratch.connect().await?;
    let source_name = input.listing.source().to_string();
    let result = async {
        let scratch = input.scratch.connect().await?;
        let mut applier = Applier::open(
            input.listing,
            input.objects,
            scratch,
            naming.clone(),
            ApplyOptions {
                tables: Vec::new(),
                until: Some(position),
                strict: false,
                ignore_reloads: false,
            },
        )
        .await?;
        let applied = applier.catch_up().await?;
        // The compared tables are locked as of the snapshot only now, just before they are read:
        // a DDL (a TRUNCATE, a rewrite) committed after the position would make the old snapshot
        // see a table empty or changed. The export's guard takes ACCESS SHARE (until verify ends)
        // and compares the shape the snapshot sees with the catalog now; a difference fails the
        // run (exit 3: run it again).
        let current = input.source.connect().await?;
        for (t, oid) in &tables {
            crate::reload::export::guard_against_ddl(&source_tx, &current, t, *oid)
                .await
                .map_err(|e| {
                    e.context(format!("verify: {} changed after the position", t.dotted()))
                })?;
        }
        drop(current);
        let mut reports = Vec::new();
        for (t, _) in &tables {
            reports.push(
                compare_table(
                    &source_tx,
                    applier.target(),
                    input.publication,
                    &naming,
                    t,
                    opts,
                )
                .await?,
            );
        }
        Ok::<_, Error>((applied, reports))
    }
    .await;
    if !opts.keep_scratch {
        drop_scratch(&cleanup, &naming).await;
    }
    let (applied, tables) = result?;
    let equal =
        tables.iter().all(TableReport::equal) && applied.unusable.is_empty() && applied.misses == 0;
    Ok(VerifyReport {
        position: position.to_string(),
        source: source_name,
        tables,
        applied,
        equal,
        scratch_schemas: opts.keep_scratch.then(|| format!("{tag}*")),
    })
}

/// Waits until the source has no reload `requested` or `running`.
async fn wait_reloads_idle(listing: &Listing, wait: Duration) -> Result<(), Error> {
    let started = Instant::now();
    loop {
        let active = listing.active_reloads().await?;
        if active.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(Error::transient(
                Component::Reload,
                format!(
                    "verify: reloads are under way ({}): their tables cannot be compared until they are done",
                    active.join(", ")
                ),
            )
            .hint("wait for them (`cdc-egress status`), or longer with --wait"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `slot` has confirmed `position`.
async fn wait_confirmed(
    source: &ConnInfo,
    slot: &str,
    position: Lsn,
    wait: Duration,
) -> Result<(), Error> {
    let c = source.connect().await?;
    let started = Instant::now();
    // A WAL record past the position, so an idle daemon has something to confirm beyond it.
    let _ = c
        .execute(
            "SELECT pg_logical_emit_message(false, 'cdc-egress-verify', '')",
            &[],
        )
        .await;
    loop {
        let confirmed: Option<String> = c
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| src("read the slot", e))?
            .and_then(|r| r.get(0));
        let Some(confirmed) = confirmed else {
            return Err(Error::definite(
                Component::Slot,
                format!("verify: the slot {slot:?} does not exist: is the daemon set up (`cdc-egress run`)?"),
            ));
        };
        let at: Lsn = confirmed
            .parse()
            .map_err(|_| Error::definite(Component::Slot, format!("slot LSN {confirmed:?}")))?;
        if at >= position {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(Error::definite(
                Component::Slot,
                format!(
                    "verify: not caught up: the slot {slot:?} confirmed {at} < {position} after {} s",
                    wait.as_secs()
                ),
            )
            .hint("is `cdc-egress run` running for this source? (`cdc-egress status`); or wait longer with --wait"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn drop_scratch(c: &Client, naming: &Naming) {
    let schemas: Vec<String> = match c
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname = $1 OR starts_with(nspname, $2)",
            &[&naming.state_schema, &naming.schema_prefix],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            tracing::warn!("verify: could not list the scratch schemas to drop them: {e}");
            return;
        }
    };
    for s in schemas {
        if let Err(e) = c
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", quote_ident(&s)))
            .await
        {
            tracing::warn!("verify: could not drop the scratch schema {s}: {e}");
        }
    }
}

/// A table's columns as (name, position in the primary key, attnum, attgenerated).
async fn columns_of(
    c: &impl tokio_postgres::GenericClient,
    t: &TableName,
) -> Result<Vec<(String, Option<i32>, i16, String)>, Error> {
    let rows = c
        .query(
            "SELECT a.attname::text, array_position(i.indkey::int2[], a.attnum), a.attnum, a.attgenerated::text \
             FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&t.quoted()],
        )
        .await
        .map_err(|e| src(format!("read the columns of {}", t.dotted()), e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// The published tables to compare (all, or those asked), with their OIDs, as the snapshot sees them.
async fn tables_to_compare(
    source: &Client,
    publication: &str,
    registry_schema: &str,
    opts: &VerifyOptions,
) -> Result<Vec<(TableName, u32)>, Error> {
    let mut published = crate::pg::slot::published_tables(source, publication).await?;
    published.retain(|t| t.schema != registry_schema);
    for t in &opts.tables {
        if !published.contains(t) {
            return Err(Error::definite(
                Component::Config,
                format!(
                    "verify: {} is not in the publication {publication:?}",
                    t.dotted()
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for t in published {
        if !opts.tables.is_empty() && !opts.tables.contains(&t) {
            continue;
        }
        let oid: u32 = source
            .query_one(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(|e| src(format!("look up {}", t.dotted()), e))?
            .get(0);
        out.push((t, oid));
    }
    Ok(out)
}

async fn compare_table(
    source: &Client,
    scratch: &Client,
    publication: &str,
    naming: &Naming,
    t: &TableName,
    opts: &VerifyOptions,
) -> Result<TableReport, Error> {
    let mut report = TableReport {
        table: t.dotted(),
        ..Default::default()
    };
    let copy = naming.table(t);
    let source_cols = columns_of(source, t).await?;
    let copy_cols = columns_of(scratch, &copy).await?;
    let relid: u32 = source
        .query_one("SELECT to_regclass($1)::oid", &[&t.quoted()])
        .await
        .map_err(|e| src("look up a table", e))?
        .get(0);
    let subset = crate::pg::slot::published_subset(source, publication, relid).await?;
    // The published columns (the publication's column list, generated columns as pgoutput sends
    // them) must be exactly the files' columns; the rows are compared on those they share.
    let in_source: Vec<String> = source_cols
        .iter()
        .filter(|(_, _, attnum, generated)| subset.publishes_column(*attnum, generated))
        .map(|c| c.0.clone())
        .collect();
    let published: Vec<String> = if copy_cols.is_empty() {
        in_source.clone()
    } else {
        for (c, ..) in &copy_cols {
            if !in_source.contains(c) {
                report
                    .column_differences
                    .push(format!("{c} is in the files, not published by the source"));
            }
        }
        for c in &in_source {
            if !copy_cols.iter().any(|(x, ..)| x == c) {
                report
                    .column_differences
                    .push(format!("{c} is published by the source, not in the files"));
            }
        }
        copy_cols
            .iter()
            .map(|c| c.0.clone())
            .filter(|c| in_source.contains(c))
            .collect()
    };
    let mut key: Vec<(i32, String)> = source_cols
        .iter()
        .filter_map(|(n, k, ..)| k.map(|k| (k, n.clone())))
        .filter(|(_, n)| published.contains(n))
        .collect();
    key.sort();
    let key: Vec<String> = key.into_iter().map(|(_, n)| n).collect();
    report.matched_by = if key.is_empty() {
        "whole row".into()
    } else {
        format!("key ({})", key.join(", "))
    };
    let filter = subset
        .row_filter
        .as_deref()
        .map(|f| format!(" WHERE {f}"))
        .unwrap_or_default();
    let query = |table: &TableName, filter: &str| {
        let row = format!(
            "ROW({})::text",
            published
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let key_text = if key.is_empty() {
            row.clone()
        } else {
            format!(
                "ROW({})::text",
                key.iter()
                    .map(|c| format!("{}::text", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        // Both servers and the merge below order by the same string, bytewise.
        let order = format!("{key_text} COLLATE \"C\"");
        format!(
            "SELECT {key_text}, {row} FROM {}{filter} ORDER BY {order}",
            table.quoted()
        )
    };
    let bar = opts.progress.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {pos} rows compared")
                .expect("a valid template"),
        );
        b.set_message(t.dotted());
        b
    });
    let mut theirs = Cursor::open(source, &query(t, &filter), "verify_source").await?;
    let mut scratch_tx_client = ScratchReader::new(scratch);
    let mut ours = if copy_cols.is_empty() {
        None
    } else {
        Some(scratch_tx_client.open(&query(&copy, "")).await?)
    };
    let mut a = theirs.next(source).await?;
    let mut b = match &mut ours {
        Some(c) => c.next(scratch_tx_client.client()).await?,
        None => None,
    };
    let sample = |report: &mut TableReport, what: &str, k: &str| {
        if report.samples.len() < opts.samples * 3 {
            report.samples.push(format!("{what} {k}"));
        }
    };
    loop {
        let order = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(x), Some(y)) => x.0.as_bytes().cmp(y.0.as_bytes()),
        };
        match order {
            Ordering::Less => {
                let (k, _) = a.take().expect("compared");
                report.source_rows += 1;
                report.missing += 1;
                sample(&mut report, "missing", &k);
                a = theirs.next(source).await?;
            }
            Ordering::Greater => {
                let (k, _) = b.take().expect("compared");
                report.file_rows += 1;
                report.extra += 1;
                sample(&mut report, "extra", &k);
                b = next_ours(&mut ours, &scratch_tx_client).await?;
            }
            Ordering::Equal => {
                let ((k, x), (_, y)) = (a.take().expect("compared"), b.take().expect("compared"));
                report.source_rows += 1;
                report.file_rows += 1;
                if x != y {
                    report.different += 1;
                    sample(&mut report, "different", &k);
                }
                a = theirs.next(source).await?;
                b = next_ours(&mut ours, &scratch_tx_client).await?;
            }
        }
        if let Some(bar) = &bar {
            bar.set_position(report.source_rows);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    theirs.close(source).await?;
    if let Some(c) = ours {
        c.close(scratch_tx_client.client()).await?;
    }
    scratch_tx_client.finish().await?;
    Ok(report)
}

async fn next_ours(
    ours: &mut Option<Cursor>,
    reader: &ScratchReader<'_>,
) -> Result<Option<(String, String)>, Error> {
    match ours {
        Some(c) => c.next(reader.client()).await,
        None => Ok(None),
    }
}

/// The scratch side reads inside a transaction of its own (cursors live in transactions).
struct ScratchReader<'a> {
    client: &'a Client,
    open: bool,
}

impl<'a> ScratchReader<'a> {
    fn new(client: &'a Client) -> Self {
        ScratchReader {
            client,
            open: false,
        }
    }

    fn client(&self) -> &'a Client {
        self.client
    }

    async fn open(&mut self, query: &str) -> Result<Cursor, Error> {
        self.client
            .batch_execute("BEGIN READ ONLY")
            .await
            .map_err(|e| src("begin on the scratch database", e))?;
        self.open = true;
        Cursor::open(self.client, query, "verify_files").await
    }

    async fn finish(self) -> Result<(), Error> {
        if self.open {
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| src("end on the scratch database", e))?;
        }
        Ok(())
    }
}

/// A server-side cursor read a page at a time.
struct Cursor {
    name: &'static str,
    page: std::collections::VecDeque<(String, String)>,
    done: bool,
}

impl Cursor {
    async fn open(
        c: &impl tokio_postgres::GenericClient,
        query: &str,
        name: &'static str,
    ) -> Result<Cursor, Error> {
        c.batch_execute(&format!("DECLARE {name} NO SCROLL CURSOR FOR {query}"))
            .await
            .map_err(|e| src(format!("open a cursor ({query})"), e))?;
        Ok(Cursor {
            name,
            page: Default::default(),
            done: false,
        })
    }

    async fn next(
        &mut self,
        c: &impl tokio_postgres::GenericClient,
    ) -> Result<Option<(String, String)>, Error> {
        if self.page.is_empty() && !self.done {
            let rows = c
                .query(&format!("FETCH {PAGE} FROM {}", self.name), &[])
                .await
                .map_err(|e| src("fetch rows", e))?;
            self.done = rows.len() < PAGE as usize;
            self.page = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        Ok(self.page.pop_front())
    }

    async fn close(self, c: &impl tokio_postgres::GenericClient) -> Result<(), Error> {
        c.batch_execute(&format!("CLOSE {}", self.name))
            .await
            .map_err(|e| src("close a cursor", e))
    }
}

/// The report as text: one line per table, then the sample keys of those that differ.
pub fn render_text(r: &VerifyReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "verified source {:?} at {} ({} files, {} schema changes, {} reloads applied)",
        r.source,
        r.position,
        r.applied.streaming_files,
        r.applied.ddl_records,
        r.applied.reloads_loaded
    );
    let width = r
        .tables
        .iter()
        .map(|t| t.table.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "{:<width$}  {:>10}  {:>10}  {:>8}  {:>8}  {:>9}  result",
        "table", "source", "files", "missing", "extra", "different"
    );
    for t in &r.tables {
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>10}  {:>8}  {:>8}  {:>9}  {}",
            t.table,
            t.source_rows,
            t.file_rows,
            t.missing,
            t.extra,
            t.different,
            if t.equal() { "equal" } else { "DIFFERENT" }
        );
    }
    if !r.applied.unusable.is_empty() || r.applied.misses > 0 {
        let _ = writeln!(
            out,
            "the files contradict themselves: {} updates or deletes found no row or several; {} objects unusable:",
            r.applied.misses,
            r.applied.unusable.len()
        );
        for u in &r.applied.unusable {
            let _ = writeln!(out, "  {u}");
        }
    }
    for t in r.tables.iter().filter(|t| !t.equal()) {
        let _ = writeln!(out, "{} (matched by {}):", t.table, t.matched_by);
        for c in &t.column_differences {
            let _ = writeln!(out, "  column: {c}");
        }
        for s in &t.samples {
            let _ = writeln!(out, "  {s}");
        }
    }
    if let Some(s) = &r.scratch_schemas {
        let _ = writeln!(out, "scratch schemas kept: {s}");
    }
    let _ = writeln!(
        out,
        "{}",
        if r.equal {
            "the files equal the source"
        } else {
            "the files DIFFER from the source"
        }
    );
    out
}
