//! `afprobe steer`: add α·u·v to the residual stream at chosen layers and
//! positions, sweep α, and measure `p_accept` per row and per tier, beside the
//! same sweep along N random directions of the same length.
//!
//! The unit u ([`SteerScale`]) is, by default, the direction's natural scale:
//! the separation of the label's class means along v at the last prompt token
//! (unsteered), so α = 1 moves the negative class's mean onto the positive
//! class's. `--scale norm` takes the typical residual norm at the hook instead
//! (the mean ‖x‖), so sweeps are comparable across layers. Random directions
//! at the same length tell a direction that matters from one that merely
//! pushes the residual off its usual manifold: per hook and α, `steer.json`
//! gives the direction's effect, the random effects' 95% interval and the
//! direction's percentile among them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::direction::{random_unit, DirectionSource};
pub use super::steer_report::{
    format_table, EffectVsRandom, SteerCell, SteerReport, SteerSummary, TierMean,
};
pub use super::steer_spec::{SteerPositions, SteerScale, SteerSpec, MAX_RANDOM};
use super::{load_rows, p_accept, prepare_out, write_run, Row, RowCache, TokenCount};
use crate::error::{Error, Result};
use crate::model::{CaptureRows, Edit, HookPoint, Hooks, Model, NamesFilter, Positions};
use crate::probe::Labels;
use crate::progress::Progress;
use crate::rows::{Filter, Table};
use crate::stats::{mean_ci, quantile_linear};
use crate::store::{Position, TensorName};

/// The file that marks a finished steering run.
pub const STEER_JSON: &str = crate::run_dir::RunKind::Steer.marker();

/// Each cell's mean p_accept over rows and per tier, with bootstrap intervals
/// (cell `c` resamples with seed `seed ^ c`).
fn summarize_cells(
    spec: &SteerSpec,
    cells: &[Cell],
    steered: &[Vec<f64>],
    tiers: &[Option<String>],
) -> Vec<SteerCell> {
    cells
        .iter()
        .zip(steered)
        .enumerate()
        .map(
            |(
                c,
                (
                    &Cell {
                        point: p,
                        alpha,
                        along,
                    },
                    values,
                ),
            )| {
                let seed = spec.seed ^ c as u64;
                let (mean, ci95) = mean_ci(values, spec.resamples, seed);
                SteerCell {
                    hook: spec.points[p].to_string(),
                    layer: spec.points[p].layer(),
                    alpha,
                    kind: along.name().into(),
                    random_index: match along {
                        Along::Random(i) => Some(i),
                        Along::Direction => None,
                    },
                    p_accept: mean,
                    ci95,
                    by_tier: by_tier(values, tiers, spec.resamples, seed),
                }
            },
        )
        .collect()
}

/// Refuses a sweep that cannot give a result.
fn validate(spec: &SteerSpec, n_layers: usize) -> Result<()> {
    spec.points
        .iter()
        .try_for_each(|p| p.check_layer(n_layers))?;
    if spec.points.is_empty() || spec.alphas.is_empty() {
        return Err(Error::BadInput(
            "steer needs at least one layer and one α".into(),
        ));
    }
    if spec.alphas.iter().any(|a| !a.is_finite()) {
        return Err(Error::BadInput("--alphas must be finite numbers".into()));
    }
    crate::stats::check_resamples(spec.resamples)?;
    if spec.random > MAX_RANDOM {
        return Err(Error::BadInput(format!(
            "--random {}: at most {MAX_RANDOM} random directions (each adds a cell per layer and α)",
            spec.random
        )));
    }
    Ok(())
}

/// The unit vectors of a sweep, per steered point: the direction under test
/// and the seeded random baseline (`random[p][i]`).
struct Units {
    direction: Vec<Vec<f32>>,
    random: Vec<Vec<Vec<f32>>>,
}

impl Units {
    fn new(spec: &SteerSpec, d: usize) -> Result<Units> {
        let direction = spec
            .points
            .iter()
            .map(|&hook| {
                let tensor = spec.direction_tensor.clone().unwrap_or_else(|| {
                    TensorName {
                        hook,
                        position: Position::Last,
                    }
                    .to_string()
                });
                spec.direction.unit(&tensor, d)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let random = spec
            .points
            .iter()
            .map(|_| (0..spec.random).map(|_| random_unit(d, &mut rng)).collect())
            .collect();
        Ok(Units { direction, random })
    }

    /// The vector point `p` adds along `along`, scaled to length `scale`.
    fn scaled(&self, p: usize, along: Along, scale: f64) -> Result<Tensor> {
        let unit = match along {
            Along::Direction => &self.direction[p],
            Along::Random(i) => &self.random[p][i],
        };
        let vector: Vec<f32> = unit.iter().map(|x| x * scale as f32).collect();
        let d = vector.len();
        Ok(Tensor::from_vec(vector, d, &candle_core::Device::Cpu)?)
    }
}

/// Which vector a sweep cell adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Along {
    /// The direction under test.
    Direction,
    /// The `i`th random direction of the same length.
    Random(usize),
}

impl Along {
    fn name(self) -> &'static str {
        match self {
            Along::Direction => "direction",
            Along::Random(_) => "random",
        }
    }
}

/// One point of the sweep: which steered point, α, what is added.
#[derive(Debug, Clone, Copy)]
struct Cell {
    point: usize,
    alpha: f64,
    along: Along,
}

/// The sweep, in the order rows.jsonl lists it.
fn sweep(spec: &SteerSpec) -> Vec<Cell> {
    let mut cells = Vec::new();
    for point in 0..spec.points.len() {
        for &alpha in &spec.alphas {
            cells.push(Cell {
                point,
                alpha,
                along: Along::Direction,
            });
            if alpha != 0.0 {
                cells.extend((0..spec.random).map(|i| Cell {
                    point,
                    alpha,
                    along: Along::Random(i),
                }));
            }
        }
    }
    cells
}

/// Runs the sweep and writes `rows.jsonl` and `steer.json` into `spec.out`.
pub fn steer(model: &Model, spec: &SteerSpec) -> Result<SteerReport> {
    validate(spec, model.config().n_layers)?;
    let rows = load_rows(model, &spec.prompts, &spec.filter)?;
    if spec.positions == SteerPositions::FromCue {
        if let Some(r) = rows.iter().find(|r| r.rendered.cue_span.is_none()) {
            return Err(Error::BadInput(format!(
                "{}:{} (id `{}`): --positions from-cue needs a `cue_text` field",
                spec.prompts.display(),
                r.prompt.line,
                r.prompt.id
            )));
        }
    }
    let units = Units::new(spec, model.config().d_model)?;
    prepare_out(&spec.out, STEER_JSON, spec.force)?;

    let started = Instant::now();
    let mut count = TokenCount::default();
    let norms = alpha_units(model, &rows, &units, spec, &mut count)?;
    let cells = sweep(spec);
    let progress = Progress::new("steer", "rows", rows.len());
    let mut base = Vec::with_capacity(rows.len());
    let mut steered = vec![Vec::with_capacity(rows.len()); cells.len()];
    let mut previous: Option<RowCache> = None;
    let mut records = String::new();
    for row in &rows {
        let (mut cache, _) = RowCache::run(
            model,
            row,
            previous.as_ref(),
            &mut Hooks::none(),
            &mut count,
        )?;
        let last = row.rendered.tokens.len() - 1;
        let (start, positions) = match (spec.positions, row.rendered.cue_span) {
            (SteerPositions::FromCue, Some((cue, _))) => (cue, Positions::From(cue)),
            (SteerPositions::Last, _) => (last, Positions::At(vec![last])),
            _ => (0, Positions::All),
        };
        // Unsteered on the same split as the steered runs, so α = 0 gives the same
        // bits; its residuals let each steered run start at the steered block.
        let clean = cache.run_clean(model, row, start, &spec.points, &mut count)?;
        let unsteered = p_accept(&clean.scores);
        let mut by_cell = serde_json::Map::new();
        for (
            c,
            &Cell {
                point: p,
                alpha,
                along,
            },
        ) in cells.iter().enumerate()
        {
            let point = spec.points[p];
            let mut hooks = Hooks::none();
            hooks.add_edit(
                point,
                Edit::Add {
                    vector: units.scaled(p, along, alpha * norms[p])?,
                    positions: positions.clone(),
                },
            );
            let p_steered = p_accept(&cache.run_edited(
                model,
                row,
                start,
                std::slice::from_mut(&mut hooks),
                &mut count,
                clean.resume(point),
            )?);
            steered[c].push(p_steered);
            by_cell.insert(cell_name(point, alpha, along), json!(p_steered));
        }
        let mut record = row.record();
        record.insert("p_accept".into(), json!(unsteered));
        record.insert("p_steered".into(), Value::Object(by_cell));
        records.push_str(&format!("{}\n", Value::Object(record)));
        base.push(unsteered);
        previous = Some(cache);
        progress.advance(1, None);
    }
    progress.finish();

    let tiers: Vec<Option<String>> = rows.iter().map(|r| r.field("tier")).collect();
    let summary = summarize_against_random(spec, &cells, &steered, &base, &tiers);
    let cells = summarize_cells(spec, &cells, &steered, &tiers);
    let report = SteerReport {
        format: "afprobe-steer/1".into(),
        afprobe_version: env!("CARGO_PKG_VERSION").into(),
        model: model.spec.to_string(),
        settings: spec.clone(),
        n_rows: rows.len(),
        norms: spec
            .points
            .iter()
            .zip(&norms)
            .map(|(p, n)| (p.to_string(), *n))
            .collect(),
        baseline: by_tier(&base, &tiers, spec.resamples, spec.seed),
        cells,
        summary,
        tokens: count,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_run(&spec.out, STEER_JSON, &records, &report)?;
    Ok(report)
}

/// Steering of free text (`afprobe generate --steer`): α · ‖x‖ · v added at
/// `hook` of `layer` at every position, prompt and generated tokens, where ‖x‖
/// is the prompt's own residual norm at its last token there.
#[derive(Debug, Clone)]
pub struct TextSteering {
    /// A probe directory, a store (mean difference of `tier`) or a vector file.
    pub direction: PathBuf,
    pub layer: usize,
    /// Hook kind, e.g. `resid_post`.
    pub hook: String,
    /// α, in units of the prompt's residual norm.
    pub alpha: f64,
    /// The direction's tensor (`{hook}@{position}`); default: the steered hook's `@last`.
    pub tensor: Option<String>,
}

impl TextSteering {
    /// The editing hooks for `prompt`; says on stderr what is steered and by how much.
    pub fn hooks(&self, model: &Model, prompt: &[u32]) -> Result<Hooks> {
        let source = DirectionSource::parse(
            &self.direction,
            DirectionSource::DEFAULT_METHOD,
            DirectionSource::DEFAULT_LABEL,
            None,
            &Filter::default(),
        )?;
        let point = HookPoint::block(&self.hook, self.layer)?;
        point.check_layer(model.config().n_layers)?;
        let d = model.config().d_model;
        let tensor = self.tensor.clone().unwrap_or_else(|| {
            TensorName {
                hook: point,
                position: Position::Last,
            }
            .to_string()
        });
        let unit = source.unit(&tensor, d)?;
        let norm = last_token_norms(model, prompt, &[point])?[0];
        let scale = (self.alpha * norm) as f32;
        let vector: Vec<f32> = unit.iter().map(|v| v * scale).collect();
        let mut hooks = Hooks::none();
        hooks.add_edit(
            point,
            Edit::Add {
                vector: Tensor::from_vec(vector, d, &candle_core::Device::Cpu)?,
                positions: Positions::All,
            },
        );
        eprintln!(
            "afprobe: steering {point} by {} x {norm:.1} (the prompt's residual norm) along {source}",
            self.alpha
        );
        Ok(hooks)
    }
}

/// `blocks.12.hook_resid_post@a+4` (`/random3` for the fourth random direction).
fn cell_name(point: HookPoint, alpha: f64, along: Along) -> String {
    match along {
        Along::Direction => format!("{point}@a{alpha:+}"),
        Along::Random(i) => format!("{point}@a{alpha:+}/random{i}"),
    }
}

/// ln(p / (1 − p)), with p kept 1e-15 inside (0, 1) so a saturated row stays finite.
fn log_odds(p: f64) -> f64 {
    let p = p.clamp(1e-15, 1.0 - 1e-15);
    (p / (1.0 - p)).ln()
}

/// `direction`: the per-row effects; `random`: each random direction's mean effect.
fn compare(direction: &[f64], mut random: Vec<f64>, resamples: usize, seed: u64) -> EffectVsRandom {
    let (effect, effect_ci95) = mean_ci(direction, resamples, seed);
    random.sort_by(f64::total_cmp);
    let (random_ci95, percentile) = if random.is_empty() {
        (None, None)
    } else {
        let below = random.iter().filter(|r| **r < effect).count() as f64;
        let ties = random.iter().filter(|r| **r == effect).count() as f64;
        (
            Some([
                quantile_linear(&random, 0.025),
                quantile_linear(&random, 0.975),
            ]),
            Some(100.0 * (below + ties / 2.0) / random.len() as f64),
        )
    };
    EffectVsRandom {
        effect,
        effect_ci95,
        random_ci95,
        percentile,
    }
}

/// Per hook and non-zero α, the direction's mean effect on p_accept (and on
/// its log-odds) beside the random directions' effects (one number per
/// random direction: its mean effect over the same rows).
fn summarize_against_random(
    spec: &SteerSpec,
    cells: &[Cell],
    steered: &[Vec<f64>],
    base: &[f64],
    tiers: &[Option<String>],
) -> Vec<SteerSummary> {
    let effects = |values: &[f64], f: fn(f64) -> f64| -> Vec<f64> {
        values
            .iter()
            .zip(base)
            .map(|(s, b)| f(*s) - f(*b))
            .collect()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let identity: fn(f64) -> f64 = |p| p;
    let mut out = Vec::new();
    for (c, cell) in cells.iter().enumerate() {
        if cell.along != Along::Direction || cell.alpha == 0.0 {
            continue;
        }
        let random: Vec<&Vec<f64>> = cells
            .iter()
            .zip(steered)
            .filter(|(r, _)| {
                r.point == cell.point && r.alpha == cell.alpha && r.along != Along::Direction
            })
            .map(|(_, values)| values)
            .collect();
        let on_scale = |f: fn(f64) -> f64| {
            let random_means = random.iter().map(|v| mean(&effects(v, f))).collect();
            compare(
                &effects(&steered[c], f),
                random_means,
                spec.resamples,
                spec.seed ^ c as u64,
            )
        };
        let (p, lo) = (on_scale(identity), on_scale(log_odds));
        out.push(SteerSummary {
            hook: spec.points[cell.point].to_string(),
            alpha: cell.alpha,
            effect: p.effect,
            effect_ci95: p.effect_ci95,
            gap_effect: gap_of(&effects(&steered[c], identity), tiers),
            random_ci95: p.random_ci95,
            percentile: p.percentile,
            n_random: random.len(),
            log_odds: lo,
        });
    }
    out
}

/// Mean over free rows minus mean over paid rows (`None` without both).
fn gap_of(values: &[f64], tiers: &[Option<String>]) -> Option<f64> {
    let of = |tier: &str| {
        let v: Vec<f64> = values
            .iter()
            .zip(tiers)
            .filter(|(_, t)| t.as_deref() == Some(tier))
            .map(|(v, _)| *v)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Some(of("free")? - of("paid")?)
}

/// The α unit per steered point ([`SteerScale`]), from the unsteered last-token
/// residuals of up to `spec.norm_rows` rows spread evenly over `rows`.
fn alpha_units(
    model: &Model,
    rows: &[Row],
    units: &Units,
    spec: &SteerSpec,
    count: &mut TokenCount,
) -> Result<Vec<f64>> {
    let n = spec.norm_rows.clamp(1, rows.len());
    let picked: Vec<&Row> = (0..n).map(|i| &rows[i * rows.len() / n]).collect();
    let labels = match spec.scale {
        SteerScale::Norm => None,
        SteerScale::Natural => Some(row_labels(&picked, spec)?),
    };
    let points = spec.points.len();
    let mut norm_sums = vec![0.0; points];
    // Per point: sums and counts of v·x over the positive and the negative class.
    let mut class_sums = vec![[0.0f64; 2]; points];
    let mut class_counts = [0usize; 2];
    for (i, row) in picked.iter().enumerate() {
        let tokens = &row.rendered.tokens;
        let residuals = last_token_residuals(model, tokens, &spec.points)?;
        let class = labels.as_ref().and_then(|l| l[i]).map(usize::from);
        if let Some(class) = class {
            class_counts[class] += 1;
        }
        for (p, x) in residuals.iter().enumerate() {
            norm_sums[p] += x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if let Some(class) = class {
                let dot: f64 = x
                    .iter()
                    .zip(&units.direction[p])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                class_sums[p][class] += dot;
            }
        }
        count.computed += tokens.len();
        count.naive += tokens.len();
    }
    if spec.scale == SteerScale::Norm {
        return Ok(norm_sums.into_iter().map(|s| s / n as f64).collect());
    }
    if class_counts.contains(&0) {
        return Err(Error::BadInput(format!(
            "--scale natural needs rows of both classes of `{}` among the {n} rows that set the \
             scale (--norm-rows spreads them over the rows); found {} positive and {} negative. \
             Steer rows of both classes, choose --label, or pass --scale norm",
            spec.scale_label, class_counts[1], class_counts[0]
        )));
    }
    Ok(class_sums
        .iter()
        .map(|[neg, pos]| pos / class_counts[1] as f64 - neg / class_counts[0] as f64)
        .collect())
}

/// `Some(is_positive)` of `spec.scale_label` per row (`None` where absent).
fn row_labels(rows: &[&Row], spec: &SteerSpec) -> Result<Vec<Option<bool>>> {
    let column: Vec<Option<String>> = rows.iter().map(|r| r.field(&spec.scale_label)).collect();
    let table = Table::from_columns([(spec.scale_label.clone(), column)].into());
    Ok(Labels::read(&table, &spec.scale_label, spec.scale_positive.as_deref())?.y)
}

/// The residual at the last token of `tokens` at each of `points` (one unedited
/// forward, no scoring).
fn last_token_residuals(
    model: &Model,
    tokens: &[u32],
    points: &[HookPoint],
) -> Result<Vec<Vec<f32>>> {
    let (_, cache) = model.run_with_cache(
        tokens,
        NamesFilter::Only(points.to_vec()),
        CaptureRows::Last,
    )?;
    points
        .iter()
        .map(|&point| Ok(cache.require(point)?.flatten_all()?.to_vec1()?))
        .collect()
}

/// ‖x‖ at the last token of `tokens` at each of `points`.
fn last_token_norms(model: &Model, tokens: &[u32], points: &[HookPoint]) -> Result<Vec<f64>> {
    Ok(last_token_residuals(model, tokens, points)?
        .iter()
        .map(|x| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect())
}

/// Mean and bootstrap interval per tier value (rows without `tier` are left out).
fn by_tier(
    values: &[f64],
    tiers: &[Option<String>],
    resamples: usize,
    seed: u64,
) -> BTreeMap<String, TierMean> {
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (v, t) in values.iter().zip(tiers) {
        if let Some(t) = t {
            groups.entry(t.clone()).or_default().push(*v);
        }
    }
    groups
        .into_iter()
        .map(|(t, vs)| {
            let (p_accept, ci95) = mean_ci(&vs, resamples, seed);
            (
                t,
                TierMean {
                    n: vs.len(),
                    p_accept,
                    ci95,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intervene::steer_report::outside;

    /// A saturated row's change is visible in log-odds, not in p: from
    /// p = 0.9997 to 0.99975 is +0.00005 in p and +0.18 nats.
    #[test]
    fn log_odds_show_what_saturation_hides() {
        let (before, after) = (0.9997_f64, 0.99975_f64);
        assert!(after - before < 1e-4);
        let nats = log_odds(after) - log_odds(before);
        assert!((nats - (5.0_f64 / 6.0).ln().abs()).abs() < 1e-3, "{nats}");
        assert!(log_odds(1.0).is_finite() && log_odds(0.0).is_finite());
        let compared = compare(&[0.2, 0.21, 0.19], vec![0.05, -0.02, 0.01, 0.07], 200, 0);
        assert!(outside(compared.effect, compared.random_ci95, 0.1));
        assert_eq!(compared.percentile, Some(100.0));
        assert!(!outside(0.05, compared.random_ci95, 0.0));
    }
}
