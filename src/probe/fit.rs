//! Fitting one linear probe: standardisation on the training rows (by hand: see
//! `standardizer`), then one of the linfa estimators of `estimators` on a
//! `linfa::DatasetBase` of the standardised rows.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use linfa::traits::Fit;
use linfa::DatasetBase;

use super::estimators::{self, ClassData, LinearScore, LogisticProbe, MeanDiffProbe, TargetData};
use super::logistic::Lbfgs;
use crate::error::{Error, Result};

/// How a probe direction is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// L2-regularised logistic regression on standardised activations (our L-BFGS).
    Logistic,
    /// Difference of the class means of the standardised activations.
    MeanDiff,
    /// linfa-logistic's stock solver, same objective as `Logistic` (a cross-check).
    LinfaLogistic,
    /// A linear SVM (linfa-svm, hinge loss).
    Svm,
    /// Ridge regression of a continuous `--target` (linfa-elasticnet, l1_ratio 0).
    Ridge,
    /// Elastic-net regression of a continuous `--target` (linfa-elasticnet).
    ElasticNet,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Logistic,
        Method::MeanDiff,
        Method::LinfaLogistic,
        Method::Svm,
        Method::Ridge,
        Method::ElasticNet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Logistic => "logistic",
            Method::MeanDiff => "mean-diff",
            Method::LinfaLogistic => "linfa-logistic",
            Method::Svm => "svm",
            Method::Ridge => "ridge",
            Method::ElasticNet => "elastic-net",
        }
    }

    /// Whether the method fits a continuous target (`--target`) rather than a label.
    pub fn is_regression(self) -> bool {
        matches!(self, Method::Ridge | Method::ElasticNet)
    }

    /// `--method`: comma-separated method names, `both` = logistic,mean-diff.
    pub fn parse_list(s: &str) -> Result<Vec<Method>> {
        let mut out: Vec<Method> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let methods = if part == "both" {
                vec![Method::Logistic, Method::MeanDiff]
            } else {
                vec![part.parse()?]
            };
            for m in methods {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                Error::BadInput(format!(
                    "unknown probe method `{s}`; methods are {} (and both = logistic,mean-diff); \
                     ridge and elastic-net fit a --target",
                    names.join(", ")
                ))
            })
    }
}

/// Settings of a fit.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FitSettings {
    /// Inverse regularisation strength, as scikit-learn's `C` (logistic, linfa-logistic, svm).
    pub c: f64,
    pub solver: Lbfgs,
    /// Regularisation strength of ridge / elastic net, as scikit-learn's `alpha`.
    pub alpha: f64,
    /// Elastic net's share of L1 (scikit-learn's `l1_ratio`).
    pub l1_ratio: f64,
}

impl Default for FitSettings {
    fn default() -> FitSettings {
        FitSettings {
            c: 1.0,
            solver: Lbfgs::default(),
            alpha: 1.0,
            l1_ratio: 0.5,
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
///
/// Why not linfa-preprocessing's `LinearScaler::standard()`: it needs the rows as
/// an f64 `Dataset` first (a copy of the f32 activations per fold) and then a second
/// pass to transform; this reads the selected f32 rows once for the moments and once
/// to write the standardised f64 matrix the solver needs anyway, with no
/// intermediate copy (and no extra dependency). Measured on a demo-sized training
/// fold (1,766 rows x 576) with a scratch program against linfa-preprocessing 0.8.1,
/// seven runs on 2 cores shared with a build: 3.4-7.0 ms here against 8.7-30 ms for
/// select + f64 copy + fit + transform (2.2-6x), equal to 1.6e-14. The demo's tier
/// probes standardise well over a thousand training sets: seconds to tens of seconds.
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

impl Probe {
    fn from_score(mean: Array1<f64>, scale: Array1<f64>, s: LinearScore) -> Probe {
        Probe {
            mean,
            scale,
            weight: s.weight,
            bias: s.bias,
            iterations: s.iterations,
            converged: s.converged,
        }
    }
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
    if method.is_regression() {
        return Err(Error::BadInput(format!(
            "--method {} fits a continuous --target, not a --label",
            method.name()
        )));
    }
    let labels: Array1<bool> = rows.iter().map(|&r| y[r]).collect();
    let (mean, scale) = standardizer(x, rows);
    let data: ClassData = DatasetBase::new(standardized(x, rows, &mean, &scale), labels);
    let score = match method {
        Method::Logistic => LogisticProbe::params()
            .c(settings.c)
            .solver(settings.solver)
            .warm_start(warm.map(Probe::as_score).as_ref())
            .fit(&data)?,
        Method::MeanDiff => MeanDiffProbe::params().fit(&data)?,
        Method::LinfaLogistic => estimators::linfa_logistic(&data, settings.c)?,
        Method::Svm => estimators::linear_svm(&data, settings.c)?,
        Method::Ridge | Method::ElasticNet => unreachable!("refused above"),
    };
    Ok(Probe::from_score(mean, scale, score))
}

/// Fits a regression probe (ridge or elastic net) of the continuous target `t`
/// on `rows` of `x`; the score is the predicted target.
pub fn fit_target(
    x: ArrayView2<f32>,
    rows: &[usize],
    t: &[f64],
    method: Method,
    settings: &FitSettings,
) -> Result<Probe> {
    let l1_ratio = match method {
        Method::Ridge => 0.0,
        Method::ElasticNet => settings.l1_ratio,
        other => {
            return Err(Error::BadInput(format!(
                "--target needs --method ridge or elastic-net, not {}",
                other.name()
            )))
        }
    };
    let targets: Array1<f64> = rows.iter().map(|&r| t[r]).collect();
    let (mean, scale) = standardizer(x, rows);
    let data: TargetData = DatasetBase::new(standardized(x, rows, &mean, &scale), targets);
    let score = estimators::elastic_net(&data, settings.alpha, l1_ratio)?;
    Ok(Probe::from_score(mean, scale, score))
}

impl Probe {
    /// The fitted read-out on standardised rows (e.g. to warm-start a fit).
    pub fn as_score(&self) -> LinearScore {
        LinearScore {
            weight: self.weight.clone(),
            bias: self.bias,
            iterations: self.iterations,
            converged: self.converged,
        }
    }
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
