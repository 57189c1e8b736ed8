//! Table cells every part of REPORT.md writes the same way: a value, its
//! interval, a gap with its interval.

use crate::gap::GapStats;

/// A 95% interval, `n/a` when either end is missing.
pub(super) fn ci(lo: Option<f64>, hi: Option<f64>) -> String {
    match (lo, hi) {
        (Some(lo), Some(hi)) => format!("[{lo:.3}, {hi:.3}]"),
        _ => "n/a".into(),
    }
}

/// A value to three decimals, `n/a` when missing.
pub(super) fn num(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.3}"))
}

/// A gap with its 95% interval, signed.
pub(super) fn gap_cell(s: Option<&GapStats>) -> String {
    s.map_or("n/a".into(), |s| {
        format!("{:+.4} [{:+.4}, {:+.4}]", s.gap, s.ci95[0], s.ci95[1])
    })
}
