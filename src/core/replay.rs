//! The consumer rule (README "Replaying" and "Schema changes") as a pure plan: which registry entry
//! to apply next, with which row filter, and when a table is replaced by a reload.
//!
//! Inputs are what the registry says, nothing else: the `streaming` and `ddl` rows of one source
//! (`files.id` order), the latest `done` reload of each table, and how far the consumer got
//! ([`Progress`]: the last `files.id` it applied and the reload it loaded per table). The output is a
//! list of [`Step`]s; a driver (`consume::apply`) carries them out, each in one target transaction
//! together with the new progress, so a crash between steps resumes exactly after the last one.
//!
//! # Invariants (and why they give the source back)
//! 1. Entries are taken in `files.id` order, each exactly once: per source the daemon registers
//!    streaming files and DDL records strictly in seal order (README "The registry"), so id order is
//!    position order per table, and a consumer that has applied every id up to `last_id` has
//!    applied a prefix of each table's history.
//! 2. A table with a `done` reload at cut C is, after the reload is loaded, the table as of C
//!    (an export in a snapshot consistent at C). Entries wholly below C are skipped and rows below
//!    C in an entry that reaches it are filtered out (`min_lsn`), so what follows the load is exactly
//!    the history from C on: nothing before the cut is applied twice, nothing after it is missed.
//! 3. The reload is loaded just before the first entry of its table that reaches C. When that entry
//!    (or several) was applied already, because the reload finished after the consumer passed it,
//!    or when no entry reaches C yet, the reload is loaded now and the table's applied entries that
//!    reach C are applied again after it ([`Step::Load::reapply`]): the load replaced their effect.
//! 4. A bound (`until`, exclusive; `verify` uses its snapshot's LSN) keeps reloads with a later cut
//!    and rows at or after it out, so the plan rebuilds the tables as of that position.

use std::collections::{BTreeMap, BTreeSet};

use crate::lsn::Lsn;
use crate::table::TableName;

/// What a registry row of kind `streaming` or `ddl` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Streaming,
    Ddl,
}

/// One `files` row of kind `streaming` or `ddl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub kind: EntryKind,
    pub table: TableName,
    /// First and last commit LSN of its rows (a DDL record: its position, both).
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
}

/// The latest `done` reload of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoneReload {
    pub id: i64,
    pub cut: Lsn,
}

/// How far a consumer got: every entry with `id <= last_id` is applied, and `loaded` says which
/// reload each table was last replaced by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub last_id: i64,
    pub loaded: BTreeMap<TableName, i64>,
}

/// One thing to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Replace `table` by the parts of `reload`, then apply `reapply` again (entries already
    /// applied that reach the cut, rows from the cut on).
    Load {
        table: TableName,
        reload: DoneReload,
        reapply: Vec<Entry>,
    },
    /// Apply the entry, rows with `_commit_lsn` in `[min_lsn, until)` (`None`: unbounded).
    Apply {
        entry: Entry,
        min_lsn: Option<Lsn>,
        until: Option<Lsn>,
    },
    /// The entry is superseded (wholly below its table's reload cut, or at or after `until`):
    /// nothing to do but move past it.
    Skip { entry: Entry },
}

impl Step {
    /// The `files.id` the consumer has applied up to once this step is done (a load changes none).
    pub fn advances_to(&self) -> Option<i64> {
        match self {
            Step::Load { .. } => None,
            Step::Apply { entry, .. } | Step::Skip { entry } => Some(entry.id),
        }
    }
}

/// Plans the next steps.
///
/// - `reloads`: the latest `done` reload per table (with `until`, the latest with `cut < until`:
///   the caller filters, see invariant 4);
/// - `new`: the entries with `id > progress.last_id`, in id order;
/// - `applied`: for the tables whose reload must be loaded before any new entry of theirs
///   ([`tables_to_reload_now`]), their entries with `id <= progress.last_id`, in id order.
pub fn plan(
    progress: &Progress,
    reloads: &BTreeMap<TableName, DoneReload>,
    new: &[Entry],
    applied: &BTreeMap<TableName, Vec<Entry>>,
    until: Option<Lsn>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut loaded: BTreeSet<&TableName> = BTreeSet::new();
    let reapply = |table: &TableName, cut: Lsn| -> Vec<Entry> {
        applied
            .get(table)
            .map(|es| {
                es.iter()
                    .filter(|e| e.last_lsn >= cut && until.is_none_or(|u| e.first_lsn < u))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    for table in tables_to_reload_now(progress, reloads, new) {
        let reload = reloads[&table];
        steps.push(Step::Load {
            reapply: reapply(&table, reload.cut),
            table: table.clone(),
            reload,
        });
        loaded.insert(
            reloads
                .get_key_value(&table)
                .expect("planned from reloads")
                .0,
        );
    }
    for e in new {
        if until.is_some_and(|u| e.first_lsn >= u) {
            steps.push(Step::Skip { entry: e.clone() });
            continue;
        }
        let reload = reloads.get(&e.table);
        if let Some(r) = reload {
            if e.last_lsn < r.cut {
                steps.push(Step::Skip { entry: e.clone() });
                continue;
            }
            if progress.loaded.get(&e.table) != Some(&r.id) && !loaded.contains(&e.table) {
                steps.push(Step::Load {
                    table: e.table.clone(),
                    reload: *r,
                    reapply: reapply(&e.table, r.cut),
                });
                loaded.insert(&e.table);
            }
        }
        steps.push(Step::Apply {
            entry: e.clone(),
            min_lsn: reload.map(|r| r.cut),
            until,
        });
    }
    steps
}

/// The tables whose latest `done` reload is not loaded yet and has no new entry reaching its cut:
/// they are loaded before anything else (invariant 3).
pub fn tables_to_reload_now(
    progress: &Progress,
    reloads: &BTreeMap<TableName, DoneReload>,
    new: &[Entry],
) -> Vec<TableName> {
    reloads
        .iter()
        .filter(|(t, r)| progress.loaded.get(*t) != Some(&r.id))
        .filter(|(t, r)| !new.iter().any(|e| e.table == **t && e.last_lsn >= r.cut))
        .map(|(t, _)| t.clone())
        .collect()
}

/// The tables whose latest `done` reload is not loaded yet: the caller reads their entries with
/// `id <= progress.last_id` that reach the cut, for [`plan`]'s `applied` argument.
pub fn pending_reloads<'a>(
    progress: &'a Progress,
    reloads: &'a BTreeMap<TableName, DoneReload>,
) -> impl Iterator<Item = (&'a TableName, DoneReload)> + 'a {
    reloads
        .iter()
        .filter(|(t, r)| progress.loaded.get(*t) != Some(&r.id))
        .map(|(t, r)| (t, *r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(n: &str) -> TableName {
        TableName::new("public", n)
    }

    fn entry(id: i64, table: &str, first: u64, last: u64) -> Entry {
        Entry {
            id,
            kind: EntryKind::Streaming,
            table: t(table),
            first_lsn: Lsn(first),
            last_lsn: Lsn(last),
        }
    }

    #[test]
    fn without_reloads_every_entry_is_applied_in_order() {
        let new = vec![entry(1, "a", 10, 20), entry(2, "b", 15, 30)];
        let steps = plan(
            &Progress::default(),
            &BTreeMap::new(),
            &new,
            &BTreeMap::new(),
            None,
        );
        assert_eq!(
            steps,
            new.iter()
                .map(|e| Step::Apply {
                    entry: e.clone(),
                    min_lsn: None,
                    until: None
                })
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_reload_is_loaded_before_the_first_entry_reaching_its_cut() {
        let reloads = BTreeMap::from([(
            t("a"),
            DoneReload {
                id: 7,
                cut: Lsn(25),
            },
        )]);
        let new = vec![
            entry(1, "a", 10, 20),
            entry(2, "a", 21, 30),
            entry(3, "a", 31, 40),
        ];
        let steps = plan(&Progress::default(), &reloads, &new, &BTreeMap::new(), None);
        assert!(matches!(&steps[0], Step::Skip { entry } if entry.id == 1));
        assert!(
            matches!(&steps[1], Step::Load { reload, reapply, .. } if reload.id == 7 && reapply.is_empty())
        );
        assert!(
            matches!(&steps[2], Step::Apply { entry, min_lsn: Some(Lsn(25)), .. } if entry.id == 2)
        );
        assert!(matches!(&steps[3], Step::Apply { entry, .. } if entry.id == 3));
        assert_eq!(steps.len(), 4);
    }

    #[test]
    fn a_reload_done_after_its_entries_were_applied_reapplies_them() {
        let progress = Progress {
            last_id: 3,
            loaded: BTreeMap::new(),
        };
        let reloads = BTreeMap::from([(
            t("a"),
            DoneReload {
                id: 7,
                cut: Lsn(25),
            },
        )]);
        let applied =
            BTreeMap::from([(t("a"), vec![entry(1, "a", 10, 20), entry(3, "a", 21, 30)])]);
        let new = vec![entry(4, "b", 1, 2), entry(5, "a", 31, 40)];
        assert_eq!(
            pending_reloads(&progress, &reloads)
                .map(|(t, _)| t.clone())
                .collect::<Vec<_>>(),
            vec![t("a")]
        );
        let steps = plan(&progress, &reloads, &new, &applied, None);
        assert_eq!(steps.len(), 3);
        assert!(matches!(&steps[0], Step::Apply { entry, .. } if entry.id == 4));
        assert!(
            matches!(&steps[1], Step::Load { reapply, .. } if reapply.iter().map(|e| e.id).collect::<Vec<_>>() == vec![3])
        );
    }

    #[test]
    fn a_loaded_reload_is_not_loaded_again() {
        let progress = Progress {
            last_id: 3,
            loaded: BTreeMap::from([(t("a"), 7)]),
        };
        let reloads = BTreeMap::from([(
            t("a"),
            DoneReload {
                id: 7,
                cut: Lsn(25),
            },
        )]);
        let steps = plan(
            &progress,
            &reloads,
            &[entry(4, "a", 31, 40)],
            &BTreeMap::new(),
            None,
        );
        assert_eq!(steps.len(), 1);
        assert!(matches!(
            &steps[0],
            Step::Apply {
                min_lsn: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn entries_at_or_after_the_bound_are_skipped() {
        let new = vec![entry(1, "a", 10, 20), entry(2, "a", 30, 40)];
        let steps = plan(
            &Progress::default(),
            &BTreeMap::new(),
            &new,
            &BTreeMap::new(),
            Some(Lsn(30)),
        );
        assert!(matches!(
            &steps[0],
            Step::Apply {
                until: Some(Lsn(30)),
                ..
            }
        ));
        assert!(matches!(&steps[1], Step::Skip { .. }));
    }

    /// A model: one table whose history is positions 1, 2, …; an entry holds a range of them and
    /// the reload at cut C holds `1..C`. Planning in any increments (entries arriving over time, the
    /// reload finishing at any point, or never) leaves every position exactly once.
    fn run(
        increments: &[usize],
        entries: &[Entry],
        reload: DoneReload,
        done_after: usize,
    ) -> Vec<u64> {
        let mut progress = Progress::default();
        let mut rows: Vec<u64> = Vec::new();
        let mut seen = 0usize;
        for &n in increments.iter().chain(std::iter::once(&entries.len())) {
            let n = n.clamp(seen, entries.len());
            let new = &entries[seen..n];
            let reloads = if n >= done_after {
                BTreeMap::from([(t("a"), reload)])
            } else {
                BTreeMap::new()
            };
            let applied = BTreeMap::from([(t("a"), entries[..seen].to_vec())]);
            for step in plan(&progress, &reloads, new, &applied, None) {
                match step {
                    Step::Load {
                        reload, reapply, ..
                    } => {
                        rows = (1..reload.cut.0).collect();
                        for e in reapply {
                            rows.extend(
                                (e.first_lsn.0..=e.last_lsn.0).filter(|p| *p >= reload.cut.0),
                            );
                        }
                        progress.loaded.insert(t("a"), reload.id);
                    }
                    Step::Apply { entry, min_lsn, .. } => rows.extend(
                        (entry.first_lsn.0..=entry.last_lsn.0)
                            .filter(|p| min_lsn.is_none_or(|m| *p >= m.0)),
                    ),
                    Step::Skip { .. } => {}
                }
            }
            progress.last_id = entries[..n].last().map_or(progress.last_id, |e| e.id);
            seen = n;
        }
        rows.sort_unstable();
        rows
    }

    proptest! {
        #[test]
        fn any_increments_give_the_reload_then_the_history_from_its_cut(
            lens in proptest::collection::vec(1u64..5, 1..8),
            cut_at in 1u64..40,
            increments in proptest::collection::vec(0usize..9, 0..4),
            done_after in 0usize..9,
        ) {
            let mut entries = Vec::new();
            let mut pos = 1u64;
            for (i, len) in lens.iter().enumerate() {
                entries.push(entry(i as i64 + 1, "a", pos, pos + len - 1));
                pos += len;
            }
            let mut increments = increments;
            increments.sort_unstable();
            let cut = Lsn(cut_at.min(pos));
            let got = run(&increments, &entries, DoneReload { id: 1, cut }, done_after);
            let want: Vec<u64> = (1..pos).collect();
            prop_assert_eq!(got, want);
        }
    }
}
