//! Grouped cross-validation of one probe and the metrics of its out-of-fold scores.

use ndarray::ArrayView2;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::data::Folds;
use super::fit::{fit, fit_target, FitSettings, Method, Probe};
use super::metrics::{accuracy, auroc, balanced_accuracy, bootstrap_auroc_ci, mean_std};
use crate::error::{Error, Result};

/// Out-of-fold scores on one test set: each test row scored by the probe
/// trained on the other folds' training rows.
#[derive(Debug, Clone, Default)]
pub struct OutOfFold {
    pub rows: Vec<usize>,
    pub scores: Vec<f64>,
    pub folds: Vec<usize>,
    /// Accuracy of the training folds' majority class on each test row's fold.
    pub majority_hits: Vec<bool>,
    /// Fits whose solver stopped before meeting its tolerance.
    pub unconverged: usize,
}

/// Trains one probe per fold on the rows of `train` outside the fold and
/// scores the rows of each of `tests` inside it. `y` gives the training labels
/// (it may be shuffled); rows without a label are never used.
pub fn cross_validate(
    x: ArrayView2<f32>,
    y: &[Option<bool>],
    folds: &Folds,
    train: &[bool],
    tests: &[Vec<bool>],
    method: Method,
    settings: &FitSettings,
) -> Result<Vec<OutOfFold>> {
    let labels: Vec<bool> = y.iter().map(|l| l.unwrap_or(false)).collect();
    run_folds(
        x,
        y,
        folds,
        train,
        tests,
        |rows, warm| fit(x, rows, &labels, method, settings, warm),
        |rows| Some(2 * rows.iter().filter(|&&r| labels[r]).count() > rows.len()),
    )
}

/// [`cross_validate`] of a regression probe of the continuous target `t`
/// (ridge or elastic net); `majority_hits` are all false.
pub fn cross_validate_target(
    x: ArrayView2<f32>,
    t: &[Option<f64>],
    folds: &Folds,
    train: &[bool],
    tests: &[Vec<bool>],
    method: Method,
    settings: &FitSettings,
) -> Result<Vec<OutOfFold>> {
    let values: Vec<f64> = t.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    run_folds(
        x,
        t,
        folds,
        train,
        tests,
        |rows, _| fit_target(x, rows, &values, method, settings),
        |_| None,
    )
}

/// The fold loop shared by classification and regression probes: `fit_fold`
/// fits on training rows (given the previous fold's probe to warm-start from),
/// `majority` gives the training rows' majority value for the baseline.
fn run_folds<T: Copy + PartialEq>(
    x: ArrayView2<f32>,
    y: &[Option<T>],
    folds: &Folds,
    train: &[bool],
    tests: &[Vec<bool>],
    fit_fold: impl Fn(&[usize], Option<&Probe>) -> Result<Probe>,
    majority: impl Fn(&[usize]) -> Option<T>,
) -> Result<Vec<OutOfFold>> {
    let mut out = vec![OutOfFold::default(); tests.len()];
    let mut previous: Option<Probe> = None;
    for fold in 0..folds.k {
        let train_rows: Vec<usize> = (0..y.len())
            .filter(|&r| train[r] && y[r].is_some() && folds.fold(r) != fold)
            .collect();
        let wanted: Vec<Vec<usize>> = tests
            .iter()
            .map(|mask| {
                (0..y.len())
                    .filter(|&r| mask[r] && folds.fold(r) == fold)
                    .collect()
            })
            .collect();
        if wanted.iter().all(Vec::is_empty) {
            continue;
        }
        // Folds overlap in most training rows: start from the previous fold's solution.
        let probe = fit_fold(&train_rows, previous.as_ref())
            .map_err(|e| Error::BadInput(format!("fold {fold}: {e}")))?;
        let majority = majority(&train_rows);
        for (o, rows) in out.iter_mut().zip(wanted) {
            o.scores.extend(probe.scores(x, &rows));
            o.folds.extend(std::iter::repeat_n(fold, rows.len()));
            o.majority_hits
                .extend(rows.iter().map(|&r| majority.is_some() && y[r] == majority));
            o.rows.extend(rows);
            o.unconverged += usize::from(!probe.converged);
        }
        previous = Some(probe);
    }
    Ok(out)
}

/// Labels shuffled among the rows of `mask` (a permutation baseline).
pub fn shuffled_labels<T: Clone>(y: &[Option<T>], mask: &[bool], seed: u64) -> Vec<Option<T>> {
    let rows: Vec<usize> = (0..y.len())
        .filter(|&r| mask[r] && y[r].is_some())
        .collect();
    let mut values: Vec<Option<T>> = rows.iter().map(|&r| y[r].clone()).collect();
    values.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut out = y.to_vec();
    for (r, v) in rows.into_iter().zip(values) {
        out[r] = v;
    }
    out
}

/// The metrics of out-of-fold scores (one `metrics.csv` row without its keys).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Scores {
    /// AUROC of the pooled out-of-fold scores.
    pub auroc: Option<f64>,
    /// Mean and standard deviation of the per-fold AUROC (folds with both classes).
    pub auroc_mean: Option<f64>,
    pub auroc_std: Option<f64>,
    /// Group-bootstrap 95% interval of `auroc`.
    pub auroc_lo: Option<f64>,
    pub auroc_hi: Option<f64>,
    /// At score 0 (probability 0.5 for logistic, the class-mean midpoint for mean-diff).
    pub accuracy: f64,
    pub accuracy_std: f64,
    pub balanced_accuracy: f64,
    /// Always predicting the training folds' majority class.
    pub majority_accuracy: f64,
    /// Test rows scored.
    pub n: usize,
    /// Fits that stopped at the iteration cap.
    pub unconverged_fits: usize,
}

/// Summarises out-of-fold scores against the true labels.
pub fn summarize(
    oof: &OutOfFold,
    y: &[Option<bool>],
    groups: &[usize],
    bootstrap: usize,
    seed: u64,
) -> Scores {
    let labels: Vec<bool> = oof.rows.iter().map(|&r| y[r] == Some(true)).collect();
    let predicted: Vec<bool> = oof.scores.iter().map(|&s| s > 0.0).collect();
    let row_groups: Vec<usize> = oof.rows.iter().map(|&r| groups[r]).collect();
    let fold_ids: std::collections::BTreeSet<usize> = oof.folds.iter().copied().collect();
    let (mut fold_auc, mut fold_acc) = (Vec::new(), Vec::new());
    for f in fold_ids {
        let idx: Vec<usize> = (0..oof.rows.len()).filter(|&i| oof.folds[i] == f).collect();
        let s: Vec<f64> = idx.iter().map(|&i| oof.scores[i]).collect();
        let l: Vec<bool> = idx.iter().map(|&i| labels[i]).collect();
        let p: Vec<bool> = idx.iter().map(|&i| predicted[i]).collect();
        fold_auc.extend(auroc(&s, &l));
        fold_acc.push(accuracy(&p, &l));
    }
    let ci = bootstrap_auroc_ci(&oof.scores, &labels, &row_groups, bootstrap, seed);
    let auc_ms = mean_std(&fold_auc);
    Scores {
        auroc: auroc(&oof.scores, &labels),
        auroc_mean: auc_ms.map(|m| m.0),
        auroc_std: auc_ms.map(|m| m.1),
        auroc_lo: ci.map(|c| c[0]),
        auroc_hi: ci.map(|c| c[1]),
        accuracy: accuracy(&predicted, &labels),
        accuracy_std: mean_std(&fold_acc).map_or(0.0, |m| m.1),
        balanced_accuracy: balanced_accuracy(&predicted, &labels),
        majority_accuracy: oof.majority_hits.iter().filter(|&&h| h).count() as f64
            / oof.rows.len().max(1) as f64,
        n: oof.rows.len(),
        unconverged_fits: oof.unconverged,
    }
}
