//! The batch/ack state machine driven through random streams, seals, persistence orders and crashes.

use super::*;
use crate::core::decode::{
    Begin, Commit, Delete, Insert, OldTuple, OldTupleKind, Truncate, Tuple, Update, Value,
};
use crate::table::{ColumnSchema, ReplicaIdentity};
use proptest::prelude::*;

impl<S> Sealed<S> {
    /// The batch this item is; the tests that call it produce no DDL records.
    fn batch(&self) -> &SealedBatch<S> {
        match self {
            Sealed::Batch(b) => b,
            Sealed::Ddl(d) => panic!("expected a sealed batch, got the DDL record {d:?}"),
        }
    }
}
use std::collections::{BTreeMap, BTreeSet};

struct VecSpools;
impl SpoolFactory for VecSpools {
    type Spool = Vec<u8>;
    type Hold = std::io::Cursor<Vec<u8>>;
    fn create(&mut self, _: &TableName) -> std::io::Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn hold_file(&mut self) -> std::io::Result<Self::Hold> {
        Ok(std::io::Cursor::new(Vec::new()))
    }
}

fn schema(i: usize) -> Arc<TableSchema> {
    let col = |name: &str, key: bool| ColumnSchema {
        name: name.into(),
        type_name: "text".into(),
        type_oid: 25,
        type_modifier: -1,
        nullable: !key,
        primary_key: key.then_some(1),
        replica_key: key,
        attnum: None,
    };
    TableSchema::new(
        TableName::new("public", format!("t{i}")),
        1000 + i as u32,
        ReplicaIdentity::Default,
        vec![col("id", true), col("v", false)],
    )
}

fn text(s: &str) -> Value {
    Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

fn limits(interval_us: u64, max_rows: u64) -> Limits {
    Limits {
        interval: Duration::from_micros(interval_us),
        max_rows,
        max_bytes: u64::MAX,
    }
}

/// Parses a spool back into (op, position, values) rows, using the NULL rule of the dialect.
fn rows_of(spool: &[u8]) -> Vec<(String, Position, Vec<Option<String>>)> {
    let mut rdr = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(spool);
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            let lsn: Lsn = r[1].parse().unwrap();
            let seq: u32 = r[2].parse().unwrap();
            let vals = r
                .iter()
                .skip(7)
                .map(|v| (v != "\\N").then(|| v.to_string()))
                .collect();
            (r[0].to_string(), Position::new(lsn, seq), vals)
        })
        .collect()
}

#[test]
fn encodes_every_op_with_metadata() {
    let mut b = Batcher::new(
        limits(1_000_000, 100),
        VecSpools,
        Lsn(10),
        HashMap::new(),
        None,
    );
    let mut sealed = Vec::new();
    b.relation(schema(0), &mut sealed).unwrap();
    b.message(
        Message::Begin(Begin {
            final_lsn: Lsn(0x1_0000_0010),
            commit_ts: 0,
            xid: 7,
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Insert(Insert {
            relation_oid: 1000,
            new: Tuple(vec![text("1"), text("a\"b")]),
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Update(Update {
            relation_oid: 1000,
            old: Some(OldTuple {
                kind: OldTupleKind::Key,
                tuple: Tuple(vec![text("1"), Value::Null]),
            }),
            new: Tuple(vec![text("2"), Value::Unchanged]),
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Delete(Delete {
            relation_oid: 1000,
            old: OldTuple {
                kind: OldTupleKind::Key,
                tuple: Tuple(vec![text("2"), Value::Null]),
            },
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Truncate(Truncate {
            cascade: false,
            restart_identity: false,
            relation_oids: vec![1000],
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x1_0000_0010),
            end_lsn: Lsn(0x1_0000_0040),
            commit_ts: 0,
        }),
        &mut sealed,
    )
    .unwrap();
    assert!(b.seal_all(&mut sealed).unwrap());
    assert_eq!(sealed.len(), 1);
    let text = String::from_utf8(sealed[0].batch().spool.clone()).unwrap();
    assert_eq!(
        text,
        "_op,_commit_lsn,_seq,_xid,_commit_ts,_before,_unchanged,id,v\n\
         \"I\",\"1/10\",\"1\",\"7\",\"2000-01-01 00:00:00.000000+00\",\\N,\\N,\"1\",\"a\"\"b\"\n\
         \"U\",\"1/10\",\"2\",\"7\",\"2000-01-01 00:00:00.000000+00\",\"{\"\"id\"\":\"\"1\"\"}\",\"[\"\"v\"\"]\",\"2\",\\N\n\
         \"D\",\"1/10\",\"3\",\"7\",\"2000-01-01 00:00:00.000000+00\",\"{\"\"id\"\":\"\"2\"\"}\",\\N,\"2\",\\N\n\
         \"T\",\"1/10\",\"4\",\"7\",\"2000-01-01 00:00:00.000000+00\",\\N,\\N,\\N,\\N\n"
    );
    assert_eq!(
        sealed[0].batch().ops,
        OpCounts {
            insert: 1,
            update: 1,
            delete: 1,
            truncate: 1
        }
    );
    assert_eq!(b.confirmed(), Lsn(10), "nothing persisted yet");
    b.persisted(sealed[0].id());
    assert_eq!(b.confirmed(), Lsn(0x1_0000_0040));
}

#[test]
fn schema_change_mid_batch_seals_the_old_shape() {
    let mut b = Batcher::new(
        limits(1_000_000, 100),
        VecSpools,
        Lsn(1),
        HashMap::new(),
        None,
    );
    let mut sealed = Vec::new();
    b.relation(schema(0), &mut sealed).unwrap();
    b.message(
        Message::Begin(Begin {
            final_lsn: Lsn(50),
            commit_ts: 0,
            xid: 1,
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Insert(Insert {
            relation_oid: 1000,
            new: Tuple(vec![text("1"), text("x")]),
        }),
        &mut sealed,
    )
    .unwrap();
    let mut wider = (*schema(0)).clone();
    wider.columns.push(wider.columns[1].clone());
    wider.columns[2].name = "w".into();
    let wider = TableSchema::new(
        wider.table.clone(),
        1000,
        ReplicaIdentity::Default,
        wider.columns.clone(),
    );
    b.relation(wider, &mut sealed).unwrap();
    assert_eq!(
        sealed.len(),
        1,
        "old-shape batch sealed at the Relation message"
    );
    b.message(
        Message::Insert(Insert {
            relation_oid: 1000,
            new: Tuple(vec![text("2"), text("y"), Value::Null]),
        }),
        &mut sealed,
    )
    .unwrap();
    b.message(
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(50),
            end_lsn: Lsn(60),
            commit_ts: 0,
        }),
        &mut sealed,
    )
    .unwrap();
    b.persisted(sealed[0].id());
    assert_eq!(
        b.confirmed(),
        Lsn(1),
        "the second half of the transaction is still open"
    );
    b.seal_all(&mut sealed).unwrap();
    assert_eq!(sealed[1].batch().first, Position::new(Lsn(50), 2));
    b.persisted(sealed[1].id());
    assert_eq!(b.confirmed(), Lsn(60));
}

#[test]
fn malformed_streams_are_definite_errors() {
    let mut b = Batcher::new(
        limits(1_000_000, 100),
        VecSpools,
        Lsn(1),
        HashMap::new(),
        None,
    );
    let mut sealed = Vec::new();
    let e = b
        .message(
            Message::Insert(Insert {
                relation_oid: 1,
                new: Tuple(vec![]),
            }),
            &mut sealed,
        )
        .unwrap_err();
    assert!(
        !e.is_transient() && e.to_string().contains("outside a transaction"),
        "{e}"
    );
    b.message(
        Message::Begin(Begin {
            final_lsn: Lsn(5),
            commit_ts: 0,
            xid: 1,
        }),
        &mut sealed,
    )
    .unwrap();
    let e = b
        .message(
            Message::Insert(Insert {
                relation_oid: 99,
                new: Tuple(vec![]),
            }),
            &mut sealed,
        )
        .unwrap_err();
    assert!(e.to_string().contains("before its Relation"), "{e}");
    b.relation(schema(0), &mut sealed).unwrap();
    let e = b
        .message(
            Message::Insert(Insert {
                relation_oid: 1000,
                new: Tuple(vec![text("1")]),
            }),
            &mut sealed,
        )
        .unwrap_err();
    assert!(e.to_string().contains("carries 1 new values"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Model-based property test.

/// A committed transaction in the simulated WAL: changes as (table, op-kind) pairs.
#[derive(Debug, Clone)]
struct WalTxn {
    commit_lsn: Lsn,
    end_lsn: Lsn,
    changes: Vec<(usize, u8)>,
}

#[derive(Debug, Clone)]
enum Step {
    /// Deliver the next WAL transaction (if any), with a tick before each change when `ticky`.
    Deliver {
        ticky: bool,
    },
    Keepalive,
    Tick(u64),
    /// Persist the in-flight batch at this index (mod len), i.e. out-of-order completion.
    Persist(usize),
    /// Crash: lose open and in-flight work, restart from the slot's confirmed LSN.
    Crash,
    /// Crash right after one in-flight batch committed its registry row, before the batcher heard.
    CrashAfterRegister(usize),
    SealAll,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            6 => any::<bool>().prop_map(|ticky| Step::Deliver { ticky }),
            1 => Just(Step::Keepalive),
            2 => (0u64..40).prop_map(Step::Tick),
            4 => any::<usize>().prop_map(Step::Persist),
            1 => Just(Step::Crash),
            1 => any::<usize>().prop_map(Step::CrashAfterRegister),
            1 => Just(Step::SealAll),
        ],
        1..120,
    )
}

fn wal() -> impl Strategy<Value = Vec<WalTxn>> {
    proptest::collection::vec(proptest::collection::vec((0usize..3, 0u8..4), 0..6), 1..25).prop_map(
        |txns| {
            let mut lsn = 100u64;
            txns.into_iter()
                .map(|changes| {
                    lsn += 10 + changes.len() as u64;
                    let t = WalTxn {
                        commit_lsn: Lsn(lsn),
                        end_lsn: Lsn(lsn + 5),
                        changes,
                    };
                    lsn += 5;
                    t
                })
                .collect()
        },
    )
}

struct Sim {
    wal: Vec<WalTxn>,
    /// Slot state: confirmed flush LSN.
    slot_confirmed: Lsn,
    /// Registry: per table, persisted rows (position) in registry order.
    registry: BTreeMap<usize, Vec<Position>>,
    batcher: Batcher<VecSpools>,
    next_txn: usize,
    in_flight: Vec<Sealed<Vec<u8>>>,
    clock: i64,
    rows_per_batch: u64,
}

impl Sim {
    fn start(&mut self) {
        let skip: HashMap<TableName, Position> = self
            .registry
            .iter()
            .filter_map(|(t, rows)| rows.last().map(|p| (schema(*t).table.clone(), *p)))
            .collect();
        self.batcher = Batcher::new(
            limits(20, self.rows_per_batch),
            VecSpools,
            self.slot_confirmed,
            skip,
            None,
        );
        let mut sealed = Vec::new();
        for t in 0..3 {
            self.batcher.relation(schema(t), &mut sealed).unwrap();
        }
        self.in_flight.clear();
        // PostgreSQL resumes with the first transaction whose commit LSN is >= confirmed.
        self.next_txn = self
            .wal
            .iter()
            .position(|t| t.commit_lsn >= self.slot_confirmed)
            .unwrap_or(self.wal.len());
    }

    fn ack(&mut self) {
        let c = self.batcher.confirmed();
        assert!(c >= self.slot_confirmed, "confirmed LSN moved backwards");
        self.slot_confirmed = c;
        // Invariant 1: no change whose transaction commits below the confirmed LSN is unpersisted.
        for txn in self.wal.iter().filter(|t| t.commit_lsn < c) {
            for (seq, (table, _)) in txn.changes.iter().enumerate() {
                let pos = Position::new(txn.commit_lsn, seq as u32 + 1);
                assert!(
                    self.registry.get(table).is_some_and(|r| r.contains(&pos)),
                    "confirmed {c} passes unpersisted change {pos:?} of t{table}"
                );
            }
        }
    }

    fn deliver(&mut self, ticky: bool, sealed: &mut Vec<Sealed<Vec<u8>>>) {
        let Some(txn) = self.wal.get(self.next_txn).cloned() else {
            return;
        };
        self.next_txn += 1;
        let b = &mut self.batcher;
        b.message(
            Message::Begin(Begin {
                final_lsn: txn.commit_lsn,
                commit_ts: 0,
                xid: 1,
            }),
            sealed,
        )
        .unwrap();
        for (i, (table, kind)) in txn.changes.iter().enumerate() {
            if ticky {
                self.clock += 7;
                b.tick(self.clock, sealed).unwrap();
            }
            let oid = 1000 + *table as u32;
            let row = Tuple(vec![text(&i.to_string()), text("v")]);
            let old = OldTuple {
                kind: OldTupleKind::Key,
                tuple: Tuple(vec![text(&i.to_string()), Value::Null]),
            };
            let msg = match kind {
                0 => Message::Insert(Insert {
                    relation_oid: oid,
                    new: row,
                }),
                1 => Message::Update(Update {
                    relation_oid: oid,
                    old: Some(old),
                    new: row,
                }),
                2 => Message::Delete(Delete {
                    relation_oid: oid,
                    old,
                }),
                _ => Message::Truncate(Truncate {
                    cascade: false,
                    restart_identity: false,
                    relation_oids: vec![oid],
                }),
            };
            b.message(msg, sealed).unwrap();
        }
        b.message(
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: txn.commit_lsn,
                end_lsn: txn.end_lsn,
                commit_ts: 0,
            }),
            sealed,
        )
        .unwrap();
    }

    fn persist(&mut self, i: usize) {
        if self.in_flight.is_empty() {
            return;
        }
        // Per table, the writer registers in seal order; across tables any order may complete first.
        let pick = self.in_flight[i % self.in_flight.len()].batch();
        let table = &pick.schema.table;
        let idx = self
            .in_flight
            .iter()
            .position(|b| &b.batch().schema.table == table)
            .unwrap();
        let Sealed::Batch(b) = self.in_flight.remove(idx) else {
            unreachable!("this workload has no DDL")
        };
        let t: usize = b.schema.table.name[1..].parse().unwrap();
        let rows = rows_of(&b.spool);
        assert_eq!(rows.len() as u64, b.rows);
        let reg = self.registry.entry(t).or_default();
        for (_, pos, _) in rows {
            assert!(
                reg.last().is_none_or(|last| *last < pos),
                "registry order broken for t{t}: {pos:?} after {:?}",
                reg.last()
            );
            reg.push(pos);
        }
        self.batcher.persisted(b.id);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// For random streams, clocks, seal points, persistence orders and crashes: the confirmed LSN never
    /// passes an unpersisted change, never moves back, and after draining every change is registered
    /// exactly once, in position order per table.
    #[test]
    fn ack_never_passes_an_unpersisted_change(wal in wal(), steps in steps(), rows_per_batch in 1u64..6) {
        let mut sim = Sim {
            wal,
            slot_confirmed: Lsn(100),
            registry: BTreeMap::new(),
            batcher: Batcher::new(limits(20, 1), VecSpools, Lsn(100), HashMap::new(), None),
            next_txn: 0,
            in_flight: Vec::new(),
            clock: 0,
            rows_per_batch,
        };
        sim.start();
        let mut sealed = Vec::new();
        for step in steps {
            match step {
                Step::Deliver { ticky } => sim.deliver(ticky, &mut sealed),
                Step::Keepalive => {
                    // The server has sent everything up to the last delivered transaction's end.
                    let end = sim.next_txn.checked_sub(1).map(|i| sim.wal[i].end_lsn).unwrap_or(Lsn(100));
                    sim.batcher.keepalive(end);
                }
                Step::Tick(d) => { sim.clock += d as i64; sim.batcher.tick(sim.clock, &mut sealed).unwrap(); }
                Step::Persist(i) => sim.persist(i),
                Step::Crash => { sealed.clear(); sim.start(); }
                Step::CrashAfterRegister(i) => {
                    sim.in_flight.append(&mut sealed);
                    sim.persist(i);
                    sim.start();
                }
                Step::SealAll => { sim.batcher.seal_all(&mut sealed).unwrap(); }
            }
            sim.in_flight.append(&mut sealed);
            sim.ack();
        }
        // Drain: deliver everything, seal, persist, and check the final registry.
        while sim.next_txn < sim.wal.len() { sim.deliver(false, &mut sealed); sim.in_flight.append(&mut sealed); sim.ack(); }
        sim.batcher.seal_all(&mut sealed).unwrap();
        sim.in_flight.append(&mut sealed);
        while !sim.in_flight.is_empty() { sim.persist(0); sim.ack(); }
        let mut expected: BTreeMap<usize, Vec<Position>> = BTreeMap::new();
        for txn in &sim.wal {
            for (seq, (table, _)) in txn.changes.iter().enumerate() {
                expected.entry(*table).or_default().push(Position::new(txn.commit_lsn, seq as u32 + 1));
            }
        }
        prop_assert_eq!(&sim.registry, &expected);
        let all: BTreeSet<Lsn> = sim.wal.iter().map(|t| t.end_lsn).collect();
        prop_assert_eq!(sim.batcher.confirmed(), *all.iter().last().unwrap());
    }
}

/// A hold parks rows and pins the ack; releasing at a cut drops nothing and splits the table's
/// batches exactly at the cut (rows below it in their own batch).
/// A batcher that knows table 0 and seals only when told.
fn one_table_batcher() -> Batcher<VecSpools> {
    let mut b = Batcher::new(
        limits(1_000_000_000, 1_000),
        VecSpools,
        Lsn(1),
        HashMap::new(),
        None,
    );
    b.relation(schema(0), &mut Vec::new()).unwrap();
    b
}

/// The commit of the transaction at `lsn` (its end 5 bytes later).
fn commit_txn(b: &mut Batcher<VecSpools>, lsn: u64, sealed: &mut Vec<Sealed<Vec<u8>>>) {
    b.message(
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 5),
            commit_ts: 0,
        }),
        sealed,
    )
    .unwrap();
}

/// One transaction committing at `lsn` that inserts the row `id` into table 0.
fn insert_txn(b: &mut Batcher<VecSpools>, lsn: u64, id: &str, sealed: &mut Vec<Sealed<Vec<u8>>>) {
    b.message(
        Message::Begin(Begin {
            final_lsn: Lsn(lsn),
            commit_ts: 0,
            xid: lsn as u32,
        }),
        sealed,
    )
    .unwrap();
    b.message(
        Message::Insert(Insert {
            relation_oid: 1000,
            new: Tuple(vec![text(id), text("v")]),
        }),
        sealed,
    )
    .unwrap();
    commit_txn(b, lsn, sealed);
}

/// With transaction events, each transaction's change events sit between its begin and its commit
/// (with the count), also for a table held for a reload's cut: its events leave when the row is
/// parked, in its transaction, and the release adds none. The ack waits for the units.
#[test]
fn txn_events_bracket_changes_also_of_held_tables() {
    let mut b = one_table_batcher();
    b.enable_change_events();
    b.enable_txn_events();
    let mut sealed = Vec::new();
    insert_txn(&mut b, 10, "1", &mut sealed);
    b.begin_hold(&schema(0).table, &mut sealed).unwrap();
    insert_txn(&mut b, 20, "2", &mut sealed);
    b.release_hold(&schema(0).table, Lsn(22), &mut sealed)
        .unwrap();
    b.seal_all(&mut sealed).unwrap();
    let mut events = Vec::new();
    b.drain_change_events(&mut events);
    let mut shape = Vec::new();
    let mut units = Vec::new();
    for e in &events {
        shape.push(match e {
            EventOut::Txn(t) if !t.commit => format!("begin {}", t.commit_lsn.0),
            EventOut::Txn(t) => format!("commit {} changes {}", t.commit_lsn.0, t.changes),
            EventOut::Change(c) => format!("change {}.{}", c.position.commit_lsn.0, c.position.seq),
            EventOut::Close(u) => {
                units.push(*u);
                "close".to_string()
            }
        });
    }
    assert_eq!(
        shape,
        [
            "begin 10",
            "change 10.1",
            "commit 10 changes 1",
            "close",
            "begin 20",
            "change 20.1",
            "commit 20 changes 1",
            "close",
        ],
        "{events:?}"
    );
    for s in &sealed {
        b.persisted(s.id());
    }
    assert!(b.confirmed() <= Lsn(10), "both units are open");
    b.persisted(units[1]);
    assert!(b.confirmed() <= Lsn(10), "the first unit is open");
    b.persisted(units[0]);
    assert_eq!(b.confirmed(), Lsn(25), "everything persisted");
}

#[test]
fn release_splits_at_the_cut_and_drops_nothing() {
    let mut b = one_table_batcher();
    let mut sealed = Vec::new();
    let txn = insert_txn;
    txn(&mut b, 10, "1", &mut sealed);
    b.begin_hold(&schema(0).table, &mut sealed).unwrap();
    assert_eq!(
        sealed.len(),
        1,
        "the batch before the marker is sealed at the marker"
    );
    txn(&mut b, 20, "2", &mut sealed);
    txn(&mut b, 30, "3", &mut sealed);
    b.persisted(sealed[0].id());
    assert_eq!(
        b.confirmed(),
        Lsn(15),
        "the hold pins the ack below the parked rows"
    );
    // The cut falls between the two parked transactions; a third arrives after the release but
    // below the cut (the stream lagged behind the cut), a fourth above it.
    b.release_hold(&schema(0).table, Lsn(32), &mut sealed)
        .unwrap();
    txn(&mut b, 31, "4", &mut sealed);
    txn(&mut b, 40, "5", &mut sealed);
    assert_eq!(
        sealed.len(),
        2,
        "the first row at or after the cut seals the pre-cut batch"
    );
    b.seal_all(&mut sealed).unwrap();
    let ids = |s: &Sealed<Vec<u8>>| {
        let s = s.batch();
        rows_of(&s.spool)
            .into_iter()
            .map(|r| r.2[0].clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&sealed[1]),
        vec!["2", "3", "4"],
        "rows below the cut: kept, in their own batch"
    );
    assert_eq!(ids(&sealed[2]), vec!["5"]);
    assert!(
        sealed[1].batch().last.commit_lsn < Lsn(32)
            && sealed[2].batch().first.commit_lsn >= Lsn(32)
    );
    for s in &sealed[1..] {
        b.persisted(s.id());
    }
    assert_eq!(b.confirmed(), Lsn(45));
}

#[test]
fn markers_become_controls_and_malformed_or_foreign_ones_are_not_acted_on() {
    let mut b = one_table_batcher();
    let mut sealed = Vec::new();
    let marker = |b: &mut Batcher<VecSpools>, lsn: u64, content: &str, sealed: &mut Vec<_>| {
        let begin = Message::Begin(Begin {
            final_lsn: Lsn(lsn),
            commit_ts: 0,
            xid: 1,
        });
        b.message(begin, sealed).unwrap();
        let msg = Message::Message(crate::core::decode::LogicalMessage {
            transactional: true,
            lsn: Lsn(lsn - 1),
            prefix: "cdc_egress:cdc_egress".into(),
            content: bytes::Bytes::copy_from_slice(content.as_bytes()),
        });
        b.message(msg, sealed).unwrap();
        let commit = Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 5),
            commit_ts: 0,
        });
        b.message(commit, sealed).unwrap();
    };
    marker(&mut b, 10, "{not json", &mut sealed);
    let mut controls = Vec::new();
    b.drain_controls(&mut controls);
    assert!(
        matches!(&controls[..], [Control::MalformedMarker { commit_lsn, .. }] if *commit_lsn == Lsn(10)),
        "{controls:?}"
    );
    assert_eq!(b.confirmed(), Lsn(15), "a malformed marker holds nothing");

    let start = r#"{"kind":"reload_start","schema":"public","table":"t0","request":"r1"}"#;
    marker(&mut b, 20, start, &mut sealed);
    controls.clear();
    b.drain_controls(&mut controls);
    assert_eq!(
        controls,
        vec![Control::ReloadStart {
            table: schema(0).table.clone(),
            request: "r1".into(),
            marker_commit_lsn: Lsn(20),
        }]
    );

    // Several daemons share the marker prefix when they share a registry schema: a marker that
    // names another source is not ours; one that names ours, or none, is.
    b.set_marker_source("main");
    let named = |request: &str, source: &str| {
        format!(
            r#"{{"kind":"reload_start","schema":"public","table":"t0","request":"{request}","source":"{source}"}}"#
        )
    };
    marker(&mut b, 30, &named("r2", "other"), &mut sealed);
    controls.clear();
    b.drain_controls(&mut controls);
    assert!(controls.is_empty(), "another source's marker: {controls:?}");
    marker(&mut b, 40, &named("r3", "main"), &mut sealed);
    let unnamed =
        r#"{"kind":"reload_start","schema":"public","table":"t0","request":"r4","source":null}"#;
    marker(&mut b, 50, unnamed, &mut sealed);
    controls.clear();
    b.drain_controls(&mut controls);
    let requests: Vec<_> = controls
        .iter()
        .map(|c| match c {
            Control::ReloadStart { request, .. } => request.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(requests, ["r3", "r4"]);
}

/// A DDL message as the capture trigger writes it, for table `t0`.
fn ddl_json(event: &str, publications: &[&str], rewrites: bool, previous: Option<&str>) -> String {
    let prev = previous.map_or("null".to_string(), |p| format!("{p:?}"));
    format!(
        r#"{{"kind":"ddl","event":"{event}","command_tag":"ALTER TABLE",
            "relation_oid":1000,"schema":"public","table":"t0","previous_schema":{ps},"previous_table":{prev},
            "publications":{pubs:?},"previous_publications":{pubs:?},
            "columns_before":[{{"name":"id","attnum":1,"type":"text","not_null":true}}],
            "columns":[{{"name":"id","attnum":1,"type":"text","not_null":true}},
                       {{"name":"d","attnum":3,"type":"integer","not_null":true,"default":"7","filled":true}}],
            "rewrites_rows":{rewrites},"reason":null}}"#,
        ps = if previous.is_some() {
            "\"public\""
        } else {
            "null"
        },
        pubs = publications,
    )
}

/// Feeds one transaction: an insert of `before` rows of t0, the DDL message, `after` more rows.
fn txn_with_ddl(
    b: &mut Batcher<VecSpools>,
    lsn: u64,
    ddl: &str,
    (before, after): (usize, usize),
    sealed: &mut Vec<Sealed<Vec<u8>>>,
) {
    let insert = |b: &mut Batcher<VecSpools>, id: String, sealed: &mut Vec<Sealed<Vec<u8>>>| {
        b.message(
            Message::Insert(Insert {
                relation_oid: 1000,
                new: Tuple(vec![text(&id), text("v")]),
            }),
            sealed,
        )
        .unwrap();
    };
    b.message(
        Message::Begin(Begin {
            final_lsn: Lsn(lsn),
            commit_ts: 0,
            xid: 9,
        }),
        sealed,
    )
    .unwrap();
    for i in 0..before {
        insert(b, format!("b{i}"), sealed);
    }
    b.message(
        Message::Message(crate::core::decode::LogicalMessage {
            transactional: true,
            lsn: Lsn(lsn - 1),
            prefix: "cdc_egress:cdc_egress".into(),
            content: bytes::Bytes::copy_from_slice(ddl.as_bytes()),
        }),
        sealed,
    )
    .unwrap();
    for i in 0..after {
        insert(b, format!("a{i}"), sealed);
    }
    commit_txn(b, lsn, sealed);
}

#[test]
fn a_ddl_record_sits_between_the_rows_before_and_after_it_and_holds_the_ack() {
    let mut b = one_table_batcher();
    b.set_ddl_scope("pub", RewritePolicy::Reload);
    let mut sealed = Vec::new();
    txn_with_ddl(
        &mut b,
        100,
        &ddl_json("alter", &["pub"], false, None),
        (2, 1),
        &mut sealed,
    );
    // The open batch (2 rows) is sealed at the DDL, then the record follows; the row after it is
    // in a new open batch.
    assert_eq!(sealed.len(), 2, "{sealed:?}");
    let rows: Vec<Position> = rows_of(&sealed[0].batch().spool)
        .into_iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(
        rows,
        [Position::new(Lsn(100), 1), Position::new(Lsn(100), 2)]
    );
    let Sealed::Ddl(rec) = &sealed[1] else {
        panic!("{:?}", sealed[1])
    };
    assert_eq!(
        rec.position,
        Position::new(Lsn(100), 3),
        "the record takes the next seq"
    );
    assert_eq!(rec.table, schema(0).table);
    assert_eq!(rec.reload_request, None);
    assert_eq!(rec.mode_after, None);
    b.seal_all(&mut sealed).unwrap();
    let after: Vec<Position> = rows_of(&sealed[2].batch().spool)
        .into_iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(after, [Position::new(Lsn(100), 4)]);
    // Every item holds the ack until persisted, the record included.
    b.persisted(sealed[0].id());
    b.persisted(sealed[2].id());
    assert!(
        b.confirmed() < Lsn(105),
        "an unpersisted DDL record holds the ack"
    );
    b.persisted(sealed[1].id());
    assert_eq!(b.confirmed(), Lsn(105));
}

#[test]
fn ddl_of_another_publication_is_not_recorded_but_keeps_positions_stable() {
    let mut b = one_table_batcher();
    b.set_ddl_scope("pub", RewritePolicy::Reload);
    let mut sealed = Vec::new();
    txn_with_ddl(
        &mut b,
        100,
        &ddl_json("alter", &["other"], true, None),
        (1, 1),
        &mut sealed,
    );
    b.seal_all(&mut sealed).unwrap();
    assert_eq!(sealed.len(), 1, "one batch, no record: {sealed:?}");
    let rows: Vec<Position> = rows_of(&sealed[0].batch().spool)
        .into_iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(
        rows,
        [Position::new(Lsn(100), 1), Position::new(Lsn(100), 3)],
        "the message takes its seq whoever it concerns, so positions do not depend on the configuration"
    );
    let mut controls = Vec::new();
    b.drain_controls(&mut controls);
    assert!(controls.is_empty(), "{controls:?}");
}

#[test]
fn a_rewriting_ddl_starts_a_reload_at_its_position_unless_the_policy_records_only() {
    for (policy, reload) in [
        (RewritePolicy::Reload, true),
        (RewritePolicy::Record, false),
    ] {
        let mut b = one_table_batcher();
        b.set_ddl_scope("pub", policy);
        let mut sealed = Vec::new();
        txn_with_ddl(
            &mut b,
            100,
            &ddl_json("alter", &["pub"], true, None),
            (1, 1),
            &mut sealed,
        );
        let Sealed::Ddl(rec) = &sealed[1] else {
            panic!("{:?}", sealed[1])
        };
        let mut controls = Vec::new();
        b.drain_controls(&mut controls);
        if reload {
            let request = "ddl:0/64:2".to_string();
            assert_eq!(rec.reload_request.as_deref(), Some(request.as_str()));
            assert_eq!(
                controls,
                vec![Control::ReloadStart {
                    table: schema(0).table.clone(),
                    request,
                    marker_commit_lsn: Lsn(100),
                }]
            );
            // The row after the DDL is parked by the hold, not in an open batch.
            assert_eq!(b.open_batches(), 0);
        } else {
            assert_eq!(rec.reload_request, None);
            assert!(controls.is_empty(), "{controls:?}");
            assert!(
                rec.change.rewrites_rows,
                "the record still says what diverged"
            );
            assert_eq!(b.open_batches(), 1);
        }
    }
}

#[test]
fn a_rename_is_filed_under_both_names_and_the_old_one_ends() {
    let mut b = one_table_batcher();
    b.set_ddl_scope("pub", RewritePolicy::Reload);
    let mut sealed = Vec::new();
    // `t0` is the new name here; the old one is `t_old`.
    txn_with_ddl(
        &mut b,
        100,
        &ddl_json("rename", &["pub"], false, Some("t_old")),
        (0, 0),
        &mut sealed,
    );
    let recs: Vec<(String, Option<&str>)> = sealed
        .iter()
        .map(|s| match s {
            Sealed::Ddl(d) => (d.table.dotted(), d.mode_after),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        recs,
        [
            ("public.t_old".to_string(), Some("renamed")),
            ("public.t0".to_string(), Some("streaming"))
        ]
    );
}

#[test]
fn a_newer_ddl_record_stops_the_batcher_and_junk_is_skipped() {
    let mut b = one_table_batcher();
    let mut sealed = Vec::new();
    // Junk under our prefix (any role may emit a logical message): reported, skipped.
    txn_with_ddl(
        &mut b,
        100,
        r#"{"kind":"ddl","event":"explode"}"#,
        (1, 0),
        &mut sealed,
    );
    let mut controls = Vec::new();
    b.drain_controls(&mut controls);
    assert!(
        matches!(&controls[..], [Control::MalformedMarker { error, .. }] if error.contains("not written by cdc-egress")),
        "{controls:?}"
    );
    assert_eq!(b.open_batches(), 1, "nothing sealed");
    // A record of a newer format: a change this version cannot represent stops it.
    b.message(
        Message::Begin(Begin {
            final_lsn: Lsn(200),
            commit_ts: 0,
            xid: 9,
        }),
        &mut sealed,
    )
    .unwrap();
    let newer = ddl_json("alter", &["pub"], false, None).replacen(
        r#""kind":"ddl","#,
        r#""kind":"ddl","format":2,"#,
        1,
    );
    let err = b
        .message(
            Message::Message(crate::core::decode::LogicalMessage {
                transactional: true,
                lsn: Lsn(199),
                prefix: "cdc_egress:cdc_egress".into(),
                content: bytes::Bytes::from(newer),
            }),
            &mut sealed,
        )
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("DDL record at 0/C8"), "{err}");
    assert!(sealed.is_empty());
    assert!(
        b.confirmed() < Lsn(200),
        "nothing at or after it is acknowledged"
    );
}

#[test]
fn a_rename_of_a_held_table_waits_under_both_names_with_the_parked_rows() {
    let mut b = one_table_batcher();
    b.set_ddl_scope("pub", RewritePolicy::Record);
    let mut sealed = Vec::new();
    // t_old is held (its reload takes its cut); `t0` is the new name.
    let old = TableName::new("public", "t_old");
    b.begin_hold(&old, &mut sealed).unwrap();
    txn_with_ddl(
        &mut b,
        100,
        &ddl_json("rename", &["pub"], false, Some("t_old")),
        (0, 0),
        &mut sealed,
    );
    assert!(sealed.is_empty(), "both records wait: {sealed:?}");
    b.release_hold(&old, Lsn::ZERO, &mut sealed).unwrap();
    let names: Vec<String> = sealed
        .iter()
        .filter_map(|s| match s {
            Sealed::Ddl(d) => Some(d.table.dotted()),
            Sealed::Batch(_) => None,
        })
        .collect();
    assert_eq!(names, ["public.t_old", "public.t0"]);
}

#[test]
fn a_ddl_record_of_a_held_table_leaves_among_the_parked_rows_in_position_order() {
    let mut b = one_table_batcher();
    b.set_ddl_scope("pub", RewritePolicy::Record);
    let mut sealed = Vec::new();
    b.begin_hold(&schema(0).table, &mut sealed).unwrap();
    txn_with_ddl(
        &mut b,
        100,
        &ddl_json("alter", &["pub"], false, None),
        (1, 1),
        &mut sealed,
    );
    assert!(
        sealed.is_empty(),
        "everything waits for the release: {sealed:?}"
    );
    b.release_hold(&schema(0).table, Lsn::ZERO, &mut sealed)
        .unwrap();
    b.seal_all(&mut sealed).unwrap();
    let order: Vec<String> = sealed
        .iter()
        .map(|s| match s {
            Sealed::Batch(b) => format!(
                "rows {:?}",
                rows_of(&b.spool)
                    .into_iter()
                    .map(|r| r.1.seq)
                    .collect::<Vec<_>>()
            ),
            Sealed::Ddl(d) => format!("ddl {}", d.position.seq),
        })
        .collect();
    assert_eq!(order, ["rows [1]", "ddl 2", "rows [3]"]);
    for s in &sealed {
        b.persisted(s.id());
    }
    assert_eq!(b.confirmed(), Lsn(105));
}

#[test]
fn a_ddl_record_gives_the_known_schema_its_attnums() {
    let mut b = one_table_batcher();
    b.set_ddl_scope("pub", RewritePolicy::Record);
    let mut sealed = Vec::new();
    // `schema(0)` has no attnums; the record lists id@1 (and d@3, which the relation lacks).
    txn_with_ddl(
        &mut b,
        100,
        &ddl_json("alter", &["pub"], false, None),
        (0, 1),
        &mut sealed,
    );
    b.seal_all(&mut sealed).unwrap();
    let Some(Sealed::Batch(batch)) = sealed.last() else {
        panic!("{sealed:?}")
    };
    let attnums: Vec<(String, Option<i16>)> = batch
        .schema
        .columns
        .iter()
        .map(|c| (c.name.clone(), c.attnum))
        .collect();
    assert_eq!(
        attnums,
        [("id".to_string(), Some(1)), ("v".to_string(), None)],
        "matched by name; a name the record does not list keeps its own"
    );
    assert_eq!(batch.schema.fingerprint(), schema(0).fingerprint());
}

#[test]
fn quoted_u32_is_the_decimal_text_in_quotes() {
    for n in [0u32, 1, 9, 10, 99, 100, 12345, 4_294_967_295] {
        let mut out = b"x".to_vec();
        super::push_quoted_u32(&mut out, n);
        assert_eq!(out, format!("x\"{n}\"").into_bytes());
    }
}

/// A long hold replay calls the driver back every `slice_rows` rows (so it can answer the server),
/// and an error from that call ends the replay with that error.
#[test]
fn a_hold_replay_calls_back_between_slices_and_stops_on_its_error() {
    let replay = |fail_at: Option<u32>| {
        let mut b = one_table_batcher();
        let mut sealed = Vec::new();
        b.begin_hold(&schema(0).table, &mut sealed).unwrap();
        for i in 0..10u64 {
            insert_txn(&mut b, 10 + 10 * i, &i.to_string(), &mut sealed);
        }
        let mut calls = 0u32;
        let result =
            b.release_hold_answering(&schema(0).table, Lsn::ZERO, &mut sealed, 3, &mut || {
                calls += 1;
                if Some(calls) == fail_at {
                    return Err(Error::transient(Component::Source, "link down"));
                }
                Ok(())
            });
        (result, calls)
    };
    let (released, calls) = replay(None);
    assert_eq!(released.unwrap(), 10);
    assert_eq!(calls, 3, "after rows 3, 6 and 9");
    let (failed, calls) = replay(Some(2));
    assert!(failed.unwrap_err().message().contains("link down"));
    assert_eq!(calls, 2, "the replay stops at the failing call");
}
