//! CopyBoth mode: the two halves of a replication stream, which may live on different tasks.
//!
//! [`CopyReader::next`] is the product's hottest path: each CopyData payload is returned as a
//! zero-copy slice of the read buffer, and the call is cancel-safe (it can sit in a `select!`).

use bytes::Bytes;
use postgres_protocol::message::backend::{
    COMMAND_COMPLETE_TAG, COPY_DATA_TAG, COPY_DONE_TAG, ERROR_RESPONSE_TAG, NOTICE_RESPONSE_TAG,
    PARAMETER_STATUS_TAG,
};
use postgres_protocol::message::frontend;

use crate::error::Error;

use super::backend::{error_from_response, log_notice};
use super::frame::{protocol_error, Reader, Writer};
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
            match frame.tag {
                COPY_DATA_TAG => return Ok(Some(frame.into_body())),
                NOTICE_RESPONSE_TAG => log_notice(&self.reader.peer, frame),
                PARAMETER_STATUS_TAG => {}
                COPY_DONE_TAG | COMMAND_COMPLETE_TAG => {
                    self.done = true;
                    return Ok(None);
                }
                ERROR_RESPONSE_TAG => {
                    self.done = true;
                    return Err(error_from_response(&self.reader.peer, frame));
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
