//! One error model for the whole program.
//!
//! Every failure that reaches a driver is either
//! - **definite**: the input or configuration is wrong (a bad URL, a missing publication, a value the
//!   decoder cannot read, a role without REPLICATION). Retrying cannot help; the daemon reports it and
//!   stops without acknowledging anything past what is persisted;
//! - **transient**: a server is down, a connection dropped, a timeout. The driver retries with
//!   backoff ([`crate::backoff`]), acknowledging nothing meanwhile, and recovers by itself.
//!
//! The split is made where the error is created, by the module that knows what it means; drivers only
//! read [`Error::is_transient`]. Errors reported by a PostgreSQL server are classified in one place,
//! [`Error::postgres`], by their SQLSTATE ([`sqlstate_kind`] holds the table), whichever connection
//! (replication, registry, export, status) they came from.
//!
//! An error names the [`Component`] it came from (a metrics label and the exit code's input), keeps
//! the SQLSTATE of a server error, and keeps its cause as a [`std::error::Error::source`] chain; its
//! `Display` is the whole story on one line: what was being done, then each cause not already said.

use std::fmt;
use std::sync::Arc;

/// Which way a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Data or configuration problem: report, do not retry.
    Definite,
    /// Infrastructure hiccup: retry with backoff.
    Transient,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Definite => "definite",
            Kind::Transient => "transient",
        }
    }
}

/// Where an error came from. Its label is stable: it is the `component` of
/// `cdc_egress_errors_total` and appears in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The configuration file, the environment or the command line (exit code 2).
    Config,
    /// A PostgreSQL connection: connecting, authenticating, TLS, the wire protocol.
    Postgres,
    /// The source database's catalog and publication, as the pipeline reads them.
    Source,
    /// The replication slot's state (lost, dropped, invalidated).
    Slot,
    /// pgoutput decoding.
    Decode,
    /// The registry database.
    Registry,
    /// The output object store.
    ObjectStore,
    /// The local spool where open batches wait for their seal.
    Spool,
    /// NATS JetStream.
    Nats,
    /// Initial exports and reloads.
    Reload,
    /// The daemon's own tasks.
    Daemon,
    /// Another daemon holds the slot: this one waits as a standby.
    Standby,
    /// Another slot owns the source name (`sink::owner`): a configuration error (exit code 2)
    /// that leaves everything of the owner alone, its registry rows included.
    Ownership,
    /// The metrics and health endpoint.
    Http,
    /// Test code.
    Test,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Config => "config",
            Component::Postgres => "postgres",
            Component::Source => "source",
            Component::Slot => "slot",
            Component::Decode => "decode",
            Component::Registry => "registry",
            Component::ObjectStore => "object_store",
            Component::Spool => "spool",
            Component::Nats => "nats",
            Component::Reload => "reload",
            Component::Daemon => "daemon",
            Component::Standby => "standby",
            Component::Ownership => "ownership",
            Component::Http => "http",
            Component::Test => "test",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exit code of a command that failed on a configuration problem (a usage error).
pub const EXIT_CONFIG: i32 = 2;
/// Exit code of a command that failed for any other reason.
pub const EXIT_FAILURE: i32 = 1;

/// A classified error with a human-readable, actionable message.
#[derive(Debug, Clone)]
pub struct Error {
    kind: Kind,
    component: Component,
    message: String,
    /// SQLSTATE of the server error this came from, if any (e.g. `42704`), so callers can test for it.
    sqlstate: Option<String>,
    /// What caused it, when that is an error value of its own (kept for `source()`; its text is
    /// already part of `message`).
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub fn definite(component: Component, message: impl Into<String>) -> Self {
        Error::new(Kind::Definite, component, message)
    }
    pub fn transient(component: Component, message: impl Into<String>) -> Self {
        Error::new(Kind::Transient, component, message)
    }
    pub fn new(kind: Kind, component: Component, message: impl Into<String>) -> Self {
        Error {
            kind,
            component,
            message: message.into(),
            sqlstate: None,
            cause: None,
        }
    }

    /// `what: cause` with the cause's whole chain in the message and the cause kept as the source.
    pub fn caused_by<E>(kind: Kind, component: Component, what: impl fmt::Display, cause: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut err = Error::new(kind, component, format!("{what}: {}", chain_text(&cause)));
        err.cause = Some(Arc::new(cause));
        err
    }

    /// Classifies an error of a PostgreSQL connection (tokio-postgres), for any component:
    /// - a server error by its SQLSTATE ([`sqlstate_kind`]), the message being
    ///   `what: SEVERITY SQLSTATE: message; DETAIL: …; HINT: …` and the SQLSTATE kept;
    /// - a missing password as a configuration error;
    /// - a TLS or connection-configuration problem as definite;
    /// - everything else (I/O, a closed connection, a timeout) as transient, with the cause chain
    ///   that tokio-postgres' own text leaves out ("error connecting to server").
    pub fn postgres(
        component: Component,
        what: impl fmt::Display,
        err: tokio_postgres::Error,
    ) -> Self {
        let e = Error::from_postgres(component, err);
        if e.component == Component::Config {
            e
        } else {
            e.context(what)
        }
    }

    /// [`Error::postgres`] without the description of what was being done.
    pub fn from_postgres(component: Component, err: tokio_postgres::Error) -> Self {
        if let Some(db) = err.as_db_error() {
            let mut e = Error::server(
                component,
                db.code().code(),
                db.severity(),
                db.message(),
                db.detail(),
                db.hint(),
            );
            e.cause = Some(Arc::new(err));
            return e;
        }
        let text = chain_text(&err);
        if text.contains("password missing") {
            return Error::definite(Component::Config, NO_PASSWORD);
        }
        // tokio-postgres exposes no error kind; these prefixes are its Display for Kind::Tls and
        // Kind::Config. A TLS handshake cut short by the network (reset, EOF, timeout) is an
        // outage like any other, not a TLS problem.
        let kind = if text.starts_with("invalid configuration")
            || (text.starts_with("error performing TLS handshake") && !network_cause(&err))
        {
            Kind::Definite
        } else {
            Kind::Transient
        };
        let mut e = Error::new(kind, component, text);
        e.cause = Some(Arc::new(err));
        e
    }

    /// A server error reported on a connection that is not tokio-postgres' (the replication
    /// protocol's own client), classified like [`Error::postgres`].
    pub fn server(
        component: Component,
        code: &str,
        severity: &str,
        message: &str,
        detail: Option<&str>,
        hint: Option<&str>,
    ) -> Self {
        let text = server_error_text(code, severity, message, detail, hint);
        Error::new(sqlstate_kind(code), component, text).with_sqlstate(code)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }
    pub fn component(&self) -> Component {
        self.component
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Attaches the SQLSTATE of a PostgreSQL server error; the classification is left as is.
    pub fn with_sqlstate(mut self, code: impl Into<String>) -> Self {
        self.sqlstate = Some(code.into());
        self
    }
    /// The SQLSTATE when this error was reported by a PostgreSQL server, e.g. `Some("42704")`.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }
    /// Prefixes the message with what was being done, keeping the classification and the cause.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
    /// Appends advice for the operator, e.g. which command fixes it.
    pub fn hint(mut self, advice: impl fmt::Display) -> Self {
        self.message = format!("{}; {advice}", self.message);
        self
    }

    /// Whether this is a configuration problem: the configuration names something wrong, or the
    /// server refused the credentials it gives (SQLSTATE class 28, invalid authorization).
    pub fn is_config(&self) -> bool {
        matches!(self.component, Component::Config | Component::Ownership)
            || self
                .sqlstate
                .as_deref()
                .is_some_and(|c| c.starts_with("28"))
    }

    /// The process exit code for a command that ends with this error: [`EXIT_CONFIG`] for a
    /// configuration problem, [`EXIT_FAILURE`] otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.is_config() {
            EXIT_CONFIG
        } else {
            EXIT_FAILURE
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do when no password is configured but the server asks for one.
pub const NO_PASSWORD: &str =
    "the server asks for a password and none is configured: put it in the URL, in a password file \
     (password_file in the configuration, or CDC_EGRESS_*_PASSWORD_FILE), in PGPASSWORD, or in \
     ~/.pgpass / PGPASSFILE";

/// An error's text followed by each cause in its `source()` chain that the text does not already
/// contain, joined by `: `.
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether an I/O error of the network (reset, aborted, refused, EOF, timeout, broken pipe) is in
/// the cause chain.
fn network_cause(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ConnectionReset
                    | ConnectionAborted
                    | ConnectionRefused
                    | UnexpectedEof
                    | TimedOut
                    | BrokenPipe
            ) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// `SEVERITY SQLSTATE: message; DETAIL: …; HINT: …`
fn server_error_text(
    code: &str,
    severity: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> String {
    let mut text = format!("{severity} {code}: {message}");
    if let Some(d) = detail {
        text.push_str("; DETAIL: ");
        text.push_str(d);
    }
    if let Some(h) = hint {
        text.push_str("; HINT: ");
        text.push_str(h);
    }
    text
}

/// Whether a server error with this SQLSTATE is worth retrying.
///
/// | SQLSTATE | meaning | kind |
/// | --- | --- | --- |
/// | `08xxx` | connection exception | transient |
/// | `53xxx` | insufficient resources (too many connections, disk full, out of memory) | transient |
/// | `55006` | object in use (the slot is held by another process) | transient |
/// | `55P03` | lock not available | transient |
/// | `57P01` `57P02` `57P03` `57P05` | admin / crash shutdown, cannot connect now, idle-session timeout | transient |
/// | `40001` `40P01` | serialization failure, deadlock | transient |
/// | `57014` | query canceled (a statement timeout, or an operator's `pg_cancel_backend`) | transient |
/// | `25006` `25P03` | read-only transaction (a pool briefly on a standby during a switch-over), idle-in-transaction timeout | transient |
/// | `58030` | I/O error on the server | transient |
/// | anything else | authorization `28xxx`, privileges `42501`, undefined objects `42704`/`42P01`, invalid parameters `22023`, syntax, constraint violations, `XX000` internal errors, `57P04` database dropped … | definite |
pub fn sqlstate_kind(code: &str) -> Kind {
    match code {
        "55006" | "55P03" | "57P01" | "57P02" | "57P03" | "57P05" | "40001" | "40P01" | "57014"
        | "25006" | "25P03" => Kind::Transient,
        "58030" => Kind::Transient,
        c if c.starts_with("08") || c.starts_with("53") => Kind::Transient,
        _ => Kind::Definite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for code in [
            "28P01", "28000", "42501", "42704", "22023", "42P01", "3D000", "XX000", "57P04",
            "23505",
        ] {
            assert_eq!(sqlstate_kind(code), Kind::Definite, "{code}");
        }
        for code in [
            "55006", "57P01", "57P02", "57P03", "57P05", "53300", "53100", "08006", "08P01",
            "40001", "40P01", "55P03", "58030", "57014", "25006", "25P03",
        ] {
            assert_eq!(sqlstate_kind(code), Kind::Transient, "{code}");
        }
    }

    #[test]
    fn server_errors_keep_code_detail_and_hint() {
        let e = Error::server(
            Component::Registry,
            "57P01",
            "FATAL",
            "terminating connection due to administrator command",
            Some("d"),
            Some("h"),
        );
        assert!(e.is_transient());
        assert_eq!(e.sqlstate(), Some("57P01"));
        assert_eq!(
            e.to_string(),
            "FATAL 57P01: terminating connection due to administrator command; DETAIL: d; HINT: h"
        );
        let e = e.context("register batch");
        assert!(e.to_string().starts_with("register batch: FATAL 57P01"));
    }

    #[test]
    fn exit_codes_come_from_the_type() {
        assert_eq!(
            Error::definite(Component::Config, "x").exit_code(),
            EXIT_CONFIG
        );
        assert_eq!(
            Error::definite(Component::Source, "x").exit_code(),
            EXIT_FAILURE
        );
        let auth = Error::server(
            Component::Postgres,
            "28P01",
            "FATAL",
            "bad password",
            None,
            None,
        );
        assert_eq!(auth.exit_code(), EXIT_CONFIG);
        assert_eq!(
            Error::transient(Component::Nats, "x").exit_code(),
            EXIT_FAILURE
        );
    }

    #[test]
    fn causes_are_kept_as_source_and_in_the_text() {
        #[derive(Debug)]
        struct Inner;
        impl fmt::Display for Inner {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connection refused")
            }
        }
        impl std::error::Error for Inner {}
        #[derive(Debug)]
        struct Outer(Inner);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("error connecting")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Error::caused_by(Kind::Transient, Component::Nats, "connect", Outer(Inner));
        assert_eq!(
            e.to_string(),
            "connect: error connecting: connection refused"
        );
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "error connecting");
    }
}
