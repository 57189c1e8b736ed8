//! What a probe run finds: one [`MetricRow`] per evaluation, the tensors
//! left out, and `report.json`'s [`Report`] holding them (written by `report.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::cv::Scores;
use super::{target, Method, REPORT};
use crate::error::{Error, Result};
use crate::store::{ModelRecord, Position};

/// Which question an evaluation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The probe itself: train filter → test filter.
    Main,
    /// The same label on the control condition.
    Control,
    /// One cell of the generalisation matrix over `--cross`.
    Cross,
}

/// One `metrics.csv` row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricRow {
    pub hook: String,
    pub position: Position,
    pub layer: Option<usize>,
    pub method: Method,
    pub role: Role,
    pub train: String,
    pub test: String,
    #[serde(flatten)]
    pub scores: Scores,
    /// Mean AUROC of the probes refitted on shuffled training labels.
    pub shuffled_auroc: Option<f64>,
    /// Main probe only: Pearson r between the out-of-fold score and
    /// `p_accept`, within each value of the tier field.
    pub r_p_accept: BTreeMap<String, Option<f64>>,
    /// Selectivity, regression and multi-layer results (absent where they do not apply).
    #[serde(flatten, default)]
    pub extra: Extra,
}

/// The columns added by selectivity, regression and multi-layer probes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Extra {
    /// Main rows with a control: main − control AUROC and its paired
    /// group-bootstrap 95% interval (both AUROCs from one resample of groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selectivity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selectivity_lo: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selectivity_hi: Option<f64>,
    /// Regression probes (`--target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression: Option<target::RegressionScores>,
    /// Multi-layer probes: the layers, and `concat` (one probe on the concatenated
    /// standardised activations) or `mean-score` (mean of the per-layer scores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combine: Option<String>,
}

impl MetricRow {
    /// For a cross-matrix cell: the field and the train and test values (the
    /// last condition of each filter; earlier ones are --train/--test-filter).
    pub fn cross_cell(&self) -> Option<(&str, &str, &str)> {
        fn last(filter: &str) -> Option<(&str, &str)> {
            filter.rsplit(',').next()?.split_once('=')
        }
        let ((field, train), (_, test)) = (last(&self.train)?, last(&self.test)?);
        (self.role == Role::Cross).then_some((field, train, test))
    }
}

/// A tensor left out, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub tensor: String,
    pub reason: String,
}

/// `report.json`: settings, seeds, data counts and every metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub afprobe_version: String,
    pub acts: String,
    pub model: ModelRecord,
    pub settings: serde_json::Value,
    pub data: serde_json::Value,
    pub metrics: Vec<MetricRow>,
    /// Per method and position, the main probe with the highest AUROC.
    pub best: Vec<MetricRow>,
    pub skipped: Vec<Skipped>,
    /// Tensors with fewer distinct activation vectors than half their rows:
    /// `[distinct, rows]`.
    pub few_distinct: BTreeMap<String, [usize; 2]>,
    pub seconds: f64,
}

impl Report {
    /// Whether the probes regress a `--target` rather than classify a label.
    pub fn is_regression(&self) -> bool {
        self.metrics.iter().any(|m| m.extra.regression.is_some())
    }

    pub fn read(dir: &Path) -> Result<Report> {
        let path = dir.join(REPORT);
        let text = crate::io::read_to_string(&path).map_err(|e| {
            Error::BadInput(format!(
                "cannot read ({e}); is {} a directory written by `afprobe probe`?",
                dir.display()
            ))
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::model_file(&path, format!("not a probe report: {e}")))
    }
}
