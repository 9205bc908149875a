//! The source database: connection settings, the replication wire protocol, and slot/catalog checks.

pub mod conninfo;
pub mod slot;
mod tls;
pub mod wire;
