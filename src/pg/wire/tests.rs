//! Integration tests against the local PostgreSQL (`CDC_EGRESS_TEST_PG_URL`, a URL, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; trust auth, `wal_level=logical`, TLS on), each in
//! its own database, plus tests against an in-process mock server for what the local server
//! cannot show (password/MD5/SCRAM authentication, frame splitting, hostile frames).

use super::backend::server_message;
use super::frame::MAX_FRAME;
use super::*;
use crate::lsn::Lsn;
use crate::pg::conninfo::pg_error;
use futures::FutureExt;
use postgres_protocol::authentication::md5_hash;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
const LIMIT: Duration = Duration::from_secs(60);

fn base_url() -> String {
    std::env::var("CDC_EGRESS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// The base URL with query parameters added (later ones override earlier ones).
fn base_with(params: &str) -> ConnInfo {
    let url = base_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    ConnInfo::parse(&format!("{url}{sep}{params}")).unwrap()
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn pg(e: tokio_postgres::Error) -> Error {
    pg_error(e)
}

/// Runs `test` with the name of a fresh database; afterwards (also after a failure or panic)
/// terminates its sessions, drops its replication slots and drops it.
async fn with_db<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let admin = base_with("sslmode=disable")
        .connect()
        .await
        .expect("admin connection");
    let db = unique("cdc_wire");
    admin
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db)))
        .await
        .expect("CREATE DATABASE");
    let outcome =
        tokio::time::timeout(LIMIT, AssertUnwindSafe(test(db.clone())).catch_unwind()).await;
    drop_db(&admin, &db).await;
    match outcome {
        Err(_) => panic!("test did not finish within {LIMIT:?}"),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Ok(Ok(Err(e))) => panic!("{e} (kind {:?}, sqlstate {:?})", e.kind(), e.sqlstate()),
        Ok(Ok(Ok(()))) => {}
    }
}

/// A setting of the test server (`SHOW`), read over a plain connection.
async fn server_setting(name: &str) -> String {
    let admin = base_with("sslmode=disable")
        .connect()
        .await
        .expect("admin connection");
    let row = admin
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .expect("current_setting");
    row.get(0)
}

/// The TLS tests need a server with `ssl = on` (Debian's clusters, and the private server of
/// deploy/local/services.sh, use the snakeoil certificate); elsewhere they say so and stop.
async fn server_offers_tls(test: &str) -> bool {
    let on = server_setting("ssl").await == "on";
    if !on {
        eprintln!("skipped {test}: the test server has ssl = off");
    }
    on
}

async fn drop_db(admin: &tokio_postgres::Client, db: &str) {
    for _ in 0..100 {
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .await;
        let _ = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = $1 AND NOT active",
                &[&db],
            )
            .await;
        if admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_ident(db)))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("warning: could not drop test database {db}");
}

fn one(rows: &[Vec<Option<String>>]) -> Option<&str> {
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].len(), 1, "{rows:?}");
    rows[0][0].as_deref()
}

async fn check_identify_system(conn: &mut ReplicationConnection, db: &str) -> Result<(), Error> {
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.len(), 4, "systemid, timeline, xlogpos, dbname: {row:?}");
    row[0].as_deref().unwrap().parse::<u64>().expect("systemid");
    assert!(row[1].as_deref().unwrap().parse::<u32>().expect("timeline") >= 1);
    assert!(row[2].as_deref().unwrap().parse::<Lsn>().expect("xlogpos") > Lsn::ZERO);
    assert_eq!(row[3].as_deref(), Some(db));
    Ok(())
}

const SSL_IN_USE: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[tokio::test]
async fn tcp_without_tls_identifies_the_system() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable").with_dbname(&db);
        let mut conn = ReplicationConnection::connect(&info).await?;
        assert!(conn.parameter("server_version").is_some());
        assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
        assert_eq!(conn.parameter("no_such_parameter"), None);
        check_identify_system(&mut conn, &db).await?;
        assert_eq!(one(&conn.simple_query(SSL_IN_USE).await?), Some("f"));
        let rows = conn
            .simple_query("SELECT NULL::text, 'x', ''; SELECT 2")
            .await?;
        assert_eq!(
            rows,
            vec![
                vec![None, Some("x".into()), Some(String::new())],
                vec![Some("2".into())]
            ]
        );
        conn.close().await
    })
    .await;
}

#[tokio::test]
async fn unix_socket_never_uses_tls() {
    let dirs = server_setting("unix_socket_directories").await;
    let socket_dir = dirs.split(',').next().unwrap_or("").trim().to_string();
    let port = ConnInfo::parse(&base_url()).unwrap().port();
    if !Path::new(&socket_dir)
        .join(format!(".s.PGSQL.{port}"))
        .exists()
    {
        eprintln!("skipped: the test server has no socket here ({socket_dir:?}, port {port})");
        return;
    }
    with_db(|db| async move {
        // sslmode=require is ignored on a unix socket, like libpq.
        let info = base_with(&format!("host={socket_dir}&sslmode=require")).with_dbname(&db);
        assert!(info.host_description().starts_with(&socket_dir));
        let mut conn = ReplicationConnection::connect(&info).await?;
        check_identify_system(&mut conn, &db).await?;
        assert_eq!(
            one(&conn
                .simple_query("SELECT inet_client_addr() IS NULL")
                .await?),
            Some("t")
        );

        let client = info.connect().await?;
        let row = client
            .query_one("SELECT inet_client_addr() IS NULL, current_database()", &[])
            .await
            .map_err(pg)?;
        assert!(row.get::<_, bool>(0));
        assert_eq!(row.get::<_, String>(1), db);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn sslmode_require_encrypts_every_kind_of_connection() {
    if !server_offers_tls("sslmode_require_encrypts_every_kind_of_connection").await {
        return;
    }
    with_db(|db| async move {
        let info = base_with("sslmode=require").with_dbname(&db);
        let client = info.connect().await?;
        assert!(client
            .query_one(SSL_IN_USE, &[])
            .await
            .map_err(pg)?
            .get::<_, bool>(0));

        let pool = info.pool(2)?;
        let pooled = pool
            .get()
            .await
            .map_err(|e| Error::transient(Component::Test, e.to_string()))?;
        assert!(pooled
            .query_one(SSL_IN_USE, &[])
            .await
            .map_err(pg)?
            .get::<_, bool>(0));

        let mut conn = ReplicationConnection::connect(&info).await?;
        assert_eq!(one(&conn.simple_query(SSL_IN_USE).await?), Some("t"));
        check_identify_system(&mut conn, &db).await?;

        // prefer (the default) also ends up encrypted when the server offers TLS.
        let mut conn =
            ReplicationConnection::connect(&base_with("sslmode=prefer").with_dbname(&db)).await?;
        assert_eq!(one(&conn.simple_query(SSL_IN_USE).await?), Some("t"));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn certificate_verification_rejects_the_snakeoil_certificate() {
    if !server_offers_tls("certificate_verification_rejects_the_snakeoil_certificate").await {
        return;
    }
    with_db(|db| async move {
        // Not signed by any public root: verify-full (and verify-ca) fail, definitely.
        for mode in ["verify-full", "verify-ca"] {
            let info = base_with(&format!("sslmode={mode}")).with_dbname(&db);
            let err = ReplicationConnection::connect(&info)
                .await
                .err()
                .expect("must fail");
            assert!(!err.is_transient(), "{err}");
            assert!(
                err.message().contains("TLS handshake") && err.message().contains("certificate"),
                "{err}"
            );
            let err = info.connect().await.expect_err("must fail");
            assert!(!err.is_transient(), "{err}");
            assert!(
                err.message().contains("TLS") && err.message().contains("certificate"),
                "{err}"
            );
        }
        if !Path::new(SNAKEOIL).exists() {
            eprintln!("skipped the sslrootcert part: no {SNAKEOIL}");
            return Ok(());
        }
        // Trusting the snakeoil certificate itself: the chain is fine, but it names `localhost`,
        // not 127.0.0.1, so only verify-full fails.
        for mode in ["verify-ca", "require"] {
            let info =
                base_with(&format!("sslmode={mode}&sslrootcert={SNAKEOIL}")).with_dbname(&db);
            let mut conn = ReplicationConnection::connect(&info).await?;
            assert_eq!(one(&conn.simple_query(SSL_IN_USE).await?), Some("t"));
            assert!(info
                .connect()
                .await?
                .query_one(SSL_IN_USE, &[])
                .await
                .map_err(pg)?
                .get::<_, bool>(0));
        }
        let info =
            base_with(&format!("sslmode=verify-full&sslrootcert={SNAKEOIL}")).with_dbname(&db);
        let err = ReplicationConnection::connect(&info)
            .await
            .err()
            .expect("must fail");
        assert!(
            !err.is_transient() && err.message().contains("certificate"),
            "{err}"
        );
        let err = info.connect().await.expect_err("must fail");
        assert!(
            !err.is_transient() && err.message().contains("certificate"),
            "{err}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn session_settings_override_database_defaults() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable&application_name=cdc%20test&options=-c%20DateStyle%3DGerman")
            .with_dbname(&db);
        let client = info.connect().await?;
        client
            .batch_execute(&format!(
                "ALTER DATABASE {0} SET DateStyle = 'SQL, DMY'; ALTER DATABASE {0} SET TimeZone = 'America/New_York';
                 ALTER DATABASE {0} SET IntervalStyle = 'sql_standard'; ALTER DATABASE {0} SET extra_float_digits = 0;
                 ALTER DATABASE {0} SET bytea_output = 'escape'",
                quote_ident(&db)
            ))
            .await
            .map_err(pg)?;

        // Without our options a new session gets the database's settings (so the test means something).
        let mut plain = info.pg_config();
        plain.options("");
        let (raw, conn) = plain.connect(tokio_postgres::NoTls).await.map_err(pg)?;
        tokio::spawn(conn);
        let row = raw.query_one("SELECT current_setting('bytea_output'), current_setting('TimeZone')", &[]).await.map_err(pg)?;
        assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, String>(1).as_str()), ("escape", "America/New_York"));

        const CHECK: &str = "SELECT current_setting('TimeZone'), current_setting('DateStyle'), \
            current_setting('IntervalStyle'), current_setting('extra_float_digits'), current_setting('bytea_output'), \
            current_setting('application_name'), '2024-03-05 01:02:03+00'::timestamptz::text, \
            '1 day 02:00'::interval::text, (1::float8 / 3)::text, '\\x01ff'::bytea::text";
        let expected = |date_style: &str| {
            vec![
                "UTC".to_string(),
                date_style.to_string(),
                "postgres".into(),
                "3".into(),
                "hex".into(),
                "cdc test".into(),
                "2024-03-05 01:02:03+00".into(),
                "1 day 02:00:00".into(),
                "0.3333333333333333".into(),
                "\\x01ff".into(),
            ]
        };
        let fresh = info.connect().await?;
        let pool = info.pool(1)?;
        let pooled = pool.get().await.map_err(|e| Error::transient(Component::Test, e.to_string()))?;
        for c in [&fresh, &**pooled] {
            let row = c.query_one(CHECK, &[]).await.map_err(pg)?;
            let got: Vec<String> = (0..10).map(|i| row.get(i)).collect();
            let date_style = got[1].clone();
            assert!(date_style.starts_with("ISO,"), "{date_style}");
            assert_eq!(got, expected(&date_style));
        }
        let mut conn = ReplicationConnection::connect(&info).await?;
        let rows = conn.simple_query(CHECK).await?;
        let got: Vec<String> = rows[0].iter().map(|v| v.clone().unwrap()).collect();
        assert_eq!(got, expected(&got[1]));
        assert!(got[1].starts_with("ISO,"));
        Ok(())
    })
    .await;
}

/// A standby status update: 'r', written/flushed/applied LSNs, client clock, reply flag.
fn status_update(lsn: Lsn) -> [u8; 34] {
    let mut msg = [0u8; 34];
    msg[0] = b'r';
    for field in 0..3 {
        msg[1 + 8 * field..9 + 8 * field].copy_from_slice(&lsn.0.to_be_bytes());
    }
    // msg[25..33]: client clock (µs since 2000-01-01), 0 is accepted; msg[33]: reply requested = 0.
    msg
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[tokio::test]
async fn streams_inserts_over_copy_both() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable").with_dbname(&db);
        let client = info.connect().await?;
        client
            .batch_execute(
                "CREATE TABLE t (id int PRIMARY KEY, note text); CREATE PUBLICATION p FOR TABLE t",
            )
            .await
            .map_err(pg)?;
        let slot = unique("slot");
        let mut conn = ReplicationConnection::connect(&info).await?;
        let created = conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_ident(&slot)
            ))
            .await?;
        assert_eq!(created.len(), 1);
        assert_eq!(created[0][0].as_deref(), Some(slot.as_str()));
        created[0][1]
            .as_deref()
            .unwrap()
            .parse::<Lsn>()
            .expect("consistent_point");
        assert_eq!(created[0][2], None, "no snapshot exported");
        assert_eq!(created[0][3].as_deref(), Some("pgoutput"));

        client
            .batch_execute("INSERT INTO t VALUES (1, 'first row'), (2, 'second row')")
            .await
            .map_err(pg)?;
        let (mut reader, mut writer) = conn
            .start_copy_both(&format!(
                "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})",
                quote_ident(&slot),
                quote_literal("p")
            ))
            .await?;

        let mut inserts = Vec::new();
        let mut wal_end = Lsn::ZERO;
        while inserts.len() < 2 {
            let msg = reader
                .next()
                .await?
                .expect("stream ended before the inserts");
            match msg.first() {
                Some(b'w') => {
                    assert!(msg.len() >= 25, "XLogData header");
                    wal_end = wal_end.max(Lsn(be_u64(&msg, 9)));
                    let payload = msg.slice(25..);
                    if payload.first() == Some(&b'I') {
                        inserts.push(payload);
                    }
                }
                Some(b'k') => {
                    assert_eq!(msg.len(), 18, "keepalive");
                    wal_end = wal_end.max(Lsn(be_u64(&msg, 1)));
                    if msg[17] == 1 {
                        writer.send(&status_update(wal_end)).await?;
                    }
                }
                other => panic!("unexpected replication message {other:?}"),
            }
        }
        let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(contains(&inserts[0], b"first row") && contains(&inserts[1], b"second row"));

        writer.send(&status_update(wal_end)).await?;
        writer.finish().await?;
        // The server answers our CopyDone with its own, possibly after data still in flight.
        while reader.next().await?.is_some() {}
        assert!(reader.next().await?.is_none(), "end of stream is sticky");

        // The status update was understood: the slot's confirmed position moved.
        let confirmed: String = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg)?
            .get(0);
        assert!(
            confirmed.parse::<Lsn>().unwrap() >= wal_end,
            "{confirmed} < {wal_end}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn exported_snapshot_is_usable_and_slot_can_be_dropped() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable").with_dbname(&db);
        let client = info.connect().await?;
        client
            .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
            .await
            .map_err(pg)?;
        let slot = unique("slot");
        let mut conn = ReplicationConnection::connect(&info).await?;
        let created = conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(&slot)
            ))
            .await?;
        let snapshot = created[0][2].clone().expect("snapshot name");
        client
            .batch_execute("INSERT INTO t VALUES (2)")
            .await
            .map_err(pg)?;

        let reader = info.connect().await?;
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&snapshot)
            ))
            .await
            .map_err(pg)?;
        let seen: i64 = reader
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .map_err(pg)?
            .get(0);
        assert_eq!(seen, 1, "the snapshot predates the second insert");
        reader.batch_execute("COMMIT").await.map_err(pg)?;

        conn.simple_query(&format!("DROP_REPLICATION_SLOT {}", quote_ident(&slot)))
            .await?;
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg)?
            .get(0);
        assert_eq!(left, 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn server_errors_are_classified_with_sqlstate() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable").with_dbname(&db);
        let mut conn = ReplicationConnection::connect(&info).await?;
        let err = conn
            .simple_query("SELECT * FROM no_such_table")
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("42P01"));
        assert!(!err.is_transient());
        assert!(
            err.message().contains("\"no_such_table\" does not exist"),
            "{err}"
        );
        // Still usable after an error.
        assert_eq!(one(&conn.simple_query("SELECT 1").await?), Some("1"));
        let err = conn.simple_query("SELECT 1/0").await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("22012"));

        let err = conn
            .start_copy_both("START_REPLICATION SLOT no_such_slot LOGICAL 0/0")
            .await
            .err()
            .expect("missing slot");
        assert_eq!(err.sqlstate(), Some("42704"));
        assert!(!err.is_transient());
        assert!(
            err.message()
                .contains("replication slot \"no_such_slot\" does not exist"),
            "{err}"
        );

        let err = ReplicationConnection::connect(&info.with_dbname("no_such_database_xyz"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.sqlstate(), Some("3D000"));
        assert!(!err.is_transient());
        let err = info
            .with_dbname("no_such_database_xyz")
            .connect()
            .await
            .err()
            .unwrap();
        assert_eq!(err.sqlstate(), Some("3D000"));
        assert!(err.message().contains("no_such_database_xyz"), "{err}");
        Ok(())
    })
    .await;
}

/// One classifier for every connection: a session ended by an administrator (57P01) is
/// transient whether it was reading the catalog, the registry or replicating, and the error
/// says what the server said.
#[tokio::test]
async fn admin_shutdown_is_transient_on_every_kind_of_connection() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable").with_dbname(&db);
        for component in [Component::Source, Component::Registry, Component::Reload] {
            let victim = info.connect().await?;
            let pid: i32 = victim
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(pg)?
                .get(0);
            let admin = info.connect().await?;
            admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(pg)?;
            let mut err = None;
            for _ in 0..50 {
                match victim.query_one("SELECT 1", &[]).await {
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(e) => {
                        err = Some(Error::postgres(component, "describe a relation", e));
                        break;
                    }
                }
            }
            let err = err.expect("the terminated session fails");
            assert!(err.is_transient(), "{component}: {err}");
            assert_eq!(err.component(), component);
            assert!(
                err.to_string().starts_with("describe a relation: "),
                "{err}"
            );
            // Either the server's FATAL 57P01 reached us, or only the closed socket did:
            // both are transient, and a server error keeps its code and text.
            if let Some(code) = err.sqlstate() {
                assert_eq!(code, "57P01", "{err}");
                assert!(err.to_string().contains("terminating connection"), "{err}");
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn slot_held_by_another_session_is_transient() {
    with_db(|db| async move {
        let info = base_with("sslmode=disable").with_dbname(&db);
        let slot = unique("slot");
        let mut owner = ReplicationConnection::connect(&info).await?;
        owner
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput",
                quote_ident(&slot)
            ))
            .await?;
        let other = ReplicationConnection::connect(&info).await?;
        let err = other
            .start_copy_both(&format!(
                "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names 'p')",
                quote_ident(&slot)
            ))
            .await
            .err()
            .expect("slot is in use");
        assert_eq!(err.sqlstate(), Some("55006"), "{err}");
        assert!(err.is_transient());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn closed_port_is_transient_and_names_host_and_port() {
    for mode in ["disable", "prefer"] {
        let info = ConnInfo::parse(&format!(
            "postgres://postgres@127.0.0.1:1/postgres?sslmode={mode}"
        ))
        .unwrap();
        let err = ReplicationConnection::connect(&info)
            .await
            .err()
            .expect("nothing listens on port 1");
        assert!(err.is_transient(), "{err}");
        assert!(err.message().contains("127.0.0.1:1"), "{err}");
        let err = info.connect().await.expect_err("nothing listens on port 1");
        assert!(err.is_transient(), "{err}");
        assert!(err.message().contains("127.0.0.1:1"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// mock server

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn auth(code: i32, data: &[u8]) -> Vec<u8> {
    frame(b'R', &[&code.to_be_bytes()[..], data].concat())
}

fn fields(pairs: &[(u8, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, v) in pairs {
        out.push(*t);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.push(0);
    out
}

fn auth_failed() -> Vec<u8> {
    frame(
        b'E',
        &fields(&[
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed"),
        ]),
    )
}

/// AuthenticationOk, a parameter, BackendKeyData and ReadyForQuery.
fn welcome() -> Vec<u8> {
    [
        auth(0, &[]),
        frame(b'S', b"server_version\x0099.0\x00"),
        frame(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]),
        frame(b'Z', b"I"),
    ]
    .concat()
}

async fn read_startup(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let len = s.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    body
}

async fn read_msg(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    let tag = s.read_u8().await.unwrap();
    let len = s.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// Listens on a loopback port, runs `script` for the first connection, and returns settings
/// pointing there (user `u`, password `secret`).
async fn mock<F, Fut>(script: F) -> (ConnInfo, tokio::task::JoinHandle<()>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let startup = read_startup(&mut s).await;
        let text = String::from_utf8_lossy(&startup).into_owned();
        assert!(text.contains("replication\0database\0"), "{text:?}");
        assert!(text.contains("-c bytea_output=hex"), "{text:?}");
        script(s).await;
    });
    let info = ConnInfo::parse(&format!(
        "postgres://u:secret@127.0.0.1:{port}/d?sslmode=disable&connect_timeout=20"
    ))
    .unwrap();
    (info, server)
}

#[tokio::test]
async fn cleartext_and_md5_passwords() {
    let (info, server) = mock(|mut s| async move {
        s.write_all(&auth(3, &[])).await.unwrap();
        assert_eq!(read_msg(&mut s).await, (b'p', b"secret\0".to_vec()));
        s.write_all(&welcome()).await.unwrap();
    })
    .await;
    let conn = ReplicationConnection::connect(&info).await.unwrap();
    assert_eq!(conn.parameter("server_version"), Some("99.0"));
    server.await.unwrap();

    let (info, server) = mock(|mut s| async move {
        s.write_all(&auth(5, &[1, 2, 3, 4])).await.unwrap();
        let (tag, body) = read_msg(&mut s).await;
        assert_eq!(tag, b'p');
        assert_eq!(
            body,
            [md5_hash(b"u", b"secret", [1, 2, 3, 4]).as_bytes(), b"\0"].concat()
        );
        s.write_all(&welcome()).await.unwrap();
    })
    .await;
    ReplicationConnection::connect(&info).await.unwrap();
    server.await.unwrap();

    // A server asking for a password we do not have: definite, says why.
    let (info, _server) = mock(|mut s| async move {
        s.write_all(&auth(3, &[])).await.unwrap();
        let _ = s.read_u8().await;
    })
    .await;
    let no_password = ConnInfo::parse(&info.redacted().replace(":***", "")).unwrap();
    let err = ReplicationConnection::connect(&no_password)
        .await
        .err()
        .unwrap();
    assert!(
        !err.is_transient() && err.message().contains("none is configured"),
        "{err}"
    );

    let (info, _server) = mock(|mut s| async move {
        s.write_all(&auth(7, &[])).await.unwrap();
        let _ = s.read_u8().await;
    })
    .await;
    let err = ReplicationConnection::connect(&info).await.err().unwrap();
    assert!(
        !err.is_transient() && err.message().contains("GSSAPI"),
        "{err}"
    );
}

/// Every authentication request we refuse or cannot read, and a bad ParameterStatus, is a
/// definite error that says which; nothing panics.
#[tokio::test]
async fn refused_and_malformed_startup_messages() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            auth(2, &[]),
            "unsupported authentication method Kerberos V5 (2)",
        ),
        (
            auth(6, &[]),
            "unsupported authentication method SCM credentials (6)",
        ),
        (auth(7, &[]), "unsupported authentication method GSSAPI (7)"),
        (
            auth(8, b"token"),
            "unsupported authentication method GSSAPI (8)",
        ),
        (auth(9, &[]), "unsupported authentication method SSPI (9)"),
        (
            auth(10, b"OTHER\0\0"),
            "unsupported SASL mechanisms [\"OTHER\"]",
        ),
        (
            auth(4, &[]),
            "malformed authentication request: unknown authentication tag `4`",
        ),
        (frame(b'R', &[0, 0]), "malformed authentication request"),
        (auth(5, &[1, 2, 3]), "malformed authentication request"),
        (
            auth(5, &[1, 2, 3, 4, 5]),
            "malformed authentication request",
        ),
        (auth(0, &[0]), "malformed authentication request"),
        (
            auth(10, b"SCRAM-SHA-256\0"),
            "malformed authentication request",
        ),
        (
            auth(10, b"SCRAM-SHA-256\0\0x"),
            "malformed authentication request",
        ),
        (auth(11, b"r=x"), "SASL continue without SASL start"),
        (
            [auth(0, &[]), frame(b'S', b"name\0")].concat(),
            "malformed ParameterStatus",
        ),
        (
            [auth(0, &[]), frame(b'S', b"name\0\xff\0")].concat(),
            "malformed ParameterStatus",
        ),
        (
            [auth(0, &[]), frame(b'T', &[0, 0])].concat(),
            "unexpected message 'T' during startup",
        ),
    ];
    for (stream, text) in cases {
        let (info, _server) = mock(move |mut s| async move {
            s.write_all(&stream).await.unwrap();
            let _ = s.read_u8().await;
        })
        .await;
        let err = ReplicationConnection::connect(&info).await.err().unwrap();
        assert!(!err.is_transient(), "{err}");
        assert!(err.message().contains(text), "{text}: {err}");
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Server side of SCRAM-SHA-256 (RFC 5802/7677) for password `secret`. `tamper` corrupts the
/// server signature, to check that the client verifies it.
async fn scram_server(mut s: TcpStream, tamper: bool) {
    s.write_all(&auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut s).await;
    assert_eq!(tag, b'p');
    let (mechanism, rest) = body.split_at(body.iter().position(|&c| c == 0).unwrap());
    assert_eq!(mechanism, b"SCRAM-SHA-256");
    let client_first = std::str::from_utf8(&rest[5..]).unwrap().to_string();
    let client_first_bare = client_first
        .strip_prefix("n,,")
        .expect("no channel binding")
        .to_string();
    let client_nonce = client_first_bare.strip_prefix("n=,r=").unwrap();
    let (salt, iterations) = (b"pepper and salt", 16u32);
    let server_first = format!("r={client_nonce}SRV,s={},i={iterations}", base64(salt));
    s.write_all(&auth(11, server_first.as_bytes()))
        .await
        .unwrap();

    let (_, body) = read_msg(&mut s).await;
    let client_final = std::str::from_utf8(&body).unwrap();
    let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
    assert!(without_proof.starts_with("c=biws,"), "{without_proof}");
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let mut u = hmac(b"secret", &[&salt[..], &1u32.to_be_bytes()].concat());
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(b"secret", &u);
        salted.iter_mut().zip(u).for_each(|(x, y)| *x ^= y);
    }
    use sha2::Digest;
    let client_key = hmac(&salted, b"Client Key");
    let signature = hmac(&sha2::Sha256::digest(client_key), auth_message.as_bytes());
    let expected: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(a, b)| a ^ b)
        .collect();
    if proof != base64(&expected) {
        s.write_all(&auth_failed()).await.unwrap();
        return;
    }
    let mut server_signature = hmac(&hmac(&salted, b"Server Key"), auth_message.as_bytes());
    if tamper {
        server_signature[0] ^= 1;
    }
    s.write_all(&auth(
        12,
        format!("v={}", base64(&server_signature)).as_bytes(),
    ))
    .await
    .unwrap();
    s.write_all(&welcome()).await.unwrap();
    let _ = s.read_u8().await;
}

#[tokio::test]
async fn scram_sha_256_without_channel_binding() {
    let (info, server) = mock(|s| scram_server(s, false)).await;
    let conn = ReplicationConnection::connect(&info).await.unwrap();
    assert_eq!(conn.parameter("server_version"), Some("99.0"));
    drop(conn);
    server.await.unwrap();

    let (info, _server) = mock(|s| scram_server(s, false)).await;
    let wrong = ConnInfo::parse(&info.redacted().replace(":***", ":wrong")).unwrap();
    let err = ReplicationConnection::connect(&wrong).await.err().unwrap();
    assert_eq!(err.sqlstate(), Some("28P01"));
    assert!(!err.is_transient());

    let (info, _server) = mock(|s| scram_server(s, true)).await;
    let err = ReplicationConnection::connect(&info).await.err().unwrap();
    assert!(
        !err.is_transient() && err.message().contains("SCRAM"),
        "{err}"
    );
}

/// Welcome, expect a query, answer CopyBothResponse, then send `stream` in `chunk`-byte pieces.
async fn copy_server(mut s: TcpStream, stream: Vec<u8>, chunk: usize) {
    s.write_all(&welcome()).await.unwrap();
    let (tag, _) = read_msg(&mut s).await;
    assert_eq!(tag, b'Q');
    s.write_all(&frame(b'W', &[0, 0, 0])).await.unwrap();
    for piece in stream.chunks(chunk) {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
        if chunk < 64 {
            tokio::task::yield_now().await;
        }
    }
    // Drain until the client is gone.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink).await;
}

async fn copy_client(info: &ConnInfo) -> (CopyReader, CopyWriter) {
    let conn = ReplicationConnection::connect(info).await.unwrap();
    conn.start_copy_both("START_REPLICATION SLOT s LOGICAL 0/0")
        .await
        .unwrap()
}

/// `n` CopyData payloads (one larger than a read chunk, one empty) and the server's byte stream
/// carrying them, with a NoticeResponse and a ParameterStatus among them, ended by CopyDone.
fn copy_stream_of(n: u32) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("w-payload-{i}").into_bytes())
        .collect();
    payloads.insert(50, vec![b'w'; 300 * 1024]); // larger than one read chunk
    payloads.insert(51, Vec::new());
    let mut stream = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        stream.extend(frame(b'd', p));
        if i == 10 {
            stream.extend(frame(
                b'N',
                &fields(&[(b'V', "NOTICE"), (b'C', "00000"), (b'M', "hello")]),
            ));
            stream.extend(frame(b'S', b"TimeZone\0UTC\0"));
        }
    }
    stream.extend(frame(b'c', &[]));
    (payloads, stream)
}

#[tokio::test]
async fn copy_frames_survive_any_read_boundaries() {
    let (payloads, stream) = copy_stream_of(200);
    for chunk in [1, 7, 4096, 1 << 20] {
        let (info, _server) = mock({
            let stream = stream.clone();
            move |s| copy_server(s, stream, chunk)
        })
        .await;
        let (mut reader, mut writer) = copy_client(&info).await;
        for (i, expected) in payloads.iter().enumerate() {
            let got = reader
                .next()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("ended at {i}"));
            assert_eq!(
                &got[..],
                &expected[..],
                "payload {i} with {chunk}-byte reads"
            );
        }
        assert!(reader.next().await.unwrap().is_none());
        assert!(reader.next().await.unwrap().is_none());
        writer.send(&status_update(Lsn(1))).await.unwrap();
        writer.finish().await.unwrap();
    }
}

/// Streams a server may send after CopyBothResponse, whether the error they cause is transient, and
/// a text it contains.
fn hostile_cases() -> Vec<(Vec<u8>, bool, &'static str)> {
    let oversized = [&[b'd'][..], &(MAX_FRAME as u32 + 1).to_be_bytes()].concat();
    let undersized = [&[b'd'][..], &3u32.to_be_bytes()].concat();
    let unknown = frame(b'?', b"");
    let bad_error = frame(b'E', b"Cbroken");
    let truncated = [&frame(b'd', b"ok")[..], &[b'd', 0, 0, 0, 100, 1, 2]].concat();
    let server_error = frame(
        b'E',
        &fields(&[
            (b'V', "FATAL"),
            (b'C', "57P01"),
            (b'M', "terminating connection"),
        ]),
    );
    vec![
        (oversized, false, "invalid length"),
        (undersized, false, "invalid length"),
        (unknown, false, "unexpected message"),
        (bad_error, false, "malformed ErrorResponse"),
        (truncated, true, "closed the connection"),
        (server_error, true, "57P01"),
    ]
}

#[tokio::test]
async fn hostile_frames_are_errors_not_panics() {
    for (stream, transient, text) in hostile_cases() {
        let (info, server) = hostile_server(stream).await;
        let (mut reader, _writer) = copy_client(&info).await;
        server.await.unwrap();
        let err = loop {
            match reader.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{text}: stream ended cleanly"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.is_transient(), transient, "{err}");
        assert!(err.message().contains(text), "{err}");
    }
}

/// A server that says hello, answers the query with CopyBothResponse and sends `stream`, then hangs up.
async fn hostile_server(stream: Vec<u8>) -> (ConnInfo, tokio::task::JoinHandle<()>) {
    mock(move |mut s| async move {
        s.write_all(&welcome()).await.unwrap();
        let _ = read_msg(&mut s).await;
        s.write_all(&frame(b'W', &[0, 0, 0])).await.unwrap();
        s.write_all(&stream).await.unwrap();
    })
    .await
}

/// Reads a blocking stream to its end: the payloads, how it ended, and how many reads timed out.
fn drain_blocking(stream: &mut CopyStream) -> (Vec<bytes::Bytes>, Result<(), Error>, usize) {
    let mut got = Vec::new();
    let mut idle = 0;
    let end = loop {
        match stream.next_buffered() {
            Ok(Some(CopyItem::Data(p))) => got.push(p),
            Ok(Some(CopyItem::End)) => break Ok(()),
            Ok(None) => match stream.fill() {
                Ok(0) => idle += 1,
                Ok(_) => {}
                Err(e) => break Err(e),
            },
            Err(e) => break Err(e),
        }
    };
    (got, end, idle)
}

#[tokio::test]
async fn blocking_stream_reads_what_the_async_reader_reads() {
    let (payloads, stream) = copy_stream_of(300);
    for chunk in [1, 7, 4096, 1 << 20] {
        let (info, _server) = mock({
            let stream = stream.clone();
            move |s| copy_server(s, stream, chunk)
        })
        .await;
        let (mut reader, writer) = copy_client(&info).await;
        // The async reader takes a few first: the bytes it has buffered beyond them carry over.
        for expected in &payloads[..3] {
            assert_eq!(&reader.next().await.unwrap().unwrap()[..], &expected[..]);
        }
        let mut blocking =
            CopyStream::from_halves(reader, writer, Duration::from_millis(50)).unwrap();
        let (got, end) = tokio::task::spawn_blocking(move || {
            let (got, end, _) = drain_blocking(&mut blocking);
            blocking.send(&status_update(Lsn(1))).unwrap();
            blocking.finish().unwrap();
            (got, end)
        })
        .await
        .unwrap();
        end.unwrap_or_else(|e| panic!("{chunk}-byte pieces: {e}"));
        assert_eq!(got.len(), payloads.len() - 3, "{chunk}-byte pieces");
        for (i, (got, expected)) in got.iter().zip(&payloads[3..]).enumerate() {
            assert_eq!(
                &got[..],
                &expected[..],
                "payload {} with {chunk}-byte pieces",
                i + 3
            );
        }
    }
}

#[tokio::test]
async fn blocking_stream_times_out_and_reports_what_the_server_sends() {
    // A pause longer than the read timeout: reads come back empty, then the rest arrives; the
    // server reads our status update.
    let (info, server) = mock(|mut s| async move {
        s.write_all(&welcome()).await.unwrap();
        let _ = read_msg(&mut s).await;
        s.write_all(&frame(b'W', &[0, 0, 0])).await.unwrap();
        s.write_all(&frame(b'd', b"first")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&frame(b'd', b"second")).await.unwrap();
        let (tag, body) = read_msg(&mut s).await;
        assert_eq!(tag, b'd');
        assert_eq!(body, status_update(Lsn(7)));
        s.write_all(&frame(b'c', &[])).await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let (reader, writer) = copy_client(&info).await;
    let mut blocking = CopyStream::from_halves(reader, writer, Duration::from_millis(50)).unwrap();
    let (got, idle) = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        let mut idle = 0;
        while got.len() < 2 {
            match blocking.next_buffered().unwrap() {
                Some(CopyItem::Data(p)) => got.push(p),
                Some(CopyItem::End) => panic!("ended early"),
                None => idle += usize::from(blocking.fill().unwrap() == 0),
            }
        }
        blocking.send(&status_update(Lsn(7))).unwrap();
        let (rest, end, _) = drain_blocking(&mut blocking);
        assert!(rest.is_empty());
        end.unwrap();
        // After the end: the end again, and no read.
        assert!(matches!(blocking.next_buffered(), Ok(Some(CopyItem::End))));
        (got, idle)
    })
    .await
    .unwrap();
    assert_eq!(&got[0][..], b"first");
    assert_eq!(&got[1][..], b"second");
    assert!(
        idle >= 2,
        "a 300 ms pause with a 50 ms read timeout: {idle} empty reads"
    );
    server.await.unwrap();
}

#[test]
fn the_low_water_mark_follows_heavy_reads_only() {
    use blocking::{pace_after, MAX_LOW_WATER, PACE_FROM};
    let max = MAX_LOW_WATER;
    assert_eq!(pace_after(0, max), 1);
    assert_eq!(pace_after(1, max), 1);
    assert_eq!(pace_after(PACE_FROM - 1, max), 1);
    assert_eq!(pace_after(PACE_FROM, max), PACE_FROM);
    assert_eq!(pace_after(max + 1, max), max);
    assert_eq!(pace_after(usize::MAX, max), max);
    // A socket whose receive buffer allows only a lower mark.
    assert_eq!(pace_after(usize::MAX, 32 * 1024), 32 * 1024);
    // One too small to pace a heavy flow at all.
    assert_eq!(pace_after(usize::MAX, PACE_FROM - 1), 1);
}

#[tokio::test]
async fn paced_tcp_reads_hand_over_a_trickle_without_waiting_for_the_idle_timeout() {
    // A large burst raises the low-water mark to its maximum; then single small frames come, one at
    // a time, far below that mark. Each must be read within the paced wait, not after the read
    // timeout (here 10 s, so a reader waiting for the mark would stand out by seconds).
    const SMALL: usize = 5;
    let (info, server) = mock(|mut s| async move {
        s.write_all(&welcome()).await.unwrap();
        let _ = read_msg(&mut s).await;
        s.write_all(&frame(b'W', &[0, 0, 0])).await.unwrap();
        s.write_all(&frame(b'd', &vec![b'b'; 4 * blocking::MAX_LOW_WATER]))
            .await
            .unwrap();
        for i in 0..SMALL {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(&frame(b'd', format!("small {i}").as_bytes()))
                .await
                .unwrap();
        }
        s.write_all(&frame(b'c', &[])).await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let (reader, writer) = copy_client(&info).await;
    let mut stream = CopyStream::from_halves(reader, writer, Duration::from_secs(10)).unwrap();
    let (got, end, took) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let (got, end, _) = drain_blocking(&mut stream);
        (got, end, started.elapsed())
    })
    .await
    .unwrap();
    server.await.unwrap();
    // The server needs half a second; one wait for the idle timeout would take ten.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(got.len(), 1 + SMALL);
    assert_eq!(got[0].len(), 4 * blocking::MAX_LOW_WATER);
    assert_eq!(&got[SMALL][..], format!("small {}", SMALL - 1).as_bytes());
    end.expect("the stream ends cleanly");
}

/// A mock replication server on a unix socket in `dir`: welcomes, answers the START_REPLICATION
/// query with CopyBothResponse, then runs `script` on the connection.
fn unix_copy_server<F, Fut>(dir: &Path, script: F) -> tokio::task::JoinHandle<()>
where
    F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = tokio::net::UnixListener::bind(dir.join(".s.PGSQL.5432")).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = read_startup(&mut s).await;
        s.write_all(&welcome()).await.unwrap();
        let _ = read_msg(&mut s).await;
        s.write_all(&frame(b'W', &[0, 0, 0])).await.unwrap();
        script(s).await;
    })
}

/// Settings for a mock server on a unix socket in `dir`.
fn unix_info(dir: &Path) -> ConnInfo {
    let host: String = percent_encoding::utf8_percent_encode(
        dir.to_str().unwrap(),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .collect();
    ConnInfo::parse(&format!("postgres://u@{host}:5432/d")).unwrap()
}

#[tokio::test]
async fn top_ups_over_a_unix_socket_take_what_arrived_without_waiting() {
    // A mock server on a unix socket sends a first burst larger than the top-up limit, waits for
    // the go-ahead, then sends a second burst and ends the stream.
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<Vec<u8>> = (0..6000u32)
        .map(|i| format!("first {i:0>100}").into_bytes())
        .collect();
    let second: Vec<Vec<u8>> = (0..50u32)
        .map(|i| format!("second {i}").into_bytes())
        .collect();
    assert!(first.iter().map(|p| p.len() + 5).sum::<usize>() > 2 * blocking::TOP_UP_LIMIT);
    let (go, go_ahead) = tokio::sync::oneshot::channel::<()>();
    let server = unix_copy_server(dir.path(), {
        let (first, second) = (first.clone(), second.clone());
        move |mut s| async move {
            let burst =
                |ps: &[Vec<u8>]| -> Vec<u8> { ps.iter().flat_map(|p| frame(b'd', p)).collect() };
            s.write_all(&burst(&first)).await.unwrap();
            go_ahead.await.unwrap();
            s.write_all(&burst(&second)).await.unwrap();
            s.write_all(&frame(b'c', &[])).await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    });
    let (reader, writer) = copy_client(&unix_info(dir.path())).await;
    let mut stream = CopyStream::from_halves(reader, writer, Duration::from_secs(10)).unwrap();
    assert!(stream.is_unix_socket());
    let wanted: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    let got = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        let take_buffered = |stream: &mut CopyStream, got: &mut Vec<bytes::Bytes>| {
            while let Some(CopyItem::Data(p)) = stream.next_buffered().unwrap() {
                got.push(p);
            }
        };
        // A full buffer: no top-up reads more, though more is waiting.
        let mut read = 0;
        while read < blocking::TOP_UP_LIMIT {
            read += stream.fill().unwrap();
        }
        assert_eq!(stream.top_up(), 0, "the buffer is at its limit");
        // Once the frames are taken, top-ups read the rest of the burst.
        let started = std::time::Instant::now();
        while got.len() < first.len() {
            take_buffered(&mut stream, &mut got);
            if stream.top_up() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "top-ups stalled after {} frames",
                got.len()
            );
        }
        // Nothing is on its way: a top-up comes back at once, empty (a read that waited for the
        // server would take the 10 s read timeout).
        let started = std::time::Instant::now();
        assert_eq!(stream.top_up(), 0);
        assert!(started.elapsed() < Duration::from_secs(5));
        // What arrives later is taken by a top-up too.
        go.send(()).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(30);
        let mut topped_up = 0;
        while topped_up == 0 && std::time::Instant::now() < until {
            topped_up = stream.top_up();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(topped_up > 0, "no top-up took the second burst");
        let (rest, end, _) = drain_blocking(&mut stream);
        end.expect("the stream ends cleanly");
        got.extend(rest);
        got
    })
    .await
    .unwrap();
    server.await.unwrap();
    assert_eq!(got.len(), wanted.len());
    assert!(got.iter().zip(&wanted).all(|(g, w)| g[..] == w[..]));
}

#[tokio::test]
async fn an_error_after_a_burst_is_reported_though_top_ups_met_the_end() {
    // The server sends many frames, then an ErrorResponse, and closes: a top-up between frames
    // may read the end of the stream before the error is applied; the error must still come out,
    // classified by its SQLSTATE, after every frame before it.
    let dir = tempfile::tempdir().unwrap();
    let mut then: Vec<u8> = (0..500u32)
        .flat_map(|i| frame(b'd', format!("row {i}").as_bytes()))
        .collect();
    then.extend(frame(
        b'E',
        &fields(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "55000"),
            (
                b'M',
                "can no longer get changes from replication slot \"s\"",
            ),
        ]),
    ));
    let server = unix_copy_server(dir.path(), |mut s| async move {
        s.write_all(&then).await.unwrap();
    });
    let (reader, writer) = copy_client(&unix_info(dir.path())).await;
    let mut stream = CopyStream::from_halves(reader, writer, Duration::from_secs(10)).unwrap();
    server.await.unwrap();
    let (got, end) = tokio::task::spawn_blocking(move || {
        let mut got = 0;
        loop {
            match stream.next_buffered() {
                Ok(Some(CopyItem::Data(_))) => {
                    got += 1;
                    // More often than the stream thread, so the end is surely met by one.
                    stream.top_up();
                }
                Ok(Some(CopyItem::End)) => break (got, Ok(())),
                Ok(None) => {
                    if let Err(e) = stream.fill() {
                        break (got, Err(e));
                    }
                }
                Err(e) => break (got, Err(e)),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, 500);
    let err = end.expect_err("the stream ends with the server's error");
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("can no longer get changes"),
        "{err}"
    );
}

#[tokio::test]
async fn blocking_stream_turns_hostile_frames_into_errors() {
    for (stream, transient, text) in hostile_cases() {
        let (info, server) = hostile_server(stream).await;
        let (reader, writer) = copy_client(&info).await;
        server.await.unwrap();
        let mut blocking =
            CopyStream::from_halves(reader, writer, Duration::from_millis(50)).unwrap();
        let (_, end, _) = tokio::task::spawn_blocking(move || drain_blocking(&mut blocking))
            .await
            .unwrap();
        let err = end.expect_err(text);
        assert_eq!(err.is_transient(), transient, "{err}");
        assert!(err.message().contains(text), "{err}");
    }
}

/// `body` framed with `tag` as the reader hands it out.
fn parsed(tag: u8, body: &[u8]) -> Frame {
    Frame {
        tag,
        raw: BytesMut::from(&frame(tag, body)[..]),
    }
}

#[test]
fn message_body_parsers_check_lengths() {
    let row = [
        &2i16.to_be_bytes()[..],
        &(-1i32).to_be_bytes(),
        &2i32.to_be_bytes(),
        b"hi",
    ]
    .concat();
    assert_eq!(
        data_row(parsed(b'D', &row)).unwrap(),
        vec![None, Some("hi".to_string())]
    );
    // Any negative length is NULL (postgres-protocol, like tokio-postgres).
    let negative = [&1i16.to_be_bytes()[..], &(-5i32).to_be_bytes()].concat();
    assert_eq!(data_row(parsed(b'D', &negative)).unwrap(), vec![None]);
    for bad in [
        &row[..row.len() - 1],      // value runs past the end
        &[&row[..], b"x"].concat(), // trailing bytes
        &(-1i16).to_be_bytes()[..], // negative count (read as 65535 columns)
        &[0u8][..],                 // truncated
        &[&1i16.to_be_bytes()[..], &2i32.to_be_bytes(), &[0xff, 0xfe]].concat(), // not UTF-8
    ] {
        assert!(data_row(parsed(b'D', bad)).is_err(), "{bad:?}");
    }
    assert!(server_message(parsed(b'E', b"Mno terminator")).is_err());
    assert!(
        server_message(parsed(b'N', b"Mmsg\0")).is_err(),
        "missing final NUL"
    );
    assert!(server_message(parsed(b'E', b"")).is_err());
    assert!(
        server_message(parsed(b'E', b"Mmsg\0\0x")).is_err(),
        "trailing bytes"
    );
    let m = server_message(parsed(
        b'E',
        &fields(&[(b'S', "FEHLER"), (b'C', "42704"), (b'M', "m"), (b'H', "h")]),
    ))
    .unwrap();
    assert_eq!(
        (m.severity.as_str(), m.code.as_str(), m.hint.as_deref()),
        ("FEHLER", "42704", Some("h"))
    );
    let fields_of = |severity: &[(u8, &'static str)]| {
        let mut pairs = severity.to_vec();
        pairs.extend([(b'C', "42704"), (b'M', "gone"), (b'D', "d"), (b'H', "h")]);
        fields(&pairs)
    };
    // 'V' (not localized) wins over 'S', in either order.
    for pairs in [
        &[(b'S', "FEHLER"), (b'V', "ERROR")][..],
        &[(b'V', "ERROR"), (b'S', "FEHLER")][..],
        &[(b'V', "ERROR")][..],
    ] {
        let e = error_from_response("p", parsed(b'E', &fields_of(pairs)));
        assert_eq!(e.message(), "ERROR 42704: gone; DETAIL: d; HINT: h");
        assert_eq!(e.sqlstate(), Some("42704"));
        assert!(!e.is_transient());
    }
    for bad in [&b"Cbroken"[..], &fields(&[(b'C', "123"), (b'M', "m")])] {
        let e = error_from_response("p", parsed(b'E', bad));
        assert!(e.message().contains("malformed ErrorResponse"), "{e}");
        assert!(!e.is_transient() && e.sqlstate().is_none(), "{e}");
    }
}

#[test]
fn server_errors_use_the_one_classifier() {
    assert!(Error::server(COMPONENT, "55006", "ERROR", "slot active", None, None).is_transient());
    assert!(!Error::server(COMPONENT, "42704", "ERROR", "no such slot", None, None).is_transient());
}

#[test]
fn halves_can_move_between_tasks() {
    fn send<T: Send>(_: &T) {}
    fn send_type<T: Send + 'static>() {}
    send_type::<ReplicationConnection>();
    send_type::<CopyReader>();
    send_type::<CopyWriter>();
    let _ = |r: &'static mut CopyReader, w: &'static mut CopyWriter| {
        send(&r.next());
        send(&w.send(b""));
    };
}

#[test]
fn quoting() {
    assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    assert_eq!(quote_ident("Slot"), "\"Slot\"");
    assert_eq!(quote_literal("it's"), "'it''s'");
    assert_eq!(quote_literal("a\\b"), "'a\\b'");
}
