//! `afprobe attribute`: direct logit attribution (DLA) of the decision.
//!
//! Where the two answer tags first differ — after the prompt and the tokens
//! they share (SmolLM2 writes both starting with `<`) — the logit difference
//! between the accept tag's token and the reject tag's there, `Δ = logit(a) −
//! logit(r)`, is a linear function of the final residual through the final
//! RMSNorm. Freezing the norm's scale at the row's value, `s = 1/√(mean(x²) +
//! eps)` (the approximation TransformerLens makes), the residual is the sum of
//! the embedding and every layer's `hook_attn_out` and `hook_mlp_out`, so
//!
//! `Δ = s · x·(g ⊙ (W_U[a] − W_U[r])) = Σ_c s · c·(g ⊙ (W_U[a] − W_U[r]))`
//!
//! exactly (g: the final norm's weight). Each component's term is its direct
//! contribution to the decision; the logit lens of the same difference at each
//! layer's `hook_resid_post` uses that layer's own scale. Where `hook_attn_out`
//! is `z · W_O` with no norm or bias after it, each head's term is
//! `s · z_h·(W_O,h (g ⊙ (W_U[a] − W_U[r])))` (`z_h`: the head's `attn.hook_z`,
//! `W_O,h`: its rows of the output projection), and the heads of a layer sum to
//! its `attn_out` term (TransformerLens' `stack_head_results`). Per tier means and the
//! free − paid difference per component, paired by request, with bootstrap
//! intervals. Gemma 2's final-logit soft-cap is not linear: there Δ is the
//! difference before the cap.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::intervene::{load_rows, prepare_out, write_run, Row};
use crate::model::{CaptureRows, HookPoint, Hooks, KvCache, LogitsAt, Model, NamesFilter};
use crate::progress::Progress;
use crate::report_json::{interval, number};
use crate::rows::Filter;
use crate::run_dir::RunKind;
use crate::stats::mean_ci;

/// The marker of an attribution run.
pub const ATTRIBUTE_JSON: &str = RunKind::Attribute.marker();

/// What `afprobe attribute` does.
#[derive(Debug, Clone, Serialize)]
pub struct AttributeSpec {
    pub prompts: PathBuf,
    pub out: PathBuf,
    #[serde(serialize_with = "crate::intervene::display")]
    pub filter: Filter,
    /// The field whose values are compared (default `tier`, free − paid).
    pub label: String,
    pub positive: String,
    pub negative: String,
    /// Fields that must be equal for two rows to pair.
    pub pair_by: Vec<String>,
    pub resamples: usize,
    pub seed: u64,
    pub force: bool,
}

/// One component's mean direct contribution, per class and as a paired
/// difference (a NaN is written `null` and read back as NaN).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentEffect {
    /// `embed`, `attn_out`, `mlp_out`, `head` (one attention head's share of
    /// `attn_out`), or `lens` (the logit lens of `resid_post`).
    pub component: String,
    pub layer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<usize>,
    #[serde(deserialize_with = "number")]
    pub mean_positive: f64,
    #[serde(deserialize_with = "number")]
    pub mean_negative: f64,
    /// Mean over pairs of positive − negative, with its bootstrap 95% interval.
    #[serde(deserialize_with = "number")]
    pub difference: f64,
    #[serde(deserialize_with = "interval")]
    pub ci95: [f64; 2],
}

/// `attribute.json`.
#[derive(Debug, Clone, Serialize)]
pub struct AttributeReport {
    pub format: String,
    pub afprobe_version: String,
    pub model: String,
    pub settings: AttributeSpec,
    pub n_rows: usize,
    pub n_pairs: usize,
    /// Largest |Σ components − Δ| over rows (float error; the identity is exact).
    pub max_sum_error: f64,
    /// Mean Δ per class and its paired difference.
    pub logit_diff: ComponentEffect,
    pub components: Vec<ComponentEffect>,
    pub lens: Vec<ComponentEffect>,
    /// Per attention head (`component: head`), where the model's blocks allow it
    /// (empty otherwise); each layer's heads sum to its `attn_out` term.
    pub heads: Vec<ComponentEffect>,
    /// Largest |Σ heads − attn_out term| over rows and layers (`z` is computed
    /// apart from the fused attention kernel, in f64).
    pub max_head_sum_error: Option<f64>,
    pub seconds: f64,
}

/// One row's attribution: Δ, the embedding, attention and MLP terms per layer, and the lens.
struct RowDla {
    logit_diff: f64,
    embed: f64,
    attn: Vec<f64>,
    mlp: Vec<f64>,
    lens: Vec<f64>,
    /// `[layer][head]`, empty where per-head terms are not available.
    heads: Vec<Vec<f64>>,
}

/// Runs the attribution and writes `rows.jsonl` and `attribute.json`.
pub fn attribute(model: &Model, spec: &AttributeSpec) -> Result<AttributeReport> {
    crate::stats::check_resamples(spec.resamples)?;
    let rows = load_rows(model, &spec.prompts, &spec.filter)?;
    let pairs = pair(&rows, spec)?;
    prepare_out(&spec.out, ATTRIBUTE_JSON, spec.force)?;
    let started = std::time::Instant::now();
    let n = model.config().n_layers;
    let mut points = vec![HookPoint::Embed];
    for l in 0..n {
        points.extend([
            HookPoint::AttnOut(l),
            HookPoint::MlpOut(l),
            HookPoint::ResidPost(l),
        ]);
    }
    let per_head = (0..n)
        .map(|l| model.transformer.head_out_weight(l, &[]))
        .collect::<Result<Vec<_>>>()?
        .iter()
        .all(Option::is_some);
    if per_head {
        points.extend((0..n).map(HookPoint::AttnZ));
    }
    let (g, eps) = model.transformer.final_norm_parts()?;
    let unembed = model.transformer.unembed()?;
    let progress = Progress::new("attribute", "rows", rows.len());
    let mut kv = KvCache::new();
    let mut results = Vec::with_capacity(rows.len());
    let mut records = String::new();
    for row in &rows {
        let (tokens, a, r) = decision_point(row, spec)?;
        let tokens = &tokens;
        // The difference direction through the norm weight: g ⊙ (W_U[a] − W_U[r]).
        let row_of = |id: u32| unembed.get(id as usize)?.to_dtype(candle_core::DType::F32);
        let d: Vec<f32> = (row_of(a)? - row_of(r)?)?.mul(&g)?.to_vec1()?;
        // Reuse the cache of the longest shared prefix; the last token is always run.
        let shared = kv.shared_prefix_len(tokens).min(tokens.len() - 1);
        kv.truncate(shared)?;
        let mut hooks = Hooks::capture(NamesFilter::Only(points.clone()), CaptureRows::Last);
        let logits =
            model
                .transformer
                .forward(&tokens[shared..], &mut kv, &mut hooks, &LogitsAt::Last)?;
        let vec_of = |p: HookPoint| -> Result<Vec<f32>> {
            Ok(hooks.cache.require(p)?.flatten_all()?.to_vec1()?)
        };
        let dot = |x: &[f32]| x.iter().zip(&d).map(|(a, b)| f64::from(a * b)).sum::<f64>();
        let scale = |x: &[f32]| {
            let ms = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
            1.0 / (ms + f64::from(eps)).sqrt()
        };
        let final_resid = vec_of(HookPoint::ResidPost(n - 1))?;
        let s = scale(&final_resid);
        let mut dla = RowDla {
            logit_diff: s * dot(&final_resid),
            embed: s * dot(&vec_of(HookPoint::Embed)?),
            attn: Vec::with_capacity(n),
            mlp: Vec::with_capacity(n),
            lens: Vec::with_capacity(n),
            heads: Vec::new(),
        };
        for l in 0..n {
            dla.attn.push(s * dot(&vec_of(HookPoint::AttnOut(l))?));
            dla.mlp.push(s * dot(&vec_of(HookPoint::MlpOut(l))?));
            let resid = vec_of(HookPoint::ResidPost(l))?;
            dla.lens.push(scale(&resid) * dot(&resid));
            if let (true, Some(w_o)) = (per_head, model.transformer.head_out_weight(l, tokens)?) {
                // W_O (g ⊙ ΔW_U): what one unit of each z coordinate adds to Δ.
                let d_t = candle_core::Tensor::from_slice(&d, (d.len(), 1), w_o.device())?;
                let u: Vec<f32> = w_o.matmul(&d_t)?.flatten_all()?.to_vec1()?;
                let z = vec_of(HookPoint::AttnZ(l))?;
                let d_head = model.config().head_dim;
                dla.heads.push(
                    z.chunks(d_head)
                        .zip(u.chunks(d_head))
                        .map(|(zh, uh)| {
                            s * zh
                                .iter()
                                .zip(uh)
                                .map(|(a, b)| f64::from(a * b))
                                .sum::<f64>()
                        })
                        .collect(),
                );
            }
        }
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let mut record = row.record();
        record.insert(
            "logit_diff_model".into(),
            json!(logits[a as usize] - logits[r as usize]),
        );
        record.insert("logit_diff".into(), json!(dla.logit_diff));
        record.insert("embed".into(), json!(dla.embed));
        record.insert("attn_out".into(), json!(dla.attn));
        record.insert("mlp_out".into(), json!(dla.mlp));
        record.insert("lens".into(), json!(dla.lens));
        if !dla.heads.is_empty() {
            record.insert("heads".into(), json!(dla.heads));
        }
        records.push_str(&format!("{}\n", Value::Object(record)));
        results.push(dla);
        progress.advance(1, None);
    }
    progress.finish();
    let report = summarize(model, spec, &rows, &pairs, &results, started);
    write_run(&spec.out, ATTRIBUTE_JSON, &records, &report)?;
    Ok(report)
}

/// The tokens up to where the accept and reject tags first differ (the prompt
/// and their shared leading tokens) and the two differing token ids.
fn decision_point(row: &Row, spec: &AttributeSpec) -> Result<(Vec<u32>, u32, u32)> {
    let c = &row.rendered.continuations;
    let at = |msg: &str| {
        Error::BadInput(format!(
            "{}:{} (id `{}`): {msg}",
            spec.prompts.display(),
            row.prompt.line,
            row.prompt.id
        ))
    };
    let (Some(accept), Some(reject)) = (c.get("accept"), c.get("reject")) else {
        return Err(at(
            "attribution needs `continuations` with accept and reject",
        ));
    };
    let shared = accept
        .iter()
        .zip(reject)
        .take_while(|(a, r)| a == r)
        .count();
    let (Some(&a), Some(&r)) = (accept.get(shared), reject.get(shared)) else {
        return Err(at(
            "one answer tag is a token prefix of the other; no token tells them apart",
        ));
    };
    let mut tokens = row.rendered.tokens.clone();
    tokens.extend_from_slice(&accept[..shared]);
    Ok((tokens, a, r))
}

/// Positive/negative row pairs by `pair_by`; a row without a partner is an error.
fn pair(rows: &[Row], spec: &AttributeSpec) -> Result<Vec<(usize, usize)>> {
    let key =
        |r: &Row| -> Vec<Option<String>> { spec.pair_by.iter().map(|f| r.field(f)).collect() };
    let mut negatives: BTreeMap<Vec<Option<String>>, usize> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        if r.field(&spec.label).as_deref() == Some(spec.negative.as_str()) {
            negatives.insert(key(r), i);
        }
    }
    let mut pairs = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.field(&spec.label).as_deref() == Some(spec.positive.as_str()) {
            let j = negatives.get(&key(r)).ok_or_else(|| {
                Error::BadInput(format!(
                    "row `{}` ({}={}) has no {}={} row with the same {}",
                    r.prompt.id,
                    spec.label,
                    spec.positive,
                    spec.label,
                    spec.negative,
                    spec.pair_by.join(", ")
                ))
            })?;
            pairs.push((i, *j));
        }
    }
    if pairs.is_empty() {
        return Err(Error::BadInput(format!(
            "no {}={} / {}={} pairs among the rows",
            spec.label, spec.positive, spec.label, spec.negative
        )));
    }
    Ok(pairs)
}

fn summarize(
    model: &Model,
    spec: &AttributeSpec,
    rows: &[Row],
    pairs: &[(usize, usize)],
    results: &[RowDla],
    started: std::time::Instant,
) -> AttributeReport {
    let effect = |component: &str,
                  layer: Option<usize>,
                  head: Option<usize>,
                  value: &dyn Fn(&RowDla) -> f64| {
        let mean = |xs: Vec<f64>| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let diffs: Vec<f64> = pairs
            .iter()
            .map(|&(p, q)| value(&results[p]) - value(&results[q]))
            .collect();
        let (difference, ci95) = mean_ci(&diffs, spec.resamples, spec.seed);
        ComponentEffect {
            component: component.into(),
            layer,
            head,
            mean_positive: mean(pairs.iter().map(|&(p, _)| value(&results[p])).collect()),
            mean_negative: mean(pairs.iter().map(|&(_, q)| value(&results[q])).collect()),
            difference,
            ci95,
        }
    };
    let n = model.config().n_layers;
    let mut components = vec![effect("embed", None, None, &|r| r.embed)];
    for l in 0..n {
        components.push(effect("attn_out", Some(l), None, &|r| r.attn[l]));
        components.push(effect("mlp_out", Some(l), None, &|r| r.mlp[l]));
    }
    let lens = (0..n)
        .map(|l| effect("lens", Some(l), None, &|r| r.lens[l]))
        .collect();
    let with_heads = results.iter().all(|r| r.heads.len() == n);
    let mut heads = Vec::new();
    let mut max_head_sum_error = None;
    if with_heads && !results.is_empty() {
        for l in 0..n {
            for h in 0..results[0].heads[l].len() {
                heads.push(effect("head", Some(l), Some(h), &|r| r.heads[l][h]));
            }
        }
        max_head_sum_error = Some(
            results
                .iter()
                .flat_map(|r| {
                    (0..n).map(move |l| (r.heads[l].iter().sum::<f64>() - r.attn[l]).abs())
                })
                .fold(0.0, f64::max),
        );
    }
    let max_sum_error = results
        .iter()
        .map(|r| {
            (r.embed + r.attn.iter().sum::<f64>() + r.mlp.iter().sum::<f64>() - r.logit_diff).abs()
        })
        .fold(0.0, f64::max);
    AttributeReport {
        format: "afprobe-attribute/1".into(),
        afprobe_version: env!("CARGO_PKG_VERSION").into(),
        model: model.spec.to_string(),
        settings: spec.clone(),
        n_rows: rows.len(),
        n_pairs: pairs.len(),
        max_sum_error,
        logit_diff: effect("logit_diff", None, None, &|r| r.logit_diff),
        components,
        lens,
        heads,
        max_head_sum_error,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// The report as a table: Δ, then the ten components with the largest |free − paid|.
pub fn format_table(report: &AttributeReport) -> String {
    let line = |e: &ComponentEffect| {
        let name = match (e.layer, e.head) {
            (Some(l), Some(h)) => format!("L{l}H{h}"),
            (Some(l), None) => format!("{} L{l}", e.component),
            _ => e.component.clone(),
        };
        format!(
            "{name:<16} {:>10.4} {:>10.4} {:>10.4} [{:.4}, {:.4}]\n",
            e.mean_positive, e.mean_negative, e.difference, e.ci95[0], e.ci95[1]
        )
    };
    let s = &report.settings;
    let mut out = format!(
        "direct logit attribution of logit(accept) - logit(reject), {} pairs ({}={} vs {})\n\
         {:<16} {:>10} {:>10} {:>10} 95% CI\n",
        report.n_pairs,
        s.label,
        s.positive,
        s.negative,
        "component",
        s.positive,
        s.negative,
        "diff"
    );
    out.push_str(&line(&report.logit_diff));
    let mut ranked: Vec<&ComponentEffect> = report.components.iter().collect();
    ranked.sort_by(|a, b| b.difference.abs().total_cmp(&a.difference.abs()));
    for e in ranked.into_iter().take(10) {
        out.push_str(&line(e));
    }
    out.push_str(&format!(
        "components sum to the logit difference within {:.2e}\n",
        report.max_sum_error
    ));
    if let Some(err) = report.max_head_sum_error {
        let mut heads: Vec<&ComponentEffect> = report.heads.iter().collect();
        heads.sort_by(|a, b| b.difference.abs().total_cmp(&a.difference.abs()));
        out.push_str("attention heads with the largest |diff|:\n");
        for e in heads.into_iter().take(5) {
            out.push_str(&line(e));
        }
        out.push_str(&format!(
            "each layer's heads sum to its attn_out term within {err:.2e}\n"
        ));
    }
    out
}
