//! The settings of a steering run: where the vector is added, the unit α is
//! measured in, and the sweep's α values and random baseline.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

use super::direction::DirectionSource;
use crate::error::{Error, Result};
use crate::model::HookPoint;
use crate::rows::Filter;

/// Which positions the steering vector is added at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerPositions {
    /// Every position, continuation tokens included.
    All,
    /// The last prompt token only.
    Last,
    /// From the cue's first token on, continuation tokens included.
    FromCue,
}

impl fmt::Display for SteerPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SteerPositions::All => "all",
            SteerPositions::Last => "last",
            SteerPositions::FromCue => "from-cue",
        })
    }
}

impl FromStr for SteerPositions {
    type Err = Error;
    fn from_str(s: &str) -> Result<SteerPositions> {
        match s.trim() {
            "all" => Ok(SteerPositions::All),
            "last" => Ok(SteerPositions::Last),
            "from-cue" => Ok(SteerPositions::FromCue),
            other => Err(Error::BadInput(format!(
                "unknown steering positions `{other}`; valid: all, last, from-cue"
            ))),
        }
    }
}

/// The unit α is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerScale {
    /// mean(v·x | positive) − mean(v·x | negative) of `--label` at the last
    /// prompt token: α = 1 moves one class's mean onto the other's.
    Natural,
    /// The mean ‖x‖ at the last prompt token.
    Norm,
}

impl fmt::Display for SteerScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SteerScale::Natural => "natural",
            SteerScale::Norm => "norm",
        })
    }
}

impl FromStr for SteerScale {
    type Err = Error;
    fn from_str(s: &str) -> Result<SteerScale> {
        match s.trim() {
            "natural" => Ok(SteerScale::Natural),
            "norm" => Ok(SteerScale::Norm),
            other => Err(Error::BadInput(format!(
                "unknown --scale `{other}`; valid: natural (class-mean separation along the \
                 direction), norm (typical residual norm)"
            ))),
        }
    }
}

/// Most random directions one sweep draws (each is a full set of cells).
pub const MAX_RANDOM: usize = 1024;

/// Settings of one steering run.
#[derive(Debug, Clone, Serialize)]
pub struct SteerSpec {
    pub prompts: PathBuf,
    pub out: PathBuf,
    #[serde(serialize_with = "super::display")]
    pub direction: DirectionSource,
    /// Read the direction of this tensor (`{hook}@{position}`) for every layer,
    /// instead of the steered hook's own `@last` tensor.
    pub direction_tensor: Option<String>,
    /// The steered hook points (one per layer).
    #[serde(serialize_with = "super::names")]
    pub points: Vec<HookPoint>,
    #[serde(serialize_with = "super::display")]
    pub positions: SteerPositions,
    pub alphas: Vec<f64>,
    #[serde(serialize_with = "super::display")]
    pub scale: SteerScale,
    /// The label whose class means set the natural scale (`--label`), and its
    /// positive value (default as in `afprobe probe`).
    pub scale_label: String,
    pub scale_positive: Option<String>,
    /// Random directions swept at the same length (the baseline); 0 for none.
    pub random: usize,
    /// Rows whose unsteered last-token residuals set the α unit (spread
    /// evenly over the rows when there are more).
    pub norm_rows: usize,
    #[serde(serialize_with = "super::display")]
    pub filter: Filter,
    pub resamples: usize,
    pub seed: u64,
    pub force: bool,
}
