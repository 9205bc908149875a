//! End to end against the real PostgreSQL and nats-server: workload → `cdc-egress run` → files,
//! registry, notices → replay in registry order → equal to the source; also across crashes.

mod common;
mod workload;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const CATCH_UP: Duration = Duration::from_secs(90);

/// Replays into a fresh database and asserts every table equals the source, the registry has no
/// overlapping positions, and JetStream holds exactly one notice per registry row.
async fn assert_replay_equal(
    db: &mut TestDb,
    output_url: &str,
    options: &HashMap<String, String>,
) -> ReplayReport {
    let target_url = db.extra_db("replay").await;
    let target = connect(&target_url).await;
    workload::setup_target(&target).await;
    let report = replay(&db.url, "cdc_egress", output_url, options, &target).await;
    // The documented consumer rule (latest reload, then streaming rows at or after its cut).
    let target2_url = db.extra_db("replay2").await;
    let target2 = connect(&target2_url).await;
    workload::setup_target(&target2).await;
    replay_with_reloads(&db.url, "cdc_egress", output_url, options, &target2).await;
    let source = db.client().await;
    for t in workload::TABLES {
        let want = table_rows(&source, t).await;
        assert_eq!(
            table_rows(&target2, t).await,
            want,
            "table {t} differs after replay"
        );
        // The tables were empty at the initial export, so the streaming files alone replay equal too.
        assert_eq!(
            table_rows(&target, t).await,
            want,
            "table {t} differs after a streaming-only replay"
        );
    }
    // Positions never overlap: each file of a table starts after the previous one ended.
    let rows = source
        .query(
            "SELECT table_name, first_commit_lsn::text, first_seq, last_commit_lsn::text, last_seq \
             FROM cdc_egress.files WHERE kind = 'streaming' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let mut last: HashMap<String, (cdc_egress::lsn::Lsn, i32)> = HashMap::new();
    for r in &rows {
        let t: String = r.get(0);
        let first = (r.get::<_, String>(1).parse().unwrap(), r.get::<_, i32>(2));
        let end = (r.get::<_, String>(3).parse().unwrap(), r.get::<_, i32>(4));
        if let Some(prev) = last.get(&t) {
            assert!(
                first > *prev,
                "table {t}: file starting at {first:?} overlaps the previous ending {prev:?}"
            );
        }
        last.insert(t, end);
    }
    let unnotified: i64 = source
        .query_one(
            "SELECT count(*) FROM cdc_egress.files WHERE notified_stream_seq IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unnotified, 0, "every registry row has its notice sequence");
    let notices = stream_count(&db.stream, &format!("{}.*.batch.>", db.prefix)).await;
    assert_eq!(
        notices,
        rows.len() as u64,
        "one JetStream notice per registry row"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_replays_equal_to_source() {
    mixed_workload(false).await;
}

/// The same workload read over the server's unix socket, where the stream thread tops up its
/// buffer between reads (`pg::wire::blocking`, "Draining a unix socket between reads").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_over_a_unix_socket_replays_equal_to_source() {
    mixed_workload(true).await;
}

/// The daemon's source URL for `db` over the server's (first) unix socket: `db.url` with only its
/// host replaced. `None` when the server has no socket this test can reach (none configured, or
/// one that leads elsewhere, e.g. a server in a container).
async fn unix_socket_url(db: &TestDb) -> Option<String> {
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT split_part(current_setting('unix_socket_directories'), ',', 1), \
             current_setting('port'), pg_postmaster_start_time()::text",
            &[],
        )
        .await
        .unwrap();
    let (dir, port, started): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let dir = dir.trim();
    if !dir.starts_with('/') || !std::path::Path::new(&format!("{dir}/.s.PGSQL.{port}")).exists() {
        return None;
    }
    let mut url = url::Url::parse(&db.url).unwrap();
    let host: String =
        percent_encoding::utf8_percent_encode(dir, percent_encoding::NON_ALPHANUMERIC).collect();
    url.set_host(Some(&host)).ok()?;
    let url = url.to_string();
    // The same server, reached through the socket.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    let same: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .ok()?
        .get(0);
    (same == started).then_some(url)
}

async fn mixed_workload(over_unix_socket: bool) {
    let mut db = TestDb::new(if over_unix_socket { "unixmix" } else { "mixed" }).await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let mut env = db.daemon_env(&db.out_url());
    if over_unix_socket {
        let Some(url) = unix_socket_url(&db).await else {
            eprintln!("skipped: no unix socket of the test server is reachable here");
            db.cleanup().await;
            return;
        };
        env = with(env, "CDC_EGRESS_SOURCE_URL", &url);
    }
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    // When the server offers TLS, the replication stream over TCP reads it (through the stream
    // thread's TLS read-ahead), so this test covers that path; over a unix socket it never does.
    // (The slot exists before the stream starts: wait until a walsender holds it.)
    let mut tls = None;
    for _ in 0..300 {
        let (server_tls, stream_tls): (String, Option<bool>) = c
            .query_one(
                "SELECT current_setting('ssl'), (SELECT s.ssl FROM pg_replication_slots r \
                 JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1)",
                &[&db.slot],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        if stream_tls.is_some() || (server_tls != "on" && !over_unix_socket) {
            tls = Some((server_tls, stream_tls));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (server_tls, stream_tls) =
        tls.unwrap_or_else(|| panic!("no walsender holds the slot; log:\n{}", d.log_text()));
    if over_unix_socket {
        assert_eq!(stream_tls, Some(false), "TLS over a unix socket");
    } else if server_tls == "on" {
        assert_eq!(stream_tls, Some(true), "the replication stream is not TLS");
    }
    workload::phase1(&c).await;
    // Phase 2 comes once the daemon has committed a first batch of phase 1, so in later batches.
    db.wait_until("SELECT count(*) > 0 FROM cdc_egress.files", CATCH_UP, &d)
        .await;
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    let status = d.stop().await;
    assert!(status.success(), "daemon exit {status:?}; log:\n{log}");
    let out = db.out_url();
    let report = assert_replay_equal(&mut db, &out, &HashMap::new()).await;
    assert!(
        report.files >= 2 && report.rows > 700,
        "expected several batches, got {report:?}"
    );
    // Every batch directory that a listing reader sees as complete is in the registry, and vice versa.
    let manifests: Vec<_> = walk(&db.dir.path().join("out"))
        .into_iter()
        .filter(|p| p.ends_with("manifest.json"))
        .collect();
    assert_eq!(manifests.len(), report.files);
    db.cleanup().await;
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

/// The mixed workload through a daemon writing to the object store URL `out` with `options` (given
/// as `CDC_EGRESS_OUTPUT_OPTIONS_<KEY>` variables), then replay from that store and compare.
async fn mixed_workload_on_object_store(
    db: &mut TestDb,
    out: &str,
    options: &std::collections::BTreeMap<String, String>,
) {
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let mut env = db.daemon_env(out);
    for (k, v) in options {
        env.push((
            format!("CDC_EGRESS_OUTPUT_OPTIONS_{}", k.to_uppercase()),
            v.clone(),
        ));
    }
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    workload::phase1(&c).await;
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    // `verify` reads the same store through object_store and finds every table equal.
    let (code, stdout, stderr) = run_cli(&["verify"], &env, db.dir.path());
    assert_eq!(code, 0, "verify on {out}:\n{stdout}\n{stderr}");
    assert!(stdout.contains("the files equal the source"), "{stdout}");
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");
    for (k, v) in options {
        let secret = ["secret", "key", "token"].iter().any(|s| k.contains(s));
        assert!(
            !(secret && v.len() >= 16 && log.contains(v.as_str())),
            "the value of output.options.{k} must not be logged"
        );
    }
    let options: HashMap<String, String> = options.clone().into_iter().collect();
    let report = assert_replay_equal(db, out, &options).await;
    assert!(report.files >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_on_s3_replays_equal_to_source() {
    let endpoint = s3_endpoint();
    let mut db = TestDb::new("s3").await;
    let bucket = db.name.replace('_', "-");
    create_bucket(&endpoint, &bucket).await;
    let out = format!("s3://{bucket}/some/prefix");
    mixed_workload_on_object_store(&mut db, &out, &s3_options(&endpoint)).await;
    assert!(
        !std::fs::read_to_string(db.dir.path().join("daemon.log"))
            .unwrap()
            .contains("test\""),
        "credentials must not be logged"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_on_azure_replays_equal_to_source() {
    let endpoint = azure_endpoint();
    let mut db = TestDb::new("az").await;
    let container = unique_bucket("az");
    azure_container(&endpoint, "PUT", &container).await;
    let out = format!("az://{container}/some/prefix");
    mixed_workload_on_object_store(&mut db, &out, &azure_options(&endpoint)).await;
    azure_container(&endpoint, "DELETE", &container).await;
    db.cleanup().await;
}

/// On GCS the daemon's writes go through the adapter of `tests/common/gcs.rs` (fake-gcs-server lacks
/// the XML API's object PUT); batches stay below `PART_SIZE`, so no multipart upload is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_on_gcs_replays_equal_to_source() {
    let endpoint = gcs::gcs_endpoint();
    let adapter = gcs::GcsAdapter::start(&endpoint).await;
    let mut db = TestDb::new("gs").await;
    let bucket = unique_bucket("gs");
    gcs::create_gcs_bucket(&endpoint, &bucket).await;
    let out = format!("gs://{bucket}/some/prefix");
    mixed_workload_on_object_store(&mut db, &out, &gcs::gcs_options(&adapter.url)).await;
    gcs::drop_gcs_bucket(&endpoint, &bucket).await;
    db.cleanup().await;
}

/// Kills the daemon at one point of the delivery, restarts it, and checks exactly-once replay.
async fn crash_window(point: &str) {
    let mut db = TestDb::new(&format!("crash_{}", point.replace('_', ""))).await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_TEST_FAILPOINT", point)],
        "crash.log",
    );
    db.wait_for_slot(&d).await;
    workload::phase1(&c).await;
    let status = d.wait_exit(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "the failpoint {point} must abort the daemon"
    );
    let d = Daemon::start(&env, db.dir.path(), &[], "after.log");
    workload::phase2(&c).await;
    db.wait_caught_up(CATCH_UP).await;
    let log = d.log_text();
    assert!(d.stop().await.success(), "log:\n{log}");
    let out = db.out_url();
    assert_replay_equal(&mut db, &out, &HashMap::new()).await;
    // No half-written or orphaned batch is visible to a listing reader.
    let all = walk(&db.dir.path().join("out"));
    let dirs: std::collections::BTreeSet<String> = all
        .iter()
        .filter(|p| p.ends_with("data.csv.gz"))
        .map(|p| p.trim_end_matches("data.csv.gz").to_string())
        .collect();
    for dir in dirs {
        assert!(
            all.contains(&format!("{dir}manifest.json")),
            "{dir} has data but no manifest after recovery (orphan not cleaned)"
        );
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_upload() {
    crash_window("after_upload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_register() {
    crash_window("after_register").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_manifest() {
    crash_window("after_manifest").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_publish() {
    crash_window("after_publish").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_status_update() {
    crash_window("before_status").await;
}

/// SIGKILL at an arbitrary moment in the middle of a stream, twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_replays_equal() {
    let mut db = TestDb::new("sigkill").await;
    let c = db.client().await;
    workload::setup(&c, &db.publication).await;
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "d1.log");
    db.wait_for_slot(&d).await;
    workload::phase1(&c).await;
    // Each kill comes as soon as that daemon has committed a batch: it is in the middle of its work.
    db.wait_until("SELECT count(*) > 0 FROM cdc_egress.files", CATCH_UP, &d)
        .await;
    d.kill().await;
    let committed = db.registry_files().await;
    let d = Daemon::start(&env, db.dir.path(), &[], "d2.log");
    workload::phase2(&c).await;
    db.wait_until(
        &format!("SELECT count(*) > {committed} FROM cdc_egress.files"),
        CATCH_UP,
        &d,
    )
    .await;
    d.kill().await;
    let d = Daemon::start(&env, db.dir.path(), &[], "d3.log");
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());
    let out = db.out_url();
    assert_replay_equal(&mut db, &out, &HashMap::new()).await;
    db.cleanup().await;
}

/// With no published changes (idle, or only unpublished tables changing), the slot keeps advancing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_keeps_advancing() {
    let db = TestDb::new("idle").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE unpublished (id int PRIMARY KEY, v text);
         CREATE PUBLICATION {} FOR TABLE published;",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "idle.log");
    db.wait_for_slot(&d).await;
    let first = db.slot_confirmed().await.unwrap();
    // Only unpublished changes: WAL grows, nothing is published.
    // After each insert the slot confirms past it (wait_caught_up), so it keeps advancing.
    let mut later = first;
    for i in 0..5 {
        c.execute("INSERT INTO unpublished SELECT g + $1 * 1000, repeat('x', 100) FROM generate_series(1, 500) g", &[&i])
            .await
            .unwrap();
        let wal_end = db.current_lsn().await;
        db.wait_caught_up(CATCH_UP).await;
        let now = db.slot_confirmed().await.unwrap();
        assert!(
            now > later && now >= wal_end,
            "slot stayed at {later} (now {now}, WAL at {wal_end})"
        );
        later = now;
    }
    // And with nothing at all happening, it still moves (heartbeat messages).
    wait_until(
        &format!("the idle slot to advance past {later}"),
        CATCH_UP,
        || d.log_tail(),
        async || db.slot_confirmed().await.is_some_and(|idle| idle > later),
    )
    .await;
    let files: i64 = c
        .query_one("SELECT count(*) FROM cdc_egress.files", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(files, 0, "no batch for unpublished changes");
    assert!(d.stop().await.success());
    db.cleanup().await;
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// ARCHITECTURE.md, invariant 4: memory does not grow with batch or transaction size. One transaction of about
/// 1,000,000 rows (~110 MB of CSV) goes into a batch that cannot seal (1000 h interval, no row or
/// byte limit reached): the rows must be on disk in the spool, not in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_for_a_huge_open_batch() {
    let db = TestDb::new("memory").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE wide (id bigint PRIMARY KEY, a text, b text, n numeric);
         CREATE PUBLICATION {} FOR TABLE wide;",
        db.publication
    ))
    .await
    .unwrap();
    let mut env = db.daemon_env(&db.out_url());
    // Seals are wall-clock aligned (at multiples of the interval since the Unix epoch): with 1 h, a
    // run across the full hour sealed the batch before it was measured. 1000 h boundaries are
    // weeks apart.
    env.push(("CDC_EGRESS_BATCH_INTERVAL".into(), "1000h".into()));
    env.push(("CDC_EGRESS_BATCH_MAX_ROWS".into(), "100000000".into()));
    env.push(("CDC_EGRESS_BATCH_MAX_BYTES".into(), "10GiB".into()));
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    c.batch_execute(
        "INSERT INTO wide SELECT g, md5(g::text) || md5((g + 1)::text), repeat('x', 20), g / 3.0
         FROM generate_series(1, 1000000) g",
    )
    .await
    .unwrap();
    // Wait until the daemon has received the whole transaction.
    let target = db.current_lsn().await;
    let pid = d.child.id().unwrap();
    // The daemon's own spool folder: `<spool_dir>/<source name>-<digest>`.
    let spool = std::fs::read_dir(db.dir.path().join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{}-", db.slot)))
        })
        .expect("the daemon's spool folder");
    // Wait until the spool stops growing: the whole transaction has been written into it.
    let mut spooled = 0u64;
    let mut stable = 0;
    for _ in 0..1200 {
        assert!(
            !d.log_text().contains("ERROR"),
            "daemon failed:\n{}",
            d.log_text()
        );
        let now: u64 = std::fs::read_dir(&spool)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        stable = if now == spooled && now > 0 {
            stable + 1
        } else {
            0
        };
        spooled = now;
        if stable >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = target;
    assert!(
        spooled > 10_000_000,
        "the open batch should be spooled to disk ({spooled} bytes); daemon log:\n{}",
        d.log_text()
    );
    let files: i64 = c
        .query_one("SELECT count(*) FROM cdc_egress.files", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(files, 0, "the batch must still be open");
    let rss = peak_rss_kib(pid);
    assert!(
        { eprintln!("MEASURED peak_rss_kib={rss} spooled={spooled}"); rss < 96 * 1024 },
        "peak RSS {rss} KiB while ~110 MB of CSV went through one open batch: rows are held in memory"
    );
    assert!(d.stop().await.success());
    db.cleanup().await;
}

/// A table name with a slash, spaces, quotes and non-ASCII: its data, `schema.yml` and
/// `manifest.json` land in one directory (the manifest used to be encoded twice into another), the
/// notice URLs name those files, and the files replay equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_table_name_keeps_its_batch_in_one_directory() {
    const WEIRD_DDL: &str =
        r#"CREATE SCHEMA a; CREATE TABLE a."Weird Name/ü ""q""" (id int PRIMARY KEY, v text);"#;
    const WEIRD: &str = r#"a."Weird Name/ü ""q""""#;
    let mut db = TestDb::new("weirdname").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{WEIRD_DDL} CREATE PUBLICATION {} FOR ALL TABLES",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "weird.log");
    db.wait_for_slot(&d).await;
    c.batch_execute(&format!(
        "INSERT INTO {WEIRD} SELECT g, 'v' || g FROM generate_series(1, 50) g; UPDATE {WEIRD} SET v = 'x' WHERE id < 5;"
    ))
    .await
    .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());
    let rows = c
        .query(
            "SELECT object_path, schema_path, manifest_path FROM cdc_egress.files",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let out = db.dir.path().join("out");
    for r in &rows {
        let (data, schema, manifest): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let dir = |p: &str| p.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap();
        assert_eq!(dir(&data), dir(&manifest), "{data} vs {manifest}");
        assert_eq!(dir(&data), dir(&schema));
        for p in [&data, &schema, &manifest] {
            assert!(out.join(p).is_file(), "{p} is not on disk");
        }
    }
    assert_replays_equal(&mut db, WEIRD_DDL, &[WEIRD]).await;
    db.cleanup().await;
}

/// A renamed column keeps its `attnum` in `schema.yml`, so a consumer tells a rename from "drop a,
/// add b"; a dropped and re-added column gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_yml_names_columns_by_attnum_across_a_rename() {
    let db = TestDb::new("attnum").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, a text, n int); CREATE PUBLICATION {} FOR ALL TABLES",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "attnum.log");
    db.wait_for_slot(&d).await;
    let step = async |sql: &str, db: &TestDb| {
        c.batch_execute(sql).await.unwrap();
        db.wait_caught_up(CATCH_UP).await;
    };
    step("INSERT INTO t VALUES (1, 'x', 1)", &db).await;
    // Each step waits until the slot confirmed it: its rows are sealed, the next step's rows start a
    // new file, and every Relation is described while its columns still have the names it lists.
    // (A drop and re-add of a column of the same name and type inside one open batch does not seal
    // it: the fingerprint covers names and types. Sealing at DDL is the DDL capture's job.)
    step(
        "ALTER TABLE t RENAME COLUMN a TO b; INSERT INTO t VALUES (2, 'y', 2)",
        &db,
    )
    .await;
    step(
        "ALTER TABLE t DROP COLUMN n; ALTER TABLE t ADD COLUMN n int; INSERT INTO t VALUES (3, 'z', 3)",
        &db,
    )
    .await;
    assert!(d.stop().await.success());
    let store = cdc_egress::sink::store::Store::open(&db.out_url(), &Default::default()).unwrap();
    let mut shapes = Vec::new();
    for r in c
        .query(
            "SELECT schema_path FROM cdc_egress.files WHERE kind = 'streaming' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
    {
        let path = cdc_egress::sink::layout::stored_path(&r.get::<_, String>(0));
        let doc: serde_yaml::Value =
            serde_yaml::from_slice(&store.get(&path).await.unwrap()).unwrap();
        let columns: Vec<String> = doc["columns"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|col| {
                format!(
                    "{}@{}",
                    col["name"].as_str().unwrap(),
                    col["attnum"].as_i64().unwrap()
                )
            })
            .collect();
        if shapes.last() != Some(&columns) {
            shapes.push(columns);
        }
    }
    assert_eq!(
        shapes,
        [
            vec!["id@1", "a@2", "n@3"],
            vec!["id@1", "b@2", "n@3"],
            vec!["id@1", "b@2", "n@4"],
        ],
        "one shape per schema, columns identified by attnum"
    );
    db.cleanup().await;
}
