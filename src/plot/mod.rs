//! `afprobe plot`: figures from a probe directory or an activation store,
//! as PNG and SVG, with a bundled font so they render on machines without fonts.

pub mod data;
pub mod figures;
pub mod interventions;
pub mod layout;
pub mod pca;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::gap::{GapReport, GapStats};
use crate::io::write_atomic;
use crate::model::HookPoint;
use crate::probe::{self, Method, MetricRow, Report, Role};
use crate::report_json;
use crate::run_dir::{has_gap, RunKind, GAP_JSON};
use crate::store::{Position, Store, TensorName};
use data::{Curve, Figure, Interval, LayerPoint, Marker, PointGroup, PALETTE, SIZE};

/// DejaVu Sans (Bitstream Vera licence, see fonts/LICENSE_DEJAVU).
static FONT_TTF: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_TTF)
            .unwrap_or_else(|_| panic!("the bundled font is a valid TTF"));
    });
}

/// Writes `stem.png` and `stem.svg` into `dir` (each via a temporary name).
pub fn save(figure: &Figure, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    register_font();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let png = dir.join(format!("{stem}.png"));
    // The encoder picks the format from the extension, so the temporary name keeps `.png`.
    let tmp = dir.join(format!(".{stem}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        figure
            .draw(&root)
            .map_err(|e| Error::BadInput(format!("cannot draw {}: {e}", png.display())))?;
    }
    std::fs::rename(&tmp, &png).map_err(|e| Error::io(&png, e))?;
    let svg = dir.join(format!("{stem}.svg"));
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
        figure
            .draw(&root)
            .map_err(|e| Error::BadInput(format!("cannot draw {}: {e}", svg.display())))?;
    }
    write_atomic(&svg, text.as_bytes())?;
    Ok(vec![png, svg])
}

/// `afprobe plot` options.
#[derive(Debug, Clone)]
pub struct PlotSpec {
    /// `probes/NAME` or `activations/NAME`.
    pub input: PathBuf,
    pub out: PathBuf,
    /// For a store: the layer and position of the PCA scatter (default: middle layer, first position).
    pub layer: Option<usize>,
    pub position: Option<Position>,
}

/// Renders every figure the input supports; returns the files written.
pub fn plot(spec: &PlotSpec) -> Result<Vec<PathBuf>> {
    let kind = RunKind::detect(&spec.input);
    if kind == Some(RunKind::Probes) {
        probe_figures(&spec.input, &spec.out)
    } else if kind == Some(RunKind::Activations) {
        store_figures(spec)
    } else if let Some(files) = interventions::intervention_figures(&spec.input, &spec.out)? {
        Ok(files)
    } else if has_gap(&spec.input) {
        // A sampling run: no activations, but its gap.
        gap_figures(&spec.input, &spec.out)
    } else {
        Err(Error::BadInput(format!(
            "{}: neither a probe directory (report.json), an activation store (manifest.json) \
             nor a run with gap.json, steer.json, patch.json or ablate.json",
            spec.input.display()
        )))
    }
}

/// The compliance-gap figure of a store with `gap.json`, and a PCA scatter.
fn store_figures(spec: &PlotSpec) -> Result<Vec<PathBuf>> {
    let store = Store::open(&spec.input)?;
    let mut files = Vec::new();
    if has_gap(&spec.input) {
        files.extend(gap_figures(&spec.input, &spec.out)?);
    }
    let m = &store.manifest;
    let position = spec
        .position
        .or_else(|| m.positions.iter().copied().find(|&p| p != Position::All))
        .ok_or_else(|| {
            Error::BadInput(format!(
                "{}: the store holds no per-row activations to plot (captured with \
                 --positions all only, or none)",
                spec.input.display()
            ))
        })?;
    let hook = match spec.layer {
        Some(l) => m
            .hooks
            .iter()
            .find(|h| h.parse::<HookPoint>().ok().and_then(|p| p.layer()) == Some(l))
            .ok_or_else(|| Error::BadInput(format!("the store has no hook at layer {l}")))?,
        None => m.hooks.get(m.hooks.len() / 2).ok_or_else(|| {
            Error::BadInput(format!(
                "{}: the store holds no activations to plot",
                spec.input.display()
            ))
        })?,
    };
    let tensor = TensorName::of(hook, position)?.to_string();
    let label = if store.column("tier").iter().any(Option::is_some) {
        "tier"
    } else {
        "cue"
    };
    files.extend(save(
        &pca_figure(&store, &tensor, label, "free")?,
        &spec.out,
        &format!("pca_{}", stem_of(&tensor)),
    )?);
    Ok(files)
}

/// `blocks.12.hook_resid_post@last` -> `resid_post_l12_last`.
fn stem_of(tensor: &str) -> String {
    let Ok(TensorName { hook, position }) = tensor.parse::<TensorName>() else {
        return tensor.replace(['.', '@'], "_");
    };
    let name = hook.to_string();
    let kind = hook_kind(&name).trim_start_matches("hook_");
    match hook.layer() {
        Some(l) => format!("{kind}_l{l}_{position}"),
        None => format!("{kind}_{position}"),
    }
}

/// `hook_resid_post` of `blocks.12.hook_resid_post`.
fn hook_kind(hook: &str) -> &str {
    hook.rsplit('.').next().unwrap_or(hook)
}

/// What the figures read of a label probe's settings.
#[derive(Deserialize)]
struct ProbedLabel {
    label: String,
    positive: String,
    negative: Vec<String>,
}

fn probe_figures(dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let report = Report::read(dir)?;
    // A regression probe has no label; its AUROC panels keep their placeholder
    // title, and it has no classifier for the PCA and score figures.
    let probed: Option<ProbedLabel> = if report.is_regression() {
        None
    } else {
        let path = dir.join(probe::REPORT);
        Some(report_json::part(&path, "settings", &report.settings)?)
    };
    let label = probed.as_ref().map_or("label (+ vs )".into(), |p| {
        format!("{} ({} vs {})", p.label, p.positive, p.negative.join("/"))
    });
    let mut files = Vec::new();
    let main_rows: Vec<&MetricRow> = report
        .metrics
        .iter()
        .filter(|m| m.role == Role::Main && m.layer.is_some())
        .collect();
    let panels: BTreeSet<(String, Position)> = main_rows
        .iter()
        .map(|m| (hook_kind(&m.hook).to_string(), m.position))
        .collect();
    let store = match Store::open(Path::new(&report.acts)) {
        Ok(store) => Some(store),
        Err(e) => {
            eprintln!(
                "afprobe: note: the probed store is not readable ({e}); drawing only the \
                 figures that need no activations"
            );
            None
        }
    };
    for (kind, position) in panels {
        let in_panel = |m: &&MetricRow| hook_kind(&m.hook) == kind && m.position == position;
        let rows: Vec<&MetricRow> = report.metrics.iter().filter(in_panel).collect();
        let suffix = format!("{}_{position}", kind.trim_start_matches("hook_"));
        files.extend(save(
            &auroc_figure(&rows, &label, &kind, position),
            out,
            &format!("auroc_{suffix}"),
        )?);
        let method = if rows.iter().any(|m| m.method == Method::Logistic) {
            Method::Logistic
        } else {
            Method::MeanDiff
        };
        let Some(best) = rows
            .iter()
            .filter(|m| m.role == Role::Main && m.method == method && m.layer.is_some())
            // The earliest layer among equals, as report.json's `best`.
            .max_by(|a, b| {
                let key =
                    |m: &MetricRow| (m.scores.auroc.unwrap_or(0.0), std::cmp::Reverse(m.layer));
                key(a)
                    .partial_cmp(&key(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
        else {
            continue;
        };
        let layer = best.layer.unwrap_or(0);
        if let Some(fig) = cross_figure(&rows, best, &label) {
            files.extend(save(&fig, out, &format!("cross_{suffix}"))?);
        }
        if let Some(fig) = transfer_figure(&rows, method, &label, &kind, position) {
            files.extend(save(&fig, out, &format!("transfer_{suffix}"))?);
        }
        let tensor = TensorName::of(&best.hook, position)?.to_string();
        if let (Some(store), Some(probed)) = (&store, &probed) {
            let fig = pca_figure(store, &tensor, &probed.label, &probed.positive)?;
            files.extend(save(&fig, out, &format!("pca_{suffix}"))?);
            let key = format!("{tensor}.{}.oof_score", method.name());
            let scores = probe::load_vector(dir, &key)?;
            if let Some(fig) = score_figure(store, &scores, &label, layer, position)? {
                files.extend(save(&fig, out, &format!("score_vs_p_accept_{suffix}"))?);
            }
        }
    }
    if let Some(store) = &store {
        if has_gap(&store.dir) {
            files.extend(gap_figures(&store.dir, out)?);
        }
    }
    Ok(files)
}

/// One line of the AUROC figure: which rows, which value, how drawn.
struct Line {
    name: &'static str,
    role: Role,
    method: Method,
    /// Plot the shuffled-label baseline instead of the AUROC.
    shuffled: bool,
    color: usize,
    marker: Marker,
    width: u32,
}

const AUROC_LINES: [Line; 4] = [
    Line {
        name: "logistic probe (95% CI)",
        role: Role::Main,
        method: Method::Logistic,
        shuffled: false,
        color: 0,
        marker: Marker::Circle,
        width: 3,
    },
    Line {
        name: "mean-difference probe",
        role: Role::Main,
        method: Method::MeanDiff,
        shuffled: false,
        color: 1,
        marker: Marker::Triangle,
        width: 2,
    },
    Line {
        name: "control cue (logistic)",
        role: Role::Control,
        method: Method::Logistic,
        shuffled: false,
        color: 3,
        marker: Marker::Square,
        width: 6,
    },
    Line {
        name: "shuffled labels (logistic)",
        role: Role::Main,
        method: Method::Logistic,
        shuffled: true,
        color: 7,
        marker: Marker::None,
        width: 2,
    },
];

fn auroc_figure(rows: &[&MetricRow], label: &str, kind: &str, position: Position) -> Figure {
    let mut curves = Vec::new();
    for line in &AUROC_LINES {
        let mut points: Vec<LayerPoint> = rows
            .iter()
            .filter(|m| m.role == line.role && m.method == line.method)
            .filter_map(|m| {
                let value = if line.shuffled {
                    m.shuffled_auroc
                } else {
                    m.scores.auroc
                };
                let band = line.role == Role::Main && !line.shuffled;
                Some(LayerPoint {
                    layer: m.layer? as f64,
                    value: value?,
                    interval: m.scores.auroc_lo.zip(m.scores.auroc_hi).filter(|_| band),
                })
            })
            .collect();
        points.sort_by(|a, b| a.layer.total_cmp(&b.layer));
        if !points.is_empty() {
            // The control cue is drawn wide and pale under the probes (earlier
            // curves are drawn on top), so where both reach 1.0 both stay visible.
            let color = if line.role == Role::Control {
                data::lighten(PALETTE[line.color], 0.45)
            } else {
                PALETTE[line.color]
            };
            curves.push(Curve {
                label: line.name.into(),
                color,
                dashed: line.shuffled,
                marker: line.marker,
                width: line.width,
                points,
            });
        }
    }
    let low = curves
        .iter()
        .flat_map(|c| {
            c.points
                .iter()
                .map(|p| p.interval.map_or(p.value, |ci| ci.0))
        })
        .fold(0.4, f64::min);
    Figure::Layers {
        title: format!("Decoding {label} from {kind} @{position}"),
        x_label: "layer".into(),
        y_label: "AUROC (held-out requests)".into(),
        // Room below the curves for the legend.
        y_range: ((low - 0.02).clamp(0.0, 0.25), 1.02),
        reference: Some(0.5),
        curves,
    }
}

/// The train × test matrix at the best layer, if the report has one.
fn cross_figure(rows: &[&MetricRow], best: &MetricRow, label: &str) -> Option<Figure> {
    let cells: Vec<&&MetricRow> = rows
        .iter()
        .filter(|m| m.role == Role::Cross && m.hook == best.hook && m.method == best.method)
        .collect();
    if cells.is_empty() {
        return None;
    }
    let field = cells[0].cross_cell()?.0.to_string();
    let names: Vec<String> = cells
        .iter()
        .filter_map(|m| m.cross_cell())
        .map(|(_, train, _)| train.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut grid: BTreeMap<(String, String), Option<f64>> = BTreeMap::new();
    for m in &cells {
        if let Some((_, train, test)) = m.cross_cell() {
            grid.insert((train.to_string(), test.to_string()), m.scores.auroc);
        }
    }
    let values = names
        .iter()
        .map(|a| {
            names
                .iter()
                .map(|b| grid.get(&(a.clone(), b.clone())).copied().flatten())
                .collect()
        })
        .collect();
    Some(Figure::Heatmap {
        scale: (0.5, 1.0),
        title: format!(
            "{label}: AUROC across {field}s (layer {}, {})",
            best.layer.unwrap_or(0),
            best.method.name()
        ),
        row_label: format!("trained on {field}"),
        col_label: format!("tested on {field} (held-out requests)"),
        rows: names.clone(),
        cols: names,
        values,
    })
}

/// Most train → test pairs the by-layer transfer figure draws (a 3 × 3 matrix has 6).
const MAX_TRANSFER_CURVES: usize = 6;

/// Off-diagonal cells of the cross matrix as AUROC-by-layer curves with CIs: a
/// curve below 0.5 means the direction reverses on the test condition (e.g. it
/// follows the cue token where `flipped` reverses the meaning).
fn transfer_figure(
    rows: &[&MetricRow],
    method: Method,
    label: &str,
    kind: &str,
    position: Position,
) -> Option<Figure> {
    let mut by_pair: BTreeMap<(String, String), Vec<LayerPoint>> = BTreeMap::new();
    let mut field = String::new();
    for m in rows.iter().filter(|m| m.method == method) {
        let Some((f, train, test)) = m.cross_cell() else {
            continue;
        };
        if train == test {
            continue;
        }
        field = f.to_string();
        by_pair
            .entry((train.to_string(), test.to_string()))
            .or_default()
            .push(LayerPoint {
                layer: m.layer? as f64,
                value: m.scores.auroc?,
                interval: m.scores.auroc_lo.zip(m.scores.auroc_hi),
            });
    }
    if by_pair.is_empty() || by_pair.len() > MAX_TRANSFER_CURVES {
        return None;
    }
    let curves = by_pair
        .into_iter()
        .enumerate()
        .map(|(i, ((train, test), mut points))| {
            points.sort_by(|a, b| a.layer.total_cmp(&b.layer));
            Curve {
                label: format!("trained on {train}, tested on {test}"),
                color: PALETTE[i % PALETTE.len()],
                dashed: false,
                marker: Marker::Circle,
                width: 3,
                points,
            }
        })
        .collect();
    Some(Figure::Layers {
        title: format!("{label}: transfer across {field}s, {kind} @{position}"),
        x_label: "layer".into(),
        y_label: "AUROC on held-out requests (< 0.5: reversed)".into(),
        y_range: (0.0, 1.02),
        reference: Some(0.5),
        curves,
    })
}

/// PCA of one tensor, coloured by cue, filled for the positive class of `field`.
fn pca_figure(store: &Store, tensor: &str, field: &str, positive: &str) -> Result<Figure> {
    let others: BTreeSet<String> = store
        .column(field)
        .into_iter()
        .flatten()
        .filter(|v| v != positive)
        .collect();
    let negative = match others.len() {
        1 => format!("{field}={}", others.iter().next().expect("one value")),
        _ => format!("{field}!={positive}"),
    };
    let x = store.load(tensor)?;
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::BadInput(format!(
            "{}: `{tensor}` has non-finite values; no PCA plotted",
            store.dir.display()
        )));
    }
    let p = pca::pca2(x.view());
    let cues = store.column("cue");
    let labels = store.column(field);
    let mut groups: BTreeMap<(String, bool), Vec<(f64, f64)>> = BTreeMap::new();
    for (i, &xy) in p.coords.iter().enumerate() {
        let cue = cues[i].clone().unwrap_or_else(|| "-".into());
        let pos = labels[i].as_deref() == Some(positive);
        groups.entry((cue, pos)).or_default().push(xy);
    }
    let cue_names: Vec<String> = groups
        .keys()
        .map(|k| k.0.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let groups = groups
        .into_iter()
        .map(|((cue, pos), points)| PointGroup {
            label: if pos {
                format!("{cue}, {field}={positive}")
            } else {
                format!("{cue}, {negative}")
            },
            color: PALETTE[cue_names.iter().position(|c| *c == cue).unwrap_or(0) % PALETTE.len()],
            filled: pos,
            points,
        })
        .collect();
    Ok(Figure::Scatter {
        title: format!("PCA of {tensor} (standardised, {} rows)", x.nrows()),
        x_label: format!("PC1 ({:.1}% of variance)", 100.0 * p.explained[0]),
        y_label: format!("PC2 ({:.1}% of variance)", 100.0 * p.explained[1]),
        groups,
    })
}

/// Out-of-fold probe score against p_accept, coloured by tier; `None` without scores.
fn score_figure(
    store: &Store,
    scores: &[f32],
    label: &str,
    layer: usize,
    position: Position,
) -> Result<Option<Figure>> {
    let tiers = store.column("tier");
    let mut by_tier: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, row) in store.rows().iter().enumerate() {
        let p = row.get("p_accept").and_then(Value::as_f64);
        let s = scores.get(i).copied().filter(|s| s.is_finite());
        if let (Some(p), Some(s)) = (p, s) {
            let tier = tiers[i].clone().unwrap_or_else(|| "-".into());
            by_tier.entry(tier).or_default().push((s as f64, p));
        }
    }
    if by_tier.is_empty() {
        return Ok(None);
    }
    let groups = by_tier
        .into_iter()
        .enumerate()
        .map(|(i, (tier, points))| {
            let (xs, ys): (Vec<f64>, Vec<f64>) = points.iter().copied().unzip();
            let r = probe::metrics::pearson(&xs, &ys)
                .map_or("r n/a".into(), |r| format!("r = {r:+.2}"));
            PointGroup {
                label: format!("tier {tier} ({r}, n = {})", points.len()),
                color: PALETTE[i % PALETTE.len()],
                filled: true,
                points,
            }
        })
        .collect();
    Ok(Some(Figure::Scatter {
        title: format!("Probe score vs compliance (layer {layer} @{position}, out-of-fold)"),
        x_label: format!("probe score for {label} (logit)"),
        y_label: "p_accept".into(),
        groups,
    }))
}

/// The cue of a category: `xml` of `xml@flipped`.
fn cue_of(category: &str) -> &str {
    category.split('@').next().unwrap_or(category)
}

/// Display order of categories: by cue, the cue itself before its variations.
fn category_key(category: &str) -> (&str, bool, &str) {
    let (cue, variation) = category.split_once('@').unwrap_or((category, ""));
    (cue, !variation.is_empty(), variation)
}

/// A report's interval where both ends are numbers (a NaN or ±∞ was written as `null`).
fn finite_interval([lo, hi]: [f64; 2]) -> Option<(f64, f64)> {
    (lo.is_finite() && hi.is_finite()).then_some((lo, hi))
}

/// The bars of one gap block: per cue (each cue's variations after it), then
/// `overall` and `benign` as summaries in `summary_group`; labels start with
/// `prefix`. A gap or interval end written `null` (NaN or ±∞) has no bar.
fn gap_intervals(
    by_cue: &BTreeMap<String, GapStats>,
    overall: &Option<GapStats>,
    benign: &Option<GapStats>,
    prefix: &str,
    summary_group: &str,
) -> Vec<Interval> {
    let mut cues: Vec<(&str, &GapStats)> = by_cue.iter().map(|(c, s)| (c.as_str(), s)).collect();
    cues.sort_by(|a, b| category_key(a.0).cmp(&category_key(b.0)));
    let cues = cues.into_iter().map(|(cue, s)| (cue, s, false));
    let summaries = [("overall", overall), ("benign", benign)]
        .into_iter()
        .filter_map(|(name, s)| Some((name, s.as_ref()?, true)));
    cues.chain(summaries)
        .filter_map(|(name, s, summary)| {
            let (lo, hi) = finite_interval(s.ci95).filter(|_| s.gap.is_finite())?;
            Some(Interval {
                label: format!("{prefix}{name}"),
                value: s.gap,
                lo,
                hi,
                group: if summary {
                    summary_group.to_string()
                } else {
                    cue_of(name).to_string()
                },
                summary,
            })
        })
        .collect()
}

/// Compliance gap per cue (variations side by side: `xml`, `xml@flipped`, …)
/// with bootstrap intervals, from `gap.json`: `gap` for p_accept and
/// `gap_format_free` for 1 − p_refuse, each when present.
fn gap_figures(store_dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let path = store_dir.join(GAP_JSON);
    let gap: GapReport = report_json::read(&path)?;
    let format_free = gap.format_free.as_ref().map_or_else(Vec::new, |f| {
        gap_intervals(&f.by_cue, &f.overall, &f.benign, "", "summary")
    });
    let metrics = [
        (
            "gap",
            gap_intervals(&gap.by_cue, &gap.overall, &gap.benign, "", "summary"),
            "mean p_accept(free) - p_accept(paid)",
        ),
        (
            "gap_format_free",
            format_free,
            "format-free, mean (1 - p_refuse)(free) - (1 - p_refuse)(paid)",
        ),
    ];
    let mut files = Vec::new();
    for (name, items, what) in metrics {
        if items.is_empty() {
            continue;
        }
        let fig = Figure::Intervals {
            title: format!("Compliance gap, {what} per request"),
            y_label: "gap with 95% paired bootstrap CI".into(),
            items,
        };
        files.extend(save(&fig, out, name)?);
    }
    if files.is_empty() {
        return Err(Error::model_file(&path, "no gap statistics to plot"));
    }
    Ok(files)
}
