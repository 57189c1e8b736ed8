//! What a probe is trained on: binary labels, groups and grouped
//! cross-validation folds, read from a store's row table.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::rows::Table;

/// A binary label read from a metadata field.
#[derive(Debug, Clone)]
pub struct Labels {
    pub field: String,
    pub positive: String,
    /// The other value(s), for reports.
    pub negative: Vec<String>,
    /// Per row: `Some(is_positive)`, `None` where the field is absent.
    pub y: Vec<Option<bool>>,
}

impl Labels {
    /// Reads `field` as a binary label. The positive value is `positive`, else
    /// `true` for booleans, `free` for `tier`, else the later of two sorted
    /// values (as scikit-learn). More than two values need `positive`.
    pub fn read(table: &Table, field: &str, positive: Option<&str>) -> Result<Labels> {
        let column = table.column(field)?;
        let values = table.values(field, &vec![true; table.len()])?;
        let positive = match positive {
            Some(p) if values.iter().any(|v| v == p) => p.to_string(),
            Some(p) => {
                return Err(Error::BadInput(format!(
                    "--positive `{p}` is not a value of `{field}`; its values are: {}",
                    values.join(", ")
                )))
            }
            None if values.len() < 2 => {
                return Err(Error::BadInput(format!(
                "label `{field}` has a single value ({}) in this store: a probe needs two classes",
                values.join(", ")
            )))
            }
            None if values.iter().any(|v| v == "true") => "true".into(),
            None if field == "tier" && values.iter().any(|v| v == "free") => "free".into(),
            None if values.len() == 2 => values[1].clone(),
            None => {
                return Err(Error::BadInput(format!(
                "label `{field}` has {} values ({}); name the positive class with --positive VALUE",
                values.len(),
                values.join(", ")
            )))
            }
        };
        let negative = values.iter().filter(|v| **v != positive).cloned().collect();
        let y = column
            .iter()
            .map(|v| v.as_ref().map(|v| *v == positive))
            .collect();
        Ok(Labels {
            field: field.into(),
            positive,
            negative,
            y,
        })
    }
}

/// Group ids (dense, 0..n_groups) per row from a metadata field.
pub fn groups(table: &Table, field: &str) -> Result<Vec<usize>> {
    let column = table.column(field)?;
    let mut ids = BTreeMap::new();
    column
        .iter()
        .enumerate()
        .map(|(row, v)| {
            let v = v.as_ref().ok_or_else(|| {
                Error::BadInput(format!(
                    "row {} has no group field `{field}`; every row needs one (or choose --group)",
                    row + 1
                ))
            })?;
            let next = ids.len();
            Ok(*ids.entry(v.clone()).or_insert(next))
        })
        .collect()
}

/// The fold of every row: grouped K-fold, so all rows of a group share one
/// fold and no group is ever in both the training and the test rows.
#[derive(Debug, Clone)]
pub struct Folds {
    pub k: usize,
    fold_of_row: Vec<usize>,
}

impl Folds {
    /// Groups are dealt largest first (ties in a seeded random order) to the
    /// fold with the fewest rows so far, as scikit-learn's GroupKFold does.
    /// Only rows with `used[row]` count towards fold sizes.
    pub fn grouped(groups: &[usize], used: &[bool], k: usize, seed: u64) -> Result<Folds> {
        let n_groups = groups.iter().zip(used).filter(|(_, &u)| u).map(|(g, _)| *g);
        let mut size: BTreeMap<usize, usize> = BTreeMap::new();
        for g in n_groups {
            *size.entry(g).or_default() += 1;
        }
        if k < 2 {
            return Err(Error::BadInput(format!(
                "--folds must be at least 2, got {k}"
            )));
        }
        if size.len() < k {
            return Err(Error::BadInput(format!(
                "{} groups but {k} folds: grouped cross-validation needs at least as many \
                 groups as folds (lower --folds or choose another --group)",
                size.len()
            )));
        }
        let mut order: Vec<usize> = size.keys().copied().collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        order.sort_by_key(|g| std::cmp::Reverse(size[g])); // stable: ties keep the shuffle
        let mut fold_rows = vec![0usize; k];
        let mut fold_of_group = BTreeMap::new();
        for g in order {
            let lightest = (0..k).min_by_key(|&f| (fold_rows[f], f)).expect("k >= 2");
            fold_rows[lightest] += size[&g];
            fold_of_group.insert(g, lightest);
        }
        // Rows of groups that are never used still get a fold (their group's, or 0).
        let fold_of_row = groups
            .iter()
            .map(|g| fold_of_group.get(g).copied().unwrap_or(0))
            .collect();
        Ok(Folds { k, fold_of_row })
    }

    /// Folds given row by row (e.g. to reproduce another tool's split).
    pub fn explicit(fold_of_row: Vec<usize>) -> Folds {
        let k = fold_of_row.iter().max().map_or(0, |m| m + 1);
        Folds { k, fold_of_row }
    }

    pub fn fold(&self, row: usize) -> usize {
        self.fold_of_row[row]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_keep_groups_together_and_balance_sizes() {
        let groups: Vec<usize> = (0..100).map(|i| (i * 7) % 23).collect();
        let folds = Folds::grouped(&groups, &[true; 100], 5, 1).unwrap();
        for (r, &g) in groups.iter().enumerate() {
            for (s, &h) in groups.iter().enumerate() {
                if g == h {
                    assert_eq!(folds.fold(r), folds.fold(s));
                }
            }
        }
        let mut sizes = [0; 5];
        (0..100).for_each(|r| sizes[folds.fold(r)] += 1);
        assert!(sizes.iter().all(|&s| (16..=24).contains(&s)), "{sizes:?}");
        assert!(Folds::grouped(&groups, &[true; 100], 30, 1).is_err());
    }
}
