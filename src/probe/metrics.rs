//! Classification metrics of probe scores: AUROC, accuracy, balanced accuracy,
//! a group bootstrap interval, and Pearson correlation.

use rand::rngs::StdRng;

use crate::stats::quantile_sorted;
use rand::{Rng, SeedableRng};

/// Area under the ROC curve of `scores` for `labels` (true = positive class):
/// the Mann–Whitney U statistic with ties counted half, as scikit-learn's
/// `roc_auc_score`. `None` when either class is absent.
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (tie-averaged, 1-based) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j + 1) as f64 / 2.0;
        rank_sum += mean_rank * order[i..j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Share of rows whose prediction equals the label.
pub fn accuracy(predicted: &[bool], labels: &[bool]) -> f64 {
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len().max(1) as f64
}

/// Mean of the true-positive and true-negative rates (0.5 for a constant
/// predictor whatever the class balance). A missing class counts as its rate 0.5.
pub fn balanced_accuracy(predicted: &[bool], labels: &[bool]) -> f64 {
    let rate = |class: bool| {
        let rows: Vec<bool> = predicted
            .iter()
            .zip(labels)
            .filter(|(_, &l)| l == class)
            .map(|(&p, _)| p == class)
            .collect();
        if rows.is_empty() {
            0.5
        } else {
            rows.iter().filter(|&&hit| hit).count() as f64 / rows.len() as f64
        }
    };
    (rate(true) + rate(false)) / 2.0
}

/// Pearson correlation; `None` for fewer than 3 pairs or a constant input.
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len();
    if n < 3 || b.len() != n {
        return None;
    }
    let (ma, mb) = (
        a.iter().sum::<f64>() / n as f64,
        b.iter().sum::<f64>() / n as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

/// Coefficient of determination of predictions `pred` for `truth` (scikit-learn's
/// `r2_score`: 1 − SS_res / SS_tot, negative when worse than the mean); `None`
/// for fewer than 2 rows or a constant truth.
pub fn r_squared(pred: &[f64], truth: &[f64]) -> Option<f64> {
    let n = truth.len();
    if n < 2 || pred.len() != n {
        return None;
    }
    let mean = truth.iter().sum::<f64>() / n as f64;
    let ss_tot: f64 = truth.iter().map(|t| (t - mean) * (t - mean)).sum();
    let ss_res: f64 = pred.iter().zip(truth).map(|(p, t)| (t - p) * (t - p)).sum();
    (ss_tot > 0.0).then(|| 1.0 - ss_res / ss_tot)
}

/// 95% percentile interval of `statistic` (of the resampled row indices) under a
/// bootstrap that resamples *groups* with replacement; resamples where the
/// statistic is undefined are skipped; `None` if every one was.
pub fn group_bootstrap_ci(
    groups: &[usize],
    resamples: usize,
    seed: u64,
    mut statistic: impl FnMut(&[usize]) -> Option<f64>,
) -> Option<[f64; 2]> {
    let mut members: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (row, &g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(row);
    }
    let members: Vec<Vec<usize>> = members.into_values().collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    let mut values = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        rows.clear();
        for _ in 0..members.len() {
            rows.extend(&members[rng.random_range(0..members.len())]);
        }
        values.extend(statistic(&rows));
    }
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some([
        quantile_sorted(&values, 0.025),
        quantile_sorted(&values, 0.975),
    ])
}

/// 95% percentile interval of the AUROC under a bootstrap that resamples
/// *groups* (requests) with replacement, so rows of one request stay together.
/// Resamples with a single class are skipped; `None` if every one was.
pub fn bootstrap_auroc_ci(
    scores: &[f64],
    labels: &[bool],
    groups: &[usize],
    resamples: usize,
    seed: u64,
) -> Option<[f64; 2]> {
    let (mut s, mut l) = (Vec::new(), Vec::new());
    group_bootstrap_ci(groups, resamples, seed, |rows| {
        s.clear();
        l.clear();
        s.extend(rows.iter().map(|&r| scores[r]));
        l.extend(rows.iter().map(|&r| labels[r]));
        auroc(&s, &l)
    })
}

/// Mean and population standard deviation.
pub fn mean_std(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
    Some((m, v.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_by_hand() {
        // Pairs (pos, neg): (0.8>0.1) (0.8>0.4) (0.4=0.4 half) (0.4>0.1) -> 3.5/4.
        let s = [0.1, 0.4, 0.4, 0.8];
        let l = [false, false, true, true];
        assert_eq!(auroc(&s, &l), Some(0.875));
        assert_eq!(auroc(&s, &[true; 4]), None);
        let flipped: Vec<bool> = l.iter().map(|x| !x).collect();
        assert_eq!(auroc(&s, &flipped), Some(0.125));
    }

    #[test]
    fn balanced_accuracy_ignores_class_balance() {
        let labels = [true, true, true, false];
        assert_eq!(balanced_accuracy(&[true; 4], &labels), 0.5);
        assert_eq!(accuracy(&[true; 4], &labels), 0.75);
    }

    #[test]
    fn pearson_of_a_line_is_one() {
        assert!((pearson(&[1., 2., 3., 4.], &[3., 5., 7., 9.]).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&[1., 2., 3., 4.], &[4., 3., 2., 1.]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1., 1., 1.], &[1., 2., 3.]), None);
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate_and_is_seeded() {
        let scores: Vec<f64> = (0..40)
            .map(|i| (i % 7) as f64 + (i % 2) as f64 * 2.0)
            .collect();
        let labels: Vec<bool> = (0..40).map(|i| i % 2 == 1).collect();
        let groups: Vec<usize> = (0..40).map(|i| i / 2).collect();
        let a = auroc(&scores, &labels).unwrap();
        let ci = bootstrap_auroc_ci(&scores, &labels, &groups, 500, 3).unwrap();
        assert!(ci[0] <= a && a <= ci[1], "{ci:?} vs {a}");
        assert!(ci[0] < ci[1]);
        assert_eq!(
            Some(ci),
            bootstrap_auroc_ci(&scores, &labels, &groups, 500, 3)
        );
    }
}
