//! The hooked Llama-family decoder: one struct per layer, a forward pass that
//! reads top to bottom with the TransformerLens hook points in plain sight.
//!
//! Activations are `[T, d_model]` for one sequence (batch 1); prompts of a study
//! share a long system prompt, so [`KvCache`] reuse beats batching on CPU.
//! Two choices keep long prompts fast and memory flat: the LM head runs only at
//! the positions whose logits are asked for, and attention is computed in query
//! chunks that each see only the keys they may attend to (no `[heads, T, T]` mask).

use candle_core::{DType, Device, IndexOp, Tensor};

use super::attention::{causal_attention, AttnDims, Strided};
use super::config::ModelConfig;
use super::hooks::{HookPoint, Hooks};
use super::kernels::{self, with_f32_slice, WeightLayout};
use crate::error::{Error, Result};

/// Weights by HF name (`model.layers.0.self_attn.q_proj.weight`), q/k in the
/// half-split rope layout. Loaders fill this; the transformer consumes it.
pub type WeightSource<'a> = dyn FnMut(&str) -> Result<Option<Tensor>> + 'a;

/// A dense projection `y = x W + b`, with `W` stored transposed as `[in, out]`
/// (a contiguous right-hand side is the fast case for the CPU GEMM).
#[derive(Debug, Clone)]
struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a PyTorch-layout weight `[out, in]`.
    fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        Ok(Linear {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match kernels::matmul_tensor(x, &self.weight_t, WeightLayout::KByN)? {
            Some(y) => y,
            None => x.matmul(&self.weight_t)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// Grouped-query self-attention with q, k and v fused into one projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, rope: &Rope, kv: &mut LayerKv) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // One row per token: [q heads | k heads | v heads]; attention runs in f32.
        let width = (nh + 2 * nkv) * hd;
        let mut qkv = self
            .qkv_proj
            .forward(x)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        rope.apply(&mut qkv, width, 0, nh);
        rope.apply(&mut qkv, width, nh * hd, nkv);
        let past = kv.len(nkv * hd);
        kv.append(&qkv, width, nh * hd, nkv * hd);
        let kv_view = |data| Strided {
            data,
            stride: nkv * hd,
            offset: 0,
        };
        let out = causal_attention(
            Strided {
                data: &qkv,
                stride: width,
                offset: 0,
            },
            kv_view(&kv.k),
            kv_view(&kv.v),
            AttnDims {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                t,
                past,
            },
        );
        let out = Tensor::from_vec(out, (t, nh * hd), x.device())?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
    }
}

/// SwiGLU MLP with gate and up fused into one projection.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    d_mlp: usize,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let d = self.d_mlp;
        if let Some(h) = with_f32_slice(&gate_up, |rows| kernels::swiglu(rows, d))? {
            let t = gate_up.dim(0)?;
            return self
                .down_proj
                .forward(&Tensor::from_vec(h, (t, d), x.device())?);
        }
        let gate = gate_up.narrow(1, 0, self.d_mlp)?.silu()?;
        let up = gate_up.narrow(1, self.d_mlp, self.d_mlp)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    mlp: Mlp,
}

/// Which positions of a forward call get logits (the LM head is a quarter of
/// a small model's FLOPs per token, so only compute what is used).
#[derive(Debug, Clone, PartialEq)]
pub enum LogitsAt {
    None,
    Last,
    All,
    /// Positions relative to the tokens of this call.
    Rows(Vec<usize>),
}

/// The decoder with its weights.
#[derive(Debug, Clone)]
pub struct Transformer {
    config: ModelConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
    device: Device,
    /// Activated LoRA (`--adapter` with `alora_invocation_tokens`): merged weights
    /// used from the invocation tokens on (see `adapter.rs`).
    pub(crate) activated: Option<Box<super::adapter::Activated>>,
}

impl Transformer {
    /// Builds the model from weights by HF name, converted to `dtype`.
    pub fn new(config: ModelConfig, weights: &mut WeightSource, dtype: DType) -> Result<Self> {
        let mut get = |name: &str| -> Result<Tensor> {
            let t = weights(name)?.ok_or_else(|| {
                Error::BadInput(format!("the model has no weight named `{name}`"))
            })?;
            Ok(t.to_dtype(dtype)?)
        };
        let c = &config;
        let eps = c.rms_norm_eps as f32;
        let mut blocks = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = format!("model.layers.{l}");
            let attn = |name: &str| format!("{p}.self_attn.{name}");
            let qkv_weight = Tensor::cat(
                &[
                    get(&attn("q_proj.weight"))?,
                    get(&attn("k_proj.weight"))?,
                    get(&attn("v_proj.weight"))?,
                ],
                0,
            )?;
            let qkv_bias = if c.architecture.has_qkv_bias() {
                Some(Tensor::cat(
                    &[
                        get(&attn("q_proj.bias"))?,
                        get(&attn("k_proj.bias"))?,
                        get(&attn("v_proj.bias"))?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            let gate_up = Tensor::cat(
                &[
                    get(&format!("{p}.mlp.gate_proj.weight"))?,
                    get(&format!("{p}.mlp.up_proj.weight"))?,
                ],
                0,
            )?;
            blocks.push(Block {
                input_norm: RmsNorm {
                    weight: get(&format!("{p}.input_layernorm.weight"))?,
                    eps,
                },
                attn: Attention {
                    qkv_proj: Linear::new(qkv_weight, qkv_bias)?,
                    o_proj: Linear::new(get(&attn("o_proj.weight"))?, None)?,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: c.head_dim,
                },
                post_attn_norm: RmsNorm {
                    weight: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    eps,
                },
                mlp: Mlp {
                    gate_up_proj: Linear::new(gate_up, None)?,
                    down_proj: Linear::new(get(&format!("{p}.mlp.down_proj.weight"))?, None)?,
                    d_mlp: c.d_mlp,
                },
            });
        }
        let embed_tokens = get("model.embed_tokens.weight")?;
        let lm_head = if c.tied_embeddings {
            embed_tokens.clone()
        } else {
            get("lm_head.weight")?
        };
        let final_norm = RmsNorm {
            weight: get("model.norm.weight")?,
            eps,
        };
        let expect = [c.vocab_size, c.d_model];
        if embed_tokens.dims() != expect || lm_head.dims() != expect {
            return Err(Error::BadInput(format!(
                "embedding {:?} / unembedding {:?} do not match vocab {} x d_model {}",
                embed_tokens.dims(),
                lm_head.dims(),
                c.vocab_size,
                c.d_model
            )));
        }
        let inv_freq = c.rope_inv_freq().into_iter().map(|f| f as f32).collect();
        Ok(Transformer {
            device: embed_tokens.device().clone(),
            config,
            embed_tokens,
            blocks,
            final_norm,
            lm_head,
            inv_freq,
            activated: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The unembedding matrix `[vocab, d_model]` (the embedding when tied).
    pub fn unembed(&self) -> &Tensor {
        &self.lm_head
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
            Some(act) => super::adapter::forward_activated(self, act, tokens, kv, hooks, logits_at),
            None => self.forward_base(tokens, kv, hooks, logits_at),
        }
    }

    /// [`forward`](Self::forward) with this transformer's own weights only.
    pub(crate) fn forward_base(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
    ) -> Result<Tensor> {
        let start = kv.len();
        let t = tokens.len();
        self.check_window(start, t)?;
        hooks.check(self.config.n_layers)?;
        kv.ensure_layers(
            self.config.n_layers,
            self.config.n_kv_heads * self.config.head_dim,
        );
        let rope = Rope::new(&self.inv_freq, start, t);
        let ids = Tensor::new(tokens, &self.device)?;

        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        x = hooks.run(HookPoint::Embed, x, start)?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = hooks.run(HookPoint::ResidPre(l), x, start)?;
            let attn_out =
                block
                    .attn
                    .forward(&block.input_norm.forward(&x)?, &rope, &mut kv.layers[l])?;
            let attn_out = hooks.run(HookPoint::AttnOut(l), attn_out, start)?;
            x = hooks.run(HookPoint::ResidMid(l), (x + attn_out)?, start)?;
            let mlp_out = block.mlp.forward(&block.post_attn_norm.forward(&x)?)?;
            let mlp_out = hooks.run(HookPoint::MlpOut(l), mlp_out, start)?;
            x = hooks.run(HookPoint::ResidPost(l), (x + mlp_out)?, start)?;
        }
        kv.tokens.extend_from_slice(tokens);

        // The final norm is per row: normalise only the rows that need logits,
        // unless `ln_final` is hooked and wants every row.
        let rows = match logits_at {
            LogitsAt::None => {
                return Ok(Tensor::zeros(
                    (0, self.config.vocab_size),
                    DType::F32,
                    &self.device,
                )?)
            }
            LogitsAt::Last => vec![t - 1],
            LogitsAt::All => (0..t).collect(),
            LogitsAt::Rows(rows) => rows.clone(),
        };
        if let Some(&bad) = rows.iter().find(|&&r| r >= t) {
            return Err(Error::BadInput(format!(
                "logits requested at row {bad} of a {t}-token forward call"
            )));
        }
        let rows = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &self.device,
        )?;
        if hooks.is_active(HookPoint::LnFinal) {
            let normed = self.final_norm.forward(&x)?;
            let normed = hooks.run(HookPoint::LnFinal, normed, start)?;
            return self.unembed_normed(&normed.index_select(&rows, 0)?);
        }
        self.logit_lens(&x.index_select(&rows, 0)?)
    }

    /// Final norm + unembedding of residual rows `[n, d_model]`: the logits the
    /// model would output if these were the last layer's residuals (the logit lens).
    pub fn logit_lens(&self, resid: &Tensor) -> Result<Tensor> {
        self.unembed_normed(&self.final_norm.forward(&resid.to_dtype(self.dtype())?)?)
    }

    fn unembed_normed(&self, normed: &Tensor) -> Result<Tensor> {
        // f32: the deterministic column-split kernel reading the [vocab, d] matrix
        // as its transpose (no copy), so scores are reproducible to the bit.
        match kernels::matmul_tensor(normed, &self.lm_head, WeightLayout::NByK)? {
            Some(logits) => Ok(logits),
            None => Ok(normed.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?),
        }
    }

    /// Errors unless a sequence of `n` tokens fits the context window.
    pub fn check_length(&self, n: usize) -> Result<()> {
        self.check_window(0, n)
    }

    fn check_window(&self, start: usize, t: usize) -> Result<()> {
        let max = self.config.max_position_embeddings;
        if t == 0 {
            return Err(Error::BadInput(
                "cannot run the model on zero tokens".into(),
            ));
        }
        if start + t > max {
            return Err(Error::BadInput(format!(
                "the sequence would be {} tokens long, but the model's context window is {max} \
                 tokens; shorten the prompt (or the number of tokens to generate)",
                start + t
            )));
        }
        Ok(())
    }
}

/// Keys and values of one layer for the tokens seen so far, f32 `[len, n_kv_heads * head_dim]`.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl LayerKv {
    fn len(&self, kv_width: usize) -> usize {
        self.k.len() / kv_width
    }

    /// Appends the k and v columns of fused `[T, width]` qkv rows (k starts at `k_offset`).
    fn append(&mut self, qkv: &[f32], width: usize, k_offset: usize, kv_width: usize) {
        for row in qkv.chunks_exact(width) {
            self.k
                .extend_from_slice(&row[k_offset..k_offset + kv_width]);
            self.v
                .extend_from_slice(&row[k_offset + kv_width..k_offset + 2 * kv_width]);
        }
    }

    fn truncate(&mut self, len: usize, kv_width: usize) {
        self.k.truncate(len * kv_width);
        self.v.truncate(len * kv_width);
    }
}

/// The key/value cache of one sequence, with the tokens it was computed from.
///
/// Cloning copies every layer's keys and values (plain `Vec<f32>` buffers), so
/// a caller that reuses a shared prompt prefix keeps one cache and truncates it
/// to the longest run of token ids the next prompt shares with it, cloning only
/// where two continuations must branch from the same prefix.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    tokens: Vec<u32>,
    kv_width: usize,
    /// First cached position computed with activated-LoRA weights (`adapter.rs`).
    pub(crate) adapted_from: Option<usize>,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of tokens cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token ids the cache holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Keeps only the first `len` tokens.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len < self.tokens.len() {
            self.tokens.truncate(len);
            self.adapted_from = self.adapted_from.filter(|&a| a < len);
            let width = self.kv_width;
            self.layers.iter_mut().for_each(|l| l.truncate(len, width));
        }
        Ok(())
    }

    /// Length of the longest run of token ids this cache shares with the start of `tokens`.
    pub fn shared_prefix_len(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// A copy of this cache cut to the longest prefix it shares with `tokens`,
    /// always leaving at least one token of `tokens` to run (logits need one).
    pub fn reuse_for(&self, tokens: &[u32]) -> Result<KvCache> {
        let shared = self
            .shared_prefix_len(tokens)
            .min(tokens.len().saturating_sub(1));
        let mut cache = self.clone();
        cache.truncate(shared)?;
        Ok(cache)
    }

    fn ensure_layers(&mut self, n: usize, kv_width: usize) {
        if self.layers.len() != n || self.kv_width != kv_width {
            self.layers = vec![LayerKv::default(); n];
            self.tokens.clear();
            self.adapted_from = None;
            self.kv_width = kv_width;
        }
    }
}

/// Rotary tables (`cos`, `sin`: `[T, head_dim / 2]`) for the absolute positions of one forward call.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    fn new(inv_freq: &[f32], past: usize, t: usize) -> Rope {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in past..past + t {
            for &f in inv_freq {
                // f32 angle, as transformers computes it, so long positions agree.
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope { cos, sin, half }
    }

    /// Rotates `n_heads` heads starting at column `offset` of each `[T, width]`
    /// row, in the half-split layout of HF Llama (`rotate_half`).
    fn apply(&self, rows: &mut [f32], width: usize, offset: usize, n_heads: usize) {
        let half = self.half;
        for (r, row) in rows.chunks_exact_mut(width).enumerate() {
            let (cos, sin) = (&self.cos[r * half..][..half], &self.sin[r * half..][..half]);
            for head in row[offset..offset + n_heads * 2 * half].chunks_exact_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
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
