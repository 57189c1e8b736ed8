//! What a patching run is asked to do and what it measures per pair: the
//! settings, the cells (a hook point at a position set, one head of it for
//! `hook_z`) and one pair's scores. The whole-activation run ([`super::patch`])
//! and the per-head run ([`super::head_patch`]) both work on these.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::patch_position::PatchPosition;
use crate::model::HookPoint;
use crate::rows::Filter;

/// Settings of one patching run.
#[derive(Debug, Clone, Serialize)]
pub struct PatchSpec {
    pub prompts: PathBuf,
    pub out: PathBuf,
    /// Hook points to patch, one cell row each (e.g. every `hook_resid_post`).
    #[serde(serialize_with = "super::names")]
    pub points: Vec<HookPoint>,
    #[serde(serialize_with = "super::names")]
    pub positions: Vec<PatchPosition>,
    /// The field that tells source from destination, and their values.
    pub label: String,
    pub source: String,
    pub dest: String,
    /// Fields that must match for two rows to pair (besides the label).
    pub pair_by: Vec<String>,
    #[serde(serialize_with = "super::display")]
    pub filter: Filter,
    /// Use at most this many pairs (the first ones, in file order).
    pub max_pairs: Option<usize>,
    /// With `blocks.L.attn.hook_z` points: the heads patched one at a time
    /// (`None`: every head). See [`super::head_patch`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads: Option<Vec<usize>>,
    pub resamples: usize,
    pub seed: u64,
    pub force: bool,
}

/// One pair's scores: unpatched source and destination, and each cell's
/// destination unpatched and patched (on the same split of the prompt).
pub(super) struct PairResult {
    pub p_source: f64,
    pub p_dest: f64,
    /// NaN where the cell had no aligned position.
    pub dest_at: Vec<f64>,
    pub patched: Vec<f64>,
    pub partly: Vec<bool>,
}

/// What one cell patches: a hook point at a position set, one head of it
/// for `hook_z`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PatchCell {
    pub point: HookPoint,
    pub position: PatchPosition,
    pub head: Option<usize>,
}

impl fmt::Display for PatchCell {
    /// `blocks.3.hook_resid_post@last`, `blocks.3.attn.hook_z.h5@last`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.head {
            Some(h) => write!(f, "{}.h{h}@{}", self.point, self.position),
            None => write!(f, "{}@{}", self.point, self.position),
        }
    }
}
