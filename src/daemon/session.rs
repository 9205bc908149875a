//! One replication session: from connecting to the slot until shutdown or the first error.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use super::deliver::{self, Sinks};
use crate::config::Config;
use crate::core::ack::status::{StatusPolicy, Wake};
use crate::core::ack::BatchId;
use crate::core::batch::{Batcher, EventOut, Limits, Position, SealedBatch};
use crate::core::decode::{self, Message, ReplicationFrame};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::conninfo::ConnInfo;
use crate::pg::slot;
use crate::pg::wire::{CopyWriter, ReplicationConnection};
use crate::sink::notify::Notifier;
use crate::sink::registry::Registry;
use crate::sink::spool::SpooledFile;
use crate::sink::spool::{clean_spool_dir, GzipSpools};
use crate::sink::store::Store;
use crate::sink::upload::{self, SchemaVersions};
use crate::table::{quote_ident, quote_literal, TableName, TableSchema};

/// What the reader hands the batcher thread, in stream order.
enum Input {
    /// Consecutive frames, as many as were already buffered (at most [`CHUNK_FRAMES`] /
    /// [`CHUNK_BYTES`]): one channel message and at most one thread wake-up for all of them.
    Frames(Vec<Frame>),
    Relation(Arc<TableSchema>),
    Tick(i64),
    /// A reload's cut is known: release the table's hold.
    Release(TableName, Lsn),
    Stop,
}

/// One item of the replication stream.
enum Frame {
    Data(Bytes),
    Keepalive(Lsn),
}

/// Chunks in flight between the reader and the batcher; with the limits below, at most ~16 MiB of
/// frames are buffered whatever the message sizes.
const INPUT_CAPACITY: usize = 16;
const CHUNK_FRAMES: usize = 1024;
const CHUNK_BYTES: usize = 1 << 20;
const EVENTS_CAPACITY: usize = 4096;
const SEALED_CAPACITY: usize = 16;

fn now_unix_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Connections and sinks every command needs; opened once per session.
pub struct Endpoints {
    pub source: ConnInfo,
    pub catalog: Arc<tokio_postgres::Client>,
    pub sinks: Sinks,
}

/// Component of the "another instance holds the slot" error: a standby waiting, not a failure of
/// the active daemon (the driver does not record it as the daemon's state).
pub const STANDBY: Component = Component::Standby;

/// Connects to the source (checking its preconditions), the registry (migrating it), the object store
/// and NATS.
pub async fn connect(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<Endpoints, Error> {
    let source = config.source_conninfo()?;
    let catalog = source.connect().await?;
    slot::check_source(&catalog, &config.source.publication).await?;
    let installed = crate::sink::registry::migrate::install_reload_marker(
        &catalog,
        &config.registry.schema,
        &config.source.publication,
    )
    .await?;
    if installed == crate::sink::registry::migrate::MarkerTrigger::Missing {
        tracing::warn!(
            "the source role is not a superuser: the reload-marker event trigger is not installed, so \
             `cdc-egress reload` is unavailable until `cdc-egress migrate` runs as a superuser"
        );
    }
    let registry_info = config.registry_conninfo()?;
    let mut reg_client = registry_info.connect().await?;
    crate::sink::registry::migrate(&mut reg_client, &config.registry.schema).await?;
    drop(reg_client);
    let registry = Registry::new(registry_info.pool(4)?, &config.registry.schema);
    let incarnation = registry.incarnation().await?;
    let store = Store::open(&config.output.url, &config.output.options_exposed())?;
    let notifier = Notifier::connect(&config.nats)
        .await?
        .map(|n| n.with_incarnation(&incarnation));
    Ok(Endpoints {
        source,
        catalog: Arc::new(catalog),
        sinks: Sinks {
            store,
            registry,
            notifier,
            metrics,
            shutdown,
        },
    })
}

/// Publishes every unannounced `lost` event of the slot on `<prefix>.slot.<slot>`, exactly once
/// (as notices are), so NATS consumers learn of the gap and of the re-export that repairs it.
async fn announce_slot_losses(
    sinks: &Sinks,
    slot: &str,
    nats: &crate::config::NatsConfig,
) -> Result<(), Error> {
    let Some(n) = &sinks.notifier else {
        return Ok(());
    };
    for (id, lsn, detail, at) in sinks.registry.unannounced_slot_losses(slot).await? {
        let subject = format!(
            "{}.slot.{}",
            nats.subject_prefix,
            crate::sink::notify::subject_token(slot)
        );
        let body = serde_json::json!({
            "event": "slot_lost",
            "slot": slot,
            "lost_after_lsn": lsn,
            "reason": detail,
            "at": at,
            "action": "reexport: every published table is exported again from the new slot's cut",
        });
        let seq = n
            .publish_once(
                &subject,
                &format!("slot-event-{id}"),
                serde_json::to_vec(&body).expect("json").into(),
            )
            .await?;
        sinks.registry.mark_slot_event_announced(id, seq).await?;
    }
    Ok(())
}

/// Removes uploads of batches that never reached the registry: for tables the registry knows, on the
/// dates from its last batch until today; for table directories it does not know yet, on every date.
async fn remove_orphans(sinks: &Sinks) -> Result<usize, Error> {
    let known = sinks.registry.last_streaming_dates().await?;
    let today = chrono::Utc::now().date_naive();
    let mut removed = 0;
    let mut seen = HashSet::new();
    for (table, last_date, committed) in known {
        let mut dates = Vec::new();
        let mut d = last_date;
        while d <= today && dates.len() < 3660 {
            dates.push(d.format("%Y-%m-%d").to_string());
            match d.succ_opt() {
                Some(next) => d = next,
                None => break,
            }
        }
        let committed: HashSet<String> = committed.into_iter().collect();
        let dir = table.dotted();
        removed += upload::remove_orphans(&sinks.store, &dir, Some(&dates), &committed).await?;
        seen.insert(dir);
    }
    for dir in sinks.store.list_dirs(sinks.store.root()).await? {
        if !seen.contains(&dir) {
            removed += upload::remove_orphans(&sinks.store, &dir, None, &HashSet::new()).await?;
        }
    }
    if removed > 0 {
        tracing::info!(
            objects = removed,
            "removed orphaned uploads of a previous run"
        );
    }
    Ok(removed)
}

/// Exclusive ownership before anything else: recovery deletes orphaned uploads and completes
/// notices, which only the one process streaming the slot may do. A session-level advisory lock on
/// the catalog connection (released when the session's connection closes, also on a crash) makes
/// every other instance with this slot a standby that waits (a transient `Standby` error).
async fn take_slot_lock(ep: &Endpoints, slot_name: &str) -> Result<(), Error> {
    let locked: bool = ep
        .catalog
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('cdc_egress.slot:' || $1, 0))",
            &[&slot_name],
        )
        .await
        .map_err(|e| crate::pg::conninfo::pg_error(e).context("take the slot's advisory lock"))?
        .get(0);
    if !locked {
        return Err(Error::transient(
            STANDBY,
            format!("another process holds the slot {slot_name}; this instance waits as a standby and retries"),
        ));
    }

    Ok(())
}

/// Makes the slot ready to stream by the plan for its state (`slot::plan_slot`): checks a healthy
/// one, creates a missing one (requesting the initial exports first, so a crash in between comes back
/// here), or handles a lost one by `source.slot_lost`; announces recorded losses on NATS. Returns the
/// position to stream from (the slot's confirmed LSN).
async fn prepare_slot(
    config: &Config,
    ep: &Endpoints,
    repl: &mut ReplicationConnection,
) -> Result<Lsn, Error> {
    let sinks = &ep.sinks;
    let slot_name = config.source.slot.as_str();
    if config.source.slot_failover {
        // Before anything is requested or created: a configuration error changes nothing.
        slot::require_failover_support(repl).await?;
    }
    let info = slot::slot_info(&ep.catalog, slot_name).await?;
    let last_event = sinks.registry.last_slot_event(slot_name).await?;
    let plan = slot::plan_slot(
        slot_name,
        info.as_ref(),
        last_event.as_deref(),
        config.source.slot_lost,
    );
    let export_all = match &plan {
        slot::SlotPlan::Stream => {
            let info = info.as_ref().expect("a slot to stream from");
            slot::check_slot(info, slot_name, ep.source.dbname())?;
            if config.source.slot_failover && info.failover == Some(false) {
                slot::enable_failover(repl, slot_name).await?;
            }
            if last_event.as_deref() != Some("created") {
                // A slot from before the registry kept slot events, or a crash between creating
                // it and recording it: record it now, so its loss is recognised as one.
                sinks
                    .registry
                    .record_slot_event(slot_name, "created", info.confirmed_flush, None)
                    .await?;
            }
            false
        }
        slot::SlotPlan::Refuse { reason } => {
            return Err(Error::definite(Component::Slot, reason.clone()));
        }
        slot::SlotPlan::Create => config.reload.initial,
        slot::SlotPlan::Recreate { reason } => {
            tracing::error!(slot = slot_name, %reason, "replication slot lost: re-exporting every table through a new slot");
            if last_event.as_deref() != Some("lost") {
                // Changes after this position are gone: the slot's own confirmed position, or
                // for a slot that no longer exists the last one the daemon reported.
                let at = match info.as_ref().and_then(|i| i.confirmed_flush) {
                    Some(lsn) => Some(lsn),
                    None => sinks.registry.last_confirmed(slot_name).await?,
                };
                sinks
                    .registry
                    .record_slot_event(slot_name, "lost", at, Some(reason))
                    .await?;
            }
            // Reloads waiting for their marker to be read again can no longer get it (it is in
            // the lost WAL): they become part of the re-export instead of staying stuck.
            sinks.registry.restart_uncut_reloads_as_initial().await?;
            if info.is_some() {
                ep.catalog
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                    .await
                    .map_err(|e| {
                        crate::pg::conninfo::pg_error(e)
                            .context(format!("drop the lost slot {slot_name}"))
                    })?;
            }
            true
        }
    };
    if matches!(
        plan,
        slot::SlotPlan::Create | slot::SlotPlan::Recreate { .. }
    ) {
        // The exports are requested before the slot exists: a crash in between finds no slot next
        // time and comes back here (requests of active reloads are not repeated).
        if export_all {
            let tables = slot::published_tables(&ep.catalog, &config.source.publication).await?;
            let tables: Vec<TableName> = tables
                .into_iter()
                .filter(|t| {
                    config.registry.url != config.source.url || t.schema != config.registry.schema
                })
                .collect();
            tracing::info!(
                tables = tables.len(),
                "exporting every published table from the new slot's cut"
            );
            sinks.registry.request_initial_reloads(&tables).await?;
        }
        let created = slot::create_slot(repl, slot_name, config.source.slot_failover).await?;
        sinks
            .registry
            .record_slot_event(slot_name, "created", Some(created), None)
            .await?;
        tracing::info!(slot = slot_name, lsn = %created, "created replication slot");
    }
    announce_slot_losses(sinks, slot_name, &config.nats).await?;
    let start = slot::slot_info(&ep.catalog, slot_name)
        .await?
        .and_then(|i| i.confirmed_flush)
        .unwrap_or(Lsn::ZERO);
    Ok(start)
}

/// What a session streams with: the batcher (skip positions and holds from the registry), the
/// schema versions, the cleaned spool directory, and the reloads to resume.
struct Prepared {
    batcher: Batcher<GzipSpools>,
    versions: SchemaVersions,
    spool_dir: std::path::PathBuf,
    /// (table, reload id, request id) of the reloads the coordinator resumes.
    resume: Vec<(TableName, i64, String)>,
}

/// Builds the batcher for a session starting at `start`: per-table skip positions and schema
/// versions from the registry, a spool directory cleared of a previous run's files, and a hold on
/// every table whose reload resumes now.
async fn prepare_batcher(config: &Config, sinks: &Sinks, start: Lsn) -> Result<Prepared, Error> {
    let slot_name = config.source.slot.as_str();
    // Registry state: skip positions and schema versions.
    let states = sinks.registry.table_states().await?;
    let skip: HashMap<TableName, Position> = states
        .iter()
        .filter_map(|(t, s)| s.last.map(|p| (t.clone(), p)))
        .collect();
    let versions = SchemaVersions::new(
        states
            .iter()
            .map(|(t, s)| {
                (
                    t.clone(),
                    (
                        s.schema_version,
                        s.schema_fingerprint.clone().unwrap_or_default(),
                    ),
                )
            })
            .collect(),
    );
    let spool_dir = config
        .output
        .spool_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("cdc-egress"))
        .join(slot_name);
    let leftovers = clean_spool_dir(&spool_dir).map_err(|e| {
        Error::definite(
            Component::Spool,
            format!("spool directory {}: {e}", spool_dir.display()),
        )
    })?;
    if leftovers > 0 {
        tracing::info!(files = leftovers, "removed spool files of a previous run");
    }
    let spools = GzipSpools::new(spool_dir.clone()).map_err(|e| {
        Error::definite(
            Component::Spool,
            format!("spool directory {}: {e}", spool_dir.display()),
        )
    })?;
    let excluded =
        (config.registry.url == config.source.url).then(|| config.registry.schema.clone());
    let mut batcher = Batcher::new(
        Limits {
            interval: config.batch.interval,
            max_rows: config.batch.max_rows,
            max_bytes: config.batch.max_bytes,
        },
        spools,
        start,
        skip,
        excluded,
    );
    if config.nats.change_events && sinks.notifier.is_some() {
        batcher.enable_change_events();
    }
    batcher.set_marker_prefix(crate::sink::registry::migrate::marker_prefix(
        &config.registry.schema,
    ));
    // Reloads to (re)start now: fresh-start exports, and reloads whose cut was taken by a previous
    // run. Their tables are held from the first streamed row until the new cut is known. Reloads
    // created from a marker whose cut was never recorded wait for that marker: the hold kept the ack
    // below it, so it is read again.
    let mut resume = Vec::new();
    let mut no_seal = Vec::new();
    for r in sinks.registry.active_reloads().await? {
        if r.reason.as_deref() == Some("initial") || r.cut.is_some() || r.status == "requested" {
            batcher.begin_hold(&r.table, &mut no_seal)?;
            resume.push((r.table, r.id, r.request.unwrap_or_default()));
        }
    }

    Ok(Prepared {
        batcher,
        versions,
        spool_dir,
        resume,
    })
}

/// One session; returns Ok only on a requested shutdown.
pub async fn session(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let ep = connect(config, metrics.clone(), shutdown.clone()).await?;
    let sinks = ep.sinks.clone();
    let slot_name = config.source.slot.as_str();

    take_slot_lock(&ep, slot_name).await?;

    // Finish what a previous run committed, then clear what it left half-done.
    let finished = deliver::finish_unnotified(&sinks).await?;
    if finished > 0 {
        tracing::info!(files = finished, "completed notices of committed batches");
    }
    remove_orphans(&sinks).await?;

    // The slot: healthy, new, or lost (README "Slot lifecycle"; `slot::plan_slot`).
    let mut repl = ReplicationConnection::connect(&ep.source).await?;
    let start = prepare_slot(config, &ep, &mut repl).await?;

    let Prepared {
        batcher,
        versions,
        spool_dir,
        resume,
    } = prepare_batcher(config, &sinks, start).await?;

    let (reader, writer) = repl
        .start_copy_both(&format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot_name),
            quote_literal(&quote_ident(&config.source.publication))
        ))
        .await
        .map_err(|e| {
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
    tracing::info!(slot = slot_name, start = %start, "streaming");
    metrics.ready.store(true, Relaxed);
    metrics.clear_error();

    let (input_tx, input_rx) = mpsc::channel::<Input>(INPUT_CAPACITY);
    let (sealed_tx, sealed_rx) = mpsc::channel::<SealedBatch<SpooledFile>>(SEALED_CAPACITY);
    let (persisted_tx, persisted_rx) = mpsc::unbounded_channel::<BatchId>();
    let (events_tx, events_rx) = mpsc::channel::<EventOut>(EVENTS_CAPACITY);
    let (confirmed_tx, confirmed_rx) = watch::channel(start);
    let (controls_tx, controls_rx) = mpsc::unbounded_channel::<crate::core::batch::Control>();
    let (release_tx, mut release_rx) = mpsc::channel::<super::reloads::Release>(64);
    let reply_now = Arc::new(Notify::new());
    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();

    // Batcher thread: decode → CSV → spool, seal decisions, ack.
    let batcher_metrics = metrics.clone();
    let events_enabled = config.nats.change_events && sinks.notifier.is_some();
    let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread_stop = stop_flag.clone();
    let mut batcher_thread = tokio::task::spawn_blocking(move || {
        run_batcher(
            batcher,
            thread_stop,
            input_rx,
            persisted_rx,
            sealed_tx,
            events_enabled.then_some(events_tx),
            controls_tx,
            confirmed_tx,
            batcher_metrics,
        )
    });

    // Reader task.
    {
        let input_tx = input_tx.clone();
        let catalog = ep.catalog.clone();
        let metrics = metrics.clone();
        let reply_now = reply_now.clone();
        tasks.spawn(read_stream(reader, input_tx, catalog, metrics, reply_now));
    }
    // Delivery task.
    let mut delivery = tokio::spawn(deliver::deliver_batches(
        sinks.clone(),
        sealed_rx,
        versions,
        persisted_tx.clone(),
    ));
    // Reloads: the coordinator, and the path of its releases into the batcher thread.
    {
        let input_tx = input_tx.clone();
        tasks.spawn(async move {
            while let Some(r) = release_rx.recv().await {
                if input_tx.send(Input::Release(r.table, r.cut)).await.is_err() {
                    break;
                }
            }
            Ok(())
        });
        let coordinator = super::reloads::Coordinator {
            sinks: sinks.clone(),
            exporter: Arc::new(crate::reload::export::Exporter {
                slot_name: slot_name.to_string(),
                source: ep.source.clone(),
                store: sinks.store.clone(),
                spool_dir: spool_dir.clone(),
                parallelism: config.reload.parallelism,
            }),
            catalog: ep.catalog.clone(),
            registry_schema: config.registry.schema.clone(),
            release: release_tx,
        };
        tasks.spawn(coordinator.run(controls_rx, resume));
    }
    // Change events task.
    if events_enabled {
        let notifier = sinks.notifier.clone().expect("events need NATS");
        tasks.spawn(publish_events(notifier, events_rx, persisted_tx.clone()));
    }
    // Ticker.
    {
        let input_tx = input_tx.clone();
        let period =
            (config.batch.interval / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
        tasks.spawn(async move {
            let mut iv = tokio::time::interval(period);
            loop {
                iv.tick().await;
                if input_tx.is_closed() {
                    return Ok(());
                }
                let _ = input_tx.try_send(Input::Tick(now_unix_us()));
            }
        });
    }
    // Heartbeat: a non-transactional logical message so an idle slot keeps advancing.
    {
        let catalog = ep.catalog.clone();
        let every = config.source.heartbeat_interval;
        tasks.spawn(async move {
            let mut iv = tokio::time::interval(every);
            loop {
                iv.tick().await;
                if let Err(e) = catalog
                    .execute("SELECT pg_logical_emit_message(false, 'cdc_egress_heartbeat', '')", &[])
                    .await
                {
                    tracing::warn!(error = %e, "heartbeat message failed; an idle slot may not advance");
                    if e.is_closed() {
                        return Err(Error::postgres(Component::Source, "source connection lost", e));
                    }
                }
            }
        });
    }
    // Registry report and slot lag.
    tasks.spawn(report_task(
        sinks.registry.clone(),
        ep.catalog.clone(),
        metrics.clone(),
        slot_name.to_string(),
        confirmed_rx.clone(),
    ));

    // Status updates run outside the JoinSet: at shutdown they send the last confirmed LSN.
    let (stop_status_tx, stop_status_rx) = watch::channel(false);
    let status = tokio::spawn(send_status(
        writer,
        confirmed_rx.clone(),
        metrics.clone(),
        reply_now.clone(),
        config.source.status_interval,
        stop_status_rx,
    ));

    let mut shutdown_rx = shutdown.clone();
    let mut batcher_done = None;
    let mut delivery_done = false;
    let outcome: Result<(), Error> = tokio::select! {
        r = &mut batcher_thread => {
            let r = r
                .map_err(|e| Error::transient(Component::Daemon, format!("batcher thread: {e}")))
                .and_then(|x| x);
            let e = match &r {
                Err(e) => e.clone(),
                Ok(_) => Error::transient(Component::Daemon, "the batcher stopped unexpectedly"),
            };
            batcher_done = Some(r);
            Err(e)
        }
        r = &mut delivery => {
            delivery_done = true;
            match r {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(Error::transient(Component::Daemon, "delivery stopped unexpectedly")),
                Err(e) => Err(Error::transient(Component::Daemon, format!("delivery task: {e}"))),
            }
        }
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Err(Error::transient(Component::Daemon, "a session task ended unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::transient(Component::Daemon, format!("session task failed: {e}"))),
        },
        _ = shutdown_rx.wait_for(|s| *s) => Ok(()),
    };
    metrics.ready.store(false, Relaxed);

    // Tear down: stop reading, stop the batcher (open batches are abandoned), let in-flight
    // deliveries finish, send the final status.
    tasks.abort_all();
    stop_flag.store(true, Relaxed);
    let _ = input_tx.try_send(Input::Stop);
    drop(input_tx);
    if outcome.is_err() && !delivery_done {
        // Not a graceful stop: nothing in flight is worth waiting for (it is re-sent from the slot).
        delivery.abort();
    }
    let batcher_result = match batcher_done {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(30), &mut batcher_thread).await {
            Ok(r) => r
                .map_err(|e| Error::transient(Component::Daemon, format!("batcher thread: {e}")))
                .and_then(|x| x),
            Err(_) => {
                // Blocked handing a batch to a stuck delivery: stop the delivery, then it returns.
                delivery.abort();
                batcher_thread
                    .await
                    .map_err(|e| {
                        Error::transient(Component::Daemon, format!("batcher thread: {e}"))
                    })
                    .and_then(|x| x)
            }
        },
    };
    if let Err(e) = &batcher_result {
        tracing::debug!(error = %e, "batcher thread ended with an error");
    }
    if !delivery_done {
        match tokio::time::timeout(Duration::from_secs(30), &mut delivery).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "delivery stopped with an error"),
            Ok(_) => {}
            Err(_) => {
                // Never leave a delivery running behind the next session (it would register batches
                // the next session's skip positions do not know). A registry commit is atomic, and a
                // committed row without its notice is completed at start-up.
                tracing::warn!("in-flight batches did not finish within 30 s; abandoning them");
                delivery.abort();
                let _ = delivery.await;
            }
        }
    }
    if let Ok(mut state) = batcher_result {
        // Apply the persisted reports that arrived after the batcher thread stopped.
        state.apply_late_reports();
        let _ = state.confirmed_tx.send(state.batcher.confirmed());
    }
    let _ = stop_status_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), status).await;
    if outcome.is_ok() {
        let confirmed = *confirmed_rx.borrow();
        let _ = sinks
            .registry
            .report_daemon(
                slot_name,
                confirmed,
                Lsn(metrics.received_lsn.get()),
                "stopped",
                None,
            )
            .await;
        tracing::info!(confirmed = %confirmed, "stopped");
    }
    outcome
}

/// What the batcher thread leaves behind when it stops.
struct BatcherState {
    batcher: Batcher<GzipSpools>,
    persisted_rx: mpsc::UnboundedReceiver<BatchId>,
    confirmed_tx: watch::Sender<Lsn>,
}

impl BatcherState {
    fn apply_late_reports(&mut self) {
        while let Ok(id) = self.persisted_rx.try_recv() {
            self.batcher.persisted(id);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_batcher(
    mut batcher: Batcher<GzipSpools>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut input_rx: mpsc::Receiver<Input>,
    mut persisted_rx: mpsc::UnboundedReceiver<BatchId>,
    sealed_tx: mpsc::Sender<SealedBatch<SpooledFile>>,
    events_tx: Option<mpsc::Sender<EventOut>>,
    controls_tx: mpsc::UnboundedSender<crate::core::batch::Control>,
    confirmed_tx: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
) -> Result<BatcherState, Error> {
    let mut sealed = Vec::new();
    let mut events = Vec::new();
    loop {
        while let Ok(id) = persisted_rx.try_recv() {
            batcher.persisted(id);
        }
        if stop.load(Relaxed) {
            break;
        }
        let Some(input) = input_rx.blocking_recv() else {
            break;
        };
        match input {
            Input::Frames(frames) => {
                for frame in frames {
                    match frame {
                        Frame::Data(data) => {
                            let msg = decode::decode(data).map_err(|e| {
                                Error::definite(
                                    Component::Decode,
                                    format!("undecodable pgoutput message: {e}"),
                                )
                            })?;
                            batcher.message(msg, &mut sealed)?;
                        }
                        Frame::Keepalive(lsn) => batcher.keepalive(lsn),
                    }
                }
            }
            Input::Relation(schema) => batcher.relation(schema, &mut sealed)?,
            Input::Tick(now) => batcher.tick(now, &mut sealed)?,
            Input::Release(table, cut) => {
                let n = batcher.release_hold(&table, cut, &mut sealed)?;
                tracing::debug!(table = %table, cut = %cut, released = n, "hold released");
            }
            Input::Stop => break,
        }
        let mut controls = Vec::new();
        batcher.drain_controls(&mut controls);
        for c in controls {
            let _ = controls_tx.send(c);
        }
        for b in sealed.drain(..) {
            let b = b.map_spool(|spool| {
                spool.finish().map_err(|e| {
                    Error::transient(Component::Spool, format!("cannot finish spool file: {e}"))
                })
            })?;
            if sealed_tx.blocking_send(b).is_err() {
                return Err(Error::transient(Component::Daemon, "delivery stopped"));
            }
        }
        if let Some(tx) = &events_tx {
            batcher.drain_change_events(&mut events);
            for e in events.drain(..) {
                if tx.blocking_send(e).is_err() {
                    return Err(Error::transient(
                        Component::Daemon,
                        "change-event publisher stopped",
                    ));
                }
            }
        }
        let c = batcher.confirmed();
        confirmed_tx.send_if_modified(|v| {
            let changed = *v != c;
            *v = c;
            changed
        });
        metrics.pending_batches.set(batcher.open_batches() as i64);
    }
    Ok(BatcherState {
        batcher,
        persisted_rx,
        confirmed_tx,
    })
}

async fn read_stream(
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

/// Every 5 s: slot lag and safe WAL into the metrics (with a rate-limited warning when retention
/// nears `max_slot_wal_keep_size`), what a reload cut waits for, and the daemon's row in the registry
/// (confirmed, received, state, last error) that `cdc-egress status` reads.
async fn report_task(
    registry: crate::sink::registry::Registry,
    catalog: Arc<tokio_postgres::Client>,
    metrics: Arc<Metrics>,
    slot: String,
    confirmed_rx: watch::Receiver<Lsn>,
) -> Result<(), Error> {
    let mut iv = tokio::time::interval(Duration::from_secs(5));
    let mut warn_blocker = crate::observe::Throttle::new(Duration::from_secs(60));
    let mut warn_retention = crate::observe::Throttle::new(Duration::from_secs(60));
    loop {
        iv.tick().await;
        if let Ok(Some(info)) = slot::slot_info(&catalog, &slot).await {
            metrics.slot_lag_bytes.set(info.lag_bytes.unwrap_or(0));
            metrics
                .slot_safe_wal_bytes
                .set(info.safe_wal_size.unwrap_or(-1));
            if let Some(warning) = crate::pg::slot::retention_warning(&info) {
                if warn_retention.ready() {
                    tracing::warn!(slot = %slot, "{warning}");
                }
            }
        }
        let blockers = slot::cut_blockers(&catalog, &slot)
            .await
            .unwrap_or_default();
        let oldest = blockers.first().map(|b| b.xact_age_seconds).unwrap_or(0.0);
        metrics.reload_cut_blocked_seconds.set(oldest as i64);
        if let Some(b) = blockers.first() {
            if warn_blocker.ready() {
                tracing::warn!(blocker = %b, lag_bytes = metrics.slot_lag_bytes.get(), "a reload's cut waits for an open transaction to end; the slot's confirmed LSN stands still meanwhile");
            }
        }
        let err = metrics.last_error();
        let state = if err.is_some() {
            "degraded"
        } else {
            "streaming"
        };
        let confirmed = *confirmed_rx.borrow();
        let received = Lsn(metrics.received_lsn.get());
        if let Err(e) = registry
            .report_daemon(&slot, confirmed, received, state, err.as_deref())
            .await
        {
            tracing::warn!(error = %e, "cannot record daemon state in the registry");
        }
    }
}

async fn send_status(
    mut writer: CopyWriter,
    mut confirmed_rx: watch::Receiver<Lsn>,
    metrics: Arc<Metrics>,
    reply_now: Arc<Notify>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut policy = StatusPolicy::new(every);
    let mut iv = tokio::time::interval(Duration::from_millis(250));
    // Once the batcher is gone its sender is dropped and `changed()` fails at once: stop asking
    // (the session is being torn down; ticks and the stop signal still arrive).
    let mut batcher_alive = true;
    loop {
        let wake = tokio::select! {
            _ = iv.tick() => Wake::Tick,
            _ = reply_now.notified() => Wake::ReplyRequested,
            r = confirmed_rx.changed(), if batcher_alive => {
                batcher_alive = r.is_ok();
                Wake::Confirmed
            }
            _ = stop.wait_for(|s| *s) => Wake::Stopping,
        };
        let stopping = wake == Wake::Stopping;
        let confirmed = *confirmed_rx.borrow_and_update();
        if policy.flush_would_move(confirmed) && confirmed != Lsn::ZERO {
            crate::failpoint::hit("before_status");
        }
        let received = Lsn(metrics.received_lsn.get());
        if let Some(u) = policy.on_wake(wake, Instant::now(), confirmed, received) {
            let now = decode::utc_to_pg_micros(chrono::Utc::now());
            let msg = decode::standby_status_update(u.write, u.flush, u.apply, now, false);
            writer.send(&msg).await?;
            metrics.confirmed_lsn.set(u.flush.0);
        }
        if stopping {
            let _ = writer.finish().await;
            return Ok(());
        }
    }
}

/// Publishes change events with pipelined acks, in order; reports a transaction's unit persisted once
/// every event before its Close marker is acknowledged.
async fn publish_events(
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
                let msg_id = format!(
                    "{}:{}:{}",
                    c.table.dotted(),
                    c.position.commit_lsn,
                    c.position.seq
                );
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
