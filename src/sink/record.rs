//! What the write stage produced: one [`FileRecord`] per uploaded object (a streaming batch, a part
//! of a reload, a DDL record), which the registry commits as a `files` row ([`Registered`] once it
//! has an id). The record is the contract between writing and registering: every path in it is the
//! full object_store path, and its checksum is of the bytes that were uploaded.

use chrono::{DateTime, Utc};

use crate::core::batch::{OpCounts, Position};
use crate::table::TableName;

/// What kind of object a `files` row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Streaming,
    Reload,
    Ddl,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Streaming => "streaming",
            FileKind::Reload => "reload",
            FileKind::Ddl => "ddl",
        }
    }
    pub(crate) fn parse(s: &str) -> FileKind {
        match s {
            "reload" => FileKind::Reload,
            "ddl" => FileKind::Ddl,
            _ => FileKind::Streaming,
        }
    }
}

/// One row of the file log.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub batch_id: String,
    pub table: TableName,
    pub kind: FileKind,
    /// object_store paths (full, including the configured prefix).
    pub object_path: String,
    pub schema_path: String,
    pub manifest_path: String,
    pub first: Option<Position>,
    pub last: Option<Position>,
    pub first_commit_ts: Option<DateTime<Utc>>,
    pub last_commit_ts: Option<DateTime<Utc>>,
    pub rows: u64,
    pub bytes: u64,
    pub csv_bytes: u64,
    /// `sha256:<hex>` of the gzip object.
    pub checksum: String,
    pub schema_version: i32,
    pub schema_fingerprint: String,
    pub reload_id: Option<i64>,
    pub part: Option<i32>,
    pub ops: OpCounts,
}

/// A committed `files` row.
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: i64,
    pub record: FileRecord,
    pub notified_stream_seq: Option<u64>,
}
