//! Object names (README.md "What it writes"). Every name is derived from the source, the table and
//! the positions the object covers, never from the clock or a counter, so a replay after a crash
//! produces the same names.
//!
//! ```text
//! <root>/<source>/<schema>/<table>/streaming/<YYYY-MM-DD>/<first>-<last>/data.csv.gz
//!                                                                       /schema.yml
//!                                                                       /manifest.json   (written last)
//! <root>/<source>/<schema>/<table>/reload/<reload_id>/part-00001.csv.gz … schema.yml manifest.json
//! <root>/<source>/<schema>/<table>/ddl/<position>/ddl.yml manifest.json
//! <root>/<source>/cdc-egress-owner.json
//! ```
//! `<first>`, `<last>` and `<position>` are `LLLLLLLLLLLLLLLL.SSSSSSSS`: the commit LSN as 16 hex digits and the
//! `_seq` as 8, so names sort in replay order. The date is the UTC commit date of the first
//! transaction.
//!
//! # One table, one directory
//! `<source>` is `source.name`, restricted to `[a-z0-9_-]` so it is a segment as it is. The schema
//! and the table are two segments, each the identifier encoded by [`segment`]: `object_store`'s own
//! path-part encoding (bytes outside printable ASCII and ``/ \ % " # < > [ ] ^ { } | ~ ` * ?`` become
//! `%XX`; a whole `.` or `..` becomes `%2E` / `%2E%2E`). The encoding is injective (`%` itself is
//! encoded) and percent-decoding reverses it (property-tested below), so no two tables share a
//! directory and a consumer maps a path back to its table; because it *is* the store's encoding, the
//! store never re-encodes a segment and the name in a listing is the name written here. The batch id
//! (the registry key; a notice's `Nats-Msg-Id` is `<incarnation>:<batch id>`) is the batch directory
//! relative to the root, so it is unique across every source sharing a registry and a stream.
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
pub const DDL_FILE: &str = "ddl.yml";
/// The object in a source's directory that names its owner ([`crate::sink::owner`]).
pub const OWNER_FILE: &str = "cdc-egress-owner.json";

/// One path segment for a PostgreSQL identifier (see the module header).
pub fn segment(identifier: &str) -> PathPart<'static> {
    PathPart::from(identifier.to_string())
}

/// A source name is used unencoded in object paths and NATS subjects, so it is restricted to
/// characters that need no encoding in either and cannot be `.` or `..`.
pub fn valid_source_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn position(p: Position) -> String {
    format!("{}.{:08X}", p.commit_lsn.to_hex16(), p.seq)
}

/// Where one source's objects live below the output root, and what they are called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    root: Path,
    source: String,
}

impl Namespace {
    /// `source` must satisfy [`valid_source_name`] (the configuration checks it).
    pub fn new(root: &Path, source: &str) -> Namespace {
        debug_assert!(valid_source_name(source), "{source:?}");
        Namespace {
            root: root.clone(),
            source: source.to_string(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// `<root>/<source>`: everything this source writes, and nothing another source writes.
    pub fn dir(&self) -> Path {
        self.root.clone().join(self.source.as_str())
    }

    /// `<root>/<source>/cdc-egress-owner.json`.
    pub fn owner_file(&self) -> Path {
        self.dir().join(OWNER_FILE)
    }

    /// `<root>/<source>/<schema>/<table>`.
    pub fn table_dir(&self, table: &TableName) -> Path {
        self.dir()
            .join(segment(&table.schema))
            .join(segment(&table.name))
    }

    /// The table directory relative to the root: `<source>/<schema>/<table>`, segments encoded.
    pub fn table_key(&self, table: &TableName) -> String {
        format!(
            "{}/{}/{}",
            self.source,
            segment(&table.schema).as_ref(),
            segment(&table.name).as_ref()
        )
    }

    /// The batch id of a streaming batch: its directory relative to the root, e.g.
    /// `main/public/orders/streaming/2026-11-21/00000001A2B3C4D0.00000001-00000001A2B3F000.00000003`.
    pub fn streaming_batch_id(
        &self,
        table: &TableName,
        date: &str,
        first: Position,
        last: Position,
    ) -> String {
        format!(
            "{}/streaming/{date}/{}-{}",
            self.table_key(table),
            position(first),
            position(last)
        )
    }

    /// The batch id of a DDL record: `<source>/<schema>/<table>/ddl/<position>`.
    pub fn ddl_batch_id(&self, table: &TableName, at: Position) -> String {
        format!("{}/ddl/{}", self.table_key(table), position(at))
    }

    /// The id of a reload (its notice's `Nats-Msg-Id`): `<source>/<schema>/<table>/reload/<id>`.
    pub fn reload_batch_id(&self, table: &TableName, reload_id: i64) -> String {
        format!("{}/reload/{reload_id}", self.table_key(table))
    }

    /// `<root>/<source>/<schema>/<table>/reload/<reload_id>`.
    pub fn reload_dir(&self, table: &TableName, reload_id: i64) -> Path {
        self.table_dir(table)
            .join("reload")
            .join(reload_id.to_string().as_str())
    }

    /// The directory of a batch id.
    pub fn batch_dir(&self, batch_id: &str) -> Path {
        let rel = stored_path(batch_id);
        rel.parts()
            .fold(self.root.clone(), |dir, part| dir.join(part))
    }
}

/// The object path of a path string as the registry stores it (`Path::to_string`, whose segments
/// are already encoded). `Path::from` would encode them a second time (`%2F` → `%252F`) and
/// name another object.
pub fn stored_path(s: &str) -> Path {
    Path::parse(s).unwrap_or_else(|_| Path::from(s))
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
    use proptest::prelude::*;

    /// The identifier a [`segment`] encodes (what the README tells consumers: URL-decode the
    /// folder name); `None` for text that no identifier encodes to.
    fn decode_segment(segment: &str) -> Option<String> {
        let decoded = percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()?
            .into_owned();
        (PathPart::from(decoded.as_str()).as_ref() == segment).then_some(decoded)
    }

    fn ns() -> Namespace {
        Namespace::new(&Path::from("root/prefix"), "main")
    }

    #[test]
    fn stored_paths_name_the_same_object() {
        for (schema, name) in [
            ("public", "orders"),
            ("a", "Weird Name/ü \"q\""),
            ("a.x", "y%z"),
            ("sp ace", "#hash?"),
            (".", ".."),
        ] {
            let t = TableName::new(schema, name);
            let id = ns().streaming_batch_id(
                &t,
                "2026-11-21",
                Position::new(Lsn(1), 1),
                Position::new(Lsn(2), 1),
            );
            let dir = ns().batch_dir(&id);
            assert!(dir.prefix_matches(&ns().table_dir(&t)), "{t:?}: {dir}");
            let manifest = dir.clone().join(MANIFEST_FILE);
            assert_eq!(stored_path(manifest.as_ref()), manifest, "{t:?}");
            assert_eq!(stored_path(dir.as_ref()), dir, "{t:?}");
            assert_eq!(dir.as_ref(), format!("root/prefix/{id}"), "{t:?}");
        }
    }

    #[test]
    fn names_are_deterministic_and_sort_in_replay_order() {
        let t = TableName::new("public", "orders");
        let a = ns().streaming_batch_id(
            &t,
            "2026-11-21",
            Position::new(Lsn(0x1A), 1),
            Position::new(Lsn(0x2B), 3),
        );
        assert_eq!(
            a,
            "main/public/orders/streaming/2026-11-21/000000000000001A.00000001-000000000000002B.00000003"
        );
        let b = ns().streaming_batch_id(
            &t,
            "2026-11-21",
            Position::new(Lsn(0x2B), 4),
            Position::new(Lsn(0x100), 1),
        );
        assert!(a < b);
        assert_eq!(
            ns().batch_dir(&a).join(DATA_FILE).to_string(),
            format!("root/prefix/{a}/data.csv.gz")
        );
        assert_eq!(
            ns().reload_dir(&t, 7).to_string(),
            "root/prefix/main/public/orders/reload/7"
        );
        assert_eq!(ns().reload_batch_id(&t, 7), "main/public/orders/reload/7");
        assert_eq!(
            ns().owner_file().to_string(),
            "root/prefix/main/cdc-egress-owner.json"
        );
        assert_eq!(commit_date(0), "2000-01-01");
    }

    #[test]
    fn dotted_names_that_collided_get_different_directories() {
        let a = TableName::new("a.x", "y");
        let b = TableName::new("a", "x.y");
        assert_ne!(ns().table_dir(&a), ns().table_dir(&b));
        assert_eq!(ns().table_key(&a), "main/a.x/y");
        assert_eq!(ns().table_key(&b), "main/a/x.y");
        let other = Namespace::new(&Path::from("root/prefix"), "other");
        assert_ne!(ns().table_dir(&a), other.table_dir(&a));
        assert_eq!(
            ns().table_key(&TableName::new("a", "Weird Name/ü \"q\"")),
            "main/a/Weird Name%2F%C3%BC %22q%22"
        );
    }

    /// Any identifier PostgreSQL accepts: any characters but NUL (63 bytes at most, but longer
    /// names must work too).
    fn identifier() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_][a-z0-9_]{0,20}",
            "[ -~]{1,24}",
            "[./%#?*~ ]{1,6}",
            any::<String>()
                .prop_filter("no NUL, not empty", |s| !s.is_empty() && !s.contains('\0')),
        ]
    }

    proptest! {
        /// The encoding is reversible (so injective), a single segment, never `.`/`..`/empty, and
        /// exactly what the store's own path parsing keeps.
        #[test]
        fn segments_are_reversible_single_and_stable_in_the_store(name in identifier()) {
            let seg = segment(&name);
            let text = seg.as_ref();
            prop_assert_eq!(decode_segment(text), Some(name.clone()));
            prop_assert!(!text.is_empty() && text != "." && text != ".." && !text.contains('/'));
            let path = Path::from("root").join(seg.clone());
            prop_assert_eq!(Path::parse(path.as_ref()).unwrap(), path.clone());
            prop_assert_eq!(path.parts().count(), 2);
        }

        /// Two different tables never share a directory, a batch id or a reload id.
        #[test]
        fn different_tables_get_different_names(
            a in (identifier(), identifier()),
            b in (identifier(), identifier()),
        ) {
            let (ta, tb) = (TableName::new(a.0, a.1), TableName::new(b.0, b.1));
            prop_assume!(ta != tb);
            prop_assert_ne!(ns().table_dir(&ta), ns().table_dir(&tb));
            prop_assert_ne!(ns().table_key(&ta), ns().table_key(&tb));
            prop_assert_ne!(ns().reload_batch_id(&ta, 1), ns().reload_batch_id(&tb, 1));
            let p = Position::new(Lsn(1), 1);
            let id = ns().streaming_batch_id(&ta, "2026-01-01", p, p);
            prop_assert!(ns().batch_dir(&id).prefix_matches(&ns().table_dir(&ta)));
            prop_assert!(!ns().batch_dir(&id).prefix_matches(&ns().table_dir(&tb)));
        }
    }

    #[test]
    fn text_no_identifier_encodes_to_is_not_decoded() {
        assert_eq!(decode_segment("a%2Fb"), Some("a/b".into()));
        assert_eq!(decode_segment("a/b"), None, "a raw slash is two segments");
        assert_eq!(decode_segment("%FF"), None, "not UTF-8");
        assert_eq!(decode_segment("%61"), None, "an `a` is never encoded");
    }
}
