//! Test harness shared by the integration tests.
//!
//! Real servers only, on loopback: PostgreSQL (`CDC_EGRESS_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), NATS with JetStream (`CDC_EGRESS_TEST_NATS_URL`,
//! default `nats://127.0.0.1:4222`) and, for the object store tests, an S3-compatible server
//! (`CDC_EGRESS_TEST_S3_ENDPOINT`, e.g. `http://127.0.0.1:5000`), Azurite
//! (`CDC_EGRESS_TEST_AZURE_ENDPOINT`, e.g. `http://127.0.0.1:10000`) and fake-gcs-server
//! (`CDC_EGRESS_TEST_GCS_ENDPOINT`, e.g. `http://127.0.0.1:4443`), all started by `deploy/test.sh`.
//! Every test gets its own database, slot, publication, JetStream stream, subject prefix and output
//! directory; [`TestDb::cleanup`] (and, as a fallback, `Drop`) drops the slot and the database.
//! Tests wait for conditions ([`wait_until`], [`TestDb::wait_until`], [`Daemon::wait_for_log`],
//! [`TestDb::wait_caught_up`]), not for fixed times; a timeout there only ends a hung test.

#![allow(dead_code)]

pub mod gcs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cdc_egress::lsn::Lsn;
use cdc_egress::pg::conninfo::ConnInfo;
use cdc_egress::table::quote_ident;
use tokio_postgres::Client;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Refuses any URL whose host is not a loopback address: tests never touch anything else.
pub fn assert_loopback(url: &str) {
    let host = url
        .split("://")
        .nth(1)
        .map(|r| r.rsplit_once('@').map(|(_, h)| h).unwrap_or(r))
        .map(|r| r.split(['/', '?']).next().unwrap_or(""))
        .map(|hp| {
            if let Some(rest) = hp.strip_prefix('[') {
                rest.split(']').next().unwrap_or("").to_string()
            } else {
                hp.split(':').next().unwrap_or("").to_string()
            }
        })
        .unwrap_or_default();
    let ok = host.is_empty()
        || host == "localhost"
        || host == "::1"
        || host.starts_with("127.")
        || host.starts_with('/');
    assert!(
        ok,
        "test URL {url} is not on loopback; tests only run against local servers"
    );
}

pub fn pg_base_url() -> String {
    #[cfg(feature = "containers")]
    if std::env::var("CDC_EGRESS_TEST_PG_URL").is_err() && containers::wanted() {
        return containers::get().0.clone();
    }
    let u = env_or(
        "CDC_EGRESS_TEST_PG_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    assert_loopback(&u);
    u
}

pub fn nats_url() -> String {
    #[cfg(feature = "containers")]
    if std::env::var("CDC_EGRESS_TEST_NATS_URL").is_err() && containers::wanted() {
        return containers::get().1.clone();
    }
    let u = env_or("CDC_EGRESS_TEST_NATS_URL", "nats://127.0.0.1:4222");
    assert_loopback(&u);
    u
}

/// With `--features containers` and `CDC_EGRESS_TEST_CONTAINERS=1`, PostgreSQL (wal_level=logical)
/// and NATS (JetStream) run in throwaway containers through testcontainers, published on loopback
/// ports, for machines with a Docker engine. The machines this project is built and tested on have
/// none; there the harness uses the local servers above.
#[cfg(feature = "containers")]
mod containers {
    use std::sync::OnceLock;
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{Container, GenericImage, ImageExt};

    struct Running {
        urls: (String, String),
        _pg: Container<GenericImage>,
        _nats: Container<GenericImage>,
    }

    static RUNNING: OnceLock<Running> = OnceLock::new();

    pub fn wanted() -> bool {
        std::env::var("CDC_EGRESS_TEST_CONTAINERS").as_deref() == Ok("1")
    }

    pub fn get() -> &'static (String, String) {
        &RUNNING
            .get_or_init(|| {
                // The blocking runner drives its own runtime: start the containers off the test's.
                std::thread::spawn(|| {
                    let pg = GenericImage::new("postgres", "16")
                        .with_exposed_port(5432.tcp())
                        .with_wait_for(WaitFor::message_on_stderr(
                            "database system is ready to accept connections",
                        ))
                        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                        .with_cmd([
                            "postgres",
                            "-c",
                            "wal_level=logical",
                            "-c",
                            "max_replication_slots=64",
                            "-c",
                            "max_wal_senders=64",
                        ])
                        .start()
                        .expect("start the PostgreSQL container");
                    let nats = GenericImage::new("nats", "2")
                        .with_exposed_port(4222.tcp())
                        .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
                        .with_cmd(["-js"])
                        .start()
                        .expect("start the NATS container");
                    let pg_port = pg.get_host_port_ipv4(5432).expect("PostgreSQL port");
                    let nats_port = nats.get_host_port_ipv4(4222).expect("NATS port");
                    Running {
                        urls: (
                            format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"),
                            format!("nats://127.0.0.1:{nats_port}"),
                        ),
                        _pg: pg,
                        _nats: nats,
                    }
                })
                .join()
                .expect("container start-up thread")
            })
            .urls
    }
}

/// The S3 endpoint, or a panic that says how to get one (S3 tests are not silently skipped).
pub fn s3_endpoint() -> String {
    let u = std::env::var("CDC_EGRESS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "CDC_EGRESS_TEST_S3_ENDPOINT is not set: run the tests with deploy/test.sh (it starts a local \
             S3-compatible server), or start one yourself (pip install 'moto[server]'; moto_server -p 5000) and \
             export CDC_EGRESS_TEST_S3_ENDPOINT=http://127.0.0.1:5000"
        )
    });
    assert_loopback(&u);
    u
}

/// Creates a bucket on the loopback S3 server with a plain HTTP PUT (the test server needs no signature).
pub async fn create_bucket(endpoint: &str, bucket: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(hostport)
        .await
        .expect("connect to S3 test server");
    let req = format!("PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") || resp.contains("BucketAlreadyOwnedByYou"),
        "create bucket: {resp}"
    );
}

/// One HTTP/1.1 request to a loopback test server (no TLS, `Connection: close`); returns the status
/// and the body as text.
pub async fn http_request(
    endpoint: &str,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert_loopback(endpoint);
    let hostport = endpoint
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    let mut s = tokio::net::TcpStream::connect(hostport)
        .await
        .unwrap_or_else(|e| panic!("connect to the test server at {endpoint}: {e}"));
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line from {endpoint}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A bucket or container name every object store accepts (lower case, digits, dashes, at most 63
/// characters) that no other test uses.
pub fn unique_bucket(tag: &str) -> String {
    let mut b = unique(tag).replace('_', "-").to_ascii_lowercase();
    b.truncate(63);
    b.trim_end_matches('-').to_string()
}

fn options(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `output.options` for the loopback S3 server.
pub fn s3_options(endpoint: &str) -> std::collections::BTreeMap<String, String> {
    options(&[
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_virtual_hosted_style_request", "false"),
    ])
}

// ---------------------------------------------------------------------------------------------
// Azure: Azurite's blob service.

/// Azurite's well-known development account and key (published by Microsoft for the emulator; it
/// grants nothing anywhere else).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The Azurite blob service address, or a panic that says how to get one (not silently skipped).
pub fn azure_endpoint() -> String {
    let u = std::env::var("CDC_EGRESS_TEST_AZURE_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "CDC_EGRESS_TEST_AZURE_ENDPOINT is not set: run the tests with deploy/test.sh (it starts Azurite), \
             or run `bash deploy/local/services.sh --azure` and export \
             CDC_EGRESS_TEST_AZURE_ENDPOINT=http://127.0.0.1:10000"
        )
    });
    assert_loopback(&u);
    u.trim_end_matches('/').to_string()
}

/// `output.options` for an `az://container/prefix` output on Azurite: the development account and
/// key, and its path-style account URL over plain HTTP.
pub fn azure_options(endpoint: &str) -> std::collections::BTreeMap<String, String> {
    let account_url = format!("{endpoint}/{AZURITE_ACCOUNT}");
    options(&[
        ("azure_storage_account_name", AZURITE_ACCOUNT),
        ("azure_storage_account_key", AZURITE_KEY),
        ("azure_storage_endpoint", &account_url),
        ("azure_allow_http", "true"),
    ])
}

/// Creates (`PUT`) or deletes (`DELETE`, with every blob in it) a container on Azurite, signed with
/// the development key (Azurite has no unauthenticated mode).
pub async fn azure_container(endpoint: &str, method: &str, container: &str) {
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let path = format!("/{AZURITE_ACCOUNT}/{container}");
    // Shared Key: the verb, eleven standard headers (all empty here), the x-ms- headers, the resource.
    let to_sign = format!(
        "{method}\n{}x-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}\nrestype:container",
        "\n".repeat(11)
    );
    let signature = base64_encode(&hmac_sha256(
        &base64_decode(AZURITE_KEY),
        to_sign.as_bytes(),
    ));
    let (status, body) = http_request(
        endpoint,
        method,
        &format!("{path}?restype=container"),
        &[
            ("x-ms-date", date),
            ("x-ms-version", version.to_string()),
            (
                "Authorization",
                format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
            ),
        ],
        b"",
    )
    .await;
    assert!(
        (200..300).contains(&status),
        "{method} container {container}: {status} {body}"
    );
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = sha2::Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = sha2::Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|b| *b == c).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// `env` with `key` set to `value` (replacing any earlier value).
pub fn with(mut env: Vec<(String, String)>, key: &str, value: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
    env
}

/// The same server URL pointing at another database.
pub fn with_db(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("CDC_EGRESS_TEST_PG_URL must be a postgres:// URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

pub fn unique(tag: &str) -> String {
    format!(
        "cdct_{tag}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn connect(url: &str) -> Client {
    ConnInfo::parse(url).unwrap().connect().await.unwrap()
}

/// One test's private world.
pub struct TestDb {
    /// The server's maintenance URL (`CDC_EGRESS_TEST_PG_URL`, or a private server's).
    pub base: String,
    pub name: String,
    pub url: String,
    pub slot: String,
    pub publication: String,
    pub stream: String,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub extra_dbs: Vec<String>,
    cleaned: bool,
}

impl TestDb {
    pub async fn new(tag: &str) -> TestDb {
        Self::new_on(&pg_base_url(), tag).await
    }

    /// As [`TestDb::new`], on the server of `base` (e.g. a [`PrivatePg`]).
    pub async fn new_on(base: &str, tag: &str) -> TestDb {
        let name = unique(tag);
        let base = base.to_string();
        let admin = connect(&base).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap();
        let url = with_db(&base, &name);
        TestDb {
            base: base.clone(),
            slot: format!("{name}_slot"),
            publication: format!("{name}_pub"),
            stream: name.to_uppercase(),
            prefix: name.clone(),
            name,
            url,
            dir: tempfile::tempdir().unwrap(),
            extra_dbs: Vec::new(),
            cleaned: false,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A second, empty database on the same server (replay target).
    pub async fn extra_db(&mut self, suffix: &str) -> String {
        let name = format!("{}_{suffix}", self.name);
        let admin = connect(&self.base).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap();
        self.extra_dbs.push(name.clone());
        with_db(&self.base, &name)
    }

    pub fn out_url(&self) -> String {
        format!("file://{}", self.dir.path().join("out").display())
    }

    /// Environment for the `cdc-egress` binary: everything it needs, nothing inherited.
    pub fn daemon_env(&self, output_url: &str) -> Vec<(String, String)> {
        vec![
            ("CDC_EGRESS_SOURCE_URL".into(), self.url.clone()),
            ("CDC_EGRESS_SOURCE_SLOT".into(), self.slot.clone()),
            (
                "CDC_EGRESS_SOURCE_PUBLICATION".into(),
                self.publication.clone(),
            ),
            ("CDC_EGRESS_SOURCE_HEARTBEAT_INTERVAL".into(), "1s".into()),
            ("CDC_EGRESS_SOURCE_STATUS_INTERVAL".into(), "1s".into()),
            ("CDC_EGRESS_BATCH_INTERVAL".into(), "1s".into()),
            ("CDC_EGRESS_OUTPUT_URL".into(), output_url.into()),
            (
                "CDC_EGRESS_OUTPUT_SPOOL_DIR".into(),
                self.dir.path().join("spool").display().to_string(),
            ),
            ("CDC_EGRESS_NATS_URL".into(), nats_url()),
            ("CDC_EGRESS_NATS_STREAM".into(), self.stream.clone()),
            ("CDC_EGRESS_NATS_SUBJECT_PREFIX".into(), self.prefix.clone()),
            ("CDC_EGRESS_HTTP_LISTEN".into(), String::new()),
            ("CDC_EGRESS_LOG_LEVEL".into(), "info".into()),
            // The streaming tests start from empty tables; tests/reload.rs turns this back on.
            ("CDC_EGRESS_RELOAD_INITIAL".into(), "false".into()),
        ]
    }

    pub async fn slot_confirmed(&self) -> Option<Lsn> {
        let c = self.client().await;
        c.query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&self.slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok())
    }

    pub async fn current_lsn(&self) -> Lsn {
        let c = self.client().await;
        c.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap()
    }

    /// Waits until the slot has confirmed everything written so far (the daemon caught up).
    pub async fn wait_caught_up(&self, timeout: Duration) {
        let target = self.current_lsn().await;
        let seen = std::cell::Cell::new(None);
        wait_until(
            &format!("the daemon to confirm {target}"),
            timeout,
            || format!("the slot was last at {:?}", seen.get()),
            async || {
                seen.set(self.slot_confirmed().await);
                seen.get().is_some_and(|c| c >= target)
            },
        )
        .await;
    }

    /// Waits until the daemon has created (or found) its slot.
    pub async fn wait_for_slot(&self, d: &Daemon) {
        wait_until(
            &format!("the slot {} to appear", self.slot),
            Duration::from_secs(60),
            || d.log_tail(),
            async || self.slot_confirmed().await.is_some(),
        )
        .await;
    }

    /// Runs `transactions` under a daemon started with the `after_publish` failpoint and waits for
    /// it to abort at its first batch notice: that batch is not marked notified and nothing of these
    /// transactions is acknowledged, so the next run replays them (events and all).
    pub async fn crash_at_first_notice(
        &self,
        env: &[(String, String)],
        transactions: &[&str],
        timeout: Duration,
    ) {
        let d = Daemon::start(
            env,
            self.dir.path(),
            &[("CDC_EGRESS_TEST_FAILPOINT", "after_publish")],
            "crash.log",
        );
        self.wait_for_slot(&d).await;
        let c = self.client().await;
        for sql in transactions {
            c.batch_execute(sql).await.unwrap();
        }
        let status = d.wait_exit(timeout).await;
        assert!(!status.success(), "the failpoint aborted the daemon");
    }

    /// Waits until `sql` (one row, one boolean column, on the test database) returns true. A failing
    /// query counts as false: the registry's tables may not exist yet. `d`'s log tail goes into the
    /// panic.
    pub async fn wait_until(&self, sql: &str, timeout: Duration, d: &Daemon) {
        let c = self.client().await;
        let error = std::cell::RefCell::new(None);
        wait_until(
            &format!("`{sql}` to return true"),
            timeout,
            || format!("last query error: {:?}\n{}", error.borrow(), d.log_tail()),
            async || match c.query_one(sql, &[]).await {
                Ok(row) => row.get::<_, Option<bool>>(0).unwrap_or(false),
                Err(e) => {
                    let db = e.as_db_error().map(|db| db.message().to_string());
                    *error.borrow_mut() = Some(db.unwrap_or_else(|| e.to_string()));
                    false
                }
            },
        )
        .await;
    }

    /// The number of rows of the registry's `files` table (0 before the registry exists).
    pub async fn registry_files(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM cdc_egress.files", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0)
    }

    /// Drops the slot, the stream and the databases. Call at the end of every test.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        drop_everything(
            &self.base,
            &self.name,
            &self.slot,
            &self.extra_dbs,
            Some(&self.stream),
        )
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (base, name, slot, extra, stream) = (
            self.base.clone(),
            self.name.clone(),
            self.slot.clone(),
            self.extra_dbs.clone(),
            self.stream.clone(),
        );
        // A failed test still must not leave a slot retaining WAL.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_everything(&base, &name, &slot, &extra, Some(&stream)));
        })
        .join();
    }
}

async fn drop_everything(
    base: &str,
    name: &str,
    slot: &str,
    extra: &[String],
    stream: Option<&str>,
) {
    let Ok(admin) = ConnInfo::parse(base).unwrap().connect().await else {
        return;
    };
    for _ in 0..50 {
        let r = admin
            .query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await;
        let dropped = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE $1 || '%' AND NOT active",
                &[&name],
            )
            .await;
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1 || '%'",
                &[&name],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        let _ = (r, dropped);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for db in std::iter::once(name.to_string()).chain(extra.iter().cloned()) {
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&db)
            ))
            .await;
    }
    if let Some(stream) = stream {
        delete_stream(stream).await;
    }
}

/// Deletes a test's JetStream stream and its schema bucket (`nats.schema_bucket`'s default,
/// `<stream>_SCHEMAS`), if NATS is reachable (clean-up: errors are ignored).
pub async fn delete_stream(stream: &str) {
    if let Ok(c) = async_nats::connect(nats_url()).await {
        let js = async_nats::jetstream::new(c);
        let _ = js.delete_stream(stream).await;
        let _ = js.delete_stream(format!("KV_{stream}_SCHEMAS")).await;
    }
}

/// [`delete_stream`] from a `Drop`, which may run inside or outside a runtime.
pub fn delete_stream_on_drop(stream: String) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(delete_stream(&stream));
    })
    .join();
}

/// The daemon as a child process.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(
        env: &[(String, String)],
        cwd: &std::path::Path,
        extra: &[(&str, &str)],
        log_name: &str,
    ) -> Daemon {
        let log = cwd.join(log_name);
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdc-egress"));
        cmd.arg("run").current_dir(cwd);
        for (k, _) in std::env::vars() {
            if k.starts_with("CDC_EGRESS_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(logf).kill_on_drop(true);
        Daemon {
            child: cmd.spawn().expect("spawn cdc-egress"),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Waits until the log contains `needle`; panics early if the daemon exits meanwhile.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout).await
    }

    /// Waits until the log contains `needle` at least `times` times; panics early if the daemon
    /// exits meanwhile.
    pub async fn wait_for_log_count(&mut self, needle: &str, times: usize, timeout: Duration) {
        let log = self.log.clone();
        let child = &mut self.child;
        wait_until(
            &format!("{needle:?} {times} time(s) in {}", log.display()),
            timeout,
            || log_tail(&log),
            async || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.matches(needle).count() >= times {
                    return true;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the daemon exited ({status}) while the test waited for {needle:?} in its log\n{}",
                        log_tail(&log)
                    );
                }
                false
            },
        )
        .await;
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        unsafe_kill(pid, 15);
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("daemon exits after SIGTERM")
            .unwrap()
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to end by itself (e.g. a failpoint abort).
    pub async fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                )
            })
            .unwrap()
    }
}

/// The last lines of a log file, headed by its name.
fn log_tail(path: &std::path::Path) -> String {
    const LINES: usize = 40;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LINES)..];
    format!(
        "last {} of {} lines of {}:\n{}",
        tail.len(),
        lines.len(),
        path.display(),
        tail.join("\n")
    )
}

// ---------------------------------------------------------------------------------------------
// Waiting for conditions, never for fixed times: a fixed sleep is slow when generous and flaky when
// the machine is slow.

/// Polls `check` every 100 ms until it returns true. When `timeout` passes first, panics naming
/// `what` it waited for, followed by `context()` (e.g. a daemon's log tail). The timeout only stops
/// a test that would hang: make it generous (a slow CI machine must not fail), and never use it to
/// assert how fast something is.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl AsyncFnMut() -> bool,
) {
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > timeout {
            panic!("waited {timeout:?} for {what}, in vain\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Runs the binary once with arguments and the given environment; returns (exit code, stdout, stderr).
pub fn run_cli(
    args: &[&str],
    env: &[(String, String)],
    cwd: &std::path::Path,
) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-egress"));
    cmd.args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("CDC_EGRESS_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Replay: what a consumer following the documented rules does.

/// Summary of a replay, for assertions.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub files: usize,
    pub rows: u64,
    pub batch_ids: Vec<String>,
}

/// Replays every streaming file of the registry, in registry order, into `target` (tables with the
/// same names and columns must exist there), ignoring reloads: the consumer rule without its first
/// step, through the reference loader (`cdc_egress::consume`), which checks each file's checksum
/// and row count. Only meaningful when the tables were empty at the initial export.
pub async fn replay(
    registry_url: &str,
    registry_schema: &str,
    output_url: &str,
    options: &HashMap<String, String>,
    target: &Client,
) -> ReplayReport {
    let reg = connect(registry_url).await;
    let files = reg
        .query(
            &format!(
                "SELECT batch_id, row_count FROM {}.files WHERE kind = 'streaming' ORDER BY id",
                quote_ident(registry_schema)
            ),
            &[],
        )
        .await
        .unwrap();
    let report = ReplayReport {
        files: files.len(),
        rows: files.iter().map(|r| r.get::<_, i64>(1) as u64).sum(),
        batch_ids: files.iter().map(|r| r.get(0)).collect(),
    };
    consume(
        registry_url,
        registry_schema,
        None,
        output_url,
        options,
        target,
        true,
    )
    .await;
    report
}

/// Runs the reference loader (`cdc_egress::consume::apply`, strict) over one source of the
/// registry into the database of `target`; panics with the loader's error.
async fn consume(
    registry_url: &str,
    registry_schema: &str,
    source: Option<&str>,
    output_url: &str,
    options: &HashMap<String, String>,
    target: &Client,
    ignore_reloads: bool,
) -> cdc_egress::consume::apply::ApplyReport {
    use cdc_egress::consume::{apply, listing, target as tgt};
    // The loader opens its own connection to the database of `target`, which may be on a private
    // server (tests/slot_lifecycle.rs): take its port and user from that session.
    let r = target
        .query_one(
            "SELECT current_database()::text, current_user::text, current_setting('port')",
            &[],
        )
        .await
        .unwrap();
    let (db, user, port): (String, String, String) = (r.get(0), r.get(1), r.get(2));
    let target_url = format!("postgres://{user}@127.0.0.1:{port}/{db}");
    let reg = connect(registry_url).await;
    let listing = listing::Listing::open(reg, registry_schema, source)
        .await
        .unwrap_or_else(|e| panic!("open the registry: {e}"));
    let store =
        cdc_egress::sink::store::Store::open(output_url, &options.clone().into_iter().collect())
            .unwrap();
    let state_schema = if ignore_reloads {
        "cdc_egress_apply_streaming"
    } else {
        "cdc_egress_apply"
    };
    let mut applier = apply::Applier::open(
        listing,
        listing::Objects::new(store),
        cdc_egress::pg::conninfo::ConnInfo::parse(&target_url)
            .unwrap()
            .connect()
            .await
            .unwrap(),
        tgt::Naming {
            state_schema: state_schema.into(),
            schema_prefix: String::new(),
            unlogged: false,
        },
        apply::ApplyOptions {
            strict: true,
            ignore_reloads,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open the loader: {e}"));
    applier
        .catch_up()
        .await
        .unwrap_or_else(|e| panic!("apply: {e}"))
}

/// The documented consumer rule with reloads: per table, the latest `done` reload (its parts loaded
/// with `COPY … FROM (FORMAT csv, HEADER, NULL '\N')`), then, in registry order, the rows of its
/// streaming files with `_commit_lsn >= cut_lsn`; tables without a reload get every streaming row.
pub async fn replay_with_reloads(
    registry_url: &str,
    registry_schema: &str,
    output_url: &str,
    options: &HashMap<String, String>,
    target: &Client,
) -> HashMap<String, String> {
    replay_source(
        registry_url,
        registry_schema,
        None,
        output_url,
        options,
        target,
    )
    .await
    .cuts
    .into_iter()
    .map(|((schema, table), cut)| (format!("{schema}.{table}"), cut))
    .collect()
}

/// Replays the registry by the consumer rule into a fresh database created with `ddl`, and asserts
/// that each of `tables` equals the source. Returns the reload cuts used.
pub async fn assert_replays_equal(
    db: &mut TestDb,
    ddl: &str,
    tables: &[&str],
) -> HashMap<String, String> {
    let expected: Vec<(&str, String)> = tables
        .iter()
        .map(|t| (*t, format!("SELECT * FROM {t}")))
        .collect();
    let expected: Vec<(&str, &str)> = expected.iter().map(|(t, q)| (*t, q.as_str())).collect();
    assert_replays_equal_to(db, ddl, &expected).await
}

/// [`assert_replays_equal`] where each replayed table `(table, query)` must equal what `query`
/// returns on the source: what a publication shows (its columns and rows) rather than the whole
/// table. `ddl` then creates the tables with the published columns only.
pub async fn assert_replays_equal_to(
    db: &mut TestDb,
    ddl: &str,
    expected: &[(&str, &str)],
) -> HashMap<String, String> {
    let target_url = db.extra_db("replay").await;
    let target = connect(&target_url).await;
    target.batch_execute(ddl).await.unwrap();
    let cuts = replay_with_reloads(
        &db.url,
        "cdc_egress",
        &db.out_url(),
        &HashMap::new(),
        &target,
    )
    .await;
    let source = db.client().await;
    for (t, query) in expected {
        assert_eq!(
            table_rows(&target, t).await,
            query_rows(&source, query).await,
            "table {t} differs after replay"
        );
    }
    cuts
}

/// Every row `query` returns, as the text of a row value, sorted: comparable with [`table_rows`] of
/// a table with the same columns.
pub async fn query_rows(c: &Client, query: &str) -> Vec<String> {
    c.query(&format!("SELECT q::text FROM ({query}) q ORDER BY 1"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every row of `table` as text, sorted: equal vectors mean equal tables (EXCEPT both ways).
pub async fn table_rows(c: &Client, table: &str) -> Vec<String> {
    query_rows(c, &format!("SELECT * FROM {table}")).await
}

/// Messages on `subject` in `stream`.
pub async fn stream_count(stream: &str, subject: &str) -> u64 {
    let c = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(c);
    let s = js.get_stream(stream).await.unwrap();
    use futures::TryStreamExt;
    let counts: Vec<(String, usize)> = s
        .info_with_subjects(subject)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    counts.iter().map(|(_, n)| *n as u64).sum()
}

/// Like [`run_cli`], but the command must finish within `timeout` (it is killed and the test fails
/// otherwise), so a command that should exit but hangs cannot hang the test run.
pub fn run_cli_timeout(
    args: &[&str],
    env: &[(String, String)],
    cwd: &std::path::Path,
    timeout: Duration,
) -> (i32, String, String) {
    use std::io::Read;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-egress"));
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("CDC_EGRESS_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(s) => (s.code().unwrap_or(-1), out, err),
        None => panic!(
            "cdc-egress {args:?} did not exit within {timeout:?}\nstdout:\n{out}\nstderr:\n{err}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// A private PostgreSQL server, for tests that need settings the shared server must not be given.

/// A throwaway server: its own data directory and port, started with the given settings, stopped
/// and removed on drop. Runs as the `postgres` system user when the tests run as root (initdb
/// refuses root).
pub struct PrivatePg {
    pub url: String,
    dir: PathBuf,
    bindir: PathBuf,
    as_root: bool,
}

impl PrivatePg {
    /// The newest server binaries of the machine (`/usr/lib/postgresql/<major>/bin`).
    pub fn system_bindir() -> PathBuf {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect(
                "PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)",
            )
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("initdb").exists())
            .collect();
        dirs.sort_by_key(|d| {
            d.parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0)
        });
        dirs.pop()
            .expect("an initdb under /usr/lib/postgresql/*/bin")
    }

    pub fn start(bindir: &std::path::Path, settings: &[(&str, &str)]) -> PrivatePg {
        let root = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        let dir = PathBuf::from(root).join(unique("privpg"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let as_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false);
        if as_root {
            let _ = std::process::Command::new("chown")
                .args(["-R", "postgres:", dir.to_str().unwrap()])
                .status();
        }
        let run = |program: &std::path::Path, args: &[String]| {
            let mut cmd = if as_root {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                std::process::Command::new(program)
            };
            let out = cmd.args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{} {args:?}: {}{}",
                program.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data = dir.join("data");
        run(
            &bindir.join("initdb"),
            &[
                "-D".into(),
                data.display().to_string(),
                "-U".into(),
                "postgres".into(),
                "-A".into(),
                "trust".into(),
                "-E".into(),
                "UTF8".into(),
                "--locale=C".into(),
            ],
        );
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off",
            dir.display()
        );
        for (k, v) in settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        run(
            &bindir.join("pg_ctl"),
            &[
                "-D".into(),
                data.display().to_string(),
                "-l".into(),
                dir.join("server.log").display().to_string(),
                "-w".into(),
                "-o".into(),
                opts,
                "start".into(),
            ],
        );
        PrivatePg {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bindir: bindir.to_path_buf(),
            as_root,
        }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let pg_ctl = self.bindir.join("pg_ctl");
        let args = [
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ];
        let _ = if self.as_root {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&pg_ctl)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&pg_ctl).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Several sources in one registry (tests/sources.rs): what a consumer of one source does.

/// What [`replay_source`] applied.
#[derive(Debug, Default)]
pub struct SourceReplay {
    /// `(schema, table)` → the cut of the latest `done` reload of the table.
    pub cuts: HashMap<(String, String), String>,
    pub reload_parts: usize,
    pub streaming_files: usize,
}

/// The documented consumer rule with reloads for one `source` of a registry shared by several
/// (the only one when `None`), through the reference loader (`cdc_egress::consume::apply`), which
/// checks every file's checksum and row count. Tables are keyed by `(schema, table)`, never by a
/// dotted name (`"a.x".y` and `a."x.y"` are two tables).
pub async fn replay_source(
    registry_url: &str,
    registry_schema: &str,
    source: Option<&str>,
    output_url: &str,
    options: &HashMap<String, String>,
    target: &Client,
) -> SourceReplay {
    let applied = consume(
        registry_url,
        registry_schema,
        source,
        output_url,
        options,
        target,
        false,
    )
    .await;
    let reg = connect(registry_url).await;
    let s = quote_ident(registry_schema);
    let mut report = SourceReplay {
        streaming_files: applied.streaming_files as usize,
        ..Default::default()
    };
    for r in reg
        .query(
            &format!(
                "SELECT DISTINCT ON (table_schema, table_name) id, table_schema, table_name, cut_lsn::text \
                 FROM {s}.reloads WHERE ($1::text IS NULL OR source = $1) AND status = 'done' \
                 ORDER BY table_schema, table_name, id DESC"
            ),
            &[&source],
        )
        .await
        .unwrap()
    {
        let parts: i64 = reg
            .query_one(
                &format!("SELECT count(*) FROM {s}.files WHERE kind = 'reload' AND reload_id = $1"),
                &[&r.get::<_, i64>(0)],
            )
            .await
            .unwrap()
            .get(0);
        report.reload_parts += parts as usize;
        report.cuts.insert((r.get(1), r.get(2)), r.get(3));
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Schema changes (tests/ddl.rs): the consumer rule that follows DDL records (README "Schema changes").

/// A `ddl.yml` as the tests read it.
#[derive(serde::Deserialize, Debug)]
pub struct DdlYml {
    pub event: String,
    pub schema: String,
    pub table: String,
    pub commit_lsn: String,
    pub seq: u32,
    pub rewrites_rows: bool,
    pub reload_request: Option<String>,
    pub mode_after: Option<String>,
}

/// What [`replay_following_ddl`] did.
#[derive(Debug, Default)]
pub struct DdlReplay {
    pub streaming_files: usize,
    pub ddl_records: Vec<DdlYml>,
    pub reloads_loaded: usize,
}

/// The consumer rule with schema changes (README "Schema changes") through the reference loader
/// (`cdc_egress::consume::apply`): tables are created, reshaped, renamed and dropped from the files
/// alone (`target` starts empty). Returns what it applied, with every DDL record of the registry.
pub async fn replay_following_ddl(
    registry_url: &str,
    output_url: &str,
    target: &Client,
) -> DdlReplay {
    let applied = consume(
        registry_url,
        "cdc_egress",
        None,
        output_url,
        &HashMap::new(),
        target,
        false,
    )
    .await;
    let reg = connect(registry_url).await;
    let store = cdc_egress::sink::store::Store::open(output_url, &Default::default()).unwrap();
    let mut ddl_records = Vec::new();
    for r in reg
        .query(
            "SELECT object_path FROM cdc_egress.files WHERE kind = 'ddl' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
    {
        let data = store
            .get(&cdc_egress::sink::layout::stored_path(
                &r.get::<_, String>(0),
            ))
            .await
            .unwrap();
        ddl_records.push(serde_yaml::from_slice(&data).unwrap());
    }
    DdlReplay {
        streaming_files: applied.streaming_files as usize,
        ddl_records,
        reloads_loaded: applied.reloads_loaded as usize,
    }
}
