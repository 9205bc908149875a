//! An in-memory [`FileLog`]: a test double with the contract of the PostgreSQL registry, for unit
//! and integration tests of delivery and recovery that should not need a server.
//!
//! # Why it keeps the contract
//! All state sits behind one mutex and every operation runs under it without awaiting, so each
//! operation is atomic and operations are linearizable: `commit_file` appends the row and moves
//! the table's position in one critical section, exactly what the PostgreSQL transaction gives.
//! Ids are the row's index plus one, so they are positive and increase with every new row. The
//! batch-id lookup before the append makes a repeated batch a no-op returning the first id, like
//! `ON CONFLICT (batch_id) DO NOTHING` followed by the lookup. `tests/registry_conformance.rs` runs
//! the same checks against this double and against PostgreSQL.
//!
//! # Beyond the contract
//! Failures can be injected per [`Op`] ([`MemoryRegistry::fail_next`], see [`crate::sink::fault`]),
//! calls are counted ([`MemoryRegistry::calls`]), and what was committed can be read back
//! ([`MemoryRegistry::files`], [`MemoryRegistry::last_position`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{FileKind, FileLog, FileRecord, Registered};
use crate::core::batch::DdlRecord;
use crate::core::batch::Position;
use crate::error::{Component, Error};
use crate::sink::fault::{Fault, Faults};
use crate::table::{TableName, TableSchema};

/// The operations of [`FileLog`], to aim injected failures at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    CommitFile,
    MarkNotified,
    Unnotified,
    ReloadFiles,
}

impl Op {
    fn what(self) -> &'static str {
        match self {
            Op::CommitFile => "registry commit file",
            Op::MarkNotified => "registry mark notified",
            Op::Unnotified => "registry read unnotified files",
            Op::ReloadFiles => "registry read reload files",
        }
    }
}

#[derive(Default)]
struct State {
    /// Row `i` has id `i + 1`.
    files: Vec<Registered>,
    positions: HashMap<TableName, Position>,
    faults: Faults<Op>,
}

impl State {
    /// Appends the row unless its batch id is there; the id, and whether it is new.
    fn insert(&mut self, rec: &FileRecord) -> (i64, bool) {
        if let Some(r) = self
            .files
            .iter()
            .find(|r| r.record.batch_id == rec.batch_id)
        {
            return (r.id, false);
        }
        let id = self.files.len() as i64 + 1;
        self.files.push(Registered {
            id,
            record: rec.clone(),
            notified_stream_seq: None,
        });
        if let (FileKind::Streaming, Some(last)) = (rec.kind, rec.last) {
            let p = self.positions.entry(rec.table.clone()).or_insert(last);
            *p = (*p).max(last);
        }
        (id, true)
    }
}

/// The file log in memory; clones share it (like clones of a [`super::Registry`] share a database).
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    state: Arc<Mutex<State>>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; its state is still
        // readable for the report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `n` calls of `op` fail with `fault` (after failures armed earlier).
    pub fn fail_next(&self, op: Op, n: usize, fault: Fault) {
        self.lock().faults.arm(op, n, fault);
    }

    /// How many times `op` was called, failed calls included.
    pub fn calls(&self, op: Op) -> usize {
        self.lock().faults.calls(op)
    }

    /// Every committed row, in id order, with its recorded notice sequence.
    pub fn files(&self) -> Vec<Registered> {
        self.lock().files.clone()
    }

    /// The table's last committed position (`tables.last_commit_lsn/last_seq`).
    pub fn last_position(&self, table: &TableName) -> Option<Position> {
        self.lock().positions.get(table).copied()
    }

    /// Runs `effect` under the lock as operation `op`, with the failure armed for it, if any.
    fn run<T>(&self, op: Op, effect: impl FnOnce(&mut State) -> T) -> Result<T, Error> {
        let mut state = self.lock();
        match state.faults.enter(op) {
            None => Ok(effect(&mut state)),
            Some(Fault::TransientAfter) => {
                effect(&mut state);
                Err(Fault::TransientAfter.error(Component::Registry, op.what()))
            }
            Some(f) => Err(f.error(Component::Registry, op.what())),
        }
    }
}

impl FileLog for MemoryRegistry {
    async fn commit_file(
        &self,
        rec: &FileRecord,
        _schema: Option<&TableSchema>,
    ) -> Result<i64, Error> {
        self.run(Op::CommitFile, |s| s.insert(rec).0)
    }

    async fn commit_ddl(&self, rec: &FileRecord, ddl: &DdlRecord) -> Result<i64, Error> {
        // The double keeps no table modes (nothing reads them through `FileLog`): a DDL record is
        // committed like any file row.
        let _ = ddl;
        self.run(Op::CommitFile, |s| s.insert(rec).0)
    }

    async fn mark_notified(&self, id: i64, stream_seq: u64) -> Result<(), Error> {
        self.run(Op::MarkNotified, |s| {
            if let Some(r) = s.files.iter_mut().find(|r| r.id == id) {
                r.notified_stream_seq = Some(stream_seq);
            }
        })
    }

    async fn unnotified(&self) -> Result<Vec<Registered>, Error> {
        self.run(Op::Unnotified, |s| {
            s.files
                .iter()
                .filter(|r| r.notified_stream_seq.is_none())
                .cloned()
                .collect()
        })
    }

    async fn reload_files(&self, reload_id: i64) -> Result<Vec<Registered>, Error> {
        self.run(Op::ReloadFiles, |s| {
            s.files
                .iter()
                .filter(|r| {
                    r.record.kind == FileKind::Reload && r.record.reload_id == Some(reload_id)
                })
                .cloned()
                .collect()
        })
    }
}
