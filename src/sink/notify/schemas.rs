//! The schema bucket (`nats.schema_bucket`): every published table's current schema in a JetStream
//! key-value bucket, so a consumer starting cold learns each table's shape from NATS alone
//! (README "Schemas in a key-value bucket").
//!
//! # Contract
//! - Key: `<source>.<schema>.<table>` ([`schema_key`]). KV keys allow only `[-/_=.a-zA-Z0-9]`, so
//!   the notice subjects' [`super::subject_token`] (which keeps non-ASCII characters and escapes
//!   with `%`) cannot be used: here every byte outside `[A-Za-z0-9_-]` of a name's UTF-8 is `=XX`
//!   (two upper-case hex digits). `=` is itself escaped, so the encoding is injective and reversible,
//!   and a name is exactly one key token (no `.`).
//! - Value: the JSON of [`SchemaEntry`]: the table, its state (`present`, or the tombstones
//!   `dropped`, `renamed`, `unpublished`), the position from which it holds (`valid_from`: commit
//!   LSN and seq of the batch, DDL record or reload cut that announced it), schema version and
//!   fingerprint, and the document itself (`schema_yml` for a batch or reload, `ddl_yml` for a DDL
//!   record), each the YAML object as JSON.
//! - A table that stops existing under its name gets a *tombstone value*, not a KV delete: a delete
//!   marker carries no position, so a DDL record replayed after a restart could not be told from a
//!   newer one and would bring the old schema back.
//!
//! # Why the bucket is exact and ordered
//! Delivery writes an entry after the registry commit and the notice of the row that announces it,
//! and before it records the notice sequence and reports the row persisted (`daemon::deliver`):
//! so the ack never passes a row whose entry is missing, and a crash in between leaves the row
//! unnotified, to be completed (notice and entry) at the next start. Rows of a source are delivered
//! one at a time in registry order, so entries are written in position order. A write happens only
//! when [`supersedes`] says the new head is later than the stored one *and* says something new
//! (another fingerprint or state, or a DDL record), and it is a compare-and-set on the key's last
//! revision. Hence a replay (a completed row, a DDL record read again from the slot) writes nothing,
//! a key never moves back to an older version, and the key's history holds each version once, in
//! position order. Readers order versions by `valid_from`, not by KV revision.

use serde::{Deserialize, Serialize};

use crate::core::batch::Position;
use crate::lsn::Lsn;
use crate::table::TableName;

/// The history the daemon gives a bucket it creates (the most JetStream allows). An existing
/// bucket keeps its own settings.
pub const BUCKET_HISTORY: i64 = 64;

/// `<source>.<schema>.<table>`, each name one KV key token (see the module contract).
pub fn schema_key(source: &str, table: &TableName) -> String {
    format!(
        "{}.{}.{}",
        key_token(source),
        key_token(&table.schema),
        key_token(&table.name)
    )
}

/// One KV key token: bytes outside `[A-Za-z0-9_-]` as `=XX`; the empty name is `=`.
pub fn key_token(name: &str) -> String {
    use std::fmt::Write as _;
    if name.is_empty() {
        return "=".into();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    out
}

/// What decides whether an entry replaces another: where it holds from, what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaHead {
    pub valid_from: Position,
    /// `present`, `dropped`, `renamed` or `unpublished`.
    pub state: String,
    /// The column list's fingerprint; `None` for a DDL record (it describes a change, not a file).
    pub fingerprint: Option<String>,
}

/// Whether `new` replaces `old`: it is later, and it says something new. Equal positions are a
/// replay of the same row; an earlier one is a replay of an older row.
pub fn supersedes(new: &SchemaHead, old: Option<&SchemaHead>) -> bool {
    match old {
        None => true,
        Some(old) => {
            new.valid_from > old.valid_from
                && (new.state != old.state
                    || new.fingerprint.is_none()
                    || new.fingerprint != old.fingerprint)
        }
    }
}

/// `valid_from` in JSON: the commit LSN as PostgreSQL prints it, and the seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryPosition {
    pub commit_lsn: String,
    pub seq: u32,
}

/// The value of a key (see the module contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaEntry {
    pub source: String,
    /// `schema.table`.
    pub table: String,
    pub schema: String,
    pub table_name: String,
    pub state: String,
    /// `streaming`, `reload` or `ddl`: which row announced it.
    pub kind: String,
    pub valid_from: EntryPosition,
    /// The table's schema version (0 for a DDL record, which has none of its own).
    pub schema_version: i32,
    #[serde(default)]
    pub schema_fingerprint: Option<String>,
    /// The batch id of the announcing row (its folder below the output root).
    pub batch_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_yml: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddl_yml: Option<serde_json::Value>,
}

impl SchemaEntry {
    /// The head of a stored value; `None` if it is not one of ours (it is then overwritten).
    pub fn head_of(value: &[u8]) -> Option<SchemaHead> {
        let e: SchemaEntry = serde_json::from_slice(value).ok()?;
        e.head()
    }

    pub fn head(&self) -> Option<SchemaHead> {
        let lsn: Lsn = self.valid_from.commit_lsn.parse().ok()?;
        Some(SchemaHead {
            valid_from: Position::new(lsn, self.valid_from.seq),
            state: self.state.clone(),
            fingerprint: self.schema_fingerprint.clone(),
        })
    }

    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a schema entry serializes")
            .into()
    }
}

/// The entry state after a DDL record whose `mode_after` is `mode` (`tables.mode`).
pub fn state_after(mode: Option<&str>) -> &'static str {
    match mode {
        Some("dropped") => "dropped",
        Some("renamed") => "renamed",
        Some("unpublished") => "unpublished",
        _ => "present",
    }
}

/// A YAML document (`schema.yml`, `ddl.yml`) as a JSON value.
pub fn yaml_to_json(yaml: &[u8]) -> Result<serde_json::Value, String> {
    let v: serde_yaml::Value = serde_yaml::from_slice(yaml).map_err(|e| e.to_string())?;
    serde_json::to_value(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lsn: u64, seq: u32, state: &str, fp: Option<&str>) -> SchemaHead {
        SchemaHead {
            valid_from: Position::new(Lsn(lsn), seq),
            state: state.into(),
            fingerprint: fp.map(str::to_string),
        }
    }

    #[test]
    fn keys_are_valid_single_tokens() {
        let t = TableName::new("my.schema", "Weird Name/ü=");
        assert_eq!(
            schema_key("main", &t),
            "main.my=2Eschema.Weird=20Name=2F=C3=BC=3D"
        );
        assert_eq!(key_token(""), "=");
        assert_eq!(key_token("orders_2024-x"), "orders_2024-x");
    }

    #[test]
    fn only_later_news_supersedes() {
        let v1 = head(100, 1, "present", Some("a"));
        assert!(supersedes(&v1, None));
        // A replay of the same row, or of an older one, never writes.
        assert!(!supersedes(&v1, Some(&v1)));
        assert!(!supersedes(&head(90, 1, "present", Some("b")), Some(&v1)));
        // A later batch with the same columns says nothing new.
        assert!(!supersedes(&head(200, 1, "present", Some("a")), Some(&v1)));
        assert!(supersedes(&head(200, 1, "present", Some("b")), Some(&v1)));
        // A later DDL record always writes; the batch after it too.
        let ddl = head(150, 2, "present", None);
        assert!(supersedes(&ddl, Some(&v1)));
        assert!(supersedes(&head(200, 1, "present", Some("a")), Some(&ddl)));
        // A tombstone is later news; a replayed older record does not resurrect the table.
        let dropped = head(300, 1, "dropped", None);
        assert!(supersedes(&dropped, Some(&v1)));
        assert!(!supersedes(&ddl, Some(&dropped)));
    }

    proptest::proptest! {
        /// Different names never share a key token, and no token contains a key separator.
        #[test]
        fn key_tokens_are_injective(a in "\\PC{0,12}", b in "\\PC{0,12}") {
            let (ta, tb) = (key_token(&a), key_token(&b));
            proptest::prop_assert!(!ta.contains('.'));
            proptest::prop_assert!(ta.bytes().all(|c| c.is_ascii_alphanumeric() || b"_-=".contains(&c)));
            proptest::prop_assert_eq!(ta == tb, a == b);
        }
    }
}
