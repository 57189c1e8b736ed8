//! PEFT LoRA adapters (`--adapter`): plain and activated LoRA on the tiny
//! Llama-3 fixture against transformers + peft in float64 (fixtures written by
//! tests/fixtures/make_tiny_lora.py), the KV cache across the activation
//! boundary, the manifest record, and bad adapters.

mod common;

use std::path::{Path, PathBuf};

use afprobe::model::{
    CaptureRows, HookPoint, Hooks, KvCache, LogitsAt, Model, ModelSpec, NamesFilter, WeightDtype,
};
use candle_core::{IndexOp, Tensor};
use common::{afprobe, assert_fails_with, fixtures, load_fixture, max_abs_diff, rel_l2};

fn base_dir() -> PathBuf {
    fixtures().join("tiny_llama3")
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("tiny_lora").join(name)
}

fn load(adapter: Option<&Path>) -> afprobe::Result<Model> {
    Model::load_with_adapter(&ModelSpec::Path(base_dir()), WeightDtype::F32, adapter)
}

/// (tokens, float64 logits) of every reference sequence of an adapter.
fn references(name: &str) -> Vec<(Vec<u32>, Tensor)> {
    let r = load_fixture(&adapter_dir(name).join("reference.safetensors"));
    (0..)
        .map_while(|i| {
            let tokens = r.get(&format!("tokens.{i}"))?;
            let tokens = common::i64_vec(tokens)
                .into_iter()
                .map(|t| t as u32)
                .collect();
            Some((tokens, r[&format!("logits.{i}")].clone()))
        })
        .collect()
}

fn all_logits(model: &Model, tokens: &[u32]) -> Tensor {
    model
        .run_with_hooks(tokens, &mut Hooks::none(), &LogitsAt::All)
        .unwrap()
}

#[test]
fn plain_and_activated_lora_match_transformers_peft() {
    let base = load(None).unwrap();
    for name in ["plain", "alora"] {
        let model = load(Some(&adapter_dir(name))).unwrap();
        let record = model.adapter.as_ref().unwrap();
        assert_eq!(record.kind, if name == "plain" { "lora" } else { "alora" });
        for (i, (tokens, want)) in references(name).iter().enumerate() {
            let got = all_logits(&model, tokens);
            let (abs, rel) = (max_abs_diff(&got, want), rel_l2(&got, want));
            eprintln!("{name} sequence {i}: max |diff| {abs:e}, relative L2 {rel:e}");
            assert!(
                abs < 1e-4 && rel < 1e-5,
                "{name} sequence {i}: {abs:e} / {rel:e}"
            );
            // The adapter changes the output (else the check above proves nothing).
            let plain = all_logits(&base, tokens);
            if name == "alora" && i == 2 {
                // No invocation tokens: the base model throughout.
                assert_eq!(max_abs_diff(&got, &plain), 0.0);
            } else {
                assert!(
                    max_abs_diff(&got, &plain) > 0.1,
                    "{name} {i}: adapter has no effect"
                );
            }
        }
    }
}

/// A call that crosses the invocation runs in two pieces (base, then adapted
/// weights); a capture of chosen rows must still hold those rows of the whole
/// call, in the asked order (it held only the second piece's, or failed).
#[test]
fn activated_lora_captures_chosen_rows_across_the_invocation() {
    let model = load(Some(&adapter_dir("alora"))).unwrap();
    let points: Vec<HookPoint> = (0..model.config().n_layers)
        .map(HookPoint::ResidPost)
        .collect();
    let mut crossed = 0;
    for (tokens, _) in references("alora") {
        let capture = |rows: CaptureRows| {
            let mut hooks = Hooks::capture(NamesFilter::Only(points.clone()), rows);
            model
                .run_with_hooks(&tokens, &mut hooks, &LogitsAt::Last)
                .unwrap();
            hooks
        };
        let all = capture(CaptureRows::All);
        let n = tokens.len();
        // Both ends, out of order, and a row twice.
        let rows = vec![n - 1, 0, n / 2, 1, n - 1];
        let chosen = capture(CaptureRows::Rows(rows.clone()));
        let index = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for &point in &points {
            let want = all
                .cache
                .require(point)
                .unwrap()
                .index_select(&index, 0)
                .unwrap();
            let got = chosen.cache.require(point).unwrap();
            assert_eq!(got.dims(), want.dims(), "{point}");
            assert!(max_abs_diff(got, &want) < 1e-6, "{point}");
        }
        crossed += usize::from(tokens.windows(2).any(|w| w == [7, 180]) && tokens[..2] != [7, 180]);
    }
    assert!(crossed > 0, "no reference row crosses an invocation");
}

#[test]
fn activated_lora_base_prefix_and_kv_cache() {
    let base = load(None).unwrap();
    let model = load(Some(&adapter_dir("alora"))).unwrap();
    for (tokens, want) in references("alora") {
        let full = all_logits(&model, &tokens);
        // Before the last invocation start, the logits are the base model's.
        let start_in = |seq: &[u32]| {
            (0..seq.len().saturating_sub(1))
                .rev()
                .find(|&i| seq[i..i + 2] == [7, 180])
                .unwrap_or(seq.len())
        };
        let start = start_in(&tokens);
        if start > 0 {
            let b = all_logits(&base, &tokens);
            // (not bit-equal: the LM head runs on fewer rows, another GEMM blocking)
            let d = max_abs_diff(&full.i(..start).unwrap(), &b.i(..start).unwrap());
            assert!(d < 1e-5, "{d:e}");
        }
        // Run in two pieces at every split (through the invocation sequence too):
        // the second piece's logits are those of one call. (The first piece's
        // are too, unless that call sees another last invocation: PEFT decides
        // from the whole input, which it has not seen yet.)
        for split in 1..tokens.len() {
            let mut kv = KvCache::new();
            let a = model
                .transformer
                .forward(
                    &tokens[..split],
                    &mut kv,
                    &mut Hooks::none(),
                    &LogitsAt::All,
                )
                .unwrap();
            let b = model
                .transformer
                .forward(
                    &tokens[split..],
                    &mut kv,
                    &mut Hooks::none(),
                    &LogitsAt::All,
                )
                .unwrap();
            let d = max_abs_diff(&b, &want.i(split..).unwrap());
            assert!(d < 1e-4, "split at {split}: {d:e}");
            assert!(
                max_abs_diff(&b, &full.i(split..).unwrap()) < 1e-5,
                "split at {split}"
            );
            if start_in(&tokens[..split]).min(split) == start.min(split) {
                assert!(
                    max_abs_diff(&a, &full.i(..split).unwrap()) < 1e-5,
                    "split at {split}"
                );
            }
        }
        // Logits at chosen rows across the boundary, in the asked order.
        let rows = vec![tokens.len() - 1, 0, start.min(tokens.len() - 1)];
        let got = model
            .transformer
            .forward(
                &tokens,
                &mut KvCache::new(),
                &mut Hooks::none(),
                &LogitsAt::Rows(rows.clone()),
            )
            .unwrap();
        for (k, &r) in rows.iter().enumerate() {
            assert!(max_abs_diff(&got.i(k).unwrap(), &full.i(r).unwrap()) < 1e-6);
        }
        // A cache reused by another sequence whose invocation lies elsewhere is
        // recomputed where it was computed under another boundary.
        let mut kv = KvCache::new();
        model
            .transformer
            .forward(&tokens, &mut kv, &mut Hooks::none(), &LogitsAt::None)
            .unwrap();
        let other: Vec<u32> = [&tokens[..3], &[7, 180, 55, 66][..]].concat();
        kv.truncate(3).unwrap();
        let got = model
            .transformer
            .forward(&other[3..], &mut kv, &mut Hooks::none(), &LogitsAt::All)
            .unwrap();
        let want_other = all_logits(&model, &other);
        assert!(max_abs_diff(&got, &want_other.i(3..).unwrap()) < 1e-5);
    }
}

#[test]
fn capture_records_the_adapter_in_the_manifest() {
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"text\": \"hello world\"}\n").unwrap();
    let out = work.path().join("store");
    let base = base_dir();
    let adapter = adapter_dir("alora");
    let run = afprobe(&[
        "capture",
        "--prompts",
        prompts.to_str().unwrap(),
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--layers",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let a = &manifest["model"]["adapter"];
    assert_eq!(a["kind"], "alora");
    let sha = afprobe::io::sha256_file(&adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(a["sha256"], sha.as_str());
    assert_eq!(a["alora_invocation_tokens"], serde_json::json!([7, 180]));
}

/// A copy of the plain adapter with `edit` applied to its config and tensors.
fn broken_adapter(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = adapter_dir("plain");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_config(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut tensors = load_fixture(&src.join("adapter_model.safetensors"));
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

fn load_err(adapter: &Path) -> String {
    load(Some(adapter)).unwrap_err().to_string()
}

#[test]
fn bad_adapters_are_clear_errors() {
    // An adapter for another base model (tiny_qwen2 has the same shapes).
    let e = load_err(&adapter_dir("qwen2"));
    assert!(
        e.contains("another base model") && e.contains("tiny_qwen2"),
        "{e}"
    );
    // A rank that does not fit: r = 3 in the config, rank-4 tensors.
    let d = broken_adapter(|c| c["r"] = 3.into(), |_| {});
    let e = load_err(d.path());
    assert!(e.contains("lora_A.weight") && e.contains("r = 3"), "{e}");
    // A target shape that does not fit the base (the tensor is named).
    let d = broken_adapter(
        |_| {},
        |t| {
            let name = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
            t.insert(
                name.into(),
                Tensor::zeros((4, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            );
        },
    );
    let e = load_err(d.path());
    assert!(
        e.contains("layers.1.mlp.down_proj.lora_A.weight") && e.contains("[4, 64]"),
        "{e}"
    );
    // A layer the model does not have.
    let d = broken_adapter(
        |_| {},
        |t| {
            for ab in ["A", "B"] {
                let v = t
                    [&format!("base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight")]
                    .clone();
                t.insert(
                    format!("base_model.model.model.layers.7.self_attn.q_proj.lora_{ab}.weight"),
                    v,
                );
            }
        },
    );
    let e = load_err(d.path());
    assert!(e.contains("layer 7") && e.contains("3 layers"), "{e}");
    // Unknown target modules.
    let d = broken_adapter(
        |c| c["target_modules"] = serde_json::json!(["q_proj", "lm_head"]),
        |_| {},
    );
    let e = load_err(d.path());
    assert!(e.contains("unknown target module `lm_head`"), "{e}");
    // Invocation tokens outside the vocabulary.
    let d = broken_adapter(
        |c| c["alora_invocation_tokens"] = serde_json::json!([7, 5000]),
        |_| {},
    );
    let e = load_err(d.path());
    assert!(
        e.contains("5000") && e.contains("another base model"),
        "{e}"
    );
    // A q_proj adapter on Phi-3, whose checkpoints fuse q/k/v into qkv_proj (it
    // would otherwise adapt nothing).
    let e = Model::load_with_adapter(
        &ModelSpec::Path(common::family_dir("phi3")),
        WeightDtype::F32,
        Some(&adapter_dir("plain")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unknown target module `q_proj`")
            && e.contains("phi3 model's adapters target qkv_proj, o_proj, gate_up_proj, down_proj"),
        "{e}"
    );
    // Not an adapter directory; and through the CLI: non-zero exit, no panic.
    let empty = tempfile::tempdir().unwrap();
    assert!(load_err(empty.path()).contains("adapter_config.json"));
    let out = afprobe(&[
        "generate",
        "--model",
        base_dir().to_str().unwrap(),
        "--adapter",
        adapter_dir("qwen2").to_str().unwrap(),
        "--raw",
        "hi",
    ]);
    assert_fails_with(&out, &["another base model"]);
}
