//! The model as callers run it: the hooked [`Decoder`], or with PEFT's
//! activated LoRA (aLoRA, `adapter.rs`) the base decoder wrapped with a merged
//! copy that runs from the invocation tokens on; token trees run here too.

use candle_core::{DType, Device, IndexOp, Tensor};

use super::adapter::Adapter;
use super::attention::TreeMask;
use super::config::ModelConfig;
use super::decoder::{Decoder, Layout};
use super::hooks::Hooks;
pub use super::kv_cache::KvCache;
use super::lora::Lora;
use super::portable::Engine;
pub use super::token_tree::{LogitsAt, TokenTree};
pub use super::weights::{QuantSource, WeightSource};
use crate::error::{Error, Result};

/// The decoder a model runs, plain or with an activated LoRA adapter.
#[derive(Debug, Clone)]
pub struct Transformer {
    decoder: Decoder,
    /// Activated LoRA (`--adapter` with `alora_invocation_tokens`): merged weights
    /// used from the invocation tokens on (see `adapter.rs`).
    activated: Option<Activated>,
}

/// Activated LoRA's merged weights and the invocation they start from.
#[derive(Debug, Clone)]
pub struct Activated {
    pub invocation: Vec<u32>,
    pub adapted: Decoder,
}

impl Activated {
    /// Start of the last occurrence of the invocation sequence in `seq`.
    pub fn start_in(&self, seq: &[u32]) -> Option<usize> {
        let n = self.invocation.len();
        if seq.len() < n {
            return None;
        }
        (0..=seq.len() - n)
            .rev()
            .find(|&i| seq[i..i + n] == self.invocation[..])
    }
}

impl Transformer {
    /// Builds the model from weights by HF name, converted to `dtype` (names and
    /// which weights exist per family: `family.rs`).
    pub fn new(config: ModelConfig, weights: &mut WeightSource, dtype: DType) -> Result<Self> {
        Transformer::with_quantized(config, weights, None, dtype)
    }

    /// [`new`](Self::new), with the projections, the embedding and the
    /// unembedding taken block-quantized from `quantized` where it has them
    /// (`--dtype quantized`); norms and biases stay dense.
    pub fn with_quantized(
        config: ModelConfig,
        weights: &mut WeightSource,
        quantized: Option<&mut QuantSource>,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Transformer {
            decoder: Decoder::load(config, weights, quantized, dtype)?,
            activated: None,
        })
    }

    /// Builds the model from `weights` with `adapter`: merged weights for
    /// plain LoRA; for activated LoRA the base weights plus a merged copy used
    /// from the invocation tokens on.
    pub fn with_adapter(
        config: ModelConfig,
        weights: &mut WeightSource,
        adapter: &Adapter,
        dtype: DType,
    ) -> Result<Transformer> {
        let mut merged = |name: &str| -> Result<Option<Tensor>> {
            let w = weights(name)?;
            match (w, adapter.delta(name)) {
                (Some(w), Some(d)) => {
                    let wd = w.dtype();
                    Ok(Some((w.to_dtype(DType::F64)? + d)?.to_dtype(wd)?))
                }
                (w, _) => Ok(w),
            }
        };
        match adapter.invocation_tokens() {
            None => Transformer::new(config, &mut merged, dtype),
            Some(inv) => {
                let adapted = Decoder::load(config.clone(), &mut merged, None, dtype)?;
                Ok(Transformer {
                    decoder: Decoder::load(config, weights, None, dtype)?,
                    activated: Some(Activated {
                        invocation: inv.to_vec(),
                        adapted,
                    }),
                })
            }
        }
    }

    /// Runs the heavy parts of every forward pass with `engine` from now on
    /// (`--engine`; see [`Engine`]). A KV cache filled by one engine is refused
    /// by the other.
    pub fn set_engine(&mut self, engine: Engine) {
        self.decoder.set_engine(engine);
        if let Some(act) = &mut self.activated {
            act.adapted.set_engine(engine);
        }
    }

    /// Moves the weights to `device` (nothing to do for the CPU). Errors for
    /// block-quantized weights, whose kernels are the CPU's; a GPU runs the
    /// portable engine (`load_model_placed` sets both).
    pub fn move_to(&mut self, device: &candle_core::Device) -> Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        self.decoder.move_to(device)?;
        if let Some(act) = &mut self.activated {
            act.adapted.move_to(device)?;
        }
        Ok(())
    }

    /// The device the weights are on.
    pub fn device(&self) -> candle_core::Device {
        self.decoder.device().clone()
    }

    /// Attaches LoRA factors, unmerged, to the base weights' projections
    /// (`None` detaches them): what `organism train` differentiates through
    /// with the portable engine. Refused on a model loaded with an activated
    /// adapter, whose two weight sets would make "the" projections ambiguous.
    pub fn set_lora(&mut self, lora: Option<&Lora>) -> Result<()> {
        if self.activated.is_some() {
            return Err(Error::BadInput(
                "LoRA factors attach to a model loaded without an activated adapter".into(),
            ));
        }
        self.decoder.set_lora(lora);
        Ok(())
    }

    /// The engine that runs this model's forward passes.
    pub fn engine(&self) -> Engine {
        self.decoder.engine()
    }

    pub fn config(&self) -> &ModelConfig {
        self.decoder.config()
    }

    pub fn dtype(&self) -> DType {
        self.decoder.dtype()
    }

    /// The final norm's effective weight (`1 + w` for Gemma) as f32 `[d_model]`
    /// and its epsilon, for attributions through the norm.
    pub fn final_norm_parts(&self) -> Result<(Tensor, f32)> {
        self.decoder.final_norm_parts()
    }

    /// The unembedding matrix `[vocab, d_model]` (the embedding when tied), f32
    /// (dequantized under `--dtype quantized`).
    pub fn unembed(&self) -> Result<Tensor> {
        self.decoder.unembed()
    }

    /// Final norm + unembedding of residual rows `[n, d_model]`: the logits the
    /// model would output if these were the last layer's residuals (the logit lens).
    pub fn logit_lens(&self, resid: &Tensor) -> Result<Tensor> {
        self.decoder.logit_lens(resid)
    }

    /// Errors unless a sequence of `n` tokens fits the context window.
    pub fn check_length(&self, n: usize) -> Result<()> {
        self.decoder.check_length(n)
    }

    /// Runs `tokens` on top of what `kv` already holds, calling `hooks` at every
    /// hook point, and returns f32 logits `[rows, vocab]` for the rows `logits_at` asks for.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
    ) -> Result<Tensor> {
        match &self.activated {
            Some(act) => forward_activated(&self.decoder, act, tokens, kv, hooks, logits_at),
            None => self.decoder.forward(tokens, kv, hooks, logits_at),
        }
    }

    /// Runs a token tree (many continuations of the cached prompt, see
    /// [`TokenTree`]) in one call: each token sees the cache and its own
    /// ancestors, at position `kv.len() + depth`, so every row of the result
    /// equals what running its branch alone on the cache gives (to float
    /// rounding: the GEMMs group rows differently, ~1e-6). Hooks see the
    /// tree's rows in order with their absolute positions; edits by position
    /// apply to every branch. Returns logits `[rows, vocab]` for `logits_at`
    /// (rows of the tree); `kv` is left as it was.
    ///
    /// `None` when an activated adapter's weights would change inside the tree
    /// (its invocation is not yet in the cache): run the branches one by one.
    pub fn forward_tree(
        &self,
        tree: &TokenTree,
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
    ) -> Result<Option<Tensor>> {
        self.tree_call(tree, kv, hooks, logits_at, false, None)
    }

    /// [`forward_tree`](Self::forward_tree) from block `layer` on: its
    /// `hook_resid_pre` rows are `resid_pre` (`[tree rows, d_model]`, f32), as
    /// a clean run of the same tree on the same cache captured them, and the
    /// blocks below are skipped (their hooks do not run). Used where an edit
    /// at block `layer` cannot change what lies below it (a patching cell),
    /// so the result equals the full run's, bit for bit. Errors when the tree
    /// runs and `resid_pre` is not `[tree rows, d_model]` or `layer` is past the last block.
    pub fn forward_tree_from(
        &self,
        tree: &TokenTree,
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
        layer: usize,
        resid_pre: &Tensor,
    ) -> Result<Option<Tensor>> {
        let from = (layer, resid_pre.to_dtype(self.dtype())?);
        self.tree_call(tree, kv, hooks, logits_at, false, Some(from))
    }

    /// Like [`forward_tree`](Self::forward_tree), but keeps the new nodes in
    /// `kv` after its branches of earlier calls (lockstep decoding: each call
    /// adds one token per sample). `tree.parents` index the cache's branch
    /// nodes followed by this call's (`None`: the end of the linear tokens).
    /// A truncation of `kv` drops every branch.
    pub fn grow_tree(
        &self,
        tree: &TokenTree,
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
    ) -> Result<Option<Tensor>> {
        self.tree_call(tree, kv, hooks, logits_at, true, None)
    }

    fn tree_call(
        &self,
        tree: &TokenTree,
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
        keep: bool,
        from: Option<(usize, Tensor)>,
    ) -> Result<Option<Tensor>> {
        if !keep && !kv.branches.is_empty() {
            return Err(Error::BadInput(
                "forward_tree runs on a linear cache; this one ends in branches (grow_tree)".into(),
            ));
        }
        let cached = kv.branches.len();
        let all = TokenTree {
            tokens: [&kv.branches.tokens[..], &tree.tokens].concat(),
            parents: [&kv.branches.parents[..], &tree.parents].concat(),
        };
        let weights = match &self.activated {
            None => &self.decoder,
            Some(act) => {
                let boundary = act.start_in(kv.tokens());
                let settled = boundary.is_some() && boundary == kv.adapted_from;
                // A branch that completes a later invocation would move its boundary.
                if !settled || all.completes(cached, kv.tokens(), &act.invocation) {
                    return Ok(None);
                }
                &act.adapted
            }
        };
        // Checked only once the tree will run: where it cannot (above), a
        // caller's seed from a run that was not one tree is never read.
        if let Some((layer, resid_pre)) = &from {
            let (rows, d) = resid_pre.dims2()?;
            let c = self.config();
            if *layer >= c.n_layers || rows != tree.len() || d != c.d_model {
                return Err(Error::BadInput(format!(
                    "a tree run from block {layer} of {} needs [{}, {}] resid_pre rows, got \
                     [{rows}, {d}]",
                    c.n_layers,
                    tree.len(),
                    c.d_model
                )));
            }
        }
        let start = kv.len();
        let mask = TreeMask::new(&all.parents, start, cached).map_err(Error::BadInput)?;
        let layout = Layout {
            positions: mask.positions[cached..].to_vec(),
            tree: Some(mask),
            from,
        };
        let logits = weights.run(&tree.tokens, &layout, kv, hooks, logits_at);
        if keep && logits.is_ok() {
            kv.branches = all;
        } else {
            kv.forget_after(start + cached)?;
        }
        logits.map(Some)
    }

    /// Layer `l`'s attention output projection as f32 `[n_heads·d_head, d_model]`
    /// (rows `h·d_head..(h+1)·d_head` carry head `h`'s `attn.hook_z` into the
    /// residual), as applied at the end of `tokens` (an activated adapter's
    /// weights once its invocation occurs in them). `None` where
    /// `hook_attn_out` is not a sum of per-head terms: a post-attention norm
    /// (Gemma 2/3, OLMo 2) or an output bias.
    pub fn head_out_weight(&self, l: usize, tokens: &[u32]) -> Result<Option<Tensor>> {
        match &self.activated {
            Some(a) if a.start_in(tokens).is_some() => a.adapted.head_out_weight(l),
            _ => self.decoder.head_out_weight(l),
        }
    }
}

/// The forward call of an activated-LoRA model: positions before the last
/// invocation start run with `base`'s weights, the rest with the merged ones.
/// Cached positions computed under another boundary are recomputed first.
fn forward_activated(
    base: &Decoder,
    act: &Activated,
    tokens: &[u32],
    kv: &mut KvCache,
    hooks: &mut Hooks,
    logits_at: &LogitsAt,
) -> Result<Tensor> {
    let start = kv.len();
    let mut full = kv.tokens().to_vec();
    full.extend_from_slice(tokens);
    let boundary = act.start_in(&full).unwrap_or(usize::MAX);
    let cached = kv.adapted_from.unwrap_or(usize::MAX);
    if boundary.min(start) != cached.min(start) {
        // Part of the cache was computed under another boundary: recompute it.
        let redo = boundary.min(cached);
        kv.truncate(redo)?;
        let redo_tokens = &full[redo..start];
        let split = boundary.clamp(redo, start) - redo;
        if split > 0 {
            base.forward(
                &redo_tokens[..split],
                kv,
                &mut Hooks::none(),
                &LogitsAt::None,
            )?;
        }
        if split < redo_tokens.len() {
            act.adapted.forward(
                &redo_tokens[split..],
                kv,
                &mut Hooks::none(),
                &LogitsAt::None,
            )?;
            kv.adapted_from = Some(boundary);
        }
    }
    let t = tokens.len();
    let split = boundary.clamp(start, start + t) - start;
    if split == t {
        return base.forward(tokens, kv, hooks, logits_at);
    }
    if split == 0 {
        let logits = act.adapted.forward(tokens, kv, hooks, logits_at)?;
        kv.adapted_from = Some(boundary);
        return Ok(logits);
    }
    // Logit rows of the call, split between the two pieces.
    let rows = logits_at.rows(t)?;
    let (first, second) = split_rows(&rows, split);
    let at = |rows: Vec<usize>| {
        if rows.is_empty() {
            LogitsAt::None
        } else {
            LogitsAt::Rows(rows)
        }
    };
    // Captured rows are split the same way; each piece's capture replaces
    // the last, so the first piece's is kept aside and joined to the second's.
    let captured = hooks.captured_rows();
    let captured_split = captured.as_ref().map(|rows| split_rows(rows, split));
    if let Some((first, _)) = &captured_split {
        hooks.set_captured_rows(first.clone());
    }
    let a = base.forward(&tokens[..split], kv, hooks, &at(first.clone()))?;
    let first_capture = captured.as_ref().map(|_| hooks.cache.clone());
    if let Some((_, second)) = captured_split {
        hooks.set_captured_rows(second);
    }
    let b = act
        .adapted
        .forward(&tokens[split..], kv, hooks, &at(second.clone()))?;
    kv.adapted_from = Some(boundary);
    if let (Some(rows), Some(first_capture)) = (captured, first_capture) {
        let order = Tensor::new(split_order(&rows, split), &Device::Cpu)?;
        hooks.join_capture(&first_capture, &order)?;
        hooks.set_captured_rows(rows);
    }
    if first.is_empty() {
        return Ok(b);
    }
    if second.is_empty() {
        return Ok(a);
    }
    // Back into the requested order.
    let both = Tensor::cat(&[&a, &b], 0)?;
    let order = Tensor::new(split_order(&rows, split), both.device())?;
    Ok(both.index_select(&order, 0)?)
}

/// `rows` of a call run in two pieces at `split`: the first piece's, and the
/// second's counted from its own start.
fn split_rows(rows: &[usize], split: usize) -> (Vec<usize>, Vec<usize>) {
    let first = rows.iter().copied().filter(|&r| r < split).collect();
    let second = rows
        .iter()
        .filter(|&&r| r >= split)
        .map(|&r| r - split)
        .collect();
    (first, second)
}

/// Where each of `rows` (in order) lies in the rows of a call run in two
/// pieces at `split`, the first piece's rows (`< split`) then the second's.
fn split_order(rows: &[usize], split: usize) -> Vec<u32> {
    let before = rows.iter().filter(|&&r| r < split).count() as u32;
    let (mut i, mut j) = (0u32, before);
    rows.iter()
        .map(|&r| {
            let at = if r < split { &mut i } else { &mut j };
            *at += 1;
            *at - 1
        })
        .collect()
}

/// Log-softmax of each row of `[rows, vocab]` logits, accumulated in f64 in a
/// fixed order (reproducible to the bit), returned as f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    let data = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(data.len());
    for row in data.chunks_exact(vocab.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_z = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        out.extend(row.iter().map(|&x| (x as f64 - log_z) as f32));
    }
    Ok(Tensor::from_vec(out, (rows, vocab), logits.device())?)
}

/// Row `i` of a 2-D tensor as a `Vec<f32>`.
pub fn row_f32(t: &Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(t.i(i)?.to_dtype(DType::F32)?.to_vec1()?)
}
