//! The user's PostgreSQL connection string, parsed once and used for every kind of connection.
//!
//! Contract:
//! - [`ConnInfo::parse`] accepts `postgres://` / `postgresql://` URLs and libpq `key=value` strings
//!   with a fixed set of parameters (see there). Anything else, including an unknown parameter, is a
//!   definite error whose message names the offending parameter; a parsed `ConnInfo` is always
//!   complete (defaults filled in) and contains no NUL bytes, so it can go into a startup packet.
//! - Every connection built from it, ordinary ([`ConnInfo::connect`], [`ConnInfo::pool`]) or
//!   replication ([`crate::pg::wire::ReplicationConnection::connect`]), uses the same host, role,
//!   TLS policy (`super::tls`) and the same startup `options`: the user's `options` followed by
//!   `-c name=value` for each of [`SESSION_SETTINGS`], so that text output never depends on the
//!   server's, database's or role's defaults (startup options override `ALTER DATABASE/ROLE … SET`).
//! - TLS is never used on unix sockets, whatever `sslmode` says (the server would refuse it anyway).
//! - The password never appears in `Debug` output or in [`ConnInfo::redacted`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Component, Error};
use crate::pg::tls::{self, SslMode};

/// Session settings every value-producing session runs with, so text output never depends on server or
/// role defaults.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

const COMPONENT: Component = Component::Postgres;
const CONFIG: Component = Component::Config;
const DEFAULT_PORT: u16 = 5432;
const KNOWN_PARAMS: &str =
    "host, port, user, password, dbname, sslmode, sslrootcert, application_name, connect_timeout, options";

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// Host name or IP address (IPv6 without brackets).
    Tcp(String),
    /// Directory holding the `.s.PGSQL.<port>` socket.
    Unix(PathBuf),
}

/// A parsed, complete connection description. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    host: Host,
    port: u16,
    user: String,
    password: Option<String>,
    dbname: String,
    sslmode: SslMode,
    sslrootcert: Option<PathBuf>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    options: Option<String>,
}

/// Raw values as given, before defaults.
#[derive(Default)]
struct Raw {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<String>,
    options: Option<String>,
}

impl Raw {
    fn set(&mut self, key: &str, value: String) -> Result<(), Error> {
        let slot = match key {
            "host" => &mut self.host,
            "port" => &mut self.port,
            "user" => &mut self.user,
            "password" => &mut self.password,
            "dbname" => &mut self.dbname,
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "application_name" => &mut self.application_name,
            "connect_timeout" => &mut self.connect_timeout,
            "options" => &mut self.options,
            _ => {
                return Err(config_error(format!(
                    "unknown connection parameter {key:?} (supported: {KNOWN_PARAMS})"
                )))
            }
        };
        if value.contains('\0') {
            return Err(config_error(format!(
                "connection parameter {key:?} contains a NUL byte"
            )));
        }
        *slot = Some(value);
        Ok(())
    }
}

fn config_error(msg: impl Into<String>) -> Error {
    Error::definite(CONFIG, msg)
}

impl ConnInfo {
    /// Accepts `postgres://` / `postgresql://` URLs and `key=value` conninfo strings. Supported params:
    /// host (hostname, IP, or an absolute unix-socket directory; also `host=` query param in URLs, e.g.
    /// postgresql:///db?host=/var/run/postgresql), port, user, password, dbname, sslmode
    /// (disable|allow|prefer|require|verify-ca|verify-full), sslrootcert (PEM file), application_name,
    /// connect_timeout (seconds, 0 = none), options. Unknown params are an error that names the param.
    /// user defaults to $PGUSER then the OS user ($USER / $LOGNAME); dbname defaults to the user; port
    /// 5432; host defaults to localhost over TCP; sslmode defaults to prefer.
    ///
    /// URL components are percent-decoded (`+` is not a space); query parameters override the same
    /// setting given in the URL body. In `key=value` strings values may be single-quoted, with `\'`
    /// and `\\` escapes. Several comma-separated hosts are not supported.
    pub fn parse(url: &str) -> Result<ConnInfo, Error> {
        let s = url.trim();
        let raw = if let Some(rest) = s
            .strip_prefix("postgresql://")
            .or_else(|| s.strip_prefix("postgres://"))
        {
            parse_url(rest)?
        } else if looks_like_url(s) {
            return Err(config_error(
                "connection URL must start with postgres:// or postgresql://",
            ));
        } else {
            parse_keyword_value(s)?
        };
        Self::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<ConnInfo, Error> {
        let host = match raw.host.as_deref() {
            None | Some("") => Host::Tcp("localhost".into()),
            Some(h) if h.contains(',') => {
                return Err(config_error(format!(
                    "host {h:?}: several hosts are not supported"
                )))
            }
            Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            Some(h) => Host::Tcp(h.trim_start_matches('[').trim_end_matches(']').to_string()),
        };
        let port = match raw.port.as_deref() {
            None | Some("") => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 => n,
                _ => {
                    return Err(config_error(format!(
                        "invalid port {p:?}: expected 1-65535"
                    )))
                }
            },
        };
        let user = match raw.user.filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => default_user()?,
        };
        let dbname = raw
            .dbname
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        let sslmode = match raw.sslmode.as_deref() {
            None | Some("") => SslMode::Prefer,
            Some(m) => SslMode::parse(m).ok_or_else(|| {
                config_error(format!(
                    "invalid sslmode {m:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                ))
            })?,
        };
        let sslrootcert = raw.sslrootcert.filter(|p| !p.is_empty()).map(PathBuf::from);
        let connect_timeout = match raw.connect_timeout.as_deref() {
            None | Some("") => None,
            Some(t) => match t.trim().parse::<u64>() {
                Ok(0) => None,
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => {
                    return Err(config_error(format!(
                        "invalid connect_timeout {t:?}: expected whole seconds"
                    )))
                }
            },
        };
        Ok(ConnInfo {
            host,
            port,
            user,
            password: raw.password,
            dbname,
            sslmode,
            sslrootcert,
            application_name: raw.application_name.filter(|a| !a.is_empty()),
            connect_timeout,
            options: raw.options.filter(|o| !o.trim().is_empty()),
        })
    }

    /// Fills in a missing password the way libpq does, after the URL's own: `password_file` (the
    /// configuration's `*.password_file`, a file whose content is the password), then `$PGPASSWORD`,
    /// then the first matching line of `$PGPASSFILE` (default `~/.pgpass`). A password given in the
    /// URL always wins. A named password file that cannot be read is a configuration error; a
    /// missing default `~/.pgpass` is not.
    pub fn with_password_fallback(mut self, password_file: Option<&Path>) -> Result<Self, Error> {
        if self.password.is_some() {
            return Ok(self);
        }
        if let Some(path) = password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                config_error(format!(
                    "cannot read the password file {}: {e}",
                    path.display()
                ))
            })?;
            self.password = Some(text.trim_end_matches(['\n', '\r']).to_string());
            return Ok(self);
        }
        if let Some(p) = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()) {
            self.password = Some(p);
            return Ok(self);
        }
        let (file, named) = match std::env::var_os("PGPASSFILE").filter(|f| !f.is_empty()) {
            Some(f) => (PathBuf::from(f), true),
            None => match std::env::var_os("HOME") {
                Some(h) => (PathBuf::from(h).join(".pgpass"), false),
                None => return Ok(self),
            },
        };
        // Like libpq: a password file others can read is ignored, with a warning.
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(&file) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %file.display(), "password file has group or world access; it is ignored (chmod 0600 it)");
                return Ok(self);
            }
        }
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let host = match &self.host {
                    Host::Tcp(h) => h.clone(),
                    Host::Unix(d) => d.display().to_string(),
                };
                self.password = pgpass_lookup(&text, &host, self.port, &self.dbname, &self.user);
                Ok(self)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(self),
            Err(e) => Err(config_error(format!(
                "cannot read the password file {} (PGPASSFILE): {e}",
                file.display()
            ))),
        }
    }

    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    /// `host:port` for TCP (`[v6]:port`), the socket file path for unix sockets. For messages.
    pub fn host_description(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => self.socket_path(dir).display().to_string(),
        }
    }

    /// The URL with any password replaced by `***` (for logs and `status`). It is a canonical URL of
    /// the effective settings (defaults included), which parses back to the same settings.
    pub fn redacted(&self) -> String {
        let mut out = String::from("postgres://");
        out.push_str(&encode(&self.user, false));
        if self.password.is_some() {
            out.push_str(":***");
        }
        out.push('@');
        let mut query: Vec<(&str, String)> = Vec::new();
        match &self.host {
            Host::Tcp(h) if h.contains(':') => out.push_str(&format!("[{h}]")),
            Host::Tcp(h) => out.push_str(&encode(h, false)),
            Host::Unix(dir) => query.push(("host", encode(&dir.to_string_lossy(), true))),
        }
        out.push_str(&format!(":{}/{}", self.port, encode(&self.dbname, false)));
        query.push(("sslmode", self.sslmode.as_str().to_string()));
        if let Some(p) = &self.sslrootcert {
            query.push(("sslrootcert", encode(&p.to_string_lossy(), true)));
        }
        if let Some(a) = &self.application_name {
            query.push(("application_name", encode(a, true)));
        }
        if let Some(t) = self.connect_timeout {
            query.push(("connect_timeout", t.as_secs().to_string()));
        }
        if let Some(o) = &self.options {
            query.push(("options", encode(o, true)));
        }
        for (i, (k, v)) in query.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        }
        out
    }

    /// Returns a copy pointing at another database on the same server (tests create one DB each).
    pub fn with_dbname(&self, db: &str) -> ConnInfo {
        ConnInfo {
            dbname: db.to_string(),
            ..self.clone()
        }
    }

    /// An ordinary (non-replication) tokio-postgres connection, TLS per sslmode, with
    /// [`SESSION_SETTINGS`] applied as startup `options`; spawns the connection task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let config = self.pg_config();
        let what = || format!("connecting to {} as {}", self.host_description(), self.user);
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            let (client, conn) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| pg_error(e).context(what()))?;
            spawn_connection(conn, self.host_description());
            Ok(client)
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
            let (client, conn) = config
                .connect(tls)
                .await
                .map_err(|e| pg_error(e).context(what()))?;
            spawn_connection(conn, self.host_description());
            Ok(client)
        }
    }

    /// A deadpool-postgres pool built from the same settings as [`ConnInfo::connect`], `max_size`
    /// connections at most. Connections are opened lazily, so this does not touch the server.
    pub fn pool(&self, max_size: usize) -> Result<deadpool_postgres::Pool, Error> {
        use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
        let config = self.pg_config();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
            Manager::from_config(config, tls, manager_config)
        };
        Pool::builder(manager)
            .max_size(max_size)
            .build()
            .map_err(|e| Error::definite(COMPONENT, format!("building connection pool: {e}")))
    }

    /// tokio-postgres only knows disable/prefer/require; verify-ca/verify-full map to require and the
    /// rustls configuration does the verification. Unix sockets never use TLS.
    pub(crate) fn pg_config(&self) -> tokio_postgres::Config {
        use tokio_postgres::config::SslMode as PgSsl;
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            Host::Tcp(h) => c.host(h),
            Host::Unix(dir) => c.host_path(dir),
        };
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .options(self.startup_options());
        if let Some(p) = &self.password {
            c.password(p);
        }
        if let Some(a) = &self.application_name {
            c.application_name(a);
        }
        if let Some(t) = self.connect_timeout {
            c.connect_timeout(t);
        }
        c.ssl_mode(match (self.use_tls(), self.sslmode.requires_tls()) {
            (false, _) => PgSsl::Disable,
            (true, false) => PgSsl::Prefer,
            (true, true) => PgSsl::Require,
        });
        c
    }

    // ---- crate-internal accessors used by the replication client ----

    pub(crate) fn host(&self) -> &Host {
        &self.host
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    pub(crate) fn application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    pub(crate) fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// Whether an SSLRequest is sent at all: never on unix sockets or with `sslmode=disable`.
    pub(crate) fn use_tls(&self) -> bool {
        matches!(self.host, Host::Tcp(_)) && self.sslmode != SslMode::Disable
    }

    pub(crate) fn tls_config(&self) -> Result<rustls::ClientConfig, Error> {
        tls::client_config(self.sslmode, self.sslrootcert.as_deref())
    }

    pub(crate) fn socket_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// The startup packet's `options`: the user's, then `-c name=value` for each session setting
    /// (later settings win, so ours override a user-given one).
    pub(crate) fn startup_options(&self) -> String {
        let mut out = self.options.clone().unwrap_or_default();
        for (name, value) in SESSION_SETTINGS {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&format!("-c {name}={value}"));
        }
        out
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnInfo").field(&self.redacted()).finish()
    }
}

fn default_user() -> Result<String, Error> {
    ["PGUSER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .ok_or_else(|| config_error("no user given, and none of $PGUSER, $USER, $LOGNAME is set"))
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>, host: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(host = %host, error = %e, "PostgreSQL connection ended with an error");
        }
    });
}

/// Classifies a tokio-postgres error of a source connection ([`Error::from_postgres`]), naming a
/// rejected certificate as such.
pub fn pg_error(err: tokio_postgres::Error) -> Error {
    if let Some(tls_err) = tls::rustls_error(&err) {
        return Error::definite(COMPONENT, format!("TLS handshake failed: {tls_err}"));
    }
    Error::from_postgres(COMPONENT, err)
}

/// The password of the first line of a libpq password file (`host:port:database:user:password`,
/// `*` matches anything, `\\` escapes `:` and `\\`) that matches, as libpq reads it: a unix-socket
/// connection is matched as the host `localhost`, and the password ends at the first unescaped `:`.
/// Comment lines start with `#`.
pub fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.trim_end_matches('\r').chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                ':' => break,
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let m = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if m(&fields[0], host) && m(&fields[1], &port) && m(&fields[2], db) && m(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

// ---- parsing ----

/// `scheme://…` with some other scheme (a `key=value` string cannot start that way).
fn looks_like_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    })
}

fn parse_url(rest: &str) -> Result<Raw, Error> {
    let mut raw = Raw::default();
    let (body, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match body.find('/') {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, ""),
    };
    let hostport = match authority.rfind('@') {
        Some(i) => {
            let userinfo = &authority[..i];
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    raw.set("user", decode(u, "user")?)?;
                    raw.set("password", decode(p, "password")?)?;
                }
                None => raw.set("user", decode(userinfo, "user")?)?,
            }
            &authority[i + 1..]
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| config_error(format!("invalid host {hostport:?}: missing ']'")))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| {
                config_error(format!(
                    "invalid host {hostport:?}: unexpected text after ']'"
                ))
            })?),
        };
        (h.to_string(), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (decode(h, "host")?, Some(p)),
            None => (decode(hostport, "host")?, None),
        }
    };
    if !host.is_empty() {
        raw.set("host", host)?;
    }
    if let Some(p) = port {
        raw.set("port", p.to_string())?;
    }
    if !path.is_empty() {
        raw.set("dbname", decode(path, "dbname")?)?;
    }
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            config_error(format!(
                "invalid URL query parameter {pair:?}: expected key=value"
            ))
        })?;
        let key = decode(k, "query parameter name")?;
        let value = decode(v, &key)?;
        raw.set(&key, value)?;
    }
    Ok(raw)
}

/// libpq's `key = value` syntax: whitespace-separated pairs, optional spaces around `=`, values
/// either bare (backslash escapes the next character) or single-quoted (`\'`, `\\`).
fn parse_keyword_value(s: &str) -> Result<Raw, Error> {
    let mut raw = Raw::default();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(raw);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(config_error(format!(
                "missing \"=\" after {key:?} in connection string"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(config_error(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(config_error(format!(
                                "unterminated quoted value for {key:?}"
                            )))
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        raw.set(&key, value)?;
    }
}

fn decode(s: &str, what: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| config_error(format!("invalid percent-encoding in URL {what}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        config_error(format!(
            "URL {what} is not valid UTF-8 after percent-decoding"
        ))
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` when `slash_ok`).
fn encode(s: &str, slash_ok: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (slash_ok && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ConnInfo {
        ConnInfo::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn pgpass_lines_match_like_libpq() {
        let text = "# comment\n\
                    db.example:5432:app:alice:first\n\
                    127.0.0.1:*:*:postgres:p\\:w\\\\d\n\
                    *:5433:*:*:fallback\n\
                    localhost:5432:*:bob:viasocket\n\
                    h2:1:d:u:pass:trailing\n";
        assert_eq!(
            pgpass_lookup(text, "db.example", 5432, "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", 5432, "x", "postgres").as_deref(),
            Some("p:w\\d")
        );
        assert_eq!(
            pgpass_lookup(text, "elsewhere", 5433, "x", "y").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pgpass_lookup(text, "/var/run/postgresql", 5432, "x", "bob").as_deref(),
            Some("viasocket")
        );
        assert_eq!(pgpass_lookup(text, "elsewhere", 5432, "x", "y"), None);
        assert_eq!(
            pgpass_lookup(text, "h2", 1, "d", "u").as_deref(),
            Some("pass"),
            "the password ends at an unescaped colon"
        );
    }

    #[test]
    fn a_password_file_fills_a_missing_password_but_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        let c = p("postgres://u@h/db")
            .with_password_fallback(Some(&f))
            .unwrap();
        assert_eq!(c.password(), Some("from-file"));
        let c = p("postgres://u:inurl@h/db")
            .with_password_fallback(Some(&f))
            .unwrap();
        assert_eq!(c.password(), Some("inurl"));
        let err = p("postgres://u@h/db")
            .with_password_fallback(Some(&dir.path().join("missing")))
            .unwrap_err();
        assert_eq!(err.component(), Component::Config);
        assert!(err.message().contains("password file"), "{err}");
    }

    #[test]
    fn url_with_everything() {
        let c = p("postgresql://al%40ice:s3cr%2Ft@db.example.com:6543/my%20db?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=cdc&connect_timeout=7&options=-c%20work_mem%3D64MB");
        assert_eq!(c.host, Host::Tcp("db.example.com".into()));
        assert_eq!(c.port, 6543);
        assert_eq!(c.user(), "al@ice");
        assert_eq!(c.password(), Some("s3cr/t"));
        assert_eq!(c.dbname(), "my db");
        assert_eq!(c.sslmode(), SslMode::VerifyFull);
        assert_eq!(c.sslrootcert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(c.application_name(), Some("cdc"));
        assert_eq!(c.connect_timeout(), Some(Duration::from_secs(7)));
        assert_eq!(c.options.as_deref(), Some("-c work_mem=64MB"));
        assert_eq!(c.host_description(), "db.example.com:6543");
    }

    #[test]
    fn url_defaults_and_socket_hosts() {
        let c = p("postgres://bob@");
        assert_eq!(c.host, Host::Tcp("localhost".into()));
        assert_eq!((c.port, c.dbname()), (5432, "bob"));
        assert_eq!(c.sslmode(), SslMode::Prefer);
        assert!(c.use_tls());

        let c = p("postgresql:///db?host=/var/run/postgresql&user=u");
        assert_eq!(c.host, Host::Unix("/var/run/postgresql".into()));
        assert_eq!(c.host_description(), "/var/run/postgresql/.s.PGSQL.5432");
        assert!(!c.use_tls(), "never TLS on a unix socket");

        let c = p("postgres://u@%2Ftmp%2Fpg:5433/db");
        assert_eq!(c.host, Host::Unix("/tmp/pg".into()));
        assert_eq!(c.host_description(), "/tmp/pg/.s.PGSQL.5433");

        let c = p("postgres://u@[::1]:5433/db");
        assert_eq!(c.host, Host::Tcp("::1".into()));
        assert_eq!(c.host_description(), "[::1]:5433");
    }

    #[test]
    fn keyword_value_strings() {
        let c = p(
            r"host=127.0.0.1 port = 5433 user=postgres password='it\'s a \\secret' dbname=x sslmode=disable options='-c a=b'",
        );
        assert_eq!(c.host_description(), "127.0.0.1:5433");
        assert_eq!(c.password(), Some(r"it's a \secret"));
        assert_eq!(c.dbname(), "x");
        assert_eq!(c.sslmode(), SslMode::Disable);
        assert!(!c.use_tls());
        assert_eq!(c.options.as_deref(), Some("-c a=b"));

        let c = p("host=/var/run/postgresql user=postgres");
        assert_eq!(c.host, Host::Unix("/var/run/postgresql".into()));
        assert_eq!(c.dbname(), "postgres");
    }

    #[test]
    fn parse_errors_name_the_parameter() {
        let msg = |s: &str| {
            let e = ConnInfo::parse(s).unwrap_err();
            assert!(!e.is_transient(), "{s}");
            e.message().to_string()
        };
        assert!(msg("postgres://u@h/db?sslmod=require").contains("\"sslmod\""));
        assert!(msg("user=u hostaddr=1.2.3.4").contains("\"hostaddr\""));
        assert!(msg("postgres://u@h/db?sslmode=sometimes").contains("sslmode"));
        assert!(msg("postgres://u@h:99999/db").contains("port"));
        assert!(msg("user=u port=abc").contains("port"));
        assert!(msg("user=u connect_timeout=soon").contains("connect_timeout"));
        assert!(msg("user=u host=a,b").contains("several hosts"));
        assert!(msg("user=u password='open").contains("\"password\""));
        assert!(msg("user=u dbname").contains("\"dbname\""));
        assert!(msg("mysql://u@h/db").contains("postgres://"));
        // "://" inside a keyword/value string is just text.
        assert_eq!(
            p("user=u application_name=http://x").application_name(),
            Some("http://x")
        );
        assert!(msg("postgres://u@h/db?password").contains("password"));
    }

    #[test]
    fn redacted_hides_the_password_and_round_trips() {
        for s in [
            "postgres://alice:hunter2@127.0.0.1:5432/app?application_name=x%20y&options=-c%20a%3Db",
            "host=/var/run/postgresql user=postgres password=hunter2 dbname='my db' connect_timeout=3",
            "postgres://u:pw@[::1]/d?sslmode=verify-ca&sslrootcert=/etc/ssl/ca.pem",
        ] {
            let c = p(s);
            let r = c.redacted();
            assert!(!r.contains("hunter2") && !r.contains(":pw@"), "{r}");
            assert!(r.contains(":***@"), "{r}");
            assert!(!format!("{c:?}").contains("hunter2"));
            let back = p(&r);
            assert_eq!(back.password(), Some("***"));
            assert_eq!(back, ConnInfo { password: Some("***".into()), ..c });
        }
        let c = p("postgres://u@h/d");
        assert_eq!(c.redacted(), "postgres://u@h:5432/d?sslmode=prefer");
    }

    #[test]
    fn session_settings_come_after_user_options() {
        let c = p("postgres://u@h/d?options=-c%20DateStyle%3DGerman");
        assert_eq!(
            c.startup_options(),
            "-c DateStyle=German -c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres \
             -c extra_float_digits=3 -c bytea_output=hex"
        );
        assert_eq!(c.with_dbname("other").dbname(), "other");
        assert_eq!(c.with_dbname("other").user(), "u");
    }
}
