//! Preconditions and catalog facts on the source database: `wal_level`, the publication (and which
//! columns and rows it publishes of a table), the slot, and the column facts a Relation message does
//! not carry.
//!
//! Every check here fails with a definite error that says what to do (set `wal_level = logical` and
//! restart, create the publication, grant REPLICATION), because none of them can fix itself by retrying.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::core::decode::{Relation, ReplicaIdentity as WireIdentity};
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::pg::conninfo::ConnInfo;
use crate::table::{ColumnSchema, ReplicaIdentity, TableName, TableSchema};

fn pg(what: &str, e: tokio_postgres::Error) -> Error {
    Error::postgres(Component::Source, what, e)
}

/// `source.slot_lost`: what the daemon does when its slot can no longer stream (invalidated by
/// `max_slot_wal_keep_size` or an idle timeout, or dropped while the registry says it existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotLostPolicy {
    /// Stop with a definite error that explains the gap and the choices (default: a person decides).
    Error,
    /// Record the gap, create a new slot and export every published table consistently from it, so
    /// the files are exact again by the consumer rule; announce it on NATS.
    Reexport,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Default)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush: Option<Lsn>,
    pub active_pid: Option<i32>,
    /// WAL retained by the slot: current WAL LSN minus its restart LSN.
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` (about to be lost) or `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is lost, when
    /// `max_slot_wal_keep_size` limits it (PostgreSQL 13+).
    pub safe_wal_size: Option<i64>,
    /// Why the slot was invalidated (PostgreSQL 17+: `wal_removed`, `idle_timeout`, …; `conflicting`
    /// before that). `None` while it is valid.
    pub invalidation_reason: Option<String>,
    /// Whether the slot is synchronized to standbys (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
}

impl SlotInfo {
    /// The slot can no longer stream: its WAL is gone or it was invalidated. Nothing retries this
    /// away; see the `source.slot_lost` policy.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }
}

/// A warning when the slot is about to be invalidated by `max_slot_wal_keep_size`: its WAL status
/// is `unreserved`, or less than a quarter of what it retains can still be written. Shared by
/// `status` and the daemon's log.
pub fn retention_warning(i: &SlotInfo) -> Option<String> {
    if i.is_lost() {
        return None;
    }
    if i.wal_status.as_deref() == Some("unreserved") {
        return Some(
            "the slot retains more WAL than max_slot_wal_keep_size allows: it will be invalidated at the next \
             checkpoint unless streaming catches up"
                .to_string(),
        );
    }
    match (i.safe_wal_size, i.lag_bytes) {
        (Some(safe), Some(lag)) if safe < lag / 4 => Some(format!(
            "the slot can retain only {safe} more bytes of WAL before max_slot_wal_keep_size invalidates it \
             (it retains {lag})"
        )),
        _ => None,
    }
}

/// Reads the slot's row. Columns that differ between PostgreSQL versions are read through
/// `to_jsonb`, so one query serves 14 to 18 (a missing column is simply `None`).
pub async fn slot_info(c: &Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = c
        .query_opt(
            "SELECT to_jsonb(s)::text, (pg_current_wal_lsn() - s.restart_lsn)::bigint \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| pg("look up replication slot", e))?;
    Ok(row.map(|r| {
        let j: serde_json::Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap_or_default();
        let text = |k: &str| j.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let int = |k: &str| j.get(k).and_then(|v| v.as_i64());
        let invalidation_reason = text("invalidation_reason").or_else(|| {
            (j.get("conflicting").and_then(|v| v.as_bool()) == Some(true))
                .then(|| "conflicting".to_string())
        });
        SlotInfo {
            plugin: text("plugin"),
            database: text("database"),
            confirmed_flush: text("confirmed_flush_lsn").and_then(|s| s.parse().ok()),
            active_pid: int("active_pid").map(|p| p as i32),
            lag_bytes: r.get(1),
            wal_status: text("wal_status"),
            safe_wal_size: int("safe_wal_size"),
            invalidation_reason,
            failover: j.get("failover").and_then(|v| v.as_bool()),
        }
    }))
}

/// A session whose open transaction keeps a reload's cut from being taken.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CutBlocker {
    pub pid: i32,
    /// Seconds since its transaction began.
    pub xact_age_seconds: f64,
    pub state: Option<String>,
    pub user: Option<String>,
    pub application_name: Option<String>,
    /// The start of its current or last query (at most 200 characters).
    pub query: Option<String>,
}

/// The transactions a reload's cut waits for. Taking a cut creates a temporary slot, and PostgreSQL
/// only finishes creating a logical slot once every transaction that was running when it started
/// has ended; the walsender waits on their locks, so `pg_blocking_pids` names them. Empty when no
/// cut of `slot` is waiting.
pub async fn cut_blockers(c: &Client, slot: &str) -> Result<Vec<CutBlocker>, Error> {
    // The cut slot is `<slot>_cut_<tag>` cut to 63 bytes (`reload::export::take_cut`): match the
    // part of that prefix that survives the truncation.
    let mut prefix = format!("{slot}_cut_");
    while prefix.len() > 63 {
        prefix.pop();
    }
    let escaped = prefix
        .replace('\\', "\\\\")
        .replace('_', "\\_")
        .replace('%', "\\%");
    let pattern = format!("CREATE_REPLICATION_SLOT \"{escaped}%");
    let rows = c
        .query(
            "SELECT b.pid, extract(epoch FROM now() - b.xact_start)::float8, b.state, b.usename::text, \
             b.application_name, left(b.query, 200) \
             FROM pg_stat_activity w \
             CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid) \
             JOIN pg_stat_activity b ON b.pid = bp.pid \
             WHERE w.backend_type = 'walsender' AND w.query LIKE $1 \
             ORDER BY b.xact_start NULLS LAST",
            &[&pattern],
        )
        .await
        .map_err(|e| pg("look up what a reload cut waits for", e))?;
    Ok(rows
        .iter()
        .map(|r| CutBlocker {
            pid: r.get(0),
            xact_age_seconds: r.get::<_, Option<f64>>(1).unwrap_or(0.0),
            state: r.get(2),
            user: r.get(3),
            application_name: r.get(4),
            query: r.get(5),
        })
        .collect())
}

impl std::fmt::Display for CutBlocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}, transaction open for {:.0}s",
            self.pid,
            self.state.as_deref().unwrap_or("?"),
            self.xact_age_seconds
        )?;
        if let Some(u) = &self.user {
            write!(f, ", user {u}")?;
        }
        if let Some(q) = self.query.as_deref().filter(|q| !q.is_empty()) {
            write!(f, ", query: {}", q.replace('\n', " "))?;
        }
        f.write_str(")")
    }
}

/// The oldest supported source server, as `server_version_num`: PostgreSQL 14, the first whose
/// pgoutput has the `messages` option (heartbeats and reload markers are logical messages). 14–18 are
/// tested by `deploy/local/pg_versions.sh`; README ("The source needs PostgreSQL 14 or newer").
pub const MIN_SERVER_VERSION_NUM: i32 = 140000;

/// Refuses a source older than [`MIN_SERVER_VERSION_NUM`]. `num` is the server's `server_version_num`
/// (e.g. 130012 for 13.12). A configuration-class definite error: pointing cdc-egress at that server
/// is the mistake, and retrying cannot help (exit code 2).
pub fn check_server_version(num: i32) -> Result<(), Error> {
    if num >= MIN_SERVER_VERSION_NUM {
        return Ok(());
    }
    // Since PostgreSQL 10: major * 10000 + minor; before: major * 10000 + minor * 100 + patch.
    let version = if num >= 100000 {
        format!("{}.{}", num / 10000, num % 10000)
    } else {
        format!("{}.{}.{}", num / 10000, num / 100 % 100, num % 100)
    };
    Err(Error::definite(
        Component::Config,
        format!("PostgreSQL {version} is not supported: cdc-egress needs 14 or newer"),
    ))
}

/// An ordinary connection to the source that has passed [`check_server_version`]. The one-shot
/// commands open their first source connection with this (the daemon checks in [`check_source`]), so
/// an unsupported server is refused before anything else happens.
pub async fn connect_source(info: &ConnInfo) -> Result<Client, Error> {
    let c = info.connect().await?;
    let num: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| pg("read the source server version", e))?
        .get(0);
    check_server_version(num)?;
    Ok(c)
}

/// Checks the server version (first), `wal_level`, the database encoding and the publication.
pub async fn check_source(c: &Client, publication: &str) -> Result<(), Error> {
    let row = c
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
             pg_encoding_to_char(encoding), \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) \
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(|e| pg("check source settings", e))?;
    let wal_level: String = row.get(0);
    let version: i32 = row.get(1);
    let encoding: String = row.get(2);
    let can_replicate: bool = row.get::<_, Option<bool>>(3).unwrap_or(false);
    check_server_version(version)?;
    if wal_level != "logical" {
        return Err(Error::definite(
            Component::Source,
            format!(
                "the source has wal_level = {wal_level}; logical replication needs wal_level = logical: \
                 run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
            ),
        ));
    }
    if encoding != "UTF8" {
        return Err(Error::definite(
            Component::Source,
            format!("the source database encoding is {encoding}; cdc-egress writes UTF-8 CSV and needs a UTF8 database"),
        ));
    }
    if !can_replicate {
        return Err(Error::definite(
            Component::Source,
            "the source role lacks the REPLICATION attribute: run ALTER ROLE <role> WITH REPLICATION (as a superuser)",
        ));
    }
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| pg("look up publication", e))?
        .is_some();
    if !exists {
        return Err(Error::definite(
            Component::Source,
            format!(
                "publication {publication:?} does not exist in the source database: create it, e.g. \
                 CREATE PUBLICATION {} FOR ALL TABLES; (or FOR TABLE a, b), or set source.publication",
                crate::table::quote_ident(publication)
            ),
        ));
    }
    Ok(())
}

/// Verifies an existing slot is a pgoutput slot of this database.
pub fn check_slot(info: &SlotInfo, slot: &str, dbname: &str) -> Result<(), Error> {
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::definite(
            Component::Source,
            format!(
                "replication slot {slot:?} uses plugin {:?}, not pgoutput: drop it or choose another source.slot",
                info.plugin
            ),
        ));
    }
    if info.database.as_deref() != Some(dbname) {
        return Err(Error::definite(
            Component::Source,
            format!(
                "replication slot {slot:?} belongs to database {:?}, not {dbname:?}: choose another source.slot",
                info.database
            ),
        ));
    }
    Ok(())
}

/// What a session does with its slot at start. A pure decision, so every case is unit-tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotPlan {
    /// The slot is healthy: stream from it.
    Stream,
    /// No slot and none was ever created by a daemon of this registry (or it was dropped on
    /// purpose with `cdc-egress drop-slot`): a fresh start.
    Create,
    /// The slot was lost (invalidated, or missing although the registry says a daemon created it)
    /// and the policy is `reexport`: record the gap, drop what is left of it, create a new slot
    /// and export every table. `reason` says what happened.
    Recreate { reason: String },
    /// Lost, and the policy is `error`: stop with this explanation.
    Refuse { reason: String },
}

/// Decides [`SlotPlan`] from the slot's row, the newest registry event of the slot (`created`,
/// `dropped`, `lost`, or none) and the policy.
pub fn plan_slot(
    slot: &str,
    info: Option<&SlotInfo>,
    last_event: Option<&str>,
    policy: SlotLostPolicy,
) -> SlotPlan {
    let reason = match info {
        // A crash in the middle of a re-export (the `lost` event recorded, the slot not dropped
        // yet) goes on with it, whatever the policy says now.
        Some(i) if i.is_lost() && last_event == Some("lost") => {
            return SlotPlan::Recreate {
                reason: format!("continuing the re-export after slot {slot} was lost"),
            }
        }
        Some(i) if i.is_lost() => format!(
            "replication slot {slot} was invalidated ({}); the WAL after its confirmed position {} is gone",
            i.invalidation_reason
                .clone()
                .or_else(|| i.wal_status.clone())
                .unwrap_or_default(),
            i.confirmed_flush.map(|l| l.to_string()).unwrap_or("-".into())
        ),
        Some(_) => return SlotPlan::Stream,
        // A crash in the middle of a re-export finds `lost` last: go on with it.
        None if last_event == Some("lost") => {
            return SlotPlan::Recreate {
                reason: format!("continuing the re-export after slot {slot} was lost"),
            }
        }
        None if last_event == Some("created") => format!(
            "replication slot {slot} was dropped by someone else (the registry says a daemon created it, and \
             `cdc-egress drop-slot` was not used); the changes since its last confirmed position are gone"
        ),
        None => return SlotPlan::Create,
    };
    match policy {
        SlotLostPolicy::Reexport => SlotPlan::Recreate { reason },
        SlotLostPolicy::Error => SlotPlan::Refuse {
            reason: format!(
                "{reason}. The files cannot be continued exactly from here. Either set source.slot_lost: reexport \
                 (a new slot, every published table exported again, the gap recorded in the registry and \
                 announced on NATS), or run `cdc-egress drop-slot --yes` to start afresh; raise \
                 max_slot_wal_keep_size (or idle_replication_slot_timeout) so it does not happen again"
            ),
        },
    }
}

/// Creates the logical slot on the replication connection and returns its consistent point.
/// `failover` (PostgreSQL 17+; the caller has checked [`require_failover_support`]) makes the
/// server synchronize it to standbys.
pub async fn create_slot(
    repl: &mut crate::pg::wire::ReplicationConnection,
    slot: &str,
    failover: bool,
) -> Result<Lsn, Error> {
    let name = crate::table::quote_ident(slot);
    let command = if failover {
        format!(
            "CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        )
    } else {
        format!("CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
    };
    let rows = repl
        .simple_query(&command)
        .await
        .map_err(|e| e.context(format!("create replication slot {slot}")))?;
    Ok(rows
        .first()
        .and_then(|r| r.get(1))
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(Lsn::ZERO))
}

/// Turns on `failover` for an existing slot (PostgreSQL 17+; checked by the caller).
pub async fn enable_failover(
    repl: &mut crate::pg::wire::ReplicationConnection,
    slot: &str,
) -> Result<(), Error> {
    repl.simple_query(&format!(
        "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
        crate::table::quote_ident(slot)
    ))
    .await
    .map_err(|e| e.context(format!("enable failover on replication slot {slot}")))?;
    tracing::info!(slot, "enabled failover on the replication slot");
    Ok(())
}

/// A definite configuration error unless the server can synchronize slots (PostgreSQL 17+).
pub async fn require_failover_support(
    repl: &mut crate::pg::wire::ReplicationConnection,
) -> Result<(), Error> {
    let rows = repl.simple_query("SHOW server_version_num").await?;
    let version: i32 = rows
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version < 170000 {
        return Err(Error::definite(
            Component::Config,
            format!(
                "source.slot_failover needs PostgreSQL 17 or later (the source is {version}): unset it, or upgrade"
            ),
        ));
    }
    Ok(())
}

/// Tables in the publication (what a fresh start exports and what `reload` accepts).
pub async fn published_tables(c: &Client, publication: &str) -> Result<Vec<TableName>, Error> {
    let rows = c
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(|e| pg("list published tables", e))?;
    Ok(rows
        .into_iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// What a publication publishes of one table: the columns and the rows pgoutput sends for it, so
/// that an export can show exactly the same (column lists and row filters, PostgreSQL 15+).
///
/// # Which entry counts
/// A table can be in a publication through several entries (`FOR ALL TABLES`, `FOR TABLES IN
/// SCHEMA`, an explicit `FOR TABLE` entry with or without a list and a filter, or through an
/// ancestor when it is a partition). pgoutput looks only at the relation it publishes the changes
/// as (`publish_as_relid`: the partition itself, or with `publish_via_partition_root` its topmost
/// published ancestor) and, for that relation and the publication (`pgoutput_column_list_init`,
/// `pgoutput_row_filter_init`, unchanged in substance from 15 to 18):
/// - columns: `FOR ALL TABLES` publishes every column; otherwise the explicit entry's column list if
///   it has one, else every column (15 to 18 refuse a list next to the table's schema entry;
///   pgoutput would use the list, and so does this);
/// - rows: `FOR ALL TABLES`, or the relation's schema listed `FOR TABLES IN SCHEMA`, publish every
///   row even if the explicit entry has a filter; otherwise the explicit entry's filter if any.
///
/// "Every column" means the columns without `attgenerated`, plus the stored generated ones when
/// PostgreSQL 18's `publish_generated_columns = stored` is set; a column list publishes exactly its
/// columns (on 18 it may name stored generated ones). The exported relation is the one
/// `pg_publication_tables` lists, which is `publish_as_relid` (leaves without
/// `publish_via_partition_root`, the topmost published ancestor with it), so looking the entry up
/// for the exported relation applies what pgoutput applies to the same rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishedSubset {
    /// The column list (attribute numbers); `None`: no list, every column.
    pub columns: Option<Vec<i16>>,
    /// Without a list, stored generated columns are published too (18's `publish_generated_columns`).
    pub stored_generated: bool,
    /// The row filter as SQL valid for the table (`pg_get_expr`); `None`: every row.
    pub row_filter: Option<String>,
}

impl PublishedSubset {
    /// Whether pgoutput sends the column `attnum` whose `attgenerated` is `generated` (`""`, `"s"`
    /// stored, `"v"` virtual).
    pub fn publishes_column(&self, attnum: i16, generated: &str) -> bool {
        match &self.columns {
            Some(list) => list.contains(&attnum),
            None => generated.is_empty() || (generated == "s" && self.stored_generated),
        }
    }
}

/// The catalog rows [`PublishedSubset`] is decided from (PostgreSQL 15+).
#[derive(Debug, Clone, Default)]
pub struct PublicationEntries {
    /// `pg_publication.puballtables`.
    pub all_tables: bool,
    /// The table's schema is in `pg_publication_namespace` for the publication.
    pub schema_listed: bool,
    /// The explicit entry (`pg_publication_rel`), if any: its column list and its row filter.
    pub explicit: Option<(Option<Vec<i16>>, Option<String>)>,
    /// `pg_publication.pubgencols = 's'` (PostgreSQL 18+).
    pub stored_generated: bool,
}

/// pgoutput's combination rule (see [`PublishedSubset`]), pure.
pub fn published_subset_of(e: &PublicationEntries) -> PublishedSubset {
    let (list, filter) = match (&e.explicit, e.all_tables) {
        (Some((list, filter)), false) => (list.clone(), filter.clone()),
        _ => (None, None),
    };
    PublishedSubset {
        columns: list,
        stored_generated: e.stored_generated,
        row_filter: filter.filter(|_| !e.schema_listed),
    }
}

/// Reads what `publication` publishes of the table `relid` ([`PublishedSubset`]). Plain `SELECT`s
/// on the catalog tables, so inside an imported snapshot it sees the publication as of that
/// snapshot, like pgoutput decoding at the cut. On PostgreSQL 14 there are neither column lists nor
/// row filters: every column (without `attgenerated`) and every row.
pub async fn published_subset(
    c: &Client,
    publication: &str,
    relid: u32,
) -> Result<PublishedSubset, Error> {
    let version: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| pg("read the source server version", e))?
        .get(0);
    if version < 150000 {
        return Ok(PublishedSubset::default());
    }
    let row = c
        .query_opt(
            "SELECT p.puballtables, \
                    EXISTS (SELECT 1 FROM pg_publication_namespace n \
                            WHERE n.pnpubid = p.oid AND n.pnnspid = c.relnamespace), \
                    r.oid IS NOT NULL, r.prattrs::int2[], pg_get_expr(r.prqual, r.prrelid), \
                    coalesce(to_jsonb(p)->>'pubgencols' = 's', false), \
                    EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a \
                            JOIN pg_class ac ON ac.oid = a.relid \
                            WHERE EXISTS (SELECT 1 FROM pg_publication_rel r2 \
                                          WHERE r2.prpubid = p.oid AND r2.prrelid = a.relid) \
                               OR EXISTS (SELECT 1 FROM pg_publication_namespace n2 \
                                          WHERE n2.pnpubid = p.oid AND n2.pnnspid = ac.relnamespace)) \
             FROM pg_publication p JOIN pg_class c ON c.oid = $2::oid \
             LEFT JOIN pg_publication_rel r ON r.prpubid = p.oid AND r.prrelid = c.oid \
             WHERE p.pubname = $1",
            &[&publication, &relid],
        )
        .await
        .map_err(|e| pg("read the publication's column list and row filter", e))?
        .ok_or_else(|| {
            Error::definite(
                Component::Source,
                format!("publication {publication:?} does not exist in the source database"),
            )
        })?;
    let explicit = row
        .get::<_, bool>(2)
        .then(|| (row.get::<_, Option<Vec<i16>>>(3), row.get(4)));
    let entries = PublicationEntries {
        all_tables: row.get(0),
        schema_listed: row.get(1),
        explicit,
        stored_generated: row.get(5),
    };
    // Membership is checked on the current catalog before this runs; in the snapshot the table may
    // not have been published yet (dropped from the publication and added back, with another list,
    // while the cut was taken). "Every column and row" is right only for a table published through
    // an ancestor partition; anything else is refused rather than exported unfiltered. Transient:
    // the next attempt takes a new cut, whose snapshot has the entry.
    let via_ancestor: bool = row.get(6);
    if !entries.all_tables && !entries.schema_listed && entries.explicit.is_none() && !via_ancestor
    {
        return Err(Error::transient(
            Component::Reload,
            format!(
                "table oid {relid} is not in publication {publication:?} as of the export's snapshot \
                 (it joined the publication while the cut was taken); retrying with a new cut"
            ),
        ));
    }
    Ok(published_subset_of(&entries))
}

/// The catalog facts of a Relation's columns, one row per column in order (see `describe_relation`).
async fn describe_rows(
    c: &Client,
    rel: &Relation,
    oids: &[u32],
    mods: &[i32],
    names: &[&str],
) -> Result<Vec<tokio_postgres::Row>, Error> {
    c.query(
            "SELECT t.ord::int, format_type(t.oid, NULLIF(t.typmod, -1)), \
                    COALESCE(a.attnotnull, false), \
                    (SELECT k.ord::int2 FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                      WHERE i.indrelid = $4::oid AND i.indisprimary AND k.attnum = a.attnum), \
                    a.attnum \
             FROM unnest($1::oid[], $2::int4[], $3::text[]) WITH ORDINALITY AS t(oid, typmod, name, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = $4::oid AND a.attname = t.name AND NOT a.attisdropped \
             ORDER BY t.ord",
            &[&oids, &mods, &names, &rel.oid],
        )
        .await
        .map_err(|e| pg(&format!("describe relation {}.{}", rel.namespace, rel.name), e))
}

/// Builds the table schema for a Relation message: names, OIDs and typmods from the message (what the
/// WAL says at that position); type names via `format_type`, NOT NULL, primary-key positions and
/// attnums from the current catalog (matched by column name; a column the catalog no longer has is
/// nullable, keyless and without an attnum).
pub async fn describe_relation(c: &Client, rel: &Relation) -> Result<Arc<TableSchema>, Error> {
    let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
    let mods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    // The walsender may send a transaction's changes a moment before the transaction is visible to
    // other sessions (it is flushed before it leaves the process array): a column its DDL added or
    // renamed can be missing from the catalog for that moment. Ask again briefly; a name still
    // missing after that was renamed or dropped again since (README "schema.yml").
    let mut attempt = 0;
    let rows = loop {
        let rows = describe_rows(c, rel, &oids, &mods, &names).await?;
        attempt += 1;
        if attempt >= 25 || rows.iter().all(|r| r.get::<_, Option<i16>>(4).is_some()) {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut columns = Vec::with_capacity(rel.columns.len());
    for (col, row) in rel.columns.iter().zip(rows) {
        let not_null: bool = row.get(2);
        let pk: Option<i16> = row.get(3);
        columns.push(ColumnSchema {
            name: col.name.clone(),
            type_name: row
                .get::<_, Option<String>>(1)
                .unwrap_or_else(|| format!("oid:{}", col.type_oid)),
            type_oid: col.type_oid,
            type_modifier: col.type_modifier,
            nullable: !not_null,
            primary_key: pk.map(|p| p as u16),
            replica_key: col.is_key,
            attnum: row.get(4),
        });
    }
    let identity = match rel.replica_identity {
        WireIdentity::Default => ReplicaIdentity::Default,
        WireIdentity::Nothing => ReplicaIdentity::Nothing,
        WireIdentity::Full => ReplicaIdentity::Full,
        WireIdentity::Index => ReplicaIdentity::Index,
    };
    let namespace = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    Ok(TableSchema::new(
        TableName::new(namespace, rel.name.clone()),
        rel.oid,
        identity,
        columns,
    ))
}

#[cfg(test)]
mod tests {
    use super::SlotLostPolicy::{Error as Stop, Reexport};
    use super::*;

    fn healthy() -> SlotInfo {
        SlotInfo {
            wal_status: Some("reserved".into()),
            ..Default::default()
        }
    }

    #[test]
    fn slot_plans_for_every_case() {
        let lost = SlotInfo {
            wal_status: Some("lost".into()),
            confirmed_flush: Some(Lsn(0x1_0000_0000)),
            ..Default::default()
        };
        let idle = SlotInfo {
            invalidation_reason: Some("idle_timeout".into()),
            ..healthy()
        };
        assert_eq!(
            plan_slot("s", Some(&healthy()), Some("created"), Stop),
            SlotPlan::Stream
        );
        assert_eq!(
            plan_slot("s", Some(&healthy()), None, Stop),
            SlotPlan::Stream
        );
        assert_eq!(plan_slot("s", None, None, Stop), SlotPlan::Create);
        assert_eq!(
            plan_slot("s", None, Some("dropped"), Stop),
            SlotPlan::Create
        );
        for (info, last) in [
            (Some(&lost), Some("created")),
            (Some(&idle), None),
            (None, Some("created")),
        ] {
            match plan_slot("s", info, last, Stop) {
                SlotPlan::Refuse { reason } => {
                    assert!(
                        reason.contains("slot_lost: reexport") && reason.contains("drop-slot"),
                        "{reason}"
                    )
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                plan_slot("s", info, last, Reexport),
                SlotPlan::Recreate { .. }
            ));
        }
        match plan_slot("s", Some(&lost), None, Stop) {
            SlotPlan::Refuse { reason } => {
                assert!(reason.contains("1/0"), "names the position: {reason}")
            }
            other => panic!("{other:?}"),
        }
        match plan_slot("s", Some(&idle), None, Reexport) {
            SlotPlan::Recreate { reason } => assert!(reason.contains("idle_timeout"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A crash in the middle of a re-export continues it, whatever the policy says now.
        assert!(matches!(
            plan_slot("s", None, Some("lost"), Stop),
            SlotPlan::Recreate { .. }
        ));
    }

    #[test]
    fn publication_entries_combine_like_pgoutput() {
        let list = Some(vec![1, 2, 3]);
        let filter = Some("(region = 'eu'::text)".to_string());
        let explicit = Some((list.clone(), filter.clone()));
        // An explicit entry alone: its list and its filter.
        let s = published_subset_of(&PublicationEntries {
            explicit: explicit.clone(),
            ..Default::default()
        });
        assert_eq!(
            (s.columns.clone(), s.row_filter.clone()),
            (list.clone(), filter.clone())
        );
        assert!(s.publishes_column(2, "") && !s.publishes_column(4, ""));
        // The schema listed too: every row, but a list would still apply (pgoutput_column_list_init
        // does not look at schemas; CREATE PUBLICATION refuses that combination anyway).
        let s = published_subset_of(&PublicationEntries {
            schema_listed: true,
            explicit: explicit.clone(),
            ..Default::default()
        });
        assert_eq!((s.columns, s.row_filter), (list.clone(), None));
        // FOR ALL TABLES: everything (an explicit entry cannot coexist with it; ignored if it did).
        for explicit in [None, explicit.clone()] {
            let s = published_subset_of(&PublicationEntries {
                all_tables: true,
                explicit,
                ..Default::default()
            });
            assert_eq!(s, PublishedSubset::default());
        }
        // An entry without list or filter, a schema entry, or none: every column and row.
        for e in [
            PublicationEntries {
                explicit: Some((None, None)),
                ..Default::default()
            },
            PublicationEntries {
                schema_listed: true,
                ..Default::default()
            },
        ] {
            let s = published_subset_of(&e);
            assert_eq!(s, PublishedSubset::default());
            assert!(s.publishes_column(7, ""));
            assert!(!s.publishes_column(7, "s") && !s.publishes_column(7, "v"));
        }
        // 18's publish_generated_columns = stored: stored generated columns without a list only;
        // a list publishes exactly its columns, generated or not.
        let s = published_subset_of(&PublicationEntries {
            stored_generated: true,
            ..Default::default()
        });
        assert!(s.publishes_column(5, "s") && !s.publishes_column(5, "v"));
        let s = published_subset_of(&PublicationEntries {
            stored_generated: true,
            explicit: Some((Some(vec![5]), None)),
            ..Default::default()
        });
        assert!(
            s.publishes_column(5, "s") && !s.publishes_column(6, "s") && !s.publishes_column(6, "")
        );
    }

    #[test]
    fn servers_older_than_14_are_refused_as_configuration_errors() {
        use crate::error::Kind;
        for (num, shown) in [
            (130012, "13.12"),
            (130000, "13.0"),
            (120022, "12.22"),
            (90624, "9.6.24"),
        ] {
            let e = check_server_version(num).expect_err("too old");
            assert_eq!(e.kind(), Kind::Definite);
            assert_eq!(e.exit_code(), crate::error::EXIT_CONFIG);
            assert_eq!(
                e.message(),
                format!("PostgreSQL {shown} is not supported: cdc-egress needs 14 or newer")
            );
        }
        for num in [140000, 140023, 150018, 160014, 170010, 180004, 190000] {
            assert!(check_server_version(num).is_ok(), "{num}");
        }
    }
}
