//! Several daemons sharing one registry schema, one output prefix and one JetStream stream, each under
//! its own `source.name` (README "Running several daemons"): two slots of one database through
//! kill -9 and a reload, daemons of one database starting at the same moment, two databases with the
//! same table names (and the same slot name) plus daemons refused a name they do not own, and table
//! names that only differ in where the dot is.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const CATCH_UP: Duration = Duration::from_secs(90);

async fn confirmed(c: &Client, slot: &str) -> Option<cdc_egress::lsn::Lsn> {
    c.query_opt(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .and_then(|r| r.get::<_, Option<String>>(0))
    .and_then(|s| s.parse().ok())
}

/// Waits until `cond` holds; fails at once, with the log, when the daemon `d` exits meanwhile.
async fn wait_while_running(d: &mut Daemon, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let log = d.log.clone();
    let child = &mut d.child;
    wait_until(
        what,
        CATCH_UP,
        || std::fs::read_to_string(&log).unwrap_or_default(),
        async || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the daemon exited ({status}) while waiting for {what}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            cond().await
        },
    )
    .await;
}

/// Waits until `slot` (on the server of `url`) exists; fails at once when `d` exits meanwhile.
async fn wait_for_slot(url: &str, slot: &str, d: &mut Daemon) {
    let c = connect(url).await;
    wait_while_running(d, &format!("the slot {slot} to appear"), async || {
        confirmed(&c, slot).await.is_some()
    })
    .await;
}

/// Waits until `slot` has confirmed everything written to its server so far.
async fn wait_slot_caught_up(url: &str, slot: &str, d: &Daemon) {
    let c = connect(url).await;
    let target: cdc_egress::lsn::Lsn = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    let seen = std::cell::Cell::new(None);
    wait_until(
        &format!("slot {slot} to confirm {target}"),
        CATCH_UP,
        || format!("the slot was last at {:?}\n{}", seen.get(), d.log_tail()),
        async || {
            seen.set(confirmed(&c, slot).await);
            seen.get().is_some_and(|l| l >= target)
        },
    )
    .await;
}

/// Registry rows of `files` of one source (0 while the registry does not exist yet).
async fn files_of(reg: &Client, source: &str) -> i64 {
    reg.query_one(
        "SELECT count(*) FROM cdc_egress.files WHERE source = $1",
        &[&source],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// Waits until `source` has registered more than `than` files; fails at once when `d` exits.
async fn wait_files_past(reg: &Client, source: &str, than: i64, d: &mut Daemon) {
    let what = format!("source {source} to register a file past {than}");
    wait_while_running(d, &what, async || files_of(reg, source).await > than).await;
}

/// One `SELECT count(*)` with parameters.
async fn count(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    c.query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Every object below `dir` as a listing of a `file://` store shows it: paths relative to `dir`
/// (with `/` separators), without the staging files of interrupted writes.
fn files_below(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                walk(base, &p, out);
            } else if name
                .rsplit_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                // `<name>#<n>`: object_store's local staging file of a put that a crash cut short;
                // no listing shows it (a name's own `#` is encoded as `%23`).
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The names in directory `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Checks the objects of one source's directory `<out>/<source>`: besides its owner file (naming
/// `slot`), only `<schema>/<table>/streaming/<date>/<batch>/` and `<schema>/<table>/reload/<id>/`
/// directories of the `tables` given as `(schema segment, table segment, schema, table)`, each
/// complete (data or parts, `schema.yml` and `manifest.json` together, nothing else) and naming its
/// own source and table inside. Returns the batch and reload directories, relative to `out`.
fn check_source_dir(
    out: &Path,
    source: &str,
    slot: &str,
    tables: &[(&str, &str, &str, &str)],
) -> BTreeSet<String> {
    let dir = out.join(source);
    let owner: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cdc-egress-owner.json")).unwrap()).unwrap();
    assert_eq!(
        owner["slot"], slot,
        "owner file of source {source}: {owner}"
    );
    let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in files_below(&dir) {
        if f == "cdc-egress-owner.json" {
            continue;
        }
        let (d, name) = f.rsplit_once('/').unwrap();
        grouped
            .entry(format!("{source}/{d}"))
            .or_default()
            .push(name.to_string());
    }
    let mut complete = BTreeSet::new();
    for (d, mut names) in grouped {
        names.sort();
        let segs: Vec<&str> = d.split('/').collect();
        assert!(
            segs.len() >= 4,
            "unexpected object directory {d}: {names:?}"
        );
        let Some((_, _, schema, table)) = tables
            .iter()
            .find(|(a, b, _, _)| *a == segs[1] && *b == segs[2])
        else {
            panic!("{d} is the directory of a table that is not source {source}'s: {names:?}");
        };
        match segs[3] {
            "streaming" => {
                assert_eq!(segs.len(), 6, "streaming batch directory {d}");
                assert_eq!(
                    names,
                    vec!["data.csv.gz", "manifest.json", "schema.yml"],
                    "batch directory {d} is incomplete or holds strangers"
                );
            }
            "reload" => {
                assert_eq!(segs.len(), 5, "reload directory {d}");
                assert!(
                    names.contains(&"manifest.json".to_string())
                        && names.contains(&"schema.yml".to_string())
                        && names.iter().any(|n| n.starts_with("part-")),
                    "reload directory {d} is incomplete: {names:?}"
                );
                assert!(
                    names.iter().all(|n| n == "manifest.json"
                        || n == "schema.yml"
                        || (n.starts_with("part-") && n.ends_with(".csv.gz"))),
                    "reload directory {d} holds strangers: {names:?}"
                );
            }
            other => panic!("unexpected directory {d} ({other})"),
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(&d).join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["source"], source, "{d}/manifest.json: {manifest}");
        assert_eq!(manifest["schema"], *schema, "{d}/manifest.json: {manifest}");
        assert_eq!(
            manifest["table_name"], *table,
            "{d}/manifest.json: {manifest}"
        );
        let yml: serde_yaml::Value =
            serde_yaml::from_slice(&std::fs::read(out.join(&d).join("schema.yml")).unwrap())
                .unwrap();
        assert_eq!(yml["schema"].as_str(), Some(*schema), "{d}/schema.yml");
        assert_eq!(yml["table"].as_str(), Some(*table), "{d}/schema.yml");
        complete.insert(d);
    }
    complete
}

/// Every object path the registry names exists below `out`, lies in its source's directory, and
/// the data, schema and manifest of a row are in one directory. Returns the registered directories.
async fn check_registered_objects(reg: &Client, out: &Path) -> BTreeSet<String> {
    let rows = reg
        .query(
            "SELECT source, kind, object_path, schema_path, manifest_path, batch_id FROM cdc_egress.files",
            &[],
        )
        .await
        .unwrap();
    let mut dirs = BTreeSet::new();
    for r in rows {
        let (source, kind, object, batch_id): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(5));
        let dir = |p: &str| p.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap();
        for p in [Some(object.clone()), r.get(3), r.get(4)]
            .into_iter()
            .flatten()
        {
            assert!(
                out.join(&p).is_file(),
                "registered object {p} (source {source}) is not in the store"
            );
            assert!(
                p.starts_with(&format!("{source}/")),
                "registered object {p} is outside the directory of its source {source}"
            );
            assert_eq!(
                dir(&p),
                dir(&object),
                "{p} and {object} in different directories"
            );
        }
        assert!(
            batch_id.starts_with(&format!("{source}/")),
            "batch id {batch_id} of source {source}"
        );
        if kind == "streaming" {
            assert_eq!(
                dir(&object),
                batch_id,
                "a streaming batch id is its directory"
            );
        }
        dirs.insert(dir(&object));
    }
    dirs
}

/// Notices of `source` on `<prefix>.<source>.batch.>` and `.reload.>` equal its registry rows: one
/// per streaming file, one per reload; and no row is left unnotified.
async fn check_notices(reg: &Client, stream: &str, prefix: &str, source: &str) {
    let streaming = count(
        reg,
        "SELECT count(*) FROM cdc_egress.files WHERE source = $1 AND kind = 'streaming'",
        &[&source],
    )
    .await;
    assert!(
        streaming > 0,
        "source {source} registered no streaming file"
    );
    let notices = stream_count(stream, &format!("{prefix}.{source}.batch.>")).await;
    assert_eq!(
        notices, streaming as u64,
        "source {source}: one batch notice per streaming file row"
    );
    let reloads = count(
        reg,
        "SELECT count(DISTINCT reload_id) FROM cdc_egress.files WHERE source = $1 AND kind = 'reload'",
        &[&source],
    )
    .await;
    let notices = stream_count(stream, &format!("{prefix}.{source}.reload.>")).await;
    assert_eq!(
        notices, reloads as u64,
        "source {source}: one reload notice per registered reload"
    );
    let unnotified = count(
        reg,
        "SELECT count(*) FROM cdc_egress.files WHERE source = $1 AND notified_stream_seq IS NULL",
        &[&source],
    )
    .await;
    assert_eq!(unnotified, 0, "source {source} left rows unnotified");
}

// ---------------------------------------------------------------------------------------------
// 1. Two slots of one database.

const ACC_DDL: &str = "
CREATE SCHEMA acc;
CREATE TABLE acc.a (id bigint PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
CREATE TABLE acc.b (id bigint PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
";

/// Rows of `acc.b` before any slot exists: only the reload brings them to a consumer.
const B_INITIAL: i64 = 50_000;

/// Inserts, updates (also of the key) and deletes on `acc.a` and `acc.b`, in transactions of one
/// table or of both, until stopped. Returns the number of transactions.
fn start_writer(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let c = connect(&url).await;
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let a = format!(
                "INSERT INTO acc.a VALUES ({i}, 'a{i}', 0);
                 UPDATE acc.a SET v = v || '+', n = n + 1 WHERE id = {prev};
                 UPDATE acc.a SET id = -id WHERE id = {mv} AND {i} % 3 = 0;
                 DELETE FROM acc.a WHERE id = {del} AND {i} % 5 = 0;",
                prev = i - 1,
                mv = i - 2,
                del = i - 4,
            );
            let b = format!(
                "INSERT INTO acc.b VALUES ({new}, 'b{i}', 0);
                 UPDATE acc.b SET n = n + 1, v = v || '*' WHERE id = {upd};
                 DELETE FROM acc.b WHERE id = {del};
                 DELETE FROM acc.b WHERE id = {old} AND {i} % 2 = 0;",
                new = 1_000_000 + i,
                upd = 1 + (i * 7) % B_INITIAL,
                del = 1 + (i * 31 + 11) % B_INITIAL,
                old = 1_000_000 + i - 10,
            );
            let sql = match i % 4 {
                0 => format!("BEGIN; {a} COMMIT;"),
                1 => format!("BEGIN; {b} COMMIT;"),
                _ => format!("BEGIN; {a} {b} COMMIT;"),
            };
            c.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    })
}

/// Two daemons of one database, slots `<db>_a` (publication `pub_a`: `acc.a`) and `<db>_b`
/// (`pub_b`: `acc.b`), so two source names, share the registry schema, the output URL, the stream
/// and the subject prefix. Under a continuous writer each is killed with SIGKILL three times
/// (alternating, each time just after it committed a batch) and restarted, and a reload of `acc.b`
/// is requested for source b. Afterwards: each table replays equal from its own source's rows
/// only, every registered object exists in its source's directory, each source's notices match its
/// rows, the reload was done exactly once and by source b only, and neither directory holds anything
/// of the other's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_slots_share_one_registry_bucket_and_stream_through_kill_9() {
    let mut db = TestDb::new("srcslots").await;
    let c = db.client().await;
    c.batch_execute(ACC_DDL).await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO acc.b SELECT g, md5(g::text), 0 FROM generate_series(1, {B_INITIAL}) g;
         CREATE PUBLICATION pub_a FOR TABLE acc.a;
         CREATE PUBLICATION pub_b FOR TABLE acc.b;"
    ))
    .await
    .unwrap();
    let (slot_a, slot_b) = (format!("{}_a", db.name), format!("{}_b", db.name));
    let base = db.daemon_env(&db.out_url());
    let env_a = with(
        with(base.clone(), "CDC_EGRESS_SOURCE_SLOT", &slot_a),
        "CDC_EGRESS_SOURCE_PUBLICATION",
        "pub_a",
    );
    let env_b = with(
        with(base.clone(), "CDC_EGRESS_SOURCE_SLOT", &slot_b),
        "CDC_EGRESS_SOURCE_PUBLICATION",
        "pub_b",
    );
    // The source names default to the slot names.
    let (src_a, src_b) = (slot_a.clone(), slot_b.clone());
    let dir = db.dir.path().to_path_buf();
    // One after the other: a start at the same moment is `daemons_of_one_database_start_at_the_same_moment`.
    let mut da = Some(Daemon::start(&env_a, &dir, &[], "a0.log"));
    wait_for_slot(&db.url, &slot_a, da.as_mut().unwrap()).await;
    let mut dbd = Some(Daemon::start(&env_b, &dir, &[], "b0.log"));
    wait_for_slot(&db.url, &slot_b, dbd.as_mut().unwrap()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(db.url.clone(), stop.clone());
    let reg = db.client().await;
    for k in 0..6 {
        let (env, src, daemon) = if k % 2 == 0 {
            (&env_a, &src_a, &mut da)
        } else {
            (&env_b, &src_b, &mut dbd)
        };
        // Killed in the middle of its work: just after it committed a batch of this run.
        let mut d = daemon.take().unwrap();
        let before = files_of(&reg, src).await;
        wait_files_past(&reg, src, before, &mut d).await;
        d.kill().await;
        let name = format!("{}{}.log", if k % 2 == 0 { "a" } else { "b" }, k + 1);
        *daemon = Some(Daemon::start(env, &dir, &[], &name));
        if k == 0 {
            // The reload of acc.b, requested with source b's configuration while both stream; b is
            // killed next (maybe during the export), a after that.
            let (env_b, dir) = (env_b.clone(), dir.clone());
            let (code, out, err) =
                tokio::task::spawn_blocking(move || run_cli(&["reload", "acc.b"], &env_b, &dir))
                    .await
                    .unwrap();
            assert_eq!(code, 0, "reload request failed: {out}\n{err}");
            assert!(out.contains("reload of acc.b requested"), "{out}\n{err}");
        }
    }
    // The reload finishes (it may have been interrupted by the kills) and the writer goes on until
    // acc.b has streamed past its cut.
    let (da_ref, db_ref) = (da.as_ref().unwrap(), dbd.as_ref().unwrap());
    wait_until(
        "source b's reload of acc.b to be done and acc.b to stream past its cut",
        CATCH_UP,
        || db_ref.log_tail(),
        async || {
            let (failed, done): (i64, i64) = reg
                .query_one(
                    "SELECT count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'done' \
                     AND EXISTS (SELECT 1 FROM cdc_egress.files f WHERE f.source = r.source \
                     AND f.kind = 'streaming' AND f.table_name = 'b' AND f.first_commit_lsn >= r.cut_lsn)) \
                     FROM cdc_egress.reloads r",
                    &[],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))
                .unwrap();
            assert_eq!(failed, 0, "a reload failed\n{}", db_ref.log_tail());
            done > 0
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.unwrap();
    assert!(
        transactions > 50,
        "the writer ran ({transactions} transactions)"
    );
    wait_slot_caught_up(&db.url, &slot_a, da_ref).await;
    wait_slot_caught_up(&db.url, &slot_b, db_ref).await;
    for (d, name) in [(da.take().unwrap(), "a"), (dbd.take().unwrap(), "b")] {
        let log = d.log_text();
        let status = d.stop().await;
        assert!(
            status.success(),
            "daemon {name} exit {status:?}; log:\n{log}"
        );
    }

    // The reload: exactly once, by source b only.
    let reloads: Vec<(String, String, String, String)> = reg
        .query(
            "SELECT source, table_schema, table_name, status FROM cdc_egress.reloads ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        reloads,
        vec![(src_b.clone(), "acc".into(), "b".into(), "done".into())],
        "one reload of acc.b, done, for source b; none for source a"
    );
    let requests: Vec<String> = reg
        .query("SELECT source FROM cdc_egress.reload_requests", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        requests,
        vec![src_b.clone()],
        "the reload request is source b's"
    );
    let parts = count(
        &reg,
        "SELECT count(*) FROM cdc_egress.files WHERE kind = 'reload'",
        &[],
    )
    .await;
    let b_parts = count(
        &reg,
        "SELECT count(*) FROM cdc_egress.files WHERE kind = 'reload' AND source = $1 AND table_name = 'b'",
        &[&src_b],
    )
    .await;
    assert!(
        parts > 0 && parts == b_parts,
        "reload parts: {parts}, of source b's acc.b: {b_parts}"
    );

    // Each source's rows name only its own table; the registry knows exactly the two sources.
    let rows = |query: &'static str| {
        let reg = &reg;
        async move { query_rows(reg, query).await }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        rows("SELECT DISTINCT source, table_schema, table_name FROM cdc_egress.files").await,
        sorted(vec![format!("({src_a},acc,a)"), format!("({src_b},acc,b)")]),
        "files rows of each source"
    );
    assert_eq!(
        rows("SELECT source, table_name FROM cdc_egress.tables").await,
        sorted(vec![format!("({src_a},a)"), format!("({src_b},b)")]),
        "tables rows of each source"
    );
    assert_eq!(
        rows("SELECT name, database, slot FROM cdc_egress.sources").await,
        sorted(vec![
            format!("({src_a},{},{slot_a})", db.name),
            format!("({src_b},{},{slot_b})", db.name)
        ]),
        "the sources table"
    );
    assert_eq!(
        rows("SELECT source, slot_name FROM cdc_egress.daemon").await,
        sorted(vec![
            format!("({src_a},{slot_a})"),
            format!("({src_b},{slot_b})")
        ]),
        "one daemon row per source"
    );

    // Objects: every registered one exists; every directory a listing reader sees is complete,
    // registered, in its source's directory and about that source's table only.
    let out = db.dir.path().join("out");
    let mut roots = vec![src_a.clone(), src_b.clone()];
    roots.sort();
    assert_eq!(
        entries(&out),
        roots,
        "the output root holds one directory per source"
    );
    let registered = check_registered_objects(&reg, &out).await;
    let mut listed = check_source_dir(&out, &src_a, &slot_a, &[("acc", "a", "acc", "a")]);
    listed.extend(check_source_dir(
        &out,
        &src_b,
        &slot_b,
        &[("acc", "b", "acc", "b")],
    ));
    assert_eq!(
        listed, registered,
        "the complete directories a listing reader sees are exactly the registered ones"
    );

    // Notices, per source.
    check_notices(&reg, &db.stream, &db.prefix, &src_a).await;
    // `status` of one source: its own tables, and every source of the registry on a line each.
    let (code, out, err) = run_cli(&["status", "--json"], &env_a, &dir);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["source_name"], src_a.as_str(), "{out}");
    let tables: Vec<&str> = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["acc.a"], "{out}");
    let sources: Vec<(&str, &str)> = status["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["slot"].as_str().unwrap()))
        .collect();
    let mut want = vec![
        (src_a.as_str(), slot_a.as_str()),
        (src_b.as_str(), slot_b.as_str()),
    ];
    want.sort();
    assert_eq!(sources, want, "{out}");
    check_notices(&reg, &db.stream, &db.prefix, &src_b).await;
    assert_eq!(
        stream_count(&db.stream, &format!("{}.{src_b}.reload.acc.b", db.prefix)).await,
        1
    );

    // Each table replays equal from its own source's rows: source a's rows alone leave acc.b empty.
    let target_url = db.extra_db("replay").await;
    let target = connect(&target_url).await;
    target.batch_execute(ACC_DDL).await.unwrap();
    let out_url = db.out_url();
    let ra = replay_source(
        &db.url,
        "cdc_egress",
        Some(&src_a),
        &out_url,
        &HashMap::new(),
        &target,
    )
    .await;
    assert!(
        ra.cuts.is_empty() && ra.reload_parts == 0,
        "source a: {ra:?}"
    );
    assert_eq!(
        table_rows(&target, "acc.a").await,
        table_rows(&c, "acc.a").await,
        "acc.a differs after replaying source a"
    );
    assert!(
        table_rows(&target, "acc.b").await.is_empty(),
        "source a's rows wrote into acc.b"
    );
    let rb = replay_source(
        &db.url,
        "cdc_egress",
        Some(&src_b),
        &out_url,
        &HashMap::new(),
        &target,
    )
    .await;
    assert_eq!(rb.cuts.len(), 1, "source b: {rb:?}");
    assert_eq!(
        table_rows(&target, "acc.b").await,
        table_rows(&c, "acc.b").await,
        "acc.b differs after replaying source b"
    );
    assert_eq!(
        table_rows(&target, "acc.a").await,
        table_rows(&c, "acc.a").await,
        "source b's rows changed acc.a"
    );
    db.cleanup().await;
}

/// Daemons of one database (a slot and a publication each) started at the same moment on a database
/// where none ran before, sharing the registry schema (in that database): each installs the reload
/// marker and migrates the registry in the one schema they share, and all of them must come up.
/// A few rounds, since it is a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_of_one_database_start_at_the_same_moment() {
    const DAEMONS: usize = 4;
    for round in 0..5 {
        let db = TestDb::new("srcrace").await;
        let c = db.client().await;
        for i in 0..DAEMONS {
            c.batch_execute(&format!(
                "CREATE TABLE t{i} (id int PRIMARY KEY); CREATE PUBLICATION p{i} FOR TABLE t{i};"
            ))
            .await
            .unwrap();
        }
        let base = db.daemon_env(&db.out_url());
        let mut daemons: Vec<(String, Daemon)> = (0..DAEMONS)
            .map(|i| {
                let slot = format!("{}_s{i}", db.name);
                let env = with(
                    with(base.clone(), "CDC_EGRESS_SOURCE_SLOT", &slot),
                    "CDC_EGRESS_SOURCE_PUBLICATION",
                    &format!("p{i}"),
                );
                let d = Daemon::start(&env, db.dir.path(), &[], &format!("r{round}d{i}.log"));
                (slot, d)
            })
            .collect();
        for (slot, d) in &mut daemons {
            wait_for_slot(&db.url, slot, d).await;
        }
        for (slot, d) in daemons {
            let log = d.log_text();
            let status = d.stop().await;
            assert!(
                status.success(),
                "daemon of {slot} exit {status:?}; log:\n{log}"
            );
        }
        db.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Two databases, the same table names.

const USERS_DDL: &str =
    "CREATE TABLE public.users (id int PRIMARY KEY, name text NOT NULL, email text, visits int NOT NULL DEFAULT 0);";

/// A daemon that calls itself by the name of a source it does not own.
struct Thief<'a> {
    env: &'a [(String, String)],
    dir: &'a Path,
    /// The maintenance URL of the thief's server (its slots are compared before and after).
    server: &'a str,
    slot: &'a str,
    database: &'a str,
    owner: &'a TestDb,
    west: &'a TestDb,
    reg: &'a Client,
}

impl Thief<'_> {
    /// The slots of the thief's server with its slot's name or in its database:
    /// `(slot name, database)`.
    async fn slots(&self) -> Vec<(String, String)> {
        connect(self.server)
            .await
            .query(
                "SELECT slot_name::text, database::text FROM pg_replication_slots \
                 WHERE slot_name = $1 OR database = $2 ORDER BY 1, 2",
                &[&self.slot, &self.database],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Starts it and checks that it is refused (exit code 2, the source and both owners named)
    /// before it creates its slot or registers, writes or announces anything.
    async fn assert_refused(&self, log_name: &str) {
        let east = self.owner;
        let out = self.dir.join("out");
        let owner_file = std::fs::read(out.join("east/cdc-egress-owner.json")).unwrap();
        let objects = files_below(&out);
        let notices = stream_count(&east.stream, &format!("{}.>", east.prefix)).await;
        let rows = |table: &str| format!("SELECT count(*) FROM cdc_egress.{table}");
        let mut counts = Vec::new();
        for t in [
            "files",
            "tables",
            "reloads",
            "reload_requests",
            "slot_events",
            "ddl_history",
        ] {
            counts.push(count(self.reg, &rows(t), &[]).await);
        }
        let slots = self.slots().await;
        let d = Daemon::start(self.env, self.dir, &[], log_name);
        let log = d.log.clone();
        let status = d.wait_exit(CATCH_UP).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(2), "a configuration error:\n{text}");
        assert!(
            text.contains("source \"east\"")
                && text.contains(&format!("slot {:?} of database {:?}", east.slot, east.name))
                && text.contains(&format!(
                    "slot {:?} of database {:?}",
                    self.slot, self.database
                )),
            "the refusal names the source and both owners:\n{text}"
        );
        assert_eq!(
            self.slots().await,
            slots,
            "the refused daemon created or changed a slot"
        );
        let sources: Vec<(String, String, String)> = self
            .reg
            .query(
                "SELECT name, database, slot FROM cdc_egress.sources ORDER BY name",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            sources,
            vec![
                ("east".to_string(), east.name.clone(), east.slot.clone()),
                (
                    "west".to_string(),
                    self.west.name.clone(),
                    self.west.slot.clone()
                ),
            ],
            "the sources table"
        );
        let mut after = Vec::new();
        for t in [
            "files",
            "tables",
            "reloads",
            "reload_requests",
            "slot_events",
            "ddl_history",
        ] {
            after.push(count(self.reg, &rows(t), &[]).await);
        }
        assert_eq!(after, counts, "the refused daemon wrote registry rows");
        assert_eq!(
            std::fs::read(out.join("east/cdc-egress-owner.json")).unwrap(),
            owner_file,
            "the owner file of east changed"
        );
        assert_eq!(
            files_below(&out),
            objects,
            "the refused daemon wrote or deleted objects"
        );
        assert_eq!(
            stream_count(&east.stream, &format!("{}.>", east.prefix)).await,
            notices,
            "the refused daemon published"
        );
    }
}

/// Two source databases (`east` on the test server, `west` on a private cluster), each with its own
/// `public.users` and a slot of the SAME name (the documented case that needs `source.name`), each
/// with a daemon named `east` / `west` writing to one registry (in the east database), one output
/// URL, one spool directory and one stream. Both start with rows (exported by their initial reloads,
/// both at once, of a table of the same name) and then stream. Each replays equal to its own
/// source. A third daemon that calls itself `east` but streams another database and slot is refused
/// (exit code 2, naming both owners) and registers, writes and announces nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_databases_with_the_same_table_names_share_one_registry_and_bucket() {
    let pg = PrivatePg::start(&PrivatePg::system_bindir(), &[]);
    let mut east = TestDb::new("srceast").await;
    let mut west = TestDb::new_on(&pg.url, "srcwest").await;
    west.slot = east.slot.clone();
    let (ce, cw) = (east.client().await, west.client().await);
    for (c, db, who, n) in [(&ce, &east, "east", 3000), (&cw, &west, "west", 2000)] {
        c.batch_execute(&format!(
            "{USERS_DDL}
             INSERT INTO users SELECT g, '{who} user ' || g, '{who}' || g || '@example.org' FROM generate_series(1, {n}) g;
             CREATE PUBLICATION {} FOR TABLE users;",
            db.publication
        ))
        .await
        .unwrap();
    }
    let out_url = east.out_url();
    let spool = east.dir.path().join("spool").display().to_string();
    let env_east = with(
        with(east.daemon_env(&out_url), "CDC_EGRESS_SOURCE_NAME", "east"),
        "CDC_EGRESS_RELOAD_INITIAL",
        "true",
    );
    let mut env_west = west.daemon_env(&out_url);
    for (k, v) in [
        ("CDC_EGRESS_SOURCE_NAME", "west"),
        ("CDC_EGRESS_RELOAD_INITIAL", "true"),
        ("CDC_EGRESS_REGISTRY_URL", east.url.as_str()),
        ("CDC_EGRESS_NATS_STREAM", east.stream.as_str()),
        ("CDC_EGRESS_NATS_SUBJECT_PREFIX", east.prefix.as_str()),
        ("CDC_EGRESS_OUTPUT_SPOOL_DIR", spool.as_str()),
    ] {
        env_west = with(env_west, k, v);
    }
    let dir = east.dir.path().to_path_buf();
    // One after the other (see `daemons_of_one_database_start_at_the_same_moment`).
    let mut de = Daemon::start(&env_east, &dir, &[], "east.log");
    wait_for_slot(&east.url, &east.slot, &mut de).await;
    let mut dw = Daemon::start(&env_west, &dir, &[], "west.log");
    wait_for_slot(&west.url, &west.slot, &mut dw).await;
    // Both initial exports of public.users, side by side in one registry.
    east.wait_until(
        "SELECT count(DISTINCT source) = 2 FROM cdc_egress.reloads WHERE status = 'done'",
        CATCH_UP,
        &de,
    )
    .await;
    let churn = |who: &str, base: i32| {
        format!(
            "INSERT INTO users SELECT g, '{who} late ' || g, NULL FROM generate_series({base}, {base} + 199) g;
             UPDATE users SET visits = visits + 1, email = upper(email) WHERE id % 7 = 0;
             UPDATE users SET id = id + 100000 WHERE id % 50 = 1;
             DELETE FROM users WHERE id % 11 = 0;"
        )
    };
    ce.batch_execute(&churn("east", 10_000)).await.unwrap();
    cw.batch_execute(&churn("west", 20_000)).await.unwrap();
    east.wait_caught_up(CATCH_UP).await;
    west.wait_caught_up(CATCH_UP).await;

    // A third daemon names itself `east` but streams another database (and slot): refused.
    let intruder_url = east.extra_db("intruder").await;
    let ci = connect(&intruder_url).await;
    ci.batch_execute(&format!(
        "{USERS_DDL}
         CREATE TABLE intruder_only (id int PRIMARY KEY);
         INSERT INTO users SELECT g, 'intruder ' || g, NULL FROM generate_series(1, 10) g;
         INSERT INTO intruder_only SELECT generate_series(1, 10);
         CREATE PUBLICATION {} FOR ALL TABLES;",
        east.publication
    ))
    .await
    .unwrap();
    let intruder_slot = format!("{}_intruder", east.name);
    let intruder_db = intruder_url.rsplit('/').next().unwrap().to_string();
    let env_intruder = with(
        with(env_east.clone(), "CDC_EGRESS_SOURCE_URL", &intruder_url),
        "CDC_EGRESS_SOURCE_SLOT",
        &intruder_slot,
    );
    let env_intruder = with(env_intruder, "CDC_EGRESS_REGISTRY_URL", &east.url);
    let reg = east.client().await;
    let thief = Thief {
        env: &env_intruder,
        dir: &dir,
        server: &east.base,
        slot: &intruder_slot,
        database: &intruder_db,
        owner: &east,
        west: &west,
        reg: &reg,
    };
    // While the owner streams.
    thief.assert_refused("intruder1.log").await;
    // While the owner is stopped: its status row (what `cdc-egress status` shows for source east)
    // stays the owner's.
    let log = de.log_text();
    let status = de.stop().await;
    assert!(status.success(), "daemon east exit {status:?}; log:\n{log}");
    let row =
        |r: &tokio_postgres::Row| -> (String, String, String, Option<String>, i32, Option<String>) {
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))
        };
    let daemon_row = "SELECT source, slot_name, state, last_error, pid, confirmed_lsn::text \
                      FROM cdc_egress.daemon WHERE source = 'east'";
    let before = row(&reg.query_one(daemon_row, &[]).await.unwrap());
    assert_eq!(
        (before.1.as_str(), before.2.as_str()),
        (east.slot.as_str(), "stopped"),
        "{before:?}"
    );
    thief.assert_refused("intruder2.log").await;
    let after = row(&reg.query_one(daemon_row, &[]).await.unwrap());
    assert_eq!(
        after, before,
        "the refused daemon wrote over the daemon row of source east (its owner is stopped)"
    );
    // The likeliest mistake: another database whose slot has the same (default) name as east's, on
    // another cluster, started without a `source.name` of its own (here: named `east` outright).
    let twin_url = west.extra_db("twin").await;
    let twin_db = twin_url.rsplit('/').next().unwrap().to_string();
    connect(&twin_url)
        .await
        .batch_execute(&format!(
            "{USERS_DDL} CREATE PUBLICATION {} FOR ALL TABLES;",
            west.publication
        ))
        .await
        .unwrap();
    let env_twin = with(
        with(env_west.clone(), "CDC_EGRESS_SOURCE_URL", &twin_url),
        "CDC_EGRESS_SOURCE_NAME",
        "east",
    );
    let twin = Thief {
        env: &env_twin,
        dir: &dir,
        server: &pg.url,
        slot: &east.slot,
        database: &twin_db,
        owner: &east,
        west: &west,
        reg: &reg,
    };
    twin.assert_refused("twin.log").await;
    let after = row(&reg.query_one(daemon_row, &[]).await.unwrap());
    assert_eq!(
        after, before,
        "a refused daemon with the owner's slot name wrote over the daemon row of source east"
    );

    // East starts again while west is in the middle of its batches. With the same slot name they
    // share the spool directory; east's start-up must leave west's open spool files alone.
    let stop = Arc::new(AtomicBool::new(false));
    let west_writer = {
        let (url, stop) = (west.url.clone(), stop.clone());
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if c.batch_execute(&format!(
                    "INSERT INTO users VALUES ({}, 'west busy {i}', NULL);
                     UPDATE users SET visits = visits + 1 WHERE id = {};",
                    40_000 + i,
                    1 + i % 1000
                ))
                .await
                .is_err()
                {
                    return -1; // the test failed and dropped the database
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let west_files = files_of(&reg, "west").await;
    wait_files_past(&reg, "west", west_files, &mut dw).await;
    let mut de = Daemon::start(&env_east, &dir, &[], "east2.log");
    de.wait_for_log("daemon::session: streaming", CATCH_UP)
        .await;
    ce.batch_execute(&churn("east", 30_000)).await.unwrap();
    // West delivers on (a spool file it cannot read back is fatal to its delivery: fail at once).
    let west_files = files_of(&reg, "west").await;
    wait_until(
        "west to deliver two more batches after east's start",
        CATCH_UP,
        || dw.log_tail(),
        async || {
            let west_log = dw.log_text();
            if let Some(line) = west_log.lines().find(|l| l.contains("cannot read spool file")) {
                let east_spool: Vec<String> = de
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("spool"))
                    .map(str::to_string)
                    .collect();
                panic!(
                    "west lost an open spool file when east started (both use <spool_dir>/<slot>):\n\
                     west: {line}\neast: {east_spool:#?}"
                );
            }
            files_of(&reg, "west").await > west_files + 1
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    assert!(west_writer.await.unwrap() > 10);
    east.wait_caught_up(CATCH_UP).await;
    west.wait_caught_up(CATCH_UP).await;
    let east_log = de.log_text();
    assert!(
        !east_log.contains("removed spool files of a previous run"),
        "east's start-up removed spool files in the directory it shares with west:\n{east_log}"
    );
    for (d, name) in [(de, "east"), (dw, "west")] {
        let log = d.log_text();
        let status = d.stop().await;
        assert!(
            status.success(),
            "daemon {name} exit {status:?}; log:\n{log}"
        );
    }

    let out = dir.join("out");
    assert_eq!(
        entries(&out),
        vec!["east", "west"],
        "one directory per source"
    );
    let registered = check_registered_objects(&reg, &out).await;
    let users = [("public", "users", "public", "users")];
    let mut listed = check_source_dir(&out, "east", &east.slot, &users);
    listed.extend(check_source_dir(&out, "west", &west.slot, &users));
    assert_eq!(
        listed, registered,
        "the complete directories are exactly the registered ones"
    );
    for s in ["east", "west"] {
        check_notices(&reg, &east.stream, &east.prefix, s).await;
        assert_eq!(
            count(
                &reg,
                "SELECT count(*) FROM cdc_egress.reloads WHERE source = $1 AND status = 'done' AND table_name = 'users'",
                &[&s]
            )
            .await,
            1,
            "one initial export of {s}'s users"
        );
    }
    for (s, c) in [("east", &ce), ("west", &cw)] {
        let target = connect(&east.extra_db(&format!("replay_{s}")).await).await;
        target.batch_execute(USERS_DDL).await.unwrap();
        let r = replay_source(
            &east.url,
            "cdc_egress",
            Some(s),
            &out_url,
            &HashMap::new(),
            &target,
        )
        .await;
        assert_eq!(r.cuts.len(), 1, "{s}: {r:?}");
        assert!(r.streaming_files > 0, "{s}: {r:?}");
        assert_eq!(
            table_rows(&target, "users").await,
            table_rows(c, "users").await,
            "users of {s} differ after replaying source {s}"
        );
    }
    west.cleanup().await;
    east.cleanup().await;
    drop(pg);
}

// ---------------------------------------------------------------------------------------------
// 3. Table names with dots, slashes, quotes, spaces and non-ASCII.

const HOSTILE_DDL: &str = r#"
CREATE SCHEMA "a.x";
CREATE SCHEMA a;
CREATE TABLE "a.x".y (id int PRIMARY KEY, v text);
CREATE TABLE a."x.y" (id int PRIMARY KEY, v text);
CREATE TABLE a."Weird Name/ü ""q""" (id int PRIMARY KEY, v text);
"#;

/// `(quoted name, schema, table, encoded schema segment, encoded table segment)`.
const HOSTILE: [(&str, &str, &str, &str, &str); 3] = [
    (r#""a.x".y"#, "a.x", "y", "a.x", "y"),
    (r#"a."x.y""#, "a", "x.y", "a", "x.y"),
    (
        r#"a."Weird Name/ü ""q""""#,
        "a",
        "Weird Name/ü \"q\"",
        "a",
        "Weird Name%2F%C3%BC %22q%22",
    ),
];

/// `"a.x".y` and `a."x.y"` (one dotted name, two tables) and `a."Weird Name/ü ""q"""` each get their
/// own folder, `<root>/<source>/<schema>/<table>/`, with the segments encoded as object_store
/// encodes them; every batch directory holds its data, `schema.yml` and `manifest.json` together;
/// a crash between an upload and its registry row leaves no orphan behind; each table replays equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_table_names_get_their_own_folders() {
    let mut db = TestDb::new("srchostile").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{HOSTILE_DDL} CREATE PUBLICATION {} FOR TABLES IN SCHEMA a, \"a.x\"",
        db.publication
    ))
    .await
    .unwrap();
    for (_, schema, table, seg_schema, seg_table) in HOSTILE {
        assert_eq!(
            cdc_egress::sink::layout::segment(schema).as_ref(),
            seg_schema
        );
        assert_eq!(cdc_egress::sink::layout::segment(table).as_ref(), seg_table);
    }
    let env = db.daemon_env(&db.out_url());
    let source = db.slot.clone();
    let out = db.dir.path().join("out");
    // First run: killed right after its first upload, before the registry row (an orphan).
    let d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_TEST_FAILPOINT", "after_upload")],
        "crash.log",
    );
    db.wait_for_slot(&d).await;
    for (i, (q, ..)) in HOSTILE.iter().enumerate() {
        c.batch_execute(&format!(
            "INSERT INTO {q} SELECT g, '{i}:' || g FROM generate_series(1, 100) g"
        ))
        .await
        .unwrap();
    }
    let status = d.wait_exit(CATCH_UP).await;
    assert!(!status.success(), "the failpoint aborts the daemon");
    let orphans: Vec<String> = files_below(&out)
        .into_iter()
        .filter(|f| f.ends_with("/data.csv.gz"))
        .collect();
    assert!(
        !orphans.is_empty(),
        "the crash left an uploaded batch behind"
    );
    // More changes before the restart, so the restarted run seals other batches than the orphan's.
    for (i, (q, ..)) in HOSTILE.iter().enumerate() {
        c.batch_execute(&format!(
            "INSERT INTO {q} SELECT g, '{i}:' || g FROM generate_series(101, 150) g;
             UPDATE {q} SET v = v || ' edited' WHERE id % 3 = 0;
             DELETE FROM {q} WHERE id % 10 = 0;"
        ))
        .await
        .unwrap();
    }
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_caught_up(CATCH_UP).await;
    for (q, ..) in HOSTILE {
        c.batch_execute(&format!("UPDATE {q} SET id = id + 1000 WHERE id < 5"))
            .await
            .unwrap();
    }
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    let status = d.stop().await;
    assert!(status.success(), "daemon exit {status:?}; log:\n{log}");

    // The folders, on the local file system.
    let src_dir = out.join(&source);
    assert_eq!(entries(&out), vec![source.clone()]);
    assert_eq!(entries(&src_dir), vec!["a", "a.x", "cdc-egress-owner.json"]);
    assert_eq!(entries(&src_dir.join("a.x")), vec!["y"]);
    assert_eq!(
        entries(&src_dir.join("a")),
        vec!["Weird Name%2F%C3%BC %22q%22", "x.y"]
    );
    for (_, _, _, seg_schema, seg_table) in HOSTILE {
        assert_eq!(
            entries(&src_dir.join(seg_schema).join(seg_table)),
            vec!["streaming"],
            "{seg_schema}/{seg_table}"
        );
    }
    let tables: Vec<(&str, &str, &str, &str)> = HOSTILE
        .iter()
        .map(|(_, s, t, ss, st)| (*ss, *st, *s, *t))
        .collect();
    let listed = check_source_dir(&out, &source, &db.slot, &tables);
    let reg = db.client().await;
    let registered = check_registered_objects(&reg, &out).await;
    assert_eq!(
        listed, registered,
        "the complete directories are exactly the registered ones"
    );
    for (_, schema, table, seg_schema, seg_table) in HOSTILE {
        let paths: Vec<String> = reg
            .query(
                "SELECT object_path FROM cdc_egress.files WHERE table_schema = $1 AND table_name = $2",
                &[&schema, &table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!paths.is_empty(), "no file of {schema}.{table}");
        for p in paths {
            assert!(
                p.starts_with(&format!("{source}/{seg_schema}/{seg_table}/streaming/")),
                "{schema}.{table} has a file at {p}"
            );
        }
    }
    check_notices(&reg, &db.stream, &db.prefix, &source).await;

    let target = connect(&db.extra_db("replay").await).await;
    target.batch_execute(HOSTILE_DDL).await.unwrap();
    let r = replay_source(
        &db.url,
        "cdc_egress",
        Some(&source),
        &db.out_url(),
        &HashMap::new(),
        &target,
    )
    .await;
    assert!(r.streaming_files >= 3, "{r:?}");
    for (q, ..) in HOSTILE {
        let want = table_rows(&c, q).await;
        assert_eq!(want.len(), 135, "{q} on the source");
        assert_eq!(
            table_rows(&target, q).await,
            want,
            "{q} differs after replay"
        );
    }
    db.cleanup().await;
}

/// A reload requested in plain SQL without `source=` reaches every daemon sharing the registry
/// schema with one request id: each source reloads the table in a reload row of its own (neither
/// joins, finishes or skips the other's), and each replays equal from its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_reload_marker_is_a_reload_of_its_own_for_each_source() {
    let mut db = TestDb::new("srcmark").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g; \
         CREATE PUBLICATION p1 FOR TABLE t; CREATE PUBLICATION p2 FOR TABLE t;",
    )
    .await
    .unwrap();
    let base = with(
        db.daemon_env(&db.out_url()),
        "CDC_EGRESS_RELOAD_INITIAL",
        "true",
    );
    let mut daemons: Vec<(String, Daemon)> = (1..=2)
        .map(|i| {
            let slot = format!("{}_s{i}", db.name);
            let env = with(
                with(base.clone(), "CDC_EGRESS_SOURCE_SLOT", &slot),
                "CDC_EGRESS_SOURCE_PUBLICATION",
                &format!("p{i}"),
            );
            (
                slot,
                Daemon::start(&env, db.dir.path(), &[], &format!("d{i}.log")),
            )
        })
        .collect();
    for (slot, d) in &mut daemons {
        wait_for_slot(&db.url, slot, d).await;
    }
    let done = "SELECT count(*) FROM cdc_egress.reloads WHERE status = 'done'";
    db.wait_until(&format!("SELECT ({done}) = 2"), CATCH_UP, &daemons[0].1)
        .await;
    c.batch_execute(
        "UPDATE t SET v = 'u' WHERE id % 7 = 0; \
         COMMENT ON SCHEMA cdc_egress IS 'cdc-egress reload public.t request=by-hand'; \
         DELETE FROM t WHERE id % 11 = 0;",
    )
    .await
    .unwrap();
    db.wait_until(&format!("SELECT ({done}) = 4"), CATCH_UP, &daemons[0].1)
        .await;
    for (slot, d) in &daemons {
        wait_slot_caught_up(&db.url, slot, d).await;
    }
    assert_eq!(
        query_rows(
            &c,
            "SELECT source, status FROM cdc_egress.reloads WHERE request = 'by-hand'"
        )
        .await,
        daemons
            .iter()
            .map(|(slot, _)| format!("({slot},done)"))
            .collect::<Vec<_>>(),
        "one reload of the request per source"
    );
    for (_, d) in daemons {
        assert!(d.stop().await.success());
    }
    let target_url = db.extra_db("replay").await;
    let target = connect(&target_url).await;
    for i in 1..=2 {
        let source = format!("{}_s{i}", db.name);
        target
            .batch_execute("DROP TABLE IF EXISTS t; CREATE TABLE t (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
        let r = replay_source(
            &db.url,
            "cdc_egress",
            Some(&source),
            &db.out_url(),
            &HashMap::new(),
            &target,
        )
        .await;
        assert_eq!(r.cuts.len(), 1, "{source}: {r:?}");
        assert_eq!(
            table_rows(&target, "t").await,
            table_rows(&c, "t").await,
            "t differs after replaying source {source}"
        );
    }
    db.cleanup().await;
}
