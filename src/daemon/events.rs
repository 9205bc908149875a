//! Change events (`nats.change_events`): published to JetStream in stream order, each with a
//! message id derived from its table and position, so a replay after a crash is deduplicated by the
//! server. Acks are pipelined (up to a window of messages); a transaction's unit is reported
//! persisted only once every message before its close marker is acknowledged, so the ack waits for
//! the events as well.
//!
//! Two modes. `true`: one message per change on `<prefix>.<source>.change.<schema>.<table>.<op>`.
//! `grouped`: the changes are cut into groups by [`EventGrouper`] (a maximal run of one table's
//! changes in one transaction, at most 1,024 changes and 256 KiB of CSV; the cuts depend only on the
//! event sequence) and each group is one message on `<prefix>.<source>.changes.<schema>.<table>`:
//! the rows' CSV lines as written to the batch, concatenated, with `Cdc-*` headers (commit LSN and
//! timestamp, xid, first and last seq, row count, table) and the id
//! `<subject>:<commit_lsn>:<first seq>`. A group is published once complete, so every group of a
//! unit is published (and acknowledged) before its Close is reported, like single events.
//!
//! Events arrive in chunks (one per batcher step), so a busy stream costs one hand-off per chunk, not
//! per change. While events keep coming, the publisher only waits for an ack when the window is full;
//! when the input is idle it waits for whichever comes first, the next chunk or the oldest ack.
//! The per-change payload is written directly (same bytes as the `serde_json::json!` object it
//! replaced: keys in alphabetical order), with the subject, the table's JSON string and the commit
//! timestamp's text computed once per table / transaction rather than per change.
//!
//! With `nats.txn_events` (either mode), each transaction's change events are bracketed by a begin
//! and a commit event on `<prefix>.<source>.txn.begin|commit` (`{"changes","commit_lsn","commit_ts","xid"}`),
//! which the batcher emits in the transaction's unit ([`TxnBoundary`]); they also close a group.
//! They go through the same
//! ordered, pipelined path with a position-derived message id (`<subject>:<commit_lsn>`, the subject
//! telling begin from commit and naming the source), so they are deduplicated on replay like the
//! change events, and the unit's Close marker, behind the commit, still waits for every PubAck before
//! the ack may pass the transaction. What the batcher emits for a transaction does not depend on
//! timing (holds included), so a replay publishes the same messages (and groups) with the same ids.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::{HeaderMap, Subject};
use tokio::sync::mpsc;

use crate::config::ChangeEvents;
use crate::core::ack::BatchId;
use crate::core::batch::event_groups::{ChangeGroup, EventGrouper, GroupLimits, GroupOut};
use crate::core::batch::{ChangeEvent, EventOut, Op, TxnBoundary};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::sink::notify::Notifier;
use crate::table::TableName;

/// Unacknowledged messages at most (change events, groups and transaction events alike).
const WINDOW: usize = 1024;
/// Payload bytes of unacknowledged messages at most (beyond the one being published): groups are up
/// to 256 KiB each, so the message count alone would let ~256 MiB wait for acks.
const WINDOW_BYTES: usize = 8 << 20;

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

enum Pending {
    /// A message's ack, its subject, and its payload size.
    Ack(AckFuture, Subject, usize),
    Close(BatchId),
}

/// Publishes change events with pipelined acks, in order; reports a transaction's unit persisted once
/// every message before its Close marker is acknowledged. `mode` says whether each change is a
/// message or each group of changes ([`EventGrouper`]).
pub(super) async fn publish_events(
    notifier: Notifier,
    mode: ChangeEvents,
    mut rx: mpsc::Receiver<Vec<EventOut>>,
    persisted: mpsc::UnboundedSender<BatchId>,
) -> Result<(), Error> {
    let mut window = Window {
        notifier: &notifier,
        queue: VecDeque::new(),
        inflight: 0,
        inflight_bytes: 0,
        persisted: &persisted,
    };
    let mut enc = Encoder::default();
    let mut grouper =
        (mode == ChangeEvents::Grouped).then(|| EventGrouper::new(GroupLimits::default()));
    let mut grouped: Vec<GroupOut> = Vec::new();
    loop {
        window.report_closed();
        let chunk = if window.inflight == 0 {
            match rx.recv().await {
                Some(chunk) => chunk,
                None => return Ok(()),
            }
        } else {
            // Idle input: the next chunk or the oldest ack, whichever comes first.
            let next = {
                let Some(Pending::Ack(head, _, _)) = window.queue.front_mut() else {
                    unreachable!("the head of a queue with events in flight is an event")
                };
                tokio::select! {
                    biased;
                    chunk = rx.recv() => Ok(chunk),
                    acked = head => Err(acked),
                }
            };
            match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Ok(()),
                Err(acked) => {
                    let Some(Pending::Ack(_, subject, bytes)) = window.queue.pop_front() else {
                        unreachable!("the head was an event")
                    };
                    acked.map_err(|e| not_acked(&subject, e))?;
                    window.acked(bytes);
                    continue;
                }
            }
        };
        for ev in chunk {
            let Some(grouper) = grouper.as_mut() else {
                match ev {
                    EventOut::Close(unit) => window.close(unit),
                    EventOut::Change(c) => {
                        let (subject, msg_id, payload) =
                            enc.encode(|t, op| notifier.change_subject(t, op), &c);
                        window.publish(subject, &msg_id, None, payload).await?;
                    }
                    EventOut::Txn(t) => {
                        let (subject, msg_id, payload) = encode_txn(&notifier, &t);
                        window.publish(subject, &msg_id, None, payload).await?;
                    }
                }
                continue;
            };
            grouper.push(ev, &mut grouped);
            for out in grouped.drain(..) {
                match out {
                    GroupOut::Close(unit) => window.close(unit),
                    GroupOut::Group(g) => {
                        let (subject, msg_id, headers, body) =
                            enc.encode_group(|t| notifier.changes_subject(t), &g);
                        window
                            .publish(subject, &msg_id, Some(headers), body)
                            .await?;
                    }
                    GroupOut::Txn(t) => {
                        let (subject, msg_id, payload) = encode_txn(&notifier, &t);
                        window.publish(subject, &msg_id, None, payload).await?;
                    }
                }
            }
        }
    }
}

/// The messages in flight, in stream order, with the Close markers between them.
struct Window<'a> {
    notifier: &'a Notifier,
    queue: VecDeque<Pending>,
    /// Unacknowledged messages (at most [`WINDOW`]: the server's cost is per message) ...
    inflight: usize,
    /// ... and their payload bytes (at most [`WINDOW_BYTES`] before a new one: memory).
    inflight_bytes: usize,
    persisted: &'a mpsc::UnboundedSender<BatchId>,
}

impl Window<'_> {
    /// A unit's Close marker: reported now if nothing is in flight before it, else queued.
    fn close(&mut self, unit: BatchId) {
        if self.queue.is_empty() {
            let _ = self.persisted.send(unit);
        } else {
            self.queue.push_back(Pending::Close(unit));
        }
    }

    /// Publishes one message behind the ones in flight, first waiting for the oldest ack while
    /// the window is full.
    async fn publish(
        &mut self,
        subject: Subject,
        msg_id: &str,
        headers: Option<HeaderMap>,
        payload: Vec<u8>,
    ) -> Result<(), Error> {
        while self.inflight >= WINDOW
            || (self.inflight > 0 && self.inflight_bytes + payload.len() > WINDOW_BYTES)
        {
            let Some(Pending::Ack(head, subject, bytes)) = self.queue.pop_front() else {
                unreachable!("the head of a queue with events in flight is an event")
            };
            head.await.map_err(|e| not_acked(&subject, e))?;
            self.acked(bytes);
            self.report_closed();
        }
        let bytes = payload.len();
        let fut = match headers {
            None => {
                self.notifier
                    .publish_pipelined(subject.clone(), msg_id, payload.into())
                    .await?
            }
            Some(headers) => {
                self.notifier
                    .publish_pipelined_with_headers(
                        subject.clone(),
                        msg_id,
                        headers,
                        payload.into(),
                    )
                    .await?
            }
        };
        self.queue
            .push_back(Pending::Ack(fut.into_future(), subject, bytes));
        self.inflight += 1;
        self.inflight_bytes += bytes;
        Ok(())
    }

    /// The oldest message in flight was acknowledged.
    fn acked(&mut self, bytes: usize) {
        self.inflight -= 1;
        self.inflight_bytes -= bytes;
    }

    /// Reports the Close markers at the head of the queue (every message before them is
    /// acknowledged).
    fn report_closed(&mut self) {
        while let Some(Pending::Close(unit)) = self.queue.front() {
            let _ = self.persisted.send(*unit);
            self.queue.pop_front();
        }
    }
}

/// A transaction boundary's subject, message id (without the incarnation prefix) and payload:
/// `{"changes","commit_lsn","commit_ts","xid"}` (sorted keys, like the change events).
fn encode_txn(notifier: &Notifier, t: &TxnBoundary) -> (Subject, String, Vec<u8>) {
    let subject = notifier.txn_subject(if t.commit { "commit" } else { "begin" });
    let msg_id = format!("{subject}:{}", t.commit_lsn);
    let payload = serde_json::to_vec(&serde_json::json!({
        "changes": t.changes,
        "commit_lsn": t.commit_lsn.to_string(),
        "commit_ts": crate::core::batch::format_commit_ts(t.commit_ts),
        "xid": t.xid,
    }))
    .expect("JSON serializes");
    (Subject::from(subject.as_str()), msg_id, payload)
}

fn not_acked(subject: &Subject, e: PublishError) -> Error {
    Error::transient(
        Component::Nats,
        format!("change event on {subject} not acknowledged: {e}"),
    )
}

/// What is the same for every change of a table: its four subjects and its name as a JSON string.
struct TableText {
    subjects: [Subject; 4],
    /// `"schema.table"`, quoted and escaped.
    json_name: String,
}

/// Builds subjects, message ids and payloads, caching per table and per commit.
#[derive(Default)]
struct Encoder {
    tables: HashMap<TableName, TableText>,
    /// The last commit timestamp and its text, quoted (events of a transaction share it).
    ts: Option<(i64, String)>,
    /// The last commit LSN and its text.
    lsn: Option<(Lsn, String)>,
    /// Per table, the subject of its groups and its `Cdc-Table` header value.
    groups: HashMap<TableName, (Subject, String)>,
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate => 3,
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing JSON to a Vec");
}

impl Encoder {
    /// The event's subject, message id (without the notifier's incarnation prefix) and payload:
    /// `{"commit_lsn","commit_ts","csv","op","seq","table","xid"}`, in that order.
    fn encode(
        &mut self,
        change_subject: impl Fn(&TableName, &str) -> String,
        c: &ChangeEvent,
    ) -> (Subject, String, Vec<u8>) {
        use std::fmt::Write as _;
        let text = self.tables.entry(c.table.clone()).or_insert_with(|| {
            let subject = |op: Op| Subject::from(change_subject(&c.table, op.word()).as_str());
            let mut json_name = Vec::new();
            json_str(&mut json_name, &c.table.dotted());
            TableText {
                subjects: [
                    subject(Op::Insert),
                    subject(Op::Update),
                    subject(Op::Delete),
                    subject(Op::Truncate),
                ],
                json_name: String::from_utf8(json_name).expect("JSON is UTF-8"),
            }
        });
        let subject = text.subjects[op_index(c.op)].clone();
        if self.lsn.as_ref().map(|(l, _)| *l) != Some(c.position.commit_lsn) {
            self.lsn = Some((c.position.commit_lsn, c.position.commit_lsn.to_string()));
        }
        if self.ts.as_ref().map(|(t, _)| *t) != Some(c.commit_ts) {
            let mut quoted = Vec::new();
            json_str(
                &mut quoted,
                &crate::core::batch::format_commit_ts(c.commit_ts),
            );
            self.ts = Some((
                c.commit_ts,
                String::from_utf8(quoted).expect("JSON is UTF-8"),
            ));
        }
        let lsn = &self.lsn.as_ref().expect("set above").1;
        let ts = &self.ts.as_ref().expect("set above").1;

        // The subject names the source and the table: ids of sources sharing the stream differ.
        let mut msg_id = String::with_capacity(subject.len() + lsn.len() + 12);
        let _ = write!(msg_id, "{subject}:{lsn}:{}", c.position.seq);

        let mut p = Vec::with_capacity(c.csv_row.len() + text.json_name.len() + 128);
        p.extend_from_slice(b"{\"commit_lsn\":\"");
        p.extend_from_slice(lsn.as_bytes()); // hex digits and '/': nothing to escape
        p.extend_from_slice(b"\",\"commit_ts\":");
        p.extend_from_slice(ts.as_bytes());
        p.extend_from_slice(b",\"csv\":");
        match std::str::from_utf8(&c.csv_row) {
            Ok(s) => json_str(&mut p, s),
            Err(_) => json_str(&mut p, &String::from_utf8_lossy(&c.csv_row)),
        }
        p.extend_from_slice(b",\"op\":\"");
        p.extend_from_slice(c.op.word().as_bytes());
        let _ = write!(
            ByteWriter(&mut p),
            "\",\"seq\":{},\"table\":{},\"xid\":{}}}",
            c.position.seq,
            text.json_name,
            c.xid
        );
        (subject, msg_id, p)
    }
}

impl Encoder {
    /// A group's subject, message id (without the notifier's incarnation prefix), headers and body
    /// (README "Grouped change events"). The id names the source, the table and the group's first
    /// position, which the grouping fixes whatever the timing: a replayed group has the same id.
    fn encode_group(
        &mut self,
        changes_subject: impl Fn(&TableName) -> String,
        g: &ChangeGroup,
    ) -> (Subject, String, HeaderMap, Vec<u8>) {
        let (first, last) = (g.first(), g.last());
        let (subject, table) = self.groups.entry(first.table.clone()).or_insert_with(|| {
            let subject = Subject::from(changes_subject(&first.table).as_str());
            (subject, header_table(&first.table))
        });
        let lsn = first.position.commit_lsn.to_string();
        let msg_id = format!("{subject}:{lsn}:{}", first.position.seq);
        let mut h = HeaderMap::new();
        h.insert("Cdc-Commit-Lsn", lsn);
        h.insert(
            "Cdc-Commit-Ts",
            crate::core::batch::format_commit_ts(first.commit_ts),
        );
        h.insert("Cdc-Xid", first.xid.to_string());
        h.insert("Cdc-First-Seq", first.position.seq.to_string());
        h.insert("Cdc-Last-Seq", last.position.seq.to_string());
        h.insert("Cdc-Rows", g.changes.len().to_string());
        h.insert("Cdc-Table", table.as_str());
        (subject.clone(), msg_id, h, g.body())
    }
}

/// The `Cdc-Table` value: the schema's and the table's subject tokens (`.`, `*`, `>`, `%`,
/// whitespace and control characters percent-encoded), joined by `.`, as in the subject. So it
/// splits at its one unencoded `.`, decodes back to the two names, and holds no CR or LF (which a
/// NATS header cannot) and no leading or trailing space (which NATS clients trim).
fn header_table(t: &TableName) -> String {
    use crate::sink::notify::subject_token;
    format!("{}.{}", subject_token(&t.schema), subject_token(&t.name))
}

/// `fmt::Write` into a byte vector.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::batch::Position;

    /// The payload is byte for byte what `serde_json::json!` produced before (sorted keys), also
    /// for rows that need escaping and for a row that is not UTF-8.
    #[test]
    fn payload_equals_the_json_object() {
        let change_subject = |t: &TableName, op: &str| {
            format!(
                "{}.{op}",
                crate::sink::notify::notice_subject("cdc.src", "change", t)
            )
        };
        let mut enc = Encoder::default();
        let rows: [&[u8]; 4] = [
            b"0/1A2B,42,2024-01-01 00:00:00+00,I,1,\"a \"\"quoted\"\" \\ value\"\n",
            b"plain,row\n",
            b"\x01\x1f tab\t and \xc3\xa9\n",
            b"bad \xff utf8\n",
        ];
        for (i, row) in rows.iter().enumerate() {
            for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
                let c = ChangeEvent {
                    unit: BatchId(i as u64),
                    table: TableName::new("my.schema", "t \"1\""),
                    op,
                    position: Position::new(Lsn(0x1_0000_00AB + i as u64 / 2), i as u32),
                    xid: 77 + i as u32,
                    commit_ts: 789_000_000_123_456 + (i as i64 / 2),
                    csv_row: bytes::Bytes::copy_from_slice(row),
                };
                let (subject, msg_id, payload) = enc.encode(change_subject, &c);
                let want_subject = change_subject(&c.table, c.op.word());
                assert_eq!(subject.as_str(), want_subject);
                assert_eq!(
                    msg_id,
                    format!(
                        "{want_subject}:{}:{}",
                        c.position.commit_lsn, c.position.seq
                    )
                );
                let want = serde_json::json!({
                    "table": c.table.dotted(),
                    "op": c.op.word(),
                    "commit_lsn": c.position.commit_lsn.to_string(),
                    "seq": c.position.seq,
                    "xid": c.xid,
                    "commit_ts": crate::core::batch::format_commit_ts(c.commit_ts),
                    "csv": String::from_utf8_lossy(&c.csv_row),
                });
                assert_eq!(
                    String::from_utf8(payload).unwrap(),
                    serde_json::to_string(&want).unwrap()
                );
            }
        }
    }

    /// A group's message: subject, id from its first position, headers that agree with its rows,
    /// and the rows' CSV bytes as the body; a table name with a line break stays one header line.
    #[test]
    fn a_group_is_one_message_with_its_rows() {
        use crate::core::batch::event_groups::{EventGrouper, GroupLimits, GroupOut};
        let changes_subject =
            |t: &TableName| crate::sink::notify::notice_subject("cdc.src", "changes", t);
        let table = TableName::new("my.schema", "t\r\n1");
        let mut grouper = EventGrouper::new(GroupLimits::default());
        let mut out = Vec::new();
        for seq in [3u32, 4, 6] {
            grouper.push(
                EventOut::Change(ChangeEvent {
                    unit: BatchId(9),
                    table: table.clone(),
                    op: Op::Insert,
                    position: Position::new(Lsn(0x1_0000_00AB), seq),
                    xid: 77,
                    commit_ts: 789_000_000_123_456,
                    csv_row: bytes::Bytes::from(format!("\"I\",\"0/1000000AB\",\"{seq}\"\n")),
                }),
                &mut out,
            );
        }
        grouper.push(EventOut::Close(BatchId(9)), &mut out);
        let GroupOut::Group(g) = &out[0] else {
            panic!("{out:?}")
        };
        let (subject, msg_id, headers, body) = Encoder::default().encode_group(changes_subject, g);
        assert_eq!(subject.as_str(), "cdc.src.changes.my%2Eschema.t%0D%0A1");
        assert_eq!(msg_id, format!("{subject}:1/AB:3"));
        let h = |k: &str| headers.get(k).unwrap().as_str().to_string();
        assert_eq!(h("Cdc-Commit-Lsn"), "1/AB");
        assert_eq!(
            h("Cdc-Commit-Ts"),
            crate::core::batch::format_commit_ts(789_000_000_123_456)
        );
        assert_eq!(h("Cdc-Xid"), "77");
        assert_eq!(h("Cdc-First-Seq"), "3");
        assert_eq!(h("Cdc-Last-Seq"), "6");
        assert_eq!(h("Cdc-Rows"), "3");
        assert_eq!(h("Cdc-Table"), "my%2Eschema.t%0D%0A1");
        assert!(subject
            .as_str()
            .ends_with(&format!(".changes.{}", h("Cdc-Table"))));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "\"I\",\"0/1000000AB\",\"3\"\n\"I\",\"0/1000000AB\",\"4\"\n\"I\",\"0/1000000AB\",\"6\"\n"
        );
    }
}
