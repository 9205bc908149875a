//! cdc-egress: PostgreSQL logical replication → gzipped CSV batches on object storage → registry →
//! NATS JetStream notices → ordered LSN acknowledgement.
//!
//! The modules follow the pipeline (see ARCHITECTURE.md):
//! `source` (replication connection) → `decode` (pgoutput) → `batch` (per-table micro-batches, pure)
//! → `encode` (CSV, schema.yml) → `write` (spool, object store) → `register` (the commit record) →
//! `notify` (JetStream) → `ack` (which LSN may be confirmed). `daemon` is the thin IO driver that
//! wires them; `config`, `observe` and `status` serve the operator.

pub mod backoff;
pub mod config;
pub mod consume;
pub mod core;
pub mod daemon;
pub mod error;
pub mod failpoint;
pub mod lsn;
pub mod observe;
pub mod pg;
pub mod reload;
pub mod secret;
pub mod sink;
pub mod status;
pub mod table;
