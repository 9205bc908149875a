//! cdc-egress: PostgreSQL logical replication → gzipped CSV batches on object storage → registry →
//! NATS JetStream notices → ordered LSN acknowledgement. See ARCHITECTURE.md for the pipeline.

pub mod error;
pub mod lsn;
