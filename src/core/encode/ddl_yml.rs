//! `ddl.yml`: the record of one schema or publication change, stored in the table's
//! `ddl/<position>/` directory (README.md "Schema changes").
//!
//! It says where the change sits among the rows (`commit_lsn`, `seq`: the same order as `_commit_lsn`,
//! `_seq`), what happened (`event`, the command tag; not the statement text, which may hold secrets), the table's columns before and
//! after with their `attnum` (a rename keeps it; a dropped and re-added column gets a new one), the
//! publications before and after, whether existing rows changed without row changes
//! (`rewrites_rows`, `reason`) and the reload that change started (`reload_request`). Everything in
//! it derives from the record's position in the stream, so a replay writes the same bytes.

use serde::Serialize;

use crate::core::batch::format_commit_ts;
use crate::core::batch::DdlRecord;
use crate::core::ddl::{DdlChange, DdlColumn};
use crate::lsn::Lsn;

#[derive(Debug, Serialize)]
pub struct DdlDoc<'a> {
    pub format_version: u32,
    pub kind: &'static str,
    pub source: &'a str,
    /// The table this copy of the record is filed under (a rename is filed under both names).
    pub schema: &'a str,
    pub table: &'a str,
    pub commit_lsn: Lsn,
    pub seq: u32,
    pub xid: u32,
    pub commit_ts: String,
    pub event: &'static str,
    pub command_tag: &'a str,
    pub relation_oid: u32,
    pub table_after: Option<TableRef<'a>>,
    pub table_before: Option<TableRef<'a>>,
    pub publications_before: &'a [String],
    pub publications_after: &'a [String],
    pub columns_before: Option<&'a [DdlColumn]>,
    pub columns_after: Option<&'a [DdlColumn]>,
    pub rewrites_rows: bool,
    pub reason: Option<&'a str>,
    /// Set when this change started a reload of the table: its registry request id.
    pub reload_request: Option<&'a str>,
    /// The table's registry mode after the change, when it changed.
    pub mode_after: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct TableRef<'a> {
    pub schema: &'a str,
    pub table: &'a str,
}

impl<'a> DdlDoc<'a> {
    pub fn new(source: &'a str, rec: &'a DdlRecord) -> DdlDoc<'a> {
        let c: &DdlChange = &rec.change;
        let after = (c.event != crate::core::ddl::DdlEvent::Drop).then_some(TableRef {
            schema: &c.schema,
            table: &c.table,
        });
        let before = match (&c.previous_schema, &c.previous_table) {
            (Some(s), Some(t)) => Some(TableRef {
                schema: s,
                table: t,
            }),
            _ if c.event != crate::core::ddl::DdlEvent::Create => Some(TableRef {
                schema: &c.schema,
                table: &c.table,
            }),
            _ => None,
        };
        DdlDoc {
            format_version: 1,
            kind: "ddl",
            source,
            schema: &rec.table.schema,
            table: &rec.table.name,
            commit_lsn: rec.position.commit_lsn,
            seq: rec.position.seq,
            xid: rec.xid,
            commit_ts: format_commit_ts(rec.commit_ts),
            event: c.event.as_str(),
            command_tag: &c.command_tag,
            relation_oid: c.relation_oid,
            table_after: after,
            table_before: before,
            publications_before: &c.previous_publications,
            publications_after: &c.publications,
            columns_before: c.columns_before.as_deref(),
            columns_after: c.columns.as_deref(),
            rewrites_rows: c.rewrites_rows,
            reason: c.reason.as_deref(),
            reload_request: rec.reload_request.as_deref(),
            mode_after: rec.mode_after,
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("DDL record serializes")
    }
}
