//! llama.cpp's pre-tokenizers for byte-level BPE vocabularies: the split
//! regexes and the `tokenizer.ggml.pre` names that select them, as
//! `tokenizers` pre-tokenizer specs, and llama.cpp's BOS rule.

use serde_json::{json, Value};

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
pub(super) enum PreType {
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
pub(super) const SUPPORTED_PRE: &str =
    "llama-bpe, llama3, llama-v3, pixtral, dbrx, smaug-bpe, qwen2, \
    deepseek-r1-qwen, smollm, starcoder, refact, codeshell, gpt-2, olmo, mpt, deepseek-llm, \
    gpt-4o, tekken, default";

impl PreType {
    /// The type llama.cpp gives `pre`. `default`, a missing value and `gpt2`
    /// (not a llama.cpp name) get GPT-2's split, which transformers runs for
    /// every byte-level GGUF; llama.cpp instead falls back to its `DEFAULT`
    /// regexes there, warning that generation quality will be degraded.
    pub(super) fn of(pre: &str) -> Option<PreType> {
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
    pub(super) fn pre_tokenizer(self) -> Value {
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
    pub(super) fn ignore_merges(self) -> bool {
        matches!(self, PreType::Llama3 | PreType::Tekken)
    }

    /// Whether llama.cpp adds BOS when the file has no
    /// `tokenizer.ggml.add_bos_token` (see [`llamacpp_adds_bos`]).
    pub(super) fn adds_bos(self) -> bool {
        matches!(self, PreType::Llama3 | PreType::Tekken)
    }
}

/// Whether llama.cpp prepends BOS to a vocabulary whose GGUF has no
/// `tokenizer.ggml.add_bos_token` (`llama_vocab::impl::load` in llama.cpp's
/// `src/llama-vocab.cpp`): SentencePiece (`llama`) vocabularies get one, and
/// of the byte-level (`gpt2`) ones those with the Llama 3 or Tekken
/// pre-tokenizer. transformers' GGUF reader agrees for SentencePiece but adds
/// none to a byte-level vocabulary without the flag
/// (`integrations/gguf/gguf_tokenizer_mapping.py`);
/// [`Tokenizer::from_gguf`](super::Tokenizer::from_gguf) says so where the two
/// part. The flag, when present, wins in both.
pub fn llamacpp_adds_bos(model: &str, pre: &str) -> bool {
    match model {
        "llama" => true,
        "gpt2" => PreType::of(pre).is_some_and(PreType::adds_bos),
        _ => false,
    }
}
