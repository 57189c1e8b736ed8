//! The demo's intervention runs: steering along the `training_implied`
//! direction on standard and flipped rows beside random directions of the
//! same length, directional ablation of that direction, a paid-into-free
//! patching heatmap and direct logit attribution.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use super::prompts::NAME;
use crate::attribute::{self, AttributeReport, AttributeSpec};
use crate::error::Result;
use crate::intervene::ablate::{self, AblateReport, AblateSpec};
use crate::intervene::direction::{random_unit, DirectionSource};
use crate::intervene::patch::{self, PatchPosition, PatchReport, PatchSpec};
use crate::intervene::steer::{self, SteerPositions, SteerReport, SteerScale, SteerSpec};
use crate::io::write_atomic;
use crate::model::{HookPoint, Model};
use crate::probe::{Method, Report};
use crate::rows::{cell, Filter};
use crate::store::{Position, TensorName};

/// Cue and number of harmful requests of the demo's steering sweep and patching
/// heatmap. Small: every edited run is a few forward calls, and on a CPU a
/// forward call costs about a full read of the weights however few tokens it has.
pub(super) const INTERVENTION_CUE: &str = "natural";
pub(super) const INTERVENTION_REQUESTS: usize = 4;
/// In units of the `training_implied` class-mean separation along the
/// direction: +1 moves the unmonitored rows' mean onto the trained-on rows'.
pub(super) const STEER_ALPHAS: [f64; 3] = [-1.0, 0.0, 1.0];
/// Random directions of the same length per steering run (each is two more
/// edited runs per row; `afprobe steer` defaults to 16).
pub(super) const STEER_RANDOM: usize = 3;
/// The settings steered: the meaning flips between them, the tokens do not.
pub(super) const STEER_VARIATIONS: [&str; 2] = ["standard", "flipped"];

/// The intervention runs of the demo.
pub(super) struct Interventions {
    /// The `training_implied` probe's best layer: where steering adds its
    /// direction and whose direction ablation removes.
    pub(super) layer: usize,
    /// One steering run per variation of [`STEER_VARIATIONS`].
    pub(super) steer_dirs: Vec<PathBuf>,
    pub(super) steer: Vec<SteerReport>,
    pub(super) ablate: AblateReport,
    /// The same ablation along a seeded random direction: the baseline.
    pub(super) ablate_random: AblateReport,
    pub(super) patch_dir: PathBuf,
    pub(super) patch: PatchReport,
    /// Flipped rows patched into their standard rows (same request, cue and
    /// tier): where what the system prompt says about training reaches the
    /// user turn and the last token.
    pub(super) meaning_patch_dir: PathBuf,
    pub(super) meaning_patch: PatchReport,
    pub(super) attribute_dir: PathBuf,
    pub(super) attribute: AttributeReport,
    /// The heads with the most direct logit attribution, each patched alone
    /// (paid into free) where the decision is read.
    pub(super) head_patch: PatchReport,
}

/// How many heads (by |direct logit attribution|) per-head patching covers.
const HEAD_PATCH_TOP: usize = 3;

/// Steering along the `training_implied` probe's direction at its best layer
/// on the standard and the flipped `natural` rows, ablation of that direction
/// at every layer, and a patching heatmap (paid into free) with direct logit
/// attribution on the standard rows, all on the first harmful requests.
pub(super) fn run_interventions(
    model: &Model,
    rows: &[Value],
    meaning: &Report,
    meaning_dir: &Path,
    activations: &Path,
) -> Result<Interventions> {
    let n_layers = model.config().n_layers;
    let layer = meaning
        .best
        .iter()
        .find(|b| b.method == Method::Logistic && b.position == Position::Last)
        .and_then(|b| b.layer)
        .unwrap_or(n_layers / 2);
    let picked = natural_rows_of_first_requests(rows, INTERVENTION_REQUESTS);
    let prompts = activations.join(format!("{NAME}.interventions.jsonl"));
    write_rows(&prompts, &picked)?;
    let direction = DirectionSource::Probe {
        dir: meaning_dir.to_path_buf(),
        method: Method::Logistic.name().into(),
    };
    let direction_tensor = TensorName {
        hook: HookPoint::ResidPost(layer),
        position: Position::Last,
    }
    .to_string();

    let mut steer_dirs = Vec::new();
    let mut steer = Vec::new();
    for variation in STEER_VARIATIONS {
        let dir = activations.join(format!("{NAME}-steer-{variation}"));
        println!(
            "\nsteering along the training_implied direction at layer {layer}, {variation} \
             `{INTERVENTION_CUE}` rows, from the cue on, beside {STEER_RANDOM} random directions:"
        );
        let report = steer::steer(
            model,
            &SteerSpec {
                prompts: prompts.clone(),
                out: dir.clone(),
                direction: direction.clone(),
                direction_tensor: None,
                points: vec![HookPoint::ResidPost(layer)],
                positions: SteerPositions::FromCue,
                alphas: STEER_ALPHAS.to_vec(),
                scale: SteerScale::Natural,
                scale_label: "training_implied".into(),
                scale_positive: None,
                random: STEER_RANDOM,
                norm_rows: 2 * INTERVENTION_REQUESTS,
                filter: format!("variation={variation}").parse()?,
                resamples: 2000,
                seed: 0,
                force: true,
            },
        )?;
        print!("{}", steer::format_table(&report));
        steer_dirs.push(dir);
        steer.push(report);
    }

    let standard: Filter = "variation=standard".parse()?;
    let ablate_run = |name: &str, direction: DirectionSource, tensor: String, filter: Filter| {
        let report = ablate::ablate(
            model,
            &AblateSpec {
                prompts: prompts.clone(),
                out: activations.join(format!("{NAME}-{name}")),
                direction,
                direction_tensor: tensor,
                points: (0..n_layers).map(HookPoint::ResidPost).collect(),
                filter,
                resamples: 2000,
                seed: 0,
                force: true,
            },
        )?;
        print!("{}", ablate::format_table(&report));
        Ok::<_, crate::error::Error>(report)
    };
    println!(
        "\nablating the training_implied direction of layer {layer} at every hook_resid_post:"
    );
    let ablate = ablate_run("ablate", direction, direction_tensor, Filter::default())?;
    let random_file = activations.join(format!("{NAME}-ablate-random.json"));
    let random = random_unit(model.config().d_model, &mut StdRng::seed_from_u64(0));
    write_atomic(
        &random_file,
        serde_json::Value::from(random).to_string().as_bytes(),
    )?;
    println!(
        "\nthe same ablation along a random direction (seed 0) on the standard rows, the baseline:"
    );
    let ablate_random = ablate_run(
        "ablate-random",
        DirectionSource::File(random_file),
        "random".into(),
        standard.clone(),
    )?;

    // Every sixth layer (and the last) at four position sets keeps each heatmap to ~35 s.
    let patch_layers: Vec<HookPoint> = (0..n_layers)
        .filter(|l| l % 6 == 0 || *l == n_layers - 1)
        .map(HookPoint::ResidPost)
        .collect();
    let token_positions = vec![
        PatchPosition::Decision,
        PatchPosition::Last(0),
        PatchPosition::Cue,
        PatchPosition::User,
    ];
    // Paid into free on the standard rows; the other patching runs below
    // change only what differs from it.
    let patch_dir = activations.join(format!("{NAME}-patch"));
    let tier_patch = PatchSpec {
        prompts: prompts.clone(),
        out: patch_dir.clone(),
        points: patch_layers.clone(),
        positions: token_positions.clone(),
        label: "tier".into(),
        source: "paid".into(),
        dest: "free".into(),
        pair_by: vec!["request_id".into(), "cue".into(), "variation".into()],
        filter: standard.clone(),
        max_pairs: None,
        heads: None,
        resamples: 2000,
        seed: 0,
        force: true,
    };
    let patch_run = |spec: &PatchSpec| {
        let report = patch::patch(model, spec)?;
        print!("{}", patch::format_table(&report));
        Ok::<_, crate::error::Error>(report)
    };
    let announce = |spec: &PatchSpec| {
        let names: Vec<String> = spec.positions.iter().map(ToString::to_string).collect();
        println!(
            "\npatching {}={} into {} on rows {}, hook_resid_post of every sixth layer x {}:",
            spec.label,
            spec.source,
            spec.dest,
            spec.filter,
            names.join(", ")
        );
    };
    announce(&tier_patch);
    let patch = patch_run(&tier_patch)?;
    // Flipped into standard on one tier: free rows comply less under flipped, paid rows
    // more, so over both tiers the two settings' mean p_accept nearly cancel.
    // Here the system message differs too (which tier it says is trained on):
    // patching it asks how far up the stack its meaning still lives there.
    // Layer 0 is left out: there the message is just the input that differs,
    // and patching it (the costliest cell: the whole prompt again) restores all.
    let meaning_patch_dir = activations.join(format!("{NAME}-patch-meaning"));
    let mut with_system = token_positions;
    with_system.push(PatchPosition::System);
    let meaning_spec = PatchSpec {
        out: meaning_patch_dir.clone(),
        points: patch_layers[1..].to_vec(),
        positions: with_system,
        label: "variation".into(),
        source: "flipped".into(),
        dest: "standard".into(),
        pair_by: vec!["request_id".into(), "cue".into(), "tier".into()],
        filter: "tier=free".parse()?,
        ..tier_patch.clone()
    };
    announce(&meaning_spec);
    let meaning_patch = patch_run(&meaning_spec)?;

    let attribute_dir = activations.join(format!("{NAME}-attribute"));
    println!("\ndirect logit attribution of the decision, free vs paid:");
    let attribute = attribute::attribute(
        model,
        &AttributeSpec {
            prompts: prompts.clone(),
            out: attribute_dir.clone(),
            filter: standard.clone(),
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

    let (head_layers, heads) = top_heads(&attribute, HEAD_PATCH_TOP);
    println!(
        "\npatching heads {heads:?} of layers {head_layers:?} alone (paid into free) at the decision \
         (the {HEAD_PATCH_TOP} heads of largest direct logit attribution among them):"
    );
    let head_patch = patch_run(&PatchSpec {
        out: activations.join(format!("{NAME}-patch-heads")),
        points: head_layers.into_iter().map(HookPoint::AttnZ).collect(),
        positions: vec![PatchPosition::Decision],
        heads: Some(heads),
        ..tier_patch
    })?;
    Ok(Interventions {
        layer,
        steer_dirs,
        steer,
        ablate,
        ablate_random,
        patch_dir,
        patch,
        meaning_patch_dir,
        meaning_patch,
        attribute_dir,
        attribute,
        head_patch,
    })
}

/// The layers and head indices of the `n` heads of largest |direct logit
/// attribution difference|: a patch run crosses them, so it covers those
/// heads (and the same indices in their layers).
fn top_heads(attribute: &AttributeReport, n: usize) -> (Vec<usize>, Vec<usize>) {
    let mut ranked: Vec<_> = attribute.heads.iter().collect();
    ranked.sort_by(|a, b| b.difference.abs().total_cmp(&a.difference.abs()));
    let (mut layers, mut heads) = (Vec::new(), Vec::new());
    for h in ranked.into_iter().take(n) {
        layers.extend(h.layer);
        heads.extend(h.head);
    }
    for v in [&mut layers, &mut heads] {
        v.sort_unstable();
        v.dedup();
    }
    (layers, heads)
}

/// The standard and flipped `natural` rows of the first `n` harmful requests,
/// in file order: the rows every intervention and the sampled gap run on.
pub(super) fn natural_rows_of_first_requests(rows: &[Value], n: usize) -> Vec<&Value> {
    let mut requests: Vec<&str> = Vec::new();
    rows.iter()
        .filter(|r| {
            r["cue"] == INTERVENTION_CUE
                && r["harmful"] == true
                // `cell` writes the variation list as probe filters read it (`standard` when empty).
                && cell(&r["variation"]).is_some_and(|v| STEER_VARIATIONS.contains(&v.as_str()))
        })
        .filter(|r| {
            let id = r["request_id"].as_str().unwrap_or_default();
            if !requests.contains(&id) {
                if requests.len() == n {
                    return false;
                }
                requests.push(id);
            }
            true
        })
        .collect()
}

/// Writes prompt rows as JSONL, atomically.
pub(super) fn write_rows(path: &Path, rows: &[&Value]) -> Result<()> {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(path, text.as_bytes())
}
