//! The probes as linfa estimators: parameter builders implementing
//! [`linfa::traits::Fit`] on [`linfa::DatasetBase`]s of standardised rows,
//! fitted models implementing [`linfa::traits::PredictInplace`] (so
//! `model.predict(&records)` gives the scores), and adapters from linfa's own
//! estimators (linfa-logistic, linfa-svm, linfa-elasticnet) to the same model.
//!
//! Every fitted probe is a [`LinearScore`]: `score = x · weight + bias` on the
//! standardised rows, > 0 for the positive class (or the predicted value of a
//! regression probe).

use linfa::traits::{Fit, PredictInplace};
use linfa::DatasetBase;
use ndarray::{Array1, Array2, ArrayBase, Axis, Data, Ix2};

use super::logistic::{self, Lbfgs, Solution};
use crate::error::{Error, Result};

/// Standardised rows with binary labels (true = positive class).
pub type ClassData = DatasetBase<Array2<f64>, Array1<bool>>;
/// Standardised rows with a continuous target.
pub type TargetData = DatasetBase<Array2<f64>, Array1<f64>>;

/// A fitted linear read-out on standardised rows.
#[derive(Debug, Clone)]
pub struct LinearScore {
    pub weight: Array1<f64>,
    pub bias: f64,
    /// Solver iterations (0 where the solver does not say) and whether it met its tolerance.
    pub iterations: usize,
    pub converged: bool,
}

impl LinearScore {
    fn closed_form(weight: Array1<f64>, bias: f64) -> LinearScore {
        LinearScore {
            weight,
            bias,
            iterations: 0,
            converged: true,
        }
    }
}

impl<D: Data<Elem = f64>> PredictInplace<ArrayBase<D, Ix2>, Array1<f64>> for LinearScore {
    fn predict_inplace(&self, x: &ArrayBase<D, Ix2>, y: &mut Array1<f64>) {
        y.assign(&(x.dot(&self.weight) + self.bias));
    }

    fn default_target(&self, x: &ArrayBase<D, Ix2>) -> Array1<f64> {
        Array1::zeros(x.nrows())
    }
}

/// Our L2 logistic regression (scikit-learn's objective and `C`, fused L-BFGS):
/// `LogisticProbe::params().c(1.0).fit(&data)`.
#[derive(Debug, Clone)]
pub struct LogisticProbe {
    c: f64,
    solver: Lbfgs,
    warm: Option<Solution>,
}

impl LogisticProbe {
    pub fn params() -> LogisticProbe {
        LogisticProbe {
            c: 1.0,
            solver: Lbfgs::default(),
            warm: None,
        }
    }
    /// Inverse regularisation strength (scikit-learn's `C`).
    pub fn c(mut self, c: f64) -> LogisticProbe {
        self.c = c;
        self
    }
    pub fn solver(mut self, solver: Lbfgs) -> LogisticProbe {
        self.solver = solver;
        self
    }
    /// Start from a previous fit of similar data (e.g. the neighbouring fold's).
    pub fn warm_start(mut self, previous: Option<&LinearScore>) -> LogisticProbe {
        self.warm = previous.map(|p| Solution {
            weight: p.weight.clone(),
            bias: p.bias,
            iterations: 0,
            converged: false,
        });
        self
    }
}

fn check_classes(labels: &[bool]) -> Result<()> {
    let n_pos = labels.iter().filter(|&&l| l).count();
    if n_pos == 0 || n_pos == labels.len() {
        return Err(Error::BadInput(format!(
            "a training fold has only one class ({} rows, {n_pos} positive)",
            labels.len()
        )));
    }
    Ok(())
}

fn labels_of(data: &ClassData) -> Result<&[bool]> {
    data.targets()
        .as_slice()
        .ok_or_else(|| Error::BadInput("labels are not contiguous".into()))
}

impl Fit<Array2<f64>, Array1<bool>, Error> for LogisticProbe {
    type Object = LinearScore;

    fn fit(&self, data: &ClassData) -> Result<LinearScore> {
        let labels = labels_of(data)?;
        check_classes(labels)?;
        // The solver reads the rows as one contiguous block: no copy when they already are.
        let copy;
        let x = if data.records().is_standard_layout() {
            data.records()
        } else {
            copy = data.records().as_standard_layout().into_owned();
            &copy
        };
        let sol = logistic::fit(x, labels, self.c, &self.solver, self.warm.as_ref());
        Ok(LinearScore {
            weight: sol.weight,
            bias: sol.bias,
            iterations: sol.iterations,
            converged: sol.converged,
        })
    }
}

/// The difference of the class means, thresholded at their midpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeanDiffProbe;

impl MeanDiffProbe {
    pub fn params() -> MeanDiffProbe {
        MeanDiffProbe
    }
}

impl Fit<Array2<f64>, Array1<bool>, Error> for MeanDiffProbe {
    type Object = LinearScore;

    fn fit(&self, data: &ClassData) -> Result<LinearScore> {
        let labels = labels_of(data)?;
        check_classes(labels)?;
        let xs = data.records();
        let class_mean = |class: bool| {
            let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
            let n = rows.len() as f64;
            xs.select(Axis(0), &rows).sum_axis(Axis(0)) / n
        };
        let (pos, neg) = (class_mean(true), class_mean(false));
        let weight = &pos - &neg;
        let midpoint = (&pos + &neg) / 2.0;
        let bias = -weight.dot(&midpoint);
        Ok(LinearScore::closed_form(weight, bias))
    }
}

/// linfa-logistic's stock solver with scikit-learn's objective: linfa minimises
/// `Σ loss + α/2 ‖w‖²`, scikit-learn `C Σ loss + ½‖w‖²`, so α = 1/C.
/// linfa-logistic's probabilities are those of the class it calls positive — the
/// *more frequent* one (ties: the first seen) — so the score is negated when that
/// class is `false`. It reports no convergence status (counted as converged).
pub fn linfa_logistic(data: &ClassData, c: f64) -> Result<LinearScore> {
    check_classes(labels_of(data)?)?;
    let fitted = linfa_logistic::LogisticRegression::default()
        .alpha(1.0 / c)
        .gradient_tolerance(1e-6)
        .max_iterations(1000)
        .fit(data)
        .map_err(|e| Error::BadInput(format!("linfa-logistic: {e}")))?;
    let sign = if fitted.labels().pos.class { 1.0 } else { -1.0 };
    Ok(LinearScore::closed_form(
        fitted.params() * sign,
        fitted.intercept() * sign,
    ))
}

/// A linear SVM by linfa-svm's SMO (hinge loss, `C` on both classes,
/// intercept not penalised: scikit-learn's `SVC(kernel="linear")`), stopping at
/// libsvm's default tolerance 1e-3. The score is the signed decision value.
pub fn linear_svm(data: &ClassData, c: f64) -> Result<LinearScore> {
    check_classes(labels_of(data)?)?;
    let svm = linfa_svm::Svm::<f64, bool>::params()
        .pos_neg_weights(c, c)
        .linear_kernel()
        .eps(1e-3)
        .fit(data)
        .map_err(|e| Error::BadInput(format!("linfa-svm: {e}")))?;
    // The linear kernel keeps the separating hyperplane: read it off the unit vectors.
    let d = data.records().ncols();
    let mut unit = Array1::<f64>::zeros(d);
    let weight = (0..d)
        .map(|j| {
            unit[j] = 1.0;
            let w = svm.weighted_sum(&unit);
            unit[j] = 0.0;
            w
        })
        .collect();
    Ok(LinearScore::closed_form(weight, -svm.rho))
}

/// Ridge (`l1_ratio` 0) or elastic net by linfa-elasticnet's coordinate descent.
/// `alpha` is scikit-learn's: `Ridge(alpha)` minimises `‖y − Xw‖² + α‖w‖²`, which is
/// linfa's `1/(2n)‖y − Xw‖² + p/2 ‖w‖²` at p = α/n; `ElasticNet(alpha, l1_ratio)`
/// is linfa's objective with p = α.
pub fn elastic_net(data: &TargetData, alpha: f64, l1_ratio: f64) -> Result<LinearScore> {
    let n = data.records().nrows().max(1) as f64;
    let penalty = if l1_ratio == 0.0 { alpha / n } else { alpha };
    let max_iterations = 10_000;
    let fitted = linfa_elasticnet::ElasticNet::<f64>::params()
        .penalty(penalty)
        .l1_ratio(l1_ratio)
        .tolerance(1e-8)
        .max_iterations(max_iterations)
        .fit(data)
        .map_err(|e| Error::BadInput(format!("linfa-elasticnet: {e}")))?;
    Ok(LinearScore {
        weight: fitted.hyperplane().clone(),
        bias: fitted.intercept(),
        iterations: fitted.n_steps() as usize,
        converged: fitted.n_steps() < max_iterations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use linfa::traits::Predict;

    fn toy() -> ClassData {
        let x = Array2::from_shape_fn((40, 3), |(i, j)| match j {
            0 => (i % 2) as f64 * 2.0 + (i % 5) as f64 * 0.3 - 1.5,
            1 => -((i % 2) as f64) + (i % 3) as f64 * 0.2,
            _ => ((i * 7) % 11) as f64 / 11.0,
        });
        let y = (0..40).map(|i| i % 2 == 1).collect();
        DatasetBase::new(x, y)
    }

    /// Every classifier scores the positive class higher, whichever class is more frequent.
    #[test]
    fn classifiers_are_linfa_estimators_with_positive_scores_for_true() {
        for minority_true in [false, true] {
            let mut data = toy();
            if minority_true {
                // Make `true` the minority class: linfa-logistic then calls `false` positive.
                let mut y = data.targets().clone();
                y[1] = false;
                y[3] = false;
                data = data.with_targets(y);
            }
            let fits: Vec<(&str, LinearScore)> = vec![
                ("logistic", LogisticProbe::params().fit(&data).unwrap()),
                ("mean-diff", MeanDiffProbe::params().fit(&data).unwrap()),
                ("linfa-logistic", linfa_logistic(&data, 1.0).unwrap()),
                ("svm", linear_svm(&data, 1.0).unwrap()),
            ];
            for (name, model) in fits {
                let s: Array1<f64> = model.predict(data.records());
                let y = data.targets();
                let pos: f64 = (0..40).filter(|&i| y[i]).map(|i| s[i]).sum();
                let neg: f64 = (0..40).filter(|&i| !y[i]).map(|i| s[i]).sum();
                assert!(pos > neg, "{name} (minority true: {minority_true})");
            }
        }
    }

    /// Ridge by coordinate descent equals the normal equations (X'X + αI) w = X'y.
    #[test]
    fn ridge_matches_the_normal_equations() {
        let x = Array2::from_shape_fn((30, 2), |(i, j)| {
            ((i * (j + 3)) % 7) as f64 - 3.0 + j as f64 * 0.5
        });
        let x = &x - &x.mean_axis(Axis(0)).unwrap();
        let y: Array1<f64> = (0..30)
            .map(|i| 2.0 * x[[i, 0]] - x[[i, 1]] + (i % 3) as f64)
            .collect();
        let fit = elastic_net(&DatasetBase::new(x.clone(), y.clone()), 5.0, 0.0).unwrap();
        let yc = &y - y.mean().unwrap();
        let a = x.t().dot(&x) + Array2::<f64>::eye(2) * 5.0;
        let b = x.t().dot(&yc);
        let det = a[[0, 0]] * a[[1, 1]] - a[[0, 1]] * a[[1, 0]];
        let w0 = (a[[1, 1]] * b[0] - a[[0, 1]] * b[1]) / det;
        let w1 = (a[[0, 0]] * b[1] - a[[1, 0]] * b[0]) / det;
        assert!(
            (fit.weight[0] - w0).abs() < 1e-6,
            "{} vs {w0}",
            fit.weight[0]
        );
        assert!(
            (fit.weight[1] - w1).abs() < 1e-6,
            "{} vs {w1}",
            fit.weight[1]
        );
    }
}
