//! Encodings of what leaves the pipeline: CSV rows in the one dialect of README.md ("CSV dialect"), and the
//! `schema.yml` that describes each batch (§6). Pure functions over byte buffers; no IO.

pub mod csv;
pub mod schema_yml;
