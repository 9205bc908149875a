//! Applies `migrations/NNNN_*.sql` to the registry schema, idempotently.
//!
//! Each migration runs once, in its own transaction, under a transaction-scoped advisory lock so two
//! processes migrating at once serialize; the applied versions are recorded in
//! `<schema>.schema_migrations`. The files are compiled into the binary, so `migrate` needs nothing
//! but a connection.

use crate::error::{Component, Error};
use crate::table::{quote_ident, quote_literal};

/// `(version, name, sql)`; `{{schema}}` in the SQL is replaced by the quoted registry schema and
/// `{{schema_literal}}` by the schema name as a string literal.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "registry",
        include_str!("../../../migrations/0001_registry.sql"),
    ),
    (
        2,
        "reload_requests",
        include_str!("../../../migrations/0002_reload_requests.sql"),
    ),
    (
        3,
        "operators",
        include_str!("../../../migrations/0003_operators.sql"),
    ),
    (
        4,
        "owner",
        include_str!("../../../migrations/0004_owner.sql"),
    ),
    (
        5,
        "sources",
        include_str!("../../../migrations/0005_sources.sql"),
    ),
    (6, "ddl", include_str!("../../../migrations/0006_ddl.sql")),
];

/// The reload-marker event trigger, installed in the source database (see the file's header).
pub const RELOAD_MARKER_SQL: &str = include_str!("../../../migrations/source/reload_marker.sql");
/// The DDL-capture event triggers, installed with the reload marker (see the file's header).
pub const DDL_CAPTURE_SQL: &str = include_str!("../../../migrations/source/ddl_capture.sql");

/// Logical-message prefix of the markers of the instance whose registry schema is `schema`.
pub fn marker_prefix(schema: &str) -> String {
    format!("cdc_egress:{schema}")
}

/// Name of the event trigger of the instance whose registry schema is `schema`.
pub fn marker_trigger_name(schema: &str) -> String {
    trigger_name(schema, "reload_marker")
}

/// Name of one of the DDL-capture event triggers (`what`: `ddl_end`, `ddl_drop`, `ddl_rewrite`).
pub fn ddl_trigger_name(schema: &str, what: &str) -> String {
    trigger_name(schema, what)
}

/// The schema of the DDL-capture objects in the source database: `<schema>_capture`, owned by the
/// superuser that installs it (see `migrations/source/ddl_capture.sql`).
pub fn capture_schema(schema: &str) -> String {
    format!("{schema}_capture")
}

/// `<schema>_<what>`, cut from the front to PostgreSQL's 63-byte limit.
fn trigger_name(schema: &str, what: &str) -> String {
    let mut name = format!("{schema}_{what}");
    while name.len() > 63 {
        name.remove(0);
    }
    name
}

/// What [`install_reload_marker`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerTrigger {
    /// Installed or refreshed just now.
    Installed,
    /// Not a superuser, but a superuser installed it earlier: it works, it was not refreshed.
    AlreadyInstalled,
    /// Not a superuser and not installed: `cdc-egress reload` cannot work until a superuser runs
    /// `migrate`.
    Missing,
}

/// Installs (or refreshes) the reload-marker and DDL-capture event triggers in the source database.
/// Event triggers need a superuser; without one nothing is changed and the result says whether an
/// earlier installation of the reload marker is there.
pub async fn install_reload_marker(
    c: &tokio_postgres::Client,
    schema: &str,
) -> Result<MarkerTrigger, Error> {
    let row = c
        .query_one(
            "SELECT rolsuper, EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = $1 AND evtenabled <> 'D'), \
             EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = $2 AND evtenabled <> 'D') \
             FROM pg_roles WHERE rolname = current_user",
            &[&marker_trigger_name(schema), &ddl_trigger_name(schema, "ddl_end")],
        )
        .await
        .map_err(|e| pg("check superuser", e))?;
    let (superuser, present, ddl_present): (bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    if !superuser {
        if present && !ddl_present {
            // An installation from before DDL capture: reloads work, schema changes get no records.
            tracing::warn!(
                "the DDL-capture event triggers are not installed in the source database (installed \
                 before this version): schema changes get no DDL records and no reload after a \
                 filled-in default or a rewrite until `cdc-egress migrate` runs as a superuser \
                 (README \"Schema changes\")"
            );
        }
        return Ok(if present {
            MarkerTrigger::AlreadyInstalled
        } else {
            MarkerTrigger::Missing
        });
    }
    let sql = format!("{RELOAD_MARKER_SQL};\n{DDL_CAPTURE_SQL}")
        .replace("{{schema}}", &quote_ident(schema))
        .replace("{{schema_literal}}", &quote_literal(&quote_ident(schema)))
        .replace(
            "{{schema_ident_literal}}",
            &quote_literal(&quote_ident(schema)),
        )
        .replace("{{prefix_literal}}", &quote_literal(&marker_prefix(schema)))
        .replace(
            "{{trigger_literal}}",
            &quote_literal(&marker_trigger_name(schema)),
        )
        .replace("{{capture}}", &quote_ident(&capture_schema(schema)))
        .replace(
            "{{capture_literal}}",
            &quote_literal(&capture_schema(schema)),
        )
        .replace(
            "{{capture_ident_literal}}",
            &quote_literal(&quote_ident(&capture_schema(schema))),
        )
        .replace(
            "{{ddl_end_trigger_literal}}",
            &quote_literal(&ddl_trigger_name(schema, "ddl_end")),
        )
        .replace(
            "{{ddl_drop_trigger_literal}}",
            &quote_literal(&ddl_trigger_name(schema, "ddl_drop")),
        )
        .replace(
            "{{ddl_rewrite_trigger_literal}}",
            &quote_literal(&ddl_trigger_name(schema, "ddl_rewrite")),
        );
    // One explicit transaction holding the migration lock until it commits: daemons of one
    // database starting together (several slots) must not run `CREATE SCHEMA IF NOT EXISTS` or
    // `CREATE OR REPLACE FUNCTION` against each other's uncommitted catalog rows ("tuple
    // concurrently updated", a duplicate schema). The key is `migrate`'s, so a registry migrating in
    // the same database waits too.
    c.batch_execute(&format!(
        "BEGIN; SET LOCAL client_min_messages = warning; \
         SELECT pg_advisory_xact_lock(hashtext('cdc_egress.migrate:' || {lit})); {sql}; COMMIT;",
        lit = quote_literal(schema)
    ))
    .await
    .map_err(|e| {
        pg(
            "install the reload-marker and DDL-capture event triggers",
            e,
        )
    })?;
    Ok(MarkerTrigger::Installed)
}

pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

fn pg(what: &str, e: tokio_postgres::Error) -> Error {
    let err = Error::postgres(Component::Registry, what, e);
    if err.sqlstate() == Some("42501") {
        err.hint("the registry role needs CREATE on the database")
    } else {
        err
    }
}

/// The highest applied migration, 0 when the registry is not installed.
pub async fn installed_version(c: &tokio_postgres::Client, schema: &str) -> Result<i32, Error> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass(format('%I.schema_migrations', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| pg("check registry", e))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = c
        .query_one(
            &format!(
                "SELECT max(version) FROM {}.schema_migrations",
                quote_ident(schema)
            ),
            &[],
        )
        .await
        .map_err(|e| pg("read registry version", e))?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// Installs or upgrades the registry schema. Returns the versions applied by this call.
pub async fn migrate(c: &mut tokio_postgres::Client, schema: &str) -> Result<Vec<i32>, Error> {
    let q = quote_ident(schema);
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let tx = c.transaction().await.map_err(|e| pg("begin", e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('cdc_egress.migrate:' || $1::text))",
            &[&schema],
        )
        .await
        .map_err(|e| pg("lock", e))?;
        // `IF NOT EXISTS` raises NOTICEs on every start otherwise; they are noise, not news.
        tx.batch_execute(&format!(
            "SET LOCAL client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {q}; \
             CREATE TABLE IF NOT EXISTS {q}.schema_migrations (version integer PRIMARY KEY, name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await
        .map_err(|e| pg("create registry schema", e))?;
        let done = tx
            .query_opt(
                &format!("SELECT 1 FROM {q}.schema_migrations WHERE version = $1"),
                &[version],
            )
            .await
            .map_err(|e| pg("read registry version", e))?
            .is_some();
        if !done {
            let body = sql
                .replace("{{schema}}", &q)
                .replace("{{schema_literal}}", &quote_literal(schema));
            tx.batch_execute(&body)
                .await
                .map_err(|e| pg(&format!("migration {version:04}_{name}"), e))?;
            tx.execute(
                &format!("INSERT INTO {q}.schema_migrations (version, name) VALUES ($1, $2)"),
                &[version, name],
            )
            .await
            .map_err(|e| pg("record migration", e))?;
            applied.push(*version);
        }
        tx.commit().await.map_err(|e| pg("commit migration", e))?;
    }
    Ok(applied)
}
