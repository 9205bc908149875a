//! Which LSN may be confirmed to PostgreSQL.
//!
//! # What the LSNs mean
//! - A transaction's *commit LSN* is where its commit record starts; its *end LSN* is where it ends.
//! - Confirming `L` (the standby status update's flush position) tells PostgreSQL that every
//!   transaction whose commit LSN is below `L` is handled; after a restart the slot re-sends exactly the
//!   transactions whose commit LSN is `>= confirmed_flush_lsn`.
//! - The *boundary* is the highest position at which the stream is known to lie between transactions:
//!   a Commit's end LSN, or (only while no transaction is open) a keepalive's WAL end or the position of a
//!   non-transactional logical message such as our heartbeat.
//!
//! # Invariant (ARCHITECTURE.md, invariant 1)
//! [`AckTracker::confirmed`] never passes a change that is not persisted. Every batch gets, when it is
//! opened, a *floor*: the boundary at the start of the transaction holding its first row. Every
//! transaction before that one committed below the floor, and every row in the batch belongs to a
//! transaction at or after it. While any batch is open or in flight, the confirmed LSN is the smallest
//! floor among them; otherwise it is the boundary.
//!
//! Proof sketch: let `U` be an unpersisted row in batch `b`, in transaction `T`. `b`'s first row belongs to
//! a transaction `F` at or before `T`, and `floor(b)` is the boundary before `F` began, so
//! `floor(b) <= commit_lsn(F) <= commit_lsn(T)`. The confirmed LSN is at most `floor(b)`, so `T` is not
//! below it and will be re-sent after a restart. Rows that are re-sent but were already persisted in
//! other batches are dropped by the per-table skip positions read from the registry (see `batch`).
//!
//! The confirmed LSN is also monotonic: a new batch's floor is the current boundary, which is never
//! below what was confirmed before.

pub mod status;

use std::collections::{BTreeMap, HashMap};

use crate::lsn::Lsn;

/// Identifies a batch inside one replication session (not persisted; the registry has its own ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId(pub u64);

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Floor of every batch that is open or sealed but not yet persisted.
    pending: HashMap<BatchId, Lsn>,
    /// Multiset of those floors, for the minimum.
    floors: BTreeMap<Lsn, usize>,
    boundary: Lsn,
    confirmed: Lsn,
}

impl AckTracker {
    /// Starts at the position the stream resumes from (the slot's confirmed flush LSN).
    pub fn new(start: Lsn) -> Self {
        AckTracker {
            boundary: start,
            confirmed: start,
            ..Default::default()
        }
    }

    /// The stream is between transactions at `lsn`. Never moves backwards.
    pub fn boundary(&mut self, lsn: Lsn) {
        self.boundary = self.boundary.max(lsn);
    }

    pub fn current_boundary(&self) -> Lsn {
        self.boundary
    }

    /// A batch was opened whose first transaction began at the current boundary.
    pub fn open(&mut self, id: BatchId, floor: Lsn) {
        debug_assert!(floor >= self.confirmed, "floor below confirmed LSN");
        if self.pending.insert(id, floor).is_none() {
            *self.floors.entry(floor).or_default() += 1;
        }
    }

    /// The batch is uploaded, registered and notified, or it was empty and dropped.
    pub fn persisted(&mut self, id: BatchId) {
        if let Some(floor) = self.pending.remove(&id) {
            if let Some(n) = self.floors.get_mut(&floor) {
                *n -= 1;
                if *n == 0 {
                    self.floors.remove(&floor);
                }
            }
        }
    }

    pub fn pending_batches(&self) -> usize {
        self.pending.len()
    }

    /// The LSN that may be sent as the flush position now.
    pub fn confirmed(&mut self) -> Lsn {
        let c = self.floors.keys().next().copied().unwrap_or(self.boundary);
        self.confirmed = self.confirmed.max(c);
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_floor_holds_the_ack() {
        let mut t = AckTracker::new(Lsn(100));
        t.boundary(Lsn(200));
        t.open(BatchId(1), Lsn(200));
        t.boundary(Lsn(300));
        t.open(BatchId(2), Lsn(300));
        t.boundary(Lsn(400));
        assert_eq!(t.confirmed(), Lsn(200));
        t.persisted(BatchId(2));
        assert_eq!(t.confirmed(), Lsn(200));
        t.persisted(BatchId(1));
        assert_eq!(t.confirmed(), Lsn(400));
        t.persisted(BatchId(1));
        assert_eq!(t.confirmed(), Lsn(400));
    }
}
