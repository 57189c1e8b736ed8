//! `afprobe probe` and `afprobe plot`.

use std::path::PathBuf;

use clap::Args;

use crate::plot;
use crate::probe::{self, FitSettings, Method, ProbeSpec};

pub const PROBE_ABOUT: &str = "Fit a linear probe for a binary label on every hook, position and \
layer of an activation store, and measure how well it decodes the label on held-out requests.\n\n\
Cross-validation is grouped K-fold (--folds) over --group (default request_id), so no request is \
in both the training and the test rows of a fold. Standardisation (mean, std) is fitted on the \
training rows of each fold only. Methods: logistic (L2 logistic regression with scikit-learn's \
objective, solved by L-BFGS to a gradient of 1e-6; --c is scikit-learn's C, default 1: a documented \
default, not tuned by inner CV) and mean-diff (difference of the standardised class means, \
threshold at the midpoint); also linfa-logistic (linfa's stock solver, same objective: a \
cross-check) and svm (linear SVM by linfa-svm); comma-separate several. Every probe is a linfa \
estimator (Fit/Predict on a Dataset).\n\n\
Selectivity: main - control AUROC with a paired group-bootstrap interval, per main probe. \
--target FIELD (a numeric row field such as p_accept) fits ridge (default) or elastic-net \
read-outs instead, reporting out-of-fold R2 and Pearson r with group-bootstrap intervals and a \
shuffled-target baseline. --multi-layer a-b / --layer-window N add probes over several layers \
(concatenated activations, and the mean of per-layer scores) on the main evaluation.\n\n\
Per probe: AUROC of the pooled out-of-fold scores with a 95% group-bootstrap interval \
(--bootstrap resamples of requests), mean and std of the per-fold AUROC, accuracy at score 0, \
balanced accuracy, the majority-class baseline, and the shuffled-label baseline (--shuffles \
refits on permuted labels, same folds). For the main probe, Pearson r between the out-of-fold \
score and p_accept within each tier says whether the probe relates to compliance.\n\n\
Label: --label FIELD of rows.jsonl; the positive class is --positive, else `true`, `free` for \
tier, else the later of two sorted values.\n\n\
Filters (--train-filter, --test-filter, --control) select rows by metadata: FIELD=VALUE or \
FIELD!=VALUE, alternatives with |, conditions joined with , (e.g. 'cue=xml|natural,harmful=true'). \
Train on one filter and test on another (e.g. cue=xml -> cue=natural) for generalisation; \
--cross FIELD gives the whole train x test matrix over the field's values. The control \
(default cue=control when the store has that cue) is probed on its own and left out of the main \
probe: a probe that decodes the meaningless control cue as well as the real one reads surface \
tokens.\n\n\
Writes OUT/report.json (settings, seeds, counts, every metric), OUT/metrics.csv (one row per \
probe and evaluation) and OUT/probes.safetensors (per tensor and method: unit direction in the \
residual basis, norm, bias, standardisation mean and scale, out-of-fold scores).";

pub const PROBE_EXAMPLES: &str = "Examples:\n  \
afprobe probe --acts activations/study --label tier --cross cue --out probes/study\n  \
afprobe probe --acts activations/study --label tier --train-filter cue=xml --test-filter cue=natural --out probes/xml-to-natural\n  \
afprobe probe --acts activations/study --label harmful --positive true --hooks resid_post --layers 10-20 --positions last --out probes/harm\n  \
afprobe probe --acts activations/study --target p_accept --method ridge --alpha 10 --out probes/p-accept\n  \
afprobe probe --acts activations/study --label tier --method logistic,svm --multi-layer 8-12 --out probes/multi";

#[derive(Args)]
pub struct ProbeArgs {
    /// Activation store (from `afprobe capture`).
    #[arg(long, value_name = "DIR")]
    acts: PathBuf,
    /// Metadata field to decode (e.g. tier, training_implied, harmful).
    #[arg(long, required_unless_present = "target", conflicts_with = "target")]
    label: Option<String>,
    /// A numeric row field to read out instead of a label (e.g. p_accept): ridge or
    /// elastic-net probes per layer with out-of-fold R² and Pearson r, group-bootstrap
    /// intervals and a shuffled-target baseline (main evaluation only).
    #[arg(long, value_name = "FIELD")]
    target: Option<String>,
    /// Multi-layer probe over these layers (a-b or a,b,c; repeat for more sets): one probe
    /// on the concatenated standardised activations and the mean of the per-layer scores,
    /// on the main evaluation, reported beside the single layers.
    #[arg(long, value_name = "LAYERS")]
    multi_layer: Vec<String>,
    /// Multi-layer probes over every window of this many consecutive layers.
    #[arg(long, value_name = "N")]
    layer_window: Option<usize>,
    /// Regularisation strength of ridge / elastic net (scikit-learn's alpha).
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Elastic net's L1 share (scikit-learn's l1_ratio).
    #[arg(long, default_value_t = 0.5)]
    l1_ratio: f64,
    /// The positive class (default: true, free for tier, else the later sorted value).
    #[arg(long, value_name = "VALUE")]
    positive: Option<String>,
    /// Rows with the same value of this field share a fold.
    #[arg(long, default_value = "request_id")]
    group: String,
    /// Hook kinds or names to probe (default: every hook in the store).
    #[arg(long)]
    hooks: Option<String>,
    /// Layers for --hooks kinds: all, 0-29, 0,5,10.
    #[arg(long, default_value = "all")]
    layers: String,
    /// Positions to probe (default: every per-row position in the store).
    #[arg(long, value_delimiter = ',')]
    positions: Option<Vec<String>>,
    /// Probe method(s), comma-separated: logistic, mean-diff, both (= logistic,mean-diff),
    /// linfa-logistic (linfa's stock solver, a cross-check), svm (linear SVM, linfa-svm);
    /// with --target: ridge (default) or elastic-net (linfa-elasticnet).
    #[arg(long)]
    method: Option<String>,
    /// Cross-validation folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Seed for fold assignment, shuffled labels and bootstrap (recorded in report.json).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows to train on.
    #[arg(long, default_value = "all", value_name = "FILTER")]
    train_filter: String,
    /// Rows to test on.
    #[arg(long, default_value = "all", value_name = "FILTER")]
    test_filter: String,
    /// Control rows (auto: cue=control if the store has it; none: no control).
    #[arg(long, default_value = "auto", value_name = "FILTER")]
    control: String,
    /// Field whose values give the train x test generalisation matrix (e.g. cue).
    #[arg(long, value_name = "FIELD")]
    cross: Option<String>,
    /// Inverse L2 strength of the logistic probe (scikit-learn's C).
    #[arg(long, default_value_t = 1.0)]
    c: f64,
    /// Shuffled-label refits per evaluation (0 turns the baseline off).
    #[arg(long, default_value_t = 1)]
    shuffles: usize,
    /// Group-bootstrap resamples for AUROC intervals.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Overwrite probes already in --out.
    #[arg(long)]
    force: bool,
    /// Output directory, e.g. probes/NAME.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub const PLOT_ABOUT: &str = "Render figures as PNG and SVG (a font is bundled, so this works \
on machines without fonts).\n\n\
From a probe directory (probes/NAME), per hook kind and position: auroc_* (AUROC by layer with \
the 95% bootstrap band, the mean-difference probe, the control cue and the shuffled-label \
baseline), cross_* (train x test generalisation matrix at the best layer, with --cross), pca_* \
(2-D PCA of the best layer, standardised, coloured by cue, filled for the positive class), \
score_vs_p_accept_* (out-of-fold probe score against p_accept per tier, with Pearson r), and gap \
(compliance gap per cue with CIs) when the probed store has gap.json.\n\n\
From an activation store (activations/NAME): gap (if `afprobe gap` was run) and pca_* of \
--layer (default: the middle hook) at --position.";

#[derive(Args)]
pub struct PlotArgs {
    /// probes/NAME or activations/NAME.
    input: PathBuf,
    /// Layer of the PCA scatter (store input only).
    #[arg(long)]
    layer: Option<usize>,
    /// Position of the PCA scatter (store input only).
    #[arg(long)]
    position: Option<String>,
    /// Output directory, e.g. figures/NAME.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    let spec = ProbeSpec {
        label: a.label.clone().unwrap_or_default(),
        target: a.target.clone(),
        multi: probe::MultiLayer {
            sets: a.multi_layer,
            window: a.layer_window,
        },
        positive: a.positive,
        group: a.group,
        hooks: a.hooks,
        layers: a.layers,
        positions: a
            .positions
            .map(|ps| ps.iter().map(|p| p.trim().parse()).collect())
            .transpose()?,
        methods: Method::parse_list(a.method.as_deref().unwrap_or(if a.target.is_some() {
            "ridge"
        } else {
            "both"
        }))?,
        folds: a.folds,
        seed: a.seed,
        train_filter: a.train_filter.parse()?,
        test_filter: a.test_filter.parse()?,
        control: a.control.parse()?,
        cross: a.cross,
        fit: FitSettings {
            c: a.c,
            alpha: a.alpha,
            l1_ratio: a.l1_ratio,
            ..FitSettings::default()
        },
        shuffles: a.shuffles,
        bootstrap: a.bootstrap,
        force: a.force,
        acts: a.acts,
        out: a.out,
    };
    let report = probe::probe(&spec)?;
    print!("{}", probe::format_summary(&report));
    eprintln!(
        "afprobe: {} probes in {:.1}s -> {}",
        report.metrics.len(),
        report.seconds,
        spec.out.display()
    );
    Ok(())
}

pub fn plot(a: PlotArgs) -> anyhow::Result<()> {
    let files = plot::plot(&plot::PlotSpec {
        input: a.input,
        out: a.out,
        layer: a.layer,
        position: a.position.as_deref().map(str::parse).transpose()?,
    })?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
