//! CopyBoth mode: the two halves of a replication stream, which may live on different tasks.
//!
//! Each CopyData payload is returned as a zero-copy slice of the read buffer, and
//! [`CopyReader::next`] is cancel-safe (it can sit in a `select!`). The daemon joins the halves
//! again into a blocking `super::blocking::CopyStream`; the meaning of each frame ([`copy_item`]) is
//! shared by both.

use bytes::Bytes;
use postgres_protocol::message::backend::{
    COMMAND_COMPLETE_TAG, COPY_DATA_TAG, COPY_DONE_TAG, ERROR_RESPONSE_TAG, NOTICE_RESPONSE_TAG,
    PARAMETER_STATUS_TAG,
};
use postgres_protocol::message::frontend;

use crate::error::Error;

use super::backend::{error_from_response, log_notice};
use super::frame::{protocol_error, Frame, Reader, Writer};
use super::COMPONENT;

/// Reading half of a CopyBoth stream.
pub struct CopyReader {
    pub(super) reader: Reader,
    /// The server ended the stream (CopyDone / CommandComplete / error): `next` keeps returning None.
    pub(super) done: bool,
}

impl CopyReader {
    /// Next CopyData payload as a zero-copy `Bytes` slice of the read buffer; Ok(None) on
    /// CopyDone/CommandComplete (server ended the stream), and on every call after that;
    /// ErrorResponse → classified Error. Skips NoticeResponse/ParameterStatus. Cancel-safe.
    #[inline]
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if self.done {
            return Ok(None);
        }
        loop {
            let frame = self.reader.frame().await?;
            match copy_item(frame, &self.reader.peer) {
                Ok(Some(CopyItem::Data(payload))) => return Ok(Some(payload)),
                Ok(Some(CopyItem::End)) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            }
        }
    }
}

/// What one frame of a CopyBoth stream means to a reader.
pub enum CopyItem {
    /// A CopyData payload (a zero-copy slice of the read buffer).
    Data(Bytes),
    /// The server ended the stream (CopyDone or CommandComplete).
    End,
}

/// Interprets one frame of a CopyBoth stream: `None` for frames a reader skips (NoticeResponse, which
/// is logged, and ParameterStatus); an ErrorResponse becomes the classified error; anything else is a
/// protocol error. Shared by [`CopyReader`] and `super::blocking::CopyStream`.
#[inline]
pub(super) fn copy_item(frame: Frame, peer: &str) -> Result<Option<CopyItem>, Error> {
    match frame.tag {
        COPY_DATA_TAG => Ok(Some(CopyItem::Data(frame.into_body()))),
        NOTICE_RESPONSE_TAG => {
            log_notice(peer, frame);
            Ok(None)
        }
        PARAMETER_STATUS_TAG => Ok(None),
        COPY_DONE_TAG | COMMAND_COMPLETE_TAG => Ok(Some(CopyItem::End)),
        ERROR_RESPONSE_TAG => Err(error_from_response(peer, frame)),
        other => Err(protocol_error(
            peer,
            format_args!("unexpected message {:?} in COPY BOTH mode", other as char),
        )),
    }
}

/// Writing half of a CopyBoth stream (standby status updates, feedback).
pub struct CopyWriter {
    pub(super) writer: Writer,
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
