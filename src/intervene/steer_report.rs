//! `steer.json`: the sweep's cells, the direction against the random
//! baseline per hook and α, and the table `afprobe steer` prints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::steer_spec::{SteerScale, SteerSpec};
use super::TokenCount;

/// One point of the sweep over all rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteerCell {
    pub hook: String,
    pub layer: Option<usize>,
    pub alpha: f64,
    /// `direction` or `random`.
    pub kind: String,
    /// Which random direction (0-based), for `random` cells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_index: Option<usize>,
    #[serde(deserialize_with = "crate::report_json::number")]
    pub p_accept: f64,
    #[serde(deserialize_with = "crate::report_json::interval")]
    pub ci95: [f64; 2],
    /// Mean p_accept and its interval per value of `tier` (when rows have it).
    pub by_tier: BTreeMap<String, TierMean>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierMean {
    pub n: usize,
    #[serde(deserialize_with = "crate::report_json::number")]
    pub p_accept: f64,
    #[serde(deserialize_with = "crate::report_json::interval")]
    pub ci95: [f64; 2],
}

/// `steer.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SteerReport {
    pub format: String,
    pub afprobe_version: String,
    pub model: String,
    pub settings: SteerSpec,
    pub n_rows: usize,
    /// The α unit per steered hook (`settings.scale`): the class-mean
    /// separation along the direction, or the mean unsteered ‖x‖, at the last
    /// prompt token.
    pub norms: BTreeMap<String, f64>,
    /// Unsteered p_accept per tier.
    pub baseline: BTreeMap<String, TierMean>,
    pub cells: Vec<SteerCell>,
    /// Per hook and non-zero α: the direction against the random baseline.
    pub summary: Vec<SteerSummary>,
    pub tokens: TokenCount,
    pub seconds: f64,
}

/// The direction's effect at one hook and α beside the random directions'.
#[derive(Debug, Clone, Serialize)]
pub struct SteerSummary {
    pub hook: String,
    pub alpha: f64,
    /// Mean over rows of p_accept(steered) − p_accept(unsteered).
    pub effect: f64,
    /// The same effect's bootstrap 95% interval over rows.
    pub effect_ci95: [f64; 2],
    /// Effect on the free − paid gap (when rows have both tiers).
    pub gap_effect: Option<f64>,
    /// 2.5th and 97.5th percentiles of the random directions' effects.
    pub random_ci95: Option<[f64; 2]>,
    /// Share of random effects below the direction's, in percent (ties count half).
    pub percentile: Option<f64>,
    pub n_random: usize,
    /// The same comparison on the log-odds of p_accept, ln(p / (1 − p)), in
    /// nats: a model whose p_accept is saturated near 0 or 1 hides a real
    /// effect on the probability scale, not on this one.
    pub log_odds: EffectVsRandom,
}

/// A direction's effect beside the random directions': the mean over rows
/// of steered minus unsteered with its bootstrap 95% interval, the random
/// directions' mean effects' 95% interval, and the direction's percentile
/// among them (ties count half).
#[derive(Debug, Clone, Serialize)]
pub struct EffectVsRandom {
    pub effect: f64,
    pub effect_ci95: [f64; 2],
    pub random_ci95: Option<[f64; 2]>,
    pub percentile: Option<f64>,
}

impl SteerSummary {
    /// Whether the direction's effect lies outside the random directions'
    /// 95% interval by more than `margin` (a lever on compliance).
    pub fn beyond_random(&self, margin: f64) -> bool {
        outside(self.effect, self.random_ci95, margin)
    }

    /// [`SteerSummary::beyond_random`] on the log-odds scale (`margin` in nats).
    pub fn log_odds_beyond_random(&self, margin: f64) -> bool {
        outside(self.log_odds.effect, self.log_odds.random_ci95, margin)
    }

    /// `effect [lo, hi] | random interval | percentile`, as table cells with
    /// `digits` decimals (`n/a` where there is no baseline).
    pub fn cells(&self, digits: usize) -> String {
        let d = digits;
        format!(
            "{:+.d$} [{:+.d$}, {:+.d$}] | {} | {}",
            self.effect,
            self.effect_ci95[0],
            self.effect_ci95[1],
            self.random_ci95
                .map_or("n/a".into(), |[lo, hi]| format!("[{lo:+.d$}, {hi:+.d$}]")),
            self.percentile.map_or("n/a".into(), |p| format!("{p:.0}")),
        )
    }
}

pub(super) fn outside(effect: f64, random_ci95: Option<[f64; 2]>, margin: f64) -> bool {
    random_ci95.is_some_and(|[lo, hi]| effect > hi + margin || effect < lo - margin)
}

/// The sweep as a table: p_accept per α (columns) for each hook and kind.
pub fn format_table(report: &SteerReport) -> String {
    let alphas = &report.settings.alphas;
    let mut out = format!(
        "{} rows; unsteered p_accept {}\np_accept by α (in units of {}):\n{:<36}",
        report.n_rows,
        report
            .baseline
            .iter()
            .map(|(t, m)| format!("{t} {:.4}", m.p_accept))
            .collect::<Vec<_>>()
            .join(", "),
        match report.settings.scale {
            SteerScale::Natural => format!(
                "the `{}` class-mean separation along the direction",
                report.settings.scale_label
            ),
            SteerScale::Norm => "the mean residual norm at the hook".to_string(),
        },
        "hook / direction"
    );
    for a in alphas {
        out.push_str(&format!(" {:>8}", format!("{a:+}")));
    }
    out.push('\n');
    for point in &report.settings.points {
        let kinds = [
            ("direction", Some(None)),
            ("random #0", Some(Some(0))),
            ("random mean", None),
        ];
        for (label, index) in kinds {
            let row: Vec<(f64, f64)> = alphas
                .iter()
                .filter_map(|a| {
                    let hits: Vec<f64> = report
                        .cells
                        .iter()
                        .filter(|c| c.hook == point.to_string() && c.alpha == *a)
                        .filter(|c| match index {
                            Some(i) => c.random_index == i,
                            None => c.random_index.is_some(),
                        })
                        .map(|c| c.p_accept)
                        .collect();
                    (!hits.is_empty()).then(|| (*a, hits.iter().sum::<f64>() / hits.len() as f64))
                })
                .collect();
            if row.is_empty() || (index.is_none() && report.settings.random < 2) {
                continue;
            }
            out.push_str(&format!("{:<36}", format!("{point} {label}")));
            for a in alphas {
                let v = row.iter().find(|(x, _)| x == a);
                out.push_str(&format!(
                    " {:>8}",
                    v.map_or("-".into(), |(_, p)| format!("{p:.4}"))
                ));
            }
            out.push('\n');
        }
    }
    if report.settings.random > 0 {
        out.push_str(&format!(
            "effect on p_accept, the direction beside {} random directions of the same length:\n",
            report.settings.random
        ));
        out.push_str("  hook, α: effect [95% CI] | random 95% | percentile\n");
        for s in &report.summary {
            out.push_str(&format!("  {} α {:+}: {}\n", s.hook, s.alpha, s.cells(4)));
        }
    }
    out.push_str(&format!(
        "token-forwards: {} computed vs {} for one full forward per cell; {:.1} s\n",
        report.tokens.computed, report.tokens.naive, report.seconds
    ));
    out
}
