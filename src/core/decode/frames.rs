//! The CopyData payloads exchanged on a streaming replication connection after
//! `START_REPLICATION ... LOGICAL`, as described in PostgreSQL's "Streaming Replication Protocol":
//!
//! - server → client `w` XLogData: Int64 WAL start, Int64 WAL end, Int64 send time, then the WAL
//!   data, which for logical replication is exactly one pgoutput message (see [`super::pgoutput`]);
//! - server → client `k` primary keepalive: Int64 WAL end, Int64 send time, Byte1 reply-requested;
//! - client → server `r` standby status update, built by [`standby_status_update`].
//!
//! Invariants of [`parse_frame`]: it never panics on any input, checks every length before reading,
//! returns the XLogData payload as a zero-copy [`Bytes`] slice of the frame, and rejects keepalives
//! with trailing bytes. Times on the wire are microseconds since 2000-01-01 00:00:00 UTC (the
//! PostgreSQL epoch); [`pg_micros_to_utc`] and [`utc_to_pg_micros`] convert them.

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};

use super::pgoutput::{Cursor, DecodeError};
use crate::lsn::Lsn;

/// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
const PG_EPOCH_UNIX_MICROS: i64 = PG_EPOCH_UNIX_SECS * 1_000_000;

/// Length of a standby status update: tag, three LSNs, client time, reply flag.
pub const STANDBY_STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// A server → client CopyData payload on a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationFrame {
    /// `w`: WAL data; `data` is one pgoutput message.
    XLogData {
        /// WAL position of the start of `data`.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at transmission, µs since 2000-01-01 UTC.
        send_time: i64,
        data: Bytes,
    },
    /// `k`: primary keepalive.
    Keepalive {
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at transmission, µs since 2000-01-01 UTC.
        send_time: i64,
        /// The server wants a standby status update soon, or it may time the connection out.
        reply_requested: bool,
    },
}

/// Parses one CopyData payload received on the replication connection.
pub fn parse_frame(buf: Bytes) -> Result<ReplicationFrame, DecodeError> {
    let mut c = Cursor::new(&buf, "replication CopyData frame");
    match c.u8("frame tag")? {
        b'w' => {
            c.message = "XLogData frame";
            let wal_start = c.lsn("WAL start")?;
            let wal_end = c.lsn("WAL end")?;
            let send_time = c.i64("send time")?;
            let data = c.rest_bytes();
            Ok(ReplicationFrame::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            })
        }
        b'k' => {
            c.message = "primary keepalive frame";
            let wal_end = c.lsn("WAL end")?;
            let send_time = c.i64("send time")?;
            let reply_requested = c.u8("reply-requested flag")? != 0;
            c.finish()?;
            Ok(ReplicationFrame::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        tag => Err(DecodeError::UnknownFrameTag(tag)),
    }
}

/// Encodes a frame as the server would send it; the inverse of [`parse_frame`]. For tests and
/// benchmarks.
pub fn encode_frame(frame: &ReplicationFrame) -> Bytes {
    match frame {
        ReplicationFrame::XLogData {
            wal_start,
            wal_end,
            send_time,
            data,
        } => {
            let mut b = BytesMut::with_capacity(25 + data.len());
            b.put_u8(b'w');
            b.put_u64(wal_start.0);
            b.put_u64(wal_end.0);
            b.put_i64(*send_time);
            b.put_slice(data);
            b.freeze()
        }
        ReplicationFrame::Keepalive {
            wal_end,
            send_time,
            reply_requested,
        } => {
            let mut b = BytesMut::with_capacity(18);
            b.put_u8(b'k');
            b.put_u64(wal_end.0);
            b.put_i64(*send_time);
            b.put_u8(u8::from(*reply_requested));
            b.freeze()
        }
    }
}

/// `r` Standby status update: write, flush, apply LSNs, client time (µs since 2000-01-01),
/// reply-requested byte.
///
/// The LSNs are "last WAL byte + 1" positions; the server may recycle WAL and advance the slot up
/// to `flush`. The result is always [`STANDBY_STATUS_UPDATE_LEN`] (34) bytes.
pub fn standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time_pg_micros: i64,
    reply: bool,
) -> Bytes {
    let mut b = BytesMut::with_capacity(STANDBY_STATUS_UPDATE_LEN);
    b.put_u8(b'r');
    b.put_u64(write.0);
    b.put_u64(flush.0);
    b.put_u64(apply.0);
    b.put_i64(client_time_pg_micros);
    b.put_u8(u8::from(reply));
    b.freeze()
}

/// Microseconds since 2000-01-01 UTC (PostgreSQL epoch) <-> chrono.
///
/// `None` when the instant is outside chrono's range, which includes PostgreSQL's `infinity` and
/// `-infinity` (`i64::MAX`, `i64::MIN`).
pub fn pg_micros_to_utc(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_UNIX_MICROS)?)
}

/// The inverse of [`pg_micros_to_utc`]: microseconds since 2000-01-01 UTC.
pub fn utc_to_pg_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros().saturating_sub(PG_EPOCH_UNIX_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::decode::pgoutput::{self, tests::arb_message};
    use proptest::prelude::*;

    fn wire(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    #[test]
    fn xlogdata_fixture_carries_a_zero_copy_payload() {
        let payload = pgoutput::encode(&pgoutput::Message::Begin(pgoutput::Begin {
            final_lsn: Lsn(0x1_0000_0100),
            commit_ts: 1,
            xid: 42,
        }));
        let buf = wire(&[
            b"w",
            &0x1_0000_00F0u64.to_be_bytes(),
            &0x1_0000_0200u64.to_be_bytes(),
            &7i64.to_be_bytes(),
            &payload,
        ]);
        let frame = parse_frame(buf.clone()).unwrap();
        let ReplicationFrame::XLogData {
            wal_start,
            wal_end,
            send_time,
            data,
        } = &frame
        else {
            panic!("not XLogData: {frame:?}")
        };
        assert_eq!(
            (*wal_start, *wal_end, *send_time),
            (Lsn(0x1_0000_00F0), Lsn(0x1_0000_0200), 7)
        );
        assert_eq!(data, &payload);
        assert_eq!(data.as_ptr(), buf[25..].as_ptr());
        assert_eq!(encode_frame(&frame), buf);
    }

    #[test]
    fn keepalive_fixture() {
        let buf = wire(&[
            b"k",
            &0x2_0000_0000u64.to_be_bytes(),
            &(-5i64).to_be_bytes(),
            &[1],
        ]);
        let frame = parse_frame(buf.clone()).unwrap();
        assert_eq!(
            frame,
            ReplicationFrame::Keepalive {
                wal_end: Lsn(0x2_0000_0000),
                send_time: -5,
                reply_requested: true
            }
        );
        assert_eq!(encode_frame(&frame), buf);
    }

    #[test]
    fn frame_errors() {
        assert_eq!(
            parse_frame(Bytes::from_static(b"r")),
            Err(DecodeError::UnknownFrameTag(b'r'))
        );
        let e = parse_frame(wire(&[b"k", &[0; 16], &[0, 0]])).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TrailingBytes {
                message: "primary keepalive frame",
                extra: 1
            }
        );
        let e = parse_frame(wire(&[b"w", &[0; 20]])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "XLogData frame truncated while reading send time: need 8 byte(s), only 4 left"
        );
        assert!(parse_frame(Bytes::new()).is_err());
    }

    #[test]
    fn standby_status_update_layout() {
        let b = standby_status_update(Lsn(1), Lsn(0x0102_0304_0506_0708), Lsn(3), -2, true);
        assert_eq!(b.len(), 34);
        assert_eq!(b.len(), STANDBY_STATUS_UPDATE_LEN);
        let expected = wire(&[
            b"r",
            &1u64.to_be_bytes(),
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &3u64.to_be_bytes(),
            &(-2i64).to_be_bytes(),
            &[1],
        ]);
        assert_eq!(b, expected);
        let b = standby_status_update(Lsn(0), Lsn(0), Lsn(0), 0, false);
        assert_eq!(b.last(), Some(&0));
    }

    #[test]
    fn pg_epoch_conversions() {
        let epoch = pg_micros_to_utc(0).unwrap();
        assert_eq!(epoch.to_rfc3339(), "2000-01-01T00:00:00+00:00");
        assert_eq!(utc_to_pg_micros(epoch), 0);
        let t = pg_micros_to_utc(757_479_845_678_901).unwrap();
        assert_eq!(t.to_rfc3339(), "2024-01-02T03:04:05.678901+00:00");
        assert_eq!(utc_to_pg_micros(DateTime::UNIX_EPOCH), -946_684_800_000_000);
        assert_eq!(pg_micros_to_utc(i64::MAX), None);
        assert_eq!(pg_micros_to_utc(i64::MIN), None);
    }

    fn arb_frame() -> impl Strategy<Value = ReplicationFrame> {
        let lsn = || any::<u64>().prop_map(Lsn);
        prop_oneof![
            (lsn(), lsn(), any::<i64>(), arb_message()).prop_map(
                |(wal_start, wal_end, send_time, msg)| ReplicationFrame::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data: pgoutput::encode(&msg),
                }
            ),
            (lsn(), any::<i64>(), any::<bool>()).prop_map(
                |(wal_end, send_time, reply_requested)| {
                    ReplicationFrame::Keepalive {
                        wal_end,
                        send_time,
                        reply_requested,
                    }
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn frames_round_trip(frame in arb_frame()) {
            prop_assert_eq!(parse_frame(encode_frame(&frame)), Ok(frame));
        }

        #[test]
        fn arbitrary_frames_never_panic(
            tag in prop::sample::select(b"wkrx".to_vec()),
            rest in prop::collection::vec(any::<u8>(), 0..48),
        ) {
            let mut raw = vec![tag];
            raw.extend_from_slice(&rest);
            if let Ok(ReplicationFrame::XLogData { data, .. }) = parse_frame(Bytes::from(raw)) {
                let _ = pgoutput::decode(data);
            }
        }

        #[test]
        fn truncated_or_flipped_frames_never_panic(
            frame in arb_frame(),
            cut in any::<prop::sample::Index>(),
            flip in (any::<prop::sample::Index>(), any::<u8>()),
        ) {
            let full = encode_frame(&frame);
            let cut = cut.index(full.len());
            if let ReplicationFrame::Keepalive { .. } = frame {
                prop_assert!(parse_frame(full.slice(..cut)).is_err());
            }
            let mut raw = full.to_vec();
            let i = flip.0.index(raw.len());
            if let Some(b) = raw.get_mut(i) {
                *b ^= flip.1;
            }
            if let Ok(ReplicationFrame::XLogData { data, .. }) = parse_frame(Bytes::from(raw)) {
                let _ = pgoutput::decode(data);
            }
        }

        #[test]
        fn pg_micros_round_trip(micros in -(1i64 << 60)..(1i64 << 60)) {
            let t = pg_micros_to_utc(micros).unwrap();
            prop_assert_eq!(utc_to_pg_micros(t), micros);
        }
    }
}
