//! Grouped change events (`nats.change_events: grouped`): the batcher's [`EventOut`] sequence cut
//! into groups of consecutive changes, one JetStream message per group instead of one per change.
//!
//! # Invariants
//! 1. A group holds a maximal run of consecutive [`EventOut::Change`]s of one table in one unit (one
//!    transaction), in stream order: it is closed by the unit's [`EventOut::Close`], by an
//!    [`EventOut::Txn`] and by a change of another table or unit.
//! 2. A group also ends once it holds [`GroupLimits::max_rows`] changes, and before a row that would
//!    take its CSV body past [`GroupLimits::max_bytes`]; a single row larger than that is a group of
//!    its own. No group is empty.
//! 3. The output keeps the input's order: every group is handed out before the `Txn` or `Close` that
//!    closed it, so the publisher reports a unit persisted only after every group of it is acknowledged.
//! 4. Every change lands in exactly one group; `Txn` and `Close` pass through unchanged.
//!
//! The cuts depend only on the sequence of events, never on how it was split into chunks or on time:
//! a group that is not closed yet stays pending across [`EventGrouper::push`] calls (its transaction
//! is not committed, so nothing waits for it). What the batcher emits for a transaction is the same
//! on every replay (see `daemon::events`), so a replay after a crash produces the same groups, with
//! the same first positions and therefore the same message ids, which JetStream's duplicate window
//! drops. A pending group at shutdown belongs to an uncommitted unit and is simply dropped: the ack
//! never passed it, so the next run re-sends its transaction.

use crate::core::ack::BatchId;
use crate::table::TableName;

use super::{ChangeEvent, EventOut, TxnBoundary};

/// Where groups are cut (invariant 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Changes per group at most (at least 1).
    pub max_rows: usize,
    /// CSV body bytes per group at most, unless its only row is larger.
    pub max_bytes: usize,
}

impl Default for GroupLimits {
    /// 1,024 changes, 256 KiB of CSV.
    fn default() -> Self {
        GroupLimits {
            max_rows: 1024,
            max_bytes: 256 * 1024,
        }
    }
}

/// Consecutive changes of one table in one unit, in stream order (never empty).
#[derive(Debug, Clone)]
pub struct ChangeGroup {
    pub changes: Vec<ChangeEvent>,
    /// The sum of the changes' `csv_row` lengths: the body's size.
    pub csv_bytes: usize,
}

impl ChangeGroup {
    pub fn first(&self) -> &ChangeEvent {
        self.changes.first().expect("a group is never empty")
    }

    pub fn last(&self) -> &ChangeEvent {
        self.changes.last().expect("a group is never empty")
    }

    pub fn table(&self) -> &TableName {
        &self.first().table
    }

    pub fn unit(&self) -> BatchId {
        self.first().unit
    }

    /// The message body: the rows' CSV lines as written to the batch, concatenated (one copy, into
    /// a buffer of the exact size).
    pub fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.csv_bytes);
        for c in &self.changes {
            body.extend_from_slice(&c.csv_row);
        }
        body
    }

    /// Whether `c` may join this group: same table and unit, and within the limits.
    fn takes(&self, c: &ChangeEvent, limits: GroupLimits) -> bool {
        let head = self.first();
        head.unit == c.unit
            && head.table == c.table
            && self.changes.len() < limits.max_rows
            && self.csv_bytes + c.csv_row.len() <= limits.max_bytes
    }
}

/// What the grouped publisher sends, in order.
#[derive(Debug, Clone)]
pub enum GroupOut {
    Group(ChangeGroup),
    Txn(TxnBoundary),
    Close(BatchId),
}

/// Cuts the [`EventOut`] sequence into [`ChangeGroup`]s (see the module invariants).
#[derive(Debug, Default)]
pub struct EventGrouper {
    limits: GroupLimits,
    pending: Option<ChangeGroup>,
}

impl EventGrouper {
    pub fn new(limits: GroupLimits) -> Self {
        assert!(limits.max_rows >= 1, "a group holds at least one change");
        EventGrouper {
            limits,
            pending: None,
        }
    }

    /// Feeds the next event; whatever it completes is appended to `out`, in order.
    pub fn push(&mut self, ev: EventOut, out: &mut Vec<GroupOut>) {
        match ev {
            EventOut::Change(c) => {
                let fits = self
                    .pending
                    .as_ref()
                    .is_some_and(|g| g.takes(&c, self.limits));
                if !fits {
                    self.flush(out);
                }
                let g = self.pending.get_or_insert_with(|| ChangeGroup {
                    changes: Vec::new(),
                    csv_bytes: 0,
                });
                g.csv_bytes += c.csv_row.len();
                g.changes.push(c);
                if g.changes.len() >= self.limits.max_rows {
                    self.flush(out);
                }
            }
            EventOut::Txn(t) => {
                self.flush(out);
                out.push(GroupOut::Txn(t));
            }
            EventOut::Close(unit) => {
                self.flush(out);
                out.push(GroupOut::Close(unit));
            }
        }
    }

    /// Hands out the pending group, if any.
    fn flush(&mut self, out: &mut Vec<GroupOut>) {
        if let Some(g) = self.pending.take() {
            out.push(GroupOut::Group(g));
        }
    }

    /// Changes held in the pending group (not handed out yet).
    pub fn pending(&self) -> usize {
        self.pending.as_ref().map_or(0, |g| g.changes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::batch::{Op, Position};
    use crate::lsn::Lsn;
    use proptest::prelude::*;

    fn change(unit: u64, table: &str, seq: u32, len: usize) -> EventOut {
        EventOut::Change(ChangeEvent {
            unit: BatchId(unit),
            table: TableName::new("public", table),
            op: Op::Insert,
            position: Position::new(Lsn(unit * 100), seq),
            xid: unit as u32,
            commit_ts: 0,
            csv_row: bytes::Bytes::from(vec![b'x'; len]),
        })
    }

    fn txn(unit: u64, commit: bool) -> EventOut {
        EventOut::Txn(TxnBoundary {
            commit,
            xid: unit as u32,
            commit_lsn: Lsn(unit * 100),
            commit_ts: 0,
            changes: 0,
        })
    }

    /// Feeds `events` one by one (the grouper's only input: the publisher's chunks never reach it,
    /// so they cannot change a cut), returning the output.
    fn run(limits: GroupLimits, events: &[EventOut]) -> Vec<GroupOut> {
        let mut g = EventGrouper::new(limits);
        let mut out = Vec::new();
        for ev in events {
            g.push(ev.clone(), &mut out);
        }
        out
    }

    /// A readable shape: `g:<table>@<unit>[<seqs>]`, `begin@u`, `commit@u`, `close@u`.
    fn shape(out: &[GroupOut]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                GroupOut::Group(g) => format!(
                    "g:{}@{}{:?}",
                    g.table().name,
                    g.unit().0,
                    g.changes.iter().map(|c| c.position.seq).collect::<Vec<_>>()
                ),
                GroupOut::Txn(t) if t.commit => format!("commit@{}", t.xid),
                GroupOut::Txn(t) => format!("begin@{}", t.xid),
                GroupOut::Close(u) => format!("close@{}", u.0),
            })
            .collect()
    }

    #[test]
    fn groups_end_at_tables_txn_events_and_closes() {
        let events = [
            txn(1, false),
            change(1, "a", 1, 3),
            change(1, "a", 2, 3),
            change(1, "b", 3, 3),
            change(1, "a", 4, 3),
            txn(1, true),
            EventOut::Close(BatchId(1)),
            change(2, "a", 1, 3),
            EventOut::Close(BatchId(2)),
            change(3, "a", 1, 3),
            EventOut::Close(BatchId(3)),
        ];
        assert_eq!(
            shape(&run(GroupLimits::default(), &events)),
            [
                "begin@1",
                "g:a@1[1, 2]",
                "g:b@1[3]",
                "g:a@1[4]",
                "commit@1",
                "close@1",
                "g:a@2[1]",
                "close@2",
                "g:a@3[1]",
                "close@3"
            ]
        );
    }

    #[test]
    fn limits_cut_by_rows_and_bytes_and_a_large_row_stands_alone() {
        let limits = GroupLimits {
            max_rows: 3,
            max_bytes: 10,
        };
        let mut events: Vec<EventOut> = (1..=7).map(|s| change(1, "a", s, 1)).collect();
        events.push(EventOut::Close(BatchId(1)));
        assert_eq!(
            shape(&run(limits, &events)),
            ["g:a@1[1, 2, 3]", "g:a@1[4, 5, 6]", "g:a@1[7]", "close@1"]
        );
        let events = [
            change(2, "a", 1, 4),
            change(2, "a", 2, 6),
            change(2, "a", 3, 1),
            change(2, "a", 4, 25),
            change(2, "a", 5, 2),
            EventOut::Close(BatchId(2)),
        ];
        assert_eq!(
            shape(&run(limits, &events)),
            ["g:a@2[1, 2]", "g:a@2[3]", "g:a@2[4]", "g:a@2[5]", "close@2"]
        );
    }

    #[test]
    fn the_body_is_the_rows_concatenated() {
        let mut out = Vec::new();
        let mut g = EventGrouper::new(GroupLimits::default());
        for (seq, row) in [(1, &b"\"I\",1\n"[..]), (2, b"\"U\",2\n")] {
            let EventOut::Change(mut c) = change(1, "a", seq, 0) else {
                unreachable!()
            };
            c.csv_row = bytes::Bytes::copy_from_slice(row);
            g.push(EventOut::Change(c), &mut out);
        }
        assert!(out.is_empty(), "open until closed");
        assert_eq!(g.pending(), 2);
        g.push(EventOut::Close(BatchId(1)), &mut out);
        assert_eq!(g.pending(), 0);
        let GroupOut::Group(group) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(group.body(), b"\"I\",1\n\"U\",2\n");
        assert_eq!(group.csv_bytes, group.body().len());
    }

    /// A stream like the batcher's: units in order, each optionally bracketed by txn events, its
    /// changes over a few tables with growing seqs, closed once.
    fn stream() -> impl Strategy<Value = Vec<EventOut>> {
        let unit = (
            any::<bool>(),
            proptest::collection::vec((0usize..3, 0usize..40), 1..30),
        );
        proptest::collection::vec(unit, 0..8).prop_map(|units| {
            let mut out = Vec::new();
            for (i, (txn_events, changes)) in units.into_iter().enumerate() {
                let u = i as u64 + 1;
                if txn_events {
                    out.push(txn(u, false));
                }
                for (seq, (table, len)) in changes.into_iter().enumerate() {
                    out.push(change(u, ["a", "b", "c"][table], seq as u32 + 1, len));
                }
                if txn_events {
                    out.push(txn(u, true));
                }
                out.push(EventOut::Close(BatchId(u)));
            }
            out
        })
    }

    fn key(e: &EventOut) -> String {
        match e {
            EventOut::Change(c) => format!("c{}.{}", c.unit.0, c.position.seq),
            EventOut::Txn(t) => format!("t{}{}", t.xid, t.commit),
            EventOut::Close(u) => format!("x{}", u.0),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// For any sequence: the groups' rows give back every change in order exactly once, each
        /// group is one table of one unit within the limits and maximal, and the other events keep
        /// their place.
        #[test]
        fn groups_cover_every_change_once(
            events in stream(),
            max_rows in 1usize..6,
            max_bytes in 1usize..80,
        ) {
            let limits = GroupLimits { max_rows, max_bytes };
            let out = run(limits, &events);

            // (a), and Txn and Close in place: flattening the output gives the input back.
            let mut flat = Vec::new();
            for o in &out {
                match o {
                    GroupOut::Group(g) => {
                        flat.extend(g.changes.iter().map(|c| key(&EventOut::Change(c.clone()))))
                    }
                    GroupOut::Txn(t) => flat.push(key(&EventOut::Txn(t.clone()))),
                    GroupOut::Close(u) => flat.push(key(&EventOut::Close(*u))),
                }
            }
            prop_assert_eq!(flat, events.iter().map(key).collect::<Vec<_>>());

            for o in &out {
                let GroupOut::Group(g) = o else { continue };
                // (b) one table, one unit.
                prop_assert!(!g.changes.is_empty());
                prop_assert!(g.changes.iter().all(|c| c.table == *g.table() && c.unit == g.unit()));
                // (c) the limits.
                prop_assert!(g.changes.len() <= max_rows);
                prop_assert_eq!(g.csv_bytes, g.changes.iter().map(|c| c.csv_row.len()).sum::<usize>());
                prop_assert!(g.csv_bytes <= max_bytes || g.changes.len() == 1);
            }
            // Maximal: a group directly followed by one of the same table and unit was full.
            for w in out.windows(2) {
                if let [GroupOut::Group(g), GroupOut::Group(n)] = w {
                    if n.table() == g.table() && n.unit() == g.unit() {
                        prop_assert!(
                            g.changes.len() == max_rows
                                || g.csv_bytes + n.first().csv_row.len() > max_bytes,
                            "cut early: {:?}", shape(w)
                        );
                    }
                }
            }
        }
    }
}
