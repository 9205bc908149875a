//! Framing: the byte stream (TCP, unix socket or TLS) cut into tagged, length-checked frames.
//!
//! A frame is a tag byte and a body; its length field is checked (below 4 or above [`MAX_FRAME`] is
//! a protocol error) before anything is read into it, and the body is a slice of one large read
//! buffer, never copied. [`Reader::frame`] is cancel-safe: a frame leaves the buffer only when it is
//! returned. [`Writer`] batches outgoing messages in one buffer and writes them with one call.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::Error;
use crate::pg::tls;

use super::COMPONENT;

/// Read buffer growth step; one `read` can fill this much (a coalesced read of the replication
/// stream can find a few hundred KiB waiting).
pub(super) const READ_CHUNK: usize = 256 * 1024;
/// Below this much free space the read buffer is grown before reading.
const MIN_FREE: usize = 16 * 1024;
/// Largest frame accepted (PostgreSQL's own limit for a message is 1 GiB).
pub(super) const MAX_FRAME: usize = 1 << 30;

pub(super) enum Stream {
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
pub(super) fn io_error(peer: &str, what: &str, e: io::Error) -> Error {
    if let Some(t) = tls::rustls_error(&e) {
        return Error::definite(
            COMPONENT,
            format!("TLS with {peer} failed while {what}: {t}"),
        );
    }
    Error::transient(COMPONENT, format!("{what} {peer}: {e}"))
}

pub(super) fn protocol_error(peer: &str, what: impl std::fmt::Display) -> Error {
    Error::definite(COMPONENT, format!("protocol error from {peer}: {what}"))
}

/// One complete backend message split off the read buffer: the whole frame, tag and length
/// included, which is what [`Message::parse`] wants (so parsing it copies nothing).
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) raw: BytesMut,
}

impl Frame {
    /// The body (after tag and length) as a zero-copy slice of the read buffer: CopyData payloads.
    #[inline]
    pub(super) fn into_body(self) -> Bytes {
        let mut raw = self.raw;
        raw.advance(5);
        raw.freeze()
    }

    pub(super) fn body_len(&self) -> usize {
        self.raw.len() - 5
    }

    /// The message parsed by `postgres_protocol`, which checks every length inside the body and
    /// rejects trailing bytes.
    pub(super) fn parse(self) -> io::Result<Message> {
        let mut raw = self.raw;
        Message::parse(&mut raw)?.ok_or_else(|| {
            // Cannot happen: the reader only hands out complete frames.
            io::Error::new(io::ErrorKind::UnexpectedEof, "incomplete message")
        })
    }
}

/// What [`Frame::parse`] returns when the frame parsed as another message than its tag promised
/// (cannot happen: `Message::parse` dispatches on the same tag).
pub(super) fn not_a(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not a {what}"))
}

/// Splits the next complete frame off the front of `buf`, if one is there; otherwise sets `want` to
/// the total size the buffer must reach (the header, or the whole frame once its length is known).
/// Shared by the async [`Reader`] and the blocking `super::blocking::CopyStream`.
#[inline]
pub(super) fn take_frame(
    buf: &mut BytesMut,
    want: &mut usize,
    peer: &str,
) -> Result<Option<Frame>, Error> {
    let Some(header) = buf.get(..5) else {
        *want = 5;
        return Ok(None);
    };
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_FRAME).contains(&len) {
        return Err(protocol_error(
            peer,
            format_args!("invalid length {len} for message {:?}", tag as char),
        ));
    }
    if buf.len() <= len {
        *want = len + 1;
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        raw: buf.split_to(len + 1),
    }))
}

/// Makes room for one read: at least what the frame being assembled still needs and [`MIN_FREE`],
/// grown in steps of [`READ_CHUNK`].
#[inline]
pub(super) fn reserve_for_read(buf: &mut BytesMut, want: usize) {
    let need = want.saturating_sub(buf.len()).max(MIN_FREE);
    if buf.capacity() - buf.len() < need {
        buf.reserve(need.max(READ_CHUNK));
    }
}

/// A write that did not complete (cancelled or failed part-way) may have left half a message on the
/// wire: the connection refuses every later write (definite: discard it and reconnect).
pub(super) fn torn_writer(peer: &str) -> Error {
    Error::definite(
        COMPONENT,
        format!("connection to {peer} is unusable: an earlier write did not complete"),
    )
}

/// The server closed the connection (EOF): transient, the server went away.
pub(super) fn closed_by(peer: &str) -> Error {
    Error::transient(
        COMPONENT,
        format!("server {peer} closed the connection unexpectedly"),
    )
}

/// The read half: a growing buffer of unparsed bytes.
pub(super) struct Reader {
    pub(super) io: ReadHalf<Stream>,
    pub(super) buf: BytesMut,
    /// Total size (tag included) of the frame at the front of `buf` once its header is known.
    pub(super) want: usize,
    pub(super) peer: Arc<str>,
}

impl Reader {
    /// The next complete frame already in the buffer.
    #[inline]
    pub(super) fn try_frame(&mut self) -> Result<Option<Frame>, Error> {
        take_frame(&mut self.buf, &mut self.want, &self.peer)
    }

    /// Reads more bytes; EOF is a transient error (the server went away).
    pub(super) async fn fill(&mut self) -> Result<(), Error> {
        reserve_for_read(&mut self.buf, self.want);
        let n = self
            .io
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| io_error(&self.peer, "reading from", e))?;
        if n == 0 {
            return Err(closed_by(&self.peer));
        }
        Ok(())
    }

    #[inline]
    pub(super) async fn frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }
}

/// The write half, with a reusable output buffer.
pub(super) struct Writer {
    pub(super) io: WriteHalf<Stream>,
    pub(super) buf: BytesMut,
    /// Set while a write is in flight; still set afterwards only if that write was cancelled.
    pub(super) torn: bool,
    pub(super) peer: Arc<str>,
}

impl Writer {
    /// Writes and flushes `self.buf`, then clears it.
    pub(super) async fn send_buf(&mut self) -> Result<(), Error> {
        if self.torn {
            return Err(torn_writer(&self.peer));
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
