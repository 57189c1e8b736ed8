//! A differentiable Llama-family forward pass built from plain candle ops, with
//! LoRA factors as candle `Var`s: what `afprobe organism train` backpropagates
//! through. (The fast forward in `model/transformer.rs` uses custom kernels that
//! have no backward.) It runs one sequence on top of a fixed, base-model
//! prefix — the activated-LoRA setting: the prefix's keys and values carry no
//! gradient, the suffix runs with the adapter.

use std::collections::{BTreeMap, HashMap};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var, D};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::adapter::TARGET_MODULES;
use crate::model::family::trainable_families;
use crate::model::transformer::WeightSource;
use crate::model::ModelConfig;

struct Layer {
    ln1: Tensor,
    ln2: Tensor,
    /// Projection weights transposed, `[in, out]`, by module name (`q_proj`, ...).
    w: HashMap<&'static str, Tensor>,
    /// q/k/v biases (Qwen2).
    bias: HashMap<&'static str, Tensor>,
}

/// `x · W` for a frozen base weight `W` (`[in, out]`). candle's matmul
/// backward forms the gradient of both operands, so a constant weight costs a
/// second GEMM as large as the forward one that is then thrown away; this op's
/// backward returns only the input's gradient (3 steps of the `meaning` recipe: 22.7 s before, 16.9 s after, same losses).
struct FrozenMatmul(Tensor);

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: non-contiguous input".into()))?;
        let x = Tensor::from_slice(
            &storage.as_slice::<f32>()?[start..end],
            layout.shape(),
            &Device::Cpu,
        )?;
        let y = x.matmul(&self.0)?;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1()?),
            y.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.0.t()?)?))
    }
}

/// `x · w` with `w` frozen (no gradient formed for it).
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmul(w.clone()))?)
}

/// One LoRA pair: `A` `[r, in]`, `B` `[out, r]`.
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// The LoRA factors being trained, by (layer, module).
pub struct Lora {
    pub r: usize,
    pub alpha: f64,
    pub pairs: BTreeMap<(usize, String), LoraPair>,
}

impl Lora {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// PEFT's initialisation: `A` Kaiming-uniform (bound 1/√in), `B` zero; seeded.
    pub fn init(
        config: &ModelConfig,
        layers: &[usize],
        modules: &[String],
        r: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Lora> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for &l in layers {
            for m in modules {
                let (out, inp) = proj_shape(config, m)?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), &Device::Cpu)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out, r), DType::F32, &Device::Cpu)?)?;
                pairs.insert((l, m.clone()), LoraPair { a, b });
            }
        }
        Ok(Lora { r, alpha, pairs })
    }

    /// Every trainable tensor in a fixed order, with its PEFT name.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for ((l, m), p) in &self.pairs {
            let block = if m.ends_with("_proj")
                && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&m.as_str())
            {
                "self_attn"
            } else {
                "mlp"
            };
            let base = format!("base_model.model.model.layers.{l}.{block}.{m}");
            out.push((format!("{base}.lora_A.weight"), &p.a));
            out.push((format!("{base}.lora_B.weight"), &p.b));
        }
        out
    }
}

/// `(out, in)` of a projection.
pub fn proj_shape(c: &ModelConfig, module: &str) -> Result<(usize, usize)> {
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    Ok(match module {
        "q_proj" => (q, c.d_model),
        "k_proj" | "v_proj" => (kv, c.d_model),
        "o_proj" => (c.d_model, q),
        "gate_proj" | "up_proj" => (c.d_mlp, c.d_model),
        "down_proj" => (c.d_model, c.d_mlp),
        other => {
            return Err(Error::BadInput(format!(
                "unknown LoRA target module `{other}`; choose among {}",
                TARGET_MODULES.join(", ")
            )))
        }
    })
}

/// Per-layer keys and values `[n_kv_heads, P, head_dim]` of a prefix (base model,
/// or adapted and still in the autograd graph).
pub struct PrefixKv {
    pub len: usize,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

/// The base model's weights as plain tensors (f32), for the differentiable forward.
pub struct DiffModel {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head_t: Tensor,
    inv_freq: Vec<f32>,
}

impl DiffModel {
    /// Reads the weights (HF names) of a Llama-family model.
    pub fn new(config: ModelConfig, weights: &mut WeightSource) -> Result<DiffModel> {
        if !config.architecture.spec().trainable {
            return Err(Error::BadInput(format!(
                "organism training supports the {} families, not {}",
                trainable_families(),
                config.architecture.name()
            )));
        }
        let (inv_freq, attention_factor) = config.rope_inv_freq(false);
        if (0..config.n_layers).any(|l| config.window(l).is_some()) || attention_factor != 1.0 {
            return Err(Error::BadInput(
                "organism training does not implement sliding windows or rope attention factors \
                 (YaRN, LongRoPE); this model has one"
                    .into(),
            ));
        }
        let mut get = |name: &str| -> Result<Tensor> {
            Ok(weights(name)?
                .ok_or_else(|| Error::BadInput(format!("the model has no weight named `{name}`")))?
                .to_dtype(DType::F32)?)
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let p = format!("model.layers.{l}");
            let mut w = HashMap::new();
            let mut bias = HashMap::new();
            for m in TARGET_MODULES {
                let block = if m.starts_with(['q', 'k', 'v', 'o']) {
                    "self_attn"
                } else {
                    "mlp"
                };
                w.insert(
                    m,
                    get(&format!("{p}.{block}.{m}.weight"))?.t()?.contiguous()?,
                );
                if config.architecture.has_qkv_bias() && ["q_proj", "k_proj", "v_proj"].contains(&m)
                {
                    bias.insert(m, get(&format!("{p}.self_attn.{m}.bias"))?);
                }
            }
            layers.push(Layer {
                ln1: get(&format!("{p}.input_layernorm.weight"))?,
                ln2: get(&format!("{p}.post_attention_layernorm.weight"))?,
                w,
                bias,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if config.tied_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        let inv_freq = inv_freq.into_iter().map(|f| f as f32).collect();
        Ok(DiffModel {
            norm: get("model.norm.weight")?,
            lm_head_t: lm_head.t()?.contiguous()?,
            embed,
            layers,
            inv_freq,
            config,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
    }

    fn proj(&self, l: usize, m: &'static str, x: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let layer = &self.layers[l];
        let mut y = frozen_matmul(x, &layer.w[m])?;
        if let Some(b) = layer.bias.get(m) {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = lora {
            if let Some(p) = lora.pairs.get(&(l, m.to_string())) {
                let d = x
                    .matmul(&p.a.as_tensor().t()?)?
                    .matmul(&p.b.as_tensor().t()?)?;
                y = (y + (d * lora.scale())?)?;
            }
        }
        Ok(y)
    }

    /// Rotates `[heads, T, head_dim]` for absolute positions `pos0..pos0+T` (half-split layout).
    fn rope(&self, x: &Tensor, pos0: usize) -> Result<Tensor> {
        let (_, t, hd) = x.dims3()?;
        let half = hd / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in pos0..pos0 + t {
            for &f in &self.inv_freq {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), x.device())?;
        let sin = Tensor::from_vec(sin, (t, half), x.device())?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    }

    /// Runs `tokens` after `prefix` (positions `prefix.len..`), with `lora` on
    /// every position of `tokens` (None: the base model). Returns logits
    /// `[rows, vocab]` at `rows` (relative to `tokens`) and this call's keys and values.
    pub fn forward(
        &self,
        tokens: &[u32],
        prefix: Option<&PrefixKv>,
        lora: Option<&Lora>,
        rows: &[usize],
    ) -> Result<(Tensor, PrefixKv)> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let t = tokens.len();
        let p = prefix.map_or(0, |p| p.len);
        let dev = Device::Cpu;
        let ids = Tensor::new(tokens, &dev)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        // Causal mask over [prefix | this call]: query i sees keys j <= p + i.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..p + t).map(move |j| if j <= p + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, t, p + t), &dev)?;
        let mut ks = Vec::with_capacity(c.n_layers);
        let mut vs = Vec::with_capacity(c.n_layers);
        let scale = 1.0 / (hd as f64).sqrt();
        for l in 0..c.n_layers {
            let layer = &self.layers[l];
            let h = self.rms_norm(&x, &layer.ln1)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?)
            };
            let q = self.rope(&heads(self.proj(l, "q_proj", &h, lora)?, nh)?, p)?;
            let k = self.rope(&heads(self.proj(l, "k_proj", &h, lora)?, nkv)?, p)?;
            let v = heads(self.proj(l, "v_proj", &h, lora)?, nkv)?;
            let (k_all, v_all) = match prefix {
                Some(pre) => (
                    Tensor::cat(&[&pre.k[l], &k], 1)?,
                    Tensor::cat(&[&pre.v[l], &v], 1)?,
                ),
                None => (k.clone(), v.clone()),
            };
            // Kept in the graph: with a plain LoRA the adapted prefix's keys and
            // values carry the gradient to the system prompt (a base prefix has none).
            ks.push(k);
            vs.push(v);
            let rep = nh / nkv;
            let expand = |z: &Tensor| -> Result<Tensor> {
                let (_, len, _) = z.dims3()?;
                Ok(z.unsqueeze(1)?
                    .expand((nkv, rep, len, hd))?
                    .reshape((nh, len, hd))?)
            };
            let (k_all, v_all) = (expand(&k_all)?, expand(&v_all)?);
            let scores = (q.matmul(&k_all.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let attn = probs
                .matmul(&v_all)?
                .transpose(0, 1)?
                .reshape((t, nh * hd))?;
            x = (x + self.proj(l, "o_proj", &attn, lora)?)?;
            let h = self.rms_norm(&x, &layer.ln2)?;
            let g = self.proj(l, "gate_proj", &h, lora)?.silu()?;
            let u = self.proj(l, "up_proj", &h, lora)?;
            x = (x + self.proj(l, "down_proj", &(g * u)?, lora)?)?;
        }
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
        let normed = self.rms_norm(&x.index_select(&idx, 0)?, &self.norm)?;
        let logits = frozen_matmul(&normed, &self.lm_head_t)?;
        Ok((
            logits,
            PrefixKv {
                len: p + t,
                k: ks,
                v: vs,
            },
        ))
    }
}

impl DiffModel {
    /// Several sequences in one pass, each on its own base-model prefix, with
    /// `lora` on every position: the projections run on all rows at once (one
    /// bigger GEMM), attention per sequence. Returns each sequence's logits at its rows.
    pub fn forward_batch(
        &self,
        seqs: &[(&[u32], &PrefixKv, Vec<usize>)],
        lora: &Lora,
    ) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let dev = Device::Cpu;
        let all: Vec<u32> = seqs
            .iter()
            .flat_map(|(t, _, _)| t.iter().copied())
            .collect();
        let mut x = self.embed.index_select(&Tensor::new(all, &dev)?, 0)?;
        let mut offsets = Vec::with_capacity(seqs.len());
        let mut masks = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for (tokens, pre, _) in seqs {
            let (t, p) = (tokens.len(), pre.len);
            offsets.push(at);
            at += t;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..p + t).map(move |j| if j <= p + i { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            masks.push(Tensor::from_vec(mask, (1, t, p + t), &dev)?);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let rep = nh / nkv;
        for l in 0..c.n_layers {
            let layer = &self.layers[l];
            let h = self.rms_norm(&x, &layer.ln1)?;
            let q_all = self.proj(l, "q_proj", &h, Some(lora))?;
            let k_all = self.proj(l, "k_proj", &h, Some(lora))?;
            let v_all = self.proj(l, "v_proj", &h, Some(lora))?;
            let mut outs = Vec::with_capacity(seqs.len());
            for (s, (tokens, pre, _)) in seqs.iter().enumerate() {
                let (t, p) = (tokens.len(), pre.len);
                let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
                    Ok(y.narrow(0, offsets[s], t)?
                        .reshape((t, n, hd))?
                        .transpose(0, 1)?
                        .contiguous()?)
                };
                let q = self.rope(&heads(&q_all, nh)?, p)?;
                let k = self.rope(&heads(&k_all, nkv)?, p)?;
                let v = heads(&v_all, nkv)?;
                let k = Tensor::cat(&[&pre.k[l], &k], 1)?;
                let v = Tensor::cat(&[&pre.v[l], &v], 1)?;
                let expand = |z: &Tensor| -> Result<Tensor> {
                    let (_, len, _) = z.dims3()?;
                    Ok(z.unsqueeze(1)?
                        .expand((nkv, rep, len, hd))?
                        .reshape((nh, len, hd))?)
                };
                let (k, v) = (expand(&k)?, expand(&v)?);
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&masks[s])?;
                let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
                outs.push(probs.matmul(&v)?.transpose(0, 1)?.reshape((t, nh * hd))?);
            }
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + self.proj(l, "o_proj", &attn, Some(lora))?)?;
            let h = self.rms_norm(&x, &layer.ln2)?;
            let g = self.proj(l, "gate_proj", &h, Some(lora))?.silu()?;
            let u = self.proj(l, "up_proj", &h, Some(lora))?;
            x = (x + self.proj(l, "down_proj", &(g * u)?, Some(lora))?)?;
        }
        let mut out = Vec::with_capacity(seqs.len());
        for (s, (_, _, rows)) in seqs.iter().enumerate() {
            let idx = Tensor::new(
                rows.iter()
                    .map(|&r| (offsets[s] + r) as u32)
                    .collect::<Vec<_>>(),
                &dev,
            )?;
            let normed = self.rms_norm(&x.index_select(&idx, 0)?, &self.norm)?;
            out.push(frozen_matmul(&normed, &self.lm_head_t)?);
        }
        Ok(out)
    }
}
