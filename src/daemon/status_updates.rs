//! The status task: sends the standby status updates that the pure
//! [`StatusPolicy`](crate::core::ack::status::StatusPolicy) decides. It only waits for the wakes
//! (a change of the confirmed LSN, the interval, a keepalive asking for a reply, the stop) and
//! writes the bytes; flush = apply = the confirmed LSN, never anything else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::core::ack::status::{StatusPolicy, Wake};
use crate::core::decode::{self};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::observe::Metrics;
use crate::pg::wire::CopyWriter;

pub(super) async fn send_status(
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
