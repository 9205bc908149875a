//! JetStream notices (PRODUCT.md §8).
//!
//! # Contract
//! - The stream `nats.stream` exists on `<prefix>.>` with file storage (created if missing; an existing
//!   stream that does not capture `<prefix>.>` is a definite error).
//! - A notice is published at most once and, once [`Notifier::publish_once`] returns, exactly once:
//!   1. it reads the last message on the notice's subject; if that message carries our `Nats-Msg-Id`,
//!      the notice is already stored (a previous run crashed after the publish, before recording the
//!      sequence) and its sequence is returned;
//!   2. otherwise it publishes with `Nats-Msg-Id` = batch id **and**
//!      `Nats-Expected-Last-Subject-Sequence` = the sequence found in step 1, then awaits the PubAck.
//!
//!   The id gives de-duplication inside the stream's duplicate window; the subject-sequence condition
//!   gives it after any downtime, because notices of one subject are published one at a time, in
//!   registry order, by one process holding the slot. (It relies on the stream keeping the last
//!   message of each notice subject: do not give the stream limits that discard it.)
//! - Subjects: `<prefix>.batch.<schema>.<table>`, `<prefix>.reload.…`, `<prefix>.ddl.…`,
//!   `<prefix>.change.<schema>.<table>.<op>`. Schema and table names are one subject token each:
//!   characters that NATS reserves (`.`, `*`, `>`, whitespace, `%`) are percent-encoded.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;

use crate::config::NatsConfig;
use crate::error::Error;
use crate::table::TableName;

#[derive(Clone)]
pub struct Notifier {
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

fn transient(what: &str, e: impl std::fmt::Display) -> Error {
    Error::transient("nats", format!("NATS {what}: {e}"))
}

/// One subject token from a name: reserved characters percent-encoded.
pub fn subject_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '.' | '*' | '>' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_whitespace() || c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

impl Notifier {
    /// Connects (failing fast with a clear message when the server is down) and makes sure the
    /// stream exists.
    pub async fn connect(cfg: &NatsConfig) -> Result<Option<Notifier>, Error> {
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .name("cdc-egress")
            .connect(url.expose())
            .await
            .map_err(|e| {
                transient(
                    &format!("connect to {}", url.redacted()),
                    format!("{e}; is nats-server running with JetStream (-js)?"),
                )
            })?;
        let js = jetstream::new(client);
        let n = Notifier {
            js,
            stream: cfg.stream.clone(),
            prefix: cfg.subject_prefix.clone(),
        };
        n.ensure_stream().await?;
        Ok(Some(n))
    }

    async fn ensure_stream(&self) -> Result<(), Error> {
        let wanted = format!("{}.>", self.prefix);
        let mut s = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![wanted.clone()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| transient(&format!("create or open stream {}", self.stream), e))?;
        let info = s
            .info()
            .await
            .map_err(|e| transient(&format!("stream {} info", self.stream), e))?;
        if !info
            .config
            .subjects
            .iter()
            .any(|x| x == &wanted || x == ">")
        {
            return Err(Error::definite(
                "nats",
                format!(
                    "JetStream stream {} exists with subjects {:?} but does not capture {wanted}: \
                     add the subject to the stream or choose another nats.stream / nats.subject_prefix",
                    self.stream, info.config.subjects
                ),
            ));
        }
        Ok(())
    }

    fn subject(&self, kind: &str, table: &TableName) -> String {
        format!(
            "{}.{kind}.{}.{}",
            self.prefix,
            subject_token(&table.schema),
            subject_token(&table.name)
        )
    }

    pub fn batch_subject(&self, table: &TableName) -> String {
        self.subject("batch", table)
    }
    pub fn reload_subject(&self, table: &TableName) -> String {
        self.subject("reload", table)
    }
    pub fn ddl_subject(&self, table: &TableName) -> String {
        self.subject("ddl", table)
    }
    pub fn change_subject(&self, table: &TableName, op: &str) -> String {
        format!("{}.{op}", self.subject("change", table))
    }

    /// Publishes `payload` on `subject` with `msg_id` exactly once (see the module contract) and
    /// returns its stream sequence.
    pub async fn publish_once(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<u64, Error> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| transient(&format!("open stream {}", self.stream), e))?;
        for _ in 0..5 {
            let expected = match stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => {
                    let id = m
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .map(|v| v.as_str().to_string());
                    if id.as_deref() == Some(msg_id) {
                        return Ok(m.sequence);
                    }
                    m.sequence
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
                Err(e) => return Err(transient(&format!("read last message on {subject}"), e)),
            };
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(msg_id)
                .expected_last_subject_sequence(expected);
            let ack = self
                .js
                .send_publish(subject.to_string(), publish)
                .await
                .map_err(|e| transient(&format!("publish on {subject}"), e))?;
            match ack.await {
                Ok(a) => return Ok(a.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(transient(&format!("publish ack on {subject}"), e)),
            }
        }
        Err(Error::definite(
            "nats",
            format!(
                "another publisher keeps writing to {subject}: cdc-egress must be the only publisher of its notice subjects"
            ),
        ))
    }

    /// The newest `limit` messages of the stream on `<prefix>.>` as (sequence, subject, payload), oldest
    /// first: what `cdc-egress notices` prints.
    pub async fn recent(&self, limit: u64) -> Result<Vec<(u64, String, Bytes)>, Error> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| transient(&format!("open stream {}", self.stream), e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| transient(&format!("stream {} info", self.stream), e))?
            .state
            .clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let from = state
            .last_sequence
            .saturating_sub(limit.saturating_sub(1))
            .max(state.first_sequence);
        for seq in from..=state.last_sequence {
            match stream.get_raw_message(seq).await {
                Ok(m) => out.push((m.sequence, m.subject.to_string(), m.payload)),
                Err(e) if e.to_string().contains("not found") => continue,
                Err(e) => return Err(transient(&format!("read message {seq}"), e)),
            }
        }
        Ok(out)
    }

    /// Starts a pipelined publish (change events); await the returned future for the PubAck.
    pub async fn publish_pipelined(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(msg_id);
        self.js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| transient(&format!("publish on {subject}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_single_tokens() {
        assert_eq!(subject_token("public"), "public");
        assert_eq!(subject_token("my.schema"), "my%2Eschema");
        assert_eq!(subject_token("a b*>%"), "a%20b%2A%3E%25");
        assert_eq!(subject_token(""), "%00");
        assert_eq!(subject_token("Ünï"), "Ünï");
    }
}
