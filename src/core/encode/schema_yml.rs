//! `schema.yml`: the description stored next to every batch and reload (README.md "schema.yml").
//!
//! It says what the CSV columns are (metadata columns, then the table's columns with PostgreSQL type
//! names including typmods), which table and relation they came from, the LSN range the file covers,
//! its row count, and the schema version and fingerprint. The fingerprint changes exactly when the
//! column list changes; the version is the registry's counter of those changes for the table.

use serde::Serialize;

use crate::lsn::Lsn;
use crate::table::{ColumnSchema, ReplicaIdentity, TableSchema};

#[derive(Debug, Serialize)]
pub struct MetadataColumn {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    pub description: &'static str,
}

/// The metadata columns of streaming files with their meaning (same order as the CSV).
pub fn metadata_columns() -> Vec<MetadataColumn> {
    let c = |name, type_name, description| MetadataColumn {
        name,
        type_name,
        description,
    };
    vec![
        c("_op", "text", "I insert, U update, D delete, T truncate"),
        c("_commit_lsn", "pg_lsn", "commit LSN of the transaction"),
        c(
            "_seq",
            "integer",
            "ordinal of the change within its transaction, from 1",
        ),
        c("_xid", "bigint", "transaction id"),
        c(
            "_commit_ts",
            "timestamptz",
            "commit time, UTC, microseconds",
        ),
        c(
            "_before",
            "jsonb",
            "old key (or old row under REPLICA IDENTITY FULL) when sent",
        ),
        c(
            "_unchanged",
            "jsonb",
            "array of columns whose unchanged TOAST value was not sent",
        ),
    ]
}

#[derive(Debug, Serialize)]
pub struct LsnRange {
    pub first_commit_lsn: Lsn,
    pub first_seq: u32,
    pub last_commit_lsn: Lsn,
    pub last_seq: u32,
}

#[derive(Debug, Serialize)]
pub struct SchemaDoc<'a> {
    pub format_version: u32,
    /// `streaming` or `reload`.
    pub kind: &'static str,
    pub schema: &'a str,
    pub table: &'a str,
    pub relation_oid: u32,
    pub schema_version: i32,
    pub schema_fingerprint: &'a str,
    pub replica_identity: ReplicaIdentity,
    pub columns: &'a [ColumnSchema],
    /// Empty for reload files, which carry only the table's columns.
    pub metadata_columns: Vec<MetadataColumn>,
    /// Streaming: the positions covered. Reload: absent (see `cut_lsn`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn_range: Option<LsnRange>,
    /// Reload: the LSN the export is consistent at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_lsn: Option<Lsn>,
    pub rows: u64,
    pub csv_dialect: &'static str,
}

pub const CSV_DIALECT: &str =
    "RFC 4180, UTF-8, comma, LF, header row, gzip; every value double-quoted, NULL is unquoted \\N";

impl<'a> SchemaDoc<'a> {
    fn base(kind: &'static str, schema: &'a TableSchema, schema_version: i32, rows: u64) -> Self {
        SchemaDoc {
            format_version: 1,
            kind,
            schema: &schema.table.schema,
            table: &schema.table.name,
            relation_oid: schema.relation_oid,
            schema_version,
            schema_fingerprint: schema.fingerprint(),
            replica_identity: schema.replica_identity,
            columns: &schema.columns,
            metadata_columns: Vec::new(),
            lsn_range: None,
            cut_lsn: None,
            rows,
            csv_dialect: CSV_DIALECT,
        }
    }

    /// A streaming batch's schema.yml: metadata columns, then the table's columns.
    pub fn streaming(
        schema: &'a TableSchema,
        schema_version: i32,
        range: LsnRange,
        rows: u64,
    ) -> Self {
        SchemaDoc {
            metadata_columns: metadata_columns(),
            lsn_range: Some(range),
            ..Self::base("streaming", schema, schema_version, rows)
        }
    }

    /// A reload's schema.yml: the table's columns only, consistent at `cut`.
    pub fn reload(schema: &'a TableSchema, schema_version: i32, cut: Lsn, rows: u64) -> Self {
        SchemaDoc {
            cut_lsn: Some(cut),
            ..Self::base("reload", schema, schema_version, rows)
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("schema document serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::TableName;

    #[test]
    fn names_every_part_of_the_contract() {
        let s = TableSchema::new(
            TableName::new("public", "orders"),
            16384,
            ReplicaIdentity::Default,
            vec![ColumnSchema {
                name: "amount".into(),
                type_name: "numeric(12,2)".into(),
                type_oid: 1700,
                type_modifier: 786438,
                nullable: false,
                primary_key: None,
                replica_key: false,
                attnum: Some(1),
            }],
        );
        let y = SchemaDoc::streaming(
            &s,
            3,
            LsnRange {
                first_commit_lsn: Lsn(0x10),
                first_seq: 1,
                last_commit_lsn: Lsn(0x20),
                last_seq: 4,
            },
            9,
        )
        .to_yaml();
        for needle in [
            "schema: public",
            "table: orders",
            "relation_oid: 16384",
            "type: numeric(12,2)",
            "type_oid: 1700",
            "nullable: false",
            "replica_identity: default",
            "schema_version: 3",
            "first_commit_lsn: 0/10",
            "last_seq: 4",
            "rows: 9",
            "name: _commit_lsn",
        ] {
            assert!(y.contains(needle), "missing {needle:?} in\n{y}");
        }
        let parsed: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(parsed["schema_fingerprint"].as_str(), Some(s.fingerprint()));
    }
}
