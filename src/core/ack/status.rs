//! When to tell PostgreSQL how far we are, and what to tell it: the standby status update policy.
//!
//! A pure state machine: the driver (the daemon's stream thread) wakes it with a [`Wake`], the
//! current time, the confirmed LSN ([`super::AckTracker::confirmed`], through the batcher) and the
//! highest LSN received, and sends exactly the [`StatusUpdate`] it returns, if any.
//!
//! # Contract
//! - **Flush never passes the confirmed LSN** it was given, so the acknowledgement argument of
//!   [`super`] (invariant 1 of ARCHITECTURE.md) carries over to what reaches the server.
//! - **Flush never moves back**: an update reports the highest confirmed LSN seen so far (the tracker is
//!   monotonic already; this keeps the wire monotonic even if a caller were not).
//! - `write >= flush` (written is what was received; `apply = flush`: nothing is "applied" beyond what
//!   is persisted).
//! - An update is due when the confirmed LSN moved (so the slot frees WAL promptly), when the server
//!   asked for a reply (a keepalive with the reply flag: it drops senders that stay silent past
//!   `wal_sender_timeout`), when `every` has passed since the last one, and once more when stopping
//!   (the final acknowledgement of a graceful stop).

use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// Why the driver woke the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The driver's periodic tick.
    Tick,
    /// The server asked for a reply (keepalive with the reply flag).
    ReplyRequested,
    /// The confirmed LSN may have changed.
    Confirmed,
    /// The session is stopping: this is the last call.
    Stopping,
}

/// The positions of one standby status update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusUpdate {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
}

#[derive(Debug, Clone)]
pub struct StatusPolicy {
    every: Duration,
    last_sent_at: Option<Instant>,
    /// The flush position of the last update sent (`ZERO` before the first).
    last_flush: Lsn,
    /// The highest confirmed LSN seen.
    confirmed: Lsn,
}

impl StatusPolicy {
    /// A policy that sends at least every `every` (`source.status_interval`).
    pub fn new(every: Duration) -> StatusPolicy {
        StatusPolicy {
            every,
            last_sent_at: None,
            last_flush: Lsn::ZERO,
            confirmed: Lsn::ZERO,
        }
    }

    /// Whether the confirmed LSN moved past what was last sent: a flush is about to move (the driver
    /// marks that moment for crash tests).
    pub fn flush_would_move(&self, confirmed: Lsn) -> bool {
        confirmed.max(self.confirmed) != self.last_flush
    }

    /// The update to send now, if one is due; the policy assumes it is sent.
    pub fn on_wake(
        &mut self,
        wake: Wake,
        now: Instant,
        confirmed: Lsn,
        received: Lsn,
    ) -> Option<StatusUpdate> {
        self.confirmed = self.confirmed.max(confirmed);
        let moved = self.confirmed != self.last_flush;
        let overdue = self
            .last_sent_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.every);
        let due = moved || overdue || matches!(wake, Wake::ReplyRequested | Wake::Stopping);
        if !due {
            return None;
        }
        self.last_sent_at = Some(now);
        self.last_flush = self.confirmed;
        Some(StatusUpdate {
            write: received.max(self.confirmed),
            flush: self.confirmed,
            apply: self.confirmed,
        })
    }

    /// The flush position of the last update (what PostgreSQL was last told).
    pub fn last_flush(&self) -> Lsn {
        self.last_flush
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn sends_on_change_on_request_when_overdue_and_when_stopping() {
        let t0 = Instant::now();
        let mut p = StatusPolicy::new(10 * SECOND);
        // The first wake always sends (the server learns where we start).
        let first = p.on_wake(Wake::Tick, t0, Lsn(100), Lsn(150)).unwrap();
        assert_eq!(
            (first.write, first.flush, first.apply),
            (Lsn(150), Lsn(100), Lsn(100))
        );
        // Nothing moved, not overdue: silent.
        assert_eq!(p.on_wake(Wake::Tick, t0 + SECOND, Lsn(100), Lsn(160)), None);
        // Confirmed moved: sent at once.
        assert_eq!(
            p.on_wake(Wake::Confirmed, t0 + 2 * SECOND, Lsn(120), Lsn(160))
                .map(|u| u.flush),
            Some(Lsn(120))
        );
        // The server asks: answered although nothing moved.
        assert!(p
            .on_wake(Wake::ReplyRequested, t0 + 3 * SECOND, Lsn(120), Lsn(160))
            .is_some());
        // Overdue: sent.
        assert_eq!(
            p.on_wake(Wake::Tick, t0 + 12 * SECOND, Lsn(120), Lsn(170)),
            None
        );
        assert!(p
            .on_wake(Wake::Tick, t0 + 13 * SECOND, Lsn(120), Lsn(170))
            .is_some());
        // Stopping: the final acknowledgement.
        assert!(p
            .on_wake(Wake::Stopping, t0 + 14 * SECOND, Lsn(120), Lsn(170))
            .is_some());
    }

    #[test]
    fn a_confirmed_lsn_going_back_is_never_sent() {
        let t0 = Instant::now();
        let mut p = StatusPolicy::new(SECOND);
        p.on_wake(Wake::Confirmed, t0, Lsn(500), Lsn(500));
        let u = p
            .on_wake(Wake::ReplyRequested, t0, Lsn(400), Lsn(400))
            .unwrap();
        assert_eq!(u.flush, Lsn(500));
        assert!(u.write >= u.flush);
    }

    fn wake() -> impl Strategy<Value = Wake> {
        prop_oneof![
            Just(Wake::Tick),
            Just(Wake::ReplyRequested),
            Just(Wake::Confirmed),
        ]
    }

    proptest! {
        /// Over any sequence of wakes, times and positions: flush never passes the confirmed LSN
        /// given so far, never decreases, write >= flush, every requested reply is answered, a moved
        /// confirmed LSN is sent at the same wake, and no two updates are more than `every` apart
        /// while the driver keeps ticking.
        #[test]
        fn contract_holds(steps in proptest::collection::vec((wake(), 0u64..3_000, 0u64..1_000, 0u64..1_000), 1..200)) {
            let every = SECOND;
            let t0 = Instant::now();
            let mut now = t0;
            let mut p = StatusPolicy::new(every);
            let (mut confirmed, mut received) = (Lsn(0), Lsn(0));
            let mut max_confirmed = Lsn(0);
            let mut last_flush = Lsn(0);
            let mut last_sent = None::<Instant>;
            for (w, dt_ms, dc, dr) in steps {
                now += Duration::from_millis(dt_ms);
                // The tracker is monotonic; feed it an occasional step back anyway.
                confirmed = if dc % 7 == 0 { Lsn(confirmed.0.saturating_sub(dc)) } else { Lsn(confirmed.0 + dc) };
                received = Lsn(received.0.max(confirmed.0) + dr);
                max_confirmed = max_confirmed.max(confirmed);
                let moved = max_confirmed != last_flush;
                match p.on_wake(w, now, confirmed, received) {
                    Some(u) => {
                        prop_assert!(u.flush <= max_confirmed);
                        prop_assert!(u.flush >= last_flush);
                        prop_assert!(u.write >= u.flush);
                        prop_assert_eq!(u.apply, u.flush);
                        prop_assert_eq!(u.flush, max_confirmed);
                        last_flush = u.flush;
                        last_sent = Some(now);
                    }
                    None => {
                        prop_assert!(w != Wake::ReplyRequested);
                        prop_assert!(!moved);
                        prop_assert!(last_sent.is_some_and(|t| now - t < every));
                    }
                }
                prop_assert_eq!(p.last_flush(), last_flush);
            }
            prop_assert!(p.on_wake(Wake::Stopping, now, confirmed, received).is_some());
        }
    }
}
