//! GGUF files: config, tokenizer, chat template and weights (dequantized at load).
//!
//! llama.cpp stores Llama q/k projections in the interleaved rotary layout; they
//! are un-permuted here into the half-split layout of HF checkpoints, so one
//! forward pass serves both formats. Qwen2 GGUFs keep the HF layout.

mod header;

pub use header::read_header;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::config::{derived_head_dim, FamilyConfig, ModelConfig, RopeScaling, MAX_LAYERS};
use super::family::{periodic_layers, Architecture, NormKind};
use super::tokenizer::{llamacpp_adds_bos, GgufTokenizerMeta};
use crate::error::{Error, Result};
use header::{describe, value_as_f64, value_as_usize};

/// An opened GGUF file: parsed header and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    pub architecture: Architecture,
}

impl GgufFile {
    /// Opens and validates `path`: the header is read by [`read_header`] (every
    /// count, length, type, dimension, offset and size checked against the file),
    /// so candle's reader and kernels only ever see a consistent file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file_size = crate::io::regular_file(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let content = read_header(&mut reader, file_size, path)?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(Error::model_file(
                    path,
                    format!(
                        "GGUF key `general.architecture` is a {:?}, not a string",
                        other.value_type()
                    ),
                ))
            }
            None => {
                return Err(Error::model_file(
                    path,
                    "GGUF metadata lacks general.architecture",
                ))
            }
        };
        let architecture = Architecture::parse(&arch, path)?;
        if let Some(why) = architecture.spec().gguf.not_written {
            return Err(Error::model_file(
                path,
                format!(
                    "GGUF architecture `{arch}` is not one llama.cpp writes ({why}); load the \
                     model's HF directory (config.json + *.safetensors) instead"
                ),
            ));
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
            architecture,
        })
    }

    /// The shape (outermost dimension first, as candle and HF order them) of
    /// the tensor named `gguf_name`, if the file has it.
    pub fn tensor_shape(&self, gguf_name: &str) -> Option<&[usize]> {
        self.content
            .tensor_infos
            .get(gguf_name)
            .map(|t| t.shape.dims())
    }

    /// Whether the file has tensor `gguf_name` in f32, f16 or bf16 (not block-quantized).
    pub fn stores_unquantized(&self, gguf_name: &str) -> bool {
        use candle_core::quantized::GgmlDType as G;
        self.content
            .tensor_infos
            .get(gguf_name)
            .is_some_and(|t| matches!(t.ggml_dtype, G::F32 | G::F16 | G::BF16))
    }

    /// Number of tensors in the file.
    pub fn tensor_count(&self) -> usize {
        self.content.tensor_infos.len()
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.architecture.name())
    }

    /// An optional `{arch}.{key}` that must be a non-negative integer when present.
    fn meta_int(&self, key: &str) -> Result<Option<usize>> {
        let full = self.arch_key(key);
        match self.meta(&full) {
            None => Ok(None),
            Some(v) => value_as_usize(v).map(Some).ok_or_else(|| {
                Error::model_file(
                    &self.path,
                    format!(
                        "GGUF key `{full}` is {}; it must be a non-negative integer \
                         (the file is corrupt or was written by a broken converter)",
                        describe(v)
                    ),
                )
            }),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta_int(key)?.ok_or_else(|| {
            Error::model_file(
                &self.path,
                format!("GGUF metadata lacks `{}`", self.arch_key(key)),
            )
        })
    }

    /// An optional `{arch}.{key}` that must be a finite number when present.
    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        let full = self.arch_key(key);
        match self.meta(&full) {
            None => Ok(None),
            Some(v) => match value_as_f64(v) {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(Error::model_file(
                    &self.path,
                    format!(
                        "GGUF key `{full}` is {}; it must be a finite number",
                        describe(v)
                    ),
                )),
            },
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let d_model = self.meta_usize("embedding_length")?;
        let n_heads = self.meta_usize("attention.head_count")?;
        let n_kv_heads = self.meta_int("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = match self.meta_int("attention.key_length")? {
            Some(hd) => hd,
            None => derived_head_dim(
                d_model,
                n_heads,
                &self.path,
                (
                    &self.arch_key("embedding_length"),
                    &self.arch_key("attention.head_count"),
                ),
            )?,
        };
        let vocab_size = match self.tensor_shape("token_embd.weight") {
            Some(&[vocab, _]) => vocab,
            Some(dims) => {
                return Err(Error::model_file(
                    &self.path,
                    format!(
                        "tensor `token_embd.weight` has shape {dims:?}; it must have 2 \
                         dimensions [vocab, embedding_length]"
                    ),
                ))
            }
            None => {
                return Err(Error::model_file(
                    &self.path,
                    "GGUF has no token_embd.weight",
                ))
            }
        };
        let rope_scaling = self.rope_scaling()?;
        let sliding_window = self
            .meta_int("attention.sliding_window")?
            .filter(|w| *w > 0);
        let n_layers = self.meta_usize("block_count")?;
        // Bounded before anything is sized by it (per-layer window lists).
        if n_layers == 0 || n_layers > MAX_LAYERS {
            return Err(Error::model_file(
                &self.path,
                format!(
                    "layer count (`{}`) is {n_layers}; it must be between 1 and {MAX_LAYERS}",
                    self.arch_key("block_count")
                ),
            ));
        }
        ModelConfig {
            architecture: self.architecture,
            family: self.family(sliding_window, d_model, n_heads, n_layers)?,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_mlp: self.meta_usize("feed_forward_length")?,
            vocab_size,
            rms_norm_eps: self
                .meta_f64("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            rope_freq_factors: None,
            max_position_embeddings: self.meta_usize("context_length")?,
            tied_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        }
        .validated(&self.path)
    }

    /// The family's traits for a GGUF file, as llama.cpp runs it, from its
    /// [`FamilySpec`](super::family::FamilySpec) and the keys. Gemma's norms
    /// are stored as `1 + w` by llama.cpp's converter, so they are plain RMSNorm
    /// weights here. Which layers slide: `attention.sliding_window_pattern` (a
    /// bool per layer, or `n`: layer `l` slides when `l % n < n - 1`), else the
    /// family's period (Gemma 2: every other layer from the first; Gemma 3: five
    /// of every six; others: all, when there is a window). The local layers use
    /// `rope.freq_base_swa`, else the family's local base (Gemma 3: 10,000).
    /// Gemma's attention scale is not a key: llama.cpp uses 1/√head_dim, and
    /// 1/√(d_model/n_heads) for the 27B sizes, which it knows by their layer
    /// count (the family's `width_scaled_layers`).
    fn family(
        &self,
        sliding_window: Option<usize>,
        d_model: usize,
        n_heads: usize,
        n_layers: usize,
    ) -> Result<FamilyConfig> {
        let spec = self.architecture.spec();
        let pattern_key = self.arch_key("attention.sliding_window_pattern");
        let every = |n: usize| periodic_layers(n_layers, n);
        let sliding_layers = match self.meta(&pattern_key) {
            None => spec.sliding.period().map(every),
            Some(Value::Array(items)) if items.len() == n_layers => Some(
                items
                    .iter()
                    .map(|v| v.to_bool().ok())
                    .collect::<Option<Vec<bool>>>()
                    .ok_or_else(|| {
                        Error::model_file(
                            &self.path,
                            format!("GGUF key `{pattern_key}` holds a non-bool"),
                        )
                    })?,
            ),
            Some(v) => match value_as_usize(v).filter(|n| *n > 0) {
                Some(n) => Some(every(n)),
                None => {
                    return Err(Error::model_file(
                        &self.path,
                        format!(
                            "GGUF key `{pattern_key}` is {}; it must be a positive integer or \
                             one bool per layer ({n_layers})",
                            describe(v)
                        ),
                    ))
                }
            },
        };
        Ok(FamilyConfig {
            norm: NormKind::Rms,
            activation: spec.activation,
            qk_norm: spec.qk_norm,
            embed_scale: spec.scaled_embeddings.then(|| (d_model as f64).sqrt()),
            query_pre_attn_scalar: (spec.gguf.width_scaled_layers == Some(n_layers))
                .then(|| (d_model / n_heads) as f64),
            attn_softcap: self.meta_f64("attn_logit_softcapping")?,
            final_softcap: self.meta_f64("final_logit_softcapping")?,
            sliding_window,
            sliding_layers,
            rope_local_theta: self
                .meta_f64("rope.freq_base_swa")?
                .or(spec.rope_local_theta),
        })
    }

    /// `{arch}.rope.scaling.*`: `none` and `linear` (with `.factor`) are applied;
    /// any other type is refused, naming the key, rather than silently ignored.
    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        // Phi-3's LongRoPE, as llama.cpp stores it (per-frequency factor tensors).
        if let Some(t) = ["rope_factors_long.weight", "rope_factors_short.weight"]
            .into_iter()
            .find(|t| self.content.tensor_infos.contains_key(*t))
        {
            return Err(Error::model_file(
                &self.path,
                format!(
                    "GGUF has tensor `{t}` (LongRoPE): afprobe applies it from config.json only; \
                     running without it would compute wrong activations, so use the model's HF \
                     directory"
                ),
            ));
        }
        let key = self.arch_key("rope.scaling.type");
        match self.meta(&key) {
            None => Ok(None),
            Some(Value::String(t)) if t == "none" => Ok(None),
            Some(Value::String(t)) if t == "linear" => {
                let factor_key = self.arch_key("rope.scaling.factor");
                let factor = self.meta_f64("rope.scaling.factor")?.ok_or_else(|| {
                    Error::model_file(
                        &self.path,
                        format!("GGUF has `{key}` = linear but no `{factor_key}`"),
                    )
                })?;
                Ok(Some(RopeScaling::Linear { factor }))
            }
            Some(v) => Err(Error::model_file(
                &self.path,
                format!(
                    "GGUF key `{key}` is {}: afprobe applies `none` and `linear` from GGUF keys \
                     (and `rope_freqs.weight`, llama.cpp's form of Llama-3 scaling); running \
                     without it would compute wrong activations, so use the model's HF \
                     directory (config.json supports linear, dynamic, yarn, longrope, llama3)",
                    describe(v)
                ),
            )),
        }
    }

    /// Reads the `rope_freqs.weight` tensor (Llama 3.1+ scaling, stored as
    /// per-frequency divisors) into the config, if the file has one.
    pub fn read_rope_freq_factors(&mut self, config: &mut ModelConfig) -> Result<()> {
        let Some(dims) = self.tensor_shape("rope_freqs.weight") else {
            return Ok(());
        };
        if dims != [config.head_dim / 2] {
            return Err(Error::model_file(
                &self.path,
                format!(
                    "tensor `rope_freqs.weight` has shape {dims:?}; head_dim {} needs [{}]",
                    config.head_dim,
                    config.head_dim / 2
                ),
            ));
        }
        let t = self.dequantize("rope_freqs.weight")?;
        let factors: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(Error::model_file(
                &self.path,
                format!(
                    "tensor `rope_freqs.weight` holds {bad}; rope frequency divisors must be \
                     finite and positive"
                ),
            ));
        }
        config.rope_freq_factors = Some(factors.into_iter().map(f64::from).collect());
        Ok(())
    }

    pub fn chat_template(&self) -> Option<String> {
        self.meta("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    pub fn tokenizer_meta(&self) -> GgufTokenizerMeta {
        tokenizer_meta(&self.content.metadata)
    }

    /// The tensor `name` as stored (an error names it).
    fn read(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// The tensor `name` dequantized to f32, every value checked finite.
    fn dequantize(&mut self, name: &str) -> Result<Tensor> {
        let t = self
            .read(name)?
            .dequantize(&Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("tensor `{name}`: {e}")))?;
        super::validate::check_finite(&t, name, &self.path)?;
        Ok(t)
    }

    /// The weight with HF name `hf_name`, dequantized to f32, in HF layout.
    pub fn weight(&mut self, hf_name: &str, config: &ModelConfig) -> Result<Option<Tensor>> {
        let Some(name) = self.stored_name(hf_name) else {
            return Ok(None);
        };
        let t = self.dequantize(&name)?;
        match self.permuted_heads(hf_name, config) {
            Some(n) => Ok(Some(unpermute_qk(&t, n)?)),
            None => Ok(Some(t)),
        }
    }

    /// The weight with HF name `hf_name` in its stored GGUF type (Q4_K, Q8_0, …:
    /// `--dtype quantized`), rows in HF order.
    pub fn qweight(&mut self, hf_name: &str, config: &ModelConfig) -> Result<Option<QTensor>> {
        let Some(name) = self.stored_name(hf_name) else {
            return Ok(None);
        };
        let q = self.read(&name)?;
        super::validate::check_finite_quantized(&q, &name, &self.path)?;
        match self.permuted_heads(hf_name, config) {
            Some(n) => Ok(Some(unpermute_qk_rows(&q, n).map_err(|e| {
                Error::model_file(&self.path, format!("tensor `{name}`: {e}"))
            })?)),
            None => Ok(Some(q)),
        }
    }

    /// The GGUF name of `hf_name`, if the file has that tensor.
    fn stored_name(&self, hf_name: &str) -> Option<String> {
        gguf_name(self.architecture, hf_name)
            .filter(|name| self.content.tensor_infos.contains_key(name))
    }

    /// The head count of a q/k projection whose rows llama.cpp's converter
    /// interleaved (the family's `interleaved_qk`), else `None`.
    fn permuted_heads(&self, hf_name: &str, config: &ModelConfig) -> Option<usize> {
        if !self.architecture.spec().gguf.interleaved_qk {
            return None;
        }
        if hf_name.ends_with("q_proj.weight") {
            Some(config.n_heads)
        } else if hf_name.ends_with("k_proj.weight") {
            Some(config.n_kv_heads)
        } else {
            None
        }
    }
}

/// The tokenizer of the GGUF file `path` and its `general.architecture`
/// (which picks the SentencePiece variant), from the header alone and whatever
/// the architecture: for vocabulary-only files such as llama.cpp's tokenizer
/// test vocabularies (`models/ggml-vocab-*.gguf`), which have no weights and
/// may name an architecture afprobe does not run.
pub fn read_tokenizer_meta(path: &Path) -> Result<(String, GgufTokenizerMeta)> {
    let file_size = crate::io::regular_file(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = read_header(BufReader::new(file), file_size, path)?;
    let architecture = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    Ok((architecture, tokenizer_meta(&content.metadata)))
}

/// The `tokenizer.ggml.*` keys of GGUF metadata; missing keys leave their field empty.
fn tokenizer_meta(metadata: &HashMap<String, Value>) -> GgufTokenizerMeta {
    let str_of = |key: &str| {
        metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default()
    };
    let id_of = |key: &str| {
        metadata
            .get(key)
            .and_then(value_as_usize)
            .and_then(|v| u32::try_from(v).ok())
    };
    let numbers = |key: &str| -> Vec<f64> {
        metadata
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .map(|items| items.iter().filter_map(value_as_f64).collect())
            .unwrap_or_default()
    };
    let strings = |key: &str| -> Vec<String> {
        metadata
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.to_string().ok().cloned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let bool_of = |key: &str| metadata.get(key).and_then(|v| v.to_bool().ok());
    let model = str_of("tokenizer.ggml.model");
    let pre = str_of("tokenizer.ggml.pre");
    let add_bos_token = bool_of("tokenizer.ggml.add_bos_token");
    GgufTokenizerMeta {
        token_types: numbers("tokenizer.ggml.token_type")
            .into_iter()
            .map(|v| v as i64)
            .collect(),
        scores: numbers("tokenizer.ggml.scores")
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        add_space_prefix: bool_of("tokenizer.ggml.add_space_prefix"),
        add_bos: add_bos_token.unwrap_or_else(|| llamacpp_adds_bos(&model, &pre)),
        add_bos_token,
        model,
        pre,
        tokens: strings("tokenizer.ggml.tokens"),
        merges: strings("tokenizer.ggml.merges"),
        bos_id: id_of("tokenizer.ggml.bos_token_id"),
        unk_id: id_of("tokenizer.ggml.unknown_token_id"),
        eos_id: id_of("tokenizer.ggml.eos_token_id"),
        turn_end_ids: ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .into_iter()
            .filter_map(id_of)
            .collect(),
    }
}

/// Maps an HF weight name to its llama.cpp name.
pub fn gguf_name(arch: Architecture, hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (module, kind) = name.rsplit_once('.')?; // kind: weight | bias
                                                 // The block's norms by role, whatever the family calls them in HF.
    let norms = arch.block_norms();
    let norm = [
        (norms.attn_pre, "attn_norm"),
        (norms.attn_post, "post_attention_norm"),
        (norms.mlp_pre, "ffn_norm"),
        (norms.mlp_post, "post_ffw_norm"),
    ]
    .into_iter()
    .find_map(|(hf, gguf)| (hf == Some(module)).then_some(gguf));
    let short = match module {
        _ if norm.is_some() => norm.unwrap_or_default(),
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // Phi-3's fused projections (gate rows first, as in HF).
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Interleaved (llama.cpp) → half-split (HF) rows of a q/k projection `[n_heads*hd, in]`.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// [`unpermute_qk`] on a block-quantized tensor: each row (an output
/// feature) is quantized on its own, so moving whole rows' bytes is exact.
fn unpermute_qk_rows(q: &QTensor, n_heads: usize) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let hd = rows / n_heads;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let old = h * hd + i * 2 + half;
                out.extend_from_slice(&data[old * row_bytes..(old + 1) * row_bytes]);
            }
        }
    }
    qtensor_from_ggml(dtype, &out, vec![rows, cols], &Device::Cpu)
}

/// Whether `path` starts with the GGUF magic (used to tell files apart).
pub fn looks_like_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return false;
    }
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == b"GGUF")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-3 GGUF: `kvs` as (key, u32 value), tensors as (name, dims, offset), F32.
    fn gguf(kvs: &[(&str, u32)], tensors: &[(&str, &[u64], u64)], data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64 + 1).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        for (k, v) in kvs {
            string(&mut b, k);
            b.extend(4u32.to_le_bytes());
            b.extend(v.to_le_bytes());
        }
        for (name, dims, offset) in tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(0u32.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + data, 0);
        b
    }

    fn open(bytes: &[u8]) -> Result<GgufFile> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path)
    }

    #[test]
    fn a_zero_dimension_token_embedding_is_an_error_not_a_panic() {
        let kvs = [
            ("llama.embedding_length", 8),
            ("llama.attention.head_count", 2),
        ];
        let f = open(&gguf(&kvs, &[("token_embd.weight", &[], 0)], 4)).unwrap();
        let err = f.config().unwrap_err().to_string();
        assert!(
            err.contains("token_embd.weight") && err.contains("2 dimensions"),
            "{err}"
        );
    }

    #[test]
    fn alignment_offsets_and_sizes_are_checked() {
        let err = open(&gguf(&[("general.alignment", 0)], &[], 0))
            .err()
            .unwrap();
        assert!(err.to_string().contains("general.alignment"), "{err}");
        let err = open(&gguf(&[("general.alignment", 48)], &[], 0))
            .err()
            .unwrap();
        assert!(err.to_string().contains("power of two"), "{err}");
        let err = open(&gguf(&[], &[("w", &[4], 8)], 16)).err().unwrap();
        assert!(
            err.to_string().contains("not a multiple of the alignment"),
            "{err}"
        );
        let err = open(&gguf(&[], &[("w", &[8], 0)], 16)).err().unwrap();
        assert!(err.to_string().contains("past the end"), "{err}");
        let err = open(&gguf(&[], &[("w", &[1 << 62, 4], 0)], 16))
            .err()
            .unwrap();
        assert!(err.to_string().contains("2^63"), "{err}");
        assert!(open(&gguf(&[], &[("w", &[4], 0)], 16)).is_ok());
    }
}
