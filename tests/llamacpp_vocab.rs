//! llama.cpp's own tokenizer tests run on afprobe's GGUF tokenizers: the
//! vocabulary-only GGUFs of llama.cpp's `models/` folder, each with its texts
//! (`.inp`) and expected ids (`.out`, written by transformers' tokenizer of the
//! original model). Pre-tokenizers without such a file there (smollm, olmo,
//! dbrx, gpt-4o, tekken) run on a vocabulary that has one, against the ids
//! llama.cpp itself gives with the `tokenizer.ggml.pre` swapped. Fixtures and
//! their source: tests/fixtures/llamacpp_vocab/README.md.

mod common;

use std::path::Path;

use afprobe::model::gguf::read_tokenizer_meta;
use afprobe::model::tokenizer::{llamacpp_adds_bos, Tokenizer};
use common::fixtures;
use serde_json::Value;

/// One vocabulary file checked against one list of expected ids.
struct Case {
    /// `ggml-vocab-{vocab}.gguf` with its `.inp` texts.
    vocab: &'static str,
    /// A `tokenizer.ggml.pre` put in place of the file's.
    pre: Option<&'static str>,
    /// The expected ids: llama.cpp's `.out`, or the generator's for `pre`.
    out: &'static str,
    /// Where afprobe is known to part from the expected ids.
    known: Known,
}

/// A documented, checked difference from the expected ids.
#[derive(PartialEq)]
enum Known {
    /// Every text matches.
    Nothing,
    /// A text starting with a blank: SentencePiece, and llama.cpp with
    /// `add_space_prefix`, prepend `▁` to every text; transformers'
    /// `LlamaTokenizer` (Metaspace, `prepend_scheme = first`) does not when
    /// the text already starts with a blank, and afprobe follows transformers
    /// (src/model/tokenizer.rs, `sentencepiece`; tests/sentencepiece.rs). Such
    /// a text must give the expected ids once one more blank is put in front,
    /// and every other text must match.
    LeadingBlank,
}

const CASES: &[Case] = &[
    Case {
        vocab: "llama-bpe",
        pre: None,
        out: "ggml-vocab-llama-bpe.gguf.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "qwen2",
        pre: None,
        out: "ggml-vocab-qwen2.gguf.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "deepseek-llm",
        pre: None,
        out: "ggml-vocab-deepseek-llm.gguf.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "starcoder",
        pre: None,
        out: "ggml-vocab-starcoder.gguf.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "gpt-2",
        pre: None,
        out: "ggml-vocab-gpt-2.gguf.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "llama-spm",
        pre: None,
        out: "ggml-vocab-llama-spm.gguf.out",
        known: Known::LeadingBlank,
    },
    Case {
        vocab: "phi-3",
        pre: None,
        out: "ggml-vocab-phi-3.gguf.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "starcoder",
        pre: Some("smollm"),
        out: "ggml-vocab-starcoder.gguf.smollm.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "gpt-2",
        pre: Some("olmo"),
        out: "ggml-vocab-gpt-2.gguf.olmo.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "llama-bpe",
        pre: Some("dbrx"),
        out: "ggml-vocab-llama-bpe.gguf.dbrx.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "llama-bpe",
        pre: Some("gpt-4o"),
        out: "ggml-vocab-llama-bpe.gguf.gpt-4o.out",
        known: Known::Nothing,
    },
    Case {
        vocab: "llama-bpe",
        pre: Some("tekken"),
        out: "ggml-vocab-llama-bpe.gguf.tekken.out",
        known: Known::Nothing,
    },
];

fn dir() -> std::path::PathBuf {
    fixtures().join("llamacpp_vocab")
}

/// The texts of a `.inp` file, split as llama.cpp's `test-tokenizer-0.cpp`
/// (`read_tests`) splits them: on `\n__ggml_vocab_test__\n`, nothing after the
/// last separator.
fn texts(path: &Path) -> Vec<String> {
    let raw = std::fs::read_to_string(path).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut out = Vec::new();
    let mut rest = raw.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(at) => {
                out.push(rest[..at].to_string());
                rest = &rest[at + sep.len()..];
            }
            None => {
                out.push(rest.to_string());
                break;
            }
        }
    }
    out
}

/// One line of space-separated ids per text.
fn expected(path: &Path) -> Vec<Vec<u32>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect()
}

fn tokenizer(vocab: &str, pre: Option<&str>) -> Tokenizer {
    let path = dir().join(format!("ggml-vocab-{vocab}.gguf"));
    let (architecture, mut meta) = read_tokenizer_meta(&path).unwrap();
    if let Some(pre) = pre {
        meta.pre = pre.to_string();
    }
    Tokenizer::from_gguf(&meta, &architecture, &path).unwrap()
}

/// llama.cpp's test-tokenizer-0 encodes each text with `add_special = false`
/// (no BOS) and `parse_special = false` (control tokens written in the text
/// stay text); afprobe's `encode_plain` adds no BOS, and the texts hold no
/// control token, so the two compare as they are.
#[test]
fn llamacpp_vocabularies_give_llamacpp_ids() {
    let mut report = Vec::new();
    for case in CASES {
        let inp = dir().join(format!("ggml-vocab-{}.gguf.inp", case.vocab));
        let texts = texts(&inp);
        let want = expected(&dir().join(case.out));
        assert_eq!(texts.len(), want.len(), "{}", case.out);
        let tok = tokenizer(case.vocab, case.pre);
        let mut differ = Vec::new();
        for (i, (text, want)) in texts.iter().zip(&want).enumerate() {
            let got = tok.encode_plain(text).unwrap();
            if &got == want {
                continue;
            }
            differ.push(i);
            let explained = case.known == Known::LeadingBlank
                && text.starts_with(' ')
                && &tok.encode_plain(&format!(" {text}")).unwrap() == want;
            assert!(
                explained,
                "{}: text {i} {text:?}\n  want {want:?}\n  got  {got:?}",
                case.out
            );
        }
        let label = match case.pre {
            Some(pre) => format!("{} as `{pre}`", case.vocab),
            None => case.vocab.to_string(),
        };
        report.push(format!(
            "{label}: {}/{} texts match{}",
            texts.len() - differ.len(),
            texts.len(),
            if differ.is_empty() {
                String::new()
            } else {
                format!(" (texts {differ:?} start with a blank: one `▁` fewer, as transformers)")
            }
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// `vocab` with `tokenizer.ggml.add_bos_token` set to `flag`, written to `dir`.
fn with_add_bos(vocab: &str, flag: bool, dir: &Path) -> std::path::PathBuf {
    use candle_core::quantized::gguf_file::{self, Value as GValue};
    let src = self::dir().join(format!("ggml-vocab-{vocab}.gguf"));
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut meta: Vec<(&str, &GValue)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "tokenizer.ggml.add_bos_token")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let flag = GValue::Bool(flag);
    meta.push(("tokenizer.ggml.add_bos_token", &flag));
    let path = dir.join(format!("{vocab}.gguf"));
    let mut out = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut out, &meta, &[]).unwrap();
    path
}

/// llama.cpp's BOS rule (`llama_vocab::impl::load`): without
/// `tokenizer.ggml.add_bos_token`, SentencePiece vocabularies and the Llama 3
/// and Tekken pre-tokenizers get BOS, the other byte-level ones none (as
/// llama.cpp itself answers, add_bos.json); the flag, when present, wins.
#[test]
fn bos_is_added_as_llamacpp_adds_it() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("add_bos.json")).unwrap())
            .unwrap();
    for (pre, adds) in want["gpt2"].as_object().unwrap() {
        match adds.as_bool() {
            Some(adds) => assert_eq!(llamacpp_adds_bos("gpt2", pre), adds, "{pre}"),
            // Not a llama.cpp name; afprobe splits it as GPT-2, without BOS.
            None => assert!(pre == "gpt2" && !llamacpp_adds_bos("gpt2", pre)),
        }
    }
    assert_eq!(
        llamacpp_adds_bos("llama", "default"),
        want["llama"].as_bool().unwrap()
    );
    // The real files: the flag absent (llama-bpe, qwen2, starcoder, gpt-2) or
    // present (deepseek-llm, llama-spm, phi-3).
    for (vocab, bos) in [
        ("llama-bpe", Some(128000)),
        ("qwen2", None),
        ("starcoder", None),
        ("gpt-2", None),
        ("deepseek-llm", Some(100000)),
        ("llama-spm", Some(1)),
        ("phi-3", Some(1)),
    ] {
        let tok = tokenizer(vocab, None);
        let plain = tok.encode_plain("Hello world").unwrap();
        let want: Vec<u32> = bos.into_iter().chain(plain.iter().copied()).collect();
        assert_eq!(tok.encode("Hello world").unwrap(), want, "{vocab}");
        assert_eq!(tok.add_bos, bos.is_some(), "{vocab}");
    }
    // The flag wins over the rule, both ways.
    let tmp = tempfile::tempdir().unwrap();
    for (vocab, flag) in [("llama-bpe", false), ("qwen2", true)] {
        let path = with_add_bos(vocab, flag, tmp.path());
        let (architecture, meta) = read_tokenizer_meta(&path).unwrap();
        assert_eq!(meta.add_bos_token, Some(flag));
        let tok = Tokenizer::from_gguf(&meta, &architecture, &path).unwrap();
        assert_eq!(tok.add_bos, flag, "{vocab}");
    }
}
