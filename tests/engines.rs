//! The two engines (`--engine fused|portable`, docs/hooks-and-api.md
//! "Engines") hold the same contract: the portable engine (candle tensor ops)
//! matches transformers at every hook on every family fixture as the fused
//! engine does (tests/families.rs), equals the fused engine at every hook,
//! attention internals included, on the fixtures and the default model, and
//! does so through KV-cache splits and token trees with edits.

mod common;

use std::path::PathBuf;

use afprobe::model::{
    CaptureRows, Edit, Engine, HookPoint, Hooks, KvCache, LogitsAt, Model, ModelSpec, NamesFilter,
    Positions, TokenTree, WeightDtype,
};
use candle_core::{DType, Tensor};
use common::{family_dir as dir, load_fixture, rel_l2, FAMILIES};

fn load(spec: &ModelSpec, engine: Engine) -> Model {
    let mut model = Model::load(spec, WeightDtype::F32).unwrap_or_else(|e| panic!("{spec}: {e}"));
    model.transformer.set_engine(engine);
    model
}

fn family(name: &str, engine: Engine) -> Model {
    load(&ModelSpec::Path(dir(name)), engine)
}

/// Every hook point and every attention internal of every layer.
fn every_point(n_layers: usize) -> NamesFilter {
    let mut points = HookPoint::all(n_layers);
    for l in 0..n_layers {
        for kind in ["q", "k", "v", "z", "pattern"] {
            points.push(HookPoint::attention(kind, l).unwrap());
        }
    }
    NamesFilter::Only(points)
}

/// Both engines on `tokens`: every captured tensor and the logits within 1e-5 relative L2.
fn assert_engines_agree(spec: &ModelSpec, tokens: &[u32], label: &str) {
    let run = |engine: Engine| {
        let model = load(spec, engine);
        let mut hooks = Hooks::capture(every_point(model.config().n_layers), CaptureRows::All);
        let logits = model
            .run_with_hooks(tokens, &mut hooks, &LogitsAt::All)
            .unwrap_or_else(|e| panic!("{label} {engine:?}: {e}"));
        (logits, hooks.cache)
    };
    let (fused_logits, fused) = run(Engine::Fused);
    let (portable_logits, portable) = run(Engine::Portable);
    assert_eq!(fused.len(), portable.len(), "{label}: the same points");
    for point in fused.points() {
        let err = rel_l2(portable.get(*point).unwrap(), fused.get(*point).unwrap());
        assert!(err < 1e-5, "{label} {point}: relative L2 {err:e}");
    }
    let err = rel_l2(&portable_logits, &fused_logits);
    assert!(err < 1e-5, "{label} logits: relative L2 {err:e}");
}

#[test]
fn the_portable_engine_matches_transformers_at_every_hook_on_every_family() {
    for name in FAMILIES {
        let reference = load_fixture(&dir(name).join("reference.safetensors"));
        let model = family(name, Engine::Portable);
        common::assert_matches_reference(&model, &reference, &format!("{name} (portable)"));
    }
}

#[test]
fn the_engines_agree_at_every_hook_and_attention_internal_on_every_family() {
    let tokens: Vec<u32> = (0..29).map(|i| (i * 37 + 11) % 290 + 3).collect();
    for name in FAMILIES {
        assert_engines_agree(&ModelSpec::Path(dir(name)), &tokens, name);
    }
}

#[test]
fn the_engines_agree_on_the_default_model() {
    let model = load(&ModelSpec::Default, Engine::Fused);
    let text = model
        .format_chat(&[afprobe::model::Message::new(
            "user",
            "Is this conversation used for training? Answer briefly.",
        )])
        .unwrap();
    let tokens = model.tokenizer.encode(&text).unwrap();
    assert_engines_agree(&ModelSpec::Default, &tokens, "smollm2-135m");
}

/// A cache split (7, 1, rest) and a token tree with a steering edit, past the
/// fixtures' sliding windows: the portable engine gives the fused engine's logits.
#[test]
fn the_engines_agree_through_cache_splits_and_token_trees() {
    let branches: [&[u32]; 4] = [
        &[40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
        &[40, 41, 60],
        &[80],
        &[40, 41, 42, 43, 90, 91, 92, 93, 94, 95, 96, 97],
    ];
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 11) % 290 + 3).collect();
    for name in FAMILIES {
        let run = |engine: Engine| -> (Tensor, Tensor, Tensor) {
            let model = family(name, engine);
            let t = &model.transformer;
            let mut kv = KvCache::new();
            let split: Vec<Tensor> = [&prompt[..7], &prompt[7..8], &prompt[8..]]
                .iter()
                .map(|chunk| {
                    t.forward(chunk, &mut kv, &mut Hooks::none(), &LogitsAt::All)
                        .unwrap()
                })
                .collect();
            let d = model.config().d_model;
            let mut hooks = Hooks::capture(
                NamesFilter::Only(vec![HookPoint::ResidPost(1)]),
                CaptureRows::All,
            );
            hooks.add_edit(
                HookPoint::ResidPre(1),
                Edit::Add {
                    vector: Tensor::ones(d, DType::F32, &candle_core::Device::Cpu).unwrap(),
                    positions: Positions::At(vec![prompt.len() + 2]),
                },
            );
            let (tree, _) = TokenTree::trie(&branches);
            let logits = t
                .forward_tree(&tree, &mut kv, &mut hooks, &LogitsAt::All)
                .unwrap()
                .expect("no adapter: the tree runs");
            assert_eq!(kv.len(), prompt.len(), "{name}: the cache is unchanged");
            let resid = hooks.cache.get(HookPoint::ResidPost(1)).unwrap().clone();
            (Tensor::cat(&split, 0).unwrap(), logits, resid)
        };
        let (fused, portable) = (run(Engine::Fused), run(Engine::Portable));
        for (what, a, b) in [
            ("split logits", &portable.0, &fused.0),
            ("tree logits", &portable.1, &fused.1),
            ("tree resid_post.1", &portable.2, &fused.2),
        ] {
            let err = rel_l2(a, b);
            assert!(err < 1e-5, "{name} {what}: relative L2 {err:e}");
        }
    }
}

#[test]
fn an_engine_refuses_a_cache_the_other_filled() {
    let mut model = family("qwen3", Engine::Fused);
    let t = &mut model.transformer;
    for (filler, other) in [
        (Engine::Fused, Engine::Portable),
        (Engine::Portable, Engine::Fused),
    ] {
        let mut kv = KvCache::new();
        t.set_engine(filler);
        t.forward(&[5, 6, 7], &mut kv, &mut Hooks::none(), &LogitsAt::None)
            .unwrap();
        t.set_engine(other);
        let err = t
            .forward(&[8], &mut kv, &mut Hooks::none(), &LogitsAt::Last)
            .unwrap_err()
            .to_string();
        let want = format!("filled by the {} engine", filler.name());
        assert!(err.contains(&want), "{err}");
    }
}

#[test]
fn capture_with_the_portable_engine_writes_the_fused_store() {
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    let out = common::afprobe(&[
        "prompts",
        "--cues",
        "xml",
        "--out",
        prompts.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = std::fs::read_to_string(&prompts).unwrap();
    let head: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::write(&prompts, head).unwrap();
    let store = |engine: &str| {
        let dir = work.path().join(engine);
        let out = common::afprobe(&[
            "capture",
            "--engine",
            engine,
            "--prompts",
            prompts.to_str().unwrap(),
            "--hooks",
            "resid_post,attn_out",
            "--positions",
            "last,all",
            "--score",
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{engine}: {}", common::stderr(&out));
        dir
    };
    let (fused, portable) = (store("fused"), store("portable"));
    let a = load_fixture(&fused.join("shard-00000.safetensors"));
    let b = load_fixture(&portable.join("shard-00000.safetensors"));
    for (name, t) in &a {
        if name.contains('@') {
            let err = rel_l2(&b[name], t);
            assert!(err < 1e-5, "{name}: relative L2 {err:e}");
        }
    }
    let rows = |dir: &PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("rows.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for (x, y) in rows(&fused).iter().zip(rows(&portable)) {
        for tag in ["accept", "reject"] {
            let (p, q) = (
                x["logprob"][tag].as_f64().unwrap(),
                y["logprob"][tag].as_f64().unwrap(),
            );
            assert!((p - q).abs() < 1e-3, "{tag}: {p} vs {q}");
        }
    }
}

/// The portable engine in f16, bf16 and on block-quantized weights (candle's
/// quantized matmul) on the default model: its last-token logits against the
/// fused engine at f32 and at the same precision. The bounds are about three
/// times what was measured (f16 1.0e-3 / 1.3e-3, bf16 1.7e-2 / 1.1e-2,
/// quantized 1.9e-2 / 7.5e-3): the precisions' own rounding, and for
/// quantized weights two ways of quantizing the activations.
#[test]
fn the_portable_engine_runs_every_precision() {
    let spec = ModelSpec::Default;
    let tokens: Vec<u32> = (0..96).map(|i| (i * 211 + 17) % 40_000 + 100).collect();
    let last = |dtype: WeightDtype, engine: Engine| -> Tensor {
        let mut model = Model::load(&spec, dtype).unwrap();
        model.transformer.set_engine(engine);
        model
            .run_with_hooks(&tokens, &mut Hooks::none(), &LogitsAt::Last)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let reference = last(WeightDtype::F32, Engine::Fused);
    for (dtype, bound) in [
        (WeightDtype::F16, 5e-3),
        (WeightDtype::Bf16, 0.05),
        (WeightDtype::Quantized, 0.06),
    ] {
        let portable = last(dtype, Engine::Portable);
        let fused = last(dtype, Engine::Fused);
        let (to_f32, to_fused) = (rel_l2(&portable, &reference), rel_l2(&portable, &fused));
        eprintln!("{dtype:?}: portable vs fused f32 {to_f32:e}, vs fused {dtype:?} {to_fused:e}");
        assert!(to_f32 < bound, "{dtype:?}: relative L2 to f32 {to_f32:e}");
        assert!(
            to_fused < bound,
            "{dtype:?}: relative L2 to fused {to_fused:e}"
        );
    }
}

/// The portable engine is differentiable (dense weights): the gradient of a
/// logit difference with respect to a steering vector added at every position
/// of `resid_pre.1`, by backprop, equals the central finite difference along
/// random directions, on every family fixture.
#[test]
fn the_portable_engine_is_differentiable() {
    use candle_core::{IndexOp, Var};
    let tokens: Vec<u32> = (0..17).map(|i| (i * 37 + 11) % 290 + 3).collect();
    for name in FAMILIES {
        let model = family(name, Engine::Portable);
        let d = model.config().d_model;
        let dev = candle_core::Device::Cpu;
        let margin = |vector: &Tensor| -> Tensor {
            let mut hooks = Hooks::none();
            hooks.add_edit(
                HookPoint::ResidPre(1),
                Edit::Add {
                    vector: vector.clone(),
                    positions: Positions::All,
                },
            );
            let logits = model
                .run_with_hooks(&tokens, &mut hooks, &LogitsAt::Last)
                .unwrap();
            (logits.i((0, 5)).unwrap() - logits.i((0, 9)).unwrap()).unwrap()
        };
        let v = Var::zeros(d, DType::F32, &dev).unwrap();
        let grads = margin(v.as_tensor()).backward().unwrap();
        let g = grads
            .get(&v)
            .expect("a gradient reaches the steering vector");
        for seed in 0..2u64 {
            let dir = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let dir = (&dir
                / dir
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64)
                .unwrap();
            let eps = 1e-2;
            let plus = margin(&(&dir * eps).unwrap()).to_scalar::<f32>().unwrap();
            let minus = margin(&(&dir * -eps).unwrap()).to_scalar::<f32>().unwrap();
            let finite = f64::from(plus - minus) / (2.0 * eps);
            let backprop = f64::from(
                (g * &dir)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            assert!(
                (backprop - finite).abs() <= 1e-2 * finite.abs().max(1e-2),
                "{name} (direction {seed}): backprop {backprop:e}, finite difference {finite:e}"
            );
        }
    }
}

/// `--device`: a GPU this build lacks, an unknown device and the fused engine
/// off the CPU are clear errors before any loading; `bench device` on the CPU
/// (the GPU check's parity step, rehearsed) passes its f32 limits.
#[test]
fn devices_are_clear_and_the_device_check_runs_on_the_cpu() {
    let model = common::fixtures().join("tiny_llama3");
    let m = model.to_str().unwrap();
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--raw", "hi"];
        args.extend_from_slice(extra);
        common::afprobe(&args)
    };
    common::assert_fails_with(
        &generate(&["--device", "cuda"]),
        &[
            "--device cuda:0",
            "without the `cuda` feature",
            "scripts/cuda/build.sh",
        ],
    );
    common::assert_fails_with(&generate(&["--device", "tpu"]), &["unknown device `tpu`"]);
    common::assert_fails_with(
        &generate(&["--device", "metal", "--engine", "fused"]),
        &["--engine fused runs on the CPU only"],
    );
    let out = common::afprobe(&[
        "organism",
        "train",
        "--recipe",
        "token",
        "--model",
        m,
        "--device",
        "cuda:1",
        "--out",
        "/nonexistent/never-written",
    ]);
    common::assert_fails_with(&out, &["--device cuda:1", "without the `cuda` feature"]);
    assert!(generate(&["--device", "cpu", "--engine", "portable"])
        .status
        .success());
    // (the study's rows are longer than the tiny model's context: a prompt file)
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    let row = |id: &str, user: &str| {
        serde_json::json!({"id": id, "messages": [{"role": "user", "content": user}],
                           "continuations": {"accept": "yes", "reject": "no"}})
        .to_string()
    };
    std::fs::write(&prompts, [row("a", "A cat"), row("b", "B dog")].join("\n")).unwrap();
    let out = common::afprobe(&[
        "bench",
        "device",
        "--model",
        m,
        "--prompts",
        prompts.to_str().unwrap(),
        "--rows",
        "2",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("ok (limits 1e-4, 1e-4)"), "{table}");
    assert!(
        table.contains("bf16") && table.contains("reported"),
        "{table}"
    );
}
