//! The report task: every few seconds, slot lag, WAL left before `max_slot_wal_keep_size` and the
//! age of a transaction a reload's cut waits for go into metrics (warnings at most once a minute),
//! and the daemon's state into the registry for `cdc-egress status`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Error;
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::slot;

/// Every 5 s: slot lag and safe WAL into the metrics (with a rate-limited warning when retention
/// nears `max_slot_wal_keep_size`), what a reload cut waits for, and the daemon's row in the registry
/// (confirmed, received, state, last error) that `cdc-egress status` reads.
pub(super) async fn report_task(
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
