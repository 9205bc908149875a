//! The consumers (README "Loading into PostgreSQL: apply" and "Verifying: verify"), end to end on
//! the real PostgreSQL, NATS and files: `verify` is equal on a healthy run and names the tables and
//! keys when the output is damaged, `--repair` mends it; `apply` survives kill -9 in the middle of
//! a file, resumes without applying anything twice, follows schema changes and new batches.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const CATCH_UP: Duration = Duration::from_secs(120);

const SETUP: &str = "
    CREATE TABLE public.t (id int PRIMARY KEY, v text, n numeric(10,2));
    CREATE TABLE public.k (a text, b int);
    ALTER TABLE public.k REPLICA IDENTITY FULL;
    CREATE TABLE public.ri (id int PRIMARY KEY, email text NOT NULL, v text);
    CREATE UNIQUE INDEX ri_email ON public.ri (email);
    ALTER TABLE public.ri REPLICA IDENTITY USING INDEX ri_email;
    CREATE TABLE public.r (id int PRIMARY KEY, v text);
";

async fn setup(db: &TestDb) -> Client {
    let c = db.client().await;
    c.batch_execute(SETUP).await.unwrap();
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE public.t, public.k, public.ri, public.r",
        db.publication
    ))
    .await
    .unwrap();
    c
}

/// The `n`th streaming file of `table` (from 0): (id, object path).
async fn nth_file(c: &Client, table: &str, n: i64) -> (i64, String) {
    let r = c
        .query_one(
            "SELECT id, object_path FROM cdc_egress.files WHERE kind = 'streaming' AND table_name = $1 \
             ORDER BY id OFFSET $2 LIMIT 1",
            &[&table, &n],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Rewrites a stored file with `edit` applied to its CSV text, and registers the new checksum (as
/// if the daemon had written it that way).
async fn damage(db: &TestDb, c: &Client, id: i64, object: &str, edit: impl Fn(String) -> String) {
    let path = db.dir.path().join("out").join(object);
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let changed = edit(text.clone());
    assert_ne!(changed, text, "the edit changed nothing in {object}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(changed.as_bytes()).unwrap();
    let data = gz.finish().unwrap();
    std::fs::write(&path, &data).unwrap();
    use sha2::Digest;
    let sum = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
    c.execute(
        "UPDATE cdc_egress.files SET checksum = $2 WHERE id = $1",
        &[&id, &sum],
    )
    .await
    .unwrap();
}

fn verify_json(env: &[(String, String)], cwd: &std::path::Path) -> (i32, serde_json::Value) {
    let (code, out, err) = run_cli(&["verify", "--json", "--samples", "20"], env, cwd);
    let json = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}), exit {code}:\n{out}\n{err}"));
    (code, json)
}

fn table<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_is_equal_on_a_healthy_run_names_the_keys_of_damaged_files_and_repairs_them() {
    let db = TestDb::new("verify").await;
    let c = setup(&db).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    // Three transactions, each sealed into files of its own before the next.
    c.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, 'a' || g, g * 1.5 FROM generate_series(1, 10) g; \
         INSERT INTO k SELECT 'k' || g, g FROM generate_series(1, 6) g; INSERT INTO k VALUES ('k1', 1); COMMIT",
    )
    .await
    .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    c.batch_execute("INSERT INTO t SELECT g, 'b' || g, g FROM generate_series(11, 20) g")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    c.batch_execute(
        "UPDATE t SET v = 'updated' WHERE id IN (2, 3); DELETE FROM t WHERE id = 4; \
         UPDATE k SET b = 100 WHERE a = 'k2'; DELETE FROM k WHERE a = 'k3'",
    )
    .await
    .unwrap();
    db.wait_caught_up(CATCH_UP).await;

    let (code, report) = verify_json(&env, db.dir.path());
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["equal"], true);
    assert_eq!(table(&report, "public.t")["source_rows"], 19);
    assert_eq!(table(&report, "public.t")["matched_by"], "key (id)");
    assert_eq!(table(&report, "public.k")["source_rows"], 6);
    assert_eq!(table(&report, "public.k")["matched_by"], "whole row");
    // The scratch schemas are gone.
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'cdc_egress_verify_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // Damage the output: a value of t's first file changed, k's duplicate row changed, and the
    // second file of t lost.
    let (id1, t1) = nth_file(&c, "t", 0).await;
    damage(&db, &c, id1, &t1, |s| s.replace("\"a5\"", "\"XX\"")).await;
    let (idk, k1) = nth_file(&c, "k", 0).await;
    damage(&db, &c, idk, &k1, |s| {
        s.replacen("\"k5\"", "\"k5 changed\"", 1)
    })
    .await;
    let (_, t2) = nth_file(&c, "t", 1).await;
    std::fs::remove_file(db.dir.path().join("out").join(&t2)).unwrap();

    let (code, report) = verify_json(&env, db.dir.path());
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["equal"], false);
    let t = table(&report, "public.t");
    assert_eq!(t["different"], 1, "{t:#}");
    assert_eq!(t["missing"], 10, "{t:#}");
    assert_eq!(t["extra"], 0, "{t:#}");
    let samples: Vec<&str> = t["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(samples.contains(&"different (5)"), "{samples:?}");
    assert!(samples.contains(&"missing (11)"), "{samples:?}");
    let k = table(&report, "public.k");
    assert_eq!(
        (k["missing"].as_u64(), k["extra"].as_u64()),
        (Some(1), Some(1)),
        "{k:#}"
    );
    assert!(
        report["applied"]["unusable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u.as_str().unwrap().contains(&t2)),
        "{report:#}"
    );
    // The text form names the same.
    let (code, text, _) = run_cli(&["verify"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(
        text.contains("DIFFERENT") && text.contains("different (5)"),
        "{text}"
    );

    // --repair reloads what differs; the reloads supersede the damaged files.
    let (code, _, err) = run_cli(&["verify", "--repair"], &env, db.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("reload of public.t requested"), "{err}");
    assert!(err.contains("reload of public.k requested"), "{err}");
    db.wait_until(
        "SELECT count(*) = 2 FROM cdc_egress.reloads WHERE status = 'done'",
        CATCH_UP,
        &d,
    )
    .await;
    let (code, report) = verify_json(&env, db.dir.path());
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["applied"]["reloads_loaded"], 2);

    // Not caught up: with the daemon stopped, the position is never confirmed.
    assert!(d.stop().await.success());
    let (code, out, err) = run_cli(&["verify", "--wait", "1s"], &env, db.dir.path());
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(err.contains("not caught up"), "{err}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_resumes_after_kill_9_mid_file_with_nothing_twice_and_follows() {
    let mut db = TestDb::new("apply").await;
    let c = setup(&db).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    c.batch_execute(
        "INSERT INTO t SELECT g, 'v' || g, g / 3.0 FROM generate_series(1, 2000) g; \
         INSERT INTO k SELECT 'k' || (g % 50), g % 7 FROM generate_series(1, 300) g",
    )
    .await
    .unwrap();
    c.batch_execute("UPDATE t SET v = NULL WHERE id % 10 = 0; DELETE FROM k WHERE b = 3")
        .await
        .unwrap();
    // A replica identity other than the primary key: changes are found by the identity's columns.
    c.batch_execute(
        "INSERT INTO ri SELECT g, 'e' || g, 'x' FROM generate_series(1, 20) g; \
         UPDATE ri SET email = 'moved' || id WHERE id <= 5; UPDATE ri SET v = 'y' WHERE id > 15; \
         DELETE FROM ri WHERE id IN (2, 18); INSERT INTO r VALUES (1, 'one'), (2, 'two')",
    )
    .await
    .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    let target_url = db.extra_db("target").await;
    let target = connect(&target_url).await;
    let apply = |extra: &[(String, String)]| {
        let mut env = env.clone();
        env.extend(extra.iter().cloned());
        run_cli(&["apply", "--into", &target_url], &env, db.dir.path())
    };
    let same = async |what: &str| {
        for q in [
            "SELECT id, v, n FROM t",
            "SELECT a, b FROM k",
            "SELECT id, email, v FROM ri",
        ] {
            assert_eq!(
                query_rows(&target, q).await,
                query_rows(&c, q).await,
                "{q} differs {what}"
            );
        }
    };

    // Killed with half of the first file's rows applied: nothing of it stays.
    let (code, _, err) = apply(&[("CDC_EGRESS_TEST_FAILPOINT".into(), "apply_mid_file".into())]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("failpoint apply_mid_file reached"), "{err}");
    let left: bool = target
        .query_one(
            "SELECT to_regclass('public.t') IS NOT NULL OR to_regclass('public.k') IS NOT NULL \
             OR EXISTS (SELECT 1 FROM cdc_egress_apply.progress WHERE last_file_id > 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!left, "the killed apply left a table or progress");
    let (code, out, err) = apply(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    same("after the resumed apply").await;
    // Applying again applies nothing (no row twice).
    let (code, out, _) = apply(&[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("applied 0 streaming files (0 rows)"),
        "{out}"
    );
    same("after a second apply").await;

    // A target loading one table follows it through a rename, and keeps its table list.
    let only_url = db.extra_db("only_r").await;
    let only = connect(&only_url).await;
    let apply_r = |tables: &[&str]| {
        let mut args = vec!["apply", "--into", only_url.as_str()];
        args.extend_from_slice(tables);
        run_cli(&args, &env, db.dir.path())
    };
    assert_eq!(apply_r(&["public.r"]).0, 0);
    c.batch_execute("ALTER TABLE r RENAME TO r2; INSERT INTO r2 VALUES (3, 'three')")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    let (code, out, err) = apply_r(&["public.r"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        query_rows(&only, "SELECT id, v FROM r2").await,
        query_rows(&c, "SELECT id, v FROM r2").await
    );
    let tables: i64 = only
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "only r (now r2) is loaded there");
    let (code, _, err) = apply_r(&["public.t"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("this target loads public.r, public.r2"),
        "{err}"
    );

    // Schema changes and new rows, followed by a running loader.
    let follower = {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdc-egress"));
        cmd.args([
            "apply",
            "--into",
            &target_url,
            "--follow",
            "--poll",
            "200ms",
        ])
        .current_dir(db.dir.path())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(db.dir.path().join("follow.log")).unwrap());
        for (k, _) in std::env::vars() {
            if k.starts_with("CDC_EGRESS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().cloned());
        cmd.spawn().unwrap()
    };
    c.batch_execute(
        "ALTER TABLE t ADD COLUMN w int; ALTER TABLE t RENAME COLUMN v TO v2; \
         INSERT INTO t VALUES (5000, 'new', 1, 7); UPDATE t SET w = 1 WHERE id < 100; \
         INSERT INTO k VALUES ('late', 1); \
         ALTER TABLE t DROP COLUMN n, ADD COLUMN n numeric(10,2); UPDATE t SET n = 2 WHERE id = 1",
    )
    .await
    .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    let source = &c;
    let target = &target;
    wait_until(
        "the follower to apply the new rows",
        CATCH_UP,
        || std::fs::read_to_string(db.dir.path().join("follow.log")).unwrap_or_default(),
        async || {
            for q in ["SELECT id, v2, n, w FROM t", "SELECT a, b FROM k"] {
                let ok = match target
                    .query(&format!("SELECT q::text FROM ({q}) q ORDER BY 1"), &[])
                    .await
                {
                    Ok(_) => query_rows(target, q).await == query_rows(source, q).await,
                    Err(_) => false,
                };
                if !ok {
                    return false;
                }
            }
            true
        },
    )
    .await;
    drop(follower);
    assert_eq!(
        query_rows(target, "SELECT a, b FROM k").await,
        query_rows(source, "SELECT a, b FROM k").await
    );
    assert!(d.stop().await.success());
    db.cleanup().await;
}
