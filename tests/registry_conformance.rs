//! File log conformance: the operations of `cdc_egress::sink::registry::FileLog` (see its
//! `# Contract`), written once as checks generic over a [`Backend`] and run against the PostgreSQL
//! registry (a freshly migrated registry schema per check, in a fresh database on the test server)
//! and against the in-memory double `MemoryRegistry` that delivery tests stand on.

mod common;

use cdc_egress::core::batch::{OpCounts, Position};
use cdc_egress::error::Kind;
use cdc_egress::lsn::Lsn;
use cdc_egress::pg::conninfo::ConnInfo;
use cdc_egress::sink::owner::Owner;
use cdc_egress::sink::registry::memory::MemoryRegistry;
use cdc_egress::sink::registry::{
    migrate, FileKind, FileLog, FileRecord, Registered, Registry, TableState,
};
use cdc_egress::table::{quote_ident, TableName};
use std::collections::HashMap;

/// What a check needs to read back beyond the trait (each backend's own view of its state).
trait Backend {
    type Log: FileLog;
    fn log(&self) -> &Self::Log;
    /// The table's last committed position.
    async fn last_position(&self, table: &TableName) -> Option<Position>;
    /// The recorded notice sequence of row `id`.
    async fn notified_seq(&self, id: i64) -> Option<u64>;
    /// How many rows the file log holds.
    async fn rows(&self) -> usize;
}

struct Pg {
    registry: Registry,
    client: tokio_postgres::Client,
    schema: String,
}

impl Backend for Pg {
    type Log = Registry;
    fn log(&self) -> &Registry {
        &self.registry
    }
    async fn last_position(&self, table: &TableName) -> Option<Position> {
        let states = self.registry.table_states().await.unwrap();
        states.get(table).and_then(|s| s.last)
    }
    async fn notified_seq(&self, id: i64) -> Option<u64> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT notified_stream_seq FROM {}.files WHERE id = $1",
                    quote_ident(&self.schema)
                ),
                &[&id],
            )
            .await
            .unwrap();
        row.get::<_, Option<i64>>(0).map(|s| s as u64)
    }
    async fn rows(&self) -> usize {
        let row = self
            .client
            .query_one(
                &format!("SELECT count(*) FROM {}.files", quote_ident(&self.schema)),
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) as usize
    }
}

impl Backend for MemoryRegistry {
    type Log = MemoryRegistry;
    fn log(&self) -> &MemoryRegistry {
        self
    }
    async fn last_position(&self, table: &TableName) -> Option<Position> {
        MemoryRegistry::last_position(self, table)
    }
    async fn notified_seq(&self, id: i64) -> Option<u64> {
        self.files()
            .into_iter()
            .find(|r| r.id == id)
            .and_then(|r| r.notified_stream_seq)
    }
    async fn rows(&self) -> usize {
        self.files().len()
    }
}

// ---------------------------------------------------------------------------------------------
// Records.

fn orders() -> TableName {
    TableName::new("public", "orders")
}

fn accounts() -> TableName {
    TableName::new("sales", "accounts")
}

fn pos(lsn: u64, seq: u32) -> Position {
    Position::new(Lsn(lsn), seq)
}

/// A streaming record of `table` from `first` to `last`; every field set, timestamps to the µs.
fn streaming(table: &TableName, first: Position, last: Position) -> FileRecord {
    let id = format!(
        "{}/{:X}.{}-{:X}.{}",
        table.dotted(),
        first.commit_lsn.0,
        first.seq,
        last.commit_lsn.0,
        last.seq
    );
    let ts = |us: i64| chrono::DateTime::from_timestamp_micros(1_700_000_000_000_000 + us);
    FileRecord {
        object_path: format!("out/{id}/data.csv.gz"),
        schema_path: format!("out/{id}/schema.yml"),
        manifest_path: format!("out/{id}/manifest.json"),
        batch_id: id,
        table: table.clone(),
        kind: FileKind::Streaming,
        first: Some(first),
        last: Some(last),
        first_commit_ts: ts(first.commit_lsn.0 as i64 * 7 + 123_456),
        last_commit_ts: ts(last.commit_lsn.0 as i64 * 7 + 654_321),
        rows: 10 + last.seq as u64,
        bytes: 1234,
        csv_bytes: 5678,
        checksum: format!("sha256:{:064x}", first.commit_lsn.0),
        schema_version: 2,
        schema_fingerprint: "fp-1".into(),
        reload_id: None,
        part: None,
        ops: OpCounts {
            insert: 3,
            update: 2,
            delete: 1,
            truncate: 0,
        },
    }
}

/// Part `part` of reload `reload_id` of `table`, cut at `cut`.
fn reload_part(table: &TableName, reload_id: i64, part: i32, cut: u64) -> FileRecord {
    FileRecord {
        batch_id: format!("{}/reload/{reload_id}/part-{part}", table.dotted()),
        kind: FileKind::Reload,
        first: Some(pos(cut, 0)),
        last: Some(pos(cut + 0x1000, 0)),
        reload_id: Some(reload_id),
        part: Some(part),
        object_path: format!(
            "out/{}/reload/{reload_id}/part-{part}.csv.gz",
            table.dotted()
        ),
        ..streaming(table, pos(cut, 0), pos(cut, 0))
    }
}

// ---------------------------------------------------------------------------------------------
// The suite.

async fn commit<B: Backend>(b: &B, rec: &FileRecord) -> i64 {
    b.log().commit_file(rec, None).await.unwrap()
}

async fn commits_come_back_unnotified_in_id_order<B: Backend>(b: &B) {
    let recs = [
        streaming(&orders(), pos(0x100, 1), pos(0x180, 4)),
        streaming(&accounts(), pos(0x110, 2), pos(0x110, 3)),
        reload_part(&orders(), 5, 1, 0x90),
        FileRecord {
            batch_id: "public.orders/ddl/1".into(),
            kind: FileKind::Ddl,
            first: None,
            last: None,
            first_commit_ts: None,
            last_commit_ts: None,
            schema_path: String::new(),
            ..streaming(&orders(), pos(0x200, 1), pos(0x200, 1))
        },
        streaming(&orders(), pos(0x200, 2), pos(0x300, 1)),
    ];
    let mut ids = Vec::new();
    for r in &recs {
        ids.push(commit(b, r).await);
    }
    assert!(ids[0] > 0, "ids are positive: {ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "each new row's id is greater: {ids:?}"
    );
    let back = b.log().unnotified().await.unwrap();
    assert_eq!(back.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    for (r, rec) in back.iter().zip(&recs) {
        assert_eq!(&r.record, rec, "the row is the record committed");
        assert_eq!(r.notified_stream_seq, None);
    }
    assert_eq!(b.rows().await, recs.len());
}

async fn a_repeated_batch_id_returns_the_first_row<B: Backend>(b: &B) {
    let first = streaming(&orders(), pos(0x100, 1), pos(0x100, 9));
    let id = commit(b, &first).await;
    assert_eq!(commit(b, &first).await, id);
    // The same batch id with other content (and a later end): the first row stands, the position
    // does not move.
    let other = FileRecord {
        last: Some(pos(0x500, 1)),
        rows: 999,
        ..first.clone()
    };
    assert_eq!(commit(b, &other).await, id);
    assert_eq!(b.rows().await, 1);
    assert_eq!(b.last_position(&orders()).await, Some(pos(0x100, 9)));
    let back = b.log().unnotified().await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].record, first);
    // A repeat of a row already notified leaves its sequence alone.
    b.log().mark_notified(id, 4).await.unwrap();
    assert_eq!(commit(b, &first).await, id);
    assert_eq!(b.notified_seq(id).await, Some(4));
}

async fn the_position_follows_streaming_commits_and_never_moves_back<B: Backend>(b: &B) {
    assert_eq!(b.last_position(&orders()).await, None);
    commit(b, &streaming(&orders(), pos(0x100, 1), pos(0x200, 3))).await;
    assert_eq!(b.last_position(&orders()).await, Some(pos(0x200, 3)));
    // Same commit LSN, later seq: moves.
    commit(b, &streaming(&orders(), pos(0x200, 4), pos(0x200, 7))).await;
    assert_eq!(b.last_position(&orders()).await, Some(pos(0x200, 7)));
    // A batch ending before the recorded position: committed, the position stays.
    commit(b, &streaming(&orders(), pos(0x50, 1), pos(0x200, 6))).await;
    assert_eq!(b.last_position(&orders()).await, Some(pos(0x200, 7)));
    // Reload parts never move it, nor give a table one.
    commit(b, &reload_part(&orders(), 3, 1, 0x9000)).await;
    commit(b, &reload_part(&accounts(), 4, 1, 0x9000)).await;
    assert_eq!(b.last_position(&orders()).await, Some(pos(0x200, 7)));
    assert_eq!(b.last_position(&accounts()).await, None);
    // Tables are independent.
    commit(b, &streaming(&accounts(), pos(0x10, 1), pos(0x20, 1))).await;
    assert_eq!(b.last_position(&accounts()).await, Some(pos(0x20, 1)));
    assert_eq!(b.last_position(&orders()).await, Some(pos(0x200, 7)));
    assert_eq!(b.rows().await, 6);
}

async fn mark_notified_is_idempotent_and_leaves_unnotified<B: Backend>(b: &B) {
    let a = streaming(&orders(), pos(0x100, 1), pos(0x100, 2));
    let c = streaming(&orders(), pos(0x100, 3), pos(0x100, 4));
    let ida = commit(b, &a).await;
    let idc = commit(b, &c).await;
    b.log().mark_notified(ida, 7).await.unwrap();
    b.log().mark_notified(ida, 7).await.unwrap();
    assert_eq!(b.notified_seq(ida).await, Some(7));
    assert_eq!(b.notified_seq(idc).await, None);
    let left = b.log().unnotified().await.unwrap();
    assert_eq!(left.iter().map(|r| r.id).collect::<Vec<_>>(), vec![idc]);
    // 0 is what delivery records when NATS is disabled: notified all the same.
    b.log().mark_notified(idc, 0).await.unwrap();
    assert!(b.log().unnotified().await.unwrap().is_empty());
    // An unknown id: no error, no change.
    b.log().mark_notified(idc + 1000, 9).await.unwrap();
    assert_eq!(b.rows().await, 2);
    assert_eq!(b.notified_seq(ida).await, Some(7));
}

async fn reload_files_lists_one_reload_in_id_order<B: Backend>(b: &B) {
    let p1 = reload_part(&orders(), 5, 1, 0x900);
    let other = reload_part(&orders(), 6, 1, 0x900);
    let p2 = reload_part(&orders(), 5, 2, 0x900);
    // A streaming row carrying the reload id is not a part.
    let stray = FileRecord {
        reload_id: Some(5),
        ..streaming(&orders(), pos(0x100, 1), pos(0x100, 2))
    };
    let id1 = commit(b, &p1).await;
    commit(b, &other).await;
    commit(b, &stray).await;
    let id2 = commit(b, &p2).await;
    let parts = b.log().reload_files(5).await.unwrap();
    assert_eq!(
        parts.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![id1, id2]
    );
    assert_eq!(parts[0].record, p1);
    assert_eq!(parts[1].record, p2);
    assert!(parts.iter().all(|p| p.notified_stream_seq.is_none()));
    b.log().mark_notified(id1, 11).await.unwrap();
    let parts = b.log().reload_files(5).await.unwrap();
    assert_eq!(
        parts
            .iter()
            .map(|r| r.notified_stream_seq)
            .collect::<Vec<_>>(),
        vec![Some(11), None]
    );
    assert!(b.log().reload_files(404).await.unwrap().is_empty());
}

/// Runs every check against a fresh backend from `fresh`.
async fn conformance<B: Backend, F: AsyncFnMut() -> B>(mut fresh: F) {
    macro_rules! check {
        ($f:ident) => {
            eprintln!("conformance check: {}", stringify!($f));
            $f(&fresh().await).await;
        };
    }
    check!(commits_come_back_unnotified_in_id_order);
    check!(a_repeated_batch_id_returns_the_first_row);
    check!(the_position_follows_streaming_commits_and_never_moves_back);
    check!(mark_notified_is_idempotent_and_leaves_unnotified);
    check!(reload_files_lists_one_reload_in_id_order);
}

// ---------------------------------------------------------------------------------------------
// Backends.

#[tokio::test]
async fn in_memory() {
    conformance(async || MemoryRegistry::new()).await;
}

/// A registry schema migrated just now in `db`.
async fn migrated(db: &common::TestDb, schema: &str) -> Pg {
    let mut client = db.client().await;
    migrate(&mut client, schema).await.unwrap();
    let pool = ConnInfo::parse(&db.url).unwrap().pool(2).unwrap();
    Pg {
        registry: Registry::new(pool, schema, "main"),
        client,
        schema: schema.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql() {
    let db = common::TestDb::new("regconf").await;
    let mut n = 0;
    conformance(async || {
        n += 1;
        migrated(&db, &format!("registry_{n}")).await
    })
    .await;
    db.cleanup().await;
}

/// Not part of the shared suite (the double has no schema to lack): a registry that was never
/// migrated is a definite error that says what to do.
#[tokio::test]
async fn postgresql_without_a_registry_is_a_definite_error() {
    let db = common::TestDb::new("regnone").await;
    let pool = ConnInfo::parse(&db.url).unwrap().pool(1).unwrap();
    let registry = Registry::new(pool, "not_migrated", "main");
    let rec = streaming(&orders(), pos(0x100, 1), pos(0x100, 2));
    let e = FileLog::commit_file(&registry, &rec, None)
        .await
        .expect_err("no registry");
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains("cdc-egress migrate"), "{e}");
    let e = FileLog::unnotified(&registry)
        .await
        .expect_err("no registry");
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    db.cleanup().await;
}

/// Not part of the shared suite (the double holds one source): handles of two sources on one
/// registry see and move only their own rows, and a source name belongs to one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_sources_sharing_a_registry_see_only_their_own_rows() {
    let db = common::TestDb::new("regsrc").await;
    let a = migrated(&db, "registry_shared").await.registry;
    let pool = ConnInfo::parse(&db.url).unwrap().pool(2).unwrap();
    let b = Registry::new(pool, "registry_shared", "other");
    let mut rec_a = streaming(&orders(), pos(0x100, 1), pos(0x100, 2));
    rec_a.batch_id = format!("main/{}", rec_a.batch_id);
    let mut rec_b = streaming(&orders(), pos(0x50, 1), pos(0x50, 1));
    rec_b.batch_id = format!("other/{}", rec_b.batch_id);
    let id_a = FileLog::commit_file(&a, &rec_a, None).await.unwrap();
    FileLog::commit_file(&b, &rec_b, None).await.unwrap();

    let unnotified =
        |r: Vec<Registered>| r.into_iter().map(|x| x.record.batch_id).collect::<Vec<_>>();
    assert_eq!(
        unnotified(FileLog::unnotified(&a).await.unwrap()),
        [rec_a.batch_id.clone()]
    );
    assert_eq!(
        unnotified(FileLog::unnotified(&b).await.unwrap()),
        [rec_b.batch_id.clone()]
    );
    let position = |s: HashMap<TableName, TableState>| s[&orders()].last;
    assert_eq!(
        position(a.table_states().await.unwrap()),
        Some(pos(0x100, 2))
    );
    assert_eq!(
        position(b.table_states().await.unwrap()),
        Some(pos(0x50, 1)),
        "the same table of another source has its own position"
    );
    FileLog::mark_notified(&a, id_a, 7).await.unwrap();
    assert_eq!(FileLog::unnotified(&b).await.unwrap().len(), 1);
    let dates = b.last_streaming_dates().await.unwrap();
    assert_eq!(dates.len(), 1);
    assert_eq!(
        dates[0].2,
        [rec_b.batch_id.clone()],
        "orphan checks see their own ids only"
    );

    let owner = |slot: &str| Owner {
        system_identifier: "1".into(),
        database: "app".into(),
        slot: slot.into(),
    };
    a.claim_owner(&owner("slot_a")).await.unwrap();
    b.claim_owner(&owner("slot_b")).await.unwrap();
    a.claim_owner(&owner("slot_a")).await.unwrap();
    let e = a.claim_owner(&owner("slot_b")).await.unwrap_err();
    assert!(
        e.is_config() && e.to_string().contains("slot \"slot_a\""),
        "{e}"
    );
    assert_eq!(b.release_owner().await.unwrap(), Some(owner("slot_b")));
    a.claim_owner(&owner("slot_a")).await.unwrap();
    db.cleanup().await;
}

/// A registry written by the previous version (one owner, no `source` columns) is upgraded in
/// place: its rows belong to the source named after the slot that owned it, so a daemon with the
/// default `source.name` carries on where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_5_files_earlier_rows_under_the_owning_slot() {
    let db = common::TestDb::new("regmig").await;
    let c = db.client().await;
    let schema = "registry_v4";
    c.batch_execute(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.schema_migrations (version integer PRIMARY KEY, \
         name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await
    .unwrap();
    for (version, name, sql) in &cdc_egress::sink::registry::migrate::MIGRATIONS[..4] {
        c.batch_execute(&sql.replace("{{schema}}", schema))
            .await
            .unwrap();
        c.execute(
            &format!("INSERT INTO {schema}.schema_migrations VALUES ($1, $2)"),
            &[version, name],
        )
        .await
        .unwrap();
    }
    c.batch_execute(&format!(
        "UPDATE {schema}.registry_info SET owner_system_identifier = '1', owner_database = 'app', \
           owner_slot = 'old_slot', owner_claimed_at = now(); \
         INSERT INTO {schema}.files (batch_id, table_schema, table_name, kind, object_path, row_count, \
           byte_size, csv_bytes, checksum, schema_version, schema_fingerprint, last_commit_lsn, last_seq) \
           VALUES ('public.orders/streaming/x', 'public', 'orders', 'streaming', 'out/x', 1, 1, 1, 's', 1, 'f', '0/100', 1); \
         INSERT INTO {schema}.tables (table_schema, table_name, last_commit_lsn, last_seq) \
           VALUES ('public', 'orders', '0/100', 1); \
         INSERT INTO {schema}.reloads (table_schema, table_name, status) VALUES ('public', 'orders', 'requested'); \
         INSERT INTO {schema}.daemon (slot_name, state) VALUES ('old_slot', 'streaming');"
    ))
    .await
    .unwrap();
    let mut client = db.client().await;
    assert_eq!(migrate(&mut client, schema).await.unwrap(), [5, 6]);
    let pool = ConnInfo::parse(&db.url).unwrap().pool(2).unwrap();
    let upgraded = Registry::new(pool.clone(), schema, "old_slot");
    assert_eq!(FileLog::unnotified(&upgraded).await.unwrap().len(), 1);
    assert_eq!(
        upgraded.table_states().await.unwrap()[&orders()].last,
        Some(pos(0x100, 1))
    );
    assert_eq!(upgraded.active_reloads().await.unwrap().len(), 1);
    let old_owner = Owner {
        system_identifier: "1".into(),
        database: "app".into(),
        slot: "old_slot".into(),
    };
    upgraded.claim_owner(&old_owner).await.unwrap();
    let other = Registry::new(pool, schema, "other");
    assert!(FileLog::unnotified(&other).await.unwrap().is_empty());
    db.cleanup().await;
}
