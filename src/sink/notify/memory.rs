//! An in-memory [`Publish`]: a test double with the contract of the JetStream notifier, for tests of
//! delivery and recovery that should not need a server.
//!
//! # Why it keeps the contract
//! The "stream" is a vector behind one mutex; `publish_once` runs under it without awaiting, so
//! publishes are atomic and linearizable. The message stored at index `i` has sequence `i + 1`:
//! sequences are positive and strictly increasing. A publish whose id is that of the last message
//! on its subject is answered with that message's sequence, as the notifier's first step does. Its
//! duplicate window is unbounded (every message ever stored counts), which is the in-window case of
//! the contract: any other message whose id is already stored is answered with the original
//! sequence when subject and payload match, and is an id collision (definite) when they do not. `tests/notifier_conformance.rs` runs the same checks
//! against this double and against nats-server.
//!
//! # Beyond the contract
//! Failures can be injected ([`MemoryNotifier::fail_next`], see [`crate::sink::fault`]), calls are
//! counted ([`MemoryNotifier::calls`]), and what was stored can be read back
//! ([`MemoryNotifier::published`]). With [`MemoryNotifier::with_schemas`] it also keeps a schema
//! bucket in memory: per key every stored value in order (a history without limit), written by the
//! same rule as the JetStream bucket ([`super::schemas::supersedes`] under the same lock).

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::schemas::{supersedes, SchemaEntry, SchemaHead};
use super::Publish;
use crate::error::{Component, Error};
use crate::sink::fault::{Fault, Faults};

/// The one operation of [`Publish`] that touches the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PublishOnce;

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub subject: String,
    /// The id given to `publish_once` (a real notifier prefixes it with the registry incarnation).
    pub id: String,
    pub payload: Bytes,
}

#[derive(Default)]
struct State {
    /// Message `i` has sequence `i + 1`.
    messages: Vec<Published>,
    faults: Faults<PublishOnce>,
    /// The schema bucket: every value stored per key, oldest first; `None`: not kept.
    schemas: Option<std::collections::BTreeMap<String, Vec<Bytes>>>,
}

/// A stream in memory; clones share it (like clones of a [`super::Notifier`] share a stream).
#[derive(Clone)]
pub struct MemoryNotifier {
    prefix: String,
    state: Arc<Mutex<State>>,
}

impl MemoryNotifier {
    /// An empty stream whose notice subjects start with `prefix`.
    pub fn new(prefix: &str) -> Self {
        MemoryNotifier {
            prefix: prefix.to_string(),
            state: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `n` calls of `publish_once` fail with `fault` (after failures armed earlier).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        self.lock().faults.arm(PublishOnce, n, fault);
    }

    /// How many times `publish_once` was called, failed calls included.
    pub fn calls(&self) -> usize {
        self.lock().faults.calls(PublishOnce)
    }

    /// Every stored message, in sequence order.
    pub fn published(&self) -> Vec<Published> {
        self.lock().messages.clone()
    }

    /// The same notifier, keeping a schema bucket (empty at first).
    pub fn with_schemas(self) -> Self {
        self.lock().schemas = Some(Default::default());
        self
    }

    /// Every value stored under `key` in the schema bucket, oldest first.
    pub fn schema_history(&self, key: &str) -> Vec<Bytes> {
        let state = self.lock();
        let kept = state.schemas.as_ref().and_then(|s| s.get(key));
        kept.cloned().unwrap_or_default()
    }

    /// The head of the newest value under `key` (`None`: none, or not an entry).
    fn stored_head(state: &State, key: &str) -> Option<SchemaHead> {
        let kept = state.schemas.as_ref()?.get(key)?.last()?;
        SchemaEntry::head_of(kept)
    }
}

/// Stores the message unless its id is stored already; returns its sequence.
fn publish(s: &mut State, subject: &str, id: &str, payload: Bytes) -> Result<u64, Error> {
    let last_on_subject = s.messages.iter().rev().find(|m| m.subject == subject);
    if let Some(m) = last_on_subject.filter(|m| m.id == id) {
        return Ok(m.seq);
    }
    if let Some(m) = s.messages.iter().find(|m| m.id == id) {
        if m.subject == subject && m.payload == payload {
            return Ok(m.seq);
        }
        return Err(Error::definite(
            Component::Nats,
            format!(
                "Nats-Msg-Id collision: the notice {id} on {subject} is a duplicate of message {} on {} with different content",
                m.seq, m.subject
            ),
        ));
    }
    let seq = s.messages.len() as u64 + 1;
    s.messages.push(Published {
        seq,
        subject: subject.to_string(),
        id: id.to_string(),
        payload,
    });
    Ok(seq)
}

impl Publish for MemoryNotifier {
    fn subject_prefix(&self) -> &str {
        &self.prefix
    }

    async fn publish_once(&self, subject: &str, id: &str, payload: Bytes) -> Result<u64, Error> {
        let mut state = self.lock();
        let what = || format!("publish on {subject}");
        match state.faults.enter(PublishOnce) {
            None => publish(&mut state, subject, id, payload),
            Some(Fault::TransientAfter) => {
                publish(&mut state, subject, id, payload)?;
                Err(Fault::TransientAfter.error(Component::Nats, &what()))
            }
            Some(f) => Err(f.error(Component::Nats, &what())),
        }
    }

    fn keeps_schemas(&self) -> bool {
        self.lock().schemas.is_some()
    }

    async fn schema_current(&self, key: &str, head: &SchemaHead) -> Result<bool, Error> {
        let state = self.lock();
        Ok(!supersedes(head, Self::stored_head(&state, key).as_ref()))
    }

    async fn put_schema(&self, key: &str, head: &SchemaHead, value: Bytes) -> Result<bool, Error> {
        let mut state = self.lock();
        if !supersedes(head, Self::stored_head(&state, key).as_ref()) {
            return Ok(false);
        }
        let Some(bucket) = state.schemas.as_mut() else {
            return Err(Error::definite(
                Component::Nats,
                "internal: this notifier keeps no schema bucket",
            ));
        };
        bucket.entry(key.to_string()).or_default().push(value);
        Ok(true)
    }
}
