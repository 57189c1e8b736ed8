//! Per-head activation patching (`afprobe patch --hook z`): the destination
//! row runs with one head's output at one position replaced by the source
//! row's, for every layer × head, as TransformerLens patches `hook_z` one head
//! at a time (`patching.get_act_patch_attn_head_out_by_pos`).
//!
//! afprobe's attention internals are read, not edited, inside the fused
//! kernel, so the patch is applied where it lands: head h's term in
//! `hook_attn_out` is z_h · W_O,h (the rows h·d_head..(h+1)·d_head of
//! `o_proj`), and replacing z_h adds (z_src,h − z_dst,h) · W_O,h there. That
//! is exact where the attention output is a sum of per-head terms (no
//! post-attention norm, no output bias: Llama, Mistral, Qwen 2/3, Phi-3) and
//! refused elsewhere (Gemma 2/3, OLMo 2), as direct logit attribution is.

use candle_core::{Device, Tensor};

use super::patch_position::{align, PatchPosition};
use super::patch_spec::{PairResult, PatchCell, PatchSpec};
use super::{p_accept, Captured, Row, RowCache, TokenCount};
use crate::error::{Error, Result};
use crate::model::{Edit, HookPoint, Hooks, Model, Positions};

/// The heads a run patches one at a time: none unless `spec` patches
/// `hook_z`; then `--heads` or every head, after checking the run can be done
/// (only `hook_z` points, single-token positions, a model whose attention
/// output is a sum over heads).
pub(super) fn heads(model: &Model, spec: &PatchSpec) -> Result<Vec<usize>> {
    let z_points: Vec<HookPoint> = spec
        .points
        .iter()
        .copied()
        .filter(|p| matches!(p, HookPoint::AttnZ(_)))
        .collect();
    if z_points.is_empty() {
        if spec.heads.is_some() {
            return Err(Error::BadInput(
                "--heads selects heads of `--hook z`; other hooks patch whole activations".into(),
            ));
        }
        return Ok(Vec::new());
    }
    if z_points.len() != spec.points.len() {
        return Err(Error::BadInput(
            "per-head patching (`hook_z`) cannot be mixed with other hooks in one run".into(),
        ));
    }
    if let Some(p) = spec.positions.iter().find(|p| {
        !matches!(
            p,
            PatchPosition::Last(_) | PatchPosition::Cue | PatchPosition::Decision
        )
    }) {
        return Err(Error::BadInput(format!(
            "per-head patching patches one token: --positions {p} is not one (use decision, \
             last, last-K or cue)"
        )));
    }
    let n_heads = model.config().n_heads;
    for p in &z_points {
        let layer = p.layer().expect("hook_z has a layer");
        if model.transformer.head_out_weight(layer, &[])?.is_none() {
            return Err(Error::BadInput(format!(
                "{}: the attention output of this family is not a sum of per-head terms (a \
                 post-attention norm or an output bias), so one head cannot be patched alone; \
                 patch hook_attn_out instead",
                model.spec
            )));
        }
    }
    let heads = spec.heads.clone().unwrap_or_else(|| (0..n_heads).collect());
    if let Some(h) = heads.iter().find(|&&h| h >= n_heads) {
        return Err(Error::BadInput(format!(
            "--heads {h}: the model has {n_heads} heads (0-{})",
            n_heads - 1
        )));
    }
    if heads.is_empty() {
        return Err(Error::BadInput("--heads names no head".into()));
    }
    Ok(heads)
}

/// One pair: both rows' head outputs and scores, then every (layer, head,
/// position) cell patched, each reusing the destination's clean cache up to
/// its position. Returns the scores and the destination's cache.
pub(super) fn patch_pair(
    model: &Model,
    src: &Row,
    dst: &Row,
    previous: Option<&RowCache>,
    cells: &[PatchCell],
    count: &mut TokenCount,
) -> Result<(PairResult, RowCache)> {
    let mut points: Vec<HookPoint> = cells.iter().map(|c| c.point).collect();
    points.sort();
    points.dedup();
    // Both rows once, with their head outputs on the positions each computes:
    // the destination after the prefix it shares with the previous pair's (run
    // again from scratch if that prefix holds a patched position), the source
    // after the prefix it shares with the destination.
    let dst_positions: Vec<usize> = cells
        .iter()
        .filter_map(|c| {
            align(c.position, &dst.rendered, &src.rendered)
                .0
                .first()
                .map(|p| p.0)
        })
        .collect();
    let (mut dst_cache, mut dst_scores, mut z_dst) =
        RowCache::run_capturing(model, dst, previous, &points, count)?;
    let reused_too_much = |z: &Captured| -> Result<bool> {
        for &d in &dst_positions {
            if z.at(points[0], d)?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if previous.is_some() && reused_too_much(&z_dst)? {
        (dst_cache, dst_scores, z_dst) = RowCache::run_capturing(model, dst, None, &points, count)?;
    }
    let (_, src_scores, z_src) =
        RowCache::run_capturing(model, src, Some(&dst_cache), &points, count)?;
    let p_dest = p_accept(&dst_scores);
    let n = cells.len();
    let mut result = PairResult {
        p_source: p_accept(&src_scores),
        p_dest,
        dest_at: vec![f64::NAN; n],
        patched: vec![f64::NAN; n],
        partly: vec![false; n],
    };
    for (c, cell) in cells.iter().enumerate() {
        let (aligned, unaligned) = align(cell.position, &dst.rendered, &src.rendered);
        result.partly[c] = unaligned > 0;
        let Some(&(d, s)) = aligned.first() else {
            continue;
        };

        let (layer, head) = (
            cell.point.layer().expect("hook_z has a layer"),
            cell.head.expect("hook_z cells have a head"),
        );
        let w_o = model
            .transformer
            .head_out_weight(layer, &dst.rendered.tokens)?
            .ok_or_else(|| Error::BadInput(format!("layer {layer}: no per-head output")))?;
        let d_head = model.config().head_dim;
        let z_at = |captured: &Captured, pos: usize| -> Result<Option<Tensor>> {
            match captured.at(cell.point, pos)? {
                Some(z) => Ok(Some(z.get(head)?.to_dtype(candle_core::DType::F32)?)),
                None => Ok(None),
            }
        };
        result.dest_at[c] = p_dest;
        let dz = match (z_at(&z_src, s)?, z_at(&z_dst, d)?) {
            (Some(zs), Some(zd)) => (zs - zd)?.unsqueeze(0)?,
            // The source shares the destination's tokens up to and past this
            // position, so the head's output there is the same: a no-op.
            (None, _) => {
                result.patched[c] = p_dest;
                continue;
            }
            (_, None) => {
                return Err(Error::BadInput(format!(
                    "row `{}`: position {d} was not computed",
                    dst.prompt.id
                )))
            }
        };
        let delta = dz
            .matmul(&w_o.narrow(0, head * d_head, d_head)?)?
            .squeeze(0)?
            .to_device(&Device::Cpu)?;
        let mut hooks = Hooks::none();
        hooks.add_edit(
            HookPoint::AttnOut(layer),
            Edit::Add {
                vector: delta,
                positions: Positions::At(vec![d]),
            },
        );
        let scores =
            dst_cache.run_edited(model, dst, d, std::slice::from_mut(&mut hooks), count, None)?;
        result.patched[c] = p_accept(&scores);
    }
    Ok((result, dst_cache))
}
