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

/// The number of reloads that finished.
async fn done_reloads(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM cdc_egress.reloads WHERE status = 'done'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
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
    let reloads = done_reloads(&c).await;
    assert_eq!(reloads, 6, "4 initial + 2 requested");
    let notices = stream_count(&db.stream, &format!("{}.*.reload.>", db.prefix)).await;
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
            .contains("not in any publication"),
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
        "INSERT INTO cdc_egress.reloads (table_schema, table_name, status, source) \
         VALUES ('public', 'pub', 'running', $1)",
        &[&db.slot],
    )
    .await
    .unwrap();
    let (code, _, err) = run_cli(&["reload", "pub"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("already running"), "{err}");
    c.execute("DELETE FROM cdc_egress.reloads", &[])
        .await
        .unwrap();
    // A trigger function of a version before source names (it would skip a comment naming one, and
    // the request would silently never reach a daemon): refused until migrate refreshes it.
    let function = "cdc_egress.reload_marker()";
    let current: String = c
        .query_one(
            &format!("SELECT pg_get_functiondef('{function}'::regprocedure)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.batch_execute(&current.replace(" source=", " origin="))
        .await
        .unwrap();
    let (code, _, err) = run_cli(&["reload", "pub"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("older cdc-egress") && err.contains("migrate"),
        "{err}"
    );
    c.batch_execute(&current).await.unwrap();
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
        let (schema, name) = t.split_once('.').unwrap();
        let dir = out.join(&db.slot).join(schema).join(name).join("reload");
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let files: Vec<String> = std::fs::read_dir(entry.path())
                .unwrap()
                .flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect();
            if files.iter().any(|f| f == "manifest.json") {
                for f in files.iter().filter(|f| f.starts_with("part-")) {
                    let rel = format!(
                        "{}/{schema}/{name}/reload/{}/{f}",
                        db.slot,
                        entry.file_name().to_string_lossy()
                    );
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

/// The source table of the publication tests: `secret` is never published, nor is any row outside
/// `'eu'`. `region` is part of the primary key, so the row filter only reads replica-identity columns
/// (PostgreSQL requires it for a publication of UPDATE and DELETE).
const PUB_DDL: &str = "
CREATE TABLE t (id int, gone int, region text, v text, secret text, PRIMARY KEY (id, region));
ALTER TABLE t DROP COLUMN gone;
";
/// The replay target: the published columns only.
const PUB_REPLAY_DDL: &str =
    "CREATE TABLE t (id int, region text, v text, PRIMARY KEY (id, region));";
/// What the publication shows of `t`.
const PUB_SHOWN: &str = "SELECT id, region, v FROM t WHERE region = 'eu'";

/// One round of changes on `t` touching ids in `base+1 ..= base+600` (and new ids above 10000),
/// covering each way pgoutput's row filter treats a change: inserts inside and outside the filter,
/// updates that stay inside (one only of the hidden column), enter it (sent as INSERT), leave it
/// (sent as DELETE) or stay outside (not sent), and deletes inside and outside.
async fn publication_changes(c: &tokio_postgres::Client, base: i32) {
    c.batch_execute(&format!(
        "INSERT INTO t SELECT g, (ARRAY['eu','us','ap'])[1 + g % 3], 'new ' || g, 'classified-new-' || g
           FROM generate_series({base} + 10001, {base} + 10090) g;
         UPDATE t SET v = v || '+', secret = secret || '+' WHERE region = 'eu' AND id BETWEEN {base} + 1 AND {base} + 100;
         UPDATE t SET secret = 'classified-changed' WHERE region = 'eu' AND id BETWEEN {base} + 101 AND {base} + 200;
         UPDATE t SET region = 'eu' WHERE region = 'us' AND id BETWEEN {base} + 201 AND {base} + 300;
         UPDATE t SET region = 'ap' WHERE region = 'eu' AND id BETWEEN {base} + 301 AND {base} + 400;
         UPDATE t SET v = v || '?' WHERE region = 'ap' AND id BETWEEN {base} + 401 AND {base} + 500;
         DELETE FROM t WHERE id BETWEEN {base} + 501 AND {base} + 600;"
    ))
    .await
    .unwrap();
}

/// The header and records of a gzipped CSV file.
fn read_gz_csv(path: &std::path::Path) -> (Vec<String>, Vec<Vec<String>>) {
    let file = std::fs::File::open(path).unwrap();
    let mut r = csv::Reader::from_reader(flate2::read::GzDecoder::new(file));
    let header = r.headers().unwrap().iter().map(str::to_string).collect();
    let records = r
        .records()
        .map(|rec| rec.unwrap().iter().map(str::to_string).collect())
        .collect();
    (header, records)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A publication with a column list and a row filter (PostgreSQL 15+): the initial export, the
/// streaming changes and an on-demand reload show only its columns and rows. No object holds the
/// hidden column's name or values, reload parts hold only `'eu'` rows, their header is the table
/// part of the streaming header, one schema fingerprint serves both, and the replay equals what the
/// publication shows of the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_honour_the_publication_column_list_and_row_filter() {
    let mut db = TestDb::new("pubfilter").await;
    let c = db.client().await;
    c.batch_execute(PUB_DDL).await.unwrap();
    c.batch_execute(&format!(
        // Some values span lines: a part's registered row count is records, not lines.
        "INSERT INTO t SELECT g, (ARRAY['eu','us','ap'])[1 + g % 3],
                'v' || g || CASE WHEN g % 7 = 0 THEN E'\\nsecond line\\r\\n' ELSE '' END,
                'classified-' || md5(g::text)
           FROM generate_series(1, 3000) g;
         CREATE PUBLICATION {} FOR TABLE t (id, region, v) WHERE (region = 'eu');",
        db.publication
    ))
    .await
    .unwrap();
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_RELOAD_INITIAL".into(), "true".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    reloads_done(&db, 1).await;
    publication_changes(&c, 0).await;
    db.wait_until(
        "SELECT count(*) > 0 FROM cdc_egress.files WHERE kind = 'streaming' AND table_name = 't'",
        CATCH_UP,
        &d,
    )
    .await;
    let (code, out, err) = run_cli(&["reload", "t", "--wait"], &env, db.dir.path());
    assert_eq!(code, 0, "reload --wait failed: {out}\n{err}");
    publication_changes(&c, 1000).await;
    db.wait_until(
        "SELECT count(*) > 0 FROM cdc_egress.files f \
         WHERE f.kind = 'streaming' AND f.table_name = 't' AND f.first_commit_lsn >= \
               (SELECT max(cut_lsn) FROM cdc_egress.reloads WHERE status = 'done')",
        CATCH_UP,
        &d,
    )
    .await;
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");

    let reloads = done_reloads(&c).await;
    assert_eq!(reloads, 2, "the initial export and the requested reload");
    // (a) Nothing written anywhere names the hidden column or holds one of its values.
    let hidden = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.contains("secret") || text.contains("classified")
    };
    let files = files_under(&db.dir.path().join("out"));
    assert!(files.len() > 6, "{files:?}");
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        if f.extension().is_some_and(|e| e == "gz") {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut plain)
                .unwrap();
            bytes = plain;
        }
        assert!(!hidden(&bytes), "{} exposes the hidden column", f.display());
    }
    for table in ["files", "tables", "reloads"] {
        let row: String = c
            .query_one(
                &format!("SELECT coalesce(string_agg(x::text, ' '), '') FROM cdc_egress.{table} x"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!hidden(row.as_bytes()), "registry {table}: {row}");
    }
    // (b) Reload parts hold the published columns of 'eu' rows only; (c) their header is the table
    // part of every streaming file's header.
    let published = ["id", "region", "v"];
    let (mut part_rows, mut streaming_ops) = (0, std::collections::BTreeSet::new());
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        if name.starts_with("part-") {
            let (header, records) = read_gz_csv(f);
            assert_eq!(header, published, "{}", f.display());
            for r in &records {
                assert_eq!(r[1], "eu", "{}: {r:?}", f.display());
            }
            part_rows += records.len();
            let registered: i64 = c
                .query_one(
                    "SELECT row_count FROM cdc_egress.files WHERE object_path = $1 OR object_path LIKE '%/' || $1",
                    &[&f
                        .strip_prefix(db.dir.path().join("out"))
                        .unwrap()
                        .to_string_lossy()
                        .to_string()],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(registered, records.len() as i64, "{}", f.display());
        } else if name == "data.csv.gz" {
            let (header, records) = read_gz_csv(f);
            let meta = cdc_egress::core::encode::csv::METADATA_COLUMNS;
            assert_eq!(header[..meta.len()], meta, "{}", f.display());
            assert_eq!(header[meta.len()..], published, "{}", f.display());
            streaming_ops.extend(records.iter().map(|r| r[0].clone()));
        }
    }
    assert!(
        part_rows >= 1000 * 2 - 200,
        "{part_rows} rows in reload parts"
    );
    // Updates that left the filter came as deletes, those that entered it as inserts.
    assert_eq!(
        streaming_ops.into_iter().collect::<Vec<_>>(),
        ["D", "I", "U"]
    );
    // One fingerprint for streaming and reload files: no schema version was bumped.
    let (fingerprints, versions): (i64, i64) = c
        .query_one(
            "SELECT count(DISTINCT schema_fingerprint), count(DISTINCT schema_version) FROM cdc_egress.files WHERE table_name = 't'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((fingerprints, versions), (1, 1));
    // (d) The replay is what the publication shows of the source.
    assert_replays_equal_to(&mut db, PUB_REPLAY_DDL, &[("t", PUB_SHOWN)]).await;
    db.cleanup().await;
}

/// For publications of several shapes, what the export selects of each table the publication lists
/// equals what pgoutput itself sends for it (read through `pg_logical_slot_peek_binary_changes`
/// and our decoder): the Relation message's columns (names, types, typmods, order) and the rows
/// of the Insert messages. The shapes combine entries the way PostgreSQL's rules make interesting:
/// a column list and a row filter, a schema entry next to an explicit filter (no filter applies),
/// FOR ALL TABLES, a dropped and a generated column, and partitions with and without
/// `publish_via_partition_root` (the root's list and filter, or each partition's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_select_what_pgoutput_sends() {
    use cdc_egress::core::decode::{decode, Message, Value};
    use cdc_egress::reload::export::describe;
    use cdc_egress::table::{quote_ident, TableName};
    use std::collections::{BTreeMap, BTreeSet};

    let db = TestDb::new("pubshapes").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE SCHEMA s;
         CREATE TABLE s.t (id int, gone int, region text, v varchar(20), secret text, PRIMARY KEY (id, region));
         ALTER TABLE s.t DROP COLUMN gone;
         CREATE TABLE s.other (id int PRIMARY KEY, n numeric(8,2));
         CREATE TABLE pt (id int, region text, x text, hidden text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE pt_eu PARTITION OF pt FOR VALUES IN ('eu');
         CREATE TABLE pt_us PARTITION OF pt FOR VALUES IN ('us');
         CREATE TABLE g (id int PRIMARY KEY, twice int GENERATED ALWAYS AS (id * 2) STORED, note text);",
    )
    .await
    .unwrap();
    let mut shapes = vec![
        (
            "list_filter",
            "FOR TABLE s.t (id, region, v) WHERE (region = 'eu')",
        ),
        (
            "schema_and_filter",
            "FOR TABLES IN SCHEMA s, TABLE s.t WHERE (region = 'eu')",
        ),
        ("all", "FOR ALL TABLES"),
        (
            "all_root",
            "FOR ALL TABLES WITH (publish_via_partition_root)",
        ),
        ("plain", "FOR TABLE s.t, g"),
        (
            "root",
            "FOR TABLE pt (id, region, x) WHERE (id % 2 = 0) WITH (publish_via_partition_root)",
        ),
        (
            "root_and_leaf",
            "FOR TABLE pt (id, region) WHERE (id > 3), pt_eu (id, region, x) WHERE (id < 5) \
             WITH (publish_via_partition_root)",
        ),
        (
            "leaves",
            "FOR TABLE pt, pt_eu (id, region) WHERE (id % 3 = 0)",
        ),
    ];
    let version: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version >= 180000 {
        // 18 publishes stored generated columns on request, or when a column list names them.
        shapes.push((
            "generated",
            "FOR TABLE g WITH (publish_generated_columns = stored)",
        ));
        shapes.push(("generated_list", "FOR TABLE g (id, twice)"));
    }
    // (A column list next to FOR TABLES IN SCHEMA is refused by PostgreSQL 15 to 18.)
    for &(name, spec) in &shapes {
        c.batch_execute(&format!("CREATE PUBLICATION p_{name} {spec}"))
            .await
            .unwrap();
    }
    // A temporary slot of this session: the changes below are what pgoutput decodes.
    let slot = format!("{}_oracle", db.slot);
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', true)",
        &[&slot],
    )
    .await
    .unwrap();
    c.batch_execute(
        "INSERT INTO s.t SELECT g, (ARRAY['eu','us','ap'])[1 + g % 3], 'v' || g, 'classified-' || g FROM generate_series(1, 30) g;
         INSERT INTO s.other SELECT g, g / 4.0 FROM generate_series(1, 5) g;
         INSERT INTO pt SELECT g, (ARRAY['eu','us'])[1 + g % 2], 'x' || g, 'hidden-' || g FROM generate_series(1, 20) g;
         INSERT INTO g (id, note) SELECT g, 'n' || g FROM generate_series(1, 5) g;",
    )
    .await
    .unwrap();
    type Rows = BTreeSet<Vec<Option<String>>>;
    /// Per table: its columns (name, type OID, typmod) and its rows as text.
    type Shown = BTreeMap<TableName, (Vec<(String, u32, i32)>, Rows)>;
    for (name, _) in shapes {
        let publication = format!("p_{name}");
        // What pgoutput sends: per relation, its columns and its inserted rows.
        let mut sent: Shown = BTreeMap::new();
        let mut relations = BTreeMap::new();
        for r in c
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                 'proto_version', '1', 'publication_names', $2)",
                &[&slot, &quote_ident(&publication)],
            )
            .await
            .unwrap()
        {
            match decode(bytes::Bytes::from(r.get::<_, Vec<u8>>(0))).unwrap() {
                Message::Relation(rel) => {
                    let table = TableName::new(rel.namespace.clone(), rel.name.clone());
                    let columns = rel
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                        .collect();
                    sent.entry(table.clone()).or_default().0 = columns;
                    relations.insert(rel.oid, table);
                }
                Message::Insert(i) => {
                    let row = i
                        .new
                        .0
                        .iter()
                        .map(|v| match v {
                            Value::Text(t) => Some(String::from_utf8(t.to_vec()).unwrap()),
                            Value::Null => None,
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    sent.get_mut(&relations[&i.relation_oid])
                        .unwrap()
                        .1
                        .insert(row);
                }
                _ => {}
            }
        }
        // With publish_via_partition_root pgoutput describes the partition too before a change is
        // sent as its root: only relations that changes were sent as count.
        sent.retain(|_, (_, rows)| !rows.is_empty());
        // What the export selects of every table the publication lists.
        let mut exported: Shown = BTreeMap::new();
        for r in c
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await
            .unwrap()
        {
            let table = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let planned = describe(&c, &publication, &table).await.unwrap();
            let columns: Vec<(String, u32, i32)> = planned
                .schema
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                .collect();
            let select = format!(
                "SELECT ARRAY[{}] FROM {} WHERE {}",
                planned
                    .schema
                    .columns
                    .iter()
                    .map(|c| format!("{}::text", quote_ident(&c.name)))
                    .collect::<Vec<_>>()
                    .join(", "),
                table.quoted(),
                planned.row_filter.as_deref().unwrap_or("true")
            );
            let rows: Rows = c
                .query(&select, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            // pgoutput describes a relation only before a change sent as it.
            if !rows.is_empty() {
                exported.insert(table, (columns, rows));
            }
        }
        assert_eq!(exported, sent, "publication {publication}");
    }
    // A table the publication does not publish is refused, not exported whole.
    let e = describe(&c, "p_plain", &TableName::new("s", "other"))
        .await
        .err()
        .expect("not published");
    assert!(e.to_string().contains("not in publication"), "{e}");
    c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    db.cleanup().await;
}
