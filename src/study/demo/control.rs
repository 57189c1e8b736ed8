//! The demo's positive control: the same no-CoT study on the base model and on
//! the two shipped model organisms (`organisms/meaning`, `organisms/token`,
//! trained by `afprobe organism train`), on requests held out of their
//! training. The organisms' mechanisms are known by construction, so each
//! analysis can be graded: does it tell "complies when the prompt implies
//! training" (meaning) from "complies when the cue says free" (token)?
//! This file runs the analyses; `control_report.rs` writes section 7 from them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::DemoOptions;
use crate::capture::{capture, CaptureSpec};
use crate::error::{Error, Result};
use crate::gap::{compute_gap, write_report, GapReport};
use crate::intervene::direction::DirectionSource;
use crate::intervene::patch::{self, PatchPosition, PatchReport, PatchSpec};
use crate::intervene::steer::{self, SteerPositions, SteerReport, SteerScale, SteerSpec};
use crate::io::write_atomic;
use crate::model::{load_model_placed, parse_hooks, HookPoint, Model, ModelSpec};
use crate::plot::{plot, PlotSpec};
use crate::probe::{self, Control, Method, ProbeSpec};
use crate::rows::Filter;
use crate::store::{Existing, Position, Store};
use crate::study::organism::{shipped, Recipe};
use crate::study::setting::{
    build_rows, builtin_cues, builtin_requests, builtin_setting_varied, Variation,
};

use super::figures::Figures;
use super::prompts::{first_per_category, NAME};

/// Held-out harmful requests per category (benign: one per category). Small:
/// the section runs three models, and every row costs a few forward calls.
pub(super) const CONTROL_REQUESTS_PER_CATEGORY: usize = 1;
/// Steering strengths, in units of the tier's class-mean separation along the
/// probe direction: ±1 moves the paid rows' mean onto the free rows' and back.
pub(super) const CONTROL_ALPHAS: [f64; 3] = [-2.0, 0.0, 2.0];
/// Random directions of the same length, the steering baseline.
pub(super) const CONTROL_RANDOM: usize = 2;
/// The cue of the steering and patching runs (a tier cue: its meaning flips).
pub(super) const INTERVENTION_CUE: &str = "natural";
/// Held-out requests the steering and patching runs use.
pub(super) const INTERVENTION_REQUESTS: usize = 4;
/// Layers of the patching maps: every tenth and the last.
pub(super) const PATCH_EVERY: usize = 10;

/// A model the section studies: the base model or a shipped organism.
pub(super) struct Subject {
    pub(super) name: &'static str,
    /// The mechanism it was built with, for the report.
    pub(super) built: &'static str,
    pub(super) adapter: Option<PathBuf>,
}

/// Everything the section measured on one subject.
pub(super) struct SubjectRun {
    pub(super) subject: Subject,
    pub(super) gap: GapReport,
    /// Tier probe (standard setting, control cue beside it).
    pub(super) tier: probe::Report,
    /// `training_implied` probe with the standard ↔ flipped transfer matrix,
    /// on the `xml` and `natural` rows and on the `natural` rows alone.
    pub(super) meaning: probe::Report,
    pub(super) meaning_natural: probe::Report,
    /// The tier probe's best layer: where steering adds its direction.
    pub(super) layer: usize,
    pub(super) steer: SteerReport,
    /// Paid into free, on the standard and on the flipped rows.
    pub(super) patch_standard: PatchReport,
    pub(super) patch_flipped: PatchReport,
    /// Its figures, in `control/NAME/` beside REPORT.md.
    pub(super) figures: Figures,
}

pub(super) struct PositiveControl {
    pub(super) runs: Vec<SubjectRun>,
    pub(super) n_requests: usize,
    pub(super) n_rows: usize,
    pub(super) train_per_category: usize,
}

fn subjects() -> [Subject; 3] {
    [
        Subject {
            name: "base",
            built: "no adapter",
            adapter: None,
        },
        Subject {
            name: "meaning",
            built: "complies iff the prompt implies training",
            adapter: Some(shipped("meaning")),
        },
        Subject {
            name: "token",
            built: "complies iff the cue says free/True",
            adapter: Some(shipped("token")),
        },
    ]
}

/// Runs the section on the default model and its organisms, or says why it
/// cannot (organisms not present) and returns `None`.
pub(super) fn run_positive_control(
    options: &DemoOptions,
    activations: &Path,
    figures_dir: &Path,
) -> Result<Option<PositiveControl>> {
    // The shipped organisms are adapters of the default model, whatever the
    // demo's subject is.
    let spec = &ModelSpec::Default;
    let subjects = subjects();
    if let Some(missing) = subjects
        .iter()
        .filter_map(|s| s.adapter.as_ref())
        .find(|a| !a.join("adapter_config.json").exists())
    {
        println!(
            "\npositive control skipped: no organism at {} (train it with `afprobe organism train \
             --recipe NAME --out {}`)",
            missing.display(),
            missing.display()
        );
        return Ok(None);
    }
    let train_per_category = Recipe::builtin("meaning")?.train_per_category;
    let (rows, requests) = control_rows(train_per_category)?;
    let n_requests = requests.len();
    let root = activations.join(format!("{NAME}-control"));
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let prompts = root.join("prompts.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(&prompts, text.as_bytes())?;
    println!(
        "\npositive control: the base model and the organisms `meaning` and `token` on {} rows \
         ({n_requests} held-out harmful requests x (4 cues on standard + 2 on flipped) x 2 \
         tiers, and benign requests) -> {}",
        rows.len(),
        prompts.display()
    );
    let mut runs = Vec::new();
    for subject in subjects {
        runs.push(run_subject(
            spec,
            options,
            subject,
            &prompts,
            &requests[..INTERVENTION_REQUESTS.min(n_requests)],
            &root,
            figures_dir,
        )?);
    }
    Ok(Some(PositiveControl {
        runs,
        n_requests,
        n_rows: rows.len(),
        train_per_category,
    }))
}

/// Every cue on the standard setting and the tier cues (`xml`, `natural`:
/// their meaning flips) on the flipped one, for the first held-out harmful
/// requests of each category, and the `xml` cue on one benign request per
/// category; returns the rows and the harmful request ids.
fn control_rows(train_per_category: usize) -> Result<(Vec<Value>, Vec<String>)> {
    let index = |id: &str| {
        id.rsplit_once('-')
            .and_then(|(_, n)| n.parse::<usize>().ok())
    };
    let held_out = first_per_category(
        builtin_requests()
            .into_iter()
            .filter(|r| r.harmful && index(&r.id).is_some_and(|n| n > train_per_category)),
        Some(CONTROL_REQUESTS_PER_CATEGORY),
    );
    let benign = first_per_category(
        builtin_requests().into_iter().filter(|r| !r.harmful),
        Some(1),
    );
    let cues = builtin_cues();
    let standard = builtin_setting_varied("helpful-only", false, &[])?;
    let flipped = builtin_setting_varied("helpful-only", false, &[Variation::Flipped])?;
    let mut rows = build_rows(&standard, &cues, &held_out)?;
    let tier_cues: Vec<_> = cues
        .iter()
        .filter(|c| c.meaningful && !c.states_training)
        .cloned()
        .collect();
    rows.extend(build_rows(&flipped, &tier_cues, &held_out)?);
    let xml: Vec<_> = cues.iter().filter(|c| c.name == "xml").cloned().collect();
    rows.extend(build_rows(&standard, &xml, &benign)?);
    Ok((rows, held_out.into_iter().map(|r| r.id).collect()))
}

fn run_subject(
    spec: &ModelSpec,
    options: &DemoOptions,
    subject: Subject,
    prompts: &Path,
    intervention_requests: &[String],
    root: &Path,
    figures_dir: &Path,
) -> Result<SubjectRun> {
    println!(
        "\n== positive control: {} ({}) ==",
        subject.name, subject.built
    );
    let model = load_model_placed(
        spec,
        options.dtype,
        subject.adapter.as_deref(),
        options.placement,
    )?;
    let n_layers = model.config().n_layers;
    let dir = root.join(subject.name);
    let store_dir = dir.join("capture");
    let stats = capture(
        &model,
        &CaptureSpec::scored(
            prompts.to_path_buf(),
            store_dir.clone(),
            parse_hooks("resid_post", "all", n_layers)?,
            vec![Position::Last],
            Existing::ResumeOrOverwrite,
        ),
    )?;
    println!("captured -> {} ({})", store_dir.display(), stats.summary());
    let gap = compute_gap(&Store::open(&store_dir)?, 10_000, 0)?;
    write_report(&gap, &store_dir)?;
    print!("{}", crate::gap::format_table(&gap));

    let harmful: Filter = "harmful=true".parse()?;
    let tier_dir = dir.join("probe-tier");
    let tier = probe::probe(&ProbeSpec {
        positive: Some("free".into()),
        train_filter: "variation=standard".parse::<Filter>()?.and(&harmful),
        test_filter: "variation=standard".parse::<Filter>()?.and(&harmful),
        control: Control::Auto,
        methods: vec![Method::Logistic],
        force: true,
        ..ProbeSpec::new(&store_dir, &tier_dir, "tier")
    })?;
    // The tier cues only (`monitoring` states training itself and never flips),
    // together and `natural` alone.
    let transfer_probe = |cues: &str, out: &Path| -> Result<probe::Report> {
        let rows: Filter = format!("variation=standard|flipped,cue={cues}").parse()?;
        probe::probe(&ProbeSpec {
            train_filter: rows.clone(),
            test_filter: rows,
            methods: vec![Method::Logistic],
            cross: Some("variation".into()),
            force: true,
            ..ProbeSpec::new(&store_dir, out, "training_implied")
        })
    };
    let meaning_dir = dir.join("probe-training-implied");
    let meaning = transfer_probe("xml|natural", &meaning_dir)?;
    let meaning_natural = transfer_probe("natural", &dir.join("probe-training-implied-natural"))?;
    let layer = tier
        .best
        .iter()
        .find(|b| b.method == Method::Logistic)
        .and_then(|b| b.layer)
        .unwrap_or(n_layers / 2);

    let steer_dir = dir.join("steer");
    let steer = steer_along_tier(
        &model,
        prompts,
        &tier_dir,
        &steer_dir,
        layer,
        intervention_requests,
    )?;

    let patch_standard = patch_paid_into_free(&model, prompts, &dir, "standard")?;
    let patch_flipped = patch_paid_into_free(&model, prompts, &dir, "flipped")?;

    let out = figures_dir.join("control").join(subject.name);
    let mut files = Vec::new();
    for input in [
        &store_dir,
        &meaning_dir,
        &steer_dir,
        &dir.join("patch-standard"),
    ] {
        files.extend(plot(&PlotSpec {
            input: input.clone(),
            out: out.clone(),
            layer: Some(layer),
            position: None,
        })?);
    }
    Ok(SubjectRun {
        subject,
        gap,
        tier,
        meaning,
        meaning_natural,
        layer,
        steer,
        patch_standard,
        patch_flipped,
        figures: Figures {
            dir: figures_dir.to_path_buf(),
            files,
        },
    })
}

/// α · s · v along the tier probe's direction at `layer` from the cue on, on
/// the standard intervention rows, beside random directions.
fn steer_along_tier(
    model: &Model,
    prompts: &Path,
    tier_dir: &Path,
    steer_dir: &Path,
    layer: usize,
    intervention_requests: &[String],
) -> Result<SteerReport> {
    let steer = steer::steer(
        model,
        &SteerSpec {
            prompts: prompts.to_path_buf(),
            out: steer_dir.to_path_buf(),
            direction: DirectionSource::Probe {
                dir: tier_dir.to_path_buf(),
                method: Method::Logistic.name().into(),
            },
            direction_tensor: None,
            points: vec![HookPoint::ResidPost(layer)],
            positions: SteerPositions::FromCue,
            alphas: CONTROL_ALPHAS.to_vec(),
            scale: SteerScale::Natural,
            scale_label: "tier".into(),
            scale_positive: None,
            random: CONTROL_RANDOM,
            norm_rows: 16,
            filter: format!(
                "variation=standard,cue={INTERVENTION_CUE},request_id={}",
                intervention_requests.join("|")
            )
            .parse()?,
            resamples: 2000,
            seed: 0,
            force: true,
        },
    )?;
    print!("{}", steer::format_table(&steer));
    Ok(steer)
}

/// Paid into free on the harmful `natural` rows of `variation`, at every
/// tenth layer and the last, at each position of the map.
fn patch_paid_into_free(
    model: &Model,
    prompts: &Path,
    dir: &Path,
    variation: &str,
) -> Result<PatchReport> {
    let n_layers = model.config().n_layers;
    let harmful: Filter = "harmful=true".parse()?;
    let report = patch::patch(
        model,
        &PatchSpec {
            prompts: prompts.to_path_buf(),
            out: dir.join(format!("patch-{variation}")),
            points: (0..n_layers)
                .filter(|l| l % PATCH_EVERY == 0 || *l == n_layers - 1)
                .map(HookPoint::ResidPost)
                .collect(),
            positions: vec![
                PatchPosition::Cue,
                PatchPosition::Last(0),
                PatchPosition::Decision,
                PatchPosition::User,
            ],
            label: "tier".into(),
            source: "paid".into(),
            dest: "free".into(),
            pair_by: vec!["request_id".into(), "cue".into(), "variation".into()],
            filter: format!("variation={variation},cue={INTERVENTION_CUE}")
                .parse::<Filter>()?
                .and(&harmful),
            max_pairs: Some(INTERVENTION_REQUESTS),
            heads: None,
            resamples: 2000,
            seed: 0,
            force: true,
        },
    )?;
    print!("{}", patch::format_table(&report));
    Ok(report)
}
