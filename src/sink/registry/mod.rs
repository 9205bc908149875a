//! The registry: PostgreSQL tables that are the commit record of everything cdc-egress writes.
//!
//! # Invariants
//! - A batch is *committed* when its `files` row commits. The row and the table's new last position
//!   (`tables.last_commit_lsn/last_seq`) commit in one transaction, so the skip positions read at start
//!   (see `batch`) are exactly the ends of the committed batches.
//! - `files.batch_id` is unique and deterministic (see `sink::layout`): registering the same batch
//!   twice is a no-op that returns the existing row, never a second row.
//! - Rows are appended in seal order per table; `files.id` order is registry order. A consumer that
//!   reads `files` by id finds every file exactly once (README.md "Replaying").
//! - `files.notified_stream_seq` is set only after JetStream acknowledged the notice; rows where it is
//!   NULL are completed (manifest, notice) at start-up before streaming resumes.
//! - Every row belongs to one source (`source.name`, see `sink::owner`): a [`Registry`] handle
//!   reads and writes only the rows of its source, so daemons sharing a registry never read, complete
//!   or move each other's rows.
//!
//! The schema is created by the numbered files in `migrations/`, applied by [`migrate()`] under an
//! advisory lock, each once, each in its own transaction.
//!
//! What delivery and start-up recovery need of the registry is the [`FileLog`] trait; [`Registry`]
//! implements it on PostgreSQL, [`memory::MemoryRegistry`] in memory (a test double with the same
//! contract, checked by the same suite in `tests/registry_conformance.rs`).

pub mod memory;
pub mod migrate;
pub mod reloads;

use std::collections::HashMap;
use std::future::Future;

use tokio_postgres::Row;

use crate::core::batch::DdlRecord;
use crate::core::batch::{OpCounts, Position};
use crate::error::{Component, Error, Kind};
use crate::lsn::Lsn;
use crate::table::{quote_ident, TableName, TableSchema};

pub use migrate::migrate;

use crate::sink::owner::Owner;

// The records of written objects are the write stage's output (`crate::sink::record`); the
// registry stores them.
pub use crate::sink::record::{FileKind, FileRecord, Registered};

/// Per-table state as the daemon needs it at start.
#[derive(Debug, Clone, Default)]
pub struct TableState {
    pub last: Option<Position>,
    pub schema_version: i32,
    pub schema_fingerprint: Option<String>,
    pub mode: String,
}

#[derive(Clone)]
pub struct Registry {
    pool: deadpool_postgres::Pool,
    schema: String,
    quoted: String,
    /// The source whose rows this handle reads and writes (`source.name`); see [`crate::sink::owner`].
    source: String,
}

/// The file log: what delivery (`daemon::deliver`) and start-up recovery need of the registry.
///
/// # Contract
/// - [`commit_file`](FileLog::commit_file) commits one file row and returns its id.
///   - *Atomic*: for a [`FileKind::Streaming`] record, the row and the table's new last position
///     (`rec.last`) commit together or not at all, so the skip positions read at start are exactly
///     the ends of the committed batches. The position never moves back: a record ending at or
///     before the recorded position (or with no `last`) leaves it as it is. Reload and DDL records
///     do not touch the position.
///   - *Idempotent on `batch_id`*: when a row with `rec.batch_id` exists, nothing changes (neither the
///     row, whatever the new record says, nor the position) and the existing row's id is returned.
///   - Ids are positive, and a new row's id is greater than that of every row committed before the
///     call began: with one committer at a time (delivery, under the slot lock) id order is commit
///     order, the registry order consumers replay in. A new row has no notice sequence.
///   - `schema` (the batch's columns) is recorded with the table's position for operators; nothing in
///     this trait reads it back.
/// - [`commit_ddl`](FileLog::commit_ddl) commits a [`FileKind::Ddl`] row as `commit_file` does, and
///   with it, in the same transaction and only when the row is new, the change's `ddl_history` row
///   and the table's mode after it ([`DdlRecord::mode_after`]). A repeat changes nothing and returns
///   the first id, so a record replayed after later batches of its table were registered cannot
///   set an older mode again.
/// - [`mark_notified`](FileLog::mark_notified) records the JetStream sequence of a row's notice; the
///   row then leaves [`unnotified`](FileLog::unnotified). Repeating it with the same sequence changes
///   nothing delivery reads (PostgreSQL refreshes its `notified_at`; a later call with another sequence overwrites, which delivery never does); an unknown
///   id is not an error and changes nothing.
/// - [`unnotified`](FileLog::unnotified): every committed row of every kind with no recorded
///   sequence, in id order, each equal to the record committed (timestamps to the microsecond, as
///   PostgreSQL keeps them and as commit times come from the source).
/// - [`reload_files`](FileLog::reload_files): the rows of kind [`FileKind::Reload`] with that
///   `reload_id`, in id order (part order, as parts are registered in part order), with their
///   sequences; empty when there are none.
/// - Errors are [`Error`]s classified by [`Error::postgres`]: a lost connection, a server shutting
///   down, a serialization failure or a timeout is transient; anything else (a registry missing or
///   older than this binary, permissions) is definite. A definite error changes nothing. A transient
///   error of a write means *maybe done* (the connection can drop while COMMIT is in flight): the
///   retry with the same arguments is safe because both writes are idempotent, and it returns the
///   same id.
/// - Handles are cheap clones sharing one connection pool; calls may run concurrently.
pub trait FileLog: Clone + Send + Sync + 'static {
    fn commit_file(
        &self,
        rec: &FileRecord,
        schema: Option<&TableSchema>,
    ) -> impl Future<Output = Result<i64, Error>> + Send;

    fn commit_ddl(
        &self,
        rec: &FileRecord,
        ddl: &DdlRecord,
    ) -> impl Future<Output = Result<i64, Error>> + Send;

    fn mark_notified(
        &self,
        id: i64,
        stream_seq: u64,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    fn unnotified(&self) -> impl Future<Output = Result<Vec<Registered>, Error>> + Send;

    fn reload_files(
        &self,
        reload_id: i64,
    ) -> impl Future<Output = Result<Vec<Registered>, Error>> + Send;
}

/// The file log on PostgreSQL: each operation is the method of the same name.
impl FileLog for Registry {
    fn commit_file(
        &self,
        rec: &FileRecord,
        schema: Option<&TableSchema>,
    ) -> impl Future<Output = Result<i64, Error>> + Send {
        Registry::commit_file(self, rec, schema)
    }

    fn commit_ddl(
        &self,
        rec: &FileRecord,
        ddl: &DdlRecord,
    ) -> impl Future<Output = Result<i64, Error>> + Send {
        Registry::commit_ddl(self, rec, ddl)
    }

    fn mark_notified(
        &self,
        id: i64,
        stream_seq: u64,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        Registry::mark_notified(self, id, stream_seq)
    }

    fn unnotified(&self) -> impl Future<Output = Result<Vec<Registered>, Error>> + Send {
        Registry::unnotified(self)
    }

    fn reload_files(
        &self,
        reload_id: i64,
    ) -> impl Future<Output = Result<Vec<Registered>, Error>> + Send {
        Registry::reload_files(self, reload_id)
    }
}

/// A registry query's error, classified by [`Error::postgres`]; an undefined table, column or
/// function means the registry is older than this binary.
pub(crate) fn pg_err(what: &str, e: tokio_postgres::Error) -> Error {
    let err = Error::postgres(Component::Registry, format!("registry {what}"), e);
    match err.sqlstate() {
        Some("42P01" | "42703" | "42883" | "3F000") => err.hint(
            "the registry is not installed or older than this binary: run `cdc-egress migrate`",
        ),
        _ => err,
    }
}

fn lsn_text(p: Option<Position>) -> Option<String> {
    p.map(|p| p.commit_lsn.to_string())
}

fn parse_lsn(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| s.parse().ok())
}

impl Registry {
    /// A handle on the registry in `schema` for the rows of `source`.
    pub fn new(pool: deadpool_postgres::Pool, schema: &str, source: &str) -> Self {
        Registry {
            pool,
            schema: schema.to_string(),
            quoted: quote_ident(schema),
            source: source.to_string(),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => pg_err("connection", e),
            other => Error::caused_by(
                Kind::Transient,
                Component::Registry,
                "registry connection",
                other,
            ),
        })
    }

    pub(crate) fn t(&self, table: &str) -> String {
        format!("{}.{}", self.quoted, table)
    }

    /// Fails with an actionable message when the registry schema is missing or outdated.
    pub async fn check_installed(&self) -> Result<(), Error> {
        let c = self.client().await?;
        let v = migrate::installed_version(&c, &self.schema).await?;
        if v < migrate::LATEST {
            return Err(Error::definite(
                Component::Registry,
                format!(
                    "registry schema {} is at version {v}, this cdc-egress needs {}: run `cdc-egress migrate`",
                    self.schema,
                    migrate::LATEST
                ),
            ));
        }
        Ok(())
    }

    /// Every table's last committed position, schema version and mode.
    pub async fn table_states(&self) -> Result<HashMap<TableName, TableState>, Error> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT table_schema, table_name, last_commit_lsn::text, last_seq, schema_version, \
                     schema_fingerprint, mode FROM {} WHERE source = $1",
                    self.t("tables")
                ),
                &[&self.source],
            )
            .await
            .map_err(|e| pg_err("read tables", e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let table = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
                let last = parse_lsn(r.get(2))
                    .map(|lsn| Position::new(lsn, r.get::<_, Option<i32>>(3).unwrap_or(0) as u32));
                (
                    table,
                    TableState {
                        last,
                        schema_version: r.get(4),
                        schema_fingerprint: r.get(5),
                        mode: r.get(6),
                    },
                )
            })
            .collect())
    }

    /// Commits one file row and advances the table's position, atomically. Idempotent on `batch_id`.
    pub async fn commit_file(
        &self,
        rec: &FileRecord,
        schema: Option<&TableSchema>,
    ) -> Result<i64, Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err("begin", e))?;
        let id = self.insert_file(&tx, rec, schema).await?;
        tx.commit().await.map_err(|e| pg_err("commit", e))?;
        Ok(id)
    }

    /// Commits a DDL record's file row, its `ddl_history` row and the table's new mode, atomically
    /// (see [`FileLog::commit_ddl`]).
    pub async fn commit_ddl(&self, rec: &FileRecord, ddl: &DdlRecord) -> Result<i64, Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err("begin", e))?;
        let id = self.insert_file(&tx, rec, None).await?;
        let change = &ddl.change;
        let mut details = serde_json::to_value(change.as_ref()).expect("change serializes");
        details["reload_request"] = serde_json::json!(ddl.reload_request);
        let identity = format!(
            "{}.{}",
            quote_ident(&change.schema),
            quote_ident(&change.table)
        );
        let new = tx
            .execute(
                &format!(
                    "INSERT INTO {} (commit_lsn, seq, table_schema, table_name, command_tag, event,                      object_identity, command, schema_version, xid, file_id, details, source)                      VALUES ($1::text::pg_lsn, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)                      ON CONFLICT (source, table_schema, table_name, commit_lsn, seq) DO NOTHING",
                    self.t("ddl_history")
                ),
                &[
                    &ddl.position.commit_lsn.to_string(),
                    &(ddl.position.seq as i32),
                    &ddl.table.schema,
                    &ddl.table.name,
                    &change.command_tag,
                    &change.event.as_str(),
                    &identity,
                    &None::<String>,
                    &rec.schema_version,
                    &(ddl.xid as i64),
                    &id,
                    &details,
                    &self.source,
                ],
            )
            .await
            .map_err(|e| pg_err("insert DDL record", e))?
            == 1;
        if let (true, Some(mode)) = (new, ddl.mode_after) {
            tx.execute(
                &format!(
                    "INSERT INTO {} (table_schema, table_name, mode, source) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (source, table_schema, table_name) DO UPDATE SET mode = EXCLUDED.mode, \
                     updated_at = now()",
                    self.t("tables")
                ),
                &[&ddl.table.schema, &ddl.table.name, &mode, &self.source],
            )
            .await
            .map_err(|e| pg_err("set table mode", e))?;
        }
        tx.commit().await.map_err(|e| pg_err("commit", e))?;
        Ok(id)
    }

    /// Inserts a file row (or finds the existing one with the same batch id) and, for a new streaming
    /// row, advances the table's state, inside the caller's transaction.
    pub(crate) async fn insert_file(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        rec: &FileRecord,
        schema: Option<&TableSchema>,
    ) -> Result<i64, Error> {
        let ops = serde_json::to_value(rec.ops).expect("counts serialize");
        let inserted = tx
            .query_opt(
                &format!(
                    "INSERT INTO {} (batch_id, table_schema, table_name, kind, object_path, schema_path, \
                     manifest_path, first_commit_lsn, first_seq, last_commit_lsn, last_seq, first_commit_ts, \
                     last_commit_ts, row_count, byte_size, csv_bytes, checksum, schema_version, \
                     schema_fingerprint, reload_id, part, ops, source) \
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8::text::pg_lsn,$9,$10::text::pg_lsn,$11,$12,$13,$14,$15,$16, \
                     $17,$18,$19,$20,$21,$22,$23) ON CONFLICT (batch_id) DO NOTHING RETURNING id",
                    self.t("files")
                ),
                &[
                    &rec.batch_id,
                    &rec.table.schema,
                    &rec.table.name,
                    &rec.kind.as_str(),
                    &rec.object_path,
                    &rec.schema_path,
                    &rec.manifest_path,
                    &lsn_text(rec.first),
                    &rec.first.map(|p| p.seq as i32),
                    &lsn_text(rec.last),
                    &rec.last.map(|p| p.seq as i32),
                    &rec.first_commit_ts,
                    &rec.last_commit_ts,
                    &(rec.rows as i64),
                    &(rec.bytes as i64),
                    &(rec.csv_bytes as i64),
                    &rec.checksum,
                    &rec.schema_version,
                    &rec.schema_fingerprint,
                    &rec.reload_id,
                    &rec.part,
                    &ops,
                    &self.source,
                ],
            )
            .await
            .map_err(|e| pg_err("insert file", e))?;
        let id: i64 = match inserted {
            Some(r) => r.get(0),
            None => {
                let r = tx
                    .query_one(
                        &format!("SELECT id FROM {} WHERE batch_id = $1", self.t("files")),
                        &[&rec.batch_id],
                    )
                    .await
                    .map_err(|e| pg_err("find file", e))?;
                return Ok(r.get(0));
            }
        };
        if rec.kind != FileKind::Streaming {
            return Ok(id);
        }
        let columns = schema.map(|s| serde_json::to_value(&s.columns).expect("columns serialize"));
        tx.execute(
            &format!(
                "INSERT INTO {t} AS t (table_schema, table_name, last_commit_lsn, last_seq, last_file_id, \
                 schema_version, schema_fingerprint, columns, rows_total, updated_at, source) \
                 VALUES ($1, $2, $3::text::pg_lsn, $4, $5, $6, $7, $8, $9, now(), $10) \
                 ON CONFLICT (source, table_schema, table_name) DO UPDATE SET \
                   last_commit_lsn = CASE WHEN EXCLUDED.last_commit_lsn IS NULL \
                         OR (t.last_commit_lsn, t.last_seq) >= (EXCLUDED.last_commit_lsn, EXCLUDED.last_seq) \
                         THEN t.last_commit_lsn ELSE EXCLUDED.last_commit_lsn END, \
                   last_seq = CASE WHEN EXCLUDED.last_commit_lsn IS NULL \
                         OR (t.last_commit_lsn, t.last_seq) >= (EXCLUDED.last_commit_lsn, EXCLUDED.last_seq) \
                         THEN t.last_seq ELSE EXCLUDED.last_seq END, \
                   last_file_id = EXCLUDED.last_file_id, \
                   schema_version = GREATEST(t.schema_version, EXCLUDED.schema_version), \
                   schema_fingerprint = EXCLUDED.schema_fingerprint, \
                   columns = COALESCE(EXCLUDED.columns, t.columns), \
                   rows_total = t.rows_total + EXCLUDED.rows_total, updated_at = now(), \
                   mode = CASE WHEN t.mode IN ('dropped', 'renamed', 'unpublished') THEN 'streaming' \
                          ELSE t.mode END",
                t = self.t("tables")
            ),
            &[
                &rec.table.schema,
                &rec.table.name,
                &lsn_text(rec.last),
                &rec.last.map(|p| p.seq as i32),
                &id,
                &rec.schema_version,
                &rec.schema_fingerprint,
                &columns,
                &(rec.rows as i64),
                &self.source,
            ],
        )
        .await
        .map_err(|e| pg_err("update table state", e))?;
        Ok(id)
    }

    /// Records the JetStream sequence of a file's notice.
    pub async fn mark_notified(&self, id: i64, stream_seq: u64) -> Result<(), Error> {
        let c = self.client().await?;
        c.execute(
            &format!(
                "UPDATE {} SET notified_stream_seq = $2, notified_at = now() WHERE id = $1",
                self.t("files")
            ),
            &[&id, &(stream_seq as i64)],
        )
        .await
        .map_err(|e| pg_err("mark notified", e))?;
        Ok(())
    }

    /// Committed files whose notice is not recorded yet, in registry order.
    pub async fn unnotified(&self) -> Result<Vec<Registered>, Error> {
        self.files_where("notified_stream_seq IS NULL", &[]).await
    }

    /// The newest row of each of this source's tables by position, not by id: a reload's parts
    /// are registered after streaming rows at later positions (the schema bucket's backfill).
    pub async fn newest_per_table(&self) -> Result<Vec<Registered>, Error> {
        let cond = format!(
            "id IN (SELECT DISTINCT ON (table_schema, table_name) id FROM {} WHERE source = $1 \
             ORDER BY table_schema, table_name, last_commit_lsn DESC, last_seq DESC, id DESC)",
            self.t("files")
        );
        self.files_where(&cond, &[]).await
    }

    async fn files_where(
        &self,
        cond: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Registered>, Error> {
        let c = self.client().await?;
        let source_param = format!("${}", params.len() + 1);
        let mut params = params.to_vec();
        params.push(&self.source);
        let rows = c
            .query(
                &format!(
                    "SELECT id, batch_id, table_schema, table_name, kind, object_path, schema_path, manifest_path, \
                     first_commit_lsn::text, first_seq, last_commit_lsn::text, last_seq, first_commit_ts, \
                     last_commit_ts, row_count, byte_size, csv_bytes, checksum, schema_version, \
                     schema_fingerprint, reload_id, part, ops, notified_stream_seq \
                     FROM {} WHERE source = {source_param} AND ({cond}) ORDER BY id",
                    self.t("files")
                ),
                &params,
            )
            .await
            .map_err(|e| pg_err("read files", e))?;
        Ok(rows.iter().map(registered_from_row).collect())
    }

    /// Per table with streaming files: the UTC date of its newest batch minus one day (commit times
    /// are not strictly monotonic in LSN order), and the ids of its batches from that date on.
    pub async fn last_streaming_dates(
        &self,
    ) -> Result<Vec<(TableName, chrono::NaiveDate, Vec<String>)>, Error> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "WITH last AS (SELECT table_schema, table_name,                        max((first_commit_ts AT TIME ZONE 'UTC')::date) - 1 AS d                        FROM {f} WHERE kind = 'streaming' AND source = $1 GROUP BY 1, 2)                      SELECT l.table_schema, l.table_name, l.d, array_agg(f.batch_id)                      FROM last l JOIN {f} f USING (table_schema, table_name)                      WHERE f.kind = 'streaming' AND f.source = $1 AND (f.first_commit_ts AT TIME ZONE 'UTC')::date >= l.d                      GROUP BY 1, 2, 3",
                    f = self.t("files")
                ),
                &[&self.source],
            )
            .await
            .map_err(|e| pg_err("read batch dates", e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    r.get(2),
                    r.get(3),
                )
            })
            .collect())
    }

    /// Claims this handle's source name for `ours` (see [`crate::sink::owner`]) unless someone
    /// already did; refuses when that is another slot or database. An insert that does nothing on
    /// conflict, then a read: of two claims at once, exactly one inserts and the other reads it.
    pub async fn claim_owner(&self, ours: &Owner) -> Result<(), Error> {
        let c = self.client().await?;
        let sources = self.t("sources");
        c.execute(
            &format!(
                "INSERT INTO {sources} (name, system_identifier, database, slot) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO NOTHING"
            ),
            &[&self.source, &ours.system_identifier, &ours.database, &ours.slot],
        )
        .await
        .map_err(|e| pg_err("claim the source name", e))?;
        let row = c
            .query_one(
                &format!(
                    "SELECT coalesce(system_identifier, ''), database, slot FROM {sources} WHERE name = $1"
                ),
                &[&self.source],
            )
            .await
            .map_err(|e| pg_err("read the source's owner", e))?;
        let recorded = Owner {
            system_identifier: row.get(0),
            database: row.get(1),
            slot: row.get(2),
        };
        if ours.same_as(&recorded) {
            return Ok(());
        }
        Err(ours.refused(
            &format!(
                "source {:?} in the registry schema {:?}",
                self.source, self.schema
            ),
            &recorded,
            "stop the other daemon and run `cdc-egress release-owner --yes` with this configuration",
        ))
    }

    /// Releases this source name's claim (`cdc-egress release-owner`); returns the owner it had.
    pub async fn release_owner(&self) -> Result<Option<Owner>, Error> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "DELETE FROM {} WHERE name = $1 \
                     RETURNING coalesce(system_identifier, ''), database, slot",
                    self.t("sources")
                ),
                &[&self.source],
            )
            .await
            .map_err(|e| pg_err("release the source name", e))?;
        Ok(row.map(|row| Owner {
            system_identifier: row.get(0),
            database: row.get(1),
            slot: row.get(2),
        }))
    }

    /// The registry's identity (`registry_info.incarnation`), new for every registry created.
    pub async fn incarnation(&self) -> Result<String, Error> {
        let c = self.client().await?;
        let row = c
            .query_one(
                &format!("SELECT incarnation FROM {}", self.t("registry_info")),
                &[],
            )
            .await
            .map_err(|e| pg_err("read registry incarnation", e))?;
        Ok(row.get(0))
    }

    /// Records the daemon's state and last error without touching its positions: between sessions,
    /// when it is retrying a failure and has no stream (so `status` never says "never ran" about a
    /// daemon that is running and retrying). It may not have claimed its source name yet (see
    /// `sink::owner`), so nothing is written when another slot or database owns the name: that
    /// daemon's row is not ours to overwrite.
    pub async fn report_daemon_state(
        &self,
        slot: &str,
        database: &str,
        state: &str,
        last_error: Option<&str>,
    ) -> Result<(), Error> {
        self.upsert_daemon(slot, Some(database), None, state, last_error)
            .await
    }

    /// Upserts the daemon's row (state, positions, last error) for `status`.
    pub async fn report_daemon(
        &self,
        slot: &str,
        confirmed: Lsn,
        received: Lsn,
        state: &str,
        last_error: Option<&str>,
    ) -> Result<(), Error> {
        self.upsert_daemon(slot, None, Some((confirmed, received)), state, last_error)
            .await
    }

    /// One upsert for both: positions are kept as they are when `positions` is `None`; with
    /// `unclaimed_database`, only when the source name is unclaimed or claimed by this slot of it.
    async fn upsert_daemon(
        &self,
        slot: &str,
        unclaimed_database: Option<&str>,
        positions: Option<(Lsn, Lsn)>,
        state: &str,
        last_error: Option<&str>,
    ) -> Result<(), Error> {
        let c = self.client().await?;
        let (confirmed, received) = match positions {
            Some((c, r)) => (Some(c.to_string()), Some(r.to_string())),
            None => (None, None),
        };
        c.execute(
            &format!(
                "INSERT INTO {t} (slot_name, confirmed_lsn, received_lsn, state, last_error, pid, host, heartbeat_at, source) \
                 SELECT $1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5, $6, $7, now(), $8 \
                 WHERE $9::text IS NULL OR NOT EXISTS (SELECT 1 FROM {sources} s WHERE s.name = $8 \
                   AND (s.slot <> $1 OR s.database <> $9)) \
                 ON CONFLICT (source) DO UPDATE SET slot_name = EXCLUDED.slot_name, \
                 confirmed_lsn = coalesce(EXCLUDED.confirmed_lsn, {t}.confirmed_lsn), \
                 received_lsn = coalesce(EXCLUDED.received_lsn, {t}.received_lsn), state = EXCLUDED.state, \
                 last_error = EXCLUDED.last_error, pid = EXCLUDED.pid, host = EXCLUDED.host, heartbeat_at = now()",
                t = self.t("daemon"),
                sources = self.t("sources")
            ),
            &[
                &slot,
                &confirmed,
                &received,
                &state,
                &last_error,
                &(std::process::id() as i32),
                &host_name(),
                &self.source,
                &unclaimed_database,
            ],
        )
        .await
        .map_err(|e| pg_err("report daemon state", e))?;
        Ok(())
    }

    /// Appends a slot event (`created`, `dropped`, `lost`); returns its id.
    pub async fn record_slot_event(
        &self,
        slot: &str,
        event: &str,
        lsn: Option<Lsn>,
        detail: Option<&str>,
    ) -> Result<i64, Error> {
        let c = self.client().await?;
        let row = c
            .query_one(
                &format!(
                    "INSERT INTO {} (slot_name, event, lsn, detail, source) VALUES ($1, $2, $3::text::pg_lsn, $4, $5) \
                     RETURNING id",
                    self.t("slot_events")
                ),
                &[&slot, &event, &lsn.map(|l| l.to_string()), &detail, &self.source],
            )
            .await
            .map_err(|e| pg_err("record slot event", e))?;
        Ok(row.get(0))
    }

    /// The newest event of `slot`, if any.
    pub async fn last_slot_event(&self, slot: &str) -> Result<Option<String>, Error> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT event FROM {} WHERE source = $2 AND slot_name = $1 ORDER BY id DESC LIMIT 1",
                    self.t("slot_events")
                ),
                &[&slot, &self.source],
            )
            .await
            .map_err(|e| pg_err("read slot events", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// `lost` events of `slot` not yet announced: (id, lost-at LSN, detail, time).
    pub async fn unannounced_slot_losses(
        &self,
        slot: &str,
    ) -> Result<Vec<(i64, Option<String>, Option<String>, String)>, Error> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT id, lsn::text, detail, at::text FROM {} WHERE source = $2 AND slot_name = $1 AND event = 'lost' \
                     AND notified_stream_seq IS NULL ORDER BY id",
                    self.t("slot_events")
                ),
                &[&slot, &self.source],
            )
            .await
            .map_err(|e| pg_err("read slot events", e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub async fn mark_slot_event_announced(&self, id: i64, seq: u64) -> Result<(), Error> {
        let c = self.client().await?;
        c.execute(
            &format!(
                "UPDATE {} SET notified_stream_seq = $2 WHERE id = $1",
                self.t("slot_events")
            ),
            &[&id, &(seq as i64)],
        )
        .await
        .map_err(|e| pg_err("record slot event notice", e))?;
        Ok(())
    }

    /// The last confirmed LSN the daemon of `slot` reported.
    pub async fn last_confirmed(&self, slot: &str) -> Result<Option<Lsn>, Error> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT confirmed_lsn::text FROM {} WHERE source = $2 AND slot_name = $1",
                    self.t("daemon")
                ),
                &[&slot, &self.source],
            )
            .await
            .map_err(|e| pg_err("read daemon state", e))?;
        Ok(parse_lsn(row.and_then(|r| r.get(0))))
    }
}

/// This machine's name for the daemon row: `$HOSTNAME`, else the kernel's (shells do not export
/// `HOSTNAME`, and services rarely have it).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn registered_from_row(r: &Row) -> Registered {
    let pos = |lsn: Option<String>, seq: Option<i32>| {
        parse_lsn(lsn).map(|l| Position::new(l, seq.unwrap_or(0) as u32))
    };
    let ops: Option<serde_json::Value> = r.get(22);
    let count = |k: &str| {
        ops.as_ref()
            .and_then(|o| o.get(k))
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    };
    Registered {
        id: r.get(0),
        record: FileRecord {
            batch_id: r.get(1),
            table: TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            kind: FileKind::parse(r.get(4)),
            object_path: r.get(5),
            schema_path: r.get::<_, Option<String>>(6).unwrap_or_default(),
            manifest_path: r.get::<_, Option<String>>(7).unwrap_or_default(),
            first: pos(r.get(8), r.get(9)),
            last: pos(r.get(10), r.get(11)),
            first_commit_ts: r.get(12),
            last_commit_ts: r.get(13),
            rows: r.get::<_, i64>(14) as u64,
            bytes: r.get::<_, i64>(15) as u64,
            csv_bytes: r.get::<_, i64>(16) as u64,
            checksum: r.get(17),
            schema_version: r.get(18),
            schema_fingerprint: r.get(19),
            reload_id: r.get(20),
            part: r.get(21),
            ops: OpCounts {
                insert: count("insert"),
                update: count("update"),
                delete: count("delete"),
                truncate: count("truncate"),
            },
        },
        notified_stream_seq: r.get::<_, Option<i64>>(23).map(|v| v as u64),
    }
}
