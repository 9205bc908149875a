//! Per-change events (`nats.change_events`): published to JetStream in stream order, each with a
//! message id derived from its table and position, so a replay after a crash is deduplicated by the
//! server. Acks are pipelined (up to a window); a transaction's unit is reported persisted only once
//! every event before its close marker is acknowledged, so the ack waits for the events as well.

use tokio::sync::mpsc;

use crate::core::ack::BatchId;
use crate::core::batch::EventOut;
use crate::error::{Component, Error};
use crate::sink::notify::Notifier;

/// Publishes change events with pipelined acks, in order; reports a transaction's unit persisted once
/// every event before its Close marker is acknowledged.
pub(super) async fn publish_events(
    notifier: Notifier,
    mut rx: mpsc::Receiver<EventOut>,
    persisted: mpsc::UnboundedSender<BatchId>,
) -> Result<(), Error> {
    use std::collections::VecDeque;
    enum Pending {
        Ack(async_nats::jetstream::context::PublishAckFuture, String),
        Close(BatchId),
    }
    let mut queue: VecDeque<Pending> = VecDeque::new();
    const WINDOW: usize = 1024;
    loop {
        // Resolve acknowledged heads of the queue.
        while let Some(head) = queue.front() {
            match head {
                Pending::Close(unit) => {
                    let _ = persisted.send(*unit);
                    queue.pop_front();
                }
                Pending::Ack(..) if queue.len() >= WINDOW || rx.is_empty() => {
                    let Some(Pending::Ack(fut, subject)) = queue.pop_front() else {
                        unreachable!()
                    };
                    fut.await.map_err(|e| {
                        Error::transient(
                            Component::Nats,
                            format!("change event on {subject} not acknowledged: {e}"),
                        )
                    })?;
                }
                Pending::Ack(..) => break,
            }
        }
        let Some(ev) = rx.recv().await else {
            return Ok(());
        };
        match ev {
            EventOut::Close(unit) => queue.push_back(Pending::Close(unit)),
            EventOut::Change(c) => {
                let subject = notifier.change_subject(&c.table, c.op.word());
                // The subject names the source and the table: ids of sources sharing the stream differ.
                let msg_id = format!("{subject}:{}:{}", c.position.commit_lsn, c.position.seq);
                let payload = serde_json::json!({
                    "table": c.table.dotted(),
                    "op": c.op.word(),
                    "commit_lsn": c.position.commit_lsn.to_string(),
                    "seq": c.position.seq,
                    "xid": c.xid,
                    "commit_ts": crate::core::batch::format_commit_ts(c.commit_ts),
                    "csv": String::from_utf8_lossy(&c.csv_row),
                });
                let fut = notifier
                    .publish_pipelined(
                        subject.clone(),
                        &msg_id,
                        serde_json::to_vec(&payload).expect("json").into(),
                    )
                    .await?;
                queue.push_back(Pending::Ack(fut, subject));
            }
        }
    }
}
