//! The document that announces a finished reload: written as `reload/<id>/manifest.json` (the marker
//! a listing reader waits for) and published on `<prefix>.reload.<schema>.<table>` with
//! `Nats-Msg-Id` = `<schema>.<table>/reload/<id>`.

use serde::{Deserialize, Serialize};

use crate::sink::layout::Namespace;
use crate::sink::registry::Registered;
use crate::sink::store::Store;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ReloadPart {
    pub part: i32,
    pub url: String,
    pub rows: u64,
    pub bytes: u64,
    pub checksum: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ReloadNotice {
    pub batch_id: String,
    pub kind: String,
    pub reload_id: i64,
    /// `source.name` of the daemon that exported the table.
    pub source: String,
    pub table: String,
    pub schema: String,
    pub table_name: String,
    /// The export holds exactly the transactions committed below this LSN; apply streaming rows
    /// with `_commit_lsn` at or above it after the reload.
    pub cut_lsn: String,
    pub rows: u64,
    pub bytes: u64,
    pub schema_url: String,
    pub manifest_url: String,
    pub schema_version: i32,
    pub schema_fingerprint: String,
    pub parts: Vec<ReloadPart>,
}

impl ReloadNotice {
    /// Builds the notice from the registered part rows of one reload (at least one).
    pub fn new(store: &Store, layout: &Namespace, parts: &[Registered]) -> Option<ReloadNotice> {
        let first = parts.first()?;
        let r = &first.record;
        let reload_id = r.reload_id?;
        let url = |p: &str| store.url_of(&crate::sink::layout::stored_path(p));
        Some(ReloadNotice {
            batch_id: layout.reload_batch_id(&r.table, reload_id),
            source: layout.source().to_string(),
            kind: "reload".into(),
            reload_id,
            table: r.table.dotted(),
            schema: r.table.schema.clone(),
            table_name: r.table.name.clone(),
            cut_lsn: r
                .first
                .map(|p| p.commit_lsn.to_string())
                .unwrap_or_default(),
            rows: parts.iter().map(|p| p.record.rows).sum(),
            bytes: parts.iter().map(|p| p.record.bytes).sum(),
            schema_url: url(&r.schema_path),
            manifest_url: url(&r.manifest_path),
            schema_version: r.schema_version,
            schema_fingerprint: r.schema_fingerprint.clone(),
            parts: parts
                .iter()
                .map(|p| ReloadPart {
                    part: p.record.part.unwrap_or(0),
                    url: url(&p.record.object_path),
                    rows: p.record.rows,
                    bytes: p.record.bytes,
                    checksum: p.record.checksum.clone(),
                })
                .collect(),
        })
    }

    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self).expect("notice serializes").into()
    }
}
