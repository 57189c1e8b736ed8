//! PEFT LoRA adapters (`--adapter DIR`): plain LoRA merged into the weights at
//! load, and PEFT's *activated* LoRA (aLoRA), which applies only from the last
//! occurrence of its invocation token sequence on.
//!
//! An adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
//! `use_rslora`, `target_modules`, optional `alora_invocation_tokens`,
//! `base_model_name_or_path`) and `adapter_model.safetensors` with PEFT's
//! names, `base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight`
//! (`[r, in]`) and `...lora_B.weight` (`[out, r]`). The merged weight is
//! `W + scale · B · A` with `scale = alpha / r` (`alpha / √r` with rslora),
//! computed in f64.
//!
//! Activated LoRA keeps two sets of weights: the base model's and the merged
//! ones. A forward call runs the positions before the invocation start with
//! the base weights and the rest with the merged weights, on one KV cache, so
//! the prefix's keys and values are the base model's, as in PEFT.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::ModelConfig;
use super::lora::{block_of, proj_shape, target_modules};
use crate::error::{Error, Result};

/// What a store manifest (and `model info`) records about an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// The adapter directory as given.
    pub path: String,
    /// SHA-256 of `adapter_model.safetensors`.
    pub sha256: String,
    /// `lora` or `alora`.
    pub kind: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alora_invocation_tokens: Option<Vec<u32>>,
}

/// A loaded adapter: its config and the weight delta of every adapted projection.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    pub record: AdapterRecord,
    pub base_model_name_or_path: Option<String>,
    /// `base_model.sha256` from a `training.json` beside the adapter (afprobe's organisms).
    pub base_sha256: Option<String>,
    /// `scale · B · A` (`[out, in]`, f64) by HF weight name (`model.layers.0.self_attn.q_proj.weight`).
    deltas: HashMap<String, Tensor>,
}

/// The parts of `adapter_config.json` afprobe reads (the rest is ignored).
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Value>,
    #[serde(default)]
    rank_pattern: Option<HashMap<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<HashMap<String, Value>>,
    target_modules: Value,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    alora_invocation_tokens: Option<Vec<u32>>,
}

impl RawConfig {
    /// `path` parsed; an error naming it when it is missing or not a LoRA config.
    fn read(path: &Path) -> Result<RawConfig> {
        let text = crate::io::read_to_string_if_exists(path)?.ok_or_else(|| {
            Error::model_file(
                path,
                "no adapter_config.json: --adapter takes a PEFT LoRA directory \
                 (adapter_config.json + adapter_model.safetensors)",
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::model_file(path, format!("not a LoRA adapter config: {e}")))
    }

    /// Refuses the PEFT options afprobe does not implement (DoRA, biases,
    /// saved modules, per-module ranks, Conv1D layouts).
    fn check_supported(&self) -> Result<(), String> {
        if let Some(t) = &self.peft_type {
            if t != "LORA" {
                return Err(format!(
                    "peft_type is `{t}`; afprobe reads LoRA adapters (peft_type LORA) only"
                ));
            }
        }
        if self.r == 0 {
            return Err("r is 0".into());
        }
        if !self.lora_alpha.is_finite() {
            return Err("lora_alpha is not a finite number".into());
        }
        if self.use_dora {
            return Err("use_dora is true; DoRA adapters are not supported".into());
        }
        if self.fan_in_fan_out {
            return Err(
                "fan_in_fan_out is true; Llama-family projections are not Conv1D, \
                            so this adapter is for another architecture"
                    .into(),
            );
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(format!(
                "bias is `{}`; only bias = \"none\" is supported",
                self.bias.as_deref().unwrap_or_default()
            ));
        }
        if self
            .modules_to_save
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(
                "modules_to_save is set; adapters that replace whole modules are \
                            not supported"
                    .into(),
            );
        }
        for (key, pat) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            if pat.as_ref().is_some_and(|p| !p.is_empty()) {
                return Err(format!("{key} is set; per-module ranks are not supported"));
            }
        }
        Ok(())
    }

    /// The adapted modules: a list of PEFT module names, or `all-linear`
    /// (the model's own: Phi-3's fused `qkv_proj`, `gate_up_proj`).
    fn target_modules(&self, config: &ModelConfig) -> Result<Vec<String>, String> {
        let known = target_modules(config);
        let targets: Vec<String> = match &self.target_modules {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| "target_modules must be a list of module names".into())
                })
                .collect::<Result<_, String>>()?,
            Value::String(s) if s == "all-linear" => known.iter().map(|s| s.to_string()).collect(),
            Value::String(s) => {
                return Err(format!(
                    "target_modules is the pattern `{s}`; list the modules instead (among {})",
                    known.join(", ")
                ))
            }
            _ => return Err("target_modules must be a list of module names".into()),
        };
        if targets.is_empty() {
            return Err("target_modules is empty".into());
        }
        if let Some(t) = targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(format!(
                "unknown target module `{t}`: a {} model's adapters target {}",
                config.architecture.name(),
                known.join(", ")
            ));
        }
        Ok(targets)
    }

    /// Errors unless the activated-LoRA invocation, if any, is non-empty and
    /// inside the base model's vocabulary.
    fn check_invocation(&self, config: &ModelConfig) -> Result<(), String> {
        if let Some(inv) = &self.alora_invocation_tokens {
            if inv.is_empty() {
                return Err("alora_invocation_tokens is empty".into());
            }
            if let Some(&t) = inv.iter().find(|&&t| t as usize >= config.vocab_size) {
                return Err(format!(
                    "alora_invocation_tokens holds token id {t}, outside the model's vocabulary \
                     of {} tokens: the adapter is for another base model",
                    config.vocab_size
                ));
            }
        }
        Ok(())
    }
}

/// `dir/adapter_model.safetensors`: its path, sha256 and tensors, each checked finite.
fn read_tensors(dir: &Path) -> Result<(PathBuf, String, HashMap<String, Tensor>)> {
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        return Err(Error::model_file(
            &st_path,
            "missing (afprobe reads the safetensors format of PEFT adapters; \
             adapter_model.bin is not supported)",
        ));
    }
    let sha256 = crate::io::sha256_file(&st_path)?;
    crate::io::check_safetensors(&st_path)?;
    let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
        .map_err(|e| Error::model_file(&st_path, format!("cannot read: {e}")))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        super::validate::check_finite(&tensors[name], name, &st_path)?;
    }
    Ok((st_path, sha256, tensors))
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`,
    /// checking every tensor against `config` (the base model's shapes).
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let raw = RawConfig::read(&cfg_path)?;
        let bad = |m: String| Error::model_file(&cfg_path, m);
        raw.check_supported().map_err(bad)?;
        let targets = raw.target_modules(config).map_err(bad)?;
        raw.check_invocation(config).map_err(bad)?;
        let scale = if raw.use_rslora {
            raw.lora_alpha / (raw.r as f64).sqrt()
        } else {
            raw.lora_alpha / raw.r as f64
        };
        let (st_path, sha256, tensors) = read_tensors(dir)?;
        let deltas = deltas(&tensors, &targets, raw.r, scale, config, &st_path)?;
        // afprobe's own organisms record the base weights' sha256 beside the adapter.
        let base_sha256 = crate::io::read_to_string_if_exists(&dir.join("training.json"))?
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v.pointer("/base_model/sha256")?
                    .as_str()
                    .map(str::to_string)
            });
        Ok(Adapter {
            dir: dir.to_path_buf(),
            record: AdapterRecord {
                path: dir.display().to_string(),
                sha256,
                kind: if raw.alora_invocation_tokens.is_some() {
                    "alora"
                } else {
                    "lora"
                }
                .into(),
                r: raw.r,
                lora_alpha: raw.lora_alpha,
                use_rslora: raw.use_rslora,
                target_modules: targets,
                alora_invocation_tokens: raw.alora_invocation_tokens,
            },
            base_model_name_or_path: raw.base_model_name_or_path.filter(|s| !s.is_empty()),
            base_sha256,
            deltas,
        })
    }

    /// Errors when the adapter names another base model: its recorded weights
    /// sha256 (organisms) differs, or its `base_model_name_or_path` matches
    /// none of `names` (the model's spec, file and directory names).
    pub fn check_base(
        &self,
        names: &[String],
        weights_sha256: impl Fn() -> Result<String>,
    ) -> Result<()> {
        let cfg = self.dir.join("adapter_config.json");
        if let Some(want) = &self.base_sha256 {
            let have = weights_sha256()?;
            if &have != want {
                return Err(Error::model_file(
                    self.dir.join("training.json"),
                    format!(
                        "the adapter was trained on base weights with sha256 {want}, but this \
                         model's weights have sha256 {have}: it is an adapter for another base \
                         model (pass that model with --model)"
                    ),
                ));
            }
            return Ok(());
        }
        let Some(base) = &self.base_model_name_or_path else {
            return Ok(());
        };
        let key = normalized_name(base);
        let ok = key.is_empty()
            || names
                .iter()
                .map(|n| normalized_name(n))
                .any(|n| !n.is_empty() && (n.starts_with(&key) || key.starts_with(&n)));
        if ok {
            Ok(())
        } else {
            Err(Error::model_file(
                cfg,
                format!(
                    "base_model_name_or_path is `{base}`, but the model is {}: the adapter is for \
                     another base model (if it is the same model under another name, set \
                     base_model_name_or_path to `{}`)",
                    names.first().map(String::as_str).unwrap_or("?"),
                    names.last().map(String::as_str).unwrap_or("?"),
                ),
            ))
        }
    }

    /// The weight delta `scale · B · A` (`[out, in]`, f64) for an HF weight name, if adapted.
    pub fn delta(&self, hf_name: &str) -> Option<&Tensor> {
        self.deltas.get(hf_name)
    }

    pub fn invocation_tokens(&self) -> Option<&[u32]> {
        self.record.alora_invocation_tokens.as_deref()
    }
}

/// Lowercase alphanumerics of a path's last component, without `.gguf`.
fn normalized_name(s: &str) -> String {
    let last = s
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(s);
    let last = last.strip_suffix(".gguf").unwrap_or(last);
    last.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Pairs PEFT's `lora_A` / `lora_B` tensors per projection and checks their shapes.
fn deltas(
    tensors: &HashMap<String, Tensor>,
    targets: &[String],
    r: usize,
    scale: f64,
    config: &ModelConfig,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let bad = |m: String| Error::model_file(path, m);
    let c = config;
    // base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight
    // (layer, module) -> [lora_A, lora_B], each with its tensor name.
    type Named<'a> = Option<(&'a String, &'a Tensor)>;
    let mut pairs: HashMap<(usize, String), [Named; 2]> = HashMap::new();
    for (name, t) in tensors {
        let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
        let parse = || -> Option<(usize, &str, &str, usize)> {
            let rest = rest.strip_prefix("model.layers.")?;
            let (l, rest) = rest.split_once('.')?;
            let l: usize = l.parse().ok()?;
            let rest = rest
                .strip_prefix("self_attn.")
                .map(|r| ("self_attn", r))
                .or_else(|| rest.strip_prefix("mlp.").map(|r| ("mlp", r)))?;
            let (block, rest) = rest;
            let (module, rest) = rest.split_once('.')?;
            let ab = match rest {
                "lora_A.weight" | "lora_A.default.weight" => 0,
                "lora_B.weight" | "lora_B.default.weight" => 1,
                _ => return None,
            };
            Some((l, block, module, ab))
        };
        let Some((l, block, module, ab)) = parse() else {
            return Err(bad(format!(
                "tensor `{name}` is not a LoRA weight of a Llama-family projection \
                 (expected base_model.model.model.layers.{{l}}.self_attn.q_proj.lora_A.weight and the like)"
            )));
        };
        if block_of(module) != Some(block) {
            return Err(bad(format!(
                "tensor `{name}` adapts the module `{block}.{module}`, which a {} model does \
                 not have (its adapters target {})",
                c.architecture.name(),
                target_modules(c).join(", ")
            )));
        }
        if !targets.iter().any(|t| t == module) {
            return Err(bad(format!(
                "tensor `{name}` adapts `{module}`, which target_modules in adapter_config.json \
                 does not list"
            )));
        }
        if l >= c.n_layers {
            return Err(bad(format!(
                "tensor `{name}` adapts layer {l}, but the model has {} layers: the adapter is \
                 for another base model",
                c.n_layers
            )));
        }
        let slot = &mut pairs.entry((l, module.to_string())).or_default()[ab];
        if slot.is_some() {
            return Err(bad(format!(
                "tensor `{name}` appears twice (with and without `.default`)"
            )));
        }
        *slot = Some((name, t));
    }
    if pairs.is_empty() {
        return Err(bad("holds no LoRA tensors".into()));
    }
    let mut out = HashMap::new();
    for ((l, module), [a, b]) in pairs {
        let (a_name, a) = a.ok_or_else(|| {
            bad(format!(
                "layer {l} {module} has lora_B but no lora_A tensor"
            ))
        })?;
        let (b_name, b) = b.ok_or_else(|| {
            bad(format!(
                "layer {l} {module} has lora_A but no lora_B tensor"
            ))
        })?;
        let (out_dim, in_dim) = proj_shape(c, &module).map_err(|e| bad(e.to_string()))?;
        if a.dims() != [r, in_dim] {
            return Err(bad(format!(
                "tensor `{a_name}` has shape {:?}, but rank r = {r} on this base model's \
                 {module} (in = {in_dim}) needs [{r}, {in_dim}]: the adapter does not fit the model",
                a.dims()
            )));
        }
        if b.dims() != [out_dim, r] {
            return Err(bad(format!(
                "tensor `{b_name}` has shape {:?}, but rank r = {r} on this base model's \
                 {module} (out = {out_dim}) needs [{out_dim}, {r}]: the adapter does not fit the model",
                b.dims()
            )));
        }
        let delta = (b.to_dtype(DType::F64)?.matmul(&a.to_dtype(DType::F64)?)? * scale)?;
        let block = block_of(&module).unwrap_or("mlp");
        out.insert(format!("model.layers.{l}.{block}.{module}.weight"), delta);
    }
    Ok(out)
}
