//! Model inputs that made afprobe panic, abort or give a wrong value (issue 14,
//! kinds 1-4 and 6): each case in `tests/fixtures/cases/`
//! run through the built binary under the 4 GiB address-space limit the
//! fuzzing campaign used, with the right outcome asserted: a non-zero exit
//! whose message names the file and the field or tensor, no panic, no abort;
//! or the value transformers gives.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use afprobe::model::{Message, Model, ModelSpec, WeightDtype};
use afprobe::prompts::{read_prompt_file, render};
use common::{assert_clean_error, cases, fixtures, stderr};

/// Runs afprobe on `args` under `ulimit -v 4194304`, as the cases' cmd.sh do.
fn afprobe_limited(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_afprobe"))
        .args(args)
        .output()
        .expect("run afprobe")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `model info` and `generate` on one fuzz case: each command must fail cleanly.
fn fuzz_case(case: &str, file: &str, needles: &[&str]) {
    let cases = cases();
    let model = cases.join("fuzz").join(case).join("case").join(file);
    assert!(model.exists(), "{} is missing", model.display());
    let model = s(&model);
    let info = afprobe_limited(&["model", "info", "--model", &model]);
    let gen = afprobe_limited(&[
        "generate",
        "--model",
        &model,
        "--raw",
        "--max-new-tokens",
        "2",
        "hi",
    ]);
    for out in [info, gen] {
        assert_clean_error(&out, needles);
    }
}

#[test]
fn case01_a_dimension_of_2_pow_63_is_refused_in_the_header() {
    fuzz_case(
        "case01",
        "fz_model.gguf",
        &[
            "fz_model.gguf",
            "blk.0.attn_q.weight",
            "9223372036854775808",
        ],
    );
}

#[test]
fn case02_a_bad_precompiled_charsmap_is_contained() {
    fuzz_case(
        "case02",
        "model",
        &["model/tokenizer.json", "precompiled_charsmap"],
    );
}

#[test]
fn case04_a_replace_normalizer_with_an_empty_pattern_is_refused() {
    fuzz_case(
        "case04",
        "model",
        &[
            "model/tokenizer.json",
            "`normalizer`",
            "Replace",
            "empty pattern",
        ],
    );
}

#[test]
fn case05_a_float_feed_forward_length_is_refused() {
    fuzz_case(
        "case05",
        "fz_model.gguf",
        &[
            "fz_model.gguf",
            "llama.feed_forward_length",
            "-1.0",
            "integer",
        ],
    );
}

#[test]
fn case08_an_overflowing_tensor_shape_is_refused_in_the_header() {
    fuzz_case(
        "case08",
        "fz_model.gguf",
        &["fz_model.gguf", "blk.1.ffn_up.weight", "dimensions"],
    );
}

#[test]
fn case09_a_layer_count_of_2_pow_33_is_refused_before_allocating() {
    fuzz_case(
        "case09",
        "fz_model.gguf",
        &["fz_model.gguf", "block_count", "8589934592"],
    );
}

#[test]
fn case10_a_truncated_tokenizer_json_is_refused() {
    fuzz_case(
        "case10",
        "model",
        &["model/tokenizer.json", "not a valid tokenizer.json"],
    );
}

#[test]
fn case11_weights_of_another_head_count_are_refused_naming_the_tensor() {
    fuzz_case(
        "case11",
        "model",
        &[
            "config.json",
            "model.layers.0.self_attn.q_proj.weight",
            "[64, 32]",
        ],
    );
}

#[test]
fn case12_a_head_count_that_does_not_fit_the_weights_is_refused() {
    fuzz_case(
        "case12",
        "fz_model.gguf",
        &["fz_model.gguf", "blk.0.attn_q.weight", "300 heads"],
    );
}

#[test]
fn case13_a_head_count_that_does_not_divide_the_hidden_size_is_refused() {
    fuzz_case(
        "case13",
        "model",
        &["config.json", "num_attention_heads", "1000"],
    );
}

#[test]
fn case15_general_alignment_zero_is_refused() {
    fuzz_case(
        "case15",
        "fz_model.gguf",
        &["fz_model.gguf", "general.alignment"],
    );
}

#[test]
fn peer_gguf_alignment_zero_is_refused() {
    let cases = cases();
    let path = s(&cases.join("peer-reports/gguf/llama_align0.gguf"));
    let out = afprobe_limited(&["model", "info", "--model", &path]);
    assert_clean_error(
        &out,
        &["llama_align0.gguf", "general.alignment", "power of two"],
    );
}

/// The last token's `blocks.1.hook_resid_post[:4]` on the first row of
/// `prompts/text12.jsonl`, against the value transformers gives (issue 15).
fn assert_resid_post_1(model_path: &Path, want: [f32; 4]) {
    let prompts = cases().join("peer-reports/prompts/text12.jsonl");
    common::assert_last_resid_post(model_path, &prompts, 1, want);
}

/// `llama.rope.scaling.type = linear` (factor 4) is applied, as transformers does.
#[test]
fn peer_gguf_linear_rope_scaling_is_applied() {
    let cases = cases();
    assert_resid_post_1(
        &cases.join("peer-reports/gguf/llama_rope_linear.gguf"),
        [10.679, 9.676, 9.041, 6.261],
    );
}

/// Mistral's sliding window (4) is applied on prompts longer than it.
#[test]
fn peer_mistral_sliding_window_is_applied() {
    let cases = cases();
    assert_resid_post_1(
        &cases.join("peer-reports/models/mistral_swa"),
        [-10.195, 11.221, 0.871, -6.060],
    );
}

fn load(dir: &Path) -> Model {
    Model::load(&ModelSpec::Path(dir.to_path_buf()), WeightDtype::F32)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// A copy of the peer-report model `name` that loads. In the shared cases the
/// `model.safetensors` of `llama3_style_bos` and `tmpl_*` is a 54-byte text
/// file holding the path of a symlink target on the reporter's machine (a
/// clean error today: "header too large"); the tokenizer and template are what
/// these cases test, so the copy gets `mistral_swa`'s weights, which have the
/// same config (32 wide, 2 layers, 4/2 heads, vocab 300, untied).
fn peer_model(cases: &Path, name: &str) -> tempfile::TempDir {
    let models = cases.join("peer-reports/models");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(models.join(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let weights = dir.path().join("model.safetensors");
    if std::fs::metadata(&weights).unwrap().len() < 1024 {
        std::fs::remove_file(&weights).unwrap();
        std::fs::copy(models.join("mistral_swa/model.safetensors"), &weights).unwrap();
    }
    dir
}

#[test]
fn peer_llama3_style_bos_raw_text_gets_the_post_processor_bos() {
    let cases = cases();
    let dir = peer_model(&cases, "llama3_style_bos");
    let model = load(dir.path());
    let rows_path = cases.join("peer-reports/prompts/bos_rows.jsonl");
    let rows = read_prompt_file(&rows_path).unwrap();
    let tokens = |id: &str| {
        let row = rows.iter().find(|r| r.id == id).unwrap();
        render(&model, row, &rows_path).unwrap().tokens
    };
    // transformers: tokenizer("hello").input_ids
    assert_eq!(tokens("raw"), vec![297, 71, 68, 75, 75, 78]);
    // A text that already starts with the BOS gets no second one.
    assert_eq!(tokens("raw_with_bos"), vec![297, 71, 68, 75, 75, 78]);
    // The chat template writes {{ bos_token }} itself: one BOS.
    let chat = tokens("chat");
    assert_eq!(chat[0], 297);
    assert_ne!(chat[1], 297);
    // `generate --raw` uses the same rule.
    assert_eq!(
        model.tokenizer.encode("hello").unwrap(),
        vec![297, 71, 68, 75, 75, 78]
    );
    assert!(model.tokenizer.add_bos);
    assert_eq!(
        model.tokenizer.bos_token.as_deref(),
        Some("<|begin_of_text|>")
    );
}

/// transformers' `apply_chat_template(..., add_generation_prompt=True)` on
/// `tmpl_rows.jsonl` (the expected renders are in issue 14).
#[test]
fn peer_templates_render_as_transformers() {
    let cases = cases();
    let messages = vec![
        Message::new("system", "Be <brief> & 'exact'"),
        Message::new("user", "héllo"),
    ];
    let expected = [
        (
            "tmpl_tojson",
            "<|im_start|>system\n\"Be <brief> & 'exact'\"<|im_end|>\n<|im_start|>user\n\"héllo\"<|im_end|>\n[{\"role\": \"system\", \"content\": \"Be <brief> & 'exact'\"}]\n<|im_start|>assistant\n",
        ),
        (
            "tmpl_tojson_kwarg",
            "<|im_start|>system\n\"Be <brief> & 'exact'\"<|im_end|>\n<|im_start|>user\n\"héllo\"<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "tmpl_loopcontrols",
            "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n",
        ),
    ];
    let rows_path = cases.join("peer-reports/prompts/tmpl_rows.jsonl");
    let rows = read_prompt_file(&rows_path).unwrap();
    for (name, want) in expected {
        let dir = peer_model(&cases, name);
        let model = load(dir.path());
        assert_eq!(model.format_chat(&messages).unwrap(), want, "{name}");
        // The same through the prompt file, as `capture` renders it.
        let rendered = render(&model, &rows[0], &rows_path).unwrap();
        assert_eq!(rendered.text, want, "{name} via {}", rows_path.display());
        let out = afprobe_limited(&["model", "info", "--model", &s(dir.path())]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
    }
}

/// A copy of the tiny Llama fixture with `chat_template.jinja` replaced.
fn tiny_with_template(template: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny_llama3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join("chat_template.jinja"), template).unwrap();
    dir
}

#[test]
fn a_template_that_does_not_parse_fails_only_chat_prompts_naming_its_file() {
    let dir = tiny_with_template("{% for m in messages %}{{ m.content ");
    let model = s(dir.path());
    let out = afprobe_limited(&["model", "info", "--model", &model]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = afprobe_limited(&[
        "generate",
        "--model",
        &model,
        "--raw",
        "--max-new-tokens",
        "2",
        "hello",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = afprobe_limited(&[
        "generate",
        "--model",
        &model,
        "--max-new-tokens",
        "2",
        "hello",
    ]);
    assert_clean_error(&out, &["chat_template.jinja", "does not parse", "--raw"]);

    // A template from tokenizer_config.json is named by its key.
    let dir = tiny_with_template("");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "{% if %}"}"#,
    )
    .unwrap();
    let out = afprobe_limited(&[
        "generate",
        "--model",
        &s(dir.path()),
        "--max-new-tokens",
        "2",
        "hi",
    ]);
    assert_clean_error(
        &out,
        &["tokenizer_config.json (chat_template)", "does not parse"],
    );
}

#[test]
fn a_safetensors_index_cannot_point_outside_the_model_directory() {
    let dir = tiny_with_template("");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let out = afprobe_limited(&["model", "info", "--model", &s(dir.path())]);
    assert_clean_error(&out, &["model.safetensors.index.json", "../../etc/passwd"]);
}

/// The peer-report directories whose `model.safetensors` is a stray symlink
/// path (see [`peer_model`]) fail cleanly, naming the file.
#[test]
fn peer_models_with_unreadable_weights_fail_cleanly() {
    let cases = cases();
    for name in [
        "llama3_style_bos",
        "tmpl_loopcontrols",
        "tmpl_tojson",
        "tmpl_tojson_kwarg",
    ] {
        let dir = cases.join("peer-reports/models").join(name);
        let out = afprobe_limited(&["model", "info", "--model", &s(&dir)]);
        assert_clean_error(&out, &[&format!("{name}/model.safetensors")]);
    }
}
