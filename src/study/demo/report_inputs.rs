//! What REPORT.md is written from: the demo's results, gathered once for the
//! report and the mechanism summary.

use super::control::PositiveControl;
use super::figures::Figures;
use super::interventions::Interventions;
use super::timings::Timings;
use crate::gap::GapReport;
use crate::probe::Report;

pub(super) struct ReportInputs<'a> {
    pub(super) model: &'a str,
    pub(super) n_rows: usize,
    /// Rows of the standard setting (the rest are variation rows).
    pub(super) n_standard: usize,
    pub(super) n_cues: usize,
    pub(super) n_requests: usize,
    pub(super) gap: &'a GapReport,
    /// The gap of every setting on the requests the variations use.
    pub(super) matched_gap: &'a GapReport,
    /// The sampled gap (temperature 1) on a few harmful requests.
    pub(super) sampled: &'a GapReport,
    pub(super) probes: &'a Report,
    pub(super) meaning: &'a Report,
    pub(super) interventions: &'a Interventions,
    /// Section 7, when the organisms ran.
    pub(super) control: Option<&'a PositiveControl>,
    /// Every figure REPORT.md links (the meaning probe's in `meaning/`).
    pub(super) figures: &'a Figures,
    pub(super) timings: &'a Timings,
    pub(super) total: f64,
}
