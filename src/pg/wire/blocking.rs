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
//!   returns 0 if nothing arrived in that time (a paced TCP read, below, gives up sooner, so a 0
//!   does not measure idle time). So the caller decides when it may block. Over TLS,
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
//!
//! # Paced reads over TCP
//! The walsender sends every change as it decodes it, one `send` each. A reader that drains the
//! socket and blocks on it again is woken by nearly every one of those sends, and on a loopback
//! connection the wake-up is work done on the walsender's CPU: serving such a reader, the walsender
//! used 30–60% more CPU than serving `pg_recvlogical` (benches/README.md). So a TCP read asks the
//! kernel to wake it only once a *low-water mark* of bytes has arrived (`SO_RCVLOWAT`), and the mark
//! follows the flow: after a read that returned at least [`PACE_FROM`] bytes it becomes what that
//! read returned, after a smaller one it is one byte (no pacing). The mark is at most
//! [`MAX_LOW_WATER`] and at most a quarter of the socket's receive buffer when the stream starts
//! (32 KiB with Linux's default 128 KiB): Linux clamps the receive window to a mark that needs a
//! larger buffer, and a window that small throttles the walsender.
//!
//! While the mark is above one byte a read waits at most [`PACED_WAIT`] for it, then returns what
//! has arrived. The kernel times that wait in scheduler ticks, so it is really up to one tick (1 to
//! 10 ms by the kernel's `HZ`); a wait that ends at once drops the mark to one byte, and the next
//! heavy read raises it again. So under a heavy flow a read wakes every few milliseconds instead of
//! for every change, while a lighter flow (10,000 changes/s of small transactions fill a few KiB
//! between reads) is read as it comes, as before: pacing it too raised the median commit-to-ack
//! latency of change events from 0.8 to 5.6 ms. A heavy flow that stops is read at most that one
//! wait late; an idle stream has no mark and the normal read timeout.
//!
//! Under TLS the socket is read ahead into a buffer as large as the frame reads, because rustls
//! reads at most 4 KiB at a time and the kernel's wait is bounded by the size asked for. A unix
//! socket is not paced here: its reader waits between reads instead (`daemon::stream_thread`).
//! Where `SO_RCVLOWAT` is refused or unavailable, reads are not paced.
//!
//! # Draining a unix socket between reads
//! Over a unix socket the only buffer between the walsender and us is the walsender's send
//! buffer, and it is small in messages: Linux counts each message with its bookkeeping (several
//! hundred bytes beside a change of ~150 bytes), so the default 208 KiB hold a few hundred
//! changes, well under a millisecond of the walsender's output. A reader that stops to compress a
//! 64 KiB chunk or seal a batch leaves the walsender blocked for the rest of that time (measured
//! with `perf sched`: about 2,800 waits of ~0.3 ms per million changes; benches/README.md).
//! [`CopyStream::top_up`] is the remedy: the stream thread calls it every few dozen frames it
//! applies, and it appends what has arrived with one read that never waits (`MSG_DONTWAIT`), as
//! long as fewer than [`TOP_UP_LIMIT`] bytes wait unparsed in the buffer, so the memory it adds is
//! bounded. Over TCP the receive buffer is large and grows with the flow, and a read there is paced
//! instead (above): a top-up does nothing.

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

/// [`CopyStream::top_up`] fills the buffer up to this many unparsed bytes, no further: the
/// socket's own buffer holds the rest (see "Draining a unix socket between reads").
pub const TOP_UP_LIMIT: usize = 256 * 1024;

/// How long one send may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most a paced TCP read waits for before it is woken (see "Paced reads over TCP").
pub const MAX_LOW_WATER: usize = 64 * 1024;

/// The least a read must return for the next one to be paced: a flow that fills less than this
/// between two reads is read as it comes (see "Paced reads over TCP").
pub const PACE_FROM: usize = 16 * 1024;

/// How long a paced TCP read waits for its low-water mark before it returns what has arrived.
pub const PACED_WAIT: Duration = Duration::from_millis(2);

enum SyncIo {
    Tcp(PacedTcp),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, ReadAhead>>),
}

/// A blocking TCP socket whose reads are paced by an adaptive low-water mark (see the module
/// documentation).
struct PacedTcp {
    sock: TcpStream,
    /// The read timeout with no low-water mark (an idle stream).
    idle_timeout: Duration,
    /// The low-water mark set on the socket now (1: none).
    low_water: usize,
    /// Whether the socket accepts `SO_RCVLOWAT`.
    paced: bool,
    /// The highest mark for this socket: [`MAX_LOW_WATER`], or a quarter of its receive buffer if
    /// that is less (see [`PacedTcp::new`]).
    max_low_water: usize,
}

impl PacedTcp {
    fn new(sock: TcpStream, idle_timeout: Duration) -> io::Result<PacedTcp> {
        sock.set_read_timeout(Some(idle_timeout))?;
        // Linux clamps the receive window to a mark whose room exceeds the receive buffer (it
        // grows the buffer to hold the mark and clamps the window to it, `tcp_set_rcvlowat`), and a
        // 64 KiB window throttles the walsender. The buffer only grows from here (autotuning), so
        // a mark of at most a quarter of it now never needs more room.
        let receive_buffer = receive_buffer(&sock).unwrap_or(0);
        Ok(PacedTcp {
            sock,
            idle_timeout,
            low_water: 1,
            // Unsupported platforms report no receive buffer.
            paced: receive_buffer > 0,
            max_low_water: MAX_LOW_WATER.min(receive_buffer / 4).max(1),
        })
    }

    /// Sets the next read's low-water mark from what the last one returned (0: nothing).
    fn pace_after(&mut self, got: usize) {
        let next = pace_after(got, self.max_low_water);
        if !self.paced || next == self.low_water {
            return;
        }
        let switched = (next > 1) != (self.low_water > 1);
        let timeout = if next > 1 {
            PACED_WAIT
        } else {
            self.idle_timeout
        };
        let set = set_low_water(&self.sock, next).is_ok()
            && (!switched || self.sock.set_read_timeout(Some(timeout)).is_ok());
        if set {
            self.low_water = next;
        } else {
            self.stop_pacing();
        }
    }

    /// Pacing failed: not paced from now on. A mark left on the socket would make every read wait
    /// for it until the idle timeout, so it is taken back; if even that fails, reads keep the short
    /// timeout (they give up within `PACED_WAIT` and return what has arrived).
    fn stop_pacing(&mut self) {
        self.paced = false;
        let timeout = if set_low_water(&self.sock, 1).is_ok() {
            self.idle_timeout
        } else {
            PACED_WAIT
        };
        let _ = self.sock.set_read_timeout(Some(timeout));
        self.low_water = 1;
    }
}

/// The low-water mark after a read that returned `got` bytes (see "Paced reads over TCP").
/// `max` is the socket's highest mark.
pub(super) fn pace_after(got: usize, max: usize) -> usize {
    if got < PACE_FROM || max < PACE_FROM {
        1
    } else {
        got.min(max)
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn receive_buffer(sock: &TcpStream) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor (borrowed from `sock`), and pointers to a c_int and its
    // length that live across the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn receive_buffer(_: &TcpStream) -> io::Result<usize> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_low_water(sock: &TcpStream, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    // SAFETY: a valid socket descriptor (borrowed from `sock`) and a pointer to a c_int that lives
    // across the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_low_water(_: &TcpStream, _: usize) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// One read of what has already arrived on `sock`, never waiting (`MSG_DONTWAIT`: the socket's
/// read timeout stays as it is); `WouldBlock` when nothing has.
fn read_ready(sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor (borrowed from `sock`) and a writable buffer of `buf.len()`
    // bytes that lives across the call.
    let rc = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

impl Read for PacedTcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.sock.read(buf);
        match &result {
            Ok(n) => self.pace_after(*n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                self.pace_after(0)
            }
            Err(_) => {}
        }
        result
    }
}

impl Write for PacedTcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// The paced socket under rustls, read ahead in reads as large as the frame reads (rustls asks
/// for at most 4 KiB); writes go straight to the socket.
struct ReadAhead(io::BufReader<PacedTcp>);

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ReadAhead {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
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
        let tcp = |s: tokio::net::TcpStream| -> io::Result<PacedTcp> {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))?;
            PacedTcp::new(s, read_timeout)
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
                let ahead = ReadAhead(io::BufReader::with_capacity(
                    READ_CHUNK,
                    tcp(s).map_err(setup)?,
                ));
                SyncIo::Tls(Box::new(StreamOwned::new(session, ahead)))
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
    /// that time (or, paced, in the shorter wait for the mark). EOF is a transient error (the server
    /// went away).
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
        self.append(n, self.want);
        Ok(n)
    }

    /// Over a unix socket, what has already arrived, without waiting: one non-blocking read
    /// appended to the buffer (see "Draining a unix socket between reads"). Returns the bytes
    /// read: 0 when nothing is waiting, over TCP, or while the buffer already holds
    /// `TOP_UP_LIMIT` (256 KiB). The end of the stream and a failed read are left where they are:
    /// the frames already buffered come first (the server's last message may be an error that
    /// explains the end), and [`Self::fill`] meets the end once they are applied.
    pub fn top_up(&mut self) -> usize {
        let SyncIo::Unix(sock) = &self.io else {
            return 0;
        };
        let room = TOP_UP_LIMIT.saturating_sub(self.buf.len());
        if self.done || room == 0 {
            return 0;
        }
        match read_ready(sock, &mut self.scratch[..room.min(READ_CHUNK)]) {
            Ok(n) if n > 0 => {
                self.append(n, 0);
                n
            }
            _ => 0,
        }
    }

    /// Appends the first `n` bytes of the scratch buffer to the frame buffer, with room for at
    /// least `want` bytes in all.
    fn append(&mut self, n: usize, want: usize) {
        let want = want.max(self.buf.len() + n);
        reserve_for_read(&mut self.buf, want);
        self.buf.extend_from_slice(&self.scratch[..n]);
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
