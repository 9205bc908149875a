//! What a consumer reads: the registry's rows of one source (read-only) and the objects they name.
//!
//! Every object is checked against its registry row before it is used: a streaming file's
//! `sha256:` checksum and every file's row count. A mismatch is a definite error naming the object:
//! the output was changed or damaged, and applying it would make the copy silently wrong.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::core::encode::csv_read::{read_records, Field};
use crate::core::replay::{DoneReload, Entry, EntryKind};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::sink::layout::stored_path;
use crate::sink::store::Store;
use crate::table::{quote_ident, TableName};

/// The registry of one source, as a consumer reads it.
pub struct Listing {
    client: Client,
    schema: String,
    source: String,
}

/// A registry row of an entry, with what is needed to fetch and check it.
#[derive(Debug, Clone)]
pub struct EntryRow {
    pub entry: Entry,
    pub object_path: String,
    pub schema_path: Option<String>,
    pub checksum: String,
    pub row_count: i64,
}

/// One part of a reload.
#[derive(Debug, Clone)]
pub struct PartRow {
    pub object_path: String,
    pub schema_path: Option<String>,
    pub checksum: String,
    pub row_count: i64,
}

fn reg(what: &str, e: tokio_postgres::Error) -> Error {
    Error::from_postgres(Component::Registry, e).context(what)
}

fn lsn(s: &str) -> Result<Lsn, Error> {
    s.parse().map_err(|_| {
        Error::definite(
            Component::Registry,
            format!("the registry holds an invalid LSN {s:?}"),
        )
    })
}

const ENTRY_COLUMNS: &str = "id, kind, table_schema, table_name, first_commit_lsn::text, \
     last_commit_lsn::text, object_path, schema_path, checksum, row_count";

fn entry_row(r: &tokio_postgres::Row) -> Result<EntryRow, Error> {
    let kind: String = r.get(1);
    Ok(EntryRow {
        entry: Entry {
            id: r.get(0),
            kind: if kind == "ddl" {
                EntryKind::Ddl
            } else {
                EntryKind::Streaming
            },
            table: TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            first_lsn: lsn(&r.get::<_, String>(4))?,
            last_lsn: lsn(&r.get::<_, String>(5))?,
        },
        object_path: r.get(6),
        schema_path: r.get(7),
        checksum: r.get(8),
        row_count: r.get(9),
    })
}

impl Listing {
    /// Opens the registry `schema` of `client` for `source`; `None` picks the only source there is
    /// (an error naming them when there are several).
    pub async fn open(
        client: Client,
        schema: &str,
        source: Option<&str>,
    ) -> Result<Listing, Error> {
        let s = quote_ident(schema);
        let sources: Vec<String> = client
            .query(&format!("SELECT name FROM {s}.sources ORDER BY name"), &[])
            .await
            .map_err(|e| {
                reg("list the sources", e).hint(format!(
                    "is {schema:?} a cdc-egress registry schema (`cdc-egress migrate`)?"
                ))
            })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let source = match source {
            Some(s) if sources.iter().any(|x| x == s) => s.to_string(),
            Some(s) => {
                return Err(Error::definite(
                    Component::Config,
                    format!("the registry has no source {s:?} (it has {sources:?})"),
                ))
            }
            None if sources.len() == 1 => sources[0].clone(),
            None => {
                return Err(Error::definite(
                    Component::Config,
                    format!(
                        "the registry has {} sources {sources:?}: name one with --source",
                        sources.len()
                    ),
                ))
            }
        };
        Ok(Listing {
            client,
            schema: s,
            source,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The registry's incarnation: progress recorded against one registry never applies to another.
    pub async fn incarnation(&self) -> Result<String, Error> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT incarnation::text FROM {}.registry_info",
                    self.schema
                ),
                &[],
            )
            .await
            .map_err(|e| reg("read the registry's incarnation", e))?;
        Ok(row.get(0))
    }

    /// Streaming files and DDL records with `id > after`, in id order, at most `limit`.
    pub async fn entries_after(&self, after: i64, limit: i64) -> Result<Vec<EntryRow>, Error> {
        self.client
            .query(
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM {}.files WHERE source = $1 AND id > $2 \
                     AND kind IN ('streaming', 'ddl') ORDER BY id LIMIT $3",
                    self.schema
                ),
                &[&self.source, &after, &limit],
            )
            .await
            .map_err(|e| reg("list the files", e))?
            .iter()
            .map(entry_row)
            .collect()
    }

    /// The entries of `table` with `id <= upto` that reach `cut`, in id order.
    pub async fn entries_reaching(
        &self,
        table: &TableName,
        upto: i64,
        cut: Lsn,
    ) -> Result<Vec<EntryRow>, Error> {
        self.client
            .query(
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM {}.files WHERE source = $1 AND id <= $2 \
                     AND kind IN ('streaming', 'ddl') AND table_schema = $3 AND table_name = $4 \
                     AND last_commit_lsn >= $5::text::pg_lsn ORDER BY id",
                    self.schema
                ),
                &[
                    &self.source,
                    &upto,
                    &table.schema,
                    &table.name,
                    &cut.to_string(),
                ],
            )
            .await
            .map_err(|e| reg("list a table's files", e))?
            .iter()
            .map(entry_row)
            .collect()
    }

    /// The latest `done` reload of each table (with `until`, the latest with a cut below it).
    pub async fn done_reloads(
        &self,
        until: Option<Lsn>,
    ) -> Result<BTreeMap<TableName, DoneReload>, Error> {
        let until = until.map(|l| l.to_string());
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT DISTINCT ON (table_schema, table_name) id, table_schema, table_name, \
                     cut_lsn::text FROM {}.reloads WHERE source = $1 AND status = 'done' \
                     AND ($2::text IS NULL OR cut_lsn < $2::text::pg_lsn) \
                     ORDER BY table_schema, table_name, id DESC",
                    self.schema
                ),
                &[&self.source, &until],
            )
            .await
            .map_err(|e| reg("list the reloads", e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    TableName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                    DoneReload {
                        id: r.get(0),
                        cut: lsn(&r.get::<_, String>(3))?,
                    },
                ))
            })
            .collect()
    }

    /// The tables of this source with a reload `requested` or `running`.
    pub async fn active_reloads(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .client
            .query(
                &format!(
                    "SELECT DISTINCT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM {}.reloads \
                     WHERE source = $1 AND status IN ('requested', 'running') ORDER BY 1",
                    self.schema
                ),
                &[&self.source],
            )
            .await
            .map_err(|e| reg("list the reloads", e))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The parts of a reload, in order.
    pub async fn reload_parts(&self, reload_id: i64) -> Result<Vec<PartRow>, Error> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT object_path, schema_path, checksum, row_count FROM {}.files \
                     WHERE source = $1 AND kind = 'reload' AND reload_id = $2 ORDER BY part",
                    self.schema
                ),
                &[&self.source, &reload_id],
            )
            .await
            .map_err(|e| reg("list a reload's parts", e))?;
        if rows.is_empty() {
            return Err(Error::definite(
                Component::Registry,
                format!("reload {reload_id} is done but has no parts in the registry"),
            ));
        }
        Ok(rows
            .iter()
            .map(|r| PartRow {
                object_path: r.get(0),
                schema_path: r.get(1),
                checksum: r.get(2),
                row_count: r.get(3),
            })
            .collect())
    }
}

/// Reads the objects the registry names.
#[derive(Clone)]
pub struct Objects {
    store: Store,
}

fn damaged(object: &str, what: impl std::fmt::Display) -> Error {
    Error::definite(Component::ObjectStore, format!("{object}: {what}"))
        .hint("the output was changed or damaged after it was registered")
}

impl Objects {
    pub fn new(store: Store) -> Objects {
        Objects { store }
    }

    /// An object the registry names: its absence is a definite error (it was registered).
    pub async fn bytes(&self, object: &str) -> Result<bytes::Bytes, Error> {
        self.store
            .get_opt(&stored_path(object))
            .await?
            .ok_or_else(|| damaged(object, "registered, but missing from the output"))
    }

    /// A YAML document (`schema.yml`, `ddl.yml`).
    pub async fn yaml<T: serde::de::DeserializeOwned>(&self, object: &str) -> Result<T, Error> {
        let data = self.bytes(object).await?;
        serde_yaml::from_slice(&data).map_err(|e| damaged(object, format!("not readable: {e}")))
    }

    /// A gzipped CSV file, checked against `checksum` (of the compressed bytes), as a reader of
    /// its text: a large reload part is decompressed as it is copied, not all at once.
    pub async fn csv_reader(
        &self,
        object: &str,
        checksum: Option<&str>,
    ) -> Result<flate2::read::GzDecoder<bytes::buf::Reader<bytes::Bytes>>, Error> {
        let data = self.bytes(object).await?;
        if let Some(want) = checksum {
            let got = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
            if got != want {
                return Err(damaged(
                    object,
                    format!("checksum {got}, registered {want}"),
                ));
            }
        }
        Ok(flate2::read::GzDecoder::new(bytes::Buf::reader(data)))
    }

    /// A gzipped CSV file's whole text, checked like [`Objects::csv_reader`].
    pub async fn csv_text(&self, object: &str, checksum: Option<&str>) -> Result<Vec<u8>, Error> {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut self.csv_reader(object, checksum).await?, &mut text)
            .map_err(|e| damaged(object, format!("not gzip: {e}")))?;
        Ok(text)
    }

    /// A gzipped CSV file's records (the header first), checked like [`Objects::csv_text`].
    pub async fn csv(
        &self,
        object: &str,
        checksum: Option<&str>,
    ) -> Result<Vec<Vec<Field>>, Error> {
        let text = self.csv_text(object, checksum).await?;
        read_records(&text).map_err(|e| damaged(object, e))
    }
}

/// `schema.yml` as a consumer needs it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SchemaFile {
    pub schema: String,
    pub table: String,
    /// `default`, `index`, `full` or `nothing`.
    #[serde(default)]
    pub replica_identity: Option<String>,
    pub columns: Vec<FileColumn>,
    #[serde(default)]
    pub metadata_columns: Vec<serde_yaml::Value>,
}

/// A column of `schema.yml` or `ddl.yml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct FileColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    #[serde(default)]
    pub attnum: Option<i16>,
    #[serde(default)]
    pub primary_key: Option<u16>,
    /// Part of the replica identity key (absent in `ddl.yml`).
    #[serde(default)]
    pub replica_key: bool,
}

/// A table named in a `ddl.yml`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TableRef {
    pub schema: String,
    pub table: String,
}

/// `ddl.yml` as a consumer needs it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DdlFile {
    pub event: String,
    pub schema: String,
    pub table: String,
    pub commit_lsn: String,
    pub seq: u32,
    pub table_before: Option<TableRef>,
    #[serde(default)]
    pub table_after: Option<TableRef>,
    pub columns_after: Option<Vec<FileColumn>>,
    pub rewrites_rows: bool,
    pub reload_request: Option<String>,
    pub mode_after: Option<String>,
}
