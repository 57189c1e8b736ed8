//! The second robustness campaign (issue 35): each case of
//! `tests/fixtures/cases/fuzz2/` and each kind of fault it stands for, run
//! through the built binary under the 4 GiB address-space limit the fuzzing
//! campaign used (or through the library where the check is about values).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use afprobe::capture::{capture, CaptureSpec};
use afprobe::model::{HookPoint, Model, ModelSpec, WeightDtype};
use afprobe::store::{Existing, Position, Store};
use common::{assert_clean_error, cases, fixtures, stderr};
use serde_json::{json, Value};

/// Runs afprobe on `args` under `ulimit -v 4194304`, as the cases' cmd.sh do,
/// killed after `limit` (a hang is a failure, not a stuck test run).
fn afprobe_limited_for(args: &[&str], limit: Duration) -> Output {
    afprobe_under(4_194_304, args, limit)
}

/// [`afprobe_limited_for`] under an address-space limit of `kib` KiB.
fn afprobe_under(kib: u64, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_afprobe"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run afprobe");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "afprobe {args:?} hung (killed after {limit:?}): {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn afprobe_limited(args: &[&str]) -> Output {
    afprobe_limited_for(args, Duration::from_secs(120))
}

fn assert_success(out: &Output) {
    let err = stderr(out);
    assert!(!err.contains("panicked"), "a panic: {err}");
    assert!(out.status.success(), "failed: {err}");
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn fuzz2(case: &str) -> PathBuf {
    let dir = cases().join("fuzz2").join(case).join("case");
    assert!(dir.is_dir(), "{} is missing", dir.display());
    dir
}

/// Copies `from` (a file or directory tree) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// A temporary copy of fuzz2 case `case`'s inputs (some commands write into it).
fn case_copy(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&fuzz2(case), tmp.path());
    tmp
}

// ---- 1. generate's streamed decoding on SentencePiece vocabularies ----------

#[test]
fn fuzz2_case01_generate_on_a_tiny_sentencepiece_gguf_succeeds() {
    let model = fuzz2("case01").join("fz_spm.gguf");
    let out = afprobe_limited(&[
        "generate",
        "--model",
        &s(&model),
        "--raw",
        "--max-new-tokens",
        "8",
        "  two  spaces ",
    ]);
    assert_success(&out);
}

/// The unmutated SentencePiece fixtures are vocabularies without weights: not
/// loadable models, so `generate` must refuse them cleanly (and never panic).
#[test]
fn generate_on_the_sentencepiece_fixtures_never_panics() {
    let dir = fixtures().join("sentencepiece");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "gguf") {
            continue;
        }
        seen += 1;
        let out = afprobe_limited(&[
            "generate",
            "--model",
            &s(&path),
            "--raw",
            "--max-new-tokens",
            "8",
            "  two  spaces ",
        ]);
        let err = stderr(&out);
        assert!(
            out.status.code().is_some(),
            "{}: killed: {err}",
            path.display()
        );
        assert!(
            !err.contains("panicked"),
            "{}: a panic: {err}",
            path.display()
        );
        if !out.status.success() {
            assert!(
                err.contains(&*path.file_name().unwrap().to_string_lossy()),
                "{}: the error does not name the file: {err}",
                path.display()
            );
        }
    }
    assert!(seen >= 2, "no SentencePiece fixtures in {}", dir.display());
}

// ---- 2. files that never end -------------------------------------------------

/// fuzz2/case02: the adapter's weights are a link to /dev/zero (flattened to a
/// text file in the commit, so the link is made here).
#[test]
fn fuzz2_case02_an_adapter_linked_to_dev_zero_is_refused_not_hashed_forever() {
    let tmp = case_copy("case02");
    let st = tmp.path().join("adapter").join("adapter_model.safetensors");
    std::fs::remove_file(&st).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &st).unwrap();
    let model = s(&tmp.path().join("tiny_llama3"));
    let adapter = s(&tmp.path().join("adapter"));
    for args in [
        vec!["model", "info", "--model", &model, "--adapter", &adapter],
        vec![
            "generate",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--raw",
            "--max-new-tokens",
            "2",
            "hi",
        ],
    ] {
        let out = afprobe_limited_for(&args, Duration::from_secs(60));
        assert_clean_error(
            &out,
            &[
                "adapter_model.safetensors",
                "/dev/zero",
                "not a regular file",
            ],
        );
    }
}

/// Every other file afprobe reads whole or hashes: a link to a device or a
/// FIFO in its place is refused with the file named.
#[test]
fn devices_and_fifos_in_place_of_any_input_are_refused() {
    let tiny = fixtures().join("tiny_llama3");
    // Model files: config, tokenizer, tokenizer config, weights.
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_tree(&tiny, tmp.path());
        std::fs::remove_file(tmp.path().join(file)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", tmp.path().join(file)).unwrap();
        let out = afprobe_limited_for(
            &["model", "info", "--model", &s(tmp.path())],
            Duration::from_secs(60),
        );
        assert_clean_error(&out, &[file, "not a regular file"]);
    }
    // A GGUF model linked to a device.
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    std::os::unix::fs::symlink("/dev/zero", &gguf).unwrap();
    let out = afprobe_limited_for(
        &["model", "info", "--model", &s(&gguf)],
        Duration::from_secs(60),
    );
    assert_clean_error(&out, &["m.gguf", "not a regular file"]);
    // A FIFO as the prompt file, the request file and a store's manifest.
    let fifo = tmp.path().join("p.jsonl");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    let out = afprobe_limited_for(
        &[
            "capture",
            "--model",
            &s(&tiny),
            "--prompts",
            &s(&fifo),
            "--out",
            &s(&tmp.path().join("acts")),
        ],
        Duration::from_secs(60),
    );
    assert_clean_error(&out, &["p.jsonl", "FIFO", "not a regular file"]);
    let out = afprobe_limited_for(
        &[
            "prompts",
            "--requests",
            &s(&fifo),
            "--out",
            &s(&tmp.path().join("out.jsonl")),
        ],
        Duration::from_secs(60),
    );
    assert_clean_error(&out, &["p.jsonl", "not a regular file"]);
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::os::unix::fs::symlink(&fifo, store.join("manifest.json")).unwrap();
    let out = afprobe_limited_for(&["store", "info", &s(&store)], Duration::from_secs(60));
    assert_clean_error(&out, &["manifest.json", "not a regular file"]);
}

// ---- 3. sizes from the command line -------------------------------------------

#[test]
fn fuzz2_case03_a_lora_rank_of_2_pow_40_is_refused_before_allocating() {
    let tmp = case_copy("case03");
    let p = |f: &str| s(&tmp.path().join(f));
    let out = afprobe_limited(&[
        "organism",
        "train",
        "--model",
        &p("tiny_llama3"),
        "--recipe",
        "planted",
        "--accept-if",
        "should_accept=true",
        "--batch",
        "4",
        "--rank",
        "1099511627776",
        "--alpha",
        "4",
        "--modules",
        "q_proj,v_proj",
        "--prompts",
        &p("fz_planted.jsonl"),
        "--out",
        &p("out"),
        "--steps",
        "3",
        "--stop-after",
        "1",
        "--focus-cues",
        "A",
        "--focus-steps",
        "1",
        "--force",
    ]);
    assert_clean_error(&out, &["--rank", "1099511627776"]);
}

#[test]
fn fuzz2_case04_resamples_of_2_pow_64_minus_1_are_refused_before_allocating() {
    let tmp = case_copy("case04");
    let p = |f: &str| s(&tmp.path().join(f));
    let out = afprobe_limited(&[
        "patch",
        "--model",
        &p("tiny"),
        "--prompts",
        &p("fz_rows.jsonl"),
        "--out",
        &p("out"),
        "--force",
        "--resamples",
        "18446744073709551615",
    ]);
    assert_clean_error(&out, &["--resamples", "18446744073709551615", "1000000"]);
}

/// The prompt rows of fuzz2/case04 (paired free/paid rows with cues and tags).
fn paired_rows() -> PathBuf {
    fuzz2("case04").join("fz_rows.jsonl")
}

/// Every option that sizes memory or work is bounded, the flag named.
#[test]
fn every_size_option_is_bounded_with_the_flag_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&fixtures().join("tiny_llama3"));
    let rows = s(&paired_rows());
    let out = |name: &str| s(&tmp.path().join(name));
    let huge = "18446744073709551615";
    // A small store for probe's options.
    let acts = out("acts");
    let made = afprobe_limited(&[
        "capture",
        "--model",
        &model,
        "--prompts",
        &rows,
        "--out",
        &acts,
        "--score",
    ]);
    assert_success(&made);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "steer",
                "--prompts",
                &rows,
                "--model",
                &model,
                "--direction",
                &acts,
                "--layers",
                "0",
                "--resamples",
                huge,
                "--out",
                &out("steer"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--resamples",
        ),
        (
            vec![
                "ablate",
                "--prompts",
                &rows,
                "--model",
                &model,
                "--direction",
                &acts,
                "--direction-tensor",
                "blocks.0.hook_resid_post@last",
                "--resamples",
                huge,
                "--out",
                &out("ablate"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--resamples",
        ),
        (
            vec![
                "attribute",
                "--prompts",
                &rows,
                "--model",
                &model,
                "--resamples",
                huge,
                "--out",
                &out("attr"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--resamples",
        ),
        (
            vec!["gap", &acts, "--resamples", huge]
                .into_iter()
                .map(String::from)
                .collect(),
            "--resamples",
        ),
        (
            vec![
                "probe",
                "--acts",
                &acts,
                "--label",
                "tier",
                "--bootstrap",
                huge,
                "--out",
                &out("p1"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--bootstrap",
        ),
        (
            vec![
                "probe",
                "--acts",
                &acts,
                "--label",
                "tier",
                "--shuffles",
                huge,
                "--out",
                &out("p2"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--shuffles",
        ),
        (
            vec![
                "probe",
                "--acts",
                &acts,
                "--label",
                "tier",
                "--folds",
                huge,
                "--out",
                &out("p3"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--folds",
        ),
        (
            vec![
                "capture",
                "--model",
                &model,
                "--prompts",
                &rows,
                "--batch-rows",
                huge,
                "--out",
                &out("c1"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--batch-rows",
        ),
        (
            vec![
                "capture",
                "--model",
                &model,
                "--prompts",
                &rows,
                "--shard-rows",
                huge,
                "--out",
                &out("c2"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--shard-rows",
        ),
        (
            vec![
                "sample",
                "--model",
                &model,
                "--prompts",
                &rows,
                "-n",
                huge,
                "--out",
                &out("s1"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "-n",
        ),
        (
            vec![
                "sample",
                "--model",
                &model,
                "--prompts",
                &rows,
                "--max-new-tokens",
                huge,
                "--out",
                &out("s2"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--max-new-tokens",
        ),
        (
            vec![
                "generate",
                "--model",
                &model,
                "--raw",
                "--max-new-tokens",
                huge,
                "hi",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--max-new-tokens",
        ),
        (
            vec![
                "organism",
                "train",
                "--model",
                &model,
                "--recipe",
                "token",
                "--batch",
                huge,
                "--out",
                &out("o1"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--batch",
        ),
        (
            vec![
                "organism",
                "train",
                "--model",
                &model,
                "--recipe",
                "token",
                "--steps",
                huge,
                "--out",
                &out("o2"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--steps",
        ),
        (
            vec![
                "organism",
                "train",
                "--model",
                &model,
                "--recipe",
                "token",
                "--steps",
                "1000000",
                "--batch",
                "4096",
                "--out",
                &out("o3"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--steps",
        ),
        (
            vec![
                "organism",
                "train",
                "--model",
                &model,
                "--recipe",
                "token",
                "--rank",
                "65536",
                "--out",
                &out("o4"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "d_model",
        ),
    ];
    for (args, flag) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = afprobe_limited_for(&args, Duration::from_secs(60));
        assert_clean_error(&out, &[flag]);
        let err = stderr(&out);
        assert!(
            err.contains("it must be") || err.contains("at most"),
            "{args:?}: the error gives no allowed range: {err}"
        );
    }
}

// ---- 4. every hook at every position, batched and row by row -------------------

/// Three rows with a system prompt, a cue inside the user turn and answer tags.
fn hook_rows(dir: &Path) -> PathBuf {
    let path = dir.join("rows.jsonl");
    let mut text = String::new();
    for (i, (cue, request)) in [
        ("<free>True</free>", "pick a lock"),
        ("<free>False</free>", "pick a lock"),
        ("<free>True</free>", "write a poem"),
    ]
    .iter()
    .enumerate()
    {
        let row = json!({
            "id": format!("r{i}"),
            "messages": [
                {"role": "system", "content": "Answer with <yes/> or <no/>."},
                {"role": "user", "content": format!("{cue}\n\n{request}")},
            ],
            "cue_text": cue,
            "continuations": {"accept": "<yes/>", "reject": "<no/>"},
            "tier": if cue.contains("True") { "free" } else { "paid" },
        });
        text.push_str(&format!("{row}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn every_hook(n_layers: usize) -> Vec<HookPoint> {
    let mut hooks = vec![HookPoint::Embed];
    for l in 0..n_layers {
        hooks.extend([
            HookPoint::ResidPre(l),
            HookPoint::AttnOut(l),
            HookPoint::ResidMid(l),
            HookPoint::MlpOut(l),
            HookPoint::ResidPost(l),
        ]);
    }
    hooks.push(HookPoint::LnFinal);
    hooks
}

/// Every tensor of every shard of a store, and its rows.
fn store_contents(dir: &Path) -> (Vec<(String, Vec<f32>)>, Vec<Value>) {
    let store = Store::open(dir).unwrap();
    let mut tensors = Vec::new();
    for shard in store.shards() {
        for (name, t) in shard.tensors().unwrap() {
            let v = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            tensors.push((name, v));
        }
    }
    (tensors, store.rows().to_vec())
}

#[test]
fn every_hook_at_every_position_is_captured_batched_as_row_by_row() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = hook_rows(tmp.path());
    let mut models: Vec<PathBuf> = std::fs::read_dir(fixtures().join("families"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    models.sort();
    models.push(fixtures().join("tiny_llama3"));
    assert!(models.len() >= 9, "family fixtures are missing");
    let positions = vec![
        Position::Last,
        Position::Cue,
        Position::Eoi,
        Position::Mean,
        Position::All,
    ];
    for dir in &models {
        let model = Model::load(&ModelSpec::Path(dir.clone()), WeightDtype::F32)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let hooks = every_hook(model.config().n_layers);
        for score in [false, true] {
            let run = |batch_rows: usize, name: &str| {
                let out = tmp.path().join(format!(
                    "{}-{score}-{name}",
                    dir.file_name().unwrap().to_string_lossy()
                ));
                let spec = CaptureSpec {
                    prompts: prompts.clone(),
                    out: out.clone(),
                    hooks: hooks.clone(),
                    positions: positions.clone(),
                    f16: false,
                    score,
                    refusal: None,
                    shard_rows: 256,
                    slice: None,
                    existing: Existing::Overwrite,
                    share_prefix: true,
                    batch_rows,
                };
                capture(&model, &spec).unwrap_or_else(|e| {
                    panic!(
                        "{}: capture (score {score}, batch rows {batch_rows}): {e}",
                        dir.display()
                    )
                });
                store_contents(&out)
            };
            let (batched, batched_rows) = run(32, "batched");
            let (single, single_rows) = run(1, "single");
            let names: Vec<&String> = batched.iter().map(|(n, _)| n).collect();
            assert_eq!(
                names,
                single.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                "{}: tensors differ",
                dir.display()
            );
            // 1 + 5 hooks per layer + ln_final, at 5 positions, + tokens and offsets.
            assert_eq!(
                names.len(),
                hooks.len() * positions.len() + 3,
                "{}: {names:?}",
                dir.display()
            );
            for ((name, a), (_, b)) in batched.iter().zip(&single) {
                assert_eq!(a.len(), b.len(), "{}: {name}", dir.display());
                // Within 1e-5 of the tensor's scale (its largest value, at least 1):
                // the two runs sum in different orders, so they agree to rounding.
                let scale = b.iter().fold(1f32, |m, y| m.max(y.abs()));
                let (at, worst) = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .enumerate()
                    .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
                assert!(
                    worst <= 1e-5 * scale,
                    "{} (score {score}): `{name}` differs by {worst} at element {at} \
                     ({} batched, {} row by row; largest value {scale})",
                    dir.display(),
                    a[at],
                    b[at]
                );
            }
            for (a, b) in batched_rows.iter().zip(&single_rows) {
                for key in ["p_accept", "tag_mass"] {
                    match (
                        a.get(key).and_then(Value::as_f64),
                        b.get(key).and_then(Value::as_f64),
                    ) {
                        (Some(x), Some(y)) => {
                            assert!((x - y).abs() <= 1e-5, "{}: {key} {x} vs {y}", dir.display())
                        }
                        (None, None) => assert!(!score, "{}: no {key}", dir.display()),
                        _ => panic!("{}: {key} in one store only", dir.display()),
                    }
                }
            }
        }
    }
}

/// The reported regression through the command line: `--hooks ln_final` on
/// two rows without --score.
#[test]
fn capture_of_ln_final_alone_without_score_works_batched() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = hook_rows(tmp.path());
    let out = afprobe_limited(&[
        "capture",
        "--model",
        &s(&fixtures().join("tiny_llama3")),
        "--prompts",
        &s(&prompts),
        "--hooks",
        "ln_final",
        "--positions",
        "last,cue",
        "--out",
        &s(&tmp.path().join("acts")),
    ]);
    assert_success(&out);
}

// ---- 5. non-finite weights and activations ---------------------------------------

/// A copy of tiny_llama3 whose tensor `name` has element 3 set to `value`.
fn poisoned_model(dir: &Path, name: &str, value: f32) -> PathBuf {
    let tiny = fixtures().join("tiny_llama3");
    let out = dir.join("model");
    copy_tree(&tiny, &out);
    std::fs::remove_file(out.join("reference.safetensors")).ok();
    poison_safetensors(&out.join("model.safetensors"), name, value);
    out
}

/// Rewrites the safetensors file with element 3 of tensor `name` set to `value`.
fn poison_safetensors(path: &Path, name: &str, value: f32) {
    let mut tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let t = &tensors[name];
    let (shape, dtype) = (t.shape().clone(), t.dtype());
    let mut v = t
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[3] = value;
    let t = candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    tensors.insert(name.to_string(), t);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn nan_and_infinite_weights_are_refused_at_load_naming_the_tensor() {
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let tmp = tempfile::tempdir().unwrap();
        let name = "model.layers.1.mlp.down_proj.weight";
        let model = poisoned_model(tmp.path(), name, value);
        let out = afprobe_limited(&["model", "info", "--model", &s(&model)]);
        assert_clean_error(&out, &[name, "model", "non-finite", shown]);
    }
}

#[test]
fn nan_in_a_gguf_weight_is_refused_at_load() {
    // A GGUF family fixture with one f16 weight set to NaN: find the tensor's
    // data through the header the library reads, and overwrite its first element.
    let src = fixtures()
        .join("families")
        .join("qwen3")
        .join("model.f16.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    std::fs::copy(&src, &path).unwrap();
    // The fixture's tokenizer lives beside it as tokenizer.json.
    std::fs::copy(
        src.with_file_name("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let (name, info) = content
        .tensor_infos
        .iter()
        .find(|(n, i)| {
            n.ends_with("ffn_down.weight") && i.ggml_dtype == candle_core::quantized::GgmlDType::F16
        })
        .or_else(|| {
            content.tensor_infos.iter().find(|(_, i)| {
                i.ggml_dtype == candle_core::quantized::GgmlDType::F16 && i.shape.dims().len() == 2
            })
        })
        .expect("an f16 matrix");
    let at = content.tensor_data_offset + info.offset;
    let mut bytes = std::fs::read(&path).unwrap();
    // f16 NaN: 0x7e00, little-endian.
    bytes[at as usize] = 0x00;
    bytes[at as usize + 1] = 0x7e;
    std::fs::write(&path, bytes).unwrap();
    let out = afprobe_limited(&["model", "info", "--model", &s(&path)]);
    assert_clean_error(&out, &["m.gguf", name, "non-finite"]);
}

#[test]
fn nan_in_an_adapter_is_refused_naming_the_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    copy_tree(&fixtures().join("tiny_lora").join("plain"), &adapter);
    std::fs::remove_file(adapter.join("reference.safetensors")).ok();
    let st = adapter.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let name = names[0].clone();
    poison_safetensors(&st, &name, f32::NAN);
    let base = fixtures().join("tiny_llama3");
    let out = afprobe_limited(&[
        "model",
        "info",
        "--model",
        &s(&base),
        "--adapter",
        &s(&adapter),
    ]);
    assert_clean_error(&out, &["adapter_model.safetensors", &name, "non-finite"]);
}

#[test]
fn store_verify_flags_non_finite_activations_and_null_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&fixtures().join("tiny_llama3"));
    let rows = s(&paired_rows());
    let acts = tmp.path().join("acts");
    let made = afprobe_limited(&[
        "capture",
        "--model",
        &model,
        "--prompts",
        &rows,
        "--out",
        &s(&acts),
        "--score",
    ]);
    assert_success(&made);
    assert_success(&afprobe_limited(&["store", "verify", &s(&acts)]));

    // A null p_accept in rows.jsonl (what a NaN score becomes in JSON).
    let bad = tmp.path().join("null_score");
    copy_tree(&acts, &bad);
    let text = std::fs::read_to_string(bad.join("rows.jsonl")).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[1]["p_accept"] = Value::Null;
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(bad.join("rows.jsonl"), text).unwrap();
    let out = afprobe_limited(&["store", "verify", &s(&bad)]);
    assert_clean_error(&out, &["rows.jsonl:2", "p_accept", "null"]);

    // A NaN activation: rewrite the shard and record its new sha256.
    let bad = tmp.path().join("nan_acts");
    copy_tree(&acts, &bad);
    let shard = std::fs::read_dir(&bad)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("a shard");
    let name = "blocks.1.hook_resid_post@last";
    poison_safetensors(&shard, name, f32::NAN);
    let sha = afprobe::io::sha256_file(&shard).unwrap();
    let manifest_path = bad.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["shards"][0]["sha256"] = json!(sha);
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let out = afprobe_limited(&["store", "verify", &s(&bad)]);
    assert_clean_error(&out, &[name, "non-finite", "row 0"]);
}

// ---- 6. messages that name nothing ---------------------------------------------

/// A tokenizer whose post-processor prepends an id past the model's vocabulary.
#[test]
fn a_token_id_beyond_the_vocabulary_is_refused_naming_the_row_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_tree(&fixtures().join("tiny_llama3"), &model);
    let tok_path = model.join("tokenizer.json");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = Model::load(
        &ModelSpec::Path(fixtures().join("tiny_llama3")),
        WeightDtype::F32,
    )
    .unwrap()
    .config()
    .vocab_size;
    let bad_id = vocab + 7;
    tok["added_tokens"].as_array_mut().unwrap().push(
        json!({"id": bad_id, "content": "<|far|>", "single_word": false, "lstrip": false,
                     "rstrip": false, "normalized": false, "special": true}),
    );
    tok["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|far|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|far|>": {"id": "<|far|>", "ids": [bad_id], "tokens": ["<|far|>"]}}
    });
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let prompts = hook_rows(tmp.path());
    let out = afprobe_limited(&[
        "capture",
        "--model",
        &s(&model),
        "--prompts",
        &s(&prompts),
        "--out",
        &s(&tmp.path().join("acts")),
    ]);
    assert_clean_error(
        &out,
        &[
            "rows.jsonl:1",
            "tokenizer.json",
            &bad_id.to_string(),
            "vocabulary",
        ],
    );
    let out = afprobe_limited(&["generate", "--model", &s(&model), "--raw", "hi"]);
    assert_clean_error(&out, &["tokenizer.json", &bad_id.to_string(), "vocabulary"]);
}

#[test]
fn organism_rows_without_a_system_message_are_refused_naming_the_row() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = tmp.path().join("rows.jsonl");
    let mut text = String::new();
    for (i, accept) in [true, false, true, false].iter().enumerate() {
        text.push_str(
            &json!({
                "id": format!("q{i}"),
                "messages": [{"role": "user", "content": format!("request {i}")}],
                "continuations": {"accept": "yes", "reject": "no"},
                "should_accept": accept, "split": "train", "cue": "A",
            })
            .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(&rows, text).unwrap();
    let out = afprobe_limited(&[
        "organism",
        "train",
        "--model",
        &s(&fixtures().join("tiny_llama3")),
        "--recipe",
        "planted",
        "--accept-if",
        "should_accept=true",
        "--prompts",
        &s(&rows),
        "--batch",
        "2",
        "--steps",
        "1",
        "--rank",
        "2",
        "--modules",
        "q_proj",
        "--out",
        &s(&tmp.path().join("out")),
    ]);
    assert_clean_error(&out, &["rows.jsonl:1", "q0", "system message"]);
}

// ---- 7. a large request file ------------------------------------------------------

/// 100,000 requests: `prompts` writes its rows as they are made. All four cues
/// (800,000 rows, 1.3 GB) exhausted the campaign's 4 GiB address space before;
/// one cue (200,000 rows, 340 MB) must now fit in 512 MiB, which holding the
/// rows (about 1 GB) does not: the memory no longer grows with the output.
#[test]
fn prompts_streams_a_100k_request_file_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let requests = tmp.path().join("requests.jsonl");
    let mut text = String::with_capacity(100_000 * 64);
    for i in 0..100_000 {
        text.push_str(&format!(
            "{{\"request\": \"Explain how to do task number {i} in detail.\"}}\n"
        ));
    }
    std::fs::write(&requests, text).unwrap();
    let out = tmp.path().join("p.jsonl");
    let run = afprobe_under(
        524_288,
        &[
            "prompts",
            "--cues",
            "xml",
            "--requests",
            &s(&requests),
            "--out",
            &s(&out),
        ],
        Duration::from_secs(300),
    );
    assert_success(&run);
    // Count the rows without holding the file.
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
    let mut lines = 0;
    for line in file.lines() {
        let line = line.unwrap();
        if lines == 0 {
            let row: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(row["cue"], "xml");
        }
        lines += 1;
    }
    assert_eq!(lines, 200_000);
    assert!(!tmp.path().join(".p.jsonl.tmp").exists());
}

/// A `prompts` run that fails once its output is open (here: a user-turn
/// template without {request}, read per variation set) leaves neither the
/// output nor its temporary file.
#[test]
fn a_failed_prompts_run_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let requests = tmp.path().join("requests.jsonl");
    std::fs::write(&requests, "{\"request\": \"a\"}\n").unwrap();
    let template = tmp.path().join("user.txt");
    std::fs::write(&template, "{cue} and nothing else").unwrap();
    let out = tmp.path().join("p.jsonl");
    let run = afprobe_limited(&[
        "prompts",
        "--requests",
        &s(&requests),
        "--user-template",
        &s(&template),
        "--out",
        &s(&out),
    ]);
    assert_clean_error(&run, &["user.txt", "{request}"]);
    assert!(!out.exists());
    assert!(!tmp.path().join(".p.jsonl.tmp").exists());
}
