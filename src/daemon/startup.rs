//! What a session does before it streams: connect to everything, take the slot's lock, claim the
//! registry, the output prefix and the notice subjects for this slot (`sink::owner`), finish what
//! the last run left (notices of committed batches, orphaned objects), decide what to do with the
//! slot (stream, create, refuse or re-export: `pg::slot::plan_slot`) and prepare the batcher (skip
//! positions, schema versions, holds of resumed reloads).
//!
//! Everything here happens before `START_REPLICATION`, so a failure anywhere leaves nothing to undo:
//! the driver builds a new session exactly as after a crash.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;

use super::deliver::{self, Sinks};
use crate::config::Config;
use crate::core::batch::{Batcher, Limits, Position};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::conninfo::ConnInfo;
use crate::pg::slot;
use crate::pg::wire::ReplicationConnection;
use crate::sink::layout::Namespace;
use crate::sink::notify::Notifier;
use crate::sink::owner::Owner;
use crate::sink::registry::Registry;
use crate::sink::spool::{clean_spool_dir, GzipSpools};
use crate::sink::store::Store;
use crate::sink::upload::{self, SchemaVersions};
use crate::table::TableName;

/// Connections and sinks every command needs; opened once per session.
pub(super) struct Endpoints {
    pub source: ConnInfo,
    pub catalog: Arc<tokio_postgres::Client>,
    pub sinks: Sinks,
}

/// Component of the "another instance holds the slot" error: a standby waiting, not a failure of
/// the active daemon (the driver does not record it as the daemon's state).
pub(super) const STANDBY: Component = Component::Standby;

/// Connects to the source (checking its preconditions), the registry (migrating it), the object store
/// and NATS.
pub(super) async fn connect(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<Endpoints, Error> {
    let source = config.source_conninfo()?;
    let catalog = source.connect().await?;
    slot::check_source(&catalog, &config.source.publication).await?;
    let installed =
        crate::sink::registry::migrate::install_reload_marker(&catalog, &config.registry.schema)
            .await?;
    if installed == crate::sink::registry::migrate::MarkerTrigger::Missing {
        tracing::warn!(
            "the source role is not a superuser: the reload-marker and DDL-capture event triggers are \
             not installed, so `cdc-egress reload` is unavailable and schema changes get no DDL records \
             (no reload after a filled-in default or a rewrite) until `cdc-egress migrate` runs as a \
             superuser"
        );
    }
    let registry_info = config.registry_conninfo()?;
    let mut reg_client = registry_info.connect().await?;
    crate::sink::registry::migrate(&mut reg_client, &config.registry.schema).await?;
    drop(reg_client);
    let registry = Registry::new(
        registry_info.pool(4)?,
        &config.registry.schema,
        &config.source.name,
    );
    let incarnation = registry.incarnation().await?;
    let store = Store::open(&config.output.url, &config.output.options_exposed())?;
    let notifier = Notifier::connect(&config.nats)
        .await?
        .map(|n| n.with_incarnation(&incarnation));
    Ok(Endpoints {
        source,
        catalog: Arc::new(catalog),
        sinks: Sinks {
            layout: Namespace::new(store.root(), &config.source.name),
            store,
            registry,
            notifier,
            metrics,
            shutdown,
        },
    })
}

/// This daemon's own folder in the spool directory, which its start-up empties: named by the source
/// name and a digest of the source URL (without its password) and the slot, so two daemons on one
/// host never share one, not even two with the same slot name on different databases.
fn spool_subdir(config: &Config, slot_name: &str) -> String {
    use sha2::Digest;
    let who = format!("{}\n{slot_name}", config.source.url.redacted());
    let digest = hex::encode(sha2::Sha256::digest(who.as_bytes()));
    format!("{}-{}", config.source.name, &digest[..12])
}

/// Finishes what a previous run committed (manifests and notices of registered batches), then
/// clears what it left half-done (objects of batches that never committed), then gives every table
/// its schema-bucket entry if it has none yet.
pub(super) async fn recover(sinks: &Sinks) -> Result<(), Error> {
    let finished = deliver::finish_unnotified(sinks).await?;
    if finished > 0 {
        tracing::info!(files = finished, "completed notices of committed batches");
    }
    remove_orphans(sinks).await?;
    deliver::backfill_schemas(sinks).await?;
    Ok(())
}

/// Publishes every unannounced `lost` event of the slot on `<prefix>.<source>.slot.<slot>`, exactly once
/// (as notices are), so NATS consumers learn of the gap and of the re-export that repairs it.
async fn announce_slot_losses(sinks: &Sinks, slot: &str) -> Result<(), Error> {
    let Some(n) = &sinks.notifier else {
        return Ok(());
    };
    for (id, lsn, detail, at) in sinks.registry.unannounced_slot_losses(slot).await? {
        let subject = format!(
            "{}.slot.{}",
            crate::sink::notify::Publish::subject_prefix(n),
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
        removed += upload::remove_orphans(
            &sinks.store,
            &sinks.layout,
            &table,
            Some(&dates),
            &committed,
        )
        .await?;
        seen.insert(table);
    }
    // Table directories the registry does not know yet, below this source's directory only: other
    // sources' directories are theirs (see `sink::owner`).
    let source_dir = sinks.layout.dir();
    for schema in sinks.store.list_dirs(&source_dir).await? {
        let schema_dir = source_dir.clone().join(schema.as_str());
        for name in sinks.store.list_dirs(&schema_dir).await? {
            let table = TableName::new(schema.as_str(), name);
            if !seen.contains(&table) {
                removed += upload::remove_orphans(
                    &sinks.store,
                    &sinks.layout,
                    &table,
                    None,
                    &HashSet::new(),
                )
                .await?;
            }
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
pub(super) async fn take_slot_lock(ep: &Endpoints, slot_name: &str) -> Result<(), Error> {
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

/// Claims the registry, the output prefix and the notice subject prefix for this slot of this
/// database, or refuses (a configuration error) when another slot or database owns any of them:
/// before recovery, which deletes and completes what it finds (see [`crate::sink::owner`]). Runs
/// under the slot's lock.
pub(super) async fn claim_ownership(ep: &Endpoints, slot_name: &str) -> Result<(), Error> {
    let database: String = ep
        .catalog
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| crate::pg::conninfo::pg_error(e).context("read the source database name"))?
        .get(0);
    // Readable by any role by default; a role denied it is compared by names alone.
    let system_identifier = match ep
        .catalog
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(e) if e.code().is_some() => {
            tracing::debug!(error = %e, "cannot read the source's system identifier");
            String::new()
        }
        Err(e) => {
            return Err(
                crate::pg::conninfo::pg_error(e).context("read the source's system identifier")
            )
        }
    };
    let ours = Owner {
        system_identifier,
        database,
        slot: slot_name.to_string(),
    };
    ep.sinks.registry.claim_owner(&ours).await?;
    crate::sink::owner::claim_prefix(&ep.sinks.store, &ep.sinks.layout, &ours).await?;
    match &ep.sinks.notifier {
        Some(n) => n.claim_subject_prefix(&ours).await,
        None => Ok(()),
    }
}

/// Makes the slot ready to stream by the plan for its state (`slot::plan_slot`): checks a healthy
/// one, creates a missing one (requesting the initial exports first, so a crash in between comes back
/// here), or handles a lost one by `source.slot_lost`; announces recorded losses on NATS. Returns the
/// position to stream from (the slot's confirmed LSN).
pub(super) async fn prepare_slot(
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
    announce_slot_losses(sinks, slot_name).await?;
    let start = slot::slot_info(&ep.catalog, slot_name)
        .await?
        .and_then(|i| i.confirmed_flush)
        .unwrap_or(Lsn::ZERO);
    Ok(start)
}

/// What a session streams with: the batcher (skip positions and holds from the registry), the
/// schema versions, the cleaned spool directory, and the reloads to resume.
pub(super) struct Prepared {
    pub(super) batcher: Batcher<GzipSpools>,
    pub(super) versions: SchemaVersions,
    pub(super) spool_dir: std::path::PathBuf,
    /// (table, reload id, request id) of the reloads the coordinator resumes.
    pub(super) resume: Vec<(TableName, i64, String)>,
}

/// Builds the batcher for a session starting at `start`: per-table skip positions and schema
/// versions from the registry, a spool directory cleared of a previous run's files, and a hold on
/// every table whose reload resumes now.
pub(super) async fn prepare_batcher(
    config: &Config,
    sinks: &Sinks,
    start: Lsn,
) -> Result<Prepared, Error> {
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
        .join(spool_subdir(config, slot_name));
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
    if config.nats.change_events.enabled() && sinks.notifier.is_some() {
        batcher.enable_change_events();
        if config.nats.txn_events {
            batcher.enable_txn_events();
        }
    }
    batcher.set_marker_prefix(crate::sink::registry::migrate::marker_prefix(
        &config.registry.schema,
    ));
    batcher.set_marker_source(&config.source.name);
    batcher.set_ddl_scope(&config.source.publication, config.reload.on_rewrite);
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
