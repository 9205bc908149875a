//! JetStream notices (README.md "Notices").
//!
//! # Contract
//! - The stream `nats.stream` exists on `<prefix>.>` with file storage (created if missing; an existing
//!   stream that does not capture `<prefix>.>` is a definite error).
//! - A notice is published at most once and, once [`Notifier::publish_once`] returns, exactly once:
//!   1. it reads the last message on the notice's subject; if that message carries our `Nats-Msg-Id`,
//!      the notice is already stored (a previous run crashed after the publish, before recording the
//!      sequence) and its sequence is returned;
//!   2. otherwise it publishes with `Nats-Msg-Id` = `<registry incarnation>:<batch id>` **and**
//!      `Nats-Expected-Last-Subject-Sequence` = the sequence found in step 1, then awaits the PubAck.
//!
//!   If JetStream nevertheless calls it a duplicate, another message with the same id is in the
//!   window: the same notice (same subject and payload) counts as landed, anything else is reported
//!   as an id collision (a definite error) instead of being lost silently.
//!
//!   The id gives de-duplication inside the stream's duplicate window; the subject-sequence condition
//!   gives it after any downtime, because notices of one subject are published one at a time, in
//!   registry order, by one process holding the slot. (It relies on the stream keeping the last
//!   message of each notice subject: do not give the stream limits that discard it.)
//! - Subjects: `<prefix>.batch.<schema>.<table>`, `<prefix>.reload.…`, `<prefix>.ddl.…`,
//!   `<prefix>.change.<schema>.<table>.<op>`. Schema and table names are one subject token each:
//!   characters that NATS reserves (`.`, `*`, `>`, whitespace, `%`) are percent-encoded.
//!   With `nats.change_events: grouped`, `<prefix>.changes.<schema>.<table>` instead of the
//!   `change` subjects. With `nats.txn_events`, `<prefix>.txn.begin|commit` (published by
//!   `daemon::events`).
//! - With `nats.schema_bucket`, the key-value bucket of every table's current schema exists (created
//!   if missing) and is written only by [`Publish::put_schema`]'s compare-and-set rule ([`schemas`]).
//!
//! What delivery needs of a notifier is the [`Publish`] trait; [`Notifier`] implements it on
//! JetStream, [`memory::MemoryNotifier`] in memory (a test double with the same contract, checked by
//! the same suite in `tests/notifier_conformance.rs`).

pub mod memory;
pub mod schemas;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;

use crate::error::{Component, Error, Kind};
use crate::secret::SecretUrl;
use crate::sink::owner::Owner;
use crate::table::TableName;
use schemas::{supersedes, SchemaEntry, SchemaHead};

/// Publishing notices: what delivery (`daemon::deliver`) needs of JetStream.
///
/// # Contract
/// - [`publish_once`](Publish::publish_once)`(subject, id, payload)` stores one message and returns
///   its stream sequence. Sequences are positive and strictly increasing over the whole stream, all
///   subjects together: a later stored message has a greater sequence.
/// - Calling it again with the same `id` on the same subject returns the *original* sequence and
///   stores nothing when the earlier message is still the last on its subject (the id names the
///   notice; the payload is not compared). That is always the case for a notice being completed:
///   delivery publishes a subject's notices one at a time, in registry order, and records each
///   sequence before the next. The same holds, whatever came after it, while the earlier message
///   is inside the stream's duplicate window and has the same subject and payload.
/// - The same `id` inside the duplicate window with another subject or payload (and not the last
///   on this subject) is an id collision: a definite error, nothing stored (the message would
///   otherwise be dropped silently as a duplicate).
/// - An error means *maybe published*: a transient error can come after the message was stored
///   (the acknowledgement was lost), so the caller retries with the same `id`, which the previous
///   point makes safe. A definite error (a collision, a stream that keeps changing under us)
///   means the caller must stop.
/// - Subjects of notices are `<prefix>.batch|reload|ddl.<schema>.<table>`, each name one subject
///   token ([`subject_token`]); the prefix is [`subject_prefix`](Publish::subject_prefix):
///   `<nats.subject_prefix>.<source.name>`, so sources sharing a stream never share a subject.
/// - Handles are cheap clones sharing one connection; calls may run concurrently.
pub trait Publish: Clone + Send + Sync + 'static {
    /// `<nats.subject_prefix>.<source.name>`: every subject this publisher writes starts with it.
    fn subject_prefix(&self) -> &str;

    fn publish_once(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<u64, Error>> + Send;

    fn batch_subject(&self, table: &TableName) -> String {
        notice_subject(self.subject_prefix(), "batch", table)
    }
    fn reload_subject(&self, table: &TableName) -> String {
        notice_subject(self.subject_prefix(), "reload", table)
    }
    fn ddl_subject(&self, table: &TableName) -> String {
        notice_subject(self.subject_prefix(), "ddl", table)
    }

    /// Whether this publisher keeps the schema bucket ([`schemas`]).
    fn keeps_schemas(&self) -> bool;

    /// Whether the entry stored under `key` makes `head` unnecessary (it does not
    /// [`supersede`](schemas::supersedes) it). May answer from what this handle last read or wrote
    /// (this daemon is the only writer of its source's keys); [`put_schema`](Publish::put_schema)
    /// decides on the server's current entry.
    fn schema_current(
        &self,
        key: &str,
        head: &SchemaHead,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Stores `value` (whose head is `head`) under `key` if it supersedes the stored entry, as a
    /// compare-and-set on the entry read; `Ok(false)` when it does not (a replay). A transient
    /// error means *maybe written*; calling again is safe (the stored entry then has this head).
    fn put_schema(
        &self,
        key: &str,
        head: &SchemaHead,
        value: Bytes,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
}

/// Notices on JetStream: [`Notifier::publish_once`] (see the module contract).
impl Publish for Notifier {
    fn subject_prefix(&self) -> &str {
        &self.prefix
    }

    fn publish_once(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        Notifier::publish_once(self, subject, id, payload)
    }

    fn keeps_schemas(&self) -> bool {
        self.schemas.is_some()
    }

    async fn schema_current(&self, key: &str, head: &SchemaHead) -> Result<bool, Error> {
        let (stored, _) = self.stored_schema(key, false).await?;
        Ok(!supersedes(head, stored.as_ref()))
    }

    async fn put_schema(&self, key: &str, head: &SchemaHead, value: Bytes) -> Result<bool, Error> {
        Notifier::put_schema(self, key, head, value).await
    }
}

/// `<prefix>.<kind>.<schema>.<table>`, each name one subject token.
pub fn notice_subject(prefix: &str, kind: &str, table: &TableName) -> String {
    format!(
        "{prefix}.{kind}.{}.{}",
        subject_token(&table.schema),
        subject_token(&table.name)
    )
}

#[derive(Clone)]
pub struct Notifier {
    js: jetstream::Context,
    stream: String,
    /// `nats.subject_prefix`: the stream captures `<stream_prefix>.>`, shared by every source.
    stream_prefix: String,
    /// `<nats.subject_prefix>.<source.name>`: the prefix of every subject this notifier publishes.
    prefix: String,
    /// `<registry incarnation>:` (see [`Notifier::with_incarnation`]).
    id_prefix: String,
    /// The schema bucket, when `nats.schema_bucket` is set and the daemon connected ([`schemas`]).
    schemas: Option<SchemaBucket>,
}

/// The schema bucket and what this process knows of its keys: per key the head of the stored
/// entry (`None`: absent or not ours) and its revision (0: no entry).
#[derive(Clone)]
struct SchemaBucket {
    kv: kv::Store,
    known: Arc<Mutex<HashMap<String, Stored>>>,
}

/// The head of a stored schema entry (`None`: absent, or not ours) and its revision (0: none).
type Stored = (Option<SchemaHead>, u64);

#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `None` disables notices.
    pub url: Option<SecretUrl>,
    pub stream: String,
    pub subject_prefix: String,
    /// `source.name`: the subject token after the prefix (see [`Publish`]).
    pub source: String,
    /// `nats.change_events`: none, one message per change, or one per group of changes.
    pub change_events: ChangeEvents,
    /// `nats.txn_events`: `<prefix>.<source>.txn.begin|commit` around each transaction's change
    /// events (needs `change_events`, in either mode).
    pub txn_events: bool,
    /// `nats.schema_bucket`: the key-value bucket of every table's current schema; `None` disables.
    pub schema_bucket: Option<String>,
    /// `nats.control_subject` when `nats.control` is on: where the daemon answers reload requests.
    pub control_subject: Option<String>,
    pub auth: NatsAuth,
}

/// `nats.change_events`: `false`, `true` (one message per change on
/// `<prefix>.<source>.change.<schema>.<table>.<op>`) or `grouped` (one message per run of a
/// transaction's changes of one table on `<prefix>.<source>.changes.<schema>.<table>`; see
/// `core::batch::event_groups`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChangeEvents {
    #[default]
    Off,
    PerChange,
    Grouped,
}

impl ChangeEvents {
    /// Whether change events are published at all.
    pub fn enabled(self) -> bool {
        self != ChangeEvents::Off
    }
}

/// NATS credentials and TLS, each from a file (never inline in the configuration).
#[derive(Clone, Debug, Default)]
pub struct NatsAuth {
    /// A `.creds` file (user JWT + nkey seed), as `nsc` writes it.
    pub creds_file: Option<PathBuf>,
    /// A file holding an authentication token.
    pub token_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// A file holding the password of the user named in `nats.url` (`nats://user@host`).
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate (implies TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

fn transient<E>(what: &str, e: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    Error::caused_by(Kind::Transient, Component::Nats, format!("NATS {what}"), e)
}

/// A failed publish: a message larger than the server's `max_payload` is a configuration error
/// (definite: a retry sends the same message again), anything else transient.
fn publish_error(what: &str, e: jetstream::context::PublishError) -> Error {
    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return Error::caused_by(
            Kind::Definite,
            Component::Config,
            format!(
                "NATS {what}: the message is larger than the server's max_payload; raise \
                 max_payload in the NATS server's configuration (a notice needs a few KiB, a grouped \
                 change event up to 256 KiB plus headers, a per-change event the largest row), or set \
                 nats.change_events to false"
            ),
            e,
        );
    }
    transient(what, e)
}

/// One subject token from a name: reserved characters percent-encoded.
pub fn subject_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '.' | '*' | '>' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_whitespace() || c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// Reads a credential file named by the configuration (a definite configuration error if it cannot).
fn read_secret(key: &str, path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| {
            Error::definite(
                Component::Config,
                format!("cannot read {key} {}: {e}", path.display()),
            )
        })
}

/// Connection options with the configured credentials and TLS (every secret from a file).
async fn connect_options(cfg: &NatsConfig) -> Result<async_nats::ConnectOptions, Error> {
    crate::pg::install_default_provider();
    let a = &cfg.auth;
    let mut o = match &a.creds_file {
        Some(p) => async_nats::ConnectOptions::with_credentials_file(p)
            .await
            .map_err(|e| {
                Error::definite(
                    Component::Config,
                    format!("nats.creds_file {}: {e}", p.display()),
                )
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(p) = &a.token_file {
        o = o.token(read_secret("nats.token_file", p)?);
    }
    if let Some(p) = &a.nkey_file {
        o = o.nkey(read_secret("nats.nkey_file", p)?);
    }
    if let Some(p) = &a.password_file {
        let user = cfg
            .url
            .as_ref()
            .and_then(|u| url::Url::parse(u.expose()).ok())
            .map(|u| u.username().to_string())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                Error::definite(
                    Component::Config,
                    "nats.password_file needs the user name in nats.url (nats://user@host:4222)",
                )
            })?;
        o = o.user_and_password(user, read_secret("nats.password_file", p)?);
    }
    if let Some(p) = &a.tls_ca_file {
        o = o.add_root_certificates(p.clone()).require_tls(true);
    }
    match (&a.tls_cert_file, &a.tls_key_file) {
        (Some(c), Some(k)) => {
            o = o
                .add_client_certificate(c.clone(), k.clone())
                .require_tls(true)
        }
        (None, None) => {}
        _ => {
            return Err(Error::definite(
                Component::Config,
                "nats.tls_cert_file and nats.tls_key_file go together: set both or neither",
            ))
        }
    }
    Ok(o.connection_timeout(Duration::from_secs(5))
        .name("cdc-egress"))
}

impl Notifier {
    /// Connects (failing fast with a clear message when the server is down) and makes sure the
    /// stream exists (the daemon).
    pub async fn connect(cfg: &NatsConfig) -> Result<Option<Notifier>, Error> {
        let Some(n) = Self::connect_only(cfg).await? else {
            return Ok(None);
        };
        n.ensure_stream().await?;
        let mut n = n;
        if let Some(bucket) = &cfg.schema_bucket {
            // The bucket serves consumers; it must never hold up delivery (e.g. a user without
            // the permission to create it after an upgrade). A later session tries again and
            // its start-up backfill fills in what this one missed.
            if let Err(e) = n.ensure_schema_bucket(bucket).await {
                tracing::warn!(
                    error = %e,
                    "the schema bucket {bucket} cannot be opened: this session delivers without it \
                     (grant the daemon's NATS user $JS.API.> and $KV.{bucket}.>, or set nats.schema_bucket: \"\")"
                );
            }
        }
        Ok(Some(n))
    }

    /// Connects to an existing stream without creating or changing anything (one-shot readers such
    /// as `cdc-egress notices`): a missing stream is a definite error that names it.
    pub async fn open_existing(cfg: &NatsConfig) -> Result<Option<Notifier>, Error> {
        match Self::open_if_exists(cfg).await? {
            Some(Ok(n)) => Ok(Some(n)),
            Some(Err(stream)) => Err(Error::definite(
                Component::Nats,
                format!(
                    "JetStream stream {stream} does not exist: the daemon creates it on its first run"
                ),
            )),
            None => Ok(None),
        }
    }

    /// Like [`open_existing`](Self::open_existing), but a missing stream is an answer (`Err` with
    /// its name), not an error. `None`: NATS is disabled.
    pub async fn open_if_exists(
        cfg: &NatsConfig,
    ) -> Result<Option<Result<Notifier, String>>, Error> {
        let Some(n) = Self::connect_only(cfg).await? else {
            return Ok(None);
        };
        match n.js.get_stream(&n.stream).await {
            Ok(_) => Ok(Some(Ok(n))),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                Ok(Some(Err(n.stream)))
            }
            Err(e) => Err(transient(&format!("open stream {}", n.stream), e)),
        }
    }

    async fn connect_only(cfg: &NatsConfig) -> Result<Option<Notifier>, Error> {
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let client = connect_options(cfg)
            .await?
            .connect(url.expose())
            .await
            .map_err(|e| {
                use async_nats::ConnectErrorKind as K;
                match e.kind() {
                    // The server refused our credentials, or they could not be used: configuration.
                    K::AuthorizationViolation | K::Authentication => Error::definite(
                        Component::Config,
                        format!(
                            "NATS {} rejected the credentials ({e}): check nats.url's user, nats.password_file, \
                             nats.token_file, nats.nkey_file or nats.creds_file",
                            url.redacted()
                        ),
                    ),
                    _ => transient(&format!("connect to {}", url.redacted()), e)
                        .hint("is nats-server running with JetStream (-js)?"),
                }
            })?;
        Ok(Some(Notifier {
            js: jetstream::new(client),
            stream: cfg.stream.clone(),
            stream_prefix: cfg.subject_prefix.clone(),
            prefix: format!("{}.{}", cfg.subject_prefix, cfg.source),
            id_prefix: String::new(),
            schemas: None,
        }))
    }

    /// The connection under this notifier (the daemon's control responder shares it).
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// Opens the schema bucket `bucket`, creating it (file storage, [`schemas::BUCKET_HISTORY`]
    /// versions per key) if missing; an existing bucket keeps its settings. The bucket's stream is
    /// created as a KV client would (`KV_<bucket>` on `$KV.<bucket>.>`, rollups allowed, deletes
    /// denied, direct gets, discard new) but without asking for the account's limits first, which
    /// async-nats cannot parse from nats-server 2.9.
    async fn ensure_schema_bucket(&mut self, bucket: &str) -> Result<(), Error> {
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("cdc-egress: the current schema of every published table".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: schemas::BUCKET_HISTORY,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| transient(&format!("create or open key-value bucket {bucket}"), e))?;
        let kv = self
            .js
            .get_key_value(bucket)
            .await
            .map_err(|e| transient(&format!("open key-value bucket {bucket}"), e))?;
        self.schemas = Some(SchemaBucket {
            kv,
            known: Arc::default(),
        });
        Ok(())
    }

    /// The head and revision of the entry stored under `key`, from what this handle knows unless
    /// `fresh`.
    async fn stored_schema(&self, key: &str, fresh: bool) -> Result<Stored, Error> {
        let b = self.schema_bucket()?;
        if !fresh {
            if let Some(k) = b.known.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
                return Ok(k.clone());
            }
        }
        let stored = match b.kv.entry(key).await {
            Ok(None) => (None, 0),
            Ok(Some(e)) => {
                let ours = (e.operation == kv::Operation::Put)
                    .then(|| SchemaEntry::head_of(&e.value))
                    .flatten();
                (ours, e.revision)
            }
            Err(e) => return Err(transient(&format!("read schema entry {key}"), e)),
        };
        b.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), stored.clone());
        Ok(stored)
    }

    fn schema_bucket(&self) -> Result<&SchemaBucket, Error> {
        self.schemas.as_ref().ok_or_else(|| {
            Error::definite(
                Component::Nats,
                "internal: the schema bucket is not open (nats.schema_bucket)",
            )
        })
    }

    /// [`Publish::put_schema`] on the bucket: read the entry, decide, update on its revision.
    pub async fn put_schema(
        &self,
        key: &str,
        head: &SchemaHead,
        value: Bytes,
    ) -> Result<bool, Error> {
        let b = self.schema_bucket()?;
        let forget = || {
            b.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
        };
        for _ in 0..5 {
            let (stored, revision) = self.stored_schema(key, true).await?;
            if !supersedes(head, stored.as_ref()) {
                return Ok(false);
            }
            match b.kv.update(key, value.clone(), revision).await {
                Ok(rev) => {
                    b.known
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.to_string(), (Some(head.clone()), rev));
                    return Ok(true);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    forget();
                    return Err(transient(&format!("write schema entry {key}"), e));
                }
            }
        }
        forget();
        Err(Error::definite(
            Component::Nats,
            format!(
                "another writer keeps changing the schema entry {key}: cdc-egress must be the only writer of its source's keys"
            ),
        ))
    }

    /// Message ids of this notifier are `<incarnation>:<id>`: `incarnation` is the registry's own
    /// identity (`registry_info.incarnation`, new whenever a registry is created), so a recreated
    /// registry or database writing into a surviving stream never reuses an earlier run's ids.
    pub fn with_incarnation(mut self, incarnation: &str) -> Notifier {
        self.id_prefix = format!("{incarnation}:");
        self
    }

    /// The `Nats-Msg-Id` of the notice or event whose own id is `id`.
    pub fn msg_id(&self, id: &str) -> String {
        format!("{}{id}", self.id_prefix)
    }

    async fn ensure_stream(&self) -> Result<(), Error> {
        let wanted = format!("{}.>", self.stream_prefix);
        // nats-server 2.9 removes an account's empty store folder when its last stream is deleted;
        // a creation racing with that fails once ("error creating store for stream", 10049) and
        // succeeds when asked again. A few quick tries here keep that race out of the caller's
        // retry schedule (seen with streams created and deleted side by side on one server).
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut s = loop {
            let created = self
                .js
                .get_or_create_stream(stream::Config {
                    name: self.stream.clone(),
                    subjects: vec![wanted.clone()],
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(s) => break s,
                Err(e) if backoff.attempts() < 4 => {
                    tracing::debug!(stream = %self.stream, error = %e, "creating the stream again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    return Err(transient(
                        &format!("create or open stream {}", self.stream),
                        e,
                    ))
                }
            }
        };
        let info = s
            .info()
            .await
            .map_err(|e| transient(&format!("stream {} info", self.stream), e))?;
        if !info
            .config
            .subjects
            .iter()
            .any(|x| x == &wanted || x == ">")
        {
            return Err(Error::definite(
                Component::Nats,
                format!(
                    "JetStream stream {} exists with subjects {:?} but does not capture {wanted}: \
                     add the subject to the stream or choose another nats.stream / nats.subject_prefix",
                    self.stream, info.config.subjects
                ),
            ));
        }
        Ok(())
    }

    fn subject(&self, kind: &str, table: &TableName) -> String {
        notice_subject(&self.prefix, kind, table)
    }

    pub fn batch_subject(&self, table: &TableName) -> String {
        self.subject("batch", table)
    }
    pub fn reload_subject(&self, table: &TableName) -> String {
        self.subject("reload", table)
    }
    pub fn ddl_subject(&self, table: &TableName) -> String {
        self.subject("ddl", table)
    }
    pub fn change_subject(&self, table: &TableName, op: &str) -> String {
        format!("{}.{op}", self.subject("change", table))
    }
    /// `<prefix>.<source>.changes.<schema>.<table>`: grouped change events
    /// (`nats.change_events: grouped`).
    pub fn changes_subject(&self, table: &TableName) -> String {
        self.subject("changes", table)
    }
    /// `<prefix>.<source>.txn.<begin|commit>`: transaction boundaries (`nats.txn_events`).
    pub fn txn_subject(&self, boundary: &str) -> String {
        format!("{}.txn.{boundary}", self.prefix)
    }

    /// Publishes `payload` on `subject` with the message id of `id` exactly once (see the module
    /// contract) and returns its stream sequence.
    pub async fn publish_once(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<u64, Error> {
        let (id_bare, msg_id) = (id, &self.msg_id(id));
        let stream = self.open_stream().await?;
        for _ in 0..5 {
            let expected = match stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => {
                    let id = m
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .map(|v| v.as_str().to_string());
                    // Ours: our id, or a notice published before ids carried the registry
                    // incarnation (the bare id) with the very same payload.
                    let legacy = id.as_deref() == Some(id_bare) && m.payload == payload;
                    if id.as_deref() == Some(msg_id.as_str()) || legacy {
                        return Ok(m.sequence);
                    }
                    m.sequence
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
                Err(e) => return Err(transient(&format!("read last message on {subject}"), e)),
            };
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(msg_id)
                .expected_last_subject_sequence(expected);
            let ack = self
                .js
                .send_publish(subject.to_string(), publish)
                .await
                .map_err(|e| publish_error(&format!("publish on {subject}"), e))?;
            match ack.await {
                Ok(a) if a.duplicate => {
                    return self
                        .check_duplicate(subject, msg_id, &payload, a.sequence)
                        .await
                }
                Ok(a) => return Ok(a.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(transient(&format!("publish ack on {subject}"), e)),
            }
        }
        Err(Error::definite(
            Component::Nats,
            format!(
                "another publisher keeps writing to {subject}: cdc-egress must be the only publisher of its notice subjects"
            ),
        ))
    }

    async fn open_stream(&self) -> Result<stream::Stream, Error> {
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| transient(&format!("open stream {}", self.stream), e))
    }

    /// The subject of the owner record: `<prefix>.<source>.owner`.
    pub fn owner_subject(&self) -> String {
        format!("{}.owner", self.prefix)
    }

    /// Claims the subject prefix in the stream for `ours` (see [`crate::sink::owner`]): the last
    /// message on `<prefix>.owner` names the owner; when there is none, ours is published with
    /// `Nats-Expected-Last-Subject-Sequence: 0`, so of two claims at once exactly one is stored and
    /// the other reads it. Another owner is refused: two daemons publishing on the same notice
    /// subjects would mix two sources in one subject and defeat each other's exactly-once check.
    pub async fn claim_subject_prefix(&self, ours: &Owner) -> Result<(), Error> {
        let subject = self.owner_subject();
        let stream = self.open_stream().await?;
        for _ in 0..2 {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => {
                    let recorded: Owner = serde_json::from_slice(&m.payload).map_err(|e| {
                        Error::definite(
                            Component::Config,
                            format!(
                                "the last message on {subject} in stream {} is not an owner record \
                                 ({e}): another publisher uses the subject prefix {:?}",
                                self.stream, self.prefix
                            ),
                        )
                    })?;
                    if ours.same_as(&recorded) {
                        return Ok(());
                    }
                    return Err(ours.refused(
                        &format!(
                            "the subject prefix {:?} of stream {}",
                            self.prefix, self.stream
                        ),
                        &recorded,
                        "stop the other daemon and run `cdc-egress release-owner --yes` with this configuration",
                    ));
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(transient(&format!("read last message on {subject}"), e)),
            }
            let body = serde_json::to_vec(ours).expect("an owner serializes");
            let publish = jetstream::message::PublishMessage::build()
                .payload(body.into())
                .expected_last_subject_sequence(0);
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| publish_error(&format!("publish on {subject}"), e))?;
            match ack.await {
                Ok(_) => return Ok(()),
                // Someone claimed it first: read their claim.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(transient(&format!("publish ack on {subject}"), e)),
            }
        }
        Err(Error::transient(
            Component::Nats,
            format!("NATS claim {subject}: the owner record changed while it was being read"),
        ))
    }

    /// Releases the subject prefix's claim (`cdc-egress release-owner`): purges `<prefix>.owner`;
    /// returns the owner it had.
    pub async fn release_subject_prefix(&self) -> Result<Option<Owner>, Error> {
        let subject = self.owner_subject();
        let stream = self.open_stream().await?;
        let recorded = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => serde_json::from_slice(&m.payload).ok(),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(transient(&format!("read last message on {subject}"), e)),
        };
        stream
            .purge()
            .filter(subject.clone())
            .await
            .map_err(|e| transient(&format!("purge {subject}"), e))?;
        Ok(recorded)
    }

    /// The server called our publish a duplicate although the last message on the subject is not
    /// ours: some *other* message carries the same `Nats-Msg-Id` inside the duplicate window. If it
    /// is the same notice (same subject and payload) it landed; anything else is an id collision,
    /// which would silently drop this notice: a definite error that says what collided.
    async fn check_duplicate(
        &self,
        subject: &str,
        msg_id: &str,
        payload: &Bytes,
        seq: u64,
    ) -> Result<u64, Error> {
        let stream = self.open_stream().await?;
        let other = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| transient(&format!("read message {seq}"), e))?;
        if other.subject.as_str() == subject && other.payload == *payload {
            return Ok(seq);
        }
        Err(Error::definite(
            Component::Nats,
            format!(
                "Nats-Msg-Id collision: JetStream dropped the notice {msg_id} on {subject} as a duplicate of \
                 message {seq} on {} with different content. Another writer (or an earlier registry) uses the \
                 same ids in stream {}: give each deployment its own nats.stream or nats.subject_prefix",
                other.subject, self.stream
            ),
        ))
    }

    /// The newest `limit` messages of the stream on `<prefix>.>` as (sequence, subject, payload), oldest
    /// first: what `cdc-egress notices` prints.
    pub async fn recent(&self, limit: u64) -> Result<Vec<(u64, String, Bytes)>, Error> {
        let mut stream = self.open_stream().await?;
        let state = stream
            .info()
            .await
            .map_err(|e| transient(&format!("stream {} info", self.stream), e))?
            .state
            .clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let from = state
            .last_sequence
            .saturating_sub(limit.saturating_sub(1))
            .max(state.first_sequence);
        for seq in from..=state.last_sequence {
            match stream.get_raw_message(seq).await {
                Ok(m) => out.push((m.sequence, m.subject.to_string(), m.payload)),
                Err(e) if e.to_string().contains("not found") => continue,
                Err(e) => return Err(transient(&format!("read message {seq}"), e)),
            }
        }
        Ok(out)
    }

    /// Starts a pipelined publish (change events); await the returned future for the PubAck.
    pub async fn publish_pipelined(
        &self,
        subject: async_nats::Subject,
        id: &str,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        self.send_pipelined(subject, id, None, payload).await
    }

    /// [`Notifier::publish_pipelined`] with headers (grouped change events); the message id header
    /// is set here, over any in `headers`.
    pub async fn publish_pipelined_with_headers(
        &self,
        subject: async_nats::Subject,
        id: &str,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        self.send_pipelined(subject, id, Some(headers), payload)
            .await
    }

    async fn send_pipelined(
        &self,
        subject: async_nats::Subject,
        id: &str,
        headers: Option<async_nats::HeaderMap>,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        let mut publish = jetstream::message::PublishMessage::build().payload(payload);
        if let Some(headers) = headers {
            publish = publish.headers(headers);
        }
        let publish = publish.message_id(self.msg_id(id));
        self.js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| publish_error(&format!("publish on {subject}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_single_tokens() {
        assert_eq!(subject_token("public"), "public");
        assert_eq!(subject_token("my.schema"), "my%2Eschema");
        assert_eq!(subject_token("a b*>%"), "a%20b%2A%3E%25");
        assert_eq!(subject_token(""), "%00");
        assert_eq!(subject_token("Ünï"), "Ünï");
    }

    proptest::proptest! {
        /// Any identifier (no NUL) is one token with no NATS-reserved character, and percent-decoding
        /// gives it back: different tables never share a subject.
        #[test]
        fn subject_tokens_are_reversible_single_tokens(name in "\\PC{1,24}|[ .*>%\t]{1,6}") {
            let token = subject_token(&name);
            proptest::prop_assert!(!token.is_empty());
            proptest::prop_assert!(!token.chars().any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control()));
            let back = percent_encoding::percent_decode_str(&token).decode_utf8().unwrap();
            proptest::prop_assert_eq!(back, name);
        }
    }
}
