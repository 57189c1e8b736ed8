//! LoRA factors applied *unmerged* in the forward pass: `y = x Wᵀ + s · (x Aᵀ) Bᵀ`
//! with `A` `[r, in]`, `B` `[out, r]` and `s = alpha / r` (Hu et al. 2021;
//! PEFT's `lora.Linear`). This is what `organism train` differentiates: the
//! factors are candle [`Var`]s, attached to the decoder's projections
//! ([`Transformer::set_lora`](super::Transformer::set_lora)) and run by the
//! portable engine. A finished adapter is loaded merged (`adapter.rs`).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::config::ModelConfig;
use crate::error::{Error, Result};

/// The projections a LoRA adapter may target, by PEFT's module name, in a
/// family with separate projections (Llama, Qwen, Gemma, ...).
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The same for a family whose checkpoints store q/k/v and gate/up fused (Phi-3).
pub const FUSED_TARGET_MODULES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// The modules an adapter of this model may target.
pub fn target_modules(c: &ModelConfig) -> &'static [&'static str] {
    if c.architecture.fused_projections() {
        &FUSED_TARGET_MODULES
    } else {
        &TARGET_MODULES
    }
}

/// The submodule holding a target projection: `self_attn` or `mlp`.
pub fn block_of(module: &str) -> Option<&'static str> {
    match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" | "qkv_proj" => Some("self_attn"),
        "gate_proj" | "up_proj" | "down_proj" | "gate_up_proj" => Some("mlp"),
        _ => None,
    }
}

/// `(out, in)` of a projection; an error naming the modules this model has.
pub fn proj_shape(c: &ModelConfig, module: &str) -> Result<(usize, usize)> {
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let known = target_modules(c);
    if !known.contains(&module) {
        return Err(Error::BadInput(format!(
            "unknown LoRA target module `{module}` for this {} model; choose among {}",
            c.architecture.name(),
            known.join(", ")
        )));
    }
    Ok(match module {
        "q_proj" => (q, c.d_model),
        "k_proj" | "v_proj" => (kv, c.d_model),
        "qkv_proj" => (q + 2 * kv, c.d_model),
        "o_proj" => (c.d_model, q),
        "gate_proj" | "up_proj" => (c.d_mlp, c.d_model),
        "gate_up_proj" => (2 * c.d_mlp, c.d_model),
        _ => (c.d_model, c.d_mlp), // down_proj
    })
}

/// `modules` as this model names them: on a fused family (Phi-3) `q_proj`,
/// `k_proj`, `v_proj` become its `qkv_proj` and `gate_proj`, `up_proj` its
/// `gate_up_proj` (PEFT adapts the module the checkpoint has); duplicates dropped.
pub fn modules_for(c: &ModelConfig, modules: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for m in modules {
        let name = match (c.architecture.fused_projections(), m.as_str()) {
            (true, "q_proj" | "k_proj" | "v_proj") => "qkv_proj",
            (true, "gate_proj" | "up_proj") => "gate_up_proj",
            (_, other) => other,
        };
        proj_shape(c, name)?;
        if !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
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
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// PEFT's initialisation on `device`: `A` Kaiming-uniform (bound 1/√in,
    /// drawn on the CPU from `seed`, so every device starts alike), `B` zero.
    pub fn init(
        config: &ModelConfig,
        layers: &[usize],
        modules: &[String],
        r: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
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
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out, r), DType::F32, device)?)?;
                pairs.insert((l, m.clone()), LoraPair { a, b });
            }
        }
        Ok(Lora { r, alpha, pairs })
    }

    /// Every trainable tensor in a fixed order, with its PEFT name.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for ((l, m), p) in &self.pairs {
            let block = block_of(m).unwrap_or("mlp");
            let base = format!("base_model.model.model.layers.{l}.{block}.{m}");
            out.push((format!("{base}.lora_A.weight"), &p.a));
            out.push((format!("{base}.lora_B.weight"), &p.b));
        }
        out
    }

    /// Layer `l`'s factors on `module`, if adapted: (`A`, `B`).
    pub(super) fn factors(&self, l: usize, module: &str) -> Option<(Tensor, Tensor)> {
        self.pairs
            .get(&(l, module.to_string()))
            .map(|p| (p.a.as_tensor().clone(), p.b.as_tensor().clone()))
    }
}
