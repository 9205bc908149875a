//! The reload coordinator's decisions, without IO: [`ReloadPlan`].
//!
//! The plan is fed what happened (a START marker read by the batcher, the registry's answer for it,
//! a cut taken, an attempt or a table's export that failed or finished, time passing, the reloads to
//! resume at session start) and answers with [`Command`]s for its driver
//! (`daemon::reloads::Coordinator`), which performs them in the order given: registry writes, cut and
//! export jobs, releases of the batcher's holds, END markers. It reads no clock (every input that
//! can schedule something carries `now`), opens nothing, and draws its backoff jitter from a seeded
//! [`Backoff`], so `reload/tests.rs` replays any interleaving exactly.
//!
//! # State
//! Per table at most one *active* reload: its id, its request id, the last cut recorded for it in
//! this session (`cut`), the attempts started in this session, and what it waits for: the outcome
//! of a running attempt ([`AttemptId`]), or a retry deadline. A reload leaves the map exactly when
//! it ends (done or failed); nothing about it is emitted afterwards.
//!
//! # Invariants, and why they hold
//! 1. **A held table is released, and only with a recorded cut.** The batcher holds a table from a
//!    START marker (a second marker while held changes nothing) and, at session start, every table
//!    whose reload resumes. For an active reload, *held ⇔ `cut` is `None`*: it starts with no cut
//!    (new or resumed, held either way); a marker for an active reload whose cut is known starts a
//!    new hold, which is released at once with that cut; a marker for one without a cut joins the
//!    hold already there. The only places that set `cut` emit `RecordCut` and then `Release` with
//!    it, in that order, in the same step, so no `Release` carries a cut the registry has not been
//!    asked to record first. A reload that fails while `cut` is `None` emits `Release` with
//!    [`Lsn::ZERO`] (no split) before it ends; one that ends with a cut released its hold when the
//!    cut was taken. A marker of a reload that already finished is released with `ZERO` as soon as
//!    the registry says so. So every hold is released exactly once by the reload that caused it,
//!    and none outlives its reload. (A later attempt's new, later cut is released again: the table
//!    is no longer held then, and the release only moves the streaming side's split point forward
//!    to the new cut, which is what the consumer rule `_commit_lsn >= cut_lsn` wants.)
//! 2. **Bounded attempts.** An attempt is counted when it starts (a cut that cannot be taken counts
//!    too, so nothing can spin), and a failed attempt is retried only while fewer than
//!    [`MAX_ATTEMPTS`] were started; so no reload starts more than `MAX_ATTEMPTS` attempts in a
//!    session (a superseded attempt, see 7, counts as a failed one). (A restart starts counting again: the session's failure already waited its backoff.)
//! 3. **Never stuck.** An active reload always waits for exactly one of: the outcome of its running
//!    attempt (the driver owes one per table, see the contract), or its retry deadline, which
//!    [`ReloadPlan::next_wake`] reports so the driver wakes for it. Every outcome either ends the
//!    reload or schedules a retry, and every due retry starts an attempt.
//! 4. **Retries keep their distance.** The retry after the `n`-th failed attempt starts no earlier
//!    than the failure's `now` plus [`delay`](crate::backoff::delay)`(RETRY_FIRST, RETRY_MAX,
//!    n - 1, unit)`, which is at least half the nominal delay: the deadline is set from it and
//!    [`ReloadPlan::wake`] starts only retries whose deadline is not after its `now`.
//! 5. **Attempts are not confused.** Each attempt has a fresh id and outcomes name it; an outcome
//!    for a table whose current attempt is another one (or whose reload ended) is ignored, so an
//!    outcome can only act on the attempt that produced it. Attempts start only for active reloads,
//!    and never while one of the reload's attempts is running.
//! 6. **Registered at its own cut.** `Register` carries the cut taken by the attempt that exported
//!    the parts (an export finishes only after its attempt's cut, see the contract), recorded
//!    (`RecordCut`) when the cut was reported; then the END marker `done`, and the reload is
//!    forgotten. A failure ends with `RecordFailure`, then the END marker `failed` with the cut
//!    recorded in this session (`ZERO` if none).
//!
//! 7. **A cut never predates a marker it answers.** A marker read while its table's reload is
//!    active and has a cut at or below the marker's commit (the export would miss the marker's
//!    transaction, e.g. a second rewrite) marks the running attempt superseded: its success counts
//!    as a transient failure (retried with a new cut after the usual backoff, within the bound of
//!    2; a definite failure stays definite). Its hold is released at once with the known cut, as
//!    for any join, so the slot is not pinned while the old export runs; the new cut's release
//!    moves the split forward (see 1).
//!
//! # Contract (for the driver)
//! - Perform commands in the order given; answer [`Command::RecordRequest`] with
//!   [`ReloadPlan::recorded`] before feeding anything else.
//! - For every [`Command::StartAttempt`], report per table exactly one outcome:
//!   [`ReloadPlan::attempt_failed`] (the cut, or the export before any table finished, failed), or
//!   [`ReloadPlan::cut_taken`] followed by [`ReloadPlan::export_finished`] (or `attempt_failed`).
//!   Outcomes of attempts abandoned with their session need not be reported: the plan goes too.
//! - Call [`ReloadPlan::wake`] once [`ReloadPlan::next_wake`] has passed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{Component, Error};
use crate::lsn::Lsn;
use crate::table::TableName;

/// Attempts a reload may start in one session before a transient failure fails it.
pub const MAX_ATTEMPTS: u32 = 3;
/// The nominal wait before the first retry; it doubles per attempt up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
pub const RETRY_MAX: Duration = Duration::from_secs(32);

/// One attempt (cut + export) of one or more tables; ids are 1, 2, … in the order started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId(pub u64);

/// How a reload ended, as written into its END marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndStatus {
    Done,
    Failed,
}

impl EndStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EndStatus::Done => "done",
            EndStatus::Failed => "failed",
        }
    }
}

/// What the driver is to do. `P` is what a successful export hands over for registration (the
/// driver's parts and schema; the plan only passes it on).
#[derive(Debug)]
pub enum Command<P> {
    /// Find or create the registry row of this marker's reload, and answer with
    /// [`ReloadPlan::recorded`].
    RecordRequest {
        table: TableName,
        request: String,
        marker_commit_lsn: Lsn,
    },
    /// The marker's table has a reload running; the marker joins it (a `Release` follows when its
    /// cut is known).
    Joined { table: TableName, reload_id: i64 },
    /// Start one attempt for these tables together: clear what an earlier attempt left of their
    /// parts, take one cut, export.
    StartAttempt {
        attempt: AttemptId,
        tables: Vec<(TableName, i64)>,
    },
    /// Record the attempt's cut (and snapshot) for the reload.
    RecordCut {
        table: TableName,
        reload_id: i64,
        cut: Lsn,
        snapshot: String,
    },
    /// Release the table's hold with `cut` (`ZERO`: without a split).
    Release { table: TableName, cut: Lsn },
    /// Register the exported parts at `cut` (then manifest and notice).
    Register {
        table: TableName,
        reload_id: i64,
        cut: Lsn,
        output: P,
    },
    /// The attempt failed and is retried after `after` (for the log and the error metrics).
    RetryLater {
        table: TableName,
        reload_id: i64,
        error: Error,
        after: Duration,
    },
    /// The reload failed for good: record why.
    RecordFailure {
        table: TableName,
        reload_id: i64,
        error: Error,
    },
    /// Write the END marker of a reload that ended (the plan has forgotten it).
    EndMarker {
        table: TableName,
        reload_id: i64,
        request: String,
        cut: Lsn,
        status: EndStatus,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// For the outcome of this attempt.
    Attempt(AttemptId),
    /// For this deadline, to start the next attempt.
    Retry(Instant),
}

/// What a reload inserted into the map waits for until `start` (in the same step) replaces it;
/// attempt ids start at 1, so it is never confused with a real one.
const NOT_STARTED: Waiting = Waiting::Attempt(AttemptId(0));

#[derive(Debug)]
struct Active {
    reload_id: i64,
    request: String,
    /// The cut last recorded in this session; `None` while the table is held.
    cut: Option<Lsn>,
    /// Attempts started in this session.
    attempts: u32,
    waiting: Waiting,
    /// The running attempt's cut is at or below a marker joined meanwhile: its outcome counts as a
    /// transient failure ([`ReloadPlan::export_finished`]).
    superseded: bool,
    /// The cut of the attempt now running, once taken (`cut` may still be an earlier attempt's).
    attempt_cut: Option<Lsn>,
    /// The highest commit LSN of a marker that joined this reload in this session.
    joined_marker: Lsn,
    /// The cut last recorded in this session, even if a later marker superseded it (what a
    /// failure's END marker reports).
    recorded_cut: Option<Lsn>,
}

impl Active {
    /// A reload that `start` is about to give its first attempt (in the same step).
    fn new(reload_id: i64, request: String) -> Active {
        Active {
            reload_id,
            request,
            cut: None,
            attempts: 0,
            waiting: NOT_STARTED,
            superseded: false,
            recorded_cut: None,
            attempt_cut: None,
            joined_marker: Lsn::ZERO,
        }
    }
}

/// The reloads of one session and what each waits for. See the module documentation.
#[derive(Debug)]
pub struct ReloadPlan {
    active: BTreeMap<TableName, Active>,
    last_attempt: u64,
    jitter: Backoff,
}

impl Default for ReloadPlan {
    fn default() -> Self {
        ReloadPlan::new()
    }
}

impl ReloadPlan {
    /// A plan whose retry jitter is seeded at random.
    pub fn new() -> ReloadPlan {
        ReloadPlan::with_jitter(Backoff::new(RETRY_FIRST, RETRY_MAX))
    }

    /// A plan with a fixed jitter seed (tests).
    pub fn with_seed(seed: u64) -> ReloadPlan {
        ReloadPlan::with_jitter(Backoff::with_seed(RETRY_FIRST, RETRY_MAX, seed))
    }

    fn with_jitter(jitter: Backoff) -> ReloadPlan {
        ReloadPlan {
            active: BTreeMap::new(),
            last_attempt: 0,
            jitter,
        }
    }

    /// The active reloads: table and reload id.
    pub fn active(&self) -> impl Iterator<Item = (&TableName, i64)> + '_ {
        self.active.iter().map(|(t, a)| (t, a.reload_id))
    }

    /// When [`ReloadPlan::wake`] has a retry to start, if any is scheduled.
    pub fn next_wake(&self) -> Option<Instant> {
        self.active
            .values()
            .filter_map(|a| match a.waiting {
                Waiting::Retry(at) => Some(at),
                Waiting::Attempt(_) => None,
            })
            .min()
    }

    /// Session start: these reloads (table, reload id, request id) resume now, their tables held
    /// until their cut; one attempt for all of them (one cut).
    pub fn resume<P>(&mut self, reloads: Vec<(TableName, i64, String)>, out: &mut Vec<Command<P>>) {
        let mut tables = Vec::with_capacity(reloads.len());
        for (table, reload_id, request) in reloads {
            if !self.active.contains_key(&table) {
                tables.push(table.clone());
            }
            self.active.insert(table, Active::new(reload_id, request));
        }
        self.start(&tables, out);
    }

    /// The batcher read a START marker of `table` (and holds the table).
    pub fn marker<P>(
        &mut self,
        table: TableName,
        request: String,
        marker_commit_lsn: Lsn,
        out: &mut Vec<Command<P>>,
    ) {
        if self.active.contains_key(&table) {
            self.join(table, marker_commit_lsn, out);
        } else {
            out.push(Command::RecordRequest {
                table,
                request,
                marker_commit_lsn,
            });
        }
    }

    /// The registry's answer to [`Command::RecordRequest`]: the reload's id, or `None` if the
    /// request already finished (its marker was read again after a restart).
    pub fn recorded<P>(
        &mut self,
        table: TableName,
        request: String,
        reload_id: Option<i64>,
        out: &mut Vec<Command<P>>,
    ) {
        let Some(reload_id) = reload_id else {
            out.push(Command::Release {
                table,
                cut: Lsn::ZERO,
            });
            return;
        };
        if self.active.contains_key(&table) {
            // Not with a driver that keeps the contract (nothing is fed in between); join as a
            // marker at the lowest position would (no cut is superseded).
            self.join(table, Lsn::ZERO, out);
            return;
        }
        self.active
            .insert(table.clone(), Active::new(reload_id, request));
        self.start(std::slice::from_ref(&table), out);
    }

    /// Attempt `attempt` took its cut: record it for each of `tables` still in that attempt, then
    /// release each hold with it.
    pub fn cut_taken<P>(
        &mut self,
        attempt: AttemptId,
        tables: &[TableName],
        cut: Lsn,
        snapshot: &str,
        out: &mut Vec<Command<P>>,
    ) {
        for table in tables {
            let Some(a) = self.active.get_mut(table) else {
                continue;
            };
            if a.waiting != Waiting::Attempt(attempt) {
                continue;
            }
            a.cut = Some(cut);
            a.recorded_cut = Some(cut);
            a.attempt_cut = Some(cut);
            // A marker that joined before this cut reached the plan but committed at or after it
            // (the cut was taken first) is not in this export either.
            a.superseded = cut <= a.joined_marker;
            out.push(Command::RecordCut {
                table: table.clone(),
                reload_id: a.reload_id,
                cut,
                snapshot: snapshot.to_string(),
            });
            out.push(Command::Release {
                table: table.clone(),
                cut,
            });
        }
    }

    /// Attempt `attempt` failed for all of `tables` (its cut could not be taken, or the export
    /// could not start).
    pub fn attempt_failed<P>(
        &mut self,
        now: Instant,
        attempt: AttemptId,
        tables: &[TableName],
        error: &Error,
        out: &mut Vec<Command<P>>,
    ) {
        for table in tables {
            self.export_finished(now, attempt, table, Err(error.clone()), out);
        }
    }

    /// The export of `table` in attempt `attempt` finished: its output, or why it failed.
    pub fn export_finished<P>(
        &mut self,
        now: Instant,
        attempt: AttemptId,
        table: &TableName,
        result: Result<P, Error>,
        out: &mut Vec<Command<P>>,
    ) {
        let Some(a) = self.active.get_mut(table) else {
            return;
        };
        if a.waiting != Waiting::Attempt(attempt) {
            return;
        }
        let (reload_id, cut, recorded_cut) = (a.reload_id, a.cut, a.recorded_cut);
        let result = match result {
            // A marker after this attempt's cut arrived meanwhile: its export is too old. It counts
            // as a transient failure, so a new attempt takes a new cut within the bound on
            // attempts; a definite failure stays definite.
            Ok(_) if a.superseded => Err(Error::transient(
                Component::Reload,
                "a DDL or reload request after this attempt's cut needs a newer cut",
            )),
            other => other,
        };
        a.superseded = false;
        match result {
            Ok(output) => {
                let a = self.active.remove(table).expect("active");
                let cut = cut.unwrap_or(Lsn::ZERO);
                out.push(Command::Register {
                    table: table.clone(),
                    reload_id,
                    cut,
                    output,
                });
                out.push(Command::EndMarker {
                    table: table.clone(),
                    reload_id,
                    request: a.request,
                    cut,
                    status: EndStatus::Done,
                });
            }
            Err(error) if error.is_transient() && a.attempts < MAX_ATTEMPTS => {
                let after = self.jitter.delay_for(a.attempts.saturating_sub(1));
                a.waiting = Waiting::Retry(now + after);
                out.push(Command::RetryLater {
                    table: table.clone(),
                    reload_id,
                    error,
                    after,
                });
            }
            Err(error) => {
                let a = self.active.remove(table).expect("active");
                if cut.is_none() {
                    // Still held (no cut was taken): stream the table on, nothing dropped.
                    out.push(Command::Release {
                        table: table.clone(),
                        cut: Lsn::ZERO,
                    });
                }
                out.push(Command::RecordFailure {
                    table: table.clone(),
                    reload_id,
                    error,
                });
                out.push(Command::EndMarker {
                    table: table.clone(),
                    reload_id,
                    request: a.request,
                    cut: recorded_cut.unwrap_or(Lsn::ZERO),
                    status: EndStatus::Failed,
                });
            }
        }
    }

    /// Time passed: start the retries that are due, one attempt per table (as each failed alone).
    pub fn wake<P>(&mut self, now: Instant, out: &mut Vec<Command<P>>) {
        let due: Vec<TableName> = self
            .active
            .iter()
            .filter(|(_, a)| matches!(a.waiting, Waiting::Retry(at) if at <= now))
            .map(|(t, _)| t.clone())
            .collect();
        for table in due {
            self.start(std::slice::from_ref(&table), out);
        }
    }

    /// Starts one attempt for `tables` (all active, none with an attempt running).
    fn start<P>(&mut self, tables: &[TableName], out: &mut Vec<Command<P>>) {
        if tables.is_empty() {
            return;
        }
        self.last_attempt += 1;
        let attempt = AttemptId(self.last_attempt);
        let mut started = Vec::with_capacity(tables.len());
        for table in tables {
            let a = self
                .active
                .get_mut(table)
                .expect("attempts start for active reloads");
            a.attempts += 1;
            a.waiting = Waiting::Attempt(attempt);
            a.attempt_cut = None;
            a.superseded = false;
            started.push((table.clone(), a.reload_id));
        }
        out.push(Command::StartAttempt {
            attempt,
            tables: started,
        });
    }

    /// A marker for a table whose reload is active: it joins. With no cut known, the hold already
    /// there waits for it. With one known, the new hold is released at once with it. A known cut at
    /// or below the marker does not cover the marker's transaction (a DDL committed after the cut,
    /// e.g. a second rewrite): the running attempt's outcome, when it comes, is replaced by a new
    /// attempt with a new cut (a reload waiting for a retry takes one anyway). Nothing is held
    /// meanwhile: the new cut's release moves the split forward, and the consumer rule
    /// (`_commit_lsn >= cut_lsn` of the latest done reload) skips the streamed rows it covers.
    fn join<P>(&mut self, table: TableName, marker_commit_lsn: Lsn, out: &mut Vec<Command<P>>) {
        let a = self
            .active
            .get_mut(&table)
            .expect("joined reloads are active");
        out.push(Command::Joined {
            table: table.clone(),
            reload_id: a.reload_id,
        });
        a.joined_marker = a.joined_marker.max(marker_commit_lsn);
        // The running attempt's cut, once known, must be above the marker; one not taken yet is
        // judged when it is (`cut_taken`); one waiting for its retry cuts anew.
        if let (Waiting::Attempt(_), Some(cut)) = (a.waiting, a.attempt_cut) {
            if cut <= marker_commit_lsn {
                a.superseded = true;
            }
        }
        if let Some(cut) = a.cut {
            out.push(Command::Release { table, cut });
        }
    }
}

#[cfg(test)]
mod tests;
