//! Applies `migrations/NNNN_*.sql` to the registry schema, idempotently.
//!
//! Each migration runs once, in its own transaction, under a transaction-scoped advisory lock so two
//! processes migrating at once serialize; the applied versions are recorded in
//! `<schema>.schema_migrations`. The files are compiled into the binary, so `migrate` needs nothing
//! but a connection.

use crate::error::Error;
use crate::table::{quote_ident, quote_literal};

/// `(version, name, sql)`; `{{schema}}` in the SQL is replaced by the quoted registry schema and
/// `{{schema_literal}}` by the schema name as a string literal.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "registry",
    include_str!("../../migrations/0001_registry.sql"),
)];

pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

fn pg(what: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(d) if d.code().code() == "42501" => Error::definite(
            "registry",
            format!(
                "{what}: permission denied ({}); the registry role needs CREATE on the database",
                d.message()
            ),
        ),
        Some(d) => Error::definite(
            "registry",
            format!("{what}: {} (SQLSTATE {})", d.message(), d.code().code()),
        ),
        None => Error::transient("registry", format!("{what}: {e}")),
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
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {q}; \
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
