//! Resampling statistics shared by the gap, the probes and the interventions:
//! bootstrap percentile intervals of a mean and nearest-rank quantiles.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;

/// The most bootstrap resamples (`--resamples`, `--bootstrap`): past a million
/// the interval's endpoints no longer move, and every resample costs time and
/// memory (its statistic is kept to sort).
pub const MAX_RESAMPLES: usize = 1_000_000;

/// Errors unless `--resamples` is 100 to [`MAX_RESAMPLES`] (fewer than 100
/// give no usable 95% interval).
pub fn check_resamples(n: usize) -> Result<()> {
    crate::error::check_range(
        "--resamples",
        n,
        100,
        MAX_RESAMPLES,
        "bootstrap resamples: under 100 give no usable 95% interval, past a million the \
         interval no longer moves while each costs time and memory",
    )
}

/// Bootstrap 95% percentile interval of the mean of `values` (non-empty),
/// drawing from `rng` (callers that go on drawing get the same stream as before).
pub fn bootstrap_mean_ci(values: &[f64], resamples: usize, rng: &mut StdRng) -> [f64; 2] {
    let n = values.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    [
        quantile_sorted(&means, 0.025),
        quantile_sorted(&means, 0.975),
    ]
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    sorted[((q * last as f64).round() as usize).min(last)]
}

/// The `q` quantile (0..=1) of sorted values, linear between order statistics
/// (numpy's default): for a few values, such as steering's random
/// directions, where nearest rank would jump from one value to the next.
pub fn quantile_linear(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// The mean of `values` and its bootstrap 95% percentile interval (seeded).
pub fn mean_ci(values: &[f64], resamples: usize, seed: u64) -> (f64, [f64; 2]) {
    if values.is_empty() {
        return (f64::NAN, [f64::NAN; 2]);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let mut rng = StdRng::seed_from_u64(seed);
    (mean, bootstrap_mean_ci(values, resamples, &mut rng))
}
