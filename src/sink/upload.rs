//! Writing sealed batches to object storage.
//!
//! # Order of effects for one batch (the *delivery* of a batch)
//! 1. `data.csv.gz` and `schema.yml` are uploaded ([`upload_streaming`]); each is atomic.
//! 2. The registry row commits (`register`). This is the commit point.
//! 3. `manifest.json` is written ([`write_manifest`]): the marker that tells a listing reader the batch
//!    directory is complete.
//! 4. The JetStream notice is published and its sequence recorded (`notify`, `register`).
//! 5. Only then is the batch reported persisted and may the ack pass it (`ack`).
//!
//! A crash before 2 leaves objects without a manifest and without a registry row: invisible to both
//! kinds of reader, and the re-sent changes form a new batch (possibly with other boundaries) that is
//! written and registered normally; the orphans are removed by [`remove_orphans`] at start-up. A crash
//! after 2 leaves a committed row whose steps 3–4 are completed at start-up, before streaming resumes.

use std::collections::HashMap;

use object_store::path::Path;

use super::layout::{self, DATA_FILE, DDL_FILE, MANIFEST_FILE, SCHEMA_FILE};
use super::record::{FileKind, FileRecord, Registered};
use super::spool::SpooledFile;
use super::store::Store;
use crate::core::batch::DdlRecord;
use crate::core::batch::SealedBatch;
use crate::error::Error;
use crate::table::{TableName, TableSchema};

/// Assigns schema versions: the registry's current version, plus one whenever a batch's fingerprint
/// differs from the previous batch of the same table. Batches of a table pass here in seal order,
/// so the numbering is the same after a crash and replay.
#[derive(Debug, Default)]
pub struct SchemaVersions {
    current: HashMap<TableName, (i32, String)>,
}

impl SchemaVersions {
    pub fn new(current: HashMap<TableName, (i32, String)>) -> Self {
        SchemaVersions { current }
    }

    pub fn version_for(&mut self, schema: &TableSchema) -> i32 {
        let fp = schema.fingerprint();
        let entry = self
            .current
            .entry(schema.table.clone())
            .or_insert((0, String::new()));
        if entry.1 != fp {
            entry.0 += 1;
            entry.1 = fp.to_string();
        }
        entry.0
    }
}

/// Uploads a sealed streaming batch's data and schema.yml and returns the registry record to commit.
pub async fn upload_streaming(
    store: &Store,
    layout: &layout::Namespace,
    batch: &SealedBatch<SpooledFile>,
    schema_version: i32,
) -> Result<FileRecord, Error> {
    let table = &batch.schema.table;
    let date = layout::commit_date(batch.first_commit_ts);
    let batch_id = layout.streaming_batch_id(table, &date, batch.first, batch.last);
    let dir = layout.batch_dir(&batch_id);
    let data = dir.clone().join(DATA_FILE);
    let schema_path = dir.clone().join(SCHEMA_FILE);
    let doc = crate::core::encode::schema_yml::SchemaDoc::streaming(
        &batch.schema,
        schema_version,
        crate::core::encode::schema_yml::LsnRange {
            first_commit_lsn: batch.first.commit_lsn,
            first_seq: batch.first.seq,
            last_commit_lsn: batch.last.commit_lsn,
            last_seq: batch.last.seq,
        },
        batch.rows,
    );
    store
        .put_file(&data, &batch.spool.path, batch.spool.gz_bytes)
        .await?;
    store.put_bytes(&schema_path, doc.to_yaml()).await?;
    let ts = |us| crate::core::decode::pg_micros_to_utc(us);
    Ok(FileRecord {
        batch_id,
        table: table.clone(),
        kind: FileKind::Streaming,
        object_path: data.to_string(),
        schema_path: schema_path.to_string(),
        manifest_path: dir.clone().join(MANIFEST_FILE).to_string(),
        first: Some(batch.first),
        last: Some(batch.last),
        first_commit_ts: ts(batch.first_commit_ts),
        last_commit_ts: ts(batch.last_commit_ts),
        rows: batch.rows,
        bytes: batch.spool.gz_bytes,
        csv_bytes: batch.csv_bytes,
        checksum: format!("sha256:{}", batch.spool.sha256),
        schema_version,
        schema_fingerprint: batch.schema.fingerprint().to_string(),
        reload_id: None,
        part: None,
        ops: batch.ops,
    })
}

/// Uploads a DDL record's `ddl.yml` and returns the registry record to commit. The record's
/// position is its first and last position; `schema_version` is 0 (a record has none: the batch
/// after a shape change gets the next one).
pub async fn upload_ddl(
    store: &Store,
    layout: &layout::Namespace,
    rec: &DdlRecord,
    schema_version: i32,
) -> Result<FileRecord, Error> {
    let batch_id = layout.ddl_batch_id(&rec.table, rec.position);
    let dir = layout.batch_dir(&batch_id);
    let path = dir.clone().join(DDL_FILE);
    let body = crate::core::encode::ddl_yml::DdlDoc::new(layout.source(), rec).to_yaml();
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    let bytes = body.len() as u64;
    store.put_bytes(&path, body).await?;
    let ts = crate::core::decode::pg_micros_to_utc(rec.commit_ts);
    Ok(FileRecord {
        batch_id,
        table: rec.table.clone(),
        kind: FileKind::Ddl,
        object_path: path.to_string(),
        schema_path: path.to_string(),
        manifest_path: dir.clone().join(MANIFEST_FILE).to_string(),
        first: Some(rec.position),
        last: Some(rec.position),
        first_commit_ts: ts,
        last_commit_ts: ts,
        rows: 0,
        bytes,
        csv_bytes: 0,
        checksum: format!("sha256:{sha256}"),
        schema_version,
        schema_fingerprint: String::new(),
        reload_id: None,
        part: None,
        ops: Default::default(),
    })
}

/// The document written as `manifest.json` and published as the JetStream notice: everything a
/// consumer needs to fetch and verify the files.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Notice {
    pub batch_id: String,
    pub registry_id: i64,
    pub kind: String,
    /// `source.name` of the daemon that wrote the batch.
    pub source: String,
    /// `schema.table` for people; `schema` and `table_name` are the exact names.
    pub table: String,
    pub schema: String,
    pub table_name: String,
    pub data_url: String,
    pub schema_url: String,
    pub manifest_url: String,
    pub first_commit_lsn: Option<String>,
    pub first_seq: Option<u32>,
    pub last_commit_lsn: Option<String>,
    pub last_seq: Option<u32>,
    pub first_commit_ts: Option<String>,
    pub last_commit_ts: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub csv_bytes: u64,
    pub checksum: String,
    pub schema_version: i32,
    pub schema_fingerprint: String,
    pub reload_id: Option<i64>,
    pub part: Option<i32>,
    pub ops: crate::core::batch::OpCounts,
}

impl Notice {
    pub fn new(store: &Store, layout: &layout::Namespace, reg: &Registered) -> Notice {
        let r = &reg.record;
        let url = |p: &str| store.url_of(&layout::stored_path(p));
        let ts = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        };
        Notice {
            batch_id: r.batch_id.clone(),
            registry_id: reg.id,
            kind: r.kind.as_str().to_string(),
            source: layout.source().to_string(),
            table: r.table.dotted(),
            schema: r.table.schema.clone(),
            table_name: r.table.name.clone(),
            data_url: url(&r.object_path),
            schema_url: url(&r.schema_path),
            manifest_url: url(&r.manifest_path),
            first_commit_lsn: r.first.map(|p| p.commit_lsn.to_string()),
            first_seq: r.first.map(|p| p.seq),
            last_commit_lsn: r.last.map(|p| p.commit_lsn.to_string()),
            last_seq: r.last.map(|p| p.seq),
            first_commit_ts: ts(r.first_commit_ts),
            last_commit_ts: ts(r.last_commit_ts),
            rows: r.rows,
            bytes: r.bytes,
            csv_bytes: r.csv_bytes,
            checksum: r.checksum.clone(),
            schema_version: r.schema_version,
            schema_fingerprint: r.schema_fingerprint.clone(),
            reload_id: r.reload_id,
            part: r.part,
            ops: r.ops,
        }
    }

    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self).expect("notice serializes").into()
    }
}

/// Writes `manifest.json` for a committed file row (idempotent: same content every time).
pub async fn write_manifest(
    store: &Store,
    layout: &layout::Namespace,
    reg: &Registered,
) -> Result<(), Error> {
    let notice = Notice::new(store, layout, reg);
    put_manifest(
        store,
        &layout::stored_path(&reg.record.manifest_path),
        notice.to_json(),
    )
    .await
}

/// Writes a directory's `manifest.json`, the mark that it is complete, after removing stale
/// staging files of interrupted local uploads from it (see [`Store::remove_stale_staging`]), so a
/// complete directory holds exactly the files its manifest lists.
pub async fn put_manifest(
    store: &Store,
    manifest: &Path,
    body: impl Into<bytes::Bytes>,
) -> Result<(), Error> {
    let dir: Path = manifest
        .parts()
        .take(manifest.parts().count().saturating_sub(1))
        .collect();
    let removed = store.remove_stale_staging(&dir)?;
    if removed > 0 {
        tracing::info!(dir = %dir, files = removed, "removed staging files of interrupted uploads");
    }
    store.put_bytes(manifest, body).await
}

/// Deletes streaming batch directories of `table` (in `layout`) that have no `manifest.json` and
/// are not in `committed` (batch ids): uploads of a crashed run that never reached the registry.
/// Only the given dates are listed (all dates when `dates` is `None`), so start-up does not scan the
/// whole history of a table. Returns the number of objects deleted.
pub async fn remove_orphans(
    store: &Store,
    layout: &layout::Namespace,
    table: &crate::table::TableName,
    dates: Option<&[String]>,
    committed: &std::collections::HashSet<String>,
) -> Result<usize, Error> {
    let streaming = layout.table_dir(table).join("streaming");
    let table_key = layout.table_key(table);
    let dates: Vec<String> = match dates {
        Some(d) => d.to_vec(),
        None => store.list_dirs(&streaming).await?,
    };
    let mut deleted = 0;
    for date in dates {
        let prefix = streaming.clone().join(date.as_str());
        let objects = store.list(&prefix).await?;
        let mut dirs: HashMap<String, (bool, Vec<Path>)> = HashMap::new();
        for o in objects {
            let Some(dir) = o
                .location
                .prefix_match(&prefix)
                .and_then(|mut parts| parts.next())
            else {
                continue;
            };
            let e = dirs.entry(dir.as_ref().to_string()).or_default();
            if o.location.filename() == Some(MANIFEST_FILE) {
                e.0 = true;
            }
            e.1.push(o.location);
        }
        // A local upload killed in the middle left `<name>#<n>`, which listings hide (a directory
        // holding only that is not even listed). Nothing uploads into this source's directories
        // while it starts, so every staging file below the date is stale.
        deleted += store.remove_stale_staging_below(&prefix)?;
        for (dir, (has_manifest, paths)) in dirs {
            let batch_id = format!("{table_key}/streaming/{date}/{dir}");
            if has_manifest || committed.contains(&batch_id) {
                continue;
            }
            for p in paths {
                store.delete(&p).await?;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}
