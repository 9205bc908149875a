//! The command line (README.md "Running it", "Configuration") through the real binary: help, exit codes, configuration
//! errors that name the key, secrets kept out of every output, `migrate`, `status`, `drop-slot`, and
//! how `run` reacts to a missing publication (definite: exit 1, no slot left) and to a source that is
//! down (transient: keeps retrying until SIGTERM).
//!
//! Every command runs in a fresh temporary directory, so no `cdc-egress.yml` is picked up by accident.

mod common;

use std::time::Duration;

use common::*;

const PW: &str = "Xy7SecretPw91";
const QUICK: Duration = Duration::from_secs(60);

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A source URL that parses but that no command here connects to.
const PLACEHOLDER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn cwd() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `url` with a password added.
fn with_password(url: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_password(Some(PW)).unwrap();
    u.to_string()
}

fn assert_no_secret(what: &str, out: &str, err: &str) {
    assert!(
        !out.contains(PW) && !err.contains(PW),
        "{what}: the password leaked\nstdout:\n{out}\nstderr:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Help and usage.

#[test]
fn help_on_every_subcommand() {
    let dir = cwd();
    for args in [
        vec!["--help"],
        vec!["migrate", "--help"],
        vec!["run", "--help"],
        vec!["status", "--help"],
        vec!["drop-slot", "--help"],
        vec!["help", "status"],
    ] {
        let (code, out, err) = run_cli(&args, &[], dir.path());
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("Usage:"), "{args:?}: {out}");
        assert!(
            out.contains("--config"),
            "{args:?} documents --config: {out}"
        );
    }
    let (_, out, _) = run_cli(&["--help"], &[], dir.path());
    for sub in ["migrate", "run", "status", "drop-slot"] {
        assert!(out.contains(sub), "--help lists {sub}: {out}");
    }
    let (_, out, _) = run_cli(&["status", "--help"], &[], dir.path());
    assert!(out.contains("--json"), "{out}");
    let (code, out, _) = run_cli(&["--version"], &[], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

#[test]
fn reload_subcommand_has_help() {
    let dir = cwd();
    let (code, out, err) = run_cli(&["reload", "--help"], &[], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--wait"), "{out}");
}

#[test]
fn usage_errors_exit_2() {
    let dir = cwd();
    for args in [vec![], vec!["frobnicate"], vec!["status", "--jsn"]] {
        let (code, _, err) = run_cli(&args, &[], dir.path());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?} says why");
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration errors: exit 2, naming the key and where it came from.

#[test]
fn unknown_key_in_a_config_file_is_named() {
    let dir = cwd();
    let file = dir.path().join("conf.yml");
    std::fs::write(
        &file,
        format!("source:\n  url: {PLACEHOLDER_URL}\nbatch:\n  intervall: 5s\n"),
    )
    .unwrap();
    let (code, _, err) = run_cli(
        &["migrate", "--config", file.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("batch.intervall"), "names the key: {err}");
    assert!(err.contains("conf.yml"), "names the file: {err}");

    // An unknown section, in the default ./cdc-egress.yml (which is read without --config).
    std::fs::write(
        dir.path().join("cdc-egress.yml"),
        format!("source:\n  url: {PLACEHOLDER_URL}\nsauce:\n  url: x\n"),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["status"], &[], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sauce.url"), "names the key: {err}");
}

#[test]
fn unknown_variable_and_flag_keys_are_named() {
    let dir = cwd();
    let (code, _, err) = run_cli(
        &["migrate"],
        &env(&[
            ("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL),
            ("CDC_EGRESS_BATCH_FOO", "1"),
        ]),
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CDC_EGRESS_BATCH_FOO"), "{err}");

    let (code, _, err) = run_cli(
        &["migrate", "--set", "batch.foo=1"],
        &env(&[("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL)]),
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("batch.foo"), "{err}");

    let (code, _, err) = run_cli(
        &["migrate", "--set", "batch.interval"],
        &env(&[("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL)]),
        dir.path(),
    );
    assert_eq!(code, 2, "a --set without `=`: {err}");
}

#[test]
fn invalid_values_are_named() {
    let dir = cwd();
    let base = env(&[("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL)]);
    for (set, key, value) in [
        ("batch.interval=soon", "batch.interval", "soon"),
        (
            "batch.max_bytes=12 parsecs",
            "batch.max_bytes",
            "12 parsecs",
        ),
        ("batch.max_rows=0", "batch.max_rows", "0"),
        (
            "nats.change_events=perhaps",
            "nats.change_events",
            "perhaps",
        ),
        ("http.listen=nowhere", "http.listen", "nowhere"),
        ("output.url=ftp://host/x", "output.url", "ftp"),
        ("source.slot=Bad-Slot", "source.slot", "Bad-Slot"),
    ] {
        let (code, _, err) = run_cli(&["run", "--set", set], &base, dir.path());
        assert_eq!(code, 2, "{set}: {err}");
        assert!(err.contains(key), "{set}: names {key}: {err}");
        assert!(err.contains(value), "{set}: shows the value: {err}");
    }
    // From the environment, the variable is named as the origin.
    let mut e = base.clone();
    e.push(("CDC_EGRESS_BATCH_INTERVAL".into(), "soon".into()));
    let (code, _, err) = run_cli(&["run"], &e, dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("batch.interval") && err.contains("CDC_EGRESS_BATCH_INTERVAL"),
        "{err}"
    );
}

#[test]
fn missing_source_url_exits_2() {
    let dir = cwd();
    for args in [
        vec!["run"],
        vec!["migrate"],
        vec!["status"],
        vec!["drop-slot"],
    ] {
        let (code, _, err) = run_cli(&args, &[], dir.path());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("source.url"), "{args:?}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets.

#[test]
fn passwords_never_appear_in_configuration_errors() {
    let dir = cwd();
    let with_pw = with_password(PLACEHOLDER_URL);
    for (args, e) in [
        // A bad value elsewhere.
        (
            vec!["run", "--set", "batch.interval=soon"],
            env(&[("CDC_EGRESS_SOURCE_URL", &with_pw)]),
        ),
        // A bad source.url itself.
        (
            vec!["run"],
            env(&[(
                "CDC_EGRESS_SOURCE_URL",
                &format!("mysql://u:{PW}@127.0.0.1/db"),
            )]),
        ),
        (
            vec!["status"],
            env(&[(
                "CDC_EGRESS_SOURCE_URL",
                &format!("postgres://u:{PW}@127.0.0.1/db?bogus=1"),
            )]),
        ),
        // A bad registry.url, a bad nats.url.
        (
            vec!["migrate"],
            env(&[
                ("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL),
                ("CDC_EGRESS_REGISTRY_URL", &format!("http://u:{PW}@h/db")),
            ]),
        ),
        (
            vec!["run"],
            env(&[
                ("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL),
                (
                    "CDC_EGRESS_NATS_URL",
                    &format!("http://u:{PW}@127.0.0.1:4222"),
                ),
            ]),
        ),
        // A --set flag without `=` that carries the URL.
        (
            vec![
                "run",
                "--set",
                &format!("source.url:postgres://u:{PW}@h/db"),
            ],
            env(&[("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL)]),
        ),
    ] {
        let (code, out, err) = run_cli(&args, &e, dir.path());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_no_secret(&format!("{args:?}"), &out, &err);
    }
}

#[test]
fn passwords_never_appear_in_runtime_errors() {
    let dir = cwd();
    for (args, url) in [
        (
            vec!["status"],
            format!("postgres://postgres:{PW}@127.0.0.1:1/nowhere"),
        ),
        (
            vec!["migrate"],
            format!("host=127.0.0.1 port=1 user=postgres password={PW} dbname=nowhere"),
        ),
        (
            vec!["drop-slot"],
            format!("postgres://postgres:{PW}@127.0.0.1:1/nowhere"),
        ),
        // A server error (no such database) rather than a refused connection.
        (
            vec!["migrate"],
            with_password(&with_db(&pg_base_url(), "cdct_no_such_database")),
        ),
    ] {
        let (code, out, err) = run_cli_timeout(
            &args,
            &env(&[("CDC_EGRESS_SOURCE_URL", &url)]),
            dir.path(),
            QUICK,
        );
        assert_eq!(code, 1, "{args:?} {url}: {err}");
        assert_no_secret(&format!("{args:?}"), &out, &err);
        assert!(
            err.contains("127.0.0.1"),
            "{args:?}: the error says which server: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// migrate, status, drop-slot.

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = TestDb::new("climig").await;
    let dir = cwd();
    let e = env(&[("CDC_EGRESS_SOURCE_URL", &db.url)]);
    let (code, out1, err) = run_cli_timeout(&["migrate"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    let c = db.client().await;
    let tables = |c: tokio_postgres::Client| async move {
        c.query(
            "SELECT table_name::text, count(*) FROM information_schema.tables \
             WHERE table_schema = 'cdc_egress' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>()
    };
    let first = tables(db.client().await).await;
    for t in [
        "daemon",
        "ddl_history",
        "files",
        "reloads",
        "schema_migrations",
        "tables",
    ] {
        assert!(
            first.iter().any(|(n, k)| n == t && *k == 1),
            "registry table {t} after migrate: {first:?}"
        );
    }
    let (code, out2, err) = run_cli_timeout(&["migrate"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert_ne!(out1, out2, "the second run applies nothing");
    assert!(out2.contains("up to date"), "{out2}");
    assert_eq!(tables(db.client().await).await, first);
    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM cdc_egress.schema_migrations ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all: Vec<i32> = cdc_egress::sink::registry::migrate::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(versions, all, "each migration recorded once");
    db.cleanup().await;
}

#[tokio::test]
async fn status_before_and_after_migrate() {
    let db = TestDb::new("clistatus").await;
    let dir = cwd();
    let e = env(&[
        ("CDC_EGRESS_SOURCE_URL", &with_password(&db.url)),
        ("CDC_EGRESS_SOURCE_SLOT", &db.slot),
    ]);
    // Before: a definite error that says what to do.
    let (code, out, err) = run_cli_timeout(&["status"], &e, dir.path(), QUICK);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cdc-egress migrate"), "{err}");
    assert_no_secret("status before migrate", &out, &err);

    let (code, _, err) = run_cli_timeout(&["migrate"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = run_cli_timeout(&["status", "--json"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert_no_secret("status --json", &out, &err);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let keys: std::collections::BTreeSet<&str> = v
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    for k in [
        "source",
        "slot",
        "slot_exists",
        "slot_active",
        "confirmed_flush_lsn",
        "slot_lag_bytes",
        "daemon_state",
        "files",
        "unnotified_files",
        "tables",
        "reloads",
    ] {
        assert!(keys.contains(k), "status --json has {k}: {out}");
    }
    assert_eq!(v["slot"], db.slot.as_str());
    assert_eq!(v["slot_exists"], false);
    assert_eq!(v["files"], 0);
    assert_eq!(v["tables"], serde_json::json!([]));
    assert_eq!(v["reloads"], serde_json::json!([]));
    let source = v["source"].as_str().unwrap();
    assert!(
        source.contains(&db.name) && source.contains("***"),
        "the source is shown, redacted: {source}"
    );

    let (code, out, err) = run_cli_timeout(&["status"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert_no_secret("status", &out, &err);
    assert!(out.contains(&db.slot) && out.contains("missing"), "{out}");
    db.cleanup().await;
}

#[tokio::test]
async fn drop_slot_drops_the_slot() {
    let db = TestDb::new("clidrop").await;
    let c = db.client().await;
    c.query(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&db.slot],
    )
    .await
    .unwrap();
    let slots = || async {
        db.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(slots().await, 1);
    let dir = cwd();
    let e = env(&[
        ("CDC_EGRESS_SOURCE_URL", &db.url),
        ("CDC_EGRESS_SOURCE_SLOT", &db.slot),
    ]);
    // Without a terminal to ask on, it wants --yes, names the slot and the database, drops nothing.
    let (code, _, err) = run_cli_timeout(&["drop-slot"], &e, dir.path(), QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--yes") && err.contains(&db.slot) && err.contains(&db.name),
        "{err}"
    );
    assert_eq!(slots().await, 1, "nothing dropped without confirmation");
    let (code, out, err) = run_cli_timeout(&["drop-slot", "--yes"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dropped") && out.contains(&db.slot),
        "names the slot: {out}"
    );
    assert_eq!(slots().await, 0);
    let (code, out, err) = run_cli_timeout(&["drop-slot", "--yes"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "dropping a missing slot is fine: {err}");
    assert!(out.contains("nothing to drop"), "{out}");
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// run: definite errors stop it, transient ones are retried.

/// A test database with a table `t (id int PRIMARY KEY)` in a `FOR ALL TABLES` publication.
async fn published_t(tag: &str) -> TestDb {
    let db = TestDb::new(tag).await;
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION {} FOR ALL TABLES",
            db.publication
        ))
        .await
        .unwrap();
    db
}

async fn slots_of(db: &TestDb) -> i64 {
    connect(&pg_base_url())
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 OR database = $2",
            &[&db.slot, &db.name],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn run_without_the_publication_exits_1_and_leaves_no_slot() {
    let db = TestDb::new("clinopub").await;
    db.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = cwd();
    let mut e = db.daemon_env(&db.out_url());
    e.retain(|(k, _)| k != "CDC_EGRESS_SOURCE_URL");
    e.push(("CDC_EGRESS_SOURCE_URL".into(), with_password(&db.url)));
    let (code, out, err) = run_cli_timeout(&["run"], &e, dir.path(), QUICK);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&db.publication),
        "names the publication: {err}"
    );
    assert!(
        err.contains("CREATE PUBLICATION"),
        "says how to create it: {err}"
    );
    assert_no_secret("run without publication", &out, &err);
    assert_eq!(slots_of(&db).await, 0, "no slot left behind");
    db.cleanup().await;
}

#[tokio::test]
async fn run_keeps_retrying_while_the_source_is_down_and_stops_on_sigterm() {
    let dir = cwd();
    let name = unique("clidown");
    let e = env(&[
        (
            "CDC_EGRESS_SOURCE_URL",
            &format!("postgres://postgres:{PW}@127.0.0.1:1/{name}"),
        ),
        ("CDC_EGRESS_SOURCE_SLOT", &format!("{name}_slot")),
        ("CDC_EGRESS_SOURCE_PUBLICATION", &format!("{name}_pub")),
        (
            "CDC_EGRESS_OUTPUT_URL",
            &format!("file://{}", dir.path().join("out").display()),
        ),
        ("CDC_EGRESS_NATS_URL", ""),
        ("CDC_EGRESS_HTTP_LISTEN", ""),
        ("CDC_EGRESS_LOG_LEVEL", "info"),
    ]);
    let mut d = Daemon::start(&e, dir.path(), &[], "daemon.log");
    // A second attempt, and the daemon still runs after it.
    d.wait_for_log_count("127.0.0.1:1", 2, QUICK).await;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "run exited although the failure is transient; log:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("retry"), "the log says it is retrying:\n{log}");
    assert!(
        log.matches("127.0.0.1:1").count() >= 2,
        "the log names the server on each attempt:\n{log}"
    );
    let status = d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM while retrying; log:\n{log}"
    );
    assert_no_secret("run log", "", &log);
}

/// The source is fine but NATS is down: also transient, also retried; nothing is acknowledged.
#[tokio::test]
async fn run_keeps_retrying_while_nats_is_down() {
    let db = published_t("clinats").await;
    let mut e = db.daemon_env(&db.out_url());
    e.retain(|(k, _)| k != "CDC_EGRESS_NATS_URL");
    e.push((
        "CDC_EGRESS_NATS_URL".into(),
        format!("nats://egress:{PW}@127.0.0.1:1"),
    ));
    let mut d = Daemon::start(&e, db.dir.path(), &[], "daemon.log");
    // The daemon records its state after logging the failure.
    d.wait_for_log("127.0.0.1:1", QUICK).await;
    db.wait_until(
        "SELECT state = 'retrying' FROM cdc_egress.daemon",
        QUICK,
        &d,
    )
    .await;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "run exited although NATS being down is transient; log:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("retry"), "{log}");
    assert!(log.contains("127.0.0.1:1"), "names the NATS server: {log}");
    // `status` tells a running, retrying daemon from one that never ran, with the error.
    let (code, out, err) = run_cli_timeout(&["status", "--json"], &e, db.dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["daemon_state"], "retrying", "{out}");
    assert!(
        v["daemon_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1:1")),
        "{out}"
    );
    assert_no_secret("status while NATS is down", &out, &err);
    let status = d.stop().await;
    let log = std::fs::read_to_string(db.dir.path().join("daemon.log")).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_no_secret("run log", "", &log);
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Operators: environment, passwords, confirmations, honest status.

/// Variables of the project's scripts (`CDC_EGRESS_VENV`, `CDC_EGRESS_TEST_*`) are not
/// configuration; a misspelt key of a real section still is an error that names it.
#[test]
fn only_section_variables_are_configuration() {
    let dir = cwd();
    let base = [
        ("CDC_EGRESS_SOURCE_URL", "postgres://postgres@127.0.0.1:1/x"),
        ("CDC_EGRESS_VENV", "/x"),
        ("CDC_EGRESS_PRIVATE_PG_PORT", "1"),
    ];
    let (code, _, err) = run_cli_timeout(&["status"], &env(&base), dir.path(), QUICK);
    assert_eq!(
        code, 1,
        "a connection error, not a configuration error: {err}"
    );
    assert!(!err.contains("CDC_EGRESS_VENV"), "{err}");
    assert_eq!(
        err.matches("127.0.0.1:1").count(),
        1,
        "the error is printed once: {err}"
    );
    let mut bad = base.to_vec();
    bad.push(("CDC_EGRESS_SOURCE_SLOTT", "x"));
    let (code, _, err) = run_cli_timeout(&["status"], &env(&bad), dir.path(), QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CDC_EGRESS_SOURCE_SLOTT"), "{err}");
}

/// `CDC_EGRESS_<SECTION>_<KEY>_FILE` reads the value from a file (container secrets).
#[test]
fn any_key_can_come_from_a_file() {
    let dir = cwd();
    let f = dir.path().join("url");
    std::fs::write(&f, "postgres://postgres@127.0.0.1:1/from_file\n").unwrap();
    let (code, _, err) = run_cli_timeout(
        &["status"],
        &env(&[("CDC_EGRESS_SOURCE_URL_FILE", f.to_str().unwrap())]),
        dir.path(),
        QUICK,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("127.0.0.1:1"),
        "the URL came from the file: {err}"
    );
    let (code, _, err) = run_cli_timeout(
        &["status"],
        &env(&[("CDC_EGRESS_SOURCE_URL_FILE", "/nonexistent/url")]),
        dir.path(),
        QUICK,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CDC_EGRESS_SOURCE_URL_FILE"), "{err}");
}

/// A loopback server that asks for a cleartext password, records what it gets, and rejects it
/// with SQLSTATE 28P01: enough to see which password the client sends.
fn password_server() -> (u16, std::sync::mpsc::Receiver<Option<String>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut len = [0u8; 4];
            if c.read_exact(&mut len).is_err() {
                continue;
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            let _ = c.read_exact(&mut body);
            if body.starts_with(&[0x04, 0xd2, 0x16, 0x2f]) {
                // SSLRequest: no TLS here; the client goes on in plain text.
                let _ = c.write_all(b"N");
                let _ = c.read_exact(&mut len);
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                let _ = c.read_exact(&mut body);
            }
            let _ = c.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
            let mut tag = [0u8; 1];
            let got = if c.read_exact(&mut tag).is_ok() && tag[0] == b'p' {
                let _ = c.read_exact(&mut len);
                let mut pw = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                let _ = c.read_exact(&mut pw);
                Some(
                    String::from_utf8_lossy(&pw)
                        .trim_end_matches('\0')
                        .to_string(),
                )
            } else {
                None
            };
            let mut err = Vec::new();
            for (k, v) in [
                (b'S', "FATAL"),
                (b'C', "28P01"),
                (b'M', "password authentication failed"),
            ] {
                err.push(k);
                err.extend_from_slice(v.as_bytes());
                err.push(0);
            }
            err.push(0);
            let mut msg = vec![b'E'];
            msg.extend_from_slice(&(err.len() as u32 + 4).to_be_bytes());
            msg.extend_from_slice(&err);
            let _ = c.write_all(&msg);
            let _ = tx.send(got);
        }
    });
    (port, rx)
}

/// Passwords the usual ways: `PGPASSWORD`, `PGPASSFILE`, `source.password_file`; none at all is
/// a configuration error (exit 2) that says where a password can go; a rejected one exits 2 too.
#[test]
fn passwords_come_from_pgpassword_pgpassfile_and_password_files() {
    let dir = cwd();
    let (port, rx) = password_server();
    let url = format!("postgres://egress@127.0.0.1:{port}/db?sslmode=disable");
    let pgpass = dir.path().join("pgpass");
    std::fs::write(&pgpass, format!("127.0.0.1:{port}:db:egress:{PW}-pgpass\n")).unwrap();
    {
        // libpq's rule, kept: a password file others can read is ignored.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{PW}-file\n")).unwrap();
    let nowhere = dir.path().join("no-such-pgpass");
    let env_pw = format!("{PW}-env");
    type Case<'a> = (Vec<(&'a str, &'a str)>, Option<String>);
    let cases: [Case; 4] = [
        (vec![("PGPASSWORD", &env_pw)], Some(env_pw.clone())),
        (
            vec![("PGPASSFILE", pgpass.to_str().unwrap())],
            Some(format!("{PW}-pgpass")),
        ),
        (
            vec![
                ("CDC_EGRESS_SOURCE_PASSWORD_FILE", pwfile.to_str().unwrap()),
                ("PGPASSWORD", "loses"),
            ],
            Some(format!("{PW}-file")),
        ),
        (vec![("HOME", nowhere.to_str().unwrap())], None),
    ];
    for (extra, want) in cases {
        let mut e = env(&[("CDC_EGRESS_SOURCE_URL", &url)]);
        e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-egress"));
        cmd.arg("status").current_dir(dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("CDC_EGRESS_") || k.starts_with("PG") {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", dir.path());
        for (k, v) in &e {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(!err.contains(PW), "{extra:?}: the password leaked: {err}");
        match want {
            Some(pw) => {
                let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
                assert_eq!(got.as_deref(), Some(pw.as_str()), "{extra:?}");
                assert!(err.contains("28P01"), "{extra:?}: {err}");
            }
            None => {
                assert!(
                    err.contains("PGPASSWORD") && err.contains("password_file"),
                    "says where a password can go: {err}"
                );
                let _ = rx.recv_timeout(Duration::from_secs(10));
            }
        }
    }
}

/// `notices` reads the stream; it does not create it.
#[test]
fn notices_does_not_create_the_stream() {
    let dir = cwd();
    let name = unique("clinotices").to_uppercase();
    let (code, _, err) = run_cli_timeout(
        &["notices"],
        &env(&[
            ("CDC_EGRESS_SOURCE_URL", PLACEHOLDER_URL),
            ("CDC_EGRESS_NATS_URL", &nats_url()),
            ("CDC_EGRESS_NATS_STREAM", &name),
        ]),
        dir.path(),
        QUICK,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&name) && err.contains("does not exist"),
        "{err}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
        assert!(
            js.get_stream(&name).await.is_err(),
            "stream {name} was created"
        );
    });
}

/// A reload against a publication that does not exist blames the publication; `status` warns;
/// `migrate` run by a non-superuser says the trigger a superuser installed earlier is there.
#[tokio::test]
async fn missing_publication_and_installed_trigger_are_reported_truthfully() {
    let db = TestDb::new("clitruth").await;
    let role = format!("{}_r", db.name);
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE {role} LOGIN REPLICATION; \
         ALTER DATABASE {} OWNER TO {role}; ALTER TABLE t OWNER TO {role}",
        db.name
    ))
    .await
    .unwrap();
    let dir = cwd();
    let role_url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    let e = |source: &str| {
        env(&[
            ("CDC_EGRESS_SOURCE_URL", source),
            ("CDC_EGRESS_REGISTRY_URL", &role_url),
            ("CDC_EGRESS_SOURCE_SLOT", &db.slot),
            ("CDC_EGRESS_SOURCE_PUBLICATION", &db.publication),
        ])
    };
    // A superuser installs the trigger (the registry belongs to the role).
    let (code, out, err) = run_cli_timeout(&["migrate"], &e(&db.url), dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("installed"), "{out}");
    assert!(!err.contains("NOTICE"), "no NOTICE noise: {err}");
    // The role alone: told the trigger is there, no false warning.
    let (code, out, err) = run_cli_timeout(&["migrate"], &e(&role_url), dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is installed"), "{out}");
    assert!(!err.contains("warning"), "{err}");
    // No publication yet.
    let (code, _, err) = run_cli_timeout(&["reload", "public.t"], &e(&db.url), dir.path(), QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&db.publication)
            && err.contains("does not exist")
            && !err.contains("table public.t"),
        "blames the publication, not the table: {err}"
    );
    let (code, out, err) = run_cli_timeout(&["status"], &e(&db.url), dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("warning") && out.contains(&db.publication),
        "status warns about the publication: {out}"
    );
    db.cleanup().await;
    let _ = connect(&pg_base_url())
        .await
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await;
}

/// `reload --wait` with no daemon: says why it waits, gives up at --timeout (exit 1), and the
/// request shows as pending in `status`.
#[tokio::test]
async fn reload_wait_times_out_and_status_shows_the_pending_request() {
    let db = published_t("clipending").await;
    let dir = cwd();
    let e = env(&[
        ("CDC_EGRESS_SOURCE_URL", &db.url),
        ("CDC_EGRESS_SOURCE_SLOT", &db.slot),
        ("CDC_EGRESS_SOURCE_PUBLICATION", &db.publication),
    ]);
    let (code, _, err) = run_cli_timeout(&["migrate"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_cli_timeout(
        &["reload", "public.t", "--wait", "--timeout", "12s"],
        &e,
        dir.path(),
        QUICK,
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("requested (request "), "{out}");
    assert!(err.contains("gave up waiting after 12s"), "{err}");
    assert!(
        err.contains(&format!("replication slot {} does not exist", db.slot)),
        "says why nothing happens: {err}"
    );
    let (code, out, err) = run_cli_timeout(&["status", "--json"], &e, dir.path(), QUICK);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pending_requests"][0]["table"], "public.t", "{out}");
    db.cleanup().await;
}

/// A reload whose cut waits behind an open transaction says so: `status` names the blocking
/// session (pid, age, query), `/metrics` has its age; after the transaction ends, `reload --wait`
/// ends with the reload id, the rows, and where the files are.
#[tokio::test]
async fn a_cut_blocked_by_an_open_transaction_is_explained() {
    let db = TestDb::new("cliblock").await;
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 500); \
             CREATE PUBLICATION {} FOR ALL TABLES",
            db.publication
        ))
        .await
        .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut e = db.daemon_env(&db.out_url());
    e.push(("CDC_EGRESS_HTTP_LISTEN".into(), format!("127.0.0.1:{port}")));
    e.push(("CDC_EGRESS_RELOAD_INITIAL".into(), "false".into()));
    let d = Daemon::start(&e, db.dir.path(), &[], "daemon.log");
    db.wait_for_slot(&d).await;
    // An idle session holding an xid.
    let blocker = db.client().await;
    let blocker_pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    blocker
        .batch_execute("BEGIN; SELECT txid_current(); SELECT 'cdct blocker'")
        .await
        .unwrap();
    // `--wait` says what the cut waits for, and how much WAL is retained meanwhile.
    let (code, _, err) = run_cli_timeout(
        &["reload", "public.t", "--wait", "--timeout", "15s"],
        &e,
        db.dir.path(),
        QUICK,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("open transaction to end: pid {blocker_pid} "))
            && err.contains("bytes of WAL meanwhile"),
        "{err}"
    );
    // A cut waits for every transaction of the cluster that was running when it began, so other
    // tests' transactions may be listed too: ours must be among them.
    let mut seen = None;
    for _ in 0..60 {
        let (_, out, _) = run_cli_timeout(&["status", "--json"], &e, db.dir.path(), QUICK);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) {
            let ours = v["cut_blockers"]
                .as_array()
                .and_then(|a| a.iter().find(|b| b["pid"] == blocker_pid).cloned());
            if let Some(b) = ours {
                seen = Some((b, v["warnings"].clone()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (b, warnings) =
        seen.unwrap_or_else(|| panic!("status never named the blocker; log:\n{}", d.log_text()));
    assert!(
        b["query"].as_str().unwrap_or("").contains("cdct blocker"),
        "{b}"
    );
    assert!(
        warnings.to_string().contains(&blocker_pid.to_string()),
        "{warnings}"
    );
    let mut metric = 0.0;
    for _ in 0..30 {
        let body = http_get(port, "/metrics").await;
        metric = body
            .lines()
            .find(|l| l.starts_with("cdc_egress_reload_cut_blocked_seconds "))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if metric > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(metric > 0.0, "the metric shows the wait");
    blocker.batch_execute("COMMIT").await.unwrap();
    // The reload now finishes; --wait on a fresh request reports where the files are.
    let (code, out, err) = run_cli_timeout(
        &["reload", "public.t", "--wait", "--timeout", "60s"],
        &e,
        db.dir.path(),
        Duration::from_secs(90),
    );
    if code != 0 {
        // The first reload may still be finishing: wait for it, then ask again.
        assert!(err.contains("already"), "{out}\n{err}");
        db.wait_until(
            "SELECT count(*) = 0 FROM cdc_egress.reloads WHERE status IN ('requested', 'running')",
            QUICK,
            &d,
        )
        .await;
        let (code, out, err) = run_cli_timeout(
            &["reload", "public.t", "--wait", "--timeout", "60s"],
            &e,
            db.dir.path(),
            Duration::from_secs(90),
        );
        assert_eq!(code, 0, "{out}\n{err}\nlog:\n{}", d.log_text());
        check_done(&out);
    } else {
        check_done(&out);
    }
    fn check_done(out: &str) {
        assert!(
            out.contains("done: 500 rows") && out.contains("manifest file://"),
            "{out}"
        );
    }
    d.stop().await;
    db.cleanup().await;
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let _ = s
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    body
}

/// The supported range is enforced on connect: against PostgreSQL 14 or newer the commands work;
/// against an older server (deploy/local/pg_versions.sh runs this on 13) every command that talks to
/// the source refuses with a configuration error (exit 2) before changing anything.
#[tokio::test]
async fn server_version_is_checked() {
    let db = TestDb::new("cliversion").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION {} FOR ALL TABLES",
        db.publication
    ))
    .await
    .unwrap();
    let num: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let dir = cwd();
    let e = db.daemon_env(&db.out_url());
    if num >= 140000 {
        let (code, out, err) = run_cli_timeout(&["drop-slot"], &e, dir.path(), QUICK);
        assert_eq!(code, 0, "PostgreSQL {num} is supported: {err}");
        assert!(out.contains("nothing to drop"), "{out}");
    } else {
        let refusal = format!(
            "PostgreSQL {}.{} is not supported: cdc-egress needs 14 or newer",
            num / 10000,
            num % 10000
        );
        for args in [
            &["run"][..],
            &["migrate"],
            &["status"],
            &["reload", "public.t"],
            &["drop-slot"],
        ] {
            let (code, _, err) = run_cli_timeout(args, &e, dir.path(), QUICK);
            assert_eq!(code, 2, "{args:?} against PostgreSQL {num}: {err}");
            assert!(err.contains(&refusal), "{args:?}: {err}");
        }
        let registry: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'cdc_egress'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(registry, 0, "nothing was installed on the refused server");
        assert_eq!(slots_of(&db).await, 0, "no slot on the refused server");
    }
    db.cleanup().await;
}
