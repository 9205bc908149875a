//! Encodings of what leaves the pipeline: CSV rows in the one dialect of README.md ("CSV dialect"), the
//! `schema.yml` that describes each batch (§6), and the `ddl.yml` of each schema change. Pure
//! functions over byte buffers; no IO.

pub mod csv;
pub mod csv_read;
pub mod ddl_yml;
pub mod schema_yml;
