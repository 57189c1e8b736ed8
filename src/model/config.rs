//! Model hyper-parameters, read from GGUF metadata or an HF `config.json`.
//!
//! Rope settings are read here rather than through candle-transformers, whose
//! Llama config ignores `rope_parameters.rope_theta` in newer `config.json` files.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder families the forward pass implements (what differs between
/// them is data: [`FamilyConfig`] and `family.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM: the reference block.
    Llama,
    /// Mistral: Llama with a sliding window on every layer.
    Mistral,
    /// Qwen2: biases on the q/k/v projections; optional sliding window.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k.
    Qwen3,
    /// Phi-3: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// OLMo 2: norms after attention and MLP (none before), q/k norms over the full projection.
    Olmo2,
    /// Gemma 2: four norms per block with `(1 + w)` scaling, GELU-tanh, embeddings
    /// scaled by √d_model, `query_pre_attn_scalar`, soft-caps, alternating sliding window.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-caps, with per-head q/k norms and a
    /// local rope base on its sliding-window layers.
    Gemma3,
}

/// The names afprobe accepts, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str =
    "llama, mistral, qwen2, qwen3, phi3, olmo2, gemma2, gemma3 (gemma3_text)";

impl Architecture {
    /// Parses a GGUF `general.architecture` or an HF `model_type`.
    pub fn parse(name: &str, source: &Path) -> Result<Architecture> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            "phi3" => Ok(Architecture::Phi3),
            "olmo2" => Ok(Architecture::Olmo2),
            "gemma2" => Ok(Architecture::Gemma2),
            "gemma3" | "gemma3_text" => Ok(Architecture::Gemma3),
            other => Err(Error::model_file(
                source,
                format!(
                    "unsupported architecture `{other}`; afprobe runs {SUPPORTED_ARCHITECTURES}"
                ),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Olmo2 => "olmo2",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
        }
    }

    pub fn has_qkv_bias(&self) -> bool {
        matches!(self, Architecture::Qwen2)
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Architecture::Gemma2 | Architecture::Gemma3)
    }

    /// The family's q/k norms.
    pub fn qk_norm(self) -> QkNorm {
        match self {
            Architecture::Qwen3 | Architecture::Gemma3 => QkNorm::PerHead,
            Architecture::Olmo2 => QkNorm::Full,
            _ => QkNorm::None,
        }
    }
}

/// How a norm scales the normalised row: `x̂ · w` or Gemma's `x̂ · (1 + w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    Rms,
    RmsOnePlus,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (`silu`, `swish`).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// GELU, exact (`gelu`).
    GeluErf,
}

/// RMSNorm on queries and keys before rope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    /// Over each head (`[head_dim]` weights): Qwen3, Gemma 3.
    PerHead,
    /// Over the whole projection (`[n_heads * head_dim]` weights): OLMo 2.
    Full,
}

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

/// Llama-3 frequency-dependent scaling, as transformers' `_compute_llama3_parameters`.
fn llama3_inv_freq(base: Vec<f64>, s: &Llama3RopeScaling) -> Vec<f64> {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// Llama-3 style frequency-dependent rope scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Rope scaling, as transformers' `modeling_rope_utils` computes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Frequency-dependent (Llama 3.1).
    Llama3(Llama3RopeScaling),
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware dynamic scaling: equal to unscaled rope up to the context window,
    /// which is as far as afprobe runs it.
    Dynamic { factor: f64 },
    /// YaRN: interpolated frequencies and an attention factor on cos/sin.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    /// LongRoPE (Phi-3): per-frequency short factors (the context is capped at
    /// `original_max_position_embeddings`, past which transformers switches to
    /// the long factors) and an attention factor.
    LongRope {
        short_factor: Vec<f64>,
        /// `original_max_position_embeddings`: afprobe's context is capped here.
        original: f64,
        attention_factor: f64,
    },
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
            None | Some(RopeScaling::Dynamic { .. }) => (base, 1.0),
            Some(RopeScaling::Linear { factor }) => {
                (base.into_iter().map(|f| f / factor).collect(), 1.0)
            }
            Some(RopeScaling::Llama3(s)) => (llama3_inv_freq(base, s), 1.0),
            Some(RopeScaling::LongRope {
                short_factor,
                attention_factor,
                ..
            }) => (
                base.iter().zip(short_factor).map(|(f, s)| f / s).collect(),
                *attention_factor,
            ),
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            }) => {
                // transformers' `_compute_yarn_parameters`.
                let correction_dim = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.rope_theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, high) = (low.max(0.0), high.min(dim - 1.0));
                let high = if low == high { high + 0.001 } else { high };
                let freqs = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        f / factor * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect();
                (freqs, *attention_factor)
            }
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

    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<ModelConfig> {
        let text = crate::io::read_to_string(path)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(path, format!("not valid JSON: {e}")))?;
        if !json.is_object() {
            return Err(Error::model_file(path, "expected a JSON object"));
        }
        let json = language_model_config(json);
        let field = |name: &str| json.get(name).filter(|v| !v.is_null());
        // Present fields must be valid: a bad value is an error, never a silent default.
        let opt_usize = |name: &str| -> Result<Option<usize>> {
            match field(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        Error::model_file(
                            path,
                            format!("field `{name}` is {v}; it must be a non-negative integer"),
                        )
                    }),
            }
        };
        let usize_field = |name: &str| -> Result<usize> {
            opt_usize(name)?
                .ok_or_else(|| Error::model_file(path, format!("missing field `{name}`")))
        };
        let opt_f64 = |name: &str| finite_number(field(name), name, path);
        let opt_bool = |name: &str| -> Result<Option<bool>> {
            match field(name) {
                None => Ok(None),
                Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                    Error::model_file(
                        path,
                        format!("field `{name}` is {v}; it must be true or false"),
                    )
                }),
            }
        };
        let model_type = field("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::model_file(path, "missing field `model_type`"))?;
        let architecture = Architecture::parse(model_type, path)?;
        // A key left out means the config class's default, as in transformers.
        let defaults = architecture.hf_defaults();
        let d_model = usize_field("hidden_size")?;
        let n_heads = usize_field("num_attention_heads")?;
        let n_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        let absent_head_dim = if json.get("head_dim").is_none() {
            defaults.head_dim
        } else {
            None
        };
        let head_dim = match opt_usize("head_dim")?.or(absent_head_dim) {
            Some(hd) => hd,
            None => derived_head_dim(
                d_model,
                n_heads,
                path,
                ("hidden_size", "num_attention_heads"),
            )?,
        };
        // Rope: transformers 5 nests it under `rope_parameters` (per layer type for
        // Gemma 3: `full_attention` / `sliding_attention`); older files have
        // `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
        let rope_params = field("rope_parameters");
        let (rope, local_rope) = match rope_params {
            Some(p)
                if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() =>
            {
                (p.get("full_attention"), p.get("sliding_attention"))
            }
            Some(p) => (Some(p), None),
            None => (field("rope_scaling"), None),
        };
        let theta_of = |r: Option<&Value>, key: &str| {
            finite_number(r.and_then(|r| r.get("rope_theta")), key, path)
        };
        let rope_theta = match opt_f64("rope_theta")? {
            Some(t) => t,
            None => theta_of(rope, "rope_parameters.rope_theta")?.unwrap_or(defaults.rope_theta),
        };
        let max_position_embeddings =
            opt_usize("max_position_embeddings")?.unwrap_or(defaults.max_position_embeddings);
        // Pre-training length: a config attribute (top-level key, or Phi-3's
        // class default) wins over the rope dict's, as transformers'
        // `standardize_rope_params` does for Phi-3's published layout.
        let lengths = RopeLengths {
            max_position_embeddings: max_position_embeddings as f64,
            original: opt_f64("original_max_position_embeddings")?
                .or(defaults.original_max_position_embeddings.map(|n| n as f64)),
        };
        let rope_scaling = match rope {
            Some(r) => parse_rope_scaling(r, lengths, path)?,
            None => None,
        };
        let rope_local_theta = match local_rope {
            Some(r) => {
                if parse_rope_scaling(r, lengths, path)?.is_some() {
                    return Err(Error::model_file(
                        path,
                        "rope scaling on the sliding-window layers                          (`rope_parameters.sliding_attention`) is not supported",
                    ));
                }
                theta_of(Some(r), "rope_parameters.sliding_attention.rope_theta")?
                    .or(defaults.rope_local_theta)
            }
            None => opt_f64("rope_local_base_freq")?.or(defaults.rope_local_theta),
        };
        if let Some(p) = opt_f64("partial_rotary_factor")?.or(rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .and_then(Value::as_f64))
        {
            if p != 1.0 {
                return Err(Error::model_file(
                    path,
                    format!(
                        "partial_rotary_factor {p} is not supported (rope on every dimension only)"
                    ),
                ));
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if opt_bool(flag)? == Some(true) && !architecture.has_qkv_bias() {
                return Err(Error::model_file(
                    path,
                    format!(
                        "`{flag}: true` is not supported for {}",
                        architecture.name()
                    ),
                ));
            }
        }
        let n_layers = usize_field("num_hidden_layers")?;
        // Bounded before anything is sized by it (per-layer window lists).
        if n_layers == 0 || n_layers > MAX_LAYERS {
            return Err(Error::model_file(
                path,
                format!("`num_hidden_layers` is {n_layers}; it must be between 1 and {MAX_LAYERS}"),
            ));
        }
        let mut context = max_position_embeddings;
        if let Some(RopeScaling::LongRope { original, .. }) = &rope_scaling {
            // Past the original context transformers switches to the long factors.
            context = context.min(*original as usize);
        }
        let family = family_config(
            architecture,
            n_layers,
            d_model,
            &json,
            path,
            rope_local_theta,
        )?;
        Ok(ModelConfig {
            architecture,
            family,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_mlp: usize_field("intermediate_size")?,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            max_position_embeddings: context,
            tied_embeddings: opt_bool("tie_word_embeddings")?
                .unwrap_or(defaults.tie_word_embeddings),
        })
        .and_then(|c| c.validated(path))
    }

    /// Checks every size is positive and plausible and the shapes fit together,
    /// so a bad config fails here, naming the file and the field, and not in a
    /// kernel or an allocation. The weights are checked against the config later
    /// (`validate::check_weights`).
    pub fn validated(self, source: &Path) -> Result<ModelConfig> {
        let bad = |msg: String| Err(Error::model_file(source, msg));
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
                return bad(format!(
                    "{what} is {value}; it must be between 1 and {max} (the config is corrupt \
                     or not a supported model)"
                ));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rope", self.head_dim));
        }
        if self.n_heads * self.head_dim > MAX_WIDTH {
            return bad(format!(
                "{} heads x head_dim {} = {} is wider than {MAX_WIDTH}",
                self.n_heads,
                self.head_dim,
                self.n_heads * self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!(
                "rms_norm_eps is {}; it must be a small positive number",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope_theta is {}; it must be a positive number",
                self.rope_theta
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match &self.rope_scaling {
            Some(RopeScaling::Llama3(s)) => {
                let ok = [
                    s.factor,
                    s.low_freq_factor,
                    s.high_freq_factor,
                    s.original_max_position_embeddings,
                ]
                .into_iter()
                .all(positive);
                if !ok || s.high_freq_factor <= s.low_freq_factor {
                    return bad(format!(
                        "llama3 rope scaling {s:?}: factors must be positive and \
                         high_freq_factor greater than low_freq_factor"
                    ));
                }
            }
            Some(RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor })
                if !positive(*factor) =>
            {
                return bad(format!("rope scaling factor {factor} must be positive"));
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            }) if ![
                *factor,
                *original_max_position_embeddings,
                *attention_factor,
            ]
            .into_iter()
            .all(positive) =>
            {
                return bad("yarn rope scaling factors must be positive".into());
            }
            Some(RopeScaling::LongRope { short_factor, .. })
                if short_factor.len() != self.head_dim / 2
                    || !short_factor.iter().copied().all(positive) =>
            {
                return bad(format!(
                    "longrope short_factor has {} positive entries; head_dim {} needs {}",
                    short_factor.len(),
                    self.head_dim,
                    self.head_dim / 2
                ));
            }
            _ => {}
        }
        let f = &self.family;
        for (name, v) in [
            ("embed scale", f.embed_scale),
            ("query_pre_attn_scalar", f.query_pre_attn_scalar),
            ("attn_logit_softcapping", f.attn_softcap),
            ("final_logit_softcapping", f.final_softcap),
            ("rope_local_base_freq", f.rope_local_theta),
        ] {
            if v.is_some_and(|x| !positive(x)) {
                return bad(format!("{name} must be a positive number"));
            }
        }
        if let Some(layers) = &f.sliding_layers {
            if layers.len() != self.n_layers {
                return bad(format!(
                    "{} layer types for {} layers",
                    layers.len(),
                    self.n_layers
                ));
            }
        }
        Ok(self)
    }
}

/// The config of the language model a file describes. A multimodal checkpoint
/// (Gemma 3 4B and up, `Gemma3ForConditionalGeneration`) nests it under
/// `text_config`, which afprobe runs without the vision tower; the outer
/// `tie_word_embeddings` applies when the inner config leaves it out.
fn language_model_config(json: Value) -> Value {
    let Some(Value::Object(text)) = json.get("text_config") else {
        return json;
    };
    let mut text = text.clone();
    if !text.contains_key("model_type") {
        if let Some(outer) = json.get("model_type") {
            text.insert("model_type".into(), outer.clone());
        }
    }
    if !text.contains_key("tie_word_embeddings") {
        if let Some(tie) = json.get("tie_word_embeddings") {
            text.insert("tie_word_embeddings".into(), tie.clone());
        }
    }
    Value::Object(text)
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

/// An optional `config.json` number, which must be finite when present
/// (`name` is the field, for the message).
fn finite_number(v: Option<&Value>, name: &str, path: &Path) -> Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| {
                Error::model_file(
                    path,
                    format!("field `{name}` is {v}; it must be a finite number"),
                )
            }),
    }
}

/// A family's norms, activation, scales, caps and windows from `config.json`.
fn family_config(
    arch: Architecture,
    n_layers: usize,
    d_model: usize,
    json: &Value,
    path: &Path,
    rope_local_theta: Option<f64>,
) -> Result<FamilyConfig> {
    let field = |name: &str| json.get(name).filter(|v| !v.is_null());
    let defaults = arch.hf_defaults();
    // Absent: the class default; `null`: none (transformers' reading).
    let number = |name: &str, default: Option<f64>| -> Result<Option<f64>> {
        match json.get(name) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .map(Some)
                .ok_or_else(|| {
                    Error::model_file(
                        path,
                        format!("field `{name}` is {v}; it must be a positive number"),
                    )
                }),
        }
    };
    let act_name = field("hidden_activation")
        .or(field("hidden_act"))
        .and_then(Value::as_str)
        .unwrap_or(defaults.activation);
    let activation = match act_name {
        "silu" | "swish" => Activation::Silu,
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        other => {
            return Err(Error::model_file(
                path,
                format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh, gelu)"),
            ))
        }
    };
    let sliding_window = match json.get("sliding_window") {
        None => defaults.sliding_window,
        Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|w| usize::try_from(w).ok())
                .filter(|w| *w > 0)
                .ok_or_else(|| {
                    Error::model_file(
                        path,
                        format!("field `sliding_window` is {v}; it must be a positive integer"),
                    )
                })?,
        ),
    };
    let sliding_layers = sliding_layers(arch, n_layers, json, path)?;
    Ok(FamilyConfig {
        norm: if arch.is_gemma() {
            NormKind::RmsOnePlus
        } else {
            NormKind::Rms
        },
        activation,
        qk_norm: arch.qk_norm(),
        embed_scale: arch.is_gemma().then(|| (d_model as f64).sqrt()),
        query_pre_attn_scalar: if arch.is_gemma() {
            number("query_pre_attn_scalar", defaults.query_pre_attn_scalar)?
        } else {
            None
        },
        attn_softcap: if arch.is_gemma() {
            number("attn_logit_softcapping", defaults.attn_logit_softcapping)?
        } else {
            None
        },
        final_softcap: if arch.is_gemma() {
            number("final_logit_softcapping", defaults.final_logit_softcapping)?
        } else {
            None
        },
        sliding_window,
        sliding_layers,
        rope_local_theta,
    })
}

/// Which layers use the sliding window: `layer_types` when the file has it,
/// else each family's rule from transformers' config classes.
fn sliding_layers(
    arch: Architecture,
    n_layers: usize,
    json: &Value,
    path: &Path,
) -> Result<Option<Vec<bool>>> {
    let field = |name: &str| json.get(name).filter(|v| !v.is_null());
    Ok(match field("layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != n_layers {
                return Err(Error::model_file(
                    path,
                    format!(
                        "`layer_types` has {} entries for {n_layers} layers",
                        types.len()
                    ),
                ));
            }
            Some(
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(Error::model_file(
                            path,
                            format!("`layer_types` entry {t} is not sliding_attention or full_attention"),
                        )),
                    })
                    .collect::<Result<_>>()?,
            )
        }
        Some(v) => {
            return Err(Error::model_file(
                path,
                format!("`layer_types` is {v}, not a list"),
            ))
        }
        None => {
            let use_window = field("use_sliding_window").and_then(Value::as_bool);
            let max_window_layers = field("max_window_layers")
                .and_then(Value::as_u64)
                .map_or(arch.hf_defaults().max_window_layers, |n| n as usize);
            let pattern = field("sliding_window_pattern")
                .and_then(Value::as_u64)
                .unwrap_or(6)
                .max(1) as usize;
            match arch {
                Architecture::Mistral | Architecture::Phi3 => None,
                Architecture::Qwen2 | Architecture::Qwen3 => Some(
                    (0..n_layers)
                        .map(|l| use_window == Some(true) && l >= max_window_layers)
                        .collect(),
                ),
                Architecture::Gemma2 => Some((0..n_layers).map(|l| l % 2 == 0).collect()),
                Architecture::Gemma3 => {
                    Some((0..n_layers).map(|l| (l + 1) % pattern != 0).collect())
                }
                // Llama, OLMo 2: no window.
                Architecture::Llama | Architecture::Olmo2 => Some(vec![false; n_layers]),
            }
        }
    })
}

/// The context lengths rope scaling derives from when its dict leaves them out.
#[derive(Debug, Clone, Copy)]
struct RopeLengths {
    max_position_embeddings: f64,
    /// A config-level `original_max_position_embeddings`, which wins.
    original: Option<f64>,
}

/// One rope dict (`rope_parameters`, `rope_scaling`), as transformers'
/// `modeling_rope_utils` reads it: the pre-training length from the config
/// level, else the dict, else `max_position_embeddings`; yarn's and
/// longrope's `factor`, when absent, is `max_position_embeddings` over it.
fn parse_rope_scaling(
    rope: &Value,
    lengths: RopeLengths,
    path: &Path,
) -> Result<Option<RopeScaling>> {
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |name: &str| {
        rope.get(name)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
            .ok_or_else(|| Error::model_file(path, format!("{kind} rope scaling lacks `{name}`")))
    };
    let opt = |name: &str| {
        rope.get(name)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
    };
    let original = lengths
        .original
        .or(opt("original_max_position_embeddings"))
        .unwrap_or(lengths.max_position_embeddings);
    let factor_or_ratio = || opt("factor").unwrap_or(lengths.max_position_embeddings / original);
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: original,
        }))),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "dynamic" => Ok(Some(RopeScaling::Dynamic {
            factor: num("factor")?,
        })),
        "yarn" => {
            let factor = factor_or_ratio();
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (
                opt("attention_factor"),
                opt("mscale"),
                opt("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            Ok(Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: opt("beta_fast").unwrap_or(32.0),
                beta_slow: opt("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: rope
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            }))
        }
        "longrope" => {
            let short_factor = rope
                .get("short_factor")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| {
                    Error::model_file(path, "longrope rope scaling lacks `short_factor`")
                })?;
            let factor = factor_or_ratio();
            let attention_factor = match opt("attention_factor") {
                Some(a) => a,
                None if factor > 1.0 => (1.0 + factor.ln() / original.ln()).sqrt(),
                None => 1.0,
            };
            Ok(Some(RopeScaling::LongRope {
                short_factor,
                original,
                attention_factor,
            }))
        }
        other => Err(Error::model_file(
            path,
            format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, \
                 dynamic, yarn, longrope, llama3)"
            ),
        )),
    }
}
