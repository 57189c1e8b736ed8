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
        let field = |name: &str| json.get(name).filter(|v| !v.is_null());
        let usize_field = |name: &str| -> Result<usize> {
            field(name)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::model_file(path, format!("missing or non-integer field `{name}`"))
                })
        };
        let model_type = field("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::model_file(path, "missing field `model_type`"))?;
        let architecture = Architecture::parse(model_type, path)?;
        let d_model = usize_field("hidden_size")?;
        let n_heads = usize_field("num_attention_heads")?;
        let n_kv_heads = usize_field("num_key_value_heads").unwrap_or(n_heads);
        let head_dim = usize_field("head_dim").unwrap_or(d_model / n_heads);
        // Newer configs nest rope settings under `rope_parameters`.
        let rope = field("rope_parameters").or_else(|| field("rope_scaling"));
        let rope_theta = field("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            Some(r) => parse_rope_scaling(r, path)?,
            None => None,
        };
        Ok(ModelConfig {
            architecture,
            n_layers: usize_field("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_mlp: usize_field("intermediate_size")?,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: field("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            tied_embeddings: field("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
        .and_then(|c| c.validated(path))
    }

    /// Checks the shapes fit together, so a bad config fails here and not mid-forward.
    pub fn validated(self, source: &Path) -> Result<ModelConfig> {
        let bad = |msg: String| Err(Error::model_file(source, msg));
        if self.n_layers == 0 || self.d_model == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad(format!("degenerate model dimensions: {self:?}"));
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
        Ok(self)
    }
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
