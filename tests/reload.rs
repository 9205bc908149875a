//! Initial export and on-demand reloads against the real PostgreSQL and nats-server: under continuous
//! load, with and without a primary key, split across workers, and across crashes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const CATCH_UP: Duration = Duration::from_secs(120);

const DDL: &str = "
CREATE TABLE busy (id bigint PRIMARY KEY, v text, n numeric);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE TABLE empty_one (id int PRIMARY KEY, t timestamptz);
CREATE TABLE big (id bigint PRIMARY KEY, payload text);
";

async fn setup(db: &TestDb, big_rows: i64) {
    let c = db.client().await;
    c.batch_execute(DDL).await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO busy SELECT g, 'v' || g, g / 7.0 FROM generate_series(1, 5000) g;
         INSERT INTO nokey SELECT g % 100, 'dup ' || (g % 100) FROM generate_series(1, 3000) g;
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {big_rows}) g;
         CREATE PUBLICATION {} FOR TABLE busy, nokey, empty_one, big;",
        db.publication
    ))
    .await
    .unwrap();
}

/// Continuous inserts, updates (including key changes) and deletes on `busy` and `nokey` until stopped.
fn start_load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let c = connect(&url).await;
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = 100_000 + i;
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO busy VALUES ({id}, 'load {i}', {i});
                 UPDATE busy SET v = v || '+' WHERE id = {upd};
                 UPDATE busy SET id = id + 1000000 WHERE id = {mv};
                 DELETE FROM busy WHERE id = {del};
                 INSERT INTO nokey VALUES ({k}, 'load');
                 DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey WHERE a = {k2} LIMIT 1);
                 COMMIT;",
                upd = 1 + (i * 13) % 5000,
                mv = 1 + (i * 7) % 5000,
                del = 1 + (i * 31) % 5000,
                k = i % 50,
                k2 = (i + 25) % 100,
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i as u64
    })
}

async fn reloads_done(db: &TestDb, at_least: i64) {
    let c = db.client().await;
    for _ in 0..1200 {
        let (done, failed): (i64, i64) = c
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed') FROM cdc_egress.reloads",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, 0));
        assert_eq!(failed, 0, "a reload failed");
        if done >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {at_least} reloads finished in time");
}

/// Fresh start under load (an empty table, a large one), then an on-demand reload of a busy table and
/// of a table without a primary key while the load goes on: every table replays equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_start_and_reload_under_load_replay_equal() {
    let mut db = TestDb::new("reload").await;
    // ~2M rows (~150 MiB of heap): more than one part, so the ctid split across workers runs.
    setup(&db, 2_000_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(db.url.clone(), stop.clone());
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_RELOAD_INITIAL".into(), "true".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    reloads_done(&db, 4).await;
    // The load streams on after the initial export before the on-demand reload is asked for.
    let exported = db.current_lsn().await;
    db.wait_until(
        &format!(
            "SELECT count(*) > 0 FROM cdc_egress.files \
             WHERE kind = 'streaming' AND first_commit_lsn >= '{exported}'"
        ),
        CATCH_UP,
        &d,
    )
    .await;
    let (code, out, err) = run_cli(
        &["reload", "public.busy", "nokey", "--wait"],
        &env,
        db.dir.path(),
    );
    assert_eq!(code, 0, "reload --wait failed: {out}\n{err}");
    assert!(
        out.contains("reload of public.busy requested") && err.contains("all reloads done"),
        "{out}\n{err}"
    );
    // The load goes on until both reloaded tables have streaming batches after their new cuts.
    db.wait_until(
        "SELECT count(DISTINCT f.table_name) = 2 FROM cdc_egress.files f \
         JOIN (SELECT table_name, max(cut_lsn) AS cut FROM cdc_egress.reloads \
               WHERE status = 'done' AND table_name IN ('busy', 'nokey') GROUP BY table_name) r \
         USING (table_name) \
         WHERE f.kind = 'streaming' AND f.first_commit_lsn >= r.cut",
        CATCH_UP,
        &d,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let changes = load.await.unwrap();
    assert!(changes > 50, "the load ran ({changes} transactions)");
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");

    let c = db.client().await;
    // Streaming batches of a reloaded table start at or after its cut; batches before it end before.
    let rows = c
        .query(
            "SELECT f.first_commit_lsn >= r.cut_lsn OR f.last_commit_lsn < r.cut_lsn
             FROM cdc_egress.files f JOIN cdc_egress.reloads r USING (table_schema, table_name)
             WHERE f.kind = 'streaming' AND r.status = 'done'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "a streaming batch straddles a reload cut"
    );
    let modes: Vec<String> = c
        .query("SELECT DISTINCT mode FROM cdc_egress.tables", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(modes, vec!["streaming".to_string()]);
    let reloads: i64 = c
        .query_one(
            "SELECT count(*) FROM cdc_egress.reloads WHERE status = 'done'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reloads, 6, "4 initial + 2 requested");
    let notices = stream_count(&db.stream, &format!("{}.reload.>", db.prefix)).await;
    assert_eq!(notices, 6, "one reload notice per reload");
    let parts: i32 = c
        .query_one(
            "SELECT max(part) FROM cdc_egress.files WHERE kind = 'reload' AND table_name = 'big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        parts >= 2,
        "the large table was exported in {parts} part(s)"
    );
    let cuts = assert_replays_equal(&mut db, DDL, &["busy", "nokey", "empty_one", "big"]).await;
    assert_eq!(cuts.len(), 4);
    db.cleanup().await;
}

/// Bad requests change nothing and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_requests_are_refused() {
    let db = TestDb::new("badreload").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE pub (id int PRIMARY KEY); CREATE TABLE unpub (id int PRIMARY KEY);
         CREATE PUBLICATION {} FOR TABLE pub;",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let (code, _, err) = run_cli(&["migrate"], &env, db.dir.path());
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(&["reload", "public.nope"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("public.nope does not exist"), "{err}");
    let (code, _, err) = run_cli(&["reload", "public.unpub"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("not in publication"), "{err}");
    // The trigger refuses the plain-SQL form for an unpublished table too, and nothing is changed.
    let e = c
        .batch_execute("COMMENT ON SCHEMA cdc_egress IS 'cdc-egress reload public.unpub'")
        .await
        .unwrap_err();
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("not in publication"),
        "{e}"
    );
    let comment: Option<String> = c
        .query_one(
            "SELECT obj_description('cdc_egress'::regnamespace, 'pg_namespace')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        comment.is_none(),
        "the failed request left a comment: {comment:?}"
    );
    // A reload already active for the table.
    c.execute(
        "INSERT INTO cdc_egress.reloads (table_schema, table_name, status) VALUES ('public', 'pub', 'running')",
        &[],
    )
    .await
    .unwrap();
    let (code, _, err) = run_cli(&["reload", "pub"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("already running"), "{err}");
    // No event trigger (e.g. migrate ran without superuser): a clear error.
    c.batch_execute("DROP EVENT TRIGGER cdc_egress_reload_marker")
        .await
        .unwrap();
    c.execute("DELETE FROM cdc_egress.reloads", &[])
        .await
        .unwrap();
    let (code, _, err) = run_cli(&["reload", "pub"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("event trigger") && err.contains("superuser"),
        "{err}"
    );
    db.cleanup().await;
}

/// Kill -9 during an export and during the hand-over (after the registry commit, before the notice):
/// after a restart every table still replays equal, no reload is registered twice, and no partial
/// part is visible as complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_during_export_and_handover_recover() {
    let mut db = TestDb::new("reloadcrash").await;
    setup(&db, 300_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(db.url.clone(), stop.clone());
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_RELOAD_PARALLELISM".into(), "2".into()));
    env.push(("CDC_EGRESS_RELOAD_INITIAL".into(), "true".into()));
    // 1. Killed in the middle of the fresh-start export.
    let d = Daemon::start(&env, db.dir.path(), &[], "d1.log");
    db.wait_for_slot(&d).await;
    let c = db.client().await;
    for _ in 0..200 {
        let running: i64 = c
            .query_one(
                "SELECT count(*) FROM cdc_egress.reloads WHERE cut_lsn IS NOT NULL",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if running > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.kill().await;
    // 2. Killed right after a reload's registry commit (hand-over), via the failpoint.
    let d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_TEST_FAILPOINT", "after_reload_register")],
        "d2.log",
    );
    let status = d.wait_exit(Duration::from_secs(120)).await;
    assert!(!status.success());
    // 3. Run to completion.
    let d = Daemon::start(&env, db.dir.path(), &[], "d3.log");
    reloads_done(&db, 4).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());
    let dup: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT table_name FROM cdc_egress.reloads WHERE status = 'done' GROUP BY 1 HAVING count(*) > 1) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dup, 0, "a table was reloaded twice");
    let unnotified: i64 = c
        .query_one(
            "SELECT count(*) FROM cdc_egress.files WHERE notified_stream_seq IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unnotified, 0);
    // Every reload directory a listing reader can see holds a manifest, and only registered parts.
    let registered: Vec<String> = c
        .query(
            "SELECT object_path FROM cdc_egress.files WHERE kind = 'reload'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let out = db.dir.path().join("out");
    for t in [
        "public.busy",
        "public.nokey",
        "public.empty_one",
        "public.big",
    ] {
        let dir = out.join(t).join("reload");
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let files: Vec<String> = std::fs::read_dir(entry.path())
                .unwrap()
                .flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect();
            if files.iter().any(|f| f == "manifest.json") {
                for f in files.iter().filter(|f| f.starts_with("part-")) {
                    let rel = format!("{t}/reload/{}/{f}", entry.file_name().to_string_lossy());
                    assert!(
                        registered.contains(&rel),
                        "{rel} is visible but not registered"
                    );
                }
            }
        }
    }
    assert_replays_equal(&mut db, DDL, &["busy", "nokey", "empty_one", "big"]).await;
    db.cleanup().await;
}

/// A reload that cannot succeed (its table is dropped in the requesting transaction) ends `failed`
/// with its reason, and does not block the other table requested with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reload_is_visible_and_does_not_block_others() {
    let mut db = TestDb::new("reloadfail").await;
    setup(&db, 1000).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE doomed (id int PRIMARY KEY); INSERT INTO doomed VALUES (1);
         ALTER PUBLICATION {} ADD TABLE doomed;",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    // The plain-SQL form, in one transaction with the statement that makes the export impossible.
    c.batch_execute(
        "BEGIN;
         COMMENT ON SCHEMA cdc_egress IS 'cdc-egress reload public.doomed';
         COMMENT ON SCHEMA cdc_egress IS 'cdc-egress reload public.busy';
         DROP TABLE doomed;
         COMMIT;",
    )
    .await
    .unwrap();
    let mut states = Vec::new();
    for _ in 0..600 {
        states = c
            .query(
                "SELECT table_name, status, coalesce(error, '') FROM cdc_egress.reloads ORDER BY table_name",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
            .collect::<Vec<_>>();
        if states.len() == 2 && states.iter().all(|s| s.1 == "done" || s.1 == "failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(
        (states[0].0.as_str(), states[0].1.as_str()),
        ("busy", "done"),
        "{states:?}"
    );
    assert_eq!(
        (states[1].0.as_str(), states[1].1.as_str()),
        ("doomed", "failed"),
        "{states:?}"
    );
    assert!(
        states[1].2.contains("does not exist"),
        "the reason is recorded: {states:?}"
    );
    let (code, out, _) = run_cli(&["status"], &env, db.dir.path());
    assert_eq!(code, 0);
    assert!(
        out.contains("failed") && out.contains("does not exist"),
        "status shows it:\n{out}"
    );
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());
    // `busy` was reloaded (the fresh-start export is off here, so it is the only exported table).
    assert_replays_equal(&mut db, DDL, &["busy"]).await;
    db.cleanup().await;
}
