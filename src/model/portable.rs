//! The portable engine (`--engine portable`): the pieces of the forward pass
//! that the fused engine runs as hand-written CPU kernels — attention, the
//! gated MLP, the projections and the unembedding — in candle tensor ops only,
//! so they run on any candle device and dtype and candle can differentiate
//! them (with dense weights: candle's quantized matmul has no backward). Everything else (the layer order, norms, hooks, rope tables, the
//! weights) is the decoder's own (`decoder.rs`): one forward pass, two ways to
//! run its heavy parts. Both engines keep the contract written in
//! docs/hooks-and-api.md ("Engines"), and tests/engines.rs holds them to it.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Tensor, D};

use super::attention::TreeMask;
use super::decoder::Layout;
use super::kv_cache::LayerKv;
use crate::error::Result;

/// Which implementation runs the heavy parts of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Engine {
    /// Hand-written CPU kernels: fused attention over token trees, the f32 and
    /// quantized GEMMs (the default, and the fast path on the CPU).
    #[default]
    Fused,
    /// candle tensor ops only: any device, any dtype, differentiable.
    Portable,
}

impl Engine {
    /// The name `--engine` takes.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Fused => "fused",
            Engine::Portable => "portable",
        }
    }
}

/// `x W` for a weight stored transposed (`[in, out]`).
pub(super) fn matmul_t(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(w_t.dtype())?.matmul(w_t)?)
}

/// `x Wᵀ` for a block-quantized weight `[out, in]` (candle's quantized matmul).
pub(super) fn quantized_matmul(
    w: &std::sync::Arc<candle_core::quantized::QTensor>,
    x: &Tensor,
) -> Result<Tensor> {
    let m = QMatMul::from_arc(w.clone())?;
    Ok(x.to_dtype(DType::F32)?.apply(&m)?)
}

/// The additive attention mask `[t, keys]` (0 where a query sees a key, −∞
/// elsewhere): causal over the cache, or a token tree's ancestry, and the
/// sliding window over positions — what the fused kernel computes in place.
fn mask(
    t: usize,
    keys: usize,
    past: usize,
    window: Option<usize>,
    tree: Option<&TreeMask>,
) -> Vec<f32> {
    let mut m = vec![f32::NEG_INFINITY; t * keys];
    for i in 0..t {
        let position = tree.map_or(past + i, |tm| tm.query_position(i));
        let lowest = window.map_or(0, |w| (position + 1).saturating_sub(w));
        let row = &mut m[i * keys..][..keys];
        for (j, cell) in row.iter_mut().enumerate() {
            let seen = match tree {
                None => j >= lowest && j <= past + i,
                Some(tm) if j < tm.start => j >= lowest,
                Some(tm) => {
                    let node = j - tm.start;
                    tm.sees(i, node) && tm.positions[node] >= lowest
                }
            };
            if seen {
                *cell = 0.0;
            }
        }
    }
    m
}

/// What [`attention`] needs of a layer besides its weights.
pub(super) struct AttentionShape {
    pub n_kv_heads: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// One layer's attention on roped `q` (`[t, n_heads, d_head]`), with this
/// call's `k`, `v` (`[t, n_kv_heads, d_head]`) appended to the layer's cache.
/// Returns `z` (`[t, n_heads, d_head]`, before `o_proj`) and the pattern
/// (`[t, n_heads, keys]`, after the softmax), in f32 as the fused kernel.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv: &mut LayerKv,
    s: &AttentionShape,
    at: &Layout,
) -> Result<(Tensor, Tensor)> {
    let (t, nh, hd) = q.dims3()?;
    let nkv = s.n_kv_heads;
    let (k_all, v_all) = match kv.tensors.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, k], 0)?, Tensor::cat(&[&pv, v], 0)?),
        None => (k.clone(), v.clone()),
    };
    kv.tensors = Some((k_all.clone(), v_all.clone()));
    let keys = k_all.dim(0)?;
    let past = keys - t;
    let rep = nh / nkv;
    // [heads, len, d_head], the kv heads repeated as HF's repeat_kv.
    let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
        let len = x.dim(0)?;
        let x = x.transpose(0, 1)?;
        Ok(x.unsqueeze(1)?
            .expand((n, rep, len, hd))?
            .reshape((n * rep, len, hd))?
            .contiguous()?)
    };
    let q = q.transpose(0, 1)?.contiguous()?;
    let (k_all, v_all) = (heads(&k_all, nkv)?, heads(&v_all, nkv)?);
    let mut scores = (q.matmul(&k_all.t()?)? * f64::from(s.scale))?;
    if let Some(cap) = s.softcap {
        scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
    }
    let m = mask(t, keys, past, s.window, at.tree.as_ref());
    let m = Tensor::from_vec(m, (1, t, keys), q.device())?;
    // The composed softmax: candle's fused `softmax_last_dim` has no backward.
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&m)?, D::Minus1)?;
    let z = probs.matmul(&v_all)?.transpose(0, 1)?.contiguous()?;
    let pattern = probs.transpose(0, 1)?.contiguous()?;
    Ok((z, pattern))
}
