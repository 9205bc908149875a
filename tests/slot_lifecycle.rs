//! Slot lifecycle end to end (README "Slot lifecycle"): a slot dropped behind the daemon's back is
//! a loss, never a silent fresh start. With `source.slot_lost: error` (the default) the daemon stops
//! with a definite error that explains the choices and creates nothing; with `reexport` it records
//! the gap, creates a new slot, exports every table again and announces the loss on NATS, and the
//! files replay equal to the source by the consumer rule. `drop-slot` is on purpose: afterwards the
//! next run is a plain fresh start. And a slot that PostgreSQL itself invalidates
//! (`max_slot_wal_keep_size`, on a private server of our own) is found lost and handled the same way.

mod common;

use std::time::Duration;

use common::*;

const DDL: &str = "CREATE TABLE acc (id int PRIMARY KEY, v text); CREATE TABLE other (k text PRIMARY KEY, n int);";
const TABLES: &[&str] = &["acc", "other"];
const CATCH_UP: Duration = Duration::from_secs(90);

async fn write(db: &TestDb, from: i32, to: i32) {
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO acc SELECT g, 'v' || g FROM generate_series({from}, {to}) g;
             UPDATE acc SET v = v || '+' WHERE id % 7 = 0;
             DELETE FROM acc WHERE id % 11 = 0 AND id >= {from};
             INSERT INTO other SELECT 'k' || g, g FROM generate_series({from}, {to}) g;"
        ))
        .await
        .unwrap();
}

/// A database on `base` (the shared server when `None`) with the two tables, rows 1..=`rows`, and the
/// publication (`FOR ALL TABLES`, or `FOR TABLE acc, other` when other tables must stay out of it).
async fn published(tag: &str, base: Option<&str>, rows: i32, all_tables: bool) -> TestDb {
    let db = match base {
        Some(b) => TestDb::new_on(b, tag).await,
        None => TestDb::new(tag).await,
    };
    db.client().await.batch_execute(DDL).await.unwrap();
    if rows > 0 {
        write(&db, 1, rows).await;
    }
    let what = if all_tables {
        "ALL TABLES"
    } else {
        "TABLE acc, other"
    };
    db.client()
        .await
        .batch_execute(&format!("CREATE PUBLICATION {} FOR {what}", db.publication))
        .await
        .unwrap();
    db
}

/// The number `sql` counts, once it reaches `want` (or the last value after about a minute).
async fn count_reaches(db: &TestDb, sql: &str, want: i64) -> i64 {
    let c = db.client().await;
    let mut n = 0;
    for _ in 0..300 {
        n = c.query_one(sql, &[]).await.unwrap().get(0);
        if n >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    n
}

async fn slot_events(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT event FROM cdc_egress.slot_events WHERE slot_name = $1 ORDER BY id",
            &[&db.slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn slot_exists(db: &TestDb) -> bool {
    db.client()
        .await
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_behind_our_back_is_refused_or_reexported_never_silently_restarted() {
    let mut db = published("slotlost", None, 200, true).await;
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_RELOAD_INITIAL".into(), "true".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "run1.log");
    db.wait_for_slot(&d).await;
    write(&db, 201, 400).await;
    db.wait_caught_up(CATCH_UP).await;
    d.stop().await;
    assert_eq!(slot_events(&db).await, ["created"]);

    // Someone drops the slot; rows change meanwhile (the gap no slot will ever send).
    write(&db, 401, 600).await;
    db.client()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await
        .unwrap();
    write(&db, 601, 700).await;

    // Default policy: a definite stop that says what happened and what to do; no new slot.
    let d = Daemon::start(&env, db.dir.path(), &[], "run2.log");
    let status = d.wait_exit(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(db.dir.path().join("run2.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("dropped by someone else") && log.contains("slot_lost: reexport"),
        "{log}"
    );
    assert!(
        !slot_exists(&db).await,
        "nothing created under the error policy"
    );

    // reexport: a new slot, every table exported again, the loss recorded and announced.
    let mut env2 = env.clone();
    env2.push(("CDC_EGRESS_SOURCE_SLOT_LOST".into(), "reexport".into()));
    let d = Daemon::start(&env2, db.dir.path(), &[], "run3.log");
    db.wait_for_slot(&d).await;
    write(&db, 701, 800).await;
    db.wait_caught_up(CATCH_UP).await;
    let reloads = count_reaches(
        &db,
        "SELECT count(*) FROM cdc_egress.reloads WHERE status = 'done' AND reason = 'initial'",
        4,
    )
    .await;
    assert_eq!(
        reloads, 4,
        "both tables exported at the start and again after the loss"
    );
    assert_eq!(slot_events(&db).await, ["created", "lost", "created"]);
    let subject = format!("{}.{}.slot.{}", db.prefix, db.slot, db.slot);
    for _ in 0..50 {
        if stream_count(&db.stream, &subject).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stream_count(&db.stream, &subject).await,
        1,
        "the loss is announced once"
    );
    d.stop().await;
    assert_replays_equal(&mut db, DDL, TABLES).await;

    // drop-slot is on purpose: the next run is a plain fresh start, under the default policy.
    let (code, _, err) = run_cli_timeout(&["drop-slot", "--yes"], &env, db.dir.path(), CATCH_UP);
    assert_eq!(code, 0, "{err}");
    let d = Daemon::start(&env, db.dir.path(), &[], "run4.log");
    db.wait_for_slot(&d).await;
    db.wait_caught_up(CATCH_UP).await;
    let want = ["created", "lost", "created", "dropped", "created"];
    for _ in 0..50 {
        if slot_events(&db).await == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(slot_events(&db).await, want, "log:\n{}", d.log_text());
    d.stop().await;
    db.cleanup().await;
}

/// A real invalidation: a private server with a small `max_slot_wal_keep_size`, the daemon stopped
/// while more WAL than that is written and checkpointed, so PostgreSQL marks the slot `lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_detected() {
    let pg = PrivatePg::start(
        &PrivatePg::system_bindir(),
        &[("max_slot_wal_keep_size", "32MB"), ("wal_keep_size", "0")],
    );
    let mut db = published("slotinval", Some(&pg.url), 100, false).await;
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_RELOAD_INITIAL".into(), "true".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "run1.log");
    db.wait_for_slot(&d).await;
    write(&db, 101, 200).await;
    db.wait_caught_up(CATCH_UP).await;
    d.stop().await;

    // ~100 MB of WAL while nobody reads the slot, with checkpoints: PostgreSQL invalidates it.
    let c = db.client().await;
    c.batch_execute("CREATE TABLE ballast (b text)")
        .await
        .unwrap();
    let mut lost = false;
    for _ in 0..12 {
        c.batch_execute(
            "INSERT INTO ballast SELECT repeat(md5(g::text), 32) FROM generate_series(1, 8000) g; \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        let status: Option<String> = c
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.slot],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            lost = true;
            break;
        }
    }
    assert!(lost, "the server did not invalidate the slot");
    write(&db, 201, 300).await;

    let d = Daemon::start(&env, db.dir.path(), &[], "run2.log");
    let status = d.wait_exit(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(db.dir.path().join("run2.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("was invalidated"), "{log}");
    let (code, out, err) = run_cli_timeout(&["status"], &env, db.dir.path(), CATCH_UP);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lost") && out.contains("warning"), "{out}");

    env.push(("CDC_EGRESS_SOURCE_SLOT_LOST".into(), "reexport".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "run3.log");
    db.wait_for_slot(&d).await;
    write(&db, 301, 400).await;
    db.wait_caught_up(CATCH_UP).await;
    let done = count_reaches(
        &db,
        "SELECT count(*) FROM cdc_egress.reloads WHERE status = 'done'",
        4,
    )
    .await;
    assert_eq!(
        done, 4,
        "both tables exported at the start and again after the loss"
    );
    d.stop().await;
    assert_replays_equal(&mut db, DDL, TABLES).await;
    db.cleanup().await;
}

/// `source.slot_failover`: on PostgreSQL 17+ the slot is created with `failover = true`; an older
/// server refuses it as a configuration error before any slot exists. Both sides run: the first on
/// the shared server (15), the second in the version matrix (`deploy/local/pg_versions.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_failover_is_set_on_17_and_refused_before() {
    let db = published("slotfailover", None, 0, true).await;
    let version: i32 = db
        .client()
        .await
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_SOURCE_SLOT_FAILOVER".into(), "true".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "run.log");
    if version < 170000 {
        let status = d.wait_exit(Duration::from_secs(60)).await;
        let log = std::fs::read_to_string(db.dir.path().join("run.log")).unwrap();
        assert_eq!(status.code(), Some(2), "{log}");
        assert!(log.contains("slot_failover needs PostgreSQL 17"), "{log}");
        assert!(!slot_exists(&db).await);
    } else {
        db.wait_for_slot(&d).await;
        let failover: bool = db
            .client()
            .await
            .query_one(
                "SELECT (to_jsonb(s)->>'failover')::bool FROM pg_replication_slots s WHERE slot_name = $1",
                &[&db.slot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(failover, "the slot is synchronized to standbys");
        d.stop().await;
    }
    db.cleanup().await;
}

/// The refusal's advice works: `drop-slot --yes` on a slot someone else already dropped records the
/// drop, and the next run is a plain fresh start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_slot_clears_the_refusal_for_a_slot_already_gone() {
    let db = published("slotgone", None, 0, true).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "run1.log");
    db.wait_for_slot(&d).await;
    d.stop().await;
    // The walsender of the stopped daemon may hold the slot for a moment after the process exits.
    let c = db.client().await;
    wait_until(
        "the stopped daemon's slot to be dropped",
        Duration::from_secs(30),
        String::new,
        async || {
            c.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active",
                &[&db.slot],
            )
            .await
            .unwrap()
                == 1
        },
    )
    .await;
    let d = Daemon::start(&env, db.dir.path(), &[], "run2.log");
    assert_eq!(d.wait_exit(Duration::from_secs(60)).await.code(), Some(1));
    let (code, out, err) = run_cli_timeout(&["drop-slot", "--yes"], &env, db.dir.path(), CATCH_UP);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("already gone") && out.contains("recorded"),
        "{out}"
    );
    let d = Daemon::start(&env, db.dir.path(), &[], "run3.log");
    db.wait_for_slot(&d).await;
    d.stop().await;
    let want = ["created", "dropped", "created"];
    assert_eq!(slot_events(&db).await, want);
    db.cleanup().await;
}

/// A reload whose marker was read but whose cut was never taken (it waited behind an open
/// transaction) when the slot was lost: its marker is in the lost WAL, so the re-export takes it
/// over instead of leaving it stuck, and the table replays equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_waiting_for_its_cut_is_taken_over_by_the_reexport() {
    let mut db = published("slotuncut", None, 100, true).await;
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_SOURCE_SLOT_LOST".into(), "reexport".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "run1.log");
    db.wait_for_slot(&d).await;
    let blocker = db.client().await;
    blocker
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let (code, _, err) = run_cli_timeout(&["reload", "public.acc"], &env, db.dir.path(), CATCH_UP);
    assert_eq!(code, 0, "{err}");
    let c = db.client().await;
    let mut running = false;
    for _ in 0..100 {
        running = c
            .query_opt(
                "SELECT 1 FROM cdc_egress.reloads WHERE status = 'running' AND cut_lsn IS NULL",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        running,
        "the reload waits for its cut; log:\n{}",
        d.log_text()
    );
    d.kill().await;
    write(&db, 101, 200).await;
    // The slot goes (its walsender and the cut's temporary slot with it).
    c.batch_execute(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name LIKE '{}%' AND active_pid IS NOT NULL",
        db.slot
    ))
    .await
    .unwrap();
    for _ in 0..50 {
        if c.execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    blocker.batch_execute("COMMIT").await.unwrap();
    let d = Daemon::start(&env, db.dir.path(), &[], "run2.log");
    db.wait_for_slot(&d).await;
    let mut active = 1;
    for _ in 0..300 {
        active = c
            .query_one(
                "SELECT count(*) FROM cdc_egress.reloads WHERE status IN ('requested', 'running')",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(active, 0, "no reload stays stuck; log:\n{}", d.log_text());
    write(&db, 201, 300).await;
    db.wait_caught_up(CATCH_UP).await;
    d.stop().await;
    assert_replays_equal(&mut db, DDL, TABLES).await;
    db.cleanup().await;
}
