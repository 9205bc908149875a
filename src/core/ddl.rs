//! Schema and publication changes as the stream carries them: [`DdlChange`], parsed from the
//! transactional logical messages the DDL-capture event triggers emit
//! (`migrations/source/ddl_capture.sql`), and what follows from each one; the batcher hands out a
//! [`DdlRecord`](crate::core::batch::DdlRecord) per change it takes.
//!
//! # Why a DDL's position is exact
//! The trigger runs inside the DDL's transaction, at `ddl_command_end` (or `sql_drop`), and emits a
//! *transactional* message. Logical decoding delivers it with that transaction, at its commit LSN,
//! after the row changes the transaction made before the DDL and before those it made after (the
//! message's place among them gives its `seq`). A rolled-back DDL emits nothing. So a record's
//! position `(commit LSN, seq)` sorts it among the rows exactly where the change happened, and every
//! row of the table at a later position was written under the new shape.
//!
//! # What follows from a change ([`DdlChange::needs_reload`])
//! A DDL that changes existing rows without row changes in the WAL (`rewrites_rows`: a default that
//! fills a new column, a table rewrite) or that makes a table with rows published (`publish`) would
//! leave the files unable to reproduce the source. Under the default policy ([`RewritePolicy::Reload`])
//! the batcher starts a reload of the table at the DDL's position through the same path as a reload
//! marker: the export is consistent at a cut after the DDL, and the consumer rule replaces the table
//! there. [`RewritePolicy::Record`] writes the record only (its `rewrites_rows` says what diverged).

use crate::lsn::Lsn;
use crate::table::TableName;

/// What happened to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DdlEvent {
    /// Created in (or into) a publication: `CREATE TABLE`, `CREATE TABLE AS`, `SELECT INTO`.
    Create,
    /// Columns, types, defaults or constraints changed (`ALTER TABLE`).
    Alter,
    /// Renamed or moved to another schema; `previous_*` name the old table.
    Rename,
    /// Dropped. Its last record: no file follows under this name unless a new table takes it.
    Drop,
    /// Joined a publication (`ALTER PUBLICATION … ADD TABLE / TABLES IN SCHEMA / SET TABLE`).
    Publish,
    /// Left a publication (`ALTER PUBLICATION … DROP …`, or moved out of a published schema).
    Unpublish,
}

impl DdlEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            DdlEvent::Create => "create",
            DdlEvent::Alter => "alter",
            DdlEvent::Rename => "rename",
            DdlEvent::Drop => "drop",
            DdlEvent::Publish => "publish",
            DdlEvent::Unpublish => "unpublish",
        }
    }
}

/// One column as the catalog described it at the DDL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DdlColumn {
    pub name: String,
    pub attnum: i16,
    /// `format_type` of the column's type and typmod, e.g. `numeric(10,1)`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub not_null: bool,
    /// The default expression, as `pg_get_expr` prints it.
    #[serde(default)]
    pub default: Option<String>,
    /// Existing rows hold a value they were never written with (a "fast default").
    #[serde(default)]
    pub filled: bool,
}

/// One captured change, exactly as the trigger described it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DdlChange {
    /// The message format ([`FORMAT`] for this version's trigger).
    #[serde(default = "first_format")]
    pub format: u32,
    pub event: DdlEvent,
    pub command_tag: String,
    pub relation_oid: u32,
    pub schema: String,
    pub table: String,
    #[serde(default)]
    pub previous_schema: Option<String>,
    #[serde(default)]
    pub previous_table: Option<String>,
    /// Publications the table is in after the change, and was in before it.
    #[serde(default)]
    pub publications: Vec<String>,
    #[serde(default)]
    pub previous_publications: Vec<String>,
    /// `None` when unknown (the table was not published before, or the shadow was lost).
    #[serde(default)]
    pub columns_before: Option<Vec<DdlColumn>>,
    /// `None` for a dropped table.
    #[serde(default)]
    pub columns: Option<Vec<DdlColumn>>,
    /// Existing rows changed without row changes in the WAL.
    #[serde(default)]
    pub rewrites_rows: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The format of the messages this version's trigger writes and reads.
pub const FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

/// What to do about a change that rewrites existing rows (`ddl.on_rewrite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RewritePolicy {
    /// Reload the table at the DDL's position (the default: the files stay exact).
    #[default]
    Reload,
    /// Write the DDL record only; its `rewrites_rows` tells the consumer what diverged.
    Record,
}

impl DdlChange {
    /// Parses a message of kind `ddl`; the error says what is wrong.
    pub fn parse(content: &[u8]) -> Result<DdlChange, String> {
        serde_json::from_slice(content).map_err(|e| e.to_string())
    }

    pub fn table_name(&self) -> TableName {
        TableName::new(&self.schema, &self.table)
    }

    /// The table's name before a rename.
    pub fn previous_name(&self) -> Option<TableName> {
        match (&self.previous_schema, &self.previous_table) {
            (Some(s), Some(t)) if self.event == DdlEvent::Rename => Some(TableName::new(s, t)),
            _ => None,
        }
    }

    /// Whether the change concerns `publication` (before or after it). `None` takes every change.
    pub fn concerns(&self, publication: Option<&str>) -> bool {
        match publication {
            None => true,
            Some(p) => {
                self.publications.iter().any(|x| x == p)
                    || self.previous_publications.iter().any(|x| x == p)
            }
        }
    }

    /// Whether `publication` holds the table after the change.
    pub fn published_in(&self, publication: Option<&str>) -> bool {
        publication.is_none_or(|p| self.publications.iter().any(|x| x == p))
    }

    /// The reason to reload the table at this change, if the files would diverge otherwise.
    pub fn needs_reload(
        &self,
        publication: Option<&str>,
        policy: RewritePolicy,
    ) -> Option<&'static str> {
        if !self.published_in(publication) {
            return None;
        }
        match self.event {
            DdlEvent::Publish => Some("published"),
            DdlEvent::Drop | DdlEvent::Unpublish => None,
            _ if self.rewrites_rows && policy == RewritePolicy::Reload => Some("ddl"),
            _ => None,
        }
    }
}

/// The request id of the reload a DDL starts: the same on every replay of the stream, so a reload
/// recorded before a crash is found again, never started twice.
pub fn reload_request_id(reason: &str, commit_lsn: Lsn, seq: u32) -> String {
    format!("{reason}:{commit_lsn}:{seq}")
}
