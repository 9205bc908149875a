//! Bodies of the server messages we read, parsed by `postgres_protocol::message::backend` on the
//! frame itself (no copy): ErrorResponse and NoticeResponse fields (an error becomes an [`Error`]
//! carrying its SQLSTATE, classified by the one table in `crate::error`), DataRow values.
//! A malformed body is a definite protocol error naming the message; nothing here panics.

use std::io;

use postgres_protocol::message::backend::Message;
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::error::Error;

use super::frame::{not_a, protocol_error, Frame};
use super::COMPONENT;

/// The fields of an ErrorResponse / NoticeResponse body that we report.
#[derive(Debug, Default)]
pub(super) struct ServerMessage {
    pub(super) severity: String,
    pub(super) code: String,
    pub(super) message: String,
    pub(super) detail: Option<String>,
    pub(super) hint: Option<String>,
}

/// An ErrorResponse or NoticeResponse frame; its fields are split by `postgres_protocol`.
pub(super) fn server_message(frame: Frame) -> io::Result<ServerMessage> {
    let message = frame.parse()?;
    let mut fields = match &message {
        Message::ErrorResponse(body) => body.fields(),
        Message::NoticeResponse(body) => body.fields(),
        _ => return Err(not_a("ErrorResponse or NoticeResponse")),
    };
    let mut m = ServerMessage::default();
    let mut localized_severity = String::new();
    while let Some(field) = fields.next()? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => m.severity = value,
            b'S' => localized_severity = value,
            b'C' => m.code = value,
            b'M' => m.message = value,
            b'D' => m.detail = Some(value),
            b'H' => m.hint = Some(value),
            _ => {}
        }
    }
    // 'V' (never localized, since 9.6) is preferred; older servers send only 'S'.
    if m.severity.is_empty() {
        m.severity = localized_severity;
    }
    Ok(m)
}

pub(super) fn error_from_response(peer: &str, frame: Frame) -> Error {
    match server_message(frame) {
        Ok(m) if m.code.len() == 5 => Error::server(
            COMPONENT,
            &m.code,
            &m.severity,
            &m.message,
            m.detail.as_deref(),
            m.hint.as_deref(),
        ),
        Ok(m) => protocol_error(
            peer,
            format_args!("malformed ErrorResponse: SQLSTATE {:?}", m.code),
        ),
        Err(e) => protocol_error(peer, format_args!("malformed ErrorResponse: {e}")),
    }
}

pub(super) fn log_notice(peer: &str, frame: Frame) {
    if let Ok(m) = server_message(frame) {
        if m.severity == "WARNING" {
            tracing::warn!(server = peer, sqlstate = %m.code, "{}", m.message);
        } else {
            tracing::debug!(server = peer, severity = %m.severity, sqlstate = %m.code, "{}", m.message);
        }
    }
}

/// A DataRow frame as text values (None = NULL); `postgres_protocol` checks the column count and
/// every length (a negative length is NULL, as in tokio-postgres).
pub(super) fn data_row(frame: Frame) -> io::Result<Vec<Option<String>>> {
    let Message::DataRow(row) = frame.parse()? else {
        return Err(not_a("DataRow"));
    };
    let buf = row.buffer();
    row.ranges()
        .map(|range| {
            let Some(range) = range else { return Ok(None) };
            let value = buf
                .get(range)
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "unexpected EOF"))?;
            let text = std::str::from_utf8(value)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "value is not UTF-8"))?;
            Ok(Some(text.to_owned()))
        })
        .collect()
}
