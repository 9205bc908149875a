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
use cdc_egress::table::{quote_ident, TableName};
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

#[derive(serde::Deserialize, Debug)]
struct SchemaCol {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    primary_key: Option<u16>,
    #[serde(default)]
    attnum: Option<i16>,
}

#[derive(serde::Deserialize, Debug)]
struct SchemaYml {
    schema: String,
    table: String,
    columns: Vec<SchemaCol>,
    metadata_columns: Vec<serde_yaml::Value>,
}

/// Summary of a replay, for assertions.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub files: usize,
    pub rows: u64,
    pub batch_ids: Vec<String>,
}

/// Replays every streaming file of the registry, in registry order, into `target` (tables with the
/// same names and columns must exist there). Files are loaded with PostgreSQL's own
/// `COPY … FROM (FORMAT csv, HEADER, NULL '\N')` into a text staging table, then applied row by row:
/// I → INSERT; U → UPDATE by the old key (`_before`, else the new key) of the columns not listed in
/// `_unchanged`; D → DELETE by the old key; T → TRUNCATE. Checks each file's checksum.
pub async fn replay(
    registry_url: &str,
    registry_schema: &str,
    output_url: &str,
    options: &HashMap<String, String>,
    target: &Client,
) -> ReplayReport {
    use sha2::Digest;
    let reg = connect(registry_url).await;
    let store =
        cdc_egress::sink::store::Store::open(output_url, &options.clone().into_iter().collect())
            .unwrap();
    let rows = reg
        .query(
            &format!(
                "SELECT batch_id, object_path, schema_path, checksum, row_count, kind FROM {}.files ORDER BY id",
                quote_ident(registry_schema)
            ),
            &[],
        )
        .await
        .unwrap();
    let mut report = ReplayReport::default();
    for r in rows {
        let kind: String = r.get(5);
        if kind != "streaming" {
            continue;
        }
        let batch_id: String = r.get(0);
        let data = store
            .get(&cdc_egress::sink::layout::stored_path(
                &r.get::<_, String>(1),
            ))
            .await
            .unwrap();
        let checksum: String = r.get(3);
        assert_eq!(
            checksum,
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data))),
            "checksum of {batch_id}"
        );
        let schema_text = store
            .get(&cdc_egress::sink::layout::stored_path(
                &r.get::<_, String>(2),
            ))
            .await
            .unwrap();
        let schema: SchemaYml = serde_yaml::from_slice(&schema_text).unwrap();
        let mut csv = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&data[..]), &mut csv).unwrap();
        let n = apply_file(target, &schema, &csv).await;
        assert_eq!(n, r.get::<_, i64>(4) as u64, "row count of {batch_id}");
        report.files += 1;
        report.rows += n;
        report.batch_ids.push(batch_id);
    }
    report
}

async fn apply_file(target: &Client, schema: &SchemaYml, csv: &[u8]) -> u64 {
    apply_file_from(target, schema, csv, None).await
}

/// Applies a streaming file, skipping rows whose `_commit_lsn` is below `min_lsn` (a reload's cut).
/// Returns the number of rows in the file.
async fn apply_file_from(
    target: &Client,
    schema: &SchemaYml,
    csv: &[u8],
    min_lsn: Option<&str>,
) -> u64 {
    use futures::SinkExt;
    let table = TableName::new(schema.schema.clone(), schema.table.clone()).quoted();
    let meta = [
        "_op",
        "_commit_lsn",
        "_seq",
        "_xid",
        "_commit_ts",
        "_before",
        "_unchanged",
    ];
    assert_eq!(schema.metadata_columns.len(), meta.len());
    let ncols = schema.columns.len();
    let stage_cols: Vec<String> = meta
        .iter()
        .map(|m| m.to_string())
        .chain((0..ncols).map(|i| format!("c{i}")))
        .collect();
    target
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS pg_temp.stage; CREATE TEMP TABLE stage ({}, _n bigserial)",
            stage_cols
                .iter()
                .map(|c| format!("{c} text"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await
        .unwrap();
    let sink = target
        .copy_in(&format!(
            "COPY pg_temp.stage ({}) FROM STDIN (FORMAT csv, HEADER, NULL '\\N')",
            stage_cols.join(", ")
        ))
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::copy_from_slice(csv)).await.unwrap();
    sink.finish().await.unwrap();
    let total: i64 = target
        .query_one("SELECT count(*) FROM pg_temp.stage", &[])
        .await
        .unwrap()
        .get(0);
    let filter = match min_lsn {
        Some(l) => format!("WHERE _commit_lsn::pg_lsn >= '{l}'::pg_lsn"),
        None => String::new(),
    };
    let staged = target
        .query(
            &format!(
                "SELECT {} FROM pg_temp.stage {filter} ORDER BY _n",
                stage_cols.join(", ")
            ),
            &[],
        )
        .await
        .unwrap();
    let key_cols: Vec<usize> = {
        let mut k: Vec<(u16, usize)> = schema
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.primary_key.map(|p| (p, i)))
            .collect();
        k.sort();
        k.into_iter().map(|(_, i)| i).collect()
    };
    let cast = |i: usize, p: usize| format!("${p}::text::{}", schema.columns[i].type_name);
    let col = |i: usize| quote_ident(&schema.columns[i].name);
    for row in &staged {
        let op: String = row.get(0);
        let before: Option<String> = row.get(5);
        let unchanged: Option<String> = row.get(6);
        let vals: Vec<Option<String>> = (0..ncols).map(|i| row.get(7 + i)).collect();
        let before: Option<serde_json::Map<String, serde_json::Value>> =
            before.map(|b| serde_json::from_str(&b).unwrap());
        let unchanged: Vec<String> = unchanged
            .map(|u| serde_json::from_str(&u).unwrap())
            .unwrap_or_default();
        // The key: the old values from _before when present, else the row's own key columns.
        let key_of = |i: usize| -> Option<String> {
            match &before {
                Some(b) => b
                    .get(&schema.columns[i].name)
                    .and_then(|v| v.as_str().map(str::to_string)),
                None => vals[i].clone(),
            }
        };
        let (key_idx, full): (Vec<usize>, bool) = if key_cols.is_empty() {
            (
                (0..ncols)
                    .filter(|i| {
                        before
                            .as_ref()
                            .is_some_and(|b| b.contains_key(&schema.columns[*i].name))
                    })
                    .collect(),
                true,
            )
        } else {
            (key_cols.clone(), false)
        };
        match op.as_str() {
            "I" => {
                let sql = format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    (0..ncols).map(col).collect::<Vec<_>>().join(", "),
                    (0..ncols)
                        .map(|i| cast(i, i + 1))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vals
                    .iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                target
                    .execute(&sql, &params)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            "U" | "D" => {
                let mut params: Vec<Option<String>> = Vec::new();
                let mut sets = Vec::new();
                if op == "U" {
                    for (i, v) in vals.iter().enumerate() {
                        if unchanged.contains(&schema.columns[i].name) {
                            continue;
                        }
                        params.push(v.clone());
                        sets.push(format!("{} = {}", col(i), cast(i, params.len())));
                    }
                }
                let mut conds = Vec::new();
                for &i in &key_idx {
                    params.push(key_of(i));
                    conds.push(format!(
                        "{} IS NOT DISTINCT FROM {}",
                        col(i),
                        cast(i, params.len())
                    ));
                }
                let cond = if conds.is_empty() {
                    "true".to_string()
                } else {
                    conds.join(" AND ")
                };
                let target_rows = if full {
                    format!("ctid = (SELECT ctid FROM {table} WHERE {cond} LIMIT 1)")
                } else {
                    cond
                };
                let sql = if op == "U" {
                    format!("UPDATE {table} SET {} WHERE {target_rows}", sets.join(", "))
                } else {
                    format!("DELETE FROM {table} WHERE {target_rows}")
                };
                let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let n = target
                    .execute(&sql, &p)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                assert_eq!(n, 1, "{sql} with {params:?} matched {n} rows");
            }
            "T" => {
                target
                    .batch_execute(&format!("TRUNCATE {table}"))
                    .await
                    .unwrap();
            }
            other => panic!("unknown _op {other:?}"),
        }
    }
    total as u64
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

/// The documented consumer rule with reloads for the rows of one `source` of a registry shared by
/// several (every source when `None`): per table of that source, its latest `done` reload,
/// then its streaming files in registry order from the reload's cut on. Tables are keyed by
/// `(schema, table)`, never by a dotted name (`"a.x".y` and `a."x.y"` are two tables). Checks each
/// streaming file's checksum and every file's row count.
pub async fn replay_source(
    registry_url: &str,
    registry_schema: &str,
    source: Option<&str>,
    output_url: &str,
    options: &HashMap<String, String>,
    target: &Client,
) -> SourceReplay {
    use sha2::Digest;
    let reg = connect(registry_url).await;
    let store =
        cdc_egress::sink::store::Store::open(output_url, &options.clone().into_iter().collect())
            .unwrap();
    let s = quote_ident(registry_schema);
    let mut report = SourceReplay::default();
    let latest = reg
        .query(
            &format!(
                "SELECT DISTINCT ON (table_schema, table_name) id, table_schema, table_name, cut_lsn::text \
                 FROM {s}.reloads WHERE ($1::text IS NULL OR source = $1) AND status = 'done' \
                 ORDER BY table_schema, table_name, id DESC"
            ),
            &[&source],
        )
        .await
        .unwrap();
    for r in &latest {
        let (id, schema, table, cut): (i64, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let qualified = TableName::new(schema.clone(), table.clone()).quoted();
        target
            .batch_execute(&format!("TRUNCATE {qualified}"))
            .await
            .unwrap();
        let parts = reg
            .query(
                &format!(
                    "SELECT object_path, row_count FROM {s}.files \
                     WHERE kind = 'reload' AND reload_id = $2 AND ($1::text IS NULL OR source = $1) ORDER BY part"
                ),
                &[&source, &id],
            )
            .await
            .unwrap();
        assert!(
            !parts.is_empty(),
            "done reload {id} of source {source:?} has no parts"
        );
        for p in parts {
            let n = copy_part(
                &store,
                &p.get::<_, String>(0),
                target,
                &format!("COPY {qualified} FROM STDIN (FORMAT csv, HEADER, NULL '\\N')"),
            )
            .await;
            assert_eq!(
                n,
                p.get::<_, i64>(1) as u64,
                "row count of reload {id} part"
            );
            report.reload_parts += 1;
        }
        report.cuts.insert((schema, table), cut);
    }
    let files = reg
        .query(
            &format!(
                "SELECT object_path, schema_path, table_schema, table_name, checksum, row_count \
                 FROM {s}.files WHERE ($1::text IS NULL OR source = $1) AND kind = 'streaming' ORDER BY id"
            ),
            &[&source],
        )
        .await
        .unwrap();
    for f in files {
        let object: String = f.get(0);
        let key: (String, String) = (f.get(2), f.get(3));
        let data = store
            .get(&cdc_egress::sink::layout::stored_path(&object))
            .await
            .unwrap();
        assert_eq!(
            f.get::<_, String>(4),
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data))),
            "checksum of {object}"
        );
        let schema_text = store
            .get(&cdc_egress::sink::layout::stored_path(
                &f.get::<_, String>(1),
            ))
            .await
            .unwrap();
        let schema: SchemaYml = serde_yaml::from_slice(&schema_text).unwrap();
        assert_eq!(
            (schema.schema.clone(), schema.table.clone()),
            key,
            "schema.yml of {object} names another table"
        );
        let mut csv = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&data[..]), &mut csv).unwrap();
        let n = apply_file_from(
            target,
            &schema,
            &csv,
            report.cuts.get(&key).map(String::as_str),
        )
        .await;
        assert_eq!(n, f.get::<_, i64>(5) as u64, "row count of {object}");
        report.streaming_files += 1;
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Schema changes (tests/ddl.rs): the consumer rule that follows DDL records (README "Schema changes").

/// A column as `schema.yml` or `ddl.yml` describes it.
#[derive(serde::Deserialize, Debug, Clone)]
pub struct DdlCol {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    #[serde(default)]
    pub attnum: Option<i16>,
}

#[derive(serde::Deserialize, Debug)]
struct DdlTableRef {
    schema: String,
    table: String,
}

#[derive(serde::Deserialize, Debug)]
pub struct DdlYml {
    pub event: String,
    pub schema: String,
    pub table: String,
    pub commit_lsn: String,
    pub seq: u32,
    pub table_before: Option<serde_yaml::Value>,
    pub columns_after: Option<Vec<DdlCol>>,
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

/// Per target table: source attnum → the target column's name, learned from the files.
type Attnums = HashMap<(String, String), HashMap<i16, String>>;

/// The consumer rule with schema changes, as README "Schema changes" states it: the registry's
/// `streaming` and `ddl` rows in id order; per table, a `done` reload (the latest) replaces the
/// table just before the first of its rows or records at or after the reload's cut, and what lies
/// below the cut is skipped. A DDL record renames, creates, drops or reshapes the table (columns
/// matched by `attnum`, so a rename is a rename); a streaming file first reshapes the table to its
/// `schema.yml`, then its rows are applied. Tables are created from the files alone: `target`
/// starts empty.
pub async fn replay_following_ddl(
    registry_url: &str,
    output_url: &str,
    target: &Client,
) -> DdlReplay {
    let reg = connect(registry_url).await;
    let store = cdc_egress::sink::store::Store::open(output_url, &Default::default()).unwrap();
    let get = async |path: &str| -> Vec<u8> {
        store
            .get(&cdc_egress::sink::layout::stored_path(path))
            .await
            .unwrap()
            .to_vec()
    };
    let mut report = DdlReplay::default();
    let mut attnums: Attnums = HashMap::new();
    // Latest done reload per table: (id, cut).
    let mut reloads: HashMap<(String, String), (i64, String)> = HashMap::new();
    for r in reg
        .query(
            "SELECT DISTINCT ON (table_schema, table_name) id, table_schema, table_name, cut_lsn::text \
             FROM cdc_egress.reloads WHERE status = 'done' ORDER BY table_schema, table_name, id DESC",
            &[],
        )
        .await
        .unwrap()
    {
        reloads.insert((r.get(1), r.get(2)), (r.get(0), r.get(3)));
    }
    let mut loaded: std::collections::HashSet<(String, String)> = Default::default();
    let entries = reg
        .query(
            "SELECT kind, table_schema, table_name, object_path, schema_path, first_commit_lsn::text, \
             last_commit_lsn::text FROM cdc_egress.files WHERE kind IN ('streaming', 'ddl') ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let ge = async |a: &str, b: &str| -> bool {
        target
            .query_one("SELECT $1::text::pg_lsn >= $2::text::pg_lsn", &[&a, &b])
            .await
            .unwrap()
            .get(0)
    };
    for e in entries {
        let (kind, key): (String, (String, String)) = (e.get(0), (e.get(1), e.get(2)));
        let object: String = e.get(3);
        let last: String = e.get(6);
        let cut = reloads.get(&key).cloned();
        if let Some((reload_id, cut)) = &cut {
            // Wholly below the cut: superseded by the reload. A file that reaches the cut (one
            // registered before a retried export took a newer cut may start below it) has its
            // rows below the cut skipped by `apply_file_from`.
            if !ge(&last, cut).await {
                continue;
            }
            if loaded.insert(key.clone()) {
                load_reload(&reg, &store, target, &mut attnums, &key, *reload_id).await;
                report.reloads_loaded += 1;
            }
        }
        if kind == "ddl" {
            let doc: DdlYml = serde_yaml::from_slice(&get(&object).await).unwrap();
            apply_ddl(target, &mut attnums, &key, &doc).await;
            report.ddl_records.push(doc);
            continue;
        }
        let schema: SchemaYml = serde_yaml::from_slice(&get(&e.get::<_, String>(4)).await).unwrap();
        let cols: Vec<DdlCol> = schema
            .columns
            .iter()
            .map(|c| DdlCol {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                attnum: c.attnum,
            })
            .collect();
        reshape(target, &mut attnums, &key, &cols).await;
        let mut csv = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&get(&object).await[..]),
            &mut csv,
        )
        .unwrap();
        apply_file_from(target, &schema, &csv, cut.as_ref().map(|(_, c)| c.as_str())).await;
        report.streaming_files += 1;
    }
    // Reloads with nothing at or after their cut are loaded last.
    for (key, (reload_id, _)) in &reloads {
        if !loaded.contains(key) {
            load_reload(&reg, &store, target, &mut attnums, key, *reload_id).await;
            report.reloads_loaded += 1;
        }
    }
    return report;

    async fn load_reload(
        reg: &Client,
        store: &cdc_egress::sink::store::Store,
        target: &Client,
        attnums: &mut Attnums,
        key: &(String, String),
        reload_id: i64,
    ) {
        let parts = reg
            .query(
                "SELECT object_path, schema_path FROM cdc_egress.files \
                 WHERE kind = 'reload' AND reload_id = $1 ORDER BY part",
                &[&reload_id],
            )
            .await
            .unwrap();
        assert!(!parts.is_empty(), "reload {reload_id} has no parts");
        let schema_text = store
            .get(&cdc_egress::sink::layout::stored_path(
                &parts[0].get::<_, String>(1),
            ))
            .await
            .unwrap();
        let schema: SchemaYml = serde_yaml::from_slice(&schema_text).unwrap();
        let cols: Vec<DdlCol> = schema
            .columns
            .iter()
            .map(|c| DdlCol {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                attnum: c.attnum,
            })
            .collect();
        reshape(target, attnums, key, &cols).await;
        let qualified = TableName::new(key.0.clone(), key.1.clone()).quoted();
        target
            .batch_execute(&format!("TRUNCATE {qualified}"))
            .await
            .unwrap();
        let list = cols
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        for p in parts {
            copy_part(
                store,
                &p.get::<_, String>(0),
                target,
                &format!("COPY {qualified} ({list}) FROM STDIN (FORMAT csv, HEADER, NULL '\\N')"),
            )
            .await;
        }
    }
}

/// A DDL record applied to the target: rename, drop, or reshape to the columns after it.
async fn apply_ddl(target: &Client, attnums: &mut Attnums, key: &(String, String), doc: &DdlYml) {
    let here = TableName::new(key.0.clone(), key.1.clone()).quoted();
    match doc.event.as_str() {
        "drop" => {
            target
                .batch_execute(&format!("DROP TABLE IF EXISTS {here}"))
                .await
                .unwrap();
            attnums.remove(key);
        }
        "rename" => {
            let before: DdlTableRef =
                serde_yaml::from_value(doc.table_before.clone().unwrap()).unwrap();
            let old = (before.schema, before.table);
            let after = (doc.schema.clone(), doc.table.clone());
            // Filed under both names: the first copy renames, the second finds it done.
            let (old_q, new_name) = (
                TableName::new(old.0.clone(), old.1.clone()).quoted(),
                &after,
            );
            let exists = |k: &(String, String)| {
                format!(
                    "SELECT to_regclass({}) IS NOT NULL",
                    cdc_egress::table::quote_literal(
                        &TableName::new(k.0.clone(), k.1.clone()).quoted()
                    )
                )
            };
            let old_exists: bool = target.query_one(&exists(&old), &[]).await.unwrap().get(0);
            let new_exists: bool = target
                .query_one(&exists(new_name), &[])
                .await
                .unwrap()
                .get(0);
            if old != *new_name && old_exists && !new_exists {
                if old.0 != new_name.0 {
                    target
                        .batch_execute(&format!(
                            "ALTER TABLE {old_q} SET SCHEMA {}",
                            quote_ident(&new_name.0)
                        ))
                        .await
                        .unwrap();
                }
                let moved = TableName::new(new_name.0.clone(), old.1.clone()).quoted();
                if old.1 != new_name.1 {
                    target
                        .batch_execute(&format!(
                            "ALTER TABLE {moved} RENAME TO {}",
                            quote_ident(&new_name.1)
                        ))
                        .await
                        .unwrap();
                }
                if let Some(map) = attnums.remove(&old) {
                    attnums.insert(new_name.clone(), map);
                }
            }
            if let Some(cols) = &doc.columns_after {
                if *key == *new_name {
                    reshape(target, attnums, key, cols).await;
                }
            }
        }
        "unpublish" => {}
        _ => {
            if let Some(cols) = &doc.columns_after {
                reshape(target, attnums, key, cols).await;
            }
        }
    }
}

/// Creates the table or brings its columns to `cols`: renames (same attnum, new name), adds,
/// retypes and drops, in that order.
async fn reshape(target: &Client, attnums: &mut Attnums, key: &(String, String), cols: &[DdlCol]) {
    let table = TableName::new(key.0.clone(), key.1.clone()).quoted();
    target
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&key.0)
        ))
        .await
        .unwrap();
    let current: Vec<(String, String)> = target
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let exists: bool = target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0);
    let map = attnums.entry(key.clone()).or_default();
    if !exists {
        let defs: Vec<String> = cols
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
            .collect();
        target
            .batch_execute(&format!("CREATE TABLE {table} ({})", defs.join(", ")))
            .await
            .unwrap();
    } else {
        let mut names: Vec<String> = current.iter().map(|c| c.0.clone()).collect();
        for c in cols {
            if let Some(old) = c.attnum.and_then(|a| map.get(&a)).cloned() {
                if old != c.name && names.contains(&old) && !names.contains(&c.name) {
                    target
                        .batch_execute(&format!(
                            "ALTER TABLE {table} RENAME COLUMN {} TO {}",
                            quote_ident(&old),
                            quote_ident(&c.name)
                        ))
                        .await
                        .unwrap();
                    names.retain(|n| *n != old);
                    names.push(c.name.clone());
                }
            }
        }
        for c in cols {
            let now = current.iter().find(|(n, _)| *n == c.name);
            if !names.contains(&c.name) {
                target
                    .batch_execute(&format!(
                        "ALTER TABLE {table} ADD COLUMN {} {}",
                        quote_ident(&c.name),
                        c.type_name
                    ))
                    .await
                    .unwrap();
                names.push(c.name.clone());
            } else if now.is_some_and(|(_, t)| *t != c.type_name) {
                let col = quote_ident(&c.name);
                target
                    .batch_execute(&format!(
                        "ALTER TABLE {table} ALTER COLUMN {col} TYPE {ty} USING {col}::text::{ty}",
                        ty = c.type_name
                    ))
                    .await
                    .unwrap();
            }
        }
        for n in names.iter().filter(|n| !cols.iter().any(|c| c.name == **n)) {
            target
                .batch_execute(&format!(
                    "ALTER TABLE {table} DROP COLUMN {}",
                    quote_ident(n)
                ))
                .await
                .unwrap();
        }
    }
    map.clear();
    for c in cols {
        if let Some(a) = c.attnum {
            map.insert(a, c.name.clone());
        }
    }
}

/// Loads one gzipped CSV object (a reload part) into `target` with `copy` (`COPY … FROM STDIN`);
/// returns the rows copied.
async fn copy_part(
    store: &cdc_egress::sink::store::Store,
    object: &str,
    target: &Client,
    copy: &str,
) -> u64 {
    use futures::SinkExt;
    let data = store
        .get(&cdc_egress::sink::layout::stored_path(object))
        .await
        .unwrap();
    let mut csv = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&data[..]), &mut csv).unwrap();
    let sink = target.copy_in(copy).await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(csv)).await.unwrap();
    sink.finish().await.unwrap()
}
