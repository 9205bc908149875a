//! `cdc-egress run`: the thin IO driver around the pure [`Batcher`](crate::core::batch::Batcher).
//!
//! ```text
//!  replication socket ◄──► stream thread ──(SealedBatch)──► delivery task
//!  (blocking reads;         │ Relation → catalog lookup     │ upload, register,
//!   status updates)         │ decode, CSV, gzip spool       │ manifest, notice
//!                           │ seal decisions, StatusPolicy  │
//!                           ▲                               │
//!                           └───────(persisted ids)─────────┘
//! ```
//!
//! # Invariants this driver keeps
//! - Frames reach the batcher in stream order: the stream thread reads and applies them itself.
//!   Persisted reports reach it through an unbounded channel, so delivery can never block on it.
//! - The only LSN ever sent as the flush position is [`Batcher::confirmed`](crate::core::batch::Batcher::confirmed) (see `ack`). On every
//!   failure the session is torn down and rebuilt from the slot and the registry, exactly as after a
//!   crash; there is no in-process repair path that could differ from crash recovery.
//! - Start-up finishes committed-but-unnotified batches and removes orphans *before* streaming.
//! - A transient failure (server down, network) restarts the session with backoff; a definite one
//!   (configuration, permissions, undecodable data) stops the daemon (exit code 2 for configuration
//!   and credentials, 1 otherwise).
//! - SIGTERM/SIGINT: stop reading, abandon open batches (they are re-sent from the confirmed LSN),
//!   let in-flight deliveries finish (bounded wait), send a final status update, exit 0.
//!
//! # Modules
//! `session` is one session as a page of phases; `startup` is everything before streaming
//! (connect, slot lock, recovery, slot plan, batcher preparation); what runs while streaming is
//! `stream_thread` (reading, batching, status updates), [`deliver`], [`reloads`], `events`,
//! `control` (reload requests over NATS) and `report`.

mod control;
pub mod deliver;
mod events;
pub mod reloads;
mod report;
mod session;
mod startup;
mod stream_thread;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{Component, Error};
use crate::observe::Metrics;

pub use session::session;

/// Runs sessions until shutdown or a definite error.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let started = Instant::now();
        let result = session(&config, metrics.clone(), shutdown.clone()).await;
        metrics
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        metrics.error(&e);
        let lost = !e.is_transient() && lost_while_streaming(&config, &e).await;
        if !e.is_transient() && !lost {
            // Refused the source name: the daemon row is the owner's, not ours to write.
            if e.component() != Component::Ownership {
                record_state(&config, "stopped", Some(&e.to_string())).await;
            }
            return Err(e);
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            // It ran well for a while: this failure is a new one, not the same one again.
            backoff.reset();
        }
        let delay = backoff.next_delay();
        if lost {
            // Invalidated or dropped while streaming: the next session re-exports.
            tracing::error!(error = %e, retry_in = ?delay, "the replication slot was lost while streaming; starting over (source.slot_lost: reexport)");
        } else {
            tracing::warn!(error = %e, retry_in = ?delay, "session ended; restarting from the confirmed LSN");
        }
        // A standby waiting for the slot is not the daemon's state: the active one reports that.
        if e.component() != startup::STANDBY {
            record_state(&config, "retrying", Some(&e.to_string())).await;
        }
        let mut s = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = s.wait_for(|v| *v) => return Ok(()),
        }
    }
}

/// Whether a definite error ended a session because the slot was lost under
/// `source.slot_lost: reexport`: the same decision the next session makes at start
/// ([`crate::pg::slot::plan_slot`] says `Recreate`). Never for configuration errors.
async fn lost_while_streaming(config: &Config, e: &Error) -> bool {
    if config.source.slot_lost != crate::config::SlotLostPolicy::Reexport || e.is_config() {
        return false;
    }
    let check = async {
        let c = config.source_conninfo()?.connect().await?;
        let info = crate::pg::slot::slot_info(&c, &config.source.slot).await?;
        let registry = config.open_registry(1)?;
        let last = registry.last_slot_event(&config.source.slot).await?;
        Ok::<_, Error>(crate::pg::slot::plan_slot(
            &config.source.slot,
            info.as_ref(),
            last.as_deref(),
            config.source.slot_lost,
        ))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), check).await,
        Ok(Ok(crate::pg::slot::SlotPlan::Recreate { .. }))
    )
}

/// Best effort: writes the daemon's state to the registry between sessions (the registry may be
/// the very thing that is down; then `status` cannot be reached either, and the log has it).
async fn record_state(config: &Config, state: &str, error: Option<&str>) {
    let write = async {
        config
            .open_registry(1)?
            .report_daemon_state(
                &config.source.slot,
                config.source_conninfo()?.dbname(),
                state,
                error,
            )
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot record the daemon state in the registry"),
        Err(_) => tracing::debug!("recording the daemon state in the registry timed out"),
    }
}
