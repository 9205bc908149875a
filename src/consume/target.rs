//! The target PostgreSQL of the reference loader: its progress, the shape of its tables, and the
//! rows of one file applied to them.
//!
//! # Invariants
//! - Progress lives in the target, in the state schema (`cdc_egress_apply` by default), keyed by
//!   the registry's incarnation and the source: `progress` (the last `files.id` applied),
//!   `loaded_reloads` (the reload each table was last replaced by) and `columns` (each table's
//!   source `attnum` → target column name, so a rename is told from a drop and an add across
//!   restarts). Every step writes it in the transaction that applies the step, so the target never
//!   holds a step's rows without the progress that says so, nor the reverse: exactly once.
//! - A step starts by locking its progress row and checking it still says what the loader read;
//!   two loaders on one target cannot interleave (the second gets a definite error).
//! - Rows are applied by the consumer rule (README "Replaying"): `I` insert; `U` update the row whose
//!   key is `_before` (else the row's own key) with every column not in `_unchanged`; `D` delete by
//!   `_before`; `T` truncate. Values are passed as text and cast to the column's type, so every value
//!   goes through PostgreSQL's own input function. An update or delete that does not hit exactly one
//!   row means the target diverged from the files: in strict mode that is a definite error, else it
//!   is counted (what `verify` reports).

use std::collections::{BTreeMap, HashMap};

use futures::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::{Client, Statement, Transaction};

use super::listing::{DdlFile, FileColumn, SchemaFile};
use crate::core::encode::csv::METADATA_COLUMNS;
use crate::core::encode::csv_read::Field;
use crate::core::replay::Progress;
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::table::{quote_ident, TableName};

/// Statements sent before their results are awaited, at most.
const PIPELINE: usize = 512;

pub(super) fn tgt(what: impl std::fmt::Display, e: tokio_postgres::Error) -> Error {
    Error::from_postgres(Component::Postgres, e).context(format!("target: {what}"))
}

fn diverged(msg: String) -> Error {
    Error::definite(Component::Postgres, msg).hint(
        "the target table no longer matches the files (changed by someone else, or loaded by another tool): \
         rebuild it, e.g. into an empty database",
    )
}

/// Where source tables go in the target, and where the loader keeps its state.
#[derive(Debug, Clone)]
pub struct Naming {
    /// The state schema.
    pub state_schema: String,
    /// Prepended to each source schema's name (empty: the same names as the source).
    pub schema_prefix: String,
    /// Create the tables `UNLOGGED`: scratch copies (`verify`), which must not be published or
    /// decoded when the scratch database is the source's (an unlogged table never is).
    pub unlogged: bool,
}

impl Naming {
    pub fn table(&self, t: &TableName) -> TableName {
        TableName::new(
            format!("{}{}", self.schema_prefix, t.schema),
            t.name.clone(),
        )
    }

    fn create_table(&self) -> &'static str {
        if self.unlogged {
            "CREATE UNLOGGED TABLE"
        } else {
            "CREATE TABLE"
        }
    }

    fn state(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.state_schema), quote_ident(table))
    }
}

/// Whose progress a target row is: one registry (its incarnation) and one of its sources.
#[derive(Debug, Clone)]
pub struct Stream {
    pub registry: String,
    pub source: String,
}

/// Creates the state schema and its tables (idempotent).
pub async fn ensure_state(c: &Client, n: &Naming) -> Result<(), Error> {
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         {create} IF NOT EXISTS {progress} (
             registry text NOT NULL, source text NOT NULL, last_file_id bigint NOT NULL,
             tables jsonb, updated_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (registry, source));
         {create} IF NOT EXISTS {loaded} (
             registry text NOT NULL, source text NOT NULL, table_schema text NOT NULL,
             table_name text NOT NULL, reload_id bigint NOT NULL,
             PRIMARY KEY (registry, source, table_schema, table_name));
         {create} IF NOT EXISTS {columns} (
             registry text NOT NULL, source text NOT NULL, table_schema text NOT NULL,
             table_name text NOT NULL, attnum smallint NOT NULL, column_name text NOT NULL,
             PRIMARY KEY (registry, source, table_schema, table_name, attnum));",
        schema = quote_ident(&n.state_schema),
        create = n.create_table(),
        progress = n.state("progress"),
        loaded = n.state("loaded_reloads"),
        columns = n.state("columns"),
    );
    c.batch_execute(&sql)
        .await
        .map_err(|e| tgt("create the state schema", e))
}

/// The tables this target loads, as recorded: `None` when it never ran, `Some(empty)` for every
/// table. Refuses a target loaded from another registry (progress there counts other file ids).
pub async fn recorded_tables(
    c: &Client,
    n: &Naming,
    s: &Stream,
) -> Result<Option<Vec<TableName>>, Error> {
    let other = c
        .query_opt(
            &format!(
                "SELECT registry FROM {} WHERE source = $1 AND registry <> $2 LIMIT 1",
                n.state("progress")
            ),
            &[&s.source, &s.registry],
        )
        .await
        .map_err(|e| tgt("read the progress", e))?;
    if let Some(r) = other {
        return Err(Error::definite(
            Component::Config,
            format!(
                "target: source {:?} was loaded here from another registry (incarnation {}): its tables hold rows \
                 this registry would apply again; load into an empty database or another --state-schema",
                s.source,
                r.get::<_, String>(0)
            ),
        ));
    }
    let row = c
        .query_opt(
            &format!(
                "SELECT coalesce(tables, '[]'::jsonb)::text FROM {} WHERE registry = $1 AND source = $2",
                n.state("progress")
            ),
            &[&s.registry, &s.source],
        )
        .await
        .map_err(|e| tgt("read the progress", e))?;
    match row {
        None => Ok(None),
        Some(r) => {
            let pairs: Vec<(String, String)> = serde_json::from_str(&r.get::<_, String>(0))
                .map_err(|e| {
                    Error::definite(
                        Component::Postgres,
                        format!("target: the recorded table list: {e}"),
                    )
                })?;
            Ok(Some(
                pairs
                    .into_iter()
                    .map(|(a, b)| TableName::new(a, b))
                    .collect(),
            ))
        }
    }
}

/// Records the tables this target loads (empty: every table), in the step's transaction.
pub async fn set_tables(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    tables: &std::collections::BTreeSet<TableName>,
) -> Result<(), Error> {
    let pairs: Vec<(&str, &str)> = tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .collect();
    let json = serde_json::to_string(&pairs).expect("names serialize");
    tx.execute(
        &format!(
            "UPDATE {} SET tables = $3::text::jsonb WHERE registry = $1 AND source = $2",
            n.state("progress")
        ),
        &[&s.registry, &s.source, &json],
    )
    .await
    .map_err(|e| tgt("record the table list", e))?;
    Ok(())
}

/// Reads the progress of `stream` (zero and nothing loaded when it never ran).
pub async fn read_progress(c: &Client, n: &Naming, s: &Stream) -> Result<Progress, Error> {
    let last_id = c
        .query_opt(
            &format!(
                "SELECT last_file_id FROM {} WHERE registry = $1 AND source = $2",
                n.state("progress")
            ),
            &[&s.registry, &s.source],
        )
        .await
        .map_err(|e| tgt("read the progress", e))?
        .map_or(0, |r| r.get(0));
    let loaded = c
        .query(
            &format!(
                "SELECT table_schema, table_name, reload_id FROM {} WHERE registry = $1 AND source = $2",
                n.state("loaded_reloads")
            ),
            &[&s.registry, &s.source],
        )
        .await
        .map_err(|e| tgt("read the loaded reloads", e))?
        .iter()
        .map(|r| (TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)), r.get(2)))
        .collect();
    Ok(Progress { last_id, loaded })
}

/// Begins a step's transaction: locks the progress row of `stream` and checks it is at `expected`.
pub async fn begin_step<'c>(
    c: &'c mut Client,
    n: &Naming,
    s: &Stream,
    expected: i64,
) -> Result<Transaction<'c>, Error> {
    let tx = c.transaction().await.map_err(|e| tgt("begin", e))?;
    lock_progress(&tx, n, s, expected).await?;
    Ok(tx)
}

/// Locks the progress row of `stream` and checks it is at `expected` (a concurrent loader moved
/// it otherwise).
async fn lock_progress(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    expected: i64,
) -> Result<(), Error> {
    tx.execute(
        &format!(
            "INSERT INTO {} (registry, source, last_file_id) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
            n.state("progress")
        ),
        &[&s.registry, &s.source],
    )
    .await
    .map_err(|e| tgt("create the progress row", e))?;
    let at: i64 = tx
        .query_one(
            &format!(
                "SELECT last_file_id FROM {} WHERE registry = $1 AND source = $2 FOR UPDATE",
                n.state("progress")
            ),
            &[&s.registry, &s.source],
        )
        .await
        .map_err(|e| tgt("lock the progress row", e))?
        .get(0);
    if at != expected {
        return Err(Error::definite(
            Component::Postgres,
            format!(
                "target: the progress of source {:?} moved from file {expected} to {at} meanwhile: another `cdc-egress apply` runs into this target",
                s.source
            ),
        ));
    }
    Ok(())
}

pub async fn set_progress(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    last_id: i64,
) -> Result<(), Error> {
    tx.execute(
        &format!(
            "UPDATE {} SET last_file_id = $3, updated_at = now() WHERE registry = $1 AND source = $2",
            n.state("progress")
        ),
        &[&s.registry, &s.source, &last_id],
    )
    .await
    .map_err(|e| tgt("record the progress", e))?;
    Ok(())
}

pub async fn set_loaded(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    table: &TableName,
    reload_id: i64,
) -> Result<(), Error> {
    tx.execute(
        &format!(
            "INSERT INTO {} (registry, source, table_schema, table_name, reload_id) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (registry, source, table_schema, table_name) DO UPDATE SET reload_id = EXCLUDED.reload_id",
            n.state("loaded_reloads")
        ),
        &[&s.registry, &s.source, &table.schema, &table.name, &reload_id],
    )
    .await
    .map_err(|e| tgt("record a loaded reload", e))?;
    Ok(())
}

/// The source `attnum` → target column name of `table` (a source name), as recorded.
async fn attnums(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    table: &TableName,
) -> Result<BTreeMap<i16, String>, Error> {
    Ok(tx
        .query(
            &format!(
                "SELECT attnum, column_name FROM {} WHERE registry = $1 AND source = $2 \
                 AND table_schema = $3 AND table_name = $4",
                n.state("columns")
            ),
            &[&s.registry, &s.source, &table.schema, &table.name],
        )
        .await
        .map_err(|e| tgt("read the column map", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

async fn set_attnums(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    table: &TableName,
    cols: &[FileColumn],
) -> Result<(), Error> {
    let t = n.state("columns");
    tx.execute(
        &format!("DELETE FROM {t} WHERE registry = $1 AND source = $2 AND table_schema = $3 AND table_name = $4"),
        &[&s.registry, &s.source, &table.schema, &table.name],
    )
    .await
    .map_err(|e| tgt("record the column map", e))?;
    for c in cols {
        if let Some(a) = c.attnum {
            tx.execute(
                &format!("INSERT INTO {t} VALUES ($1, $2, $3, $4, $5, $6)"),
                &[
                    &s.registry,
                    &s.source,
                    &table.schema,
                    &table.name,
                    &a,
                    &c.name,
                ],
            )
            .await
            .map_err(|e| tgt("record the column map", e))?;
        }
    }
    Ok(())
}

async fn exists(tx: &Transaction<'_>, table: &TableName) -> Result<bool, Error> {
    Ok(tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
        .await
        .map_err(|e| tgt("look up a table", e))?
        .get(0))
}

/// A type name from a file, checked before it goes into SQL: outside double quotes only letters,
/// digits, `_`, spaces, `,`, `.`, parentheses and brackets (what `format_type` prints), and quotes
/// balanced. A damaged or forged `schema.yml` can then name a wrong type, never run a statement.
pub fn checked_type(type_name: &str) -> Result<&str, Error> {
    let mut quoted = false;
    let ok = type_name.chars().all(|ch| {
        if ch == '"' {
            quoted = !quoted;
            true
        } else {
            quoted || ch.is_ascii_alphanumeric() || " _,.()[]".contains(ch)
        }
    });
    if ok && !quoted && !type_name.trim().is_empty() {
        Ok(type_name)
    } else {
        Err(Error::definite(
            Component::ObjectStore,
            format!("a file names the column type {type_name:?}, which is not a type name"),
        ))
    }
}

fn checked_schema(t: &TableName) -> Result<(), Error> {
    if t.schema.len() > 63 || t.name.len() > 63 {
        return Err(Error::definite(
            Component::Config,
            format!(
                "the target table {} has a name longer than PostgreSQL's 63 bytes (with the prefix added to its schema)",
                t.dotted()
            ),
        ));
    }
    Ok(())
}

/// Creates the target table of `source_table` or brings its columns to `cols`. Columns are matched
/// by `attnum` where both sides know it (README "Schema changes"): a known attnum under a new name
/// is renamed (through a temporary name, so swaps and chains work), a column whose attnum is gone
/// is dropped even when a new column takes its name; then columns are added, retyped and, by name,
/// dropped. A new table gets the files' primary key.
pub async fn reshape(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    source_table: &TableName,
    cols: &[FileColumn],
) -> Result<(), Error> {
    let target = n.table(source_table);
    checked_schema(&target)?;
    for c in cols {
        checked_type(&c.type_name)?;
    }
    let table = target.quoted();
    let exec = async |sql: String| -> Result<(), Error> {
        tx.batch_execute(&sql).await.map_err(|e| tgt(&sql, e))
    };
    if !exists(tx, &target).await? {
        exec(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&target.schema)
        ))
        .await?;
        let defs: Vec<String> = cols
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
            .collect();
        exec(format!(
            "{} {table} ({})",
            n.create_table(),
            defs.join(", ")
        ))
        .await?;
        // An index (not a constraint: keys change, and files may disagree, which `verify` must
        // see as rows rather than as a failure) on the key changes are found by.
        let mut key: Vec<&FileColumn> = cols.iter().filter(|c| c.replica_key).collect();
        if key.is_empty() {
            key = cols.iter().filter(|c| c.primary_key.is_some()).collect();
            key.sort_by_key(|c| c.primary_key);
        }
        if !key.is_empty() {
            exec(format!(
                "CREATE INDEX ON {table} ({})",
                key.iter()
                    .map(|c| quote_ident(&c.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .await?;
        }
        return set_attnums(tx, n, s, source_table, cols).await;
    }
    let current: Vec<(String, String)> = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table],
        )
        .await
        .map_err(|e| tgt("read a table's columns", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let known = attnums(tx, n, s, source_table).await?;
    // A column the file names without an attnum (the daemon could not tell it) is the known
    // column of that name: it keeps that attnum.
    let cols: Vec<FileColumn> = cols
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if c.attnum.is_none() {
                c.attnum = known.iter().find(|(_, x)| **x == c.name).map(|(a, _)| *a);
            }
            c
        })
        .collect();
    let cols = &cols[..];
    let mut names: Vec<String> = current.iter().map(|c| c.0.clone()).collect();
    let wanted: std::collections::BTreeSet<i16> = cols.iter().filter_map(|c| c.attnum).collect();
    // Columns whose attnum is gone from the table: dropped, even if a new column reuses the name.
    if !wanted.is_empty() {
        for (attnum, name) in &known {
            if !wanted.contains(attnum) && names.contains(name) {
                exec(format!(
                    "ALTER TABLE {table} DROP COLUMN {}",
                    quote_ident(name)
                ))
                .await?;
                names.retain(|x| x != name);
            }
        }
    }
    // Renames, in two steps so that a swap or a chain never collides.
    let renames: Vec<(&String, &FileColumn)> = cols
        .iter()
        .filter_map(|c| {
            let old = known.get(&c.attnum?)?;
            (*old != c.name && names.contains(old)).then_some((old, c))
        })
        .collect();
    for (old, c) in &renames {
        let tmp = format!("cdc_egress_renaming_{}", c.attnum.unwrap_or_default());
        exec(format!(
            "ALTER TABLE {table} RENAME COLUMN {} TO {}",
            quote_ident(old),
            quote_ident(&tmp)
        ))
        .await?;
        names.retain(|x| x != *old);
    }
    for (_, c) in &renames {
        let tmp = format!("cdc_egress_renaming_{}", c.attnum.unwrap_or_default());
        if names.contains(&c.name) {
            // Another column holds the name and is not in the files any more.
            exec(format!(
                "ALTER TABLE {table} DROP COLUMN {}",
                quote_ident(&c.name)
            ))
            .await?;
            names.retain(|x| *x != c.name);
        }
        exec(format!(
            "ALTER TABLE {table} RENAME COLUMN {} TO {}",
            quote_ident(&tmp),
            quote_ident(&c.name)
        ))
        .await?;
        names.push(c.name.clone());
    }
    for c in cols {
        if !names.contains(&c.name) {
            exec(format!(
                "ALTER TABLE {table} ADD COLUMN {} {}",
                quote_ident(&c.name),
                c.type_name
            ))
            .await?;
            names.push(c.name.clone());
        }
    }
    for x in names.iter().filter(|x| !cols.iter().any(|c| c.name == **x)) {
        exec(format!(
            "ALTER TABLE {table} DROP COLUMN {}",
            quote_ident(x)
        ))
        .await?;
    }
    // Types last (a renamed column may have changed its type too).
    let after: Vec<(String, String)> = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(|e| tgt("read a table's columns", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for c in cols {
        if after
            .iter()
            .any(|(x, ty)| *x == c.name && *ty != c.type_name)
        {
            let col = quote_ident(&c.name);
            exec(format!(
                "ALTER TABLE {table} ALTER COLUMN {col} TYPE {ty} USING {col}::text::{ty}",
                ty = c.type_name
            ))
            .await?;
        }
    }
    set_attnums(tx, n, s, source_table, cols).await
}

/// Applies a DDL record filed under `key` (a source table): rename, drop, or reshape.
pub async fn apply_ddl(
    tx: &Transaction<'_>,
    n: &Naming,
    s: &Stream,
    key: &TableName,
    doc: &DdlFile,
) -> Result<(), Error> {
    match doc.event.as_str() {
        "drop" => {
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {}", n.table(key).quoted()))
                .await
                .map_err(|e| tgt("drop a table", e))?;
            set_attnums(tx, n, s, key, &[]).await
        }
        "rename" => {
            let Some(before) = &doc.table_before else {
                return Err(Error::definite(
                    Component::ObjectStore,
                    format!("a rename record of {} has no table_before", key.dotted()),
                ));
            };
            let old = TableName::new(before.schema.clone(), before.table.clone());
            let new = TableName::new(doc.schema.clone(), doc.table.clone());
            let (old_t, new_t) = (n.table(&old), n.table(&new));
            // Filed under both names: the first copy renames, the second finds it done.
            if old != new && exists(tx, &old_t).await? && !exists(tx, &new_t).await? {
                if old_t.schema != new_t.schema {
                    tx.batch_execute(&format!(
                        "CREATE SCHEMA IF NOT EXISTS {0}; ALTER TABLE {1} SET SCHEMA {0}",
                        quote_ident(&new_t.schema),
                        old_t.quoted()
                    ))
                    .await
                    .map_err(|e| tgt("move a table", e))?;
                }
                if old_t.name != new_t.name {
                    let moved = TableName::new(new_t.schema.clone(), old_t.name.clone());
                    tx.batch_execute(&format!(
                        "ALTER TABLE {} RENAME TO {}",
                        moved.quoted(),
                        quote_ident(&new_t.name)
                    ))
                    .await
                    .map_err(|e| tgt("rename a table", e))?;
                }
                let map = attnums(tx, n, s, &old).await?;
                let cols: Vec<FileColumn> = map
                    .into_iter()
                    .map(|(a, name)| FileColumn {
                        name,
                        type_name: String::new(),
                        attnum: Some(a),
                        primary_key: None,
                        replica_key: false,
                    })
                    .collect();
                set_attnums(tx, n, s, &new, &cols).await?;
                set_attnums(tx, n, s, &old, &[]).await?;
            }
            match &doc.columns_after {
                Some(cols) if *key == new => reshape(tx, n, s, key, cols).await,
                _ => Ok(()),
            }
        }
        "unpublish" => Ok(()),
        _ => match &doc.columns_after {
            Some(cols) => reshape(tx, n, s, key, cols).await,
            None => Ok(()),
        },
    }
}

/// Loads a reload part's CSV text (header first, read from `csv` a megabyte at a time) into the
/// target table with `COPY`; returns the rows copied.
pub async fn copy_rows(
    tx: &Transaction<'_>,
    target: &TableName,
    cols: &[FileColumn],
    mut csv: impl std::io::Read,
    object: &str,
) -> Result<u64, Error> {
    let list: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
    let sink = tx
        .copy_in(&format!(
            "COPY {} ({}) FROM STDIN (FORMAT csv, HEADER, NULL '\\N')",
            target.quoted(),
            list.join(", ")
        ))
        .await
        .map_err(|e| tgt("start a COPY", e))?;
    futures::pin_mut!(sink);
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        let n = csv.read(&mut chunk).map_err(|e| {
            Error::definite(Component::ObjectStore, format!("{object}: not gzip: {e}"))
        })?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        sink.send(bytes::Bytes::from(chunk))
            .await
            .map_err(|e| tgt(format!("COPY into {}", target.dotted()), e))?;
    }
    sink.finish()
        .await
        .map_err(|e| tgt(format!("COPY into {}", target.dotted()), e))
}

/// What applying one file did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    /// Data rows in the file.
    pub rows: u64,
    /// Rows applied (inside the LSN bounds).
    pub applied: u64,
    /// Updates and deletes that did not hit exactly one row (not strict mode only).
    pub misses: u64,
}

/// Applies a streaming file's records (the header first) to the target table of `schema`: rows with
/// `min <= _commit_lsn < until`.
pub async fn apply_rows(
    tx: &Transaction<'_>,
    target: &TableName,
    schema: &SchemaFile,
    records: &[Vec<Field>],
    min: Option<Lsn>,
    until: Option<Lsn>,
    strict: bool,
) -> Result<Applied, Error> {
    let meta = METADATA_COLUMNS.len();
    let ncols = schema.columns.len();
    let bad = |what: String| {
        Error::definite(
            Component::ObjectStore,
            format!("a file of {}: {what}", target.dotted()),
        )
    };
    let table = target.quoted();
    let col = |i: usize| quote_ident(&schema.columns[i].name);
    let cast = |i: usize, p: usize| format!("${p}::text::{}", schema.columns[i].type_name);
    // The key a change is found by: the replica identity's (what `_before` holds), else (files
    // written before schema.yml said) the primary key; none: the whole row (REPLICA IDENTITY FULL).
    // Under REPLICA IDENTITY FULL every column is "the key" and rows may repeat: one row is matched.
    let full = schema.replica_identity.as_deref() == Some("full");
    let mut keys: Vec<usize> = (0..ncols)
        .filter(|&i| schema.columns[i].replica_key)
        .collect();
    if full {
        keys.clear();
    } else if keys.is_empty() {
        let mut pk: Vec<(u16, usize)> = schema
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.primary_key.map(|p| (p, i)))
            .collect();
        pk.sort_unstable();
        keys = pk.into_iter().map(|(_, i)| i).collect();
    }
    let mut statements: HashMap<String, Statement> = HashMap::new();
    let mut out = Applied::default();
    // (statement, params, expects one row, description)
    let mut pending: Vec<(Statement, Vec<Option<String>>, bool)> = Vec::new();
    // Every record is checked (and its metadata parsed) before the first statement, so a bad file
    // changes nothing.
    type Before = serde_json::Map<String, serde_json::Value>;
    let mut parsed: Vec<(Lsn, Option<Before>, Vec<String>)> = Vec::with_capacity(records.len());
    for rec in records.iter().skip(1) {
        if rec.len() != meta + ncols {
            return Err(bad(format!(
                "a record has {} fields, its schema.yml {}",
                rec.len(),
                meta + ncols
            )));
        }
        let at: Lsn = rec[1]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("a record has no valid _commit_lsn".into()))?;
        if !matches!(rec[0].as_deref(), Some("I" | "U" | "D" | "T")) {
            return Err(bad(format!("unknown _op {:?}", rec[0])));
        }
        let before: Option<Before> = match &rec[5] {
            Some(b) => Some(
                serde_json::from_str(b)
                    .map_err(|e| bad(format!("_before is not a JSON object: {e}")))?,
            ),
            None => None,
        };
        let unchanged: Vec<String> = match &rec[6] {
            Some(u) => serde_json::from_str(u)
                .map_err(|e| bad(format!("_unchanged is not a JSON list: {e}")))?,
            None => Vec::new(),
        };
        parsed.push((at, before, unchanged));
    }
    let half = records.len() / 2;
    for (n, (rec, (at, before, unchanged))) in records
        .iter()
        .skip(1)
        .zip(parsed)
        .enumerate()
        .map(|(i, r)| (i + 1, r))
    {
        out.rows += 1;
        if n == half {
            // The crash test's window: some of the file's rows applied, not committed.
            out.misses += flush(tx, &mut pending, target, strict).await?;
            crate::failpoint::hit("apply_mid_file");
        }
        if min.is_some_and(|m| at < m) || until.is_some_and(|u| at >= u) {
            continue;
        }
        out.applied += 1;
        let op = rec[0].as_deref().unwrap_or("");
        let vals = &rec[meta..];
        let key_of = |i: usize| -> Option<String> {
            match &before {
                Some(b) => b
                    .get(&schema.columns[i].name)
                    .and_then(|v| v.as_str().map(str::to_string)),
                None => vals[i].clone(),
            }
        };
        let (key_idx, whole_row): (Vec<usize>, bool) = if keys.is_empty() {
            let present = (0..ncols)
                .filter(|i| {
                    before
                        .as_ref()
                        .is_none_or(|b| b.contains_key(&schema.columns[*i].name))
                })
                .collect();
            (present, true)
        } else {
            (keys.clone(), false)
        };
        let (sql, params, one) = match op {
            "I" => (
                format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    (0..ncols).map(col).collect::<Vec<_>>().join(", "),
                    (0..ncols)
                        .map(|i| cast(i, i + 1))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                vals.to_vec(),
                false,
            ),
            "U" | "D" => {
                let mut params = Vec::new();
                let mut sets = Vec::new();
                if op == "U" {
                    for (i, v) in vals.iter().enumerate() {
                        if !unchanged.contains(&schema.columns[i].name) {
                            params.push(v.clone());
                            sets.push(format!("{} = {}", col(i), cast(i, params.len())));
                        }
                    }
                }
                let mut conds = Vec::new();
                for &i in &key_idx {
                    params.push(key_of(i));
                    // Key columns are NOT NULL: `=` uses the index. A whole row is matched on
                    // its text (NULLs included; no equality operator needed, e.g. json).
                    conds.push(if whole_row {
                        format!(
                            "{}::text IS NOT DISTINCT FROM ${}::text",
                            col(i),
                            params.len()
                        )
                    } else {
                        format!("{} = {}", col(i), cast(i, params.len()))
                    });
                }
                let cond = if conds.is_empty() {
                    "true".to_string()
                } else {
                    conds.join(" AND ")
                };
                let rows = if whole_row {
                    format!("ctid = (SELECT ctid FROM {table} WHERE {cond} LIMIT 1)")
                } else {
                    cond
                };
                let sql = if op == "U" && sets.is_empty() {
                    // Nothing but unchanged TOAST values: still check the row is there.
                    format!("SELECT 1 FROM {table} WHERE {rows}")
                } else if op == "U" {
                    format!("UPDATE {table} SET {} WHERE {rows}", sets.join(", "))
                } else {
                    format!("DELETE FROM {table} WHERE {rows}")
                };
                (sql, params, true)
            }
            "T" => (format!("TRUNCATE {table}"), Vec::new(), false),
            other => return Err(bad(format!("unknown _op {other:?}"))),
        };
        let stmt = match statements.get(&sql) {
            Some(s) => s.clone(),
            None => {
                let s = tx.prepare(&sql).await.map_err(|e| tgt(&sql, e))?;
                statements.insert(sql, s.clone());
                s
            }
        };
        pending.push((stmt, params, one));
        if pending.len() >= PIPELINE {
            out.misses += flush(tx, &mut pending, target, strict).await?;
        }
    }
    out.misses += flush(tx, &mut pending, target, strict).await?;
    Ok(out)
}

/// Sends the pending statements pipelined, then checks what each hit.
async fn flush(
    tx: &Transaction<'_>,
    pending: &mut Vec<(Statement, Vec<Option<String>>, bool)>,
    target: &TableName,
    strict: bool,
) -> Result<u64, Error> {
    let results: Vec<u64> = futures::stream::iter(pending.iter())
        .map(|(stmt, params, _)| async move {
            let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            tx.execute(stmt, &p).await
        })
        .buffered(PIPELINE)
        .try_collect()
        .await
        .map_err(|e| tgt(format!("apply rows to {}", target.dotted()), e))?;
    let mut misses = 0;
    for ((_, params, one), n) in pending.iter().zip(results) {
        if *one && n != 1 {
            if strict {
                return Err(diverged(format!(
                    "target: a change of {} keyed by {params:?} hit {n} rows, not 1",
                    target.dotted()
                )));
            }
            misses += 1;
        }
    }
    pending.clear();
    Ok(misses)
}

/// Empties the target table, if it exists (before a reload's parts).
pub async fn truncate(tx: &Transaction<'_>, target: &TableName) -> Result<(), Error> {
    if !exists(tx, target).await? {
        return Ok(());
    }
    tx.batch_execute(&format!("TRUNCATE {}", target.quoted()))
        .await
        .map_err(|e| tgt("truncate a table", e))
}
