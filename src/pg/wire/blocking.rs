//! CopyBoth with blocking system calls: the whole replication stream, both directions, on one OS
//! thread.
//!
//! [`CopyStream::from_halves`] takes the two async halves that [`super::ReplicationConnection::start_copy_both`]
//! returns, moves the socket out of the runtime's reactor (`into_std`), makes it blocking with a read
//! timeout, and keeps the bytes the async reader had already buffered. TLS stays TLS: the rustls
//! session that the async handshake built is moved, with whatever it holds, into a
//! `rustls::StreamOwned` over the same socket. The daemon's stream thread uses it
//! (`daemon::stream_thread`; why one thread: benches/README.md).
//!
//! # Contract
//! - [`CopyStream::next_buffered`] returns the next item already in the read buffer, never making a
//!   system call; [`CopyStream::fill`] makes one read, which blocks at most the read timeout and
//!   returns 0 if nothing arrived in that time. So the caller decides when it may block. Over TLS,
//!   one `fill` may read the socket more than once (rustls reads until a record decrypts, and first
//!   writes what it has pending): each of those reads waits at most the read timeout, so a record
//!   trickling in slowly can stretch one `fill` by as many timeouts.
//! - Framing and the meaning of each frame are the async reader's own ([`super::frame::take_frame`],
//!   [`super::copy::copy_item`]): a length below 4 or above 1 GiB and an unexpected message are
//!   definite protocol errors, an ErrorResponse is the classified server error, EOF and I/O errors
//!   are transient, a TLS error is definite. Nothing here panics on what the server sends.
//! - Payloads are zero-copy slices of the read buffer.
//! - After CopyDone/CommandComplete or an error, [`CopyStream::next_buffered`] keeps returning
//!   [`CopyItem::End`] / nothing new: the stream is over.
//! - [`CopyStream::send`] writes one CopyData message whole (blocking at most the write timeout); a
//!   write that fails or times out may leave a message half written, and every later send is then
//!   refused with a definite error rather than corrupt the stream.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio_rustls::rustls::{ClientConnection, StreamOwned};

use crate::error::Error;

use super::copy::{copy_item, CopyItem, CopyReader, CopyWriter};
use super::frame::{
    closed_by, io_error, reserve_for_read, take_frame, torn_writer, Stream, READ_CHUNK,
};
use super::COMPONENT;

/// How long one send may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

enum SyncIo {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for SyncIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SyncIo::Tcp(s) => s.read(buf),
            SyncIo::Unix(s) => s.read(buf),
            SyncIo::Tls(s) => s.read(buf),
        }
    }
}

impl Write for SyncIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SyncIo::Tcp(s) => s.write(buf),
            SyncIo::Unix(s) => s.write(buf),
            SyncIo::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SyncIo::Tcp(s) => s.flush(),
            SyncIo::Unix(s) => s.flush(),
            SyncIo::Tls(s) => s.flush(),
        }
    }
}

/// A CopyBoth stream read and written with blocking calls (see the module documentation).
pub struct CopyStream {
    io: SyncIo,
    buf: BytesMut,
    /// Total size the buffer must reach for the frame at its front (see `take_frame`).
    want: usize,
    /// Where each read lands before it is appended to `buf` (see [`Self::fill`]).
    scratch: Box<[u8]>,
    out: BytesMut,
    peer: Arc<str>,
    /// The server ended the stream, or it failed: nothing more is read.
    done: bool,
    /// A send failed part-way: the stream may hold half a message.
    torn: bool,
}

impl CopyStream {
    /// Joins the async halves into one blocking stream whose reads wait at most `read_timeout`.
    /// Must run inside the runtime that created them (the socket leaves its reactor).
    pub fn from_halves(
        reader: CopyReader,
        writer: CopyWriter,
        read_timeout: Duration,
    ) -> Result<CopyStream, Error> {
        let CopyReader { reader, done } = reader;
        let peer = reader.peer.clone();
        if writer.writer.torn {
            return Err(torn_writer(&peer));
        }
        let stream = reader.io.unsplit(writer.writer.io);
        let setup = |e: io::Error| {
            Error::transient(
                COMPONENT,
                format!("cannot set up the replication socket to {peer}: {e}"),
            )
        };
        let tcp = |s: tokio::net::TcpStream| -> io::Result<TcpStream> {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(read_timeout))?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))?;
            Ok(s)
        };
        let io = match stream {
            Stream::Tcp(s) => SyncIo::Tcp(tcp(s).map_err(setup)?),
            Stream::Unix(s) => {
                let s = s.into_std().map_err(setup)?;
                s.set_nonblocking(false).map_err(setup)?;
                s.set_read_timeout(Some(read_timeout)).map_err(setup)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(setup)?;
                SyncIo::Unix(s)
            }
            Stream::Tls(s) => {
                // The session keeps any records it has decrypted and not yet handed out.
                let (s, session) = s.into_inner();
                SyncIo::Tls(Box::new(StreamOwned::new(session, tcp(s).map_err(setup)?)))
            }
        };
        Ok(CopyStream {
            io,
            buf: reader.buf,
            want: reader.want,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            out: BytesMut::with_capacity(64),
            peer,
            done,
            torn: false,
        })
    }

    /// Whether a message can still be sent: no earlier send failed part-way.
    pub fn writable(&self) -> bool {
        !self.torn
    }

    /// Whether the stream is a unix-domain socket (no TCP acknowledgements pace the sender).
    pub fn is_unix_socket(&self) -> bool {
        matches!(self.io, SyncIo::Unix(_))
    }

    /// The next item already in the read buffer, without a system call; `None` when the buffer holds
    /// no complete frame (then [`Self::fill`] reads more). Frames a reader skips are skipped.
    #[inline]
    pub fn next_buffered(&mut self) -> Result<Option<CopyItem>, Error> {
        if self.done {
            return Ok(Some(CopyItem::End));
        }
        loop {
            let frame = match take_frame(&mut self.buf, &mut self.want, &self.peer) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            };
            match copy_item(frame, &self.peer) {
                Ok(None) => continue,
                Ok(Some(CopyItem::End)) => {
                    self.done = true;
                    return Ok(Some(CopyItem::End));
                }
                Ok(Some(item)) => return Ok(Some(item)),
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            }
        }
    }

    /// One read, blocking at most the read timeout; returns the bytes read, 0 if nothing arrived in
    /// that time. EOF is a transient error (the server went away).
    ///
    /// The read lands in a scratch buffer (zeroed once) and is appended to the frame buffer: safe
    /// code cannot read into uninitialised capacity, and zeroing up to 256 KiB before every read
    /// would cost more than copying what one read returns.
    pub fn fill(&mut self) -> Result<usize, Error> {
        if self.done {
            return Err(closed_by(&self.peer));
        }
        let result = loop {
            match self.io.read(&mut self.scratch) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = match result {
            Ok(0) => {
                self.done = true;
                return Err(closed_by(&self.peer));
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(0)
            }
            Err(e) => {
                self.done = true;
                return Err(io_error(&self.peer, "reading from", e));
            }
        };
        let want = self.want.max(self.buf.len() + n);
        reserve_for_read(&mut self.buf, want);
        self.buf.extend_from_slice(&self.scratch[..n]);
        Ok(n)
    }

    /// Sends `payload` in one CopyData message and flushes.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), Error> {
        self.out.clear();
        frontend::CopyData::new(payload)
            .map_err(|e| Error::definite(COMPONENT, format!("CopyData: {e}")))?
            .write(&mut self.out);
        self.send_out()
    }

    /// Sends CopyDone: asks the server to end the stream (the session is over).
    pub fn finish(&mut self) -> Result<(), Error> {
        self.out.clear();
        frontend::copy_done(&mut self.out);
        self.send_out()
    }

    fn send_out(&mut self) -> Result<(), Error> {
        if self.torn {
            return Err(torn_writer(&self.peer));
        }
        self.torn = true;
        self.io
            .write_all(&self.out)
            .and_then(|()| self.io.flush())
            .map_err(|e| io_error(&self.peer, "writing to", e))?;
        self.torn = false;
        Ok(())
    }
}
