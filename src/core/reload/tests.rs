//! The reload plan driven through random markers, cut and export outcomes, time and restarts,
//! against a model of the registry and of the batcher's holds, checking the invariants of the
//! module documentation after every command and every step.

use super::*;
use crate::error::Component;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap, VecDeque};

const TABLES: usize = 3;

fn table(i: usize) -> TableName {
    TableName::new("public", format!("t{i}"))
}

fn index(t: &TableName) -> usize {
    t.name[1..].parse().unwrap()
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok,
    Transient,
    Definite,
}

impl Outcome {
    fn error(self) -> Option<Error> {
        match self {
            Outcome::Ok => None,
            Outcome::Transient => Some(Error::transient(Component::Reload, "connection lost")),
            Outcome::Definite => Some(Error::definite(Component::Reload, "no such table")),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A new reload request of a table: its marker is read.
    Marker(usize),
    /// The marker of an earlier request is read again.
    Replay(usize),
    /// A running attempt (picked by index) takes its cut.
    CutOk(usize),
    /// A running attempt's cut cannot be taken.
    CutFails(usize, Outcome),
    /// A running attempt's export cannot start (before any table finished).
    RunFails(usize, Outcome),
    /// One table of an exporting attempt finishes.
    Export(usize, usize, Outcome),
    /// Time passes (milliseconds); the driver wakes the plan, due or not.
    Advance(u64),
    /// The driver sleeps exactly until the plan's deadline.
    WakeAtDeadline,
    /// The session restarts; `true`: the slot was lost and recreated (uncut reloads become
    /// initial ones, every table without an active reload gets one).
    Restart(bool),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        2 => Just(Outcome::Ok),
        2 => Just(Outcome::Transient),
        1 => Just(Outcome::Definite),
    ]
}

fn failure() -> impl Strategy<Value = Outcome> {
    prop_oneof![3 => Just(Outcome::Transient), 1 => Just(Outcome::Definite)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..TABLES).prop_map(Op::Marker),
        1 => any::<usize>().prop_map(Op::Replay),
        4 => any::<usize>().prop_map(Op::CutOk),
        2 => (any::<usize>(), failure()).prop_map(|(k, o)| Op::CutFails(k, o)),
        1 => (any::<usize>(), failure()).prop_map(|(k, o)| Op::RunFails(k, o)),
        5 => (any::<usize>(), any::<usize>(), outcome()).prop_map(|(k, j, o)| Op::Export(k, j, o)),
        2 => (0u64..40_000).prop_map(Op::Advance),
        2 => Just(Op::WakeAtDeadline),
        1 => any::<bool>().prop_map(Op::Restart),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Requested,
    Running,
    Done,
    Failed,
}

/// A `reloads` row, as `sink::registry::reloads` keeps it.
#[derive(Debug)]
struct Row {
    id: i64,
    table: usize,
    request: Option<String>,
    initial: bool,
    status: Status,
    cut: Option<Lsn>,
}

impl Row {
    fn active(&self) -> bool {
        matches!(self.status, Status::Requested | Status::Running)
    }
}

/// An attempt the simulated driver runs: its tables, its cut once taken, the tables not finished.
#[derive(Debug)]
struct Job {
    attempt: AttemptId,
    tables: Vec<TableName>,
    cut: Option<Lsn>,
    unfinished: Vec<TableName>,
}

/// What the model knows of a reload in the current session.
#[derive(Debug, Default)]
struct Life {
    started: u32,
    /// The last failure: when, the wait announced, and the attempts started by then.
    failure: Option<(Instant, Duration, u32)>,
    /// The cut last recorded in this session.
    cut: Option<Lsn>,
}

/// The world around the plan: registry, batcher holds, export jobs, clock.
struct Sim {
    plan: ReloadPlan,
    seed: u64,
    session: u64,
    now: Instant,
    rows: Vec<Row>,
    requests: Vec<(usize, String)>,
    /// Tables the batcher holds, and the split point of each table's stream.
    held: BTreeSet<usize>,
    split: HashMap<usize, Lsn>,
    jobs: Vec<Job>,
    /// Cut of every attempt of this session.
    cuts: HashMap<AttemptId, Lsn>,
    lives: HashMap<i64, Life>,
    /// (reload, cut) pairs `RecordCut` asked for, in any session.
    recorded: BTreeSet<(i64, Lsn)>,
    ended: BTreeSet<i64>,
    next_lsn: u64,
}

type Cmds = Vec<Command<AttemptId>>;

impl Sim {
    fn new(seed: u64) -> Sim {
        Sim {
            plan: ReloadPlan::with_seed(seed),
            seed,
            session: 0,
            now: Instant::now(),
            rows: Vec::new(),
            requests: Vec::new(),
            held: BTreeSet::new(),
            split: HashMap::new(),
            jobs: Vec::new(),
            cuts: HashMap::new(),
            lives: HashMap::new(),
            recorded: BTreeSet::new(),
            ended: BTreeSet::new(),
            next_lsn: 0x1000,
        }
    }

    fn row(&mut self, id: i64) -> &mut Row {
        &mut self.rows[id as usize - 1]
    }

    fn active_row(&self, t: usize) -> Option<&Row> {
        self.rows.iter().find(|r| r.table == t && r.active())
    }

    /// `Registry::reload_for_marker`.
    fn reload_for_marker(&mut self, t: usize, request: &str) -> Option<i64> {
        let mine = |r: &&Row| r.request.as_deref() == Some(request);
        if self.rows.iter().filter(mine).any(|r| !r.active()) {
            return None;
        }
        if let Some(r) = self.rows.iter().find(mine) {
            return Some(r.id);
        }
        if let Some(r) = self.active_row(t) {
            return Some(r.id);
        }
        let id = self.rows.len() as i64 + 1;
        self.rows.push(Row {
            id,
            table: t,
            request: Some(request.to_string()),
            initial: false,
            status: Status::Running,
            cut: None,
        });
        Some(id)
    }

    /// The batcher reads a START marker: it holds the table, the plan hears of it.
    fn marker(&mut self, t: usize, request: String) -> Result<(), TestCaseError> {
        self.held.insert(t);
        let mut out = Cmds::new();
        self.plan
            .marker(table(t), request, Lsn(self.next_lsn), &mut out);
        self.next_lsn += 8;
        self.execute(out)
    }

    /// Performs commands like `daemon::reloads` does, checking each.
    fn execute(&mut self, out: Cmds) -> Result<(), TestCaseError> {
        let mut queue = VecDeque::from(out);
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                Command::RecordRequest {
                    table: tn, request, ..
                } => {
                    let id = self.reload_for_marker(index(&tn), &request);
                    let mut more = Cmds::new();
                    self.plan.recorded(tn, request, id, &mut more);
                    for c in more.into_iter().rev() {
                        queue.push_front(c);
                    }
                }
                Command::Joined {
                    table: tn,
                    reload_id,
                } => {
                    prop_assert!(!self.ended.contains(&reload_id));
                    prop_assert_eq!(self.active_row(index(&tn)).map(|r| r.id), Some(reload_id));
                }
                Command::StartAttempt { attempt, tables } => {
                    prop_assert!(!tables.is_empty());
                    prop_assert!(
                        !self.cuts.contains_key(&attempt)
                            && self.jobs.iter().all(|j| j.attempt != attempt)
                    );
                    for (tn, id) in &tables {
                        let t = index(tn);
                        prop_assert!(!self.ended.contains(id), "attempt for ended reload {id}");
                        prop_assert_eq!(
                            self.active_row(t).map(|r| r.id),
                            Some(*id),
                            "attempt for an inactive reload"
                        );
                        prop_assert!(
                            self.jobs.iter().all(|j| !j.unfinished.contains(tn)),
                            "second attempt running for {tn}"
                        );
                        let now = self.now;
                        let life = self.lives.entry(*id).or_default();
                        if let Some((at, after, _)) = life.failure.take() {
                            prop_assert!(
                                now >= at + after,
                                "retry of {id} earlier than its backoff"
                            );
                        }
                        life.started += 1;
                        prop_assert!(
                            life.started <= MAX_ATTEMPTS,
                            "reload {id}: attempt {} started",
                            life.started
                        );
                    }
                    let tables: Vec<TableName> = tables.into_iter().map(|(t, _)| t).collect();
                    self.jobs.push(Job {
                        attempt,
                        unfinished: tables.clone(),
                        tables,
                        cut: None,
                    });
                }
                Command::RecordCut {
                    table: tn,
                    reload_id,
                    cut,
                    ..
                } => {
                    prop_assert!(!self.ended.contains(&reload_id));
                    let row = self.row(reload_id);
                    prop_assert!(row.active() && row.table == index(&tn));
                    row.cut = Some(cut);
                    row.status = Status::Running;
                    self.recorded.insert((reload_id, cut));
                    self.lives.entry(reload_id).or_default().cut = Some(cut);
                }
                Command::Release { table: tn, cut } => {
                    let t = index(&tn);
                    if cut > Lsn::ZERO {
                        // Never a cut the registry was not asked to record first.
                        let row = self.active_row(t);
                        prop_assert!(
                            row.is_some_and(|r| r.cut == Some(cut)),
                            "{tn} released with unrecorded cut {cut}"
                        );
                    }
                    if !self.held.remove(&t) {
                        // Not held: only a later attempt's new cut may move the split point on.
                        prop_assert!(cut > Lsn::ZERO, "{tn} released twice");
                        prop_assert!(
                            self.split.get(&t).is_none_or(|s| cut > *s),
                            "{tn} released again with an old cut"
                        );
                    }
                    if cut > Lsn::ZERO {
                        self.split.insert(t, cut);
                    }
                }
                Command::Register {
                    table: tn,
                    reload_id,
                    cut,
                    output,
                } => {
                    prop_assert!(!self.ended.contains(&reload_id));
                    prop_assert_eq!(
                        self.cuts.get(&output).copied(),
                        Some(cut),
                        "registered at another cut than its attempt's"
                    );
                    prop_assert!(
                        self.recorded.contains(&(reload_id, cut)),
                        "registered before its cut was recorded"
                    );
                    let row = self.row(reload_id);
                    prop_assert!(row.active() && row.table == index(&tn) && row.cut == Some(cut));
                    row.status = Status::Done;
                }
                Command::RetryLater {
                    reload_id,
                    error,
                    after,
                    ..
                } => {
                    prop_assert!(!self.ended.contains(&reload_id));
                    prop_assert!(error.is_transient());
                    let now = self.now;
                    let life = self.lives.get_mut(&reload_id).expect("started");
                    prop_assert!(life.started < MAX_ATTEMPTS);
                    let nominal = RETRY_FIRST
                        .saturating_mul(1 << (life.started - 1))
                        .min(RETRY_MAX);
                    prop_assert!(
                        after >= nominal / 2 && after <= nominal,
                        "backoff {after:?} vs {nominal:?}"
                    );
                    life.failure = Some((now, after, life.started));
                }
                Command::RecordFailure {
                    table: tn,
                    reload_id,
                    error,
                } => {
                    prop_assert!(!self.ended.contains(&reload_id));
                    let started = self.lives.get(&reload_id).map_or(0, |l| l.started);
                    prop_assert!(
                        !error.is_transient() || started == MAX_ATTEMPTS,
                        "gave up after {started} attempts"
                    );
                    prop_assert!(
                        !self.held.contains(&index(&tn)),
                        "failed while still holding {tn}"
                    );
                    let row = self.row(reload_id);
                    prop_assert!(row.active());
                    row.status = Status::Failed;
                }
                Command::EndMarker {
                    reload_id,
                    status,
                    cut,
                    ..
                } => {
                    prop_assert!(
                        self.ended.insert(reload_id),
                        "second END marker of {reload_id}"
                    );
                    // The cut of this session (a reload resumed with a cut of an earlier session
                    // and failed before its new one reports none).
                    let session_cut = self.lives.get(&reload_id).and_then(|l| l.cut);
                    prop_assert_eq!(session_cut.unwrap_or(Lsn::ZERO), cut);
                    let row = self.row(reload_id);
                    let want = match status {
                        EndStatus::Done => Status::Done,
                        EndStatus::Failed => Status::Failed,
                    };
                    prop_assert_eq!(row.status, want);
                    if status == EndStatus::Done {
                        prop_assert_eq!(row.cut, Some(cut));
                    }
                }
            }
        }
        Ok(())
    }

    fn exporting(&self) -> Vec<usize> {
        (0..self.jobs.len())
            .filter(|&i| self.jobs[i].cut.is_some())
            .collect()
    }

    fn cutting(&self) -> Vec<usize> {
        (0..self.jobs.len())
            .filter(|&i| self.jobs[i].cut.is_none())
            .collect()
    }

    fn cut_ok(&mut self, i: usize) -> Result<(), TestCaseError> {
        let cut = Lsn(self.next_lsn);
        self.next_lsn += 8;
        let job = &mut self.jobs[i];
        job.cut = Some(cut);
        self.cuts.insert(job.attempt, cut);
        let (attempt, tables) = (job.attempt, job.tables.clone());
        let mut out = Cmds::new();
        self.plan.cut_taken(attempt, &tables, cut, "snap", &mut out);
        self.execute(out)
    }

    fn job_fails(&mut self, i: usize, o: Outcome) -> Result<(), TestCaseError> {
        let job = self.jobs.remove(i);
        let mut out = Cmds::new();
        let error = o.error().expect("a failure");
        self.plan
            .attempt_failed(self.now, job.attempt, &job.unfinished, &error, &mut out);
        self.execute(out)
    }

    fn export(&mut self, i: usize, j: usize, o: Outcome) -> Result<(), TestCaseError> {
        let job = &mut self.jobs[i];
        let tn = job.unfinished.remove(j % job.unfinished.len());
        let attempt = job.attempt;
        if job.unfinished.is_empty() {
            self.jobs.remove(i);
        }
        let result = match o.error() {
            None => Ok(attempt),
            Some(e) => Err(e),
        };
        let mut out = Cmds::new();
        self.plan
            .export_finished(self.now, attempt, &tn, result, &mut out);
        self.execute(out)
    }

    fn wake(&mut self) -> Result<(), TestCaseError> {
        let mut out = Cmds::new();
        self.plan.wake(self.now, &mut out);
        self.execute(out)
    }

    /// A new session: `prepare_batcher`'s resume list and holds, then the markers the pinned ack
    /// makes the stream read again.
    fn restart(&mut self, slot_lost: bool) -> Result<(), TestCaseError> {
        self.session += 1;
        self.plan = ReloadPlan::with_seed(self.seed ^ self.session);
        self.jobs.clear();
        self.cuts.clear();
        self.lives.clear();
        self.held.clear();
        self.split.clear();
        if slot_lost {
            // `restart_uncut_reloads_as_initial`, then `request_initial_reloads`.
            for r in self
                .rows
                .iter_mut()
                .filter(|r| r.active() && r.cut.is_none())
            {
                r.status = Status::Requested;
                r.initial = true;
            }
            for t in 0..TABLES {
                if self.active_row(t).is_none() {
                    let id = self.rows.len() as i64 + 1;
                    self.rows.push(Row {
                        id,
                        table: t,
                        request: None,
                        initial: true,
                        status: Status::Requested,
                        cut: None,
                    });
                }
            }
        }
        let mut resume = Vec::new();
        let mut reread = Vec::new();
        for r in self.rows.iter().filter(|r| r.active()) {
            if r.initial || r.cut.is_some() || r.status == Status::Requested {
                resume.push((table(r.table), r.id, r.request.clone().unwrap_or_default()));
            } else {
                reread.push((r.table, r.request.clone().expect("from a marker")));
            }
        }
        for (t, _, _) in &resume {
            self.held.insert(index(t));
        }
        let mut out = Cmds::new();
        self.plan.resume(resume, &mut out);
        self.execute(out)?;
        for (t, request) in reread {
            self.marker(t, request)?;
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Marker(t) => {
                let request = format!("r{}", self.requests.len());
                self.requests.push((t, request.clone()));
                self.marker(t, request)
            }
            Op::Replay(k) if !self.requests.is_empty() => {
                let (t, request) = self.requests[k % self.requests.len()].clone();
                self.marker(t, request)
            }
            Op::CutOk(k) => match self.cutting().as_slice() {
                [] => Ok(()),
                c => self.cut_ok(c[k % c.len()]),
            },
            Op::CutFails(k, o) => match self.cutting().as_slice() {
                [] => Ok(()),
                c => self.job_fails(c[k % c.len()], o),
            },
            Op::RunFails(k, o) => {
                let fresh: Vec<usize> = self
                    .exporting()
                    .into_iter()
                    .filter(|&i| self.jobs[i].unfinished.len() == self.jobs[i].tables.len())
                    .collect();
                match fresh.as_slice() {
                    [] => Ok(()),
                    c => self.job_fails(c[k % c.len()], o),
                }
            }
            Op::Export(k, j, o) => match self.exporting().as_slice() {
                [] => Ok(()),
                c => self.export(c[k % c.len()], j, o),
            },
            Op::Advance(ms) => {
                self.now += Duration::from_millis(ms);
                self.wake()
            }
            Op::WakeAtDeadline => match self.plan.next_wake() {
                Some(at) => {
                    self.now = self.now.max(at);
                    self.wake()
                }
                None => Ok(()),
            },
            Op::Restart(slot_lost) => self.restart(slot_lost),
            Op::Replay(_) => Ok(()),
        }
    }

    /// The invariants that hold between steps.
    fn check(&self) -> Result<(), TestCaseError> {
        // The registry's active reloads are exactly the plan's.
        let registry: Vec<(usize, i64)> = self
            .rows
            .iter()
            .filter(|r| r.active())
            .map(|r| (r.table, r.id))
            .collect();
        let mut plan: Vec<(usize, i64)> =
            self.plan.active().map(|(t, id)| (index(t), id)).collect();
        plan.sort_by_key(|(_, id)| *id);
        prop_assert_eq!(registry, plan);
        for (tn, a) in &self.plan.active {
            let t = index(tn);
            // Held exactly while no cut is known.
            prop_assert_eq!(
                self.held.contains(&t),
                a.cut.is_none(),
                "hold of {} vs cut {:?}",
                tn,
                a.cut
            );
            // Never stuck: a running attempt owes an outcome, or a retry is due at a deadline the
            // driver is told about.
            match a.waiting {
                Waiting::Attempt(id) => {
                    prop_assert!(
                        self.jobs
                            .iter()
                            .any(|j| j.attempt == id && j.unfinished.contains(tn)),
                        "{} waits for attempt {:?} that owes it nothing",
                        tn,
                        id
                    );
                }
                Waiting::Retry(at) => {
                    prop_assert!(self.plan.next_wake().is_some_and(|w| w <= at));
                }
            }
            prop_assert!(self.lives.get(&a.reload_id).map_or(0, |l| l.started) == a.attempts);
        }
        // Nothing is held without a reload to release it.
        for &t in &self.held {
            prop_assert!(
                self.plan.active.contains_key(&table(t)),
                "t{} held by no reload",
                t
            );
        }
        Ok(())
    }

    /// Everything succeeds from now on: every reload must end and every hold be released.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..2 * MAX_ATTEMPTS + 4 {
            while let Some(i) = self.cutting().first().copied() {
                self.cut_ok(i)?;
                self.check()?;
            }
            while let Some(i) = self.exporting().first().copied() {
                self.export(i, 0, Outcome::Ok)?;
                self.check()?;
            }
            if let Some(at) = self.plan.next_wake() {
                self.now = self.now.max(at);
                self.wake()?;
                self.check()?;
            }
        }
        prop_assert!(self.plan.active.is_empty(), "stuck: {:?}", self.plan.active);
        prop_assert!(self.held.is_empty(), "still held: {:?}", self.held);
        prop_assert!(self.rows.iter().all(|r| !r.active()));
        prop_assert!(
            self.rows.iter().all(|r| self.ended.contains(&r.id)),
            "a reload ended without END marker"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// Any sequence of markers (new, repeated, read again), cut and export outcomes, time and
    /// restarts keeps the invariants of the module documentation after every command and step, and
    /// once everything succeeds every reload ends and every hold is released.
    #[test]
    fn plan_keeps_its_invariants(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..120)) {
        let mut sim = Sim::new(seed);
        sim.restart(false)?;
        for op in &ops {
            sim.step(op)?;
            sim.check()?;
        }
        sim.drain()?;
    }
}

#[test]
fn a_cut_that_keeps_failing_after_an_earlier_cut_ends_the_reload() {
    let mut sim = Sim::new(1);
    sim.restart(false).unwrap();
    sim.step(&Op::Marker(0)).unwrap();
    sim.step(&Op::CutOk(0)).unwrap();
    sim.step(&Op::Export(0, 0, Outcome::Transient)).unwrap();
    for _ in 0..MAX_ATTEMPTS {
        sim.step(&Op::WakeAtDeadline).unwrap();
        sim.step(&Op::CutFails(0, Outcome::Transient)).unwrap();
        sim.check().unwrap();
    }
    assert!(sim.plan.active.is_empty());
    assert_eq!(sim.rows[0].status, Status::Failed);
    assert!(sim.held.is_empty());
}

#[test]
fn same_seed_same_schedule() {
    let waits = |seed| {
        let mut plan = ReloadPlan::with_seed(seed);
        let now = Instant::now();
        let mut out: Vec<Command<()>> = Vec::new();
        plan.resume(
            vec![(table(0), 1, String::new()), (table(1), 2, String::new())],
            &mut out,
        );
        let e = Error::transient(Component::Reload, "x");
        plan.attempt_failed(now, AttemptId(1), &[table(0), table(1)], &e, &mut out);
        out.into_iter()
            .filter_map(|c| match c {
                Command::RetryLater { after, .. } => Some(after),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(waits(7), waits(7));
    assert_eq!(waits(7).len(), 2);
}

#[test]
fn a_marker_after_the_running_attempts_cut_makes_the_reload_cut_again_without_holding() {
    let mut plan = ReloadPlan::with_seed(1);
    let now = Instant::now();
    let mut out: Vec<Command<&str>> = Vec::new();
    plan.marker(table(0), "r1".into(), Lsn(50), &mut out);
    plan.recorded(table(0), "r1".into(), Some(7), &mut out);
    plan.cut_taken(AttemptId(1), &[table(0)], Lsn(100), "snap", &mut out);
    out.clear();
    // A rewrite committed at 200, after the cut: the export at 100 cannot show it.
    plan.marker(table(0), "ddl:0/C8:1".into(), Lsn(200), &mut out);
    assert!(
        matches!(&out[..], [Command::Joined { .. }, Command::Release { cut, .. }] if *cut == Lsn(100)),
        "released at once, nothing pinned: {out:?}"
    );
    out.clear();
    plan.export_finished(now, AttemptId(1), &table(0), Ok("parts at 100"), &mut out);
    assert!(
        matches!(&out[..], [Command::RetryLater { .. }]),
        "the old export is not registered: {out:?}"
    );
    out.clear();
    plan.wake(now + RETRY_MAX * 2, &mut out);
    assert!(
        matches!(&out[..], [Command::StartAttempt { .. }]),
        "{out:?}"
    );
    out.clear();
    plan.cut_taken(AttemptId(2), &[table(0)], Lsn(300), "snap2", &mut out);
    plan.export_finished(now, AttemptId(2), &table(0), Ok("parts at 300"), &mut out);
    assert!(
        out.iter()
            .any(|c| matches!(c, Command::Register { cut, output, .. } if *cut == Lsn(300) && *output == "parts at 300")),
        "{out:?}"
    );
    // A marker whose transaction the known cut covers joins as before.
    let mut plan = ReloadPlan::with_seed(1);
    let mut out: Vec<Command<&str>> = Vec::new();
    plan.marker(table(0), "r1".into(), Lsn(50), &mut out);
    plan.recorded(table(0), "r1".into(), Some(7), &mut out);
    plan.cut_taken(AttemptId(1), &[table(0)], Lsn(100), "snap", &mut out);
    plan.marker(table(0), "r2".into(), Lsn(60), &mut out);
    out.clear();
    plan.export_finished(now, AttemptId(1), &table(0), Ok("parts at 100"), &mut out);
    assert!(matches!(&out[0], Command::Register { .. }), "{out:?}");
}

#[test]
fn a_marker_that_joins_before_a_lower_cut_is_reported_supersedes_that_attempt() {
    let mut plan = ReloadPlan::with_seed(1);
    let now = Instant::now();
    let mut out: Vec<Command<&str>> = Vec::new();
    plan.marker(table(0), "r1".into(), Lsn(50), &mut out);
    plan.recorded(table(0), "r1".into(), Some(7), &mut out);
    // The cut was taken at 100, but the coordinator hears of it only after a DDL at 200 joined.
    plan.marker(table(0), "ddl:0/C8:1".into(), Lsn(200), &mut out);
    plan.cut_taken(AttemptId(1), &[table(0)], Lsn(100), "snap", &mut out);
    out.clear();
    plan.export_finished(now, AttemptId(1), &table(0), Ok("parts at 100"), &mut out);
    assert!(matches!(&out[..], [Command::RetryLater { .. }]), "{out:?}");
    // The next attempt's cut is above the marker: it is registered.
    out.clear();
    plan.wake(now + RETRY_MAX * 2, &mut out);
    plan.cut_taken(AttemptId(2), &[table(0)], Lsn(300), "snap2", &mut out);
    out.clear();
    plan.export_finished(now, AttemptId(2), &table(0), Ok("parts at 300"), &mut out);
    assert!(
        matches!(&out[0], Command::Register { cut, .. } if *cut == Lsn(300)),
        "{out:?}"
    );
}
