//! Tiny random-weight Llama-3 (rope scaling, untied) and Qwen2 (q/k/v biases,
//! tied) models: transformers' outputs for them are committed fixtures
//! (tests/fixtures/make_tiny.py). Each is loaded as an HF directory and compared
//! with transformers; then written as a GGUF the way llama.cpp's converter does
//! (q/k rows interleaved for Llama, rope scaling as `rope_freqs.weight`) and
//! compared with the HF-directory run. Also: KV cache, hook edits, hub cache, bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use afprobe::model::{
    CaptureRows, Edit, HookPoint, Hooks, KvCache, LogitsAt, Model, ModelConfig, ModelSpec,
    NamesFilter, Positions, WeightDtype,
};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, IndexOp, Tensor};
use common::{fixtures, load_fixture, max_abs_diff, rel_l2};

const ARCHS: [&str; 2] = ["llama3", "qwen2"];

fn tiny_dir(arch: &str) -> PathBuf {
    fixtures().join(format!("tiny_{arch}"))
}

fn load(path: &Path) -> Model {
    Model::load(&ModelSpec::Path(path.to_path_buf()), WeightDtype::F32)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn reference_tokens(arch: &str) -> (HashMap<String, Tensor>, Vec<u32>) {
    let reference = load_fixture(&tiny_dir(arch).join("reference.safetensors"));
    let tokens = common::i64_vec(&reference["tokens"])
        .into_iter()
        .map(|t| t as u32)
        .collect();
    (reference, tokens)
}

/// Every hook point at every position, and logits at every position.
fn run_all(model: &Model, tokens: &[u32]) -> (Tensor, afprobe::model::ActivationCache) {
    let mut hooks = Hooks::capture(NamesFilter::All, CaptureRows::All);
    let logits = model
        .run_with_hooks(tokens, &mut hooks, &LogitsAt::All)
        .unwrap();
    (logits, hooks.cache)
}

#[test]
fn hf_directory_matches_transformers() {
    for arch in ARCHS {
        let model = load(&tiny_dir(arch));
        let (reference, tokens) = reference_tokens(arch);
        let (logits, cache) = run_all(&model, &tokens);
        let n = model.config().n_layers;
        let check = |point: HookPoint, want: &Tensor| {
            let err = rel_l2(cache.get(point).unwrap(), want);
            assert!(err < 1e-5, "{arch} {point}: relative L2 {err:e}");
        };
        check(HookPoint::Embed, &reference["hidden.0"]);
        for l in 0..n - 1 {
            check(
                HookPoint::ResidPost(l),
                &reference[&format!("hidden.{}", l + 1)],
            );
            check(
                HookPoint::ResidPre(l + 1),
                &reference[&format!("hidden.{}", l + 1)],
            );
        }
        check(HookPoint::ResidPost(n - 1), &reference["prenorm"]);
        check(HookPoint::LnFinal, &reference[&format!("hidden.{n}")]);
        let err = rel_l2(&logits, &reference["logits"]);
        assert!(err < 1e-5, "{arch} logits: relative L2 {err:e}");
    }
}

#[test]
fn gguf_written_like_llama_cpp_matches_the_hf_directory() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let gguf = tmp.path().join(format!("{arch}.gguf"));
        write_gguf(&tiny_dir(arch), &gguf);
        let from_gguf = load(&gguf);
        let from_dir = load(&tiny_dir(arch));
        assert_eq!(from_gguf.config().n_layers, from_dir.config().n_layers);
        let (_, tokens) = reference_tokens(arch);
        let (logits_g, cache_g) = run_all(&from_gguf, &tokens);
        let (logits_d, cache_d) = run_all(&from_dir, &tokens);
        for point in HookPoint::all(from_dir.config().n_layers) {
            let err = rel_l2(cache_g.get(point).unwrap(), cache_d.get(point).unwrap());
            assert!(err < 1e-6, "{arch} {point}: GGUF vs HF relative L2 {err:e}");
        }
        assert!(rel_l2(&logits_g, &logits_d) < 1e-6, "{arch} logits differ");
        // Same tokenizer and template through both routes.
        let text = "<|im_start|>user\nhello wörld 123<|im_end|>\n";
        assert_eq!(
            from_gguf.tokenizer.encode(text).unwrap(),
            from_dir.tokenizer.encode(text).unwrap()
        );
        let msgs = [afprobe::model::Message::new("user", "hi")];
        assert_eq!(
            from_gguf.format_chat(&msgs).unwrap(),
            from_dir.format_chat(&msgs).unwrap()
        );
    }
}

#[test]
fn kv_cache_continuation_equals_one_pass() {
    for arch in ARCHS {
        let model = load(&tiny_dir(arch));
        let (_, tokens) = reference_tokens(arch);
        let t = &model.transformer;
        let full = t
            .forward(
                &tokens,
                &mut KvCache::new(),
                &mut Hooks::none(),
                &LogitsAt::All,
            )
            .unwrap();
        // Prefix once, then the rest on a clone (the shared-prefix pattern).
        let mut prefix = KvCache::new();
        t.forward(
            &tokens[..12],
            &mut prefix,
            &mut Hooks::none(),
            &LogitsAt::None,
        )
        .unwrap();
        let mut cache = prefix.reuse_for(&tokens).unwrap();
        assert_eq!(cache.len(), 12);
        let rest = t
            .forward(
                &tokens[12..],
                &mut cache,
                &mut Hooks::none(),
                &LogitsAt::All,
            )
            .unwrap();
        let err = max_abs_diff(&rest, &full.i(12..).unwrap());
        assert!(err < 1e-5, "{arch}: cached continuation differs by {err:e}");
        // Token by token, as generation does.
        let mut cache = prefix.reuse_for(&tokens[..13]).unwrap();
        assert_eq!(cache.len(), 12, "reuse must leave one token to run");
        for (i, &tok) in tokens.iter().enumerate().skip(12) {
            let step = t
                .forward(&[tok], &mut cache, &mut Hooks::none(), &LogitsAt::Last)
                .unwrap();
            assert!(max_abs_diff(&step, &full.i(i..i + 1).unwrap()) < 1e-5);
        }
    }
}

#[test]
fn write_hooks_do_what_a_hand_computation_predicts() {
    let model = load(&tiny_dir("llama3"));
    let (_, tokens) = reference_tokens("llama3");
    let t = &model.transformer;
    let last = HookPoint::ResidPost(model.config().n_layers - 1);
    let d = model.config().d_model;
    let run = |hooks: &mut Hooks| {
        model
            .run_with_hooks(&tokens, hooks, &LogitsAt::All)
            .unwrap()
    };
    let mut capture = Hooks::capture(NamesFilter::Only(vec![last]), CaptureRows::All);
    let clean = run(&mut capture);
    let resid = capture.cache.get(last).unwrap().clone();

    // Steering the final residual by v at position 3: logits there are the logit lens of resid + v.
    let v = Tensor::arange(0f32, d as f32, &Device::Cpu)
        .unwrap()
        .affine(0.05, -1.0)
        .unwrap();
    let mut steer = Hooks::none();
    steer.add_edit(
        last,
        Edit::Add {
            vector: v.clone(),
            positions: Positions::At(vec![3]),
        },
    );
    let steered = run(&mut steer);
    let expected = t
        .logit_lens(&resid.i(3..4).unwrap().broadcast_add(&v).unwrap())
        .unwrap();
    assert!(max_abs_diff(&steered.i(3..4).unwrap(), &expected) < 1e-4);
    assert!(max_abs_diff(&steered.i(3..4).unwrap(), &clean.i(3..4).unwrap()) > 1e-2);
    assert!(max_abs_diff(&steered.i(4..5).unwrap(), &clean.i(4..5).unwrap()) < 1e-6);

    // A zero vector and an orthogonal-to-everything ablation change nothing.
    let mut zero = Hooks::none();
    zero.add_edit(
        HookPoint::ResidPre(1),
        Edit::Add {
            vector: Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu).unwrap(),
            positions: Positions::All,
        },
    );
    assert_eq!(max_abs_diff(&run(&mut zero), &clean), 0.0);

    // Patching every position of an early residual with another prompt's makes the run that prompt's.
    let other: Vec<u32> = tokens.iter().map(|&x| (x * 7 + 1) % 250).collect();
    let mut capture_other = Hooks::capture(
        NamesFilter::Only(vec![HookPoint::ResidPre(1)]),
        CaptureRows::All,
    );
    let other_logits = model
        .run_with_hooks(&other, &mut capture_other, &LogitsAt::All)
        .unwrap();
    let mut patch = Hooks::none();
    patch.add_edit(
        HookPoint::ResidPre(1),
        Edit::Replace {
            positions: (0..tokens.len()).collect(),
            values: capture_other
                .cache
                .get(HookPoint::ResidPre(1))
                .unwrap()
                .clone(),
        },
    );
    assert!(max_abs_diff(&run(&mut patch), &other_logits) < 1e-5);
}

#[test]
fn hub_ids_resolve_through_a_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = tmp.path().join("hub").join("models--tiny-org--tiny-llama");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny_dir("llama3").join(f), snapshot.join(f)).unwrap();
    }
    // Env vars are process-wide: every hub case lives in this one test.
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", tmp.path());
    for spec in [
        "tiny-org/tiny-llama",
        &format!("tiny-org/tiny-llama@{commit}"),
    ] {
        let model = Model::load(&ModelSpec::parse(Some(spec)), WeightDtype::F32)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(model.config().n_layers, 3);
    }
    std::env::remove_var("HF_HOME");
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
    let model = Model::load(
        &ModelSpec::parse(Some("tiny-org/tiny-llama@main")),
        WeightDtype::F32,
    )
    .unwrap();
    assert_eq!(model.config().d_model, 64);
    let err = Model::load(
        &ModelSpec::parse(Some("tiny-org/absent@main")),
        WeightDtype::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not in the local hub cache") && err.contains("HF_HUB_CACHE"),
        "{err}"
    );
    std::env::remove_var("HF_HUB_CACHE");
}

#[test]
fn weights_load_in_half_precision() {
    let (_, tokens) = reference_tokens("qwen2");
    let f32_model = load(&tiny_dir("qwen2"));
    let want = f32_model
        .run_with_hooks(&tokens, &mut Hooks::none(), &LogitsAt::Last)
        .unwrap();
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let model = Model::load(&ModelSpec::Path(tiny_dir("qwen2")), dtype).unwrap();
        assert_eq!(model.transformer.dtype(), dtype.dtype());
        let got = model
            .run_with_hooks(&tokens, &mut Hooks::none(), &LogitsAt::Last)
            .unwrap();
        let err = rel_l2(&got, &want);
        assert!(err < 0.05, "{dtype:?}: relative L2 {err}");
    }
}

#[test]
fn bad_model_files_give_errors_that_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err_of = |path: &Path| {
        Model::load(&ModelSpec::Path(path.to_path_buf()), WeightDtype::F32)
            .unwrap_err()
            .to_string()
    };
    // Not a GGUF.
    let not_gguf = tmp.path().join("weights.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 this is a zip").unwrap();
    let err = err_of(&not_gguf);
    assert!(
        err.contains("weights.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );

    // Truncated GGUF: header intact, tensor data cut off.
    let full = tmp.path().join("full.gguf");
    write_gguf(&tiny_dir("llama3"), &full);
    let bytes = std::fs::read(&full).unwrap();
    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = err_of(&truncated);
    assert!(
        err.contains("truncated.gguf") && err.contains("tensor"),
        "{err}"
    );
    let header_only = tmp.path().join("header.gguf");
    std::fs::write(&header_only, &bytes[..40]).unwrap();
    let err = err_of(&header_only);
    assert!(
        err.contains("header.gguf") && err.contains("truncated or corrupt"),
        "{err}"
    );

    // Unsupported architecture.
    let dir = copy_dir(&tiny_dir("llama3"), &tmp.path().join("gpt2"));
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    let err = err_of(&dir);
    assert!(
        err.contains("config.json") && err.contains("unsupported architecture `gpt2`"),
        "{err}"
    );

    // Missing tokenizer.
    let dir = copy_dir(&tiny_dir("llama3"), &tmp.path().join("notok"));
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = err_of(&dir);
    assert!(
        err.contains("notok") && err.contains("no tokenizer.json"),
        "{err}"
    );

    // A directory that is not a model, and a path that does not exist.
    let err = err_of(tmp.path());
    assert!(err.contains("no config.json"), "{err}");
    let err = err_of(&tmp.path().join("absent.gguf"));
    assert!(
        err.contains("absent.gguf") && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn prompts_longer_than_the_context_window_are_refused() {
    let model = load(&tiny_dir("llama3"));
    let ctx = model.config().max_position_embeddings;
    let tokens = vec![5u32; ctx + 1];
    let err = model
        .run_with_hooks(&tokens, &mut Hooks::none(), &LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{}", ctx + 1)) && err.contains("context window is 256"),
        "{err}"
    );
    let mut hooks = Hooks::capture(
        NamesFilter::Only(vec![HookPoint::ResidPost(7)]),
        CaptureRows::Last,
    );
    let err = model
        .run_with_hooks(&tokens[..4], &mut hooks, &LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blocks.7.hook_resid_post") && err.contains("3 layers"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
    to.to_path_buf()
}

/// llama.cpp's q/k row order: within each head, HF rows [0..hd/2) go to even
/// slots and [hd/2..hd) to odd slots. Written out by index so it does not share
/// code with the loader's inverse.
fn interleave_rows(w: &Tensor, n_heads: usize) -> Tensor {
    let rows = w.dim(0).unwrap();
    let hd = rows / n_heads;
    let mut order = vec![0u32; rows];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            order[h * hd + 2 * i] = (h * hd + i) as u32;
            order[h * hd + 2 * i + 1] = (h * hd + hd / 2 + i) as u32;
        }
    }
    w.index_select(&Tensor::new(order, &Device::Cpu).unwrap(), 0)
        .unwrap()
}

/// llama.cpp's `rope_freqs` for Llama-3 scaling: the divisor of each frequency.
fn llama3_rope_freqs(cfg: &ModelConfig) -> Vec<f32> {
    let Some(afprobe::model::config::RopeScaling::Llama3(s)) = cfg.rope_scaling.as_ref() else {
        panic!("the tiny Llama-3 fixture has llama3 rope scaling");
    };
    let (low_wl, high_wl) = (
        s.original_max_position_embeddings / s.low_freq_factor,
        s.original_max_position_embeddings / s.high_freq_factor,
    );
    (0..cfg.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let divisor = if wavelen < high_wl {
                1.0
            } else if wavelen > low_wl {
                s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            };
            divisor as f32
        })
        .collect()
}

/// Writes an HF directory as a GGUF file the way llama.cpp's converter lays it out.
fn write_gguf(hf_dir: &Path, out: &Path) {
    let cfg = ModelConfig::from_hf_json(&hf_dir.join("config.json")).unwrap();
    let arch = cfg.architecture.name();
    let weights = load_fixture(&hf_dir.join("model.safetensors"));
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let gguf = afprobe::model::gguf::gguf_name(afprobe::model::Architecture::Llama, name)
            .unwrap_or_else(|| panic!("no GGUF name for {name}"));
        let t = match (arch, name.as_str()) {
            ("llama", n) if n.ends_with("q_proj.weight") => interleave_rows(t, cfg.n_heads),
            ("llama", n) if n.ends_with("k_proj.weight") => interleave_rows(t, cfg.n_kv_heads),
            _ => t.clone(),
        };
        tensors.push((gguf, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    if cfg.rope_scaling.is_some() {
        let freqs = Tensor::new(llama3_rope_freqs(&cfg), &Device::Cpu).unwrap();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
        ));
    }
    let vocab = common::gguf_vocab(hf_dir);
    let tok_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hf_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let id_of = |name: &str| vocab.iter().find(|v| v.0 == name).unwrap().1 as u32;
    let key = |k: &str| format!("{arch}.{k}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(cfg.n_layers as u32)),
        (key("embedding_length"), Value::U32(cfg.d_model as u32)),
        (key("feed_forward_length"), Value::U32(cfg.d_mlp as u32)),
        (key("attention.head_count"), Value::U32(cfg.n_heads as u32)),
        (
            key("attention.head_count_kv"),
            Value::U32(cfg.n_kv_heads as u32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            key("context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.iter().map(|v| Value::String(v.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.iter().map(|v| Value::I32(v.2)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(id_of("<|im_start|>")),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(id_of("<|im_end|>")),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(tok_cfg["chat_template"].as_str().unwrap().into()),
        ),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}
