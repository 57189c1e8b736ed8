//! Rope scaling: the types of transformers' `modeling_rope_utils`, how a
//! `config.json` rope dict states them, their checks, and the frequencies
//! they give.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

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

impl RopeScaling {
    /// The scaled inverse frequencies of the unscaled `base` (of a rope with
    /// base `theta` over heads of `dim`) and the factor cos/sin are multiplied by.
    pub(super) fn apply(&self, base: Vec<f64>, theta: f64, dim: f64) -> (Vec<f64>, f64) {
        match self {
            RopeScaling::Dynamic { .. } => (base, 1.0),
            RopeScaling::Linear { factor } => (base.into_iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Llama3(s) => (llama3_inv_freq(base, s), 1.0),
            RopeScaling::LongRope {
                short_factor,
                attention_factor,
                ..
            } => (
                base.iter().zip(short_factor).map(|(f, s)| f / s).collect(),
                *attention_factor,
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                // transformers' `_compute_yarn_parameters`.
                let correction_dim = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
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

    /// What is wrong with the factors, for heads of `head_dim`, if anything.
    pub(super) fn problem(&self, head_dim: usize) -> Option<String> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match self {
            RopeScaling::Llama3(s) => {
                let ok = [
                    s.factor,
                    s.low_freq_factor,
                    s.high_freq_factor,
                    s.original_max_position_embeddings,
                ]
                .into_iter()
                .all(positive);
                (!ok || s.high_freq_factor <= s.low_freq_factor).then(|| {
                    format!(
                        "llama3 rope scaling {s:?}: factors must be positive and \
                         high_freq_factor greater than low_freq_factor"
                    )
                })
            }
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor }
                if !positive(*factor) =>
            {
                Some(format!("rope scaling factor {factor} must be positive"))
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } if ![
                *factor,
                *original_max_position_embeddings,
                *attention_factor,
            ]
            .into_iter()
            .all(positive) =>
            {
                Some("yarn rope scaling factors must be positive".into())
            }
            RopeScaling::LongRope { short_factor, .. }
                if short_factor.len() != head_dim / 2
                    || !short_factor.iter().copied().all(positive) =>
            {
                Some(format!(
                    "longrope short_factor has {} positive entries; head_dim {} needs {}",
                    short_factor.len(),
                    head_dim,
                    head_dim / 2
                ))
            }
            _ => None,
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

/// The context lengths rope scaling derives from when its dict leaves them out.
#[derive(Debug, Clone, Copy)]
pub(super) struct RopeLengths {
    pub max_position_embeddings: f64,
    /// A config-level `original_max_position_embeddings`, which wins.
    pub original: Option<f64>,
}

/// One rope dict (`rope_parameters`, `rope_scaling`), as transformers'
/// `modeling_rope_utils` reads it: the pre-training length from the config
/// level, else the dict, else `max_position_embeddings`; yarn's and
/// longrope's `factor`, when absent, is `max_position_embeddings` over it.
pub(super) fn parse_rope_scaling(
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
            let attention_factor = yarn_attention_factor(
                factor,
                opt("attention_factor"),
                opt("mscale"),
                opt("mscale_all_dim"),
            );
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

/// YaRN's factor on cos/sin: the dict's `attention_factor`, else from
/// `mscale` and `mscale_all_dim` (DeepSeek's form), else `0.1 ln(factor) + 1`.
fn yarn_attention_factor(
    factor: f64,
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
) -> f64 {
    let get_mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    match (attention_factor, mscale, mscale_all_dim) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
            get_mscale(factor, m) / get_mscale(factor, all)
        }
        _ => get_mscale(factor, 1.0),
    }
}
