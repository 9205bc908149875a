//! Object names (README.md "What it writes"). Every name is derived from the table and the positions the object
//! covers, never from the clock or a counter, so a replay after a crash produces the same names.
//!
//! ```text
//! <root>/<schema>.<table>/streaming/<YYYY-MM-DD>/<first>-<last>/data.csv.gz
//!                                                              /schema.yml
//!                                                              /manifest.json   (written last)
//! <root>/<schema>.<table>/reload/<reload_id>/part-00001.csv.gz … schema.yml manifest.json
//! ```
//! `<first>` and `<last>` are `LLLLLLLLLLLLLLLL.SSSSSSSS`: the commit LSN as 16 hex digits and the
//! `_seq` as 8, so names sort in replay order. The date is the UTC commit date of the first
//! transaction. Path segments are percent-encoded by `object_store` where needed.
//!
//! A batch directory is complete exactly when its `manifest.json` exists; the manifest is written only
//! after the registry row commits, so a listing reader never sees a partial or orphaned batch as
//! complete.

use object_store::path::{Path, PathPart};

use crate::core::batch::Position;
use crate::table::TableName;

pub const DATA_FILE: &str = "data.csv.gz";
pub const SCHEMA_FILE: &str = "schema.yml";
pub const MANIFEST_FILE: &str = "manifest.json";

fn position(p: Position) -> String {
    format!("{}.{:08X}", p.commit_lsn.to_hex16(), p.seq)
}

/// The batch id: the batch directory relative to the root, e.g.
/// `public.orders/streaming/2026-11-21/00000001A2B3C4D0.00000001-00000001A2B3F000.00000003`.
/// Used as the registry key and the JetStream `Nats-Msg-Id`.
pub fn streaming_batch_id(
    table: &TableName,
    date: &str,
    first: Position,
    last: Position,
) -> String {
    format!(
        "{}/streaming/{date}/{}-{}",
        table.dotted(),
        position(first),
        position(last)
    )
}

/// The table's directory: `<root>/<schema>.<table>`.
pub fn table_dir(root: &Path, table: &TableName) -> Path {
    root.clone().join(PathPart::from(table.dotted().as_str()))
}

/// The directory of a batch id below `root`.
pub fn batch_dir(root: &Path, table: &TableName, batch_id: &str) -> Path {
    let rel = batch_id
        .strip_prefix(&format!("{}/", table.dotted()))
        .unwrap_or(batch_id);
    rel.split('/').fold(table_dir(root, table), |p, part| {
        p.clone().join(PathPart::from(part))
    })
}

/// The object path of a path string as the registry stores it (`Path::to_string`, whose segments
/// are already percent-encoded). `Path::from` would encode them a second time (`%2F` → `%252F`) and
/// name another object.
pub fn stored_path(s: &str) -> Path {
    Path::parse(s).unwrap_or_else(|_| Path::from(s))
}

/// `<root>/<schema>.<table>/reload/<reload_id>`.
pub fn reload_dir(root: &Path, table: &TableName, reload_id: i64) -> Path {
    table_dir(root, table)
        .clone()
        .join("reload")
        .clone()
        .join(PathPart::from(reload_id.to_string().as_str()))
}

pub fn part_file(n: u32) -> String {
    format!("part-{n:05}.csv.gz")
}

/// UTC date (`YYYY-MM-DD`) of a PostgreSQL-epoch microsecond timestamp.
pub fn commit_date(pg_micros: i64) -> String {
    crate::core::decode::pg_micros_to_utc(pg_micros)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "0000-00-00".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    #[test]
    fn stored_paths_name_the_same_object() {
        for (schema, name) in [
            ("public", "orders"),
            ("a", "Weird Name/ü \"q\""),
            ("a.x", "y%z"),
            ("sp ace", "#hash?"),
        ] {
            let t = TableName::new(schema, name);
            let id = streaming_batch_id(
                &t,
                "2026-11-21",
                Position::new(Lsn(1), 1),
                Position::new(Lsn(2), 1),
            );
            let dir = batch_dir(&Path::from("root"), &t, &id);
            let manifest = dir.clone().join(MANIFEST_FILE);
            assert_eq!(stored_path(manifest.as_ref()), manifest, "{t:?}");
            assert_eq!(stored_path(dir.as_ref()), dir, "{t:?}");
        }
    }

    #[test]
    fn names_are_deterministic_and_sort_in_replay_order() {
        let t = TableName::new("public", "orders");
        let a = streaming_batch_id(
            &t,
            "2026-11-21",
            Position::new(Lsn(0x1A), 1),
            Position::new(Lsn(0x2B), 3),
        );
        assert_eq!(
            a,
            "public.orders/streaming/2026-11-21/000000000000001A.00000001-000000000000002B.00000003"
        );
        let b = streaming_batch_id(
            &t,
            "2026-11-21",
            Position::new(Lsn(0x2B), 4),
            Position::new(Lsn(0x100), 1),
        );
        assert!(a < b);
        let root = Path::from("root/prefix");
        assert_eq!(
            batch_dir(&root, &t, &a).clone().join(DATA_FILE).to_string(),
            format!("root/prefix/{a}/data.csv.gz")
        );
        assert_eq!(commit_date(0), "2000-01-01");
        let odd = TableName::new("we ird", "a/b");
        assert_eq!(
            table_dir(&root, &odd).parts().count(),
            3,
            "a slash in a name stays one segment"
        );
    }
}
