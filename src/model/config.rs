//! Model hyper-parameters, read from GGUF metadata or an HF `config.json`.
//!
//! Rope settings are read here rather than through candle-transformers, whose
//! Llama config ignores `rope_parameters.rope_theta` in newer `config.json` files.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder families the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM, Mistral: no attention biases.
    Llama,
    /// Qwen2: biases on the q/k/v projections.
    Qwen2,
}

impl Architecture {
    /// Parses a GGUF `general.architecture` or an HF `model_type`.
    pub fn parse(name: &str, source: &Path) -> Result<Architecture> {
        match name {
            "llama" | "mistral" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(Error::model_file(
                source,
                format!(
                    "unsupported architecture `{other}`; afprobe runs llama (Llama 2/3, SmolLM, \
                     Mistral) and qwen2 models"
                ),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    pub fn has_qkv_bias(&self) -> bool {
        matches!(self, Architecture::Qwen2)
    }
}

/// Llama-3 style frequency-dependent rope scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, llama.cpp's form of Llama-3 scaling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f64>>,
    /// Context window: prompts longer than this are refused.
    pub max_position_embeddings: usize,
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Inverse rotary frequencies for one head (`head_dim / 2` values), with
    /// Llama-3 scaling applied the way transformers' `_compute_llama3_parameters` does.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64))
            .collect();
        if let Some(factors) = &self.rope_freq_factors {
            return base.iter().zip(factors).map(|(f, d)| f / d).collect();
        }
        let Some(s) = &self.rope_scaling else {
            return base;
        };
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

    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(path, format!("not valid JSON: {e}")))?;
        if !json.is_object() {
            return Err(Error::model_file(path, "expected a JSON object"));
        }
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
        let opt_f64 = |name: &str| -> Result<Option<f64>> {
            match field(name) {
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
        };
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
        let d_model = usize_field("hidden_size")?;
        let n_heads = usize_field("num_attention_heads")?;
        let n_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match opt_usize("head_dim")? {
            Some(hd) => hd,
            None => derived_head_dim(
                d_model,
                n_heads,
                path,
                ("hidden_size", "num_attention_heads"),
            )?,
        };
        // Newer configs nest rope settings under `rope_parameters`.
        let rope = field("rope_parameters").or_else(|| field("rope_scaling"));
        let rope_theta = match opt_f64("rope_theta")? {
            Some(t) => t,
            None => match rope.and_then(|r| r.get("rope_theta")) {
                Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    Error::model_file(
                        path,
                        format!("field `rope_theta` is {v}; it must be a finite number"),
                    )
                })?,
                None => 10_000.0,
            },
        };
        let rope_scaling = match rope {
            Some(r) => parse_rope_scaling(r, path)?,
            None => None,
        };
        // afprobe's attention has no sliding window. Within the window, windowed and
        // full attention agree, so the context is cut to the window: longer prompts
        // are refused instead of silently computed with full attention.
        // (Qwen2 configs carry a window that only applies with `use_sliding_window`.)
        let mut context = usize_field("max_position_embeddings")?;
        let window_on =
            opt_bool("use_sliding_window")?.unwrap_or(architecture != Architecture::Qwen2);
        if let Some(window) = opt_usize("sliding_window")?.filter(|w| *w > 0 && window_on) {
            context = context.min(window);
        }
        Ok(ModelConfig {
            architecture,
            n_layers: usize_field("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_mlp: usize_field("intermediate_size")?,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            max_position_embeddings: context,
            tied_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
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
        if let Some(s) = &self.rope_scaling {
            let ok = [
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            ]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0);
            if !ok || s.high_freq_factor <= s.low_freq_factor {
                return bad(format!(
                    "llama3 rope scaling {s:?}: factors must be positive and high_freq_factor \
                     greater than low_freq_factor"
                ));
            }
        }
        Ok(self)
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

fn parse_rope_scaling(rope: &Value, path: &Path) -> Result<Option<Llama3RopeScaling>> {
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |name: &str| {
                rope.get(name).and_then(Value::as_f64).ok_or_else(|| {
                    Error::model_file(path, format!("llama3 rope scaling lacks `{name}`"))
                })
            };
            Ok(Some(Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }))
        }
        other => Err(Error::model_file(
            path,
            format!("rope scaling type `{other}` is not supported (supported: default, llama3)"),
        )),
    }
}
