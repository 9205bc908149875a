//! Preconditions and catalog facts on the source database: `wal_level`, the publication, the slot, and
//! the column facts a Relation message does not carry.
//!
//! Every check here fails with a definite error that says what to do (set `wal_level = logical` and
//! restart, create the publication, grant REPLICATION), because none of them can fix itself by retrying.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::decode::{Relation, ReplicaIdentity as WireIdentity};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::table::{ColumnSchema, ReplicaIdentity, TableName, TableSchema};

fn pg(what: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(d) => Error::definite(
            "source",
            format!("{what}: {} (SQLSTATE {})", d.message(), d.code().code()),
        ),
        None => Error::transient("source", format!("{what}: {e}")),
    }
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush: Option<Lsn>,
    pub active_pid: Option<i32>,
    pub lag_bytes: Option<i64>,
}

/// Checks `wal_level`, the server version, the database encoding and the publication.
pub async fn check_source(c: &Client, publication: &str) -> Result<(), Error> {
    let row = c
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
             pg_encoding_to_char(encoding), \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) \
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(|e| pg("check source settings", e))?;
    let wal_level: String = row.get(0);
    let version: i32 = row.get(1);
    let encoding: String = row.get(2);
    let can_replicate: bool = row.get::<_, Option<bool>>(3).unwrap_or(false);
    if wal_level != "logical" {
        return Err(Error::definite(
            "source",
            format!(
                "the source has wal_level = {wal_level}; logical replication needs wal_level = logical: \
                 run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
            ),
        ));
    }
    if version < 140000 {
        return Err(Error::definite(
            "source",
            format!("PostgreSQL {version} is too old: cdc-egress needs PostgreSQL 14 or later"),
        ));
    }
    if encoding != "UTF8" {
        return Err(Error::definite(
            "source",
            format!("the source database encoding is {encoding}; cdc-egress writes UTF-8 CSV and needs a UTF8 database"),
        ));
    }
    if !can_replicate {
        return Err(Error::definite(
            "source",
            "the source role lacks the REPLICATION attribute: run ALTER ROLE <role> WITH REPLICATION (as a superuser)",
        ));
    }
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| pg("look up publication", e))?
        .is_some();
    if !exists {
        return Err(Error::definite(
            "source",
            format!(
                "publication {publication:?} does not exist in the source database: create it, e.g. \
                 CREATE PUBLICATION {} FOR ALL TABLES; (or FOR TABLE a, b), or set source.publication",
                crate::table::quote_ident(publication)
            ),
        ));
    }
    Ok(())
}

pub async fn slot_info(c: &Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = c
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, active_pid, \
             (pg_current_wal_lsn() - restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| pg("look up replication slot", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        confirmed_flush: r.get::<_, Option<String>>(2).and_then(|s| s.parse().ok()),
        active_pid: r.get(3),
        lag_bytes: r.get(4),
    }))
}

/// Verifies an existing slot is a pgoutput slot of this database.
pub fn check_slot(info: &SlotInfo, slot: &str, dbname: &str) -> Result<(), Error> {
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::definite(
            "source",
            format!(
                "replication slot {slot:?} uses plugin {:?}, not pgoutput: drop it or choose another source.slot",
                info.plugin
            ),
        ));
    }
    if info.database.as_deref() != Some(dbname) {
        return Err(Error::definite(
            "source",
            format!(
                "replication slot {slot:?} belongs to database {:?}, not {dbname:?}: choose another source.slot",
                info.database
            ),
        ));
    }
    Ok(())
}

/// Tables in the publication (what a fresh start exports and what `reload` accepts).
pub async fn published_tables(c: &Client, publication: &str) -> Result<Vec<TableName>, Error> {
    let rows = c
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(|e| pg("list published tables", e))?;
    Ok(rows
        .into_iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Builds the table schema for a Relation message: names, OIDs and typmods from the message (what the
/// WAL says at that position); type names via `format_type`, NOT NULL and primary-key positions from
/// the current catalog (matched by column name; a column the catalog no longer has is nullable and
/// keyless).
pub async fn describe_relation(c: &Client, rel: &Relation) -> Result<Arc<TableSchema>, Error> {
    let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
    let mods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    let rows = c
        .query(
            "SELECT t.ord::int, format_type(t.oid, NULLIF(t.typmod, -1)), \
                    COALESCE(a.attnotnull, false), \
                    (SELECT k.ord::int2 FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                      WHERE i.indrelid = $4::oid AND i.indisprimary AND k.attnum = a.attnum) \
             FROM unnest($1::oid[], $2::int4[], $3::text[]) WITH ORDINALITY AS t(oid, typmod, name, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = $4::oid AND a.attname = t.name AND NOT a.attisdropped \
             ORDER BY t.ord",
            &[&oids, &mods, &names, &rel.oid],
        )
        .await
        .map_err(|e| pg(&format!("describe relation {}.{}", rel.namespace, rel.name), e))?;
    let mut columns = Vec::with_capacity(rel.columns.len());
    for (col, row) in rel.columns.iter().zip(rows) {
        let not_null: bool = row.get(2);
        let pk: Option<i16> = row.get(3);
        columns.push(ColumnSchema {
            name: col.name.clone(),
            type_name: row
                .get::<_, Option<String>>(1)
                .unwrap_or_else(|| format!("oid:{}", col.type_oid)),
            type_oid: col.type_oid,
            type_modifier: col.type_modifier,
            nullable: !not_null,
            primary_key: pk.map(|p| p as u16),
            replica_key: col.is_key,
        });
    }
    let identity = match rel.replica_identity {
        WireIdentity::Default => ReplicaIdentity::Default,
        WireIdentity::Nothing => ReplicaIdentity::Nothing,
        WireIdentity::Full => ReplicaIdentity::Full,
        WireIdentity::Index => ReplicaIdentity::Index,
    };
    let namespace = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    Ok(TableSchema::new(
        TableName::new(namespace, rel.name.clone()),
        rel.oid,
        identity,
        columns,
    ))
}
