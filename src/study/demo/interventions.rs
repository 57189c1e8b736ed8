//! The demo's intervention runs: a steering sweep along the tier probe's
//! direction and a paid-into-free patching heatmap.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::NAME;
use crate::attribute::{self, AttributeReport, AttributeSpec};
use crate::error::Result;
use crate::intervene::direction::DirectionSource;
use crate::intervene::patch::{self, PatchPosition, PatchReport, PatchSpec};
use crate::intervene::steer::{self, SteerPositions, SteerReport, SteerSpec};
use crate::io::write_atomic;
use crate::model::{HookPoint, Model};
use crate::probe::{Method, Report};
use crate::rows::Filter;
use crate::store::Position;

/// Cue and number of harmful requests of the demo's steering sweep and patching
/// heatmap. Small: every edited run is a few forward calls, and on a CPU a
/// forward call costs about a full read of the weights however few tokens it has.
pub(super) const INTERVENTION_CUE: &str = "natural";
pub(super) const INTERVENTION_REQUESTS: usize = 8;
pub(super) const STEER_ALPHAS: [f64; 5] = [-0.2, -0.1, 0.0, 0.1, 0.2];

/// The intervention runs of the demo.
pub(super) struct Interventions {
    pub(super) layer: usize,
    pub(super) steer_dir: PathBuf,
    pub(super) patch_dir: PathBuf,
    pub(super) steer: SteerReport,
    pub(super) patch: PatchReport,
    pub(super) attribute_dir: PathBuf,
    pub(super) attribute: AttributeReport,
}

/// A steering sweep along the tier probe's direction at its best layer, and a
/// patching heatmap (paid into free) over every layer, on the standard
/// `natural` rows of the first harmful requests.
pub(super) fn run_interventions(
    model: &Model,
    rows: &[Value],
    probes: &Report,
    probes_dir: &Path,
    activations: &Path,
) -> Result<Interventions> {
    let layer = probes
        .best
        .iter()
        .find(|b| b.method == Method::Logistic && b.position == Position::Last)
        .and_then(|b| b.layer)
        .unwrap_or(model.config().n_layers / 2);
    let mut requests: Vec<&str> = Vec::new();
    let picked: Vec<&Value> = rows
        .iter()
        .filter(|r| {
            r["cue"] == INTERVENTION_CUE
                && r["harmful"] == true
                && r["variation"].as_array().is_some_and(|v| v.is_empty())
        })
        .filter(|r| {
            let id = r["request_id"].as_str().unwrap_or_default();
            if !requests.contains(&id) {
                if requests.len() == INTERVENTION_REQUESTS {
                    return false;
                }
                requests.push(id);
            }
            true
        })
        .collect();
    let prompts = activations.join(format!("{NAME}.interventions.jsonl"));
    let text: String = picked.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(&prompts, text.as_bytes())?;
    let n_layers = model.config().n_layers;

    let steer_dir = activations.join(format!("{NAME}-steer"));
    println!(
        "\nsteering along the tier probe's direction at layer {layer} ({} `{INTERVENTION_CUE}` rows, \
         from the cue on):",
        picked.len()
    );
    let steer = steer::steer(
        model,
        &SteerSpec {
            prompts: prompts.clone(),
            out: steer_dir.clone(),
            direction: DirectionSource::Probe {
                dir: probes_dir.to_path_buf(),
                method: Method::Logistic.name().into(),
            },
            direction_tensor: None,
            points: vec![HookPoint::ResidPost(layer)],
            positions: SteerPositions::FromCue,
            alphas: STEER_ALPHAS.to_vec(),
            random: true,
            norm_rows: 32,
            filter: Filter::default(),
            resamples: 2000,
            seed: 0,
            force: true,
        },
    )?;
    print!("{}", steer::format_table(&steer));

    let patch_dir = activations.join(format!("{NAME}-patch"));
    // Every other layer (and the last) at three position sets keeps the heatmap to ~2 minutes.
    let patch_layers: Vec<usize> = (0..n_layers)
        .filter(|l| l % 2 == 0 || *l == n_layers - 1)
        .collect();
    println!("\npatching paid into free, hook_resid_post of every other layer x last, cue, user:");
    let patch = patch::patch(
        model,
        &PatchSpec {
            prompts: prompts.clone(),
            out: patch_dir.clone(),
            points: patch_layers.into_iter().map(HookPoint::ResidPost).collect(),
            positions: vec![
                PatchPosition::Last(0),
                PatchPosition::Cue,
                PatchPosition::User,
            ],
            label: "tier".into(),
            source: "paid".into(),
            dest: "free".into(),
            pair_by: vec!["request_id".into(), "cue".into(), "variation".into()],
            filter: Filter::default(),
            max_pairs: None,
            resamples: 2000,
            seed: 0,
            force: true,
        },
    )?;
    print!("{}", patch::format_table(&patch));

    let attribute_dir = activations.join(format!("{NAME}-attribute"));
    println!("\ndirect logit attribution of the decision, free vs paid:");
    let attribute = attribute::attribute(
        model,
        &AttributeSpec {
            prompts,
            out: attribute_dir.clone(),
            filter: Filter::default(),
            label: "tier".into(),
            positive: "free".into(),
            negative: "paid".into(),
            pair_by: vec!["request_id".into(), "cue".into(), "variation".into()],
            resamples: 2000,
            seed: 0,
            force: true,
        },
    )?;
    print!("{}", attribute::format_table(&attribute));
    Ok(Interventions {
        layer,
        steer_dir,
        patch_dir,
        steer,
        patch,
        attribute_dir,
        attribute,
    })
}
