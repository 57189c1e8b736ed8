//! `afprobe patch`: activation patching between paired rows. For every hook
//! point × position set, the destination row (default: free tier) runs with
//! its activation there replaced by the source row's (default: paid tier), and
//! the fraction of the source − destination difference in `p_accept` that the
//! patch restores is reported with a bootstrap interval over pairs.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use super::patch_position::{align, Aligned, PatchPosition};
pub use super::patch_spec::PatchSpec;
use super::patch_spec::{PairResult, PatchCell};
use super::{load_rows, p_accept, prepare_out, write_run, Clean, Row, RowCache, TokenCount};
use crate::error::{Error, Result};
use crate::model::{
    ActivationCache, CaptureRows, Edit, HookPoint, Hooks, KvCache, LogitsAt, Model, NamesFilter,
};
use crate::progress::Progress;
use crate::score::{continuation_logprobs, fed_trie, Scores};
use crate::stats::quantile_sorted;

/// The file that marks a finished patching run.
pub const PATCH_JSON: &str = crate::run_dir::RunKind::Patch.marker();

/// The source row run once: its activations at the patched points, the prompt
/// then its continuations' fed tokens as one token tree on the prompt's cache.
struct Source {
    acts: ActivationCache,
    prompt_len: usize,
    /// Per continuation (in name order): the captured row of each fed token.
    cont_rows: Vec<Vec<usize>>,
}

fn run_source(
    model: &Model,
    row: &Row,
    points: &[HookPoint],
    count: &mut TokenCount,
) -> Result<(Source, f64)> {
    let t = &model.transformer;
    let tokens = &row.rendered.tokens;
    let mut hooks = Hooks::capture(NamesFilter::Only(points.to_vec()), CaptureRows::All);
    let mut kv = KvCache::new();
    let last = t.forward(tokens, &mut kv, &mut hooks, &LogitsAt::Last)?;
    let named = &row.rendered.continuations;
    let conts: Vec<&[u32]> = named.values().map(Vec::as_slice).collect();
    let (logprobs, scored) =
        continuation_logprobs(t, &mut kv, std::slice::from_mut(&mut hooks), &last, &conts)?;
    // The tree's rows follow the prompt's, node for node as scoring built them.
    let (tree, paths) = fed_trie(&conts);
    let captured = points.first().map_or(Ok(0), |&p| {
        hooks.cache.require(p).and_then(|a| Ok(a.dim(0)?))
    })?;
    if captured != tokens.len() + tree.len() {
        return Err(Error::BadInput(format!(
            "row `{}`: the source's continuations did not run as one token tree",
            row.prompt.id
        )));
    }
    count.computed += tokens.len() + scored;
    count.naive += tokens.len() + scored;
    let cont_rows = paths
        .into_iter()
        .map(|p| p.into_iter().map(|n| tokens.len() + n).collect())
        .collect();
    let scores = Scores::from_logprobs(named, None, &logprobs);
    let source = Source {
        acts: hooks.cache,
        prompt_len: tokens.len(),
        cont_rows,
    };
    Ok((source, p_accept(&scores)))
}

/// The patch of one cell: the aligned prompt positions take the source's
/// activations; for `all`, each continuation's positions take the source's on
/// that continuation, one hooks entry per continuation (else one for all).
fn patch_hooks(
    point: HookPoint,
    position: PatchPosition,
    aligned: &[(usize, usize)],
    dst: &Row,
    src: &Source,
) -> Result<Vec<Hooks>> {
    let td = dst.rendered.tokens.len();
    // A source position past its prompt (the decision on a shared answer
    // token) is a node of the answer tree, on every continuation's path.
    let src_row = |s: usize| match s.checked_sub(src.prompt_len) {
        None => Ok(s as u32),
        Some(k) => src
            .cont_rows
            .first()
            .and_then(|path| path.get(k))
            .map(|&r| r as u32)
            .ok_or_else(|| Error::BadInput(format!("position {s} is past the source row"))),
    };
    // (destination position, source capture row)
    let aligned: Vec<(usize, usize)> = aligned
        .iter()
        .map(|&(d, s)| Ok((d, src_row(s)? as usize)))
        .collect::<Result<_>>()?;
    let replace = |pairs: Vec<(usize, usize)>| -> Result<Hooks> {
        let src_rows: Vec<u32> = pairs.iter().map(|&(_, s)| s as u32).collect();
        let values = src
            .acts
            .require(point)?
            .index_select(&Tensor::new(src_rows, &candle_core::Device::Cpu)?, 0)?;
        let mut hooks = Hooks::none();
        hooks.add_edit(
            point,
            Edit::Replace {
                positions: pairs.iter().map(|&(d, _)| d).collect(),
                values,
            },
        );
        Ok(hooks)
    };
    if position != PatchPosition::All {
        return Ok(vec![replace(aligned)?]);
    }
    debug_assert!(aligned.iter().all(|&(_, s)| s < src.prompt_len));
    src.cont_rows
        .iter()
        .map(|rows| {
            let mut pairs = aligned.to_vec();
            pairs.extend(rows.iter().enumerate().map(|(j, &s)| (td + j, s)));
            replace(pairs)
        })
        .collect()
}

/// One cell of the heatmap: a hook point and a position set, over all pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub hook: String,
    pub layer: Option<usize>,
    /// The head patched alone (`hook_z` cells).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<usize>,
    pub position: String,
    /// Pairs patched (with at least one aligned position).
    pub n_pairs: usize,
    /// Pairs where some positions had no counterpart (they were left unpatched).
    pub partly_aligned: usize,
    #[serde(deserialize_with = "crate::report_json::number")]
    pub p_patched: f64,
    /// Mean over pairs of p_patched − p_dest, with a bootstrap 95% interval
    /// (its ends NaN, written `null`, where no pair could be patched).
    #[serde(deserialize_with = "crate::report_json::number")]
    pub effect: f64,
    #[serde(deserialize_with = "crate::report_json::interval")]
    pub effect_ci95: [f64; 2],
    /// Σ(p_patched − p_dest) / Σ(p_source − p_dest): the share of the difference restored.
    pub restored: Option<f64>,
    pub restored_ci95: Option<[f64; 2]>,
}

/// `patch.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PatchReport {
    pub format: String,
    pub afprobe_version: String,
    pub model: String,
    pub settings: PatchSpec,
    pub n_pairs: usize,
    pub p_source: f64,
    pub p_dest: f64,
    pub cells: Vec<Cell>,
    pub tokens: TokenCount,
    pub seconds: f64,
}

/// A source row and its destination row.
struct Pair {
    source: usize,
    dest: usize,
}

/// Pairs rows by `pair_by` with source and destination values of `label`;
/// a row without a partner is an error that names it.
fn pair_rows(rows: &[Row], spec: &PatchSpec) -> Result<Vec<Pair>> {
    // Pairing key → (source row, destination row).
    type Slot = (Option<usize>, Option<usize>);
    let mut slots: BTreeMap<Vec<Option<String>>, Slot> = BTreeMap::new();
    let mut order = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let side = match row.field(&spec.label) {
            Some(v) if v == spec.source => 0,
            Some(v) if v == spec.dest => 1,
            _ => continue,
        };
        let key: Vec<Option<String>> = spec.pair_by.iter().map(|f| row.field(f)).collect();
        if key.iter().all(Option::is_none) {
            return Err(Error::BadInput(format!(
                "{}:{} (id `{}`): none of the pairing fields {} is set",
                spec.prompts.display(),
                row.prompt.line,
                row.prompt.id,
                spec.pair_by.join(", ")
            )));
        }
        let slot = slots.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            (None, None)
        });
        let place = if side == 0 { &mut slot.0 } else { &mut slot.1 };
        if let Some(other) = place.replace(i) {
            return Err(Error::BadInput(format!(
                "{}:{} (id `{}`) and line {} (id `{}`) are both {}={} with the same {}; pairs \
                 must be unique (add a field to --pair-by or filter the rows)",
                spec.prompts.display(),
                row.prompt.line,
                row.prompt.id,
                rows[other].prompt.line,
                rows[other].prompt.id,
                spec.label,
                if side == 0 { &spec.source } else { &spec.dest },
                spec.pair_by.join(", ")
            )));
        }
    }
    let mut pairs = Vec::new();
    for key in order {
        match slots[&key] {
            (Some(source), Some(dest)) => pairs.push(Pair { source, dest }),
            (Some(i), None) | (None, Some(i)) => {
                let row = &rows[i];
                return Err(Error::BadInput(format!(
                    "{}:{} (id `{}`): unpaired row: no row with {}={} and the same {}; filter \
                     the rows (--filter) or change --pair-by",
                    spec.prompts.display(),
                    row.prompt.line,
                    row.prompt.id,
                    spec.label,
                    if slots[&key].0.is_some() {
                        &spec.dest
                    } else {
                        &spec.source
                    },
                    spec.pair_by.join(", ")
                )));
            }
            (None, None) => {}
        }
    }
    if pairs.is_empty() {
        return Err(Error::BadInput(format!(
            "{}: no row has {}={} or {}={}; nothing to pair",
            spec.prompts.display(),
            spec.label,
            spec.source,
            spec.label,
            spec.dest
        )));
    }
    Ok(pairs)
}

/// Runs the patching sweep and writes `rows.jsonl` and `patch.json` into `spec.out`.
pub fn patch(model: &Model, spec: &PatchSpec) -> Result<PatchReport> {
    validate(spec, model.config().n_layers)?;
    let rows = load_rows(model, &spec.prompts, &spec.filter)?;
    let mut pairs = pair_rows(&rows, spec)?;
    if let Some(max) = spec.max_pairs {
        pairs.truncate(max);
    }
    check_spans(&rows, &pairs, spec)?;
    let heads = super::head_patch::heads(model, spec)?;
    prepare_out(&spec.out, PATCH_JSON, spec.force)?;

    let started = Instant::now();
    let mut count = TokenCount::default();
    let progress = Progress::new("patch", "pairs", pairs.len());
    let cells: Vec<PatchCell> = spec
        .points
        .iter()
        .flat_map(|&point| {
            spec.positions
                .iter()
                .map(move |&position| (point, position))
        })
        .flat_map(|(point, position)| {
            let per_head: Vec<Option<usize>> = match point {
                HookPoint::AttnZ(_) => heads.iter().copied().map(Some).collect(),
                _ => vec![None],
            };
            per_head.into_iter().map(move |head| PatchCell {
                point,
                position,
                head,
            })
        })
        .collect();
    let mut results: Vec<PairResult> = Vec::new();
    let mut previous: Option<RowCache> = None;
    let mut records = String::new();
    for pair in &pairs {
        let (src, dst) = (&rows[pair.source], &rows[pair.dest]);
        let (result, dst_cache) = if heads.is_empty() {
            patch_pair(model, src, dst, previous.as_ref(), &cells, spec, &mut count)?
        } else {
            super::head_patch::patch_pair(model, src, dst, previous.as_ref(), &cells, &mut count)?
        };
        records.push_str(&pair_record(src, dst, &result, &cells, spec));
        results.push(result);
        previous = Some(dst_cache);
        progress.advance(1, None);
    }
    progress.finish();

    let p_source = results.iter().map(|r| r.p_source).sum::<f64>() / results.len() as f64;
    let p_dest = results.iter().map(|r| r.p_dest).sum::<f64>() / results.len() as f64;
    let cells = cells
        .iter()
        .enumerate()
        .map(|(c, cell)| summarize(c, cell, &results, spec))
        .collect();
    let report = PatchReport {
        format: "afprobe-patch/1".into(),
        afprobe_version: env!("CARGO_PKG_VERSION").into(),
        model: model.spec.to_string(),
        settings: spec.clone(),
        n_pairs: results.len(),
        p_source,
        p_dest,
        cells,
        tokens: count,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_run(&spec.out, PATCH_JSON, &records, &report)?;
    Ok(report)
}

/// Refuses a run that cannot give a result: no cells, too few resamples, a layer
/// outside the model.
fn validate(spec: &PatchSpec, n_layers: usize) -> Result<()> {
    spec.points
        .iter()
        .try_for_each(|p| p.check_layer(n_layers))?;
    if spec.points.is_empty() || spec.positions.is_empty() {
        return Err(Error::BadInput(
            "patch needs at least one hook point and one position".into(),
        ));
    }
    crate::stats::check_resamples(spec.resamples)?;
    Ok(())
}

/// Every paired row has the spans its positions need (`cue`: a cue, `user`: a
/// user turn); the error names the row.
fn check_spans(rows: &[Row], pairs: &[Pair], spec: &PatchSpec) -> Result<()> {
    for pair in pairs {
        for &position in &spec.positions {
            let needs = match position {
                PatchPosition::Cue => ("cue", "a `cue_text` field"),
                PatchPosition::User => ("user", "a user turn (messages, or user_text)"),
                PatchPosition::System => (
                    "system",
                    "a system message whose text the chat template renders unchanged",
                ),
                _ => continue,
            };
            for i in [pair.source, pair.dest] {
                let r = &rows[i].rendered;
                let missing = match position {
                    PatchPosition::Cue => r.cue_span.is_none(),
                    PatchPosition::System => r.system_span.is_none(),
                    _ => r.user_span.is_none(),
                };
                if missing {
                    return Err(Error::BadInput(format!(
                        "{}:{} (id `{}`): --positions {} needs {}",
                        spec.prompts.display(),
                        rows[i].prompt.line,
                        rows[i].prompt.id,
                        needs.0,
                        needs.1
                    )));
                }
            }
        }
    }
    Ok(())
}

/// One pair: the source's activations, the clean destination, and every cell
/// patched, each reusing the destination's clean cache up to its first patched
/// position. Returns the scores and the destination's cache (the next pair's prefix).
fn patch_pair(
    model: &Model,
    src: &Row,
    dst: &Row,
    previous: Option<&RowCache>,
    cells: &[PatchCell],
    spec: &PatchSpec,
    count: &mut TokenCount,
) -> Result<(PairResult, RowCache)> {
    let (source, p_source) = run_source(model, src, &spec.points, count)?;
    let (mut dst_cache, dst_scores) =
        RowCache::run(model, dst, previous, &mut Hooks::none(), count)?;
    let mut patched = vec![f64::NAN; cells.len()];
    let mut dest_at = vec![f64::NAN; cells.len()];
    let mut partly = vec![false; cells.len()];
    // (cell, aligned destination ↔ source positions, positions without a counterpart)
    let mut plan: Vec<(usize, Aligned, usize)> = cells
        .iter()
        .enumerate()
        .map(|(c, cell)| {
            let (aligned, unaligned) = align(cell.position, &dst.rendered, &src.rendered);
            (c, aligned, unaligned)
        })
        .collect();
    // Later first positions first: the clean part of the cache only shrinks.
    let first = |aligned: &[(usize, usize)]| aligned.iter().map(|a| a.0).min().unwrap_or(0);
    plan.sort_by_key(|(_, aligned, _)| std::cmp::Reverse(first(aligned)));
    // The unpatched destination at each start, computed on the same split as
    // the patched runs, so a patch that changes nothing gives the same bits;
    // its residuals let each patched run start at its patch's block.
    let mut unpatched: Option<(usize, Clean)> = None;
    for (c, aligned, unaligned) in plan {
        partly[c] = unaligned > 0;
        if aligned.is_empty() {
            continue;
        }
        let start = first(&aligned);
        if unpatched.as_ref().is_none_or(|(s, _)| *s != start) {
            let clean = dst_cache.run_clean(model, dst, start, &spec.points, count)?;
            unpatched = Some((start, clean));
        }
        let clean = &unpatched.as_ref().expect("set above").1;
        dest_at[c] = p_accept(&clean.scores);
        let PatchCell {
            point, position, ..
        } = cells[c];
        let mut hooks = patch_hooks(point, position, &aligned, dst, &source)?;
        let scores =
            dst_cache.run_edited(model, dst, start, &mut hooks, count, clean.resume(point))?;
        patched[c] = p_accept(&scores);
    }
    let result = PairResult {
        p_source,
        p_dest: p_accept(&dst_scores),
        dest_at,
        patched,
        partly,
    };
    Ok((result, dst_cache))
}

/// The pair's line of `rows.jsonl`.
fn pair_record(
    src: &Row,
    dst: &Row,
    result: &PairResult,
    cells: &[PatchCell],
    spec: &PatchSpec,
) -> String {
    let mut record = serde_json::Map::new();
    record.insert("source".into(), json!(src.prompt.id));
    record.insert("dest".into(), json!(dst.prompt.id));
    for f in &spec.pair_by {
        if let Some(v) = dst.prompt.metadata.get(f) {
            record.insert(f.clone(), v.clone());
        }
    }
    record.insert("p_source".into(), json!(result.p_source));
    record.insert("p_dest".into(), json!(result.p_dest));
    let by_cell = |values: &[f64]| -> Value {
        let map: serde_json::Map<String, Value> = cells
            .iter()
            .zip(values)
            .filter(|(_, p)| p.is_finite())
            .map(|(cell, p)| (cell.to_string(), json!(p)))
            .collect();
        Value::Object(map)
    };
    record.insert("p_patched".into(), by_cell(&result.patched));
    // The destination unpatched on each cell's split (equal to p_dest up to float noise).
    record.insert("p_unpatched".into(), by_cell(&result.dest_at));
    format!("{}\n", Value::Object(record))
}

fn summarize(c: usize, cell: &PatchCell, results: &[PairResult], spec: &PatchSpec) -> Cell {
    let PatchCell {
        point,
        position,
        head,
    } = *cell;
    let used: Vec<&PairResult> = results
        .iter()
        .filter(|r| r.patched[c].is_finite())
        .collect();
    let n = used.len();
    let effect_of = |idx: &mut dyn Iterator<Item = usize>| {
        let (mut num, mut den, mut k) = (0.0, 0.0, 0usize);
        for i in idx {
            num += used[i].patched[c] - used[i].dest_at[c];
            den += used[i].p_source - used[i].dest_at[c];
            k += 1;
        }
        (num / k.max(1) as f64, num, den)
    };
    let (effect, num, den) = effect_of(&mut (0..n));
    // The restored share is undefined when source and destination barely differ.
    let defined = |num: f64, den: f64| (den.abs() > 1e-12).then(|| num / den);
    let mut rng = StdRng::seed_from_u64(spec.seed ^ c as u64);
    let (mut effects, mut shares) = (Vec::new(), Vec::new());
    if n > 0 {
        for _ in 0..spec.resamples {
            let (e, num, den) = effect_of(&mut (0..n).map(|_| rng.random_range(0..n)));
            effects.push(e);
            shares.extend(defined(num, den));
        }
    }
    effects.sort_by(f64::total_cmp);
    shares.sort_by(f64::total_cmp);
    let interval = |xs: &[f64]| [quantile_sorted(xs, 0.025), quantile_sorted(xs, 0.975)];
    Cell {
        hook: point.to_string(),
        layer: point.layer(),
        head,
        position: position.to_string(),
        n_pairs: n,
        partly_aligned: results.iter().filter(|r| r.partly[c]).count(),
        p_patched: used.iter().map(|r| r.patched[c]).sum::<f64>() / n.max(1) as f64,
        effect,
        effect_ci95: if n > 0 {
            interval(&effects)
        } else {
            [f64::NAN; 2]
        },
        restored: defined(num, den),
        restored_ci95: (shares.len() == spec.resamples && n > 0).then(|| interval(&shares)),
    }
}

/// The report as a table: restored share per hook (rows) and position (columns).
pub fn format_table(report: &PatchReport) -> String {
    let positions: Vec<String> = report
        .settings
        .positions
        .iter()
        .map(|p| p.to_string())
        .collect();
    let mut out = format!(
        "{} pairs; p_accept source {:.4}, destination {:.4} (difference {:+.4})\n\
         share of the difference restored by patching (source into destination):\n{:<28}",
        report.n_pairs,
        report.p_source,
        report.p_dest,
        report.p_source - report.p_dest,
        "hook"
    );
    for p in &positions {
        out.push_str(&format!(" {p:>10}"));
    }
    out.push('\n');
    let mut rows: Vec<(&str, Option<usize>)> = Vec::new();
    for c in &report.cells {
        if !rows.contains(&(c.hook.as_str(), c.head)) {
            rows.push((c.hook.as_str(), c.head));
        }
    }
    for (hook, head) in rows {
        let label = head.map_or(hook.to_string(), |h| format!("{hook}.h{h}"));
        out.push_str(&format!("{label:<28}"));
        for p in &positions {
            let cell = report
                .cells
                .iter()
                .find(|c| c.hook == hook && c.head == head && &c.position == p);
            let text = cell
                .and_then(|c| c.restored)
                .map_or("n/a".to_string(), |r| format!("{r:+.3}"));
            out.push_str(&format!(" {text:>10}"));
        }
        out.push('\n');
    }
    let partly: usize = report
        .cells
        .iter()
        .map(|c| c.partly_aligned)
        .max()
        .unwrap_or(0);
    if partly > 0 {
        out.push_str(&format!(
            "note: in up to {partly} pairs some positions of a cell had no counterpart (different \
             token counts) and were left unpatched; patch.json gives the count per cell\n"
        ));
    }
    out.push_str(&format!(
        "token-forwards: {} computed vs {} for one full forward per cell ({:.1}x fewer); {:.1} s\n",
        report.tokens.computed,
        report.tokens.naive,
        report.tokens.naive as f64 / report.tokens.computed.max(1) as f64,
        report.seconds
    ));
    out
}
