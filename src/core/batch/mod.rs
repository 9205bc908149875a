//! Per-table micro-batches: the pure state machine between the decoder and the writer.
//!
//! The [`Batcher`] is fed decoded pgoutput messages, keepalive positions and clock ticks, in stream
//! order, by one thread. It encodes every row change into the CSV dialect and streams it into the open
//! batch of its table through a [`SpoolFactory`] (a gzip spool file in production, a `Vec` in tests):
//! it never holds a batch in memory. It decides when a batch is sealed and hands sealed batches out; the
//! driver reports back when each one is persisted, and [`Batcher::confirmed`] says which LSN may be
//! acknowledged. It does no IO of its own and reads no clock.
//!
//! # Positions
//! A change's position is `(commit LSN of its transaction, seq)`, `seq` counting the changes of the
//! transaction from 1 across all tables (the `_seq` column). Positions are unique and their order is
//! the replay order.
//!
//! # Invariants
//! 1. A batch holds the changes of one table under one schema fingerprint, in position order.
//! 2. A batch is sealed only between transactions (commit, tick outside a transaction, shutdown), with
//!    one exception: a Relation message that changes the column list in the middle of a transaction
//!    that already wrote rows of that table seals the old-shape batch at that point. Both halves are
//!    correct for replay because positions, not transactions, order the files.
//! 3. Consecutive batches of a table cover increasing, non-overlapping position ranges, so the last
//!    registered position of a table (the *skip position*, loaded from the registry at start) tells
//!    exactly which re-sent changes are already persisted. Changes at or below it are dropped; this is
//!    what makes the replay after a crash exactly-once (ARCHITECTURE.md, invariant 2).
//! 4. The acknowledgement rule lives in [`crate::core::ack`]; every open batch is registered there with its
//!    floor before its first row is written.
//! 5. A DDL record ([`crate::core::ddl`]) takes the next `seq` of its transaction, whatever table it
//!    concerns (so positions do not depend on configuration), seals its table's open batch first and
//!    leaves in [`Sealed`] order after it, so one file has one schema and the registry lists the
//!    record between the batches before and after it; a record of a held table waits with the parked
//!    rows and leaves among them in position order at the release. Records are not skipped on
//!    replay: their names
//!    and contents derive from their position, and registering one is idempotent.
//!
//! Sealing policy: a batch is sealed at the first transaction boundary after its *deadline* (the first
//! multiple of `interval` since the Unix epoch after it opened, so seals are wall-clock aligned), or
//! when it reaches `max_rows` or `max_bytes` (uncompressed CSV bytes) at a commit.

use std::collections::HashMap;

/// Maps looked up once or more per change: a cheap non-cryptographic hasher (keys are our own).
type FastMap<K, V> = rustc_hash::FxHashMap<K, V>;
use std::io::{Read, Seek, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::core::ack::{AckTracker, BatchId};
use crate::core::ddl::{self, DdlChange, RewritePolicy};
use crate::core::decode::{self, Message, OldTuple, OldTupleKind, Tuple, Value};
use crate::core::encode::csv::{push_header, push_value, METADATA_COLUMNS};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::table::{TableName, TableSchema};

/// `(commit LSN, seq)`: a change's place in replay order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl Position {
    pub fn new(commit_lsn: Lsn, seq: u32) -> Self {
        Position { commit_lsn, seq }
    }
}

/// Change kind, as written in `_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
            Op::Truncate => "T",
        }
    }
    pub fn word(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// Limits that decide when a batch is sealed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub interval: Duration,
    pub max_rows: u64,
    pub max_bytes: u64,
}

/// Where the batcher's bytes go: the batches it builds and the rows it parks during a reload hold.
/// The batcher itself never opens a file; production spools gzip into files of the spool directory
/// (`sink::spool::GzipSpools`), the tests into memory.
pub trait SpoolFactory {
    type Spool: Write;
    /// Scratch space for a table's parked rows: written once in order, then read back once from
    /// the start (see [`Batcher::begin_hold`]).
    type Hold: Read + Write + Seek;
    fn create(&mut self, table: &TableName) -> std::io::Result<Self::Spool>;
    fn hold_file(&mut self) -> std::io::Result<Self::Hold>;
}

/// An in-band control message found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A reload of `table` was requested by the transaction committed at `marker_commit_lsn`; the
    /// table is held from this point until [`Batcher::release_hold`].
    ReloadStart {
        table: TableName,
        request: String,
        marker_commit_lsn: Lsn,
    },
    /// A logical message with our marker prefix that does not parse: ignored (the driver logs it).
    MalformedMarker { commit_lsn: Lsn, error: String },
}

#[derive(serde::Deserialize)]
struct Marker {
    kind: String,
    schema: String,
    table: String,
    #[serde(default)]
    request: String,
    /// The `source.name` the request is for; `None` (a hand-written marker) is for every source.
    #[serde(default)]
    source: Option<String>,
}

pub mod event_groups;
mod hold;
use hold::Hold;

/// Row counts by operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpCounts {
    pub insert: u64,
    pub update: u64,
    pub delete: u64,
    pub truncate: u64,
}

impl OpCounts {
    fn add(&mut self, op: Op) {
        match op {
            Op::Insert => self.insert += 1,
            Op::Update => self.update += 1,
            Op::Delete => self.delete += 1,
            Op::Truncate => self.truncate += 1,
        }
    }
}

/// What a sealed batch is: everything the writer, registry and notice need, plus its spool.
#[derive(Debug)]
pub struct SealedBatch<S> {
    pub id: BatchId,
    pub schema: Arc<TableSchema>,
    pub first: Position,
    pub last: Position,
    /// Commit timestamps (PostgreSQL epoch µs) of the first and last transactions.
    pub first_commit_ts: i64,
    pub last_commit_ts: i64,
    pub rows: u64,
    /// Uncompressed CSV bytes of the rows (header excluded).
    pub csv_bytes: u64,
    pub ops: OpCounts,
    pub spool: S,
}

/// Output of optional per-change event publishing, in stream order. The changes of one transaction
/// form one *unit*, tracked by the ack like a batch: it is opened (with the transaction's floor) at its
/// first change and closed at the commit; the driver reports it persisted once every event of the unit
/// has its PubAck.
#[derive(Debug, Clone)]
pub enum EventOut {
    Change(ChangeEvent),
    /// With transaction events: the begin before a transaction's first change event, the commit
    /// after its last (in the same unit, so the ack waits for both).
    Txn(TxnBoundary),
    Close(BatchId),
}

/// A transaction boundary event. Transactions without change events (only unpublished tables, or
/// only DDL) get none. `changes` is the number of change events between begin and commit (0 on the
/// begin): every change of the transaction, also of a table held for a reload's cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnBoundary {
    /// false: begin; true: commit.
    pub commit: bool,
    pub xid: u32,
    pub commit_lsn: Lsn,
    /// Commit timestamp, PostgreSQL epoch µs.
    pub commit_ts: i64,
    pub changes: u32,
}

impl<S> SealedBatch<S> {
    /// The same batch with its spool transformed (e.g. a finished gzip spool into a spooled file).
    pub fn map_spool<T, E>(self, f: impl FnOnce(S) -> Result<T, E>) -> Result<SealedBatch<T>, E> {
        Ok(SealedBatch {
            id: self.id,
            schema: self.schema,
            first: self.first,
            last: self.last,
            first_commit_ts: self.first_commit_ts,
            last_commit_ts: self.last_commit_ts,
            rows: self.rows,
            csv_bytes: self.csv_bytes,
            ops: self.ops,
            spool: f(self.spool)?,
        })
    }
}

/// What the batcher hands out, in the order it is to be persisted: sealed batches and DDL records.
#[derive(Debug)]
pub enum Sealed<S> {
    Batch(SealedBatch<S>),
    Ddl(DdlRecord),
}

impl<S> Sealed<S> {
    /// The ack entry that persisting this item closes.
    pub fn id(&self) -> BatchId {
        match self {
            Sealed::Batch(b) => b.id,
            Sealed::Ddl(d) => d.id,
        }
    }

    /// The same item with a batch's spool transformed (DDL records carry none).
    pub fn map_spool<T, E>(self, f: impl FnOnce(S) -> Result<T, E>) -> Result<Sealed<T>, E> {
        Ok(match self {
            Sealed::Batch(b) => Sealed::Batch(b.map_spool(f)?),
            Sealed::Ddl(d) => Sealed::Ddl(d),
        })
    }
}

/// A DDL record to persist: its `ddl.yml`, registry rows and notice, filed under `table` (a rename
/// is filed twice: under the old name, which ends there, and the new one, which starts there).
/// Tracked by the ack like a batch (`id`), so the confirmed LSN cannot pass an unpersisted record.
#[derive(Debug, Clone)]
pub struct DdlRecord {
    pub id: BatchId,
    pub table: TableName,
    pub position: Position,
    pub xid: u32,
    /// Commit timestamp, PostgreSQL epoch µs.
    pub commit_ts: i64,
    pub change: Arc<DdlChange>,
    /// The request id of the reload this change started, if any.
    pub reload_request: Option<String>,
    /// The table's mode in the registry after this record (`tables.mode`), when it changes:
    /// `dropped`, `renamed` (the old name of a rename), `unpublished` (no longer in this daemon's
    /// publication), or `streaming` again (created, published, the new name of a rename).
    pub mode_after: Option<&'static str>,
}

/// One change as seen by optional per-change event publishing.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub unit: BatchId,
    pub table: TableName,
    pub op: Op,
    pub position: Position,
    pub xid: u32,
    pub commit_ts: i64,
    /// The CSV row exactly as written to the batch (metadata + table columns).
    pub csv_row: bytes::Bytes,
}

struct OpenBatch<S> {
    id: BatchId,
    schema: Arc<TableSchema>,
    first: Position,
    last: Position,
    first_commit_ts: i64,
    last_commit_ts: i64,
    rows: u64,
    csv_bytes: u64,
    ops: OpCounts,
    deadline_us: i64,
    spool: S,
}

struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    seq: u32,
    /// `_commit_lsn`, `_xid`, `_commit_ts` as CSV text, rendered once per transaction.
    lsn_text: String,
    xid_text: String,
    ts_text: String,
    /// The change-event unit of this transaction, once it has an event.
    event_unit: Option<BatchId>,
    /// Change events of this transaction so far.
    events: u32,
}

impl Txn {
    /// The begin (`commit` false, no changes yet) or commit event of this transaction.
    fn boundary(&self, commit: bool) -> TxnBoundary {
        TxnBoundary {
            commit,
            xid: self.xid,
            commit_lsn: self.commit_lsn,
            commit_ts: self.commit_ts,
            changes: self.events,
        }
    }
}

/// The batch state machine. See the module documentation for its invariants.
pub struct Batcher<F: SpoolFactory> {
    limits: Limits,
    factory: F,
    relations: FastMap<u32, Arc<TableSchema>>,
    open: FastMap<TableName, OpenBatch<F::Spool>>,
    skip_through: FastMap<TableName, Position>,
    excluded_schema: Option<String>,
    txn: Option<Txn>,
    acks: AckTracker,
    next_id: u64,
    now_us: i64,
    scratch: Vec<u8>,
    change_events: Option<Vec<EventOut>>,
    /// Bracket each transaction's change events with [`TxnBoundary`] events.
    txn_events: bool,
    holds: FastMap<TableName, Hold<F::Hold>>,
    /// DDL records of held tables, in position order: they leave with the parked rows, in position
    /// order among them, when the hold is released (so the registry keeps a table's order).
    deferred_ddl: FastMap<TableName, Vec<DdlRecord>>,
    /// Per relation OID, the columns (name, attnum) of its last DDL record.
    ddl_attnums: FastMap<u32, Arc<[(String, i16)]>>,
    /// Reload cuts not yet passed by the stream: the table's open batch holds only rows below the
    /// cut, and the first row at or after it seals that batch first (so no batch straddles a cut).
    cuts: FastMap<TableName, Lsn>,
    controls: Vec<Control>,
    marker_prefix: String,
    /// This daemon's `source.name`; `None` takes every marker.
    marker_source: Option<String>,
    /// This daemon's publication; `None` takes every DDL record.
    publication: Option<String>,
    rewrite_policy: RewritePolicy,
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::definite(Component::Decode, msg)
}

/// `2026-11-21 05:52:10.123456+00`: PostgreSQL's ISO output for timestamptz in UTC, always with six
/// fractional digits so the column sorts and parses uniformly.
pub fn format_commit_ts(pg_micros: i64) -> String {
    match decode::pg_micros_to_utc(pg_micros) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        None => String::from("infinity"),
    }
}

impl<F: SpoolFactory> Batcher<F> {
    /// `start` is the LSN the stream resumes from; `skip_through` is each table's last registered
    /// position; `excluded_schema` is the registry's schema when it lives in the source database.
    pub fn new(
        limits: Limits,
        factory: F,
        start: Lsn,
        skip_through: HashMap<TableName, Position>,
        excluded_schema: Option<String>,
    ) -> Self {
        Batcher {
            limits,
            factory,
            relations: FastMap::default(),
            open: FastMap::default(),
            skip_through: skip_through.into_iter().collect(),
            excluded_schema,
            txn: None,
            acks: AckTracker::new(start),
            next_id: 1,
            now_us: 0,
            scratch: Vec::with_capacity(4096),
            change_events: None,
            txn_events: false,
            holds: FastMap::default(),
            deferred_ddl: FastMap::default(),
            ddl_attnums: FastMap::default(),
            cuts: FastMap::default(),
            controls: Vec::new(),
            marker_prefix: "cdc_egress:cdc_egress".into(),
            marker_source: None,
            publication: None,
            rewrite_policy: RewritePolicy::default(),
        }
    }

    /// Takes only the DDL records that concern `publication`, and applies `policy` to changes that
    /// rewrite existing rows.
    pub fn set_ddl_scope(&mut self, publication: impl Into<String>, policy: RewritePolicy) {
        self.publication = Some(publication.into());
        self.rewrite_policy = policy;
    }

    /// Also collect a [`ChangeEvent`] per written change (drained with [`Batcher::drain_change_events`]).
    pub fn enable_change_events(&mut self) {
        self.change_events = Some(Vec::new());
    }

    /// Also bracket each transaction's change events with begin and commit events (needs
    /// [`Batcher::enable_change_events`]).
    pub fn enable_txn_events(&mut self) {
        self.txn_events = true;
    }

    /// Moves the pending event outputs into `out` (no-op when events are disabled).
    pub fn drain_change_events(&mut self, out: &mut Vec<EventOut>) {
        if let Some(events) = self.change_events.as_mut() {
            out.append(events);
        }
    }

    pub fn open_batches(&self) -> usize {
        self.open.len()
    }

    /// The LSN that may be confirmed now.
    pub fn confirmed(&mut self) -> Lsn {
        self.acks.confirmed()
    }

    /// The batch `id` is persisted (uploaded, registered, notified).
    pub fn persisted(&mut self, id: BatchId) {
        self.acks.persisted(id);
    }

    /// Registers a table schema from a Relation message. Seals the open batch of the table if its
    /// column list changed (invariant 2).
    pub fn relation(
        &mut self,
        schema: Arc<TableSchema>,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        let schema = match self.ddl_attnums.get(&schema.relation_oid) {
            Some(cols) => with_ddl_attnums(&schema, cols),
            None => schema,
        };
        if let Some(open) = self.open.get(&schema.table) {
            if open.schema.fingerprint() != schema.fingerprint() {
                let table = schema.table.clone();
                self.seal_table(&table, sealed)?;
            }
        }
        self.relations.insert(schema.relation_oid, schema);
        Ok(())
    }

    /// Feeds one decoded message (other than Relation, which needs catalog facts: see
    /// [`Batcher::relation`]).
    pub fn message(
        &mut self,
        msg: Message,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        match msg {
            Message::Begin(b) => {
                if self.txn.is_some() {
                    return Err(protocol(
                        "pgoutput Begin received inside an open transaction: the stream is out of order",
                    ));
                }
                self.txn = Some(Txn {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_ts: b.commit_ts,
                    seq: 0,
                    lsn_text: b.final_lsn.to_string(),
                    xid_text: b.xid.to_string(),
                    ts_text: format_commit_ts(b.commit_ts),
                    event_unit: None,
                    events: 0,
                });
            }
            Message::Commit(c) => {
                let txn = self.txn.take().ok_or_else(|| {
                    protocol("pgoutput Commit received without a Begin: the stream is out of order")
                })?;
                if txn.commit_lsn != c.commit_lsn {
                    return Err(protocol(format!(
                        "pgoutput Commit LSN {} does not match its Begin's final LSN {}",
                        c.commit_lsn, txn.commit_lsn
                    )));
                }
                if let (Some(unit), Some(events)) = (txn.event_unit, self.change_events.as_mut()) {
                    if self.txn_events {
                        events.push(EventOut::Txn(txn.boundary(true)));
                    }
                    events.push(EventOut::Close(unit));
                }
                self.acks.boundary(c.end_lsn);
                self.seal_due(sealed, true)?;
            }
            Message::Relation(r) => {
                return Err(protocol(format!(
                    "internal: Relation {}.{} must be passed through Batcher::relation",
                    r.namespace, r.name
                )))
            }
            Message::Origin(_) | Message::Type(_) => {}
            Message::Message(m) => {
                if !m.transactional && self.txn.is_none() {
                    self.acks.boundary(m.lsn);
                }
                if m.transactional && m.prefix == self.marker_prefix {
                    self.marker(&m, sealed)?;
                }
            }
            Message::Insert(i) => {
                self.change(i.relation_oid, Op::Insert, None, Some(&i.new), sealed)?;
            }
            Message::Update(u) => {
                self.change(
                    u.relation_oid,
                    Op::Update,
                    u.old.as_ref(),
                    Some(&u.new),
                    sealed,
                )?;
            }
            Message::Delete(d) => {
                self.change(d.relation_oid, Op::Delete, Some(&d.old), None, sealed)?;
            }
            Message::Truncate(t) => {
                for oid in t.relation_oids {
                    self.change(oid, Op::Truncate, None, None, sealed)?;
                }
            }
        }
        Ok(())
    }

    /// A keepalive (or any proof that the server has sent everything up to `wal_end`). Only counts
    /// between transactions.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if self.txn.is_none() {
            self.acks.boundary(wal_end);
        }
    }

    /// The clock moved to `now_unix_us`. Seals batches past their deadline when between transactions.
    pub fn tick(
        &mut self,
        now_unix_us: i64,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        self.now_us = self.now_us.max(now_unix_us);
        if self.txn.is_none() {
            self.seal_due(sealed, false)?;
        }
        Ok(())
    }

    /// Seals every open batch now (only between transactions; returns false inside one).
    pub fn seal_all(&mut self, sealed: &mut Vec<Sealed<F::Spool>>) -> Result<bool, Error> {
        if self.txn.is_some() {
            return Ok(false);
        }
        let tables: Vec<TableName> = self.open.keys().cloned().collect();
        for t in tables {
            self.seal_table(&t, sealed)?;
        }
        Ok(true)
    }

    /// Seals the open batch of one table (if any), e.g. before a reload cut.
    pub fn seal_table(
        &mut self,
        table: &TableName,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        if let Some(b) = self.open.remove(table) {
            self.skip_through.insert(table.clone(), b.last);
            sealed.push(Sealed::Batch(SealedBatch {
                id: b.id,
                schema: b.schema,
                first: b.first,
                last: b.last,
                first_commit_ts: b.first_commit_ts,
                last_commit_ts: b.last_commit_ts,
                rows: b.rows,
                csv_bytes: b.csv_bytes,
                ops: b.ops,
                spool: b.spool,
            }));
        }
        Ok(())
    }

    fn seal_due(
        &mut self,
        sealed: &mut Vec<Sealed<F::Spool>>,
        check_limits: bool,
    ) -> Result<(), Error> {
        let now = self.now_us;
        let limits = self.limits;
        let due: Vec<TableName> = self
            .open
            .iter()
            .filter(|(_, b)| {
                b.deadline_us <= now
                    || (check_limits
                        && (b.rows >= limits.max_rows || b.csv_bytes >= limits.max_bytes))
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in due {
            self.seal_table(&t, sealed)?;
        }
        Ok(())
    }

    fn deadline_after(&self, now_us: i64) -> i64 {
        let step = (self.limits.interval.as_micros() as i64).max(1);
        (now_us.div_euclid(step) + 1) * step
    }

    /// Streams the row in `self.scratch` into the table's open batch, opening one if needed (with
    /// `floor`, or the current boundary).
    fn append_row(
        &mut self,
        schema: &Arc<TableSchema>,
        pos: Position,
        commit_ts: i64,
        op: Op,
        floor: Option<Lsn>,
    ) -> Result<(), Error> {
        // One hash lookup per row in the common case (the table's batch is open).
        if let Some(batch) = self.open.get_mut(&schema.table) {
            return append_to(batch, &self.scratch, pos, commit_ts, op);
        }
        let id = BatchId(self.next_id);
        self.next_id += 1;
        let floor = floor.unwrap_or(self.acks.current_boundary());
        self.acks.open(id, floor);
        let mut spool = self.factory.create(&schema.table).map_err(|e| {
            Error::transient(Component::Spool, format!("cannot create spool file: {e}"))
        })?;
        let mut header = Vec::with_capacity(256);
        push_header(
            &mut header,
            METADATA_COLUMNS
                .iter()
                .copied()
                .chain(schema.columns.iter().map(|c| c.name.as_str())),
        );
        spool.write_all(&header).map_err(|e| {
            Error::transient(Component::Spool, format!("cannot write spool file: {e}"))
        })?;
        let deadline_us = self.deadline_after(self.now_us);
        self.open.insert(
            schema.table.clone(),
            OpenBatch {
                id,
                schema: schema.clone(),
                first: pos,
                last: pos,
                first_commit_ts: commit_ts,
                last_commit_ts: commit_ts,
                rows: 0,
                csv_bytes: 0,
                ops: OpCounts::default(),
                deadline_us,
                spool,
            },
        );
        let batch = self.open.get_mut(&schema.table).expect("inserted above");
        append_to(batch, &self.scratch, pos, commit_ts, op)
    }

    /// Starts parking the rows of `table` (a reload of it was requested at this point of the stream):
    /// its open batch is sealed here, and until [`Batcher::release_hold`] gives the cut, its rows go
    /// to an on-disk hold file. The hold is registered with the ack like a batch, so the confirmed LSN
    /// cannot pass a parked row. Holding an already held table does nothing.
    pub fn begin_hold(
        &mut self,
        table: &TableName,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        if self.holds.contains_key(table) {
            return Ok(());
        }
        self.seal_table(table, sealed)?;
        let id = BatchId(self.next_id);
        self.next_id += 1;
        let floor = self.acks.current_boundary();
        self.acks.open(id, floor);
        let file = self.factory.hold_file().map_err(|e| {
            Error::transient(Component::Spool, format!("cannot create hold file: {e}"))
        })?;
        self.holds.insert(table.clone(), Hold::new(id, floor, file));
        Ok(())
    }

    /// The reload of `table` is consistent at `cut` (its snapshot holds exactly the transactions
    /// committed below `cut`). Parked rows are streamed again, nothing is dropped: rows below the cut
    /// form a batch of their own (they are in the export too, and the consumer rule skips them), and
    /// the first row at or after the cut seals it and starts the next batch. So no batch straddles
    /// the cut, and if the export fails nothing is lost. `Lsn::ZERO` releases without a split.
    /// Returns the number of rows released.
    pub fn release_hold(
        &mut self,
        table: &TableName,
        cut: Lsn,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<u64, Error> {
        self.release_hold_answering(table, cut, sealed, u64::MAX, &mut || Ok(()))
    }

    /// [`Self::release_hold`], calling `between` after every `slice_rows` rows replayed: a hold can
    /// be large, and the driver must keep answering the server meanwhile (its error ends the replay).
    pub fn release_hold_answering(
        &mut self,
        table: &TableName,
        cut: Lsn,
        sealed: &mut Vec<Sealed<F::Spool>>,
        slice_rows: u64,
        between: &mut dyn FnMut() -> Result<(), Error>,
    ) -> Result<u64, Error> {
        if cut > Lsn::ZERO {
            self.cuts.insert(table.clone(), cut);
        }
        let Some(hold) = self.holds.remove(table) else {
            return Ok(0);
        };
        let (id, floor) = (hold.id, hold.floor);
        let mut deferred = self
            .deferred_ddl
            .remove(table)
            .unwrap_or_default()
            .into_iter()
            .peekable();
        let mut released = 0;
        let mut current: Option<Arc<TableSchema>> = None;
        for rec in hold.into_records().map_err(|e| {
            Error::transient(Component::Spool, format!("cannot read hold file: {e}"))
        })? {
            let (schema, pos, commit_ts, _xid, op, row) = rec.map_err(|e| {
                Error::transient(Component::Spool, format!("cannot read hold file: {e}"))
            })?;
            if self
                .skip_through
                .get(table)
                .is_some_and(|skip| pos <= *skip)
            {
                continue;
            }
            while let Some(ddl) = deferred.next_if(|d| d.position < pos) {
                self.seal_table(table, sealed)?;
                self.seal_table(&ddl.table.clone(), sealed)?;
                sealed.push(Sealed::Ddl(ddl));
            }
            self.split_at_cut(table, pos, sealed)?;
            if current
                .as_ref()
                .is_some_and(|c| c.fingerprint() != schema.fingerprint())
            {
                self.seal_table(table, sealed)?;
            }
            current = Some(schema.clone());
            self.scratch.clear();
            self.scratch.extend_from_slice(&row);
            self.append_row(&schema, pos, commit_ts, op, Some(floor))?;
            released += 1;
            if released % slice_rows.max(1) == 0 {
                between()?;
            }
        }
        for ddl in deferred {
            self.seal_table(table, sealed)?;
            self.seal_table(&ddl.table.clone(), sealed)?;
            sealed.push(Sealed::Ddl(ddl));
        }
        // The released rows are in open batches now (each an ack entry from `floor`); their change
        // events left when they were parked, in their transactions' units.
        self.acks.persisted(id);
        Ok(released)
    }

    /// In-band control messages seen since the last call (reload markers).
    pub fn drain_controls(&mut self, out: &mut Vec<Control>) {
        out.append(&mut self.controls);
    }

    /// Sets the logical-message prefix of this instance's markers (`cdc_egress:<registry schema>`).
    /// Markers that name another source are ignored (README "Running several daemons").
    pub fn set_marker_source(&mut self, source: impl Into<String>) {
        self.marker_source = Some(source.into());
    }

    pub fn set_marker_prefix(&mut self, prefix: impl Into<String>) {
        self.marker_prefix = prefix.into();
    }

    fn marker(
        &mut self,
        m: &decode::LogicalMessage,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        let Some(txn) = self.txn.as_ref() else {
            return Ok(());
        };
        let commit_lsn = txn.commit_lsn;
        #[derive(serde::Deserialize)]
        struct Kind {
            kind: String,
        }
        if serde_json::from_slice::<Kind>(&m.content).is_ok_and(|k| k.kind == "ddl") {
            return self.ddl(&m.content, sealed);
        }
        let parsed: Marker = match serde_json::from_slice(&m.content) {
            Ok(p) => p,
            Err(e) => {
                self.controls.push(Control::MalformedMarker {
                    commit_lsn,
                    error: e.to_string(),
                });
                return Ok(());
            }
        };
        let ours = parsed
            .source
            .as_deref()
            .is_none_or(|s| self.marker_source.as_deref().is_none_or(|o| o == s));
        if parsed.kind == "reload_start" && ours {
            let table = TableName::new(parsed.schema, parsed.table);
            self.begin_hold(&table, sealed)?;
            self.controls.push(Control::ReloadStart {
                table,
                request: parsed.request,
                marker_commit_lsn: commit_lsn,
            });
        }
        Ok(())
    }

    /// A DDL-capture message (invariant 5): seals the table's open batch, hands out its record (two
    /// for a rename: the old name's last and the new name's first) and, when the change leaves
    /// existing rows that no row change describes, starts a reload of the table at this position
    /// (see [`crate::core::ddl`]).
    fn ddl(&mut self, content: &[u8], sealed: &mut Vec<Sealed<F::Spool>>) -> Result<(), Error> {
        let txn = self.txn.as_mut().expect("called inside a transaction");
        txn.seq += 1;
        let pos = Position::new(txn.commit_lsn, txn.seq);
        let (xid, commit_ts) = (txn.xid, txn.commit_ts);
        // A record of a newer format is a schema change this version cannot represent: stop here
        // rather than write files that silently miss it (nothing at or after it is acknowledged, so
        // nothing is lost). One that does not parse at all was not written by our trigger (any
        // role may emit a logical message): reported and skipped, never a reason to stop for good.
        let change = match DdlChange::parse(content) {
            Ok(c) if c.format <= ddl::FORMAT => c,
            Ok(c) => {
                return Err(protocol(format!(
                    "the DDL record at {} (seq {}) has format {}, newer than this cdc-egress reads ({}): \
                     it was written by the DDL-capture trigger of a newer version; run that version (or \
                     `cdc-egress migrate` with this one, then restart)",
                    pos.commit_lsn,
                    pos.seq,
                    c.format,
                    ddl::FORMAT
                )))
            }
            Err(error) => {
                self.controls.push(Control::MalformedMarker {
                    commit_lsn: pos.commit_lsn,
                    error: format!("DDL record (seq {}) not written by cdc-egress: {error}", pos.seq),
                });
                return Ok(());
            }
        };
        let publication = self.publication.as_deref();
        if !change.concerns(publication)
            || self
                .excluded_schema
                .as_deref()
                .is_some_and(|s| s == change.schema)
        {
            return Ok(());
        }
        // The record's columns are the catalog at the DDL's position: they give the table's known
        // schema, and every Relation of it described later, its attnums (see `with_ddl_attnums`).
        if let Some(cols) = &change.columns {
            let cols: Arc<[(String, i16)]> =
                cols.iter().map(|c| (c.name.clone(), c.attnum)).collect();
            if let Some(known) = self.relations.get_mut(&change.relation_oid) {
                *known = with_ddl_attnums(known, &cols);
            }
            self.ddl_attnums.insert(change.relation_oid, cols);
        }
        let table = change.table_name();
        let reload = change
            .needs_reload(publication, self.rewrite_policy)
            .map(|reason| ddl::reload_request_id(reason, pos.commit_lsn, pos.seq));
        let still_published = change.published_in(publication);
        let change = Arc::new(change);
        let mut filed_under = Vec::with_capacity(2);
        if let Some(previous) = change.previous_name() {
            filed_under.push((previous, Some("renamed")));
        }
        let mode = match change.event {
            ddl::DdlEvent::Drop => Some("dropped"),
            _ if !still_published => Some("unpublished"),
            ddl::DdlEvent::Create | ddl::DdlEvent::Publish | ddl::DdlEvent::Rename => {
                Some("streaming")
            }
            _ => None,
        };
        // A reload started here sets the mode itself (`reloading`, then `streaming`).
        filed_under.push((table.clone(), if reload.is_some() { None } else { mode }));
        // Where either name of a rename is held, both records wait in that hold, so the rename
        // stays after the old name's parked rows under both names.
        let held_under = filed_under
            .iter()
            .map(|(n, _)| n)
            .find(|n| self.holds.contains_key(*n))
            .cloned();
        for (name, mode_after) in filed_under {
            let id = BatchId(self.next_id);
            self.next_id += 1;
            let floor = self.acks.current_boundary();
            self.acks.open(id, floor);
            let record = DdlRecord {
                id,
                table: name.clone(),
                position: pos,
                xid,
                commit_ts,
                change: change.clone(),
                reload_request: reload.clone(),
                mode_after,
            };
            if let Some(held) = &held_under {
                // Rows before it are parked: it waits for them (see `release_hold`).
                self.deferred_ddl
                    .entry(held.clone())
                    .or_default()
                    .push(record);
            } else {
                self.seal_table(&name, sealed)?;
                sealed.push(Sealed::Ddl(record));
            }
        }
        if let Some(request) = reload {
            self.begin_hold(&table, sealed)?;
            self.controls.push(Control::ReloadStart {
                table,
                request,
                marker_commit_lsn: pos.commit_lsn,
            });
        }
        Ok(())
    }

    /// Seals `table`'s open batch when `pos` is the first position at or after a pending cut.
    fn split_at_cut(
        &mut self,
        table: &TableName,
        pos: Position,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        if self
            .cuts
            .get(table)
            .is_some_and(|cut| pos.commit_lsn >= *cut)
        {
            self.cuts.remove(table);
            self.seal_table(table, sealed)?;
        }
        Ok(())
    }

    fn change(
        &mut self,
        relation_oid: u32,
        op: Op,
        old: Option<&OldTuple>,
        new: Option<&Tuple>,
        sealed: &mut Vec<Sealed<F::Spool>>,
    ) -> Result<(), Error> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(protocol(format!(
                "pgoutput {} received outside a transaction",
                op.word()
            )));
        };
        txn.seq += 1;
        let pos = Position::new(txn.commit_lsn, txn.seq);
        let schema = self.relations.get(&relation_oid).cloned().ok_or_else(|| {
            protocol(format!(
                "pgoutput {} for relation OID {relation_oid} arrived before its Relation message",
                op.word()
            ))
        })?;
        if self
            .excluded_schema
            .as_deref()
            .is_some_and(|s| s == schema.table.schema)
        {
            return Ok(());
        }
        // At or below the skip position the row is already in a registered batch (re-sent after a
        // restart). Its change event may not have been acknowledged then, so with events enabled it
        // is encoded and published again (deduplicated by its Nats-Msg-Id), but not batched again.
        let already_registered = self
            .skip_through
            .get(&schema.table)
            .is_some_and(|skip| pos <= *skip);
        if already_registered && self.change_events.is_none() {
            return Ok(());
        }
        let ncols = schema.columns.len();
        for (what, t) in [("new", new), ("old", old.map(|o| &o.tuple))] {
            if let Some(t) = t {
                if t.0.len() != ncols {
                    return Err(protocol(format!(
                        "pgoutput {} for {} carries {} {what} values but its Relation has {ncols} columns",
                        op.word(),
                        schema.table,
                        t.0.len()
                    )));
                }
            }
        }

        // Encode the row into the scratch buffer.
        let txn = self.txn.as_ref().expect("checked above");
        let row = &mut self.scratch;
        row.clear();
        push_value(row, Some(op.code().as_bytes()));
        row.push(b',');
        push_value(row, Some(txn.lsn_text.as_bytes()));
        row.push(b',');
        // Digits need no escaping: quote them directly, without an allocation per row.
        push_quoted_u32(row, pos.seq);
        row.push(b',');
        push_value(row, Some(txn.xid_text.as_bytes()));
        row.push(b',');
        push_value(row, Some(txn.ts_text.as_bytes()));
        row.push(b',');
        match old {
            Some(o) => {
                let json = before_json(&schema, o)?;
                push_value(row, Some(json.as_bytes()));
            }
            None => push_value(row, None),
        }
        row.push(b',');
        let unchanged = new.map(unchanged_json(&schema)).unwrap_or(None);
        push_value(row, unchanged.as_deref().map(str::as_bytes));
        // Table columns: the new tuple, or for a delete the old key/row, or nothing for a truncate.
        let values: Option<&Tuple> = new.or(old.map(|o| &o.tuple));
        for i in 0..ncols {
            row.push(b',');
            match values.map(|t| &t.0[i]) {
                None | Some(Value::Null) | Some(Value::Unchanged) => push_value(row, None),
                Some(Value::Text(b)) => push_value(row, Some(b)),
                Some(Value::Binary(_)) => {
                    return Err(protocol(format!(
                        "pgoutput sent a binary value for {}.{} but binary mode was not requested",
                        schema.table, schema.columns[i].name
                    )))
                }
            }
        }
        row.push(b'\n');

        // Held tables (a reload cut is being taken) park their rows; others stream into the batch.
        // A row already registered only gets its change event again (see above). A parked row's
        // change event leaves now, in its transaction (not at the release), so events stay in
        // commit order and the same on every replay, whenever a hold is taken or released.
        if !already_registered {
            if let Some(hold) = self.holds.get_mut(&schema.table) {
                hold.park(&schema, pos, txn.commit_ts, txn.xid, op, &self.scratch)
                    .map_err(|e| {
                        Error::transient(Component::Spool, format!("cannot write hold file: {e}"))
                    })?;
            } else {
                let commit_ts = txn.commit_ts;
                if !self.cuts.is_empty() {
                    self.split_at_cut(&schema.table, pos, sealed)?;
                }
                self.append_row(&schema, pos, commit_ts, op, None)?;
            }
        }
        if let Some(events) = self.change_events.as_mut() {
            let txn = self.txn.as_mut().expect("checked above");
            let unit = match txn.event_unit {
                Some(u) => u,
                None => {
                    let u = BatchId(self.next_id);
                    self.next_id += 1;
                    let floor = self.acks.current_boundary();
                    self.acks.open(u, floor);
                    txn.event_unit = Some(u);
                    if self.txn_events {
                        events.push(EventOut::Txn(txn.boundary(false)));
                    }
                    u
                }
            };
            txn.events += 1;
            events.push(EventOut::Change(ChangeEvent {
                unit,
                table: schema.table.clone(),
                op,
                position: pos,
                xid: txn.xid,
                commit_ts: txn.commit_ts,
                csv_row: bytes::Bytes::copy_from_slice(&self.scratch),
            }));
        }
        Ok(())
    }
}

/// Appends one encoded row to an open batch and counts it.
#[inline]
fn append_to<S: Write>(
    batch: &mut OpenBatch<S>,
    row: &[u8],
    pos: Position,
    commit_ts: i64,
    op: Op,
) -> Result<(), Error> {
    batch
        .spool
        .write_all(row)
        .map_err(|e| Error::transient(Component::Spool, format!("cannot write spool file: {e}")))?;
    batch.last = pos;
    batch.last_commit_ts = commit_ts;
    batch.rows += 1;
    batch.csv_bytes += row.len() as u64;
    batch.ops.add(op);
    Ok(())
}

/// Appends `"<n>"` (decimal digits need no escaping) without the formatting machinery.
#[inline]
fn push_quoted_u32(out: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push(b'"');
    out.extend_from_slice(&digits[at..]);
    out.push(b'"');
}

/// `schema` with the attnums of `cols` (a DDL record's columns, exact at its position), matched by
/// name; a name they do not list keeps its own. A Relation's attnums come from the catalog when the
/// daemon reads it, which may be a moment before the transaction that sent it is visible to other
/// sessions, or after a later DDL; a DDL record's are the catalog at the DDL itself. The fingerprint
/// (names and types) is unchanged.
fn with_ddl_attnums(schema: &Arc<TableSchema>, cols: &[(String, i16)]) -> Arc<TableSchema> {
    let mut patched = (**schema).clone();
    for c in &mut patched.columns {
        if let Some((_, attnum)) = cols.iter().find(|(name, _)| *name == c.name) {
            c.attnum = Some(*attnum);
        }
    }
    Arc::new(patched)
}

/// `_before`: the old key (only replica-identity key columns) or the old row (REPLICA IDENTITY FULL)
/// as a JSON object of text values; unchanged-TOAST values are left out.
fn before_json(schema: &TableSchema, old: &OldTuple) -> Result<String, Error> {
    let mut out = String::with_capacity(64);
    out.push('{');
    let mut first = true;
    for (col, v) in schema.columns.iter().zip(&old.tuple.0) {
        if old.kind == OldTupleKind::Key && !col.replica_key && matches!(v, Value::Null) {
            continue;
        }
        let text = match v {
            Value::Unchanged => continue,
            Value::Null => None,
            Value::Text(b) | Value::Binary(b) => Some(std::str::from_utf8(b).map_err(|_| {
                protocol(format!(
                    "value of {}.{} is not valid UTF-8; cdc-egress requires a UTF8 database",
                    schema.table, col.name
                ))
            })?),
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&serde_json::to_string(&col.name).expect("string serializes"));
        out.push(':');
        match text {
            None => out.push_str("null"),
            Some(t) => out.push_str(&serde_json::to_string(t).expect("string serializes")),
        }
    }
    out.push('}');
    Ok(out)
}

/// `_unchanged`: JSON array of the names of columns sent as unchanged TOAST, or None.
fn unchanged_json(schema: &TableSchema) -> impl Fn(&Tuple) -> Option<String> + '_ {
    move |t: &Tuple| {
        let names: Vec<&str> = schema
            .columns
            .iter()
            .zip(&t.0)
            .filter(|(_, v)| matches!(v, Value::Unchanged))
            .map(|(c, _)| c.name.as_str())
            .collect();
        (!names.is_empty()).then(|| serde_json::to_string(&names).expect("strings serialize"))
    }
}

#[cfg(test)]
mod tests;
