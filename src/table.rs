//! Tables as the rest of the pipeline sees them: a qualified name and a column list.
//!
//! A [`TableSchema`] is built from a pgoutput Relation message (names, type OIDs, typmods, key flags:
//! exactly what the WAL says at that position) plus catalog facts the WAL does not carry (type names
//! rendered with `format_type`, NOT NULL, primary-key positions), read when the Relation arrives.
//!
//! Its [`TableSchema::fingerprint`] hashes only what changes the shape of a file (column names, type
//! OIDs, typmods, in order), so a batch is always written under exactly one fingerprint, and the
//! registry bumps a table's schema version exactly when the fingerprint changes.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// `schema.table`, unquoted. Ordered and hashable; used as the per-table key everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table` (or `table`, meaning `public.table`). Double-quoted parts may contain dots.
    pub fn parse(s: &str) -> Option<TableName> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        let mut quoted = false;
        let mut was_quoted = false;
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    cur.push('"');
                }
                '"' => {
                    quoted = !quoted;
                    was_quoted = true;
                }
                '.' if !quoted => {
                    parts.push((std::mem::take(&mut cur), was_quoted));
                    was_quoted = false;
                }
                c => cur.push(c),
            }
        }
        if quoted {
            return None;
        }
        parts.push((cur, was_quoted));
        let fold = |(p, q): (String, bool)| if q { p } else { p.to_lowercase() };
        match parts.len() {
            1 => {
                let n = fold(parts.pop()?);
                (!n.is_empty()).then(|| TableName::new("public", n))
            }
            2 => {
                let n = fold(parts.pop()?);
                let s = fold(parts.pop()?);
                (!n.is_empty() && !s.is_empty()).then(|| TableName::new(s, n))
            }
            _ => None,
        }
    }

    /// `"schema"."table"` for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Path segment / subject-safe form: `schema.table`.
    pub fn dotted(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// SQL identifier quoting: `a"b` → `"a""b"`.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL literal quoting (standard_conforming_strings on): `it's` → `'it''s'`.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ColumnSchema {
    pub name: String,
    /// `format_type(type_oid, type_modifier)`, e.g. `numeric(12,2)`, `character varying(40)`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub nullable: bool,
    /// 1-based position in the primary key, if the column is part of it.
    pub primary_key: Option<u16>,
    /// Part of the replica identity key (what pgoutput sends as the old key).
    pub replica_key: bool,
    /// `pg_attribute.attnum`: the column's identity in its table, kept across renames (a renamed
    /// column has the same attnum under its new name; a dropped and re-added one gets a new one).
    /// `None` when the catalog no longer had a column of that name when the daemon described the
    /// relation (renamed or dropped again before it read the WAL up to here).
    pub attnum: Option<i16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub table: TableName,
    pub relation_oid: u32,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<ColumnSchema>,
    fingerprint: String,
}

impl TableSchema {
    pub fn new(
        table: TableName,
        relation_oid: u32,
        replica_identity: ReplicaIdentity,
        columns: Vec<ColumnSchema>,
    ) -> Arc<TableSchema> {
        let mut h = Sha256::new();
        for c in &columns {
            h.update(c.name.as_bytes());
            h.update([0]);
            h.update(c.type_oid.to_be_bytes());
            h.update(c.type_modifier.to_be_bytes());
        }
        let fingerprint = hex::encode(&h.finalize()[..8]);
        Arc::new(TableSchema {
            table,
            relation_oid,
            replica_identity,
            columns,
            fingerprint,
        })
    }

    /// 16 hex digits that change exactly when the column list (names, types, typmods, order) changes.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_names_like_sql() {
        assert_eq!(
            TableName::parse("public.t"),
            Some(TableName::new("public", "t"))
        );
        assert_eq!(TableName::parse("T"), Some(TableName::new("public", "t")));
        assert_eq!(
            TableName::parse("\"My.Schema\".\"Ta\"\"ble\""),
            Some(TableName::new("My.Schema", "Ta\"ble"))
        );
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse("a."), None);
        assert_eq!(TableName::parse("\"open"), None);
        assert_eq!(TableName::new("s", "a\"b").quoted(), "\"s\".\"a\"\"b\"");
    }

    #[test]
    fn fingerprint_tracks_the_column_list_only() {
        let col = |n: &str, oid| ColumnSchema {
            name: n.into(),
            type_name: "x".into(),
            type_oid: oid,
            type_modifier: -1,
            nullable: true,
            primary_key: None,
            replica_key: false,
            attnum: None,
        };
        let t = TableName::new("s", "t");
        let a = TableSchema::new(t.clone(), 1, ReplicaIdentity::Default, vec![col("a", 23)]);
        let mut c = col("a", 23);
        c.nullable = false;
        let b = TableSchema::new(t.clone(), 2, ReplicaIdentity::Full, vec![c]);
        let d = TableSchema::new(t, 1, ReplicaIdentity::Default, vec![col("a", 20)]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), d.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
    }
}
