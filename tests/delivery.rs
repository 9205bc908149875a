//! Delivery and start-up recovery (`cdc_egress::daemon::deliver`) with no server: the in-memory
//! registry and notifier (`MemoryRegistry`, `MemoryNotifier`, which keep the contracts of the real
//! ones, see `tests/registry_conformance.rs` and `tests/notifier_conformance.rs`) and a `Store` on
//! a temporary directory. Checked: registry rows and notices follow seal order and persisted reports
//! come back in the same order; injected transient failures (with or without their effect) are
//! retried with nothing duplicated; a definite failure ends delivery with that error; recovery
//! completes rows left unnotified, each exactly once, also when the last run stopped between a
//! publish and its recorded sequence.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::Arc;

use cdc_egress::core::ack::BatchId;
use cdc_egress::core::batch::{OpCounts, Position, Sealed, SealedBatch, SpoolFactory};
use cdc_egress::daemon::deliver::{self, Sinks};
use cdc_egress::error::{Error, Kind};
use cdc_egress::lsn::Lsn;
use cdc_egress::observe::Metrics;
use cdc_egress::sink::fault::Fault;
use cdc_egress::sink::layout;
use cdc_egress::sink::notify::memory::MemoryNotifier;
use cdc_egress::sink::notify::Publish;
use cdc_egress::sink::registry::memory::{MemoryRegistry, Op};
use cdc_egress::sink::registry::{FileKind, FileLog, FileRecord, Registered};
use cdc_egress::sink::spool::{GzipSpools, SpooledFile};
use cdc_egress::sink::store::Store;
use cdc_egress::sink::upload::{self, SchemaVersions};
use cdc_egress::table::{ColumnSchema, ReplicaIdentity, TableName, TableSchema};
use tokio::sync::{mpsc, watch};

type Batch = SealedBatch<SpooledFile>;

struct World {
    sinks: Sinks<MemoryRegistry, MemoryNotifier>,
    registry: MemoryRegistry,
    notifier: MemoryNotifier,
    spools: GzipSpools,
    /// Kept open: a closed shutdown channel reads as "shut down".
    _shutdown: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &format!("file://{}", dir.path().join("out").display()),
        &BTreeMap::new(),
    )
    .unwrap();
    let spools = GzipSpools::new(dir.path().join("spool")).unwrap();
    let (tx, rx) = watch::channel(false);
    let registry = MemoryRegistry::new();
    let notifier = MemoryNotifier::new("cdct");
    World {
        sinks: Sinks {
            layout: layout::Namespace::new(store.root(), "main"),
            store,
            registry: registry.clone(),
            notifier: Some(notifier.clone()),
            metrics: Arc::new(Metrics::new()),
            shutdown: rx,
        },
        registry,
        notifier,
        spools,
        _shutdown: tx,
        _dir: dir,
    }
}

fn orders() -> TableName {
    TableName::new("public", "orders")
}

fn accounts() -> TableName {
    TableName::new("sales", "accounts")
}

fn pos(lsn: u64, seq: u32) -> Position {
    Position::new(Lsn(lsn), seq)
}

impl World {
    /// A sealed batch of `table` holding the changes `first..=last` (one CSV line per seq).
    fn batch(&mut self, id: u64, table: &TableName, first: Position, last: Position) -> Batch {
        let schema = TableSchema::new(
            table.clone(),
            16384,
            ReplicaIdentity::Default,
            vec![ColumnSchema {
                name: "id".into(),
                type_name: "integer".into(),
                type_oid: 23,
                type_modifier: -1,
                nullable: false,
                primary_key: Some(1),
                replica_key: true,
                attnum: Some(1),
            }],
        );
        let mut spool = self.spools.create(table).unwrap();
        let line = format!("{},{},{id}\n", first.commit_lsn, first.seq);
        spool.write_all(line.as_bytes()).unwrap();
        SealedBatch {
            id: BatchId(id),
            schema,
            first,
            last,
            // 2025-01-01 in PostgreSQL-epoch microseconds, plus the LSN to tell batches apart.
            first_commit_ts: 788_918_400_000_000 + first.commit_lsn.0 as i64,
            last_commit_ts: 788_918_400_000_000 + last.commit_lsn.0 as i64,
            rows: 1,
            csv_bytes: line.len() as u64,
            ops: OpCounts {
                insert: 1,
                ..Default::default()
            },
            spool: spool.finish().unwrap(),
        }
    }

    /// Five batches of two tables, in seal order.
    fn five_batches(&mut self) -> Vec<Batch> {
        vec![
            self.batch(1, &orders(), pos(0x100, 1), pos(0x100, 3)),
            self.batch(2, &accounts(), pos(0x110, 1), pos(0x110, 2)),
            self.batch(3, &orders(), pos(0x120, 1), pos(0x130, 1)),
            self.batch(4, &accounts(), pos(0x140, 1), pos(0x140, 1)),
            self.batch(5, &orders(), pos(0x150, 1), pos(0x150, 5)),
        ]
    }

    /// Runs `deliver_batches` over `batches` (then a closed channel); returns its result and the
    /// persisted reports in the order they came.
    async fn deliver(&self, batches: Vec<Batch>) -> (Result<(), Error>, Vec<u64>) {
        let (tx, rx) = mpsc::channel(batches.len().max(1));
        for b in batches {
            tx.send(Sealed::Batch(b)).await.unwrap();
        }
        drop(tx);
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let result =
            deliver::deliver_batches(self.sinks.clone(), rx, SchemaVersions::default(), ptx).await;
        let mut persisted = Vec::new();
        while let Ok(id) = prx.try_recv() {
            persisted.push(id.0);
        }
        (result, persisted)
    }

    /// Delivers [`World::five_batches`] and asserts that they all arrive: reports, registry rows and
    /// notices in seal order, each once.
    async fn deliver_five_in_order(&mut self) {
        let batches = self.five_batches();
        let want = expected(&batches);
        let (result, persisted) = self.deliver(batches).await;
        result.unwrap();
        assert_eq!(persisted, vec![1, 2, 3, 4, 5], "reports in seal order");
        self.assert_delivered(&want).await;
    }

    /// Asserts that the registry holds exactly the batches `expected` (first, last positions of
    /// each, in seal order), each notified once, with the recorded sequence of its one notice, and
    /// its manifest equal to the notice.
    async fn assert_delivered(&self, expected: &[(TableName, Position, Position)]) {
        let files = self.registry.files();
        let got: Vec<_> = files
            .iter()
            .map(|f| {
                (
                    f.record.table.clone(),
                    f.record.first.unwrap(),
                    f.record.last.unwrap(),
                )
            })
            .collect();
        assert_eq!(got, expected, "registry rows in seal order");
        let published = self.notifier.published();
        assert_eq!(
            published.len(),
            files.len(),
            "one notice per row: {published:?}"
        );
        for (f, m) in files.iter().zip(&published) {
            assert_eq!(m.id, f.record.batch_id, "notices in registry order");
            assert_eq!(m.subject, self.notifier.batch_subject(&f.record.table));
            assert_eq!(f.notified_stream_seq, Some(m.seq));
            let manifest = layout::stored_path(&f.record.manifest_path);
            assert_eq!(self.sinks.store.get(&manifest).await.unwrap(), m.payload);
        }
        assert!(self
            .registry
            .files()
            .iter()
            .all(|f| f.notified_stream_seq.is_some()));
    }
}

fn expected(batches: &[Batch]) -> Vec<(TableName, Position, Position)> {
    batches
        .iter()
        .map(|b| (b.schema.table.clone(), b.first, b.last))
        .collect()
}

#[tokio::test]
async fn rows_and_notices_follow_seal_order_and_reports_come_back_in_order() {
    let mut w = world();
    w.deliver_five_in_order().await;
    assert_eq!(w.registry.last_position(&orders()), Some(pos(0x150, 5)));
    assert_eq!(w.registry.last_position(&accounts()), Some(pos(0x140, 1)));
    let spools_left = std::fs::read_dir(w.spools.dir()).unwrap().count();
    assert_eq!(
        spools_left, 0,
        "each spool file is removed once its batch is delivered"
    );
}

#[tokio::test]
async fn a_transient_commit_failure_is_retried_and_nothing_is_duplicated() {
    let mut w = world();
    // The first batch's commit: refused once, then committed with the reply lost.
    w.registry.fail_next(Op::CommitFile, 1, Fault::Transient);
    w.registry
        .fail_next(Op::CommitFile, 1, Fault::TransientAfter);
    w.deliver_five_in_order().await;
    assert_eq!(w.registry.calls(Op::CommitFile), 5 + 2, "two retries");
}

#[tokio::test]
async fn a_transient_publish_failure_is_retried_and_nothing_is_duplicated() {
    let mut w = world();
    // The first notice: refused once, then stored with the acknowledgement lost.
    w.notifier.fail_next(1, Fault::Transient);
    w.notifier.fail_next(1, Fault::TransientAfter);
    // And the first recorded sequence is lost once too.
    w.registry
        .fail_next(Op::MarkNotified, 1, Fault::TransientAfter);
    w.deliver_five_in_order().await;
    assert_eq!(w.notifier.calls(), 5 + 2, "two retries");
    assert_eq!(w.registry.calls(Op::MarkNotified), 5 + 1, "one retry");
}

#[tokio::test]
async fn a_definite_commit_failure_ends_delivery_with_that_error() {
    let mut w = world();
    w.registry.fail_next(Op::CommitFile, 1, Fault::Definite);
    let batches = w.five_batches();
    let (result, persisted) = w.deliver(batches).await;
    let e = result.expect_err("a definite failure ends delivery");
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains("injected definite failure"), "{e}");
    assert_eq!(w.registry.calls(Op::CommitFile), 1, "not retried");
    assert!(persisted.is_empty(), "nothing reported persisted");
    assert!(w.registry.files().is_empty());
    assert!(w.notifier.published().is_empty());
}

#[tokio::test]
async fn a_definite_publish_failure_ends_delivery_and_recovery_completes_the_row() {
    let mut w = world();
    let batches = w.five_batches();
    let want = expected(&batches[..2]);
    let (tx, rx) = mpsc::channel(batches.len());
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let mut batches = batches.into_iter();
    tx.send(Sealed::Batch(batches.next().unwrap()))
        .await
        .unwrap();
    let delivery = tokio::spawn(deliver::deliver_batches(
        w.sinks.clone(),
        rx,
        SchemaVersions::default(),
        ptx,
    ));
    // Once the first batch is through, the next notice fails for good.
    assert_eq!(prx.recv().await.map(|id| id.0), Some(1));
    w.notifier.fail_next(1, Fault::Definite);
    for b in batches {
        // Delivery may have ended already: the rest would be re-sent by the slot.
        let _ = tx.send(Sealed::Batch(b)).await;
    }
    drop(tx);
    let e = delivery
        .await
        .unwrap()
        .expect_err("a definite failure ends delivery");
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains("injected definite failure"), "{e}");
    assert!(
        prx.recv().await.is_none(),
        "only the first batch is reported persisted"
    );
    let files = w.registry.files();
    assert_eq!(files.len(), 2, "the second batch is committed");
    assert_eq!(files[1].notified_stream_seq, None, "but not notified");
    assert_eq!(w.notifier.published().len(), 1);

    // The next session's recovery completes the committed row, once.
    assert_eq!(deliver::finish_unnotified(&w.sinks).await.unwrap(), 1);
    w.assert_delivered(&want).await;
    assert_eq!(deliver::finish_unnotified(&w.sinks).await.unwrap(), 0);
    assert_eq!(w.notifier.published().len(), 2);
}

/// Registers `records` directly (what a run that stopped after its registry commits left).
async fn commit_all(w: &World, records: &[FileRecord]) -> Vec<i64> {
    let mut ids = Vec::new();
    for r in records {
        ids.push(w.registry.commit_file(r, None).await.unwrap());
    }
    ids
}

/// Part `part` of reload `reload_id` of `table`, with the paths the exporter gives it.
fn reload_part(w: &World, table: &TableName, reload_id: i64, part: u32) -> FileRecord {
    let dir = w.sinks.layout.reload_dir(table, reload_id);
    FileRecord {
        batch_id: format!(
            "{}/part-{part}",
            w.sinks.layout.reload_batch_id(table, reload_id)
        ),
        table: table.clone(),
        kind: FileKind::Reload,
        object_path: dir.clone().join(layout::part_file(part)).to_string(),
        schema_path: dir.clone().join(layout::SCHEMA_FILE).to_string(),
        manifest_path: dir.clone().join(layout::MANIFEST_FILE).to_string(),
        first: Some(pos(0x90, 0)),
        last: None,
        first_commit_ts: None,
        last_commit_ts: None,
        rows: 10,
        bytes: 100,
        csv_bytes: 400,
        checksum: format!("sha256:{part:064x}"),
        schema_version: 1,
        schema_fingerprint: "fp".into(),
        reload_id: Some(reload_id),
        part: Some(part as i32),
        ops: OpCounts::default(),
    }
}

#[tokio::test]
async fn recovery_completes_unnotified_rows_exactly_once() {
    let mut w = world();
    // A run that uploaded and committed three batches and the two parts of a reload, and got as
    // far as the first batch's notice.
    let batches = w.five_batches();
    let mut records = Vec::new();
    for b in &batches[..3] {
        records.push(
            upload::upload_streaming(&w.sinks.store, &w.sinks.layout, b, 1)
                .await
                .unwrap(),
        );
    }
    records.push(reload_part(&w, &orders(), 9, 1));
    records.push(reload_part(&w, &orders(), 9, 2));
    let ids = commit_all(&w, &records).await;
    let done = Registered {
        id: ids[0],
        record: records[0].clone(),
        notified_stream_seq: None,
    };
    deliver::finish_registered(&w.sinks, &done).await.unwrap();
    assert_eq!(w.notifier.published().len(), 1);

    // Recovery stops between the second row's publish and its recorded sequence (a crash there).
    w.registry.fail_next(Op::MarkNotified, 1, Fault::Definite);
    let e = deliver::finish_unnotified(&w.sinks)
        .await
        .expect_err("stopped");
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert_eq!(
        w.notifier.published().len(),
        2,
        "the second row's notice is out"
    );

    // The next recovery: a lost acknowledgement on the way, and still one notice per row.
    w.notifier.fail_next(1, Fault::TransientAfter);
    let completed = deliver::finish_unnotified(&w.sinks).await.unwrap();
    assert_eq!(
        completed, 4,
        "two batches and two reload parts were unnotified"
    );
    let published = w.notifier.published();
    let ids_published: Vec<_> = published.iter().map(|m| m.id.as_str()).collect();
    let reload_id = w.sinks.layout.reload_batch_id(&orders(), 9);
    assert_eq!(
        ids_published,
        vec![
            records[0].batch_id.as_str(),
            records[1].batch_id.as_str(),
            records[2].batch_id.as_str(),
            reload_id.as_str(),
        ],
        "batches in registry order, then the reload; each once"
    );
    assert_eq!(
        published
            .iter()
            .map(|m| m.id.as_str())
            .collect::<HashSet<_>>()
            .len(),
        published.len()
    );
    let seq_of = |id: &str| published.iter().find(|m| m.id == id).map(|m| m.seq);
    for f in w.registry.files() {
        let notice = match f.record.kind {
            FileKind::Reload => reload_id.clone(),
            _ => f.record.batch_id.clone(),
        };
        assert_eq!(
            f.notified_stream_seq,
            seq_of(&notice),
            "{}",
            f.record.batch_id
        );
        let manifest = layout::stored_path(&f.record.manifest_path);
        assert!(w.sinks.store.exists(&manifest).await.unwrap(), "{manifest}");
    }
    assert_eq!(
        published[3].subject,
        w.notifier.reload_subject(&orders()),
        "the reload notice on the reload subject"
    );

    // Nothing is left to do.
    assert_eq!(deliver::finish_unnotified(&w.sinks).await.unwrap(), 0);
    assert_eq!(w.notifier.published().len(), 4);
}

/// With a schema bucket, each table's entry is written by its first batch (the `schema.yml` read
/// back, holding from that batch's first position), later batches of the same columns write
/// nothing, and delivering the same batches again (a replay) writes nothing either.
#[tokio::test]
async fn schema_entries_are_written_once_per_version() {
    let mut w = world();
    w.notifier = w.notifier.clone().with_schemas();
    w.deliver_five_in_order().await;
    let again = w.five_batches();
    let (result, _) = w.deliver(again).await;
    result.unwrap();
    for (key, first) in [
        ("main.public.orders", pos(0x100, 1)),
        ("main.sales.accounts", pos(0x110, 1)),
    ] {
        let history = w.notifier.schema_history(key);
        assert_eq!(history.len(), 1, "{key}: one version");
        let entry: serde_json::Value = serde_json::from_slice(&history[0]).unwrap();
        assert_eq!(entry["state"], "present");
        assert_eq!(entry["kind"], "streaming");
        assert_eq!(
            entry["valid_from"]["commit_lsn"],
            first.commit_lsn.to_string()
        );
        assert_eq!(entry["valid_from"]["seq"], first.seq);
        assert_eq!(entry["schema_yml"]["columns"][0]["name"], "id", "{entry}");
    }
}
