//! One replication session: from connecting to the slot until shutdown or the first error.
//!
//! [`session`] reads as its phases. Before streaming (`startup`): connect, take the slot's lock,
//! claim the registry and the output prefix for the slot, finish what the last run committed, remove
//! what it left half-done, plan the slot, prepare the batcher. Then `START_REPLICATION`, and the tasks of a running session ([`Running`]): the reader,
//! the batcher thread, the delivery, the reload coordinator, change events, the NATS control
//! responder (`nats.control`), the ticker, the
//! heartbeat, the report, and the status updates. The session ends at the first task that fails
//! (or stops unexpectedly) or at a requested shutdown; teardown then stops everything, so nothing of
//! this session outlives it.
//!
//! # Why teardown cannot lose or double anything
//! Open batches are abandoned: their changes are above the confirmed LSN (the ack never passes an
//! unpersisted change), so the next session receives them again from the slot. In-flight deliveries
//! are let finish on a graceful stop (bounded wait) and aborted otherwise; an abort can cut a delivery
//! only before its registry commit (then the objects are orphans, removed at the next start) or after
//! it (then the row is completed by `finish_unnotified` at the next start). The last status update
//! is sent after the batcher has applied every persisted report, so it carries the highest LSN that
//! is safe, and never a higher one.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::batcher_thread::{now_unix_us, run_batcher, BatcherState, Input, INPUT_CAPACITY};
use super::control::serve_reload_requests;
use super::deliver;
use super::events::publish_events;
use super::reader::read_stream;
use super::reloads::{Coordinator, Release};
use super::report::report_task;
use super::startup::{
    claim_ownership, connect, prepare_batcher, prepare_slot, recover, take_slot_lock, Endpoints,
    Prepared, STANDBY,
};
use super::status_updates::send_status;
use crate::config::Config;
use crate::core::ack::BatchId;
use crate::core::batch::{Control, EventOut, Sealed};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::wire::{CopyReader, CopyWriter, ReplicationConnection};
use crate::reload::export::Exporter;
use crate::sink::spool::SpooledFile;
use crate::table::{quote_ident, quote_literal};

/// Chunks of change events (one per batcher step, at most about `CHUNK_FRAMES` events each) in flight
/// between the batcher thread and the publisher (two: the publisher's window of acks is the buffer
/// that matters; more chunks only hold memory, a CSV copy of every row of an input chunk, about
/// 1 MiB each).
const EVENTS_CAPACITY: usize = 2;
const SEALED_CAPACITY: usize = 16;
/// How long a graceful stop waits for the batcher thread and for in-flight deliveries.
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
    let (reader, writer) = start_replication(repl, config).await?;
    tracing::info!(slot = slot_name, start = %start, "streaming");
    metrics.ready.store(true, Relaxed);
    metrics.clear_error();

    let mut running = Running::spawn(config, &ep, prepared, start, reader, writer);
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
async fn start_replication(
    repl: ReplicationConnection,
    config: &Config,
) -> Result<(CopyReader, CopyWriter), Error> {
    let slot_name = config.source.slot.as_str();
    let command = format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
        quote_ident(slot_name),
        quote_literal(&quote_ident(&config.source.publication))
    );
    repl.start_copy_both(&command).await.map_err(|e| {
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
    })
}

/// The tasks of a streaming session and the handles teardown needs.
struct Running {
    /// Tasks whose end (of any kind) ends the session: reader, reload coordinator and the forwarder
    /// of its releases, events, ticker, heartbeat, report. Aborted at teardown.
    tasks: JoinSet<Result<(), Error>>,
    batcher: JoinHandle<Result<BatcherState, Error>>,
    stop_batcher: Arc<AtomicBool>,
    input: mpsc::Sender<Input>,
    delivery: JoinHandle<Result<(), Error>>,
    /// Outside `tasks`: at teardown it still sends the last confirmed LSN.
    status: JoinHandle<Result<(), Error>>,
    stop_status: watch::Sender<bool>,
    confirmed: watch::Receiver<Lsn>,
    /// Set when the batcher or the delivery is what ended the session (its handle is spent).
    batcher_result: Option<Result<BatcherState, Error>>,
    delivery_ended: bool,
}

impl Running {
    fn spawn(
        config: &Config,
        ep: &Endpoints,
        prepared: Prepared,
        start: Lsn,
        reader: CopyReader,
        writer: CopyWriter,
    ) -> Running {
        let sinks = &ep.sinks;
        let metrics = &sinks.metrics;
        let (input_tx, input_rx) = mpsc::channel::<Input>(INPUT_CAPACITY);
        let (sealed_tx, sealed_rx) = mpsc::channel::<Sealed<SpooledFile>>(SEALED_CAPACITY);
        let (persisted_tx, persisted_rx) = mpsc::unbounded_channel::<BatchId>();
        let (events_tx, events_rx) = mpsc::channel::<Vec<EventOut>>(EVENTS_CAPACITY);
        let (confirmed_tx, confirmed_rx) = watch::channel(start);
        let (controls_tx, controls_rx) = mpsc::unbounded_channel::<Control>();
        let reply_now = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();

        // Batcher thread: decode → CSV → spool, seal decisions, ack.
        let events_enabled = config.nats.change_events.enabled() && sinks.notifier.is_some();
        let stop_batcher = Arc::new(AtomicBool::new(false));
        let batcher = {
            let (stop, metrics) = (stop_batcher.clone(), metrics.clone());
            let events_tx = events_enabled.then_some(events_tx);
            tokio::task::spawn_blocking(move || {
                run_batcher(
                    prepared.batcher,
                    stop,
                    input_rx,
                    persisted_rx,
                    sealed_tx,
                    events_tx,
                    controls_tx,
                    confirmed_tx,
                    metrics,
                )
            })
        };
        tasks.spawn(read_stream(
            reader,
            input_tx.clone(),
            ep.catalog.clone(),
            metrics.clone(),
            reply_now.clone(),
        ));
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
            &input_tx,
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
        tasks.spawn(ticker(input_tx.clone(), config.batch.interval));
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
        let (stop_status, stop_status_rx) = watch::channel(false);
        let status = tokio::spawn(send_status(
            writer,
            confirmed_rx.clone(),
            metrics.clone(),
            reply_now,
            config.source.status_interval,
            stop_status_rx,
        ));
        Running {
            tasks,
            batcher,
            stop_batcher,
            input: input_tx,
            delivery,
            status,
            stop_status,
            confirmed: confirmed_rx,
            batcher_result: None,
            delivery_ended: false,
        }
    }

    /// Waits for the first task to end or for shutdown: Ok only for a requested shutdown.
    async fn until_stopped(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        tokio::select! {
            r = &mut self.batcher => {
                let r = batcher_outcome(r);
                let e = match &r {
                    Err(e) => e.clone(),
                    Ok(_) => Error::transient(Component::Daemon, "the batcher stopped unexpectedly"),
                };
                self.batcher_result = Some(r);
                Err(e)
            }
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

    /// Stops reading, stops the batcher (open batches are abandoned), lets in-flight deliveries
    /// finish when `graceful`, sends the final status; returns the last confirmed LSN.
    async fn tear_down(mut self, graceful: bool) -> Lsn {
        self.tasks.abort_all();
        self.stop_batcher.store(true, Relaxed);
        let _ = self.input.try_send(Input::Stop);
        drop(self.input);
        if !graceful && !self.delivery_ended {
            // Nothing in flight is worth waiting for: it is re-sent from the slot.
            self.delivery.abort();
        }
        let batcher_result = match self.batcher_result.take() {
            Some(r) => r,
            None => match tokio::time::timeout(DRAIN_LIMIT, &mut self.batcher).await {
                Ok(r) => batcher_outcome(r),
                Err(_) => {
                    // Blocked handing a batch to a stuck delivery: stop the delivery, then it returns.
                    self.delivery.abort();
                    batcher_outcome(self.batcher.await)
                }
            },
        };
        if let Err(e) = &batcher_result {
            tracing::debug!(error = %e, "batcher thread ended with an error");
        }
        if !self.delivery_ended {
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
        if let Ok(state) = batcher_result {
            state.settle();
        }
        let _ = self.stop_status.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.status).await;
        let confirmed = *self.confirmed.borrow();
        confirmed
    }
}

fn batcher_outcome(
    joined: Result<Result<BatcherState, Error>, tokio::task::JoinError>,
) -> Result<BatcherState, Error> {
    joined
        .map_err(|e| Error::transient(Component::Daemon, format!("batcher thread: {e}")))
        .and_then(|r| r)
}

/// The reload coordinator, and the path of its releases into the batcher thread.
fn spawn_reloads(
    tasks: &mut JoinSet<Result<(), Error>>,
    config: &Config,
    ep: &Endpoints,
    spool_dir: std::path::PathBuf,
    resume: Vec<(crate::table::TableName, i64, String)>,
    controls: mpsc::UnboundedReceiver<Control>,
    input: &mpsc::Sender<Input>,
) {
    let (release_tx, mut release_rx) = mpsc::channel::<Release>(64);
    let input = input.clone();
    tasks.spawn(async move {
        while let Some(r) = release_rx.recv().await {
            if input.send(Input::Release(r.table, r.cut)).await.is_err() {
                break;
            }
        }
        Ok(())
    });
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

/// Clock ticks for the batcher's time-based seals, a few per batch interval.
async fn ticker(input: mpsc::Sender<Input>, batch_interval: Duration) -> Result<(), Error> {
    let period = (batch_interval / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut iv = tokio::time::interval(period);
    loop {
        iv.tick().await;
        if input.is_closed() {
            return Ok(());
        }
        let _ = input.try_send(Input::Tick(now_unix_us()));
    }
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
