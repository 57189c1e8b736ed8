//! Reading an HF `config.json` as transformers reads it: a key left out is
//! the family's config-class default ([`HfDefaults`](crate::model::family::HfDefaults)),
//! `null` means none, and a present value must be valid (an error, never a
//! silent default).

use std::path::Path;

use serde_json::Value;

use super::rope::{parse_rope_scaling, RopeLengths, RopeScaling};
use super::{derived_head_dim, FamilyConfig, ModelConfig, MAX_LAYERS};
use crate::error::{Error, Result};
use crate::model::family::{periodic_layers, Activation, Architecture, FamilySpec, SlidingRule};

impl ModelConfig {
    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<ModelConfig> {
        let json = read_json(path)?;
        let fields = Fields { json: &json, path };
        let model_type = fields
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::model_file(path, "missing field `model_type`"))?;
        let architecture = Architecture::parse(model_type, path)?;
        // A key left out means the config class's default, as in transformers.
        let spec = architecture.spec();
        let d_model = fields.usize("hidden_size")?;
        let n_heads = fields.usize("num_attention_heads")?;
        let n_kv_heads = fields.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = fields.head_dim(spec, d_model, n_heads)?;
        let rope = fields.rope(spec)?;
        fields.refuse_biases(spec)?;
        let n_layers = fields.layer_count()?;
        let family = fields.family_config(spec, n_layers, d_model, rope.local_theta)?;
        ModelConfig {
            architecture,
            family,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_mlp: fields.usize("intermediate_size")?,
            vocab_size: fields.usize("vocab_size")?,
            rms_norm_eps: fields
                .opt_f64("rms_norm_eps")?
                .unwrap_or(spec.hf.rms_norm_eps),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            rope_freq_factors: None,
            max_position_embeddings: rope.context,
            tied_embeddings: fields
                .opt_bool("tie_word_embeddings")?
                .unwrap_or(spec.hf.tie_word_embeddings),
        }
        .validated(path)
    }
}

/// The file's JSON object: the language model's config (see [`language_model_config`]).
fn read_json(path: &Path) -> Result<Value> {
    let text = crate::io::read_to_string(path)?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::model_file(path, format!("not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(Error::model_file(path, "expected a JSON object"));
    }
    Ok(language_model_config(json))
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

/// A `config.json`'s rope settings.
struct HfRope {
    theta: f64,
    scaling: Option<RopeScaling>,
    /// The rope base of the sliding-window layers, when it differs.
    local_theta: Option<f64>,
    /// The context window: `max_position_embeddings`, capped for LongRoPE.
    context: usize,
}

/// The fields of a `config.json` object; a present field must be valid.
struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl<'a> Fields<'a> {
    /// The field `name`, `null` counting as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.json.get(name).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::model_file(
                        self.path,
                        format!("field `{name}` is {v}; it must be a non-negative integer"),
                    )
                }),
        }
    }

    fn usize(&self, name: &str) -> Result<usize> {
        self.opt_usize(name)?
            .ok_or_else(|| Error::model_file(self.path, format!("missing field `{name}`")))
    }

    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        finite_number(self.get(name), name, self.path)
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                Error::model_file(
                    self.path,
                    format!("field `{name}` is {v}; it must be true or false"),
                )
            }),
        }
    }

    /// `head_dim`; left out, the class default; with neither (or `null`),
    /// `hidden_size / num_attention_heads`.
    fn head_dim(&self, spec: &FamilySpec, d_model: usize, n_heads: usize) -> Result<usize> {
        let absent_head_dim = if self.json.get("head_dim").is_none() {
            spec.hf.head_dim
        } else {
            None
        };
        match self.opt_usize("head_dim")?.or(absent_head_dim) {
            Some(hd) => Ok(hd),
            None => derived_head_dim(
                d_model,
                n_heads,
                self.path,
                ("hidden_size", "num_attention_heads"),
            ),
        }
    }

    /// The rope base, scaling, local base and context window.
    fn rope(&self, spec: &FamilySpec) -> Result<HfRope> {
        let (path, defaults) = (self.path, &spec.hf);
        // Rope: transformers 5 nests it under `rope_parameters` (per layer type for
        // Gemma 3: `full_attention` / `sliding_attention`); older files have
        // `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
        let (rope, local_rope) = match self.get("rope_parameters") {
            Some(p)
                if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() =>
            {
                (p.get("full_attention"), p.get("sliding_attention"))
            }
            Some(p) => (Some(p), None),
            None => (self.get("rope_scaling"), None),
        };
        let theta_of = |r: Option<&Value>, key: &str| {
            finite_number(r.and_then(|r| r.get("rope_theta")), key, path)
        };
        let theta = match self.opt_f64("rope_theta")? {
            Some(t) => t,
            None => theta_of(rope, "rope_parameters.rope_theta")?.unwrap_or(defaults.rope_theta),
        };
        let max_position_embeddings = self
            .opt_usize("max_position_embeddings")?
            .unwrap_or(defaults.max_position_embeddings);
        // Pre-training length: a config attribute (top-level key, or Phi-3's
        // class default) wins over the rope dict's, as transformers'
        // `standardize_rope_params` does for Phi-3's published layout.
        let lengths = RopeLengths {
            max_position_embeddings: max_position_embeddings as f64,
            original: self
                .opt_f64("original_max_position_embeddings")?
                .or(defaults.original_max_position_embeddings.map(|n| n as f64)),
        };
        let scaling = match rope {
            Some(r) => parse_rope_scaling(r, lengths, path)?,
            None => None,
        };
        let local_theta = match local_rope {
            Some(r) => {
                if parse_rope_scaling(r, lengths, path)?.is_some() {
                    return Err(Error::model_file(
                        path,
                        "rope scaling on the sliding-window layers                          (`rope_parameters.sliding_attention`) is not supported",
                    ));
                }
                theta_of(Some(r), "rope_parameters.sliding_attention.rope_theta")?
                    .or(spec.rope_local_theta)
            }
            None => self
                .opt_f64("rope_local_base_freq")?
                .or(spec.rope_local_theta),
        };
        if let Some(p) = self.opt_f64("partial_rotary_factor")?.or(rope
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
        let mut context = max_position_embeddings;
        if let Some(RopeScaling::LongRope { original, .. }) = &scaling {
            // Past the original context transformers switches to the long factors.
            context = context.min(*original as usize);
        }
        Ok(HfRope {
            theta,
            scaling,
            local_theta,
            context,
        })
    }

    /// `attention_bias` / `mlp_bias`: only a family with q/k/v biases runs them.
    fn refuse_biases(&self, spec: &FamilySpec) -> Result<()> {
        for flag in ["attention_bias", "mlp_bias"] {
            if self.opt_bool(flag)? == Some(true) && !spec.qkv_bias {
                return Err(Error::model_file(
                    self.path,
                    format!("`{flag}: true` is not supported for {}", spec.name),
                ));
            }
        }
        Ok(())
    }

    /// `num_hidden_layers`, bounded before anything is sized by it (per-layer
    /// window lists).
    fn layer_count(&self) -> Result<usize> {
        let n_layers = self.usize("num_hidden_layers")?;
        if n_layers == 0 || n_layers > MAX_LAYERS {
            return Err(Error::model_file(
                self.path,
                format!("`num_hidden_layers` is {n_layers}; it must be between 1 and {MAX_LAYERS}"),
            ));
        }
        Ok(n_layers)
    }

    /// A family's norms, activation, scales, caps and windows.
    fn family_config(
        &self,
        spec: &FamilySpec,
        n_layers: usize,
        d_model: usize,
        rope_local_theta: Option<f64>,
    ) -> Result<FamilyConfig> {
        let (path, defaults) = (self.path, &spec.hf);
        let activation = self.activation(spec)?;
        let sliding_window = self.sliding_window(defaults.sliding_window)?;
        let sliding_layers = self.sliding_layers(spec, n_layers)?;
        // A score key of the family: absent, the class default; `null`, none
        // (transformers' reading).
        let score_key = |name: &str, default: Option<f64>| -> Result<Option<f64>> {
            if !spec.score_keys {
                return Ok(None);
            }
            match self.json.get(name) {
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
        Ok(FamilyConfig {
            norm: spec.norm,
            activation,
            qk_norm: spec.qk_norm,
            embed_scale: spec.scaled_embeddings.then(|| (d_model as f64).sqrt()),
            query_pre_attn_scalar: score_key(
                "query_pre_attn_scalar",
                defaults.query_pre_attn_scalar,
            )?,
            attn_softcap: score_key("attn_logit_softcapping", defaults.attn_logit_softcapping)?,
            final_softcap: score_key("final_logit_softcapping", defaults.final_logit_softcapping)?,
            sliding_window,
            sliding_layers,
            rope_local_theta,
        })
    }

    /// `hidden_activation` (Gemma) or `hidden_act`; left out, the family's.
    fn activation(&self, spec: &FamilySpec) -> Result<Activation> {
        Ok(
            match self
                .get("hidden_activation")
                .or(self.get("hidden_act"))
                .and_then(Value::as_str)
            {
                None => spec.activation,
                Some("silu" | "swish") => Activation::Silu,
                Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast") => Activation::GeluTanh,
                Some("gelu") => Activation::GeluErf,
                Some(other) => {
                    return Err(Error::model_file(
                        self.path,
                        format!(
                            "activation `{other}` is not supported (silu, gelu_pytorch_tanh, gelu)"
                        ),
                    ))
                }
            },
        )
    }

    /// `sliding_window`: left out, the class default; `null`, none.
    fn sliding_window(&self, default: Option<usize>) -> Result<Option<usize>> {
        Ok(match self.json.get("sliding_window") {
            None => default,
            Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|w| usize::try_from(w).ok())
                    .filter(|w| *w > 0)
                    .ok_or_else(|| {
                        Error::model_file(
                            self.path,
                            format!("field `sliding_window` is {v}; it must be a positive integer"),
                        )
                    })?,
            ),
        })
    }

    /// Which layers use the sliding window: `layer_types` when the file has it,
    /// else the family's rule from transformers' config classes.
    fn sliding_layers(&self, spec: &FamilySpec, n_layers: usize) -> Result<Option<Vec<bool>>> {
        let path = self.path;
        Ok(match self.get("layer_types") {
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
                let use_window = self.get("use_sliding_window").and_then(Value::as_bool);
                let max_window_layers = self
                    .get("max_window_layers")
                    .and_then(Value::as_u64)
                    .map_or(spec.hf.max_window_layers, |n| n as usize);
                match spec.sliding {
                    SlidingRule::All => None,
                    SlidingRule::Never => Some(vec![false; n_layers]),
                    SlidingRule::FromMaxWindowLayers => Some(
                        (0..n_layers)
                            .map(|l| use_window == Some(true) && l >= max_window_layers)
                            .collect(),
                    ),
                    SlidingRule::Periodic { every, pattern_key } => {
                        let every = if pattern_key {
                            self.get("sliding_window_pattern")
                                .and_then(Value::as_u64)
                                .map_or(every, |n| n.max(1) as usize)
                        } else {
                            every
                        };
                        Some(periodic_layers(n_layers, every))
                    }
                }
            }
        })
    }
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
