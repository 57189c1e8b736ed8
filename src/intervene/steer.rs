//! `afprobe steer`: add α·‖x‖·v to the residual stream at chosen layers and
//! positions, sweep α, and measure `p_accept` per row and per tier, beside the
//! same sweep along random directions of the same norm.
//!
//! α is in units of the typical residual norm at the steered hook (the mean
//! ‖x‖ at the last prompt token over the first rows, unsteered), so sweeps are
//! comparable across layers.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::{json, Value};

use super::direction::{random_unit, DirectionSource};
use super::{load_rows, p_accept, prepare_out, write_run, Row, RowCache, TokenCount};
use crate::error::{Error, Result};
use crate::model::{CaptureRows, Edit, HookPoint, Hooks, Model, NamesFilter, Positions};
use crate::progress::Progress;
use crate::rows::Filter;
use crate::stats::mean_ci;
use crate::store::{Position, TensorName};

/// The file that marks a finished steering run.
pub const STEER_JSON: &str = crate::run_dir::RunKind::Steer.marker();

/// Which positions the steering vector is added at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerPositions {
    /// Every position, continuation tokens included.
    All,
    /// The last prompt token only.
    Last,
    /// From the cue's first token on, continuation tokens included.
    FromCue,
}

impl fmt::Display for SteerPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SteerPositions::All => "all",
            SteerPositions::Last => "last",
            SteerPositions::FromCue => "from-cue",
        })
    }
}

impl FromStr for SteerPositions {
    type Err = Error;
    fn from_str(s: &str) -> Result<SteerPositions> {
        match s.trim() {
            "all" => Ok(SteerPositions::All),
            "last" => Ok(SteerPositions::Last),
            "from-cue" => Ok(SteerPositions::FromCue),
            other => Err(Error::BadInput(format!(
                "unknown steering positions `{other}`; valid: all, last, from-cue"
            ))),
        }
    }
}

/// Settings of one steering run.
#[derive(Debug, Clone, Serialize)]
pub struct SteerSpec {
    pub prompts: PathBuf,
    pub out: PathBuf,
    #[serde(serialize_with = "super::display")]
    pub direction: DirectionSource,
    /// Read the direction of this tensor (`{hook}@{position}`) for every layer,
    /// instead of the steered hook's own `@last` tensor.
    pub direction_tensor: Option<String>,
    /// The steered hook points (one per layer).
    #[serde(serialize_with = "super::names")]
    pub points: Vec<HookPoint>,
    #[serde(serialize_with = "super::display")]
    pub positions: SteerPositions,
    pub alphas: Vec<f64>,
    /// Also sweep random directions of the same norm (the baseline).
    pub random: bool,
    /// Rows whose unsteered last-token norm sets the α unit.
    pub norm_rows: usize,
    #[serde(serialize_with = "super::display")]
    pub filter: Filter,
    pub resamples: usize,
    pub seed: u64,
    pub force: bool,
}

/// One point of the sweep over all rows.
#[derive(Debug, Clone, Serialize)]
pub struct SteerCell {
    pub hook: String,
    pub layer: Option<usize>,
    pub alpha: f64,
    /// `direction` or `random`.
    pub kind: String,
    pub p_accept: f64,
    pub ci95: [f64; 2],
    /// Mean p_accept and its interval per value of `tier` (when rows have it).
    pub by_tier: BTreeMap<String, TierMean>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TierMean {
    pub n: usize,
    pub p_accept: f64,
    pub ci95: [f64; 2],
}

/// `steer.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SteerReport {
    pub format: String,
    pub afprobe_version: String,
    pub model: String,
    pub settings: SteerSpec,
    pub n_rows: usize,
    /// The α unit per steered hook: mean unsteered ‖x‖ at the last prompt token.
    pub norms: BTreeMap<String, f64>,
    /// Unsteered p_accept per tier.
    pub baseline: BTreeMap<String, TierMean>,
    pub cells: Vec<SteerCell>,
    pub tokens: TokenCount,
    pub seconds: f64,
}

/// Each cell's mean p_accept over rows and per tier, with bootstrap intervals
/// (cell `c` resamples with seed `seed ^ c`).
fn summarize_cells(
    spec: &SteerSpec,
    cells: &[(usize, f64, Along)],
    steered: &[Vec<f64>],
    tiers: &[Option<String>],
) -> Vec<SteerCell> {
    cells
        .iter()
        .zip(steered)
        .enumerate()
        .map(|(c, (&(p, alpha, kind), values))| {
            let seed = spec.seed ^ c as u64;
            let (mean, ci95) = mean_ci(values, spec.resamples, seed);
            SteerCell {
                hook: spec.points[p].to_string(),
                layer: spec.points[p].layer(),
                alpha,
                kind: kind.name().into(),
                p_accept: mean,
                ci95,
                by_tier: by_tier(values, tiers, spec.resamples, seed),
            }
        })
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
    if spec.resamples < 100 {
        return Err(Error::BadInput("--resamples must be at least 100".into()));
    }
    Ok(())
}

/// The unit vectors of a sweep, per steered point: the direction under test
/// and the seeded random baseline.
struct Units {
    direction: Vec<Vec<f32>>,
    random: Vec<Vec<f32>>,
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
            .map(|_| random_unit(d, &mut rng))
            .collect();
        Ok(Units { direction, random })
    }

    /// The vector point `p` adds along `kind`, scaled to length `scale`.
    fn scaled(&self, p: usize, kind: Along, scale: f64) -> Result<Tensor> {
        let unit = match kind {
            Along::Direction => &self.direction[p],
            Along::Random => &self.random[p],
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
    /// The same-norm random baseline.
    Random,
}

impl Along {
    fn name(self) -> &'static str {
        match self {
            Along::Direction => "direction",
            Along::Random => "random",
        }
    }
}

/// The sweep: (point index, α, what is added).
fn sweep(spec: &SteerSpec) -> Vec<(usize, f64, Along)> {
    let mut cells = Vec::new();
    for p in 0..spec.points.len() {
        for &alpha in &spec.alphas {
            cells.push((p, alpha, Along::Direction));
            if spec.random && alpha != 0.0 {
                cells.push((p, alpha, Along::Random));
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
    let norms = typical_norms(
        model,
        &rows[..spec.norm_rows.clamp(1, rows.len())],
        spec,
        &mut count,
    )?;
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
        for (c, &(p, alpha, kind)) in cells.iter().enumerate() {
            let point = spec.points[p];
            let mut hooks = Hooks::none();
            hooks.add_edit(
                point,
                Edit::Add {
                    vector: units.scaled(p, kind, alpha * norms[p])?,
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
            by_cell.insert(cell_name(point, alpha, kind), json!(p_steered));
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

/// `blocks.12.hook_resid_post@a+4` (`/random` for the baseline).
fn cell_name(point: HookPoint, alpha: f64, kind: Along) -> String {
    format!(
        "{point}@a{alpha:+}{}",
        if kind == Along::Direction {
            ""
        } else {
            "/random"
        }
    )
}

/// Mean unsteered ‖x‖ at the last prompt token per steered point, over `rows`.
fn typical_norms(
    model: &Model,
    rows: &[Row],
    spec: &SteerSpec,
    count: &mut TokenCount,
) -> Result<Vec<f64>> {
    let mut sums = vec![0.0; spec.points.len()];
    for row in rows {
        let tokens = &row.rendered.tokens;
        for (sum, norm) in sums
            .iter_mut()
            .zip(last_token_norms(model, tokens, &spec.points)?)
        {
            *sum += norm;
        }
        count.computed += tokens.len();
        count.naive += tokens.len();
    }
    Ok(sums.into_iter().map(|s| s / rows.len() as f64).collect())
}

/// ‖x‖ at the last token of `tokens` at each of `points` (one unedited forward, no scoring).
fn last_token_norms(model: &Model, tokens: &[u32], points: &[HookPoint]) -> Result<Vec<f64>> {
    let (_, cache) = model.run_with_cache(
        tokens,
        NamesFilter::Only(points.to_vec()),
        CaptureRows::Last,
    )?;
    points
        .iter()
        .map(|&point| {
            let x: Vec<f32> = cache.require(point)?.flatten_all()?.to_vec1()?;
            Ok(x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        })
        .collect()
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

/// The sweep as a table: p_accept per α (columns) for each hook and kind.
pub fn format_table(report: &SteerReport) -> String {
    let alphas = &report.settings.alphas;
    let mut out = format!(
        "{} rows; unsteered p_accept {}\np_accept by α (in units of the mean residual norm at the hook):\n{:<36}",
        report.n_rows,
        report
            .baseline
            .iter()
            .map(|(t, m)| format!("{t} {:.4}", m.p_accept))
            .collect::<Vec<_>>()
            .join(", "),
        "hook / direction"
    );
    for a in alphas {
        out.push_str(&format!(" {:>8}", format!("{a:+}")));
    }
    out.push('\n');
    for point in &report.settings.points {
        for kind in [Along::Direction, Along::Random].map(Along::name) {
            let row: Vec<&SteerCell> = report
                .cells
                .iter()
                .filter(|c| c.hook == point.to_string() && c.kind == kind)
                .collect();
            if row.is_empty() {
                continue;
            }
            out.push_str(&format!("{:<36}", format!("{point} {kind}")));
            for a in alphas {
                let v = row.iter().find(|c| c.alpha == *a);
                out.push_str(&format!(
                    " {:>8}",
                    v.map_or("-".into(), |c| format!("{:.4}", c.p_accept))
                ));
            }
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "token-forwards: {} computed vs {} for one full forward per cell; {:.1} s\n",
        report.tokens.computed, report.tokens.naive, report.seconds
    ));
    out
}
