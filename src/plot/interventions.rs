//! Figures of intervention runs: the steering sweep (p_accept against α per
//! tier, with the random-direction baseline), the patching heatmap (layer ×
//! position, share of the difference restored) and the ablation bars.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::data::{Curve, Figure, Interval, LayerPoint, Marker, PALETTE};
use super::{finite_interval, gap_intervals, save};
use crate::attribute::ComponentEffect;
use crate::error::{Error, Result};
use crate::gap::GapReport;
use crate::intervene::ablate::Change;
use crate::intervene::patch;
use crate::intervene::steer::SteerCell;
use crate::report_json::parse;
use crate::run_dir::RunKind;

/// What the steering figures read of `steer.json`. Its settings are not
/// read back: they name the direction's source for people, not for parsing.
#[derive(Deserialize)]
struct SteerRun {
    cells: Vec<SteerCell>,
}

/// What the patching heatmap reads of `patch.json`.
#[derive(Deserialize)]
struct PatchRun {
    settings: PatchSides,
    n_pairs: usize,
    cells: Vec<patch::Cell>,
}

/// The label values patched from and into (`settings.source`, `settings.dest`).
#[derive(Deserialize)]
struct PatchSides {
    source: String,
    dest: String,
}

/// What the ablation bars read of `ablate.json`: its settings name the
/// direction's source by `Display`, for people, so only the tensor is read back.
#[derive(Deserialize)]
struct AblateRun {
    settings: AblatedTensor,
    gap_change: GapReport,
    compliance: BTreeMap<String, Change>,
}

/// The tensor whose direction was ablated (`settings.direction_tensor`).
#[derive(Deserialize)]
struct AblatedTensor {
    direction_tensor: String,
}

/// What the attribution heatmap reads of `attribute.json`.
#[derive(Deserialize)]
struct AttributeRun {
    settings: ComparedValues,
    n_pairs: usize,
    components: Vec<ComponentEffect>,
}

/// The label field and the two values compared (`settings.label`, `.positive`, `.negative`).
#[derive(Deserialize)]
struct ComparedValues {
    label: String,
    positive: String,
    negative: String,
}

/// The figures of the intervention run in `dir`, if it is one (`None` otherwise).
pub fn intervention_figures(dir: &Path, out: &Path) -> Result<Option<Vec<PathBuf>>> {
    let Some(kind) = RunKind::detect(dir) else {
        return Ok(None);
    };
    let path = dir.join(kind.marker());
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    match kind {
        RunKind::Steer => steer_figures(&parse(&path, &text)?, out).map(Some),
        RunKind::Patch => {
            let fig = patch_figure(&parse(&path, &text)?)
                .ok_or_else(|| Error::model_file(&path, "no cells to plot"))?;
            save(&fig, out, "patch").map(Some)
        }
        RunKind::Ablate => save(&ablate_figure(&parse(&path, &text)?), out, "ablate").map(Some),
        RunKind::Attribute => {
            let fig = attribute_figure(&parse(&path, &text)?)
                .ok_or_else(|| Error::model_file(&path, "no components to plot"))?;
            save(&fig, out, "attribute").map(Some)
        }
        _ => parse::<IgnoredAny>(&path, &text).map(|_| None),
    }
}

/// The mean of the points at each α (several random directions per α), sorted by α.
fn mean_per_alpha(points: Vec<LayerPoint>) -> Vec<LayerPoint> {
    let mut out: Vec<(LayerPoint, usize)> = Vec::new();
    for p in points {
        match out.last_mut() {
            Some((last, n)) if last.layer == p.layer => {
                last.value += p.value;
                *n += 1;
            }
            _ => out.push((p, 1)),
        }
    }
    out.into_iter()
        .map(|(p, n)| LayerPoint {
            value: p.value / n as f64,
            interval: None,
            ..p
        })
        .collect()
}

/// One figure per steered hook: mean p_accept against α per tier, the steering
/// direction solid with its interval band, the random directions' mean dashed.
fn steer_figures(report: &SteerRun, out: &Path) -> Result<Vec<PathBuf>> {
    let mut by_hook: BTreeMap<(usize, &str), Vec<&SteerCell>> = BTreeMap::new();
    for c in &report.cells {
        by_hook
            .entry((c.layer.unwrap_or(0), &c.hook))
            .or_default()
            .push(c);
    }
    let mut files = Vec::new();
    for ((_, hook), cells) in by_hook {
        let mut curves: BTreeMap<(String, String), Vec<LayerPoint>> = BTreeMap::new();
        for c in &cells {
            let groups: Vec<(&str, f64, [f64; 2])> = if c.by_tier.is_empty() {
                vec![("all rows", c.p_accept, c.ci95)]
            } else {
                c.by_tier
                    .iter()
                    .map(|(t, m)| (t.as_str(), m.p_accept, m.ci95))
                    .collect()
            };
            for (tier, value, ci95) in groups {
                // NaN or ±∞ (written `null`): no point to draw.
                if !value.is_finite() {
                    continue;
                }
                curves
                    .entry((c.kind.clone(), tier.to_string()))
                    .or_default()
                    .push(LayerPoint {
                        layer: c.alpha,
                        value,
                        interval: finite_interval(ci95),
                    });
            }
        }
        // α = 0 has no random cell: the random curves start from the same unsteered point.
        let unsteered: Vec<(String, LayerPoint)> = curves
            .iter()
            .filter(|((kind, _), _)| kind == "direction")
            .flat_map(|((_, tier), points)| {
                points
                    .iter()
                    .filter(|p| p.layer == 0.0)
                    .map(|p| {
                        (
                            tier.clone(),
                            LayerPoint {
                                layer: 0.0,
                                value: p.value,
                                interval: None,
                            },
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for (tier, point) in unsteered {
            if let Some(points) = curves.get_mut(&("random".to_string(), tier)) {
                points.push(point);
            }
        }
        let tiers: Vec<String> = curves
            .keys()
            .map(|(_, t)| t.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let curves = curves
            .into_iter()
            .map(|((kind, tier), mut points)| {
                points.sort_by(|a, b| a.layer.total_cmp(&b.layer));
                if kind == "random" {
                    points = mean_per_alpha(points);
                }
                let color =
                    PALETTE[tiers.iter().position(|t| *t == tier).unwrap_or(0) % PALETTE.len()];
                let random = kind == "random";
                Curve {
                    label: format!(
                        "{tier}, {}",
                        if random {
                            "random directions (mean)"
                        } else {
                            "steering direction"
                        }
                    ),
                    color,
                    dashed: random,
                    marker: if random { Marker::None } else { Marker::Circle },
                    width: 3,
                    points: if random {
                        points
                            .into_iter()
                            .map(|p| LayerPoint {
                                interval: None,
                                ..p
                            })
                            .collect()
                    } else {
                        points
                    },
                }
            })
            .collect();
        let fig = Figure::Layers {
            title: format!("Steering at {hook}"),
            x_label: "α (units of the mean residual norm at the hook)".into(),
            y_label: "mean p_accept (95% CI)".into(),
            y_range: (0.0, 1.02),
            reference: None,
            curves,
        };
        let stem = format!("steer_{}", hook.replace('.', "_"));
        files.extend(save(&fig, out, &stem)?);
    }
    Ok(files)
}

/// Share of the difference restored, hooks (rows, by layer) × positions (columns).
fn patch_figure(report: &PatchRun) -> Option<Figure> {
    let mut hooks: Vec<(usize, String)> = Vec::new();
    let mut positions: Vec<String> = Vec::new();
    let mut grid: BTreeMap<(String, String), Option<f64>> = BTreeMap::new();
    for c in &report.cells {
        // A per-head cell (`hook_z`) is its own row: `blocks.3.attn.hook_z.h5`.
        let hook = match c.head {
            Some(h) => format!("{}.h{h}", c.hook),
            None => c.hook.clone(),
        };
        let key = (c.layer.map_or(0, |l| l + 1), hook.clone());
        if !hooks.contains(&key) {
            hooks.push(key);
        }
        if !positions.contains(&c.position) {
            positions.push(c.position.clone());
        }
        grid.insert((hook, c.position.clone()), c.restored);
    }
    hooks.sort();
    if hooks.is_empty() {
        return None;
    }
    let PatchSides { source, dest } = &report.settings;
    Some(Figure::Heatmap {
        title: format!(
            "Patching {source} into {dest}: share of the p_accept difference restored ({} pairs)",
            report.n_pairs
        ),
        scale: (0.0, 1.0),
        row_label: "hook".into(),
        col_label: "patched positions".into(),
        rows: hooks
            .iter()
            .map(|(_, h)| h.replace("blocks.", "").replace(".hook_", " "))
            .collect(),
        cols: positions.clone(),
        values: hooks
            .iter()
            .map(|(_, h)| {
                positions
                    .iter()
                    .map(|p| grid.get(&(h.clone(), p.clone())).copied().flatten())
                    .collect()
            })
            .collect(),
    })
}

/// Direct logit attribution: the positive − negative difference of each
/// layer's attention and MLP contribution to logit(accept) − logit(reject).
fn attribute_figure(report: &AttributeRun) -> Option<Figure> {
    let mut grid: BTreeMap<usize, [Option<f64>; 2]> = BTreeMap::new();
    for c in &report.components {
        let Some(layer) = c.layer else {
            continue;
        };
        let column = usize::from(c.component != "attn_out");
        // NaN or ±∞ (written `null`): an empty cell.
        grid.entry(layer).or_default()[column] = Some(c.difference).filter(|d| d.is_finite());
    }
    if grid.is_empty() {
        return None;
    }
    let largest = grid
        .values()
        .flatten()
        .flatten()
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(1e-9);
    let ComparedValues {
        label,
        positive,
        negative,
    } = &report.settings;
    Some(Figure::Heatmap {
        title: format!(
            "Direct logit attribution, {positive} − {negative} ({label}, {} pairs)",
            report.n_pairs
        ),
        scale: (0.0, largest),
        row_label: "layer".into(),
        col_label: "component".into(),
        rows: grid.keys().map(|l| l.to_string()).collect(),
        cols: vec!["attn_out".into(), "mlp_out".into()],
        values: grid.values().map(|cells| cells.to_vec()).collect(),
    })
}

/// The change in the compliance gap per cue and in mean p_accept on harmful and benign rows.
fn ablate_figure(report: &AblateRun) -> Figure {
    let change = &report.gap_change;
    let mut items = gap_intervals(
        &change.by_cue,
        &change.overall,
        &change.benign,
        "gap ",
        "gap",
    );
    for (name, c) in &report.compliance {
        // NaN or ±∞ (written `null`): no bar.
        if let Some((lo, hi)) = finite_interval(c.change_ci95).filter(|_| c.change.is_finite()) {
            items.push(Interval {
                label: format!("p_accept {name}"),
                value: c.change,
                lo,
                hi,
                group: "p_accept".into(),
                summary: true,
            });
        }
    }
    Figure::Intervals {
        title: format!(
            "Ablating {}: change in the gap and in compliance",
            report.settings.direction_tensor
        ),
        y_label: "after − before (95% CI)".into(),
        items,
    }
}
