//! Table reloads: exporting a table's full contents, consistent with an exact LSN.
//!
//! - [`export`]: the cut (temporary slot + exported snapshot) and the parallel export engine.
//! - [`request`]: `cdc-egress reload`, which places a reload marker in the WAL through a comment.
//! - [`notice`]: the reload manifest / JetStream notice.
//!
//! The daemon's side (reacting to markers, holding the table's stream until the cut, registering
//! the parts) lives in `daemon::reloads`.

pub mod export;
pub mod notice;
pub mod request;
