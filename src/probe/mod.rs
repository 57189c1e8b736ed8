//! `afprobe probe`: linear probes per hook, position and layer of a store,
//! with grouped cross-validation, baselines, a control cue, cross-condition
//! generalisation and the relation to compliance (README, "Probes and figures": `probes/NAME`).
//!
//! Every evaluation is "train on the rows of one filter, test on the rows of
//! another", inside grouped K-fold: a probe for fold f is fitted on the
//! training rows of every other fold and scores the test rows of fold f, so a
//! group (request) is never on both sides.

pub mod cv;
pub mod data;
pub mod estimators;
pub mod fit;
pub mod logistic;
pub mod metrics;
mod multi;
mod plan;
mod report;
mod results;
mod spec;
mod target;

use std::collections::BTreeMap;
use std::time::Instant;

use ndarray::Array2;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::progress::Progress;
pub use crate::rows::{Filter, Table};
use crate::store::{Position, Store, TensorName};
use cv::{cross_validate, shuffled_labels, summarize, Scores};
pub use data::{Folds, Labels};
pub use fit::{FitSettings, Method, Probe};
pub use multi::MultiLayer;
use plan::{training_sets, Plan, PlanRows};
use report::{best_rows, data_json, settings_json, write_outputs};
pub use report::{format_summary, load_vector, metrics_csv};
pub use results::{Extra, MetricRow, Report, Role, Skipped};
use spec::{check_sizes, select_tensors};
pub use spec::{Control, ProbeSpec, MAX_FOLDS, MAX_SHUFFLES};

pub const REPORT: &str = crate::run_dir::RunKind::Probes.marker();
pub const METRICS: &str = "metrics.csv";
pub const PROBES: &str = "probes.safetensors";

/// Everything the per-tensor work shares.
struct Context<'a> {
    spec: &'a ProbeSpec,
    labels: &'a Labels,
    groups: Vec<usize>,
    folds: Folds,
    plans: Vec<PlanRows>,
    p_accept: Vec<Option<f64>>,
    /// Within-tier correlation: the tier value of each row.
    tier: Vec<Option<String>>,
    /// Rows some evaluation trains or tests on.
    used: Vec<bool>,
}

/// A seed for one piece of work, independent of thread scheduling.
fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    // splitmix64 over the parts
    parts.iter().fold(seed, |acc, &p| {
        let mut z = acc ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// Runs `afprobe probe`; returns the report (also written to `spec.out`).
pub fn probe(spec: &ProbeSpec) -> Result<Report> {
    let started = Instant::now();
    check_spec(spec)?;
    let store = Store::open(&spec.acts)?;
    let table = Table::from_store(&store);
    if spec.target.is_some() {
        let tensors = select_tensors(&store, spec)?;
        return target::probe_target(spec, &store, &table, &tensors, started);
    }
    if let Some(m) = spec.methods.iter().find(|m| m.is_regression()) {
        return Err(Error::BadInput(format!(
            "--method {} fits a continuous --target FIELD; for a --label use logistic, \
             mean-diff, linfa-logistic or svm",
            m.name()
        )));
    }
    probe_label(spec, &store, &table, started)
}

/// Refuses a run before the store is read: probes already there (without
/// --force), no method, or counts out of bounds.
fn check_spec(spec: &ProbeSpec) -> Result<()> {
    if spec.out.join(REPORT).exists() && !spec.force {
        return Err(Error::BadInput(format!(
            "{} already holds probes; pass --force to overwrite them",
            spec.out.display()
        )));
    }
    if spec.methods.is_empty() {
        return Err(Error::BadInput("--method names no method".into()));
    }
    check_sizes(spec)
}

/// The probes of a label: every tensor, then the multi-layer groups, gathered
/// into the report.
fn probe_label(spec: &ProbeSpec, store: &Store, table: &Table, started: Instant) -> Result<Report> {
    let labels = Labels::read(table, &spec.label, spec.positive.as_deref())?;
    let groups = data::groups(table, &spec.group)?;
    let mut tensors = select_tensors(store, spec)?;
    let sets = spec.multi.resolve(store.manifest.model.n_layers)?;
    let multi_groups = multi::groups(&tensors, &sets)?;
    let (ctx, tier_field) = context(spec, table, &labels, groups)?;
    let mut results = probe_each(store, &tensors, &ctx);
    if !multi_groups.is_empty() {
        eprintln!(
            "afprobe: {} multi-layer probe(s) (concatenated and mean-score) on the main evaluation",
            multi_groups.len()
        );
        let n = tensors.len();
        let multi_results = multi::probe_groups(store, &multi_groups, n as u64, &ctx);
        results.extend(multi_results.into_iter().map(|(i, r)| (n + i, r)));
        tensors.extend(multi_groups.iter().map(|g| g.name.clone()));
    }
    let settings = settings_json(spec, &labels, tier_field, spec.control.resolve(table));
    let data = data_json(&ctx, table);
    assemble(spec, store, &tensors, results, settings, data, started)
}

/// What every tensor's work shares: the evaluations' rows, the grouped folds,
/// and the field `p_accept` is correlated within (`tier` where the rows have it).
fn context<'a>(
    spec: &'a ProbeSpec,
    table: &Table,
    labels: &'a Labels,
    groups: Vec<usize>,
) -> Result<(Context<'a>, &'a str)> {
    let (plans, used) = training_sets(spec, table, labels)?;
    let folds = Folds::grouped(&groups, &used, spec.folds, spec.seed)?;
    let tier_field = if table.column("tier").is_ok() {
        "tier"
    } else {
        spec.label.as_str()
    };
    let ctx = Context {
        spec,
        labels,
        folds,
        plans,
        p_accept: table.numbers("p_accept"),
        tier: table.column(tier_field)?.to_vec(),
        groups,
        used,
    };
    Ok((ctx, tier_field))
}

/// Probes every tensor in parallel; the results keep their tensor's index.
fn probe_each(
    store: &Store,
    tensors: &[String],
    ctx: &Context,
) -> Vec<(usize, Result<TensorResult>)> {
    let spec = ctx.spec;
    let n_fits =
        tensors.len() * spec.methods.len() * ctx.plans.len() * (1 + spec.shuffles) * spec.folds;
    eprintln!(
        "afprobe: probing {} tensors x {} method(s) x {} training sets, {}-fold grouped by `{}` \
         ({n_fits} fits)",
        tensors.len(),
        spec.methods.len(),
        ctx.plans.len(),
        spec.folds,
        spec.group
    );
    let progress = Progress::new("probe", "tensors", tensors.len());
    let results = tensors
        .par_iter()
        .enumerate()
        .map(|(i, name)| {
            let r = probe_tensor(store, name, i as u64, ctx);
            progress.advance(1, None);
            (i, r)
        })
        .collect();
    progress.finish();
    results
}

/// Gathers the per-tensor results into the report and writes the outputs.
fn assemble(
    spec: &ProbeSpec,
    store: &Store,
    tensors: &[String],
    results: Vec<(usize, Result<TensorResult>)>,
    settings: serde_json::Value,
    data: serde_json::Value,
    started: Instant,
) -> Result<Report> {
    let Gathered {
        metrics,
        skipped,
        few_distinct,
        weights,
    } = gather(tensors, results);
    if metrics.is_empty() {
        let reasons: Vec<String> = skipped
            .iter()
            .take(3)
            .map(|s| format!("{}: {}", s.tensor, s.reason))
            .collect();
        return Err(Error::BadInput(format!(
            "no tensor could be probed; {}",
            reasons.join("; ")
        )));
    }
    if let Some((name, [d, n])) = few_distinct.iter().next() {
        eprintln!(
            "afprobe: note: {} tensors have few distinct activations (e.g. {name}: {d} distinct \
             vectors in {n} rows); their rows differ only in the tokens before that position, \
             so a probe there can only read those tokens",
            few_distinct.len()
        );
    }
    let report = Report {
        afprobe_version: env!("CARGO_PKG_VERSION").into(),
        acts: spec.acts.display().to_string(),
        model: store.manifest.model.clone(),
        settings,
        data,
        best: best_rows(&metrics),
        metrics,
        skipped,
        few_distinct,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_outputs(&report, weights, &spec.out)?;
    Ok(report)
}

/// The per-tensor results in store order: metrics and weights of the probed
/// tensors, the skipped ones with their reason.
struct Gathered {
    metrics: Vec<MetricRow>,
    skipped: Vec<Skipped>,
    /// Tensors with fewer distinct vectors than half their rows: [distinct, rows].
    few_distinct: BTreeMap<String, [usize; 2]>,
    weights: Vec<(String, Vec<f32>)>,
}

fn gather(tensors: &[String], results: Vec<(usize, Result<TensorResult>)>) -> Gathered {
    let mut g = Gathered {
        metrics: Vec::new(),
        skipped: Vec::new(),
        few_distinct: BTreeMap::new(),
        weights: Vec::new(),
    };
    for (i, r) in results {
        match r {
            Ok(t) => {
                // Fewer distinct vectors than half the rows: the position sees a
                // prefix shared by many rows (e.g. `cue` precedes the request).
                if 2 * t.distinct < t.used {
                    g.few_distinct
                        .insert(tensors[i].clone(), [t.distinct, t.used]);
                }
                g.metrics.extend(t.metrics);
                g.weights.extend(t.weights);
            }
            Err(e) => {
                eprintln!("afprobe: skipping {}: {e}", tensors[i]);
                g.skipped.push(Skipped {
                    tensor: tensors[i].clone(),
                    reason: e.to_string(),
                });
            }
        }
    }
    g
}

struct TensorResult {
    metrics: Vec<MetricRow>,
    weights: Vec<(String, Vec<f32>)>,
    /// Distinct activation vectors among the rows used.
    distinct: usize,
    used: usize,
}

/// How many distinct vectors `x`'s `rows` hold, two rows being the same when
/// every entry agrees within 1e-4 of the first's largest entry: a batched
/// capture computes one position of two rows in calls of different sizes,
/// which changes the last bits. Counting stops once it passes `stop` (callers
/// only ask whether it is small).
fn distinct_rows(x: ndarray::ArrayView2<f32>, rows: &[usize], stop: usize) -> usize {
    // Each representative with its tolerance.
    let mut representatives: Vec<(ndarray::ArrayView1<f32>, f32)> = Vec::new();
    for &r in rows {
        let row = x.row(r);
        let seen = representatives.iter().any(|(rep, tolerance)| {
            rep.iter()
                .zip(row.iter())
                .all(|(a, b)| (a - b).abs() <= *tolerance)
        });
        if !seen {
            let tolerance = 1e-4 * row.iter().fold(0f32, |m, v| m.max(v.abs()));
            representatives.push((row, tolerance));
            if representatives.len() > stop {
                break;
            }
        }
    }
    representatives.len()
}

fn probe_tensor(store: &Store, name: &str, index: u64, ctx: &Context) -> Result<TensorResult> {
    let x = store.load(name)?;
    check_finite(&x, &ctx.used)?;
    let used: Vec<usize> = (0..x.nrows()).filter(|&r| ctx.used[r]).collect();
    let distinct = distinct_rows(x.view(), &used, used.len() / 2);
    let tensor: TensorName = name.parse()?;
    let spec = ctx.spec;
    let mut metrics = Vec::new();
    let mut weights = Vec::new();
    for (mi, &method) in spec.methods.iter().enumerate() {
        // The main row of this method, and the out-of-fold scores of main and control.
        let (mut main_row, mut main_oof, mut control_oof) = (None, None, None);
        for (pi, (plan, train, tests)) in ctx.plans.iter().enumerate() {
            let seed = |k: u64| derive_seed(spec.seed, &[index, mi as u64, pi as u64, k]);
            let y = &ctx.labels.y;
            let oofs = cross_validate(x.view(), y, &ctx.folds, train, tests, method, &spec.fit)?;
            let shuffled = shuffled_aurocs(x.view(), train, tests, method, ctx, &seed)?;
            let first = metrics.len();
            for (ti, (test, oof)) in plan.tests.iter().zip(&oofs).enumerate() {
                let scores = summarize(oof, y, &ctx.groups, spec.bootstrap, seed(ti as u64));
                let r_p_accept = if plan.role == Role::Main {
                    correlations(oof, ctx)
                } else {
                    BTreeMap::new()
                };
                metrics.push(metric_row(
                    &tensor.hook.to_string(),
                    tensor.position,
                    tensor.hook.layer(),
                    method,
                    plan,
                    test,
                    scores,
                    metrics::mean_std(&shuffled[ti]).map(|m| m.0),
                    r_p_accept,
                ));
            }
            match plan.role {
                Role::Main => {
                    main_row = Some(first);
                    main_oof = oofs.first().cloned();
                    weights.extend(main_weights(x.view(), name, method, &oofs[0], train, ctx)?);
                }
                Role::Control => control_oof = oofs.first().cloned(),
                Role::Cross => {}
            }
        }
        if let (Some(i), Some(main), Some(control)) = (main_row, main_oof, control_oof) {
            let seed = derive_seed(spec.seed, &[index, mi as u64, 9]);
            let y = &ctx.labels.y;
            let s = selectivity(&main, &control, y, &ctx.groups, spec.bootstrap, seed);
            metrics[i].extra.selectivity = s.0;
            metrics[i].extra.selectivity_lo = s.1.map(|c| c[0]);
            metrics[i].extra.selectivity_hi = s.1.map(|c| c[1]);
        }
    }
    Ok(TensorResult {
        metrics,
        weights,
        distinct,
        used: used.len(),
    })
}

/// The permutation baseline of one evaluation: per test set, the AUROCs of
/// probes refitted on shuffled training labels (`--shuffles` of them).
fn shuffled_aurocs(
    x: ndarray::ArrayView2<f32>,
    train: &[bool],
    tests: &[Vec<bool>],
    method: Method,
    ctx: &Context,
    seed: &dyn Fn(u64) -> u64,
) -> Result<Vec<Vec<f64>>> {
    let y = &ctx.labels.y;
    let mut shuffled: Vec<Vec<f64>> = vec![Vec::new(); tests.len()];
    for s in 0..ctx.spec.shuffles {
        let y_shuffled = shuffled_labels(y, train, seed(1000 + s as u64));
        let oofs = cross_validate(
            x,
            &y_shuffled,
            &ctx.folds,
            train,
            tests,
            method,
            &ctx.spec.fit,
        )?;
        for (acc, oof) in shuffled.iter_mut().zip(&oofs) {
            let labels: Vec<bool> = oof.rows.iter().map(|&r| y[r] == Some(true)).collect();
            acc.extend(metrics::auroc(&oof.scores, &labels));
        }
    }
    Ok(shuffled)
}

/// What the main evaluation keeps of a method in `probes.safetensors`: each
/// row's out-of-fold score (NaN where untested), and the probe refitted on
/// all training rows.
fn main_weights(
    x: ndarray::ArrayView2<f32>,
    name: &str,
    method: Method,
    oof: &cv::OutOfFold,
    train: &[bool],
    ctx: &Context,
) -> Result<Vec<(String, Vec<f32>)>> {
    let y = &ctx.labels.y;
    let mut oof_scores = vec![f32::NAN; y.len()];
    for (&r, &s) in oof.rows.iter().zip(&oof.scores) {
        oof_scores[r] = s as f32;
    }
    let mut weights = vec![(format!("{name}.{}.oof_score", method.name()), oof_scores)];
    let rows: Vec<usize> = (0..train.len()).filter(|&r| train[r]).collect();
    let labels: Vec<bool> = y.iter().map(|l| *l == Some(true)).collect();
    let probe = fit::fit(x, &rows, &labels, method, &ctx.spec.fit, None)?;
    weights.extend(probe_tensors(name, method, &probe));
    Ok(weights)
}

#[allow(clippy::too_many_arguments)]
fn metric_row(
    hook: &str,
    position: Position,
    layer: Option<usize>,
    method: Method,
    plan: &Plan,
    test: &Filter,
    s: Scores,
    shuffled_auroc: Option<f64>,
    r_p_accept: BTreeMap<String, Option<f64>>,
) -> MetricRow {
    MetricRow {
        hook: hook.into(),
        position,
        layer,
        method,
        role: plan.role,
        train: plan.train.to_string(),
        test: test.to_string(),
        scores: s,
        shuffled_auroc,
        r_p_accept,
        extra: Extra::default(),
    }
}

/// Refuses activations with NaN or infinite values in the rows used.
fn check_finite(x: &Array2<f32>, used: &[bool]) -> Result<()> {
    for (r, row) in x.outer_iter().enumerate() {
        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
            if used[r] {
                return Err(Error::BadInput(format!(
                    "non-finite activation {} at row {} (line {} of rows.jsonl), dimension {c}",
                    row[c],
                    r,
                    r + 1
                )));
            }
        }
    }
    Ok(())
}

/// Main − control AUROC and its paired 95% interval: each resample draws groups
/// (requests) once and takes both AUROCs on the main and control rows of those
/// groups, so the interval accounts for requests shared by both conditions.
pub fn selectivity(
    main: &cv::OutOfFold,
    control: &cv::OutOfFold,
    y: &[Option<bool>],
    groups: &[usize],
    resamples: usize,
    seed: u64,
) -> (Option<f64>, Option<[f64; 2]>) {
    let n_main = main.rows.len();
    let rows: Vec<usize> = main.rows.iter().chain(&control.rows).copied().collect();
    let scores: Vec<f64> = main.scores.iter().chain(&control.scores).copied().collect();
    let labels: Vec<bool> = rows.iter().map(|&r| y[r] == Some(true)).collect();
    let row_groups: Vec<usize> = rows.iter().map(|&r| groups[r]).collect();
    let auc = |idx: &mut dyn Iterator<Item = usize>| {
        let (s, l): (Vec<f64>, Vec<bool>) = idx.map(|i| (scores[i], labels[i])).unzip();
        metrics::auroc(&s, &l)
    };
    let difference = |resampled: &[usize]| {
        let main = auc(&mut resampled.iter().copied().filter(|&i| i < n_main))?;
        let control = auc(&mut resampled.iter().copied().filter(|&i| i >= n_main))?;
        Some(main - control)
    };
    let all: Vec<usize> = (0..rows.len()).collect();
    let estimate = difference(&all);
    let ci = metrics::group_bootstrap_ci(&row_groups, resamples, seed, difference);
    (estimate, ci)
}

/// Pearson r of out-of-fold score and `p_accept` within each tier value.
fn correlations(oof: &cv::OutOfFold, ctx: &Context) -> BTreeMap<String, Option<f64>> {
    let mut by_tier: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for (&r, &s) in oof.rows.iter().zip(&oof.scores) {
        if let (Some(t), Some(p)) = (&ctx.tier[r], ctx.p_accept[r]) {
            let e = by_tier.entry(t.clone()).or_default();
            e.0.push(s);
            e.1.push(p);
        }
    }
    by_tier
        .into_iter()
        .map(|(t, (s, p))| (t, metrics::pearson(&s, &p)))
        .collect()
}

/// `{tensor}.{method}.direction|norm|bias|mean|scale`: score = norm·(x·direction) + bias
/// (`.oof_score`, written beside them, is each row's out-of-fold score, NaN if untested).
fn probe_tensors(tensor: &str, method: Method, probe: &Probe) -> Vec<(String, Vec<f32>)> {
    let (unit, norm, bias) = probe.in_residual_basis();
    let f32s = |a: &ndarray::Array1<f64>| a.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let key = |part: &str| format!("{tensor}.{}.{part}", method.name());
    vec![
        (key("direction"), f32s(&unit)),
        (key("norm"), vec![norm as f32]),
        (key("bias"), vec![bias as f32]),
        (key("mean"), f32s(&probe.mean)),
        (key("scale"), f32s(&probe.scale)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn rows_equal_to_float_rounding_count_once() {
        let base = [1.0f32, -2.0, 0.5, 3.0];
        let mut x = ndarray::Array2::<f32>::zeros((6, 4));
        for r in 0..6 {
            for c in 0..4 {
                // Rows 0-3: one vector up to ~1e-6 relative; rows 4-5: two others.
                x[[r, c]] = match r {
                    0..=3 => base[c] * (1.0 + r as f32 * 3e-7),
                    4 => base[c] + 0.01,
                    _ => -base[c],
                };
            }
        }
        let rows: Vec<usize> = (0..6).collect();
        assert_eq!(distinct_rows(x.view(), &rows, 6), 3);
        assert_eq!(distinct_rows(x.view(), &rows, 1), 2, "stops past `stop`");
    }

    /// The cross matrix stays within --train-filter/--test-filter, takes its
    /// values from those rows, and its cells name their values.
    #[test]
    fn cross_cells_respect_the_filters() {
        let column = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect();
        let table = Table::from_columns(BTreeMap::from([
            ("cue".into(), column(&["xml", "xml", "natural", "control"])),
            (
                "variation".into(),
                column(&["standard", "flipped", "standard", "standard"]),
            ),
        ]));
        let spec = ProbeSpec {
            train_filter: "variation=standard".parse().unwrap(),
            test_filter: "variation=standard".parse().unwrap(),
            control: Control::Rows(Filter::equals("cue", &["control"])),
            cross: Some("cue".into()),
            ..ProbeSpec::new(Path::new("a"), Path::new("o"), "tier")
        };
        let plans = plan::plan(&spec, &table).unwrap();
        let main = &plans[0];
        assert_eq!(main.train.mask(&table).unwrap(), [true, false, true, false]);
        let cross: Vec<&Plan> = plans.iter().filter(|p| p.role == Role::Cross).collect();
        // control is a cell (the filters did not exclude it); the flipped xml row is in none.
        assert_eq!(cross.len(), 3);
        let xml = cross
            .iter()
            .find(|p| p.train.to_string().ends_with("cue=xml"))
            .unwrap();
        assert_eq!(xml.train.mask(&table).unwrap(), [true, false, false, false]);
        let row = MetricRow {
            hook: "h".into(),
            position: Position::Last,
            layer: Some(0),
            method: Method::Logistic,
            role: Role::Cross,
            train: xml.train.to_string(),
            test: xml.tests[1].to_string(),
            scores: Default::default(),
            shuffled_auroc: None,
            r_p_accept: BTreeMap::new(),
            extra: Extra::default(),
        };
        assert_eq!(row.cross_cell(), Some(("cue", "xml", "natural")));

        let only_flipped = ProbeSpec {
            train_filter: "variation=flipped".parse().unwrap(),
            test_filter: "variation=flipped".parse().unwrap(),
            ..spec
        };
        let err = plan::plan(&only_flipped, &table).unwrap_err().to_string();
        assert!(err.contains("1 value(s) among the filtered rows"), "{err}");
    }
}
