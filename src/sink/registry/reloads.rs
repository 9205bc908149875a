//! Reload operations in the registry (`reloads`, plus the table's mode in `tables`).
//!
//! Life of a reload row: `requested` (fresh start) or created `running` when its marker is read →
//! `running` with `cut_lsn` once the cut is taken → `done` (parts registered in the same
//! transaction) or `failed` (with its reason). A table's mode is `reloading` while one of its reloads
//! is active. At most one active reload per table (a unique partial index).

use crate::error::Error;
use crate::lsn::Lsn;
use crate::table::TableName;

use super::{pg_err, FileRecord, Registry};

/// An active (requested or running) reload.
#[derive(Debug, Clone)]
pub struct ActiveReload {
    pub id: i64,
    pub table: TableName,
    pub status: String,
    pub reason: Option<String>,
    pub request: Option<String>,
    pub cut: Option<Lsn>,
}

impl Registry {
    /// The reload for a marker: the active row of the same request (a marker re-read after a
    /// restart), else the table's active reload, else a new `running` row. `None` when the request
    /// already finished (its marker was read again after a restart): nothing is to be done.
    pub async fn reload_for_marker(
        &self,
        table: &TableName,
        request: &str,
        marker: Lsn,
    ) -> Result<Option<i64>, Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err("begin", e))?;
        let r = self.t("reloads");
        let finished = tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM {r} WHERE source = $2 AND request = $1 AND status IN ('done', 'failed')"
                ),
                &[&request, &self.source()],
            )
            .await
            .map_err(|e| pg_err("find reload", e))?
            .is_some();
        if finished {
            tx.execute(
                &format!(
                    "UPDATE {} SET read_at = coalesce(read_at, now()) WHERE source = $2 AND request = $1",
                    self.t("reload_requests")
                ),
                &[&request, &self.source()],
            )
            .await
            .map_err(|e| pg_err("record the request as read", e))?;
            tx.commit().await.map_err(|e| pg_err("commit", e))?;
            return Ok(None);
        }
        let existing = tx
            .query_opt(
                &format!(
                    "SELECT id FROM {r} WHERE source = $4 AND request = $1 \
                     UNION ALL SELECT id FROM {r} WHERE source = $4 AND table_schema = $2 AND table_name = $3 \
                       AND status IN ('requested', 'running') LIMIT 1"
                ),
                &[&request, &table.schema, &table.name, &self.source()],
            )
            .await
            .map_err(|e| pg_err("find reload", e))?;
        let id: i64 = match existing {
            Some(row) => row.get(0),
            None => tx
                .query_one(
                    &format!(
                        "INSERT INTO {r} (table_schema, table_name, status, reason, request, marker_lsn, requested_at, \
                         started_at, source) \
                         VALUES ($1, $2, 'running', $6, $3, $4::text::pg_lsn, now(), now(), $5) RETURNING id"
                    ),
                    &[&table.schema, &table.name, &request, &marker.to_string(), &self.source(), &reason_of(request)],
                )
                .await
                .map_err(|e| pg_err("create reload", e))?
                .get(0),
        };
        self.set_mode(&tx, table, "reloading").await?;
        tx.execute(
            &format!(
                "UPDATE {} SET reload_id = $2, read_at = now() WHERE source = $3 AND request = $1",
                self.t("reload_requests")
            ),
            &[&request, &id, &self.source()],
        )
        .await
        .map_err(|e| pg_err("record the request as read", e))?;
        tx.commit().await.map_err(|e| pg_err("commit", e))?;
        Ok(Some(id))
    }

    /// After the slot was lost: active reloads that wait for their marker to be read again (no cut
    /// yet, created from a marker) can never get it, since it is in the lost WAL. They become
    /// `requested` initial reloads, exported from the new slot's cut with every other table.
    pub async fn restart_uncut_reloads_as_initial(&self) -> Result<u64, Error> {
        let c = self.client().await?;
        c.execute(
            &format!(
                "UPDATE {} SET status = 'requested', reason = 'initial', started_at = NULL \
                 WHERE source = $1 AND status IN ('requested', 'running') AND cut_lsn IS NULL",
                self.t("reloads")
            ),
            &[&self.source()],
        )
        .await
        .map_err(|e| pg_err("restart reloads after the slot was lost", e))
    }

    /// Sets the table's mode; the end of a reload (`streaming`) only replaces `reloading`, so a
    /// DDL record's `dropped`, `renamed` or `unpublished` committed meanwhile stays.
    async fn set_mode(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        table: &TableName,
        mode: &str,
    ) -> Result<(), Error> {
        tx.execute(
            &format!(
                "INSERT INTO {} AS t (table_schema, table_name, mode, source) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (source, table_schema, table_name) DO UPDATE SET updated_at = now(), \
                   mode = CASE WHEN EXCLUDED.mode = 'streaming' AND t.mode <> 'reloading' THEN t.mode \
                          ELSE EXCLUDED.mode END",
                self.t("tables")
            ),
            &[&table.schema, &table.name, &mode, &self.source()],
        )
        .await
        .map_err(|e| pg_err("set table mode", e))?;
        Ok(())
    }

    /// Fresh start: one `requested` reload per table (tables with an active reload are left alone).
    pub async fn request_initial_reloads(&self, tables: &[TableName]) -> Result<(), Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err("begin", e))?;
        for t in tables {
            tx.execute(
                &format!(
                    "INSERT INTO {} (table_schema, table_name, status, reason, source) \
                     VALUES ($1, $2, 'requested', 'initial', $3) ON CONFLICT DO NOTHING",
                    self.t("reloads")
                ),
                &[&t.schema, &t.name, &self.source()],
            )
            .await
            .map_err(|e| pg_err("request initial reload", e))?;
            self.set_mode(&tx, t, "reloading").await?;
        }
        tx.commit().await.map_err(|e| pg_err("commit", e))?;
        Ok(())
    }

    pub async fn active_reloads(&self) -> Result<Vec<ActiveReload>, Error> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT id, table_schema, table_name, status, reason, request, cut_lsn::text FROM {} \
                     WHERE source = $1 AND status IN ('requested', 'running') ORDER BY id",
                    self.t("reloads")
                ),
                &[&self.source()],
            )
            .await
            .map_err(|e| pg_err("read reloads", e))?;
        Ok(rows
            .into_iter()
            .map(|r| ActiveReload {
                id: r.get(0),
                table: TableName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                status: r.get(3),
                reason: r.get(4),
                request: r.get(5),
                cut: r.get::<_, Option<String>>(6).and_then(|s| s.parse().ok()),
            })
            .collect())
    }

    /// Records the cut of an attempt (each attempt takes a new one).
    pub async fn record_cut(
        &self,
        id: i64,
        cut: Lsn,
        snapshot: &str,
        estimate_rows: i64,
        estimate_bytes: i64,
    ) -> Result<(), Error> {
        let c = self.client().await?;
        c.execute(
            &format!(
                "UPDATE {} SET status = 'running', cut_lsn = $2::text::pg_lsn, snapshot = $3, \
                 started_at = coalesce(started_at, now()), attempts = attempts + 1, rows = 0, bytes = 0, \
                 estimate_rows = $4, estimate_bytes = $5, error = NULL WHERE id = $1",
                self.t("reloads")
            ),
            &[&id, &cut.to_string(), &snapshot, &estimate_rows, &estimate_bytes],
        )
        .await
        .map_err(|e| pg_err("record reload cut", e))?;
        Ok(())
    }

    pub async fn reload_estimate(&self, id: i64, rows: i64, bytes: i64) -> Result<(), Error> {
        let c = self.client().await?;
        c.execute(
            &format!(
                "UPDATE {} SET estimate_rows = $2, estimate_bytes = $3 WHERE id = $1",
                self.t("reloads")
            ),
            &[&id, &rows, &bytes],
        )
        .await
        .map_err(|e| pg_err("record reload estimate", e))?;
        Ok(())
    }

    /// The registered part rows of a reload, in part order.
    pub async fn reload_files(&self, id: i64) -> Result<Vec<super::Registered>, Error> {
        self.files_where("reload_id = $1 AND kind = 'reload'", &[&id])
            .await
    }

    /// The schema version a file with `fingerprint` gets: the table's current version when the
    /// fingerprint matches, else the next one (which the next streaming batch of that shape gets too).
    pub async fn schema_version_for(
        &self,
        table: &TableName,
        fingerprint: &str,
    ) -> Result<i32, Error> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT schema_version, schema_fingerprint FROM {} WHERE source = $3 AND table_schema = $1 \
                     AND table_name = $2",
                    self.t("tables")
                ),
                &[&table.schema, &table.name, &self.source()],
            )
            .await
            .map_err(|e| pg_err("read schema version", e))?;
        Ok(match row {
            Some(r) if r.get::<_, Option<String>>(1).as_deref() == Some(fingerprint) => r.get(0),
            Some(r) => r.get::<_, i32>(0) + 1,
            None => 1,
        })
    }

    pub async fn reload_progress(&self, id: i64, rows: i64, bytes: i64) -> Result<(), Error> {
        let c = self.client().await?;
        c.execute(
            &format!(
                "UPDATE {} SET rows = $2, bytes = $3 WHERE id = $1",
                self.t("reloads")
            ),
            &[&id, &rows, &bytes],
        )
        .await
        .map_err(|e| pg_err("record reload progress", e))?;
        Ok(())
    }

    /// Registers every part and marks the reload done, atomically. Returns the parts' file ids.
    pub async fn complete_reload(&self, id: i64, parts: &[FileRecord]) -> Result<Vec<i64>, Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err("begin", e))?;
        let mut ids = Vec::with_capacity(parts.len());
        for p in parts {
            ids.push(self.insert_file(&tx, p, None).await?);
        }
        let row = tx
            .query_one(
                &format!(
                    "UPDATE {} SET status = 'done', finished_at = now(), rows = $2, bytes = $3, parts = $4 \
                     WHERE id = $1 RETURNING table_schema, table_name",
                    self.t("reloads")
                ),
                &[
                    &id,
                    &(parts.iter().map(|p| p.rows).sum::<u64>() as i64),
                    &(parts.iter().map(|p| p.bytes).sum::<u64>() as i64),
                    &(parts.len() as i32),
                ],
            )
            .await
            .map_err(|e| pg_err("complete reload", e))?;
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        self.set_mode(&tx, &table, "streaming").await?;
        tx.commit().await.map_err(|e| pg_err("commit", e))?;
        Ok(ids)
    }

    pub async fn fail_reload(&self, id: i64, error: &str) -> Result<(), Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err("begin", e))?;
        let row = tx
            .query_one(
                &format!(
                    "UPDATE {} SET status = 'failed', finished_at = now(), error = $2 WHERE id = $1 \
                     RETURNING table_schema, table_name",
                    self.t("reloads")
                ),
                &[&id, &error],
            )
            .await
            .map_err(|e| pg_err("fail reload", e))?;
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        self.set_mode(&tx, &table, "streaming").await?;
        tx.commit().await.map_err(|e| pg_err("commit", e))?;
        Ok(())
    }
}

/// A reload's `reason`: `ddl` or `published` when a DDL record started it (its request id is
/// [`crate::core::ddl::reload_request_id`]), `requested` for `cdc-egress reload` and hand-written
/// markers.
fn reason_of(request: &str) -> &'static str {
    match request.split(':').next() {
        Some("ddl") if request.contains(':') => "ddl",
        Some("published") if request.contains(':') => "published",
        _ => "requested",
    }
}
