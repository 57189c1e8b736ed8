//! The hooked Llama-family decoder: one struct per layer, a forward pass that
//! reads top to bottom with the TransformerLens hook points in plain sight.
//!
//! Activations are `[T, d_model]` for one sequence (batch 1); prompts of a study
//! share a long system prompt, so [`KvCache`] reuse beats batching on CPU.
//! Two choices keep long prompts fast and memory flat: the LM head runs only at
//! the positions whose logits are asked for, and attention is computed in query
//! chunks that each see only the keys they may attend to (no `[heads, T, T]` mask).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};

use super::attention::{causal_attention, AttnDims, Strided, TreeMask};
use super::config::{Activation, ModelConfig, NormKind, QkNorm};
use super::hooks::{HookPoint, Hooks};
use super::kernels::{self, with_f32_slice, WeightLayout};
use crate::error::{Error, Result};

/// Weights by HF name (`model.layers.0.self_attn.q_proj.weight`), q/k in the
/// half-split rope layout. Loaders fill this; the transformer consumes it.
pub type WeightSource<'a> = dyn FnMut(&str) -> Result<Option<Tensor>> + 'a;

/// Block-quantized weights by HF name, in their GGUF types (`--dtype quantized`);
/// `None` for a weight the source keeps dense.
pub type QuantSource<'a> = dyn FnMut(&str) -> Result<Option<QTensor>> + 'a;

/// A projection `y = x W + b`.
#[derive(Debug, Clone)]
struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `W` stored transposed as `[in, out]` (a contiguous right-hand side is the
    /// fast case for the CPU GEMM); fused parts are concatenated.
    DenseT(Tensor),
    /// GGUF block-quantized parts (q, k, v or gate, up), each `[out, in]`,
    /// multiplied by [`kernels::quantized_matmul`]; the outputs are concatenated.
    Quantized(Vec<Arc<QTensor>>),
}

impl Linear {
    /// From PyTorch-layout weights `[out, in]` (fused parts in order).
    fn new(parts: Vec<Tensor>, bias: Option<Tensor>) -> Result<Linear> {
        Ok(Linear {
            weight: LinearWeight::DenseT(Tensor::cat(&parts, 0)?.t()?.contiguous()?),
            bias,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::DenseT(w) => match kernels::matmul_tensor(x, w, WeightLayout::KByN)? {
                Some(y) => y,
                None => x.matmul(w)?,
            },
            LinearWeight::Quantized(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| kernels::quantized_matmul(p, x))
                    .collect::<Result<Vec<_>>>()?;
                // One part: cat returns it as is.
                Tensor::cat(&outs, 1)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `W` as `[in, out]` in f32 (dequantized when quantized).
    fn weight_t(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::DenseT(w) => Ok(w.to_dtype(DType::F32)?),
            LinearWeight::Quantized(parts) => {
                let dense = parts
                    .iter()
                    .map(|p| p.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&dense, 0)?.t()?.contiguous()?)
            }
        }
    }
}

/// Where [`Block::load`] gets its weights: dense tensors by HF name, and the
/// projections block-quantized when a quantized source has them.
struct Loader<'a, 'w, 'q> {
    weights: &'a mut WeightSource<'w>,
    quantized: Option<&'a mut QuantSource<'q>>,
    dtype: DType,
}

impl Loader<'_, '_, '_> {
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let t = (self.weights)(name)?
            .ok_or_else(|| Error::BadInput(format!("the model has no weight named `{name}`")))?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// `name` block-quantized, when the quantized source has it.
    fn quantized_table(&mut self, name: &str) -> Result<Option<QTensor>> {
        match self.quantized.as_mut() {
            Some(quantized) => quantized(name),
            None => Ok(None),
        }
    }

    /// The projection made of the weights `names` (fused in order) and `bias`.
    fn linear(&mut self, names: &[String], bias: Option<Tensor>) -> Result<Linear> {
        if let Some(quantized) = self.quantized.as_mut() {
            let mut parts = Vec::with_capacity(names.len());
            for name in names {
                match quantized(name)? {
                    Some(q) if is_block_quantized(&q) => parts.push(with_kernel(name, q)?),
                    _ => break,
                }
            }
            if parts.len() == names.len() {
                return Ok(Linear {
                    weight: LinearWeight::Quantized(parts),
                    bias,
                });
            }
        }
        let parts = names
            .iter()
            .map(|n| self.dense(n))
            .collect::<Result<Vec<_>>>()?;
        Linear::new(parts, bias)
    }
}

/// Whether `q` is stored in blocks (F32/F16/BF16 tensors are read dense).
fn is_block_quantized(q: &QTensor) -> bool {
    !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// `q` for the quantized path: an error naming the weight when no kernel
/// multiplies its block type.
fn with_kernel(name: &str, q: QTensor) -> Result<Arc<QTensor>> {
    if !kernels::has_quantized_matmul(q.dtype()) {
        return Err(Error::BadInput(format!(
            "weight `{name}` is stored as {:?}, which --dtype quantized has no kernel for \
             (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, Q8_K); use --dtype f32",
            q.dtype()
        )));
    }
    Ok(Arc::new(q))
}

/// A `[vocab, d_model]` table: the token embedding, or the unembedding.
#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor),
    /// Block-quantized rows (`--dtype quantized`): [`kernels::quantized_matmul`]
    /// for the unembedding, rows dequantized when looked up for the embedding.
    Quantized(Arc<QTensor>),
}

impl Table {
    fn new(loader: &mut Loader, name: &str) -> Result<Table> {
        Ok(match loader.quantized_table(name)? {
            Some(q) if is_block_quantized(&q) => Table::Quantized(with_kernel(name, q)?),
            _ => Table::Dense(loader.dense(name)?),
        })
    }

    fn dims(&self) -> &[usize] {
        match self {
            Table::Dense(t) => t.dims(),
            Table::Quantized(q) => q.shape().dims(),
        }
    }

    /// Rows `ids` as `[n, d_model]`.
    fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Table::Dense(t) => Ok(t.index_select(&Tensor::new(ids, device)?, 0)?),
            Table::Quantized(q) => {
                let (vocab, d) = q.shape().dims2()?;
                let dtype = q.dtype();
                let row = d / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let mut bytes = Vec::with_capacity(ids.len() * row);
                for &id in ids {
                    let i = id as usize;
                    if i >= vocab {
                        return Err(Error::BadInput(format!(
                            "token id {id} is outside the vocabulary ({vocab} tokens)"
                        )));
                    }
                    bytes.extend_from_slice(&data[i * row..(i + 1) * row]);
                }
                let rows = qtensor_from_ggml(dtype, &bytes, vec![ids.len(), d], device)?;
                Ok(rows.dequantize(device)?)
            }
        }
    }

    /// The whole table, dense f32.
    fn dense(&self) -> Result<Tensor> {
        match self {
            Table::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            Table::Quantized(q) => Ok(q.dequantize(&Device::Cpu)?),
        }
    }
}

/// RMSNorm `x̂ · w`; Gemma's `x̂ · (1 + w)` is loaded with `1 + w` as its weight
/// (the same f32 sum transformers computes in the forward).
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

    /// The norm over `n` groups of `size` columns from column `offset` of each
    /// `[T, width]` f32 row, in place (q/k norms on the fused projection).
    fn apply_rows(&self, rows: &mut [f32], width: usize, offset: usize, n: usize) -> Result<()> {
        let w = self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let size = w.len();
        for row in rows.chunks_exact_mut(width) {
            for group in row[offset..offset + n * size].chunks_exact_mut(size) {
                let ms = group.iter().map(|x| x * x).sum::<f32>() / size as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for (x, w) in group.iter_mut().zip(&w) {
                    *x = *x * r * w;
                }
            }
        }
        Ok(())
    }
}

/// An optional norm: the identity where a family has none.
fn norm_opt(norm: &Option<RmsNorm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
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
    /// RMSNorm of q and k before rope (per head or over the projection).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    /// Which rope table this layer uses (Gemma 3: local or global).
    rope: usize,
}

impl Attention {
    /// `hooks`/`layer`/`start` serve the attention internals (`attn.hook_q` ...),
    /// computed by [`Attention::internals`] only when one of them is asked for.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        kv: &mut LayerKv,
        hooks: &mut Hooks,
        layer: usize,
        at: &Layout,
    ) -> Result<Tensor> {
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
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            let q_groups = nh * hd / qn.weight.dim(0)?;
            let k_groups = nkv * hd / kn.weight.dim(0)?;
            qn.apply_rows(&mut qkv, width, 0, q_groups)?;
            kn.apply_rows(&mut qkv, width, nh * hd, k_groups)?;
        }
        rope.apply(&mut qkv, width, 0, nh);
        rope.apply(&mut qkv, width, nh * hd, nkv);
        let past = kv.len(nkv * hd);
        kv.append(&qkv, width, nh * hd, nkv * hd);
        let internals = [
            HookPoint::AttnQ(layer),
            HookPoint::AttnK(layer),
            HookPoint::AttnV(layer),
            HookPoint::AttnZ(layer),
            HookPoint::AttnPattern(layer),
        ];
        if let Some(&point) = internals.iter().find(|&&p| hooks.is_active(p)) {
            if at.tree.is_some() {
                return Err(Error::BadInput(format!(
                    "`{point}` is not available in a batched (token-tree) forward call; \
                     run the sequence on its own to read attention internals"
                )));
            }
            let values = self.internals(&qkv, kv, t, past, x.device())?;
            for (point, value) in internals.into_iter().zip(values) {
                hooks.run(point, value, &at.positions)?;
            }
        }
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
                scale: self.scale,
                softcap: self.softcap,
                window: self.window,
            },
            at.tree.as_ref(),
        );
        let out = Tensor::from_vec(out, (t, nh * hd), x.device())?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// q, k, v (this call's tokens), z and the pattern, computed directly in
    /// f64 from the roped projections and the cache (the fused kernel never
    /// forms them): `[t, heads, d_head]` for q/k/v/z, `[t, heads, past + t]`
    /// for the pattern. Exact, slow, and only run when asked for.
    fn internals(
        &self,
        qkv: &[f32],
        kv: &LayerKv,
        t: usize,
        past: usize,
        device: &Device,
    ) -> Result<[Tensor; 5]> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let width = (nh + 2 * nkv) * hd;
        let kv_width = nkv * hd;
        let keys = past + t;
        let rep = nh / nkv;
        let cols = |from: usize, n: usize| -> Vec<f32> {
            qkv.chunks_exact(width)
                .flat_map(|row| row[from..from + n].to_vec())
                .collect()
        };
        let q = cols(0, nh * hd);
        let mut pattern = vec![0f32; t * nh * keys];
        let mut z = vec![0f32; t * nh * hd];
        for i in 0..t {
            let visible = past + i + 1;
            let first = self.window.map_or(0, |w| visible.saturating_sub(w));
            for h in 0..nh {
                let g = h / rep;
                let qi = &q[(i * nh + h) * hd..][..hd];
                let scores: Vec<f64> = (first..visible)
                    .map(|j| {
                        let kj = &kv.k[j * kv_width + g * hd..][..hd];
                        let s = qi
                            .iter()
                            .zip(kj)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            * f64::from(self.scale);
                        self.softcap
                            .map_or(s, |c| f64::from(c) * (s / f64::from(c)).tanh())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let mut out = vec![0f64; hd];
                for (j, w) in (first..visible).zip(&weights) {
                    let p = w / total;
                    pattern[(i * nh + h) * keys + j] = p as f32;
                    let vj = &kv.v[j * kv_width + g * hd..][..hd];
                    for (o, v) in out.iter_mut().zip(vj) {
                        *o += p * f64::from(*v);
                    }
                }
                for (dst, o) in z[(i * nh + h) * hd..][..hd].iter_mut().zip(out) {
                    *dst = o as f32;
                }
            }
        }
        Ok([
            Tensor::from_vec(q, (t, nh, hd), device)?,
            Tensor::from_vec(cols(nh * hd, kv_width), (t, nkv, hd), device)?,
            Tensor::from_vec(cols(nh * hd + kv_width, kv_width), (t, nkv, hd), device)?,
            Tensor::from_vec(z, (t, nh, hd), device)?,
            Tensor::from_vec(pattern, (t, nh, keys), device)?,
        ])
    }
}

/// Gated MLP `down(act(gate(x)) · up(x))` with gate and up fused into one projection.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    d_mlp: usize,
    activation: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let d = self.d_mlp;
        let fused: Option<kernels::GatedKernel> = match self.activation {
            Activation::Silu => Some(kernels::swiglu),
            Activation::GeluTanh => Some(kernels::geglu_tanh),
            Activation::GeluErf => None,
        };
        if let Some(kernel) = fused {
            if let Some(h) = with_f32_slice(&gate_up, |rows| kernel(rows, d))? {
                let t = gate_up.dim(0)?;
                return self
                    .down_proj
                    .forward(&Tensor::from_vec(h, (t, d), x.device())?);
            }
        }
        let gate = gate_up.narrow(1, 0, self.d_mlp)?;
        let gate = match self.activation {
            Activation::Silu => gate.silu()?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::GeluErf => gate.gelu_erf()?,
        };
        let up = gate_up.narrow(1, self.d_mlp, self.d_mlp)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

/// One decoder block; each norm is optional (see `family.rs` for which
/// families have which).
#[derive(Debug, Clone)]
struct Block {
    attn_pre_norm: Option<RmsNorm>,
    attn: Attention,
    attn_post_norm: Option<RmsNorm>,
    mlp_pre_norm: Option<RmsNorm>,
    mlp: Mlp,
    mlp_post_norm: Option<RmsNorm>,
}

impl Block {
    /// Block `l`'s weights by HF name, per the family's table (`norm` builds
    /// a norm from its stored weight).
    fn load(
        c: &ModelConfig,
        l: usize,
        load: &mut Loader,
        norm: &dyn Fn(Tensor) -> Result<RmsNorm>,
    ) -> Result<Block> {
        let f = &c.family;
        let names = c.architecture.block_norms();
        let p = format!("model.layers.{l}");
        let attn = |name: &str| format!("{p}.self_attn.{name}");
        let mlp = |name: &str| format!("{p}.mlp.{name}");
        let mut block_norm = |name: Option<&str>| -> Result<Option<RmsNorm>> {
            name.map(|n| load.dense(&format!("{p}.{n}.weight")).and_then(norm))
                .transpose()
        };
        let attn_pre_norm = block_norm(names.attn_pre)?;
        let attn_post_norm = block_norm(names.attn_post)?;
        let mlp_pre_norm = block_norm(names.mlp_pre)?;
        let mlp_post_norm = block_norm(names.mlp_post)?;
        let (qkv_names, gate_up_names) = if c.architecture.fused_projections() {
            (
                vec![attn("qkv_proj.weight")],
                vec![mlp("gate_up_proj.weight")],
            )
        } else {
            (
                ["q_proj", "k_proj", "v_proj"]
                    .map(|n| attn(&format!("{n}.weight")))
                    .to_vec(),
                ["gate_proj", "up_proj"]
                    .map(|n| mlp(&format!("{n}.weight")))
                    .to_vec(),
            )
        };
        let qkv_bias = if c.architecture.has_qkv_bias() {
            let b = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|n| load.dense(&attn(&format!("{n}.bias"))))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        let (q_norm, k_norm) = match f.qk_norm {
            QkNorm::None => (None, None),
            _ => (
                Some(norm(load.dense(&attn("q_norm.weight"))?)?),
                Some(norm(load.dense(&attn("k_norm.weight"))?)?),
            ),
        };
        let window = c.window(l);
        Ok(Block {
            attn_pre_norm,
            attn: Attention {
                qkv_proj: load.linear(&qkv_names, qkv_bias)?,
                o_proj: load.linear(&[attn("o_proj.weight")], None)?,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                q_norm,
                k_norm,
                scale: c.attn_scale() as f32,
                softcap: f.attn_softcap.map(|x| x as f32),
                window,
                rope: usize::from(window.is_some() && f.rope_local_theta.is_some()),
            },
            attn_post_norm,
            mlp_pre_norm,
            mlp: Mlp {
                gate_up_proj: load.linear(&gate_up_names, None)?,
                down_proj: load.linear(&[mlp("down_proj.weight")], None)?,
                d_mlp: c.d_mlp,
                activation: f.activation,
            },
            mlp_post_norm,
        })
    }
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

impl LogitsAt {
    /// The rows of a `t`-token call that get logits; an error for a row past the call.
    pub fn rows(&self, t: usize) -> Result<Vec<usize>> {
        let rows = match self {
            LogitsAt::None => vec![],
            LogitsAt::Last => vec![t - 1],
            LogitsAt::All => (0..t).collect(),
            LogitsAt::Rows(rows) => rows.clone(),
        };
        if let Some(&bad) = rows.iter().find(|&&r| r >= t) {
            return Err(Error::BadInput(format!(
                "logits requested at row {bad} of a {t}-token forward call"
            )));
        }
        Ok(rows)
    }
}

/// Several continuations of a cached prompt as one tree of tokens: token `i`
/// follows `parents[i]` (an earlier token of the tree), or the cached tokens
/// when `None`. A branch is the path from a root to a token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenTree {
    pub tokens: Vec<u32>,
    pub parents: Vec<Option<usize>>,
}

impl TokenTree {
    /// The prefix tree (trie) of `branches`, one node per distinct non-empty
    /// prefix; returns it and, per branch, the node of each of its tokens.
    pub fn trie(branches: &[&[u32]]) -> (TokenTree, Vec<Vec<usize>>) {
        let mut tree = TokenTree::default();
        let mut nodes: HashMap<(Option<usize>, u32), usize> = HashMap::new();
        let paths = branches
            .iter()
            .map(|branch| {
                let mut parent = None;
                branch
                    .iter()
                    .map(|&token| {
                        let node = *nodes.entry((parent, token)).or_insert_with(|| {
                            tree.tokens.push(token);
                            tree.parents.push(parent);
                            tree.tokens.len() - 1
                        });
                        parent = Some(node);
                        node
                    })
                    .collect()
            })
            .collect();
        (tree, paths)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether some branch through a node from `from` on, read after the
    /// linear tokens `cached`, ends with `pattern` at that node.
    fn completes(&self, from: usize, cached: &[u32], pattern: &[u32]) -> bool {
        (from..self.len()).any(|i| {
            // The branch's last tokens up to i, newest first, continued into the cache.
            let mut node = Some(i);
            let branch = std::iter::from_fn(|| {
                let n = node?;
                node = self.parents[n];
                Some(self.tokens[n])
            });
            let newest_first = branch.chain(cached.iter().rev().copied());
            newest_first
                .take(pattern.len())
                .eq(pattern.iter().rev().copied())
        })
    }
}

/// Where one forward call's rows sit: their absolute positions, and the tree
/// mask when they are not one contiguous run.
struct Layout {
    positions: Vec<usize>,
    tree: Option<TreeMask>,
    /// Start at this block with these `hook_resid_pre` rows (lower blocks skipped).
    from: Option<(usize, Tensor)>,
}

/// The decoder with its weights.
#[derive(Debug, Clone)]
pub struct Transformer {
    config: ModelConfig,
    embed_tokens: Table,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: Table,
    /// Rope tables: `[0]` global, `[1]` the sliding-window layers' when their base differs.
    ropes: Vec<RopeFreqs>,
    device: Device,
    /// Activated LoRA (`--adapter` with `alora_invocation_tokens`): merged weights
    /// used from the invocation tokens on (see `adapter.rs`).
    pub(crate) activated: Option<Box<super::adapter::Activated>>,
}

/// Inverse frequencies of one rope table and the factor on cos/sin (YaRN, LongRoPE).
#[derive(Debug, Clone)]
struct RopeFreqs {
    inv_freq: Vec<f32>,
    attention_factor: f32,
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
        let mut load = Loader {
            weights,
            quantized,
            dtype,
        };
        let c = &config;
        let f = &c.family;
        let eps = c.rms_norm_eps as f32;
        let one_plus = f.norm == NormKind::RmsOnePlus;
        let norm = |w: Tensor| -> Result<RmsNorm> {
            let weight = if one_plus { (w + 1.0)? } else { w };
            Ok(RmsNorm { weight, eps })
        };
        let mut blocks = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            blocks.push(Block::load(c, l, &mut load, &norm)?);
        }
        let embed_tokens = Table::new(&mut load, "model.embed_tokens.weight")?;
        let lm_head = if c.tied_embeddings {
            embed_tokens.clone()
        } else {
            Table::new(&mut load, "lm_head.weight")?
        };
        let final_norm = norm(load.dense("model.norm.weight")?)?;
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
        let rope_table = |sliding: bool| {
            let (inv_freq, attention_factor) = c.rope_inv_freq(sliding);
            RopeFreqs {
                inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
                attention_factor: attention_factor as f32,
            }
        };
        let ropes = vec![rope_table(false), rope_table(true)];
        Ok(Transformer {
            device: final_norm.weight.device().clone(),
            config,
            embed_tokens,
            blocks,
            final_norm,
            lm_head,
            ropes,
            activated: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.final_norm.weight.dtype()
    }

    /// The final norm's effective weight (`1 + w` for Gemma) as f32 `[d_model]`
    /// and its epsilon, for attributions through the norm.
    pub fn final_norm_parts(&self) -> Result<(Tensor, f32)> {
        Ok((
            self.final_norm.weight.to_dtype(DType::F32)?,
            self.final_norm.eps,
        ))
    }

    /// The unembedding matrix `[vocab, d_model]` (the embedding when tied), f32
    /// (dequantized under `--dtype quantized`).
    pub fn unembed(&self) -> Result<Tensor> {
        self.lm_head.dense()
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
            None => self,
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
            if *layer >= self.config.n_layers || rows != tree.len() || d != self.config.d_model {
                return Err(Error::BadInput(format!(
                    "a tree run from block {layer} of {} needs [{}, {}] resid_pre rows, got \
                     [{rows}, {d}]",
                    self.config.n_layers,
                    tree.len(),
                    self.config.d_model
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
            kv.forget_after(start + cached);
        }
        logits.map(Some)
    }

    /// [`forward`](Self::forward) with this transformer's own weights only.
    pub(crate) fn forward_base(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
    ) -> Result<Tensor> {
        // Linear tokens follow the linear ones: drop branches a lockstep decode left.
        kv.truncate(kv.len())?;
        let start = kv.len();
        let layout = Layout {
            positions: (start..start + tokens.len()).collect(),
            tree: None,
            from: None,
        };
        let logits = self.run(tokens, &layout, kv, hooks, logits_at)?;
        kv.tokens.extend_from_slice(tokens);
        Ok(logits)
    }

    /// The decoder over `tokens` laid out by `at`, appending their keys and
    /// values to `kv`'s layers (the caller records or forgets the tokens).
    fn run(
        &self,
        tokens: &[u32],
        at: &Layout,
        kv: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: &LogitsAt,
    ) -> Result<Tensor> {
        let t = tokens.len();
        let end = at.positions.iter().max().map_or(0, |&p| p + 1);
        self.check_window(t, end)?;
        hooks.check(self.config.n_layers)?;
        kv.ensure_layers(
            self.config.n_layers,
            self.config.n_kv_heads * self.config.head_dim,
        );
        let ropes: Vec<Rope> = self
            .ropes
            .iter()
            .map(|r| Rope::new(r, &at.positions))
            .collect();
        let pos = &at.positions;
        let (first, mut x) = match &at.from {
            Some((layer, resid_pre)) => (*layer, resid_pre.clone()),
            None => {
                let mut x = self.embed_tokens.rows(tokens, &self.device)?;
                if let Some(scale) = self.config.family.embed_scale {
                    x = (x * f64::from(scale as f32))?;
                }
                (0, hooks.run(HookPoint::Embed, x, pos)?)
            }
        };
        for (l, block) in self.blocks.iter().enumerate().skip(first) {
            x = hooks.run(HookPoint::ResidPre(l), x, pos)?;
            let h = norm_opt(&block.attn_pre_norm, x.clone())?;
            let rope = &ropes[block.attn.rope];
            let attn_out = block
                .attn
                .forward(&h, rope, &mut kv.layers[l], hooks, l, at)?;
            let attn_out = norm_opt(&block.attn_post_norm, attn_out)?;
            let attn_out = hooks.run(HookPoint::AttnOut(l), attn_out, pos)?;
            x = hooks.run(HookPoint::ResidMid(l), (x + attn_out)?, pos)?;
            let h = norm_opt(&block.mlp_pre_norm, x.clone())?;
            let mlp_out = norm_opt(&block.mlp_post_norm, block.mlp.forward(&h)?)?;
            let mlp_out = hooks.run(HookPoint::MlpOut(l), mlp_out, pos)?;
            x = hooks.run(HookPoint::ResidPost(l), (x + mlp_out)?, pos)?;
        }

        // The final norm is per row: normalise only the rows that need logits,
        // unless `ln_final` is hooked and wants every row (whether or not any
        // row needs logits: a capture without scores still stores it).
        let no_logits = || Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device);
        let normed = if hooks.is_active(HookPoint::LnFinal) {
            let normed = self.final_norm.forward(&x)?;
            Some(hooks.run(HookPoint::LnFinal, normed, pos)?)
        } else {
            None
        };
        if *logits_at == LogitsAt::None {
            return Ok(no_logits()?);
        }
        let rows = logits_at.rows(t)?;
        let rows = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &self.device,
        )?;
        match normed {
            Some(normed) => self.unembed_normed(&normed.index_select(&rows, 0)?),
            None => self.logit_lens(&x.index_select(&rows, 0)?),
        }
    }

    /// Layer `l`'s attention output projection as f32 `[n_heads·d_head, d_model]`
    /// (rows `h·d_head..(h+1)·d_head` carry head `h`'s `attn.hook_z` into the
    /// residual), as applied at the end of `tokens` (an activated adapter's
    /// weights once its invocation occurs in them). `None` where
    /// `hook_attn_out` is not a sum of per-head terms: a post-attention norm
    /// (Gemma 2/3, OLMo 2) or an output bias.
    pub fn head_out_weight(&self, l: usize, tokens: &[u32]) -> Result<Option<Tensor>> {
        let t = match &self.activated {
            Some(a) if a.start_in(tokens).is_some() => &a.adapted,
            _ => self,
        };
        let block = &t.blocks[l];
        if block.attn_post_norm.is_some() || block.attn.o_proj.bias.is_some() {
            return Ok(None);
        }
        Ok(Some(block.attn.o_proj.weight_t()?))
    }

    /// Final norm + unembedding of residual rows `[n, d_model]`: the logits the
    /// model would output if these were the last layer's residuals (the logit lens).
    pub fn logit_lens(&self, resid: &Tensor) -> Result<Tensor> {
        self.unembed_normed(&self.final_norm.forward(&resid.to_dtype(self.dtype())?)?)
    }

    fn unembed_normed(&self, normed: &Tensor) -> Result<Tensor> {
        // f32: the deterministic column-split kernel reading the [vocab, d] matrix
        // as its transpose (no copy), so scores are reproducible to the bit.
        let logits = match &self.lm_head {
            Table::Dense(w) => match kernels::matmul_tensor(normed, w, WeightLayout::NByK)? {
                Some(logits) => logits,
                None => normed.matmul(&w.t()?)?.to_dtype(DType::F32)?,
            },
            Table::Quantized(w) => kernels::quantized_matmul(w, normed)?,
        };
        match self.config.family.final_softcap {
            // cap · tanh(logit / cap) (Gemma 2)
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    /// Errors unless a sequence of `n` tokens fits the context window.
    pub fn check_length(&self, n: usize) -> Result<()> {
        self.check_window(n, n)
    }

    /// Errors unless a call of `t` tokens, the furthest at position `end - 1`, fits.
    fn check_window(&self, t: usize, end: usize) -> Result<()> {
        let max = self.config.max_position_embeddings;
        if t == 0 {
            return Err(Error::BadInput(
                "cannot run the model on zero tokens".into(),
            ));
        }
        if end > max {
            return Err(Error::BadInput(format!(
                "the sequence would be {} tokens long, but the model's context window is {max} \
                 tokens; shorten the prompt (or the number of tokens to generate)",
                end
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
    /// Nodes kept after the linear tokens by [`Transformer::grow_tree`].
    branches: TokenTree,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of linear tokens cached (branches not counted).
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

    /// Keeps only the first `len` tokens (and no branches).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if !self.branches.is_empty() {
            self.forget_after(self.tokens.len());
            self.branches = TokenTree::default();
        }
        if len < self.tokens.len() {
            self.tokens.truncate(len);
            self.adapted_from = self.adapted_from.filter(|&a| a < len);
            let width = self.kv_width;
            self.layers.iter_mut().for_each(|l| l.truncate(len, width));
        }
        Ok(())
    }

    /// Drops keys and values past the first `len` tokens that no token records
    /// (those a token tree appended for its own call).
    fn forget_after(&mut self, len: usize) {
        let width = self.kv_width;
        self.layers.iter_mut().for_each(|l| l.truncate(len, width));
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
            self.branches = TokenTree::default();
            self.kv_width = kv_width;
        }
    }
}

/// Rotary tables (`cos`, `sin`: `[T, head_dim / 2]`) for the absolute positions of one forward call's rows.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    fn new(freqs: &RopeFreqs, positions: &[usize]) -> Rope {
        let half = freqs.inv_freq.len();
        let a = freqs.attention_factor;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &freqs.inv_freq {
                // f32 angle, as transformers computes it, so long positions agree.
                let angle = pos as f32 * f;
                cos.push(angle.cos() * a);
                sin.push(angle.sin() * a);
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
