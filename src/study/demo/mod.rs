//! `afprobe demo`: the whole no-CoT study, end to end, on its subject
//! (Qwen2.5-Coder-0.5B-Instruct, the first real model here whose gap tracks
//! training) — a model tour, prompts, scored capture, compliance gap, a
//! sampled gap, probes with controls and the cross-cue matrix, the
//! meaning-vs-token variations, steering, ablation and patching
//! ([`interventions`]), the organisms of the default model as the positive
//! control ([`control`]), figures, and `figures/demo/REPORT.md` ([`report`]).

mod control;
mod control_report;
mod figures;
mod interventions;
mod markdown;
mod prompts;
mod report;
mod report_inputs;
mod timings;
mod verdict;

use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use crate::capture::{capture, CaptureSpec};
use crate::error::{Error, Result};
use crate::gap::{compute_gap, format_table, gap_from_rows, gap_of_run, write_report, GapReport};
use crate::generate::{argmax, generate_to_stdout, prompt_tokens, Sampling};
use crate::io::write_atomic;
use crate::model::transformer::{log_softmax, row_f32};
use crate::model::{
    load_model_placed, model_info, parse_hooks, CaptureRows, HookPoint, Hooks, Model, ModelSpec,
    NamesFilter, Placement, WeightDtype,
};
use crate::probe::{self, Control, Method, ProbeSpec};
use crate::rows::Filter;
use crate::store::{Existing, Position, Store};
use crate::study::sample::{self, SampleSpec};
use control::run_positive_control;
use figures::render_figures;
use interventions::{natural_rows_of_first_requests, run_interventions, write_rows};
use prompts::StudyPrompts;
pub use prompts::NAME;
use report::report_markdown;
use report_inputs::ReportInputs;
use timings::Timings;

/// Requests per category of the standard rows when the options say none:
/// 3 of each of the 12 categories (24 harmful, 12 benign) keeps the demo on
/// its 0.5B subject within 10 minutes on 2 cores.
pub const DEFAULT_REQUESTS_PER_CATEGORY: usize = 3;

/// Harmful requests of the sampled gap, samples per row and tokens per sample
/// (the accept tag is 7 tokens in Qwen's vocabulary).
const SAMPLE_REQUESTS: usize = 6;
const SAMPLES_PER_ROW: usize = 4;
const SAMPLE_TOKENS: usize = 12;

/// `afprobe demo` options.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Use only the first N built-in requests of each category (default:
    /// [`DEFAULT_REQUESTS_PER_CATEGORY`]).
    pub requests_per_category: Option<usize>,
    /// Weight precision after loading.
    pub dtype: WeightDtype,
    /// Where the model runs and what runs it (`--device`, `--engine`).
    pub placement: Placement,
}

pub fn demo(spec: &ModelSpec, options: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    let mut timings = Timings::default();
    let model = timings.time("model tour", || model_tour(spec, options))?;

    let activations = Path::new("activations");
    let StudyPrompts {
        rows,
        n_standard,
        cues,
        requests,
        variation_requests,
        path: prompts,
    } = StudyPrompts::write(
        options
            .requests_per_category
            .unwrap_or(DEFAULT_REQUESTS_PER_CATEGORY),
        activations,
    )?;

    let store_dir = activations.join(NAME);
    let capture_spec = CaptureSpec::scored(
        prompts,
        store_dir.clone(),
        parse_hooks("resid_post", "all", model.config().n_layers)?,
        vec![Position::Last, Position::Cue],
        // A killed demo picks up where it stopped; other settings start over.
        Existing::ResumeOrOverwrite,
    );
    let stats = timings.time("capture", || capture(&model, &capture_spec))?;
    println!(
        "captured every hook_resid_post at last and cue, with scores -> {} ({})",
        store_dir.display(),
        stats.summary()
    );

    let store = Store::open(&store_dir)?;
    let gap = timings.time("gap", || {
        let gap = compute_gap(&store, 10_000, 0)?;
        write_report(&gap, &store_dir)?;
        Ok(gap)
    })?;
    println!("\ncompliance gap (p_accept, free - paid):");
    print!("{}", format_table(&gap));
    // The standard setting on the variation rows' requests, for a side-by-side comparison.
    let matched: Vec<Value> = store
        .rows()
        .iter()
        .filter(|r| {
            variation_requests
                .iter()
                .any(|q| r["request_id"].as_str() == Some(q.id.as_str()))
        })
        .cloned()
        .collect();
    let matched_gap = gap_from_rows(&matched, &store_dir, 10_000, 0)?;

    let sampled = timings.time("sampled gap", || {
        sampled_gap(&model, &rows, &activations.join(format!("{NAME}-sample")))
    })?;

    let probes_dir = Path::new("probes").join(NAME);
    let meaning_dir = Path::new("probes").join(format!("{NAME}-meaning"));
    let report = timings.time("probes", || tier_probes(&store_dir, &probes_dir))?;
    let meaning = timings.time("meaning probes", || {
        meaning_probes(&store_dir, &meaning_dir)
    })?;

    let interventions = timings.time("interventions", || {
        run_interventions(&model, &rows, &meaning, &meaning_dir, activations)
    })?;

    let figures_dir = Path::new("figures").join(NAME);
    let control = timings.time("positive control", || {
        run_positive_control(options, activations, &figures_dir)
    })?;
    let figures = timings.time("figures", || {
        render_figures(&probes_dir, &meaning_dir, &interventions, &figures_dir)
    })?;
    let report_md = figures_dir.join("REPORT.md");
    let total = started.elapsed().as_secs_f64();
    let markdown = report_markdown(&ReportInputs {
        model: &store.manifest.model.spec,
        n_rows: rows.len(),
        n_standard,
        n_cues: cues.len(),
        n_requests: requests.len(),
        gap: &gap,
        matched_gap: &matched_gap,
        sampled: &sampled,
        probes: &report,
        meaning: &meaning,
        interventions: &interventions,
        control: control.as_ref(),
        figures: &figures,
        timings: &timings,
        total,
    })?;
    write_atomic(&report_md, markdown.as_bytes())?;
    println!(
        "\nfigures: {} files in {}\nreport: {}\ndemo finished in {:.0}s",
        figures.len(),
        figures_dir.display(),
        report_md.display(),
        total
    );
    Ok(())
}

/// Probes for the tier on the standard setting, with the control cue and the
/// cross-cue matrix.
fn tier_probes(store_dir: &Path, probes_dir: &Path) -> Result<probe::Report> {
    let standard: Filter = "variation=standard".parse()?;
    let spec = ProbeSpec {
        positive: Some("free".into()),
        train_filter: standard.clone(),
        test_filter: standard,
        control: Control::Auto,
        cross: Some("cue".into()),
        force: true,
        ..ProbeSpec::new(store_dir, probes_dir, "tier")
    };
    println!("\nprobes for tier (free vs paid), 5-fold grouped by request, with the control cue and the cross-cue matrix:");
    let report = probe::probe(&spec)?;
    print!("{}", probe::format_summary(&report));
    Ok(report)
}

/// Meaning vs token: a probe for training_implied (labels by meaning) trained
/// on one setting and tested on the other.
fn meaning_probes(store_dir: &Path, meaning_dir: &Path) -> Result<probe::Report> {
    // The natural-language tier cue: `monitoring` states training itself, so its meaning never
    // flips, and `xml` is read as a token by this model (its gap stays under `flipped`).
    let meaning_rows: Filter = "variation=standard|flipped,cue=natural".parse()?;
    let spec = ProbeSpec {
        train_filter: meaning_rows.clone(),
        test_filter: meaning_rows,
        positions: Some(vec![Position::Last]),
        methods: vec![Method::Logistic],
        cross: Some("variation".into()),
        force: true,
        ..ProbeSpec::new(store_dir, meaning_dir, "training_implied")
    };
    println!(
        "\nprobes for training_implied (by meaning) across the standard and flipped settings:"
    );
    let meaning = probe::probe(&spec)?;
    print!("{}", probe::format_summary(&meaning));
    Ok(meaning)
}

/// The sampled gap the alignment-faking notebooks measure: samples at
/// temperature 1 from the standard and flipped `natural` rows of the first
/// harmful requests, each read as
/// accepting when its answer starts with the accept tag; the refusal rules
/// give the format-free reading of the same samples.
fn sampled_gap(model: &Model, rows: &[Value], out: &Path) -> Result<GapReport> {
    let picked = natural_rows_of_first_requests(rows, SAMPLE_REQUESTS);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let prompts = out.with_extension("prompts.jsonl");
    write_rows(&prompts, &picked)?;
    println!(
        "\nsampled gap: {} rows x {SAMPLES_PER_ROW} samples at temperature 1, {SAMPLE_TOKENS} \
         tokens each -> {}",
        picked.len(),
        out.display()
    );
    sample::sample(
        model,
        &SampleSpec {
            prompts,
            out: out.to_path_buf(),
            n: SAMPLES_PER_ROW,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: SAMPLE_TOKENS,
            one_by_one: false,
            force: true,
            resume: false,
        },
    )?;
    let gap = gap_of_run(out, 10_000, 0)?;
    write_report(&gap, out)?;
    print!("{}", format_table(&gap));
    Ok(gap)
}

/// The first part of `afprobe demo`: facts, a hooked forward pass with a
/// per-layer summary (residual norm and logit-lens top token at the last
/// position) and a greedy answer. Returns the loaded model for the study.
fn model_tour(spec: &ModelSpec, options: &DemoOptions) -> Result<Model> {
    let model = load_model_placed(spec, options.dtype, None, options.placement)?;
    print!("{}", model_info(&model, false)?);
    let question = "What is the capital of France? Answer in one word.";
    let tokens = prompt_tokens(&model, question, None, false)?;
    println!(
        "\nprompt ({} tokens, chat template applied): {question:?}",
        tokens.len()
    );
    let n_layers = model.config().n_layers;
    let filter = NamesFilter::Only((0..n_layers).map(HookPoint::ResidPost).collect());
    let (logits, cache) = model.run_with_cache(&tokens, filter, CaptureRows::Last)?;
    println!("\nper-layer residual at the last token (blocks.{{l}}.hook_resid_post):");
    println!(
        "{:>5}  {:>9}  {:<16} {:>8}",
        "layer", "‖resid‖", "logit-lens top", "p"
    );
    for l in 0..n_layers {
        let resid = cache.require(HookPoint::ResidPost(l))?;
        let norm = resid.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let lens = log_softmax(&model.transformer.logit_lens(resid)?)?;
        let (id, logp) = top1(&row_f32(&lens, 0)?);
        let token = model.tokenizer.decode(&[id])?;
        println!(
            "{l:>5}  {norm:>9.2}  {:<16} {:>8.4}",
            format!("{token:?}"),
            logp.exp()
        );
    }
    let (id, logp) = top1(&row_f32(&log_softmax(&logits)?, 0)?);
    println!(
        "\nnext token: {:?} (p = {:.4})",
        model.tokenizer.decode(&[id])?,
        logp.exp()
    );
    print!("greedy answer: ");
    generate_to_stdout(
        &model,
        &tokens,
        &Sampling {
            max_new_tokens: 32,
            ..Sampling::default()
        },
        &mut Hooks::none(),
    )?;
    Ok(model)
}

fn top1(logprobs: &[f32]) -> (u32, f32) {
    let id = argmax(logprobs);
    (id, logprobs[id as usize])
}
