//! Error classification.
//!
//! Every failure that reaches the pipeline driver is either
//! - **definite**: the input or configuration is wrong (a bad URL, a missing publication, a value the
//!   decoder cannot read, a role without REPLICATION). Retrying cannot help; the daemon reports it and
//!   stops without acknowledging anything past what is persisted;
//! - **transient**: a server is down, a connection dropped, a timeout. The driver retries with
//!   exponential backoff, acknowledging nothing meanwhile, and recovers by itself.
//!
//! The split is made where the error is created, by the module that knows what it means; the driver
//! only reads [`Error::is_transient`].

use std::fmt;

/// Which way a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Data or configuration problem: report, do not retry.
    Definite,
    /// Infrastructure hiccup: retry with backoff.
    Transient,
}

/// A classified error with a human-readable, actionable message.
#[derive(Debug, Clone)]
pub struct Error {
    kind: Kind,
    /// Short stable label for metrics (`errors_total{kind=...}`), e.g. `object_store`, `registry`.
    component: &'static str,
    message: String,
    /// SQLSTATE of the server error this came from, if any (e.g. `42704`), so callers can test for it.
    sqlstate: Option<String>,
}

impl Error {
    pub fn definite(component: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind: Kind::Definite,
            component,
            message: message.into(),
            sqlstate: None,
        }
    }
    pub fn transient(component: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind: Kind::Transient,
            component,
            message: message.into(),
            sqlstate: None,
        }
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }
    pub fn component(&self) -> &'static str {
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
    /// Prefixes the message with what was being done, keeping the classification.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
