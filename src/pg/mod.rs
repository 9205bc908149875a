//! The PostgreSQL side: connection settings, TLS, the replication-protocol client, and the slot and
//! catalog checks the daemon makes before streaming.
//!
//! [`conninfo::ConnInfo`] is the single place that turns the user's connection string into
//! connections; [`wire::ReplicationConnection`] speaks the replication protocol that tokio-postgres
//! cannot; [`slot`] checks preconditions (wal_level, publication, REPLICATION) and describes relations.
//! Everything here reports [`crate::error::Error`]s already classified as definite or transient, with
//! the SQLSTATE attached when the server reported one.

pub mod conninfo;
pub mod slot;
mod tls;
pub use tls::install_default_provider;
pub mod wire;
