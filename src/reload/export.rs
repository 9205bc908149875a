//! Exporting tables from one consistent snapshot, in parallel.
//!
//! # The cut
//! [`take_cut`] creates a TEMPORARY logical slot with `EXPORT_SNAPSHOT` on a replication connection.
//! PostgreSQL returns the slot's *consistent point* `C` and a snapshot that sees exactly the
//! transactions whose commit record lies below `C` (no commit record straddles `C`: it is a record
//! boundary). So "in the export" ⇔ "commit LSN < C", and the streaming side keeps exactly the changes
//! with commit LSN ≥ C (see `Batcher::release_hold`). Nothing is lost or applied twice.
//!
//! # Parallelism without WAL retention
//! `parallelism` workers each open a connection, `BEGIN ISOLATION LEVEL REPEATABLE READ` and
//! `SET TRANSACTION SNAPSHOT`; once every worker has imported it, the temporary slot's connection is
//! closed, which drops the slot: the export then holds no slot, so however long it runs it retains no
//! WAL (the main slot keeps advancing with the stream). Workers pull parts (ctid ranges, largest
//! first) from one queue shared by all tables of the job, so several tables export at once and a
//! large table is split across workers. Each part is `COPY (SELECT <columns> FROM t WHERE (<row
//! filter>) AND ctid …) TO STDOUT (FORMAT csv, HEADER, NULL '\N', FORCE_QUOTE *)` streamed into a gzip
//! spool and uploaded: the same dialect, byte for byte, as streaming files.
//!
//! # The same columns and rows as streaming
//! pgoutput sends only what the publication publishes of a table: its column list (the Relation
//! message names only those columns, in attribute order) and the rows its row filter accepts
//! (PostgreSQL 15+). [`describe`] reads both for the exported relation with
//! `pg::slot::published_subset`, which applies pgoutput's own rule for combining a publication's
//! entries, and reads them inside the snapshot, so they are the publication as of the cut, as
//! pgoutput sees it when decoding there. Then:
//! - the schema (what `schema.yml` says and the registry records) lists exactly the published
//!   columns in attribute order, with the names, type OIDs and typmods a Relation message carries:
//!   its fingerprint equals the streaming one, and a part's header equals a streaming file's table
//!   columns, so a reload never bumps the schema version and consumers can union both;
//! - every part selects those columns only, so a column the publication hides never leaves the
//!   database;
//! - every part keeps the rows `WHERE (<filter>)` accepts. The filter is `pg_get_expr` of the
//!   catalog's expression for this very relation, so it is valid SQL here; SQL's WHERE drops a NULL
//!   result as pgoutput does; and filters may only use immutable built-in functions, so evaluating
//!   it in the snapshot gives what pgoutput would decide for the same row version. Replaying the
//!   reload and then the streaming rows from the cut (where pgoutput turns an UPDATE leaving the
//!   filter into a DELETE and one entering it into an INSERT) gives what the publication shows.
//! - a table the publication does not publish (any more) is refused with a definite error: pgoutput
//!   sends none of its rows, so no export can match it.
//!
//! With `publish_via_partition_root` the exported relation is the published root and the rows of all
//! its partitions are read through it, converted to its row type and filtered by its filter, as
//! pgoutput does; without it each partition is exported with its own entry, as pgoutput publishes it
//! (PostgreSQL refuses a list or a filter on a partitioned table in that mode).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use object_store::path::Path;
use tokio::sync::mpsc;

use crate::core::batch::SpoolFactory;
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::pg::conninfo::{pg_error, ConnInfo};
use crate::pg::slot::{published_subset, published_tables};
use crate::pg::wire::ReplicationConnection;
use crate::sink::layout;
use crate::sink::spool::GzipSpools;
use crate::sink::store::Store;
use crate::table::{
    quote_ident, quote_literal, ColumnSchema, ReplicaIdentity, TableName, TableSchema,
};

/// Tables smaller than this many heap pages (64 MiB) are exported as one part.
const PART_PAGES: i64 = 8192;

/// How many parts a table of `pages` heap pages is split into for `workers` workers: one below
/// [`PART_PAGES`]; above, at least one per worker and up to four per worker while a part keeps a
/// quarter of `PART_PAGES` (16 MiB of heap), and no part above `8 × PART_PAGES` (512 MiB); at most
/// 1,000. Several parts per worker keep the machine busy while a worker uploads a finished part (its
/// upload interleaves with the other workers' compression) and end the workers close together. On
/// the reload benchmark (2 workers, 289 MB: 8 parts instead of 2) the gain was within the
/// machine's noise (benches/README.md); the shorter tail is what it buys.
fn part_count(pages: i64, workers: usize) -> i64 {
    if pages <= PART_PAGES {
        return 1;
    }
    let workers = workers.max(1) as i64;
    let interleaved = (4 * workers).min(pages / (PART_PAGES / 4));
    let bounded = (pages + 8 * PART_PAGES - 1) / (8 * PART_PAGES);
    let wanted = workers.max(interleaved).max(bounded).min(1000);
    // Parts are `ceil(pages / parts)` pages long: as many as that length needs, so none starts
    // past the table (with more workers than that, some simply find the queue empty).
    let step = (pages + wanted - 1) / wanted;
    (pages + step - 1) / step
}

/// A consistent cut: the snapshot to import, and the LSN it is consistent at.
pub struct Cut {
    pub lsn: Lsn,
    pub snapshot: String,
    conn: ReplicationConnection,
}

impl Cut {
    /// Drops the temporary slot (and with it the snapshot's exporter).
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// Takes a cut with a temporary slot named after `slot` and `tag`.
pub async fn take_cut(source: &ConnInfo, slot: &str, tag: &str) -> Result<Cut, Error> {
    let mut conn = ReplicationConnection::connect(source).await?;
    let mut name = format!("{slot}_cut_{tag}");
    name.truncate(63);
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&name)
        ))
        .await
        .map_err(|e| e.context("take a consistent cut for a reload"))?;
    let row = rows.first().ok_or_else(|| {
        Error::transient(Component::Source, "CREATE_REPLICATION_SLOT returned no row")
    })?;
    let lsn: Lsn = row
        .get(1)
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::transient(
                Component::Source,
                "CREATE_REPLICATION_SLOT returned no consistent point",
            )
        })?;
    let snapshot = row.get(2).and_then(|v| v.clone()).ok_or_else(|| {
        Error::transient(
            Component::Source,
            "CREATE_REPLICATION_SLOT returned no snapshot",
        )
    })?;
    Ok(Cut {
        lsn,
        snapshot,
        conn,
    })
}

/// One exported part, uploaded.
#[derive(Debug, Clone)]
pub struct Part {
    pub index: u32,
    pub path: Path,
    pub rows: u64,
    pub gz_bytes: u64,
    pub csv_bytes: u64,
    pub sha256: String,
}

/// What the exporter reports while it runs.
#[derive(Debug)]
pub enum ExportEvent {
    /// The table was described inside the snapshot: estimates for progress.
    Planned {
        reload_id: i64,
        rows: i64,
        bytes: i64,
    },
    Finished(TableExport),
}

/// What a table's export produced (parts sorted by index), or why it failed.
#[derive(Debug)]
pub struct TableExport {
    pub table: TableName,
    pub reload_id: i64,
    pub schema: Arc<TableSchema>,
    pub result: Result<Vec<Part>, Error>,
}

/// Rows and compressed bytes exported so far, per reload id.
#[derive(Default)]
pub struct Progress {
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
}

/// A table to export and where its parts go.
pub struct TableJob {
    pub table: TableName,
    pub reload_id: i64,
    /// The reload's directory (`Namespace::reload_dir`): parts are written into it.
    pub dir: object_store::path::Path,
    pub progress: Arc<Progress>,
}

/// Facts read inside the snapshot before any part runs.
pub struct Planned {
    /// The published columns only, in attribute order (what a Relation message lists).
    pub schema: Arc<TableSchema>,
    /// The publication's row filter for the table (SQL), if it has one.
    pub row_filter: Option<String>,
    pub estimate_rows: i64,
    pub estimate_bytes: i64,
    pages: i64,
}

/// A table's parts still running, those done, and its first error.
struct Outstanding {
    parts_left: usize,
    parts: Vec<Part>,
    error: Option<Error>,
}

struct PartJob {
    table_idx: usize,
    index: u32,
    from_page: i64,
    to_page: Option<i64>,
    weight: i64,
}

pub struct Exporter {
    /// The main slot's name; temporary cut slots are named after it.
    pub slot_name: String,
    /// The publication streamed: exports show its columns and rows of each table, nothing more.
    pub publication: String,
    pub source: ConnInfo,
    pub store: Store,
    pub spool_dir: PathBuf,
    pub parallelism: usize,
}

async fn begin_in_snapshot(
    source: &ConnInfo,
    snapshot: &str,
) -> Result<tokio_postgres::Client, Error> {
    let c = source.connect().await?;
    // No wait on a lock without end: a worker's first COPY of a table whose ALTER waits behind
    // the DDL guard would wait for the guard, which waits for the worker (a cycle PostgreSQL cannot
    // see). A lock timeout fails the part (transient: 55P03), the attempt ends, and is retried.
    c.batch_execute(&format!(
        "SET lock_timeout = '{EXPORT_LOCK_TIMEOUT}'; \
         BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .await
    .map_err(|e| pg_error(e).context("import the reload snapshot"))?;
    Ok(c)
}

/// Describes `table` as the snapshot sees it: the columns and the row filter `publication` publishes
/// of it. A table `pg_publication_tables` does not list for it is refused (that view computes its
/// list from the current catalog, not the snapshot: a table added to or removed from the publication
/// while the cut is taken is judged as the catalog stands right after the cut).
pub async fn describe(
    c: &tokio_postgres::Client,
    publication: &str,
    table: &TableName,
) -> Result<Planned, Error> {
    let published = published_tables(c, publication).await?;
    describe_published(c, publication, &published, table).await
}

/// [`describe`] with the publication's tables already listed (once per job: with `FOR ALL TABLES`
/// each listing reads all of `pg_class`).
async fn describe_published(
    c: &tokio_postgres::Client,
    publication: &str,
    published: &[TableName],
    table: &TableName,
) -> Result<Planned, Error> {
    let rel = c
        .query_opt(
            "SELECT c.oid, c.relreplident::text, pg_relation_size(c.oid) / current_setting('block_size')::bigint, \
                    greatest(c.reltuples, 0)::bigint, pg_relation_size(c.oid) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(pg_error)?
        .ok_or_else(|| Error::definite(Component::Reload, format!("table {table} does not exist (any more)")))?;
    let oid: u32 = rel.get(0);
    // Membership as `pg_publication_tables` lists it, as for a fresh start and `reload` requests.
    if !published.contains(table) {
        return Err(Error::definite(
            Component::Reload,
            format!("table {table} is not in publication {publication:?} (any more): it is not exported"),
        ));
    }
    let subset = published_subset(c, publication, oid).await?;
    let ident: String = rel.get(1);
    let identity = match ident.as_str() {
        "f" => ReplicaIdentity::Full,
        "n" => ReplicaIdentity::Nothing,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let cols = c
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, NULLIF(a.atttypmod, -1)), a.attnotnull, \
               (SELECT k.ord::int2 FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 WHERE i.indrelid = a.attrelid AND i.indisprimary AND k.attnum = a.attnum), \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND a.attnum = ANY(i.indkey) \
                 AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))) \
                 OR c.relreplident = 'f', \
               a.attnum, a.attgenerated::text \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(pg_error)?;
    let columns = cols
        .iter()
        .filter(|r| subset.publishes_column(r.get(7), r.get(8)))
        .map(|r| ColumnSchema {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            type_name: r.get(3),
            nullable: !r.get::<_, bool>(4),
            primary_key: r.get::<_, Option<i16>>(5).map(|p| p as u16),
            replica_key: r.get(6),
            attnum: Some(r.get(7)),
        })
        .collect();
    Ok(Planned {
        schema: TableSchema::new(table.clone(), oid, identity, columns),
        row_filter: subset.row_filter,
        pages: rel.get(2),
        estimate_rows: rel.get(3),
        estimate_bytes: rel.get(4),
    })
}

impl Exporter {
    /// Imports `cut` into the workers, releases the cut (dropping its temporary slot), then exports
    /// every table. Each table's result is sent on `done` as soon as its last part is uploaded, so a
    /// finished table does not wait for the others, and a failing one does not stop them.
    pub async fn run(
        &self,
        cut: Cut,
        jobs: Vec<TableJob>,
        done: mpsc::UnboundedSender<ExportEvent>,
    ) -> Result<(), Error> {
        let workers = self.parallelism.max(1);
        let mut clients = Vec::with_capacity(workers);
        for _ in 0..workers {
            clients.push(begin_in_snapshot(&self.source, &cut.snapshot).await?);
        }
        // One more transaction in the snapshot holds the DDL guard (see `guard_against_ddl`).
        let guard = begin_in_snapshot(&self.source, &cut.snapshot).await?;
        // Every worker holds the snapshot now: the temporary slot is no longer needed.
        cut.release().await;

        // Plan every table inside the snapshot.
        // Listing the publication in an old snapshot opens every table the snapshot's catalog
        // names; one a DDL dropped since the cut (a partition, say) fails with an internal error
        // ("could not open relation"). That is this attempt's snapshot being too old, not a
        // definite problem: the retry takes a new cut.
        let published = published_tables(&clients[0], &self.publication)
            .await
            .map_err(|e| match e.sqlstate() {
                Some("XX000") => Error::transient(
                    Component::Reload,
                    format!("{e} (a table was dropped after the cut; retrying with a new cut)"),
                ),
                _ => e,
            })?;
        let mut plans = Vec::with_capacity(jobs.len());
        for job in &jobs {
            plans.push(
                describe_published(&clients[0], &self.publication, &published, &job.table).await,
            );
        }
        // Keep DDL off the planned tables until every part is read, and refuse the tables a DDL
        // changed between the cut and this lock (see `guard_against_ddl`).
        let current = self.source.connect().await?;
        current
            .batch_execute(&format!("SET lock_timeout = '{EXPORT_LOCK_TIMEOUT}'"))
            .await
            .map_err(pg_error)?;
        for (job, plan) in jobs.iter().zip(plans.iter_mut()) {
            if let Ok(p) = plan {
                if let Err(e) =
                    guard_against_ddl(&guard, &current, &job.table, p.schema.relation_oid).await
                {
                    *plan = Err(e);
                }
            }
        }
        drop(current);
        let mut queue = Vec::new();
        let mut remaining: Vec<usize> = vec![0; jobs.len()];
        let mut schemas: Vec<Option<(Arc<TableSchema>, Option<String>)>> = vec![None; jobs.len()];
        for (i, p) in plans.into_iter().enumerate() {
            match p {
                Ok(p) => {
                    let _ = done.send(ExportEvent::Planned {
                        reload_id: jobs[i].reload_id,
                        rows: p.estimate_rows,
                        bytes: p.estimate_bytes,
                    });
                    let parts = part_count(p.pages, workers);
                    let step = (p.pages + parts - 1) / parts.max(1);
                    for k in 0..parts {
                        queue.push(PartJob {
                            table_idx: i,
                            index: k as u32 + 1,
                            from_page: k * step,
                            to_page: (k + 1 < parts).then_some((k + 1) * step),
                            weight: if parts == 1 { p.pages } else { step },
                        });
                    }
                    remaining[i] = parts as usize;
                    schemas[i] = Some((p.schema, p.row_filter));
                }
                Err(e) => {
                    let _ = done.send(ExportEvent::Finished(TableExport {
                        table: jobs[i].table.clone(),
                        reload_id: jobs[i].reload_id,
                        schema: TableSchema::new(
                            jobs[i].table.clone(),
                            0,
                            ReplicaIdentity::Default,
                            vec![],
                        ),
                        result: Err(e),
                    }));
                }
            }
        }
        queue.sort_by_key(|p| std::cmp::Reverse(p.weight));
        let queue = Arc::new(Mutex::new(VecDeque::from(queue)));
        let jobs = Arc::new(jobs);
        let schemas = Arc::new(schemas);
        let results: Arc<Mutex<HashMap<usize, Outstanding>>> = Arc::new(Mutex::new(
            remaining
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        i,
                        Outstanding {
                            parts_left: *n,
                            parts: Vec::new(),
                            error: None,
                        },
                    )
                })
                .collect(),
        ));

        let mut tasks = tokio::task::JoinSet::new();
        for client in clients {
            let queue = queue.clone();
            let jobs = jobs.clone();
            let schemas = schemas.clone();
            let results = results.clone();
            let done = done.clone();
            let store = self.store.clone();
            let spool_dir = self.spool_dir.clone();
            tasks.spawn(async move {
                loop {
                    let next = queue.lock().expect("queue lock").pop_front();
                    let Some(part) = next else { break };
                    let job = &jobs[part.table_idx];
                    let (schema, row_filter) = schemas[part.table_idx].clone().expect("planned");
                    let skip = results
                        .lock()
                        .expect("results lock")
                        .get(&part.table_idx)
                        .is_some_and(|r| r.error.is_some());
                    let outcome = if skip {
                        Err(Error::transient(
                            Component::Reload,
                            "another part of this table failed",
                        ))
                    } else {
                        let selection = Selection {
                            schema: &schema,
                            row_filter: row_filter.as_deref(),
                        };
                        export_part(&client, &store, &spool_dir, job, selection, &part).await
                    };
                    let finished = {
                        let mut r = results.lock().expect("results lock");
                        let entry = r.get_mut(&part.table_idx).expect("table entry");
                        entry.parts_left -= 1;
                        match outcome {
                            Ok(p) => entry.parts.push(p),
                            Err(e) => {
                                if entry.error.is_none() {
                                    entry.error = Some(e);
                                }
                            }
                        }
                        (entry.parts_left == 0)
                            .then(|| (std::mem::take(&mut entry.parts), entry.error.take()))
                    };
                    if let Some((mut parts, err)) = finished {
                        parts.sort_by_key(|p| p.index);
                        let _ = done.send(ExportEvent::Finished(TableExport {
                            table: job.table.clone(),
                            reload_id: job.reload_id,
                            schema,
                            result: match err {
                                Some(e) => Err(e),
                                None => Ok(parts),
                            },
                        }));
                    }
                }
                let _ = client.batch_execute("COMMIT").await;
            });
        }
        let mut abnormal = None;
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                abnormal.get_or_insert_with(|| e.to_string());
            }
        }
        // Every part is read: DDL may proceed.
        let _ = guard.batch_execute("COMMIT").await;
        if let Some(why) = abnormal {
            // A worker that panicked took its part with it, so its table would never finish and
            // the coordinator would wait for it forever: fail every table still missing parts
            // (transient: the attempt is retried with a new cut).
            let left: Vec<usize> = results
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .filter(|(_, r)| r.parts_left > 0)
                .map(|(i, _)| *i)
                .collect();
            for idx in left {
                let (schema, _) = schemas[idx].clone().expect("planned");
                let _ = done.send(ExportEvent::Finished(TableExport {
                    table: jobs[idx].table.clone(),
                    reload_id: jobs[idx].reload_id,
                    schema,
                    result: Err(Error::transient(
                        Component::Reload,
                        format!("an export worker ended abnormally: {why}"),
                    )),
                }));
            }
        }
        Ok(())
    }
}

/// What a DDL could change under an export: the files of the table and of its partitions (a
/// rewrite gives a table a new one; a partitioned table's own is 0; an attach or detach changes the
/// set) and its columns. Read from the catalog tables only (`pg_inherits`, not `pg_partition_tree`),
/// so it takes no lock and, inside the snapshot, sees the catalog as of the cut.
const SHAPE_SQL: &str = "WITH RECURSIVE tree(relid) AS (SELECT $1::oid UNION \
    SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid) \
    SELECT (SELECT string_agg(p.oid::text || ':' || p.relfilenode::text, ',' ORDER BY p.oid) \
    FROM pg_class p JOIN tree t ON t.relid = p.oid) || ' ' || \
    coalesce((SELECT string_agg(a.attname || ':' || a.atttypid || ':' || a.atttypmod, ',' ORDER BY a.attnum) \
    FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped), '')";

/// How long an export connection waits for any lock (see `begin_in_snapshot`).
const EXPORT_LOCK_TIMEOUT: &str = "5s";

/// How long the guard waits for a table's lock. Below PostgreSQL's default `deadlock_timeout` (1 s),
/// so in a lock cycle with a user's migration it is the export that gives up (and retries), never the
/// migration that is chosen as the deadlock victim.
const GUARD_LOCK_TIMEOUT: &str = "500ms";

/// Locks `table` (ACCESS SHARE, as any reader does) in `guard`, a transaction in the export's
/// snapshot that stays open until every part is read, so no DDL can commit on it meanwhile. A DDL
/// committed between the cut and this lock would not be in the snapshot but would be in the
/// catalog every `COPY` plans with: a dropped or renamed column fails the copy, and a rewrite
/// (`ALTER … TYPE`, a volatile default) gives the table a new file whose rows the old snapshot
/// cannot see, an export silently empty. So the table's shape as the snapshot sees it is compared
/// with the shape now (`current`, outside the snapshot, after the lock): a difference fails the
/// table's attempt as transient, and the retry takes a new cut after that DDL. Each lock is taken
/// under a savepoint, so a lock that times out fails its table only.
pub async fn guard_against_ddl(
    guard: &tokio_postgres::Client,
    current: &tokio_postgres::Client,
    table: &TableName,
    oid: u32,
) -> Result<(), Error> {
    let locked = guard
        .batch_execute(&format!(
            "SAVEPOINT guard; SET LOCAL lock_timeout = '{GUARD_LOCK_TIMEOUT}'; \
             LOCK TABLE {} IN ACCESS SHARE MODE; RELEASE SAVEPOINT guard",
            table.quoted()
        ))
        .await;
    if let Err(e) = locked {
        let _ = guard.batch_execute("ROLLBACK TO SAVEPOINT guard").await;
        return Err(Error::transient(
            Component::Reload,
            format!("cannot lock {table} for its export (a DDL holds or waits for it): {e}"),
        ));
    }
    let then = guard
        .query_opt(SHAPE_SQL, &[&oid])
        .await
        .map_err(pg_error)?;
    let now = current
        .query_opt(SHAPE_SQL, &[&oid])
        .await
        .map_err(pg_error)?;
    let text = |r: Option<tokio_postgres::Row>| r.map(|r| r.get::<_, Option<String>>(0));
    if text(then) != text(now) {
        return Err(Error::transient(
            Component::Reload,
            format!("{table} was changed by a DDL after the reload's cut; retrying with a new cut"),
        ));
    }
    Ok(())
}

/// What a part selects of its table: the published columns and rows.
struct Selection<'a> {
    schema: &'a TableSchema,
    row_filter: Option<&'a str>,
}

/// The `COPY` of one part: the published columns, the rows the row filter accepts, one ctid range.
fn part_sql(table: &TableName, selection: &Selection<'_>, part: &PartJob) -> String {
    let columns: Vec<String> = selection
        .schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let mut cond = String::new();
    if let Some(filter) = selection.row_filter {
        cond.push_str(&format!("({filter}) AND "));
    }
    cond.push_str(&format!("ctid >= '({},0)'::tid", part.from_page));
    if let Some(to) = part.to_page {
        cond.push_str(&format!(" AND ctid < '({to},0)'::tid"));
    }
    format!(
        "COPY (SELECT {} FROM {} WHERE {cond}) TO STDOUT (FORMAT csv, HEADER, NULL '\\N', FORCE_QUOTE *)",
        columns.join(", "),
        table.quoted()
    )
}

async fn export_part(
    client: &tokio_postgres::Client,
    store: &Store,
    spool_dir: &std::path::Path,
    job: &TableJob,
    selection: Selection<'_>,
    part: &PartJob,
) -> Result<Part, Error> {
    use std::io::Write;
    let sql = part_sql(&job.table, &selection, part);
    let mut spools = GzipSpools::new(spool_dir.to_path_buf())
        .map_err(|e| Error::transient(Component::Spool, format!("spool directory: {e}")))?;
    let mut spool = spools.create(&job.table).map_err(|e| {
        Error::transient(Component::Spool, format!("cannot create spool file: {e}"))
    })?;
    let stream = client
        .copy_out(&sql)
        .await
        .map_err(|e| pg_error(e).context(format!("export {}", job.table)))?;
    futures::pin_mut!(stream);
    // Receiving and compressing overlap: chunks go through a bounded channel to a blocking
    // compressor, like `COPY … | gzip` in two processes.
    const HANDOFF: usize = 256 * 1024;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let compressor = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            spool.write_all(&chunk)?;
        }
        spool.finish()
    });
    // The protocol sends COPY's output as one CopyData message per row ("always one per row", the
    // protocol's COPY operations), and the stream yields one item per message: the header and then
    // one per record, however many newlines a value holds. Counting items spares a scan of every byte.
    let mut records = 0u64;
    let mut csv_bytes = 0u64;
    let mut failure = None;
    let mut buffer: Vec<u8> = Vec::with_capacity(HANDOFF + 4096);
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(pg_error(e).context(format!("export {}", job.table)));
                break;
            }
        };
        records += 1;
        csv_bytes += chunk.len() as u64;
        // COPY yields one row per chunk: hand rows over in 256 KiB buffers.
        buffer.extend_from_slice(&chunk);
        if buffer.len() >= HANDOFF {
            let full = std::mem::replace(&mut buffer, Vec::with_capacity(HANDOFF + 4096));
            if tx.send(full).await.is_err() {
                break;
            }
        }
    }
    if !buffer.is_empty() {
        let _ = tx.send(buffer).await;
    }
    drop(tx);
    let spooled = compressor
        .await
        .map_err(|e| Error::transient(Component::Spool, format!("compressor: {e}")))?
        .map_err(|e| Error::transient(Component::Spool, format!("cannot write spool file: {e}")))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let rows = records.saturating_sub(1);
    job.progress.rows.fetch_add(rows, Relaxed);
    let path = job.dir.clone().join(layout::part_file(part.index).as_str());
    store
        .put_file(&path, &spooled.path, spooled.gz_bytes)
        .await?;
    job.progress.bytes.fetch_add(spooled.gz_bytes, Relaxed);
    Ok(Part {
        index: part.index,
        path,
        rows,
        gz_bytes: spooled.gz_bytes,
        csv_bytes,
        sha256: spooled.sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::{part_count, part_sql, PartJob, Selection, PART_PAGES};
    use crate::table::{ColumnSchema, ReplicaIdentity, TableName, TableSchema};

    #[test]
    fn tables_split_into_parts_by_size_and_workers() {
        // Small tables: one part, whatever the parallelism.
        assert_eq!(part_count(0, 4), 1);
        assert_eq!(part_count(PART_PAGES, 4), 1);
        // The benchmark's table (289 MB) with 2 workers: four parts each.
        assert_eq!(part_count(37_038, 2), 8);
        // Just above the threshold: parts of at least a quarter of PART_PAGES, but one per worker.
        assert_eq!(part_count(PART_PAGES + 1, 2), 4);
        assert_eq!(part_count(PART_PAGES + 1, 16), 16);
        // Huge tables: parts of at most 8 × PART_PAGES, and never more than 1,000 parts.
        assert_eq!(part_count(800 * PART_PAGES, 2), 100);
        assert_eq!(part_count(100_000 * PART_PAGES, 2), 1000);
        for pages in [PART_PAGES + 1, 37_038, 1 << 20] {
            for workers in [1, 2, 3, 8, 100, 1000, 5000] {
                let parts = part_count(pages, workers);
                let step = (pages + parts - 1) / parts;
                // Every part (the last one too) starts inside the table.
                assert!(
                    (parts - 1) * step < pages,
                    "{pages} pages, {workers} workers"
                );
            }
        }
    }

    #[test]
    fn parts_select_the_published_columns_and_rows() {
        let col = |n: &str| ColumnSchema {
            name: n.into(),
            type_name: "text".into(),
            type_oid: 25,
            type_modifier: -1,
            nullable: true,
            primary_key: None,
            replica_key: false,
            attnum: None,
        };
        let t = TableName::new("s", "T");
        let schema = TableSchema::new(
            t.clone(),
            1,
            ReplicaIdentity::Default,
            vec![col("id"), col("Region")],
        );
        let part = |from, to| PartJob {
            table_idx: 0,
            index: 1,
            from_page: from,
            to_page: to,
            weight: 0,
        };
        let filtered = Selection {
            schema: &schema,
            row_filter: Some("(\"Region\" = 'eu'::text) OR (id > 1)"),
        };
        assert_eq!(
            part_sql(&t, &filtered, &part(8, Some(16))),
            "COPY (SELECT \"id\", \"Region\" FROM \"s\".\"T\" WHERE ((\"Region\" = 'eu'::text) OR (id > 1)) \
             AND ctid >= '(8,0)'::tid AND ctid < '(16,0)'::tid) TO STDOUT (FORMAT csv, HEADER, NULL '\\N', FORCE_QUOTE *)"
        );
        let all = Selection {
            schema: &schema,
            row_filter: None,
        };
        assert_eq!(
            part_sql(&t, &all, &part(0, None)),
            "COPY (SELECT \"id\", \"Region\" FROM \"s\".\"T\" WHERE ctid >= '(0,0)'::tid) \
             TO STDOUT (FORMAT csv, HEADER, NULL '\\N', FORCE_QUOTE *)"
        );
    }
}
