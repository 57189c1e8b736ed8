//! One tiny random-weight model per family, written by transformers with a
//! float64 reference (tests/fixtures/make_families.py): Mistral and Qwen2 with
//! sliding windows, Qwen3 (q/k norms, head_dim ≠ d/h), Phi-3 (fused projections,
//! window), OLMo 2 (post-norms, full-width q/k norms), Gemma 2 (four norms,
//! (1 + w), GELU-tanh, embedding scale, query_pre_attn_scalar, both soft-caps,
//! alternating windows), Gemma 3 (q/k norms, local and global rope with linear
//! scaling), and Llama with YaRN and linear rope scaling. Every hook at every
//! position and the logits agree within 1e-5 relative L2; a forward split over
//! the KV cache (past the windows) equals one pass.

mod common;

use afprobe::model::{
    CaptureRows, Edit, HookPoint, Hooks, KvCache, LogitsAt, Model, ModelSpec, NamesFilter,
    Positions, TokenTree, WeightDtype,
};
use candle_core::{DType, Tensor};
use common::{family_dir as dir, load_fixture, rel_l2, FAMILIES};

fn load(family: &str) -> Model {
    Model::load(&ModelSpec::Path(dir(family)), WeightDtype::F32)
        .unwrap_or_else(|e| panic!("loading {family}: {e}"))
}

/// The family's transformers outputs and the token ids they were computed for.
fn reference(family: &str) -> (std::collections::HashMap<String, Tensor>, Vec<u32>) {
    let reference = load_fixture(&dir(family).join("reference.safetensors"));
    let tokens = common::i64_vec(&reference["tokens"])
        .into_iter()
        .map(|t| t as u32)
        .collect();
    (reference, tokens)
}

#[test]
fn every_family_matches_transformers_at_every_hook() {
    for family in FAMILIES {
        let (reference, _) = reference(family);
        common::assert_matches_reference(&load(family), &reference, family);
    }
}

#[test]
fn a_forward_split_over_the_kv_cache_equals_one_pass() {
    for family in FAMILIES {
        let model = load(family);
        let tokens: Vec<u32> = (0..23).map(|i| (i * 37 + 11) % 290 + 3).collect();
        let whole = model
            .transformer
            .forward(
                &tokens,
                &mut KvCache::new(),
                &mut Hooks::none(),
                &LogitsAt::All,
            )
            .unwrap();
        let mut kv = KvCache::new();
        let mut parts = Vec::new();
        for chunk in [&tokens[..7], &tokens[7..8], &tokens[8..]] {
            parts.push(
                model
                    .transformer
                    .forward(chunk, &mut kv, &mut Hooks::none(), &LogitsAt::All)
                    .unwrap(),
            );
        }
        let split = Tensor::cat(&parts, 0).unwrap();
        let err = rel_l2(&split, &whole);
        assert!(
            err < 1e-5,
            "{family}: split vs one pass, relative L2 {err:e}"
        );
    }
}

/// Several branches of different lengths (longer than the windows), with shared
/// and unshared leading tokens and a steering edit at one position, run as one
/// token tree: every row's logits and residuals equal running its branch alone.
#[test]
fn a_token_tree_equals_each_branch_run_alone() {
    let branches: [&[u32]; 5] = [
        &[40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
        &[40, 41, 60],
        &[40, 70, 71, 72],
        &[80],
        &[40, 41, 42, 43, 90, 91, 92, 93, 94, 95, 96, 97],
    ];
    for family in FAMILIES {
        let model = load(family);
        let t = &model.transformer;
        let d = model.config().d_model;
        let prompt: Vec<u32> = (0..13).map(|i| (i * 37 + 11) % 290 + 3).collect();
        let mut kv = KvCache::new();
        t.forward(&prompt, &mut kv, &mut Hooks::none(), &LogitsAt::None)
            .unwrap();
        let steer = Tensor::ones(d, DType::F32, &candle_core::Device::Cpu).unwrap();
        let hooks = || {
            let mut h = Hooks::capture(
                NamesFilter::Only(vec![HookPoint::ResidPost(1)]),
                CaptureRows::All,
            );
            h.add_edit(
                HookPoint::ResidPre(1),
                Edit::Add {
                    vector: steer.clone(),
                    positions: Positions::At(vec![prompt.len() + 2]),
                },
            );
            h
        };
        let (tree, paths) = TokenTree::trie(&branches);
        let mut tree_hooks = hooks();
        let logits = t
            .forward_tree(&tree, &mut kv, &mut tree_hooks, &LogitsAt::All)
            .unwrap()
            .expect("no adapter: the tree runs");
        assert_eq!(kv.len(), prompt.len(), "{family}: the cache is unchanged");
        let resid = tree_hooks.cache.get(HookPoint::ResidPost(1)).unwrap();
        for (branch, path) in branches.iter().zip(&paths) {
            let mut alone_hooks = hooks();
            let alone = t
                .forward(branch, &mut kv.clone(), &mut alone_hooks, &LogitsAt::All)
                .unwrap();
            let rows = Tensor::new(
                path.iter().map(|&n| n as u32).collect::<Vec<_>>(),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let pick = |x: &Tensor| x.index_select(&rows, 0).unwrap();
            let err = common::max_abs_diff(&pick(&logits), &alone);
            assert!(err < 1e-4, "{family} {branch:?}: logits differ by {err:e}");
            let alone_resid = alone_hooks.cache.get(HookPoint::ResidPost(1)).unwrap();
            let err = rel_l2(&pick(resid), alone_resid);
            assert!(
                err < 1e-5,
                "{family} {branch:?}: resid_post.1 relative L2 {err:e}"
            );
        }
        // From block 1 on, seeded with a clean run's resid_pre.1: the edit at
        // block 1 gives the full run's logits and resid_post.1, bit for bit.
        let mut clean = Hooks::capture(
            NamesFilter::Only(vec![HookPoint::ResidPre(1)]),
            CaptureRows::All,
        );
        t.forward_tree(&tree, &mut kv, &mut clean, &LogitsAt::None)
            .unwrap();
        let seed = clean.cache.get(HookPoint::ResidPre(1)).unwrap();
        let mut from_hooks = hooks();
        let from = t
            .forward_tree_from(&tree, &mut kv, &mut from_hooks, &LogitsAt::All, 1, seed)
            .unwrap()
            .expect("no adapter: the tree runs");
        assert_eq!(kv.len(), prompt.len(), "{family}: the cache is unchanged");
        assert_eq!(
            common::max_abs_diff(&from, &logits),
            0.0,
            "{family}: logits"
        );
        let from_resid = from_hooks.cache.get(HookPoint::ResidPost(1)).unwrap();
        assert_eq!(
            common::max_abs_diff(from_resid, resid),
            0.0,
            "{family}: resid_post.1"
        );
        // A seed of the wrong shape is a clear error.
        let err = t
            .forward_tree_from(&tree, &mut kv, &mut hooks(), &LogitsAt::All, 1, &logits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("resid_pre rows"), "{family}: {err}");
    }
}

#[test]
fn model_info_names_each_family() {
    for family in FAMILIES {
        let out = common::afprobe(&[
            "model",
            "info",
            "--json",
            "--model",
            dir(family).to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let arch = info["architecture"].as_str().unwrap();
        assert!(
            family.starts_with(arch) || (family.starts_with("llama") && arch == "llama"),
            "{family}: {arch}"
        );
    }
}

#[test]
fn attention_internals_match_transformers_and_the_fused_output() {
    for family in FAMILIES {
        let model = load(family);
        let (reference, tokens) = reference(family);
        let n = model.config().n_layers;
        let mut points = Vec::new();
        for l in 0..n {
            points.extend([
                HookPoint::AttnZ(l),
                HookPoint::AttnPattern(l),
                HookPoint::AttnOut(l),
                HookPoint::AttnQ(l),
                HookPoint::AttnK(l),
                HookPoint::AttnV(l),
            ]);
        }
        // Split over the KV cache: later rows see more keys, earlier ones are zero-padded.
        let mut hooks = Hooks::capture(NamesFilter::Only(points), CaptureRows::All);
        let mut kv = KvCache::new();
        for chunk in [&tokens[..9], &tokens[9..]] {
            model
                .transformer
                .forward(chunk, &mut kv, &mut hooks, &LogitsAt::None)
                .unwrap();
        }
        let block_norms = model.config().architecture.block_norms();
        for l in 0..n {
            let pattern = hooks.cache.get(HookPoint::AttnPattern(l)).unwrap();
            let t = tokens.len();
            assert_eq!(pattern.dims(), [t, model.config().n_heads, t], "{family}");
            let sums: Vec<f32> = pattern
                .sum(2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "{family} layer {l}: rows sum to 1"
            );
            // Ours is [query, head, key]; transformers' eager weights [head, query, key].
            let want = reference[&format!("pattern.{l}")]
                .permute((1, 0, 2))
                .unwrap();
            let err = rel_l2(
                &pattern.to_dtype(DType::F64).unwrap(),
                &want.contiguous().unwrap(),
            );
            assert!(err < 1e-5, "{family} pattern.{l}: relative L2 {err:e}");
            for p in [
                HookPoint::AttnQ(l),
                HookPoint::AttnK(l),
                HookPoint::AttnV(l),
            ] {
                assert_eq!(
                    hooks.cache.get(p).unwrap().dim(0).unwrap(),
                    t,
                    "{family} {p}"
                );
            }
            // z through o_proj is the attention output (before a post-attention norm,
            // which Gemma and OLMo 2 apply to it).
            if block_norms.attn_post.is_none() {
                let z = hooks.cache.get(HookPoint::AttnZ(l)).unwrap();
                let z = z.reshape((t, ())).unwrap();
                let w = model_weight(family, &format!("model.layers.{l}.self_attn.o_proj.weight"));
                let through = z.matmul(&w.t().unwrap()).unwrap();
                let attn_out = hooks.cache.get(HookPoint::AttnOut(l)).unwrap();
                let err = rel_l2(&through, attn_out);
                assert!(
                    err < 1e-5,
                    "{family} z·o_proj vs attn_out layer {l}: {err:e}"
                );
            }
        }
    }
}

/// One weight of a fixture's model.safetensors.
fn model_weight(family: &str, name: &str) -> Tensor {
    load_fixture(&dir(family).join("model.safetensors"))[name].clone()
}

#[test]
fn attention_internals_are_capture_only() {
    let model = load("gemma2");
    let mut hooks = Hooks::none();
    hooks.add_edit(
        HookPoint::AttnZ(0),
        afprobe::model::Edit::Add {
            vector: Tensor::zeros(64, DType::F32, &candle_core::Device::Cpu).unwrap(),
            positions: afprobe::model::Positions::All,
        },
    );
    let err = model
        .run_with_hooks(&[1, 2, 3], &mut hooks, &LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("capture only"), "{err}");
    for name in ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z"] {
        let p: HookPoint = name.parse().unwrap();
        assert_eq!(p.to_string(), name);
    }
}

/// Families whose fixture has a GGUF copy written by llama.cpp's own converter
/// (tests/fixtures/make_family_ggufs.py, f16 weights). Mistral is absent:
/// llama.cpp writes it as `llama` and drops its sliding window.
const GGUF_FAMILIES: [&str; 4] = ["qwen3", "phi3", "olmo2", "gemma2"];

#[test]
fn llama_cpp_ggufs_of_each_family_match_the_hf_model() {
    for family in GGUF_FAMILIES {
        let gguf = Model::load(
            &ModelSpec::Path(dir(family).join("model.f16.gguf")),
            WeightDtype::F32,
        )
        .unwrap_or_else(|e| panic!("loading {family} GGUF: {e}"));
        // llama.cpp has no key for Gemma 2's query_pre_attn_scalar and uses
        // head_dim (the fixture's is 20, head_dim 16): compare with an HF copy
        // saying so.
        let copy = tempfile::tempdir().unwrap();
        let hf_dir = if family == "gemma2" {
            for f in std::fs::read_dir(dir(family)).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, copy.path().join(f.file_name().unwrap())).unwrap();
            }
            let path = copy.path().join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["query_pre_attn_scalar"] = config["head_dim"].clone();
            std::fs::write(&path, config.to_string()).unwrap();
            copy.path().to_path_buf()
        } else {
            dir(family)
        };
        let hf = Model::load(&ModelSpec::Path(hf_dir), WeightDtype::F32).unwrap();
        let (g, h) = (&gguf.config().family, &hf.config().family);
        assert_eq!(
            (
                g.activation,
                g.qk_norm,
                g.embed_scale,
                g.attn_softcap,
                g.final_softcap
            ),
            (
                h.activation,
                h.qk_norm,
                h.embed_scale,
                h.attn_softcap,
                h.final_softcap
            ),
            "{family}"
        );
        let windows = |c: &afprobe::model::ModelConfig| -> Vec<Option<usize>> {
            (0..c.n_layers).map(|l| c.window(l)).collect()
        };
        assert_eq!(windows(gguf.config()), windows(hf.config()), "{family}");
        assert_eq!(
            gguf.config().attn_scale(),
            hf.config().attn_scale(),
            "{family}"
        );
        let (reference, tokens) = reference(family);
        let run = |model: &Model| {
            let mut hooks = Hooks::capture(NamesFilter::All, CaptureRows::All);
            let logits = model
                .run_with_hooks(&tokens, &mut hooks, &LogitsAt::All)
                .unwrap();
            (hooks, logits)
        };
        let ((got, got_logits), (want, want_logits)) = (run(&gguf), run(&hf));
        // f16 weights: agreement to f16's precision, far below what a wrong
        // name, permutation, norm offset, window or scale would give.
        for &point in want.cache.points() {
            let err = rel_l2(
                got.cache.get(point).unwrap(),
                want.cache.get(point).unwrap(),
            );
            let name = point.to_string();
            assert!(err < 5e-3, "{family} {name}: relative L2 {err:e}");
        }
        let err = rel_l2(&got_logits, &want_logits);
        assert!(err < 5e-3, "{family} logits: relative L2 {err:e}");
        if family != "gemma2" {
            let err = rel_l2(
                &got_logits.to_dtype(DType::F64).unwrap(),
                &reference["logits"],
            );
            assert!(err < 5e-3, "{family} logits vs transformers: {err:e}");
        }
    }
}
