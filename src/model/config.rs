//! Model hyper-parameters, read from GGUF metadata (`gguf.rs`) or an HF
//! `config.json` (`config/hf.rs`), and their checks.
//!
//! Rope settings are read here rather than through candle-transformers, whose
//! Llama config ignores `rope_parameters.rope_theta` in newer `config.json` files.

mod hf;
mod rope;

use std::path::Path;

use serde::Serialize;

pub use super::family::{Activation, Architecture, NormKind, QkNorm};
pub use rope::{Llama3RopeScaling, RopeScaling};

use crate::error::{Error, Result};
/// What differs between families beyond sizes, read from the config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyConfig {
    pub norm: NormKind,
    pub activation: Activation,
    pub qk_norm: QkNorm,
    /// Embeddings are multiplied by this (Gemma: √d_model).
    pub embed_scale: Option<f64>,
    /// Attention scores are `q·k / √(this)` (default: head_dim; Gemma's `query_pre_attn_scalar`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Scores become `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Logits become `cap · tanh(logit / cap)` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Keys visible to a query: the last `sliding_window` positions, itself included.
    pub sliding_window: Option<usize>,
    /// Which layers use the window (`None`: all of them, when there is a window).
    pub sliding_layers: Option<Vec<bool>>,
    /// Rope base of the sliding-window layers when it differs (Gemma 3's local layers).
    pub rope_local_theta: Option<f64>,
}

impl Default for FamilyConfig {
    /// The Llama block: RMSNorm, SiLU, no q/k norm, no scales, caps or windows.
    fn default() -> Self {
        FamilyConfig {
            norm: NormKind::Rms,
            activation: Activation::Silu,
            qk_norm: QkNorm::None,
            embed_scale: None,
            query_pre_attn_scalar: None,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            sliding_layers: None,
            rope_local_theta: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// Norms, activation, scales, soft-caps, windows: see [`FamilyConfig`].
    pub family: FamilyConfig,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, llama.cpp's form of Llama-3 scaling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f64>>,
    /// Context window: prompts longer than this are refused.
    pub max_position_embeddings: usize,
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Inverse rotary frequencies for one head (`head_dim / 2` values) and the
    /// factor cos/sin are multiplied by, for a layer with or without the
    /// sliding window, with the scaling of transformers' `modeling_rope_utils`.
    pub fn rope_inv_freq(&self, sliding: bool) -> (Vec<f64>, f64) {
        let half = self.head_dim / 2;
        let dim = self.head_dim as f64;
        let unscaled = |theta: f64| -> Vec<f64> {
            (0..half)
                .map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim))
                .collect()
        };
        if let (true, Some(theta)) = (sliding, self.family.rope_local_theta) {
            return (unscaled(theta), 1.0);
        }
        let base = unscaled(self.rope_theta);
        if let Some(factors) = &self.rope_freq_factors {
            return (base.iter().zip(factors).map(|(f, d)| f / d).collect(), 1.0);
        }
        match &self.rope_scaling {
            None => (base, 1.0),
            Some(scaling) => scaling.apply(base, self.rope_theta, dim),
        }
    }

    /// The sliding window of layer `l`, if it has one.
    pub fn window(&self, l: usize) -> Option<usize> {
        let f = &self.family;
        f.sliding_window.filter(|_| {
            f.sliding_layers
                .as_ref()
                .is_none_or(|layers| layers.get(l).copied().unwrap_or(false))
        })
    }

    /// The factor attention scores are multiplied by.
    pub fn attn_scale(&self) -> f64 {
        1.0 / self
            .family
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Checks every size is positive and plausible and the shapes fit together,
    /// so a bad config fails here, naming the file and the field, and not in a
    /// kernel or an allocation. The weights are checked against the config later
    /// (`validate::check_weights`).
    pub fn validated(self, source: &Path) -> Result<ModelConfig> {
        match self.problem() {
            Some(message) => Err(Error::model_file(source, message)),
            None => Ok(self),
        }
    }

    /// The first thing wrong with the config, if any: sizes, shapes, rope
    /// scaling, then the family's scales and windows.
    fn problem(&self) -> Option<String> {
        self.size_problem()
            .or_else(|| self.shape_problem())
            .or_else(|| {
                self.rope_scaling
                    .as_ref()
                    .and_then(|r| r.problem(self.head_dim))
            })
            .or_else(|| self.family_problem())
    }

    /// A size that is zero or past its bound.
    fn size_problem(&self) -> Option<String> {
        // Each size with its GGUF key / config.json field, so the message names it.
        let limits: [(&str, usize, usize); 8] = [
            (
                "layer count (block_count / num_hidden_layers)",
                self.n_layers,
                MAX_LAYERS,
            ),
            (
                "hidden size (embedding_length / hidden_size)",
                self.d_model,
                MAX_WIDTH,
            ),
            (
                "attention head count (attention.head_count / num_attention_heads)",
                self.n_heads,
                MAX_HEADS,
            ),
            (
                "key/value head count (attention.head_count_kv / num_key_value_heads)",
                self.n_kv_heads,
                MAX_HEADS,
            ),
            (
                "head size (attention.key_length / head_dim)",
                self.head_dim,
                MAX_HEAD_DIM,
            ),
            (
                "MLP size (feed_forward_length / intermediate_size)",
                self.d_mlp,
                MAX_WIDTH * 16,
            ),
            (
                "vocabulary size (token_embd.weight rows / vocab_size)",
                self.vocab_size,
                MAX_VOCAB,
            ),
            (
                "context length (context_length / max_position_embeddings)",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ];
        for (what, value, max) in limits {
            if value == 0 || value > max {
                return Some(format!(
                    "{what} is {value}; it must be between 1 and {max} (the config is corrupt \
                     or not a supported model)"
                ));
            }
        }
        None
    }

    /// Head counts, head size, width, eps and rope base that do not fit together.
    fn shape_problem(&self) -> Option<String> {
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Some(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Some(format!("head_dim {} must be even for rope", self.head_dim));
        }
        if self.n_heads * self.head_dim > MAX_WIDTH {
            return Some(format!(
                "{} heads x head_dim {} = {} is wider than {MAX_WIDTH}",
                self.n_heads,
                self.head_dim,
                self.n_heads * self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Some(format!(
                "rms_norm_eps is {}; it must be a small positive number",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Some(format!(
                "rope_theta is {}; it must be a positive number",
                self.rope_theta
            ));
        }
        None
    }

    /// A non-positive scale, cap or rope base, or a layer list of the wrong length.
    fn family_problem(&self) -> Option<String> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let f = &self.family;
        for (name, v) in [
            ("embed scale", f.embed_scale),
            ("query_pre_attn_scalar", f.query_pre_attn_scalar),
            ("attn_logit_softcapping", f.attn_softcap),
            ("final_logit_softcapping", f.final_softcap),
            ("rope_local_base_freq", f.rope_local_theta),
        ] {
            if v.is_some_and(|x| !positive(x)) {
                return Some(format!("{name} must be a positive number"));
            }
        }
        if let Some(layers) = &f.sliding_layers {
            if layers.len() != self.n_layers {
                return Some(format!(
                    "{} layer types for {} layers",
                    layers.len(),
                    self.n_layers
                ));
            }
        }
        None
    }
}

/// Upper bounds on config sizes: far above any released model, low enough that
/// products of them cannot overflow and a corrupt value is caught before it
/// sizes an allocation. The memory the weights need is checked separately.
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_WIDTH: usize = 1 << 18;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_VOCAB: usize = 1 << 23;
pub const MAX_CONTEXT: usize = 1 << 27;

/// `d_model / n_heads`, which must divide exactly when the head size is not
/// given; `keys` names the two fields (hidden size, head count) for the message.
pub(crate) fn derived_head_dim(
    d_model: usize,
    n_heads: usize,
    path: &Path,
    keys: (&str, &str),
) -> Result<usize> {
    if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
        return Err(Error::model_file(
            path,
            format!(
                "`{}` {d_model} is not divisible by `{}` {n_heads}, and no head size is given; \
                 the head count does not fit the model",
                keys.0, keys.1
            ),
        ));
    }
    Ok(d_model / n_heads)
}
