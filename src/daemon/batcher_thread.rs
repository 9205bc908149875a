//! The batcher thread: the one place the pure [`Batcher`] runs, fed in stream order.
//!
//! Frames and relations arrive in [`Input`] chunks from the reader, persisted reports from the
//! delivery (a second, unbounded channel, so delivery can never block on a full input channel);
//! sealed batches and DDL records, change events and reload controls leave through bounded channels. After each
//! step the confirmed LSN ([`Batcher::confirmed`]) is published on a watch for the status task.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::core::ack::BatchId;
use crate::core::batch::{Batcher, Control, EventOut, Sealed};
use crate::core::decode::{self};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::sink::spool::GzipSpools;
use crate::sink::spool::SpooledFile;
use crate::table::{TableName, TableSchema};

/// What the reader hands the batcher thread, in stream order.
pub(super) enum Input {
    /// Consecutive frames, as many as were already buffered (at most [`CHUNK_FRAMES`] /
    /// [`CHUNK_BYTES`]): one channel message and at most one thread wake-up for all of them.
    Frames(Vec<Frame>),
    Relation(Arc<TableSchema>),
    Tick(i64),
    /// A reload's cut is known: release the table's hold.
    Release(TableName, Lsn),
    Stop,
}

/// One item of the replication stream.
pub(super) enum Frame {
    Data(Bytes),
    Keepalive(Lsn),
}

/// Chunks in flight between the reader and the batcher; with the limits below, at most ~4 MiB of
/// frames (and the read buffers they are slices of) wait there, unless single messages are larger
/// than `CHUNK_BYTES` (such a message is a chunk of its own). A trade-off measured with
/// `benches/throughput.sh` (benches/README.md): 16 chunks kept files + notices over TCP at a median
/// 0.77× of pg_recvlogical against 0.71× with 4 (5 alternating runs each, noisy), but with change
/// events, where the batcher lags, they raised the peak RSS from 31–32 to 34 MiB, above the goal.
pub(super) const INPUT_CAPACITY: usize = 4;
pub(super) const CHUNK_FRAMES: usize = 1024;
pub(super) const CHUNK_BYTES: usize = 1 << 20;

pub(super) fn now_unix_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// What the batcher thread leaves behind when it stops.
pub(super) struct BatcherState {
    batcher: Batcher<GzipSpools>,
    persisted_rx: mpsc::UnboundedReceiver<BatchId>,
    confirmed_tx: watch::Sender<Lsn>,
}

impl BatcherState {
    /// Applies the persisted reports that arrived after the thread stopped, and publishes the
    /// confirmed LSN they allow (for the final status update).
    pub(super) fn settle(mut self) {
        while let Ok(id) = self.persisted_rx.try_recv() {
            self.batcher.persisted(id);
        }
        let _ = self.confirmed_tx.send(self.batcher.confirmed());
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run_batcher(
    mut batcher: Batcher<GzipSpools>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut input_rx: mpsc::Receiver<Input>,
    mut persisted_rx: mpsc::UnboundedReceiver<BatchId>,
    sealed_tx: mpsc::Sender<Sealed<SpooledFile>>,
    events_tx: Option<mpsc::Sender<Vec<EventOut>>>,
    controls_tx: mpsc::UnboundedSender<Control>,
    confirmed_tx: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
) -> Result<BatcherState, Error> {
    let mut sealed = Vec::new();
    let mut events = Vec::new();
    loop {
        while let Ok(id) = persisted_rx.try_recv() {
            batcher.persisted(id);
        }
        if stop.load(Relaxed) {
            break;
        }
        let Some(input) = input_rx.blocking_recv() else {
            break;
        };
        match input {
            Input::Frames(frames) => {
                for frame in frames {
                    match frame {
                        Frame::Data(data) => {
                            let msg = decode::decode(data).map_err(|e| {
                                Error::definite(
                                    Component::Decode,
                                    format!("undecodable pgoutput message: {e}"),
                                )
                            })?;
                            batcher.message(msg, &mut sealed)?;
                        }
                        Frame::Keepalive(lsn) => batcher.keepalive(lsn),
                    }
                }
            }
            Input::Relation(schema) => batcher.relation(schema, &mut sealed)?,
            Input::Tick(now) => batcher.tick(now, &mut sealed)?,
            Input::Release(table, cut) => {
                let n = batcher.release_hold(&table, cut, &mut sealed)?;
                tracing::debug!(table = %table, cut = %cut, released = n, "hold released");
            }
            Input::Stop => break,
        }
        let mut controls = Vec::new();
        batcher.drain_controls(&mut controls);
        for c in controls {
            match c {
                Control::MalformedMarker { commit_lsn, error } => {
                    tracing::warn!(%error, commit = %commit_lsn, "ignoring a malformed cdc-egress marker message");
                }
                reload => {
                    let _ = controls_tx.send(reload);
                }
            }
        }
        for b in sealed.drain(..) {
            let b = b.map_spool(|spool| {
                spool.finish().map_err(|e| {
                    Error::transient(Component::Spool, format!("cannot finish spool file: {e}"))
                })
            })?;
            if sealed_tx.blocking_send(b).is_err() {
                return Err(Error::transient(Component::Daemon, "delivery stopped"));
            }
        }
        if let Some(tx) = &events_tx {
            // One hand-off (and at most one wake-up of the publisher) per step, not per change.
            batcher.drain_change_events(&mut events);
            if !events.is_empty() && tx.blocking_send(std::mem::take(&mut events)).is_err() {
                return Err(Error::transient(
                    Component::Daemon,
                    "change-event publisher stopped",
                ));
            }
        }
        let c = batcher.confirmed();
        confirmed_tx.send_if_modified(|v| {
            let changed = *v != c;
            *v = c;
            changed
        });
        metrics.pending_batches.set(batcher.open_batches() as i64);
    }
    Ok(BatcherState {
        batcher,
        persisted_rx,
        confirmed_tx,
    })
}
