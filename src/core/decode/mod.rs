//! Decoding of what PostgreSQL sends on a logical replication connection, in two layers:
//!
//! - [`frames`]: the CopyData payloads of the streaming replication protocol (`w` XLogData, `k`
//!   keepalive) and the `r` standby status update we send back;
//! - [`pgoutput`]: the pgoutput plugin's protocol version 1 messages carried inside XLogData.
//!
//! Both decoders share the same invariants: they never panic on any input, every length and count
//! is checked against the remaining bytes before it is used, values are zero-copy [`bytes::Bytes`]
//! slices of the input, and trailing bytes after a complete message are an error. Every failure is
//! a [`DecodeError`] that names the message and field it was reading. Each layer also has an
//! encoder (the exact inverse) for tests and benchmarks.

pub mod frames;
pub mod pgoutput;

pub use frames::{
    encode_frame, parse_frame, pg_micros_to_utc, standby_status_update, utc_to_pg_micros,
    ReplicationFrame, STANDBY_STATUS_UPDATE_LEN,
};
pub use pgoutput::{
    decode, encode, Begin, Commit, DecodeError, Delete, Insert, Location, LogicalMessage, Message,
    OldTuple, OldTupleKind, Origin, Relation, RelationColumn, ReplicaIdentity, Truncate, Tuple,
    TypeInfo, Update, Value,
};
