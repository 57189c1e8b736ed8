//! The hooked Llama-family decoder: one struct per layer, a forward pass that
//! reads top to bottom with the TransformerLens hook points in plain sight
//! (kept in one file, as candle-transformers' `llama.rs`, so it reads as one).
//! `Transformer` (transformer.rs) wraps it (activated LoRA,
//! token trees); its weights are in `weights.rs`, its cache in `kv_cache.rs`.
//!
//! Two engines run the heavy parts ([`Engine`], docs/hooks-and-api.md
//! "Engines"): the fused CPU kernels below, or `portable.rs`'s tensor ops;
//! the layer order, norms and hooks here are shared.
//!
//! Activations are `[T, d_model]` for one sequence (batch 1); prompts of a study
//! share a long system prompt, so [`KvCache`] reuse beats batching on CPU.
//! Two choices keep long prompts fast and memory flat: the LM head runs only at
//! the positions whose logits are asked for, and attention is computed in query
//! chunks that each see only the keys they may attend to (no `[heads, T, T]` mask).

use candle_core::{DType, Device, Tensor};

use super::attention::{causal_attention, AttnDims, Strided, TreeMask};
use super::config::{Activation, ModelConfig, NormKind, QkNorm};
use super::hooks::{HookPoint, Hooks};
use super::kernels::{self, with_f32_slice, WeightLayout};
use super::kv_cache::{KvCache, LayerKv};
use super::lora::Lora;
use super::portable::{self, AttentionShape, Engine};
use super::token_tree::LogitsAt;
use super::weights::{Linear, Loader, QuantSource, Table, WeightSource};
use crate::error::{Error, Result};

/// RMSNorm `x̂ · w`; Gemma's `x̂ · (1 + w)` is loaded with `1 + w` as its weight
/// (the same f32 sum transformers computes in the forward).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// The portable engine takes candle's composed `rms_norm_slow`: the fused
    /// `rms_norm` kernel has no backward.
    fn forward(&self, x: &Tensor, engine: Engine) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match engine {
            Engine::Fused => candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?,
            Engine::Portable => candle_nn::ops::rms_norm_slow(&x, &self.weight, self.eps)?,
        })
    }

    /// The norm over every `size` columns of `x` (`[T, n · size]`, f32), as
    /// [`apply_rows`](Self::apply_rows) computes it: q/k norms in tensor ops.
    fn forward_groups(&self, x: &Tensor) -> Result<Tensor> {
        let (t, width) = x.dims2()?;
        let size = self.weight.dim(0)?;
        let w = self.weight.to_dtype(DType::F32)?;
        let groups = x.contiguous()?.reshape((t * width / size, size))?;
        Ok(candle_nn::ops::rms_norm_slow(&groups, &w, self.eps)?.reshape((t, width))?)
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
fn norm_opt(norm: &Option<RmsNorm>, x: Tensor, engine: Engine) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x, engine),
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
            .forward(x, Engine::Fused)?
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
        if internals_wanted(hooks, layer, at)? {
            let values = self.internals(&qkv, kv, t, past, x.device())?;
            run_internals(hooks, layer, values, at)?;
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
        self.o_proj.forward(&out, Engine::Fused)
    }

    /// [`forward`](Self::forward) in tensor ops ([`portable`]): the same
    /// projection, q/k norms and rope, attention in f32 over a tensor cache;
    /// the internals are the tensors it computes (f32, not the fused path's f64).
    fn forward_portable(
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
        let qkv = self
            .qkv_proj
            .forward(x, Engine::Portable)?
            .to_dtype(DType::F32)?;
        let mut q = qkv.narrow(1, 0, nh * hd)?;
        let mut k = qkv.narrow(1, nh * hd, nkv * hd)?;
        let v = qkv
            .narrow(1, (nh + nkv) * hd, nkv * hd)?
            .reshape((t, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward_groups(&q)?;
            k = kn.forward_groups(&k)?;
        }
        let q = rope.apply_tensor(&q.reshape((t, nh, hd))?)?;
        let k = rope.apply_tensor(&k.reshape((t, nkv, hd))?)?;
        let shape = AttentionShape {
            n_kv_heads: nkv,
            scale: self.scale,
            softcap: self.softcap,
            window: self.window,
        };
        let (z, pattern) = portable::attention(&q, &k, &v, kv, &shape, at)?;
        if internals_wanted(hooks, layer, at)? {
            run_internals(hooks, layer, [q, k, v, z.clone(), pattern], at)?;
        }
        let out = z.reshape((t, nh * hd))?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out, Engine::Portable)
    }
}

/// Whether a hook asks for layer `layer`'s attention internals (an error in a
/// token-tree call, where they are not defined per sequence).
fn internals_wanted(hooks: &Hooks, layer: usize, at: &Layout) -> Result<bool> {
    let Some(point) = internal_points(layer)
        .into_iter()
        .find(|&p| hooks.is_active(p))
    else {
        return Ok(false);
    };
    if at.tree.is_some() {
        return Err(Error::BadInput(format!(
            "`{point}` is not available in a batched (token-tree) forward call; \
             run the sequence on its own to read attention internals"
        )));
    }
    Ok(true)
}

fn internal_points(layer: usize) -> [HookPoint; 5] {
    [
        HookPoint::AttnQ(layer),
        HookPoint::AttnK(layer),
        HookPoint::AttnV(layer),
        HookPoint::AttnZ(layer),
        HookPoint::AttnPattern(layer),
    ]
}

/// Hands q, k, v, z and the pattern to the hooks (capture only).
fn run_internals(hooks: &mut Hooks, layer: usize, values: [Tensor; 5], at: &Layout) -> Result<()> {
    for (point, value) in internal_points(layer).into_iter().zip(values) {
        hooks.run(point, value, &at.positions)?;
    }
    Ok(())
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
    fn forward(&self, x: &Tensor, engine: Engine) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x, engine)?;
        let d = self.d_mlp;
        let fused: Option<kernels::GatedKernel> = match (self.activation, engine) {
            (_, Engine::Portable) | (Activation::GeluErf, _) => None,
            (Activation::Silu, Engine::Fused) => Some(kernels::swiglu),
            (Activation::GeluTanh, Engine::Fused) => Some(kernels::geglu_tanh),
        };
        if let Some(kernel) = fused {
            if let Some(h) = with_f32_slice(&gate_up, |rows| kernel(rows, d))? {
                let t = gate_up.dim(0)?;
                return self
                    .down_proj
                    .forward(&Tensor::from_vec(h, (t, d), x.device())?, engine);
            }
        }
        let gate = gate_up.narrow(1, 0, self.d_mlp)?;
        let gate = match self.activation {
            Activation::Silu => gate.silu()?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::GeluErf => gate.gelu_erf()?,
        };
        let up = gate_up.narrow(1, self.d_mlp, self.d_mlp)?;
        self.down_proj.forward(&(gate * up)?, engine)
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

/// Where one forward call's rows sit: their absolute positions, and the tree
/// mask when they are not one contiguous run.
pub(super) struct Layout {
    pub(super) positions: Vec<usize>,
    pub(super) tree: Option<TreeMask>,
    /// Start at this block with these `hook_resid_pre` rows (lower blocks skipped).
    pub(super) from: Option<(usize, Tensor)>,
}

/// The decoder with its weights.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: ModelConfig,
    embed_tokens: Table,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: Table,
    /// Rope tables: `[0]` global, `[1]` the sliding-window layers' when their base differs.
    ropes: Vec<RopeFreqs>,
    device: Device,
    /// What runs the heavy parts (`--engine`).
    engine: Engine,
}

/// Inverse frequencies of one rope table and the factor on cos/sin (YaRN, LongRoPE).
#[derive(Debug, Clone)]
struct RopeFreqs {
    inv_freq: Vec<f32>,
    attention_factor: f32,
}

impl Decoder {
    /// Builds the decoder from weights by HF name, converted to `dtype` (names
    /// and which weights exist per family: `family.rs`), with the projections,
    /// the embedding and the unembedding taken block-quantized from `quantized`
    /// where it has them (`--dtype quantized`); norms and biases stay dense.
    pub(super) fn load(
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
        Ok(Decoder {
            device: final_norm.weight.device().clone(),
            config,
            embed_tokens,
            blocks,
            final_norm,
            lm_head,
            ropes,
            engine: Engine::Fused,
        })
    }

    /// Runs the heavy parts with `engine` from now on.
    pub(super) fn set_engine(&mut self, engine: Engine) {
        self.engine = engine;
    }

    pub(super) fn engine(&self) -> Engine {
        self.engine
    }

    /// Moves every weight to `device` (the block-quantized ones cannot move:
    /// their kernels are the CPU's).
    pub(super) fn move_to(&mut self, device: &Device) -> Result<()> {
        let norm = |n: &mut RmsNorm| -> Result<()> {
            n.weight = n.weight.to_device(device)?;
            Ok(())
        };
        for b in &mut self.blocks {
            for n in [
                &mut b.attn_pre_norm,
                &mut b.attn_post_norm,
                &mut b.mlp_pre_norm,
                &mut b.mlp_post_norm,
                &mut b.attn.q_norm,
                &mut b.attn.k_norm,
            ]
            .into_iter()
            .flatten()
            {
                norm(n)?;
            }
            for linear in [
                &mut b.attn.qkv_proj,
                &mut b.attn.o_proj,
                &mut b.mlp.gate_up_proj,
                &mut b.mlp.down_proj,
            ] {
                linear.move_to(device)?;
            }
        }
        norm(&mut self.final_norm)?;
        self.embed_tokens = self.embed_tokens.to_device(device)?;
        self.lm_head = self.lm_head.to_device(device)?;
        self.device = device.clone();
        Ok(())
    }

    /// Attaches `lora`'s factors, unmerged, to every projection it adapts
    /// (`None`: detaches them). See `lora.rs`.
    pub(super) fn set_lora(&mut self, lora: Option<&Lora>) {
        for (l, b) in self.blocks.iter_mut().enumerate() {
            for linear in [
                &mut b.attn.qkv_proj,
                &mut b.attn.o_proj,
                &mut b.mlp.gate_up_proj,
                &mut b.mlp.down_proj,
            ] {
                linear.set_lora(lora, l);
            }
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub(super) fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.final_norm.weight.dtype()
    }

    /// The final norm's effective weight (`1 + w` for Gemma) as f32 `[d_model]`
    /// on the CPU (with the captures), and its epsilon, for attributions
    /// through the norm.
    pub fn final_norm_parts(&self) -> Result<(Tensor, f32)> {
        Ok((
            self.final_norm
                .weight
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
            self.final_norm.eps,
        ))
    }

    /// The unembedding matrix `[vocab, d_model]` (the embedding when tied), f32
    /// on the CPU (dequantized under `--dtype quantized`).
    pub fn unembed(&self) -> Result<Tensor> {
        Ok(self.lm_head.dense()?.to_device(&Device::Cpu)?)
    }

    /// Runs `tokens` on top of what `kv` already holds with these weights
    /// (`Transformer::forward` without an activated adapter).
    pub(super) fn forward(
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
        match self.run(tokens, &layout, kv, hooks, logits_at) {
            Ok(logits) => {
                kv.tokens.extend_from_slice(tokens);
                Ok(logits)
            }
            Err(e) => {
                // Layers before the failure (a hook that raised) stored this
                // call's keys; the cache must hold only recorded tokens.
                kv.forget_after(start)?;
                Err(e)
            }
        }
    }

    /// The decoder over `tokens` laid out by `at`, appending their keys and
    /// values to `kv`'s layers (the caller records or forgets the tokens).
    pub(super) fn run(
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
        kv.check_engine(self.engine)?;
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
            let h = norm_opt(&block.attn_pre_norm, x.clone(), self.engine)?;
            let rope = &ropes[block.attn.rope];
            let layer_kv = &mut kv.layers[l];
            let attn_out = match self.engine {
                Engine::Fused => block.attn.forward(&h, rope, layer_kv, hooks, l, at)?,
                Engine::Portable => block
                    .attn
                    .forward_portable(&h, rope, layer_kv, hooks, l, at)?,
            };
            let attn_out = norm_opt(&block.attn_post_norm, attn_out, self.engine)?;
            let attn_out = hooks.run(HookPoint::AttnOut(l), attn_out, pos)?;
            x = hooks.run(HookPoint::ResidMid(l), (x + attn_out)?, pos)?;
            let h = norm_opt(&block.mlp_pre_norm, x.clone(), self.engine)?;
            let mlp_out = block.mlp.forward(&h, self.engine)?;
            let mlp_out = norm_opt(&block.mlp_post_norm, mlp_out, self.engine)?;
            let mlp_out = hooks.run(HookPoint::MlpOut(l), mlp_out, pos)?;
            x = hooks.run(HookPoint::ResidPost(l), (x + mlp_out)?, pos)?;
        }

        // The final norm is per row: normalise only the rows that need logits,
        // unless `ln_final` is hooked and wants every row (whether or not any
        // row needs logits: a capture without scores still stores it).
        let no_logits = || Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device);
        let normed = if hooks.is_active(HookPoint::LnFinal) {
            let normed = self.final_norm.forward(&x, self.engine)?;
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
    /// (what `Transformer::head_out_weight` documents), or `None` where
    /// `hook_attn_out` is not a sum of per-head terms.
    pub(super) fn head_out_weight(&self, l: usize) -> Result<Option<Tensor>> {
        let block = &self.blocks[l];
        if block.attn_post_norm.is_some() || block.attn.o_proj.bias.is_some() {
            return Ok(None);
        }
        Ok(Some(block.attn.o_proj.weight_t()?.to_device(&Device::Cpu)?))
    }

    /// Final norm + unembedding of residual rows `[n, d_model]`: the logits the
    /// model would output if these were the last layer's residuals (the logit lens).
    pub fn logit_lens(&self, resid: &Tensor) -> Result<Tensor> {
        let resid = resid.to_device(&self.device)?.to_dtype(self.dtype())?;
        self.unembed_normed(&self.final_norm.forward(&resid, self.engine)?)
    }

    fn unembed_normed(&self, normed: &Tensor) -> Result<Tensor> {
        let logits = match (&self.lm_head, self.engine) {
            (Table::Dense(w), Engine::Portable) => {
                portable::frozen_matmul(normed, &w.t()?)?.to_dtype(DType::F32)?
            }
            // f32: the deterministic column-split kernel reading the [vocab, d]
            // matrix as its transpose (no copy), so scores are reproducible to the bit.
            (Table::Dense(w), Engine::Fused) => {
                match kernels::matmul_tensor(normed, w, WeightLayout::NByK)? {
                    Some(logits) => logits,
                    None => normed.matmul(&w.t()?)?.to_dtype(DType::F32)?,
                }
            }
            (Table::Quantized(w), Engine::Fused) => kernels::quantized_matmul(w, normed)?,
            (Table::Quantized(w), Engine::Portable) => portable::quantized_matmul(w, normed)?,
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

    /// Rotates `x` (`[T, heads, d_head]`, f32) in tensor ops, as [`apply`](Self::apply).
    fn apply_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let (t, _, _) = x.dims3()?;
        let half = self.half;
        let cos = Tensor::from_slice(&self.cos, (t, 1, half), x.device())?;
        let sin = Tensor::from_slice(&self.sin, (t, 1, half), x.device())?;
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], 2)?)
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
