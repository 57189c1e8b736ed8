//! Fitting one linear probe: standardisation on the training rows, then L2
//! logistic regression or the difference of class means.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use super::logistic::{self, Lbfgs, Solution};
use crate::error::{Error, Result};

/// How a probe direction is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// L2-regularised logistic regression on standardised activations.
    Logistic,
    /// Difference of the class means of the standardised activations.
    MeanDiff,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Logistic => "logistic",
            Method::MeanDiff => "mean-diff",
        }
    }
}

/// Settings of a fit.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FitSettings {
    /// Inverse regularisation strength, as scikit-learn's `C`.
    pub c: f64,
    pub solver: Lbfgs,
}

impl Default for FitSettings {
    fn default() -> FitSettings {
        FitSettings {
            c: 1.0,
            solver: Lbfgs::default(),
        }
    }
}

/// A fitted probe: `score(x) = ((x - mean) / scale) · weight + bias`, positive
/// for the positive class. Logistic scores are logits; mean-difference scores
/// are centred so that 0 is the midpoint between the class means.
#[derive(Debug, Clone)]
pub struct Probe {
    pub mean: Array1<f64>,
    pub scale: Array1<f64>,
    pub weight: Array1<f64>,
    pub bias: f64,
    /// Solver iterations (0 for mean-diff) and whether it met its tolerance.
    pub iterations: usize,
    pub converged: bool,
}

impl Probe {
    /// Scores of the given rows of `x`.
    pub fn scores(&self, x: ArrayView2<f32>, rows: &[usize]) -> Vec<f64> {
        // Fold the standardisation into the weights: one dot product per row.
        let (w_raw, b_raw) = self.raw();
        rows.iter()
            .map(|&r| {
                x.row(r)
                    .iter()
                    .zip(w_raw.iter())
                    .map(|(&a, &w)| a as f64 * w)
                    .sum::<f64>()
                    + b_raw
            })
            .collect()
    }

    /// Weights and bias on raw (unstandardised) activations.
    fn raw(&self) -> (Array1<f64>, f64) {
        let w_raw = &self.weight / &self.scale;
        let b_raw = self.bias - w_raw.dot(&self.mean);
        (w_raw, b_raw)
    }

    /// The probe in the residual basis: unit direction `u`, norm `k` and bias
    /// `c` with `score(x) = k (x · u) + c`.
    pub fn in_residual_basis(&self) -> (Array1<f64>, f64, f64) {
        let (w_raw, bias) = self.raw();
        let norm = w_raw.dot(&w_raw).sqrt();
        let unit = if norm > 0.0 { &w_raw / norm } else { w_raw };
        (unit, norm, bias)
    }
}

/// Per-feature mean and population standard deviation of the training rows
/// (scikit-learn's StandardScaler: a constant feature gets scale 1).
fn standardizer(x: ArrayView2<f32>, rows: &[usize]) -> (Array1<f64>, Array1<f64>) {
    let d = x.ncols();
    let mut sum = Array1::<f64>::zeros(d);
    let mut sq = Array1::<f64>::zeros(d);
    for &r in rows {
        for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(x.row(r)) {
            let v = v as f64;
            *s += v;
            *q += v * v;
        }
    }
    let n = rows.len() as f64;
    let mean = sum / n;
    let scale = (sq / n - &mean * &mean).mapv(|v| {
        let sd = v.max(0.0).sqrt();
        if sd > 1e-12 {
            sd
        } else {
            1.0
        }
    });
    (mean, scale)
}

/// The standardised training matrix.
fn standardized(
    x: ArrayView2<f32>,
    rows: &[usize],
    mean: &Array1<f64>,
    scale: &Array1<f64>,
) -> Array2<f64> {
    let mut out = Array2::<f64>::zeros((rows.len(), x.ncols()));
    for (mut dst, &r) in out.axis_iter_mut(Axis(0)).zip(rows) {
        for (((o, &v), m), s) in dst.iter_mut().zip(x.row(r)).zip(mean).zip(scale) {
            *o = (v as f64 - m) / s;
        }
    }
    out
}

/// Fits a probe on `rows` of `x` with labels `y` (both classes must be present).
/// A logistic fit starts from `warm` (a probe of similar data) when given.
pub fn fit(
    x: ArrayView2<f32>,
    rows: &[usize],
    y: &[bool],
    method: Method,
    settings: &FitSettings,
    warm: Option<&Probe>,
) -> Result<Probe> {
    let labels: Vec<bool> = rows.iter().map(|&r| y[r]).collect();
    let n_pos = labels.iter().filter(|&&l| l).count();
    if n_pos == 0 || n_pos == labels.len() {
        return Err(Error::BadInput(format!(
            "a training fold has only one class ({} rows, {n_pos} positive)",
            labels.len()
        )));
    }
    let (mean, scale) = standardizer(x, rows);
    let xs = standardized(x, rows, &mean, &scale);
    Ok(match method {
        Method::Logistic => {
            let start = warm.map(|p| Solution {
                weight: p.weight.clone(),
                bias: p.bias,
                iterations: 0,
                converged: false,
            });
            let sol = logistic::fit(&xs, &labels, settings.c, &settings.solver, start.as_ref());
            Probe {
                mean,
                scale,
                weight: sol.weight,
                bias: sol.bias,
                iterations: sol.iterations,
                converged: sol.converged,
            }
        }
        Method::MeanDiff => {
            let (weight, bias) = mean_difference(&xs, &labels);
            Probe {
                mean,
                scale,
                weight,
                bias,
                iterations: 0,
                converged: true,
            }
        }
    })
}

/// Direction = mean(positive) − mean(negative); bias puts 0 at the midpoint.
fn mean_difference(xs: &Array2<f64>, labels: &[bool]) -> (Array1<f64>, f64) {
    let class_mean = |class: bool| {
        let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        xs.select(Axis(0), &rows)
            .mean_axis(Axis(0))
            .expect("class is non-empty")
    };
    let (pos, neg) = (class_mean(true), class_mean(false));
    let weight = &pos - &neg;
    let midpoint = (&pos + &neg) / 2.0;
    let bias = -weight.dot(&midpoint);
    (weight, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> (Array2<f32>, Vec<bool>) {
        // Two informative features (one reversed) and one constant feature.
        let x = Array2::from_shape_fn((40, 3), |(i, j)| match j {
            0 => (i % 2) as f32 * 2.0 + (i % 5) as f32 * 0.3,
            1 => -((i % 2) as f32) + (i % 3) as f32 * 0.2,
            _ => 7.0,
        });
        let y = (0..40).map(|i| i % 2 == 1).collect();
        (x, y)
    }

    #[test]
    fn both_methods_score_the_positive_class_higher() {
        let (x, y) = toy();
        let rows: Vec<usize> = (0..40).collect();
        for method in [Method::Logistic, Method::MeanDiff] {
            let p = fit(x.view(), &rows, &y, method, &FitSettings::default(), None).unwrap();
            let s = p.scores(x.view(), &rows);
            assert!(rows.iter().all(|&r| (s[r] > 0.0) == y[r]), "{method:?}");
            // The residual-basis form gives the same scores.
            let (u, k, c) = p.in_residual_basis();
            assert!(((u.dot(&u)) - 1.0).abs() < 1e-12);
            for r in [0, 1, 7] {
                let raw: f64 = x.row(r).iter().zip(&u).map(|(&a, b)| a as f64 * b).sum();
                assert!((k * raw + c - s[r]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn the_minority_positive_class_still_scores_positive() {
        let (x, mut y) = toy();
        // Make `false` the majority class.
        y[1] = false;
        y[3] = false;
        let rows: Vec<usize> = (0..40).collect();
        let p = fit(
            x.view(),
            &rows,
            &y,
            Method::Logistic,
            &FitSettings::default(),
            None,
        )
        .unwrap();
        let s = p.scores(x.view(), &rows);
        let pos_mean: f64 = (0..40).filter(|&r| y[r]).map(|r| s[r]).sum::<f64>();
        assert!(pos_mean > 0.0);
    }

    #[test]
    fn one_class_is_an_error() {
        let (x, _) = toy();
        let rows: Vec<usize> = (0..10).collect();
        let err = fit(
            x.view(),
            &rows,
            &[true; 40],
            Method::Logistic,
            &FitSettings::default(),
            None,
        );
        assert!(err.unwrap_err().to_string().contains("only one class"));
    }
}
