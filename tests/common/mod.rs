//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use afprobe::store::{
    Existing, Manifest, ModelRecord, Position, PromptsRecord, Store, StoreWriter, FORMAT,
};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

/// The tiny random-weight model of each family (tests/fixtures/families, written by
/// tests/fixtures/make_families.py with a float64 transformers reference).
pub const FAMILIES: [&str; 9] = [
    "mistral",
    "qwen2_swa",
    "qwen3",
    "phi3",
    "olmo2",
    "gemma2",
    "gemma3",
    "llama_yarn",
    "llama_linear",
];

/// The fixture directory of `family` (one of [`FAMILIES`]).
pub fn family_dir(family: &str) -> PathBuf {
    fixtures().join("families").join(family)
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The failing inputs of the fuzzing campaigns and peer reports
/// (`tests/fixtures/cases`, README there). Committed: a checkout without them
/// is broken, so this panics rather than letting a test pass empty.
pub fn cases() -> PathBuf {
    let dir = fixtures().join("cases");
    assert!(
        dir.is_dir(),
        "{} is missing: the robustness tests need the committed cases",
        dir.display()
    );
    dir
}

/// Loads the model at `model_path` (directory or GGUF file) and checks the
/// last token's `blocks.{layer}.hook_resid_post[:4]` on the first row of
/// `prompts` against `want` (a right value from transformers or llama.cpp,
/// given to 4 decimals: 2e-3 absolute).
pub fn assert_last_resid_post(model_path: &Path, prompts: &Path, layer: usize, want: [f32; 4]) {
    use afprobe::model::{CaptureRows, HookPoint, Hooks, LogitsAt, Model, ModelSpec, NamesFilter};
    let model = Model::load(
        &ModelSpec::Path(model_path.to_path_buf()),
        afprobe::model::WeightDtype::F32,
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", model_path.display()));
    let row = &afprobe::prompts::read_prompt_file(prompts).unwrap()[0];
    let rendered = afprobe::prompts::render(&model, row, prompts).unwrap();
    let point = HookPoint::ResidPost(layer);
    let mut hooks = Hooks::capture(NamesFilter::Only(vec![point]), CaptureRows::Last);
    model
        .run_with_hooks(&rendered.tokens, &mut hooks, &LogitsAt::Last)
        .unwrap();
    let got: Vec<f32> = hooks
        .cache
        .get(point)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() < 2e-3,
            "{}: got {:?}, want {want:?}",
            model_path.display(),
            &got[..4]
        );
    }
}

/// Runs `reference["tokens"]` through `model` and checks every residual hook
/// (`resid_pre`, `attn_out`, `resid_mid`, `mlp_out`, `resid_post` of every
/// layer) and the logits against a transformers float64 reference in the
/// format of `tests/fixtures/make_families.py`, within 1e-5 relative L2.
pub fn assert_matches_reference(
    model: &afprobe::model::Model,
    reference: &HashMap<String, Tensor>,
    label: &str,
) {
    use afprobe::model::{CaptureRows, HookPoint, Hooks, LogitsAt, NamesFilter};
    let tokens: Vec<u32> = i64_vec(&reference["tokens"])
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let mut hooks = Hooks::capture(NamesFilter::All, CaptureRows::All);
    let logits = model
        .run_with_hooks(&tokens, &mut hooks, &LogitsAt::All)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let got = |p: HookPoint| hooks.cache.get(p).unwrap().to_dtype(DType::F64).unwrap();
    let want = |name: String| reference[&name].clone();
    let check = |what: String, got: &Tensor, want: &Tensor| {
        let err = rel_l2(got, want);
        assert!(err < 1e-5, "{label} {what}: relative L2 {err:e}");
    };
    for l in 0..model.config().n_layers {
        let pre = want(format!("resid_pre.{l}"));
        let post = want(format!("resid_post.{l}"));
        let mlp = want(format!("mlp_out.{l}"));
        let attn = ((&post - &mlp).unwrap() - &pre).unwrap();
        check(format!("resid_pre.{l}"), &got(HookPoint::ResidPre(l)), &pre);
        check(format!("attn_out.{l}"), &got(HookPoint::AttnOut(l)), &attn);
        check(
            format!("resid_mid.{l}"),
            &got(HookPoint::ResidMid(l)),
            &(&pre + &attn).unwrap(),
        );
        check(format!("mlp_out.{l}"), &got(HookPoint::MlpOut(l)), &mlp);
        check(
            format!("resid_post.{l}"),
            &got(HookPoint::ResidPost(l)),
            &post,
        );
    }
    check(
        "logits".into(),
        &logits.to_dtype(DType::F64).unwrap(),
        &reference["logits"],
    );
}

/// All tensors of a safetensors fixture.
pub fn load_fixture(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// Every element of a tensor as f64, flattened.
pub fn f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// ‖a − b‖ / ‖b‖ over all elements (f64 accumulation).
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let (a, b) = (f64_vec(a), f64_vec(b));
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    f64_vec(a)
        .iter()
        .zip(&f64_vec(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A JSON array of token ids.
pub fn token_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a JSON array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

pub fn i64_vec(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// Runs the `afprobe` binary built for the tests.
pub fn afprobe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afprobe"))
        .args(args)
        .output()
        .expect("run afprobe")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A clean failure: an exit code (not a signal: an abort has none), no panic
/// message, and every needle in stderr.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    assert!(
        out.status.code().is_some(),
        "killed by a signal (abort?): {}",
        stderr(out)
    );
    assert_fails_with(out, needles);
}

/// Fails unless the command exited non-zero, without a panic, with a message
/// containing every `needle`.
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

/// What a test store holds besides its rows.
#[derive(Default)]
pub struct StoreShape {
    pub hooks: Vec<String>,
    pub positions: Vec<Position>,
    pub d_model: usize,
    pub n_layers: usize,
}

/// A complete one-shard store of `rows` (each given `n_tokens: 1` and one
/// token) holding `tensors`, as `afprobe capture` would leave it, opened.
pub fn write_store(
    dir: &Path,
    rows: &[Value],
    shape: &StoreShape,
    score: bool,
    tensors: Vec<(String, Tensor)>,
) -> Store {
    write_store_files(dir, rows, shape, score, tensors);
    Store::open(dir).unwrap()
}

/// The files of [`write_store`], without opening them (for stores that a
/// reader must refuse).
pub fn write_store_files(
    dir: &Path,
    rows: &[Value],
    shape: &StoreShape,
    score: bool,
    mut tensors: Vec<(String, Tensor)>,
) {
    let n = rows.len();
    let manifest = Manifest {
        format: FORMAT.into(),
        afprobe_version: "test".into(),
        complete: false,
        model: ModelRecord {
            spec: "synthetic".into(),
            sha256: "0".into(),
            architecture: "llama".into(),
            d_model: shape.d_model,
            n_layers: shape.n_layers,
            adapter: None,
            weights_dtype: None,
        },
        prompts: PromptsRecord {
            file: "p.jsonl".into(),
            sha256: "0".into(),
            rows: n,
        },
        hooks: shape.hooks.clone(),
        positions: shape.positions.clone(),
        dtype: "f32".into(),
        score,
        refusal_openings: None,
        shard_rows: n,
        batch_rows: 1,
        slice: None,
        row_count: 0,
        shards: vec![],
    };
    let mut writer = StoreWriter::open(dir, manifest, Existing::Refuse).unwrap();
    tensors.push((
        "tokens".to_string(),
        Tensor::zeros(n, DType::I64, &Device::Cpu).unwrap(),
    ));
    tensors.push((
        "token_offsets".to_string(),
        Tensor::arange(0i64, n as i64 + 1, &Device::Cpu).unwrap(),
    ));
    let records: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["n_tokens"] = json!(1);
            r
        })
        .collect();
    writer.write_shard(0, [0, n], &records, tensors).unwrap();
    writer.finish().unwrap();
}

/// The vocabulary of an HF directory's `tokenizer.json` as GGUF writes it:
/// `(token, id, token type)`, type 1 for the model's tokens and 3 (control)
/// for added tokens, in id order.
pub fn gguf_vocab(hf_dir: &Path) -> Vec<(String, u64, i32)> {
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut vocab: Vec<(String, u64, i32)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap(), 1))
        .collect();
    for added in tok["added_tokens"].as_array().unwrap() {
        vocab.push((
            added["content"].as_str().unwrap().into(),
            added["id"].as_u64().unwrap(),
            3,
        ));
    }
    vocab.sort_by_key(|v| v.1);
    vocab
}
