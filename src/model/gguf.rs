//! GGUF files: config, tokenizer, chat template and weights (dequantized at load).
//!
//! llama.cpp stores Llama q/k projections in the interleaved rotary layout; they
//! are un-permuted here into the half-split layout of HF checkpoints, so one
//! forward pass serves both formats. Qwen2 GGUFs keep the HF layout.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::config::{Architecture, ModelConfig};
use super::tokenizer::GgufTokenizerMeta;
use crate::error::{Error, Result};

/// An opened GGUF file: parsed header and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    pub architecture: Architecture,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(Error::model_file(
                path,
                "not a GGUF file (it does not start with the bytes `GGUF`); pass a .gguf file or \
                 a directory with config.json + *.safetensors",
            ));
        }
        reader.rewind().map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut reader).map_err(|e| {
            Error::model_file(
                path,
                format!("cannot read the GGUF header (truncated or corrupt?): {e}"),
            )
        })?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| Error::model_file(path, "GGUF metadata lacks general.architecture"))?;
        let architecture = Architecture::parse(&arch, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
            architecture,
        })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.architecture.name())
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let full = self.arch_key(key);
        self.meta(&full)
            .and_then(value_as_f64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::model_file(&self.path, format!("GGUF metadata lacks `{full}`")))
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(&self.arch_key(key)).and_then(value_as_f64)
    }

    fn meta_string_array(&self, key: &str) -> Vec<String> {
        match self.meta(key).and_then(|v| v.to_vec().ok()) {
            Some(items) => items
                .iter()
                .filter_map(|v| v.to_string().ok().cloned())
                .collect(),
            None => Vec::new(),
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let d_model = self.meta_usize("embedding_length")?;
        let n_heads = self.meta_usize("attention.head_count")?;
        let n_kv_heads = self
            .meta_usize("attention.head_count_kv")
            .unwrap_or(n_heads);
        let head_dim = self
            .meta_usize("attention.key_length")
            .unwrap_or(d_model / n_heads.max(1));
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(Error::model_file(
                    &self.path,
                    "GGUF has no token_embd.weight",
                ))
            }
        };
        ModelConfig {
            architecture: self.architecture,
            n_layers: self.meta_usize("block_count")?,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_mlp: self.meta_usize("feed_forward_length")?,
            vocab_size,
            rms_norm_eps: self
                .meta_f64("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            rope_freq_factors: None,
            max_position_embeddings: self.meta_usize("context_length")?,
            tied_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        }
        .validated(&self.path)
    }

    /// Reads the `rope_freqs.weight` tensor (Llama 3.1+ scaling, stored as
    /// per-frequency divisors) into the config, if the file has one.
    pub fn read_rope_freq_factors(&mut self, config: &mut ModelConfig) -> Result<()> {
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let t = self.dequantize("rope_freqs.weight")?;
            let factors: Vec<f32> = t.flatten_all()?.to_vec1()?;
            config.rope_freq_factors = Some(factors.into_iter().map(f64::from).collect());
        }
        Ok(())
    }

    pub fn chat_template(&self) -> Option<String> {
        self.meta("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    pub fn tokenizer_meta(&self) -> GgufTokenizerMeta {
        let str_of = |key: &str| {
            self.meta(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default()
        };
        let id_of = |key: &str| self.meta(key).and_then(value_as_f64).map(|v| v as u32);
        let token_types = match self
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            Some(items) => items
                .iter()
                .filter_map(value_as_f64)
                .map(|v| v as i64)
                .collect(),
            None => Vec::new(),
        };
        GgufTokenizerMeta {
            model: str_of("tokenizer.ggml.model"),
            pre: str_of("tokenizer.ggml.pre"),
            tokens: self.meta_string_array("tokenizer.ggml.tokens"),
            token_types,
            merges: self.meta_string_array("tokenizer.ggml.merges"),
            bos_id: id_of("tokenizer.ggml.bos_token_id"),
            eos_id: id_of("tokenizer.ggml.eos_token_id"),
            add_bos: self
                .meta("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
        }
    }

    fn dequantize(&mut self, name: &str) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("tensor `{name}`: {e}")))?;
        q.dequantize(&Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// The weight with HF name `hf_name`, dequantized to f32, in HF layout.
    pub fn weight(&mut self, hf_name: &str, config: &ModelConfig) -> Result<Option<Tensor>> {
        let Some(name) = gguf_name(hf_name) else {
            return Ok(None);
        };
        if !self.content.tensor_infos.contains_key(&name) {
            return Ok(None);
        }
        let t = self.dequantize(&name)?;
        let heads = if hf_name.ends_with("q_proj.weight") {
            Some(config.n_heads)
        } else if hf_name.ends_with("k_proj.weight") {
            Some(config.n_kv_heads)
        } else {
            None
        };
        match heads {
            Some(n) if self.architecture == Architecture::Llama => Ok(Some(unpermute_qk(&t, n)?)),
            _ => Ok(Some(t)),
        }
    }
}

fn value_as_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// Maps an HF weight name to its llama.cpp name.
pub fn gguf_name(hf_name: &str) -> Option<String> {
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
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
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

/// Half-split (HF) → interleaved (llama.cpp): the permutation llama.cpp's converter applies.
pub fn permute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// Whether `path` starts with the GGUF magic (used to tell files apart).
pub fn looks_like_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == b"GGUF")
        .unwrap_or(false)
}
