//! Where sealed batches go, in the order of their effects: the object [`store`] (files under the
//! [`layout`]), the [`registry`] (the commit record), and JetStream ([`notify`]).
//!
//! [`upload`] states the order of effects for one batch and why a crash between any two of them
//! loses nothing; [`spool`] is the local gzip staging a batch is sealed into before upload;
//! [`record`] is the registry row that describes one file; [`owner`] is who a registry and an output
//! prefix belong to (one slot of one database).
//!
//! Delivery sees the registry and the notifier through two traits, [`registry::FileLog`] and
//! [`notify::Publish`], each with a `# Contract` and an in-memory test double
//! ([`registry::memory`], [`notify::memory`], failures injected through [`fault`]).

pub mod fault;
pub mod layout;
pub mod notify;
pub mod owner;
pub mod record;
pub mod registry;
pub mod spool;
pub mod store;
pub mod upload;
