//! Regression probes (`afprobe probe --target FIELD`): a linear read-out of a
//! continuous row field (e.g. `p_accept`) per tensor, with the same grouped
//! cross-validation as the label probes, out-of-fold R² and Pearson r with
//! group-bootstrap intervals, and a shuffled-target baseline.

use std::collections::BTreeMap;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cv::{cross_validate_target, shuffled_labels, Scores};
use super::metrics::{group_bootstrap_ci, mean_std, pearson, r_squared};
use super::{
    assemble, check_finite, data, derive_seed, fit, probe_tensors, Extra, Folds, MetricRow,
    ProbeSpec, Report, Role, TensorResult,
};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::rows::Table;
use crate::store::{Store, TensorName};

/// The regression columns of a `metrics.csv` row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegressionScores {
    pub target: String,
    /// Out-of-fold R² (1 − SS_res/SS_tot of the pooled out-of-fold predictions).
    pub r2: Option<f64>,
    pub r2_lo: Option<f64>,
    pub r2_hi: Option<f64>,
    /// Pearson r of the out-of-fold prediction and the target.
    pub pearson_r: Option<f64>,
    pub pearson_lo: Option<f64>,
    pub pearson_hi: Option<f64>,
    /// Mean R² and r of refits on shuffled targets (same folds).
    pub shuffled_r2: Option<f64>,
    pub shuffled_r: Option<f64>,
}

/// The numeric values of `field` per row; an error names the field (and the
/// first row that is not a number) when it is missing or not numeric.
pub fn read_target(table: &Table, field: &str) -> Result<Vec<Option<f64>>> {
    let column = table
        .column(field)
        .map_err(|e| Error::BadInput(format!("--target {field}: {e}")))?;
    let mut values = Vec::with_capacity(column.len());
    for (row, cell) in column.iter().enumerate() {
        values.push(match cell {
            None => None,
            Some(s) => match s.parse::<f64>() {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    return Err(Error::BadInput(format!(
                    "--target {field} is not numeric: row {} (line {} of rows.jsonl) has `{s}`; \
                         a regression probe needs a number in every row that has the field",
                    row,
                    row + 1
                )))
                }
            },
        });
    }
    if values.iter().flatten().count() < 3 {
        return Err(Error::BadInput(format!(
            "--target {field}: fewer than 3 rows have a number"
        )));
    }
    Ok(values)
}

/// Runs the regression probes of `spec.target` on `tensors` (main plan only:
/// train filter → test filter; no control or cross matrix).
pub(super) fn probe_target(
    spec: &ProbeSpec,
    store: &Store,
    table: &Table,
    tensors: &[String],
    started: Instant,
) -> Result<Report> {
    let field = spec.target.as_deref().unwrap_or_default();
    let t = read_target(table, field)?;
    if let Some(m) = spec.methods.iter().find(|m| !m.is_regression()) {
        return Err(Error::BadInput(format!(
            "--target {field} fits a regression probe: --method ridge or elastic-net, not {}",
            m.name()
        )));
    }
    if !spec.multi.is_empty() {
        return Err(Error::BadInput(
            "--multi-layer / --layer-window are for label probes, not --target".into(),
        ));
    }
    if spec.cross.is_some() {
        return Err(Error::BadInput(
            "--cross is for label probes; a --target probe has no cross matrix".into(),
        ));
    }
    let groups = data::groups(table, &spec.group)?;
    let numeric = |mask: Vec<bool>| -> Vec<bool> {
        mask.into_iter()
            .zip(&t)
            .map(|(m, v)| m && v.is_some())
            .collect()
    };
    let train = numeric(spec.train_filter.mask(table)?);
    let test = numeric(spec.test_filter.mask(table)?);
    for (what, mask) in [("--train-filter", &train), ("--test-filter", &test)] {
        if !mask.iter().any(|&m| m) {
            return Err(Error::BadInput(format!(
                "{what} selects no row with a numeric `{field}`"
            )));
        }
    }
    let used: Vec<bool> = train.iter().zip(&test).map(|(a, b)| *a || *b).collect();
    let folds = Folds::grouped(&groups, &used, spec.folds, spec.seed)?;
    let progress = Progress::new("probe", "tensors", tensors.len());
    let job = Job {
        spec,
        field,
        t: &t,
        groups: &groups,
        folds: &folds,
        train: &train,
        test: &test,
        used: &used,
    };
    let results: Vec<(usize, Result<TensorResult>)> = tensors
        .par_iter()
        .enumerate()
        .map(|(i, name)| {
            let r = job.tensor(store, name, i as u64);
            progress.advance(1, None);
            (i, r)
        })
        .collect();
    progress.finish();
    let count = |m: &[bool]| m.iter().filter(|&&v| v).count();
    let settings = serde_json::json!({
        "target": field,
        "group": spec.group,
        "folds": spec.folds,
        "seed": spec.seed,
        "methods": spec.methods,
        "fit": spec.fit,
        "standardize": "per training fold (mean, population std)",
        "train_filter": spec.train_filter.to_string(),
        "test_filter": spec.test_filter.to_string(),
        "shuffles": spec.shuffles,
        "bootstrap": spec.bootstrap,
        "bootstrap_unit": spec.group,
        "r2": "1 - SS_res / SS_tot of the pooled out-of-fold predictions (scikit-learn's r2_score)",
    });
    let data = serde_json::json!({
        "rows": table.len(),
        "with_target": t.iter().flatten().count(),
        "train_rows": count(&train),
        "test_rows": count(&test),
        "groups": groups.iter().copied().max().map_or(0, |m| m + 1),
    });
    assemble(spec, store, tensors, results, settings, data, started)
}

struct Job<'a> {
    spec: &'a ProbeSpec,
    field: &'a str,
    t: &'a [Option<f64>],
    groups: &'a [usize],
    folds: &'a Folds,
    train: &'a [bool],
    test: &'a [bool],
    used: &'a [bool],
}

impl Job<'_> {
    fn tensor(&self, store: &Store, name: &str, index: u64) -> Result<TensorResult> {
        let x = store.load(name)?;
        check_finite(&x, self.used)?;
        let TensorName { hook, position } = name.parse()?;
        let spec = self.spec;
        let tests = std::slice::from_ref(&self.test.to_vec()).to_vec();
        let (mut metrics, mut weights) = (Vec::new(), Vec::new());
        for (mi, &method) in spec.methods.iter().enumerate() {
            let seed = |k: u64| derive_seed(spec.seed, &[index, mi as u64, 7, k]);
            let cv = |t: &[Option<f64>]| {
                cross_validate_target(
                    x.view(),
                    t,
                    self.folds,
                    self.train,
                    &tests,
                    method,
                    &spec.fit,
                )
            };
            let oof = cv(self.t)?.remove(0);
            let (mut shuffled_r2, mut shuffled_r) = (Vec::new(), Vec::new());
            for s in 0..spec.shuffles {
                let t_shuffled = shuffled_labels(self.t, self.train, seed(1000 + s as u64));
                let o = cv(&t_shuffled)?.remove(0);
                let truth: Vec<f64> = o.rows.iter().filter_map(|&r| self.t[r]).collect();
                shuffled_r2.extend(r_squared(&o.scores, &truth));
                shuffled_r.extend(pearson(&o.scores, &truth));
            }
            let truth: Vec<f64> = oof.rows.iter().filter_map(|&r| self.t[r]).collect();
            let row_groups: Vec<usize> = oof.rows.iter().map(|&r| self.groups[r]).collect();
            let resampled = |stat: fn(&[f64], &[f64]) -> Option<f64>, k: u64| {
                let (mut p, mut q) = (Vec::new(), Vec::new());
                group_bootstrap_ci(&row_groups, spec.bootstrap, seed(k), |rows| {
                    p.clear();
                    q.clear();
                    p.extend(rows.iter().map(|&i| oof.scores[i]));
                    q.extend(rows.iter().map(|&i| truth[i]));
                    stat(&p, &q)
                })
            };
            let (r2_ci, r_ci) = (resampled(r_squared, 1), resampled(pearson, 2));
            let regression = RegressionScores {
                target: self.field.into(),
                r2: r_squared(&oof.scores, &truth),
                r2_lo: r2_ci.map(|c| c[0]),
                r2_hi: r2_ci.map(|c| c[1]),
                pearson_r: pearson(&oof.scores, &truth),
                pearson_lo: r_ci.map(|c| c[0]),
                pearson_hi: r_ci.map(|c| c[1]),
                shuffled_r2: mean_std(&shuffled_r2).map(|m| m.0),
                shuffled_r: mean_std(&shuffled_r).map(|m| m.0),
            };
            metrics.push(MetricRow {
                hook: hook.to_string(),
                position,
                layer: hook.layer(),
                method,
                role: Role::Main,
                train: spec.train_filter.to_string(),
                test: spec.test_filter.to_string(),
                scores: Scores {
                    n: oof.rows.len(),
                    unconverged_fits: oof.unconverged,
                    ..Scores::default()
                },
                shuffled_auroc: None,
                r_p_accept: BTreeMap::new(),
                extra: Extra {
                    regression: Some(regression),
                    ..Extra::default()
                },
            });
            let mut oof_scores = vec![f32::NAN; self.t.len()];
            for (&r, &s) in oof.rows.iter().zip(&oof.scores) {
                oof_scores[r] = s as f32;
            }
            weights.push((format!("{name}.{}.oof_score", method.name()), oof_scores));
            let rows: Vec<usize> = (0..self.t.len()).filter(|&r| self.train[r]).collect();
            let values: Vec<f64> = self.t.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
            let probe = fit::fit_target(x.view(), &rows, &values, method, &spec.fit)?;
            weights.extend(probe_tensors(name, method, &probe));
        }
        Ok(TensorResult {
            metrics,
            weights,
            distinct: self.used.len(),
            used: self.used.len(),
        })
    }
}
