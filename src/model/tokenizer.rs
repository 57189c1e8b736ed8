//! Tokenizers: HF `tokenizer.json`, or one rebuilt from GGUF metadata.
//!
//! The GGUF route writes the equivalent `tokenizer.json` in memory and hands it
//! to the `tokenizers` crate, choosing the pre-tokenizer from
//! `tokenizer.ggml.pre` the way llama.cpp does. SmolLM2 (`pre = smollm`) splits
//! every digit on its own before the byte-level split; candle's GGUF tokenizer
//! and transformers' GGUF conversion both miss that.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Token types in `tokenizer.ggml.token_type` that are matched as whole special tokens.
const GGUF_CONTROL: i64 = 3;
const GGUF_USER_DEFINED: i64 = 4;

/// The GPT-2 byte-level split regex (what `ByteLevel(use_regex=true)` uses).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `(start, end)` byte range of each token in the encoded text.
pub type ByteOffsets = Vec<(usize, usize)>;

/// A tokenizer plus the special tokens afprobe needs to know about.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Token ids that end generation (`<|im_end|>`, `<|eot_id|>`, the EOS token).
    pub stop_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether the model expects a BOS token prepended to raw text.
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Loads an HF `tokenizer.json`; special-token names come from the caller
    /// (they live in `tokenizer_config.json`).
    pub fn from_file(
        path: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
    ) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::model_file(path, format!("cannot read tokenizer: {e}")))?;
        Ok(Tokenizer::with_specials(
            inner, bos_token, eos_token, add_bos,
        ))
    }

    /// Rebuilds the tokenizer stored in GGUF metadata.
    pub fn from_gguf(meta: &GgufTokenizerMeta, source: &Path) -> Result<Tokenizer> {
        let err = |m: String| Error::model_file(source, m);
        if meta.model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model `{}` is not supported (only byte-level BPE, `gpt2`); put the \
                 model's tokenizer.json next to the .gguf file and afprobe will use it",
                meta.model
            )));
        }
        let vocab: serde_json::Map<String, Value> = meta
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<Value> = meta.merges.iter().map(|m| json!(m)).collect();
        let added: Vec<Value> = meta
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                matches!(meta.token_types.get(*i), Some(&t) if t == GGUF_CONTROL || t == GGUF_USER_DEFINED)
            })
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                   "use_regex": use_regex})
        };
        let split = |pattern: &str| {
            json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                   "invert": false})
        };
        let pre_tokenizer = match meta.pre.as_str() {
            "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence",
                "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            "qwen2" => json!({"type": "Sequence",
                "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            "default" | "gpt2" | "" => byte_level(true),
            other => {
                return Err(err(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (supported: smollm, llama-bpe, \
                     qwen2, gpt2); put the model's tokenizer.json next to the .gguf file"
                )))
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
            err(format!(
                "cannot build the tokenizer from GGUF metadata: {e}"
            ))
        })?;
        let name = |id: Option<u32>| id.and_then(|i| meta.tokens.get(i as usize).cloned());
        Ok(Tokenizer::with_specials(
            inner,
            name(meta.bos_id),
            name(meta.eos_id),
            meta.add_bos,
        ))
    }

    fn with_specials(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
    ) -> Tokenizer {
        let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"]
            .into_iter()
            .chain(eos_token.as_deref())
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Tokenizer {
            inner,
            stop_ids,
            bos_token,
            eos_token,
            add_bos,
        }
    }

    /// Token ids of `text`; special tokens written in the text become single ids.
    /// A BOS is prepended only if the model wants one and the text lacks it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_plain(text)?;
        if self.add_bos {
            if let Some(bos) = self
                .bos_token
                .as_deref()
                .and_then(|b| self.inner.token_to_id(b))
            {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Token ids of `text` with no BOS handling (e.g. a continuation).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids with the byte range of each token in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteOffsets)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens included (so a transcript shows the template).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The tokenizer fields of a GGUF file's metadata.
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizerMeta {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
}
