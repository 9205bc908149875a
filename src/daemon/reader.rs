//! The reader task: CopyData frames off the replication socket, in order, in chunks to the batcher.
//!
//! Every frame already buffered (at most `CHUNK_FRAMES` frames or `CHUNK_BYTES`) goes in one channel
//! message, so a busy stream costs one thread wake-up per chunk, not per frame. A Relation message
//! is resolved against the catalog here (async) before it reaches the batcher, so the batcher never
//! waits on a query; a keepalive that asks for a reply wakes the status task.
//!
//! Read coalescing: the walsender sends every message with a system call of its own, so a reader
//! that reads as soon as the socket is readable takes a few messages per read, and each read costs a
//! wake-up of this task, a chunk, a wake-up of the batcher thread, and (on 2 cores) a preemption of the
//! walsender: measured, about one context switch per change. So when the reader has taken everything
//! buffered and it came to less than [`COALESCE_BELOW`] bytes, it waits [`COALESCE_WAIT`] (200 µs)
//! before it reads again, and the next read takes everything that arrived meanwhile. The wait is a
//! plain sleep of the worker thread: the runtime's timer has a 1 ms granularity, and a millisecond is
//! too long, because a unix socket holds only a few hundred small messages (each costs about 1 KiB of
//! the walsender's send buffer) and a walsender that finds it full stops until the reader catches up.
//! A stream that arrives faster fills chunks of that size without waiting. The price is at most
//! [`COALESCE_WAIT`] of latency per read and a worker thread that sleeps for that long (the other
//! tasks of the daemon are not latency-sensitive at that scale); nothing is reordered or lost.
//! `CDC_EGRESS_READ_COALESCE_US` (microseconds, 0 = never wait; a benchmark knob, not configuration)
//! overrides the wait; values of 1,000 and more wait on the runtime's timer instead.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::batcher_thread::{Frame, Input, CHUNK_BYTES, CHUNK_FRAMES};
use crate::core::decode::{self, Message, ReplicationFrame};
use crate::error::{Component, Error};
use crate::observe::Metrics;
use crate::pg::slot;

/// A chunk with fewer payload bytes than this makes the reader wait [`COALESCE_WAIT`] before reading
/// again (see the module documentation).
const COALESCE_BELOW: usize = 32 * 1024;
/// How long the reader lets a trickling stream accumulate in the socket buffer, unless
/// `CDC_EGRESS_READ_COALESCE_US` (a benchmark knob, microseconds, 0 = never wait) says otherwise.
const COALESCE_WAIT: Duration = Duration::from_micros(200);

fn coalesce_wait() -> Duration {
    std::env::var("CDC_EGRESS_READ_COALESCE_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(COALESCE_WAIT, Duration::from_micros)
}

pub(super) async fn read_stream(
    mut reader: crate::pg::wire::CopyReader,
    input_tx: mpsc::Sender<Input>,
    catalog: Arc<tokio_postgres::Client>,
    metrics: Arc<Metrics>,
    reply_now: Arc<Notify>,
) -> Result<(), Error> {
    use futures::FutureExt;
    let mut chunk: Vec<Frame> = Vec::with_capacity(CHUNK_FRAMES);
    let mut chunk_bytes = 0usize;
    let wait = coalesce_wait();
    loop {
        // Wait for one payload, then take every payload that is already buffered without waiting
        // (`CopyReader::next` is cancel-safe), so a busy stream crosses the channel in chunks.
        let first = reader.next().await?;
        let mut next = Some(first);
        let mut relation = None;
        let mut max_lsn = 0u64;
        let mut messages = 0u64;
        // Whether the loop ended because nothing more was buffered (not at a chunk limit or Relation).
        let mut drained = false;
        while let Some(item) = next.take() {
            let Some(payload) = item else {
                return Err(Error::transient(
                    Component::Source,
                    "the server ended the replication stream",
                ));
            };
            let frame = decode::parse_frame(payload).map_err(|e| {
                Error::definite(
                    Component::Decode,
                    format!("undecodable replication frame: {e}"),
                )
            })?;
            match frame {
                ReplicationFrame::XLogData {
                    wal_start, data, ..
                } => {
                    messages += 1;
                    max_lsn = max_lsn.max(wal_start.0);
                    if data.first() == Some(&b'R') {
                        relation = Some(data);
                        break;
                    }
                    chunk_bytes += data.len();
                    chunk.push(Frame::Data(data));
                }
                ReplicationFrame::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    max_lsn = max_lsn.max(wal_end.0);
                    if reply_requested {
                        reply_now.notify_one();
                    }
                    chunk.push(Frame::Keepalive(wal_end));
                }
            }
            if chunk.len() >= CHUNK_FRAMES || chunk_bytes >= CHUNK_BYTES {
                break;
            }
            next = reader.next().now_or_never().transpose()?;
            drained = next.is_none();
        }
        metrics.messages_received.inc_by(messages);
        metrics.received_lsn.inner().fetch_max(max_lsn, Relaxed);
        let trickle = drained && chunk_bytes < COALESCE_BELOW;
        if !chunk.is_empty() {
            let frames = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_FRAMES));
            chunk_bytes = 0;
            if input_tx.send(Input::Frames(frames)).await.is_err() {
                return Ok(());
            }
        }
        // A Relation needs catalog facts: it goes after the frames before it, in order.
        if let Some(data) = relation {
            let Message::Relation(rel) = decode::decode(data).map_err(|e| {
                Error::definite(
                    Component::Decode,
                    format!("undecodable Relation message: {e}"),
                )
            })?
            else {
                unreachable!("tag R decodes to a Relation")
            };
            let schema = slot::describe_relation(&catalog, &rel).await?;
            if input_tx.send(Input::Relation(schema)).await.is_err() {
                return Ok(());
            }
        }
        if trickle && !wait.is_zero() {
            if wait >= Duration::from_millis(1) {
                tokio::time::sleep(wait).await;
            } else {
                // Below the runtime timer's 1 ms granularity: a short sleep of this worker thread.
                std::thread::sleep(wait);
            }
        }
    }
}
