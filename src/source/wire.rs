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
//! - Server bytes are never trusted: every length is checked, frames shorter than 4 or longer than
//!   1 GiB are a protocol error, nothing here panics on what the server sends.
//! - Errors are classified where they arise: a server `ErrorResponse` becomes an [`Error`] carrying
//!   the SQLSTATE ([`Error::sqlstate`]) and classified by [`sqlstate_kind`]; I/O errors, EOF and
//!   timeouts are transient; TLS handshake/certificate problems, authentication failures and protocol
//!   violations are definite.
//! - Cancellation: dropping a future of this module half-way (e.g. in `select!`) can leave a message
//!   half written or a result half read. The connection notices and refuses further requests with a
//!   definite error, rather than misinterpreting the stream; discard it and reconnect.
//!
//! [`CopyReader::next`] is the hottest path of the product: frames are parsed in place in one large
//! `BytesMut` read buffer and each CopyData payload is returned as a zero-copy `Bytes` slice of it (a
//! payload therefore keeps its 128 KiB read chunk alive until dropped).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Kind};
use crate::source::conninfo::{ConnInfo, Host, SESSION_SETTINGS};
use crate::source::tls;

const COMPONENT: &str = "postgres";
/// Read buffer growth step; one `read` can fill this much.
const READ_CHUNK: usize = 128 * 1024;
/// Below this much free space the read buffer is grown before reading.
const MIN_FREE: usize = 16 * 1024;
/// Largest frame accepted (PostgreSQL's own limit for a message is 1 GiB).
const MAX_FRAME: usize = 1 << 30;

/// Whether a server error with this SQLSTATE is worth retrying.
///
/// Transient: `08xxx` connection exceptions, `53xxx` insufficient resources, `55006` object in use
/// (slot held by another process), `55P03` lock not available, `57P01`/`57P02`/`57P03`/`57P05` admin or
/// crash shutdown / cannot connect now / idle-session timeout, `40001`/`40P01` serialization failure and
/// deadlock. Everything else (auth `28xxx`, privileges `42501`, undefined objects `42704`, invalid
/// parameters `22023`, syntax, …) is definite.
pub fn sqlstate_kind(code: &str) -> Kind {
    match code {
        "55006" | "55P03" | "57P01" | "57P02" | "57P03" | "57P05" | "40001" | "40P01" => {
            Kind::Transient
        }
        c if c.starts_with("08") || c.starts_with("53") => Kind::Transient,
        _ => Kind::Definite,
    }
}

/// A classified error from a server-reported error. Message: `SEVERITY SQLSTATE: message; DETAIL: …;
/// HINT: …`.
pub(crate) fn server_error(
    code: &str,
    severity: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Error {
    let mut text = format!("{severity} {code}: {message}");
    if let Some(d) = detail {
        text.push_str("; DETAIL: ");
        text.push_str(d);
    }
    if let Some(h) = hint {
        text.push_str("; HINT: ");
        text.push_str(h);
    }
    let err = match sqlstate_kind(code) {
        Kind::Definite => Error::definite(COMPONENT, text),
        Kind::Transient => Error::transient(COMPONENT, text),
    };
    err.with_sqlstate(code)
}

/// `"a""b"`: an SQL identifier, always quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'it''s'`: an SQL string literal (assumes `standard_conforming_strings`, the default since 9.1;
/// also the quoting the replication-command grammar understands).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

// ---------------------------------------------------------------------------------------------
// transport

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Transient unless the I/O error wraps a TLS (rustls) error, which is a configuration problem.
fn io_error(peer: &str, what: &str, e: io::Error) -> Error {
    if let Some(t) = tls::rustls_error(&e) {
        return Error::definite(
            COMPONENT,
            format!("TLS with {peer} failed while {what}: {t}"),
        );
    }
    Error::transient(COMPONENT, format!("{what} {peer}: {e}"))
}

fn protocol_error(peer: &str, what: impl std::fmt::Display) -> Error {
    Error::definite(COMPONENT, format!("protocol error from {peer}: {what}"))
}

/// The read half: a growing buffer of unparsed bytes.
struct Reader {
    io: ReadHalf<Stream>,
    buf: BytesMut,
    /// Total size (tag included) of the frame at the front of `buf` once its header is known.
    want: usize,
    peer: Arc<str>,
}

impl Reader {
    /// The next complete frame already in the buffer, as (tag, body without the 5-byte header).
    #[inline]
    fn try_frame(&mut self) -> Result<Option<(u8, Bytes)>, Error> {
        let Some(header) = self.buf.get(..5) else {
            self.want = 5;
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=MAX_FRAME).contains(&len) {
            return Err(protocol_error(
                &self.peer,
                format_args!("invalid length {len} for message {:?}", tag as char),
            ));
        }
        if self.buf.len() <= len {
            self.want = len + 1;
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some((tag, self.buf.split_to(len - 4).freeze())))
    }

    /// Reads more bytes; EOF is a transient error (the server went away).
    async fn fill(&mut self) -> Result<(), Error> {
        let need = self.want.saturating_sub(self.buf.len()).max(MIN_FREE);
        if self.buf.capacity() - self.buf.len() < need {
            self.buf.reserve(need.max(READ_CHUNK));
        }
        let n = self
            .io
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| io_error(&self.peer, "reading from", e))?;
        if n == 0 {
            return Err(Error::transient(
                COMPONENT,
                format!("server {} closed the connection unexpectedly", self.peer),
            ));
        }
        Ok(())
    }

    #[inline]
    async fn frame(&mut self) -> Result<(u8, Bytes), Error> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }
}

/// The write half, with a reusable output buffer.
struct Writer {
    io: WriteHalf<Stream>,
    buf: BytesMut,
    /// Set while a write is in flight; still set afterwards only if that write was cancelled.
    torn: bool,
    peer: Arc<str>,
}

impl Writer {
    /// Writes and flushes `self.buf`, then clears it.
    async fn send_buf(&mut self) -> Result<(), Error> {
        if self.torn {
            return Err(Error::definite(
                COMPONENT,
                format!(
                    "connection to {} is unusable: an earlier write was interrupted",
                    self.peer
                ),
            ));
        }
        self.torn = true;
        self.io
            .write_all(&self.buf)
            .await
            .map_err(|e| io_error(&self.peer, "writing to", e))?;
        self.io
            .flush()
            .await
            .map_err(|e| io_error(&self.peer, "writing to", e))?;
        self.buf.clear();
        self.torn = false;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// message bodies

fn be_i16(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a NUL-terminated string off the front of `b`.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((&b[..nul], &b[nul + 1..]))
}

/// The fields of an ErrorResponse / NoticeResponse body that we report.
#[derive(Debug, Default)]
struct ServerMessage {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

fn parse_server_message(body: &[u8]) -> Option<ServerMessage> {
    let mut m = ServerMessage::default();
    let mut localized_severity = String::new();
    let mut rest = body;
    loop {
        let (&field, after) = rest.split_first()?;
        if field == 0 {
            break;
        }
        let (value, after) = cstr(after)?;
        let value = String::from_utf8_lossy(value).into_owned();
        match field {
            b'V' => m.severity = value,
            b'S' => localized_severity = value,
            b'C' => m.code = value,
            b'M' => m.message = value,
            b'D' => m.detail = Some(value),
            b'H' => m.hint = Some(value),
            _ => {}
        }
        rest = after;
    }
    if m.severity.is_empty() {
        m.severity = localized_severity;
    }
    Some(m)
}

fn error_from_response(peer: &str, body: &[u8]) -> Error {
    match parse_server_message(body) {
        Some(m) if m.code.len() == 5 => server_error(
            &m.code,
            &m.severity,
            &m.message,
            m.detail.as_deref(),
            m.hint.as_deref(),
        ),
        _ => protocol_error(peer, "malformed ErrorResponse"),
    }
}

fn log_notice(peer: &str, body: &[u8]) {
    if let Some(m) = parse_server_message(body) {
        if m.severity == "WARNING" {
            tracing::warn!(server = peer, sqlstate = %m.code, "{}", m.message);
        } else {
            tracing::debug!(server = peer, severity = %m.severity, sqlstate = %m.code, "{}", m.message);
        }
    }
}

/// DataRow: i16 column count, then per column an i32 length (-1 = NULL) and that many bytes.
fn parse_data_row(peer: &str, body: &[u8]) -> Result<Vec<Option<String>>, Error> {
    let bad = |what: &str| protocol_error(peer, format_args!("malformed DataRow: {what}"));
    let n = be_i16(body, 0).ok_or_else(|| bad("truncated"))?;
    let n = usize::try_from(n).map_err(|_| bad("negative column count"))?;
    let mut row = Vec::with_capacity(n);
    let mut pos = 2;
    for _ in 0..n {
        let len = be_i32(body, pos).ok_or_else(|| bad("truncated"))?;
        pos += 4;
        if len == -1 {
            row.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| bad("negative length"))?;
        let value = body
            .get(pos..pos + len)
            .ok_or_else(|| bad("value runs past the end"))?;
        pos += len;
        let text = std::str::from_utf8(value).map_err(|_| bad("value is not UTF-8"))?;
        row.push(Some(text.to_owned()));
    }
    if pos != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(row)
}

fn auth_name(code: i32) -> &'static str {
    match code {
        2 => "Kerberos V5",
        6 => "SCM credentials",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// the connection

/// A `replication=database` connection in query mode.
pub struct ReplicationConnection {
    reader: Reader,
    writer: Writer,
    parameters: HashMap<String, String>,
    /// A query was sent and its ReadyForQuery not yet seen (set across cancellation).
    busy: bool,
}

impl ReplicationConnection {
    /// Startup with `replication=database`, the [`SESSION_SETTINGS`] options, application_name;
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
            let (tag, body) = self.reader.frame().await?;
            match tag {
                b'S' => self.parameter_status(&body)?,
                b'K' => {}
                b'N' => log_notice(&self.reader.peer, &body),
                b'Z' => return Ok(()),
                b'E' => return Err(error_from_response(&self.reader.peer, &body)),
                other => return Err(self.unexpected(other, "during startup")),
            }
        }
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), Error> {
        let peer = self.reader.peer.clone();
        let auth_err = |msg: String| {
            Error::definite(
                COMPONENT,
                format!("authenticating to {peer} as {}: {msg}", info.user()),
            )
        };
        let password = || {
            info.password().ok_or_else(|| {
                auth_err("the server requested a password but none was given".into())
            })
        };
        let build_err = |e: io::Error| auth_err(format!("building message: {e}"));
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.reader.frame().await?;
            match tag {
                b'R' => {}
                b'E' => return Err(error_from_response(&peer, &body)),
                b'N' => {
                    log_notice(&peer, &body);
                    continue;
                }
                other => return Err(self.unexpected(other, "during authentication")),
            }
            let code = be_i32(&body, 0)
                .ok_or_else(|| protocol_error(&peer, "truncated authentication request"))?;
            let data = &body[4..];
            match code {
                0 => return Ok(()),
                3 => frontend::password_message(password()?.as_bytes(), &mut self.writer.buf)
                    .map_err(build_err)?,
                5 => {
                    let salt: [u8; 4] = data.try_into().map_err(|_| {
                        protocol_error(&peer, "malformed MD5 authentication request")
                    })?;
                    let hash = md5_hash(info.user().as_bytes(), password()?.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut self.writer.buf)
                        .map_err(build_err)?;
                }
                10 => {
                    let mut mechanisms = Vec::new();
                    let mut rest = data;
                    while let Some((name, after)) = cstr(rest).filter(|(name, _)| !name.is_empty())
                    {
                        mechanisms.push(String::from_utf8_lossy(name).into_owned());
                        rest = after;
                    }
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(auth_err(format!(
                            "unsupported SASL mechanisms {mechanisms:?}"
                        )));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        s.message(),
                        &mut self.writer.buf,
                    )
                    .map_err(build_err)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| protocol_error(&peer, "SASL continue without SASL start"))?;
                    s.update(data)
                        .map_err(|e| auth_err(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.writer.buf)
                        .map_err(build_err)?;
                }
                12 => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| protocol_error(&peer, "SASL final without SASL start"))?;
                    s.finish(data)
                        .map_err(|e| auth_err(format!("SCRAM server signature: {e}")))?;
                    continue; // AuthenticationOk follows
                }
                other => {
                    return Err(auth_err(format!(
                        "unsupported authentication method {} ({other})",
                        auth_name(other)
                    )))
                }
            }
            self.writer.send_buf().await?;
        }
    }

    fn parameter_status(&mut self, body: &[u8]) -> Result<(), Error> {
        let (name, rest) = cstr(body)
            .ok_or_else(|| protocol_error(&self.reader.peer, "malformed ParameterStatus"))?;
        let (value, _) = cstr(rest)
            .ok_or_else(|| protocol_error(&self.reader.peer, "malformed ParameterStatus"))?;
        self.parameters.insert(
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
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
            let (tag, body) = match self.reader.frame().await {
                Ok(frame) => frame,
                // A FATAL error is followed by the server closing the connection: report the error.
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match tag {
                b'D' if error.is_none() => rows.push(parse_data_row(&self.reader.peer, &body)?),
                b'T' | b'C' | b'I' | b'D' => {}
                b'E' => {
                    error.get_or_insert_with(|| error_from_response(&self.reader.peer, &body));
                }
                b'N' => log_notice(&self.reader.peer, &body),
                b'S' => self.parameter_status(&body)?,
                b'Z' => {
                    self.busy = false;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                b'G' | b'H' | b'W' => {
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
            let (tag, body) = match self.reader.frame().await {
                Ok(frame) => frame,
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match tag {
                b'W' if error.is_none() => {
                    // CopyBothResponse: i8 format, i16 column count, i16 per column.
                    if body.len() < 3 {
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
                b'E' => {
                    error.get_or_insert_with(|| error_from_response(&self.reader.peer, &body));
                }
                b'N' => log_notice(&self.reader.peer, &body),
                b'S' => self.parameter_status(&body)?,
                b'T' | b'D' | b'C' | b'I' => {}
                b'Z' => {
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

/// Reading half of a CopyBoth stream.
pub struct CopyReader {
    reader: Reader,
    /// The server ended the stream (CopyDone / CommandComplete / error): `next` keeps returning None.
    done: bool,
}

impl CopyReader {
    /// Next CopyData payload as a zero-copy `Bytes` slice of the read buffer; Ok(None) on
    /// CopyDone/CommandComplete (server ended the stream), and on every call after that;
    /// ErrorResponse → classified Error. Skips NoticeResponse/ParameterStatus.
    #[inline]
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if self.done {
            return Ok(None);
        }
        loop {
            let (tag, body) = self.reader.frame().await?;
            match tag {
                b'd' => return Ok(Some(body)),
                b'N' => log_notice(&self.reader.peer, &body),
                b'S' => {}
                b'c' | b'C' => {
                    self.done = true;
                    return Ok(None);
                }
                b'E' => {
                    self.done = true;
                    return Err(error_from_response(&self.reader.peer, &body));
                }
                other => {
                    return Err(protocol_error(
                        &self.reader.peer,
                        format_args!("unexpected message {:?} in COPY BOTH mode", other as char),
                    ))
                }
            }
        }
    }
}

/// Writing half of a CopyBoth stream (standby status updates, feedback).
pub struct CopyWriter {
    writer: Writer,
}

impl CopyWriter {
    /// Sends `payload` in one CopyData message and flushes.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), Error> {
        self.writer.buf.clear();
        frontend::CopyData::new(payload)
            .map_err(|e| Error::definite(COMPONENT, format!("CopyData: {e}")))?
            .write(&mut self.writer.buf);
        self.writer.send_buf().await
    }

    /// Sends CopyDone: asks the server to end the stream; the reader then sees the server's own
    /// CopyDone (`Ok(None)`) after any data still in flight.
    pub async fn finish(mut self) -> Result<(), Error> {
        self.writer.buf.clear();
        frontend::copy_done(&mut self.writer.buf);
        self.writer.send_buf().await
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
