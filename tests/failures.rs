//! Failure handling end to end: a dropped replication connection, a NATS outage, a standby waiting for
//! the slot, and change events (per change and grouped, also across a crash).

mod common;
mod workload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const CATCH_UP: Duration = Duration::from_secs(90);

async fn replay_equal(db: &mut TestDb) {
    assert_replays_equal(db, workload::DDL, workload::TABLES).await;
}

/// Copies bytes one way until either side closes or `alive` turns false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    alive: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    loop {
        let r = tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await;
        if !alive() {
            return;
        }
        match r {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => {}
        }
    }
}

/// A loopback TCP proxy that can be switched off (connections dropped, new ones refused) and on.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    async fn start(target: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !u.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let (u, g) = (u.clone(), g.clone());
                tokio::spawn(async move {
                    let born = g.load(Ordering::Relaxed);
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let alive =
                        move || u.load(Ordering::Relaxed) && g.load(Ordering::Relaxed) == born;
                    let a = tokio::spawn(pump(cr, sw, alive.clone()));
                    let b = tokio::spawn(pump(sr, cw, alive));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Proxy {
            port,
            up,
            generation,
        }
    }

    fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    fn up(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

/// NATS goes away mid-stream: nothing is acknowledged past the unnotified batch, the failure is
/// visible in the log and the registry's daemon state, and when NATS returns everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_holds_the_ack_and_recovers() {
    let mut db = TestDb::new("natsdown").await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let proxy = Proxy::start("127.0.0.1:4222").await;
    let mut env = db.daemon_env(&db.out_url());
    env.retain(|(k, _)| k != "CDC_EGRESS_NATS_URL");
    env.push((
        "CDC_EGRESS_NATS_URL".into(),
        format!("nats://127.0.0.1:{}", proxy.port),
    ));
    let mut d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    workload::phase1(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    proxy.down();
    let before = db.slot_confirmed().await.unwrap();
    workload::phase2(&c).await;
    // The daemon is stuck on a phase-2 notice: committed in the registry, its publish being retried.
    d.wait_for_log("publish notice failed; retrying", CATCH_UP)
        .await;
    db.wait_until(
        "SELECT count(*) > 0 FROM cdc_egress.files WHERE notified_stream_seq IS NULL",
        CATCH_UP,
        &d,
    )
    .await;
    // The failure shows in the registry's daemon state (written every few seconds).
    db.wait_until(
        "SELECT state = 'degraded' AND last_error IS NOT NULL FROM cdc_egress.daemon",
        CATCH_UP,
        &d,
    )
    .await;
    let during = db.slot_confirmed().await.unwrap();
    let first_unnotified: String = c
        .query_one("SELECT min(last_commit_lsn)::text FROM cdc_egress.files WHERE notified_stream_seq IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    let unnotified: cdc_egress::lsn::Lsn = first_unnotified.parse().unwrap();
    assert!(
        during <= unnotified,
        "confirmed {during} passed the unnotified batch ending at {unnotified}"
    );
    // Nothing of phase 2 may be acknowledged while its notices cannot be published.
    let phase2_files: i64 = c
        .query_one(
            "SELECT count(*) FROM cdc_egress.files WHERE notified_stream_seq IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        phase2_files <= 1,
        "delivery continued past an unpublished notice ({phase2_files} unnotified)"
    );
    assert!(
        during < db.current_lsn().await,
        "the ack went on during the outage ({before} → {during})"
    );
    proxy.up();
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "{log}");
    replay_equal(&mut db).await;
    let files: i64 = c
        .query_one("SELECT count(*) FROM cdc_egress.files", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stream_count(&db.stream, &format!("{}.*.batch.>", db.prefix)).await,
        files as u64
    );
    db.cleanup().await;
}

/// The replication connection is killed by the server: the daemon reconnects and resumes from the
/// confirmed LSN; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_replication_connection_resumes() {
    let mut db = TestDb::new("walsender").await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    workload::phase1(&c).await;
    // Kill the walsender once it has sent all of phase 1: the daemon holds it in open batches then.
    let phase1_end = db.current_lsn().await.to_string();
    let mut killed = 0;
    wait_until(
        &format!("the walsender to send {phase1_end}, to terminate it"),
        CATCH_UP,
        || d.log_tail(),
        async || {
            killed = c
                .query_one(
                    "SELECT count(pg_terminate_backend(s.active_pid)) FROM pg_replication_slots s \
                     JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1 AND r.sent_lsn >= $2::text::pg_lsn",
                    &[&db.slot, &phase1_end],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            killed > 0
        },
    )
    .await;
    assert_eq!(killed, 1);
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    assert!(
        log.contains("restarting from the confirmed LSN"),
        "no reconnect in the log:\n{log}"
    );
    assert!(d.stop().await.success());
    if std::env::var("DEBUG_REPLAY").is_ok() {
        for r in c.query("SELECT id, table_name, first_commit_lsn::text, first_seq, last_commit_lsn::text, last_seq, row_count FROM cdc_egress.files ORDER BY id", &[]).await.unwrap() {
            eprintln!("FILE {} {} {}.{} - {}.{} rows {}", r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, i32>(3), r.get::<_, String>(4), r.get::<_, i32>(5), r.get::<_, i64>(6));
        }
        eprintln!(
            "LOG {}",
            std::fs::read_to_string(db.dir.path().join("daemon.log")).unwrap_or_default()
        );
    }
    replay_equal(&mut db).await;
    db.cleanup().await;
}

/// A second daemon with the same slot waits (retrying, with a clear message) and takes over when the
/// first one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_waits_for_the_slot_and_takes_over() {
    let mut db = TestDb::new("standby").await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let env = db.daemon_env(&db.out_url());
    let first = Daemon::start(&env, db.dir.path(), &[], "first.log");
    db.wait_for_slot(&first).await;
    // The first one streams from the slot before the second one starts.
    db.wait_until(
        &format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = '{}'",
            db.slot
        ),
        CATCH_UP,
        &first,
    )
    .await;
    let mut second = Daemon::start(&env, db.dir.path(), &[], "second.log");
    second
        .wait_for_log("another process holds the slot", CATCH_UP)
        .await;
    workload::phase1(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    assert!(first.stop().await.success());
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    assert!(second.stop().await.success());
    replay_equal(&mut db).await;
    db.cleanup().await;
}

/// The rows of every registered streaming file.
async fn streaming_rows(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT sum(row_count)::bigint FROM cdc_egress.files WHERE kind = 'streaming'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// With `nats.change_events`, every change is also published once on its change subject, and the
/// slot still catches up (the event acks gate the ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_events_are_published_for_every_change() {
    let mut db = TestDb::new("events").await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_NATS_CHANGE_EVENTS".into(), "true".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    workload::phase1(&c).await;
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());
    let rows = streaming_rows(&c).await;
    let events = stream_count(&db.stream, &format!("{}.*.change.>", db.prefix)).await;
    assert_eq!(events, rows as u64, "one change event per change");
    let inserts = stream_count(
        &db.stream,
        &format!("{}.{}.change.public.accounts.insert", db.prefix, db.slot),
    )
    .await;
    assert!(inserts >= 200, "accounts inserts as events: {inserts}");
    replay_equal(&mut db).await;
    db.cleanup().await;
}

/// A daemon of another slot is refused the registry, the output prefix and the notice subjects a
/// first daemon owns
/// (README "Running several daemons"), before it creates its slot, removes a single object or
/// completes a single notice; the owner itself keeps streaming, and replays equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_slot_under_the_same_source_name_is_refused_everywhere() {
    let mut db = TestDb::new("owner").await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let env = db.daemon_env(&db.out_url());
    let owner = Daemon::start(&env, db.dir.path(), &[], "owner.log");
    db.wait_for_slot(&owner).await;
    workload::phase1(&c).await;
    db.wait_caught_up(CATCH_UP).await;

    // Another slot sharing the registry, prefix and stream is welcome under a name of its own
    // (tests/sources.rs); under the owner's name (the owner's slot name, the default) it would
    // clean up and complete the owner's work. Same registry and prefix: refused by the registry.
    let other_slot = format!("{}_other", db.slot);
    let owner_name = db.slot.clone();
    let same_name = ("CDC_EGRESS_SOURCE_NAME", owner_name.as_str());
    let intruder = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_SOURCE_SLOT", &other_slot), same_name],
        "intruder.log",
    );
    let log = intruder.log.clone();
    let status = intruder.wait_exit(CATCH_UP).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "a configuration error:\n{text}");
    assert!(
        text.contains(&format!(
            "source {:?} in the registry schema \"cdc_egress\" belongs to slot",
            db.slot
        )) && text.contains(&format!("slot {:?}", db.slot))
            && text.contains(&format!("slot {other_slot:?}")),
        "names both slots:\n{text}"
    );

    // A registry of its own (in another database) but the same prefix: refused by the prefix.
    let other_registry = db.extra_db("registry").await;
    let intruder = Daemon::start(
        &env,
        db.dir.path(),
        &[
            ("CDC_EGRESS_SOURCE_SLOT", &other_slot),
            same_name,
            ("CDC_EGRESS_REGISTRY_URL", &other_registry),
        ],
        "intruder2.log",
    );
    let log = intruder.log.clone();
    let status = intruder.wait_exit(CATCH_UP).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "a configuration error:\n{text}");
    assert!(
        text.contains("the output directory") && text.contains("release-owner"),
        "names the prefix and the way to hand it over:\n{text}"
    );

    // Its own registry and prefix, but the same stream and subject prefix: refused by the subjects.
    let intruder = Daemon::start(
        &env,
        db.dir.path(),
        &[
            ("CDC_EGRESS_SOURCE_SLOT", &other_slot),
            same_name,
            ("CDC_EGRESS_REGISTRY_URL", &other_registry),
            ("CDC_EGRESS_REGISTRY_SCHEMA", "cdc_egress_3"),
            (
                "CDC_EGRESS_OUTPUT_URL",
                &format!("file://{}", db.dir.path().join("out3").display()),
            ),
        ],
        "intruder3.log",
    );
    let log = intruder.log.clone();
    let status = intruder.wait_exit(CATCH_UP).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "a configuration error:\n{text}");
    assert!(
        text.contains(&format!("the subject prefix \"{}.{}\"", db.prefix, db.slot))
            && text.contains("cdc-egress release-owner --yes"),
        "names the subject prefix and the way to hand it over:\n{text}"
    );

    // One that fails before it gets to claim the name (its publication does not exist) must not
    // write its failure into the owner's daemon row either.
    let daemon_row = "SELECT slot_name, pid FROM cdc_egress.daemon";
    let before = query_rows(&c, daemon_row).await;
    let intruder = Daemon::start(
        &env,
        db.dir.path(),
        &[
            ("CDC_EGRESS_SOURCE_SLOT", &other_slot),
            same_name,
            ("CDC_EGRESS_SOURCE_PUBLICATION", "no_such_publication"),
        ],
        "intruder4.log",
    );
    let log = intruder.log.clone();
    let status = intruder.wait_exit(CATCH_UP).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success() && text.contains("no_such_publication"),
        "a definite error:\n{text}"
    );
    assert_eq!(
        query_rows(&c, daemon_row).await,
        before,
        "the owner's daemon row changed:\n{text}"
    );

    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&other_slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a refused daemon creates no slot");
    let registered: i64 = connect(&other_registry)
        .await
        .query_one("SELECT count(*) FROM cdc_egress.files", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(registered, 0, "a refused daemon registers nothing");
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    assert!(owner.stop().await.success());
    replay_equal(&mut db).await;

    // The hand-over the refusals point at: release-owner, with the owner stopped.
    let (code, _, err) = run_cli(&["release-owner"], &env, db.dir.path());
    assert_eq!(code, 2, "asks for --yes: {err}");
    let (code, out, err) = run_cli(&["release-owner", "--yes"], &env, db.dir.path());
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        out.matches(&format!("released (it belonged to slot {:?}", db.slot))
            .count(),
        3,
        "registry, prefix and subjects released:\n{out}"
    );
    let (code, out, err) = run_cli(&["release-owner", "--yes"], &env, db.dir.path());
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches("not claimed").count(), 3, "{out}");
    db.cleanup().await;
}

/// One grouped change event as stored: its subject, headers and the rows of its body (each row's
/// fields, parsed as CSV), in stream order.
struct Group {
    subject: String,
    msg_id: String,
    headers: std::collections::BTreeMap<String, String>,
    body_len: usize,
    /// Each row's CSV line length, `\n` included (the test data has no line breaks in values).
    row_lens: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Group {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("{name} on {}", self.subject))
    }

    /// `(_commit_lsn, _seq)` of a row: the metadata columns after `_op`.
    fn position(row: &[String]) -> (cdc_egress::lsn::Lsn, u32) {
        (row[1].parse().unwrap(), row[2].parse().unwrap())
    }
}

/// Every grouped change event of `db`'s stream, in stream order.
async fn grouped_events(db: &TestDb) -> Vec<Group> {
    let c = async_nats::connect(nats_url()).await.unwrap();
    let mut s = async_nats::jetstream::new(c)
        .get_stream(&db.stream)
        .await
        .unwrap();
    let state = s.info().await.unwrap().state.clone();
    let prefix = format!("{}.{}.changes.", db.prefix, db.slot);
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = s.get_raw_message(seq).await else {
            continue;
        };
        if !m.subject.starts_with(&prefix) {
            continue;
        }
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v[0].as_str().to_string()))
            .collect::<std::collections::BTreeMap<_, _>>();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(&m.payload[..]);
        let rows = reader
            .records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect();
        out.push(Group {
            subject: m.subject.to_string(),
            msg_id: headers.get("Nats-Msg-Id").cloned().unwrap_or_default(),
            headers,
            body_len: m.payload.len(),
            row_lens: m
                .payload
                .split_inclusive(|b| *b == b'\n')
                .map(<[u8]>::len)
                .collect(),
            rows,
        });
    }
    out
}

/// Checks the grouped events of `db` (README "Grouped change events") and returns them: every
/// change of the registry's files appears exactly once, in stream order; each group is one table
/// of one transaction within the limits (1,024 rows, 256 KiB unless a single row), maximal, and
/// its headers, subject and id agree with its rows; no per-change event is published.
async fn check_grouped_events(db: &TestDb) -> Vec<Group> {
    let groups = grouped_events(db).await;
    let mut last: Option<(cdc_egress::lsn::Lsn, u32)> = None;
    let mut total = 0usize;
    for (i, g) in groups.iter().enumerate() {
        assert!(!g.rows.is_empty(), "an empty group on {}", g.subject);
        let table = g.header("Cdc-Table");
        assert_eq!(
            g.subject,
            format!("{}.{}.changes.{table}", db.prefix, db.slot)
        );
        let (lsn, first_seq) = Group::position(&g.rows[0]);
        let (_, last_seq) = Group::position(g.rows.last().unwrap());
        assert_eq!(g.header("Cdc-Commit-Lsn"), lsn.to_string());
        assert_eq!(g.header("Cdc-First-Seq"), first_seq.to_string());
        assert_eq!(g.header("Cdc-Last-Seq"), last_seq.to_string());
        assert_eq!(g.header("Cdc-Rows"), g.rows.len().to_string());
        assert_eq!(g.row_lens.len(), g.rows.len());
        assert!(
            g.msg_id
                .ends_with(&format!(":{}:{lsn}:{first_seq}", g.subject)),
            "{}",
            g.msg_id
        );
        for row in &g.rows {
            let pos = Group::position(row);
            assert_eq!(pos.0, lsn, "one transaction per group");
            assert_eq!(row[3], g.header("Cdc-Xid"));
            assert_eq!(row[4], g.header("Cdc-Commit-Ts"));
            assert!(
                last.is_none_or(|l| l < pos),
                "every change once, in order: {pos:?} after {last:?}"
            );
            last = Some(pos);
        }
        assert!(g.rows.len() <= 1024, "{} rows", g.rows.len());
        assert!(
            g.body_len <= 256 * 1024 || g.rows.len() == 1,
            "{} bytes in {} rows",
            g.body_len,
            g.rows.len()
        );
        // Maximal: the next group of the same table and transaction could not have been joined.
        if let Some(next) = groups.get(i + 1) {
            if next.subject == g.subject && Group::position(&next.rows[0]).0 == lsn {
                assert!(
                    g.rows.len() == 1024 || g.body_len + next.row_lens[0] > 256 * 1024,
                    "group {i} was cut early: {} rows, {} bytes",
                    g.rows.len(),
                    g.body_len
                );
            }
        }
        total += g.rows.len();
    }
    let rows = streaming_rows(&db.client().await).await;
    assert_eq!(total, rows as usize, "every change in exactly one group");
    assert_eq!(
        stream_count(&db.stream, &format!("{}.*.change.>", db.prefix)).await,
        0,
        "no per-change events in grouped mode"
    );
    groups
}

/// Tables and publication of the grouped-event tests (`t` with a text column, `u` a key only), a
/// client, and the daemon's environment with `nats.change_events: grouped`.
async fn grouped_setup(db: &TestDb) -> (tokio_postgres::Client, Vec<(String, String)>) {
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text); \
         CREATE TABLE public.u (id int PRIMARY KEY); \
         CREATE PUBLICATION {} FOR TABLE public.t, public.u",
        db.publication
    ))
    .await
    .unwrap();
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_NATS_CHANGE_EVENTS".into(), "grouped".into()));
    (c, env)
}

/// (table, rows) of each group, for comparing shapes.
fn group_shape(groups: &[Group]) -> Vec<(String, usize)> {
    groups
        .iter()
        .map(|g| (g.header("Cdc-Table").to_string(), g.rows.len()))
        .collect()
}

/// With `nats.change_events: grouped`, a transaction's changes are published as runs of one table
/// (cut at a change of table, 1,024 rows or 256 KiB), every change exactly once and in order, and
/// the slot still catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_change_events_carry_every_change_once() {
    let db = TestDb::new("grouped").await;
    let (c, env) = grouped_setup(&db).await;
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    for sql in [
        // Tables interleaved in one transaction: t[3], u[2], t[1], u[1].
        "BEGIN; INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3) g; \
         INSERT INTO u VALUES (1), (2); UPDATE t SET a = 'y' WHERE id = 1; \
         DELETE FROM u WHERE id = 2; COMMIT",
        // 2,491 narrow rows: cut at 1,024 rows.
        "INSERT INTO u SELECT g FROM generate_series(10, 2500) g",
        // 691 wide rows: cut at 256 KiB.
        "INSERT INTO t SELECT g, repeat('w', 1000) FROM generate_series(10, 700) g",
        // One row larger than a group's body: a group of its own.
        "INSERT INTO t VALUES (5000, repeat('y', 300000))",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());
    let groups = check_grouped_events(&db).await;
    let shape = group_shape(&groups);
    let (t, u) = ("public.t".to_string(), "public.u".to_string());
    assert_eq!(
        shape[..7],
        [
            (t.clone(), 3),
            (u.clone(), 2),
            (t.clone(), 1),
            (u.clone(), 1),
            (u.clone(), 1024),
            (u.clone(), 1024),
            (u.clone(), 443),
        ]
    );
    let wide: Vec<usize> = shape[7..shape.len() - 1].iter().map(|(_, n)| *n).collect();
    assert!(
        wide.len() >= 3 && wide.iter().sum::<usize>() == 691,
        "691 wide rows cut by size: {wide:?}"
    );
    assert_eq!(shape.last().unwrap(), &(t, 1), "the large row alone");
    assert!(groups.last().unwrap().body_len > 256 * 1024);
    db.cleanup().await;
}

/// Grouped change events (with transaction events) across a crash after delivery: the replayed
/// transactions produce the same groups with the same ids, which JetStream drops, so every change
/// is published exactly once and each transaction is bracketed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_change_events_are_not_duplicated_by_a_crash() {
    let db = TestDb::new("groupcrash").await;
    let (c, mut env) = grouped_setup(&db).await;
    env.push(("CDC_EGRESS_NATS_TXN_EVENTS".into(), "true".into()));
    let transactions = [
        "BEGIN; INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3) g; \
         INSERT INTO u SELECT g FROM generate_series(1, 1500) g; UPDATE t SET a = 'y'; COMMIT",
        "INSERT INTO u SELECT g FROM generate_series(2000, 2100) g",
        "BEGIN; DELETE FROM u WHERE id < 100; INSERT INTO t VALUES (10, 'z'); COMMIT",
        "INSERT INTO u SELECT g FROM generate_series(3000, 4100) g",
    ];
    // The first batch's notice aborts the daemon: the next run replays these transactions.
    db.crash_at_first_notice(&env, &transactions[..2], CATCH_UP)
        .await;
    let published_before = grouped_events(&db).await.len();
    let d = Daemon::start(&env, db.dir.path(), &[], "second.log");
    for sql in &transactions[2..] {
        c.batch_execute(sql).await.unwrap();
    }
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());

    let groups = check_grouped_events(&db).await;
    assert!(
        published_before > 0,
        "groups were published before the crash (the replay had something to deduplicate)"
    );
    let (t, u) = ("public.t".to_string(), "public.u".to_string());
    assert_eq!(
        group_shape(&groups),
        [
            (t.clone(), 3),
            (u.clone(), 1024),
            (u.clone(), 476),
            (t.clone(), 3),
            (u.clone(), 101),
            (u.clone(), 99),
            (t.clone(), 1),
            (u.clone(), 1024),
            (u.clone(), 77),
        ]
    );
    let begins = stream_count(&db.stream, &format!("{}.*.txn.begin", db.prefix)).await;
    let commits = stream_count(&db.stream, &format!("{}.*.txn.commit", db.prefix)).await;
    assert_eq!((begins, commits), (4, 4), "each transaction bracketed once");
    db.cleanup().await;
}
