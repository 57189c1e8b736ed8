//! The hooked Llama-family decoder: one struct per layer, a forward pass that
//! reads top to bottom with the TransformerLens hook points in plain sight.
//!
//! Activations are `[T, d_model]` for one sequence (batch 1); prompts of a study
//! share a long system prompt, so [`KvCache`] reuse beats batching on CPU.
//! Two choices keep long prompts fast and memory flat: the LM head runs only at
//! the positions whose logits are asked for, and attention is computed in query
//! chunks that each see only the keys they may attend to (no `[heads, T, T]` mask).

use candle_core::{DType, Device, IndexOp, Tensor, D};

use super::config::ModelConfig;
use super::hooks::{HookPoint, Hooks};
use crate::error::{Error, Result};

/// Weights by HF name (`model.layers.0.self_attn.q_proj.weight`), q/k in the
/// half-split rope layout. Loaders fill this; the transformer consumes it.
pub type WeightSource<'a> = dyn FnMut(&str) -> Result<Option<Tensor>> + 'a;

/// Score matrices per attention chunk are kept under this many elements.
const ATTN_CHUNK_ELEMS: usize = 1 << 22;

/// A dense projection `y = x Wᵀ + b` with `W: [out, in]`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
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
        let qkv = self.qkv_proj.forward(x)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            // [T, n*hd] -> [1, n, T, hd], the layout candle's rope kernel wants.
            Ok(qkv
                .narrow(1, start * hd, n * hd)?
                .reshape((t, n, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let q = rope.apply(&heads(0, nh)?)?.squeeze(0)?;
        let k = rope.apply(&heads(nh, nkv)?)?.squeeze(0)?;
        let v = heads(nh + nkv, nkv)?.squeeze(0)?;
        let (k, v) = kv.append(k, v)?; // [nkv, past + T, hd]

        // Heads sharing a kv head are consecutive: view q as [nkv, rep, T, hd].
        let rep = nh / nkv;
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((nkv, rep, t, hd))?;
        let past = k.dim(1)? - t;
        let mut outputs = Vec::new();
        for chunk in rope.chunks() {
            let (start, len) = (chunk.start, chunk.len);
            let n_keys = past + start + len;
            let q_c = q.narrow(2, start, len)?.reshape((nkv, rep * len, hd))?;
            let k_c = k.narrow(1, 0, n_keys)?;
            let scores = q_c.matmul(&k_c.t()?)?.reshape((nkv, rep, len, n_keys))?;
            let scores = scores.broadcast_add(&chunk.mask)?;
            let probs =
                candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, rep * len, n_keys))?;
            let out = probs.matmul(&v.narrow(1, 0, n_keys)?)?; // [nkv, rep*len, hd]
            outputs.push(out.reshape((nh, len, hd))?);
        }
        let out = Tensor::cat(&outputs, 1)?
            .transpose(0, 1)?
            .reshape((t, nh * hd))?;
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
                    qkv_proj: Linear {
                        weight: qkv_weight,
                        bias: qkv_bias,
                    },
                    o_proj: Linear {
                        weight: get(&attn("o_proj.weight"))?,
                        bias: None,
                    },
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: c.head_dim,
                },
                post_attn_norm: RmsNorm {
                    weight: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    eps,
                },
                mlp: Mlp {
                    gate_up_proj: Linear {
                        weight: gate_up,
                        bias: None,
                    },
                    down_proj: Linear {
                        weight: get(&format!("{p}.mlp.down_proj.weight"))?,
                        bias: None,
                    },
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
        let start = kv.len();
        let t = tokens.len();
        self.check_window(start, t)?;
        hooks.check(self.config.n_layers)?;
        kv.ensure_layers(self.config.n_layers);
        let rope = Rope::new(&self.inv_freq, start, t, self.dtype(), &self.device)?;
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
        Ok(normed.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
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

/// Keys and values of one layer for the tokens seen so far: `[n_kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        self.kv = Some(kv.clone());
        Ok(kv)
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if let Some((k, v)) = self.kv.take() {
            if len > 0 {
                self.kv = Some((k.narrow(1, 0, len)?, v.narrow(1, 0, len)?));
            }
        }
        Ok(())
    }
}

/// The key/value cache of one sequence, with the tokens it was computed from.
///
/// Cloning is cheap (tensors are reference-counted), so a shared prompt prefix
/// is computed once and each prompt continues from a clone truncated to the
/// longest run of token ids it shares with the prefix.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    tokens: Vec<u32>,
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
            self.layers.iter_mut().try_for_each(|l| l.truncate(len))?;
        }
        Ok(())
    }

    /// A copy of this cache cut to the longest prefix it shares with `tokens`,
    /// always leaving at least one token of `tokens` to run (logits need one).
    pub fn reuse_for(&self, tokens: &[u32]) -> Result<KvCache> {
        let shared = self
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1));
        let mut cache = self.clone();
        cache.truncate(shared)?;
        Ok(cache)
    }

    fn ensure_layers(&mut self, n: usize) {
        if self.layers.len() != n {
            self.layers = vec![LayerKv::default(); n];
        }
    }
}

/// Rotary tables for the absolute positions of one forward call, and the
/// query chunks (with their causal masks) that attention iterates over.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    chunks: Vec<QueryChunk>,
}

struct QueryChunk {
    start: usize,
    len: usize,
    /// `[len, past + start + len]`: 0 where a query may attend, -inf elsewhere.
    mask: Tensor,
}

impl Rope {
    fn new(inv_freq: &[f32], past: usize, t: usize, dtype: DType, dev: &Device) -> Result<Rope> {
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
        let cos = Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?;
        let chunk = (ATTN_CHUNK_ELEMS / (past + t).max(1)).clamp(16, 512).min(t);
        let mut chunks = Vec::new();
        for start in (0..t).step_by(chunk) {
            let len = chunk.min(t - start);
            let n_keys = past + start + len;
            let mask: Vec<f32> = (0..len)
                .flat_map(|i| {
                    (0..n_keys).map(move |j| {
                        if j <= past + start + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (len, n_keys), dev)?.to_dtype(dtype)?;
            chunks.push(QueryChunk { start, len, mask });
        }
        Ok(Rope { cos, sin, chunks })
    }

    /// Rotates `[1, heads, T, head_dim]` (half-split layout, as HF Llama).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)?)
    }

    fn chunks(&self) -> &[QueryChunk] {
        &self.chunks
    }
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

/// Row `i` of a 2-D tensor as a `Vec<f32>`.
pub fn row_f32(t: &Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(t.i(i)?.to_dtype(DType::F32)?.to_vec1()?)
}
