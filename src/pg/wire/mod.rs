//! A minimal PostgreSQL client for *replication* connections (tokio-postgres 0.7 cannot open one).
//!
//! Contract:
//! - [`ReplicationConnection::connect`] opens a `replication=database` session (TCP, unix socket or
//!   TLS per `sslmode`, see `super::tls`), with [`SESSION_SETTINGS`] in the startup `options` and
//!   `client_encoding=UTF8`. Authentication: trust, cleartext password, MD5 and SCRAM-SHA-256
//!   *without* channel binding (we announce `n,,`, i.e. "client does not support binding", which the
//!   server accepts even when it offers SCRAM-SHA-256-PLUS). GSSAPI/SSPI/Kerberos are refused.
//! - [`ReplicationConnection::simple_query`] runs replication commands and plain SQL with the
//!   simple-query protocol and returns text; after a server error the connection stays usable.
//! - [`ReplicationConnection::start_copy_both`] enters CopyBoth mode and splits the connection into a
//!   [`CopyReader`] and a [`CopyWriter`] that may live on different tasks.
//! - Parsing: `frame` only frames the byte stream (tag and length; a length below 4 or above
//!   1 GiB is a protocol error) and slices CopyData payloads out of it. Message bodies are parsed by
//!   `postgres_protocol::message::backend` ([`Message::parse`] on the whole frame, without a copy):
//!   ErrorResponse/NoticeResponse fields, ParameterStatus, DataRow and the Authentication requests
//!   (incl. the SASL mechanism list); CopyBothResponse, which that crate does not know, is only
//!   length-checked, and bodies we ignore (BackendKeyData, RowDescription, CommandComplete, ...)
//!   are not parsed. Messages we send are built by `postgres_protocol::message::frontend`.
//! - Server bytes are never trusted: every length is checked (by the framing here, by
//!   `postgres_protocol` inside a body, which also rejects trailing bytes); a malformed message is
//!   a definite protocol error naming it (a malformed NoticeResponse is just not logged), and
//!   nothing here panics on what the server sends.
//! - Errors are classified where they arise: a server `ErrorResponse` becomes an [`Error`] carrying
//!   the SQLSTATE ([`Error::sqlstate`]) and classified by [`crate::error::sqlstate_kind`]; I/O errors, EOF and
//!   timeouts are transient (except a read timeout of the blocking `CopyStream`, which means that
//!   nothing arrived); TLS handshake/certificate problems, authentication failures and protocol
//!   violations are definite.
//! - Cancellation: [`CopyReader::next`] is cancel-safe (a frame is consumed only when it is
//!   returned), so it can sit in a `select!`. Dropping any other future of this module half-way can
//!   leave a message half written or a result half read; the connection notices and refuses further
//!   requests with a definite error rather than misread the stream: discard it and reconnect.
//!
//! Reading the replication stream is the hottest path of the product ([`CopyStream::next_buffered`]
//! in the daemon): frames are parsed in place in one large `BytesMut` read buffer and each CopyData
//! payload is returned as a zero-copy `Bytes` slice of it (a payload therefore keeps its 256 KiB
//! read chunk alive until dropped).
//!
//! Submodules: `frame` (byte stream → frames, the read and write buffers), `backend` (bodies of
//! server messages), `auth` (the authentication exchange), `copy` (the CopyBoth halves), `blocking`
//! (the two halves joined again as one stream with blocking calls, for the daemon's stream thread); the
//! connection itself (startup, TLS negotiation, simple queries, entering CopyBoth) is here.
//!
//! [`SESSION_SETTINGS`]: crate::pg::conninfo::SESSION_SETTINGS

mod auth;
mod backend;
mod blocking;
mod copy;
mod frame;
#[cfg(test)]
mod tests;

use backend::{data_row, error_from_response, log_notice};
pub use blocking::CopyStream;
pub use copy::{CopyItem, CopyReader, CopyWriter};
use frame::{io_error, not_a, protocol_error, Frame, Reader, Stream, Writer, READ_CHUNK};

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::backend::{
    Message, BACKEND_KEY_DATA_TAG, COMMAND_COMPLETE_TAG, COPY_IN_RESPONSE_TAG,
    COPY_OUT_RESPONSE_TAG, DATA_ROW_TAG, EMPTY_QUERY_RESPONSE_TAG, ERROR_RESPONSE_TAG,
    NOTICE_RESPONSE_TAG, PARAMETER_STATUS_TAG, READY_FOR_QUERY_TAG, ROW_DESCRIPTION_TAG,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Component, Error};
use crate::pg::conninfo::{ConnInfo, Host};
use crate::pg::tls;

const COMPONENT: Component = Component::Postgres;
/// CopyBothResponse, the one message we read that `postgres_protocol` does not know.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// `"a""b"`: an SQL identifier, always quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'it''s'`: an SQL string literal (assumes `standard_conforming_strings`, the default since 9.1;
/// also the quoting the replication-command grammar understands).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A `replication=database` connection in query mode.
pub struct ReplicationConnection {
    reader: Reader,
    writer: Writer,
    parameters: HashMap<String, String>,
    /// A query was sent and its ReadyForQuery not yet seen (set across cancellation).
    busy: bool,
}

impl ReplicationConnection {
    /// Startup with `replication=database`, the `conninfo::SESSION_SETTINGS` options, application_name;
    /// authentication: trust, cleartext, md5, SCRAM-SHA-256 (no channel binding). Waits for
    /// ReadyForQuery. `connect_timeout` bounds the whole sequence (connect, TLS, authentication).
    pub async fn connect(info: &ConnInfo) -> Result<Self, Error> {
        match info.connect_timeout() {
            None => Self::connect_inner(info).await,
            Some(limit) => tokio::time::timeout(limit, Self::connect_inner(info))
                .await
                .map_err(|_| {
                    Error::transient(
                        COMPONENT,
                        format!(
                            "timed out after {}s connecting to {}",
                            limit.as_secs(),
                            info.host_description()
                        ),
                    )
                })?,
        }
    }

    async fn connect_inner(info: &ConnInfo) -> Result<Self, Error> {
        let peer: Arc<str> = info.host_description().into();
        let connect_err =
            |e: io::Error| Error::transient(COMPONENT, format!("could not connect to {peer}: {e}"));
        let stream = match info.host() {
            Host::Unix(dir) => Stream::Unix(
                UnixStream::connect(info.socket_path(dir))
                    .await
                    .map_err(connect_err)?,
            ),
            Host::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), info.port()))
                    .await
                    .map_err(connect_err)?;
                let _ = tcp.set_nodelay(true);
                if info.use_tls() {
                    negotiate_tls(tcp, host, info, &peer).await?
                } else {
                    Stream::Tcp(tcp)
                }
            }
        };
        let (r, w) = tokio::io::split(stream);
        let mut conn = ReplicationConnection {
            reader: Reader {
                io: r,
                buf: BytesMut::with_capacity(READ_CHUNK),
                want: 5,
                peer: peer.clone(),
            },
            writer: Writer {
                io: w,
                buf: BytesMut::with_capacity(1024),
                torn: false,
                peer,
            },
            parameters: HashMap::new(),
            busy: false,
        };
        conn.startup(info).await?;
        Ok(conn)
    }

    async fn startup(&mut self, info: &ConnInfo) -> Result<(), Error> {
        let options = info.startup_options();
        let mut params = vec![
            ("user", info.user()),
            ("database", info.dbname()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            ("options", options.as_str()),
        ];
        if let Some(name) = info.application_name() {
            params.push(("application_name", name));
        }
        frontend::startup_message(params, &mut self.writer.buf)
            .map_err(|e| Error::definite(COMPONENT, format!("building startup message: {e}")))?;
        self.writer.send_buf().await?;
        self.authenticate(info).await?;
        loop {
            let frame = self.reader.frame().await?;
            match frame.tag {
                PARAMETER_STATUS_TAG => self.parameter_status(frame)?,
                BACKEND_KEY_DATA_TAG => {}
                NOTICE_RESPONSE_TAG => log_notice(&self.reader.peer, frame),
                READY_FOR_QUERY_TAG => return Ok(()),
                ERROR_RESPONSE_TAG => return Err(error_from_response(&self.reader.peer, frame)),
                other => return Err(self.unexpected(other, "during startup")),
            }
        }
    }

    fn parameter_status(&mut self, frame: Frame) -> Result<(), Error> {
        let parsed = frame.parse().and_then(|m| match m {
            Message::ParameterStatus(body) => {
                Ok((body.name()?.to_owned(), body.value()?.to_owned()))
            }
            _ => Err(not_a("ParameterStatus")),
        });
        let (name, value) = parsed.map_err(|e| {
            protocol_error(
                &self.reader.peer,
                format_args!("malformed ParameterStatus: {e}"),
            )
        })?;
        self.parameters.insert(name, value);
        Ok(())
    }

    fn unexpected(&self, tag: u8, when: &str) -> Error {
        protocol_error(
            &self.reader.peer,
            format_args!("unexpected message {:?} {when}", tag as char),
        )
    }

    /// Server parameters reported at startup (ParameterStatus), e.g. "server_version".
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.busy {
            return Err(Error::definite(
                COMPONENT,
                format!(
                    "connection to {} is unusable: an earlier request was interrupted",
                    self.reader.peer
                ),
            ));
        }
        Ok(())
    }

    async fn send_query(&mut self, sql: &str) -> Result<(), Error> {
        self.check_usable()?;
        self.writer.buf.clear();
        frontend::query(sql, &mut self.writer.buf)
            .map_err(|e| Error::definite(COMPONENT, format!("cannot send query: {e}")))?;
        self.busy = true;
        self.writer.send_buf().await
    }

    /// Simple-query protocol; returns every row of every result as text (None = NULL). Used for
    /// IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT ... LOGICAL pgoutput (EXPORT_SNAPSHOT /
    /// NOEXPORT_SNAPSHOT), and plain SQL. Server ErrorResponse → classified Error with SQLSTATE,
    /// message, detail, hint; the connection stays usable afterwards. A statement that starts a COPY
    /// is refused (and leaves the connection unusable): use [`Self::start_copy_both`].
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut error: Option<Error> = None;
        loop {
            let frame = match self.reader.frame().await {
                Ok(frame) => frame,
                // A FATAL error is followed by the server closing the connection: report the error.
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match frame.tag {
                DATA_ROW_TAG if error.is_none() => rows.push(data_row(frame).map_err(|e| {
                    protocol_error(&self.reader.peer, format_args!("malformed DataRow: {e}"))
                })?),
                ROW_DESCRIPTION_TAG
                | COMMAND_COMPLETE_TAG
                | EMPTY_QUERY_RESPONSE_TAG
                | DATA_ROW_TAG => {}
                ERROR_RESPONSE_TAG => {
                    error.get_or_insert_with(|| error_from_response(&self.reader.peer, frame));
                }
                NOTICE_RESPONSE_TAG => log_notice(&self.reader.peer, frame),
                PARAMETER_STATUS_TAG => self.parameter_status(frame)?,
                READY_FOR_QUERY_TAG => {
                    self.busy = false;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                COPY_IN_RESPONSE_TAG | COPY_OUT_RESPONSE_TAG | COPY_BOTH_RESPONSE_TAG => {
                    return Err(Error::definite(
                        COMPONENT,
                        "simple_query: the statement started COPY mode; use start_copy_both",
                    ))
                }
                other => return Err(self.unexpected(other, "in a query result")),
            }
        }
    }

    /// Sends `sql` (a START_REPLICATION command) and waits for CopyBothResponse; returns the two
    /// halves. A server error (e.g. `42704` for a missing slot) is returned as a classified Error.
    pub async fn start_copy_both(mut self, sql: &str) -> Result<(CopyReader, CopyWriter), Error> {
        self.send_query(sql).await?;
        let mut error: Option<Error> = None;
        loop {
            let frame = match self.reader.frame().await {
                Ok(frame) => frame,
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match frame.tag {
                COPY_BOTH_RESPONSE_TAG if error.is_none() => {
                    // CopyBothResponse: i8 format, i16 column count, i16 per column.
                    if frame.body_len() < 3 {
                        return Err(protocol_error(
                            &self.reader.peer,
                            "malformed CopyBothResponse",
                        ));
                    }
                    let reader = CopyReader {
                        reader: self.reader,
                        done: false,
                    };
                    let writer = CopyWriter {
                        writer: self.writer,
                    };
                    return Ok((reader, writer));
                }
                ERROR_RESPONSE_TAG => {
                    error.get_or_insert_with(|| error_from_response(&self.reader.peer, frame));
                }
                NOTICE_RESPONSE_TAG => log_notice(&self.reader.peer, frame),
                PARAMETER_STATUS_TAG => self.parameter_status(frame)?,
                ROW_DESCRIPTION_TAG
                | DATA_ROW_TAG
                | COMMAND_COMPLETE_TAG
                | EMPTY_QUERY_RESPONSE_TAG => {}
                READY_FOR_QUERY_TAG => {
                    return Err(error.unwrap_or_else(|| {
                        Error::definite(COMPONENT, format!("{sql:?} did not start COPY BOTH mode"))
                    }))
                }
                other => return Err(self.unexpected(other, "while starting replication")),
            }
        }
    }

    /// Ends the session politely (Terminate), so the server does not log an unexpected EOF.
    pub async fn close(mut self) -> Result<(), Error> {
        self.writer.buf.clear();
        frontend::terminate(&mut self.writer.buf);
        self.writer.send_buf().await?;
        let _ = self.writer.io.shutdown().await;
        Ok(())
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    info: &ConnInfo,
    peer: &str,
) -> Result<Stream, Error> {
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request)
        .await
        .map_err(|e| io_error(peer, "writing to", e))?;
    // Exactly one byte: anything the server sent after it would be unencrypted injected data.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| io_error(peer, "reading from", e))?;
    match answer[0] {
        b'S' => {
            let config = Arc::new(info.tls_config()?);
            let name = tls::server_name(host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| match tls::rustls_error(&e) {
                    Some(t) => Error::definite(
                        COMPONENT,
                        format!(
                            "TLS handshake with {peer} failed (sslmode={}): {t}",
                            info.sslmode().as_str()
                        ),
                    ),
                    None => Error::transient(
                        COMPONENT,
                        format!("TLS handshake with {peer} failed: {e}"),
                    ),
                })?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        b'N' if info.sslmode().requires_tls() => Err(Error::definite(
            COMPONENT,
            format!(
                "server {peer} does not support TLS, but sslmode={} requires it",
                info.sslmode().as_str()
            ),
        )),
        b'N' => Ok(Stream::Tcp(tcp)),
        other => Err(protocol_error(
            peer,
            format_args!("unexpected answer {:?} to SSLRequest", other as char),
        )),
    }
}
