//! The sans-IO core: pure logic fed bytes, messages and time, emitting records and commands.
//!
//! Nothing here opens a socket or reads a clock; the drivers in [`crate::daemon`] and
//! [`crate::reload`] do the IO. That is what lets the property tests in `batch/tests.rs`,
//! `ack/status.rs` and `reload/tests.rs` drive every interleaving and crash window deterministically.
//!
//! - [`decode`]: pgoutput bytes → typed messages (never panics on bad bytes).
//! - [`batch`]: messages → per-table micro-batches sealed on transaction boundaries, and the
//!   ack tracker that says which LSN may be confirmed.
//! - [`ack`]: the confirmed-LSN bookkeeping and the status-update policy.
//! - [`ddl`]: schema and publication changes captured in the stream, and what each one asks for.
//! - [`encode`]: rows → CSV and `schema.yml` bytes.
//! - [`reload`]: the reload coordinator's decisions (markers, attempts, retries, holds released
//!   with a recorded cut, END markers) as commands for `daemon::reloads`.

pub mod ack;
pub mod batch;
pub mod ddl;
pub mod decode;
pub mod encode;
pub mod reload;
pub mod replay;
