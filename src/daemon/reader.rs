//! The reader task: CopyData frames off the replication socket, in order, in chunks to the batcher.
//!
//! Every frame already buffered (at most `CHUNK_FRAMES` frames or `CHUNK_BYTES`) goes in one channel
//! message, so a busy stream costs one thread wake-up per chunk, not per frame. A Relation message
//! is resolved against the catalog here (async) before it reaches the batcher, so the batcher never
//! waits on a query; a keepalive that asks for a reply wakes the status task.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use super::batcher_thread::{Frame, Input, CHUNK_BYTES, CHUNK_FRAMES};
use crate::core::decode::{self, Message, ReplicationFrame};
use crate::error::{Component, Error};
use crate::observe::Metrics;
use crate::pg::slot;

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
    loop {
        // Wait for one payload, then take every payload that is already buffered without waiting
        // (`CopyReader::next` is cancel-safe), so a busy stream crosses the channel in chunks.
        let first = reader.next().await?;
        let mut next = Some(first);
        let mut relation = None;
        let mut max_lsn = 0u64;
        let mut messages = 0u64;
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
        }
        metrics.messages_received.inc_by(messages);
        metrics.received_lsn.inner().fetch_max(max_lsn, Relaxed);
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
    }
}
