//! Loading a model (GGUF, HF directory, hub cache, default alias) and running it with hooks.

pub mod adapter;
pub(crate) mod attention;
pub mod config;
mod decoder;
pub mod expected_weights;
pub mod family;
pub mod fetch;
pub mod gguf;
pub mod hooks;
pub mod info;
pub(crate) mod kernels;
mod kv_cache;
pub mod lora;
mod portable;
mod qgemm;
pub mod spec;
pub mod template;
mod token_tree;
pub mod tokenizer;
pub mod transformer;
pub mod validate;
mod weights;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

pub use adapter::{Adapter, AdapterRecord};
pub use config::{Architecture, ModelConfig};
pub use hooks::{
    parse_hooks, parse_layer_list, ActivationCache, CaptureRows, Edit, HookPoint, Hooks,
    NamesFilter, Positions,
};
pub use info::{load_model, load_model_placed, load_model_with_adapter, model_info};
pub use kernels::keep_freed_memory;
pub use portable::{DeviceSpec, Engine, Placement};
pub use spec::{ModelFiles, ModelSpec};
pub use template::{ChatTemplate, Message};
pub use tokenizer::Tokenizer;
pub use transformer::{KvCache, LogitsAt, TokenTree, Transformer};

use crate::error::{Error, Result};

/// Weight precision, `--dtype auto|f32|f16|bf16|quantized`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightDtype {
    /// `f32`, or `quantized` for a GGUF file whose f32 weights would take more
    /// than three quarters of the memory available now (a notice says so).
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
    /// GGUF only: the projections stay in the file's block-quantized types
    /// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K) and are multiplied by afprobe's
    /// quantized GEMM (candle's dot products for Q2_K, Q3_K and single tokens);
    /// embeddings, norms and activations are f32.
    Quantized,
}

impl WeightDtype {
    /// The name `--dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Auto => "auto",
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Quantized => "quantized",
        }
    }

    /// `Auto` as `F32`; the others as they are.
    fn or_f32(self) -> WeightDtype {
        match self {
            WeightDtype::Auto => WeightDtype::F32,
            d => d,
        }
    }

    /// The dtype of the dense weights (and of every activation).
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::Auto | WeightDtype::F32 | WeightDtype::Quantized => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

/// A loaded model: the hooked transformer, its tokenizer and chat template.
#[derive(Debug)]
pub struct Model {
    pub transformer: Transformer,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub spec: ModelSpec,
    pub files: ModelFiles,
    /// The LoRA adapter applied at load (`--adapter`), if any.
    pub adapter: Option<AdapterRecord>,
    /// The weight precision it was loaded at (`--dtype`).
    pub weights: WeightDtype,
}

impl Model {
    /// Resolves `spec` (fetching the default model if needed) and loads it.
    pub fn load(spec: &ModelSpec, dtype: WeightDtype) -> Result<Model> {
        Model::load_with_adapter(spec, dtype, None)
    }

    /// [`load`](Self::load) with a PEFT LoRA adapter directory applied (see [`adapter`]).
    pub fn load_with_adapter(
        spec: &ModelSpec,
        dtype: WeightDtype,
        adapter: Option<&Path>,
    ) -> Result<Model> {
        let files = spec.resolve()?;
        let with = adapter.map(|dir| AdapterCheck {
            dir,
            names: model_names(spec, &files),
            files: &files,
        });
        let ((transformer, mut tokenizer, template, adapter), dtype) =
            kernels::while_loading(|| match &files {
                ModelFiles::Gguf(path) => load_gguf(path, dtype, with),
                ModelFiles::HfDir(dir) if dtype == WeightDtype::Quantized => {
                    Err(Error::model_file(
                        dir,
                        "--dtype quantized keeps a GGUF file's block-quantized weights; this is \
                         an HF directory (pass a .gguf file, or --dtype f32|f16|bf16)",
                    ))
                }
                ModelFiles::HfDir(dir) => {
                    Ok((load_hf_dir(dir, dtype.dtype(), with)?, dtype.or_f32()))
                }
            })?;
        tokenizer.limit_ids(transformer.config().vocab_size);
        Ok(Model {
            transformer,
            tokenizer,
            template,
            spec: spec.clone(),
            files,
            adapter,
            weights: dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.transformer.config()
    }

    /// The prompt text for `messages`, ending with the assistant header: the
    /// model's chat template, or for a base model without one the documented
    /// plain-text conversation ([`template::plain_conversation`]), with a notice.
    pub fn format_chat(&self, messages: &[Message]) -> Result<String> {
        match self.template.as_ref() {
            Some(template) => template.render(messages, true),
            None => {
                static NOTICE: std::sync::Once = std::sync::Once::new();
                NOTICE.call_once(|| {
                    eprintln!(
                        "afprobe: {} has no chat template (a base model): chat prompts use the \
                         plain-text conversation format (System/User/Assistant lines; see README)",
                        self.files.path().display()
                    )
                });
                Ok(template::plain_conversation(messages))
            }
        }
    }

    /// Runs `tokens` from scratch with `hooks` (edits and captures), returning
    /// logits at `at` (TransformerLens' `run_with_hooks`).
    pub fn run_with_hooks(
        &self,
        tokens: &[u32],
        hooks: &mut Hooks,
        at: &LogitsAt,
    ) -> Result<Tensor> {
        self.transformer
            .forward(tokens, &mut KvCache::new(), hooks, at)
    }

    /// Runs `tokens` from scratch, capturing the hook points `filter` selects;
    /// returns last-token logits and the cache (TransformerLens' `run_with_cache`).
    pub fn run_with_cache(
        &self,
        tokens: &[u32],
        filter: NamesFilter,
        rows: CaptureRows,
    ) -> Result<(Tensor, ActivationCache)> {
        let mut hooks = Hooks::capture(filter, rows);
        let logits = self.run_with_hooks(tokens, &mut hooks, &LogitsAt::Last)?;
        Ok((logits, hooks.cache))
    }

    /// SHA-256 of the model's weight file(s): the GGUF file, or the sorted
    /// safetensors files of a directory hashed one after another.
    pub fn weights_sha256(&self) -> Result<String> {
        files_sha256(&self.files)
    }
}

/// SHA-256 of a model's weight file(s) (see [`Model::weights_sha256`]).
fn files_sha256(files: &ModelFiles) -> Result<String> {
    {
        match files {
            ModelFiles::Gguf(p) => crate::io::sha256_file(p),
            ModelFiles::HfDir(dir) => {
                let mut parts = Vec::new();
                for f in safetensors_files(dir)? {
                    parts.push(crate::io::sha256_file(&f)?);
                }
                if parts.len() == 1 {
                    return Ok(parts.remove(0));
                }
                use sha2::Digest;
                Ok(format!(
                    "{:x}",
                    sha2::Sha256::digest(parts.join("\n").as_bytes())
                ))
            }
        }
    }
}

/// An adapter to apply while loading, and what its base model check needs.
struct AdapterCheck<'a> {
    dir: &'a Path,
    names: Vec<String>,
    files: &'a ModelFiles,
}

impl AdapterCheck<'_> {
    /// Reads the adapter and checks it against the base model (before any weight is built).
    fn load(&self, config: &ModelConfig) -> Result<Adapter> {
        let adapter = Adapter::load(self.dir, config)?;
        adapter.check_base(&self.names, || files_sha256(self.files))?;
        Ok(adapter)
    }
}

/// Names a model goes by, for matching an adapter's `base_model_name_or_path`.
fn model_names(spec: &ModelSpec, files: &ModelFiles) -> Vec<String> {
    let mut names = vec![spec.to_string()];
    if let ModelSpec::Hub { repo, .. } = spec {
        names.push(repo.clone());
    }
    if *spec == ModelSpec::Default {
        names.push("HuggingFaceTB/SmolLM2-135M-Instruct".into());
    }
    names.push(files.path().display().to_string());
    names
}

type Loaded = (
    Transformer,
    Tokenizer,
    Option<ChatTemplate>,
    Option<AdapterRecord>,
);

/// The transformer from `weights`, with the adapter applied if there is one.
fn build_transformer(
    config: ModelConfig,
    weights: &mut transformer::WeightSource,
    dtype: DType,
    adapter: &Option<Adapter>,
) -> Result<Transformer> {
    match adapter {
        Some(a) => Transformer::with_adapter(config, weights, a, dtype),
        None => Transformer::new(config, weights, dtype),
    }
}

/// Loads a GGUF file at `weight_dtype`, `auto` resolved (returned beside the model).
fn load_gguf(
    path: &Path,
    weight_dtype: WeightDtype,
    with: Option<AdapterCheck>,
) -> Result<(Loaded, WeightDtype)> {
    let mut file = gguf::GgufFile::open(path)?;
    let mut config = file.config()?;
    // Shapes and memory are checked before any tensor data is read.
    let layers_key = format!("{}.block_count", file.architecture.name());
    let expected =
        validate::check_weights(&config, file.tensor_count(), path, &layers_key, |hf| {
            let name = gguf::gguf_name(file.architecture, hf)?;
            let shape = file.tensor_shape(&name)?;
            Some((name, shape))
        })?;
    let weight_dtype = match weight_dtype {
        WeightDtype::Auto if with.is_none() => {
            let f32_bytes = validate::estimate_bytes(&expected, 4);
            if validate::fits_comfortably(f32_bytes) {
                WeightDtype::F32
            } else {
                eprintln!(
                    "afprobe: {} would need about {:.1} GiB as f32, more than this machine has \
                     to spare; keeping its block-quantized weights (--dtype quantized; pass \
                     --dtype f32 to insist)",
                    path.display(),
                    f32_bytes as f64 / (1u64 << 30) as f64
                );
                WeightDtype::Quantized
            }
        }
        d => d.or_f32(),
    };
    let quantized = weight_dtype == WeightDtype::Quantized;
    let dtype = weight_dtype.dtype();
    if quantized && with.is_some() {
        return Err(Error::BadInput(
            "--adapter merges LoRA weights into dense projections; it does not combine with \
             --dtype quantized (use --dtype f32|f16|bf16)"
                .into(),
        ));
    }
    let needed = if quantized {
        // The file as stored, plus f32 copies of the tables it stores unquantized
        // (block-quantized tables stay so: rows are dequantized when looked up).
        let file_len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        let dense_tables = ["token_embd.weight", "output.weight"]
            .iter()
            .filter(|name| file.stores_unquantized(name))
            .count();
        u128::from(file_len) + (dense_tables * config.vocab_size * config.d_model * 4) as u128
    } else {
        validate::estimate_bytes(&expected, dtype.size_in_bytes())
    };
    validate::check_memory(needed, 0, path)?;
    file.read_rope_freq_factors(&mut config)?;
    let adapter = with.map(|w| w.load(&config)).transpose()?;
    // A tokenizer.json beside the file wins: it covers tokenizers GGUF cannot describe.
    let sidecar = path.with_file_name("tokenizer.json");
    let meta = file.tokenizer_meta();
    let mut tokenizer = if sidecar.exists() {
        let name = |id: Option<u32>| id.and_then(|i| meta.tokens.get(i as usize).cloned());
        Tokenizer::from_file(&sidecar, name(meta.bos_id), name(meta.eos_id), meta.add_bos)?
    } else {
        Tokenizer::from_gguf(&meta, file.architecture.name(), path)?
    };
    tokenizer.add_stop_ids(&meta.turn_end_ids);
    let template = file.chat_template().map(|src| {
        ChatTemplate::new(
            &src,
            &format!("{} (tokenizer.chat_template)", path.display()),
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )
    });
    let cfg = config.clone();
    let transformer = if quantized {
        // Both sources read the one file in turn; the RefCell hands it to each.
        let file = std::cell::RefCell::new(file);
        Transformer::with_quantized(
            config,
            &mut |name| file.borrow_mut().weight(name, &cfg),
            Some(&mut |name| file.borrow_mut().qweight(name, &cfg)),
            dtype,
        )?
    } else {
        build_transformer(config, &mut |name| file.weight(name, &cfg), dtype, &adapter)?
    };
    Ok((
        (transformer, tokenizer, template, adapter.map(|a| a.record)),
        weight_dtype,
    ))
}

/// An HF directory's `config.json` and memory-mapped safetensors, opened the
/// one way every loader (inference and `organism train`) reads them.
pub(crate) struct HfDir {
    pub config: ModelConfig,
    /// Tensor name (as the forward pass names it) → shape, for checks before
    /// any data is read.
    pub shapes: HashMap<String, Vec<usize>>,
    /// Forward-pass name → the name in the files, where they differ (the
    /// language model of a multimodal checkpoint).
    stored_as: HashMap<String, String>,
    /// Bytes of the mapped files.
    pub mapped: u64,
    weights: MmapedSafetensors,
    dir: PathBuf,
}

impl HfDir {
    /// Reads the config and maps the weights. A config that says
    /// `tie_word_embeddings` while the files carry their own `lm_head.weight`
    /// gets the file's head, as transformers 5 loads it, with a notice.
    pub fn open(dir: &Path) -> Result<HfDir> {
        let mut config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
        let files = safetensors_files(dir)?;
        for f in &files {
            crate::io::regular_file(f)?;
        }
        // Safety: the files are memory-mapped read-only; afprobe never writes them.
        let weights = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            Error::model_file(dir, format!("cannot map the safetensors files: {e}"))
        })?;
        let mut shapes = HashMap::new();
        let mut stored_as = HashMap::new();
        for (stored, view) in weights.tensors() {
            let name = language_model_name(&stored);
            if name != stored {
                stored_as.insert(name.clone(), stored);
            }
            shapes.insert(name, view.shape().to_vec());
        }
        if config.tied_embeddings && shapes.contains_key("lm_head.weight") {
            eprintln!(
                "afprobe: {} says the embeddings are tied, but the weights carry their own \
                 `lm_head.weight`: that head is used, as transformers does",
                dir.join("config.json").display()
            );
            config.tied_embeddings = false;
        }
        let mapped = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        Ok(HfDir {
            config,
            shapes,
            stored_as,
            mapped,
            weights,
            dir: dir.to_path_buf(),
        })
    }

    /// The tensor `name` as stored, checked finite; `None` when the files lack it.
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.shapes.contains_key(name) {
            return Ok(None);
        }
        let stored = self.stored_as.get(name).map_or(name, String::as_str);
        let t = self
            .weights
            .load(stored, &Device::Cpu)
            .map_err(|e| Error::model_file(&self.dir, format!("tensor `{name}`: {e}")))?;
        validate::check_finite(&t, name, &self.dir)?;
        Ok(Some(t))
    }
}

/// A multimodal checkpoint's language-model tensor under the name a text
/// model gives it: `language_model.model.X` (Gemma 3 as published) and
/// `model.language_model.X` (as transformers 5 writes it) are `model.X`;
/// `language_model.lm_head.X` is `lm_head.X`. Other names are unchanged.
fn language_model_name(stored: &str) -> String {
    for (prefix, to) in [
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ] {
        if let Some(rest) = stored.strip_prefix(prefix) {
            return format!("{to}{rest}");
        }
    }
    stored.to_string()
}

fn load_hf_dir(dir: &Path, dtype: DType, with: Option<AdapterCheck>) -> Result<Loaded> {
    let hf = HfDir::open(dir)?;
    let (config, shapes) = (hf.config.clone(), &hf.shapes);
    // Shapes and memory are checked before any tensor data is read.
    let expected = validate::check_weights(
        &config,
        shapes.len(),
        &dir.join("config.json"),
        "num_hidden_layers",
        |name| {
            shapes
                .get_key_value(name)
                .map(|(n, s)| (n.clone(), s.as_slice()))
        },
    )?;
    validate::check_memory(
        validate::estimate_bytes(&expected, dtype.size_in_bytes()),
        hf.mapped,
        dir,
    )?;
    let adapter = with.map(|w| w.load(&config)).transpose()?;

    let tok_config_path = dir.join("tokenizer_config.json");
    let tok_config = read_tokenizer_config(&tok_config_path)?;
    let special = |name: &str| -> Option<String> {
        match tok_config.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let (bos, eos) = (special("bos_token"), special("eos_token"));
    let add_bos = tok_config
        .get("add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::model_file(
            dir,
            "no tokenizer.json in the model directory; copy the model's tokenizer.json there",
        ));
    }
    let mut tokenizer = Tokenizer::from_file(&tok_path, bos.clone(), eos.clone(), add_bos)?;
    tokenizer.add_stop_ids(&generation_stop_ids(dir)?);
    // A template that does not parse is reported when a chat prompt is rendered,
    // so raw prompts and `model info` still work.
    let jinja_path = dir.join("chat_template.jinja");
    let template = match crate::io::read_to_string_if_exists(&jinja_path)? {
        Some(bytes) => Some(ChatTemplate::new(
            &bytes,
            &jinja_path.display().to_string(),
            bos.as_deref(),
            eos.as_deref(),
        )),
        None => {
            let origin = |what: &str| format!("{} ({what})", tok_config_path.display());
            match tok_config.get("chat_template") {
                Some(Value::String(s)) => Some(ChatTemplate::new(
                    s,
                    &origin("chat_template"),
                    bos.as_deref(),
                    eos.as_deref(),
                )),
                // A list of named templates: use the one called "default".
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(|src| {
                        ChatTemplate::new(
                            src,
                            &origin("chat_template, \"default\""),
                            bos.as_deref(),
                            eos.as_deref(),
                        )
                    }),
                _ => None,
            }
        }
    };

    let transformer = build_transformer(config, &mut |name| hf.tensor(name), dtype, &adapter)?;
    Ok((transformer, tokenizer, template, adapter.map(|a| a.record)))
}

/// The ids transformers' `generate` stops at: `eos_token_id` (a number or a
/// list) of `generation_config.json`, else of `config.json` (as
/// `GenerationConfig.from_model_config` takes it).
fn generation_stop_ids(dir: &Path) -> Result<Vec<u32>> {
    let generation = dir.join("generation_config.json");
    let path = if generation.exists() {
        generation
    } else {
        dir.join("config.json")
    };
    let json: Value = serde_json::from_str(&crate::io::read_to_string(&path)?)
        .map_err(|e| Error::model_file(&path, format!("not valid JSON: {e}")))?;
    let as_id = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    let bad = |v: &Value| {
        Error::model_file(
            &path,
            format!("`eos_token_id` is {v}; it must be a token id or a list of them"),
        )
    };
    match json.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| as_id(v).ok_or_else(|| bad(v)))
            .collect(),
        Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(|| bad(v)),
    }
}

fn read_tokenizer_config(path: &Path) -> Result<serde_json::Map<String, Value>> {
    match crate::io::read_to_string_if_exists(path)? {
        Some(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(Error::model_file(path, "expected a JSON object")),
            Err(e) => Err(Error::model_file(path, format!("not valid JSON: {e}"))),
        },
        None => Ok(Default::default()),
    }
}

/// The safetensors files of an HF directory: those the index names, else all `*.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let text = crate::io::read_to_string(&index)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::model_file(&index, "no `weight_map` object"))?;
        let names: HashSet<&str> = map.values().filter_map(Value::as_str).collect();
        // A shard must be a file of this directory: a path elsewhere is refused.
        if let Some(bad) = names.iter().find(|n| {
            let p = Path::new(n);
            p.components().count() != 1
                || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        }) {
            return Err(Error::model_file(
                &index,
                format!(
                    "`weight_map` names the file `{bad}`, which is not a file name inside the \
                     model directory"
                ),
            ));
        }
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(Error::model_file(
            dir,
            "no *.safetensors weight files in the model directory",
        ));
    }
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(Error::model_file(
            missing,
            "listed in model.safetensors.index.json but missing",
        ));
    }
    Ok(files)
}
