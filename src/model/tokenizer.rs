//! Tokenizers: HF `tokenizer.json`, or one rebuilt from GGUF metadata.
//!
//! The GGUF route writes the equivalent `tokenizer.json` in memory and hands it
//! to the `tokenizers` crate, choosing the pre-tokenizer from
//! `tokenizer.ggml.pre` the way llama.cpp does. SmolLM2 (`pre = smollm`) splits
//! every digit on its own before the byte-level split; candle's GGUF tokenizer
//! and transformers' GGUF conversion both miss that. That route lives in
//! `tokenizer/gguf_vocab.rs`, llama.cpp's pre-tokenizer table in
//! `tokenizer/pretokenizers.rs`.
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

mod gguf_vocab;
mod pretokenizers;

pub use gguf_vocab::GgufTokenizerMeta;
pub use pretokenizers::llamacpp_adds_bos;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

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
