//! Crash injection for tests.
//!
//! With `CDC_EGRESS_TEST_FAILPOINT=<name>` in the environment, the process aborts (no destructors, no
//! flush: as close to SIGKILL as a process can do to itself) the first time it reaches the point of
//! that name. The crash-window tests use it to stop the daemon between two effects of a delivery:
//!
//! | name             | where                                                         |
//! |------------------|---------------------------------------------------------------|
//! | `after_upload`   | data and schema.yml uploaded, registry row not yet committed  |
//! | `after_register` | registry row committed, no manifest yet                       |
//! | `after_ddl_register` | a DDL record's rows committed, no manifest yet            |
//! | `after_manifest` | manifest written, notice not yet published                    |
//! | `after_publish`  | notice acknowledged by JetStream, sequence not yet recorded   |
//! | `after_schema_entry` | schema-bucket entry written (or found current), sequence not yet recorded |
//! | `before_status`  | batch persisted, the new confirmed LSN not yet sent           |
//! | `apply_mid_file` | `cdc-egress apply`: half a file's rows applied, not committed |
//!
//! Without the variable, [`hit`] is one relaxed load of an initialized `OnceLock`.

use std::sync::OnceLock;

static POINT: OnceLock<Option<String>> = OnceLock::new();

pub fn hit(name: &str) {
    let armed = POINT.get_or_init(|| std::env::var("CDC_EGRESS_TEST_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("cdc-egress: failpoint {name} reached: aborting");
        std::process::abort();
    }
}
