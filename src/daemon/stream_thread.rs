//! The stream thread: one OS thread reads the replication socket, runs the pure [`Batcher`] on every
//! message in stream order, and answers the server, so nothing crosses a thread between the socket
//! and the spool files.
//!
//! # Why one thread
//! Measured on 2 cores (benches/README.md, "TCP: where the time goes"): the walsender needs one core
//! to itself. When a reader task handed chunks of frames to a separate batcher thread, two busy
//! threads of ours ran beside the walsender, which was preempted 20K–94K times per run (about 1K
//! when it served `pg_recvlogical`) and used 30–80% more CPU for the same WAL. The same build pinned
//! to one core kept up much better (0.82× of `pg_recvlogical` instead of 0.70×). This thread does the
//! reading, decoding, encoding and spooling without any hand-off, so it is the one busy thread.
//!
//! # The loop
//! 1. Every complete frame already in the read buffer is applied, without a system call: XLogData to
//!    the Batcher (a Relation first gets its catalog facts, a query run on the runtime with
//!    `Handle::block_on`, once per table and schema change), keepalives as positions (one asking
//!    for a reply makes a status update due).
//! 2. Every [`STEP_FRAMES`] frames, and whenever the buffer runs dry, a *step*: the delivery's
//!    persisted reports and the reload coordinator's releases are applied, the clock ticks the
//!    time-based seals, what the Batcher produced goes out (sealed batches to the delivery, change
//!    events to the publisher, reload controls to the coordinator), the confirmed LSN is published,
//!    and a status update is sent if [`StatusPolicy`] says one is due.
//! 3. With the buffer dry, one read, blocking at most [`READ_TIMEOUT`]. Over TCP the read is made at
//!    once: the walsender's small segments are acknowledged as they are read, so a reader that
//!    sleeps to let a burst build up throttles the sender (measured: a 200 µs wait after each read
//!    under 32 KiB halved the throughput, with a 4 MiB receive buffer too). Over a unix socket
//!    nothing paces the sender but its buffer, and every message it writes wakes a blocked reader:
//!    there, after a read under [`COALESCE_BELOW`], the thread first sleeps [`COALESCE_WAIT`], and
//!    the next read takes the whole burst. `CDC_EGRESS_READ_COALESCE_US` (microseconds, 0 = never)
//!    overrides that wait: a benchmark knob, not configuration.
//!
//! # Invariants
//! - **Stream order**: frames are applied in the order they were read, by this thread alone.
//! - **The ack**: the flush position of every status update is `Batcher::confirmed()` after the
//!   persisted reports received so far (`core::ack`, invariant 1 of ARCHITECTURE.md), so it never
//!   passes an unpersisted change; `core::ack::status` keeps it monotonic.
//! - **The server is answered while we wait**: the thread blocks only in a read (at most
//!   [`READ_TIMEOUT`]), a spool write, a catalog query, or while an output channel is full; it
//!   waits for room in slices of [`READ_TIMEOUT`] and applies persisted reports and sends due
//!   status updates in between. A stalled sink therefore backpressures the walsender through TCP,
//!   and the walsender, still answered, does not drop us at `wal_sender_timeout`.
//! - **Stop**: the flag is seen within [`READ_TIMEOUT`] (or when a wait for room ends). Open batches
//!   are abandoned: they are above the confirmed LSN and come again from the slot. The thread hands
//!   its state back; [`StreamState::settle`] applies the last persisted reports once the delivery has
//!   finished and sends the final status update and CopyDone, also after an error (if the socket
//!   still works).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};

use super::reloads::Release;
use crate::core::ack::status::{StatusPolicy, Wake};
use crate::core::ack::BatchId;
use crate::core::batch::{Batcher, Control, EventOut, Sealed};
use crate::core::decode::{self, Message, ReplicationFrame};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::slot;
use crate::pg::wire::{CopyItem, CopyStream};
use crate::sink::spool::{GzipSpools, SpooledFile};

/// The longest a read blocks, and the slice in which the thread waits for room in a full output
/// channel: how late it may notice a stop, a reload release or a persisted report on an idle stream.
pub(super) const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// Frames applied between two steps on a busy stream (the step's work is per chunk, not per frame).
pub(super) const STEP_FRAMES: usize = 1024;
/// Over a unix socket, a read of fewer bytes than this makes the thread wait [`COALESCE_WAIT`]
/// before reading again (see the module documentation).
const COALESCE_BELOW: usize = 32 * 1024;
/// How long a trickling stream over a unix socket is let accumulate in the socket buffer.
const COALESCE_WAIT: Duration = Duration::from_micros(200);
/// How often the status policy is woken for its time-based update.
const STATUS_TICK: Duration = Duration::from_millis(250);

/// The coalescing wait for this stream: [`COALESCE_WAIT`] (or the knob's value) over a unix socket,
/// none over TCP.
fn coalesce_wait(stream: &CopyStream) -> Duration {
    if !stream.is_unix_socket() {
        return Duration::ZERO;
    }
    std::env::var("CDC_EGRESS_READ_COALESCE_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(COALESCE_WAIT, Duration::from_micros)
}

pub(super) fn now_unix_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Where the thread's results go.
pub(super) struct Outputs {
    pub sealed: mpsc::Sender<Sealed<SpooledFile>>,
    /// Change events, when `nats.change_events` is on.
    pub events: Option<mpsc::Sender<Vec<EventOut>>>,
    /// Reload controls (markers seen in the stream) for the coordinator.
    pub controls: mpsc::UnboundedSender<Control>,
}

/// What flows into the thread besides the stream and the persisted reports (those are in
/// [`StreamState`]).
pub(super) struct Inputs {
    /// A reload's cut is known: release the table's hold.
    pub releases: mpsc::Receiver<Release>,
    pub stop: Arc<AtomicBool>,
}

/// The stream, the Batcher and the status policy: what the thread owns and hands back when it ends.
pub(super) struct StreamState {
    batcher: Batcher<GzipSpools>,
    stream: CopyStream,
    policy: StatusPolicy,
    /// Persisted reports from the delivery and the change-event publisher (unbounded, so neither can
    /// ever block on this thread).
    persisted: mpsc::UnboundedReceiver<BatchId>,
    confirmed_tx: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
    /// Highest WAL position received (XLogData start, keepalive end): the status update's write.
    received: Lsn,
    /// A keepalive asked for a reply.
    reply_due: bool,
    next_status_tick: Instant,
}

impl StreamState {
    pub(super) fn new(
        batcher: Batcher<GzipSpools>,
        stream: CopyStream,
        status_every: Duration,
        persisted: mpsc::UnboundedReceiver<BatchId>,
        confirmed_tx: watch::Sender<Lsn>,
        metrics: Arc<Metrics>,
    ) -> StreamState {
        StreamState {
            batcher,
            stream,
            policy: StatusPolicy::new(status_every),
            persisted,
            confirmed_tx,
            metrics,
            received: Lsn::ZERO,
            reply_due: false,
            next_status_tick: Instant::now(),
        }
    }

    /// Applies the persisted reports that have arrived, publishes the confirmed LSN and sends the
    /// status updates that are due.
    fn keep_up(&mut self, now: Instant) -> Result<(), Error> {
        while let Ok(id) = self.persisted.try_recv() {
            self.batcher.persisted(id);
        }
        let c = self.batcher.confirmed();
        let moved = self.confirmed_tx.send_if_modified(|v| {
            let changed = *v != c;
            *v = c;
            changed
        });
        if moved {
            self.status(Wake::Confirmed, now)?;
        }
        if std::mem::take(&mut self.reply_due) {
            self.status(Wake::ReplyRequested, now)?;
        }
        if now >= self.next_status_tick {
            self.next_status_tick = now + STATUS_TICK;
            self.status(Wake::Tick, now)?;
        }
        Ok(())
    }

    /// Wakes the status policy and sends the update it asks for (flush = apply = confirmed).
    fn status(&mut self, wake: Wake, now: Instant) -> Result<(), Error> {
        let confirmed = self.batcher.confirmed();
        if self.policy.flush_would_move(confirmed) && confirmed != Lsn::ZERO {
            crate::failpoint::hit("before_status");
        }
        if let Some(u) = self.policy.on_wake(wake, now, confirmed, self.received) {
            let clock = decode::utc_to_pg_micros(chrono::Utc::now());
            let msg = decode::standby_status_update(u.write, u.flush, u.apply, clock, false);
            self.stream.send(&msg)?;
            self.metrics.confirmed_lsn.set(u.flush.0);
        }
        Ok(())
    }

    /// After the thread stopped and the delivery finished: applies the persisted reports that came
    /// in meanwhile, publishes the confirmed LSN they allow, and ends the stream with the final
    /// status update and CopyDone (failures are only logged: the session is over either way).
    pub(super) fn settle(mut self) {
        while let Ok(id) = self.persisted.try_recv() {
            self.batcher.persisted(id);
        }
        let c = self.batcher.confirmed();
        let _ = self.confirmed_tx.send(c);
        let ended = self
            .status(Wake::Stopping, Instant::now())
            .and_then(|()| self.stream.finish());
        if let Err(e) = ended {
            tracing::debug!(error = %e, "could not send the final status update");
        }
    }
}

/// The thread: see the module documentation.
pub(super) struct StreamThread {
    pub state: StreamState,
    pub inputs: Inputs,
    pub outputs: Outputs,
    /// For the catalog queries of Relation messages.
    pub catalog: Arc<tokio_postgres::Client>,
    pub runtime: Handle,
    /// How often the Batcher's clock ticks (time-based seals).
    pub tick_every: Duration,
}

impl StreamThread {
    /// Runs until stopped or the first error; hands back its state either way.
    pub(super) fn run(mut self) -> (StreamState, Result<(), Error>) {
        let result = self.stream();
        (self.state, result)
    }

    fn stream(&mut self) -> Result<(), Error> {
        let wait = coalesce_wait(&self.state.stream);
        let mut step = Step::default();
        let mut next_tick = Instant::now();
        let mut last_read = 0;
        loop {
            let mut applied = 0;
            while let Some(item) = self.state.stream.next_buffered()? {
                let CopyItem::Data(payload) = item else {
                    return Err(Error::transient(
                        Component::Source,
                        "the server ended the replication stream",
                    ));
                };
                self.apply(payload, &mut step)?;
                applied += 1;
                if applied == STEP_FRAMES {
                    applied = 0;
                    self.step(&mut step, &mut next_tick)?;
                    if self.inputs.stop.load(Relaxed) {
                        return Ok(());
                    }
                }
            }
            self.step(&mut step, &mut next_tick)?;
            if self.inputs.stop.load(Relaxed) {
                return Ok(());
            }
            if last_read > 0 && last_read < COALESCE_BELOW && !wait.is_zero() {
                std::thread::sleep(wait);
            }
            last_read = self.state.stream.fill()?;
        }
    }

    /// One CopyData payload of the stream.
    fn apply(&mut self, payload: Bytes, step: &mut Step) -> Result<(), Error> {
        let frame = decode::parse_frame(payload).map_err(|e| {
            Error::definite(
                Component::Decode,
                format!("undecodable replication frame: {e}"),
            )
        })?;
        let state = &mut self.state;
        match frame {
            ReplicationFrame::XLogData {
                wal_start, data, ..
            } => {
                step.messages += 1;
                state.received = state.received.max(wal_start);
                if data.first() == Some(&b'R') {
                    return self.relation(data, step);
                }
                let msg = decode::decode(data).map_err(|e| {
                    Error::definite(
                        Component::Decode,
                        format!("undecodable pgoutput message: {e}"),
                    )
                })?;
                state.batcher.message(msg, &mut step.sealed)
            }
            ReplicationFrame::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                state.received = state.received.max(wal_end);
                state.reply_due |= reply_requested;
                state.batcher.keepalive(wal_end);
                Ok(())
            }
        }
    }

    /// A Relation message, with the catalog facts the pgoutput message does not carry.
    fn relation(&mut self, data: Bytes, step: &mut Step) -> Result<(), Error> {
        let Message::Relation(rel) = decode::decode(data).map_err(|e| {
            Error::definite(
                Component::Decode,
                format!("undecodable Relation message: {e}"),
            )
        })?
        else {
            unreachable!("tag R decodes to a Relation")
        };
        let schema = self
            .runtime
            .block_on(slot::describe_relation(&self.catalog, &rel))?;
        self.state.batcher.relation(schema, &mut step.sealed)
    }

    /// Inputs in, results out, the confirmed LSN and the status updates (step 2 of the loop).
    fn step(&mut self, step: &mut Step, next_tick: &mut Instant) -> Result<(), Error> {
        let metrics = &self.state.metrics;
        metrics
            .messages_received
            .inc_by(std::mem::take(&mut step.messages));
        metrics
            .received_lsn
            .inner()
            .fetch_max(self.state.received.0, Relaxed);
        let now = Instant::now();
        while let Ok(id) = self.state.persisted.try_recv() {
            self.state.batcher.persisted(id);
        }
        while let Ok(r) = self.inputs.releases.try_recv() {
            let n = self
                .state
                .batcher
                .release_hold(&r.table, r.cut, &mut step.sealed)?;
            tracing::debug!(table = %r.table, cut = %r.cut, released = n, "hold released");
        }
        if now >= *next_tick {
            *next_tick = now + self.tick_every;
            self.state.batcher.tick(now_unix_us(), &mut step.sealed)?;
        }
        self.state.batcher.drain_controls(&mut step.controls);
        for c in step.controls.drain(..) {
            match c {
                Control::MalformedMarker { commit_lsn, error } => {
                    tracing::warn!(%error, commit = %commit_lsn, "ignoring a malformed cdc-egress marker message");
                }
                reload => {
                    let _ = self.outputs.controls.send(reload);
                }
            }
        }
        for b in step.sealed.drain(..) {
            let b = b.map_spool(|spool| {
                spool.finish().map_err(|e| {
                    Error::transient(Component::Spool, format!("cannot finish spool file: {e}"))
                })
            })?;
            send_answering(
                &self.runtime,
                &self.outputs.sealed,
                b,
                &mut self.state,
                "delivery",
            )?;
        }
        if let Some(tx) = &self.outputs.events {
            // One hand-off (and at most one wake-up of the publisher) per step, not per change.
            self.state.batcher.drain_change_events(&mut step.events);
            if !step.events.is_empty() {
                let events = std::mem::take(&mut step.events);
                send_answering(
                    &self.runtime,
                    tx,
                    events,
                    &mut self.state,
                    "change-event publisher",
                )?;
            }
        }
        self.state.keep_up(now)?;
        let open = self.state.batcher.open_batches() as i64;
        self.state.metrics.pending_batches.set(open);
        Ok(())
    }
}

/// What one step collects from the Batcher.
#[derive(Default)]
struct Step {
    sealed: Vec<Sealed<crate::sink::spool::GzipSpool>>,
    events: Vec<EventOut>,
    controls: Vec<Control>,
    /// XLogData messages applied since the last step (a metric).
    messages: u64,
}

/// Sends `item`, waiting for room in slices of [`READ_TIMEOUT`] during which the server is still
/// answered ([`StreamState::keep_up`]); an error if the receiving task is gone.
fn send_answering<T>(
    runtime: &Handle,
    tx: &mpsc::Sender<T>,
    item: T,
    state: &mut StreamState,
    receiver: &str,
) -> Result<(), Error> {
    let gone = || Error::transient(Component::Daemon, format!("the {receiver} stopped"));
    let mut item = item;
    loop {
        match tx.try_send(item) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(gone()),
            Err(TrySendError::Full(back)) => item = back,
        }
        match runtime.block_on(tokio::time::timeout(READ_TIMEOUT, tx.reserve())) {
            Ok(Ok(permit)) => {
                permit.send(item);
                return Ok(());
            }
            Ok(Err(_)) => return Err(gone()),
            Err(_) => state.keep_up(Instant::now())?,
        }
    }
}
