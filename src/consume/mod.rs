//! Consumers of the files: the reference loader (`cdc-egress apply`) and the proof that the files
//! equal the source (`cdc-egress verify`).
//!
//! Both follow the consumer rule exactly as README "Replaying" and "Schema changes" state it, planned
//! by the pure [`crate::core::replay`]: the end-to-end tests replay through this module too, so the
//! documented rule, the loader and the tests are one piece of code.
//!
//! - [`listing`]: the registry of one source and the objects it names, each checked against its
//!   registry row (checksum, row count) before use;
//! - [`target`]: the target PostgreSQL: progress kept in the target, table shapes, rows;
//! - [`apply`]: the driver, one target transaction per step, resumable after a crash;
//! - [`verify`]: rebuild at a consistent position of the source and compare row by row.

pub mod apply;
pub mod listing;
pub mod target;
pub mod verify;
