//! A mutation fuzzer for model inputs, on stable Rust: valid seeds (the tiny
//! Llama-3 and Qwen2 fixtures, a richer tokenizer.json built from them, and a
//! tiny GGUF written in-process) are mutated, loaded with `Model::load`, and,
//! when they load, used to tokenize, decode, render the chat template and run
//! a short forward pass. Every outcome must be `Ok` or `Err`: a panic that
//! escapes afprobe (or an abort, which kills the test) is a failure.
//!
//! Inputs: GGUF bytes, `config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`, and the `model.safetensors` header.
//!
//! The normal test run tries `AFPROBE_FUZZ_CASES` cases per input kind (default
//! 500, 3,500 cases in all: about 10 s on 2 cores); a longer run:
//!
//! ```text
//! AFPROBE_FUZZ_CASES=5000 AFPROBE_FUZZ_SEED=7 cargo test --release --test fuzz_models -- --nocapture
//! ```
//!
//! Outcomes are printed per kind (with `--nocapture`). A failing case is
//! written to `$AFPROBE_FUZZ_OUT` (default: the system temp dir) so it can be
//! replayed with `afprobe model info --model PATH`.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use afprobe::model::{Hooks, LogitsAt, Message, Model, ModelConfig, ModelSpec, WeightDtype};
use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use common::{fixtures, load_fixture};
use serde_json::{json, Value};

/// SplitMix64: small, seedable, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Integers that break size arithmetic.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    3,
    7,
    255,
    1 << 16,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 33,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
];

/// Byte-level mutations, biased to the first `hot` bytes (a header).
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, hot: usize) {
    for _ in 0..1 + rng.below(3) {
        let len = data.len().max(1);
        let span = if rng.below(10) < 9 { hot.min(len) } else { len };
        let at = rng.below(span);
        match rng.below(7) {
            0 => {
                if let Some(b) = data.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                if let Some(b) = data.get_mut(at) {
                    *b = rng.next() as u8;
                }
            }
            2 | 3 => {
                // An interesting little-endian u32 or u64 at an aligned offset.
                let v = *rng.pick(&INTERESTING);
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let at = at & !(width - 1);
                let bytes = v.to_le_bytes();
                for (i, byte) in bytes.iter().enumerate().take(width) {
                    if let Some(b) = data.get_mut(at + i) {
                        *b = *byte;
                    }
                }
            }
            4 => data.truncate(at),
            5 => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                if at < end {
                    data.drain(at..end);
                }
            }
            _ => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                if at < end {
                    let chunk = data[at..end].to_vec();
                    let to = rng.below(data.len() + 1);
                    data.splice(to..to, chunk);
                }
            }
        }
    }
}

/// Replacement values for JSON nodes.
fn json_value(rng: &mut Rng) -> Value {
    match rng.below(17) {
        0 => json!(-1),
        1 => json!(0),
        2 => json!(-1.0),
        3 => json!(2.5),
        4 => json!(1u64 << 33),
        5 => json!(u64::MAX),
        6 => json!(1e308),
        7 => json!(""),
        8 => json!("x"),
        9 => Value::Null,
        10 => json!(true),
        11 => json!([]),
        12 => json!({}),
        13 => json!(1000),
        14 => json!(*rng.pick(&[
            "Sequence",
            "Replace",
            "Split",
            "Precompiled",
            "ByteLevel",
            "Strip",
            "NFC",
            "NFKD",
            "Lowercase",
            "Metaspace",
            "TemplateProcessing",
            "Fuse",
            "ByteFallback",
            "BPE",
            "WordPiece",
            "Unigram",
            "default",
            "llama3",
            "linear",
            "AAAA",
            "{% break %}"
        ])),
        15 => json!({"String": ""}),
        _ => json!({"Regex": "(("}),
    }
}

/// All paths to nodes of `v` (object keys and array indices).
fn json_paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    if out.len() > 4000 {
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                prefix.push(json!(k));
                out.push(prefix.clone());
                json_paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate().take(64) {
                prefix.push(json!(i));
                out.push(prefix.clone());
                json_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match step {
            Value::String(k) => cur.get_mut(k.as_str())?,
            Value::Number(i) => cur.get_mut(i.as_u64()? as usize)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// JSON-aware mutations (replace, delete, duplicate a node), sometimes bytes.
fn mutate_json(rng: &mut Rng, text: &str) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        let mut bytes = text.as_bytes().to_vec();
        mutate_bytes(rng, &mut bytes, usize::MAX);
        return bytes;
    };
    if rng.below(10) == 0 {
        let mut bytes = text.as_bytes().to_vec();
        mutate_bytes(rng, &mut bytes, usize::MAX);
        return bytes;
    }
    let mut paths = Vec::new();
    json_paths(&v, &mut Vec::new(), &mut paths);
    // Prefer the small, structural parts over the long vocabulary.
    paths.retain(|p| {
        !(p.len() > 2
            && p[0] == json!("model")
            && (p[1] == json!("vocab") || p[1] == json!("merges")))
            || p.len() == 3
    });
    for _ in 0..1 + rng.below(3) {
        if paths.is_empty() {
            break;
        }
        let path = rng.pick(&paths).clone();
        let (parent_path, last) = path.split_at(path.len() - 1);
        match rng.below(4) {
            0 => {
                if let (Some(Value::Object(map)), Value::String(k)) =
                    (node_mut(&mut v, parent_path), &last[0])
                {
                    map.remove(k);
                }
            }
            1 => {
                if let Some(node) = node_mut(&mut v, &path) {
                    let copy = node.clone();
                    if let Some(Value::Array(items)) = node_mut(&mut v, parent_path) {
                        items.push(copy);
                    }
                }
            }
            _ => {
                let new = json_value(rng);
                if let Some(node) = node_mut(&mut v, &path) {
                    *node = new;
                }
            }
        }
    }
    v.to_string().into_bytes()
}

/// Template mutations: splice in jinja fragments, delete or duplicate ranges.
fn mutate_template(rng: &mut Rng, text: &str) -> Vec<u8> {
    const SNIPPETS: [&str; 22] = [
        "{% break %}",
        "{% continue %}",
        "{{ messages | tojson(indent=1000000000) }}",
        "{{ messages | tojson(ensure_ascii=True, sort_keys=True, indent=2) }}",
        "{{ messages | tojson(separators=(1, 2)) }}",
        "{{ messages | tojson(bogus=1) }}",
        "{{ 'x' | indent(99999999999) }}",
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{{ raise_exception('no') }}",
        "{{ strftime_now('%Y %-d %Q %') }}",
        "{% generation %}",
        "{% endgeneration %}",
        "{%- generation -%}x{%- endgeneration -%}",
        "{% for %}",
        "{{",
        "}}",
        "{%",
        "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
        "{{ 'a' * 1000000000 }}",
        "{{ messages[99] }}",
        "{{ tools | tojson }}",
        "{{ (messages | map(attribute='content') | join('')) * 3 }}",
    ];
    let mut s = text.to_string();
    for _ in 0..1 + rng.below(2) {
        let mut at = rng.below(s.len() + 1);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        match rng.below(3) {
            0 => {
                let snippet = SNIPPETS[rng.below(SNIPPETS.len())];
                s.insert_str(at, snippet)
            }
            1 => {
                let mut end = (at + rng.below(12)).min(s.len());
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.replace_range(at..end, "");
            }
            _ => {
                let mut end = (at + rng.below(40)).min(s.len());
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                let chunk = s[at..end].to_string();
                s.insert_str(at, &chunk);
            }
        }
    }
    s.into_bytes()
}

/// The tiny Llama fixture's tokenizer.json with every optional component set
/// (normalizer, pre-tokenizer, post-processor and decoder sequences), so
/// mutations reach the code that `tokenizers` panics in.
fn rich_tokenizer_json(plain: &str) -> String {
    let mut v: Value = serde_json::from_str(plain).unwrap();
    v["normalizer"] = json!({"type": "Sequence", "normalizers": [
        {"type": "NFC"},
        {"type": "Replace", "pattern": {"String": "\t"}, "content": " "},
        {"type": "Strip", "strip_left": false, "strip_right": false}
    ]});
    v["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
    ]});
    v["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [298], "tokens": ["<|im_start|>"]}}});
    v["decoder"] = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        {"type": "Strip", "content": " ", "start": 0, "stop": 0}
    ]});
    v.to_string()
}

/// The tiny Llama fixture written as a GGUF (F32 tensors, gpt2 tokenizer metadata).
fn tiny_gguf(hf_dir: &Path) -> Vec<u8> {
    let cfg = ModelConfig::from_hf_json(&hf_dir.join("config.json")).unwrap();
    let arch = cfg.architecture.name();
    let weights = load_fixture(&hf_dir.join("model.safetensors"));
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| {
            (
                afprobe::model::gguf::gguf_name(afprobe::model::Architecture::Llama, n).unwrap(),
                QTensor::quantize(&weights[n], GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let vocab = common::gguf_vocab(hf_dir);
    let key = |k: &str| format!("{arch}.{k}");
    let meta: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.into())),
        ("general.alignment".into(), GValue::U32(32)),
        (key("block_count"), GValue::U32(cfg.n_layers as u32)),
        (key("embedding_length"), GValue::U32(cfg.d_model as u32)),
        (key("feed_forward_length"), GValue::U32(cfg.d_mlp as u32)),
        (key("attention.head_count"), GValue::U32(cfg.n_heads as u32)),
        (key("attention.head_count_kv"), GValue::U32(cfg.n_kv_heads as u32)),
        (key("attention.layer_norm_rms_epsilon"), GValue::F32(1e-5)),
        (key("rope.freq_base"), GValue::F32(cfg.rope_theta as f32)),
        (key("context_length"), GValue::U32(cfg.max_position_embeddings as u32)),
        ("tokenizer.ggml.model".into(), GValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GValue::String("llama-bpe".into())),
        (
            "tokenizer.ggml.tokens".into(),
            GValue::Array(vocab.iter().map(|v| GValue::String(v.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GValue::Array(vocab.iter().map(|v| GValue::I32(v.2)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), GValue::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), GValue::U32(298)),
        ("tokenizer.ggml.eos_token_id".into(), GValue::U32(299)),
        ("tokenizer.ggml.add_bos_token".into(), GValue::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            GValue::String(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | tojson }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
            ),
        ),
    ];
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}

/// Loads the model at `path` and uses it; `Ok(())` or the error's text.
fn exercise(path: &Path) -> Result<(), String> {
    let model = Model::load(&ModelSpec::Path(path.to_path_buf()), WeightDtype::F32)
        .map_err(|e| e.to_string())?;
    let text = "héllo <|im_start|> world 1234\t!";
    let ids = model.tokenizer.encode(text).map_err(|e| e.to_string())?;
    let _ = model.tokenizer.decode(&ids);
    let forward = |ids: &[u32]| -> Result<(), String> {
        let n = ids.len().min(6);
        if n > 0 {
            model
                .run_with_hooks(&ids[..n], &mut Hooks::none(), &LogitsAt::Last)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    forward(&ids)?;
    // A chat template error is reported at render, after raw text has worked.
    let rendered = model
        .format_chat(&[
            Message::new("system", "Be <brief> & 'exact'"),
            Message::new("user", "hi"),
        ])
        .map_err(|e| e.to_string())?;
    forward(
        &model
            .tokenizer
            .encode(&rendered)
            .map_err(|e| e.to_string())?,
    )
}

/// One input kind: the file it replaces, its seed, and how to mutate it.
struct Kind {
    name: &'static str,
    /// Model directory to start from (fixture files are copied in).
    base: &'static str,
    /// File the mutated bytes are written to (relative to the model directory).
    file: &'static str,
    seed: Vec<u8>,
    mutate: fn(&mut Rng, &[u8]) -> Vec<u8>,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    errors: BTreeMap<String, usize>,
    panics: Vec<String>,
}

/// A short class for an error message: its file name and first words.
fn error_class(msg: &str, dir: &Path) -> String {
    let msg = msg.replace(&format!("{}/", dir.display()), "");
    let msg = msg.replace(&dir.display().to_string(), "<model dir>");
    let words: Vec<&str> = msg
        .split(|c: char| c.is_whitespace())
        .filter(|w| !w.is_empty())
        .take(7)
        .collect();
    words.join(" ").chars().take(70).collect()
}

fn run_kind(kind: &Kind, cases: usize, seed: u64, out_dir: &Path) -> Tally {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(kind.base)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "reference.safetensors" {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    let target: PathBuf = dir.path().join(kind.file);
    let model_path: PathBuf = if kind.file.ends_with(".gguf") {
        target.clone()
    } else {
        dir.path().to_path_buf()
    };
    // The seed itself must load.
    std::fs::write(&target, &kind.seed).unwrap();
    if let Err(e) = exercise(&model_path) {
        panic!("{}: the unmutated seed does not load: {e}", kind.name);
    }
    let mut rng = Rng(seed
        ^ kind
            .name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64));
    let mut tally = Tally::default();
    for case in 0..cases {
        let bytes = (kind.mutate)(&mut rng, &kind.seed);
        std::fs::write(&target, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(|| exercise(&model_path))) {
            Ok(Ok(())) => tally.ok += 1,
            Ok(Err(msg)) => {
                *tally
                    .errors
                    .entry(error_class(&msg, dir.path()))
                    .or_default() += 1
            }
            Err(payload) => {
                let why = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let saved = out_dir.join(format!("fuzz_{}_{seed}_{case}", kind.name));
                let _ = std::fs::create_dir_all(&saved);
                for entry in std::fs::read_dir(dir.path()).unwrap() {
                    let p = entry.unwrap().path();
                    let _ = std::fs::copy(&p, saved.join(p.file_name().unwrap()));
                }
                tally.panics.push(format!(
                    "case {case}: {why} (input saved in {})",
                    saved.display()
                ));
            }
        }
    }
    tally
}

fn kinds() -> Vec<Kind> {
    let read = |p: &str| std::fs::read(fixtures().join(p)).unwrap();
    let plain_tok = String::from_utf8(read("tiny_llama3/tokenizer.json")).unwrap();
    let json = |r: &mut Rng, b: &[u8]| mutate_json(r, &String::from_utf8_lossy(b));
    let template = |r: &mut Rng, b: &[u8]| mutate_template(r, &String::from_utf8_lossy(b));
    let gguf = tiny_gguf(&fixtures().join("tiny_llama3"));
    vec![
        Kind {
            name: "gguf",
            base: "tiny_llama3",
            file: "model.gguf",
            seed: gguf,
            mutate: |r, b| {
                let mut v = b.to_vec();
                // Most interesting bytes: the header (~6 KB for the tiny vocabulary).
                mutate_bytes(r, &mut v, 8192);
                v
            },
        },
        Kind {
            name: "config_llama3",
            base: "tiny_llama3",
            file: "config.json",
            seed: read("tiny_llama3/config.json"),
            mutate: json,
        },
        Kind {
            name: "config_qwen2",
            base: "tiny_qwen2",
            file: "config.json",
            seed: read("tiny_qwen2/config.json"),
            mutate: json,
        },
        Kind {
            name: "tokenizer_json",
            base: "tiny_llama3",
            file: "tokenizer.json",
            seed: rich_tokenizer_json(&plain_tok).into_bytes(),
            mutate: json,
        },
        Kind {
            name: "tokenizer_config",
            base: "tiny_qwen2",
            file: "tokenizer_config.json",
            seed: read("tiny_qwen2/tokenizer_config.json"),
            mutate: json,
        },
        Kind {
            name: "chat_template",
            base: "tiny_llama3",
            file: "chat_template.jinja",
            seed: b"{%- for m in messages %}{% if m.role == 'system' %}{{ m.content | tojson }}{% continue %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% generation %}{% endgeneration %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".to_vec(),
            mutate: template,
        },
        Kind {
            name: "safetensors_header",
            base: "tiny_qwen2",
            file: "model.safetensors",
            seed: read("tiny_qwen2/model.safetensors"),
            mutate: |r, b| {
                let mut v = b.to_vec();
                let header = 8 + u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
                mutate_bytes(r, &mut v, header);
                v
            },
        },
    ]
}

#[test]
fn mutated_model_inputs_load_or_fail_but_never_panic() {
    let cases = env_usize("AFPROBE_FUZZ_CASES", 500);
    let seed = env_usize("AFPROBE_FUZZ_SEED", 1) as u64;
    let out_dir = std::env::var_os("AFPROBE_FUZZ_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut total = 0;
    for kind in kinds() {
        let t = run_kind(&kind, cases, seed, &out_dir);
        let errors: usize = t.errors.values().sum();
        total += t.ok + errors + t.panics.len();
        eprintln!(
            "fuzz {:<20} {cases} cases: {} ok, {errors} clean errors ({} kinds), {} panics",
            kind.name,
            t.ok,
            t.errors.len(),
            t.panics.len()
        );
        let mut top: Vec<_> = t.errors.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (class, n) in top.iter().take(6) {
            eprintln!("    {n:>5}  {class}");
        }
        failures.extend(t.panics.into_iter().map(|p| format!("{}: {p}", kind.name)));
    }
    eprintln!(
        "fuzz: {total} cases (seed {seed}) in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} panics escaped:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
