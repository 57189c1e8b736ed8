//! Tokenizers rebuilt from a GGUF file's vocabulary (`tokenizer.ggml.*`): the
//! `tokenizer.json` equivalent is written in memory and handed to `tokenizers`
//! through the panic boundary ([`contained`]).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use super::pretokenizers::{PreType, SUPPORTED_PRE};
use super::{contained, Tokenizer};
use crate::error::{Error, Result};

/// SentencePiece's blank, `▁`.
const BLANK: &str = "\u{2581}";

/// Token types in `tokenizer.ggml.token_type` that are matched as whole special tokens.
const GGUF_CONTROL: i64 = 3;
const GGUF_USER_DEFINED: i64 = 4;

/// The tokenizer fields of a GGUF file's metadata.
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizerMeta {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores; may be empty).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix`, when the file says.
    pub add_space_prefix: Option<bool>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` and `eom_token_id`: more ids that end
    /// generation, as llama.cpp reads them.
    pub turn_end_ids: Vec<u32>,
    /// `tokenizer.ggml.add_bos_token`, when the file says.
    pub add_bos_token: Option<bool>,
    /// Whether BOS is prepended: the flag, or without it llama.cpp's rule
    /// ([`llamacpp_adds_bos`](super::llamacpp_adds_bos)).
    pub add_bos: bool,
}

impl Tokenizer {
    /// Rebuilds the tokenizer stored in GGUF metadata: byte-level BPE (`gpt2`)
    /// split as llama.cpp splits for the file's `tokenizer.ggml.pre` (see
    /// [`PreType`]), or SentencePiece (`llama`: Llama 2, Mistral, Gemma,
    /// Phi-3) the way transformers' GGUF converter builds it (see
    /// [`sentencepiece`]). `architecture` is the file's `general.architecture`.
    pub fn from_gguf(
        meta: &GgufTokenizerMeta,
        architecture: &str,
        source: &Path,
    ) -> Result<Tokenizer> {
        let err = |m: String| Error::model_file(source, m);
        if meta.token_types.len() != meta.tokens.len() && !meta.token_types.is_empty() {
            return Err(err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                meta.token_types.len(),
                meta.tokens.len()
            )));
        }
        if meta.model == "llama" {
            return sentencepiece(meta, architecture, source);
        }
        if meta.model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model `{}` is not supported for `{architecture}` (byte-level BPE \
                 `gpt2` and SentencePiece `llama` are); put the model's tokenizer.json next to \
                 the .gguf file and afprobe will use it",
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
        let Some(pre) = PreType::of(&meta.pre) else {
            return Err(err(format!(
                "GGUF pre-tokenizer `{}` is not supported (supported: {SUPPORTED_PRE}); put the \
                 model's tokenizer.json next to the .gguf file and afprobe will use it",
                meta.pre
            )));
        };
        if meta.add_bos_token.is_none() && pre.adds_bos() {
            eprintln!(
                "afprobe: {}: tokenizer.ggml.add_bos_token is absent; adding BOS as llama.cpp does \
                 for pre-tokenizer `{}` (transformers' GGUF reader adds none)",
                source.display(),
                meta.pre
            );
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre.pre_tokenizer(),
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": pre.ignore_merges(),
                      "vocab": vocab, "merges": merges},
        });
        Tokenizer::from_gguf_spec(&spec, meta, source)
    }

    /// Wraps a built tokenizer with the GGUF file's special tokens.
    fn from_gguf_spec(spec: &Value, meta: &GgufTokenizerMeta, source: &Path) -> Result<Tokenizer> {
        let origin = format!("{} (tokenizer metadata)", source.display());
        let inner: tokenizers::Tokenizer =
            contained(&origin, "building it", || spec.to_string().parse())?.map_err(|e| {
                Error::model_file(
                    source,
                    format!("cannot build the tokenizer from GGUF metadata: {e}"),
                )
            })?;
        let name = |id: Option<u32>| id.and_then(|i| meta.tokens.get(i as usize).cloned());
        Tokenizer::with_specials(
            inner,
            name(meta.bos_id),
            name(meta.eos_id),
            meta.add_bos,
            origin,
        )
    }
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`) from GGUF
/// metadata, built as transformers' GGUF converter builds it
/// (`integrations/gguf/gguf_tokenizer_mapping.py`): a BPE with byte fallback
/// over the file's pieces, merges from the file or, as SentencePiece files
/// carry none, rebuilt from the vocabulary ([`generate_merges`]); control
/// tokens special, user-defined ones added whole. The families differ in
/// data only:
///
/// - Llama 2, Mistral and other `llama`-vocabulary files (`LlamaTokenizer`):
///   a `Metaspace` pre-tokenizer that writes blanks as `▁` and prepends one
///   `▁` unless the text already starts with a blank (`prepend_scheme =
///   first`; none when `tokenizer.ggml.add_space_prefix` is false). Merges
///   are ranked by the pieces' scores. SentencePiece itself always prepends,
///   so a text starting with a space differs from `spm.encode` by one `▁`;
///   afprobe follows transformers.
/// - Phi-3: the prefix comes from a normalizer (`Prepend("▁")`, `Replace(" ",
///   "▁")`) with no pre-tokenizer, so a leading blank gains one more `▁`.
/// - Gemma (`GemmaTokenizer`): no prefix; a `' ' → '▁'` normalizer and a split
///   after each blank; tokens of two or more blanks are respelled with `▁`;
///   merges are ranked by the tokens' order in the file (Gemma's scores do not
///   follow its merge order).
fn sentencepiece(meta: &GgufTokenizerMeta, architecture: &str, source: &Path) -> Result<Tokenizer> {
    let gemma = architecture.starts_with("gemma");
    let tokens: Vec<String> = if gemma {
        meta.tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    BLANK.repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect()
    } else {
        meta.tokens.clone()
    };
    if !gemma && meta.merges.is_empty() && meta.scores.len() != tokens.len() {
        return Err(Error::model_file(
            source,
            format!(
                "tokenizer.ggml.scores has {} entries for {} tokens; a SentencePiece \
                 vocabulary without merges needs one score per token to rank its merges",
                meta.scores.len(),
                tokens.len()
            ),
        ));
    }
    // Python dict semantics: a repeated token keeps its last index.
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.as_str(), i);
    }
    let merges = sentencepiece_merges(meta, &tokens, &vocab, gemma);
    let vocab_json: serde_json::Map<String, Value> = vocab
        .iter()
        .map(|(t, i)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let special = match meta.token_types.get(i) {
                Some(&GGUF_CONTROL) => true,
                Some(&GGUF_USER_DEFINED) => false,
                _ => return None,
            };
            Some(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special}),
            )
        })
        .collect();
    let unk = meta
        .unk_id
        .and_then(|i| tokens.get(i as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let prefix = !gemma && meta.add_space_prefix != Some(false);
    let (normalizer, pre_tokenizer, decoders) = sentencepiece_steps(architecture, gemma, prefix);
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges},
    });
    Tokenizer::from_gguf_spec(&spec, meta, source)
}

/// The merges of a SentencePiece vocabulary: the file's, or rebuilt from the
/// pieces ranked by score (Gemma: by position).
fn sentencepiece_merges(
    meta: &GgufTokenizerMeta,
    tokens: &[String],
    vocab: &HashMap<&str, usize>,
    gemma: bool,
) -> Vec<Value> {
    if meta.merges.is_empty() {
        // Each token's score, in first-occurrence order with the last value
        // (`dict(zip(tokens, scores))`); Gemma ranks by position instead.
        let mut scored: Vec<(&str, f64)> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            let score = if gemma {
                -(vocab[t.as_str()] as f64)
            } else {
                f64::from(meta.scores[i])
            };
            match seen.get(t.as_str()) {
                Some(&at) => scored[at].1 = score,
                None => {
                    seen.insert(t, scored.len());
                    scored.push((t, score));
                }
            }
        }
        generate_merges(vocab, &scored)
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect()
    } else {
        meta.merges.iter().map(|m| json!(m)).collect()
    }
}

/// The normalizer, pre-tokenizer and decoders of a SentencePiece vocabulary
/// (see [`sentencepiece`]); `prefix`: a `▁` is prepended to the text.
fn sentencepiece_steps(
    architecture: &str,
    gemma: bool,
    prefix: bool,
) -> (Value, Value, Vec<Value>) {
    let (normalizer, pre_tokenizer) = if gemma {
        (
            json!({"type": "Replace", "pattern": {"String": " "}, "content": BLANK}),
            json!({"type": "Split", "pattern": {"String": " "},
                   "behavior": "MergedWithPrevious", "invert": false}),
        )
    } else if architecture == "phi3" {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": BLANK},
                {"type": "Replace", "pattern": {"String": " "}, "content": BLANK}]}),
            Value::Null,
        )
    } else {
        let scheme = if prefix { "first" } else { "never" };
        (
            Value::Null,
            json!({"type": "Metaspace", "replacement": BLANK, "prepend_scheme": scheme,
                   "split": false}),
        )
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": BLANK}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    (normalizer, pre_tokenizer, decoders)
}

/// BPE merges recovered from a vocabulary, as transformers'
/// `tokenization_utils_base.generate_merges(vocab, vocab_scores)`: every split
/// of each scored token into two vocabulary pieces (a token's splits ordered by
/// the pieces' ids), then a stable sort, best first, by (score, left piece's
/// length, right piece's length), lengths in characters.
fn generate_merges<'a>(
    vocab: &HashMap<&'a str, usize>,
    scored: &[(&'a str, f64)],
) -> Vec<(&'a str, &'a str)> {
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &(token, score) in scored {
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(cut, _)| token.split_at(cut))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|&(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |&(l, r, s): &(&str, &str, f64)| (s, l.chars().count(), r.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}
