//! The stream thread: one OS thread reads the replication socket, runs the pure [`Batcher`] on every
//! message in stream order, and answers the server, so nothing crosses a thread between the socket
//! and the spool files.
//!
//! # Why one thread
//! Measured on 2 cores (benches/README.md, "TCP: where the time goes" and "Measured (2026-12-07: one
//! stream thread)"): the walsender needs one core to itself. When a reader task handed chunks of
//! frames to a separate batcher thread, two busy threads of ours ran beside the walsender, which was
//! preempted 15K–94K times per run (about 1K when it served `pg_recvlogical`) and used 30–80% more
//! CPU for the same WAL. The same build pinned to one core kept up much better (0.81–0.83× of
//! `pg_recvlogical` instead of 0.68–0.72× in the same hour). This thread does the reading, decoding,
//! encoding and spooling without any hand-off, so it is the one busy thread.
//!
//! # The loop
//! 1. Every complete frame already in the read buffer is applied, without a system call: XLogData to
//!    the Batcher (a Relation first gets its catalog facts, a query run on the runtime with
//!    `Handle::block_on`, once per table and schema change), keepalives as positions (one asking
//!    for a reply makes a status update due). Over a unix socket, every [`TOP_UP_FRAMES`] frames
//!    the buffer is topped up with what has arrived meanwhile, by a read that never waits, so the
//!    walsender's small send buffer does not fill while the thread compresses or seals
//!    (`pg::wire::blocking`, "Draining a unix socket between reads").
//! 2. Every [`STEP_FRAMES`] frames, and whenever the buffer runs dry, a *step*: the delivery's
//!    persisted reports and the reload coordinator's releases are applied, the clock ticks the
//!    time-based seals, what the Batcher produced goes out (sealed batches to the delivery, change
//!    events to the publisher, reload controls to the coordinator), the confirmed LSN is published,
//!    and a status update is sent if [`StatusPolicy`] says one is due.
//! 3. With the buffer dry, one read, blocking at most [`READ_TIMEOUT`]. Over TCP the read is made at
//!    once: the walsender's small segments are acknowledged as they are read, so a reader that
//!    sleeps to let a burst build up throttles the sender (measured: a 200 µs wait after each read
//!    under 32 KiB halved the throughput, with a 4 MiB receive buffer too). Instead the kernel
//!    paces a heavy flow's reads with a low-water mark (`SO_RCVLOWAT`) that keeps the window open:
//!    `pg::wire::blocking`, "Paced reads over TCP". Over a unix socket
//!    nothing paces the sender but its buffer, and every message it writes wakes a blocked reader:
//!    there, after a read under [`COALESCE_BELOW`], the thread first sleeps [`COALESCE_WAIT`], and
//!    the next read takes the whole burst. `CDC_EGRESS_READ_COALESCE_US` (microseconds, 0 = never)
//!    overrides that wait: a benchmark knob, not configuration.
//!
//! # Invariants
//! - **Stream order**: frames are applied in the order they were read, by this thread alone.
//! - **The ack**: the flush position of every status update is `Batcher::confirmed()` after the
//!   persisted reports received so far, or the last such value published (`core::ack`, invariant 1
//!   of ARCHITECTURE.md), so it never passes an unpersisted change; `core::ack::status` keeps it
//!   monotonic.
//! - **The server is answered while we work or wait**: besides a read (at most [`READ_TIMEOUT`])
//!   the thread spends time in a spool write, in compressing a raw batch at its seal (one at a
//!   time), in replaying a reload's hold, in a catalog query, and in waiting for room in a full
//!   output channel. The waits (catalog query, room) are made in slices of [`READ_TIMEOUT`], the
//!   hold replay calls back every [`REPLAY_SLICE_ROWS`] rows, and each seal is followed by the same
//!   check: due status updates are sent in between ([`Link::answer`]), so neither a stalled sink
//!   nor a long replay makes the walsender drop us at `wal_sender_timeout`. A status update itself
//!   may block up to the socket's 30 s write timeout.
//! - **Stop, in two phases** ([`Phase`]): at *drain* the thread stops reading and applying (open
//!   batches are abandoned: they are above the confirmed LSN and come again from the slot), drops
//!   its senders so the delivery and the publisher finish what they hold, and keeps answering the
//!   server while they do. At *finish* (the session has seen the delivery end) it applies the last
//!   persisted reports, publishes the confirmed LSN they allow, sends the final status update and
//!   CopyDone, and returns. A thread that ended by an error lingers the same way, so the error is
//!   reported at once ([`StreamThread::run`]'s `ended` channel) and the final acknowledgement still
//!   goes out if the socket works. A catalog query in progress is abandoned at drain; every other
//!   step ends within about [`READ_TIMEOUT`] plus one spool write or seal.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};

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
/// Over a unix socket, every this many frames applied, what has arrived meanwhile is read without
/// waiting (step 1 of the module documentation): about 0.1 ms of work at 2 µs a change, against
/// the walsender's send buffer of well under a millisecond.
const TOP_UP_FRAMES: usize = 64;
/// Over a unix socket, a read of fewer bytes than this makes the thread wait [`COALESCE_WAIT`]
/// before reading again (see the module documentation).
const COALESCE_BELOW: usize = 32 * 1024;
/// How long a trickling stream over a unix socket is let accumulate in the socket buffer.
const COALESCE_WAIT: Duration = Duration::from_micros(200);
/// How often the status policy is woken for its time-based update.
const STATUS_TICK: Duration = Duration::from_millis(250);
/// Rows of a reload's hold replayed between two checks for due status updates.
pub(super) const REPLAY_SLICE_ROWS: u64 = 4096;

/// Where a session's stop has got to; the thread reads it, the session sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    Stream = 0,
    /// Stop reading and applying; drop the senders; keep answering the server.
    Drain = 1,
    /// The delivery has ended: final status update, CopyDone, return.
    Finish = 2,
}

/// The session's side of [`Phase`].
#[derive(Debug, Default)]
pub(super) struct PhaseFlag(AtomicU8);

impl PhaseFlag {
    pub(super) fn set(&self, phase: Phase) {
        self.0.fetch_max(phase as u8, Relaxed);
    }

    fn get(&self) -> Phase {
        match self.0.load(Relaxed) {
            0 => Phase::Stream,
            1 => Phase::Drain,
            _ => Phase::Finish,
        }
    }
}

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
    pub phase: Arc<PhaseFlag>,
}

/// The Batcher and the link to the server: what the thread owns.
pub(super) struct StreamState {
    batcher: Batcher<GzipSpools>,
    /// Persisted reports from the delivery and the change-event publisher (unbounded, so neither can
    /// ever block on this thread).
    persisted: mpsc::UnboundedReceiver<BatchId>,
    link: Link,
}

/// The replication stream and what the thread tells the server: positions and status updates.
struct Link {
    stream: CopyStream,
    policy: StatusPolicy,
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
            persisted,
            link: Link {
                stream,
                policy: StatusPolicy::new(status_every),
                confirmed_tx,
                metrics,
                received: Lsn::ZERO,
                reply_due: false,
                next_status_tick: Instant::now(),
            },
        }
    }

    /// Applies the persisted reports that have arrived, publishes the confirmed LSN and sends the
    /// status updates that are due.
    fn keep_up(&mut self) -> Result<(), Error> {
        while let Ok(id) = self.persisted.try_recv() {
            self.batcher.persisted(id);
        }
        let now = Instant::now();
        self.link.confirmed(self.batcher.confirmed(), now)?;
        self.link.answer(now)
    }

    /// The end of the session: the last persisted reports, the confirmed LSN they allow, and (unless
    /// the link is broken) the final status update and CopyDone. Failures are only logged: the
    /// session is over either way.
    fn settle(&mut self, link_works: bool) {
        while let Ok(id) = self.persisted.try_recv() {
            self.batcher.persisted(id);
        }
        let c = self.batcher.confirmed();
        self.link.confirmed_tx.send_replace(c);
        if !link_works {
            return;
        }
        let ended = self
            .link
            .status(Wake::Stopping, Instant::now(), c)
            .and_then(|()| self.link.stream.finish());
        if let Err(e) = ended {
            tracing::debug!(error = %e, "could not send the final status update");
        }
    }
}

impl Link {
    /// Publishes `confirmed` (the watch and, if it moved, a status update).
    fn confirmed(&mut self, confirmed: Lsn, now: Instant) -> Result<(), Error> {
        let moved = self.confirmed_tx.send_if_modified(|v| {
            let changed = *v != confirmed;
            *v = confirmed;
            changed
        });
        if moved {
            self.status(Wake::Confirmed, now, confirmed)?;
        }
        Ok(())
    }

    /// Sends the updates that are due by time or because the server asked, with the confirmed LSN
    /// last published (needs no Batcher, so it can run in the middle of a Batcher call).
    fn answer(&mut self, now: Instant) -> Result<(), Error> {
        let confirmed = *self.confirmed_tx.borrow();
        if std::mem::take(&mut self.reply_due) {
            self.status(Wake::ReplyRequested, now, confirmed)?;
        }
        if now >= self.next_status_tick {
            self.next_status_tick = now + STATUS_TICK;
            self.status(Wake::Tick, now, confirmed)?;
        }
        Ok(())
    }

    /// Wakes the status policy and sends the update it asks for (flush = apply = confirmed).
    fn status(&mut self, wake: Wake, now: Instant, confirmed: Lsn) -> Result<(), Error> {
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
    /// Streams until the drain phase or the first error, reports how streaming ended on `ended` at
    /// once, then lingers (answering the server) until the finish phase, and settles.
    pub(super) fn run(mut self, ended: oneshot::Sender<Result<(), Error>>) {
        let result = self.stream();
        let _ = ended.send(result);
        let StreamThread {
            mut state,
            inputs,
            outputs,
            ..
        } = self;
        // The delivery and the publisher finish what they hold once these are gone.
        drop(outputs);
        let mut link_works = state.link.stream.writable();
        while inputs.phase.get() != Phase::Finish {
            if link_works {
                if let Err(e) = state.keep_up() {
                    tracing::debug!(error = %e, "status updates stopped while the session stops");
                    link_works = false;
                }
            }
            std::thread::sleep(READ_TIMEOUT);
        }
        state.settle(link_works);
    }

    fn stream(&mut self) -> Result<(), Error> {
        let wait = coalesce_wait(&self.state.link.stream);
        let mut step = Step::default();
        let mut next_tick = Instant::now();
        let mut last_read = 0;
        loop {
            let mut applied = 0;
            while let Some(item) = self.state.link.stream.next_buffered()? {
                let CopyItem::Data(payload) = item else {
                    return Err(Error::transient(
                        Component::Source,
                        "the server ended the replication stream",
                    ));
                };
                self.apply(payload, &mut step)?;
                applied += 1;
                if applied % TOP_UP_FRAMES == 0 {
                    self.state.link.stream.top_up();
                }
                if applied == STEP_FRAMES {
                    applied = 0;
                    self.step(&mut step, &mut next_tick)?;
                    if self.inputs.phase.get() != Phase::Stream {
                        return Ok(());
                    }
                }
            }
            self.step(&mut step, &mut next_tick)?;
            if self.inputs.phase.get() != Phase::Stream {
                return Ok(());
            }
            if last_read > 0 && last_read < COALESCE_BELOW && !wait.is_zero() {
                std::thread::sleep(wait);
            }
            last_read = self.state.link.stream.fill()?;
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
                state.link.received = state.link.received.max(wal_start);
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
                state.link.received = state.link.received.max(wal_end);
                state.link.reply_due |= reply_requested;
                state.batcher.keepalive(wal_end);
                Ok(())
            }
        }
    }

    /// A Relation message, with the catalog facts the pgoutput message does not carry. The query is
    /// abandoned if the session stops meanwhile.
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
        let query = slot::describe_relation(&self.catalog, &rel);
        let schema = block_answering(
            &self.runtime,
            &mut self.state,
            Some(&self.inputs.phase),
            query,
        )??;
        self.state.batcher.relation(schema, &mut step.sealed)
    }

    /// Inputs in, results out, the confirmed LSN and the status updates (step 2 of the loop).
    fn step(&mut self, step: &mut Step, next_tick: &mut Instant) -> Result<(), Error> {
        let state = &mut self.state;
        let metrics = &state.link.metrics;
        metrics
            .messages_received
            .inc_by(std::mem::take(&mut step.messages));
        metrics
            .received_lsn
            .inner()
            .fetch_max(state.link.received.0, Relaxed);
        while let Ok(id) = state.persisted.try_recv() {
            state.batcher.persisted(id);
        }
        while let Ok(r) = self.inputs.releases.try_recv() {
            // A long replay answers the server between slices of rows.
            let link = &mut state.link;
            let n = state.batcher.release_hold_answering(
                &r.table,
                r.cut,
                &mut step.sealed,
                REPLAY_SLICE_ROWS,
                &mut || link.answer(Instant::now()),
            )?;
            tracing::debug!(table = %r.table, cut = %r.cut, released = n, "hold released");
        }
        let now = Instant::now();
        if now >= *next_tick {
            *next_tick = now + self.tick_every;
            state.batcher.tick(now_unix_us(), &mut step.sealed)?;
        }
        state.batcher.drain_controls(&mut step.controls);
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
            // A raw batch is compressed here, which can take a while: answer after each.
            let b = b.map_spool(|spool| {
                spool.finish().map_err(|e| {
                    Error::transient(Component::Spool, format!("cannot finish spool file: {e}"))
                })
            })?;
            state.link.answer(Instant::now())?;
            send_answering(&self.runtime, &self.outputs.sealed, b, state, "delivery")?;
        }
        if let Some(tx) = &self.outputs.events {
            // One hand-off (and at most one wake-up of the publisher) per step, not per change.
            state.batcher.drain_change_events(&mut step.events);
            if !step.events.is_empty() {
                let events = std::mem::take(&mut step.events);
                send_answering(&self.runtime, tx, events, state, "change-event publisher")?;
            }
        }
        state.keep_up()?;
        let open = state.batcher.open_batches() as i64;
        state.link.metrics.pending_batches.set(open);
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

/// Runs `fut` on the runtime in slices of [`READ_TIMEOUT`], keeping up with the server in between
/// ([`StreamState::keep_up`]); gives up with an error once `phase` leaves streaming, if given.
fn block_answering<F: Future>(
    runtime: &Handle,
    state: &mut StreamState,
    phase: Option<&PhaseFlag>,
    fut: F,
) -> Result<F::Output, Error> {
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Ok(out) = runtime.block_on(tokio::time::timeout(READ_TIMEOUT, fut.as_mut())) {
            return Ok(out);
        }
        state.keep_up()?;
        if phase.is_some_and(|p| p.get() != Phase::Stream) {
            return Err(Error::transient(
                Component::Daemon,
                "the session stopped while a catalog query was running",
            ));
        }
    }
}

/// Sends `item`, waiting for room in slices of [`READ_TIMEOUT`] during which the server is still
/// answered; an error if the receiving task is gone.
fn send_answering<T>(
    runtime: &Handle,
    tx: &mpsc::Sender<T>,
    item: T,
    state: &mut StreamState,
    receiver: &str,
) -> Result<(), Error> {
    let gone = || Error::transient(Component::Daemon, format!("the {receiver} stopped"));
    match tx.try_send(item) {
        Ok(()) => Ok(()),
        Err(TrySendError::Closed(_)) => Err(gone()),
        Err(TrySendError::Full(item)) => {
            let permit =
                block_answering(runtime, state, None, tx.reserve())?.map_err(|_| gone())?;
            permit.send(item);
            Ok(())
        }
    }
}
