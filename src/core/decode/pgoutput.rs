//! Decoder (and matching encoder) for the messages of the `pgoutput` logical decoding plugin,
//! protocol version 1, as described in PostgreSQL's "Logical Replication Message Formats".
//!
//! Each message arrives as the payload of one XLogData frame (see [`super::frames`]): a one-byte
//! tag followed by big-endian integers, NUL-terminated strings and length-prefixed byte strings.
//!
//! Invariants of [`decode`]:
//! - it never panics, whatever the input: there is no indexing, `unwrap` or unchecked arithmetic on
//!   input data, and every length or count is checked against the bytes that remain before it is
//!   used, so a hostile count cannot make it allocate more than the input could describe;
//! - column values ([`Value::Text`], [`Value::Binary`]) and logical message contents are zero-copy
//!   [`Bytes`] slices of the input buffer; the only allocations for an Insert, Update or Delete are
//!   the `Vec<Value>` of each tuple. Names (namespace, relation, column, type, origin, message
//!   prefix) are copied into `String`s after UTF-8 validation;
//! - a message must be consumed exactly: bytes left after its last field are an error;
//! - messages that only exist in protocol versions 2+ (streaming) or 3+ (two-phase) are reported as
//!   [`DecodeError::UnsupportedInProtocolV1`], since this client never asks for them;
//! - undefined flag bits (Commit flags aside, which are kept verbatim) are ignored, as PostgreSQL
//!   defines none for protocol version 1.
//!
//! [`encode`] is the inverse of [`decode`]: `decode(encode(m)) == Ok(m)` for every message that can
//! be represented on the wire. It exists for tests and benchmarks.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::lsn::Lsn;

// ---------------------------------------------------------------------------------------------
// Message types
// ---------------------------------------------------------------------------------------------

/// One pgoutput (protocol version 1) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: start of a transaction.
    Begin(Begin),
    /// `C`: end of a transaction.
    Commit(Commit),
    /// `O`: the transaction originated on another server (replication origin).
    Origin(Origin),
    /// `R`: describes a relation; sent before the first change to it in a session, and again
    /// whenever its definition changed.
    Relation(Relation),
    /// `Y`: describes a non-built-in data type used by a following Relation.
    Type(TypeInfo),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: one or more tables were truncated.
    Truncate(Truncate),
    /// `M`: a message written with `pg_logical_emit_message`.
    Message(LogicalMessage),
}

/// `B` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
    pub xid: u32,
}

/// `C` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently unused by PostgreSQL (always 0); kept as sent.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: the position to acknowledge once it is durable.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
}

/// `O` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `R` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Schema name as sent; the empty string stands for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// `pg_class.relreplident`: which old values Update and Delete messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key columns.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: every column.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Self::Default => b'd',
            Self::Nothing => b'n',
            Self::Full => b'f',
            Self::Index => b'i',
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flag bit 1: the column is part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, e.g. the length of a `varchar(n)`; -1 when there is none.
    pub type_modifier: i32,
}

/// `Y` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub oid: u32,
    /// Schema name as sent; the empty string stands for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// `I` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_oid: u32,
    pub new: Tuple,
}

/// `U` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_oid: u32,
    /// Present when the key changed (`K`) or the replica identity is FULL (`O`).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

/// `D` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_oid: u32,
    pub old: OldTuple,
}

/// The old row carried by an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    pub kind: OldTupleKind,
    pub tuple: Tuple,
}

/// Which old values an [`OldTuple`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OldTupleKind {
    /// `K`: only the replica identity key columns are set; the others are [`Value::Null`].
    Key,
    /// `O`: the whole old row (replica identity FULL).
    Full,
}

impl OldTupleKind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Key => b'K',
            Self::Full => b'O',
        }
    }
}

/// `T` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Option bit 1: `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// Option bit 2: `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
    pub relation_oids: Vec<u32>,
}

/// `M` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Flag bit 1: the message was emitted inside the transaction rather than immediately.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// The column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// One column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value, which the server did not send.
    Unchanged,
    /// `t`: the value in its text output form. Not validated as UTF-8 here.
    Text(Bytes),
    /// `b`: the value in its binary send form (only with the `binary` option).
    Binary(Bytes),
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Where in a message a decoding error happened.
///
/// Its `Display` is the field path, e.g. `column 3 name`; column and relation numbers are 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The message or frame being decoded, e.g. `pgoutput Relation message`.
    pub message: &'static str,
    /// The repeated element being read and its 1-based number, e.g. `("column", 3)`.
    pub item: Option<(&'static str, u32)>,
    /// The field being read, e.g. `name`.
    pub field: &'static str,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some((what, n)) => write!(f, "{what} {n} {}", self.field),
            None => f.write_str(self.field),
        }
    }
}

/// Why a pgoutput message or a replication frame could not be decoded. All of these are definite
/// errors: the same bytes will fail the same way again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a fixed-size field or a length-prefixed value.
    #[error("{} truncated while reading {at}: need {need} byte(s), only {have} left", .at.message)]
    Truncated {
        at: Location,
        need: usize,
        have: usize,
    },
    /// A NUL-terminated string ran to the end of the input.
    #[error("{} truncated while reading {at}: string has no NUL terminator", .at.message)]
    UnterminatedString { at: Location },
    /// A name or prefix is not UTF-8.
    #[error("{} has invalid UTF-8 in {at}", .at.message)]
    InvalidUtf8 { at: Location },
    /// A count or length field is negative.
    #[error("{} has a negative {at}: {value}", .at.message)]
    NegativeLength { at: Location, value: i32 },
    /// The first byte is not a pgoutput message tag.
    #[error(
        "unknown pgoutput message tag {}; protocol version 1 only has \
         B, C, O, R, Y, I, U, D, T and M",
        ShowByte(*.0)
    )]
    UnknownTag(u8),
    /// A streaming (protocol 2) or two-phase (protocol 3) message, which protocol 1 never sends.
    #[error(
        "pgoutput {} message (tag {}) does not exist in protocol version 1; this client asks for \
         proto_version 1 without streaming or two-phase, so the server or slot options are \
         misconfigured",
        v2_message_name(*.0),
        ShowByte(*.0)
    )]
    UnsupportedInProtocolV1(u8),
    /// A tuple marker other than the `N`, `K` or `O` allowed at that point.
    #[error(
        "{} has unknown tuple marker {} at {at}; expected {expected}",
        .at.message,
        ShowByte(*.kind)
    )]
    UnknownTupleKind {
        at: Location,
        kind: u8,
        expected: &'static str,
    },
    /// A column value kind other than `n`, `u`, `t` or `b`.
    #[error(
        "{} has unknown value kind {} at {at}; expected 'n', 'u', 't' or 'b'",
        .at.message,
        ShowByte(*.kind)
    )]
    UnknownValueKind { at: Location, kind: u8 },
    /// A replica identity byte other than `d`, `n`, `f` or `i`.
    #[error(
        "pgoutput Relation message for relation oid {relation_oid} has unknown replica \
         identity {}; expected 'd', 'n', 'f' or 'i'",
        ShowByte(*.byte)
    )]
    UnknownReplicaIdentity { relation_oid: u32, byte: u8 },
    /// A replication CopyData payload that is neither `w` nor `k`.
    #[error(
        "unknown replication CopyData frame tag {}; \
         expected 'w' (XLogData) or 'k' (primary keepalive)",
        ShowByte(*.0)
    )]
    UnknownFrameTag(u8),
    /// Bytes remain after the last field of a complete message or keepalive.
    #[error("{message} has {extra} unexpected trailing byte(s) after its last field")]
    TrailingBytes { message: &'static str, extra: usize },
}

/// Shows a byte as `'B' (0x42)` when printable, else as `0x00`.
struct ShowByte(u8);

impl fmt::Display for ShowByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02X})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02X}", self.0)
        }
    }
}

/// Names of the messages of protocol versions 2 and 3,
/// for [`DecodeError::UnsupportedInProtocolV1`].
fn v2_message_name(tag: u8) -> &'static str {
    match tag {
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Cursor
// ---------------------------------------------------------------------------------------------

/// A bounds-checked big-endian reader over a [`Bytes`] buffer.
///
/// Every read checks the remaining length first and reports a [`DecodeError`] naming the message
/// (`message`), the repeated element (`item`) and the field being read. `pos <= buf.len()` always.
pub(super) struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    pub(super) message: &'static str,
    pub(super) item: Option<(&'static str, u32)>,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a Bytes, message: &'static str) -> Self {
        Cursor {
            buf,
            pos: 0,
            message,
            item: None,
        }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    pub(super) fn at(&self, field: &'static str) -> Location {
        Location {
            message: self.message,
            item: self.item,
            field,
        }
    }

    #[cold]
    fn truncated(&self, field: &'static str, need: usize) -> DecodeError {
        DecodeError::Truncated {
            at: self.at(field),
            need,
            have: self.remaining(),
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(a) => {
                self.pos += N;
                Ok(*a)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    #[inline]
    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    #[inline]
    pub(super) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.array(field).map(i16::from_be_bytes)
    }

    #[inline]
    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    #[inline]
    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    #[inline]
    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    #[inline]
    pub(super) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|a| Lsn(u64::from_be_bytes(a)))
    }

    /// A NUL-terminated string, validated as UTF-8 and copied.
    pub(super) fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString { at: self.at(field) });
        };
        let raw = rest.get(..len).unwrap_or_default();
        let s = std::str::from_utf8(raw)
            .map_err(|_| DecodeError::InvalidUtf8 { at: self.at(field) })?;
        self.pos += len + 1;
        Ok(s.to_owned())
    }

    /// The next `n` bytes as a zero-copy slice of the buffer.
    #[inline]
    pub(super) fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated(field, n));
        }
        let start = self.pos;
        self.pos += n;
        Ok(self.buf.slice(start..self.pos))
    }

    /// Everything that is left, as a zero-copy slice.
    pub(super) fn rest_bytes(&mut self) -> Bytes {
        let n = self.remaining();
        let start = self.pos;
        self.pos += n;
        self.buf.slice(start..self.pos)
    }

    /// An Int16 count or length that must not be negative.
    fn count_i16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let v = self.i16(field)?;
        usize::try_from(v).map_err(|_| self.negative(field, v.into()))
    }

    /// An Int32 count or length that must not be negative.
    fn count_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let v = self.i32(field)?;
        usize::try_from(v).map_err(|_| self.negative(field, v))
    }

    #[cold]
    fn negative(&self, field: &'static str, value: i32) -> DecodeError {
        DecodeError::NegativeLength {
            at: self.at(field),
            value,
        }
    }

    /// Succeeds only if the whole buffer was consumed.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Smallest encoding of one Relation column: flags, empty name, type oid, type modifier.
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

/// Field labels for the two tuples an Update can carry.
struct TupleLabels {
    count: &'static str,
    column: &'static str,
}

const NEW_TUPLE: TupleLabels = TupleLabels {
    count: "new tuple column count",
    column: "new tuple column",
};
const OLD_TUPLE: TupleLabels = TupleLabels {
    count: "old tuple column count",
    column: "old tuple column",
};

/// Decodes one pgoutput protocol version 1 message. See the module documentation for guarantees.
pub fn decode(buf: Bytes) -> Result<Message, DecodeError> {
    let mut c = Cursor::new(&buf, "pgoutput message");
    let tag = c.u8("message tag")?;
    let msg = match tag {
        b'B' => {
            c.message = "pgoutput Begin message";
            Message::Begin(Begin {
                final_lsn: c.lsn("final LSN")?,
                commit_ts: c.i64("commit timestamp")?,
                xid: c.u32("xid")?,
            })
        }
        b'C' => {
            c.message = "pgoutput Commit message";
            Message::Commit(Commit {
                flags: c.u8("flags")?,
                commit_lsn: c.lsn("commit LSN")?,
                end_lsn: c.lsn("end LSN")?,
                commit_ts: c.i64("commit timestamp")?,
            })
        }
        b'O' => {
            c.message = "pgoutput Origin message";
            Message::Origin(Origin {
                commit_lsn: c.lsn("commit LSN")?,
                name: c.cstr("origin name")?,
            })
        }
        b'R' => {
            c.message = "pgoutput Relation message";
            Message::Relation(relation(&mut c)?)
        }
        b'Y' => {
            c.message = "pgoutput Type message";
            Message::Type(TypeInfo {
                oid: c.u32("type oid")?,
                namespace: c.cstr("namespace")?,
                name: c.cstr("type name")?,
            })
        }
        b'I' => {
            c.message = "pgoutput Insert message";
            let relation_oid = c.u32("relation oid")?;
            expect_marker(&mut c, "new tuple marker", b'N', "'N'")?;
            let new = tuple(&mut c, &NEW_TUPLE)?;
            Message::Insert(Insert { relation_oid, new })
        }
        b'U' => {
            c.message = "pgoutput Update message";
            Message::Update(update(&mut c)?)
        }
        b'D' => {
            c.message = "pgoutput Delete message";
            let relation_oid = c.u32("relation oid")?;
            let marker = c.u8("old tuple marker")?;
            let kind = match marker {
                b'K' => OldTupleKind::Key,
                b'O' => OldTupleKind::Full,
                _ => return Err(unknown_marker(&c, "old tuple marker", marker, "'K' or 'O'")),
            };
            let tuple = tuple(&mut c, &OLD_TUPLE)?;
            Message::Delete(Delete {
                relation_oid,
                old: OldTuple { kind, tuple },
            })
        }
        b'T' => {
            c.message = "pgoutput Truncate message";
            Message::Truncate(truncate(&mut c)?)
        }
        b'M' => {
            c.message = "pgoutput Message message";
            let flags = c.u8("flags")?;
            let lsn = c.lsn("LSN")?;
            let prefix = c.cstr("prefix")?;
            let len = c.count_i32("content length")?;
            let content = c.bytes(len, "content")?;
            Message::Message(LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            })
        }
        b'S' | b'E' | b'c' | b'A' | b'b' | b'P' | b'K' | b'r' | b'p' => {
            return Err(DecodeError::UnsupportedInProtocolV1(tag))
        }
        _ => return Err(DecodeError::UnknownTag(tag)),
    };
    c.finish()?;
    Ok(msg)
}

fn relation(c: &mut Cursor<'_>) -> Result<Relation, DecodeError> {
    let oid = c.u32("relation oid")?;
    let namespace = c.cstr("namespace")?;
    let name = c.cstr("relation name")?;
    let byte = c.u8("replica identity")?;
    let replica_identity =
        ReplicaIdentity::from_byte(byte).ok_or(DecodeError::UnknownReplicaIdentity {
            relation_oid: oid,
            byte,
        })?;
    let n = c.count_i16("column count")?;
    let mut columns = Vec::with_capacity(n.min(c.remaining() / MIN_RELATION_COLUMN_LEN));
    for i in 0..n {
        c.item = Some(("column", column_number(i)));
        columns.push(RelationColumn {
            is_key: c.u8("flags")? & 1 != 0,
            name: c.cstr("name")?,
            type_oid: c.u32("type oid")?,
            type_modifier: c.i32("type modifier")?,
        });
    }
    c.item = None;
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(c: &mut Cursor<'_>) -> Result<Update, DecodeError> {
    let relation_oid = c.u32("relation oid")?;
    let marker = c.u8("tuple marker")?;
    let kind = match marker {
        b'K' => Some(OldTupleKind::Key),
        b'O' => Some(OldTupleKind::Full),
        b'N' => None,
        _ => return Err(unknown_marker(c, "tuple marker", marker, "'K', 'O' or 'N'")),
    };
    let old = match kind {
        Some(kind) => {
            let tuple = tuple(c, &OLD_TUPLE)?;
            expect_marker(c, "new tuple marker", b'N', "'N'")?;
            Some(OldTuple { kind, tuple })
        }
        None => None,
    };
    let new = tuple(c, &NEW_TUPLE)?;
    Ok(Update {
        relation_oid,
        old,
        new,
    })
}

fn truncate(c: &mut Cursor<'_>) -> Result<Truncate, DecodeError> {
    let n = c.count_i32("relation count")?;
    let options = c.u8("option bits")?;
    // Check the whole list up front so the Vec is sized by what is really there.
    let need = n.saturating_mul(4);
    if need > c.remaining() {
        return Err(c.truncated("relation oids", need));
    }
    let mut relation_oids = Vec::with_capacity(n);
    for i in 0..n {
        c.item = Some(("relation", column_number(i)));
        relation_oids.push(c.u32("oid")?);
    }
    c.item = None;
    Ok(Truncate {
        cascade: options & 1 != 0,
        restart_identity: options & 2 != 0,
        relation_oids,
    })
}

/// TupleData: Int16 column count, then per column a kind byte and, for `t`/`b`, an Int32 length
/// and that many bytes.
#[inline]
fn tuple(c: &mut Cursor<'_>, labels: &TupleLabels) -> Result<Tuple, DecodeError> {
    c.item = None;
    let n = c.count_i16(labels.count)?;
    // Every column takes at least its kind byte.
    let mut values = Vec::with_capacity(n.min(c.remaining()));
    for i in 0..n {
        c.item = Some((labels.column, column_number(i)));
        let kind = c.u8("kind")?;
        let value = match kind {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = c.count_i32("length")?;
                Value::Text(c.bytes(len, "value")?)
            }
            b'b' => {
                let len = c.count_i32("length")?;
                Value::Binary(c.bytes(len, "value")?)
            }
            _ => {
                return Err(DecodeError::UnknownValueKind {
                    at: c.at("kind"),
                    kind,
                })
            }
        };
        values.push(value);
    }
    c.item = None;
    Ok(Tuple(values))
}

fn expect_marker(
    c: &mut Cursor<'_>,
    field: &'static str,
    want: u8,
    expected: &'static str,
) -> Result<(), DecodeError> {
    let got = c.u8(field)?;
    if got == want {
        Ok(())
    } else {
        Err(unknown_marker(c, field, got, expected))
    }
}

#[cold]
fn unknown_marker(
    c: &Cursor<'_>,
    field: &'static str,
    kind: u8,
    expected: &'static str,
) -> DecodeError {
    DecodeError::UnknownTupleKind {
        at: c.at(field),
        kind,
        expected,
    }
}

/// 1-based number of the `i`th element, for error messages (counts never exceed `i32::MAX`).
fn column_number(i: usize) -> u32 {
    u32::try_from(i).map_or(u32::MAX, |i| i.saturating_add(1))
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Encodes a message exactly as PostgreSQL would send it; the inverse of [`decode`].
///
/// # Panics
///
/// If the message cannot be represented on the wire, which [`decode`] never produces: a name or
/// prefix containing a NUL byte, more than `i16::MAX` columns, more than `i32::MAX` truncated
/// relations, or a value or content longer than `i32::MAX` bytes.
pub fn encode(msg: &Message) -> Bytes {
    let mut b = BytesMut::with_capacity(encoded_len_hint(msg));
    match msg {
        Message::Begin(m) => {
            b.put_u8(b'B');
            b.put_u64(m.final_lsn.0);
            b.put_i64(m.commit_ts);
            b.put_u32(m.xid);
        }
        Message::Commit(m) => {
            b.put_u8(b'C');
            b.put_u8(m.flags);
            b.put_u64(m.commit_lsn.0);
            b.put_u64(m.end_lsn.0);
            b.put_i64(m.commit_ts);
        }
        Message::Origin(m) => {
            b.put_u8(b'O');
            b.put_u64(m.commit_lsn.0);
            put_cstr(&mut b, &m.name);
        }
        Message::Relation(m) => {
            b.put_u8(b'R');
            b.put_u32(m.oid);
            put_cstr(&mut b, &m.namespace);
            put_cstr(&mut b, &m.name);
            b.put_u8(m.replica_identity.to_byte());
            b.put_i16(i16::try_from(m.columns.len()).expect("more than i16::MAX columns"));
            for col in &m.columns {
                b.put_u8(u8::from(col.is_key));
                put_cstr(&mut b, &col.name);
                b.put_u32(col.type_oid);
                b.put_i32(col.type_modifier);
            }
        }
        Message::Type(m) => {
            b.put_u8(b'Y');
            b.put_u32(m.oid);
            put_cstr(&mut b, &m.namespace);
            put_cstr(&mut b, &m.name);
        }
        Message::Insert(m) => {
            b.put_u8(b'I');
            b.put_u32(m.relation_oid);
            b.put_u8(b'N');
            put_tuple(&mut b, &m.new);
        }
        Message::Update(m) => {
            b.put_u8(b'U');
            b.put_u32(m.relation_oid);
            if let Some(old) = &m.old {
                b.put_u8(old.kind.to_byte());
                put_tuple(&mut b, &old.tuple);
            }
            b.put_u8(b'N');
            put_tuple(&mut b, &m.new);
        }
        Message::Delete(m) => {
            b.put_u8(b'D');
            b.put_u32(m.relation_oid);
            b.put_u8(m.old.kind.to_byte());
            put_tuple(&mut b, &m.old.tuple);
        }
        Message::Truncate(m) => {
            b.put_u8(b'T');
            b.put_i32(i32::try_from(m.relation_oids.len()).expect("more than i32::MAX relations"));
            b.put_u8(u8::from(m.cascade) | (u8::from(m.restart_identity) << 1));
            for oid in &m.relation_oids {
                b.put_u32(*oid);
            }
        }
        Message::Message(m) => {
            b.put_u8(b'M');
            b.put_u8(u8::from(m.transactional));
            b.put_u64(m.lsn.0);
            put_cstr(&mut b, &m.prefix);
            put_len(&mut b, m.content.len());
            b.put_slice(&m.content);
        }
    }
    b.freeze()
}

fn encoded_len_hint(msg: &Message) -> usize {
    let tuple_len = |t: &Tuple| {
        2 + t
            .0
            .iter()
            .map(|v| match v {
                Value::Null | Value::Unchanged => 1,
                Value::Text(b) | Value::Binary(b) => 5 + b.len(),
            })
            .sum::<usize>()
    };
    match msg {
        Message::Insert(m) => 6 + tuple_len(&m.new),
        Message::Update(m) => {
            7 + tuple_len(&m.new) + m.old.as_ref().map_or(0, |o| tuple_len(&o.tuple))
        }
        Message::Delete(m) => 6 + tuple_len(&m.old.tuple),
        Message::Message(m) => 16 + m.prefix.len() + m.content.len(),
        _ => 64,
    }
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    assert!(
        !s.as_bytes().contains(&0),
        "pgoutput strings cannot contain NUL: {s:?}"
    );
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn put_len(b: &mut BytesMut, len: usize) {
    b.put_i32(i32::try_from(len).expect("value longer than i32::MAX bytes"));
}

fn put_tuple(b: &mut BytesMut, t: &Tuple) {
    b.put_i16(i16::try_from(t.0.len()).expect("more than i16::MAX columns"));
    for v in &t.0 {
        match v {
            Value::Null => b.put_u8(b'n'),
            Value::Unchanged => b.put_u8(b'u'),
            Value::Text(data) => {
                b.put_u8(b't');
                put_len(b, data.len());
                b.put_slice(data);
            }
            Value::Binary(data) => {
                b.put_u8(b'b');
                put_len(b, data.len());
                b.put_slice(data);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Concatenates wire fragments into one buffer.
    fn wire(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    fn ok(parts: &[&[u8]]) -> Message {
        match decode(wire(parts)) {
            Ok(m) => m,
            Err(e) => panic!("fixture failed to decode: {e}"),
        }
    }

    fn err(parts: &[&[u8]]) -> DecodeError {
        match decode(wire(parts)) {
            Ok(m) => panic!("fixture unexpectedly decoded: {m:?}"),
            Err(e) => e,
        }
    }

    const LSN_A: [u8; 8] = 0x0000_0001_6B37_4D48u64.to_be_bytes();
    const LSN_B: [u8; 8] = 0x0000_0001_6B37_4E00u64.to_be_bytes();
    /// 2024-01-02 03:04:05.678901 UTC in µs since 2000-01-01.
    const TS: i64 = 757_479_845_678_901;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    // ----- fixtures, one per message type, laid out as in the PostgreSQL documentation -----

    #[test]
    fn begin() {
        let m = ok(&[b"B", &LSN_A, &TS.to_be_bytes(), &750u32.to_be_bytes()]);
        assert_eq!(
            m,
            Message::Begin(Begin {
                final_lsn: Lsn(0x1_6B37_4D48),
                commit_ts: TS,
                xid: 750
            })
        );
    }

    #[test]
    fn commit() {
        let m = ok(&[b"C", &[0], &LSN_A, &LSN_B, &TS.to_be_bytes()]);
        assert_eq!(
            m,
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x1_6B37_4D48),
                end_lsn: Lsn(0x1_6B37_4E00),
                commit_ts: TS
            })
        );
    }

    #[test]
    fn origin() {
        let m = ok(&[b"O", &LSN_A, b"node_a\0"]);
        assert_eq!(
            m,
            Message::Origin(Origin {
                commit_lsn: Lsn(0x1_6B37_4D48),
                name: "node_a".into()
            })
        );
    }

    #[test]
    fn relation_with_columns_and_every_replica_identity() {
        for (byte, identity) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            let m = ok(&[
                b"R",
                &16_384u32.to_be_bytes(),
                b"public\0",
                b"orders\0",
                &[byte],
                &3i16.to_be_bytes(),
                // id bigint, part of the key
                &[1],
                b"id\0",
                &20u32.to_be_bytes(),
                &(-1i32).to_be_bytes(),
                // note varchar(40): typmod is 40 + 4
                &[0],
                b"note\0",
                &1043u32.to_be_bytes(),
                &44i32.to_be_bytes(),
                // prix numeric, non-ASCII name
                &[0],
                "prix_é\0".as_bytes(),
                &1700u32.to_be_bytes(),
                &(-1i32).to_be_bytes(),
            ]);
            let col = |is_key, name: &str, type_oid, type_modifier| RelationColumn {
                is_key,
                name: name.into(),
                type_oid,
                type_modifier,
            };
            assert_eq!(
                m,
                Message::Relation(Relation {
                    oid: 16_384,
                    namespace: "public".into(),
                    name: "orders".into(),
                    replica_identity: identity,
                    columns: vec![
                        col(true, "id", 20, -1),
                        col(false, "note", 1043, 44),
                        col(false, "prix_é", 1700, -1),
                    ],
                })
            );
        }
    }

    #[test]
    fn relation_in_pg_catalog_keeps_empty_namespace() {
        let m = ok(&[
            b"R",
            &1259u32.to_be_bytes(),
            b"\0",
            b"pg_class\0",
            b"n",
            &0i16.to_be_bytes(),
        ]);
        let Message::Relation(r) = m else {
            panic!("not a relation: {m:?}")
        };
        assert_eq!(r.namespace, "");
        assert!(r.columns.is_empty());
    }

    #[test]
    fn type_message() {
        let m = ok(&[b"Y", &16_500u32.to_be_bytes(), b"public\0", b"mood\0"]);
        assert_eq!(
            m,
            Message::Type(TypeInfo {
                oid: 16_500,
                namespace: "public".into(),
                name: "mood".into()
            })
        );
    }

    /// A tuple of four columns: NULL, unchanged TOAST, text "42", binary 0x00FF.
    const TUPLE_NUTB: &[&[u8]] = &[
        &[0, 4],
        b"n",
        b"u",
        b"t",
        &[0, 0, 0, 2],
        b"42",
        b"b",
        &[0, 0, 0, 2],
        &[0x00, 0xFF],
    ];

    fn tuple_nutb() -> Tuple {
        Tuple(vec![
            Value::Null,
            Value::Unchanged,
            text("42"),
            Value::Binary(Bytes::from_static(&[0x00, 0xFF])),
        ])
    }

    /// A one-column tuple holding the text `k`.
    const TUPLE_KEY: &[&[u8]] = &[&[0, 1], b"t", &[0, 0, 0, 1], b"k"];

    fn with<'a>(head: &[&'a [u8]], tuples: &[&[&'a [u8]]]) -> Vec<&'a [u8]> {
        let mut v = head.to_vec();
        for t in tuples {
            v.extend_from_slice(t);
        }
        v
    }

    #[test]
    fn insert_with_every_value_kind() {
        let oid = 16_384u32.to_be_bytes();
        let m = ok(&with(&[b"I", &oid, b"N"], &[TUPLE_NUTB]));
        assert_eq!(
            m,
            Message::Insert(Insert {
                relation_oid: 16_384,
                new: tuple_nutb()
            })
        );
    }

    #[test]
    fn insert_values_are_slices_of_the_input() {
        let buf = wire(&with(&[b"I", &[0, 0, 0, 1], b"N"], &[TUPLE_NUTB]));
        let Ok(Message::Insert(ins)) = decode(buf.clone()) else {
            panic!("not an insert")
        };
        let Value::Text(v) = &ins.new.0[2] else {
            panic!("not text")
        };
        // tag, oid, 'N', count, 'n', 'u', 't', length: the value starts at byte 15.
        assert_eq!(v.as_ptr(), buf[15..].as_ptr());
    }

    #[test]
    fn update_without_old_tuple() {
        let oid = 7u32.to_be_bytes();
        let m = ok(&with(&[b"U", &oid, b"N"], &[TUPLE_NUTB]));
        assert_eq!(
            m,
            Message::Update(Update {
                relation_oid: 7,
                old: None,
                new: tuple_nutb()
            })
        );
    }

    #[test]
    fn update_with_key_and_with_full_old_tuple() {
        let oid = 7u32.to_be_bytes();
        for (marker, kind) in [(b"K", OldTupleKind::Key), (b"O", OldTupleKind::Full)] {
            let m = ok(&with(
                &[b"U", &oid, marker],
                &[TUPLE_KEY, &[b"N"], TUPLE_NUTB],
            ));
            assert_eq!(
                m,
                Message::Update(Update {
                    relation_oid: 7,
                    old: Some(OldTuple {
                        kind,
                        tuple: Tuple(vec![text("k")])
                    }),
                    new: tuple_nutb()
                })
            );
        }
    }

    #[test]
    fn delete_with_key_and_with_full_old_tuple() {
        let oid = 9u32.to_be_bytes();
        let m = ok(&with(&[b"D", &oid, b"K"], &[TUPLE_KEY]));
        assert_eq!(
            m,
            Message::Delete(Delete {
                relation_oid: 9,
                old: OldTuple {
                    kind: OldTupleKind::Key,
                    tuple: Tuple(vec![text("k")])
                }
            })
        );
        let m = ok(&with(&[b"D", &oid, b"O"], &[TUPLE_NUTB]));
        assert_eq!(
            m,
            Message::Delete(Delete {
                relation_oid: 9,
                old: OldTuple {
                    kind: OldTupleKind::Full,
                    tuple: tuple_nutb()
                }
            })
        );
    }

    #[test]
    fn truncate_with_each_option() {
        for (bits, cascade, restart_identity) in [
            (0u8, false, false),
            (1, true, false),
            (2, false, true),
            (3, true, true),
        ] {
            let m = ok(&[
                b"T",
                &2i32.to_be_bytes(),
                &[bits],
                &16_384u32.to_be_bytes(),
                &16_390u32.to_be_bytes(),
            ]);
            assert_eq!(
                m,
                Message::Truncate(Truncate {
                    cascade,
                    restart_identity,
                    relation_oids: vec![16_384, 16_390]
                })
            );
        }
    }

    #[test]
    fn logical_message_transactional_and_not() {
        for (flags, transactional) in [(1u8, true), (0, false)] {
            let m = ok(&[
                b"M",
                &[flags],
                &LSN_A,
                b"audit\0",
                &5i32.to_be_bytes(),
                b"hello",
            ]);
            assert_eq!(
                m,
                Message::Message(LogicalMessage {
                    transactional,
                    lsn: Lsn(0x1_6B37_4D48),
                    prefix: "audit".into(),
                    content: Bytes::from_static(b"hello")
                })
            );
        }
    }

    // ----- errors -----

    #[test]
    fn truncation_names_message_column_and_field() {
        let e = err(&[
            b"R",
            &1u32.to_be_bytes(),
            b"public\0",
            b"t\0",
            b"d",
            &3i16.to_be_bytes(),
            &[1],
            b"a\0",
            &[0; 8],
            &[0],
            b"b\0",
            &[0; 8],
            &[0],
            b"unterminated",
        ]);
        assert_eq!(
            e.to_string(),
            "pgoutput Relation message truncated while reading column 3 name: \
             string has no NUL terminator"
        );
        let e = err(&[
            b"I",
            &1u32.to_be_bytes(),
            b"N",
            &[0, 2],
            b"n",
            b"t",
            &[0, 0, 0, 9],
            b"abc",
        ]);
        assert_eq!(
            e.to_string(),
            "pgoutput Insert message truncated while reading new tuple column 2 value: \
             need 9 byte(s), only 3 left"
        );
        let e = err(&[b"B", &LSN_A]);
        assert!(
            matches!(
                e,
                DecodeError::Truncated {
                    need: 8,
                    have: 0,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "pgoutput Begin message truncated while reading commit timestamp: \
             need 8 byte(s), only 0 left"
        );
        let e = err(&[]);
        assert!(e.to_string().contains("message tag"), "{e}");
    }

    #[test]
    fn unknown_and_unsupported_tags() {
        assert_eq!(err(&[b"Z"]), DecodeError::UnknownTag(b'Z'));
        for tag in *b"SEcAbPKrp" {
            assert_eq!(err(&[&[tag]]), DecodeError::UnsupportedInProtocolV1(tag));
        }
        let msg = err(&[b"S", &[0; 5]]).to_string();
        assert!(
            msg.contains("Stream Start") && msg.contains("proto_version 1"),
            "{msg}"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let e = err(&[b"B", &LSN_A, &TS.to_be_bytes(), &1u32.to_be_bytes(), b"xx"]);
        assert_eq!(
            e,
            DecodeError::TrailingBytes {
                message: "pgoutput Begin message",
                extra: 2
            }
        );
    }

    #[test]
    fn bad_markers_kinds_and_identities() {
        let oid = 5u32.to_be_bytes();
        let e = err(&[b"I", &oid, b"K", &[0, 0]]);
        assert!(
            matches!(e, DecodeError::UnknownTupleKind { kind: b'K', .. }),
            "{e:?}"
        );
        let e = err(&[b"U", &oid, b"X"]);
        assert!(e.to_string().contains("'K', 'O' or 'N'"), "{e}");
        let e = err(&with(&[b"U", &oid, b"K"], &[TUPLE_KEY, &[b"K"]]));
        assert!(e.to_string().contains("new tuple marker"), "{e}");
        let e = err(&[b"D", &oid, b"N", &[0, 0]]);
        assert!(
            matches!(e, DecodeError::UnknownTupleKind { kind: b'N', .. }),
            "{e:?}"
        );
        let e = err(&[b"I", &oid, b"N", &[0, 1], b"x"]);
        assert_eq!(
            e.to_string(),
            "pgoutput Insert message has unknown value kind 'x' (0x78) at new tuple column 1 kind; \
             expected 'n', 'u', 't' or 'b'"
        );
        let e = err(&[b"R", &oid, b"s\0", b"t\0", b"q", &[0, 0]]);
        assert_eq!(
            e,
            DecodeError::UnknownReplicaIdentity {
                relation_oid: 5,
                byte: b'q'
            }
        );
    }

    #[test]
    fn negative_lengths_and_invalid_utf8() {
        let oid = 5u32.to_be_bytes();
        let e = err(&[b"I", &oid, b"N", &(-1i16).to_be_bytes()]);
        assert!(
            matches!(e, DecodeError::NegativeLength { value: -1, .. }),
            "{e:?}"
        );
        let e = err(&[b"I", &oid, b"N", &[0, 1], b"t", &(-2i32).to_be_bytes()]);
        assert_eq!(
            e.to_string(),
            "pgoutput Insert message has a negative new tuple column 1 length: -2"
        );
        let e = err(&[b"T", &i32::MIN.to_be_bytes(), &[0]]);
        assert!(matches!(e, DecodeError::NegativeLength { .. }), "{e:?}");
        let e = err(&[b"Y", &oid, b"\xFF\xFE\0", b"t\0"]);
        assert_eq!(
            e.to_string(),
            "pgoutput Type message has invalid UTF-8 in namespace"
        );
    }

    #[test]
    fn huge_counts_do_not_allocate_up_front() {
        // A Truncate claiming i32::MAX relations with none present fails before allocating.
        let e = err(&[b"T", &i32::MAX.to_be_bytes(), &[0]]);
        assert!(matches!(e, DecodeError::Truncated { have: 0, .. }), "{e:?}");
        let e = err(&[b"I", &[0; 4], b"N", &i16::MAX.to_be_bytes()]);
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e:?}");
    }

    // ----- property tests -----

    fn arb_lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    /// Any string without NUL (which the wire format cannot carry), including non-ASCII.
    fn arb_name() -> impl Strategy<Value = String> {
        "[^\\x00]{0,12}"
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::Unchanged),
            arb_bytes().prop_map(Value::Text),
            arb_bytes().prop_map(Value::Binary),
        ]
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        prop::collection::vec(arb_value(), 0..8).prop_map(Tuple)
    }

    fn arb_old_tuple() -> impl Strategy<Value = OldTuple> {
        let kind = prop_oneof![Just(OldTupleKind::Key), Just(OldTupleKind::Full)];
        (kind, arb_tuple()).prop_map(|(kind, tuple)| OldTuple { kind, tuple })
    }

    fn arb_replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
        prop_oneof![
            Just(ReplicaIdentity::Default),
            Just(ReplicaIdentity::Nothing),
            Just(ReplicaIdentity::Full),
            Just(ReplicaIdentity::Index),
        ]
    }

    fn arb_column() -> impl Strategy<Value = RelationColumn> {
        (any::<bool>(), arb_name(), any::<u32>(), any::<i32>()).prop_map(
            |(is_key, name, type_oid, type_modifier)| RelationColumn {
                is_key,
                name,
                type_oid,
                type_modifier,
            },
        )
    }

    pub(in crate::core::decode) fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (arb_lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_ts, xid)| {
                Message::Begin(Begin {
                    final_lsn,
                    commit_ts,
                    xid,
                })
            }),
            (any::<u8>(), arb_lsn(), arb_lsn(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_ts)| Message::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                })
            ),
            (arb_lsn(), arb_name())
                .prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
            (
                any::<u32>(),
                arb_name(),
                arb_name(),
                arb_replica_identity(),
                prop::collection::vec(arb_column(), 0..8),
            )
                .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                    Message::Relation(Relation {
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    })
                }),
            (any::<u32>(), arb_name(), arb_name()).prop_map(|(oid, namespace, name)| {
                Message::Type(TypeInfo {
                    oid,
                    namespace,
                    name,
                })
            }),
            (any::<u32>(), arb_tuple())
                .prop_map(|(relation_oid, new)| Message::Insert(Insert { relation_oid, new })),
            (any::<u32>(), prop::option::of(arb_old_tuple()), arb_tuple()).prop_map(
                |(relation_oid, old, new)| Message::Update(Update {
                    relation_oid,
                    old,
                    new,
                })
            ),
            (any::<u32>(), arb_old_tuple())
                .prop_map(|(relation_oid, old)| Message::Delete(Delete { relation_oid, old })),
            (
                any::<bool>(),
                any::<bool>(),
                prop::collection::vec(any::<u32>(), 0..8)
            )
                .prop_map(|(cascade, restart_identity, relation_oids)| {
                    Message::Truncate(Truncate {
                        cascade,
                        restart_identity,
                        relation_oids,
                    })
                }),
            (any::<bool>(), arb_lsn(), arb_name(), arb_bytes()).prop_map(
                |(transactional, lsn, prefix, content)| Message::Message(LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            ),
        ]
    }

    /// Arbitrary bytes, half the time starting with a known tag so decoding gets past the first
    /// byte.
    fn arb_input() -> impl Strategy<Value = Vec<u8>> {
        let tag = prop::sample::select(b"BCORYIUDTMSEcAbPKrpwkZ".to_vec());
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (tag, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(t, mut rest)| {
                rest.insert(0, t);
                rest
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encode_then_decode_is_identity(msg in arb_message()) {
            prop_assert_eq!(decode(encode(&msg)), Ok(msg));
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in arb_input()) {
            let _ = decode(Bytes::from(input));
        }

        #[test]
        fn every_strict_prefix_of_a_message_is_an_error(
            msg in arb_message(),
            cut in any::<prop::sample::Index>(),
        ) {
            let full = encode(&msg);
            let prefix = full.slice(..cut.index(full.len()));
            prop_assert!(decode(prefix).is_err());
        }

        #[test]
        fn flipped_bytes_never_panic_and_what_decodes_round_trips(
            msg in arb_message(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 1..4),
        ) {
            let mut raw = encode(&msg).to_vec();
            for (at, mask) in flips {
                let i = at.index(raw.len());
                if let Some(b) = raw.get_mut(i) {
                    *b ^= mask;
                }
            }
            if let Ok(decoded) = decode(Bytes::from(raw)) {
                prop_assert_eq!(decode(encode(&decoded)), Ok(decoded));
            }
        }
    }
}
