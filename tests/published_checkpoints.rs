//! Published checkpoints (issue 31): files as model makers ship them, with
//! keys left out because they equal a class default, keys at another level,
//! turn ends listed only in `generation_config.json`, rules no key carries.
//! The four handed cases of `tests/fixtures/cases/peer-reports-2` (README
//! there) give the values transformers or llama.cpp gives.

mod common;

use std::path::PathBuf;

use afprobe::model::{
    CaptureRows, Engine, Hooks, LogitsAt, Model, ModelSpec, NamesFilter, WeightDtype,
};
use common::{afprobe, assert_last_resid_post, cases, stderr};
use serde_json::Value;

fn case(path: &str) -> PathBuf {
    cases().join("peer-reports-2").join(path)
}

fn load(path: &str) -> Model {
    Model::load(&ModelSpec::Path(case(path)), WeightDtype::F32)
        .unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

/// Gemma 2 and Gemma 3 configs without `tie_word_embeddings` (the class
/// default, true) and no `lm_head.weight` load tied, as transformers does.
#[test]
fn gemma_configs_without_a_tie_key_load_tied() {
    let prompts = case("prompts/text24.jsonl");
    assert_last_resid_post(
        &case("models/gemma3_notie"),
        &prompts,
        1,
        [-1.4808, 0.0212, -2.4144, 2.3552],
    );
    assert_last_resid_post(
        &case("models/gemma2_notie"),
        &prompts,
        1,
        [-1.3103, 0.5407, 0.3819, 1.2306],
    );
    for dir in ["models/gemma3_notie", "models/gemma2_notie"] {
        assert!(load(dir).config().tied_embeddings, "{dir}");
    }
}

/// A config that says tied while the file carries a different head: the
/// file's head is used, as transformers 5 does, and the user is told.
#[test]
fn a_tied_config_with_its_own_head_uses_the_files_head_and_says_so() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(case("reference.json")).expect("reference.json"),
    )
    .unwrap();
    let r = &reference["llama_tied_extra_head"];
    let tokens: Vec<u32> = common::token_ids(&r["tokens"]);
    let model = load("models/llama_tied_extra_head");
    assert!(!model.config().tied_embeddings);
    let mut hooks = Hooks::capture(NamesFilter::Only(vec![]), CaptureRows::Last);
    let logits = model
        .run_with_hooks(&tokens, &mut hooks, &LogitsAt::All)
        .unwrap();
    let log_probs =
        candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F64).unwrap(), 1).unwrap();
    let rows: Vec<Vec<f64>> = log_probs.to_vec2().unwrap();
    let sum: f64 = tokens[1..]
        .iter()
        .enumerate()
        .map(|(i, &t)| rows[i][t as usize])
        .sum();
    let (want, tied) = (
        r["logprob_sum_file_head"].as_f64().unwrap(),
        r["logprob_sum_tied"].as_f64().unwrap(),
    );
    assert!(
        (sum - want).abs() < 1e-3 * want.abs(),
        "log p sum {sum}, transformers {want} (the tied reading gives {tied})"
    );
    let out = afprobe(&[
        "model",
        "info",
        "--model",
        case("models/llama_tied_extra_head").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("tied") && err.contains("lm_head.weight"),
        "no notice of the file's head: {err}"
    );
}

/// A 62-layer Gemma 3 GGUF scales queries by 1/√(d_model/n_heads), llama.cpp's
/// rule for the 27B (no key carries it); its HF twin in transformers agrees.
#[test]
fn gemma3_27b_shaped_gguf_uses_llama_cpps_attention_scale() {
    let prompts = case("prompts/text24.jsonl");
    let want = [0.0371, 19.4062, -12.8693, 19.1230];
    assert_last_resid_post(
        &case("gguf/gemma3_27b_shape/model.gguf"),
        &prompts,
        61,
        want,
    );
    assert_last_resid_post(&case("models/gemma3_27b_shape"), &prompts, 61, want);
}

/// `generation_config.json`'s `eos_token_id: [300, 301]` stops generation at
/// `<end_of_turn>` (301), which the greedy decode emits first: nothing printed.
#[test]
fn generation_stops_at_the_generation_configs_turn_end() {
    let model = load("models/llama_eot");
    assert!(
        model.tokenizer.stop_ids.contains(&301),
        "{:?}",
        model.tokenizer.stop_ids
    );
    let out = afprobe(&[
        "generate",
        "--model",
        case("models/llama_eot").to_str().unwrap(),
        "--raw",
        "--max-new-tokens",
        "6",
        "hello",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim().is_empty(),
        "generation ran past the turn end: {text:?}"
    );
    let info = afprobe(&[
        "model",
        "info",
        "--model",
        case("models/llama_eot").to_str().unwrap(),
    ]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("stop tokens") && info.contains("301 \"<end_of_turn>\""),
        "{info}"
    );
}

/// LongRoPE in the layout Phi-3.5 publishes (`original_max_position_embeddings`
/// at the top level, no `factor`), the layout transformers 5 writes, and with
/// `factor` written out: all give transformers' value, whose attention factor
/// is √(1 + ln 4 / ln 16) from the two lengths.
#[test]
fn longrope_loads_in_every_published_layout() {
    let prompts = case("prompts/text12.jsonl");
    for layout in ["published", "tf5", "factor"] {
        assert_last_resid_post(
            &case(&format!("models/phi3_longrope_{layout}")),
            &prompts,
            1,
            [2.0453, 0.5965, -1.0729, 2.2406],
        );
    }
}

/// The corpus of published configs (`tests/fixtures/published`, sources in
/// its README): each checkpoint's own config.json with only the sizes shrunk,
/// random weights saved by transformers' `save_pretrained`.
fn corpus() -> Vec<(String, PathBuf)> {
    let root = common::fixtures().join("published");
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.safetensors").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "the corpus has {} checkpoints",
        dirs.len()
    );
    dirs
}

/// Every hook at every position and the logits within 1e-5 relative L2 of
/// transformers in float64, on a prompt longer than every shrunk window, by
/// both engines.
#[test]
fn every_published_config_matches_transformers_at_every_hook() {
    for (name, dir) in corpus() {
        let mut model = Model::load(&ModelSpec::Path(dir.clone()), WeightDtype::F32)
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        let reference = common::load_fixture(&dir.join("reference.safetensors"));
        for engine in [Engine::Fused, Engine::Portable] {
            model.transformer.set_engine(engine);
            common::assert_matches_reference(&model, &reference, &format!("{name} ({engine:?})"));
        }
    }
}

/// What afprobe derives from each published config (tie, stop tokens,
/// attention scale) is what transformers derived (`expected.json`), and
/// `model info` prints it.
#[test]
fn model_info_reports_each_published_config_as_transformers_reads_it() {
    for (name, dir) in corpus() {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let out = afprobe(&["model", "info", "--json", "--model", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            info["tied_embeddings"].as_bool(),
            expected["lm_head_is_embed_tokens"].as_bool(),
            "{name}: tied"
        );
        let scale = info["attention_scale"].as_f64().unwrap();
        let want = expected["attention_scaling"].as_f64().unwrap();
        assert!(
            (scale - want).abs() < 1e-9,
            "{name}: attention scale {scale}, transformers {want}"
        );
        // generation_config.json's eos ids, else config.json's (a number or a list).
        let want_stops = match &expected["stop_token_ids"] {
            Value::Null => &expected["stop_token_ids_from_model_config"],
            v => v,
        };
        let want_stops: Vec<u64> = match want_stops {
            Value::Array(ids) => ids.iter().map(|v| v.as_u64().unwrap()).collect(),
            v => v.as_u64().into_iter().collect(),
        };
        let got: Vec<u64> = info["stop_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        for id in want_stops {
            assert!(got.contains(&id), "{name}: stop ids {got:?} lack {id}");
        }
        let text = afprobe(&["model", "info", "--model", dir.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&text.stdout);
        for field in [
            "architecture",
            "rope",
            "window",
            "attention",
            "embeddings",
            "stop tokens",
        ] {
            assert!(
                text.contains(field),
                "{name}: `model info` lacks {field}:\n{text}"
            );
        }
    }
}

/// Published chat templates of the claimed families (llama.cpp's collection,
/// `tests/fixtures/templates`) render as transformers' `apply_chat_template`
/// on system + user, user only, several turns and messages padded with
/// whitespace; a conversation a template refuses (Gemma's system role) is
/// refused with the template's message (`tests/fixtures/make_templates.py`).
#[test]
fn published_chat_templates_render_as_transformers() {
    use afprobe::model::{ChatTemplate, Message};
    let dir = common::fixtures().join("templates");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let conversations = expected["conversations"].as_object().unwrap();
    let templates = expected["templates"].as_object().unwrap();
    assert!(templates.len() >= 10, "{} templates", templates.len());
    for (name, t) in templates {
        let path = dir.join(format!("{name}.jinja"));
        let template = ChatTemplate::new(
            &std::fs::read_to_string(&path).unwrap(),
            &path.display().to_string(),
            t["bos_token"].as_str(),
            t["eos_token"].as_str(),
        );
        for (conv, want) in t["renders"].as_object().unwrap() {
            let messages: Vec<Message> = conversations[conv]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let got = template.render(&messages, true);
            match (want["text"].as_str(), want["error"].as_str(), got) {
                (Some(text), _, Ok(got)) => assert_eq!(got, text, "{name} / {conv}"),
                (None, Some(error), Err(e)) => {
                    assert!(e.to_string().contains(error), "{name} / {conv}: {e}")
                }
                (_, _, got) => panic!("{name} / {conv}: transformers {want}, afprobe {got:?}"),
            }
        }
    }
}

/// Where a template trims the messages (Llama 3's `| trim`), afprobe still
/// finds the user turn, the system message and the cue in the rendered text.
#[test]
fn turns_are_found_where_a_template_trims_them() {
    use afprobe::model::ChatTemplate;
    let dir = common::fixtures().join("templates");
    let path = dir.join("meta-llama-Llama-3.1-8B-Instruct.jinja");
    let mut model = Model::load(
        &ModelSpec::Path(common::fixtures().join("tiny_llama3")),
        WeightDtype::F32,
    )
    .unwrap();
    model.template = Some(ChatTemplate::new(
        &std::fs::read_to_string(&path).unwrap(),
        &path.display().to_string(),
        Some("<|begin_of_text|>"),
        Some("<|eot_id|>"),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let row = serde_json::json!({
        "id": "padded",
        "messages": [
            {"role": "system", "content": "  Free-tier chats train the model. \n"},
            {"role": "user", "content": "\n  Tier: free. Do the task.  \n"},
        ],
        "cue_text": "Tier: free.",
    });
    std::fs::write(&prompts, format!("{row}\n")).unwrap();
    let row = &afprobe::prompts::read_prompt_file(&prompts).unwrap()[0];
    let r = afprobe::prompts::render(&model, row, &prompts).unwrap();
    let span_text = |(a, b): (usize, usize)| model.tokenizer.decode(&r.tokens[a..b]).unwrap();
    assert_eq!(
        span_text(r.user_span.unwrap()).trim(),
        "Tier: free. Do the task."
    );
    assert_eq!(
        span_text(r.system_span.unwrap()).trim(),
        "Free-tier chats train the model."
    );
    assert_eq!(span_text(r.cue_span.unwrap()).trim(), "Tier: free.");
}
