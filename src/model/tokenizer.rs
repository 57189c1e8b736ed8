//! Tokenizers: HF `tokenizer.json`, or one rebuilt from GGUF metadata.
//!
//! The GGUF route writes the equivalent `tokenizer.json` in memory and hands it
//! to the `tokenizers` crate, choosing the pre-tokenizer from
//! `tokenizer.ggml.pre` the way llama.cpp does. SmolLM2 (`pre = smollm`) splits
//! every digit on its own before the byte-level split; candle's GGUF tokenizer
//! and transformers' GGUF conversion both miss that.
//!
//! **The panic boundary.** `tokenizers` panics on some malformed files (a
//! truncated decoder, a bad precompiled charsmap, a Replace normalizer with an
//! empty pattern) instead of returning an error. afprobe validates what it can
//! first ([`check_tokenizer_json`]); every remaining call into `tokenizers`
//! goes through [`contained`], the one place that catches a panic
//! (`std::panic::catch_unwind`) and turns it into an error naming the
//! tokenizer's file. While inside it, the default panic message is silenced
//! on that thread: a process-wide panic hook is installed once that defers to
//! the previous hook everywhere else (panics on other threads, or outside the
//! boundary, print as before).

use std::cell::Cell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Token types in `tokenizer.ggml.token_type` that are matched as whole special tokens.
const GGUF_CONTROL: i64 = 3;
const GGUF_USER_DEFINED: i64 = 4;

/// Llama 3's split (`tokenizer.json` of Meta-Llama-3-8B), which llama.cpp
/// quotes as the "original regex from tokenizer.json" for
/// `LLAMA_VOCAB_PRE_TYPE_LLAMA3` in `src/llama-vocab.cpp`. llama.cpp runs an
/// adapted spelling (`'[sS]|'[tT]|...` for `(?i:'s|'t|...)`) because its
/// `std::regex` has no inline flags; `tokenizers`' fancy-regex has them, and
/// the original is what transformers runs and what llama.cpp's expected ids
/// (`models/ggml-vocab-llama-bpe.gguf.out`) were made with.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits (`LLAMA_VOCAB_PRE_TYPE_QWEN2`'s
/// original regex in llama.cpp's `src/llama-vocab.cpp`, adapted there as
/// [`LLAMA3_SPLIT`] is).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split (o200k; `LLAMA_VOCAB_PRE_TYPE_GPT4O`'s original regex in
/// llama.cpp's `src/llama-vocab.cpp`, from Xenova/gpt-4o's `tokenizer.json`):
/// words split where lower case turns to upper, contractions kept on the
/// word, digits in threes, `/` and line breaks kept after punctuation.
/// llama.cpp's regex engine lacks the case classes and runs an adapted
/// spelling (`((?=[\p{L}])([^a-z]))` for `[\p{Lu}...]`); afprobe runs the
/// original, as transformers does, and gives llama.cpp's ids on its test texts.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split (Mistral Nemo's `tokenizer.json`;
/// `LLAMA_VOCAB_PRE_TYPE_TEKKEN`'s original regex in llama.cpp's
/// `src/llama-vocab.cpp`): [`GPT4O_SPLIT`] without contractions and with single
/// digits, adapted in llama.cpp as GPT-4o's is.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's splits, applied in turn (`LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM`
/// in llama.cpp's `src/llama-vocab.cpp`, as deepseek-llm-7b-base's
/// `tokenizer.json` lists them): line breaks alone; runs of cased letters
/// (Latin, Greek, Cyrillic, ...) with one leading blank; runs of ASCII and
/// full-width punctuation; trailing blanks; CJK and Hangul runs; digit runs.
/// Every non-ASCII character is written as a `\x{..}` escape, so that no
/// Unicode normalization of this file can change the classes: they hold
/// canonical singletons (U+1F7D, U+212A KELVIN SIGN, ...) that NFC rewrites.
const DEEPSEEK_LLM_SPLITS: [&str; 6] = [
    r"[\r\n]",
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
    r"\s+$",
    r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
    r"\p{N}+",
];

/// How llama.cpp pre-tokenizes a byte-level BPE vocabulary: the
/// `LLAMA_VOCAB_PRE_TYPE_*` that `llama_vocab::impl::load` (llama.cpp's
/// `src/llama-vocab.cpp`) gives a `tokenizer.ggml.pre`, with the regexes and
/// flags it sets for it, for the pre-tokenizers the supported families' GGUFs
/// carry. Checked against llama.cpp's tokenizer test vocabularies in
/// tests/llamacpp_vocab.rs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreType {
    /// Llama 3 (`llama-bpe`, `llama3`, `llama-v3`) and Pixtral: [`LLAMA3_SPLIT`].
    Llama3,
    /// DBRX's cl100k vocabulary (`dbrx`, the name llama.cpp's converter gives
    /// any vocabulary that tokenizes its check text as DBRX's does) and Smaug:
    /// Llama 3's split without its whole-word lookup or BOS.
    Dbrx,
    /// Qwen 1.5 to Qwen 3 and DeepSeek-R1's Qwen distills: [`QWEN2_SPLIT`].
    Qwen2,
    /// SmolLM and the StarCoder-derived vocabularies: each digit alone, then
    /// GPT-2's split.
    Smollm,
    /// GPT-2, OLMo and MPT: GPT-2's split.
    Gpt2,
    /// DeepSeek LLM: [`DEEPSEEK_LLM_SPLITS`].
    DeepseekLlm,
    /// GPT-4o's o200k vocabulary (Phi-4-mini): [`GPT4O_SPLIT`].
    Gpt4o,
    /// Mistral's Tekken (Mistral Nemo, Mistral Small 3): [`TEKKEN_SPLIT`].
    Tekken,
}

/// The `tokenizer.ggml.pre` values afprobe rebuilds, for error messages.
const SUPPORTED_PRE: &str = "llama-bpe, llama3, llama-v3, pixtral, dbrx, smaug-bpe, qwen2, \
    deepseek-r1-qwen, smollm, starcoder, refact, codeshell, gpt-2, olmo, mpt, deepseek-llm, \
    gpt-4o, tekken, default";

impl PreType {
    /// The type llama.cpp gives `pre`. `default`, a missing value and `gpt2`
    /// (not a llama.cpp name) get GPT-2's split, which transformers runs for
    /// every byte-level GGUF; llama.cpp instead falls back to its `DEFAULT`
    /// regexes there, warning that generation quality will be degraded.
    fn of(pre: &str) -> Option<PreType> {
        Some(match pre {
            "llama-bpe" | "llama3" | "llama-v3" | "pixtral" => PreType::Llama3,
            "dbrx" | "smaug-bpe" => PreType::Dbrx,
            "qwen2" | "deepseek-r1-qwen" => PreType::Qwen2,
            "smollm" | "starcoder" | "refact" | "codeshell" => PreType::Smollm,
            "gpt-2" | "olmo" | "mpt" | "default" | "gpt2" | "" => PreType::Gpt2,
            "deepseek-llm" => PreType::DeepseekLlm,
            "gpt-4o" => PreType::Gpt4o,
            "tekken" => PreType::Tekken,
            _ => return None,
        })
    }

    /// The `tokenizers` pre-tokenizer: llama.cpp's regexes as `Split` steps,
    /// each splitting the pieces the one before left (as llama.cpp's
    /// `unicode_regex_split` runs a list), then the byte-level mapping.
    fn pre_tokenizer(self) -> Value {
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                   "use_regex": use_regex})
        };
        let splits = |patterns: &[&str]| {
            let mut steps: Vec<Value> = patterns
                .iter()
                .map(|p| {
                    json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated",
                           "invert": false})
                })
                .collect();
            steps.push(byte_level(false));
            json!({"type": "Sequence", "pretokenizers": steps})
        };
        match self {
            PreType::Llama3 | PreType::Dbrx => splits(&[LLAMA3_SPLIT]),
            PreType::Qwen2 => splits(&[QWEN2_SPLIT]),
            PreType::Gpt4o => splits(&[GPT4O_SPLIT]),
            PreType::Tekken => splits(&[TEKKEN_SPLIT]),
            PreType::DeepseekLlm => splits(&DEEPSEEK_LLM_SPLITS),
            // llama.cpp's `\p{N}`, then GPT-2's regex, which is ByteLevel's own.
            PreType::Smollm => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            PreType::Gpt2 => byte_level(true),
        }
    }

    /// llama.cpp's `ignore_merges`: a pre-token that is itself in the
    /// vocabulary becomes that token without merging (`tokenizers`' BPE
    /// `ignore_merges`, which Llama 3's `tokenizer.json` sets too).
    fn ignore_merges(self) -> bool {
        matches!(self, PreType::Llama3 | PreType::Tekken)
    }

    /// Whether llama.cpp adds BOS when the file has no
    /// `tokenizer.ggml.add_bos_token` (see [`llamacpp_adds_bos`]).
    fn adds_bos(self) -> bool {
        matches!(self, PreType::Llama3 | PreType::Tekken)
    }
}

/// Whether llama.cpp prepends BOS to a vocabulary whose GGUF has no
/// `tokenizer.ggml.add_bos_token` (`llama_vocab::impl::load` in llama.cpp's
/// `src/llama-vocab.cpp`): SentencePiece (`llama`) vocabularies get one, and
/// of the byte-level (`gpt2`) ones those with the Llama 3 or Tekken
/// pre-tokenizer. transformers' GGUF reader agrees for SentencePiece but adds
/// none to a byte-level vocabulary without the flag
/// (`integrations/gguf/gguf_tokenizer_mapping.py`); [`Tokenizer::from_gguf`]
/// says so where the two part. The flag, when present, wins in both.
pub fn llamacpp_adds_bos(model: &str, pre: &str) -> bool {
    match model {
        "llama" => true,
        "gpt2" => PreType::of(pre).is_some_and(PreType::adds_bos),
        _ => false,
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
    const BLANK: &str = "\u{2581}";
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
    let merges: Vec<Value> = if meta.merges.is_empty() {
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
        generate_merges(&vocab, &scored)
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect()
    } else {
        meta.merges.iter().map(|m| json!(m)).collect()
    };
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
    /// Whether a BOS token is prepended to the text (see [`Tokenizer::encode`]).
    pub add_bos: bool,
    /// The BOS id to prepend, if any.
    bos_id: Option<u32>,
    /// The tokenizer's file, for error messages.
    origin: String,
    /// The model's vocabulary size (rows of its embedding): every id encoding
    /// gives must be below it. Set by [`Tokenizer::limit_ids`] when a model loads.
    vocab_limit: Option<usize>,
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
    /// (they live in `tokenizer_config.json`). The file is checked first
    /// ([`check_tokenizer_json`]); `tokenizers` runs inside the panic boundary.
    pub fn from_file(
        path: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
    ) -> Result<Tokenizer> {
        let text = crate::io::read_to_string(path)?;
        check_tokenizer_json(&text, path)?;
        let origin = path.display().to_string();
        let inner = contained(&origin, "reading it", || {
            text.parse::<tokenizers::Tokenizer>()
        })?
        .map_err(|e| Error::model_file(path, format!("cannot read tokenizer: {e}")))?;
        Tokenizer::with_specials(inner, bos_token, eos_token, add_bos, origin)
    }

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

    fn with_specials(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
        origin: String,
    ) -> Result<Tokenizer> {
        let mut stop_ids: Vec<u32> = TURN_END_TOKENS
            .into_iter()
            .chain(eos_token.as_deref())
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        // The BOS the post-processor adds when transformers tokenizes raw text
        // (`add_special_tokens=True`), found by encoding a probe with and without it.
        let post_bos = contained(&origin, "probing its post-processor", || {
            let plain = inner.encode("a", false).ok()?;
            let full = inner.encode("a", true).ok()?;
            let (plain, full) = (plain.get_ids(), full.get_ids());
            match full.split_first() {
                Some((&first, rest)) if rest.starts_with(plain) => Some(first),
                _ => None,
            }
        })?;
        let config_bos = bos_token
            .as_deref()
            .and_then(|b| inner.token_to_id(b))
            .filter(|_| add_bos);
        let bos_id = post_bos.or(config_bos);
        let bos_token = bos_token.or_else(|| post_bos.and_then(|id| inner.id_to_token(id)));
        Ok(Tokenizer {
            inner,
            stop_ids,
            bos_token,
            eos_token,
            add_bos: bos_id.is_some(),
            bos_id,
            origin,
            vocab_limit: None,
        })
    }

    /// Adds ids that end generation (`generation_config.json`'s
    /// `eos_token_id`, a GGUF file's end-of-turn keys).
    pub fn add_stop_ids(&mut self, ids: &[u32]) {
        self.stop_ids.extend_from_slice(ids);
        self.stop_ids.sort_unstable();
        self.stop_ids.dedup();
    }

    /// Makes encoding refuse ids at or above `vocab_size` (the model's
    /// embedding rows): such an id would fail deep inside the forward pass.
    pub fn limit_ids(&mut self, vocab_size: usize) {
        self.vocab_limit = Some(vocab_size);
    }

    /// Errors naming the tokenizer and the id if any of `ids` is outside the
    /// model's vocabulary (see [`Tokenizer::limit_ids`]).
    fn check_ids(&self, ids: &[u32], text: &str) -> Result<()> {
        let Some(n) = self.vocab_limit else {
            return Ok(());
        };
        match ids.iter().position(|&id| id as usize >= n) {
            None => Ok(()),
            Some(i) => {
                let shown: String = text.chars().take(40).collect();
                Err(Error::Tokenizer(format!(
                    "{}: encoding {shown:?}{} gives token id {} (token {i} of {}), outside the \
                     model's vocabulary of {n} ids: the tokenizer (its added tokens, BOS or \
                     post-processor) does not match the model; use the model's own tokenizer",
                    self.origin,
                    if text.chars().count() > 40 { "…" } else { "" },
                    ids[i],
                    ids.len()
                )))
            }
        }
    }

    /// Token ids of `text`; special tokens written in the text become single ids.
    ///
    /// The BOS rule: raw text gets the BOS that transformers' tokenizer adds to
    /// it, i.e. the one `tokenizer.json`'s post-processor prepends with
    /// `add_special_tokens=True` (Llama 3's `<|begin_of_text|>`), or the
    /// `bos_token` when `tokenizer_config.json` (or GGUF metadata) sets
    /// `add_bos_token`. A text that already starts with that BOS (a chat
    /// template writing `{{ bos_token }}`) gets no second one. Tokens a
    /// post-processor would append (an EOS) are not added: a prompt does not end.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Token ids of `text` with no BOS handling (e.g. a continuation).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = contained(&self.origin, "encoding text", || {
            self.inner.encode(text, false)
        })?
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.origin)))?;
        let ids = enc.get_ids().to_vec();
        self.check_ids(&ids, text)?;
        Ok(ids)
    }

    /// Token ids with the byte range of each token in `text`, the BOS applied
    /// as [`Tokenizer::encode`] does (a prepended BOS covers no bytes: `(0, 0)`).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteOffsets)> {
        let enc = contained(&self.origin, "encoding text", || {
            self.inner.encode(text, false)
        })?
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.origin)))?;
        let (mut ids, mut offsets) = (enc.get_ids().to_vec(), enc.get_offsets().to_vec());
        if let Some(bos) = self.bos_id {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
                offsets.insert(0, (0, 0));
            }
        }
        self.check_ids(&ids, text)?;
        Ok((ids, offsets))
    }

    /// Text of `ids`, special tokens included (so a transcript shows the template).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        contained(&self.origin, "decoding tokens", || {
            self.inner.decode(ids, false)
        })?
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.origin)))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (`None` outside the vocabulary).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Token texts that end a turn wherever a vocabulary has them: llama.cpp's
/// end-of-generation list (`llama-vocab.cpp`, `special_eog_ids`), which also
/// covers the turn ends transformers' instruct models list in
/// `generation_config.json`.
pub const TURN_END_TOKENS: [&str; 12] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

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
    /// ([`llamacpp_adds_bos`]).
    pub add_bos: bool,
}

thread_local! {
    /// Set while this thread is inside [`contained`]: the panic hook stays quiet.
    static IN_BOUNDARY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, a call into `tokenizers`, turning a panic into an error that names
/// the tokenizer file `origin` and what was being done. This is the one
/// boundary where afprobe catches a dependency's panic (see the module docs).
pub fn contained<T>(origin: &str, doing: &str, f: impl FnOnce() -> T) -> Result<T> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_BOUNDARY.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = IN_BOUNDARY.with(|b| b.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_BOUNDARY.with(|b| b.set(was));
    result.map_err(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Error::model_file(
            origin,
            format!(
                "the tokenizers library failed while {doing} ({why}); the tokenizer file is \
                 malformed: replace it with the model's original tokenizer.json"
            ),
        )
    })
}

/// The parts of a `tokenizer.json` that are checked before `tokenizers` sees it
/// (the vocabulary and merges are only checked for JSON syntax).
#[derive(Deserialize)]
struct TokenizerJsonHead {
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    decoder: Option<Value>,
}

/// Checks what `tokenizers` would panic on rather than reject: the file must be
/// valid JSON (a truncated file panics inside its decoder deserializer), and no
/// Replace/Split step may have an empty pattern (it panics while encoding).
/// Errors name the file and the component.
pub fn check_tokenizer_json(text: &str, path: &Path) -> Result<()> {
    let head: TokenizerJsonHead = serde_json::from_str(text)
        .map_err(|e| Error::model_file(path, format!("not a valid tokenizer.json: {e}")))?;
    for (key, list_key, value) in [
        ("normalizer", "normalizers", &head.normalizer),
        ("pre_tokenizer", "pretokenizers", &head.pre_tokenizer),
        ("decoder", "decoders", &head.decoder),
    ] {
        if let Some(v) = value {
            check_component(v, key, list_key, path, 0)?;
        }
    }
    Ok(())
}

fn check_component(v: &Value, at: &str, list_key: &str, path: &Path, depth: usize) -> Result<()> {
    if depth > 32 {
        return Err(Error::model_file(
            path,
            format!("`{at}` nests Sequences more than 32 deep"),
        ));
    }
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    if kind == "Sequence" {
        if let Some(items) = v.get(list_key).and_then(Value::as_array) {
            for (i, item) in items.iter().enumerate() {
                check_component(
                    item,
                    &format!("{at}.{list_key}[{i}]"),
                    list_key,
                    path,
                    depth + 1,
                )?;
            }
        }
        return Ok(());
    }
    if matches!(kind, "Replace" | "Split") {
        let pattern = v.get("pattern");
        let empty = pattern
            .and_then(|p| p.get("String").or_else(|| p.get("Regex")))
            .and_then(Value::as_str)
            .is_some_and(str::is_empty);
        if empty {
            return Err(Error::model_file(
                path,
                format!(
                    "`{at}` is a {kind} with an empty pattern, which matches nowhere and \
                     everywhere; the tokenizer file is malformed"
                ),
            ));
        }
    }
    Ok(())
}
