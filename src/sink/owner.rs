//! Who a source name belongs to: one slot of one source database.
//!
//! # Why one owner per source
//! Several daemons may share a registry, an output prefix and a JetStream stream: each writes only
//! under its source's name (`source.name`): its registry rows (`source` column), its directory
//! `<root>/<source>/` and its subjects `<prefix>.<source>.…`. Start-up recovery is confined to the
//! same name: `finish_unnotified` completes only the source's rows, `remove_orphans` lists only the
//! source's directory, reload markers name their source. That confinement is only safe while one
//! slot of one database writes under a name: two daemons of *different* slots under one name would
//! complete each other's notices and delete each other's fresh uploads as orphans (the slot's advisory
//! lock only keeps out daemons of the *same* slot, which wait as standbys). So the first daemon to use
//! a name claims it in all three places, and a daemon of another slot or database is refused with a
//! definite configuration error naming both owners, before it writes or deletes anything.
//!
//! # The claims
//! - The registry: the row of the name in `<schema>.sources` (migration 0005), inserted with
//!   `ON CONFLICT DO NOTHING` and read back, so of two daemons claiming at once exactly one wins.
//! - The output prefix: [`OWNER_FILE`] in the source's directory, written when absent and read
//!   back. This claim is not atomic by itself (object stores differ in conditional writes): two
//!   daemons of different slots starting in the same instant with the same source name, with
//!   different registries and subject prefixes, could both pass it. Any daemon starting after the
//!   claim is refused, as is any pair sharing the registry or the subjects, whose claims are atomic.
//!   A registry recreated for the same slot keeps the prefix (the owner is the slot, not the
//!   registry's incarnation).
//! - The subjects: the last message on `<prefix>.<source>.owner` in the stream
//!   (`Notifier::claim_subject_prefix`), published with an expected last subject sequence of 0. Two
//!   daemons on the same subjects would mix two slots in one subject and defeat each other's
//!   exactly-once check (which looks at the last message on the subject).
//!
//! The same slot name on another cluster is another owner: the system identifier is part of it.

use serde::{Deserialize, Serialize};

use super::layout::Namespace;
pub use super::layout::OWNER_FILE;
use super::store::Store;
use crate::error::{Component, Error};

/// One slot of one source database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// `pg_control_system().system_identifier` of the source cluster ("" when the role may not
    /// read it: then only the database and slot names are compared).
    pub system_identifier: String,
    pub database: String,
    pub slot: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {:?} of database {:?}", self.slot, self.database)?;
        if !self.system_identifier.is_empty() {
            write!(f, " (system {})", self.system_identifier)?;
        }
        Ok(())
    }
}

impl Owner {
    /// Whether `other` is the same owner; an unknown system identifier matches any.
    pub fn same_as(&self, other: &Owner) -> bool {
        self.database == other.database
            && self.slot == other.slot
            && (self.system_identifier.is_empty()
                || other.system_identifier.is_empty()
                || self.system_identifier == other.system_identifier)
    }

    /// The refusal for a resource (`what`) that `recorded` owns.
    pub fn refused(&self, what: &str, recorded: &Owner, how_to_release: &str) -> Error {
        Error::definite(
            Component::Ownership,
            format!(
                "{what} belongs to {recorded}; this daemon streams {self}. Give each slot its own \
                 source.name (README \"Running several daemons\"), or, to hand it over on purpose, \
                 {how_to_release}"
            ),
        )
    }
}

/// Claims the source's directory for `ours`, or refuses when another owner has it.
pub async fn claim_prefix(store: &Store, ns: &Namespace, ours: &Owner) -> Result<(), Error> {
    let path = ns.owner_file();
    if !store.exists(&path).await? {
        let body = serde_json::to_vec_pretty(ours).expect("an owner serializes");
        store.put_bytes(&path, body).await?;
    }
    let bytes = store.get(&path).await?;
    let recorded: Owner = serde_json::from_slice(&bytes).map_err(|e| {
        Error::definite(
            Component::Config,
            format!(
                "{} is not an owner record ({e}): this output prefix was not written by cdc-egress",
                store.url_of(&path)
            ),
        )
    })?;
    if ours.same_as(&recorded) {
        return Ok(());
    }
    Err(ours.refused(
        &format!("the output directory {}", store.url_of(&ns.dir())),
        &recorded,
        "stop the other daemon and run `cdc-egress release-owner --yes` with this configuration",
    ))
}

/// Releases the output prefix's claim (`cdc-egress release-owner`); returns the owner it had.
pub async fn release_prefix(store: &Store, ns: &Namespace) -> Result<Option<Owner>, Error> {
    let path = ns.owner_file();
    if !store.exists(&path).await? {
        return Ok(None);
    }
    let recorded = serde_json::from_slice(&store.get(&path).await?).ok();
    store.delete(&path).await?;
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(sys: &str, db: &str, slot: &str) -> Owner {
        Owner {
            system_identifier: sys.into(),
            database: db.into(),
            slot: slot.into(),
        }
    }

    #[test]
    fn owners_compare_by_cluster_database_and_slot() {
        let a = owner("1", "app", "s");
        assert!(a.same_as(&owner("1", "app", "s")));
        assert!(
            a.same_as(&owner("", "app", "s")),
            "unknown system: names decide"
        );
        assert!(
            !a.same_as(&owner("2", "app", "s")),
            "same names, another cluster"
        );
        assert!(!a.same_as(&owner("1", "app", "t")));
        assert!(!a.same_as(&owner("1", "other", "s")));
        let e = a.refused("the registry", &owner("1", "app", "t"), "do X");
        assert!(e.is_config() && !e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("slot \"t\"") && text.contains("slot \"s\"") && text.contains("do X")
        );
    }

    #[tokio::test]
    async fn a_prefix_is_claimed_once_and_refused_to_another_slot() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = Store::open(&url, &Default::default()).unwrap();
        let ns = Namespace::new(store.root(), "main");
        let ours = owner("1", "app", "s");
        claim_prefix(&store, &ns, &ours).await.unwrap();
        claim_prefix(&store, &ns, &ours).await.unwrap();
        let err = claim_prefix(&store, &ns, &owner("1", "app", "t"))
            .await
            .unwrap_err();
        assert!(err.is_config(), "{err}");
        assert!(err.to_string().contains("release-owner"), "{err}");
        assert!(dir.path().join("main").join(OWNER_FILE).exists());
        let other = Namespace::new(store.root(), "other");
        claim_prefix(&store, &other, &owner("1", "app", "t"))
            .await
            .unwrap();
        assert_eq!(release_prefix(&store, &ns).await.unwrap(), Some(ours));
        assert_eq!(release_prefix(&store, &ns).await.unwrap(), None);
        claim_prefix(&store, &ns, &owner("1", "app", "t"))
            .await
            .unwrap();
    }
}
