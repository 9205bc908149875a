//! Schema and publication changes (README "Schema changes"): every change of a published table is a
//! DDL record at its exact position, changes that rewrite existing rows or publish a table with rows
//! reload it there, and the files replay to the source by the documented rule, across kill -9 too.

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const CATCH_UP: Duration = Duration::from_secs(120);

const SETUP: &str = "
    CREATE TABLE public.t (id int PRIMARY KEY, a text, n numeric(10,2));
    CREATE TABLE public.r (id int PRIMARY KEY, v text);
    CREATE TABLE public.gone (id int PRIMARY KEY);
    CREATE TABLE public.u (id int PRIMARY KEY, w text);
    CREATE TABLE public.v (id int PRIMARY KEY);
    INSERT INTO public.u SELECT g, 'before publish ' || g FROM generate_series(1, 5) g;
";

/// Every kind of change of a published table, with data changes before, between and after them.
/// `{pub}` is the test's publication.
const WORKLOAD: &[&str] = &[
    "INSERT INTO t SELECT g, 'a' || g, g * 1.25 FROM generate_series(1, 20) g",
    "INSERT INTO r SELECT g, 'r' || g FROM generate_series(1, 5) g",
    "INSERT INTO gone VALUES (1), (2)",
    // A filled-in column, inside a transaction with rows before and after it.
    "BEGIN; INSERT INTO t VALUES (21, 'x', 2.25); \
         ALTER TABLE t ADD COLUMN d int NOT NULL DEFAULT 7; \
         INSERT INTO t VALUES (22, 'y', 3.35, 8); COMMIT",
    "UPDATE t SET a = 'renamed soon' WHERE id <= 3",
    "ALTER TABLE t RENAME COLUMN a TO b",
    "UPDATE t SET b = 'after rename' WHERE id = 4",
    // A rewriting type change: every existing value is rounded.
    "ALTER TABLE t ALTER COLUMN n TYPE numeric(10,1)",
    "INSERT INTO t VALUES (23, 'z', 9.99, 1)",
    // A DDL that rolls back leaves nothing.
    "BEGIN; ALTER TABLE t DROP COLUMN b; ROLLBACK",
    "BEGIN; ALTER TABLE t DROP COLUMN b; INSERT INTO t VALUES (24, 1.5, 2); COMMIT",
    "ALTER TABLE r RENAME TO r2",
    "INSERT INTO r2 VALUES (6, 'after table rename'); UPDATE r2 SET v = 'moved' WHERE id = 1",
    // A table with rows joins the publication.
    "ALTER PUBLICATION {pub} ADD TABLE u",
    "INSERT INTO u VALUES (6, 'after publish'); DELETE FROM u WHERE id = 2",
    "DROP TABLE gone",
    // Not published: no record.
    "ALTER TABLE v ADD COLUMN x int DEFAULT 1",
    "UPDATE t SET n = n + 1 WHERE id = 5",
];

async fn workload(c: &Client, publication: &str) {
    for sql in WORKLOAD {
        let sql = sql.replace("{pub}", publication);
        c.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

async fn setup(db: &TestDb) -> Client {
    let c = db.client().await;
    c.batch_execute(SETUP).await.unwrap();
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE public.t, public.r, public.gone",
        db.publication
    ))
    .await
    .unwrap();
    c
}

/// Waits until the daemon confirmed everything and no reload is active.
async fn settle(db: &TestDb, d: &Daemon) {
    db.wait_caught_up(CATCH_UP).await;
    db.wait_until(
        "SELECT NOT EXISTS (SELECT 1 FROM cdc_egress.reloads WHERE status IN ('requested', 'running')) \
         AND EXISTS (SELECT 1 FROM cdc_egress.reloads WHERE status = 'done')",
        CATCH_UP,
        d,
    )
    .await;
    // Rows written while the reloads ran are confirmed too.
    db.wait_caught_up(CATCH_UP).await;
}

/// Replays by the rule into an empty database and compares every published table with the source.
async fn assert_follows_source(db: &mut TestDb) -> DdlReplay {
    let target_url = db.extra_db("replay").await;
    let target = connect(&target_url).await;
    let report = replay_following_ddl(&db.url, &db.out_url(), &target).await;
    let source = db.client().await;
    for (table, cols) in [
        ("public.t", "id, n, d"),
        ("public.r2", "id, v"),
        ("public.u", "id, w"),
    ] {
        let q = format!("SELECT {cols} FROM {table}");
        assert_eq!(
            query_rows(&target, &q).await,
            query_rows(&source, &q).await,
            "{table} differs after replay; records: {:#?}",
            report.ddl_records
        );
    }
    for gone in ["public.gone", "public.r", "public.v"] {
        let exists: bool = target
            .query_one(&format!("SELECT to_regclass('{gone}') IS NOT NULL"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(!exists, "{gone} must not exist in the replay");
    }
    report
}

/// The two text columns of every row `sql` returns.
async fn pairs(c: &Client, sql: &str) -> Vec<(String, String)> {
    c.query(sql, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn records(c: &Client) -> Vec<(String, String, String)> {
    c.query(
        "SELECT table_name, event, command_tag FROM cdc_egress.ddl_history ORDER BY commit_lsn, seq, id",
        &[],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_and_publication_change_replays_to_the_source() {
    let mut db = TestDb::new("ddl").await;
    let c = setup(&db).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "ddl.log");
    db.wait_for_slot(&d).await;
    workload(&c, &db.publication).await;
    settle(&db, &d).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");

    let c = db.client().await;
    assert_eq!(
        records(&c).await,
        [
            ("t", "alter", "ALTER TABLE"),
            ("t", "alter", "ALTER TABLE"),
            ("t", "alter", "ALTER TABLE"),
            ("t", "alter", "ALTER TABLE"),
            ("r", "rename", "ALTER TABLE"),
            ("r2", "rename", "ALTER TABLE"),
            ("u", "publish", "ALTER PUBLICATION"),
            ("gone", "drop", "DROP TABLE"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())),
        "one record per committed change of a published table, in commit order"
    );
    // The type change joins the reload the filled-in column started (or, when that one's cut was
    // already taken below it, makes it take a new one), or, when that reload ended before the stream
    // reached the type change, starts a second one: one or two reloads of t, all done.
    let reloads: Vec<String> = c
        .query(
            "SELECT reason || ' ' || status || ' ' || table_name || coalesce(' ' || error, '') \
             FROM cdc_egress.reloads ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let mut distinct = reloads.clone();
    distinct.dedup();
    assert_eq!(distinct, ["ddl done t", "published done u"], "{reloads:?}");
    assert!(reloads.len() <= 3, "{reloads:?}");
    let modes = pairs(
        &c,
        "SELECT table_name, mode FROM cdc_egress.tables ORDER BY table_name",
    )
    .await;
    for (table, mode) in [
        ("gone", "dropped"),
        ("r", "renamed"),
        ("r2", "streaming"),
        ("t", "streaming"),
        ("u", "streaming"),
    ] {
        assert!(
            modes.contains(&(table.to_string(), mode.to_string())),
            "{table} should be {mode}: {modes:?}"
        );
    }
    // Every record was announced on the ddl subject.
    let ddl_files: i64 = c
        .query_one(
            "SELECT count(*) FROM cdc_egress.files WHERE kind = 'ddl'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ddl_files, 8);
    assert_eq!(
        stream_count(&db.stream, &format!("{}.{}.ddl.>", db.prefix, db.slot)).await,
        8
    );
    // `status` follows the table: the old name says where it went, the dropped one that it went.
    let (code, out, err) = run_cli(&["status", "--json"], &env, db.dir.path());
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last_ddl = |t: &str| {
        status["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["table"] == t)
            .and_then(|x| x["last_ddl"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("{t} in {status}"))
    };
    assert!(
        last_ddl("public.r").starts_with("rename to public.r2 at "),
        "{status}"
    );
    assert!(last_ddl("public.gone").starts_with("drop at "), "{status}");
    let report = assert_follows_source(&mut db).await;
    assert_eq!(report.reloads_loaded, 2);
    let _ = report;
    // The filled-in column's record says what diverged and names the reload that repairs it; the
    // rename's does not ask for one.
    let t: Vec<(String, bool, Option<String>)> = c
        .query(
            "SELECT event, (details->>'rewrites_rows')::boolean, details->>'reload_request' \
             FROM cdc_egress.ddl_history WHERE table_name = 't' ORDER BY commit_lsn, seq",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        t[0].1 && t[0].2.as_deref().is_some_and(|r| r.starts_with("ddl:")),
        "{t:?}"
    );
    assert!(!t[1].1 && t[1].2.is_none(), "{t:?}");
    assert!(t[2].1 && t[2].2.is_some(), "the type change: {t:?}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_a_ddl_record_is_registered_replays_equal_with_nothing_twice() {
    let mut db = TestDb::new("ddl_crash").await;
    let c = setup(&db).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_TEST_FAILPOINT", "after_ddl_register")],
        "crash.log",
    );
    db.wait_for_slot(&d).await;
    workload(&c, &db.publication).await;
    let status = d.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "the failpoint must abort the daemon");
    let d = Daemon::start(&env, db.dir.path(), &[], "after.log");
    settle(&db, &d).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");
    let c = db.client().await;
    assert_eq!(records(&c).await.len(), 8, "{:?}", records(&c).await);
    let dup: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM cdc_egress.files GROUP BY table_schema, table_name, \
             first_commit_lsn, first_seq, kind HAVING count(*) > 1) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dup, 0, "nothing registered twice");
    assert_follows_source(&mut db).await;
    db.cleanup().await;
}

/// A partition attached with rows (or detached) changes what a published partitioned table holds
/// without a row change in the WAL. Published as its root, the root is reloaded at the DDL; with
/// its leaves published themselves, the attached leaf is published (its rows exported) and the
/// detached one unpublished.
async fn partitions_follow_attach_and_detach(via_root: bool) {
    let mut db = TestDb::new(if via_root { "ddl_root" } else { "ddl_leaf" }).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE m (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10);
         CREATE TABLE m2 (id int, k int, v text, PRIMARY KEY (id, k));
         INSERT INTO m2 SELECT g, 10 + g % 10, 'attached later' FROM generate_series(1, 30) g;
         CREATE PUBLICATION {} FOR TABLE m WITH (publish_via_partition_root = {via_root});",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "partitions.log");
    db.wait_for_slot(&d).await;
    for sql in [
        "INSERT INTO m SELECT g, g % 10, 'streamed' FROM generate_series(1, 20) g",
        "ALTER TABLE m ATTACH PARTITION m2 FOR VALUES FROM (10) TO (20)",
        "INSERT INTO m VALUES (100, 15, 'after attach'); UPDATE m SET v = 'updated' WHERE id = 3",
        "ALTER TABLE m DETACH PARTITION m1",
        "INSERT INTO m VALUES (101, 16, 'after detach')",
        // Filled in on the partitions, not on the partitioned table (it has no rows of its own).
        "ALTER TABLE m ADD COLUMN d int NOT NULL DEFAULT 9",
        "INSERT INTO m VALUES (102, 17, 'after fill', 1)",
        // A new (empty) partition, filled, then dropped with its rows.
        "CREATE TABLE m3 PARTITION OF m FOR VALUES FROM (20) TO (30)",
        "INSERT INTO m SELECT g, 20 + g % 10, 'in m3', 2 FROM generate_series(200, 210) g",
        "DROP TABLE m3",
        "INSERT INTO m VALUES (103, 18, 'after drop', 3)",
    ] {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    settle(&db, &d).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");
    let events = pairs(
        &c,
        "SELECT table_name, event FROM cdc_egress.ddl_history ORDER BY commit_lsn, seq, id",
    )
    .await;
    let (expected, compared): (&[(&str, &str)], &[&str]) = if via_root {
        (
            &[
                ("m", "alter"),
                ("m", "alter"),
                ("m", "alter"),
                ("m", "alter"),
            ],
            &["m"],
        )
    } else {
        (
            &[
                ("m2", "publish"),
                ("m1", "unpublish"),
                ("m2", "alter"),
                ("m3", "create"),
                ("m3", "drop"),
            ],
            &["m2"],
        )
    };
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(t, e)| (t.to_string(), e.to_string()))
        .collect();
    assert_eq!(events, expected);
    let target_url = db.extra_db("replay").await;
    let target = connect(&target_url).await;
    replay_following_ddl(&db.url, &db.out_url(), &target).await;
    for t in compared {
        let q = format!("SELECT id, k, v, d FROM {t}");
        assert_eq!(
            query_rows(&target, &q).await,
            query_rows(&c, &q).await,
            "{t} differs after replay"
        );
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_attached_to_a_root_published_table_reloads_the_root() {
    partitions_follow_attach_and_detach(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_leaf_is_published_with_its_rows_and_a_detached_one_unpublished() {
    partitions_follow_attach_and_detach(false).await;
}
