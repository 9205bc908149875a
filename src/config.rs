//! Configuration: one YAML file, overridden by `CDC_EGRESS_<SECTION>_<KEY>` environment variables, then
//! by `--set section.key=value` flags (README.md "Configuration").
//!
//! # Contract
//! - Every key is known in advance ([`KEYS`]); an unknown key in the file, an unknown `CDC_EGRESS_*`
//!   variable or an unknown `--set` key is an error that names it and where it came from.
//! - Every value is parsed and validated here, before any connection is made; an error names the key,
//!   the offending value (with secrets redacted) and its origin (file, variable, flag).
//! - Secrets never leave this module in clear text through `Display`/`Debug`: URLs print redacted and
//!   `output.options` values whose key looks like a credential print as `***`.
//!
//! - Secrets can come from files: `*.password_file` and the `nats.*_file` keys name files, and any
//!   key can be given as `CDC_EGRESS_<SECTION>_<KEY>_FILE=<path>` (the container-secrets
//!   convention): the value is the file's content without its trailing newline.
//!
//! Only variables whose first word after `CDC_EGRESS_` is a section name (`SOURCE`, `REGISTRY`,
//! `OUTPUT`, `BATCH`, `NATS`, `RELOAD`, `HTTP`, `LOG`) are configuration; others (`CDC_EGRESS_CONFIG`,
//! the config file path; `CDC_EGRESS_TEST_*`, `CDC_EGRESS_VENV` and the like used by scripts) are
//! ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Component, Error};

/// Known keys: `(section.key, default shown in docs)`. `output.options` is a map and takes any sub-key.
pub const KEYS: &[&str] = &[
    "source.url",
    "source.publication",
    "source.slot",
    "source.name",
    "source.heartbeat_interval",
    "source.status_interval",
    "source.password_file",
    "source.slot_lost",
    "source.slot_failover",
    "registry.url",
    "registry.schema",
    "registry.password_file",
    "output.url",
    "output.options",
    "output.spool_dir",
    "batch.interval",
    "batch.max_rows",
    "batch.max_bytes",
    "nats.url",
    "nats.stream",
    "nats.subject_prefix",
    "nats.change_events",
    "nats.txn_events",
    "nats.schema_bucket",
    "nats.control",
    "nats.control_subject",
    "nats.creds_file",
    "nats.token_file",
    "nats.nkey_file",
    "nats.password_file",
    "nats.tls_ca_file",
    "nats.tls_cert_file",
    "nats.tls_key_file",
    "reload.parallelism",
    "reload.initial",
    "reload.on_rewrite",
    "http.listen",
    "log.format",
    "log.level",
];

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Flag => write!(f, "--set flag"),
        }
    }
}

#[derive(Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub registry: RegistryConfig,
    pub output: OutputConfig,
    pub batch: BatchConfig,
    pub nats: NatsConfig,
    pub reload: ReloadConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub url: SecretUrl,
    /// A file holding the password, used when `url` has none (before `$PGPASSWORD` / `~/.pgpass`).
    pub password_file: Option<PathBuf>,
    /// What to do when the slot was invalidated or dropped behind our back.
    pub slot_lost: SlotLostPolicy,
    /// Create the slot with `FAILOVER` (PostgreSQL 17+), so it is synchronized to standbys and
    /// survives a switch-over.
    pub slot_failover: bool,
    pub publication: String,
    pub slot: String,
    /// The namespace of everything this daemon writes (README "Running several daemons"): the first
    /// path segment below the output root, a subject token, the `source` of its registry rows.
    pub name: String,
    /// How often a heartbeat logical message is written so that an idle slot still advances.
    pub heartbeat_interval: Duration,
    /// How often a standby status update is sent even when nothing changed.
    pub status_interval: Duration,
}

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub url: SecretUrl,
    /// As `source.password_file`; defaults to it when `registry.url` is not set.
    pub password_file: Option<PathBuf>,
    pub schema: String,
}

#[derive(Clone, Debug)]
pub struct OutputConfig {
    pub url: String,
    pub options: BTreeMap<String, Secret>,
    /// Local directory for batch spool files (gzip streams being built before upload).
    pub spool_dir: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct BatchConfig {
    pub interval: Duration,
    pub max_rows: u64,
    pub max_bytes: u64,
}

// Settings types owned by the module that uses them (so that module does not depend on this one),
// re-exported here where the whole configuration is assembled.
pub use crate::core::ddl::RewritePolicy;
pub use crate::observe::LogFormat;
pub use crate::pg::slot::SlotLostPolicy;
pub use crate::secret::{redact_url, Secret, SecretUrl};
pub use crate::sink::notify::{ChangeEvents, NatsAuth, NatsConfig};

#[derive(Clone, Debug)]
pub struct ReloadConfig {
    pub parallelism: usize,
    /// Export every published table on a fresh start (no slot yet).
    pub initial: bool,
    /// What a DDL that changes existing rows without row changes starts (README "Schema changes").
    pub on_rewrite: RewritePolicy,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// `None` disables the metrics/health endpoint.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["secret", "password", "token", "key", "credential", "sas"]
        .iter()
        .any(|s| k.contains(s))
        && !k.ends_with("_id")
        && k != "access_key_id"
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .field("registry", &self.registry)
            .field("output", &self.output)
            .field("batch", &self.batch)
            .field("nats", &self.nats)
            .field("reload", &self.reload)
            .field("http", &self.http)
            .field("log", &self.log)
            .finish()
    }
}

impl OutputConfig {
    /// `output.options` in clear text, to hand to the object store. Never log this.
    pub fn options_exposed(&self) -> BTreeMap<String, String> {
        self.options
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect()
    }

    /// `output.options` rendered for display: credential-like values as `***`.
    pub fn options_redacted(&self) -> BTreeMap<String, String> {
        self.options
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_option(k) {
                    "***".to_string()
                } else {
                    v.0.clone()
                };
                (k.clone(), shown)
            })
            .collect()
    }
}

/// Raw values collected from the three layers, before typing.
#[derive(Default, Debug)]
struct Layers {
    values: BTreeMap<String, (String, Origin)>,
    options: BTreeMap<String, (String, Origin)>,
}

fn usage(msg: impl Into<String>) -> Error {
    Error::definite(Component::Config, msg)
}

impl Config {
    /// The source connection: `source.url` with a missing password filled from
    /// `source.password_file`, `$PGPASSWORD` or the password file (see
    /// [`ConnInfo::with_password_fallback`](crate::pg::conninfo::ConnInfo::with_password_fallback)).
    pub fn source_conninfo(&self) -> Result<crate::pg::conninfo::ConnInfo, Error> {
        crate::pg::conninfo::ConnInfo::parse(self.source.url.expose())?
            .with_password_fallback(self.source.password_file.as_deref())
    }

    /// The registry connection, likewise with `registry.password_file`.
    pub fn registry_conninfo(&self) -> Result<crate::pg::conninfo::ConnInfo, Error> {
        crate::pg::conninfo::ConnInfo::parse(self.registry.url.expose())?
            .with_password_fallback(self.registry.password_file.as_deref())
    }

    /// The registry on a pool of at most `connections` (opened lazily).
    pub fn open_registry(
        &self,
        connections: usize,
    ) -> Result<crate::sink::registry::Registry, Error> {
        Ok(crate::sink::registry::Registry::new(
            self.registry_conninfo()?.pool(connections)?,
            &self.registry.schema,
            &self.source.name,
        ))
    }

    /// Loads the configuration. `path` is `--config`; when `None`, `CDC_EGRESS_CONFIG` and then
    /// `./cdc-egress.yml` are tried (a missing default file is fine; a missing named file is not).
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Config, Error> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(path, &env, sets)
    }

    /// Like [`Config::load`] with an explicit environment (tests).
    pub fn load_from(
        path: Option<&Path>,
        env: &[(String, String)],
        sets: &[String],
    ) -> Result<Config, Error> {
        let mut layers = Layers::default();
        let env_path = env
            .iter()
            .find(|(k, _)| k == "CDC_EGRESS_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        let (file, required) = match (path, env_path) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from("cdc-egress.yml"), false),
        };
        match std::fs::read_to_string(&file) {
            Ok(text) => layers.read_yaml(&text, &file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(e) => {
                return Err(usage(format!(
                    "cannot read config file {}: {e}",
                    file.display()
                )))
            }
        }
        layers.read_env(env)?;
        for s in sets {
            layers.read_flag(s)?;
        }
        layers.build()
    }

    /// Parses only YAML text plus flags (tests and `--help` examples).
    pub fn from_yaml(text: &str, sets: &[String]) -> Result<Config, Error> {
        let mut layers = Layers::default();
        layers.read_yaml(text, Path::new("<inline>"))?;
        for s in sets {
            layers.read_flag(s)?;
        }
        layers.build()
    }
}

fn scalar_to_string(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Null => Some(String::new()),
        _ => None,
    }
}

impl Layers {
    fn set(&mut self, key: &str, value: String, origin: Origin) -> Result<(), Error> {
        if let Some(opt) = key.strip_prefix("output.options.") {
            if opt.is_empty() {
                return Err(usage(format!("empty output.options key (from {origin})")));
            }
            self.options.insert(opt.to_string(), (value, origin));
            return Ok(());
        }
        if key == "output.options" {
            // `k=v,k2=v2` from an env var or flag
            for pair in value.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    usage(format!(
                        "output.options (from {origin}) must be a list of key=value pairs separated by commas, got {:?}",
                        redact_url(pair)
                    ))
                })?;
                self.options
                    .insert(k.trim().to_string(), (v.trim().to_string(), origin.clone()));
            }
            return Ok(());
        }
        if !KEYS.contains(&key) {
            return Err(usage(format!(
                "unknown configuration key `{key}` (from {origin}); known keys: {}",
                KEYS.join(", ")
            )));
        }
        self.values.insert(key.to_string(), (value, origin));
        Ok(())
    }

    fn read_yaml(&mut self, text: &str, file: &Path) -> Result<(), Error> {
        let origin = Origin::File(file.to_path_buf());
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            usage(format!(
                "config file {} is not valid YAML: {e}",
                file.display()
            ))
        })?;
        let map = match doc {
            serde_yaml::Value::Null => return Ok(()),
            serde_yaml::Value::Mapping(m) => m,
            _ => {
                return Err(usage(format!(
                    "config file {} must be a mapping of sections (source:, output:, ...)",
                    file.display()
                )))
            }
        };
        for (section, body) in map {
            let section = section
                .as_str()
                .ok_or_else(|| usage(format!("non-string section name in {}", file.display())))?
                .to_string();
            let body = match body {
                serde_yaml::Value::Mapping(m) => m,
                serde_yaml::Value::Null => continue,
                _ => {
                    return Err(usage(format!(
                        "section `{section}` in {} must be a mapping of keys",
                        file.display()
                    )))
                }
            };
            for (k, v) in body {
                let k = k.as_str().ok_or_else(|| {
                    usage(format!(
                        "non-string key in section `{section}` of {}",
                        file.display()
                    ))
                })?;
                let key = format!("{section}.{k}");
                if key == "output.options" {
                    let m = match v {
                        serde_yaml::Value::Mapping(m) => m,
                        serde_yaml::Value::Null => continue,
                        _ => {
                            return Err(usage(format!(
                                "`output.options` in {} must be a mapping",
                                file.display()
                            )))
                        }
                    };
                    for (ok, ov) in m {
                        let ok = ok
                            .as_str()
                            .map(str::to_string)
                            .ok_or_else(|| usage("non-string key in output.options".to_string()))?;
                        let ov = scalar_to_string(&ov).ok_or_else(|| {
                            usage(format!(
                                "output.options.{ok} in {} must be a scalar",
                                file.display()
                            ))
                        })?;
                        self.set(&format!("output.options.{ok}"), ov, origin.clone())?;
                    }
                    continue;
                }
                let value = scalar_to_string(&v).ok_or_else(|| {
                    usage(format!(
                        "`{key}` in {} must be a scalar value",
                        file.display()
                    ))
                })?;
                self.set(&key, value, origin.clone())?;
            }
        }
        Ok(())
    }

    fn read_env(&mut self, env: &[(String, String)]) -> Result<(), Error> {
        // Which variable set each key, so `X` and `X_FILE` together are an error, not a silent pick.
        let mut set_by: BTreeMap<String, &str> = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CDC_EGRESS_") else {
                continue;
            };
            let Some(key) = env_to_key(rest) else {
                // Not a configuration variable (CDC_EGRESS_CONFIG, CDC_EGRESS_TEST_*, scripts' own).
                continue;
            };
            let origin = Origin::Env(name.clone());
            // `CDC_EGRESS_<SECTION>_<KEY>_FILE`: the value of <KEY> is the content of that file,
            // unless `<key>_file` is itself a key (e.g. source.password_file takes a path).
            let is_key = KEYS.contains(&key.as_str()) || key.starts_with("output.options.");
            let (key, value) = match (is_key, key.strip_suffix("_file")) {
                (false, Some(base)) => {
                    let text = std::fs::read_to_string(value).map_err(|e| {
                        usage(format!("cannot read {value:?} named by {name}: {e}"))
                    })?;
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    (base.to_string(), text)
                }
                _ => (key, value.clone()),
            };
            if let Some(other) = set_by.insert(key.clone(), name.as_str()) {
                return Err(usage(format!(
                    "both {other} and {name} set `{key}`: keep one of them"
                )));
            }
            self.set(&key, value, origin)?;
        }
        Ok(())
    }

    fn read_flag(&mut self, s: &str) -> Result<(), Error> {
        let (k, v) = s.split_once('=').ok_or_else(|| {
            usage(format!(
                "--set expects section.key=value, got {:?}",
                redact_url(s)
            ))
        })?;
        self.set(k.trim(), v.to_string(), Origin::Flag)
    }

    fn get(&self, key: &str) -> Option<&(String, Origin)> {
        self.values.get(key)
    }

    fn string(&self, key: &str, default: &str) -> String {
        self.get(key)
            .map(|(v, _)| v.clone())
            .unwrap_or_else(|| default.to_string())
    }

    fn parsed<T>(
        &self,
        key: &str,
        default: T,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, Error> {
        match self.get(key) {
            None => Ok(default),
            Some((v, origin)) => parse(v.trim()).ok_or_else(|| {
                usage(format!(
                    "invalid value {:?} for `{key}` (from {origin}): expected {what}",
                    redact_url(v)
                ))
            }),
        }
    }

    /// An optional path (empty means unset).
    fn path(&self, key: &str) -> Option<PathBuf> {
        self.get(key)
            .map(|(v, _)| v.trim())
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    /// `nats.change_events`, `nats.txn_events`, `nats.schema_bucket`, `nats.control` and
    /// `nats.control_subject`, checked together: transaction events bracket change events, and the
    /// control subject must lie outside the stream's `<prefix>.>` (a request captured by the stream
    /// would be answered by JetStream's PubAck as well as by the daemon).
    fn nats_extras(&self, stream: &str, prefix: &str, source: &str) -> Result<NatsExtras, Error> {
        let flag = |key: &str| self.parsed(key, false, "true or false", parse_bool);
        let change_events = self.parsed(
            "nats.change_events",
            ChangeEvents::Off,
            "one of `false`, `true` (one message per change) or `grouped` (one message per run of a transaction's changes of one table)",
            parse_change_events,
        )?;
        let txn_events = flag("nats.txn_events")?;
        if txn_events && !change_events.enabled() {
            return Err(usage(
                "`nats.txn_events: true` needs `nats.change_events: true` or `grouped`: transaction events bracket the change events",
            ));
        }
        let derived: String = stream
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let bucket = self.string("nats.schema_bucket", &format!("{derived}_SCHEMAS"));
        let bucket = bucket.trim();
        if !bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(usage(format!(
                "invalid value {bucket:?} for `nats.schema_bucket`: a bucket name is letters, digits, '_' and '-' (empty disables)"
            )));
        }
        let control_subject = self.string(
            "nats.control_subject",
            &format!("{prefix}-control.{source}.reload"),
        );
        if control_subject.is_empty()
            || control_subject
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
            || control_subject.starts_with('.')
            || control_subject.ends_with('.')
            || control_subject.contains("..")
        {
            return Err(usage(format!(
                "invalid value {control_subject:?} for `nats.control_subject`: expected a NATS subject without spaces or wildcards"
            )));
        }
        if control_subject.starts_with(&format!("{prefix}.")) {
            return Err(usage(format!(
                "`nats.control_subject` {control_subject:?} is inside `{prefix}.>`, which the stream {stream} captures: \
                 JetStream would store every request and answer it too; choose a subject outside it (default {prefix}-control.{source}.reload)"
            )));
        }
        if !control_subject.split('.').any(|t| t == source) {
            return Err(usage(format!(
                "`nats.control_subject` {control_subject:?} must have the source name {source:?} as one of its tokens \
                 (default {prefix}-control.{source}.reload): daemons of several sources must never share it, or each would place the reload on its own source"
            )));
        }
        Ok(NatsExtras {
            change_events,
            txn_events,
            schema_bucket: (!bucket.is_empty()).then(|| bucket.to_string()),
            control_subject: flag("nats.control")?.then_some(control_subject),
        })
    }

    fn identifier(&self, key: &str, default: &str) -> Result<String, Error> {
        let v = self.string(key, default);
        if v.is_empty() || v.len() > 63 || v.contains('\0') {
            let origin = self
                .get(key)
                .map(|(_, o)| o.clone())
                .unwrap_or(Origin::Default);
            return Err(usage(format!(
                "invalid value {v:?} for `{key}` (from {origin}): expected a PostgreSQL identifier of 1 to 63 bytes"
            )));
        }
        Ok(v)
    }

    fn build(self) -> Result<Config, Error> {
        let duration = |s: &str| humantime::parse_duration(s).ok().filter(|d| !d.is_zero());
        let source_url = match self.get("source.url") {
            Some((v, _)) if !v.trim().is_empty() => v.trim().to_string(),
            _ => {
                return Err(usage(
                    "`source.url` is required: set it in the config file (source: {url: postgres://...}), \
                     with CDC_EGRESS_SOURCE_URL, or with --set source.url=...",
                ))
            }
        };
        check_pg_url(
            "source.url",
            &source_url,
            self.get("source.url").map(|x| &x.1),
        )?;
        let registry_url_given = self
            .get("registry.url")
            .is_some_and(|(v, _)| !v.trim().is_empty());
        let registry_url = match self.get("registry.url") {
            Some((v, o)) if !v.trim().is_empty() => {
                check_pg_url("registry.url", v.trim(), Some(o))?;
                v.trim().to_string()
            }
            _ => source_url.clone(),
        };
        let slot = self.identifier("source.slot", "cdc_egress")?;
        if !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(usage(format!(
                "invalid value {slot:?} for `source.slot`: replication slot names may contain only lower-case letters, digits and underscores"
            )));
        }
        let source_name = self.string("source.name", &slot);
        if !crate::sink::layout::valid_source_name(&source_name) {
            return Err(usage(format!(
                "invalid value {source_name:?} for `source.name`: 1 to 63 lower-case letters, digits, '_' or '-' \
                 (it names a folder and a NATS subject token as it is)"
            )));
        }
        let output_url = self.string("output.url", "file://./cdc-egress-out");
        crate::sink::store::check_output_url(&output_url).map_err(|e| {
            let origin = self
                .get("output.url")
                .map(|(_, o)| o.clone())
                .unwrap_or(Origin::Default);
            usage(format!("invalid `output.url` (from {origin}): {e}"))
        })?;
        let nats_url = match self.get("nats.url") {
            Some((v, _)) if v.trim().is_empty() => None,
            Some((v, o)) => {
                let v = v.trim();
                if !(v.starts_with("nats://")
                    || v.starts_with("tls://")
                    || v.starts_with("ws://")
                    || v.starts_with("wss://")
                    || !v.contains("://"))
                {
                    return Err(usage(format!(
                        "invalid value {:?} for `nats.url` (from {o}): expected nats://host:port (empty disables NATS)",
                        redact_url(v)
                    )));
                }
                Some(SecretUrl::new(v))
            }
            None => Some(SecretUrl::new("nats://127.0.0.1:4222")),
        };
        let subject_prefix = self.string("nats.subject_prefix", "cdc");
        if subject_prefix.is_empty()
            || subject_prefix
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
            || subject_prefix.starts_with('.')
            || subject_prefix.ends_with('.')
        {
            return Err(usage(format!(
                "invalid value {subject_prefix:?} for `nats.subject_prefix`: expected NATS subject tokens without spaces or wildcards"
            )));
        }
        let stream = self.string("nats.stream", "CDC_EGRESS");
        if stream.is_empty()
            || stream
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(usage(format!(
                "invalid value {stream:?} for `nats.stream`: stream names may not contain spaces, '.', '*', '>', '/' or '\\'"
            )));
        }
        let nats_extras = self.nats_extras(&stream, &subject_prefix, &source_name)?;
        let http_listen = match self.get("http.listen") {
            Some((v, _)) if v.trim().is_empty() => None,
            _ => Some(self.parsed(
                "http.listen",
                "127.0.0.1:9187".parse().expect("valid default"),
                "an address like 127.0.0.1:9187 (empty disables)",
                |s| s.parse().ok(),
            )?),
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let config = Config {
            source: SourceConfig {
                url: SecretUrl::new(source_url),
                password_file: self.path("source.password_file"),
                slot_lost: self.parsed(
                    "source.slot_lost",
                    SlotLostPolicy::Error,
                    "error or reexport",
                    |s| match s {
                        "error" => Some(SlotLostPolicy::Error),
                        "reexport" => Some(SlotLostPolicy::Reexport),
                        _ => None,
                    },
                )?,
                slot_failover: self.parsed(
                    "source.slot_failover",
                    false,
                    "true or false",
                    parse_bool,
                )?,
                publication: self.identifier("source.publication", "cdc_egress")?,
                slot,
                name: source_name.clone(),
                heartbeat_interval: self.parsed(
                    "source.heartbeat_interval",
                    Duration::from_secs(30),
                    "a duration like 30s",
                    duration,
                )?,
                status_interval: self.parsed(
                    "source.status_interval",
                    Duration::from_secs(10),
                    "a duration like 10s",
                    duration,
                )?,
            },
            registry: RegistryConfig {
                url: SecretUrl::new(registry_url),
                password_file: self.path("registry.password_file").or_else(|| {
                    if registry_url_given {
                        None
                    } else {
                        self.path("source.password_file")
                    }
                }),
                schema: self.identifier("registry.schema", "cdc_egress")?,
            },
            output: OutputConfig {
                url: output_url,
                options: self
                    .options
                    .iter()
                    .map(|(k, (v, _))| (k.clone(), Secret(v.clone())))
                    .collect(),
                spool_dir: self
                    .get("output.spool_dir")
                    .filter(|(v, _)| !v.trim().is_empty())
                    .map(|(v, _)| PathBuf::from(v.trim())),
            },
            batch: BatchConfig {
                interval: self.parsed(
                    "batch.interval",
                    Duration::from_secs(300),
                    "a duration like 5m or 2s",
                    duration,
                )?,
                max_rows: self.parsed("batch.max_rows", 1_000_000, "a positive integer", |s| {
                    s.replace('_', "").parse().ok().filter(|n| *n > 0)
                })?,
                max_bytes: self.parsed(
                    "batch.max_bytes",
                    256 * 1024 * 1024,
                    "a positive size like 256MiB or 1000000",
                    parse_size,
                )?,
            },
            nats: NatsConfig {
                url: nats_url,
                stream,
                subject_prefix,
                source: source_name.clone(),
                change_events: nats_extras.change_events,
                txn_events: nats_extras.txn_events,
                schema_bucket: nats_extras.schema_bucket,
                control_subject: nats_extras.control_subject,
                auth: NatsAuth {
                    creds_file: self.path("nats.creds_file"),
                    token_file: self.path("nats.token_file"),
                    nkey_file: self.path("nats.nkey_file"),
                    password_file: self.path("nats.password_file"),
                    tls_ca_file: self.path("nats.tls_ca_file"),
                    tls_cert_file: self.path("nats.tls_cert_file"),
                    tls_key_file: self.path("nats.tls_key_file"),
                },
            },
            reload: ReloadConfig {
                parallelism: self.parsed(
                    "reload.parallelism",
                    cores,
                    "a positive integer",
                    |s| s.parse().ok().filter(|n| *n > 0 && *n <= 256),
                )?,
                initial: self.parsed("reload.initial", true, "true or false", parse_bool)?,
                on_rewrite: self.parsed(
                    "reload.on_rewrite",
                    RewritePolicy::Reload,
                    "reload or record",
                    |s| match s {
                        "reload" => Some(RewritePolicy::Reload),
                        "record" => Some(RewritePolicy::Record),
                        _ => None,
                    },
                )?,
            },
            http: HttpConfig {
                listen: http_listen,
            },
            log: LogConfig {
                format: self.parsed(
                    "log.format",
                    LogFormat::Text,
                    "text or json",
                    |s| match s {
                        "text" => Some(LogFormat::Text),
                        "json" => Some(LogFormat::Json),
                        _ => None,
                    },
                )?,
                level: self.string("log.level", "info"),
            },
        };
        Ok(config)
    }
}

fn check_pg_url(key: &str, url: &str, origin: Option<&Origin>) -> Result<(), Error> {
    let origin = origin.cloned().unwrap_or(Origin::Default);
    crate::pg::conninfo::ConnInfo::parse(url)
        .map(|_| ())
        .map_err(|e| usage(format!("invalid `{key}` (from {origin}): {e}")))
}

/// Configuration sections, as the first word of `CDC_EGRESS_<SECTION>_<KEY>` variables.
const SECTIONS: &[&str] = &[
    "source", "registry", "output", "batch", "nats", "reload", "http", "log",
];

/// `CDC_EGRESS_BATCH_MAX_ROWS` → `batch.max_rows`; the section is the first `_`-separated word.
/// `None` when that word is not a section (the variable is not configuration).
fn env_to_key(rest: &str) -> Option<String> {
    let lower = rest.to_ascii_lowercase();
    if let Some(opt) = lower.strip_prefix("output_options_") {
        return Some(format!("output.options.{opt}"));
    }
    let (section, key) = lower.split_once('_')?;
    SECTIONS
        .contains(&section)
        .then(|| format!("{section}.{key}"))
}

/// `nats.change_events`: a boolean (`true`: one message per change) or `grouped`.
fn parse_change_events(s: &str) -> Option<ChangeEvents> {
    if s.eq_ignore_ascii_case("grouped") {
        return Some(ChangeEvents::Grouped);
    }
    parse_bool(s).map(|on| {
        if on {
            ChangeEvents::PerChange
        } else {
            ChangeEvents::Off
        }
    })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// `1048576`, `512KiB`, `64MiB`, `1GiB`, `10MB` (decimal units accepted too).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult).filter(|v| *v > 0)
}

/// The NATS settings beyond the connection and the stream (`Layers::nats_extras`).
struct NatsExtras {
    change_events: ChangeEvents,
    txn_events: bool,
    schema_bucket: Option<String>,
    control_subject: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_and_its_file_variable_together_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("url");
        std::fs::write(&f, "postgres://u@h/db\n").unwrap();
        let both = env(&[
            ("CDC_EGRESS_SOURCE_URL", "postgres://u@h/x"),
            ("CDC_EGRESS_SOURCE_URL_FILE", f.to_str().unwrap()),
        ]);
        let err = Config::load_from(None, &both, &[]).unwrap_err().to_string();
        assert!(
            err.contains("CDC_EGRESS_SOURCE_URL_FILE") && err.contains("keep one"),
            "{err}"
        );
        let c = Config::load_from(None, &both[1..], &[]).unwrap();
        assert_eq!(c.source.url.expose(), "postgres://u@h/db");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: &str = "source:\n  url: postgres://u:hunter2@127.0.0.1/db\n";

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::from_yaml(BASE, &[]).unwrap();
        assert_eq!(c.source.publication, "cdc_egress");
        assert_eq!(c.source.slot, "cdc_egress");
        assert_eq!(
            c.source.name, "cdc_egress",
            "the source is named after the slot"
        );
        let named = Config::from_yaml(BASE, &["source.slot=s1".into()]).unwrap();
        assert_eq!(named.source.name, "s1");
        for bad in ["", ".", "..", "A", "a.b", "a b", "a/b", &"x".repeat(64)] {
            let err = Config::from_yaml(BASE, &[format!("source.name={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("source.name"), "{bad:?}: {err}");
        }
        assert_eq!(
            Config::from_yaml(BASE, &["source.name=eu-west_1".into()])
                .unwrap()
                .source
                .name,
            "eu-west_1"
        );
        assert_eq!(c.registry.url, c.source.url);
        assert_eq!(c.registry.schema, "cdc_egress");
        assert_eq!(c.output.url, "file://./cdc-egress-out");
        assert_eq!(c.batch.interval, Duration::from_secs(300));
        assert_eq!(
            c.nats.url.as_ref().unwrap().expose(),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(c.nats.stream, "CDC_EGRESS");
        assert_eq!(c.nats.subject_prefix, "cdc");
        assert_eq!(c.nats.change_events, ChangeEvents::Off);
        assert_eq!(c.http.listen.unwrap().to_string(), "127.0.0.1:9187");
    }

    #[test]
    fn nats_bucket_control_and_txn_settings() {
        let c = Config::from_yaml(BASE, &[]).unwrap();
        assert!(!c.nats.txn_events);
        assert_eq!(c.nats.schema_bucket.as_deref(), Some("CDC_EGRESS_SCHEMAS"));
        assert!(
            c.nats.control_subject.is_none(),
            "control is off by default"
        );
        let set = |flags: &[&str]| {
            Config::from_yaml(
                BASE,
                &flags.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
            )
        };
        let c = set(&[
            "nats.control=true",
            "source.name=eu",
            "nats.stream=S-1",
            "nats.schema_bucket=",
        ])
        .unwrap();
        assert_eq!(
            c.nats.control_subject.as_deref(),
            Some("cdc-control.eu.reload")
        );
        assert!(c.nats.schema_bucket.is_none());
        let c = set(&["nats.change_events=true", "nats.txn_events=true"]).unwrap();
        assert!(c.nats.txn_events);
        assert_eq!(c.nats.change_events, ChangeEvents::PerChange);
        let c = set(&["nats.change_events=grouped", "nats.txn_events=true"]).unwrap();
        assert!(c.nats.txn_events);
        assert_eq!(c.nats.change_events, ChangeEvents::Grouped);
        for (value, want) in [
            ("false", ChangeEvents::Off),
            ("off", ChangeEvents::Off),
            ("true", ChangeEvents::PerChange),
            ("yes", ChangeEvents::PerChange),
            ("Grouped", ChangeEvents::Grouped),
        ] {
            let c = set(&[format!("nats.change_events={value}").as_str()]).unwrap();
            assert_eq!(c.nats.change_events, want, "{value}");
        }
        // The file (a YAML boolean or a word) and the environment take the same values.
        for (yaml, want) in [
            ("true", ChangeEvents::PerChange),
            ("false", ChangeEvents::Off),
            ("grouped", ChangeEvents::Grouped),
        ] {
            let c = Config::from_yaml(&format!("{BASE}nats:\n  change_events: {yaml}\n"), &[]);
            assert_eq!(c.unwrap().nats.change_events, want, "{yaml}");
        }
        let c = Config::load_from(
            None,
            &env(&[
                ("CDC_EGRESS_SOURCE_URL", "postgres://u@h/db"),
                ("CDC_EGRESS_NATS_CHANGE_EVENTS", "grouped"),
                ("CDC_EGRESS_NATS_TXN_EVENTS", "true"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.nats.change_events, ChangeEvents::Grouped);
        assert!(c.nats.txn_events);
        let e = set(&["nats.change_events=batched"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`nats.change_events`")
                && e.contains("`false`")
                && e.contains("`true`")
                && e.contains("`grouped`"),
            "lists the accepted values: {e}"
        );
        for (flags, needle) in [
            (
                &["nats.txn_events=true"][..],
                "needs `nats.change_events: true` or `grouped`",
            ),
            (
                &[
                    "nats.control=true",
                    "nats.control_subject=cdc.control.reload",
                ][..],
                "inside `cdc.>`",
            ),
            (&["nats.control_subject=a b"][..], "nats.control_subject"),
            (
                &["nats.control_subject=ops.reload"][..],
                "must have the source name",
            ),
            (&["nats.schema_bucket=a.b"][..], "nats.schema_bucket"),
        ] {
            let e = set(flags).err().unwrap().to_string();
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_yaml(&format!("{BASE}batch:\n  intervall: 5s\n"), &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("`batch.intervall`"), "{e}");
        let e = Config::load_from(Some(Path::new("/nonexistent/cdc.yml")), &env(&[]), &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/cdc.yml"), "{e}");
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yml");
        std::fs::write(&path, format!("{BASE}batch:\n  interval: 5s\n")).unwrap();
        let c = Config::load_from(
            Some(&path),
            &env(&[
                ("CDC_EGRESS_BATCH_INTERVAL", "7s"),
                ("CDC_EGRESS_BATCH_MAX_ROWS", "10"),
                ("CDC_EGRESS_TEST_PG_URL", "ignored"),
                ("CDC_EGRESS_OUTPUT_OPTIONS_REGION", "us-east-1"),
            ]),
            &["batch.max_rows=20".to_string(), "nats.url=".to_string()],
        )
        .unwrap();
        assert_eq!(c.batch.interval, Duration::from_secs(7));
        assert_eq!(c.batch.max_rows, 20);
        assert!(c.nats.url.is_none());
        assert_eq!(c.output.options["region"].0, "us-east-1");
        let e = Config::load_from(Some(&path), &env(&[("CDC_EGRESS_BATCH_FOO", "1")]), &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("CDC_EGRESS_BATCH_FOO"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_origin_without_secrets() {
        let e = Config::from_yaml(BASE, &["batch.interval=soon".into()])
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("`batch.interval`") && msg.contains("--set"),
            "{msg}"
        );
        let e = Config::from_yaml("source:\n  url: mysql://u:hunter2@h/db\n", &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("source.url"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Config::from_yaml(BASE, &["output.url=ftp://x/y".into()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("output.url"), "{e}");
        assert!(Config::from_yaml("batch:\n  interval: 5s\n", &[])
            .err()
            .unwrap()
            .to_string()
            .contains("source.url"));
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::from_yaml(
            &format!("{BASE}output:\n  options:\n    aws_secret_access_key: s3cr3t\n    aws_access_key_id: AKIA\n    region: x\n"),
            &[],
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        let opts = c.output.options_redacted();
        assert_eq!(opts["aws_secret_access_key"], "***");
        assert_eq!(opts["aws_access_key_id"], "AKIA");
        assert_eq!(
            redact_url("postgres://u:p%40ss@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(
            redact_url("host=h password=x user=u"),
            "host=h password=*** user=u"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("12 parsecs"), None);
    }
}
