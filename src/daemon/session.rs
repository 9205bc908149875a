//! One replication session: from connecting to the slot until shutdown or the first error.
//!
//! [`session`] reads as its phases. Before streaming (`startup`): connect, take the slot's lock,
//! claim the registry and the output prefix for the slot, finish what the last run committed, remove
//! what it left half-done, plan the slot, prepare the batcher. Then `START_REPLICATION`, and the
//! threads and tasks of a running session ([`Running`]): the stream thread (reading, batching and
//! the status updates), the delivery, the reload coordinator, change events, the NATS control
//! responder (`nats.control`), the heartbeat and the report. The session ends at the first task that fails
//! (or stops unexpectedly) or at a requested shutdown; teardown then stops everything, so nothing of
//! this session outlives it.
//!
//! # Why teardown cannot lose or double anything
//! Open batches are abandoned: their changes are above the confirmed LSN (the ack never passes an
//! unpersisted change), so the next session receives them again from the slot. In-flight deliveries
//! are let finish on a graceful stop (bounded wait) and aborted otherwise; an abort can cut a delivery
//! only before its registry commit (then the objects are orphans, removed at the next start) or after
//! it (then the row is completed by `finish_unnotified` at the next start). The last status update
//! is sent (by the stream thread, told to finish) after the delivery has ended and the batcher has applied every
//! persisted report, so it carries the highest LSN that is safe, and never a higher one.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::control::serve_reload_requests;
use super::deliver;
use super::events::publish_events;
use super::reloads::{Coordinator, Release};
use super::report::report_task;
use super::startup::{
    claim_ownership, connect, prepare_batcher, prepare_slot, recover, take_slot_lock, Endpoints,
    Prepared, STANDBY,
};
use super::stream_thread::{
    Inputs, Outputs, Phase, PhaseFlag, StreamState, StreamThread, READ_TIMEOUT,
};
use crate::config::Config;
use crate::core::ack::BatchId;
use crate::core::batch::{Control, EventOut, Sealed};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::wire::{CopyStream, ReplicationConnection};
use crate::reload::export::Exporter;
use crate::sink::spool::SpooledFile;
use crate::table::{quote_ident, quote_literal};

/// Chunks of change events (one per step of the stream thread, the events of at most about 1,024
/// frames) in flight between the stream thread and the publisher (two: the publisher's window of
/// acks is the buffer that matters; more chunks only hold memory, a CSV copy of every row of a step,
/// about 1 MiB each).
const EVENTS_CAPACITY: usize = 2;
const SEALED_CAPACITY: usize = 16;
/// How long a graceful stop waits for the stream thread and for in-flight deliveries.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// One session; returns Ok only on a requested shutdown.
pub async fn session(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let ep = connect(config, metrics.clone(), shutdown.clone()).await?;
    let slot_name = config.source.slot.as_str();
    take_slot_lock(&ep, slot_name).await?;
    claim_ownership(&ep, slot_name).await?;
    recover(&ep.sinks).await?;

    let mut repl = ReplicationConnection::connect(&ep.source).await?;
    let start = prepare_slot(config, &ep, &mut repl).await?;
    let prepared = prepare_batcher(config, &ep.sinks, start).await?;
    let stream = start_replication(repl, config).await?;
    tracing::info!(slot = slot_name, start = %start, "streaming");
    metrics.ready.store(true, Relaxed);
    metrics.clear_error();

    let mut running = Running::spawn(config, &ep, prepared, start, stream);
    let outcome = running.until_stopped(shutdown).await;
    metrics.ready.store(false, Relaxed);
    let confirmed = running.tear_down(outcome.is_ok()).await;

    if outcome.is_ok() {
        let received = Lsn(metrics.received_lsn.get());
        let _ = ep
            .sinks
            .registry
            .report_daemon(slot_name, confirmed, received, "stopped", None)
            .await;
        tracing::info!(confirmed = %confirmed, "stopped");
    }
    outcome
}

/// `START_REPLICATION` on the slot; a slot held by another process makes this instance a standby.
/// The stream comes back ready for the stream thread (blocking, reads of at most [`READ_TIMEOUT`]).
async fn start_replication(
    repl: ReplicationConnection,
    config: &Config,
) -> Result<CopyStream, Error> {
    let slot_name = config.source.slot.as_str();
    let command = format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
        quote_ident(slot_name),
        quote_literal(&quote_ident(&config.source.publication))
    );
    let (reader, writer) = repl.start_copy_both(&command).await.map_err(|e| {
        if e.sqlstate() == Some("55006") {
            Error::transient(
                STANDBY,
                format!(
                    "another process holds the slot {slot_name}; this instance waits as a standby and retries ({e})"
                ),
            )
        } else {
            e.context(format!("start replication on slot {slot_name}"))
        }
    })?;
    CopyStream::from_halves(reader, writer, READ_TIMEOUT)
}

/// The threads and tasks of a streaming session and the handles teardown needs.
struct Running {
    /// Tasks whose end (of any kind) ends the session: reload coordinator, events, NATS control,
    /// heartbeat, report. Aborted at teardown.
    tasks: JoinSet<Result<(), Error>>,
    /// The stream thread; it returns after the finish phase.
    stream: JoinHandle<()>,
    /// How the thread's streaming ended (it then lingers, answering the server, until finish).
    stream_ended: oneshot::Receiver<Result<(), Error>>,
    phase: Arc<PhaseFlag>,
    delivery: JoinHandle<Result<(), Error>>,
    confirmed: watch::Receiver<Lsn>,
    delivery_ended: bool,
}

impl Running {
    fn spawn(
        config: &Config,
        ep: &Endpoints,
        prepared: Prepared,
        start: Lsn,
        stream: CopyStream,
    ) -> Running {
        let sinks = &ep.sinks;
        let metrics = &sinks.metrics;
        let (sealed_tx, sealed_rx) = mpsc::channel::<Sealed<SpooledFile>>(SEALED_CAPACITY);
        let (persisted_tx, persisted_rx) = mpsc::unbounded_channel::<BatchId>();
        let (events_tx, events_rx) = mpsc::channel::<Vec<EventOut>>(EVENTS_CAPACITY);
        let (confirmed_tx, confirmed_rx) = watch::channel(start);
        let (controls_tx, controls_rx) = mpsc::unbounded_channel::<Control>();
        let (release_tx, release_rx) = mpsc::channel::<Release>(64);
        let mut tasks = JoinSet::new();

        // The stream thread: read, decode → CSV → spool, seal decisions, ack, status updates.
        let events_enabled = config.nats.change_events.enabled() && sinks.notifier.is_some();
        let phase = Arc::new(PhaseFlag::default());
        let thread = StreamThread {
            state: StreamState::new(
                prepared.batcher,
                stream,
                config.source.status_interval,
                persisted_rx,
                confirmed_tx,
                metrics.clone(),
            ),
            inputs: Inputs {
                releases: release_rx,
                phase: phase.clone(),
            },
            outputs: Outputs {
                sealed: sealed_tx,
                events: events_enabled.then_some(events_tx),
                controls: controls_tx,
            },
            catalog: ep.catalog.clone(),
            runtime: tokio::runtime::Handle::current(),
            tick_every: tick_period(config.batch.interval),
        };
        let (ended_tx, stream_ended) = oneshot::channel();
        let stream = tokio::task::spawn_blocking(move || thread.run(ended_tx));
        let delivery = tokio::spawn(deliver::deliver_batches(
            sinks.clone(),
            sealed_rx,
            prepared.versions,
            persisted_tx.clone(),
        ));
        spawn_reloads(
            &mut tasks,
            config,
            ep,
            prepared.spool_dir,
            prepared.resume,
            controls_rx,
            release_tx,
        );
        if events_enabled {
            let notifier = sinks.notifier.clone().expect("events need NATS");
            tasks.spawn(publish_events(
                notifier,
                config.nats.change_events,
                events_rx,
                persisted_tx,
            ));
        }
        if let (Some(subject), Some(n)) = (&config.nats.control_subject, &sinks.notifier) {
            tasks.spawn(serve_reload_requests(
                n.client(),
                subject.clone(),
                Arc::new(config.clone()),
            ));
        }
        tasks.spawn(heartbeat(
            ep.catalog.clone(),
            config.source.heartbeat_interval,
        ));
        tasks.spawn(report_task(
            sinks.registry.clone(),
            ep.catalog.clone(),
            metrics.clone(),
            config.source.slot.clone(),
            confirmed_rx.clone(),
        ));
        Running {
            tasks,
            stream,
            stream_ended,
            phase,
            delivery,
            confirmed: confirmed_rx,
            delivery_ended: false,
        }
    }

    /// Waits for the first task to end or for shutdown: Ok only for a requested shutdown.
    async fn until_stopped(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        tokio::select! {
            r = &mut self.stream_ended => Err(match r {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::transient(Component::Daemon, "the stream thread stopped unexpectedly"),
                Err(_) => Error::transient(Component::Daemon, "the stream thread panicked"),
            }),
            r = &mut self.delivery => {
                self.delivery_ended = true;
                match r {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(Error::transient(Component::Daemon, "delivery stopped unexpectedly")),
                    Err(e) => Err(Error::transient(Component::Daemon, format!("delivery task: {e}"))),
                }
            }
            Some(r) = self.tasks.join_next() => match r {
                Ok(Ok(())) => Err(Error::transient(Component::Daemon, "a session task ended unexpectedly")),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::transient(Component::Daemon, format!("session task failed: {e}"))),
            },
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        }
    }

    /// Stops the stream thread's reading (open batches are abandoned; it keeps answering the
    /// server), lets in-flight deliveries finish when `graceful`, then has the thread send the final
    /// status and CopyDone; returns the last confirmed LSN.
    async fn tear_down(mut self, graceful: bool) -> Lsn {
        self.tasks.abort_all();
        self.phase.set(Phase::Drain);
        if !graceful && !self.delivery_ended {
            // Nothing in flight is worth waiting for: it is re-sent from the slot.
            self.delivery.abort();
        }
        if !self.delivery_ended {
            // It ends once the thread has dropped its sender, after the batches handed over.
            match tokio::time::timeout(DRAIN_LIMIT, &mut self.delivery).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "delivery stopped with an error"),
                Ok(_) => {}
                Err(_) => {
                    // Never leave a delivery running behind the next session (it would register
                    // batches the next session's skip positions do not know). A registry commit is
                    // atomic, and a committed row without its notice is completed at start-up.
                    tracing::warn!("in-flight batches did not finish within 30 s; abandoning them");
                    self.delivery.abort();
                    let _ = self.delivery.await;
                }
            }
        }
        self.phase.set(Phase::Finish);
        match tokio::time::timeout(DRAIN_LIMIT, &mut self.stream).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the stream thread panicked"),
            Err(_) => tracing::warn!(
                "the stream thread did not finish within 30 s; the next session starts without it"
            ),
        }
        if let Ok(Err(e)) = self.stream_ended.try_recv() {
            tracing::debug!(error = %e, "stream thread ended with an error");
        }
        let confirmed = *self.confirmed.borrow();
        confirmed
    }
}

/// The reload coordinator; its releases go straight to the stream thread.
fn spawn_reloads(
    tasks: &mut JoinSet<Result<(), Error>>,
    config: &Config,
    ep: &Endpoints,
    spool_dir: std::path::PathBuf,
    resume: Vec<(crate::table::TableName, i64, String)>,
    controls: mpsc::UnboundedReceiver<Control>,
    release_tx: mpsc::Sender<Release>,
) {
    let sinks = ep.sinks.clone();
    let coordinator = Coordinator {
        exporter: Arc::new(Exporter {
            slot_name: config.source.slot.clone(),
            publication: config.source.publication.clone(),
            source: ep.source.clone(),
            // A budget of one part per worker, apart from the streaming delivery's.
            store: sinks.store.with_own_budget(
                config.reload.parallelism.max(1) * crate::sink::store::UPLOAD_BUDGET,
            ),
            spool_dir,
            parallelism: config.reload.parallelism,
        }),
        sinks,
        catalog: ep.catalog.clone(),
        registry_schema: config.registry.schema.clone(),
        release: release_tx,
    };
    tasks.spawn(coordinator.run(controls, resume));
}

/// How often the stream thread ticks the batcher's clock for time-based seals: a few times per
/// batch interval.
fn tick_period(batch_interval: Duration) -> Duration {
    (batch_interval / 5).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// A non-transactional logical message every `every`, so an idle slot keeps advancing.
async fn heartbeat(catalog: Arc<tokio_postgres::Client>, every: Duration) -> Result<(), Error> {
    let mut iv = tokio::time::interval(every);
    loop {
        iv.tick().await;
        let sql = "SELECT pg_logical_emit_message(false, 'cdc_egress_heartbeat', '')";
        if let Err(e) = catalog.execute(sql, &[]).await {
            tracing::warn!(error = %e, "heartbeat message failed; an idle slot may not advance");
            if e.is_closed() {
                return Err(Error::postgres(
                    Component::Source,
                    "source connection lost",
                    e,
                ));
            }
        }
    }
}
